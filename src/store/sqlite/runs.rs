//! The run registry: one row per `jobrun run`, so that a new run can tell a
//! live run from a dead one and take the dead one's claims back at once, and
//! so that `report` can say how the last run ended.

use crate::store::Result;
use rusqlite::{Row, Transaction, params};

use super::SqliteStore;
use super::queue::UNCLAIMED;
use crate::clock::now_ms;
use crate::domain::{
    Holder, Liveness, Reclaimed, RunEnd, RunId, RunInfo, RunOutcome, RunStart, Started,
};
use crate::store::TakenForDead;

const RUN_COLUMNS: &str = "id, pid, host, boot_id, proc_start, command, started_at, heartbeat_at,
    ended_at, outcome, message, done, failed, retried, bytes, pid_ns";

fn run_from_row(row: &Row<'_>) -> rusqlite::Result<RunInfo> {
    Ok(RunInfo {
        id: RunId(row.get(0)?),
        start: RunStart {
            pid: row.get(1)?,
            pid_ns: row.get::<_, Option<i64>>(15)?.map(|ns| ns as u64),
            host: row.get(2)?,
            boot_id: row.get(3)?,
            proc_start: row.get::<_, i64>(4)? as u64,
            command: row.get(5)?,
        },
        started_at: row.get(6)?,
        heartbeat_at: row.get(7)?,
        ended_at: row.get(8)?,
        // An outcome this jobrun does not know (a newer one wrote it) is
        // shown as unknown rather than refused.
        outcome: row
            .get::<_, Option<String>>(9)?
            .and_then(|outcome| RunOutcome::parse(&outcome)),
        message: row.get(10)?,
        done: count(row, 11)?,
        failed: count(row, 12)?,
        retried: count(row, 13)?,
        bytes: count(row, 14)?,
    })
}

/// A count stored as an INTEGER, which is never negative.
fn count(row: &Row<'_>, column: usize) -> rusqlite::Result<u64> {
    Ok(row.get::<_, i64>(column)?.max(0) as u64)
}

