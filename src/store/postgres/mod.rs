//! The PostgreSQL store: several machines' runs on one queue.
//!
//! A URL is two rows: what to fetch and where its file goes (`requests`,
//! written once by import) and where it stands (`jobs`, a narrow row that
//! every claim and outcome rewrites without touching the URL's text
//! indexes). Runs claim rows in batches with `FOR UPDATE SKIP LOCKED`, each
//! claim bumping the row's fencing value; outcomes are applied in batches,
//! one statement per kind, only where the row is still running under the
//! same run and fence. A run renews its heartbeat with every commit; one
//! whose heartbeat is older than its lease is dead, and any other run takes
//! its rows back. Counters that `report` reads are kept in the statements
//! that change the rows (import's own, a claim's own, a statement-level
//! trigger on jobs for the rest),
//! per-host ones as one appended row per statement, added up every 16, so
//! nothing counts millions of rows. Transactions are short and never span a
//! fetch.
//!
//! The client is the synchronous `postgres` crate (its own small runtime per
//! connection): the store is used from the run owner's thread and from
//! synchronous commands, never from inside the async runtime.

mod bounded;
mod connect;
mod import;
mod queue;
mod read;
mod runs;

use std::cell::{RefCell, RefMut};
use std::time::Duration;

use crate::store::{CallerResult, Error, Result};
use postgres::Client;

use std::collections::HashMap;

use super::{OpenOptions, Store};
use crate::domain::{
    Claim, Completion, DoneFile, ExportRow, FailedRow, Holder, HostFilter, InsertResult, Liveness,
    NewUrl, Reclaimed, RefreshCounts, RefreshRound, RowState, RunEnd, RunId, RunInfo, RunStart,
    Started, StateCounts, Summary, Work,
};

pub use connect::without_password;

/// How long a run's heartbeat may be silent before another run takes its
/// rows, unless `--lease` says otherwise.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// How much longer than its lease a wait for the server may last, unless
/// `--db-timeout` says: time for a connection that comes back to hear that
/// its run was taken for dead, or to carry on when no other run took its
/// URLs.
pub const ANSWER_MARGIN: Duration = Duration::from_secs(10);

/// How long one wait for the server may last: `--db-timeout` (`within`),
/// else the lease and [`ANSWER_MARGIN`].
pub fn answer_limit(within: Option<Duration>, lease: Duration) -> Duration {
    within.unwrap_or(lease + ANSWER_MARGIN)
}

/// A URL taken back this many times from runs that died while fetching it
/// fails instead of being handed out again: it may be what kills them.
pub const RESCUE_LIMIT: i32 = 5;

/// The server's clock in unix milliseconds: heartbeats and leases are
/// judged by one clock, whatever the machines' clocks say.
const SERVER_NOW: &str = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint";

pub struct PostgresStore {
    /// `&self` readers need the connection too; the store is used by one
    /// thread at a time (`Send`, not `Sync`).
    client: RefCell<Client>,
    /// The URL without its password.
    name: String,
    lease: Duration,
    fresh_from: queue::FreshFrom,
    prepared: queue::Prepared,
    /// What the next import batch checks before each row goes in.
    import_arbiter: import::Arbiter,
    /// Import batches commit without waiting for the disk (see
    /// `import::flush_imports`).
    bulk: bool,
}

impl PostgresStore {
    /// Connects to the database at `url` and brings its schema up to date
    /// (`Open::ReadOnly`: checks it, changes nothing). A database without
    /// jobrun's tables is refused unless `Open::CreateIfMissing`. Runs
    /// started through it hold the lease `options` give, else the job's
    /// setting `lease`, else 30 s.
    pub fn open(url: &str, options: &OpenOptions) -> Result<PostgresStore> {
        let name = without_password(url);
        let bound = |lease: Duration| answer_limit(options.answer_within, lease);
        let limit = bounded::AnswerLimit::new(
            crate::redact::redact_url(url).into_owned(),
            bound(options.lease.unwrap_or(DEFAULT_LEASE)),
            options.answer_slack,
        );
        let mut client = connect::connect(url, options.lock_wait, limit.clone())?;
        connect::check_schema(&mut client, &name, options.mode)?;
        let mut store = PostgresStore {
            client: RefCell::new(client),
            name,
            lease: DEFAULT_LEASE,
            fresh_from: queue::FreshFrom::default(),
            prepared: queue::Prepared::default(),
            import_arbiter: import::Arbiter::Nothing,
            bulk: false,
        };
        store.lease = match options.lease {
            Some(lease) => lease,
            None => match store.get_setting("lease")? {
                Some(text) => humantime::parse_duration(&text).map_err(|e| {
                    Error::Invalid(format!(
                        "the setting lease = {text:?} in {} is not a duration: {e}",
                        store.name
                    ))
                })?,
                None => DEFAULT_LEASE,
            },
        };
        limit.set(bound(store.lease), options.answer_slack);
        Ok(store)
    }

