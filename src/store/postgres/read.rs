//! Settings, and reading the queue back for report, export and verify.
//! Counts come from the tallies that import, claims and the trigger on jobs
//! keep, summed over their slots; only rows waiting for a retry are
//! counted, on the claim index. Lists are streamed row by row.

use std::collections::BTreeMap;

use crate::store::{CallerResult, Result};
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::ToSql;

use super::{PgResult, PostgresStore, count};
use crate::clock::now_ms;
use crate::domain::{
    DoneFile, Durations, ErrorCount, ExportRow, FailedRow, HostCount, JobState, RefreshCounts,
    StateCounts, StatusCount, Summary,
};

impl PostgresStore {
    pub(super) fn get_setting(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .client()?
            .query_opt("SELECT value FROM settings WHERE key = $1", &[&key])
            .at(&self.name)?
            .map(|row| row.get(0)))
    }

    pub(super) fn record_setting(
        &mut self,
        key: &str,
        value: &str,
        prepare: &mut dyn FnMut() -> CallerResult,
    ) -> Result<String> {
        let name = self.name.clone();
        let mut client = self.client()?;
        let mut tx = client.transaction().at(&name)?;
        // Of two processes racing, one records and the other sees it.
        tx.batch_execute("LOCK TABLE settings IN SHARE ROW EXCLUSIVE MODE")
            .at(&name)?;
        let recorded = tx
            .query_opt("SELECT value FROM settings WHERE key = $1", &[&key])
            .at(&name)?;
        if let Some(row) = recorded {
            return Ok(row.get(0));
        }
        prepare()?;
        tx.execute(
            "INSERT INTO settings (key, value) VALUES ($1, $2)",
            &[&key, &value],
        )
        .at(&name)?;
        tx.commit().at(&name)?;
        Ok(value.to_string())
    }

    pub(super) fn counts(&self) -> Result<StateCounts> {
        let mut counts = StateCounts::default();
        let rows = self
            .client()?
            .query(
                "SELECT state, sum(rows)::bigint FROM tallies GROUP BY state",
                &[],
            )
            .at(&self.name)?;
        for row in rows {
            let rows = count(row.get(1));
            counts.total += rows;
            match row.get::<_, &str>(0) {
                "pending" => counts.pending += rows,
                "running" => counts.running += rows,
                "done" => counts.done += rows,
                _ => counts.failed += rows,
            }
        }
        counts.retry_waiting = self.retries_waiting()?;
        Ok(counts)
    }

    fn retries_waiting(&self) -> Result<u64> {
        Ok(count(
            self.client()?
                .query_one(
                    "SELECT count(*) FROM urls WHERE state = 'pending' AND next_attempt_at > $1",
                    &[&now_ms()],
                )
                .at(&self.name)?
                .get(0),
        ))
    }

    pub(super) fn schedule(&self, now: i64) -> Result<Vec<(i64, u64)>> {
        let rows = self
            .client()?
            .query(
                "SELECT max(next_attempt_at), count(*) FROM urls
                 WHERE state = 'pending' AND next_attempt_at > $1
                 GROUP BY (next_attempt_at + 999) / 1000",
                &[&now],
            )
            .at(&self.name)?;
        Ok(rows
            .iter()
            .map(|row| (row.get(0), count(row.get(1))))
            .collect())
    }

    pub(super) fn summarize(&self, top_errors: usize) -> Result<Summary> {
        let mut summary = Summary::default();
        let mut statuses = BTreeMap::<u16, u64>::new();
        let mut hosts = BTreeMap::<String, HostCount>::new();
        let rows = self
            .client()?
            .query(
                "SELECT state, status, sum(rows)::bigint, sum(bytes)::bigint FROM tallies
                 GROUP BY state, status HAVING sum(rows) <> 0",
                &[],
            )
            .at(&self.name)?;
        for row in rows {
            let status: i32 = row.get(1);
            let rows = count(row.get(2));
            summary.counts.total += rows;
            match row.get::<_, &str>(0) {
                "pending" => summary.counts.pending += rows,
                "running" => summary.counts.running += rows,
                "done" => {
                    summary.counts.done += rows;
                    summary.bytes += count(row.get(3));
                }
                _ => summary.counts.failed += rows,
            }
            if let Ok(status) = u16::try_from(status)
                && status > 0
            {
                *statuses.entry(status).or_default() += rows;
            }
        }
        let rows = self
            .client()?
            .query(
                "SELECT host, state, sum(rows)::bigint FROM host_tallies
                 GROUP BY host, state HAVING sum(rows) <> 0",
                &[],
            )
            .at(&self.name)?;
        for row in rows {
            let host: String = row.get(0);
            let rows = count(row.get(2));
            let per_host = hosts.entry(host.clone()).or_insert_with(|| HostCount {
                host,
                ..HostCount::default()
            });
            per_host.total += rows;
            match row.get::<_, &str>(1) {
                "pending" => per_host.pending += rows,
                "done" => per_host.done += rows,
                _ => per_host.failed += rows,
            }
        }
        summary.counts.retry_waiting = self.retries_waiting()?;
        summary.http_statuses = statuses
            .into_iter()
            .map(|(status, count)| StatusCount { status, count })
            .collect();
        if hosts.len() > 1 {
            let answers = self
                .client()?
                .query(
                    "SELECT host, sum(answers)::bigint, sum(status_429)::bigint,
                         sum(status_503)::bigint
                     FROM host_answers GROUP BY host",
                    &[],
                )
                .at(&self.name)?;
            for row in answers {
                if let Some(host) = hosts.get_mut(row.get::<_, &str>(0)) {
                    host.answers = count(row.get(1));
                    host.status_429 = count(row.get(2));
                    host.status_503 = count(row.get(3));
                }
            }
            summary.hosts = hosts.into_values().collect();
        }
        if top_errors > 0 {
            let errors = self
                .client()?
                .query(
                    "SELECT error, sum(rows)::bigint, min(example) FROM error_tallies
                     GROUP BY error HAVING sum(rows) > 0 ORDER BY 2 DESC, 1 LIMIT $1",
                    &[&(top_errors as i64)],
                )
                .at(&self.name)?;
            summary.errors = errors
                .iter()
                .map(|row| ErrorCount {
                    error: row.get(0),
                    count: count(row.get(1)),
                    example: row.get(2),
                })
                .collect();
        }
        let buckets: Vec<(i64, u64)> = self
            .client()?
            .query(
                "SELECT bucket::bigint, sum(count)::bigint FROM durations
                 GROUP BY bucket ORDER BY bucket",
                &[],
            )
            .at(&self.name)?
            .iter()
            .map(|row| (row.get(0), count(row.get(1))))
            .collect();
        summary.durations = Durations::of_histogram(&buckets);
        Ok(summary)
    }

    pub(super) fn refresh_tally(&self) -> Result<Option<RefreshCounts>> {
        let rows = self
            .client()?
            .query(
                "SELECT round, refresh, sum(rows)::bigint FROM refresh_tallies
                 GROUP BY round, refresh HAVING sum(rows) <> 0 ORDER BY round DESC",
                &[],
            )
            .at(&self.name)?;
        let Some(round) = rows.first().map(|row| row.get::<_, i64>(0)) else {
            return Ok(None);
        };
        let mut counts = RefreshCounts {
            round,
            ..RefreshCounts::default()
        };
        for row in rows.iter().filter(|row| row.get::<_, i64>(0) == round) {
            let rows = count(row.get(2));
            match row.get::<_, &str>(1) {
                "changed" => counts.changed = rows,
                "unchanged" => counts.unchanged = rows,
                "failed" => counts.failed = rows,
                _ => counts.pending += rows,
            }
        }
        Ok(Some(counts))
    }

    /// Streams the rows of `sql` through `read` into `each`, one at a time.
    pub(super) fn each_row<T>(
        &self,
        sql: &str,
        read: impl Fn(&postgres::Row) -> T,
        each: &mut dyn FnMut(T) -> CallerResult,
    ) -> Result<()> {
        let mut client = self.client()?;
        let no_params: [&(dyn ToSql + Sync); 0] = [];
        let mut rows = client
            .query_raw(sql, no_params.iter().copied())
            .at(&self.name)?;
        while let Some(row) = rows.next().at(&self.name)? {
            each(read(&row))?;
        }
        Ok(())
    }

    pub(super) fn files(&self, each: &mut dyn FnMut(DoneFile) -> CallerResult) -> Result<()> {
        self.each_row(
            "SELECT u.id, u.url, u.path, u.bytes, u.sha256, r.host FROM urls u
             LEFT JOIN runs r ON r.id = u.written_by
             WHERE u.state = 'done' ORDER BY u.id",
            |row| DoneFile {
                id: row.get(0),
                url: row.get(1),
                path: row.get(2),
                bytes: row.get::<_, Option<i64>>(3).map(count),
                sha256: row.get::<_, Option<Vec<u8>>>(4).unwrap_or_default(),
                written_on: row.get(5),
            },
            each,
        )
    }

    pub(super) fn failed_rows(
        &self,
        each: &mut dyn FnMut(FailedRow) -> CallerResult,
    ) -> Result<()> {
        self.each_row(
            "SELECT url, http_status, attempts, error FROM urls WHERE state = 'failed' ORDER BY id",
            |row| FailedRow {
                url: row.get(0),
                http_status: status(row.get(1)),
                attempts: row.get::<_, i32>(2).max(0) as u32,
                error: row.get(3),
            },
            each,
        )
    }

    pub(super) fn rows(&self, each: &mut dyn FnMut(ExportRow) -> CallerResult) -> Result<()> {
        self.each_row(
            "SELECT u.url, u.state, u.path, u.http_status, u.attempts, u.bytes,
                    encode(u.sha256, 'hex'), u.error, CASE WHEN u.state = 'done' THEN r.host END
             FROM urls u LEFT JOIN runs r ON r.id = u.written_by ORDER BY u.id",
            |row| ExportRow {
                url: row.get(0),
                state: JobState::parse(row.get(1)).unwrap_or(JobState::Failed),
                path: row.get(2),
                http_status: status(row.get(3)),
                attempts: row.get::<_, i32>(4).max(0) as u32,
                bytes: row.get::<_, Option<i64>>(5).map(count),
                sha256: row
                    .get::<_, Option<String>>(6)
                    .filter(|hex| !hex.is_empty()),
                error: row.get(7),
                written_on: row.get(8),
            },
            each,
        )
    }
}

fn status(value: Option<i32>) -> Option<u16> {
    value.and_then(|status| u16::try_from(status).ok())
}