impl SqliteStore {
    /// Registers a new run, after taking back the rows of every dead run
    /// (`reclaim_dead_runs`) in the same transaction.
    pub(super) fn start_run(
        &mut self,
        start: &RunStart,
        liveness: &dyn Fn(&RunInfo) -> Liveness,
    ) -> Result<Started> {
        let tx = self.write_transaction()?;
        let reclaimed = reclaim_dead_runs(&tx, liveness)?;
        let id = tx.query_row(
            "INSERT INTO runs (pid, pid_ns, host, boot_id, proc_start, command, started_at,
                               heartbeat_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7) RETURNING id",
            params![
                start.pid,
                start.pid_ns.map(|ns| ns as i64),
                start.host,
                start.boot_id,
                start.proc_start as i64,
                start.command,
                now_ms()
            ],
            |row| row.get(0),
        )?;
        tx.commit()?;
        Ok(Started {
            id: RunId(id),
            reclaimed: reclaimed.rows,
            dead: reclaimed.dead,
            live: reclaimed.live,
        })
    }

    /// Takes back the rows of every unfinished run that `liveness` finds
    /// dead, for a run that has nothing left to claim while others hold URLs.
    /// A run waiting for others asks several times a second: it reads
    /// first, and takes the write lock (which the runs it waits for need
    /// for their own commits) only when there is something to take back.
    pub(super) fn reclaim_dead_runs(
        &mut self,
        liveness: &dyn Fn(&RunInfo) -> Liveness,
    ) -> Result<Reclaimed> {
        let unfinished = unfinished_runs(&self.conn)?;
        let any_dead = unfinished
            .iter()
            .any(|run| liveness(run).outcome().is_some());
        if !any_dead
            && !self
                .conn
                .query_row(&format!("SELECT EXISTS ({ORPHANS})"), [], |row| row.get(0))?
        {
            return Ok(Reclaimed {
                live: unfinished,
                ..Reclaimed::default()
            });
        }
        let tx = self.write_transaction()?;
        let reclaimed = reclaim_dead_runs(&tx, liveness)?;
        tx.commit()?;
        Ok(reclaimed)
    }

    /// The other runs that hold claimed URLs, most URLs first.
    pub(super) fn held_by_others(&self, run: RunId) -> Result<Vec<Holder>> {
        let holders = self
            .conn
            .prepare(
                "SELECT urls.run_id, coalesce(runs.pid, 0), count(*) FROM urls
                 LEFT JOIN runs ON runs.id = urls.run_id
                 WHERE urls.state = 'running' AND urls.run_id IS NOT ?1
                 GROUP BY urls.run_id ORDER BY count(*) DESC, urls.run_id",
            )?
            .query_map([run.0], |row| {
                Ok(Holder {
                    run: RunId(row.get::<_, Option<i64>>(0)?.unwrap_or(0)),
                    pid: row.get(1)?,
                    urls: count(row, 2)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(holders)
    }

    /// Renews the heartbeat of `run`; an error if it was taken for dead.
    pub(super) fn heartbeat(&mut self, run: RunId) -> Result<()> {
        let tx = self.write_transaction()?;
        let alive = tx.execute(
            "UPDATE runs SET heartbeat_at = ?2 WHERE id = ?1 AND ended_at IS NULL",
            params![run.0, now_ms()],
        )?;
        if alive == 0 {
            return Err(TakenForDead { run }.into());
        }
        tx.commit()?;
        Ok(())
    }

    /// Records how `run` ended; rows it still holds go back to pending.
    pub(super) fn end_run(&mut self, run: RunId, end: &RunEnd) -> Result<()> {
        let (outcome, message) = (end.outcome().as_str(), end.message());
        let tx = self.write_transaction()?;
        tx.execute(
            &format!("UPDATE urls SET state = {UNCLAIMED} WHERE state = 'running' AND run_id = ?1"),
            [run.0],
        )?;
        // A run that another one found dead keeps the end recorded then.
        tx.execute(
            "UPDATE runs SET ended_at = ?2, heartbeat_at = ?2, outcome = ?3, message = ?4
             WHERE id = ?1 AND ended_at IS NULL",
            params![run.0, now_ms(), outcome, message],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The most recent runs, newest first.
    pub(super) fn recent_runs(&self, limit: usize) -> Result<Vec<RunInfo>> {
        let runs = self
            .conn
            .prepare(&format!(
                "SELECT {RUN_COLUMNS} FROM runs ORDER BY id DESC LIMIT ?1"
            ))?
            .query_map([limit as i64], run_from_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(runs)
    }
}

/// Every unfinished run that `liveness` finds dead is marked ended and its
/// running rows go back to pending; their cut-short attempts are counted
/// as interrupted, not against the retry budget. Running rows whose run has
/// ended (or was never recorded) go back too.
fn reclaim_dead_runs(
    tx: &Transaction<'_>,
    liveness: &dyn Fn(&RunInfo) -> Liveness,
) -> Result<Reclaimed> {
    let unfinished = unfinished_runs(tx)?;
    let mut reclaimed = Reclaimed::default();
    for run in unfinished {
        let state = liveness(&run);
        let Some(outcome) = state.outcome() else {
            reclaimed.live.push(run);
            continue;
        };
        reclaimed.rows += tx.execute(
            &format!(
                "UPDATE urls SET state = {UNCLAIMED}, interrupted = interrupted + 1
                 WHERE state = 'running' AND run_id = ?1"
            ),
            [run.id.0],
        )? as u64;
        tx.execute(
            "UPDATE runs SET ended_at = heartbeat_at, outcome = ?2 WHERE id = ?1",
            params![run.id.0, outcome.as_str()],
        )?;
        reclaimed.dead.push((run.id, state));
    }
    reclaimed.rows += tx.execute(
        &format!(
            "UPDATE urls SET state = {UNCLAIMED}, interrupted = interrupted + 1
             WHERE id IN ({ORPHANS})"
        ),
        [],
    )? as u64;
    Ok(reclaimed)
}

/// Running rows whose run has ended or was never recorded.
const ORPHANS: &str = "SELECT id FROM urls WHERE state = 'running'
    AND NOT EXISTS (SELECT 1 FROM runs WHERE runs.id = urls.run_id AND runs.ended_at IS NULL)";

/// The runs that have not recorded their end.
fn unfinished_runs(conn: &rusqlite::Connection) -> Result<Vec<RunInfo>> {
    let runs = conn
        .prepare(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE ended_at IS NULL"
        ))?
        .query_map([], run_from_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{HostFilter, NewUrl, Work};
    use crate::store::{Open, OpenOptions};
    use std::time::Duration;

    /// A store holding one URL, claimed by a run; the store waits 100 ms
    /// for another process's write lock.
    fn one_url_claimed(dir: &std::path::Path) -> (SqliteStore, RunId) {
        let mut options = OpenOptions::new(Open::CreateIfMissing);
        options.lock_wait = Duration::from_millis(100);
        let mut store = SqliteStore::open(&dir.join("jobs.db"), &options).unwrap();
        store
            .import(&[NewUrl {
                url: "http://example.test/a",
                request: None,
                request_hash: "",
                host: "example.test",
                path: "a",
                named: false,
            }])
            .unwrap();
        let run = crate::store::contract::start(&mut store, Liveness::Alive);
        let claims = store
            .complete_and_claim(run, &[], 1, &HostFilter::default(), Work::Fetch)
            .unwrap();
        assert_eq!(claims.len(), 1);
        (store, run)
    }

    #[test]
    fn with_nothing_to_take_back_the_write_lock_is_not_taken() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, run) = one_url_claimed(dir.path());
        let other_process = rusqlite::Connection::open(dir.path().join("jobs.db")).unwrap();
        other_process.execute_batch("BEGIN IMMEDIATE").unwrap();
        let reclaimed = store
            .reclaim_dead_runs(&|_| Liveness::Alive)
            .expect("a run found alive needs no write");
        assert_eq!(reclaimed.rows, 0);
        assert!(reclaimed.dead.is_empty());
        let live: Vec<RunId> = reclaimed.live.iter().map(|run| run.id).collect();
        assert_eq!(live, [run]);
        other_process.execute_batch("COMMIT").unwrap();

        let reclaimed = store.reclaim_dead_runs(&|_| Liveness::Gone).unwrap();
        assert_eq!(reclaimed.rows, 1);
        assert_eq!(reclaimed.dead, [(run, Liveness::Gone)]);
        assert!(reclaimed.live.is_empty());
    }

    #[test]
    fn a_running_row_of_an_ended_run_is_taken_back() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, run) = one_url_claimed(dir.path());
        store
            .conn
            .execute("UPDATE runs SET ended_at = 1 WHERE id = ?1", [run.0])
            .unwrap();
        let reclaimed = store.reclaim_dead_runs(&|_| Liveness::Alive).unwrap();
        assert_eq!(reclaimed.rows, 1);
        assert!(reclaimed.live.is_empty());
    }
}
