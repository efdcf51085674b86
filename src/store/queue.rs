//! The queue itself: importing URLs, claiming due ones for a run, and
//! recording what became of them.
//!
//! A run claims rows by setting them `running` under its id, in one
//! IMMEDIATE transaction, so two runs on one database never hold the same
//! row. Every later write is guarded by that id: a row taken back from a run
//! thought dead is not overwritten by it.

use anyhow::Result;
use rusqlite::{OptionalExtension, Transaction, params};

use super::{Store, now_ms};

/// A URL claimed by a run.
#[derive(Debug, Clone)]
pub struct Claim {
    pub id: i64,
    pub url: String,
    /// The output file, relative to the output folder.
    pub path: String,
    /// Attempts already made (and finished).
    pub attempts: u32,
}

/// What became of a claimed URL.
#[derive(Debug, Clone)]
pub enum Completion {
    /// The body is in its final file, and that file is durable.
    Done {
        id: i64,
        status: u16,
        bytes: u64,
        sha256: [u8; 32],
    },
    /// A retryable failure: back to pending until `next_attempt_at`.
    Retry {
        id: i64,
        status: Option<u16>,
        error: String,
        next_attempt_at: i64,
    },
    /// A permanent failure, or the last attempt failed.
    Failed {
        id: i64,
        status: Option<u16>,
        error: String,
    },
    /// The attempt was cut short by a shutdown: back to pending, budget kept.
    Interrupted { id: i64 },
    /// Claimed but never started: back to pending, nothing recorded.
    Unstarted { id: i64 },
}

impl Completion {
    pub fn id(&self) -> i64 {
        match *self {
            Completion::Done { id, .. }
            | Completion::Retry { id, .. }
            | Completion::Failed { id, .. }
            | Completion::Interrupted { id }
            | Completion::Unstarted { id } => id,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertResult {
    Inserted,
    Duplicate,
}

/// URLs being imported, committed together.
pub struct ImportBatch<'a> {
    tx: Transaction<'a>,
}

impl ImportBatch<'_> {
    pub fn insert(&self, url: &str, path: &str) -> Result<InsertResult> {
        let changed = self
            .tx
            .prepare_cached("INSERT OR IGNORE INTO urls (url, path) VALUES (?1, ?2)")?
            .execute(params![url, path])?;
        Ok(if changed == 1 {
            InsertResult::Inserted
        } else {
            InsertResult::Duplicate
        })
    }

    pub fn commit(self) -> Result<()> {
        Ok(self.tx.commit()?)
    }
}

impl Store {
    pub fn import_batch(&mut self) -> Result<ImportBatch<'_>> {
        let tx = self.write_transaction()?;
        Ok(ImportBatch { tx })
    }

    /// Records `completions` for `run` and claims up to `claim` due rows for
    /// it, in one transaction: one commit per tick of the run, whatever it did.
    pub fn complete_and_claim(
        &mut self,
        run: i64,
        completions: &[Completion],
        claim: usize,
    ) -> Result<Vec<Claim>> {
        let now = now_ms();
        let tx = self.write_transaction()?;
        let mut tally = Tally::default();
        for completion in completions {
            record(&tx, run, now, completion, &mut tally)?;
        }
        tx.prepare_cached(
            "UPDATE runs SET heartbeat_at = ?2, done = done + ?3, failed = failed + ?4,
                 retried = retried + ?5, bytes = bytes + ?6
             WHERE id = ?1",
        )?
        .execute(params![
            run,
            now,
            tally.done,
            tally.failed,
            tally.retried,
            tally.bytes
        ])?;
        let claims = if claim > 0 {
            claim_due(&tx, run, now, claim)?
        } else {
            Vec::new()
        };
        tx.commit()?;
        Ok(claims)
    }

    /// The earliest time a pending row becomes due, if any is pending.
    pub fn next_due(&self) -> Result<Option<i64>> {
        Ok(self
            .conn
            .query_row(
                "SELECT min(next_attempt_at) FROM urls WHERE state = 'pending'",
                [],
                |row| row.get::<_, Option<i64>>(0),
            )
            .optional()?
            .flatten())
    }
}

#[derive(Default)]
struct Tally {
    done: i64,
    failed: i64,
    retried: i64,
    bytes: i64,
}

fn record(
    tx: &Transaction<'_>,
    run: i64,
    now: i64,
    completion: &Completion,
    tally: &mut Tally,
) -> Result<()> {
    // Each statement ends in the same guard: the row is still ours.
    const GUARD: &str = "WHERE id = ?1 AND run_id = ?2 AND state = 'running'";
    let changed = match completion {
        Completion::Done {
            id,
            status,
            bytes,
            sha256,
        } => {
            tally.done += 1;
            tally.bytes += *bytes as i64;
            tx.prepare_cached(&format!(
                "UPDATE urls SET state = 'done', attempts = attempts + 1, http_status = ?3,
                     bytes = ?4, sha256 = ?5, error = NULL, next_attempt_at = 0, updated_at = ?6
                 {GUARD}"
            ))?
            .execute(params![id, run, status, *bytes as i64, &sha256[..], now])?
        }
        Completion::Retry {
            id,
            status,
            error,
            next_attempt_at,
        } => {
            tally.retried += 1;
            tx.prepare_cached(&format!(
                "UPDATE urls SET state = 'pending', attempts = attempts + 1, http_status = ?3,
                     error = ?4, next_attempt_at = ?5, updated_at = ?6
                 {GUARD}"
            ))?
            .execute(params![id, run, status, error, next_attempt_at, now])?
        }
        Completion::Failed { id, status, error } => {
            tally.failed += 1;
            tx.prepare_cached(&format!(
                "UPDATE urls SET state = 'failed', attempts = attempts + 1, http_status = ?3,
                     error = ?4, updated_at = ?5
                 {GUARD}"
            ))?
            .execute(params![id, run, status, error, now])?
        }
        Completion::Interrupted { id } => tx
            .prepare_cached(&format!(
                "UPDATE urls SET state = 'pending', interrupted = interrupted + 1, updated_at = ?3
                 {GUARD}"
            ))?
            .execute(params![id, run, now])?,
        Completion::Unstarted { id } => tx
            .prepare_cached(&format!("UPDATE urls SET state = 'pending' {GUARD}"))?
            .execute(params![id, run])?,
    };
    debug_assert!(changed <= 1);
    Ok(())
}

fn claim_due(tx: &Transaction<'_>, run: i64, now: i64, limit: usize) -> Result<Vec<Claim>> {
    // Bundled SQLite has no UPDATE ... LIMIT; the subquery does the picking.
    let mut statement = tx.prepare_cached(
        "UPDATE urls SET state = 'running', run_id = ?1
         WHERE id IN (SELECT id FROM urls
                      WHERE state = 'pending' AND next_attempt_at <= ?2
                      ORDER BY next_attempt_at LIMIT ?3)
         RETURNING id, url, path, attempts",
    )?;
    let claims = statement
        .query_map(params![run, now, limit as i64], |row| {
            Ok(Claim {
                id: row.get(0)?,
                url: row.get(1)?,
                path: row.get(2)?,
                attempts: row.get(3)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(claims)
}
