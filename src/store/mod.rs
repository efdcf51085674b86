//! The state database: every URL's state, the runs that worked on it, and the
//! job's settings. All SQL lives under this module; the rest of jobrun sees a
//! narrow interface (import a batch, claim a batch, complete a batch, reclaim
//! a dead run's rows, count).
//!
//! Times are stored as unix milliseconds. The schema is built by the SQL files
//! under `migrations/`, embedded in the binary.

mod queue;
mod runs;
mod summary;

use std::fs::OpenOptions;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use include_dir::{Dir, include_dir};
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use rusqlite_migration::Migrations;

pub use queue::{Claim, Completion, HostFilter, ImportBatch, InsertResult, NewUrl, bucket_floor};
pub use runs::{Liveness, RunEnd, RunInfo, RunStart};
pub use summary::Summary;

static MIGRATIONS_DIR: Dir = include_dir!("$CARGO_MANIFEST_DIR/migrations");

static MIGRATIONS: LazyLock<Result<Migrations<'static>, String>> =
    LazyLock::new(|| Migrations::from_directory(&MIGRATIONS_DIR).map_err(|e| e.to_string()));

/// How long a statement waits for another process's write lock, unless
/// `--lock-wait` says otherwise. jobrun's own transactions take milliseconds.
const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(30);

static LOCK_WAIT: OnceLock<Duration> = OnceLock::new();

/// Sets how long every database opened later waits for another process's
/// write lock; the first setting holds for the whole process.
pub fn set_lock_wait(wait: Duration) {
    let _ = LOCK_WAIT.set(wait);
}

fn lock_wait() -> Duration {
    LOCK_WAIT.get().copied().unwrap_or(DEFAULT_LOCK_WAIT)
}

/// Whether opening may create the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    CreateIfMissing,
    MustExist,
}

pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl Store {
    /// Opens the database at `path`, creating it (readable by its owner only)
    /// when allowed, and brings its schema up to date. A file that is not a
    /// jobrun database, or one written by a newer jobrun, is refused before
    /// anything in it is changed.
    pub fn open(path: &Path, mode: Open) -> Result<Store> {
        let display = path.display();
        if mode == Open::MustExist && !path.exists() {
            bail!(
                "there is no database at {display}: import a URL list first \
                 (`jobrun --db {display} import FILE`), or point --db at an existing one"
            );
        }
        if mode == Open::CreateIfMissing {
            create_private_file(path)?;
        }
        let mut conn =
            Connection::open(path).with_context(|| format!("cannot open database {display}"))?;
        conn.busy_timeout(lock_wait())?;
        check_schema_version(&conn, path)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| explain_lock(e, path))
            .with_context(|| format!("cannot switch {display} to WAL mode"))?;
        // Safe with WAL because a file is durable before the commit that marks
        // it done: a commit lost in a power cut only costs a re-fetch.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // 2 MB, SQLite's default. Claims and commits walk the table and the
        // state index in order, and report reads it once; a bigger cache
        // bought no speed, only memory that grew with the database (16 MB
        // more at a million URLs than at ten thousand).
        conn.pragma_update(None, "cache_size", -2_000)?;
        let migrations = MIGRATIONS.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
        migrations
            .to_latest(&mut conn)
            .with_context(|| format!("cannot bring {display} up to date"))?;
        Ok(Store {
            conn,
            path: path.to_path_buf(),
        })
    }

    /// Begins a transaction that holds the write lock from its start, so it
    /// cannot fail halfway for want of it. Waits for another process's lock
    /// for the lock wait at most.
    pub(super) fn write_transaction(&mut self) -> Result<Transaction<'_>> {
        self.conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| explain_lock(e, &self.path))
    }

    /// For a connection that writes a lot: the write-ahead log may grow to
    /// 64 MB before SQLite copies it into the database, not 4 MB. Each copy
    /// ends with two fsyncs; at 4 MB they took a third of a million-URL
    /// import. The last connection to close copies and removes the log.
    /// The page cache is 32 MB instead of 2: a million-URL import took
    /// 4.56 s instead of 4.97 s (medians of five), at 46 MB instead of 10.
    pub fn expect_bulk_writes(&self) -> Result<()> {
        self.conn
            .pragma_update(None, "wal_autocheckpoint", 16_384)?;
        // New URLs land all over the URL index; a bigger cache keeps its
        // pages from being read and written again and again.
        self.conn.pragma_update(None, "cache_size", -32_000)?;
        Ok(())
    }

    pub fn setting(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT value FROM settings WHERE key = ?1", [key], |row| {
                row.get(0)
            })
            .optional()?)
    }

    /// Records `value` under `key` unless a value is there already; returns
    /// the value that holds afterwards.
    pub fn setting_or_insert(&self, key: &str, value: &str) -> Result<String> {
        self.conn
            .execute(
                "INSERT INTO settings (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO NOTHING",
                params![key, value],
            )
            .map_err(|e| explain_lock(e, &self.path))?;
        Ok(self.setting(key)?.unwrap_or_else(|| value.to_string()))
    }
}

