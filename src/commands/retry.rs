//! `jobrun retry`: failed URLs, all or those matching a status or an error,
//! go back to pending with a fresh retry budget.

use anyhow::Result;

use crate::cli::RetryArgs;
use crate::commands::Status;
use crate::format::thousands;
use crate::store::{Database, Open};

pub fn run(db: &Database, args: RetryArgs) -> Result<Status> {
    let mut store = db.open(Open::MustExist)?;
    let requeued = store.requeue_failed(args.status, args.error.as_deref())?;
    let which = match (args.status, &args.error) {
        (None, None) => String::new(),
        (Some(status), None) => format!(" with HTTP status {status}"),
        (None, Some(text)) => format!(" whose error contains {text:?}"),
        (Some(status), Some(text)) => {
            format!(" with HTTP status {status} and an error containing {text:?}")
        }
    };
    tracing::info!(
        "{} failed URLs{which} are pending again, each with a fresh retry budget",
        thousands(requeued)
    );
    if requeued > 0 {
        tracing::info!("fetch them with `jobrun --db {} run`", db.shown());
    }
    Ok(Status::Success)
}
