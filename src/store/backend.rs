//! The store interface: every operation jobrun needs from its state
//! database, at batch granularity. SQLite (one machine) and PostgreSQL
//! (several machines on one queue) each implement it; commands and the run
//! owner hold a `Box<dyn Store>` chosen from `--db`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};

use super::{
    Claim, Completion, DoneFile, ExportRow, FailedRow, Holder, HostFilter, InsertResult, Liveness,
    NewUrl, Open, Reclaimed, RefreshCounts, RefreshRound, RowState, RunEnd, RunInfo, RunStart,
    StateCounts, Started, Summary, Work,
};

/// A run's id, as the runs table numbers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunId(pub i64);

/// A run's hold on a claimed row: the run, and the fencing value the claim
/// gave the row. Any later claim of the row changes the fence, so an
/// outcome carrying an old lease is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub run: RunId,
    pub fence: i64,
}

/// Which claim an outcome belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimKey {
    pub id: i64,
    pub lease: Lease,
}

pub trait Store: Send {
    /// Human name for messages: the file path, or the postgres URL without password.
    fn describe(&self) -> String;

    // ---- import ----
    /// Adds the batch in one transaction; one result per input, in order.
    /// A request already there is a duplicate; a name given by the user
    /// (`named`) that is taken, that needs another URL's file as a folder,
    /// or that holds another URL's file, or a request already there under
    /// another name, is refused with the reason, and nothing else changes.
    fn import(&mut self, batch: &[NewUrl<'_>]) -> Result<Vec<InsertResult>>;
    /// Tuning for a long import (SQLite: bigger cache, rarer checkpoints). No-op elsewhere.
    fn expect_bulk_writes(&mut self) -> Result<()>;

    // ---- runs and leases ----
    /// Registers a run after taking back every dead run's rows. `liveness` judges a run
    /// recorded on this machine; a backend may also judge a run dead by its heartbeat
    /// (PostgreSQL: heartbeat older than the lease time).
    fn start_run(
        &mut self,
        me: &RunStart,
        liveness: &dyn Fn(&RunInfo) -> Liveness,
    ) -> Result<Started>;
    /// Takes back the rows of every unfinished run found dead (as
    /// `start_run` does), for a run with nothing left to claim while
    /// others hold URLs. Their cut-short attempts do not use the budget.
    fn reclaim_dead_runs(&mut self, liveness: &dyn Fn(&RunInfo) -> Liveness)
    -> Result<Reclaimed>;
    /// The other runs that hold claimed URLs, most URLs first.
    fn held_by_others(&self, run: RunId) -> Result<Vec<Holder>>;
    /// Renews the run's heartbeat (and so its leases); fails if the run was taken for dead.
    fn heartbeat(&mut self, run: RunId) -> Result<()>;
    /// Records how `run` ended; rows it still holds go back to pending. A
    /// run that another found dead keeps the end recorded then.
    fn end_run(&mut self, run: RunId, end: &RunEnd) -> Result<()>;
    /// The most recent runs, newest first.
    fn recent_runs(&self, limit: usize) -> Result<Vec<RunInfo>>;
    /// How many runs share the job's per-host limits now: on PostgreSQL the
    /// live runs on every machine; elsewhere each run has them whole.
    fn live_runs(&self) -> Result<u64> {
        Ok(1)
    }

    // ---- the queue ----
    /// Records `completions` (only where owner and fence still match; durable files first is
    /// the caller's duty), renews the heartbeat, and claims up to `claim` due rows for `run`
    /// skipping `filter`'s hosts, in one transaction. Claimed rows are `running` under `run`
    /// with a fresh fence. A completion whose row is no longer running under
    /// its lease, or a run already ended, means the run was taken for dead:
    /// an error, and nothing of the batch is kept.
    fn complete_and_claim(
        &mut self,
        run: RunId,
        completions: &[Completion],
        claim: usize,
        filter: &HostFilter,
        work: Work,
    ) -> Result<Vec<Claim>>;
    /// The earliest time (unix ms) a row waiting for `work` becomes due.
    fn next_due(&self, work: Work) -> Result<Option<i64>>;
    /// Runs `settle` on the states of rows `ids` while no run can claim them.
    /// A row that is not there is left out.
    fn with_row_states(
        &mut self,
        ids: &[i64],
        settle: &mut dyn FnMut(&HashMap<i64, RowState>) -> Result<()>,
    ) -> Result<()>;
    /// Failed rows (all, or those with `status`, or whose error contains
    /// `error`) go back to pending with a fresh retry budget.
    fn requeue_failed(&mut self, status: Option<u16>, error: Option<&str>) -> Result<u64>;
    /// Done rows whose files are missing or damaged go back to pending with
    /// a fresh retry budget.
    fn requeue_damaged(&mut self, ids: &[i64]) -> Result<()>;
    /// Starts a refresh round over the done rows last fetched before
    /// `cutoff` (all without one), or resumes the unfinished one.
    fn start_refresh(&mut self, cutoff: Option<i64>) -> Result<RefreshRound>;

    // ---- settings ----
    fn setting(&self, key: &str) -> Result<Option<String>>;
    /// Records `value` under `key` unless a value is there already; returns
    /// the value that holds afterwards. Of two racing callers one records
    /// and the other sees its value. `prepare` runs only when this call
    /// records, before the commit; its error records nothing.
    fn setting_or_insert(
        &mut self,
        key: &str,
        value: &str,
        prepare: &mut dyn FnMut() -> Result<()>,
    ) -> Result<String>;

    // ---- read models (report / export / verify) ----
    /// Rows per state, from maintained counts.
    fn state_counts(&self) -> Result<StateCounts>;
    /// The retries still to come after `now`, as (latest time, count) per second.
    fn retry_schedule(&self, now: i64) -> Result<Vec<(i64, u64)>>;
    /// Counts by state, HTTP status and host, bytes, durations and the
    /// `top_errors` most common errors.
    fn summary(&self, top_errors: usize) -> Result<Summary>;
    /// The counts of the last refresh round, if there was one.
    fn refresh_counts(&self) -> Result<Option<RefreshCounts>>;
    /// Every done URL's file record, in import order, streamed.
    fn done_files(&self, each: &mut dyn FnMut(DoneFile) -> Result<()>) -> Result<()>;
    /// Every failed URL, in import order, streamed.
    fn failed(&self, each: &mut dyn FnMut(FailedRow) -> Result<()>) -> Result<()>;
    /// Every URL, in import order, streamed.
    fn export(&self, each: &mut dyn FnMut(ExportRow) -> Result<()>) -> Result<()>;
}

/// How to open a store.
#[derive(Debug, Clone, Copy)]
pub struct OpenOptions {
    pub mode: Open,
    /// How long a statement waits for another's lock before giving up.
    pub lock_wait: Duration,
    /// The page cache, where the backend has one to size.
    pub cache_kib: Option<u32>,
    /// How long a run's heartbeat may be silent before other runs take its
    /// rows (PostgreSQL; on SQLite a run's own machine tells at once).
    pub lease: Option<Duration>,
}

/// Where the state lives, as `--db` or `JOBRUN_DB` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Sqlite(PathBuf),
    Postgres(String),
}

impl Location {
    /// A `postgres://` or `postgresql://` URL names a PostgreSQL database;
    /// anything else is a SQLite file.
    pub fn parse(db: &std::path::Path) -> Result<Location> {
        let Some(text) = db.to_str() else {
            return Ok(Location::Sqlite(db.to_path_buf()));
        };
        let lower = text.get(..13).unwrap_or(text).to_ascii_lowercase();
        if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
            return Ok(Location::Postgres(text.to_string()));
        }
        if lower.starts_with("postgres:") || lower.starts_with("postgresql:") {
            bail!(
                "--db {}: a PostgreSQL database is named by a URL, postgres://USER@HOST/DATABASE",
                super::postgres::without_password(text)
            );
        }
        Ok(Location::Sqlite(db.to_path_buf()))
    }
}
