//! The queue itself: claiming due rows for a run, and
//! recording what became of them.
//!
//! A run claims rows by setting them `running` under its id, in one
//! IMMEDIATE transaction, so two runs on one database never hold the same
//! row. Every later write is guarded by that id: a row taken back from a run
//! thought dead is not overwritten by it.

use std::collections::HashMap;

use crate::store::{CallerResult, Result};
use rusqlite::{OptionalExtension, ToSql, Transaction, params};

use super::SqliteStore;
use super::compact::{FULL_URL, HOST, PathColumn};
use super::tallies::{BatchCounts, Counted};
use crate::clock::now_ms;
use crate::domain::{
    Claim, Completion, Durations, Fetched, HostFilter, JobState, Lease, RowState, RunId,
    Validators, Work,
};
use crate::store::TakenForDead;

/// How many due rows, in claim order, a filtered claim looks at: first four
/// times the rows it wants (enough to pass over a few skipped hosts' rows),
/// then more while it comes short, up to this many, so that a claim stays
/// cheap when the head of the list belongs to skipped hosts.
const FILTER_WINDOW: usize = 16_384;

impl SqliteStore {
    /// Records `completions` for `run` and claims up to `claim` due rows for
    /// it, in one transaction: one commit per tick of the run, whatever it did.
    pub(super) fn complete_and_claim(
        &mut self,
        run: RunId,
        completions: &[Completion],
        claim: usize,
        filter: &HostFilter,
        work: Work,
    ) -> Result<Vec<Claim>> {
        let now = now_ms();
        let tx = self.write_transaction()?;
        let mut tally = Tally::default();
        let mut durations = HashMap::<i64, i64>::new();
        let mut answers = HostAnswers::default();
        let mut lost = 0;
        if !completions.is_empty() {
            let mut counts = BatchCounts::begin(&tx, run.0)?;
            for completion in completions {
                match record(&tx, run, now, completion, &mut tally, &mut counts)? {
                    Some(origin) => answers.add(origin, completion),
                    None => lost += 1,
                }
                if let Some(millis) = completion.millis() {
                    *durations.entry(Durations::bucket(millis)).or_default() += 1;
                }
            }
            counts.finish(&tx)?;
        }
        for (bucket, count) in durations {
            tx.prepare_cached(
                "INSERT INTO durations (bucket, count) VALUES (?1, ?2)
                 ON CONFLICT (bucket) DO UPDATE SET count = count + excluded.count",
            )?
            .execute(params![bucket, count])?;
        }
        let alive = if completions.is_empty() {
            renew_when_old(&tx, run, now)?
        } else {
            tx.prepare_cached(
                "UPDATE runs SET heartbeat_at = ?2, done = done + ?3, failed = failed + ?4,
                     retried = retried + ?5, bytes = bytes + ?6
                 WHERE id = ?1 AND ended_at IS NULL",
            )?
            .execute(params![
                run.0,
                now,
                tally.done,
                tally.failed,
                tally.retried,
                tally.bytes
            ])? > 0
        };
        answers.record(&tx)?;
        if !alive || lost > 0 {
            // Nothing of this transaction is kept: the rows are not ours.
            return Err(TakenForDead { run }.into());
        }
        let claims = if claim > 0 {
            claim_due(&tx, run, now, claim, filter, work)?
        } else {
            Vec::new()
        };
        tx.commit()?;
        Ok(claims)
    }

    /// Failed rows (all, or those with `status`, or whose error contains
    /// `error`) go back to pending with a fresh retry budget.
    pub(super) fn requeue_failed(
        &mut self,
        status: Option<u16>,
        error: Option<&str>,
    ) -> Result<u64> {
        let tx = self.write_transaction()?;
        let requeued = tx.execute(
            "UPDATE urls SET state = 'pending', attempts = 0, next_attempt_at = 0
             WHERE state = 'failed'
               AND (?1 IS NULL OR http_status = ?1)
               AND (?2 IS NULL OR instr(error, ?2) > 0)",
            params![status, error],
        )?;
        tx.commit()?;
        Ok(requeued as u64)
    }

