//! Claiming and completing in batches. A claim is one statement: due rows
//! picked with `FOR UPDATE SKIP LOCKED` (runs never wait for each other's
//! picks) and set running under the run with the fence bumped. Outcomes
//! are one `UPDATE … FROM unnest(…)` per kind, each guarded by run and
//! fence; a row that no longer matches means the run was taken for dead.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use crate::store::{CallerResult, Result};
use postgres::types::ToSql;
use postgres::{Statement, Transaction};

use super::{PgResult, PostgresStore, SERVER_NOW, count};
use crate::clock::now_ms;
use crate::domain::{
    Claim, Completion, Durations, HostFilter, Lease, RefreshRound, RowState, RunId, Validators,
    Work,
};
use crate::store::TakenForDead;

/// The state a claimed row goes back to when its attempt did not finish:
/// pending, or done for a row being refreshed (its old file is still there).
pub(super) const UNCLAIMED: &str = "CASE WHEN u.refresh = 'pending' THEN 'done' ELSE 'pending' END";

/// Every outcome statement ends in this guard: still running under this
/// run ($1) and the fence of its claim (c.fence), the rows found by primary
/// key among the batch's ids (`{ids}`). `state` is compared as
/// `state || ''` so that the planner cannot walk the partial index of
/// running rows instead, which keeps an entry for every row the run ever
/// claimed until a vacuum.
fn guard(ids: &str) -> String {
    format!(
        "u.id = ANY({ids}) AND u.id = c.id AND u.run_id = $1 AND u.fence = c.fence
         AND u.state || '' = 'running'"
    )
}

/// What a retry and a failure set alike: a row being refreshed stays done
/// and keeps the URL's own status and error, the error going to its
/// refresh; any other row takes `state` and the attempt's status and error.
fn unfinished_sets(state: &str) -> String {
    format!(
        "state = CASE WHEN u.refresh = 'pending' THEN 'done' ELSE '{state}' END,
         attempts = u.attempts + 1, answer_status = c.status,
         http_status = CASE WHEN u.refresh = 'pending' THEN u.http_status ELSE c.status END,
         error = CASE WHEN u.refresh = 'pending' THEN u.error ELSE c.error END,
         refresh_error = CASE WHEN u.refresh = 'pending' THEN c.error ELSE u.refresh_error END,
         updated_at = $2, duration_ms = c.millis"
    )
}

/// Retries that are due first (the latest due first, as SQLite picks them),
/// then rows never tried in import order from `start`, then, if those run
/// short, rows never tried before `start`; `$4` lists hosts to skip.
/// `start` is `$6`, where the run's last claim got to, unless a statement
/// has put rows back to pending since the run's last claim (a row in
/// `requeues` newer than `$7`, the newest it saw): then the beginning. Each
/// walks the partial index of pending rows in its own order: `next_attempt_at`
/// is bounded, not equal to 0, so that no plan can order the rows by id
/// alone and walk the primary key past every done row. `next_from` is
/// where the run's next claim starts: past the rows taken, or at the first
/// row passed over because its host was skipped; `seen` the newest row of
/// `requeues` this claim saw.
const CLAIM_FETCH: &str = "WITH start AS (
        SELECT CASE WHEN (SELECT max(id) FROM requeues) IS DISTINCT FROM $7::bigint THEN 0
                    ELSE $6::bigint END AS id),
    retries AS (
        SELECT id, ctid FROM jobs
        WHERE state = 'pending' AND next_attempt_at > 0 AND next_attempt_at <= $2
          AND NOT (host = ANY($4))
        ORDER BY next_attempt_at DESC LIMIT $3 FOR UPDATE SKIP LOCKED),
    fresh AS (
        SELECT id, ctid FROM jobs
        WHERE state = 'pending' AND next_attempt_at >= 0 AND next_attempt_at <= 0
          AND id >= (SELECT id FROM start) AND NOT (host = ANY($4))
        ORDER BY next_attempt_at, id LIMIT $3 - (SELECT count(*) FROM retries)
        FOR UPDATE SKIP LOCKED),
    behind AS (
        SELECT id, ctid FROM jobs
        WHERE state = 'pending' AND next_attempt_at <= 0 AND id < (SELECT id FROM start)
          AND NOT (host = ANY($4))
        ORDER BY next_attempt_at, id
        LIMIT $3 - (SELECT count(*) FROM retries) - (SELECT count(*) FROM fresh)
        FOR UPDATE SKIP LOCKED),
    picked AS (
        SELECT id, ctid FROM retries UNION ALL SELECT id, ctid FROM behind
        UNION ALL SELECT id, ctid FROM fresh),
    next_from AS (
        SELECT coalesce(
            (SELECT min(id) FROM jobs
             WHERE state = 'pending' AND next_attempt_at = 0 AND id >= (SELECT id FROM start)
               AND id <= (SELECT max(id) FROM fresh) AND host = ANY($4)),
            (SELECT max(id) + 1 FROM fresh),
            (SELECT id FROM start)) AS id,
            (SELECT max(id) FROM requeues) AS seen)";

