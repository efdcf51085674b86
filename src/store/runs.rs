//! The run registry: one row per `jobrun run`, so that a new run can tell a
//! live run from a dead one and take the dead one's claims back at once, and
//! so that `report` can say how the last run ended.

use anyhow::Result;
use rusqlite::{Row, params};

use super::{Store, now_ms};

/// Who is starting a run.
#[derive(Debug, Clone)]
pub struct RunStart {
    pub pid: u32,
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

const RUN_COLUMNS: &str = "id, pid, host, boot_id, proc_start, command, started_at, heartbeat_at,
    ended_at, outcome, message, done, failed, retried, bytes";

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
    })
}

impl Store {
    /// Registers a new run. In the same transaction, every unfinished run
    /// that `liveness` finds dead is marked ended and its running rows go
    /// back to pending; their cut-short attempts are counted as interrupted,
    /// not against the retry budget.
    pub fn start_run(
        &mut self,
        start: &RunStart,
        liveness: impl Fn(&RunInfo) -> Liveness,
    ) -> Result<Started> {
        let now = now_ms();
        let tx = self.write_transaction()?;
        let unfinished = tx
            .prepare(&format!(
                "SELECT {RUN_COLUMNS} FROM runs WHERE ended_at IS NULL"
            ))?
            .query_map([], run_from_row)?
            .collect::<Result<Vec<_>, _>>()?;
        let mut started = Started::default();
        for run in unfinished {
            let state = liveness(&run);
            if state == Liveness::Alive {
                started.live.push(run);
                continue;
            }
            started.reclaimed += tx.execute(
                "UPDATE urls SET state = 'pending', interrupted = interrupted + 1
                 WHERE state = 'running' AND run_id = ?1",
                [run.id],
            )?;
            tx.execute(
                "UPDATE runs SET ended_at = heartbeat_at, outcome = ?2 WHERE id = ?1",
                params![run.id, state.outcome()],
            )?;
            started.dead.push((run.id, state));
        }
        started.id = tx.query_row(
            "INSERT INTO runs (pid, host, boot_id, proc_start, command, started_at, heartbeat_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6) RETURNING id",
            params![
                start.pid,
                start.host,
                start.boot_id,
                start.proc_start as i64,
                start.command,
                now
            ],
            |row| row.get(0),
        )?;
        tx.commit()?;
        Ok(started)
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
            "UPDATE urls SET state = 'pending' WHERE state = 'running' AND run_id = ?1",
            [run],
        )?;
        tx.execute(
            "UPDATE runs SET ended_at = ?2, heartbeat_at = ?2, outcome = ?3, message = ?4
             WHERE id = ?1",
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
