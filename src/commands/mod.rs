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

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Result;
use clap::CommandFactory;

use crate::cli::{Cli, Command};
use crate::log::LogFormat;
use crate::progress::Display;
use crate::runner::StopSignal;
use crate::store::Database;

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
}

impl From<Status> for ExitCode {
    fn from(status: Status) -> ExitCode {
        ExitCode::from(status.code())
    }
}

/// Runs the command; `stop` is what stops a run (`run`, `refresh`).
pub fn dispatch(cli: Cli, stop: StopSignal) -> Result<Status> {
    let display = progress_display(&cli);
    let db = &Database::new(cli.db, cli.lock_wait);
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
