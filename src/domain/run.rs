//! Runs: each `jobrun run` (or `refresh`) is recorded, so that a new run
//! can tell a live run from a dead one and take the dead one's claims
//! back, and so that `report` can say how each run ended.

use std::fmt;

/// A run's number, as the store gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct RunId(pub i64);

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Who is starting a run.
#[derive(Debug, Clone)]
pub struct RunStart {
    pub pid: u32,
    /// The inode of its PID namespace, when /proc shows it.
    pub pid_ns: Option<u64>,
    pub host: String,
    pub boot_id: String,
    pub proc_start: u64,
    pub command: String,
}

/// A run as recorded.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub id: RunId,
    /// Who started it; its `pid_ns` is None for runs recorded before
    /// namespaces were, or without /proc.
    pub start: RunStart,
    pub started_at: i64,
    pub heartbeat_at: i64,
    pub ended_at: Option<i64>,
    pub outcome: Option<RunOutcome>,
    pub message: Option<String>,
    pub done: u64,
    pub failed: u64,
    pub retried: u64,
    pub bytes: u64,
}

/// How a run ended, as recorded: by itself, or by the run that found it dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    Finished,
    /// Stopped by Ctrl-C or SIGTERM.
    Interrupted,
    /// Stopped by an error, recorded as its message.
    Error,
    /// Found dead: its process is gone.
    Killed,
    /// Found dead: the machine restarted since it began.
    Rebooted,
}

impl RunOutcome {
    /// The outcome as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            RunOutcome::Finished => "finished",
            RunOutcome::Interrupted => "interrupted",
            RunOutcome::Error => "error",
            RunOutcome::Killed => "killed",
            RunOutcome::Rebooted => "rebooted",
        }
    }

    /// The outcome named `name`, as [`RunOutcome::as_str`] writes it.
    pub fn parse(name: &str) -> Option<RunOutcome> {
        Some(match name {
            "finished" => RunOutcome::Finished,
            "interrupted" => RunOutcome::Interrupted,
            "error" => RunOutcome::Error,
            "killed" => RunOutcome::Killed,
            "rebooted" => RunOutcome::Rebooted,
            _ => return None,
        })
    }
}

/// Whether an unfinished run's process is still there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    /// The process is gone (killed, or crashed).
    Gone,
    /// The machine restarted since the run began.
    Rebooted,
}

impl Liveness {
    /// The outcome recorded for a run found in this state; none while alive.
    pub fn outcome(self) -> Option<RunOutcome> {
        match self {
            Liveness::Alive => None,
            Liveness::Gone => Some(RunOutcome::Killed),
            Liveness::Rebooted => Some(RunOutcome::Rebooted),
        }
    }
}

/// How a run ended, as it records itself. `E` is why it stopped with an
/// error: the run's own error type while it runs, its message (`String`)
/// as recorded.
#[derive(Debug, Clone)]
pub enum RunEnd<E = String> {
    Finished,
    Interrupted,
    Error(E),
}

impl<E> RunEnd<E> {
    pub fn outcome(&self) -> RunOutcome {
        match self {
            RunEnd::Finished => RunOutcome::Finished,
            RunEnd::Interrupted => RunOutcome::Interrupted,
            RunEnd::Error(_) => RunOutcome::Error,
        }
    }
}

impl<E: std::error::Error> RunEnd<E> {
    /// The end as recorded: an error as its message with its causes.
    pub fn recorded(&self) -> RunEnd {
        match self {
            RunEnd::Finished => RunEnd::Finished,
            RunEnd::Interrupted => RunEnd::Interrupted,
            RunEnd::Error(error) => RunEnd::Error(message_of(error)),
        }
    }
}

impl RunEnd {
    pub fn message(&self) -> Option<&str> {
        match self {
            RunEnd::Error(message) => Some(message),
            RunEnd::Finished | RunEnd::Interrupted => None,
        }
    }
}

/// An error's message followed by its causes', each after `: `, as a user
/// reads it.
pub fn message_of(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut cause = error.source();
    while let Some(error) = cause {
        message.push_str(": ");
        message.push_str(&error.to_string());
        cause = error.source();
    }
    message
}

/// What starting a run found and did.
#[derive(Debug, Default)]
pub struct Started {
    pub id: RunId,
    /// Rows taken back from dead runs.
    pub reclaimed: u64,
    /// Runs found dead, with how they ended.
    pub dead: Vec<(RunId, Liveness)>,
    /// Runs still going.
    pub live: Vec<RunInfo>,
}

/// What looking for dead runs found and did.
#[derive(Debug, Default)]
pub struct Reclaimed {
    /// Rows taken back from dead runs.
    pub rows: u64,
    /// Runs found dead, with how they ended.
    pub dead: Vec<(RunId, Liveness)>,
    /// Runs still going.
    pub live: Vec<RunInfo>,
}

/// Another run's claimed URLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub run: RunId,
    pub pid: u32,
    pub urls: u64,
}