    fn lease_ms(&self) -> i64 {
        i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX)
    }

    /// The connection, for one operation at a time.
    fn client(&self) -> Result<RefMut<'_, Client>> {
        self.client.try_borrow_mut().map_err(|_| {
            Error::Invalid(format!(
                "internal error: {} was used again while reading from it",
                self.name
            ))
        })
    }
}

impl Store for PostgresStore {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn import(&mut self, batch: &[NewUrl<'_>]) -> Result<Vec<InsertResult>> {
        self.import_batch(batch)
    }

    fn expect_bulk_writes(&mut self) -> Result<()> {
        self.bulk = true;
        Ok(())
    }

    fn finish_bulk_writes(&mut self) -> Result<()> {
        self.flush_imports()
    }

    fn start_run(
        &mut self,
        me: &RunStart,
        liveness: &dyn Fn(&RunInfo) -> Liveness,
    ) -> Result<Started> {
        self.register_run(me, liveness)
    }

    fn reclaim_dead_runs(&mut self, liveness: &dyn Fn(&RunInfo) -> Liveness) -> Result<Reclaimed> {
        self.reclaim(liveness)
    }

    fn held_by_others(&self, run: RunId) -> Result<Vec<Holder>> {
        self.holders(run)
    }

    fn heartbeat(&mut self, run: RunId) -> Result<()> {
        self.renew(run)
    }

    fn end_run(&mut self, run: RunId, end: &RunEnd) -> Result<()> {
        self.finish_run(run, end)
    }

    fn recent_runs(&self, limit: usize) -> Result<Vec<RunInfo>> {
        self.runs(limit)
    }

    fn live_runs(&self) -> Result<u64> {
        self.live_run_count()
    }

    fn complete_and_claim(
        &mut self,
        run: RunId,
        completions: &[Completion],
        claim: usize,
        filter: &HostFilter,
        work: Work,
    ) -> Result<Vec<Claim>> {
        self.complete_and_claim_batch(run, completions, claim, filter, work)
    }

    fn next_due(&self, work: Work) -> Result<Option<i64>> {
        self.due_at(work)
    }

    fn with_row_states(
        &mut self,
        ids: &[i64],
        settle: &mut dyn FnMut(&HashMap<i64, RowState>) -> CallerResult,
    ) -> Result<()> {
        self.row_states(ids, settle)
    }

    fn requeue_failed(&mut self, status: Option<u16>, error: Option<&str>) -> Result<u64> {
        self.requeue(status, error)
    }

    fn requeue_damaged(&mut self, ids: &[i64]) -> Result<()> {
        self.requeue_files(ids)
    }

    fn start_refresh(&mut self, cutoff: Option<i64>) -> Result<RefreshRound> {
        self.refresh_round(cutoff)
    }

    fn setting(&self, key: &str) -> Result<Option<String>> {
        self.get_setting(key)
    }

    fn setting_or_insert(
        &mut self,
        key: &str,
        value: &str,
        prepare: &mut dyn FnMut() -> CallerResult,
    ) -> Result<String> {
        self.record_setting(key, value, prepare)
    }

    fn state_counts(&self) -> Result<StateCounts> {
        self.counts()
    }

    fn retry_schedule(&self, now: i64) -> Result<Vec<(i64, u64)>> {
        self.schedule(now)
    }

    fn summary(&self, top_errors: usize) -> Result<Summary> {
        self.summarize(top_errors)
    }

    fn refresh_counts(&self) -> Result<Option<RefreshCounts>> {
        self.refresh_tally()
    }

    fn done_files(&self, each: &mut dyn FnMut(DoneFile) -> CallerResult) -> Result<()> {
        self.files(each)
    }

    fn failed(&self, each: &mut dyn FnMut(FailedRow) -> CallerResult) -> Result<()> {
        self.failed_rows(each)
    }

    fn export(&self, each: &mut dyn FnMut(ExportRow) -> CallerResult) -> Result<()> {
        self.rows(each)
    }
}

/// Adds what the database said to an error, with where it happened.
fn pg_context(error: postgres::Error, name: &str) -> Error {
    if let Some(unanswered) = bounded::unanswered(&error)
        .cloned()
        .or_else(|| bounded::relay_gave_up(&error))
    {
        return Error::from(unanswered);
    }
    let detail = error
        .as_db_error()
        .map(|db| format!("{} ({})", db.message(), db.code().code()));
    match detail {
        Some(detail) => Error::from(error).context(format!("PostgreSQL at {name}: {detail}")),
        None => Error::from(error).context(format!("PostgreSQL at {name}")),
    }
}

trait PgResult<T> {
    /// Names the database in the error.
    fn at(self, name: &str) -> Result<T>;
}

impl<T> PgResult<T> for std::result::Result<T, postgres::Error> {
    fn at(self, name: &str) -> Result<T> {
        self.map_err(|e| pg_context(e, name))
    }
}

/// A count read from the database, never negative.
fn count(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn no_jobrun_tables(name: &str) -> Error {
    Error::Refused(format!(
        "{name} holds no jobrun data; nothing was changed. Import a URL list into it first \
         (`jobrun --db {name} import FILE`)"
    ))
}

#[cfg(test)]
pub(crate) mod tests;
