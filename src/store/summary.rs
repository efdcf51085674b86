//! Reading the queue back: counts for `report` and rows for `export`. These
//! only read, so they work while a run is writing (WAL readers never block
//! the writer).

use std::collections::{BTreeMap, HashMap};

use anyhow::Result;
use rusqlite::types::ValueRef;
use serde::Serialize;

use super::{Store, bucket_floor, now_ms};

#[derive(Debug, Default, Clone, Serialize)]
pub struct Summary {
    #[serde(flatten)]
    pub counts: StateCounts,
    /// Bytes in the files of done rows.
    pub bytes: i64,
    pub http_statuses: Vec<StatusCount>,
    /// The most common last errors of rows not done, most frequent first.
    pub errors: Vec<ErrorCount>,
    /// Counts per host, when there is more than one host.
    pub hosts: Vec<HostCount>,
    /// Request durations, from the histogram of every finished attempt.
    pub durations: Option<Durations>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StatusCount {
    pub status: u16,
    pub count: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorCount {
    pub error: String,
    pub count: i64,
    /// One URL that ended with this error.
    pub example: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct HostCount {
    pub host: String,
    pub total: i64,
    pub done: i64,
    pub failed: i64,
    pub pending: i64,
    /// Finished attempts, and how many were answered 429 or 503.
    pub answers: i64,
    pub status_429: i64,
    pub status_503: i64,
}

/// Percentiles in milliseconds, each the lower edge of its histogram bucket
/// (within about 19%).
#[derive(Debug, Clone, Serialize)]
pub struct Durations {
    pub requests: i64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
}

/// Rows per state.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct StateCounts {
    pub total: i64,
    pub pending: i64,
    pub running: i64,
    pub done: i64,
    pub failed: i64,
    /// Pending rows whose retry time is still to come (not those already
    /// due, which a run takes at once).
    pub retry_waiting: i64,
}

/// A done URL's file, as recorded.
#[derive(Debug, Clone)]
pub struct DoneFile {
    pub id: i64,
    pub url: String,
    /// Relative to the output folder.
    pub path: String,
    pub bytes: i64,
    pub sha256: Vec<u8>,
}

/// A failed URL, as `report --failed` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct FailedRow {
    pub url: String,
    pub http_status: Option<u16>,
    pub attempts: u32,
    pub error: Option<String>,
}

/// One URL, as `export` writes it.
#[derive(Debug, Clone, Serialize)]
pub struct ExportRow {
    pub url: String,
    pub state: String,
    /// Relative to the output folder.
    pub path: String,
    pub http_status: Option<u16>,
    pub attempts: u32,
    pub bytes: Option<i64>,
    pub sha256: Option<String>,
    pub error: Option<String>,
}

impl ExportRow {
    /// The field names, in order: the CSV header, also when there is no row.
    pub const FIELDS: [&str; 8] = [
        "url",
        "state",
        "path",
        "http_status",
        "attempts",
        "bytes",
        "sha256",
        "error",
    ];
}

/// Percentiles of a duration histogram, (bucket, count) in bucket order.
pub(crate) fn durations_of(buckets: &[(i64, i64)]) -> Option<Durations> {
    let requests: i64 = buckets.iter().map(|(_, count)| count).sum();
    if requests == 0 {
        return None;
    }
    let percentile = |p: f64| {
        let rank = (p * requests as f64).ceil().max(1.0) as i64;
        let mut seen = 0;
        for (bucket, count) in buckets {
            seen += count;
            if seen >= rank {
                return bucket_floor(*bucket);
            }
        }
        buckets
            .last()
            .map_or(0.0, |(bucket, _)| bucket_floor(*bucket))
    };
    Some(Durations {
        requests,
        p50_ms: percentile(0.50),
        p95_ms: percentile(0.95),
        p99_ms: percentile(0.99),
    })
}

impl Store {
    /// Counts by state; cheap even on millions of rows, since both queries
    /// are answered by the (state, next_attempt_at) index.
    pub fn state_counts(&self) -> Result<StateCounts> {
        let mut counts = StateCounts::default();
        let mut statement = self
            .conn
            .prepare("SELECT state, count(*) FROM urls GROUP BY state")?;
        let mut rows = statement.query([])?;
        while let Some(row) = rows.next()? {
            let count: i64 = row.get(1)?;
            counts.total += count;
            match row.get_ref(0)?.as_str()? {
                "pending" => counts.pending = count,
                "running" => counts.running = count,
                "done" => counts.done = count,
                _ => counts.failed += count,
            }
        }
        counts.retry_waiting = self.conn.query_row(
            "SELECT count(*) FROM urls WHERE state = 'pending' AND next_attempt_at > ?1",
            [now_ms()],
            |row| row.get(0),
        )?;
        Ok(counts)
    }

