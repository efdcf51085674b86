//! The SQLite backend: one database file, the embedded default. Opening
//! it (creating, migrating, read-only access and the messages when it
//! cannot be), then one file per part of the interface: the queue, the
//! run registry, refresh rounds, the read models, and who holds the lock;
//! and how a row is kept small.
//!
//! Times are stored as unix milliseconds. The schema is built by the SQL files
//! under `migrations/`, embedded in the binary.

mod compact;
mod import;
mod lock;
mod queue;
mod refresh;
mod runs;
mod summary;
mod tallies;

use std::collections::HashMap;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::time::Duration;

use crate::store::{CallerResult, Context, Error, Result};
use include_dir::{Dir, DirEntry, include_dir};
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use rusqlite_migration::Migrations;

use super::{Open, OpenOptions, Store};
use crate::domain::{
    Claim, Completion, DoneFile, ExportRow, FailedRow, Holder, HostFilter, InsertResult, Liveness,
    NewUrl, Reclaimed, RefreshCounts, RefreshRound, RowState, RunEnd, RunId, RunInfo, RunStart,
    Started, StateCounts, Summary, Work,
};

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

/// 2 MB, SQLite's default. Claims and commits walk the table and the
/// state index in order, and report reads it once; a bigger cache buys
/// no speed, only memory that grows with the database.
const DEFAULT_CACHE_KIB: u32 = 2_000;

/// The page cache of an import, in KiB.
const IMPORT_CACHE_KIB: i64 = 24_000;

/// A jobrun database in one SQLite file.
pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
    /// How long a statement waits for another process's write lock.
    lock_wait: Duration,
    /// An import's fold of its rows into the counters failed once already.
    fold_failed: bool,
}

impl SqliteStore {
    /// Opens the database at `path`, creating it (readable by its owner only)
    /// when allowed, and brings its schema up to date; `Open::ReadOnly`
    /// only reads (`open_read_only`). A file that is not a jobrun database,
    /// or one written by a newer jobrun, is refused before anything in it
    /// is changed.
    pub fn open(path: &Path, options: &OpenOptions) -> Result<SqliteStore> {
        if options.mode == Open::ReadOnly {
            return SqliteStore::open_read_only(path, options);
        }
        SqliteStore::open_for_writing(path, options).map_err(|error| {
            match (cannot_open(&error), few_descriptors()) {
                // SQLite says no more than that it could not open a file:
                // under a low limit, that is the likely cause.
                (true, Some(limit)) => error.context(format!(
                    "cannot open {} and its -wal and -shm files: this process may open only \
                     {limit} files (ulimit -n); raise the limit, then run again",
                    path.display()
                )),
                (true, None) => error.context(cannot_write(path)),
                (false, _) => error,
            }
        })
    }

