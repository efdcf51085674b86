//! Import: the batch goes into a temporary staging table by binary COPY,
//! then into requests with `INSERT … SELECT … ON CONFLICT DO NOTHING` and
//! the new ones into the queue (jobs) in the same statement, a
//! run of lines at a time. A line with a name the user gave is checked on
//! its own first, as SQLite's import does, against the rows before it.

use crate::store::Result;
use postgres::Transaction;
use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::{ToSql, Type};

use super::{PgResult, PostgresStore};
use crate::domain::{InsertResult, NewUrl};

impl PostgresStore {
    pub(super) fn import_batch(&mut self, batch: &[NewUrl<'_>]) -> Result<Vec<InsertResult>> {
        let name = self.name.clone();
        let name = name.as_str();
        let mut client = self.client()?;
        let mut tx = client.transaction().at(name)?;
        // A batch's statements are not worth compiling, however big the
        // tables make the planner's estimates.
        tx.batch_execute(
            "SET LOCAL jit = off;
             CREATE TEMP TABLE IF NOT EXISTS import_staging (
                 ord integer, url text, request text, request_hash text, host text,
                 path text COLLATE \"C\") ON COMMIT DELETE ROWS",
        )
        .at(name)?;
        let sink = tx
            .copy_in("COPY import_staging (ord, url, request, request_hash, host, path) FROM STDIN BINARY")
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
        for (ord, new) in batch.iter().enumerate() {
            writer
                .write(&[
                    &(ord as i32),
                    &new.url,
                    &new.request,
                    &new.request_hash,
                    &new.host,
                    &new.path,
                ])
                .at(name)?;
        }
        writer.finish().at(name)?;
        // Temporary tables are never analyzed by themselves: without it, the
        // results below are matched to their lines by a nested loop.
        tx.batch_execute("ANALYZE import_staging").at(name)?;
        let mut results = vec![InsertResult::Duplicate; batch.len()];
        let mut start = 0;
        while start < batch.len() {
            if batch[start].named {
                results[start] = insert_named(&mut tx, &batch[start], name)?;
                start += 1;
                continue;
            }
            let end = batch[start..]
                .iter()
                .position(|new| new.named)
                .map_or(batch.len(), |n| start + n);
            insert_unnamed(&mut tx, batch, start, end, &mut results, name)?;
            start = end;
        }
        tx.commit().at(name)?;
        Ok(results)
    }
}

/// Lines `start..end`, none named, in one statement. A line not inserted
/// is a duplicate when its request is there (imported before, or earlier
/// in the run), else its generated file name is another URL's.
fn insert_unnamed(
    tx: &mut Transaction<'_>,
    batch: &[NewUrl<'_>],
    start: usize,
    end: usize,
    results: &mut [InsertResult],
    name: &str,
) -> Result<()> {
    let (first, last) = (start as i32, end as i32 - 1);
    let inserted = tx
        .query(
            &queue_new(
                "SELECT url, request, request_hash, host, path FROM import_staging
                 WHERE ord BETWEEN $1 AND $2 ORDER BY ord",
                "SELECT min(s.ord) FROM inserted i
                 JOIN import_staging s USING (url, request_hash, path)
                 WHERE s.ord BETWEEN $1 AND $2
                 GROUP BY i.url, i.request_hash, i.path",
            ),
            &[&first, &last],
        )
        .at(name)?;
    let mut taken = vec![true; end - start];
    for row in inserted {
        let ord: i32 = row.get(0);
        let at = ord as usize;
        results[at] = InsertResult::Inserted;
        taken[at - start] = false;
    }
    let left: Vec<i32> = taken
        .iter()
        .enumerate()
        .filter(|(_, left)| **left)
        .map(|(i, _)| (start + i) as i32)
        .collect();
    if left.is_empty() {
        return Ok(());
    }
    let rows = tx
        .query(
            "SELECT s.ord, EXISTS (SELECT 1 FROM requests u
                                   WHERE u.url = s.url AND u.request_hash = s.request_hash)
             FROM import_staging s WHERE s.ord = ANY($1)",
            &[&left],
        )
        .at(name)?;
    for row in rows {
        let at = row.get::<_, i32>(0) as usize;
        results[at] = if row.get(1) {
            InsertResult::Duplicate
        } else {
            InsertResult::name_used(batch[at].path)
        };
    }
    Ok(())
}

/// One line whose name the user gave, checked as SQLite's import checks it.
fn insert_named(tx: &mut Transaction<'_>, new: &NewUrl<'_>, name: &str) -> Result<InsertResult> {
    let existing = first_path(
        tx,
        "SELECT path FROM requests WHERE url = $1 AND request_hash = $2",
        &[&new.url, &new.request_hash],
        name,
    )?;
    if let Some(existing) = existing {
        if existing == new.path {
            return Ok(InsertResult::Duplicate);
        }
        return Ok(InsertResult::same_request_named(&existing, new.path));
    }
    let parts: Vec<&str> = new.path.split('/').collect();
    let folders: Vec<String> = (1..parts.len()).map(|d| parts[..d].join("/")).collect();
    if !folders.is_empty() {
        let folder = first_path(
            tx,
            "SELECT path FROM requests WHERE path = ANY($1) ORDER BY length(path) LIMIT 1",
            &[&folders],
            name,
        )?;
        if let Some(folder) = folder {
            return Ok(InsertResult::needs_folder(new.path, &folder));
        }
    }
    // Paths inside `path/` sort between "path/" and "path0" ('0' follows '/').
    let inside = first_path(
        tx,
        "SELECT path FROM requests WHERE path > $1 AND path < $2 LIMIT 1",
        &[&format!("{}/", new.path), &format!("{}0", new.path)],
        name,
    )?;
    if let Some(other) = inside {
        return Ok(InsertResult::folder_of_file(new.path, &other));
    }
    let inserted: i64 = tx
        .query_one(
            &queue_new(
                "VALUES ($1, $2, $3, $4, $5)",
                "SELECT count(*) FROM inserted",
            ),
            &[
                &new.url,
                &new.request,
                &new.request_hash,
                &new.host,
                &new.path,
            ],
        )
        .at(name)?
        .get(0);
    Ok(if inserted == 1 {
        InsertResult::Inserted
    } else {
        InsertResult::name_used(new.path)
    })
}

/// Inserts the requests `source` selects (url, request, request_hash, host,
/// path) that are not there yet, queues each as pending and counts them, in
/// one statement; `select` reads what was inserted from `inserted`.
fn queue_new(source: &str, select: &str) -> String {
    format!(
        "WITH inserted AS (
             INSERT INTO requests (url, request, request_hash, host, path) {source}
             ON CONFLICT DO NOTHING
             RETURNING id, url, request_hash, path, host),
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
         {select}"
    )
}

/// The path in the first row `query` finds, if it finds one.
fn first_path(
    tx: &mut Transaction<'_>,
    query: &str,
    params: &[&(dyn ToSql + Sync)],
    name: &str,
) -> Result<Option<String>> {
    Ok(tx.query_opt(query, params).at(name)?.map(|row| row.get(0)))
}
