//! Reading the queue back: counts for `report` and rows for `export`. These
//! only read, so they work while a run is writing (WAL readers never block
//! the writer).
//!
//! Counts come from the tallies (`tallies.rs`), never from a pass over the
//! rows, so that `report` and the start of a run
//! take as long at a million URLs as at ten thousand. Only what a tally cannot
//! hold is counted on the state index: the rows running now and the rows
//! waiting for a retry, a few at any time.

use std::collections::{BTreeMap, HashMap};

use crate::store::{CallerResult, Result};
use rusqlite::types::ValueRef;

use super::SqliteStore;
use super::compact::{FULL_URL, PathColumn};
use super::tallies::{TALLIES, TOP_ERRORS};
use crate::clock::now_ms;
use crate::domain::{
    DoneFile, Durations, ErrorCount, ExportRow, FailedRow, HostCount, JobState, StateCounts,
    StatusCount, Summary,
};

/// A count as SQLite stores it (an INTEGER), which is never negative.
fn count(value: i64) -> u64 {
    value.max(0) as u64
}

impl SqliteStore {
    /// Counts by state, from the tallies.
    pub(super) fn state_counts(&self) -> Result<StateCounts> {
        let mut counts = StateCounts::default();
        let mut statement = self.conn.prepare(&format!(
            "SELECT state, sum(rows) FROM ({TALLIES}) GROUP BY state"
        ))?;
        let mut rows = statement.query([])?;
        while let Some(row) = rows.next()? {
            add_to_state(&mut counts, row.get_ref(0)?.as_bytes()?, count(row.get(1)?));
        }
        self.count_unsettled(&mut counts)?;
        Ok(counts)
    }

    /// Counts the rows running now (the tallies count them as pending) and
    /// those waiting for a retry, on the state index: both are few, whatever
    /// the size of the table.
    fn count_unsettled(&self, counts: &mut StateCounts) -> Result<()> {
        counts.running = count(self.conn.query_row(
            "SELECT count(*) FROM urls WHERE state = 'running'",
            [],
            |row| row.get(0),
        )?);
        counts.pending = counts.pending.saturating_sub(counts.running);
        counts.retry_waiting = count(self.conn.query_row(
            "SELECT count(*) FROM urls WHERE state = 'pending' AND next_attempt_at > ?1",
            [now_ms()],
            |row| row.get(0),
        )?);
        Ok(())
    }

