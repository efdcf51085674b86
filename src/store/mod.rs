//! The state database: every URL's state, the runs that worked on it, and
//! the job's settings. All SQL lives under this module, behind one narrow
//! interface, [`Store`]: import a batch, claim a batch, complete a batch,
//! reclaim a dead run's rows, read the models back. `open` picks the
//! backend from `--db`.

mod backend;
#[cfg(test)]
pub(crate) mod contract;
mod error;
mod postgres;
mod sqlite;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use backend::Store;
pub use error::{CallerError, CallerResult, Context, Error, Result, TakenForDead, Unanswered};
pub use postgres::{DEFAULT_LEASE, PostgresStore, answer_limit};
pub use sqlite::SqliteStore;

/// How much longer a run's connection waits than the run's own watch on
/// it (which polls every second at most), so that the watch gives up first
/// and says so as the run.
const RUN_WATCH_LEAD: Duration = Duration::from_secs(2);

/// Where the database is, as `--db` (or `JOBRUN_DB`) names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL (`postgres://` or `postgresql://`).
    Postgres(String),
}

impl Location {
    /// Reads `--db`: a `postgres://` or `postgresql://` URL names a
    /// PostgreSQL database, anything else a SQLite file.
    pub fn parse(db: &Path) -> Location {
        match db.to_str() {
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Location::Postgres(url.to_string())
            }
            _ => Location::Sqlite(db.to_path_buf()),
        }
    }

    /// The SQLite file, for a SQLite database.
    pub fn sqlite_path(&self) -> Option<&Path> {
        match self {
            Location::Sqlite(path) => Some(path),
            Location::Postgres(_) => None,
        }
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

/// How to open a database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenOptions {
    pub mode: Open,
    /// How long a statement waits for another process's write lock.
    pub lock_wait: Duration,
    /// The page cache, in KiB; the backend's default when None.
    pub cache_kib: Option<u32>,
    /// How long a run's heartbeat may be silent before other runs take its
    /// rows (PostgreSQL; on SQLite a run's own machine tells at once).
    /// The job's setting `lease`, else 30 s, when None.
    pub lease: Option<Duration>,
    /// How long one wait for the server may last before the command gives
    /// up (PostgreSQL): the lease and `ANSWER_MARGIN` when None.
    pub answer_within: Option<Duration>,
    /// Added to that: a run's own watch gives up first, and says so as the
    /// run (PostgreSQL).
    pub answer_slack: Duration,
}

impl OpenOptions {
    /// How long a statement waits for another process's write lock, unless
    /// `--lock-wait` says otherwise. jobrun's own transactions take
    /// milliseconds.
    pub const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(30);

    pub fn new(mode: Open) -> OpenOptions {
        OpenOptions {
            mode,
            lock_wait: OpenOptions::DEFAULT_LOCK_WAIT,
            cache_kib: None,
            lease: None,
            answer_within: None,
            answer_slack: Duration::ZERO,
        }
    }
}

/// The state database as `--db` names it, and how long to wait for its
/// lock: what every command needs to open it.
pub struct Database {
    /// As given, for messages and for commands to run next.
    pub path: PathBuf,
    pub location: Location,
    lock_wait: Duration,
    /// `--db-timeout`: how long one wait for a PostgreSQL server may last.
    pub answer_within: Option<Duration>,
}

impl Database {
    pub fn new(path: PathBuf, lock_wait: Duration) -> Database {
        Database {
            location: Location::parse(&path),
            path,
            lock_wait,
            answer_within: None,
        }
    }

    /// With `--db-timeout`: no wait for a PostgreSQL server lasts longer.
    pub fn answering_within(self, limit: Option<Duration>) -> Database {
        Database {
            answer_within: limit,
            ..self
        }
    }

    pub fn open(&self, mode: Open) -> Result<Box<dyn Store>> {
        let options = OpenOptions {
            lock_wait: self.lock_wait,
            answer_within: self.answer_within,
            ..OpenOptions::new(mode)
        };
        open(&self.location, &options)
    }

    /// Opens it for runs that hold `lease` (PostgreSQL): how long a run's
    /// heartbeat may be silent before other runs take its URLs.
    pub fn open_for_runs(&self, mode: Open, lease: Option<Duration>) -> Result<Box<dyn Store>> {
        let options = OpenOptions {
            lock_wait: self.lock_wait,
            lease,
            answer_within: self.answer_within,
            answer_slack: RUN_WATCH_LEAD,
            ..OpenOptions::new(mode)
        };
        open(&self.location, &options)
    }

    /// `--db` for messages, any password in a URL hidden.
    pub fn shown(&self) -> String {
        crate::redact::redact_url(&self.path.display().to_string()).into_owned()
    }
}

/// Opens the database at `location` as `options` say.
pub fn open(location: &Location, options: &OpenOptions) -> Result<Box<dyn Store>> {
    match location {
        Location::Sqlite(path) => Ok(Box::new(SqliteStore::open(path, options)?)),
        Location::Postgres(url) => Ok(Box::new(PostgresStore::open(url, options)?)),
    }
}

/// What to do about a database error that means the database is damaged.
pub fn damage_hint(error: &Error, location: &Location) -> Option<String> {
    match location {
        Location::Sqlite(path) => sqlite::damage_hint(error, path),
        Location::Postgres(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_postgres_url_names_postgres_and_anything_else_a_file() {
        for url in ["postgres://u@db/jobs", "postgresql://db/jobs"] {
            assert_eq!(
                Location::parse(Path::new(url)),
                Location::Postgres(url.into())
            );
        }
        for file in ["jobrun.db", "postgres.db", "./postgres://x", ""] {
            assert_eq!(
                Location::parse(Path::new(file)),
                Location::Sqlite(file.into())
            );
        }
    }
}
