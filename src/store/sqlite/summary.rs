//! Reading the queue back: counts for `report` and rows for `export`. These
//! only read, so they work while a run is writing (WAL readers never block
//! the writer).

use std::collections::{BTreeMap, HashMap};

use crate::store::{CallerResult, Result};
use rusqlite::types::ValueRef;

use super::SqliteStore;
use super::compact::{FULL_URL, PathColumn};
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
    /// Counts by state; cheap even on millions of rows, since both queries
    /// are answered by the (state, next_attempt_at) index.
    pub(super) fn state_counts(&self) -> Result<StateCounts> {
        let mut counts = StateCounts::default();
        let mut statement = self
            .conn
            .prepare("SELECT state, count(*) FROM urls GROUP BY state")?;
        let mut rows = statement.query([])?;
        while let Some(row) = rows.next()? {
            let count = count(row.get(1)?);
            counts.total += count;
            match row.get_ref(0)?.as_str()? {
                "pending" => counts.pending = count,
                "running" => counts.running = count,
                "done" => counts.done = count,
                _ => counts.failed += count,
            }
        }
        counts.retry_waiting = count(self.conn.query_row(
            "SELECT count(*) FROM urls WHERE state = 'pending' AND next_attempt_at > ?1",
            [now_ms()],
            |row| row.get(0),
        )?);
        Ok(counts)
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
    /// `top_errors` most common errors.
    pub(super) fn summary(&self, top_errors: usize) -> Result<Summary> {
        // One pass over the table, added up here: a GROUP BY would have
        // SQLite sort every row first, which on a million rows takes longer
        // than reading them.
        let mut summary = Summary::default();
        let now = now_ms();
        let mut statuses = BTreeMap::<u16, u64>::new();
        // Every origin's prefix and the slot of its host: origins are few,
        // and several (http and https) may share a host.
        let mut hosts = Vec::<HostCount>::new();
        let mut origins = HashMap::<i64, (String, usize)>::new();
        {
            let mut host_slots = HashMap::<String, usize>::new();
            let mut statement = self.conn.prepare("SELECT id, prefix, host FROM origins")?;
            let mut rows = statement.query([])?;
            while let Some(row) = rows.next()? {
                let host: String = row.get(2)?;
                let slot = *host_slots.entry(host.clone()).or_insert_with(|| {
                    hosts.push(HostCount {
                        host,
                        ..HostCount::default()
                    });
                    hosts.len() - 1
                });
                origins.insert(row.get(0)?, (row.get(1)?, slot));
            }
        }
        // Rows come in import order, where one origin usually follows itself:
        // the last origin is tried before the map.
        let mut last: Option<(i64, usize)> = None;
        // Error text -> (count, an example URL).
        let mut errors = HashMap::<Vec<u8>, (u64, String)>::new();
        let mut statement = self.conn.prepare(
            "SELECT state, http_status, bytes, next_attempt_at, error, origin_id, url FROM urls",
        )?;
        let mut rows = statement.query([])?;
        while let Some(row) = rows.next()? {
            summary.counts.total += 1;
            let state = row.get_ref(0)?.as_bytes()?;
            let origin: i64 = row.get(5)?;
            let slot = match last {
                Some((id, slot)) if id == origin => slot,
                _ => {
                    let slot = origins.get(&origin).map(|(_, slot)| *slot).ok_or_else(|| {
                        rusqlite::Error::FromSqlConversionFailure(
                            5,
                            rusqlite::types::Type::Integer,
                            format!("URL of unknown origin {origin}").into(),
                        )
                    })?;
                    last = Some((origin, slot));
                    slot
                }
            };
            let per_host = &mut hosts[slot];
            per_host.total += 1;
            match state {
                b"pending" => {
                    summary.counts.pending += 1;
                    per_host.pending += 1;
                    if row.get::<_, i64>(3)? > now {
                        summary.counts.retry_waiting += 1;
                    }
                }
                b"running" => {
                    summary.counts.running += 1;
                    per_host.pending += 1;
                }
                b"done" => {
                    summary.counts.done += 1;
                    per_host.done += 1;
                    summary.bytes += count(row.get::<_, Option<i64>>(2)?.unwrap_or(0));
                }
                _ => {
                    summary.counts.failed += 1;
                    per_host.failed += 1;
                }
            }
            if let Some(status) = row.get::<_, Option<u16>>(1)? {
                *statuses.entry(status).or_default() += 1;
            }
            if top_errors > 0
                && state != b"done"
                && let ValueRef::Text(error) = row.get_ref(4)?
            {
                match errors.get_mut(error) {
                    Some((count, _)) => *count += 1,
                    None => {
                        let prefix = origins.get(&origin).map_or("", |(prefix, _)| prefix);
                        let rest = row.get_ref(6)?.as_str()?;
                        errors.insert(error.to_vec(), (1, format!("{prefix}{rest}")));
                    }
                }
            }
        }
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
        let mut errors: Vec<ErrorCount> = errors
            .into_iter()
            .map(|(error, (count, example))| ErrorCount {
                error: String::from_utf8_lossy(&error).into_owned(),
                count,
                example,
            })
            .collect();
        errors.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.error.cmp(&b.error)));
        errors.truncate(top_errors);
        summary.errors = errors;
        summary.durations = self.durations()?;
        Ok(summary)
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
