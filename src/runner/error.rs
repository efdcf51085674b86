//! Why a run stopped with an error. Its message is what the run records
//! as its end in the database and what the user reads; its kind is what
//! decides the exit status.

use crate::fetch::ClientError;
use crate::output;
use crate::store;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The state database failed, was locked for too long, or the run was
    /// taken for dead.
    #[error(transparent)]
    Store(#[from] store::Error),
    /// The output folder as a whole cannot be written: every URL would
    /// fail alike.
    #[error(transparent)]
    Output(#[from] output::Error),
    /// The HTTP client could not be set up.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The stop signal could not be watched.
    #[error(transparent)]
    Signal(store::CallerError),
    /// A thread or the async runtime could not be started; when this
    /// process may open no more files, what to do about it.
    #[error("{what}: {error}{}", advice_on(.error))]
    Start {
        what: &'static str,
        error: std::io::Error,
    },
    /// The database stopped answering for longer than the run's lease and a
    /// margin: other runs have taken its URLs.
    #[error(
        "run #{run} stopped: the database {db} has not answered for {waited} s, longer than the \
         run's lease and a margin ({limit} s); its URLs go to the other runs, and the next run \
         here clears what it left in the output folder. Check the network and the server, \
         then run again"
    )]
    Unanswered {
        run: crate::domain::RunId,
        db: String,
        waited: u64,
        limit: u64,
    },
    /// A part of the run ended without being told to (a panic, a channel
    /// closed): a bug.
    #[error("{0}")]
    Internal(&'static str),
}

/// The advice for an error that says this process may open no more files.
fn advice_on(error: &std::io::Error) -> String {
    output::out_of_descriptors(error)
        .map(|advice| format!("; {advice}"))
        .unwrap_or_default()
}

/// What a run's parts return.
pub type Result<T, E = RunError> = std::result::Result<T, E>;
