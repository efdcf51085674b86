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
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::CommandFactory;

use crate::cli::{Cli, Command, LogFormat};
use crate::progress::Display;
use crate::store::{self, Location, Open, OpenOptions, Store};

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

impl From<Status> for ExitCode {
    fn from(status: Status) -> ExitCode {
        ExitCode::from(match status {
            Status::Success => 0,
            Status::Partial => 1,
            Status::Fatal => 2,
            Status::Interrupted => 130,
        })
    }
}

/// The state database as `--db` names it, and how long to wait for its
/// lock: what every command needs to open it.
pub struct Database {
    /// As given, for messages and for commands to run next.
    pub path: PathBuf,
    pub location: Location,
    lock_wait: Duration,
}

impl Database {
    pub fn open(&self, mode: Open) -> Result<Box<dyn Store>> {
        self.open_for_runs(mode, None)
    }

    /// Opens it for runs that hold `lease` (PostgreSQL): how long a run's
    /// heartbeat may be silent before other runs take its URLs.
    pub fn open_for_runs(&self, mode: Open, lease: Option<Duration>) -> Result<Box<dyn Store>> {
        let options = OpenOptions {
            lock_wait: self.lock_wait,
            lease,
            ..OpenOptions::new(mode)
        };
        store::open(&self.location, &options)
    }

    /// `--db` for messages, any password in a URL hidden.
    pub fn shown(&self) -> String {
        crate::redact::redact_url(&self.path.display().to_string()).into_owned()
    }
}

pub fn dispatch(cli: Cli) -> Result<Status> {
    let display = progress_display(&cli);
    let db = Database {
        location: Location::parse(&cli.db),
        path: cli.db,
        lock_wait: cli.lock_wait,
    };
    let db = &db;
    match cli.command {
        Command::Import(args) => import::run(db, args),
        Command::Run(args) => {
            let display = match display {
                Display::Lines(_) => Display::Lines(args.progress_every),
                other => other,
            };
            run::run(db, args, display)
        }
        Command::Refresh(args) => {
            let display = match display {
                Display::Lines(_) => Display::Lines(args.run.progress_every),
                other => other,
            };
            refresh::run(db, args, display)
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

/// `1234567` as `1,234,567`.
pub fn thousands(n: impl Into<i128>) -> String {
    let n: i128 = n.into();
    let digits = n.unsigned_abs().to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if n < 0 {
        out.push('-');
    }
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A byte count for people: `412.3 MB`.
pub fn human_bytes(bytes: i64) -> String {
    const UNITS: [&str; 5] = ["bytes", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(thousands(-20000), "-20,000");
        assert_eq!(human_bytes(512), "512 bytes");
        assert_eq!(human_bytes(412_300_000), "412.3 MB");
    }
}