/// A SQLite error, said plainly when it is another process's lock.
fn explain_lock(error: rusqlite::Error, path: &Path) -> anyhow::Error {
    if !matches!(
        error.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    ) {
        return error.into();
    }
    anyhow::Error::new(error).context(format!(
        "{} is locked by another process, which held its write lock for longer than \
         --lock-wait ({}). jobrun runs sharing a database take turns and never hold it that \
         long: close the other program using it (a sqlite3 shell, a backup, a script), or wait \
         for it, then run again",
        path.display(),
        humantime::format_duration(lock_wait())
    ))
}

/// What to do about a database error that means the file is damaged.
pub fn damage_hint(error: &anyhow::Error, path: &Path) -> Option<String> {
    let damaged = error.chain().any(|cause| {
        cause.downcast_ref::<rusqlite::Error>().is_some_and(|e| {
            matches!(
                e.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
            )
        })
    });
    damaged.then(|| {
        let db = path.display();
        format!(
            "{db} is damaged. Restore it from a backup, or save what can be read with \
             `sqlite3 {db} .recover | sqlite3 recovered.db` and use --db recovered.db. \
             The files already in the output folder are not affected"
        )
    })
}

/// The number of migrations this build knows.
fn known_version() -> usize {
    MIGRATIONS_DIR.dirs().count()
}

fn check_schema_version(conn: &Connection, path: &Path) -> Result<()> {
    let display = path.display();
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(|e| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::NotADatabase) => anyhow::anyhow!(
                "{display} is not a SQLite database (is it the right file? \
                 --db names jobrun's state database)"
            ),
            _ => anyhow::Error::new(e).context(format!("cannot read database {display}")),
        })?;
    if version as usize > known_version() {
        bail!(
            "{display} was written by a newer jobrun (schema version {version}; this one knows \
             up to {}). Use that jobrun or a newer one; nothing was changed",
            known_version()
        );
    }
    if version == 0 {
        let tables: i64 = conn.query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table'",
            [],
            |row| row.get(0),
        )?;
        if tables > 0 {
            bail!(
                "{display} is a SQLite database, but not jobrun's; nothing was changed. \
                 Point --db at a new file"
            );
        }
    }
    Ok(())
}

/// Creates an empty file readable and writable by its owner only, since URLs
/// often carry API keys. SQLite gives its -wal and -shm files the same mode.
fn create_private_file(path: &Path) -> Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot create database {}", path.display())),
    }
}

pub fn unix_ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub fn now_ms() -> i64 {
    unix_ms(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_valid() {
        let migrations = MIGRATIONS.as_ref().unwrap();
        migrations.validate().unwrap();
        assert!(known_version() >= 1);
    }

    #[test]
    fn a_foreign_sqlite_file_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("other.db");
        Connection::open(&path)
            .unwrap()
            .execute("CREATE TABLE t (x)", [])
            .unwrap();
        let err = Store::open(&path, Open::MustExist)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("not jobrun's"), "{err}");
        let conn = Connection::open(&path).unwrap();
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "delete");
    }

    #[test]
    fn settings_keep_their_first_value() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db"), Open::CreateIfMissing).unwrap();
        assert_eq!(store.setting("out_dir").unwrap(), None);
        assert_eq!(store.setting_or_insert("out_dir", "/a").unwrap(), "/a");
        assert_eq!(store.setting_or_insert("out_dir", "/b").unwrap(), "/a");
    }
}
