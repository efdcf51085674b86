//! jobrun: fetch long lists of HTTP URLs into files, from a crash-safe
//! SQLite queue. `main` parses the command line, runs the command and turns
//! its outcome into the exit status.

mod backoff;
mod cli;
mod commands;
mod counters;
mod crashpoint;
mod fetch;
mod format;
mod hosts;
mod log;
mod metrics;
mod out_dir;
mod output;
mod process;
mod progress;
mod proxy;
mod rate;
mod redact;
mod request;
mod retryable;
mod runner;
mod store;
mod tls;
mod urlfile;

use std::process::ExitCode;

use clap::Parser;

use commands::Status;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    log::init(cli.verbose, cli.quiet, cli.log_format);
    let db = cli.db.clone();
    match commands::dispatch(cli) {
        Ok(status) => status.into(),
        Err(error) if is_broken_pipe(&error) => Status::Success.into(),
        Err(error) => {
            tracing::error!("{error:#}");
            if let Some(hint) = store::damage_hint(&error, &db) {
                tracing::error!("{hint}");
            }
            Status::Fatal.into()
        }
    }
}

/// A reader that stopped reading (`jobrun export | head`) is not an error.
fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            || cause.downcast_ref::<csv::Error>().is_some_and(|e| {
                matches!(e.kind(), csv::ErrorKind::Io(io) if io.kind() == std::io::ErrorKind::BrokenPipe)
            })
            || cause.downcast_ref::<serde_json::Error>().is_some_and(|e| e.io_error_kind() == Some(std::io::ErrorKind::BrokenPipe))
    })
}
