//! The state database: every URL's state, the runs that worked on it, and the
//! job's settings. All SQL lives under this module; the rest of jobrun sees a
//! narrow interface (import a batch, claim a batch, complete a batch, reclaim
//! a dead run's rows, count).
//!
//! Times are stored as unix milliseconds. The schema is built by the SQL files
//! under `migrations/`, embedded in the binary.

pub mod backend;
mod lock;
mod postgres;
mod queue;
mod refresh;
mod runs;
mod sqlite_backend;
mod summary;


use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use include_dir::{Dir, DirEntry, include_dir};
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use rusqlite_migration::Migrations;

pub use queue::{
    Claim, Completion, HostFilter, InsertResult, NewUrl, RowState, Validators, Work, bucket_floor,
};
pub use refresh::{RefreshCounts, RefreshRound};
pub use backend::{Location, OpenOptions};
pub use postgres::PostgresStore;
pub use runs::{Holder, Liveness, Reclaimed, RunEnd, RunInfo, RunStart, Started};
pub use summary::{DoneFile, ExportRow, FailedRow, StateCounts, Summary};

static ALL_MIGRATIONS: Dir = include_dir!("$CARGO_MANIFEST_DIR/migrations");

/// SQLite's migrations: the numbered folders. `postgres/` holds PostgreSQL's.
static MIGRATIONS_DIR: LazyLock<Dir<'static>> = LazyLock::new(|| {
    let entries: Vec<DirEntry<'static>> = ALL_MIGRATIONS
        .entries()
        .iter()
        .filter(|entry| entry.path() != Path::new("postgres"))
        .cloned()
        .collect();
    Dir::new("", Box::leak(entries.into_boxed_slice()))
});

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

/// How long statements wait for another's lock, as `--lock-wait` says.
pub fn lock_wait() -> Duration {
    LOCK_WAIT.get().copied().unwrap_or(DEFAULT_LOCK_WAIT)
}

/// Opens the store `location` names: a SQLite file, or a PostgreSQL
/// database shared by several machines.
pub fn open(location: &Location, options: &OpenOptions) -> Result<Box<dyn backend::Store>> {
    match location {
        Location::Sqlite(path) => {
            set_lock_wait(options.lock_wait);
            let store = Store::open(path, options.mode)?;
            if let Some(kib) = options.cache_kib {
                store
                    .conn
                    .pragma_update(None, "cache_size", -i64::from(kib))?;
            }
            Ok(Box::new(store))
        }
        Location::Postgres(url) => Ok(Box::new(PostgresStore::open(url, options)?)),
    }
}

/// Whether opening may create the database, or write to it at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    CreateIfMissing,
    MustExist,
    /// Only reads: never creates, migrates or writes anything, and works
    /// on a read-only file or filesystem.
    ReadOnly,
}

pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl Store {
    /// Opens the database at `path`, creating it (readable by its owner only)
    /// when allowed, and brings its schema up to date; `Open::ReadOnly`
    /// only reads (`open_read_only`). A file that is not a jobrun database,
    /// or one written by a newer jobrun, is refused before anything in it
    /// is changed.
    pub fn open(path: &Path, mode: Open) -> Result<Store> {
        if mode == Open::ReadOnly {
            return Store::open_read_only(path);
        }
        Store::open_for_writing(path, mode).map_err(|error| {
            if cannot_open(&error) {
                error.context(cannot_write(path))
            } else {
                error
            }
        })
    }

    fn open_for_writing(path: &Path, mode: Open) -> Result<Store> {
        let display = path.display();
        if mode == Open::MustExist && !path.exists() {
            bail!(no_database(path));
        }
        if mode == Open::CreateIfMissing {
            create_private_file(path)?;
        }
        let mut conn =
            Connection::open(path).with_context(|| format!("cannot open database {display}"))?;
        conn.busy_timeout(lock_wait())?;
        schema_version(&conn, path)?;
        // SQLite opens a file it cannot write read-only, without a word.
        if conn.is_readonly(rusqlite::MAIN_DB)? {
            bail!(cannot_write(path));
        }
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

    /// Opens the database for reading only. A file that is missing, empty or
    /// not a jobrun database is refused, and nothing is created or changed.
    /// On a read-only filesystem, where SQLite cannot create the shared
    /// memory file a WAL database needs, the file is read as immutable when
    /// no write-ahead log holds changes (nothing can write it there).
    /// A database written by an older jobrun is read as it is: a copy in
    /// memory is brought up to date, the file stays as it was, and the next
    /// `run` or `import` upgrades it.
    fn open_read_only(path: &Path) -> Result<Store> {
        let display = path.display();
        let meta = match std::fs::metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == ErrorKind::NotFound => bail!(no_database(path)),
            Err(e) => return Err(e).with_context(|| format!("cannot read database {display}")),
        };
        if !meta.is_file() {
            bail!("{display} is not a file; --db names jobrun's state database");
        }
        if meta.len() == 0 {
            bail!(
                "{display} is empty, not a jobrun database; nothing was changed. Import a URL \
                 list into it first (`jobrun --db {display} import FILE`), or point --db at \
                 an existing one"
            );
        }
        let conn = match connect_read_only(path, false) {
            Ok(conn) => conn,
            Err(error) if cannot_open(&error) && !wal_holds_changes(path) => {
                connect_read_only(path, true)?
            }
            Err(error) if cannot_open(&error) => {
                return Err(error).with_context(|| {
                    format!(
                        "cannot read {display}: its write-ahead log {display}-wal holds \
                         changes, and reading them needs {display}-shm, which cannot be \
                         created here (a read-only folder or filesystem). Copy the database \
                         with its -wal file to a writable folder and use --db there"
                    )
                });
            }
            Err(error) => return Err(error),
        };
        let conn = match schema_version(&conn, path)? {
            0 => bail!(
                "{display} holds no jobrun data (an empty SQLite database); nothing was \
                 changed. Import a URL list into it first (`jobrun --db {display} import FILE`)"
            ),
            version if version < known_version() => upgraded_copy(&conn, path)?,
            _ => conn,
        };
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
    /// the value that holds afterwards. It all happens under the write
    /// lock, so of two processes racing, one records and the other sees
    /// what it recorded. `prepare` runs only when this call records, before
    /// the commit; its error records nothing.
    pub fn setting_or_insert(
        &mut self,
        key: &str,
        value: &str,
        prepare: impl FnOnce() -> Result<()>,
    ) -> Result<String> {
        let tx = self.write_transaction()?;
        let recorded: Option<String> = tx
            .query_row("SELECT value FROM settings WHERE key = ?1", [key], |row| {
                row.get(0)
            })
            .optional()?;
        if let Some(recorded) = recorded {
            return Ok(recorded);
        }
        prepare()?;
        tx.execute(
            "INSERT INTO settings (key, value) VALUES (?1, ?2)",
            params![key, value],
        )?;
        tx.commit()?;
        Ok(value.to_string())
    }
}

fn cannot_write(path: &Path) -> String {
    format!(
        "{} cannot be written here (a read-only file, folder or filesystem?): this command \
         writes to it; report, export and verify (without --requeue) only read",
        path.display()
    )
}

fn no_database(path: &Path) -> String {
    let display = path.display();
    format!(
        "there is no database at {display}: import a URL list first \
         (`jobrun --db {display} import FILE`), or point --db at an existing one"
    )
}

/// A read-only connection, its schema read to make sure it can be read.
/// `immutable` tells SQLite that nothing writes the file while it is open.
fn connect_read_only(path: &Path, immutable: bool) -> Result<Connection> {
    use rusqlite::OpenFlags;
    let display = path.display();
    let uri = file_uri(path, if immutable { "?immutable=1" } else { "" })?;
    let conn = Connection::open_with_flags(
        &uri,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("cannot open database {display}"))?;
    conn.busy_timeout(lock_wait())?;
    conn.query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(()))
        .map_err(|e| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::NotADatabase) => not_sqlite(path),
            _ => explain_lock(e, path).context(format!("cannot read database {display}")),
        })?;
    conn.pragma_update(None, "cache_size", -2_000)?;
    Ok(conn)
}

/// `path` as a SQLite URI: `file:` and the path, with the characters that
/// mean something in a URI escaped.
fn file_uri(path: &Path, query: &str) -> Result<String> {
    let text = path
        .to_str()
        .with_context(|| format!("the database path {} is not valid UTF-8", path.display()))?;
    let mut uri = String::from("file:");
    for c in text.chars() {
        match c {
            '%' => uri.push_str("%25"),
            '?' => uri.push_str("%3f"),
            '#' => uri.push_str("%23"),
            c => uri.push(c),
        }
    }
    uri.push_str(query);
    Ok(uri)
}

/// SQLite could not open the file as asked (for reading, it cannot create
/// the -shm file beside a WAL database).
fn cannot_open(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause.downcast_ref::<rusqlite::Error>().is_some_and(|e| {
            matches!(
                e.sqlite_error_code(),
                Some(rusqlite::ErrorCode::CannotOpen | rusqlite::ErrorCode::ReadOnly)
            )
        })
    })
}

/// Whether a write-ahead log beside the database holds changes that are
/// not in the database file yet.
fn wal_holds_changes(path: &Path) -> bool {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    std::fs::metadata(wal).is_ok_and(|meta| meta.len() > 0)
}

