//! `jobrun refresh`: fetches done URLs again with their stored validators,
//! through the same run as `jobrun run`, and sums up the round.

use anyhow::Result;

use crate::cli::RefreshArgs;
use crate::clock::now_ms;
use crate::commands::Status;
use crate::domain::{RefreshRound, RunEnd, Work, message_of};
use crate::format::thousands;
use crate::progress::Display;
use crate::runner::{self, StopSignal};
use crate::store::{Database, Open};

use super::run::prepare;

pub fn run(db: &Database, args: RefreshArgs, display: Display, stop: StopSignal) -> Result<Status> {
    let (mut store, plan) = prepare(db, args.run, display, Work::Refresh)?;
    let cutoff = args
        .older_than
        .map(|age| now_ms().saturating_sub(age.as_millis().min(i64::MAX as u128) as i64));
    match store.start_refresh(cutoff)? {
        RefreshRound::Started { round, rows } => {
            tracing::info!("refresh #{round}: {} done URLs to refresh", thousands(rows));
        }
        RefreshRound::Resumed { round, rows } => {
            tracing::info!(
                "refresh #{round} is not finished (cut short, or still going elsewhere): \
                 carrying on with its {} URLs left{}",
                thousands(rows),
                if args.older_than.is_some() {
                    " (--older-than picks the URLs of the next refresh)"
                } else {
                    ""
                }
            );
        }
    }
    let totals = runner::execute(store, plan, stop)?;

    let round = db
        .open(Open::MustExist)?
        .refresh_counts()?
        .unwrap_or_default();
    tracing::info!(
        "refresh #{}: {} changed, {} unchanged, {} failed, {} not refreshed yet",
        round.round,
        thousands(round.changed),
        thousands(round.unchanged),
        thousands(round.failed),
        thousands(round.pending),
    );
    Ok(match totals.end {
        Some(RunEnd::Interrupted) => {
            tracing::warn!("interrupted; run `jobrun refresh` again to finish this refresh");
            Status::Interrupted
        }
        Some(RunEnd::Error(error)) => {
            tracing::error!("{}", message_of(&error));
            tracing::info!(
                "URLs not refreshed keep their files; fix the cause and run `jobrun refresh` again"
            );
            Status::of_run_error(&error)
        }
        _ if round.failed > 0 => {
            tracing::warn!(
                "{} refreshes failed; those URLs keep their old files (`jobrun report` lists them)",
                thousands(round.failed)
            );
            Status::Partial
        }
        _ if round.pending > 0 => Status::Partial,
        _ => Status::Success,
    })
}
