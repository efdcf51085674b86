//! The run registry across machines. A run is dead when its own machine
//! says its process is gone (`liveness`), or when its heartbeat, on the
//! server's clock, is older than the lease it started with. Any run may
//! then take its rows back: a row's attempt cut short does not use its
//! budget, but a URL rescued `RESCUE_LIMIT` times fails, so that a URL that
//! kills runs is not handed out for ever.

use crate::store::Result;
use postgres::Transaction;
use postgres::types::ToSql;

use super::queue::UNCLAIMED;
use super::{PgResult, PostgresStore, RESCUE_LIMIT, SERVER_NOW, count};
use crate::domain::{
    Holder, Liveness, Reclaimed, RunEnd, RunId, RunInfo, RunOutcome, RunStart, Started,
};

const RUN_COLUMNS: &str = "id, pid, host, boot_id, proc_start, command, started_at, heartbeat_at,
    ended_at, outcome, message, done, failed, retried, bytes, pid_ns";

fn run_from_row(row: &postgres::Row) -> RunInfo {
    RunInfo {
        id: RunId(row.get(0)),
        start: RunStart {
            pid: row.get::<_, i64>(1) as u32,
            pid_ns: row.get::<_, Option<i64>>(15).map(|ns| ns as u64),
            host: row.get(2),
            boot_id: row.get(3),
            proc_start: row.get::<_, i64>(4) as u64,
            command: row.get(5),
        },
        started_at: row.get(6),
        heartbeat_at: row.get(7),
        ended_at: row.get(8),
        outcome: row.get::<_, Option<&str>>(9).and_then(RunOutcome::parse),
        message: row.get(10),
        done: count(row.get(11)),
        failed: count(row.get(12)),
        retried: count(row.get(13)),
        bytes: count(row.get(14)),
    }
}

/// How a rescued row is set: back to where it was before its claim, its
/// cut-short attempt counted as interrupted; or, rescued too often, failed
/// (a refresh fails only the refresh: the done file stays).
fn rescue_set() -> String {
    let give_up = format!("u.rescued + 1 >= {RESCUE_LIMIT}");
    let message = "'rescued ' || (u.rescued + 1) || ' times from runs that died while \
                   fetching it; look at what it returns, then `jobrun retry` it'";
    format!(
        "state = CASE WHEN {give_up} AND u.refresh IS DISTINCT FROM 'pending' THEN 'failed'
                      ELSE {UNCLAIMED} END,
         refresh = CASE WHEN {give_up} AND u.refresh = 'pending' THEN 'failed' ELSE u.refresh END,
         error = CASE WHEN {give_up} AND u.refresh IS DISTINCT FROM 'pending' THEN {message}
                      ELSE u.error END,
         refresh_error = CASE WHEN {give_up} AND u.refresh = 'pending' THEN {message}
                              ELSE u.refresh_error END,
         interrupted = u.interrupted + 1, rescued = u.rescued + 1"
    )
}

