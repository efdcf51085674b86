//! Reading the queue back: counts for `report` and rows for `export`. These
//! only read, so they work while a run is writing (WAL readers never block
//! the writer).

use std::collections::{BTreeMap, HashMap};

use anyhow::Result;
use rusqlite::types::ValueRef;
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
        // One pass over the table, added up here: a GROUP BY would have
        // SQLite sort every row first, which on a million rows takes longer
        // than reading them.
        let mut summary = Summary::default();
        let mut statuses = BTreeMap::<u16, i64>::new();
        let mut errors = HashMap::<Vec<u8>, i64>::new();
        let mut statement = self
            .conn
            .prepare("SELECT state, http_status, bytes, attempts, error FROM urls")?;
        let mut rows = statement.query([])?;
        while let Some(row) = rows.next()? {
            summary.total += 1;
            let state = row.get_ref(0)?.as_bytes()?;
            match state {
                b"pending" => {
                    summary.pending += 1;
                    if row.get::<_, i64>(3)? > 0 {
                        summary.retry_waiting += 1;
                    }
                }
                b"running" => summary.running += 1,
                b"done" => {
                    summary.done += 1;
                    summary.bytes += row.get::<_, Option<i64>>(2)?.unwrap_or(0);
                }
                _ => summary.failed += 1,
            }
            if let Some(status) = row.get::<_, Option<u16>>(1)? {
                *statuses.entry(status).or_default() += 1;
            }
            if top_errors > 0
                && state != b"done"
                && let ValueRef::Text(error) = row.get_ref(4)?
            {
                match errors.get_mut(error) {
                    Some(count) => *count += 1,
                    None => {
                        errors.insert(error.to_vec(), 1);
                    }
                }
            }
        }
        summary.http_statuses = statuses
            .into_iter()
            .map(|(status, count)| StatusCount { status, count })
            .collect();
        let mut errors: Vec<ErrorCount> = errors
            .into_iter()
            .map(|(error, count)| ErrorCount {
                error: String::from_utf8_lossy(&error).into_owned(),
                count,
            })
            .collect();
        errors.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.error.cmp(&b.error)));
        errors.truncate(top_errors);
        summary.errors = errors;
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
