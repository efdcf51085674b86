//! Import: a batch is one transaction. In the usual case, a batch whose
//! rows are all new, it is one statement that counts the batch and takes
//! its ids from the sequence (so that both tables get the same ones in the
//! order of the list), then a binary COPY straight into requests and
//! another into jobs: COPY writes a heap page at a time with one WAL record
//! per page, where `INSERT … SELECT` writes one per row, and needs no
//! staging table. Seven round trips in all, with BEGIN and COMMIT.
//! Otherwise the batch is copied into a temporary staging table and
//! written with one `INSERT … SELECT` into requests that also queues the
//! new ones (jobs) and counts them.
//!
//! Checking a unique index before a row goes in (`ON CONFLICT`) walks the
//! index a second time: with all three of requests' checked, that was a
//! third of the statement's time. So a batch first checks none (the COPY),
//! and a row already there stops it with an error; the batch is then
//! written again through the staging table checking the request's index
//! (`ON CONFLICT (url, request_hash) DO NOTHING`: the same request is a
//! duplicate), and, should a file name be taken (a name the user gave that
//! looks like a generated one, or one another import took meanwhile), once
//! more checking all of them.
//!
//! Lines whose result the insert alone cannot tell, named lines and the
//! unnamed lines that share a request or a file or folder with one, are
//! checked first, in the order of the batch, as SQLite's import checks
//! them: one query reads what the database already holds for all of them,
//! and the lines before each in the batch are looked up in memory.
//!
//! During `jobrun import` (`Store::expect_bulk_writes`) a batch commits
//! without waiting for its WAL to reach the disk (`synchronous_commit =
//! off`: 10 to 20 ms saved per batch of 10,000), and the import ends with
//! one commit that waits (`flush_imports`): the WAL is written in order, so
//! that wait covers every batch before it. Only a crash of the server or
//! its machine during the import can lose a batch, the last ones committed
//! (a fraction of a second's); the import then fails, and running it again
//! adds what is missing and counts the rest as duplicates. A run that
//! claims rows of such a batch commits its claim durably, which makes the
//! batch durable first. An import killed at any point (the server still
//! up) loses no committed batch and leaves no part of one:
//! tests/postgres_import.rs kills one in each statement of a batch.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ops::Bound;

use crate::store::Result;
use postgres::Transaction;
use postgres::binary_copy::BinaryCopyInWriter;
use postgres::error::SqlState;
use postgres::types::Type;

use super::{PgResult, PostgresStore};
use crate::domain::{InsertResult, NewUrl};

/// Which unique indexes an import checks before each row goes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Arbiter {
    /// None: any row already there is an error. A list's first import
    /// seldom meets one, and each index is then walked once per row.
    Nothing,
    /// The request's alone: a file name already taken is an error.
    Request,
    /// Every one: a row that would break any of them is left out.
    All,
}

impl Arbiter {
    /// What to check when this met a row already there.
    fn after_conflict(self) -> Option<Arbiter> {
        match self {
            Arbiter::Nothing => Some(Arbiter::Request),
            Arbiter::Request => Some(Arbiter::All),
            Arbiter::All => None,
        }
    }
}

