//! The workers' side of a run, on the async runtime: the dispatcher, N
//! workers and the progress display. It decides nothing about the run: it
//! passes the stop signal on to the coordinator as an event, and when the
//! coordinator winds the run down, gives the requests in flight a short
//! grace period and then cuts them off. Its last word is `WorkersGone`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;

use crate::counters::Counters;
use crate::fetch::Fetcher;

use super::RunError;
use super::dispatch::{DispatchChannels, Dispatcher};
use super::messages::{Event, Job};
use super::worker;

/// How long in-flight requests may go on after a stop.
const GRACE: Duration = Duration::from_millis(1500);

/// What stops a run: a future that completes when the run should stop
/// (Ctrl-C for `jobrun run`; anything a test likes), or fails when it
/// cannot watch for that.
pub type StopSignal = Pin<Box<dyn Future<Output = Result<(), SignalError>> + Send>>;

/// Why the stop signal could not be watched.
pub type SignalError = Box<dyn std::error::Error + Send + Sync>;

pub struct Crew {
    pub workers: usize,
    pub fetcher: Arc<Fetcher>,
    pub dispatcher: Dispatcher,
    /// The claimed jobs, from the coordinator.
    pub jobs: flume::Receiver<Job>,
    /// To the coordinator.
    pub events: flume::Sender<Event>,
    /// Rung by the coordinator when the run stops.
    pub wind_down: Arc<Notify>,
    pub counters: Arc<Counters>,
}

impl Crew {
    /// Runs the workers, and `progress` beside them, until the workers are
    /// all done; on a wind-down, cuts off those still busy after the grace
    /// period.
    pub async fn run(self, stop: StopSignal, progress: impl Future<Output = ()> + Send + 'static) {
        let progress = tokio::spawn(progress);
        let events = self.events.clone();
        let wind_down = self.wind_down.clone();
        let mut set = self.spawn();
        let mut stop = Some(stop);
        let mut grace: Option<Pin<Box<tokio::time::Sleep>>> = None;
        let mut cut_off = false;
        loop {
            tokio::select! {
                stopped = async { stop.as_mut().expect("guarded").await }, if stop.is_some() => {
                    stop = None;
                    let event = match stopped {
                        Ok(()) => Event::Stop,
                        Err(error) => Event::Fatal(RunError::Signal(error)),
                    };
                    let _ = events.send_async(event).await;
                }
                _ = wind_down.notified(), if grace.is_none() && !cut_off => {
                    grace = Some(Box::pin(tokio::time::sleep(GRACE)));
                }
                _ = async { grace.as_mut().expect("guarded").await }, if grace.is_some() => {
                    set.abort_all();
                    grace = None;
                    cut_off = true;
                }
                joined = set.join_next() => {
                    if joined.is_none() {
                        break;
                    }
                }
            }
        }
        progress.abort();
        let _ = progress.await;
        let _ = events.send_async(Event::WorkersGone).await;
    }

    /// Starts the dispatcher and the workers.
    fn spawn(self) -> JoinSet<()> {
        let mut set = JoinSet::new();
        // Hands a job over only when a worker is free to send it at once,
        // so a host's permit is never held by a job waiting for a worker.
        let (work_tx, work_rx) = flume::bounded(self.workers);
        let idle = Arc::new(Semaphore::new(self.workers));
        set.spawn(self.dispatcher.run(DispatchChannels {
            jobs: self.jobs,
            work: work_tx,
            idle: idle.clone(),
            events: self.events.clone(),
        }));
        for _ in 0..self.workers {
            set.spawn(worker::work(
                self.fetcher.clone(),
                work_rx.clone(),
                idle.clone(),
                self.events.clone(),
                self.counters.clone(),
            ));
        }
        set
    }
}
