//! Importing URLs: a batch of new rows per transaction, each checked
//! against the rows already there (the same request, a taken file name).
//!
//! Unnamed URLs go in by groups of [`GROUP`] rows per statement, not one
//! statement per row: each statement opens a cursor on the table and on
//! every one of its indexes and closes them again, work that a group does
//! once for all its rows. A group that left a row out (a request already
//! there, or a generated name that is taken) finds out which by looking
//! each row up, and the rows after it go in one by one for a while, and
//! for longer after each such group in a row, so that a list imported
//! again costs about what one statement per row does.

use std::collections::HashMap;

use crate::store::Result;
use rusqlite::{CachedStatement, OptionalExtension, Transaction, params};

use super::SqliteStore;
use super::compact::{PathColumn, StoredPath, split_url};
use super::tallies;
use crate::domain::{InsertResult, NewUrl};

/// Unnamed rows inserted by one statement (five parameters each, far
/// below SQLite's limit of 32,766).
const GROUP: usize = 64;
/// Rows inserted one by one after a group that left one out, twice as
/// many after each such group in a row: a list imported again is mostly
/// rows already there.
const SINGLE_AFTER_MISS: usize = 4 * GROUP;

/// The statement that inserts one row; a row already there is skipped.
const INSERT_ONE: &str = "INSERT INTO urls (origin_id, url, request, request_hash, path)
     VALUES (?1, ?2, ?3, ?4, ?5)
     ON CONFLICT (origin_id, url, request_hash) DO NOTHING";

/// URLs being imported, committed together.
struct ImportBatch<'a> {
    tx: &'a Transaction<'a>,
    /// The statements that insert a row, and a group of rows, prepared once
    /// for the batch.
    insert: CachedStatement<'a>,
    insert_group: CachedStatement<'a>,
    /// The largest id before the group being inserted.
    last_id: i64,
    /// Rows still to insert one by one after a group that left one out.
    single: usize,
    /// Groups in a row that left a row out.
    misses: u32,
    /// The ids of the origins seen in this batch, by prefix, then host.
    origins: HashMap<String, HashMap<String, i64>>,
    /// The last origin looked up, (prefix, host, id): lists hold long runs of
    /// URLs of one origin, and comparing is cheaper than hashing.
    last_origin: Option<(String, String, i64)>,
}