/// What a claim of pending rows changes in the counters, added by the claim
/// itself: its rows go from pending to running, each under its last HTTP
/// status; nothing else that is counted changes (errors, refresh rounds,
/// and per host, where running counts as pending). The trigger on jobs
/// would copy the statement's rows twice over to find that out. Setting
/// `jobrun.counted` in the same query, row by row, tells the trigger that
/// these rows are counted (see migrations/postgres/01-initial/up.sql): it
/// is set whenever a count is added here, and an empty claim, which adds
/// none, leaves the trigger nothing to count either.
const COUNT_CLAIMED: &str = ",
    counted AS (
        INSERT INTO tallies AS t (slot, state, status, rows, bytes)
        SELECT pg_backend_pid(), s.state, c.status, s.sign * c.rows, 0
        FROM (SELECT coalesce(http_status, 0) AS status, count(*) AS rows
              FROM claimed GROUP BY 1) AS c,
             (VALUES ('pending', -1), ('running', 1)) AS s(state, sign)
        WHERE set_config('jobrun.counted', 'claim', true) = 'claim'
        ORDER BY 2, 3
        ON CONFLICT (slot, state, status) DO UPDATE SET rows = t.rows + excluded.rows)";

/// Done rows a refresh asked for, due ones by when they became due.
const CLAIM_REFRESH: &str = "WITH picked AS (
        SELECT id, ctid FROM jobs
        WHERE refresh = 'pending' AND state = 'done' AND next_attempt_at <= $2
          AND NOT (host = ANY($4))
        ORDER BY next_attempt_at, id LIMIT $3 FOR UPDATE SKIP LOCKED),
    next_from AS (SELECT $6::bigint AS id, $7::bigint AS seen)";

/// Where a run's next claim starts looking for rows never tried: just past
/// the last ones it took, and the newest row of `requeues` it has seen.
/// Every claimed row leaves an entry in the index of pending rows until a
/// vacuum (one in five rows of a big table may be claimed before one
/// starts), and a claim that started at the beginning would step over all
/// of them, visiting the table for each one the first time. Rows that go
/// back to pending behind it are taken when the rows ahead run short, and
/// at once when a statement has put rows back since its last claim (it
/// finds a newer row in `requeues`), its own statements included.
#[derive(Default)]
pub(super) struct FreshFrom(Cell<Position>);

/// Where a claim starts (`id`), and the newest row of `requeues` the run
/// had seen by then (`seen`).
#[derive(Clone, Copy, Default)]
struct Position {
    id: i64,
    seen: Option<i64>,
}

/// The statements of claim + complete batches, prepared once per
/// connection and kept by their text: each is parsed once, and later
/// batches send it without waiting for it to be described first. They are
/// still planned for each batch's values (`plan_cache_mode`, below).
#[derive(Default)]
pub(super) struct Prepared(RefCell<HashMap<String, Statement>>);

impl Prepared {
    fn get(&self, tx: &mut Transaction<'_>, sql: &str, name: &str) -> Result<Statement> {
        if let Some(statement) = self.0.borrow().get(sql) {
            return Ok(statement.clone());
        }
        let statement = tx.prepare(sql).at(name)?;
        self.0
            .borrow_mut()
            .insert(sql.to_string(), statement.clone());
        Ok(statement)
    }
}

