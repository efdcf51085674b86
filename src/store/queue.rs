//! The queue itself: importing URLs, claiming due ones for a run, and
//! recording what became of them.
//!
//! A run claims rows by setting them `running` under its id, in one
//! IMMEDIATE transaction, so two runs on one database never hold the same
//! row. Every later write is guarded by that id: a row taken back from a run
//! thought dead is not overwritten by it.

use std::collections::HashMap;

use anyhow::Result;
use rusqlite::{OptionalExtension, Transaction, params};

use super::backend::{ClaimKey, Lease, RunId};
use super::{Store, now_ms};

/// A URL claimed by a run.
#[derive(Debug, Clone)]
pub struct Claim {
    pub id: i64,
    pub url: String,
    /// The request as JSON, when it is not a plain GET.
    pub request: Option<String>,
    /// The output file, relative to the output folder.
    pub path: String,
    /// Attempts already made (and finished).
    pub attempts: u32,
    /// The host as recorded at import: host[:port], the port only when it
    /// is not the scheme's default. Politeness is kept per this key, so
    /// http and https on one name share it, as they share the server.
    pub host: String,
    /// The size and sha256 of the body last recorded as done, if any.
    pub recorded: Option<(u64, [u8; 32])>,
    /// Claimed by `jobrun refresh`: a done row whose file stays until a
    /// changed body replaces it.
    pub refresh: bool,
    /// The validators stored with the done body, sent as `If-None-Match`
    /// and `If-Modified-Since` by a refresh.
    pub validators: Validators,
    /// The run's hold on the row, which every outcome carries back.
    pub lease: Lease,
}

impl Claim {
    /// What an outcome of this claim names it by.
    pub fn key(&self) -> ClaimKey {
        ClaimKey {
            id: self.id,
            lease: self.lease,
        }
    }
}

/// A body's `ETag` and `Last-Modified`, as the server sent them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Validators {
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

/// What a run claims: rows to fetch, or done rows to refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Work {
    #[default]
    Fetch,
    Refresh,
}

/// A row's state, as far as its output file is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowState {
    /// Done: its file is the one to keep.
    Done,
    /// Held by a run, which may be writing its file right now.
    Held,
    /// Pending or failed: nobody is writing its file.
    Free,
}

/// Which due rows a claim leaves for later, so that claimed rows go to hosts
/// that can take them now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFilter {
    /// Hosts not to claim for now: paused, or with enough claimed already.
    pub skip: Vec<String>,
}

impl HostFilter {
    pub fn is_empty(&self) -> bool {
        self.skip.is_empty()
    }
}

/// How many due rows, in claim order, a filtered claim looks at: first four
/// times the rows it wants (enough to pass over a few skipped hosts' rows),
/// then more while it comes short, up to this many, so that a claim stays
/// cheap when the head of the list belongs to skipped hosts.
const FILTER_WINDOW: usize = 16_384;

/// A URL to import.
#[derive(Debug, Clone, Copy)]
pub struct NewUrl<'a> {
    pub url: &'a str,
    /// The request as JSON, when it is not a plain GET.
    pub request: Option<&'a str>,
    /// With the URL, what makes two imported lines the same job: empty for
    /// a plain GET, else a hash of the request.
    pub request_hash: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    /// The file name was given by the user, not made from the URL.
    pub named: bool,
}

/// What became of a claimed URL.
#[derive(Debug, Clone)]
pub enum Completion {
    /// The body is in its final file, and that file is durable.
    Done {
        key: ClaimKey,
        status: u16,
        bytes: u64,
        sha256: [u8; 32],
        millis: u32,
        validators: Validators,
    },
    /// A refresh found the body unchanged (a 304, or the same sha256): the
    /// file stays as it is.
    Unchanged {
        key: ClaimKey,
        status: u16,
        millis: u32,
        validators: Validators,
    },
    /// A retryable failure: back to pending until `next_attempt_at`.
    Retry {
        key: ClaimKey,
        status: Option<u16>,
        error: String,
        next_attempt_at: i64,
        millis: u32,
    },
    /// A permanent failure, or the last attempt failed.
    Failed {
        key: ClaimKey,
        status: Option<u16>,
        error: String,
        millis: u32,
    },
    /// The attempt was cut short by a shutdown: back to pending, budget kept.
    Interrupted { key: ClaimKey },
    /// Claimed but never started: back to pending, nothing recorded.
    Unstarted { key: ClaimKey },
}

