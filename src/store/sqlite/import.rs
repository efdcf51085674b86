//! Importing URLs: a batch of new rows per transaction, each checked
//! against the rows already there (the same request, a taken file name).

use std::collections::HashMap;

use crate::store::Result;
use rusqlite::{CachedStatement, OptionalExtension, Transaction, params};

use super::SqliteStore;
use super::compact::{PathColumn, StoredPath, split_url};
use crate::domain::{InsertResult, NewUrl};

/// URLs being imported, committed together.
struct ImportBatch<'a> {
    tx: &'a Transaction<'a>,
    /// The statement that inserts a row, prepared once for the batch.
    insert: CachedStatement<'a>,
    /// The ids of the origins seen in this batch, by prefix, then host.
    origins: HashMap<String, HashMap<String, i64>>,
    /// The last origin looked up, (prefix, host, id): lists hold long runs of
    /// URLs of one origin, and comparing is cheaper than hashing.
    last_origin: Option<(String, String, i64)>,
}

impl<'a> ImportBatch<'a> {
    fn new(tx: &'a Transaction<'a>) -> Result<ImportBatch<'a>> {
        Ok(ImportBatch {
            tx,
            insert: tx.prepare_cached(
                "INSERT INTO urls (origin_id, url, request, request_hash, path)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (origin_id, url, request_hash) DO NOTHING",
            )?,
            origins: HashMap::new(),
            last_origin: None,
        })
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
            Ok(1) => Ok(InsertResult::Inserted),
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
    pub(super) fn import(&mut self, batch: &[NewUrl<'_>]) -> Result<Vec<InsertResult>> {
        let tx = self.write_transaction()?;
        let results = {
            let mut batch_writer = ImportBatch::new(&tx)?;
            batch
                .iter()
                .map(|new| batch_writer.insert(new))
                .collect::<Result<Vec<_>>>()?
        };
        tx.commit()?;
        Ok(results)
    }
}