impl PostgresStore {
    /// Writes the batch checking as little as the import so far allows,
    /// and again, checking more, when that met a row already there. Once
    /// it has met one, the batches after it check the request's index from
    /// the start, until one meets none: a list that repeats URLs of earlier
    /// batches, or is imported again, is likely to go on doing so, and a
    /// list imported again after an import that stopped halfway is not,
    /// past the part that import wrote.
    pub(super) fn import_batch(&mut self, batch: &[NewUrl<'_>]) -> Result<Vec<InsertResult>> {
        let name = self.name.clone();
        let name = name.as_str();
        let checked = lines_to_check(batch);
        let mut arbiter = self.import_arbiter;
        let durable = !self.bulk;
        let results: Written = {
            let mut client = self.client()?;
            loop {
                let mut tx = client.transaction().at(name)?;
                if let Some(written) = import_in(&mut tx, batch, &checked, arbiter, durable, name)?
                {
                    tx.commit().at(name)?;
                    break written;
                }
                drop(tx);
                arbiter = arbiter.after_conflict().ok_or_else(|| {
                    crate::store::Error::Invalid(format!(
                        "internal error: {name} refused an import that left out every \
                         conflicting row"
                    ))
                })?;
            }
        };
        self.import_arbiter = if results.met_rows {
            self.import_arbiter.max(arbiter)
        } else {
            Arbiter::Nothing
        };
        Ok(results.results)
    }

    /// Waits until every import batch this connection committed is on
    /// disk. A commit waits for the WAL up to its own record, but only if
    /// its transaction wrote some: this one rewrites the connection's own
    /// count of pending rows unchanged, which exists if an import batch
    /// inserted anything (else there is nothing to wait for).
    pub(super) fn flush_imports(&mut self) -> Result<()> {
        if !self.bulk {
            return Ok(());
        }
        let name = self.name.clone();
        self.client()?
            .batch_execute(
                "BEGIN;
                 SET LOCAL synchronous_commit = on;
                 UPDATE tallies SET rows = rows
                 WHERE slot = pg_backend_pid() AND state = 'pending' AND status = 0;
                 COMMIT",
            )
            .at(&name)?;
        self.bulk = false;
        Ok(())
    }
}

/// What became of a batch's lines.
struct Written {
    results: Vec<InsertResult>,
    /// Lines were left out for rows already there (not for lines before
    /// them in the batch).
    met_rows: bool,
}

/// Writes `batch` in `tx`, to commit `durable` or not; `None` when a row
/// met a unique index that `arbiter` does not check (the transaction is
/// then aborted).
fn import_in(
    tx: &mut Transaction<'_>,
    batch: &[NewUrl<'_>],
    checked: &[usize],
    arbiter: Arbiter,
    durable: bool,
    name: &str,
) -> Result<Option<Written>> {
    // A batch of new lines that needs no query first sets the commit's
    // setting in its first statement, one round trip fewer: its statements
    // are small or COPY, which the planner never compiles.
    let straight = arbiter == Arbiter::Nothing && checked.is_empty();
    if !straight {
        let commit = if durable {
            ""
        } else {
            "SET LOCAL synchronous_commit = off;"
        };
        // A batch's statements are not worth compiling, however big the
        // tables make the planner's estimates.
        tx.batch_execute(&format!("{commit} SET LOCAL jit = off"))
            .at(name)?;
    }
    let mut results = vec![InsertResult::Inserted; batch.len()];
    if !checked.is_empty() {
        let known = what_is_there(tx, batch, checked, name)?;
        check_in_order(batch, checked, known, &mut results);
    }
    let checked: HashSet<usize> = checked.iter().copied().collect();
    // With every index checked, a line whose first repeat is left out for
    // its name is inserted under its own: the insert decides.
    if arbiter != Arbiter::All {
        repeats_are_duplicates(batch, &checked, &mut results);
    }
    // The lines still `Inserted` are the ones to write.
    let chosen: Vec<usize> = (0..batch.len())
        .filter(|&at| results[at] == InsertResult::Inserted)
        .collect();
    let written = |results| Written {
        results,
        met_rows: false,
    };
    if chosen.is_empty() {
        return Ok(Some(written(results)));
    }
    if arbiter == Arbiter::Nothing {
        return Ok(copy_new(tx, batch, &chosen, durable, name)?.then(|| written(results)));
    }
    stage(tx, batch, &chosen, name)?;
    let rows = match tx.query(&queue_new(arbiter == Arbiter::All), &[]) {
        Ok(rows) => rows,
        Err(e) if arbiter != Arbiter::All && is_unique_violation(&e) => return Ok(None),
        Err(e) => return Err(e).at(name),
    };
    // A row inserted is the first chosen line with its URL, request and
    // name: the statement inserts them in order and skips the others.
    let mut lines: HashMap<(&str, &str, &str), usize> = HashMap::with_capacity(chosen.len());
    for &at in chosen.iter().rev() {
        let new = &batch[at];
        lines.insert((new.url, new.request_hash, new.path), at);
    }
    let mut inserted = vec![false; batch.len()];
    for row in &rows {
        let key = (row.get(0), row.get(1), row.get(2));
        if let Some(&at) = lines.get(&key) {
            inserted[at] = true;
        }
    }
    let mut left = Vec::new();
    for &at in &chosen {
        if inserted[at] {
            continue;
        }
        // Only the request's index was checked: the same request is there.
        if arbiter == Arbiter::Request && !checked.contains(&at) {
            results[at] = InsertResult::Duplicate;
        } else {
            left.push(at);
        }
    }
    if !left.is_empty() {
        explain_left_out(tx, batch, &left, &mut results, name)?;
    }
    Ok(Some(Written {
        results,
        met_rows: rows.len() < chosen.len(),
    }))
}

/// Marks as duplicates the unchecked lines whose request an earlier one in
/// the batch has: that one is inserted or was there already. (When no
/// index is checked, the insert would otherwise stop at them.)
fn repeats_are_duplicates(
    batch: &[NewUrl<'_>],
    checked: &HashSet<usize>,
    results: &mut [InsertResult],
) {
    let mut seen = HashSet::with_capacity(batch.len());
    for (at, new) in batch.iter().enumerate() {
        if !checked.contains(&at) && !seen.insert((new.url, new.request_hash)) {
            results[at] = InsertResult::Duplicate;
        }
    }
}

/// A row already there stopped the statement.
fn is_unique_violation(error: &postgres::Error) -> bool {
    error.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

/// Writes the lines `chosen`, none of which may be there already, straight
/// into requests and jobs with binary COPY, and counts them; `false` when
/// a row already there stopped the COPY (the transaction is then aborted).
///
/// COPY inserts rows a heap page at a time, with one WAL record per page,
/// where `INSERT … SELECT` writes one per row, and needs no staging table
/// to write and read back. The ids are taken from the identity's sequence
/// first, in the order of the batch, so that jobs gets the same ones and
/// the queue keeps the order of the list; taking them in one statement
/// keeps them in that order whatever other imports take meanwhile. The
/// counters come from the batch itself: every line is inserted, or none.
fn copy_new(
    tx: &mut Transaction<'_>,
    batch: &[NewUrl<'_>],
    chosen: &[usize],
    durable: bool,
    name: &str,
) -> Result<bool> {
    let wanted = i32::try_from(chosen.len()).map_err(|_| {
        crate::store::Error::Invalid(format!(
            "internal error: a batch of {} URLs for {name}",
            chosen.len()
        ))
    })?;
    let mut per_host: HashMap<&str, i64> = HashMap::new();
    for &at in chosen {
        *per_host.entry(batch[at].host).or_default() += 1;
    }
    let (hosts, pending): (Vec<&str>, Vec<i64>) = per_host.into_iter().unzip();
    // The identity column's sequence, named by PostgreSQL's rule. The ids
    // and the counters (every chosen line is inserted, or none) in one
    // round trip, the commit's setting with them.
    let ids: Vec<i64> = tx
        .query_one(
            "WITH counted AS (
                 INSERT INTO tallies AS t (slot, state, status, rows, bytes)
                 VALUES (pg_backend_pid(), 'pending', 0, $1, 0)
                 ON CONFLICT (slot, state, status) DO UPDATE SET rows = t.rows + excluded.rows),
             changed AS (INSERT INTO host_changes (hosts, pending) VALUES ($2, $3))
             SELECT array(SELECT nextval('requests_id_seq') FROM generate_series(1, $1)),
                    CASE WHEN $4 THEN set_config('synchronous_commit', 'off', true) END",
            &[&i64::from(wanted), &hosts, &pending, &!durable],
        )
        .at(name)?
        .get(0);
    if ids.len() != chosen.len() || ids.windows(2).any(|pair| pair[0] >= pair[1]) {
        return Err(crate::store::Error::Invalid(format!(
            "internal error: {name} gave {} ids for {} URLs, or not in ascending order",
            ids.len(),
            chosen.len()
        )));
    }
    let written = copy_rows(
        tx,
        "COPY requests (id, url, request, request_hash, host, path) FROM STDIN BINARY",
        &[
            Type::INT8,
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
        ],
        |writer| {
            for (&at, id) in chosen.iter().zip(&ids) {
                let new = &batch[at];
                writer.write(&[
                    id,
                    &new.url,
                    &new.request,
                    &new.request_hash,
                    &new.host,
                    &new.path,
                ])?;
            }
            Ok(())
        },
    );
    match written {
        Ok(_) => {}
        Err(e) if is_unique_violation(&e) => return Ok(false),
        Err(e) => return Err(e).at(name),
    }
    copy_rows(
        tx,
        "COPY jobs (id, host) FROM STDIN BINARY",
        &[Type::INT8, Type::TEXT],
        |writer| {
            for (&at, id) in chosen.iter().zip(&ids) {
                writer.write(&[id, &batch[at].host])?;
            }
            Ok(())
        },
    )
    .at(name)?;
    Ok(true)
}

/// Runs the binary COPY `statement`, its rows written by `rows`.
fn copy_rows(
    tx: &mut Transaction<'_>,
    statement: &str,
    types: &[Type],
    rows: impl FnOnce(&mut BinaryCopyInWriter<'_>) -> std::result::Result<(), postgres::Error>,
) -> std::result::Result<u64, postgres::Error> {
    let sink = tx.copy_in(statement)?;
    let mut writer = BinaryCopyInWriter::new(sink, types);
    rows(&mut writer)?;
    writer.finish()
}

/// Copies the lines `chosen` into the staging table, numbered by their
/// place in the batch.
fn stage(
    tx: &mut Transaction<'_>,
    batch: &[NewUrl<'_>],
    chosen: &[usize],
    name: &str,
) -> Result<()> {
    tx.batch_execute(
        "CREATE TEMP TABLE IF NOT EXISTS import_staging (
             ord integer, url text COLLATE \"C\", request text, request_hash text COLLATE \"C\",
             host text, path text COLLATE \"C\") ON COMMIT DELETE ROWS",
    )
    .at(name)?;
    let sink = tx
        .copy_in(
            "COPY import_staging (ord, url, request, request_hash, host, path) FROM STDIN BINARY",
        )
        .at(name)?;
    let mut writer = BinaryCopyInWriter::new(
        sink,
        &[
            Type::INT4,
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
        ],
    );
    for &at in chosen {
        let new = &batch[at];
        writer
            .write(&[
                &(at as i32),
                &new.url,
                &new.request,
                &new.request_hash,
                &new.host,
                &new.path,
            ])
            .at(name)?;
    }
    writer.finish().at(name)?;
    Ok(())
}

/// Lines left out by the insert although nothing in the batch ruled them
/// out: another import wrote their request or took their name meanwhile,
/// or (every index checked) their name was taken.
fn explain_left_out(
    tx: &mut Transaction<'_>,
    batch: &[NewUrl<'_>],
    left: &[usize],
    results: &mut [InsertResult],
    name: &str,
) -> Result<()> {
    let urls: Vec<&str> = left.iter().map(|&at| batch[at].url).collect();
    let hashes: Vec<&str> = left.iter().map(|&at| batch[at].request_hash).collect();
    let rows = tx
        .query(
            "SELECT (SELECT r.path FROM requests r
                     WHERE r.url = l.url AND r.request_hash = l.request_hash)
             FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS l(url, request_hash, n)
             ORDER BY l.n",
            &[&urls, &hashes],
        )
        .at(name)?;
    for (&at, row) in left.iter().zip(&rows) {
        let new = &batch[at];
        let existing: Option<&str> = row.get(0);
        results[at] = match existing {
            Some(existing) if new.named && existing != new.path => {
                InsertResult::same_request_named(existing, new.path)
            }
            Some(_) => InsertResult::Duplicate,
            None => InsertResult::name_used(new.path),
        };
    }
    Ok(())
}

/// The lines whose result depends on more than whether their request is
/// there: the named ones, and the unnamed ones whose request, file or
/// folder a named one shares. Indexes into `batch`, in order.
fn lines_to_check(batch: &[NewUrl<'_>]) -> Vec<usize> {
    if !batch.iter().any(|new| new.named) {
        return Vec::new();
    }
    let mut requests = HashSet::new();
    let mut paths = HashSet::new();
    let mut folders = HashSet::new();
    for new in batch.iter().filter(|new| new.named) {
        requests.insert((new.url, new.request_hash));
        paths.insert(new.path);
        folders.extend(folders_of(new.path));
    }
    (0..batch.len())
        .filter(|&at| {
            let new = &batch[at];
            new.named
                || requests.contains(&(new.url, new.request_hash))
                || paths.contains(new.path)
                || folders.contains(new.path)
                || folders_of(new.path).any(|folder| paths.contains(folder))
        })
        .collect()
}

/// The folders a file at `path` needs, outermost first.
fn folders_of(path: &str) -> impl Iterator<Item = &str> {
    path.match_indices('/').map(move |(end, _)| &path[..end])
}

/// What the database holds, before the batch, that decides a checked line.
struct Known {
    /// The name of the row with the same request.
    same_request: Option<String>,
    /// A row has the line's name.
    taken: bool,
    /// A named line's outermost folder that is a row's file.
    folder: Option<String>,
    /// A file inside a named line's path, taken as a folder.
    inside: Option<String>,
}

/// What the database holds for each of the lines `checked`, in one query.
fn what_is_there(
    tx: &mut Transaction<'_>,
    batch: &[NewUrl<'_>],
    checked: &[usize],
    name: &str,
) -> Result<Vec<Known>> {
    let urls: Vec<&str> = checked.iter().map(|&at| batch[at].url).collect();
    let hashes: Vec<&str> = checked.iter().map(|&at| batch[at].request_hash).collect();
    let paths: Vec<&str> = checked.iter().map(|&at| batch[at].path).collect();
    let named: Vec<bool> = checked.iter().map(|&at| batch[at].named).collect();
    // Paths inside `path/` sort between "path/" and "path0" ('0' follows
    // '/'); both sides compare bytewise, as `requests.path` does.
    let rows = tx
        .query(
            "SELECT
                 (SELECT r.path FROM requests r
                  WHERE r.url = l.url AND r.request_hash = l.request_hash),
                 EXISTS (SELECT 1 FROM requests r WHERE r.path = l.path),
                 CASE WHEN l.named THEN (
                     SELECT r.path FROM requests r
                     WHERE r.path = ANY (ARRAY(
                         SELECT array_to_string(p.parts[1:d], '/')
                         FROM (SELECT string_to_array(l.path, '/') AS parts) p,
                              generate_series(1, cardinality(p.parts) - 1) AS d))
                     ORDER BY length(r.path) LIMIT 1) END,
                 CASE WHEN l.named THEN (
                     SELECT r.path FROM requests r
                     WHERE r.path > l.path || '/' AND r.path < l.path || '0' LIMIT 1) END
             FROM unnest($1::text[], $2::text[], $3::text[], $4::bool[])
                  WITH ORDINALITY AS l(url, request_hash, path, named, n)
             ORDER BY l.n",
            &[&urls, &hashes, &paths, &named],
        )
        .at(name)?;
    Ok(rows
        .iter()
        .map(|row| Known {
            same_request: row.get(0),
            taken: row.get(1),
            folder: row.get(2),
            inside: row.get(3),
        })
        .collect())
}

/// Decides the lines `checked` one after the other, each against what the
/// database held and the checked lines before it that are to be inserted.
/// The lines not checked share nothing with these, so they cannot change
/// the outcome. A line to insert keeps its `Inserted`.
fn check_in_order(
    batch: &[NewUrl<'_>],
    checked: &[usize],
    known: Vec<Known>,
    results: &mut [InsertResult],
) {
    let mut earlier = Earlier::default();
    for (&at, known) in checked.iter().zip(known) {
        let new = &batch[at];
        results[at] = check_line(new, known, &earlier);
        if results[at] == InsertResult::Inserted {
            earlier
                .requests
                .insert((new.url, new.request_hash), new.path);
            earlier.paths.insert(new.path);
        }
    }
}

/// Checked lines of the batch already found to be inserted.
#[derive(Default)]
struct Earlier<'a> {
    requests: HashMap<(&'a str, &'a str), &'a str>,
    paths: BTreeSet<&'a str>,
}

/// One line, as SQLite's import checks it: the same request first, then,
/// for a name the user gave, a folder that is a file and a file that would
/// be a folder, and last the name itself.
fn check_line(new: &NewUrl<'_>, known: Known, earlier: &Earlier<'_>) -> InsertResult {
    let same_request = known
        .same_request
        .as_deref()
        .or_else(|| earlier.requests.get(&(new.url, new.request_hash)).copied());
    if let Some(existing) = same_request {
        if new.named && existing != new.path {
            return InsertResult::same_request_named(existing, new.path);
        }
        return InsertResult::Duplicate;
    }
    if new.named {
        let in_batch = folders_of(new.path).find(|folder| earlier.paths.contains(folder));
        let folder = match (known.folder.as_deref(), in_batch) {
            (Some(there), Some(here)) if here.len() < there.len() => Some(here),
            (Some(there), _) => Some(there),
            (None, here) => here,
        };
        if let Some(folder) = folder {
            return InsertResult::needs_folder(new.path, folder);
        }
        let (from, to) = (format!("{}/", new.path), format!("{}0", new.path));
        let inside = known.inside.as_deref().or_else(|| {
            earlier
                .paths
                .range::<str, _>((Bound::Excluded(from.as_str()), Bound::Excluded(to.as_str())))
                .next()
                .copied()
        });
        if let Some(other) = inside {
            return InsertResult::folder_of_file(new.path, other);
        }
    }
    if known.taken || earlier.paths.contains(new.path) {
        return InsertResult::name_used(new.path);
    }
    InsertResult::Inserted
}

/// Inserts the staged requests, in the order of the batch, leaving out
/// those that would break the request's index (`all`: any unique index);
/// queues each as pending and counts them, in one statement. Returns what
/// tells each inserted row's line.
fn queue_new(all: bool) -> String {
    let conflict = if all {
        "ON CONFLICT DO NOTHING"
    } else {
        "ON CONFLICT (url, request_hash) DO NOTHING"
    };
    format!(
        "WITH inserted AS (
             INSERT INTO requests (url, request, request_hash, host, path)
             SELECT url, request, request_hash, host, path FROM import_staging ORDER BY ord
             {conflict}
             RETURNING id, host, url, request_hash, path),
         queued AS (INSERT INTO jobs (id, host) SELECT id, host FROM inserted),
         counted AS (
             INSERT INTO tallies AS t (slot, state, status, rows, bytes)
             SELECT pg_backend_pid(), 'pending', 0, count(*), 0 FROM inserted
             HAVING count(*) > 0
             ON CONFLICT (slot, state, status) DO UPDATE SET rows = t.rows + excluded.rows),
         per_host AS (SELECT host, count(*) AS rows FROM inserted GROUP BY host),
         hosts AS (
             INSERT INTO host_changes (hosts, pending)
             SELECT array_agg(host), array_agg(rows) FROM per_host HAVING count(*) > 0)
         SELECT url, request_hash, path FROM inserted"
    )
}
