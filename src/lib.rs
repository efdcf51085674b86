//! jobrun: fetch long lists of HTTP URLs into files, from a crash-safe
//! queue. The layers, from the top: the command line (`cli`), one module
//! per subcommand (`commands`), the run (`runner`), what a run uses
//! (`fetch`, `hosts`, `output`, `progress`), the state database behind one
//! interface (`store`), and the plain data they all speak (`domain`).

mod backoff;
pub mod cli;
pub mod clock;
mod commands;
mod counters;
mod crashpoint;
pub mod domain;
mod fetch;
mod format;
mod hosts;
pub mod log;
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
pub mod store;
mod tls;
mod urlfile;

pub use commands::Status;
pub use runner::StopSignal;

/// Runs the command `cli` asks for; `stop` is what stops a run. An error is logged here, once, with
/// what to do about it; the status says how the command ended.
pub fn run(cli: cli::Cli, stop: StopSignal) -> Status {
    let location = store::Location::parse(&cli.db);
    match commands::dispatch(cli, stop) {
        Ok(status) => status,
        Err(error) if is_broken_pipe(&error) => Status::Success,
        Err(error) => {
            tracing::error!("{error:#}");
            if let Some(hint) = store::damage_hint(&error, &location) {
                tracing::error!("{hint}");
            }
            Status::Fatal
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
