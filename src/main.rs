//! jobrun: fetch long lists of HTTP URLs into files, from a crash-safe
//! SQLite queue. `main` parses the command line, runs the command and turns
//! its outcome into the exit status. It also watches Ctrl-C: the first
//! stops a run, the second ends the process at once.

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

use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

use commands::Status;
use runner::StopSignal;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    log::init(cli.verbose, cli.quiet, cli.log_format);
    let db = cli.db.clone();
    match commands::dispatch(cli, ctrl_c()) {
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

/// A run's stop signal: the first Ctrl-C or SIGTERM. After it, a second
/// Ctrl-C exits at once with 130, which is safe too: the next run takes this
/// one's rows back. Signals are watched only while a run polls this.
fn ctrl_c() -> StopSignal {
    Box::pin(async {
        let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch for Ctrl-C")?;
        let mut terminate = signal(SignalKind::terminate()).context("cannot watch for SIGTERM")?;
        tokio::select! {
            _ = interrupt.recv() => {
                tracing::warn!("stopping: finishing requests in flight (Ctrl-C again to stop at once)");
            }
            _ = terminate.recv() => {}
        }
        tokio::spawn(async move {
            interrupt.recv().await;
            tracing::warn!("stopped at once; the next run takes the unfinished URLs back");
            std::process::exit(Status::Interrupted.code().into());
        });
        Ok(())
    })
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