    fn open_for_writing(path: &Path, options: &OpenOptions) -> Result<SqliteStore> {
        let (mode, wait) = (options.mode, options.lock_wait);
        let display = path.display();
        match std::fs::metadata(path) {
            Ok(meta) if !meta.is_file() => return Err(Error::Refused(not_a_file(path, &meta))),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound && mode == Open::MustExist => {
                return Err(Error::Refused(no_database(path)));
            }
            // Creating it, or opening it, says more.
            Err(_) => {}
        }
        if mode == Open::CreateIfMissing {
            create_private_file(path)?;
        }
        let mut conn =
            Connection::open(path).with_context(|| format!("cannot open database {display}"))?;
        conn.busy_timeout(wait)?;
        schema_version(&conn, path, wait)?;
        // SQLite opens a file it cannot write read-only, without a word.
        if conn.is_readonly(rusqlite::MAIN_DB)? {
            return Err(Error::Invalid(cannot_write(path)));
        }
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| explain_lock(e, path, wait))
            .with_context(|| format!("cannot switch {display} to WAL mode"))?;
        // Safe with WAL because a file is durable before the commit that marks
        // it done: a commit lost in a power cut only costs a re-fetch.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        set_cache(&conn, options)?;
        let migrations = MIGRATIONS.as_ref().map_err(|e| Error::Invalid(e.clone()))?;
        migrations
            .to_latest(&mut conn)
            .with_context(|| format!("cannot bring {display} up to date"))?;
        let mut store = SqliteStore {
            conn,
            path: path.to_path_buf(),
            lock_wait: wait,
            fold_failed: false,
        };
        store.fold_left_rows()?;
        Ok(store)
    }

    /// Opens the database for reading only. A file that is missing, empty or
    /// not a jobrun database is refused, and nothing is created or changed.
    /// On a read-only filesystem, where SQLite cannot create the shared
    /// memory file a WAL database needs, the file is read as immutable when
    /// no write-ahead log holds changes (nothing can write it there).
    /// A database written by an older jobrun is read as it is: a temporary
    /// copy is brought up to date, the file stays as it was, and the next
    /// `run` or `import` upgrades it.
    fn open_read_only(path: &Path, options: &OpenOptions) -> Result<SqliteStore> {
        let display = path.display();
        let meta = match std::fs::metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(Error::Refused(no_database(path)));
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read database {display}")),
        };
        if !meta.is_file() {
            return Err(Error::Refused(not_a_file(path, &meta)));
        }
        if meta.len() == 0 {
            return Err(Error::Refused(format!(
                "{display} is empty, not a jobrun database; nothing was changed. Import a URL \
                 list into it first (`jobrun --db {display} import FILE`), or point --db at \
                 an existing one"
            )));
        }
        let conn = match connect_read_only(path, false, options) {
            Ok(conn) => conn,
            Err(error) if cannot_open(&error) && !wal_holds_changes(path) => {
                connect_read_only(path, true, options)?
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
        let conn = match schema_version(&conn, path, options.lock_wait)? {
            0 => {
                return Err(Error::Refused(format!(
                    "{display} holds no jobrun data (an empty SQLite database); nothing was \
                     changed. Import a URL list into it first (`jobrun --db {display} import \
                     FILE`)"
                )));
            }
            version if version < known_version() => upgraded_copy(&conn, path, options)?,
            _ => conn,
        };
        Ok(SqliteStore {
            conn,
            path: path.to_path_buf(),
            lock_wait: options.lock_wait,
            fold_failed: false,
        })
    }

    /// Begins a transaction that holds the write lock from its start, so it
    /// cannot fail halfway for want of it. Waits for another process's lock
    /// for the lock wait at most.
    pub(super) fn write_transaction(&mut self) -> Result<Transaction<'_>> {
        self.conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| explain_lock(e, &self.path, self.lock_wait))
    }

    /// For a connection that writes a lot: the write-ahead log may grow to
    /// 64 MB before SQLite copies it into the database, not 4 MB, because
    /// each copy ends with two fsyncs and small copies spend much of an
    /// import on them. The last connection to close copies and removes the
    /// log. The page cache is 24 MB instead of 2, which makes a large import
    /// faster for a bounded amount of memory.
    fn expect_bulk_writes(&self) -> Result<()> {
        self.conn
            .pragma_update(None, "wal_autocheckpoint", 16_384)?;
        // New URLs land all over the URL index; a bigger cache keeps its
        // pages from being read again and again. It is most of an import's
        // memory: past 24 MB a list in random order saves little system
        // time, and a list in order nothing.
        self.conn
            .pragma_update(None, "cache_size", -IMPORT_CACHE_KIB)?;
        Ok(())
    }
}

