//! What travels over the channels between the coordinator and the crew:
//! claimed jobs go down to the workers, events come up to the coordinator.
//! Beside them, the dispatcher keeps the claim filter that the coordinator
//! reads, and the coordinator rings `wind_down` when the run stops.

use super::RunError;
use crate::domain::{Claim, Completion};
use crate::output::{self, TempFile, Written};

/// A claimed row on its way to a worker.
#[derive(Debug)]
pub struct Job {
    pub claim: Claim,
    pub temp: TempFile,
}

/// Everything that reaches the coordinator.
pub enum Event {
    /// A worker finished an attempt, or the dispatcher gave a job back
    /// unstarted; a done body comes with what it wrote.
    Finished {
        completion: Completion,
        staged: Option<Written>,
    },
    /// The sync thread's answer for the batch it was given: the rows whose
    /// names could not be used, with why, or the error that stops the run.
    Durable(output::Result<Vec<(i64, String)>>),
    /// A worker could not write its file, or the stop signal could not be
    /// watched: the run stops.
    Fatal(RunError),
    /// The stop signal: stop claiming, finish what is in flight.
    Stop,
    /// A host that claims left out can take jobs again: claim now.
    ClaimNow,
    /// Nothing came in before the coordinator's next deadline.
    Tick,
    /// Every worker has stopped.
    WorkersGone,
}
