//! The `jobrun` command: parses the command line, runs the command and
//! turns how it ended into the exit status. It also watches Ctrl-C: the
//! first stops a run, the second ends the process at once.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

use jobrun::{SignalError, Status, StopSignal};

fn main() -> ExitCode {
    let cli = jobrun::cli::Cli::parse();
    jobrun::log::init(cli.verbose, cli.quiet, cli.log_format);
    let fetches = matches!(
        cli.command,
        jobrun::cli::Command::Run(_) | jobrun::cli::Command::Refresh(_)
    );
    if fetches && let Err(error) = open_signal_pipe() {
        tracing::error!("{error:#}");
        return Status::Fatal.into();
    }
    jobrun::run(cli, ctrl_c()).into()
}

/// Opens, for a command that fetches, while this process holds only its
/// standard streams, the pipe through which the async runtime learns of
/// signals. It is opened once, by the first runtime built, and one built
/// when no file descriptor is left would panic; here, too few of them
/// allowed at all is said plainly.
fn open_signal_pipe() -> anyhow::Result<()> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let built = std::panic::catch_unwind(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    });
    std::panic::set_hook(hook);
    let error = match built {
        Ok(Ok(_runtime)) => return Ok(()),
        Ok(Err(error)) => error,
        Err(_) => std::io::Error::from_raw_os_error(libc::EMFILE),
    };
    let advice = jobrun::out_of_descriptors(&error)
        .unwrap_or("check the limits this process runs under, then run again");
    Err(anyhow::anyhow!("cannot start: {error}; {advice}"))
}

/// A run's stop signal: the first Ctrl-C or SIGTERM. After it, a second
/// Ctrl-C exits at once with 130, which is safe too: the next run takes this
/// one's rows back. Signals are watched only while a run polls this.
fn ctrl_c() -> StopSignal {
    Box::pin(async { watch_signals().await.map_err(SignalError::from) })
}

async fn watch_signals() -> anyhow::Result<()> {
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
}