impl<'a> ImportBatch<'a> {
    fn new(tx: &'a Transaction<'a>) -> Result<ImportBatch<'a>> {
        // No ON CONFLICT target here: a row left out for its name is told
        // from a row already there by looking it up, and with every
        // conflict ignored no row can abort the statement, so that SQLite
        // keeps no statement journal for it.
        let mut group = String::from(
            "INSERT OR IGNORE INTO urls (origin_id, url, request, request_hash, path) VALUES ",
        );
        for row in 0..GROUP {
            if row > 0 {
                group.push_str(", ");
            }
            group.push_str("(?, ?, ?, ?, ?)");
        }
        Ok(ImportBatch {
            tx,
            insert: tx.prepare_cached(INSERT_ONE)?,
            insert_group: tx.prepare_cached(&group)?,
            last_id: tx.query_row("SELECT coalesce(max(id), 0) FROM urls", [], |row| {
                row.get(0)
            })?,
            single: 0,
            misses: 0,
            origins: HashMap::new(),
            last_origin: None,
        })
    }

    /// Adds the rows of `batch` that are not there already, and says what
    /// became of each, in order.
    fn insert_all(&mut self, batch: &[NewUrl<'_>]) -> Result<Vec<InsertResult>> {
        let mut results = Vec::with_capacity(batch.len());
        let mut rest = batch;
        while let Some(first) = rest.first() {
            if self.single == 0
                && let Some(group) = rest.get(..GROUP)
                && group.iter().all(|new| !new.named)
            {
                self.insert_group(group, &mut results)?;
                rest = &rest[GROUP..];
            } else {
                results.push(self.insert(first)?);
                self.single = self.single.saturating_sub(1);
                rest = &rest[1..];
            }
        }
        Ok(results)
    }

    /// Adds the unnamed rows of `group` in one statement.
    fn insert_group(
        &mut self,
        group: &[NewUrl<'_>],
        results: &mut Vec<InsertResult>,
    ) -> Result<()> {
        let mut origins = [0; GROUP];
        for (row, (new, origin)) in group.iter().zip(&mut origins).enumerate() {
            let (prefix, rest) = split_url(new.url);
            *origin = self.origin(prefix, new.host)?;
            let at = row * 5;
            self.insert_group.raw_bind_parameter(at + 1, *origin)?;
            self.insert_group.raw_bind_parameter(at + 2, rest)?;
            self.insert_group.raw_bind_parameter(at + 3, new.request)?;
            self.insert_group
                .raw_bind_parameter(at + 4, new.request_hash)?;
            self.insert_group
                .raw_bind_parameter(at + 5, StoredPath::of(new.path))?;
        }
        let inserted = self.insert_group.raw_execute();
        // Bound text is held in SQLite's small-allocation slots, which the
        // next statements need for their cursors: without them, each
        // allocation takes a lock and malloc.
        self.insert_group.clear_bindings();
        let inserted = inserted?;
        if inserted == group.len() {
            results.extend(group.iter().map(|_| InsertResult::Inserted));
            self.last_id = self.tx.last_insert_rowid();
            self.misses = 0;
            return Ok(());
        }
        // Which rows were left out: a row inserted has a new id and its own
        // file name; a row whose request has an older id, or another name,
        // was there already; one whose request is not there at all lost
        // its name to another row.
        let mut last_id = self.last_id;
        for (new, origin) in group.iter().zip(origins) {
            let found: Option<(i64, PathColumn)> = self
                .tx
                .prepare_cached(
                    "SELECT id, path FROM urls
                     WHERE origin_id = ?1 AND url = ?2 AND request_hash = ?3",
                )?
                .query_row(
                    params![origin, split_url(new.url).1, new.request_hash],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .optional()?;
            results.push(match found {
                Some((id, path)) if id > self.last_id && path.0 == new.path => {
                    last_id = last_id.max(id);
                    InsertResult::Inserted
                }
                Some(_) => InsertResult::Duplicate,
                None => InsertResult::name_used(new.path),
            });
        }
        self.last_id = last_id;
        self.single = SINGLE_AFTER_MISS << self.misses.min(8);
        self.misses += 1;
        Ok(())
    }

    /// Adds `new` unless the same request is there already. A name given
    /// by the user is checked against the others: the same file, or a file
    /// where another name needs a folder, would make two URLs share a path;
    /// and the same request under another name would be dropped as a
    /// duplicate, leaving the name the user asked for without its file.
    fn insert(&mut self, new: &NewUrl<'_>) -> Result<InsertResult> {
        if new.named {
            if let Some(existing) = self.path_of(new)? {
                if existing == new.path {
                    return Ok(InsertResult::Duplicate);
                }
                return Ok(InsertResult::same_request_named(&existing, new.path));
            }
            if let Some(clash) = self.name_clash(new.path)? {
                return Ok(clash);
            }
        }
        let (prefix, rest) = split_url(new.url);
        let origin = self.origin(prefix, new.host)?;
        let changed = self.insert.execute(params![
            origin,
            rest,
            new.request,
            new.request_hash,
            StoredPath::of(new.path)
        ]);
        match changed {
            Ok(1) => {
                self.last_id = self.tx.last_insert_rowid();
                Ok(InsertResult::Inserted)
            }
            Ok(_) => Ok(InsertResult::Duplicate),
            Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation) => {
                Ok(InsertResult::name_used(new.path))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The id of the origin of `prefix` and `host`, recorded if new.
    fn origin(&mut self, prefix: &str, host: &str) -> Result<i64> {
        if let Some((last_prefix, last_host, id)) = &self.last_origin
            && last_prefix == prefix
            && last_host == host
        {
            return Ok(*id);
        }
        let id = self.origin_by_name(prefix, host)?;
        self.last_origin = Some((prefix.to_string(), host.to_string(), id));
        Ok(id)
    }

    fn origin_by_name(&mut self, prefix: &str, host: &str) -> Result<i64> {
        if let Some(&id) = self.origins.get(prefix).and_then(|hosts| hosts.get(host)) {
            return Ok(id);
        }
        let known: Option<i64> = self
            .tx
            .prepare_cached("SELECT id FROM origins WHERE prefix = ?1 AND host = ?2")?
            .query_row(params![prefix, host], |row| row.get(0))
            .optional()?;
        let id = match known {
            Some(id) => id,
            None => {
                self.tx
                    .prepare_cached("INSERT INTO origins (prefix, host) VALUES (?1, ?2)")?
                    .execute(params![prefix, host])?;
                self.tx.last_insert_rowid()
            }
        };
        self.origins
            .entry(prefix.to_string())
            .or_default()
            .insert(host.to_string(), id);
        Ok(id)
    }

    /// The file of the row holding the same request as `new`, if any.
    fn path_of(&self, new: &NewUrl<'_>) -> Result<Option<String>> {
        let (prefix, rest) = split_url(new.url);
        Ok(self
            .tx
            .prepare_cached(
                "SELECT urls.path FROM origins JOIN urls ON urls.origin_id = origins.id
                 WHERE origins.prefix = ?1 AND origins.host = ?2
                   AND urls.url = ?3 AND urls.request_hash = ?4",
            )?
            .query_row(params![prefix, new.host, rest, new.request_hash], |row| {
                row.get::<_, PathColumn>(0)
            })
            .optional()?
            .map(|path| path.0))
    }

    /// Another row whose path is a folder of `path`, or inside `path`.
    fn name_clash(&self, path: &str) -> Result<Option<InsertResult>> {
        let parts: Vec<&str> = path.split('/').collect();
        for depth in 1..parts.len() {
            let folder = parts[..depth].join("/");
            let taken: Option<i64> = self
                .tx
                .prepare_cached("SELECT id FROM urls WHERE path = ?1")?
                .query_row([StoredPath::of(&folder)], |row| row.get(0))
                .optional()?;
            if taken.is_some() {
                return Ok(Some(InsertResult::needs_folder(path, &folder)));
            }
        }
        // Paths inside `path/` sort between "path/" and "path0" ('0' follows '/').
        // They share their first 36 characters with both bounds, so they are kept
        // in the same form as the bounds (all text, or all UUID blobs with the same
        // 16 bytes first), and text and blobs never sort among each other.
        let (first, last) = (format!("{path}/"), format!("{path}0"));
        let inside: Option<PathColumn> = self
            .tx
            .prepare_cached("SELECT path FROM urls WHERE path > ?1 AND path < ?2 LIMIT 1")?
            .query_row(
                params![StoredPath::of(&first), StoredPath::of(&last)],
                |row| row.get(0),
            )
            .optional()?;
        Ok(inside.map(|other| InsertResult::folder_of_file(path, &other.0)))
    }
}

impl SqliteStore {
    /// Inserts `batch` in one transaction, then adds its rows to the
    /// counters behind `report` in another. Once the first has committed
    /// the rows are imported, whatever becomes of the second: a fold that
    /// fails is told once, not returned as the batch's error, and the rows
    /// it leaves are counted from the table (by `report`) until a later
    /// fold, or the next command that writes, adds them.
    pub(super) fn import(&mut self, batch: &[NewUrl<'_>]) -> Result<Vec<InsertResult>> {
        let before = tallies::data_version(&self.conn)?;
        let tx = self.write_transaction()?;
        let results = ImportBatch::new(&tx)?.insert_all(batch)?;
        tx.commit()?;
        if let Err(error) = self.fold_imported(before, &tallies::Inserted::of(batch, &results))
            && !self.fold_failed
        {
            self.fold_failed = true;
            tracing::warn!(
                "{}: the URLs are imported, but the counts behind `report` could not be \
                 brought up to date ({error:#}); report counts the new rows one by one until \
                 the next jobrun command that writes to the database adds them",
                self.path.display()
            );
        }
        Ok(results)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::store::{Open, OpenOptions};

    /// What one statement per row says: a request already there is a
    /// duplicate, else a name already there is taken, else the row goes in.
    fn one_by_one(seen: &mut HashSet<(String, String)>, batch: &[NewUrl<'_>]) -> Vec<String> {
        batch
            .iter()
            .map(|new| {
                if seen.contains(&("url".into(), new.url.into())) {
                    "duplicate".to_string()
                } else if seen.contains(&("path".into(), new.path.into())) {
                    "taken".to_string()
                } else {
                    seen.insert(("url".into(), new.url.into()));
                    seen.insert(("path".into(), new.path.into()));
                    "inserted".to_string()
                }
            })
            .collect()
    }

    fn said(results: &[InsertResult]) -> Vec<String> {
        results
            .iter()
            .map(|result| match result {
                InsertResult::Inserted => "inserted".to_string(),
                InsertResult::Duplicate => "duplicate".to_string(),
                InsertResult::NameTaken(_) => "taken".to_string(),
            })
            .collect()
    }

    #[test]
    fn groups_that_leave_rows_out_say_which_as_one_statement_per_row_would() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let options = OpenOptions::new(Open::CreateIfMissing);
        let mut store = SqliteStore::open(&dir.path().join("jobrun.db"), &options).expect("open");
        let n = 8 * GROUP;
        let urls: Vec<String> = (0..n).map(|i| format!("http://a.test/{i}")).collect();
        let paths: Vec<String> = (0..2 * n).map(|i| format!("file-{i}")).collect();
        let new = |url: usize, path: usize| NewUrl {
            url: &urls[url],
            request: None,
            request_hash: "",
            host: "a.test",
            path: &paths[path],
            named: false,
        };
        let mut seen = HashSet::new();
        let mut order = Vec::new();
        // Every third URL first, then all of them: rows already there in
        // every group; a request twice within a group and across groups;
        // a generated name that is taken; then groups that go in whole.
        let first: Vec<NewUrl<'_>> = (0..n).step_by(3).map(|i| new(i, i)).collect();
        let mut second: Vec<NewUrl<'_>> = (0..n).map(|i| new(i, i)).collect();
        second[7] = new(7, 0);
        second[10] = new(5, n + 10);
        second[GROUP + 1] = new(1, n + 1);
        for batch in [first, second] {
            let expected = one_by_one(&mut seen, &batch);
            let results = store.import(&batch).expect("import");
            assert_eq!(said(&results), expected);
            order.extend(
                batch
                    .iter()
                    .zip(&expected)
                    .filter(|(_, said)| *said == "inserted")
                    .map(|(new, _)| new.url.to_string()),
            );
        }
        let mut select = store
            .conn
            .prepare(&format!(
                "SELECT {} FROM urls ORDER BY id",
                super::super::compact::FULL_URL
            ))
            .expect("prepare");
        let stored: Vec<String> = select
            .query_map([], |row| row.get(0))
            .expect("select")
            .collect::<rusqlite::Result<_>>()
            .expect("rows");
        assert_eq!(stored, order, "rows in the order of the lists");
        let counts = store.summary(0).expect("summary").counts;
        assert_eq!(counts.pending, stored.len() as u64);
        let (mark, last): (i64, i64) = store
            .conn
            .query_row(
                "SELECT id, (SELECT max(id) FROM urls) FROM tallied",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .expect("the mark");
        assert_eq!(mark, last, "every row folded into the counters");
    }
}