    /// The retries still to come after `now`, as (latest time, count) per
    /// second they fall in: what a run's progress display starts from.
    pub fn retry_schedule(&self, now: i64) -> Result<Vec<(i64, u64)>> {
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
    pub fn summary(&self, top_errors: usize) -> Result<Summary> {
        // One pass over the table, added up here: a GROUP BY would have
        // SQLite sort every row first, which on a million rows takes longer
        // than reading them.
        let mut summary = Summary::default();
        let now = now_ms();
        let mut statuses = BTreeMap::<u16, i64>::new();
        // Rows come in import order, where one host usually follows itself:
        // the last host's slot is tried before the map.
        let mut hosts = Vec::<HostCount>::new();
        let mut host_slots = HashMap::<Vec<u8>, usize>::new();
        let mut last_host = usize::MAX;
        // Error text -> (count, an example URL).
        let mut errors = HashMap::<Vec<u8>, (i64, String)>::new();
        let mut statement = self.conn.prepare(
            "SELECT state, http_status, bytes, next_attempt_at, error, host, url FROM urls",
        )?;
        let mut rows = statement.query([])?;
        while let Some(row) = rows.next()? {
            summary.counts.total += 1;
            let state = row.get_ref(0)?.as_bytes()?;
            let host = row.get_ref(5)?.as_bytes()?;
            if hosts
                .get(last_host)
                .is_none_or(|h| h.host.as_bytes() != host)
            {
                last_host = match host_slots.get(host) {
                    Some(&slot) => slot,
                    None => {
                        hosts.push(HostCount {
                            host: String::from_utf8_lossy(host).into_owned(),
                            ..HostCount::default()
                        });
                        host_slots.insert(host.to_vec(), hosts.len() - 1);
                        hosts.len() - 1
                    }
                };
            }
            let per_host = &mut hosts[last_host];
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
                    summary.bytes += row.get::<_, Option<i64>>(2)?.unwrap_or(0);
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
                        errors.insert(error.to_vec(), (1, row.get(6)?));
                    }
                }
            }
        }
        summary.http_statuses = statuses
            .into_iter()
            .map(|(status, count)| StatusCount { status, count })
            .collect();
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
                hosts[at].answers = row.get(1)?;
                hosts[at].status_429 = row.get(2)?;
                hosts[at].status_503 = row.get(3)?;
            }
        }
        Ok(())
    }

    fn durations(&self) -> Result<Option<Durations>> {
        let buckets = self
            .conn
            .prepare("SELECT bucket, count FROM durations ORDER BY bucket")?
            .query_map([], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(durations_of(&buckets))
    }

    /// Calls `each` with every done URL's file record, in import order.
    pub fn done_files(&self, each: impl FnMut(DoneFile) -> Result<()>) -> Result<()> {
        self.each_row(
            "SELECT id, url, path, bytes, sha256 FROM urls WHERE state = 'done' ORDER BY id",
            |row| {
                Ok(DoneFile {
                    id: row.get(0)?,
                    url: row.get(1)?,
                    path: row.get(2)?,
                    bytes: row.get::<_, Option<i64>>(3)?.unwrap_or(-1),
                    sha256: row.get::<_, Option<Vec<u8>>>(4)?.unwrap_or_default(),
                })
            },
            each,
        )
    }

    /// Calls `each` with every failed URL, in import order.
    pub fn failed(&self, each: impl FnMut(FailedRow) -> Result<()>) -> Result<()> {
        self.each_row(
            "SELECT url, http_status, attempts, error FROM urls WHERE state = 'failed' ORDER BY id",
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
        mut each: impl FnMut(T) -> Result<()>,
    ) -> Result<()> {
        let mut statement = self.conn.prepare(sql)?;
        let mut rows = statement.query([])?;
        while let Some(row) = rows.next()? {
            each(read(row)?)?;
        }
        Ok(())
    }

    /// Calls `each` with every URL in import order.
    pub fn export(&self, each: impl FnMut(ExportRow) -> Result<()>) -> Result<()> {
        self.each_row(
            "SELECT url, state, path, http_status, attempts, bytes, lower(hex(sha256)), error
             FROM urls ORDER BY id",
            |row| {
                Ok(ExportRow {
                    url: row.get(0)?,
                    state: row.get(1)?,
                    path: row.get(2)?,
                    http_status: row.get(3)?,
                    attempts: row.get(4)?,
                    bytes: row.get(5)?,
                    sha256: row
                        .get::<_, Option<String>>(6)?
                        .filter(|hex| !hex.is_empty()),
                    error: row.get(7)?,
                })
            },
            each,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_csv_header_names_every_field_in_order() {
        let row = ExportRow {
            url: String::new(),
            state: String::new(),
            path: String::new(),
            http_status: None,
            attempts: 0,
            bytes: None,
            sha256: None,
            error: None,
        };
        let json = serde_json::to_value(&row).unwrap();
        let mut fields: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut expected = ExportRow::FIELDS.to_vec();
        fields.sort_unstable();
        expected.sort_unstable();
        assert_eq!(fields, expected);
        let mut csv = csv::WriterBuilder::new().from_writer(Vec::new());
        csv.serialize(&row).unwrap();
        let text = String::from_utf8(csv.into_inner().unwrap()).unwrap();
        assert_eq!(
            text.lines().next(),
            Some(ExportRow::FIELDS.join(",").as_str())
        );
    }
}
