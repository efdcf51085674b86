//! One module per subcommand, each with a `run` that takes its parsed
//! arguments and returns the exit status. Exit statuses are decided here and
//! in `main`, nowhere else.

mod export;
mod import;
mod man;
mod refresh;
mod report;
mod retry;
mod run;
mod verify;

use std::error::Error;
use std::io::{ErrorKind, IsTerminal};
use std::process::ExitCode;

use anyhow::Result;
use clap::CommandFactory;

use crate::cli::{Cli, Command};
use crate::log::LogFormat;
use crate::out_dir;
use crate::progress::Display;
use crate::runner::{RunError, StopSignal};
use crate::store::{self, Database};

/// How a command ended, as the shell sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Everything asked for was done.
    Success,
    /// Finished, but some URLs failed for good (or some lines were rejected).
    Partial,
    /// Bad usage, or an error that stopped the command.
    Fatal,
    /// Stopped by Ctrl-C or SIGTERM.
    Interrupted,
}

impl Status {
    /// The exit code: 0, 1, 2 or 130.
    pub fn code(self) -> u8 {
        match self {
            Status::Success => 0,
            Status::Partial => 1,
            Status::Fatal => 2,
            Status::Interrupted => 130,
        }
    }

    /// How a command that failed with `error` ends: a reader that stopped
    /// reading (`jobrun export | head`) is no failure; every other error
    /// stops the command.
    pub fn of_error(error: &anyhow::Error) -> Status {
        if error.chain().any(is_broken_pipe) {
            return Status::Success;
        }
        match error
            .chain()
            .find_map(|cause| cause.downcast_ref::<RunError>())
        {
            Some(error) => Status::of_run_error(error),
            None => Status::Fatal,
        }
    }

    /// How a run that stopped with `error` ends. Every kind stops the run
    /// before its URLs are done, and says why: none is a partial success.
    pub fn of_run_error(error: &RunError) -> Status {
        match error {
            RunError::Store(error) => Status::of_store_error(error),
            RunError::Output(_)
            | RunError::Client(_)
            | RunError::Signal(_)
            | RunError::Start { .. }
            | RunError::Unanswered { .. }
            | RunError::Internal(_) => Status::Fatal,
        }
    }

    fn of_store_error(error: &store::Error) -> Status {
        match error.root() {
            store::Error::Caller(error) if is_broken_pipe(&**error) => Status::Success,
            // A lock held past --lock-wait, a run taken for dead, a
            // database refused, or the backend's own error.
            _ => Status::Fatal,
        }
    }
}

/// The store's error in an error's chain, also inside the error of a run
/// or of the output folder's setting.
pub fn store_error(error: &anyhow::Error) -> Option<&store::Error> {
    error.chain().find_map(|cause| {
        if let Some(RunError::Store(error)) = cause.downcast_ref::<RunError>() {
            return Some(error);
        }
        if let Some(out_dir::Error::Store(error)) = cause.downcast_ref::<out_dir::Error>() {
            return Some(error);
        }
        cause.downcast_ref::<store::Error>()
    })
}

/// A write to a reader that stopped reading, also from inside a function
/// the store ran on each row.
fn is_broken_pipe(cause: &(dyn Error + 'static)) -> bool {
    cause
        .downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == ErrorKind::BrokenPipe)
        || cause.downcast_ref::<csv::Error>().is_some_and(
            |e| matches!(e.kind(), csv::ErrorKind::Io(io) if io.kind() == ErrorKind::BrokenPipe),
        )
        || cause
            .downcast_ref::<serde_json::Error>()
            .is_some_and(|e| e.io_error_kind() == Some(ErrorKind::BrokenPipe))
        || cause
            .downcast_ref::<store::Error>()
            .and_then(store::Error::caller)
            .is_some_and(|error| is_broken_pipe(error))
}

impl From<Status> for ExitCode {
    fn from(status: Status) -> ExitCode {
        ExitCode::from(status.code())
    }
}

/// Runs the command; `stop` is what stops a run (`run`, `refresh`).
pub fn dispatch(cli: Cli, stop: StopSignal) -> Result<Status> {
    let display = progress_display(&cli);
    let db = &Database::new(cli.db, cli.lock_wait).answering_within(cli.db_timeout);
    match cli.command {
        Command::Import(args) => import::run(db, args),
        Command::Run(args) => {
            let display = match display {
                Display::Lines(_) => Display::Lines(args.progress_every),
                other => other,
            };
            run::run(db, args, display, stop)
        }
        Command::Refresh(args) => {
            let display = match display {
                Display::Lines(_) => Display::Lines(args.run.progress_every),
                other => other,
            };
            refresh::run(db, args, display, stop)
        }
        Command::Report(args) => report::run(db, args),
        Command::Export(args) => export::run(db, args),
        Command::Retry(args) => retry::run(db, args),
        Command::Verify(args) => verify::run(db, args),
        Command::Completions(args) => {
            let mut command = Cli::command();
            clap_complete::generate(args.shell, &mut command, "jobrun", &mut std::io::stdout());
            Ok(Status::Success)
        }
        Command::Man(args) => man::run(args),
    }
}

/// A bar on a terminal, status lines elsewhere, nothing when quiet.
fn progress_display(cli: &Cli) -> Display {
    if cli.quiet {
        Display::Off
    } else if cli.log_format == LogFormat::Text && std::io::stderr().is_terminal() {
        Display::Bar
    } else {
        Display::Lines(std::time::Duration::from_secs(5))
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;
    use crate::output;

    fn busy() -> store::Error {
        store::Error::Busy {
            message: "jobrun.db is locked by another process".into(),
            source: rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
                None,
            ),
        }
    }

    #[test]
    fn the_exit_status_follows_the_kind_of_error() {
        // A lock held too long, met by a command or by a run.
        let locked = anyhow::Error::from(busy().context("cannot start the run"));
        assert_eq!(Status::of_error(&locked).code(), 2);
        let run = RunError::Store(busy().context("cannot commit"));
        assert_eq!(Status::of_run_error(&run).code(), 2);
        assert!(store_error(&anyhow::Error::from(run)).is_some_and(store::Error::is_busy));
        let settling = out_dir::Error::Store(busy());
        assert!(store_error(&anyhow::Error::from(settling)).is_some_and(store::Error::is_busy));

        // The output folder as a whole cannot be written.
        let full = RunError::Output(output::Error::Folder("the disk is full".into()));
        assert_eq!(Status::of_run_error(&full).code(), 2);
        assert_eq!(Status::of_error(&anyhow::Error::from(full)).code(), 2);

        // A reader that stopped reading, in what the store ran on each row.
        let closed = store::Error::from(store::CallerError::from(io::Error::from(
            io::ErrorKind::BrokenPipe,
        )));
        let export = anyhow::Error::from(closed).context("cannot export");
        assert_eq!(Status::of_error(&export).code(), 0);
        let other = anyhow::Error::from(io::Error::from(io::ErrorKind::PermissionDenied));
        assert_eq!(Status::of_error(&other).code(), 2);
    }
}