/// A copy in memory of a database written by an older jobrun, brought up
/// to date; the file itself is not changed.
fn upgraded_copy(conn: &Connection, path: &Path) -> Result<Connection> {
    let display = path.display();
    let mut copy = Connection::open_in_memory()?;
    rusqlite::backup::Backup::new(conn, &mut copy)?
        .run_to_completion(1024, Duration::ZERO, None)
        .with_context(|| format!("cannot read database {display}"))?;
    let migrations = MIGRATIONS.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
    migrations
        .to_latest(&mut copy)
        .with_context(|| format!("cannot read {display}, written by an older jobrun"))?;
    Ok(copy)
}

/// A SQLite error, said plainly when it is another process's lock: which
/// process holds it, when /proc can tell, and what to do about it.
fn explain_lock(error: rusqlite::Error, path: &Path) -> anyhow::Error {
    // A reader gives up with SQLITE_PROTOCOL when a process stopped halfway
    // through a write keeps the log's index locked.
    if !matches!(
        error.sqlite_error_code(),
        Some(
            rusqlite::ErrorCode::DatabaseBusy
                | rusqlite::ErrorCode::DatabaseLocked
                | rusqlite::ErrorCode::FileLockingProtocolFailed
        )
    ) {
        return error.into();
    }
    let wait = humantime::format_duration(lock_wait());
    let locked = |holder: &str| {
        format!(
            "{} is locked by another process{holder}, which held its write lock for longer \
             than --lock-wait ({wait})",
            path.display()
        )
    };
    let others = "jobrun runs sharing a database take turns and never hold it that long: \
                  close the other program using it (a sqlite3 shell, a backup, a script), or \
                  wait for it, then run again";
    let message = match lock::write_lock_holder(path) {
        Some(holder) if holder.is_jobrun() => {
            let who = match run_of(path, &holder) {
                Some(run) => format!(" (jobrun run #{run}, pid {})", holder.pid),
                None => format!(" (jobrun, pid {})", holder.pid),
            };
            let what_to_do = if holder.stopped {
                format!(
                    "It is stopped (Ctrl-Z, or a debugger): let it go on (`fg`, or \
                     `kill -CONT {}`) or end it, then run again",
                    holder.pid
                )
            } else {
                "jobrun holds it for moments at a time, so that process is stuck or its \
                 disk very slow: wait for it or end it, then run again"
                    .to_string()
            };
            format!("{}. {what_to_do}", locked(&who))
        }
        Some(holder) => format!(
            "{}. {others}",
            locked(&format!(" (pid {}, {})", holder.pid, holder.program))
        ),
        None => format!("{}. {others}", locked("")),
    };
    anyhow::Error::new(error).context(message)
}

/// The unfinished run that `holder` is, if it is one.
fn run_of(path: &Path, holder: &lock::LockHolder) -> Option<i64> {
    let conn =
        Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
    conn.query_row(
        "SELECT id FROM runs WHERE ended_at IS NULL AND pid = ?1
             AND (pid_ns IS NULL OR pid_ns = ?2)
         ORDER BY id DESC LIMIT 1",
        params![holder.own_pid, holder.pid_ns.map(|ns| ns as i64)],
        |row| row.get(0),
    )
    .ok()
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

fn not_sqlite(path: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "{} is not a SQLite database (is it the right file? \
         --db names jobrun's state database)",
        path.display()
    )
}

/// The schema version of a jobrun database (0 for a new, empty one); a
/// database of another program or of a newer jobrun is refused.
fn schema_version(conn: &Connection, path: &Path) -> Result<usize> {
    let display = path.display();
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(|e| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::NotADatabase) => not_sqlite(path),
            _ => explain_lock(e, path).context(format!("cannot read database {display}")),
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
    Ok(version.max(0) as usize)
}

/// Creates an empty file readable and writable by its owner only, since URLs
/// often carry API keys. SQLite gives its -wal and -shm files the same mode.
fn create_private_file(path: &Path) -> Result<()> {
    let mut options = std::fs::OpenOptions::new();
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
        let mut store = Store::open(&dir.path().join("s.db"), Open::CreateIfMissing).unwrap();
        assert_eq!(store.setting("out_dir").unwrap(), None);
        let refused = store.setting_or_insert("out_dir", "/c", || anyhow::bail!("no"));
        assert!(refused.is_err());
        assert_eq!(store.setting("out_dir").unwrap(), None);
        assert_eq!(
            store.setting_or_insert("out_dir", "/a", || Ok(())).unwrap(),
            "/a"
        );
        let not_asked = || panic!("prepare runs only when recording");
        assert_eq!(
            store.setting_or_insert("out_dir", "/b", not_asked).unwrap(),
            "/a"
        );
    }
}
