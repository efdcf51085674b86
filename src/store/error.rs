//! What can go wrong in the state database, as cases a caller can tell
//! apart: the lock held by another process for too long, a run taken for
//! dead, a database refused as it is (missing, foreign, newer), or the
//! backend's own error, each with the context it was met in. `Context`
//! adds that context as anyhow's trait of the same name does, so the
//! message a user reads is the same chain.

use crate::domain::RunId;

/// What every store operation returns.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a caller's function, run by the store on rows it reads or before a
/// commit, gives back when it fails; the store returns it unchanged.
pub type CallerError = Box<dyn std::error::Error + Send + Sync>;

/// What a caller's function returns.
pub type CallerResult = Result<(), CallerError>;

/// A run's completions were refused, or its heartbeat could not be
/// renewed: another run found it dead and gave its rows to others.
#[derive(Debug, thiserror::Error)]
#[error(
    "run #{run} was taken for dead by another run, which gave its URLs to others \
     (its heartbeat had not been renewed for too long); it stopped and recorded \
     nothing more, so that no URL is recorded twice. Run again to carry on"
)]
pub struct TakenForDead {
    pub run: RunId,
}

/// The database did not answer one request within the limit (a hung
/// server, or a network that stopped carrying packets while keeping its
/// connections open): the command stops rather than wait for ever.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "the database {db} has not answered for {:.1} s, longer than --db-timeout ({}); jobrun \
     stopped waiting for it. Nothing recorded is lost, and what was under way is not recorded \
     (an import run again counts the URLs it already holds as duplicates). Check the network \
     and the server, then run the command again",
    waited.as_secs_f64(),
    humantime::format_duration(*limit)
)]
pub struct Unanswered {
    /// The database as messages show it: any password as `***`.
    pub db: String,
    pub waited: std::time::Duration,
    pub limit: std::time::Duration,
}

/// A store error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another process held the database's write lock for longer than the
    /// lock wait; the message says who, when it can tell.
    #[error("{message}")]
    Busy {
        message: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error(transparent)]
    TakenForDead(#[from] TakenForDead),
    #[error(transparent)]
    Unanswered(#[from] Unanswered),
    /// The database is not one this jobrun can use as it is (missing,
    /// empty, not a database, another program's, or from a newer jobrun);
    /// nothing in it was changed.
    #[error("{0}")]
    Refused(String),
    /// Anything else jobrun itself found wrong (a `--db` it cannot parse,
    /// a file it may not write, a setting that is not a duration), said
    /// plainly.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Postgres(#[from] postgres::Error),
    #[error(transparent)]
    Value(#[from] rusqlite::types::FromSqlError),
    #[error(transparent)]
    Migration(#[from] rusqlite_migration::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Tls(#[from] rustls::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// What a caller's function returned.
    #[error(transparent)]
    Caller(#[from] CallerError),
    /// `source`, met while doing what `context` says.
    #[error("{context}")]
    Context {
        context: String,
        #[source]
        source: Box<Error>,
    },
}

impl Error {
    /// The error under any context added on the way.
    pub fn root(&self) -> &Error {
        match self {
            Error::Context { source, .. } => source.root(),
            other => other,
        }
    }

    /// Whether another process held the lock for longer than the lock wait
    /// (on PostgreSQL, the statement's `lock_timeout`).
    pub fn is_busy(&self) -> bool {
        match self.root() {
            Error::Busy { .. } => true,
            Error::Postgres(error) => {
                error.code() == Some(&postgres::error::SqlState::LOCK_NOT_AVAILABLE)
            }
            _ => false,
        }
    }

    /// Whether the run was taken for dead by another one.
    pub fn is_taken_for_dead(&self) -> bool {
        matches!(self.root(), Error::TakenForDead(_))
    }

    /// SQLite's error code, for a SQLite error (also one met while
    /// migrating).
    pub fn sqlite_code(&self) -> Option<rusqlite::ErrorCode> {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = match self.root() {
            Error::Sqlite(error) | Error::Busy { source: error, .. } => Some(error),
            other => std::error::Error::source(other),
        };
        while let Some(error) = cause {
            if let Some(error) = error.downcast_ref::<rusqlite::Error>() {
                return error.sqlite_error_code();
            }
            cause = error.source();
        }
        None
    }

    /// The error a caller's function returned, if that is what this is.
    pub fn caller(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        match self.root() {
            Error::Caller(error) => Some(&**error),
            _ => None,
        }
    }
}

crate::context::define_context!(Error, Error::Invalid);