impl PostgresStore {
    pub(super) fn complete_and_claim_batch(
        &mut self,
        run: RunId,
        completions: &[Completion],
        claim: usize,
        filter: &HostFilter,
        work: Work,
    ) -> Result<Vec<Claim>> {
        let name = self.name.clone();
        let name = name.as_str();
        let lease_ms = self.lease_ms();
        let now = now_ms();
        let mut client = self.client()?;
        let mut tx = client.transaction().at(name)?;
        let prepared = &self.prepared;
        // The run's own row first, then the URLs: the order a rescuer takes
        // them in too, so that the two never deadlock. The same statement
        // adds the batch's attempts to the duration histogram (in the
        // connection's own slot: runs never wait on each other's counters)
        // and, in its answer, makes the settings the batch's later
        // statements are planned under (`set_config(…, true)` is `SET
        // LOCAL`): two round trips fewer than statements of their own.
        //
        // Why those settings: a queue's table changes faster than its
        // statistics, and the planner, thinking a batch's rows are few,
        // joined the batch's arrays to them in a nested loop, a million
        // comparisons per batch of a thousand; batches are joined by hash,
        // their rows found by primary key. At millions of rows the planner's
        // estimates pass `jit_above_cost`: compiling each batch's statements
        // took 42% of the server's CPU at 10,000,000 rows, for statements
        // that touch a thousand rows. The statements are prepared once
        // (`Prepared`), but each batch's are planned for its own arrays and
        // positions, never by a generic plan.
        let tally = Tally::of(completions);
        let heartbeat = prepared.get(
            &mut tx,
            &format!(
                "WITH durations AS (
                    INSERT INTO durations AS d (slot, bucket, count)
                    SELECT pg_backend_pid(), b, count(*) FROM unnest($6::integer[]) AS b
                    GROUP BY b ORDER BY b
                    ON CONFLICT (slot, bucket) DO UPDATE SET count = d.count + excluded.count)
                 UPDATE runs SET heartbeat_at = {SERVER_NOW}, done = done + $2,
                     failed = failed + $3, retried = retried + $4, bytes = bytes + $5
                 WHERE id = $1 AND ended_at IS NULL
                 RETURNING set_config('enable_nestloop', 'off', true),
                     set_config('jit', 'off', true),
                     set_config('plan_cache_mode', 'force_custom_plan', true)"
            ),
            name,
        )?;
        let alive = tx
            .query(
                &heartbeat,
                &[
                    &run.0,
                    &tally.done,
                    &tally.failed,
                    &tally.retried,
                    &tally.bytes,
                    &duration_buckets(completions),
                ],
            )
            .at(name)?
            .len();
        if alive == 0 {
            return Err(TakenForDead { run }.into());
        }
        let ours = completions.iter().all(|c| c.lease().run == run);
        let recorded = record(&mut tx, prepared, run, now, completions, name)?;
        if !ours || recorded != completions.len() as u64 {
            // Dropping the transaction keeps nothing of it.
            return Err(TakenForDead { run }.into());
        }
        let (claims, next_from) = if claim > 0 {
            let from = self.fresh_from.0.get();
            claim_due(
                &mut tx, prepared, run, now, claim, filter, work, lease_ms, from, name,
            )?
        } else {
            (Vec::new(), None)
        };
        tx.commit().at(name)?;
        if let Some(next_from) = next_from {
            self.fresh_from.0.set(next_from);
        }
        Ok(claims)
    }

    pub(super) fn renew(&mut self, run: RunId) -> Result<()> {
        let name = self.name.clone();
        let alive = self
            .client()?
            .execute(
                &format!(
                    "UPDATE runs SET heartbeat_at = {SERVER_NOW}
                     WHERE id = $1 AND ended_at IS NULL"
                ),
                &[&run.0],
            )
            .at(&name)?;
        if alive == 0 {
            return Err(TakenForDead { run }.into());
        }
        Ok(())
    }

    pub(super) fn due_at(&self, work: Work) -> Result<Option<i64>> {
        let sql = match work {
            Work::Fetch => "SELECT min(next_attempt_at) FROM jobs WHERE state = 'pending'",
            Work::Refresh => {
                "SELECT min(next_attempt_at) FROM jobs WHERE refresh = 'pending' AND state = 'done'"
            }
        };
        Ok(self.client()?.query_one(sql, &[]).at(&self.name)?.get(0))
    }

    pub(super) fn row_states(
        &mut self,
        ids: &[i64],
        settle: &mut dyn FnMut(&HashMap<i64, RowState>) -> CallerResult,
    ) -> Result<()> {
        let name = self.name.clone();
        let mut client = self.client()?;
        let mut tx = client.transaction().at(&name)?;
        // Locked rows are skipped by every claim until the commit.
        let rows = tx
            .query(
                "SELECT id, state FROM jobs WHERE id = ANY($1) ORDER BY id FOR UPDATE",
                &[&ids],
            )
            .at(&name)?;
        let states = rows
            .iter()
            .map(|row| {
                let state = match row.get::<_, &str>(1) {
                    "done" => RowState::Done,
                    "running" => RowState::Held,
                    _ => RowState::Free,
                };
                (row.get::<_, i64>(0), state)
            })
            .collect();
        settle(&states)?;
        tx.commit().at(&name)?;
        Ok(())
    }

    pub(super) fn requeue(&mut self, status: Option<u16>, error: Option<&str>) -> Result<u64> {
        let status = status.map(i32::from);
        self.client()?
            .execute(
                "UPDATE jobs SET state = 'pending', attempts = 0, next_attempt_at = 0, rescued = 0
                 WHERE state = 'failed'
                   AND ($1::integer IS NULL OR http_status = $1)
                   AND ($2::text IS NULL OR strpos(error, $2) > 0)",
                &[&status, &error],
            )
            .at(&self.name)
    }

    pub(super) fn requeue_files(&mut self, ids: &[i64]) -> Result<()> {
        self.client()?
            .execute(
                "UPDATE jobs SET state = 'pending', attempts = 0, next_attempt_at = 0, rescued = 0,
                     error = 'file missing or damaged (found by verify)'
                 WHERE id = ANY($1) AND state = 'done'",
                &[&ids],
            )
            .at(&self.name)?;
        Ok(())
    }

    pub(super) fn refresh_round(&mut self, cutoff: Option<i64>) -> Result<RefreshRound> {
        let name = self.name.clone();
        let name = name.as_str();
        let mut client = self.client()?;
        let mut tx = client.transaction().at(name)?;
        // Two refreshes starting at once take turns to number their round.
        tx.batch_execute("LOCK TABLE refresh_rounds IN EXCLUSIVE MODE")
            .at(name)?;
        let unfinished = tx
            .query_opt(
                "SELECT round, sum(rows)::bigint FROM refresh_tallies WHERE refresh = 'pending'
                 GROUP BY round HAVING sum(rows) > 0 ORDER BY round DESC LIMIT 1",
                &[],
            )
            .at(name)?;
        if let Some(row) = unfinished {
            let rows = count(row.get(1));
            tx.commit().at(name)?;
            return Ok(RefreshRound::Resumed {
                round: row.get(0),
                rows,
            });
        }
        let round: i64 = tx
            .query_one(
                "SELECT coalesce(max(round), 0) + 1 FROM refresh_rounds",
                &[],
            )
            .at(name)?
            .get(0);
        // The retry budget starts afresh: attempts count this refresh's.
        let rows = tx
            .execute(
                "UPDATE jobs SET refresh = 'pending', refresh_round = $1, refresh_error = NULL,
                     attempts = 0, next_attempt_at = 0
                 WHERE state = 'done'
                   AND ($2::bigint IS NULL OR coalesce(fetched_at, updated_at, 0) < $2)",
                &[&round, &cutoff],
            )
            .at(name)?;
        if rows > 0 {
            tx.execute(
                "INSERT INTO refresh_rounds (round, started_at) VALUES ($1, $2)",
                &[&round, &now_ms()],
            )
            .at(name)?;
        }
        tx.commit().at(name)?;
        Ok(RefreshRound::Started { round, rows })
    }
}

