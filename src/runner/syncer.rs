//! The sync thread: makes batches of finished bodies durable (sync, rename,
//! sync) next to the database thread instead of on it. A flush can take tens
//! of milliseconds, and while it runs the database thread goes on claiming
//! rows, so the workers never wait for the disk. One batch is synced at a
//! time; the next one gathers meanwhile, which is what keeps the number of
//! flushes per URL low.

use std::sync::Arc;
use std::thread::JoinHandle;

use crate::output::{OutputDir, Written};

use super::messages::Event;
use super::{Result, RunError};

pub struct Syncer {
    batches: flume::Sender<Vec<Written>>,
    thread: JoinHandle<()>,
}

impl Syncer {
    /// Starts the thread; it answers each batch with `Event::Durable` on
    /// `events`.
    pub fn start(out: Arc<OutputDir>, events: flume::Sender<Event>) -> Result<Syncer> {
        let (batches, incoming) = flume::bounded::<Vec<Written>>(1);
        let thread = std::thread::Builder::new()
            .name("jobrun-sync".into())
            .spawn(move || {
                for staged in incoming {
                    let durable = out.make_durable(&staged);
                    if events.send(Event::Durable(durable)).is_err() {
                        return;
                    }
                }
            })
            .map_err(|error| RunError::Start {
                what: "cannot start the sync thread",
                error,
            })?;
        Ok(Syncer { batches, thread })
    }

    /// Hands over a batch; the caller sends the next one only after this
    /// one's `Event::Durable`.
    pub fn sync(&self, staged: Vec<Written>) -> Result<()> {
        self.batches
            .send(staged)
            .map_err(|_| RunError::Internal("the sync thread stopped unexpectedly"))
    }

    /// Waits for the thread to end, after its last batch.
    pub fn stop(self) -> Result<()> {
        drop(self.batches);
        self.thread
            .join()
            .map_err(|_| RunError::Internal("the sync thread panicked"))
    }
}