    /// Done rows whose files are missing or damaged go back to pending with
    /// a fresh retry budget.
    pub(super) fn requeue_damaged(&mut self, ids: &[i64]) -> Result<()> {
        let tx = self.write_transaction()?;
        for id in ids {
            tx.prepare_cached(
                "UPDATE urls SET state = 'pending', attempts = 0, next_attempt_at = 0,
                     error = 'file missing or damaged (found by verify)'
                 WHERE id = ?1 AND state = 'done'",
            )?
            .execute([id])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Runs `settle` on the states of rows `ids` while holding the write
    /// lock, so that no run claims one of them meanwhile. A row that is not
    /// there is left out.
    pub(super) fn with_row_states(
        &mut self,
        ids: &[i64],
        settle: &mut dyn FnMut(&HashMap<i64, RowState>) -> CallerResult,
    ) -> Result<()> {
        let tx = self.write_transaction()?;
        let mut states = HashMap::with_capacity(ids.len());
        {
            let mut select = tx.prepare_cached("SELECT state FROM urls WHERE id = ?1")?;
            for &id in ids {
                let state: Option<String> = select.query_row([id], |row| row.get(0)).optional()?;
                let Some(state) = state else { continue };
                let state = JobState::parse(&state).map_or(RowState::Free, RowState::from);
                states.insert(id, state);
            }
        }
        settle(&states)?;
        tx.commit()?;
        Ok(())
    }

    /// The earliest time a row waiting for `work` becomes due, if any waits.
    pub(super) fn next_due(&self, work: Work) -> Result<Option<i64>> {
        Ok(self
            .conn
            .query_row(
                match work {
                    Work::Fetch => "SELECT min(next_attempt_at) FROM urls WHERE state = 'pending'",
                    Work::Refresh => {
                        "SELECT min(next_attempt_at) FROM urls
                         WHERE refresh = 'pending' AND state = 'done'"
                    }
                },
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

/// [`UNCLAIMED`], for statements put together at compile time.
macro_rules! unclaimed {
    () => {
        "CASE WHEN refresh = 'pending' THEN 'done' ELSE 'pending' END"
    };
}

/// Records one outcome, with what it changes in the tallies, and gives the
/// row's origin; None when the row is no longer this run's.
fn record(
    tx: &Transaction<'_>,
    run: RunId,
    now: i64,
    completion: &Completion,
    tally: &mut Tally,
    counts: &mut BatchCounts,
) -> Result<Option<i64>> {
    let Lease { run: owner, fence } = completion.lease();
    if owner != run {
        return Ok(None);
    }
    let (id, run) = (completion.id(), run.0);
    // The row as it is: what the tallies count it as (the statements below
    // change it only while it is running, which counts as pending), what an
    // outcome leaves of it, and whether a refresh asked for it. Its origin
    // counts the answer for its host.
    let before = tx
        .prepare_cached(
            "SELECT origin_id, http_status, bytes, error, refresh IS 'pending'
             FROM urls WHERE id = ?1",
        )?
        .query_row([id], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, Option<i64>>(1)?,
                row.get::<_, Option<i64>>(2)?,
                row.get::<_, Option<String>>(3)?,
                row.get::<_, bool>(4)?,
            ))
        })
        .optional()?;
    let Some((origin, status_before, bytes_before, error_before, refreshing)) = before else {
        return Ok(None);
    };
    // Each statement sets its columns under the same guard: the row is still
    // ours, under the very claim this outcome is for. ?1 is the row, ?2 the
    // run, ?3 the fence; a statement's own values follow from ?4. The text
    // is put together at compile time: this runs once per URL. No RETURNING:
    // SQLite gathers what it returns in a temporary table of its own, and
    // what the row becomes is known here.
    macro_rules! guarded {
        ($sets:expr) => {
            guarded!($sets, "")
        };
        ($sets:expr, $and:expr) => {
            concat!(
                "UPDATE urls SET ",
                $sets,
                " WHERE id = ?1 AND run_id = ?2 AND fence = ?3 AND state = 'running'",
                $and
            )
        };
    }
    let update = |sql: &str, values: &[&dyn ToSql]| -> Result<bool> {
        let mut all: [&dyn ToSql; 10] = [&rusqlite::types::Null; 10];
        all[..3].copy_from_slice(&[&id, &run, &fence]);
        all[3..3 + values.len()].copy_from_slice(values);
        Ok(tx.prepare_cached(sql)?.execute(&all[..3 + values.len()])? == 1)
    };
    // What the row becomes: (state, status, error) where the outcome sets
    // them; the bytes change only with a body.
    let (recorded, state, status, bytes, error) = match completion {
        Completion::Done { fetched, .. } => {
            tally.done += 1;
            tally.bytes += fetched.bytes as i64;
            macro_rules! done {
                ($refresh:expr) => {
                    concat!(
                        "state = 'done', attempts = attempts + 1, http_status = ?4, bytes = ?5,
                         sha256 = ?6, error = NULL, next_attempt_at = 0, updated_at = ?7,
                         duration_ms = ?8, etag = ?9, last_modified = ?10, fetched_at = ?7,
                         refresh_error = NULL",
                        $refresh
                    )
                };
            }
            let values = params![
                fetched.status,
                fetched.bytes as i64,
                &fetched.sha256[..],
                now,
                fetched.millis,
                fetched.validators.etag,
                fetched.validators.last_modified
            ];
            // Setting `refresh` costs the index on it an update per row:
            // only the body a refresh asked for sets it.
            let recorded = if refreshing {
                update(
                    guarded!(done!(", refresh = 'changed'"), " AND refresh = 'pending'"),
                    values,
                )?
            } else {
                update(guarded!(done!(""), " AND refresh IS NOT 'pending'"), values)?
            };
            let (status, bytes) = (i64::from(fetched.status), fetched.bytes as i64);
            (recorded, "done", Some(status), Some(bytes), None)
        }
        Completion::Unchanged {
            millis, validators, ..
        } => {
            tally.done += 1;
            // A 304 may carry newer validators; it need not repeat them.
            let recorded = update(
                guarded!(
                    "state = 'done', attempts = attempts + 1, next_attempt_at = 0,
                 updated_at = ?4, duration_ms = ?5, etag = coalesce(?6, etag),
                 last_modified = coalesce(?7, last_modified), fetched_at = ?4,
                 refresh = 'unchanged', refresh_error = NULL"
                ),
                params![now, millis, validators.etag, validators.last_modified],
            )?;
            (recorded, "done", status_before, bytes_before, None)
        }
        Completion::Retry {
            status,
            error,
            next_attempt_at,
            millis,
            ..
        } => {
            tally.retried += 1;
            if refreshing {
                // The old file stays done while its refresh waits for a retry.
                let recorded = update(
                    guarded!(
                        "state = 'done', attempts = attempts + 1, refresh_error = ?4,
                     next_attempt_at = ?5, updated_at = ?6, duration_ms = ?7"
                    ),
                    params![error, next_attempt_at, now, millis],
                )?;
                (recorded, "done", status_before, bytes_before, None)
            } else {
                let recorded = update(
                    guarded!(
                        "state = 'pending', attempts = attempts + 1, http_status = ?4, error = ?5,
                     next_attempt_at = ?6, updated_at = ?7, duration_ms = ?8"
                    ),
                    params![status, error, next_attempt_at, now, millis],
                )?;
                let status = status.map(i64::from);
                (
                    recorded,
                    "pending",
                    status,
                    bytes_before,
                    Some(error.as_str()),
                )
            }
        }
        Completion::Failed {
            status,
            error,
            millis,
            ..
        } => {
            tally.failed += 1;
            if refreshing {
                // The refresh failed, not the URL: its file and done state stay.
                let recorded = update(
                    guarded!(
                        "state = 'done', attempts = attempts + 1, refresh = 'failed',
                     refresh_error = ?4, next_attempt_at = 0, updated_at = ?5, duration_ms = ?6"
                    ),
                    params![error, now, millis],
                )?;
                (recorded, "done", status_before, bytes_before, None)
            } else {
                let recorded = update(
                    guarded!(
                        "state = 'failed', attempts = attempts + 1, http_status = ?4, error = ?5,
                     updated_at = ?6, duration_ms = ?7"
                    ),
                    params![status, error, now, millis],
                )?;
                let status = status.map(i64::from);
                (
                    recorded,
                    "failed",
                    status,
                    bytes_before,
                    Some(error.as_str()),
                )
            }
        }
        Completion::Interrupted { .. } | Completion::Unstarted { .. } => {
            let recorded = if matches!(completion, Completion::Interrupted { .. }) {
                update(
                    guarded!(concat!(
                        "state = ",
                        unclaimed!(),
                        ", interrupted = interrupted + 1, updated_at = ?4"
                    )),
                    params![now],
                )?
            } else {
                update(guarded!(concat!("state = ", unclaimed!())), params![])?
            };
            let state = if refreshing { "done" } else { "pending" };
            let error = error_before.as_deref();
            (recorded, state, status_before, bytes_before, error)
        }
    };
    if !recorded {
        return Ok(None);
    }
    let old = Counted::of(
        origin,
        "running",
        status_before,
        None,
        error_before.as_deref(),
    );
    let new = Counted::of(origin, state, status, bytes, error);
    counts.change(id, old, new);
    Ok(Some(origin))
}

/// The state a claimed row goes back to when its attempt did not finish:
/// pending, or done for a row being refreshed (its old file is still there).
pub(super) const UNCLAIMED: &str = unclaimed!();

/// Every finished attempt of a commit, by origin, and how many were 429 or
/// 503: added to the hosts' answers with one statement per origin, not one
/// per attempt. An attempt that got no HTTP answer (a reset, a timeout)
/// counts without a status.
#[derive(Default)]
struct HostAnswers {
    /// (origin, answers, 429s, 503s); a commit's rows come from a few
    /// origins, most often one, so a list beats a map.
    by_origin: Vec<(i64, i64, i64, i64)>,
}

impl HostAnswers {
    /// Counts `completion`, recorded for a row of `origin`.
    fn add(&mut self, origin: i64, completion: &Completion) {
        let status = match *completion {
            Completion::Done {
                fetched: Fetched { status, .. },
                ..
            }
            | Completion::Unchanged { status, .. } => Some(status),
            Completion::Retry { status, .. } | Completion::Failed { status, .. } => status,
            Completion::Interrupted { .. } | Completion::Unstarted { .. } => return,
        };
        let index = match self.by_origin.iter().rposition(|entry| entry.0 == origin) {
            Some(index) => index,
            None => {
                self.by_origin.push((origin, 0, 0, 0));
                self.by_origin.len() - 1
            }
        };
        let entry = &mut self.by_origin[index];
        entry.1 += 1;
        entry.2 += i64::from(status == Some(429));
        entry.3 += i64::from(status == Some(503));
    }

    fn record(&self, tx: &Transaction<'_>) -> Result<()> {
        if self.by_origin.is_empty() {
            return Ok(());
        }
        // The WHERE also keeps SQLite from reading ON CONFLICT as part of the
        // SELECT. Origins that share a host add up in its one row.
        let mut add = tx.prepare_cached(
            "INSERT INTO host_answers (host, answers, status_429, status_503)
             SELECT host, ?2, ?3, ?4 FROM origins WHERE id = ?1
             ON CONFLICT (host) DO UPDATE SET answers = answers + excluded.answers,
                 status_429 = status_429 + excluded.status_429,
                 status_503 = status_503 + excluded.status_503",
        )?;
        for &(origin, answers, status_429, status_503) in &self.by_origin {
            add.execute(params![origin, answers, status_429, status_503])?;
        }
        Ok(())
    }
}

fn claim_due(
    tx: &Transaction<'_>,
    run: RunId,
    now: i64,
    limit: usize,
    filter: &HostFilter,
    work: Work,
) -> Result<Vec<Claim>> {
    // Bundled SQLite has no UPDATE ... LIMIT; the subqueries do the picking.
    // Due retries (next_attempt_at > 0) come first, so that a retry happens
    // about when its backoff ends, not after the whole list; then rows never
    // tried, in import order. Both walk the (state, next_attempt_at) index.
    // Every LIMIT is a CAST of its parameter: SQLite reads a bare parameter
    // in a LIMIT when it prepares the statement, and then prepares it (with
    // the triggers on urls) again each time the parameter is bound.
    const PICK_RETRIES: &str = "SELECT id FROM urls
        WHERE state = 'pending' AND next_attempt_at > 0 AND next_attempt_at <= ?2
        ORDER BY next_attempt_at DESC LIMIT CAST(?3 AS INTEGER)";
    const PICK_FRESH: &str = "SELECT id FROM urls
        WHERE state = 'pending' AND next_attempt_at = 0 ORDER BY id LIMIT CAST(?3 AS INTEGER)";
    // The same two, leaving out the hosts to skip, among the first
    // FILTER_WINDOW due rows. Only used while some host is skipped: reading
    // every row's host costs more than walking the index.
    const PICK_RETRIES_FILTERED: &str = "SELECT id FROM (
            SELECT id, origin_id, next_attempt_at FROM urls
            WHERE state = 'pending' AND next_attempt_at > 0 AND next_attempt_at <= ?2
            ORDER BY next_attempt_at DESC LIMIT CAST(?4 AS INTEGER))
        WHERE origin_id NOT IN (SELECT id FROM origins
            WHERE host IN (SELECT value FROM json_each(?5)))
        ORDER BY next_attempt_at DESC LIMIT CAST(?3 AS INTEGER)";
    const PICK_FRESH_FILTERED: &str = "SELECT id FROM (
            SELECT id, origin_id FROM urls
            WHERE state = 'pending' AND next_attempt_at = 0 ORDER BY id LIMIT CAST(?4 AS INTEGER))
        WHERE origin_id NOT IN (SELECT id FROM origins
            WHERE host IN (SELECT value FROM json_each(?5)))
        ORDER BY id LIMIT CAST(?3 AS INTEGER)";
    // Done rows a refresh asked for, due ones by when they became due
    // (rows not yet tried are due at 0), on the partial index.
    const PICK_REFRESH: &str = "SELECT id FROM urls
        WHERE refresh = 'pending' AND state = 'done' AND next_attempt_at <= ?2
        ORDER BY next_attempt_at, id LIMIT CAST(?3 AS INTEGER)";
    const PICK_REFRESH_FILTERED: &str = "SELECT id FROM (
            SELECT id, origin_id, next_attempt_at FROM urls
            WHERE refresh = 'pending' AND state = 'done' AND next_attempt_at <= ?2
            ORDER BY next_attempt_at, id LIMIT CAST(?4 AS INTEGER))
        WHERE origin_id NOT IN (SELECT id FROM origins
            WHERE host IN (SELECT value FROM json_each(?5)))
        ORDER BY next_attempt_at, id LIMIT CAST(?3 AS INTEGER)";
    let picks: &[&str] = match (work, filter.is_empty()) {
        (Work::Fetch, true) => &[PICK_RETRIES, PICK_FRESH],
        (Work::Fetch, false) => &[PICK_RETRIES_FILTERED, PICK_FRESH_FILTERED],
        (Work::Refresh, true) => &[PICK_REFRESH],
        (Work::Refresh, false) => &[PICK_REFRESH_FILTERED],
    };
    let windows: &[usize] = if filter.is_empty() {
        &[0]
    } else {
        &[4, 32, FILTER_WINDOW]
    };
    let skip = serde_json::to_string(&filter.skip)?;
    let mut claims = Vec::new();
    for (pick, &window) in picks
        .iter()
        .flat_map(|pick| windows.iter().map(move |window| (pick, window)))
    {
        let wanted = limit - claims.len();
        if wanted == 0 {
            break;
        }
        // Rows claimed by an earlier, smaller window are running now and
        // are not seen again.
        let window = (window * limit).min(FILTER_WINDOW) as i64;
        // Every claim bumps the row's fence: an outcome recorded under an
        // earlier claim of the row no longer matches it.
        let mut statement = tx.prepare_cached(&format!(
            "UPDATE urls SET state = 'running', run_id = ?1, fence = fence + 1
             WHERE id IN ({pick})
             RETURNING id, {FULL_URL}, request, path, attempts, bytes, sha256, {HOST},
                 refresh IS 'pending', etag, last_modified, fence"
        ))?;
        let read = |row: &rusqlite::Row<'_>| {
            Ok(Claim {
                id: row.get(0)?,
                lease: Lease {
                    run,
                    fence: row.get(11)?,
                },
                url: row.get(1)?,
                request: row.get(2)?,
                path: row.get::<_, PathColumn>(3)?.0,
                attempts: row.get(4)?,
                recorded: match (
                    row.get::<_, Option<i64>>(5)?,
                    row.get::<_, Option<Vec<u8>>>(6)?,
                ) {
                    (Some(bytes), Some(sha256)) => <[u8; 32]>::try_from(sha256.as_slice())
                        .ok()
                        .map(|sha256| (bytes as u64, sha256)),
                    _ => None,
                },
                host: row.get(7)?,
                refresh: row.get(8)?,
                validators: Validators {
                    etag: row.get(9)?,
                    last_modified: row.get(10)?,
                },
            })
        };
        let picked = if filter.is_empty() {
            statement.query_map(params![run.0, now, wanted as i64], read)?
        } else {
            statement.query_map(params![run.0, now, wanted as i64, window, skip], read)?
        };
        for claim in picked {
            claims.push(claim?);
        }
    }
    Ok(claims)
}

