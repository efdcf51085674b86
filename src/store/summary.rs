//! Reading the queue back: counts for `report` and rows for `export`. These
//! only read, so they work while a run is writing (WAL readers never block
//! the writer).

use anyhow::Result;
use serde::Serialize;

use super::Store;

#[derive(Debug, Default, Clone, Serialize)]
pub struct Summary {
    pub total: i64,
    pub pending: i64,
    pub running: i64,
    pub done: i64,
    pub failed: i64,
    /// Pending rows that failed before and wait for their retry.
    pub retry_waiting: i64,
    /// Bytes in the files of done rows.
    pub bytes: i64,
    pub http_statuses: Vec<StatusCount>,
    /// The most common last errors of rows not done, most frequent first.
    pub errors: Vec<ErrorCount>,
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

impl Store {
    /// Counts by state and HTTP status, bytes and the `top_errors` most
    /// common errors.
    pub fn summary(&self, top_errors: usize) -> Result<Summary> {
        let mut summary = Summary::default();
        let mut statuses = std::collections::BTreeMap::<u16, i64>::new();
        // One pass over the table for everything but the errors.
        let mut statement = self.conn.prepare(
            "SELECT state, http_status, count(*), coalesce(sum(bytes), 0),
                    coalesce(sum(attempts > 0), 0)
             FROM urls GROUP BY state, http_status",
        )?;
        let mut rows = statement.query([])?;
        while let Some(row) = rows.next()? {
            let state: String = row.get(0)?;
            let status: Option<u16> = row.get(1)?;
            let count: i64 = row.get(2)?;
            summary.total += count;
            match state.as_str() {
                "pending" => {
                    summary.pending += count;
                    summary.retry_waiting += row.get::<_, i64>(4)?;
                }
                "running" => summary.running += count,
                "done" => {
                    summary.done += count;
                    summary.bytes += row.get::<_, i64>(3)?;
                }
                _ => summary.failed += count,
            }
            if let Some(status) = status {
                *statuses.entry(status).or_default() += count;
            }
        }
        summary.http_statuses = statuses
            .into_iter()
            .map(|(status, count)| StatusCount { status, count })
            .collect();
        summary.errors = self
            .conn
            .prepare(
                "SELECT error, count(*) FROM urls
                 WHERE state IN ('pending', 'running', 'failed') AND error IS NOT NULL
                 GROUP BY error ORDER BY count(*) DESC, error LIMIT ?1",
            )?
            .query_map([top_errors as i64], |row| {
                Ok(ErrorCount {
                    error: row.get(0)?,
                    count: row.get(1)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(summary)
    }

    /// Calls `each` with every URL in import order.
    pub fn export(&self, mut each: impl FnMut(ExportRow) -> Result<()>) -> Result<()> {
        let mut statement = self.conn.prepare(
            "SELECT url, state, path, http_status, attempts, bytes, lower(hex(sha256)), error
             FROM urls ORDER BY id",
        )?;
        let mut rows = statement.query([])?;
        while let Some(row) = rows.next()? {
            each(ExportRow {
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
            })?;
        }
        Ok(())
    }
}