    /// The retries still to come after `now`, as (latest time, count) per
    /// second they fall in: what a run's progress display starts from.
    pub(super) fn retry_schedule(&self, now: i64) -> Result<Vec<(i64, u64)>> {
        let schedule = self
            .conn
            .prepare(
                "SELECT max(next_attempt_at), count(*) FROM urls
                 WHERE state = 'pending' AND next_attempt_at > ?1
                 GROUP BY (next_attempt_at + 999) / 1000",
            )?
            .query_map([now], |row| {
                Ok((row.get(0)?, row.get::<_, i64>(1)?.max(0) as u64))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(schedule)
    }

    /// Counts by state, HTTP status and host, bytes, durations and the
    /// `top_errors` most common errors, from the tallies: a few rows per
    /// origin, and one per distinct error.
    pub(super) fn summary(&self, top_errors: usize) -> Result<Summary> {
        let mut summary = Summary::default();
        let mut statuses = BTreeMap::<u16, u64>::new();
        // Every origin's host slot: origins are few, and several (http and
        // https) may share a host.
        let mut hosts = Vec::<HostCount>::new();
        let mut origins = HashMap::<i64, usize>::new();
        {
            let mut host_slots = HashMap::<String, usize>::new();
            let mut statement = self.conn.prepare("SELECT id, host FROM origins")?;
            let mut rows = statement.query([])?;
            while let Some(row) = rows.next()? {
                let host: String = row.get(1)?;
                let slot = *host_slots.entry(host.clone()).or_insert_with(|| {
                    hosts.push(HostCount {
                        host,
                        ..HostCount::default()
                    });
                    hosts.len() - 1
                });
                origins.insert(row.get(0)?, slot);
            }
        }
        let mut statement = self.conn.prepare(TALLIES)?;
        let mut rows = statement.query([])?;
        while let Some(row) = rows.next()? {
            let origin: i64 = row.get(0)?;
            let slot = *origins.get(&origin).ok_or_else(|| {
                rusqlite::Error::FromSqlConversionFailure(
                    0,
                    rusqlite::types::Type::Integer,
                    format!("URLs of unknown origin {origin}").into(),
                )
            })?;
            let state = row.get_ref(1)?.as_bytes()?;
            let rows = count(row.get(3)?);
            add_to_state(&mut summary.counts, state, rows);
            let per_host = &mut hosts[slot];
            per_host.total += rows;
            match state {
                b"pending" => per_host.pending += rows,
                b"done" => {
                    per_host.done += rows;
                    summary.bytes += count(row.get(4)?);
                }
                _ => per_host.failed += rows,
            }
            if let Ok(status) = u16::try_from(row.get::<_, i64>(2)?)
                && status > 0
            {
                *statuses.entry(status).or_default() += rows;
            }
        }
        self.count_unsettled(&mut summary.counts)?;
        summary.http_statuses = statuses
            .into_iter()
            .map(|(status, count)| StatusCount { status, count })
            .collect();
        // Hosts whose URLs are all gone (none are removed today) are not shown.
        hosts.retain(|host| host.total > 0);
        if hosts.len() > 1 {
            hosts.sort_by(|a, b| a.host.cmp(&b.host));
            self.add_host_answers(&mut hosts)?;
            summary.hosts = hosts;
        }
        summary.errors = self.top_errors(top_errors)?;
        summary.durations = self.durations()?;
        Ok(summary)
    }

    /// The `limit` most common last errors of rows not done, each with the
    /// URL of a row that had it.
    fn top_errors(&self, limit: usize) -> Result<Vec<ErrorCount>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut statement = self.conn.prepare(&format!(
            "SELECT e.error, e.rows, {FULL_URL}
             FROM ({TOP_ERRORS}) AS e
                 LEFT JOIN urls ON urls.id = e.example_id
             ORDER BY e.rows DESC, e.error"
        ))?;
        let errors = statement
            .query_map([limit as i64], |row| {
                Ok(ErrorCount {
                    error: match row.get_ref(0)? {
                        ValueRef::Text(text) => String::from_utf8_lossy(text).into_owned(),
                        _ => String::new(),
                    },
                    count: count(row.get(1)?),
                    example: row.get::<_, Option<String>>(2)?.unwrap_or_default(),
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(errors)
    }

    /// Answers and 429s and 503s per host, as runs recorded them. A database
    /// written by an older jobrun, opened read-only, may not have them.
    fn add_host_answers(&self, hosts: &mut [HostCount]) -> Result<()> {
        let recorded: i64 = self.conn.query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'host_answers'",
            [],
            |row| row.get(0),
        )?;
        if recorded == 0 {
            return Ok(());
        }
        let mut statement = self
            .conn
            .prepare("SELECT host, answers, status_429, status_503 FROM host_answers")?;
        let mut rows = statement.query([])?;
        while let Some(row) = rows.next()? {
            let host: String = row.get(0)?;
            if let Ok(at) = hosts.binary_search_by(|h| h.host.cmp(&host)) {
                hosts[at].answers = count(row.get(1)?);
                hosts[at].status_429 = count(row.get(2)?);
                hosts[at].status_503 = count(row.get(3)?);
            }
        }
        Ok(())
    }

    fn durations(&self) -> Result<Option<Durations>> {
        let buckets = self
            .conn
            .prepare("SELECT bucket, count FROM durations ORDER BY bucket")?
            .query_map([], |row| Ok((row.get::<_, i64>(0)?, count(row.get(1)?))))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Durations::of_histogram(&buckets))
    }

    /// Calls `each` with every done URL's file record, in import order.
    pub(super) fn done_files(&self, each: &mut dyn FnMut(DoneFile) -> CallerResult) -> Result<()> {
        self.each_row(
            &format!(
                "SELECT id, {FULL_URL}, path, bytes, sha256 FROM urls
                 WHERE state = 'done' ORDER BY id"
            ),
            |row| {
                Ok(DoneFile {
                    id: row.get(0)?,
                    url: row.get(1)?,
                    path: row.get::<_, PathColumn>(2)?.0,
                    bytes: row.get::<_, Option<i64>>(3)?.map(count),
                    sha256: row.get::<_, Option<Vec<u8>>>(4)?.unwrap_or_default(),
                    written_on: None,
                })
            },
            each,
        )
    }

    /// Calls `each` with every failed URL, in import order.
    pub(super) fn failed(&self, each: &mut dyn FnMut(FailedRow) -> CallerResult) -> Result<()> {
        self.each_row(
            &format!(
                "SELECT {FULL_URL}, http_status, attempts, error FROM urls
                 WHERE state = 'failed' ORDER BY id"
            ),
            |row| {
                Ok(FailedRow {
                    url: row.get(0)?,
                    http_status: row.get(1)?,
                    attempts: row.get(2)?,
                    error: row.get(3)?,
                })
            },
            each,
        )
    }

    /// Streams the rows of `sql` through `read` into `each`, one at a
    /// time, so that memory does not grow with the table.
    fn each_row<T>(
        &self,
        sql: &str,
        read: impl Fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
        each: &mut dyn FnMut(T) -> CallerResult,
    ) -> Result<()> {
        let mut statement = self.conn.prepare(sql)?;
        let mut rows = statement.query([])?;
        while let Some(row) = rows.next()? {
            each(read(row)?)?;
        }
        Ok(())
    }

    /// Calls `each` with every URL in import order.
    pub(super) fn export(&self, each: &mut dyn FnMut(ExportRow) -> CallerResult) -> Result<()> {
        self.each_row(
            &format!(
                "SELECT {FULL_URL}, state, path, http_status, attempts, bytes,
                     lower(hex(sha256)), error
                 FROM urls ORDER BY id"
            ),
            |row| {
                Ok(ExportRow {
                    url: row.get(0)?,
                    state: job_state(row, 1)?,
                    path: row.get::<_, PathColumn>(2)?.0,
                    http_status: row.get(3)?,
                    attempts: row.get(4)?,
                    bytes: row.get::<_, Option<i64>>(5)?.map(count),
                    sha256: row
                        .get::<_, Option<String>>(6)?
                        .filter(|hex| !hex.is_empty()),
                    error: row.get(7)?,
                    written_on: None,
                })
            },
            each,
        )
    }
}

/// Adds `rows` of a tallied `state` to `counts`; running rows are tallied
/// as pending.
fn add_to_state(counts: &mut StateCounts, state: &[u8], rows: u64) {
    counts.total += rows;
    match state {
        b"pending" => counts.pending += rows,
        b"done" => counts.done += rows,
        _ => counts.failed += rows,
    }
}

/// The state in `column`; a state this jobrun does not know is an error.
fn job_state(row: &rusqlite::Row<'_>, column: usize) -> rusqlite::Result<JobState> {
    let name = row.get_ref(column)?.as_str()?;
    JobState::parse(name).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            column,
            rusqlite::types::Type::Text,
            format!("unknown URL state {name:?}").into(),
        )
    })
}