/// What a batch adds to its run's own counts.
#[derive(Default)]
struct Tally {
    done: i64,
    failed: i64,
    retried: i64,
    bytes: i64,
}

impl Tally {
    fn of(completions: &[Completion]) -> Tally {
        let mut tally = Tally::default();
        for completion in completions {
            match completion {
                Completion::Done { fetched, .. } => {
                    tally.done += 1;
                    tally.bytes += fetched.bytes as i64;
                }
                Completion::Unchanged { .. } => tally.done += 1,
                Completion::Retry { .. } => tally.retried += 1,
                Completion::Failed { .. } => tally.failed += 1,
                Completion::Interrupted { .. } | Completion::Unstarted { .. } => {}
            }
        }
        tally
    }
}

/// Records every outcome, one statement per kind; returns how many rows
/// were still this run's under the same fence.
fn record(
    tx: &mut Transaction<'_>,
    prepared: &Prepared,
    run: RunId,
    now: i64,
    completions: &[Completion],
    name: &str,
) -> Result<u64> {
    let mut done = Columns::default();
    let mut unchanged = Columns::default();
    let mut retry = Columns::default();
    let mut failed = Columns::default();
    let mut interrupted = Columns::default();
    let mut unstarted = Columns::default();
    for completion in completions {
        let (id, lease) = (completion.id(), completion.lease());
        match completion {
            Completion::Done { fetched, .. } => {
                done.key(id, lease);
                done.status.push(Some(i32::from(fetched.status)));
                done.bytes.push(fetched.bytes as i64);
                done.sha256.push(fetched.sha256.to_vec());
                done.millis.push(i64::from(fetched.millis));
                done.validators(&fetched.validators);
            }
            Completion::Unchanged {
                status,
                millis,
                validators,
                ..
            } => {
                unchanged.key(id, lease);
                unchanged.status.push(Some(i32::from(*status)));
                unchanged.millis.push(i64::from(*millis));
                unchanged.validators(validators);
            }
            Completion::Retry {
                status,
                error,
                next_attempt_at,
                millis,
                ..
            } => {
                retry.key(id, lease);
                retry.status.push(status.map(i32::from));
                retry.error.push(error.clone());
                retry.next_attempt_at.push(*next_attempt_at);
                retry.millis.push(i64::from(*millis));
            }
            Completion::Failed {
                status,
                error,
                millis,
                ..
            } => {
                failed.key(id, lease);
                failed.status.push(status.map(i32::from));
                failed.error.push(error.clone());
                failed.millis.push(i64::from(*millis));
            }
            Completion::Interrupted { .. } => interrupted.key(id, lease),
            Completion::Unstarted { .. } => unstarted.key(id, lease),
        }
    }
    let (guard3, guard2) = (guard("$3"), guard("$2"));
    let mut recorded = 0;
    // An attempt that reached an end raises the row's attempts and sets
    // its answer_status: the trigger on jobs counts it as its host's answer.
    let mut apply = |sql: String, params: &[&(dyn ToSql + Sync)]| -> Result<()> {
        let statement = prepared.get(tx, &sql, name)?;
        recorded += tx.execute(&statement, params).at(name)?;
        Ok(())
    };
    if !done.ids.is_empty() {
        apply(
            format!(
                "UPDATE jobs u SET state = 'done', attempts = u.attempts + 1,
                     http_status = c.status, answer_status = c.status, bytes = c.bytes,
                     sha256 = c.sha256, error = NULL,
                     next_attempt_at = 0, updated_at = $2, duration_ms = c.millis,
                     etag = c.etag, last_modified = c.last_modified, fetched_at = $2,
                     refresh = CASE WHEN u.refresh = 'pending' THEN 'changed' ELSE u.refresh END,
                     refresh_error = NULL, written_by = $1
                 FROM unnest($3::bigint[], $4::bigint[], $5::integer[], $6::bigint[],
                             $7::bytea[], $8::bigint[], $9::text[], $10::text[])
                      AS c(id, fence, status, bytes, sha256, millis, etag, last_modified)
                 WHERE {guard3}"
            ),
            &[
                &run.0,
                &now,
                &done.ids,
                &done.fences,
                &done.status,
                &done.bytes,
                &done.sha256,
                &done.millis,
                &done.etag,
                &done.last_modified,
            ],
        )?;
    }
    if !unchanged.ids.is_empty() {
        // A 304 may carry newer validators; it need not repeat them.
        apply(
            format!(
                "UPDATE jobs u SET state = 'done', attempts = u.attempts + 1,
                     answer_status = c.status, next_attempt_at = 0, updated_at = $2,
                     duration_ms = c.millis, etag = coalesce(c.etag, u.etag),
                     last_modified = coalesce(c.last_modified, u.last_modified),
                     fetched_at = $2, refresh = 'unchanged', refresh_error = NULL
                 FROM unnest($3::bigint[], $4::bigint[], $5::bigint[], $6::text[], $7::text[],
                             $8::integer[])
                      AS c(id, fence, millis, etag, last_modified, status)
                 WHERE {guard3}"
            ),
            &[
                &run.0,
                &now,
                &unchanged.ids,
                &unchanged.fences,
                &unchanged.millis,
                &unchanged.etag,
                &unchanged.last_modified,
                &unchanged.status,
            ],
        )?;
    }
    if !retry.ids.is_empty() {
        // A row being refreshed stays done with its old file while its
        // refresh waits for the retry; the URL's own status and error stay.
        apply(
            format!(
                "UPDATE jobs u SET {}, next_attempt_at = c.next_attempt_at
                 FROM unnest($3::bigint[], $4::bigint[], $5::integer[], $6::text[],
                             $7::bigint[], $8::bigint[])
                      AS c(id, fence, status, error, next_attempt_at, millis)
                 WHERE {guard3}",
                unfinished_sets("pending"),
            ),
            &[
                &run.0,
                &now,
                &retry.ids,
                &retry.fences,
                &retry.status,
                &retry.error,
                &retry.next_attempt_at,
                &retry.millis,
            ],
        )?;
    }
    if !failed.ids.is_empty() {
        // A failed refresh fails the refresh, not the URL: its file stays.
        apply(
            format!(
                "UPDATE jobs u SET {},
                     refresh = CASE WHEN u.refresh = 'pending' THEN 'failed' ELSE u.refresh END,
                     next_attempt_at = CASE WHEN u.refresh = 'pending' THEN 0
                                            ELSE u.next_attempt_at END
                 FROM unnest($3::bigint[], $4::bigint[], $5::integer[], $6::text[], $7::bigint[])
                      AS c(id, fence, status, error, millis)
                 WHERE {guard3}",
                unfinished_sets("failed"),
            ),
            &[
                &run.0,
                &now,
                &failed.ids,
                &failed.fences,
                &failed.status,
                &failed.error,
                &failed.millis,
            ],
        )?;
    }
    if !interrupted.ids.is_empty() {
        apply(
            format!(
                "UPDATE jobs u SET state = {UNCLAIMED}, interrupted = u.interrupted + 1,
                     updated_at = $2
                 FROM unnest($3::bigint[], $4::bigint[]) AS c(id, fence)
                 WHERE {guard3}"
            ),
            &[&run.0, &now, &interrupted.ids, &interrupted.fences],
        )?;
    }
    if !unstarted.ids.is_empty() {
        apply(
            format!(
                "UPDATE jobs u SET state = {UNCLAIMED}
                 FROM unnest($2::bigint[], $3::bigint[]) AS c(id, fence)
                 WHERE {guard2}"
            ),
            &[&run.0, &unstarted.ids, &unstarted.fences],
        )?;
    }
    Ok(recorded)
}

