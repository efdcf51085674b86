//! The one interface to the state database, whatever keeps it. Every
//! method is a whole operation at batch granularity (import a batch,
//! complete and claim a batch, reclaim a dead run's rows, read a model
//! back), so that a backend can do each in one transaction and a round
//! trip or two. The doc comments are the contract every backend meets.

use std::collections::HashMap;

use crate::store::{CallerResult, Result};

use crate::domain::{
    Claim, Completion, DoneFile, ExportRow, FailedRow, Holder, HostFilter, InsertResult, Liveness,
    NewUrl, Reclaimed, RefreshCounts, RefreshRound, RowState, RunEnd, RunId, RunInfo, RunStart,
    Started, StateCounts, Summary, Work,
};

/// A job's state database. Object safe: commands and the run hold a
/// `Box<dyn Store>` chosen at run time from `--db`.
pub trait Store: Send {
    /// Human name for messages: the file path, or the postgres URL without
    /// its password.
    fn describe(&self) -> String;

    // ---- import ----

    /// Adds the batch in one transaction; one result per input, in order.
    /// A URL whose request (URL and `request_hash`) is there already is a
    /// `Duplicate` and changes nothing. A `named` URL is checked against
    /// the others first: the same request under another name, a path
    /// already taken, or a path that is another URL's folder (or inside
    /// another URL's file) is `NameTaken` with a message saying why.
    /// An error keeps nothing of the batch.
    fn import(&mut self, batch: &[NewUrl<'_>]) -> Result<Vec<InsertResult>>;

    /// Tuning for a long import (SQLite: a bigger cache, rarer
    /// checkpoints; PostgreSQL: batches that commit without waiting for
    /// the disk). A no-op where there is nothing to tune. The importer
    /// calls [`Store::finish_bulk_writes`] when it stops, on error too.
    fn expect_bulk_writes(&mut self) -> Result<()>;

    /// Ends what [`Store::expect_bulk_writes`] began: when it returns,
    /// every batch imported since is on disk, as after any other commit.
    fn finish_bulk_writes(&mut self) -> Result<()>;

    // ---- runs and leases ----

    /// Registers a run after taking back every dead run's rows, as
    /// [`Store::reclaim_dead_runs`] does, in the same transaction.
    /// `liveness` judges a run recorded on this machine; a backend may also
    /// judge a run dead by its heartbeat (PostgreSQL: a heartbeat older
    /// than the lease time).
    fn start_run(
        &mut self,
        me: &RunStart,
        liveness: &dyn Fn(&RunInfo) -> Liveness,
    ) -> Result<Started>;

    /// Takes back the rows of every unfinished run found dead: they go back
    /// to pending (done, for rows being refreshed), their cut-short attempt
    /// counted as interrupted and not against the retry budget, and the run
    /// is recorded as ended (killed or rebooted, at its last heartbeat).
    /// Running rows whose run has ended, or was never recorded, go back
    /// too. Runs found alive are returned, untouched.
    fn reclaim_dead_runs(&mut self, liveness: &dyn Fn(&RunInfo) -> Liveness) -> Result<Reclaimed>;

    /// The runs other than `run` that hold claimed rows, with how many,
    /// most rows first.
    fn held_by_others(&self, run: RunId) -> Result<Vec<Holder>>;

    /// Renews the run's heartbeat (and so its leases). Fails if the run
    /// was taken for dead.
    fn heartbeat(&mut self, run: RunId) -> Result<()>;

    /// Records how `run` ended; the rows it still holds go back to pending
    /// (done, for rows being refreshed). A run another one found dead keeps
    /// the end recorded then.
    fn end_run(&mut self, run: RunId, end: &RunEnd) -> Result<()>;

    /// The `limit` most recent runs, newest first.
    fn recent_runs(&self, limit: usize) -> Result<Vec<RunInfo>>;

    /// How many runs share the job's per-host limits now: on PostgreSQL the
    /// live runs on every machine; elsewhere each run has them whole.
    fn live_runs(&self) -> Result<u64> {
        Ok(1)
    }

    // ---- the queue ----

    /// In one transaction: records `completions`, renews `run`'s heartbeat
    /// (a store may renew it less often when there is nothing to record,
    /// as long as it stays well within the lease: SQLite renews it once it
    /// is 5 s old) and claims up to `claim` due rows for `run`, leaving out the hosts
    /// in `filter`. A completion is applied only where its row is still
    /// `running` under the completion's lease (owner and fence) and that
    /// owner is `run`; making done bodies durable first is the caller's
    /// duty. If any completion does not match, or `run` was taken for
    /// dead, nothing of the batch is kept and the error says that the run
    /// was taken for dead. Claimed rows are `running` under `run` with a
    /// fresh fence: due retries first (latest due first), then rows never
    /// tried in import order; for `Work::Refresh`, done rows of the refresh
    /// round by when they became due.
    fn complete_and_claim(
        &mut self,
        run: RunId,
        completions: &[Completion],
        claim: usize,
        filter: &HostFilter,
        work: Work,
    ) -> Result<Vec<Claim>>;

    /// The earliest time (unix ms) a row waiting for `work` becomes due,
    /// if any waits.
    fn next_due(&self, work: Work) -> Result<Option<i64>>;

    /// Runs `settle` on the states of rows `ids` while no run can claim
    /// one of them; rows that are not there are left out. An error from
    /// `settle` is returned.
    fn with_row_states(
        &mut self,
        ids: &[i64],
        settle: &mut dyn FnMut(&HashMap<i64, RowState>) -> CallerResult,
    ) -> Result<()>;

    /// Failed rows (all, or those with HTTP `status`, or whose error
    /// contains `error`) go back to pending with a fresh retry budget.
    /// Returns how many.
    fn requeue_failed(&mut self, status: Option<u16>, error: Option<&str>) -> Result<u64>;

    /// Done rows `ids`, whose files are missing or damaged, go back to
    /// pending with a fresh retry budget; other rows are left alone.
    fn requeue_damaged(&mut self, ids: &[i64]) -> Result<()>;

    /// Starts a refresh round over the done rows last fetched before
    /// `cutoff` (unix ms; all done rows without one), or resumes the
    /// unfinished round, which wins over a new one.
    fn start_refresh(&mut self, cutoff: Option<i64>) -> Result<RefreshRound>;

    // ---- settings ----

    /// The job setting `key`, if recorded.
    fn setting(&self, key: &str) -> Result<Option<String>>;

    /// Records `value` under `key` unless a value is there already, and
    /// returns the value that holds afterwards. Of two processes racing,
    /// one records and the other sees what it recorded. `prepare` runs only
    /// when this call records, before the commit; its error records nothing.
    fn setting_or_insert(
        &mut self,
        key: &str,
        value: &str,
        prepare: &mut dyn FnMut() -> CallerResult,
    ) -> Result<String>;

    // ---- read models (report / export / verify) ----
    // These only read, and work while a run is writing.

    /// Rows per state, and pending rows whose retry time is still to come.
    fn state_counts(&self) -> Result<StateCounts>;

    /// The retries still to come after `now`, as (latest time, count) per
    /// second they fall in.
    fn retry_schedule(&self, now: i64) -> Result<Vec<(i64, u64)>>;

    /// Counts by state, HTTP status and host, bytes done, request
    /// durations and the `top_errors` most common errors of rows not done.
    fn summary(&self, top_errors: usize) -> Result<Summary>;

    /// The counts of the last refresh round, if there was one.
    fn refresh_counts(&self) -> Result<Option<RefreshCounts>>;

    /// Calls `each` with every done row's file record, in import order,
    /// one at a time; stops at `each`'s first error and returns it.
    fn done_files(&self, each: &mut dyn FnMut(DoneFile) -> CallerResult) -> Result<()>;

    /// Calls `each` with every failed row, in import order, as `done_files`.
    fn failed(&self, each: &mut dyn FnMut(FailedRow) -> CallerResult) -> Result<()>;

    /// Calls `each` with every row, in import order, as `done_files`.
    fn export(&self, each: &mut dyn FnMut(ExportRow) -> CallerResult) -> Result<()>;
}