impl Completion {
    /// How long the attempt took, for attempts that reached an end.
    pub fn millis(&self) -> Option<u32> {
        match *self {
            Completion::Done { millis, .. }
            | Completion::Unchanged { millis, .. }
            | Completion::Retry { millis, .. }
            | Completion::Failed { millis, .. } => Some(millis),
            Completion::Interrupted { .. } | Completion::Unstarted { .. } => None,
        }
    }

    /// For an attempt that reached an end, its HTTP status (None when no
    /// answer came: a reset, a timeout).
    pub fn answer(&self) -> Option<Option<u16>> {
        match *self {
            Completion::Done { status, .. } | Completion::Unchanged { status, .. } => {
                Some(Some(status))
            }
            Completion::Retry { status, .. } | Completion::Failed { status, .. } => Some(status),
            Completion::Interrupted { .. } | Completion::Unstarted { .. } => None,
        }
    }

    pub fn key(&self) -> ClaimKey {
        match *self {
            Completion::Done { key, .. }
            | Completion::Unchanged { key, .. }
            | Completion::Retry { key, .. }
            | Completion::Failed { key, .. }
            | Completion::Interrupted { key }
            | Completion::Unstarted { key } => key,
        }
    }

    pub fn id(&self) -> i64 {
        self.key().id
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InsertResult {
    Inserted,
    /// The same request is in the database already.
    Duplicate,
    /// The file name is taken, or clashes with a folder of another name,
    /// or the same request is there already under another name.
    NameTaken(String),
}

/// URLs being imported, committed together.
pub struct ImportBatch<'a> {
    tx: Transaction<'a>,
}

impl ImportBatch<'_> {
    /// Adds `new` unless the same request is there already. A name given
    /// by the user is checked against the others: the same file, or a file
    /// where another name needs a folder, would make two URLs share a path;
    /// and the same request under another name would be dropped as a
    /// duplicate, leaving the name the user asked for without its file.
    pub fn insert(&self, new: &NewUrl<'_>) -> Result<InsertResult> {
        if new.named {
            if let Some(existing) = self.path_of(new)? {
                if existing == new.path {
                    return Ok(InsertResult::Duplicate);
                }
                return Ok(InsertResult::NameTaken(same_request_message(
                    &existing, new.path,
                )));
            }
            if let Some(clash) = self.name_clash(new.path)? {
                return Ok(InsertResult::NameTaken(clash));
            }
        }
        let changed = self
            .tx
            .prepare_cached(
                "INSERT INTO urls (url, request, request_hash, host, path)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (url, request_hash) DO NOTHING",
            )?
            .execute(params![
                new.url,
                new.request,
                new.request_hash,
                new.host,
                new.path
            ]);
        match changed {
            Ok(1) => Ok(InsertResult::Inserted),
            Ok(_) => Ok(InsertResult::Duplicate),
            Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation) => {
                Ok(InsertResult::NameTaken(name_used_message(new.path)))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The file of the row holding the same request as `new`, if any.
    fn path_of(&self, new: &NewUrl<'_>) -> Result<Option<String>> {
        Ok(self
            .tx
            .prepare_cached("SELECT path FROM urls WHERE url = ?1 AND request_hash = ?2")?
            .query_row(params![new.url, new.request_hash], |row| row.get(0))
            .optional()?)
    }

    /// Another row whose path is a folder of `path`, or inside `path`.
    fn name_clash(&self, path: &str) -> Result<Option<String>> {
        let parts: Vec<&str> = path.split('/').collect();
        for depth in 1..parts.len() {
            let folder = parts[..depth].join("/");
            let taken: Option<i64> = self
                .tx
                .prepare_cached("SELECT id FROM urls WHERE path = ?1")?
                .query_row([&folder], |row| row.get(0))
                .optional()?;
            if taken.is_some() {
                return Ok(Some(needs_folder_message(path, &folder)));
            }
        }
        // Paths inside `path/` sort between "path/" and "path0" ('0' follows '/').
        let inside: Option<String> = self
            .tx
            .prepare_cached("SELECT path FROM urls WHERE path > ?1 AND path < ?2 LIMIT 1")?
            .query_row(params![format!("{path}/"), format!("{path}0")], |row| {
                row.get(0)
            })
            .optional()?;
        Ok(inside.map(|other| folder_of_file_message(path, &other)))
    }

    pub fn commit(self) -> Result<()> {
        Ok(self.tx.commit()?)
    }
}

/// Why a run stops when another run took its rows back.
pub(crate) fn taken_for_dead(run: i64) -> anyhow::Error {
    anyhow::anyhow!(
        "run #{run} was taken for dead by another run, which gave its URLs to others (its \
         heartbeat had not been renewed for too long); it stopped so that no URL is fetched \
         twice. Run again to carry on"
    )
}

/// A named line whose request is imported already under another name.
pub(crate) fn same_request_message(existing: &str, path: &str) -> String {
    format!(
        "the same request is already imported with the name {existing:?}, not {path:?}: one \
         request is one job and one file (drop this line, or make its request differ)"
    )
}

/// A line whose file name another URL has.
pub(crate) fn name_used_message(path: &str) -> String {
    format!("\"name\" {path:?} is already used by another URL")
}

/// A named line whose file needs a folder where another URL's file is.
pub(crate) fn needs_folder_message(path: &str, folder: &str) -> String {
    format!("\"name\" {path:?} needs a folder {folder:?}, which is another URL's file")
}

/// A named line whose file would be a folder holding another URL's file.
pub(crate) fn folder_of_file_message(path: &str, other: &str) -> String {
    format!("\"name\" {path:?} is a folder of another URL's file {other:?}")
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
        filter: &HostFilter,
        work: Work,
    ) -> Result<Vec<Claim>> {
        let now = now_ms();
        let tx = self.write_transaction()?;
        let mut tally = Tally::default();
        let mut durations = std::collections::HashMap::<i64, i64>::new();
        let mut lost = 0;
        for completion in completions {
            if !record(&tx, run, now, completion, &mut tally)? {
                lost += 1;
            }
            if let Some(millis) = completion.millis() {
                *durations.entry(duration_bucket(millis)).or_default() += 1;
            }
        }
        for (bucket, count) in durations {
            tx.prepare_cached(
                "INSERT INTO durations (bucket, count) VALUES (?1, ?2)
                 ON CONFLICT (bucket) DO UPDATE SET count = count + excluded.count",
            )?
            .execute(params![bucket, count])?;
        }
        let alive = tx
            .prepare_cached(
                "UPDATE runs SET heartbeat_at = ?2, done = done + ?3, failed = failed + ?4,
                     retried = retried + ?5, bytes = bytes + ?6
                 WHERE id = ?1 AND ended_at IS NULL",
            )?
            .execute(params![
                run,
                now,
                tally.done,
                tally.failed,
                tally.retried,
                tally.bytes
            ])?;
        count_host_answers(&tx, completions)?;
        if alive == 0 || lost > 0 {
            // Nothing of this transaction is kept: the rows are not ours.
            return Err(taken_for_dead(run));
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
    pub fn requeue_failed(&mut self, status: Option<u16>, error: Option<&str>) -> Result<usize> {
        let tx = self.write_transaction()?;
        let requeued = tx.execute(
            "UPDATE urls SET state = 'pending', attempts = 0, next_attempt_at = 0
             WHERE state = 'failed'
               AND (?1 IS NULL OR http_status = ?1)
               AND (?2 IS NULL OR instr(error, ?2) > 0)",
            params![status, error],
        )?;
        tx.commit()?;
        Ok(requeued)
    }

    /// Done rows whose files are missing or damaged go back to pending with
    /// a fresh retry budget.
    pub fn requeue_damaged(&mut self, ids: &[i64]) -> Result<()> {
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
    pub fn with_row_states<T>(
        &mut self,
        ids: &[i64],
        settle: impl FnOnce(&HashMap<i64, RowState>) -> T,
    ) -> Result<T> {
        let tx = self.write_transaction()?;
        let mut states = HashMap::with_capacity(ids.len());
        {
            let mut select = tx.prepare_cached("SELECT state FROM urls WHERE id = ?1")?;
            for &id in ids {
                let state: Option<String> = select.query_row([id], |row| row.get(0)).optional()?;
                let state = match state.as_deref() {
                    None => continue,
                    Some("done") => RowState::Done,
                    Some("running") => RowState::Held,
                    Some(_) => RowState::Free,
                };
                states.insert(id, state);
            }
        }
        let settled = settle(&states);
        tx.commit()?;
        Ok(settled)
    }

    /// The earliest time a row waiting for `work` becomes due, if any waits.
    pub fn next_due(&self, work: Work) -> Result<Option<i64>> {
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

/// Records one outcome; false when the row is no longer this run's.
fn record(
    tx: &Transaction<'_>,
    run: i64,
    now: i64,
    completion: &Completion,
    tally: &mut Tally,
) -> Result<bool> {
    // Each statement ends in the same guard: the row is still ours.
    const GUARD: &str = "WHERE id = ?1 AND run_id = ?2 AND state = 'running'";
    let id = completion.id();
    let changed = match completion {
        Completion::Done {
            key: _,
            status,
            bytes,
            sha256,
            millis,
            validators,
        } => {
            tally.done += 1;
            tally.bytes += *bytes as i64;
            tx.prepare_cached(&format!(
                "UPDATE urls SET state = 'done', attempts = attempts + 1, http_status = ?3,
                     bytes = ?4, sha256 = ?5, error = NULL, next_attempt_at = 0, updated_at = ?6,
                     duration_ms = ?7, etag = ?8, last_modified = ?9, fetched_at = ?6,
                     refresh = CASE WHEN refresh = 'pending' THEN 'changed' ELSE refresh END,
                     refresh_error = NULL
                 {GUARD}"
            ))?
            .execute(params![
                id,
                run,
                status,
                *bytes as i64,
                &sha256[..],
                now,
                millis,
                validators.etag,
                validators.last_modified
            ])?
        }
        Completion::Unchanged {
            key: _,
            status: _,
            millis,
            validators,
        } => {
            tally.done += 1;
            // A 304 may carry newer validators; it need not repeat them.
            tx.prepare_cached(&format!(
                "UPDATE urls SET state = 'done', attempts = attempts + 1, next_attempt_at = 0,
                     updated_at = ?3, duration_ms = ?4, etag = coalesce(?5, etag),
                     last_modified = coalesce(?6, last_modified), fetched_at = ?3,
                     refresh = 'unchanged', refresh_error = NULL
                 {GUARD}"
            ))?
            .execute(params![
                id,
                run,
                now,
                millis,
                validators.etag,
                validators.last_modified
            ])?
        }
        Completion::Retry {
            key: _,
            status: _,
            error,
            next_attempt_at,
            millis,
        } if refreshing(tx, id)? => {
            // The old file stays done while its refresh waits for a retry.
            tally.retried += 1;
            tx.prepare_cached(&format!(
                "UPDATE urls SET state = 'done', attempts = attempts + 1, refresh_error = ?3,
                     next_attempt_at = ?4, updated_at = ?5, duration_ms = ?6
                 {GUARD}"
            ))?
            .execute(params![id, run, error, next_attempt_at, now, millis])?
        }
        Completion::Failed {
            key: _,
            status: _,
            error,
            millis,
        } if refreshing(tx, id)? => {
            // The refresh failed, not the URL: its file and done state stay.
            tally.failed += 1;
            tx.prepare_cached(&format!(
                "UPDATE urls SET state = 'done', attempts = attempts + 1, refresh = 'failed',
                     refresh_error = ?3, next_attempt_at = 0, updated_at = ?4, duration_ms = ?5
                 {GUARD}"
            ))?
            .execute(params![id, run, error, now, millis])?
        }
        Completion::Retry {
            key: _,
            status,
            error,
            next_attempt_at,
            millis,
        } => {
            tally.retried += 1;
            tx.prepare_cached(&format!(
                "UPDATE urls SET state = 'pending', attempts = attempts + 1, http_status = ?3,
                     error = ?4, next_attempt_at = ?5, updated_at = ?6, duration_ms = ?7
                 {GUARD}"
            ))?
            .execute(params![
                id,
                run,
                status,
                error,
                next_attempt_at,
                now,
                millis
            ])?
        }
        Completion::Failed {
            key: _,
            status,
            error,
            millis,
        } => {
            tally.failed += 1;
            tx.prepare_cached(&format!(
                "UPDATE urls SET state = 'failed', attempts = attempts + 1, http_status = ?3,
                     error = ?4, updated_at = ?5, duration_ms = ?6
                 {GUARD}"
            ))?
            .execute(params![id, run, status, error, now, millis])?
        }
        Completion::Interrupted { .. } => tx
            .prepare_cached(&format!(
                "UPDATE urls SET state = {UNCLAIMED}, interrupted = interrupted + 1,
                     updated_at = ?3
                 {GUARD}"
            ))?
            .execute(params![id, run, now])?,
        Completion::Unstarted { .. } => tx
            .prepare_cached(&format!("UPDATE urls SET state = {UNCLAIMED} {GUARD}"))?
            .execute(params![id, run])?,
    };
    debug_assert!(changed <= 1);
    Ok(changed == 1)
}

/// The state a claimed row goes back to when its attempt did not finish:
/// pending, or done for a row being refreshed (its old file is still there).
pub(super) const UNCLAIMED: &str = "CASE WHEN refresh = 'pending' THEN 'done' ELSE 'pending' END";

/// Whether row `id` is being refreshed rather than fetched.
fn refreshing(tx: &Transaction<'_>, id: i64) -> Result<bool> {
    Ok(tx
        .prepare_cached("SELECT refresh = 'pending' FROM urls WHERE id = ?1")?
        .query_row([id], |row| row.get::<_, Option<bool>>(0))
        .optional()?
        .flatten()
        .unwrap_or(false))
}

/// The histogram bucket of a duration: quarter-octaves of milliseconds, so
/// that any percentile read back is within about 19% of the truth.
pub fn duration_bucket(millis: u32) -> i64 {
    (4.0 * (f64::from(millis) + 1.0).log2()).floor() as i64
}

/// The smallest duration in a bucket, in milliseconds.
pub fn bucket_floor(bucket: i64) -> f64 {
    (2f64.powf(bucket as f64 / 4.0) - 1.0).max(0.0)
}

/// Adds every finished attempt in `completions` to its host's answers, and
/// the 429s and 503s among them: one statement per commit. An attempt that
/// got no HTTP answer (a reset, a timeout) has no status.
fn count_host_answers(tx: &Transaction<'_>, completions: &[Completion]) -> Result<()> {
    let answers: Vec<(i64, Option<u16>)> = completions
        .iter()
        .filter_map(|completion| Some((completion.id(), completion.answer()?)))
        .collect();
    if answers.is_empty() {
        return Ok(());
    }
    let answers = serde_json::to_string(&answers)?;
    // WHERE true: without it SQLite would read ON CONFLICT as part of the join.
    tx.prepare_cached(
        "INSERT INTO host_answers (host, answers, status_429, status_503)
         SELECT u.host, count(*), sum(coalesce(a.value ->> 1, 0) = 429),
             sum(coalesce(a.value ->> 1, 0) = 503)
         FROM json_each(?1) AS a JOIN urls AS u ON u.id = a.value ->> 0
         WHERE true GROUP BY u.host
         ON CONFLICT (host) DO UPDATE SET answers = answers + excluded.answers,
             status_429 = status_429 + excluded.status_429,
             status_503 = status_503 + excluded.status_503",
    )?
    .execute([answers])?;
    Ok(())
}

fn claim_due(
    tx: &Transaction<'_>,
    run: i64,
    now: i64,
    limit: usize,
    filter: &HostFilter,
    work: Work,
) -> Result<Vec<Claim>> {
    // Bundled SQLite has no UPDATE ... LIMIT; the subqueries do the picking.
    // Due retries (next_attempt_at > 0) come first, so that a retry happens
    // about when its backoff ends, not after the whole list; then rows never
    // tried, in import order. Both walk the (state, next_attempt_at) index.
    const PICK_RETRIES: &str = "SELECT id FROM urls
        WHERE state = 'pending' AND next_attempt_at > 0 AND next_attempt_at <= ?2
        ORDER BY next_attempt_at DESC LIMIT ?3";
    const PICK_FRESH: &str = "SELECT id FROM urls
        WHERE state = 'pending' AND next_attempt_at = 0 ORDER BY id LIMIT ?3";
    // The same two, leaving out the hosts to skip, among the first
    // FILTER_WINDOW due rows. Only used while some host is skipped: reading
    // every row's host costs more than walking the index.
    const PICK_RETRIES_FILTERED: &str = "SELECT id FROM (
            SELECT id, host, next_attempt_at FROM urls
            WHERE state = 'pending' AND next_attempt_at > 0 AND next_attempt_at <= ?2
            ORDER BY next_attempt_at DESC LIMIT ?4)
        WHERE host NOT IN (SELECT value FROM json_each(?5))
        ORDER BY next_attempt_at DESC LIMIT ?3";
    const PICK_FRESH_FILTERED: &str = "SELECT id FROM (
            SELECT id, host FROM urls
            WHERE state = 'pending' AND next_attempt_at = 0 ORDER BY id LIMIT ?4)
        WHERE host NOT IN (SELECT value FROM json_each(?5))
        ORDER BY id LIMIT ?3";
    // Done rows a refresh asked for, due ones by when they became due
    // (rows not yet tried are due at 0), on the partial index.
    const PICK_REFRESH: &str = "SELECT id FROM urls
        WHERE refresh = 'pending' AND state = 'done' AND next_attempt_at <= ?2
        ORDER BY next_attempt_at, id LIMIT ?3";
    const PICK_REFRESH_FILTERED: &str = "SELECT id FROM (
            SELECT id, host, next_attempt_at FROM urls
            WHERE refresh = 'pending' AND state = 'done' AND next_attempt_at <= ?2
            ORDER BY next_attempt_at, id LIMIT ?4)
        WHERE host NOT IN (SELECT value FROM json_each(?5))
        ORDER BY next_attempt_at, id LIMIT ?3";
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
        let mut statement = tx.prepare_cached(&format!(
            "UPDATE urls SET state = 'running', run_id = ?1 WHERE id IN ({pick})
             RETURNING id, url, request, path, attempts, bytes, sha256, host,
                 refresh IS 'pending', etag, last_modified"
        ))?;
        let read = |row: &rusqlite::Row<'_>| {
            Ok(Claim {
                id: row.get(0)?,
                url: row.get(1)?,
                request: row.get(2)?,
                path: row.get(3)?,
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
                // One machine's runs are told apart by their id alone here.
                lease: Lease {
                    run: RunId(run),
                    fence: 0,
                },
            })
        };
        let picked = if filter.is_empty() {
            statement.query_map(params![run, now, wanted as i64], read)?
        } else {
            statement.query_map(params![run, now, wanted as i64, window, skip], read)?
        };
        for claim in picked {
            claims.push(claim?);
        }
    }
    Ok(claims)
}