/// The interface, each method in the file of its part.
impl Store for SqliteStore {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn import(&mut self, batch: &[NewUrl<'_>]) -> Result<Vec<InsertResult>> {
        SqliteStore::import(self, batch)
    }

    fn expect_bulk_writes(&mut self) -> Result<()> {
        SqliteStore::expect_bulk_writes(self)
    }

    fn finish_bulk_writes(&mut self) -> Result<()> {
        Ok(())
    }

    fn start_run(
        &mut self,
        me: &RunStart,
        liveness: &dyn Fn(&RunInfo) -> Liveness,
    ) -> Result<Started> {
        SqliteStore::start_run(self, me, liveness)
    }

    fn reclaim_dead_runs(&mut self, liveness: &dyn Fn(&RunInfo) -> Liveness) -> Result<Reclaimed> {
        SqliteStore::reclaim_dead_runs(self, liveness)
    }

    fn held_by_others(&self, run: RunId) -> Result<Vec<Holder>> {
        SqliteStore::held_by_others(self, run)
    }

    fn heartbeat(&mut self, run: RunId) -> Result<()> {
        SqliteStore::heartbeat(self, run)
    }

    fn end_run(&mut self, run: RunId, end: &RunEnd) -> Result<()> {
        SqliteStore::end_run(self, run, end)
    }

    fn recent_runs(&self, limit: usize) -> Result<Vec<RunInfo>> {
        SqliteStore::recent_runs(self, limit)
    }

    fn complete_and_claim(
        &mut self,
        run: RunId,
        completions: &[Completion],
        claim: usize,
        filter: &HostFilter,
        work: Work,
    ) -> Result<Vec<Claim>> {
        SqliteStore::complete_and_claim(self, run, completions, claim, filter, work)
    }

    fn next_due(&self, work: Work) -> Result<Option<i64>> {
        SqliteStore::next_due(self, work)
    }

    fn with_row_states(
        &mut self,
        ids: &[i64],
        settle: &mut dyn FnMut(&HashMap<i64, RowState>) -> CallerResult,
    ) -> Result<()> {
        SqliteStore::with_row_states(self, ids, settle)
    }

    fn requeue_failed(&mut self, status: Option<u16>, error: Option<&str>) -> Result<u64> {
        SqliteStore::requeue_failed(self, status, error)
    }

    fn requeue_damaged(&mut self, ids: &[i64]) -> Result<()> {
        SqliteStore::requeue_damaged(self, ids)
    }

    fn start_refresh(&mut self, cutoff: Option<i64>) -> Result<RefreshRound> {
        SqliteStore::start_refresh(self, cutoff)
    }

    fn setting(&self, key: &str) -> Result<Option<String>> {
        read_setting(&self.conn, key)
    }

    /// Records `value` under `key` unless a value is there already; returns
    /// the value that holds afterwards. It all happens under the write
    /// lock, so of two processes racing, one records and the other sees
    /// what it recorded. `prepare` runs only when this call records, before
    /// the commit; its error records nothing.
    fn setting_or_insert(
        &mut self,
        key: &str,
        value: &str,
        prepare: &mut dyn FnMut() -> CallerResult,
    ) -> Result<String> {
        let tx = self.write_transaction()?;
        if let Some(recorded) = read_setting(&tx, key)? {
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

    fn state_counts(&self) -> Result<StateCounts> {
        SqliteStore::state_counts(self)
    }

    fn retry_schedule(&self, now: i64) -> Result<Vec<(i64, u64)>> {
        SqliteStore::retry_schedule(self, now)
    }

    fn summary(&self, top_errors: usize) -> Result<Summary> {
        SqliteStore::summary(self, top_errors)
    }

    fn refresh_counts(&self) -> Result<Option<RefreshCounts>> {
        SqliteStore::refresh_counts(self)
    }

    fn done_files(&self, each: &mut dyn FnMut(DoneFile) -> CallerResult) -> Result<()> {
        SqliteStore::done_files(self, each)
    }

    fn failed(&self, each: &mut dyn FnMut(FailedRow) -> CallerResult) -> Result<()> {
        SqliteStore::failed(self, each)
    }

    fn export(&self, each: &mut dyn FnMut(ExportRow) -> CallerResult) -> Result<()> {
        SqliteStore::export(self, each)
    }
}

fn cannot_write(path: &Path) -> String {
    format!(
        "{} cannot be written here (a read-only file, folder or filesystem?): this command \
         writes to it; report, export and verify (without --requeue) only read",
        path.display()
    )
}

/// What `path` is when it is not a file, and what to do.
fn not_a_file(path: &Path, meta: &std::fs::Metadata) -> String {
    use std::os::unix::fs::FileTypeExt;
    let kind = meta.file_type();
    let what = if kind.is_dir() {
        "a folder"
    } else if kind.is_fifo() {
        "a FIFO (named pipe)"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() || kind.is_block_device() {
        "a device"
    } else {
        "not a regular file"
    };
    format!(
        "{} is {what}; nothing was changed. --db names jobrun's state database, which is a \
         file: point it at one",
        path.display()
    )
}

/// The limit on this process's open files when it is so low that opening
/// the database and its side files may be what it stops.
fn few_descriptors() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the rlimit it is given.
    let read = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (read == 0 && limit.rlim_cur < 16).then_some(limit.rlim_cur)
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
fn connect_read_only(path: &Path, immutable: bool, options: &OpenOptions) -> Result<Connection> {
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
    conn.busy_timeout(options.lock_wait)?;
    conn.query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(()))
        .map_err(|e| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::NotADatabase) => not_sqlite(path),
            _ => explain_lock(e, path, options.lock_wait)
                .context(format!("cannot read database {display}")),
        })?;
    set_cache(&conn, options)?;
    Ok(conn)
}

/// The page cache `options` ask for, or the default.
fn set_cache(conn: &Connection, options: &OpenOptions) -> Result<()> {
    let kib = options.cache_kib.unwrap_or(DEFAULT_CACHE_KIB);
    // A negative size is in KiB, not pages.
    conn.pragma_update(None, "cache_size", -i64::from(kib))?;
    Ok(())
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
fn cannot_open(error: &Error) -> bool {
    matches!(
        error.sqlite_code(),
        Some(rusqlite::ErrorCode::CannotOpen | rusqlite::ErrorCode::ReadOnly)
    )
}

/// Whether a write-ahead log beside the database holds changes that are
/// not in the database file yet.
fn wal_holds_changes(path: &Path) -> bool {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    std::fs::metadata(wal).is_ok_and(|meta| meta.len() > 0)
}

/// A copy of a database written by an older jobrun, brought up to date;
/// the file itself is not changed. The copy is SQLite's private temporary
/// database, a file in the temporary folder (`SQLITE_TMPDIR`, else
/// `TMPDIR`, else `/var/tmp` or `/tmp`) removed as it closes, read through
/// the usual page cache: memory stays that of any read, not the size of the
/// database.
fn upgraded_copy(conn: &Connection, path: &Path, options: &OpenOptions) -> Result<Connection> {
    let display = path.display();
    let no_room = || {
        format!(
            "cannot read {display}, written by an older jobrun: reading it takes a copy as \
             large as the database in the temporary folder, which cannot hold it (set \
             SQLITE_TMPDIR to a folder with room), or upgrade the file with `jobrun --db \
             {display} import /dev/null`"
        )
    };
    let mut copy = Connection::open("").with_context(no_room)?;
    set_cache(&copy, options)?;
    rusqlite::backup::Backup::new(conn, &mut copy)?
        .run_to_completion(1024, Duration::ZERO, None)
        .with_context(no_room)?;
    let migrations = MIGRATIONS.as_ref().map_err(|e| Error::Invalid(e.clone()))?;
    migrations
        .to_latest(&mut copy)
        .with_context(|| format!("cannot read {display}, written by an older jobrun"))?;
    Ok(copy)
}

/// A SQLite error, said plainly when it is another process's lock: which
/// process holds it, when /proc can tell, and what to do about it.
fn explain_lock(error: rusqlite::Error, path: &Path, wait: Duration) -> Error {
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
    let wait = humantime::format_duration(wait);
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
    Error::Busy {
        message,
        source: error,
    }
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
pub fn damage_hint(error: &Error, path: &Path) -> Option<String> {
    let damaged = matches!(
        error.sqlite_code(),
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
    );
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

fn not_sqlite(path: &Path) -> Error {
    Error::Refused(format!(
        "{} is not a SQLite database (is it the right file? \
         --db names jobrun's state database)",
        path.display()
    ))
}

/// The schema version of a jobrun database (0 for a new, empty one); a
/// database of another program or of a newer jobrun is refused.
fn schema_version(conn: &Connection, path: &Path, wait: Duration) -> Result<usize> {
    let display = path.display();
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(|e| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::NotADatabase) => not_sqlite(path),
            _ => explain_lock(e, path, wait).context(format!("cannot read database {display}")),
        })?;
    if version as usize > known_version() {
        return Err(Error::Refused(format!(
            "{display} was written by a newer jobrun (schema version {version}; this one knows \
             up to {}). Use that jobrun or a newer one; nothing was changed",
            known_version()
        )));
    }
    if version == 0 {
        let tables: i64 = conn.query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table'",
            [],
            |row| row.get(0),
        )?;
        if tables > 0 {
            return Err(Error::Refused(format!(
                "{display} is a SQLite database, but not jobrun's; nothing was changed. \
                 Point --db at a new file"
            )));
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
        Err(e) if e.kind() == ErrorKind::AlreadyExists => create_through_link(path),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => Err(e)
            .with_context(|| {
                format!(
                    "cannot create database {}: this process may open no more files (ulimit \
                     -n); raise the limit, then run again",
                    path.display()
                )
            }),
        Err(e) => Err(e).with_context(|| format!("cannot create database {}", path.display())),
    }
}

/// Where `path` already exists: when it is a symbolic link to nothing yet,
/// creates what it points to, private as `create_private_file` does
/// (SQLite would create it readable by all); a link that cannot be followed
/// (a loop, a missing folder) is refused, naming where it leads.
fn create_through_link(path: &Path) -> Result<()> {
    let is_link = std::fs::symlink_metadata(path).is_ok_and(|meta| meta.is_symlink());
    let followed = match std::fs::metadata(path) {
        Ok(_) => return Ok(()),
        Err(_) if !is_link => return Ok(()),
        Err(e) => e,
    };
    let target =
        std::fs::read_link(path).map_or_else(|_| "?".to_string(), |to| to.display().to_string());
    let display = path.display();
    if followed.kind() != ErrorKind::NotFound {
        return Err(Error::Refused(format!(
            "{display} is a symbolic link to {target} that cannot be followed ({followed}); \
             nothing was changed. Point --db at the database file itself"
        )));
    }
    let mut options = std::fs::OpenOptions::new();
    // Without create_new, the link is followed. Nonblocking, so that a FIFO
    // put there meanwhile is not waited on.
    options.write(true).create(true);
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NONBLOCK);
    options.open(path).map(drop).with_context(|| {
        format!(
            "cannot create database {display}, a symbolic link to {target}: make the \
             folder it leads to, or point --db at another path"
        )
    })
}

/// The value recorded under `key`, if any.
fn read_setting(conn: &Connection, key: &str) -> Result<Option<String>> {
    Ok(conn
        .query_row("SELECT value FROM settings WHERE key = ?1", [key], |row| {
            row.get(0)
        })
        .optional()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::contract;

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
        let err = SqliteStore::open(&path, &OpenOptions::new(Open::MustExist))
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

    /// Runs a check of the store contract on new databases in a folder of
    /// its own.
    fn check(contract: fn(contract::Fresh<'_>)) {
        let dir = tempfile::tempdir().unwrap();
        let count = std::cell::Cell::new(0);
        contract(&|| {
            count.set(count.get() + 1);
            let path = dir.path().join(format!("{}.db", count.get()));
            let options = OpenOptions::new(Open::CreateIfMissing);
            Box::new(SqliteStore::open(&path, &options).unwrap())
        });
    }

    #[test]
    fn every_claim_gives_a_row_a_new_fence() {
        check(contract::every_claim_gives_a_row_a_new_fence);
    }

    #[test]
    fn an_outcome_under_an_earlier_claim_of_the_row_is_refused() {
        check(contract::an_outcome_under_an_earlier_claim_of_the_row_is_refused);
    }

    #[test]
    fn a_run_taken_for_dead_cannot_complete_what_another_claimed() {
        check(contract::a_run_taken_for_dead_cannot_complete_what_another_claimed);
    }

    #[test]
    fn a_setting_keeps_its_first_value() {
        check(contract::a_setting_keeps_its_first_value);
    }

    #[test]
    fn an_import_says_what_became_of_each_url_in_order() {
        check(contract::an_import_says_what_became_of_each_url_in_order);
    }

    #[test]
    fn an_ended_run_gives_its_rows_back_and_says_how_it_ended() {
        check(contract::an_ended_run_gives_its_rows_back_and_says_how_it_ended);
    }

    #[test]
    fn failed_rows_go_back_with_a_fresh_budget() {
        check(contract::failed_rows_go_back_with_a_fresh_budget);
    }
}