impl PostgresStore {
    pub(super) fn register_run(
        &mut self,
        start: &RunStart,
        liveness: &dyn Fn(&RunInfo) -> Liveness,
    ) -> Result<Started> {
        let name = self.name.clone();
        let lease_ms = self.lease_ms();
        let mut client = self.client()?;
        let mut tx = client.transaction().at(&name)?;
        // Runs start one at a time, so that each sees every run started
        // before it as live (and does not clear its files as a dead run's).
        tx.batch_execute("LOCK TABLE runs IN SHARE ROW EXCLUSIVE MODE")
            .at(&name)?;
        let reclaimed = reclaim(&mut tx, liveness, &name)?;
        let id: i64 = tx
            .query_one(
                &format!(
                    "INSERT INTO runs (pid, pid_ns, host, boot_id, proc_start, command, started_at,
                                       heartbeat_at, lease_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, {SERVER_NOW}, {SERVER_NOW}, $7)
                     RETURNING id"
                ),
                &[
                    &i64::from(start.pid),
                    &start.pid_ns.map(|ns| ns as i64),
                    &start.host,
                    &start.boot_id,
                    &(start.proc_start as i64),
                    &start.command,
                    &lease_ms,
                ],
            )
            .at(&name)?
            .get(0);
        tx.commit().at(&name)?;
        Ok(Started {
            id: RunId(id),
            reclaimed: reclaimed.rows,
            dead: reclaimed.dead,
            live: reclaimed.live,
        })
    }

    pub(super) fn reclaim(&mut self, liveness: &dyn Fn(&RunInfo) -> Liveness) -> Result<Reclaimed> {
        let name = self.name.clone();
        let mut client = self.client()?;
        let mut tx = client.transaction().at(&name)?;
        let reclaimed = reclaim(&mut tx, liveness, &name)?;
        tx.commit().at(&name)?;
        Ok(reclaimed)
    }

    pub(super) fn holders(&self, run: RunId) -> Result<Vec<Holder>> {
        let rows = self
            .client()?
            .query(
                "SELECT u.run_id, coalesce(r.pid, 0), count(*) FROM jobs u
                 LEFT JOIN runs r ON r.id = u.run_id
                 WHERE u.state = 'running' AND u.run_id IS DISTINCT FROM $1
                 GROUP BY u.run_id, r.pid ORDER BY count(*) DESC, u.run_id",
                &[&run.0],
            )
            .at(&self.name)?;
        Ok(rows
            .iter()
            .map(|row| Holder {
                run: RunId(row.get::<_, Option<i64>>(0).unwrap_or(0)),
                pid: row.get::<_, i64>(1) as u32,
                urls: count(row.get(2)),
            })
            .collect())
    }

    pub(super) fn finish_run(&mut self, run: RunId, end: &RunEnd) -> Result<()> {
        let (outcome, message) = match end {
            RunEnd::Finished => ("finished", None),
            RunEnd::Interrupted => ("interrupted", None),
            RunEnd::Error(message) => ("error", Some(message.as_str())),
        };
        let name = self.name.clone();
        let mut client = self.client()?;
        let mut tx = client.transaction().at(&name)?;
        // A run that another one found dead keeps the end recorded then.
        tx.execute(
            &format!(
                "UPDATE runs SET ended_at = {SERVER_NOW}, heartbeat_at = {SERVER_NOW},
                     outcome = $2, message = $3
                 WHERE id = $1 AND ended_at IS NULL"
            ),
            &[&run.0, &outcome, &message],
        )
        .at(&name)?;
        tx.execute(
            &format!(
                "UPDATE jobs u SET state = {UNCLAIMED} WHERE state = 'running' AND run_id = $1"
            ),
            &[&run.0],
        )
        .at(&name)?;
        tx.commit().at(&name)?;
        Ok(())
    }

    pub(super) fn runs(&self, limit: usize) -> Result<Vec<RunInfo>> {
        let rows = self
            .client()?
            .query(
                &format!("SELECT {RUN_COLUMNS} FROM runs ORDER BY id DESC LIMIT $1"),
                &[&(limit as i64)],
            )
            .at(&self.name)?;
        Ok(rows.iter().map(run_from_row).collect())
    }

    /// How many runs are going now, this one included: what per-host limits
    /// are shared among.
    pub(super) fn live_run_count(&self) -> Result<u64> {
        let live: i64 = self
            .client()?
            .query_one(
                &format!(
                    "SELECT count(*) FROM runs
                     WHERE ended_at IS NULL AND heartbeat_at + lease_ms >= {SERVER_NOW}"
                ),
                &[],
            )
            .at(&self.name)?
            .get(0);
        Ok(super::count(live))
    }
}

/// Every unfinished run found dead is marked ended and its running rows are
/// rescued; running rows of runs that ended, or were never recorded, too.
fn reclaim(
    tx: &mut Transaction<'_>,
    liveness: &dyn Fn(&RunInfo) -> Liveness,
    name: &str,
) -> Result<Reclaimed> {
    let unfinished = tx
        .query(
            &format!(
                "SELECT {RUN_COLUMNS}, heartbeat_at + lease_ms < {SERVER_NOW}
                 FROM runs WHERE ended_at IS NULL ORDER BY id"
            ),
            &[],
        )
        .at(name)?;
    let mut reclaimed = Reclaimed::default();
    for row in unfinished {
        let run = run_from_row(&row);
        let stale: bool = row.get(16);
        let state = match liveness(&run) {
            Liveness::Alive if stale => Liveness::Gone,
            state => state,
        };
        if state == Liveness::Alive {
            reclaimed.live.push(run);
            continue;
        }
        let outcome = match state {
            Liveness::Rebooted => "rebooted",
            _ => "killed",
        };
        // Ended only if it is still as found: a run found dead by its
        // heartbeat that renewed it meanwhile lives on.
        let by_process = !stale;
        let ended = tx
            .execute(
                &format!(
                    "UPDATE runs SET ended_at = heartbeat_at, outcome = $2
                     WHERE id = $1 AND ended_at IS NULL
                       AND ($3 OR heartbeat_at + lease_ms < {SERVER_NOW})"
                ),
                &[&run.id.0, &outcome, &by_process],
            )
            .at(name)?;
        if ended == 0 {
            continue;
        }
        let params: &[&(dyn ToSql + Sync)] = &[&run.id.0];
        reclaimed.rows += tx
            .execute(
                &format!(
                    "UPDATE jobs u SET {} WHERE u.state = 'running' AND u.run_id = $1",
                    rescue_set()
                ),
                params,
            )
            .at(name)?;
        reclaimed.dead.push((run.id, state));
    }
    reclaimed.rows += tx
        .execute(
            &format!(
                "UPDATE jobs u SET {} WHERE u.state = 'running'
                   AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.id = u.run_id
                                   AND r.ended_at IS NULL)",
                rescue_set()
            ),
            &[],
        )
        .at(name)?;
    Ok(reclaimed)
}
