//! The run registry: one row per `jobrun run`, so that a new run can tell a
//! live run from a dead one and take the dead one's claims back at once, and
//! so that `report` can say how the last run ended.

use anyhow::Result;
use rusqlite::{Row, Transaction, params};

use super::queue::UNCLAIMED;
use super::{Store, now_ms};

/// Who is starting a run.
#[derive(Debug, Clone)]
pub struct RunStart {
    pub pid: u32,
    /// The inode of its PID namespace, when /proc shows it.
    pub pid_ns: Option<u64>,
    pub host: String,
    pub boot_id: String,
    pub proc_start: u64,
    pub command: String,
}

/// A run as recorded.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub id: i64,
    pub pid: u32,
    /// None for runs recorded before namespaces were, or without /proc.
    pub pid_ns: Option<u64>,
    pub host: String,
    pub boot_id: String,
    pub proc_start: u64,
    pub command: String,
    pub started_at: i64,
    pub heartbeat_at: i64,
    pub ended_at: Option<i64>,
    pub outcome: Option<String>,
    pub message: Option<String>,
    pub done: i64,
    pub failed: i64,
    pub retried: i64,
    pub bytes: i64,
}

/// Whether an unfinished run's process is still there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    /// The process is gone (killed, or crashed).
    Gone,
    /// The machine restarted since the run began.
    Rebooted,
}

impl Liveness {
    /// The outcome recorded for a run found dead.
    fn outcome(self) -> &'static str {
        match self {
            Liveness::Alive => "running",
            Liveness::Gone => "killed",
            Liveness::Rebooted => "rebooted",
        }
    }
}

/// How a run ended, as it records itself.
#[derive(Debug, Clone)]
pub enum RunEnd {
    Finished,
    Interrupted,
    Error(String),
}

/// What starting a run found and did.
#[derive(Debug, Default)]
pub struct Started {
    pub id: i64,
    /// Rows taken back from dead runs.
    pub reclaimed: usize,
    /// Runs found dead, with how they ended.
    pub dead: Vec<(i64, Liveness)>,
    /// Runs still going.
    pub live: Vec<RunInfo>,
}

/// What looking for dead runs found and did.
#[derive(Debug, Default)]
pub struct Reclaimed {
    /// Rows taken back from dead runs.
    pub rows: usize,
    /// Runs found dead, with how they ended.
    pub dead: Vec<(i64, Liveness)>,
    /// Runs still going.
    pub live: Vec<RunInfo>,
}

/// Another run's claimed URLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub run: i64,
    pub pid: u32,
    pub urls: i64,
}

const RUN_COLUMNS: &str = "id, pid, host, boot_id, proc_start, command, started_at, heartbeat_at,
    ended_at, outcome, message, done, failed, retried, bytes, pid_ns";

fn run_from_row(row: &Row<'_>) -> rusqlite::Result<RunInfo> {
    Ok(RunInfo {
        id: row.get(0)?,
        pid: row.get(1)?,
        host: row.get(2)?,
        boot_id: row.get(3)?,
        proc_start: row.get::<_, i64>(4)? as u64,
        command: row.get(5)?,
        started_at: row.get(6)?,
        heartbeat_at: row.get(7)?,
        ended_at: row.get(8)?,
        outcome: row.get(9)?,
        message: row.get(10)?,
        done: row.get(11)?,
        failed: row.get(12)?,
        retried: row.get(13)?,
        bytes: row.get(14)?,
        pid_ns: row.get::<_, Option<i64>>(15)?.map(|ns| ns as u64),
    })
}

impl Store {
    /// Registers a new run, after taking back the rows of every dead run
    /// (`reclaim_dead_runs`) in the same transaction.
    pub fn start_run(
        &mut self,
        start: &RunStart,
        liveness: impl Fn(&RunInfo) -> Liveness,
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
            id,
            reclaimed: reclaimed.rows,
            dead: reclaimed.dead,
            live: reclaimed.live,
        })
    }

    /// Takes back the rows of every unfinished run that `liveness` finds
    /// dead, for a run that has nothing left to claim while others hold URLs.
    pub fn reclaim_dead_runs(
        &mut self,
        liveness: impl Fn(&RunInfo) -> Liveness,
    ) -> Result<Reclaimed> {
        let tx = self.write_transaction()?;
        let reclaimed = reclaim_dead_runs(&tx, liveness)?;
        tx.commit()?;
        Ok(reclaimed)
    }

    /// The other runs that hold claimed URLs, most URLs first.
    pub fn held_by_others(&self, run: i64) -> Result<Vec<Holder>> {
        let holders = self
            .conn
            .prepare(
                "SELECT urls.run_id, coalesce(runs.pid, 0), count(*) FROM urls
                 LEFT JOIN runs ON runs.id = urls.run_id
                 WHERE urls.state = 'running' AND urls.run_id IS NOT ?1
                 GROUP BY urls.run_id ORDER BY count(*) DESC, urls.run_id",
            )?
            .query_map([run], |row| {
                Ok(Holder {
                    run: row.get::<_, Option<i64>>(0)?.unwrap_or(0),
                    pid: row.get(1)?,
                    urls: row.get(2)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(holders)
    }

    /// Records how `run` ended; rows it still holds go back to pending.
    pub fn end_run(&mut self, run: i64, end: &RunEnd) -> Result<()> {
        let (outcome, message) = match end {
            RunEnd::Finished => ("finished", None),
            RunEnd::Interrupted => ("interrupted", None),
            RunEnd::Error(message) => ("error", Some(message.as_str())),
        };
        let tx = self.write_transaction()?;
        tx.execute(
            &format!("UPDATE urls SET state = {UNCLAIMED} WHERE state = 'running' AND run_id = ?1"),
            [run],
        )?;
        // A run that another one found dead keeps the end recorded then.
        tx.execute(
            "UPDATE runs SET ended_at = ?2, heartbeat_at = ?2, outcome = ?3, message = ?4
             WHERE id = ?1 AND ended_at IS NULL",
            params![run, now_ms(), outcome, message],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The most recent runs, newest first.
    pub fn recent_runs(&self, limit: usize) -> Result<Vec<RunInfo>> {
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
    liveness: impl Fn(&RunInfo) -> Liveness,
) -> Result<Reclaimed> {
    let unfinished = tx
        .prepare(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE ended_at IS NULL"
        ))?
        .query_map([], run_from_row)?
        .collect::<Result<Vec<_>, _>>()?;
    let mut reclaimed = Reclaimed::default();
    for run in unfinished {
        let state = liveness(&run);
        if state == Liveness::Alive {
            reclaimed.live.push(run);
            continue;
        }
        reclaimed.rows += tx.execute(
            &format!(
                "UPDATE urls SET state = {UNCLAIMED}, interrupted = interrupted + 1
                 WHERE state = 'running' AND run_id = ?1"
            ),
            [run.id],
        )?;
        tx.execute(
            "UPDATE runs SET ended_at = heartbeat_at, outcome = ?2 WHERE id = ?1",
            params![run.id, state.outcome()],
        )?;
        reclaimed.dead.push((run.id, state));
    }
    reclaimed.rows += tx.execute(
        &format!(
            "UPDATE urls SET state = {UNCLAIMED}, interrupted = interrupted + 1
             WHERE state = 'running'
               AND NOT EXISTS (SELECT 1 FROM runs WHERE runs.id = urls.run_id
                               AND runs.ended_at IS NULL)"
        ),
        [],
    )?;
    Ok(reclaimed)
}