/// One kind of outcome as columns, for `unnest`.
#[derive(Default)]
struct Columns {
    ids: Vec<i64>,
    fences: Vec<i64>,
    status: Vec<Option<i32>>,
    bytes: Vec<i64>,
    sha256: Vec<Vec<u8>>,
    millis: Vec<i64>,
    etag: Vec<Option<String>>,
    last_modified: Vec<Option<String>>,
    error: Vec<String>,
    next_attempt_at: Vec<i64>,
}

impl Columns {
    fn key(&mut self, id: i64, lease: Lease) {
        self.ids.push(id);
        self.fences.push(lease.fence);
    }

    fn validators(&mut self, validators: &Validators) {
        self.etag.push(validators.etag.clone());
        self.last_modified.push(validators.last_modified.clone());
    }
}

/// The duration histogram's bucket of each finished attempt.
fn duration_buckets(completions: &[Completion]) -> Vec<i32> {
    completions
        .iter()
        .filter_map(|c| c.millis())
        .map(|millis| Durations::bucket(millis) as i32)
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn claim_due(
    tx: &mut Transaction<'_>,
    prepared: &Prepared,
    run: RunId,
    now: i64,
    limit: usize,
    filter: &HostFilter,
    work: Work,
    lease_ms: i64,
    from: Position,
    name: &str,
) -> Result<(Vec<Claim>, Option<Position>)> {
    // A claim of pending rows counts itself (`COUNT_CLAIMED`); one of done
    // rows for a refresh, which changes per-host counts, is left to the
    // trigger on jobs.
    let (pick, counted) = match work {
        Work::Fetch => (CLAIM_FETCH, COUNT_CLAIMED),
        Work::Refresh => (CLAIM_REFRESH, ""),
    };
    // `= ANY(ARRAY(…))` finds the picked rows and their requests; a join
    // with the pick is planned for far more rows than a batch, as a scan.
    // The rows are updated where the pick found them, by `ctid`: each is
    // locked by the pick (`FOR UPDATE`), so no other statement can give it a
    // new version before this one does, and a TID scan takes them without
    // descending the primary key again for each. Their requests are found
    // by primary key.
    let statement = prepared.get(
        tx,
        &format!(
            "{pick},
             claimed AS (
                UPDATE jobs u SET state = 'running', run_id = $1, fence = u.fence + 1,
                    lease_until = {SERVER_NOW} + $5
                FROM requests r
                WHERE u.ctid = ANY(ARRAY(SELECT ctid FROM picked))
                  AND r.id = ANY(ARRAY(SELECT id FROM picked)) AND r.id = u.id
                RETURNING u.id, r.url, r.request, r.path, u.attempts, u.bytes, u.sha256,
                    u.host, coalesce(u.refresh = 'pending', false) AS refresh, u.etag,
                    u.last_modified, u.fence, u.http_status){counted}
             SELECT id, url, request, path, attempts, bytes, sha256, host, refresh, etag,
                 last_modified, fence, (SELECT id FROM next_from), (SELECT seen FROM next_from)
             FROM claimed"
        ),
        name,
    )?;
    let rows = tx
        .query(
            &statement,
            &[
                &run.0,
                &now,
                &(limit as i64),
                &filter.skip,
                &lease_ms,
                &from.id,
                &from.seen,
            ],
        )
        .at(name)?;
    let next_from = rows.first().map(|row| Position {
        id: row.get(12),
        seen: row.get(13),
    });
    let mut claims: Vec<Claim> = rows
        .iter()
        .map(|row| Claim {
            id: row.get(0),
            url: row.get(1),
            request: row.get(2),
            path: row.get(3),
            attempts: row.get::<_, i32>(4).max(0) as u32,
            recorded: match (
                row.get::<_, Option<i64>>(5),
                row.get::<_, Option<Vec<u8>>>(6),
            ) {
                (Some(bytes), Some(sha256)) => <[u8; 32]>::try_from(sha256.as_slice())
                    .ok()
                    .map(|sha256| (bytes as u64, sha256)),
                _ => None,
            },
            host: row.get(7),
            refresh: row.get(8),
            validators: Validators {
                etag: row.get(9),
                last_modified: row.get(10),
            },
            lease: Lease {
                run,
                fence: row.get(11),
            },
        })
        .collect();
    // Import order within the batch, as the queue hands rows out.
    claims.sort_by_key(|claim| claim.id);
    Ok((claims, next_from))
}
