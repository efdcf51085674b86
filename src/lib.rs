//! jobrun: fetch long lists of HTTP URLs into files, from a crash-safe
//! queue. The layers, from the top: the command line (`cli`), one module
//! per subcommand (`commands`), the run (`runner`), what a run uses
//! (`fetch`, `hosts`, `output`, `progress`), the state database behind one
//! interface (`store`), and the plain data they all speak (`domain`).

mod backoff;
pub mod cli;
pub mod clock;
mod commands;
mod connect_gate;
mod context;
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
pub use output::out_of_descriptors;
pub use runner::{SignalError, StopSignal};

/// Runs the command `cli` asks for; `stop` is what stops a run. An error is logged here, once, with
/// what to do about it; the status says how the command ended.
pub fn run(cli: cli::Cli, stop: StopSignal) -> Status {
    let location = store::Location::parse(&cli.db);
    match commands::dispatch(cli, stop) {
        Ok(status) => status,
        Err(error) => {
            let status = Status::of_error(&error);
            if status != Status::Success {
                tracing::error!("{error:#}");
                if let Some(hint) = commands::store_error(&error)
                    .and_then(|error| store::damage_hint(error, &location))
                {
                    tracing::error!("{hint}");
                }
            }
            status
        }
    }
}
