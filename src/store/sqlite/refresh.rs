//! Refresh rounds: which done rows `jobrun refresh` asks for, and what
//! became of them.
//!
//! A round marks its done rows `refresh = 'pending'` in one transaction;
//! they stay done (their files stay) while a refresh claims, fetches and
//! records them as changed, unchanged or failed. A round killed half-way is
//! finished by the next `jobrun refresh`, which finds rows still pending.

use crate::store::Result;
use rusqlite::{OptionalExtension, params};

use super::SqliteStore;
use crate::domain::{RefreshCounts, RefreshRound};

impl SqliteStore {
    /// Starts a round over the done rows last fetched before `cutoff` (unix
    /// ms; all done rows without one), or resumes the unfinished one.
    pub(super) fn start_refresh(&mut self, cutoff: Option<i64>) -> Result<RefreshRound> {
        let tx = self.write_transaction()?;
        let unfinished: Option<(i64, i64)> = tx
            .query_row(
                "SELECT refresh_round, count(*) FROM urls
                 WHERE refresh = 'pending' AND refresh_round IS NOT NULL
                 GROUP BY refresh_round ORDER BY refresh_round DESC LIMIT 1",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        if let Some((round, rows)) = unfinished {
            tx.commit()?;
            return Ok(RefreshRound::Resumed {
                round,
                rows: rows.max(0) as u64,
            });
        }
        let round: i64 = tx.query_row(
            "SELECT coalesce(max(refresh_round), 0) + 1 FROM urls
             WHERE refresh_round IS NOT NULL",
            [],
            |row| row.get(0),
        )?;
        // The retry budget starts afresh: attempts count this refresh's.
        let rows = tx.execute(
            "UPDATE urls SET refresh = 'pending', refresh_round = ?1, refresh_error = NULL,
                 attempts = 0, next_attempt_at = 0
             WHERE state = 'done' AND (?2 IS NULL OR coalesce(fetched_at, updated_at, 0) < ?2)",
            params![round, cutoff],
        )?;
        tx.commit()?;
        Ok(RefreshRound::Started {
            round,
            rows: rows as u64,
        })
    }

    /// The counts of the last refresh round, if there was one.
    pub(super) fn refresh_counts(&self) -> Result<Option<RefreshCounts>> {
        let round: Option<i64> = self.conn.query_row(
            "SELECT max(refresh_round) FROM urls WHERE refresh_round IS NOT NULL",
            [],
            |row| row.get(0),
        )?;
        let Some(round) = round else {
            return Ok(None);
        };
        let mut counts = RefreshCounts {
            round,
            ..RefreshCounts::default()
        };
        let mut select = self.conn.prepare(
            "SELECT refresh, count(*) FROM urls WHERE refresh_round = ?1 GROUP BY refresh",
        )?;
        let rows = select.query_map([round], |row| {
            Ok((
                row.get::<_, Option<String>>(0)?,
                row.get::<_, i64>(1)?.max(0) as u64,
            ))
        })?;
        for row in rows {
            let (outcome, count) = row?;
            match outcome.as_deref() {
                Some("changed") => counts.changed = count,
                Some("unchanged") => counts.unchanged = count,
                Some("failed") => counts.failed = count,
                _ => counts.pending += count,
            }
        }
        Ok(Some(counts))
    }
}
