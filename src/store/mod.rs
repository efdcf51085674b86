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
use std::path::Path;
use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use include_dir::{Dir, include_dir};
use rusqlite::{Connection, OptionalExtension, params};
use rusqlite_migration::Migrations;

pub use queue::{Claim, Completion, InsertResult};
pub use runs::{Liveness, RunEnd, RunInfo, RunStart};
pub use summary::Summary;

static MIGRATIONS_DIR: Dir = include_dir!("$CARGO_MANIFEST_DIR/migrations");

static MIGRATIONS: LazyLock<Result<Migrations<'static>, String>> =
    LazyLock::new(|| Migrations::from_directory(&MIGRATIONS_DIR).map_err(|e| e.to_string()));

/// How long a statement waits for another process's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether opening may create the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    CreateIfMissing,
    MustExist,
}

pub struct Store {
    conn: Connection,
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
        conn.busy_timeout(BUSY_TIMEOUT)?;
        check_schema_version(&conn, path)?;
        conn.pragma_update(None, "journal_mode", "WAL")
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
        Ok(Store { conn })
    }

    /// For a connection that writes a lot: the write-ahead log may grow to
    /// 64 MB before SQLite copies it into the database, not 4 MB. Each copy
    /// ends with two fsyncs; at 4 MB they took a third of a million-URL
    /// import. The last connection to close copies and removes the log.
    pub fn expect_bulk_writes(&self) -> Result<()> {
        self.conn
            .pragma_update(None, "wal_autocheckpoint", 16_384)?;
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
        self.conn.execute(
            "INSERT INTO settings (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO NOTHING",
            params![key, value],
        )?;
        Ok(self.setting(key)?.unwrap_or_else(|| value.to_string()))
    }
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