/// How old a run's recorded heartbeat grows before a commit that records
/// nothing renews it: as often as an idle run says it is alive. Other runs
/// take a run they cannot look up for dead only after `STALE_HEARTBEAT`
/// (a minute); a run that waits for others claims ten times a second, and
/// renewing it each time wrote the database as often, for nothing.
const RENEW_AFTER_MS: i64 = 5_000;

/// For a commit that records nothing: whether `run` is still unfinished.
/// Its heartbeat is renewed only once it is `RENEW_AFTER_MS` old (or ahead
/// of the clock, which may have been set back), so that such a commit
/// writes nothing.
fn renew_when_old(tx: &Transaction<'_>, run: RunId, now: i64) -> Result<bool> {
    let heartbeat: Option<i64> = tx
        .prepare_cached("SELECT heartbeat_at FROM runs WHERE id = ?1 AND ended_at IS NULL")?
        .query_row([run.0], |row| row.get(0))
        .optional()?;
    let Some(heartbeat) = heartbeat else {
        return Ok(false);
    };
    if !(0..RENEW_AFTER_MS).contains(&(now - heartbeat)) {
        tx.prepare_cached("UPDATE runs SET heartbeat_at = ?2 WHERE id = ?1")?
            .execute(params![run.0, now])?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Liveness, NewUrl};
    use crate::store::contract;
    use crate::store::{Open, OpenOptions};

    /// The host_answers table: (host, answers, 429s, 503s) by host.
    fn host_answers(store: &SqliteStore) -> Vec<(String, i64, i64, i64)> {
        let mut select = store
            .conn
            .prepare("SELECT host, answers, status_429, status_503 FROM host_answers ORDER BY host")
            .unwrap();
        select
            .query_map([], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
            })
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    #[test]
    fn every_answer_counts_for_the_host_of_its_row_over_several_commits() {
        let dir = tempfile::tempdir().unwrap();
        let options = OpenOptions::new(Open::CreateIfMissing);
        let mut store = SqliteStore::open(&dir.path().join("db"), &options).unwrap();
        // Two origins of host a (http and https) and one of host b.
        let urls = [
            ("http://a.test/1", "a.test"),
            ("https://a.test/2", "a.test"),
            ("http://a.test/3", "a.test"),
            ("http://b.test/4", "b.test"),
            ("https://a.test/5", "a.test"),
            ("http://b.test/6", "b.test"),
        ];
        let paths: Vec<String> = (0..urls.len()).map(|n| format!("{n}.json")).collect();
        let batch: Vec<NewUrl<'_>> = urls
            .iter()
            .zip(&paths)
            .map(|(&(url, host), path)| NewUrl {
                url,
                request: None,
                request_hash: "",
                host,
                path,
                named: false,
            })
            .collect();
        store.import(&batch).unwrap();
        let run = contract::start(&mut store, Liveness::Alive);
        let all = HostFilter::default();
        let claims = store
            .complete_and_claim(run, &[], urls.len(), &all, Work::Fetch)
            .unwrap();
        assert_eq!(claims.len(), urls.len());
        let done = |claim: &Claim, status| Completion::Done {
            id: claim.id,
            lease: claim.lease,
            fetched: Fetched {
                status,
                bytes: 1,
                sha256: [0; 32],
                millis: 1,
                validators: Validators::default(),
            },
        };
        let retry = |claim: &Claim, status| Completion::Retry {
            id: claim.id,
            lease: claim.lease,
            status,
            error: "again".into(),
            next_attempt_at: i64::MAX,
            millis: 1,
        };
        let failed = |claim: &Claim, status| Completion::Failed {
            id: claim.id,
            lease: claim.lease,
            status,
            error: "no".into(),
            millis: 1,
        };
        let first = [
            done(&claims[0], 200),
            retry(&claims[1], Some(429)),
            failed(&claims[3], Some(503)),
            // Cut short: not an answer.
            Completion::Interrupted {
                id: claims[5].id,
                lease: claims[5].lease,
            },
        ];
        store
            .complete_and_claim(run, &first, 0, &all, Work::Fetch)
            .unwrap();
        let again = store
            .complete_and_claim(run, &[], urls.len(), &all, Work::Fetch)
            .unwrap();
        let again: HashMap<i64, Claim> = again.into_iter().map(|c| (c.id, c)).collect();
        let second = [
            failed(&claims[2], Some(503)),
            // No HTTP answer (a reset): an answer without a status.
            retry(&claims[4], None),
            done(&again[&claims[5].id], 200),
        ];
        store
            .complete_and_claim(run, &second, 0, &all, Work::Fetch)
            .unwrap();
        assert_eq!(
            host_answers(&store),
            [("a.test".into(), 4, 1, 1), ("b.test".into(), 2, 0, 1)]
        );
    }
}
