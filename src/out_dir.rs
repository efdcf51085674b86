//! Where a database's files go. The output folder is recorded in the
//! database on the first run, under one settings key (one per machine on a
//! shared PostgreSQL queue), so that every command (run, report, export,
//! verify) finds the same folder without being told.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::output;
use crate::store::{self, Database, Location, Store};

/// Why the output folder cannot be settled.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::Error),
    /// Not the folder recorded, or not a name that can be recorded.
    #[error("{0}")]
    Refused(String),
    #[error("cannot resolve the path {path}")]
    Resolve {
        path: PathBuf,
        source: std::io::Error,
    },
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// The settings key of the output folder.
pub const OUT_DIR_KEY: &str = "out_dir";

/// The output folder: the one recorded in the database, else `--out`, else
/// `out` beside the database; recorded on first use, once: of two first
/// runs racing with different folders, the second is refused.
pub fn settle(store: &mut dyn Store, db: &Database, requested: Option<&Path>) -> Result<PathBuf> {
    let requested = requested.map(absolute).transpose()?;
    let key = key(db);
    let recorded = match store.setting(&key)? {
        Some(recorded) => PathBuf::from(recorded),
        None => {
            let chosen = match &requested {
                Some(dir) => dir.clone(),
                None => default(db)?,
            };
            let text = chosen.to_str().ok_or_else(|| {
                Error::Refused(format!(
                    "the output folder {} is not valid UTF-8",
                    chosen.display()
                ))
            })?;
            // A folder that cannot be one (a file, say) must not be
            // recorded: the user could then never choose another.
            let holds =
                store.setting_or_insert(&key, text, &mut || Ok(output::ensure_folder(&chosen)?))?;
            let holds = PathBuf::from(holds);
            if same_place(&holds, &chosen) {
                return Ok(holds);
            }
            holds
        }
    };
    if let Some(requested) = requested
        && !same_place(&requested, &recorded)
    {
        return Err(Error::Refused(format!(
            "{} writes its files to {} (recorded on its first run{}), not {}. \
             Run without --out, or use another database for another folder",
            db.shown(),
            recorded.display(),
            if key == OUT_DIR_KEY {
                ""
            } else {
                " on this machine"
            },
            requested.display()
        )));
    }
    Ok(recorded)
}

/// The output folder as recorded on this machine, if a run recorded one.
pub fn recorded(store: &dyn Store, db: &Database) -> Result<Option<PathBuf>> {
    Ok(store.setting(&key(db))?.map(PathBuf::from))
}

/// The output folders other machines recorded (PostgreSQL), by machine:
/// the machines of the runs the database lists. Empty on SQLite, where one
/// folder serves the job.
pub fn recorded_elsewhere(store: &dyn Store, db: &Database) -> Result<HashMap<String, PathBuf>> {
    let mut folders = HashMap::new();
    if let Location::Sqlite(_) = db.location {
        return Ok(folders);
    }
    let here = crate::process::hostname();
    // Runs are few (one per `jobrun run`), unlike URLs.
    for run in store.recent_runs(i64::MAX as usize)? {
        let host = run.start.host;
        if host == here || folders.contains_key(&host) {
            continue;
        }
        if let Some(dir) = store.setting(&format!("{OUT_DIR_KEY}@{host}"))? {
            folders.insert(host, PathBuf::from(dir));
        }
    }
    Ok(folders)
}

/// The output folder as recorded, or where the first run will put it.
pub fn recorded_or_default(store: &dyn Store, db: &Database) -> Result<PathBuf> {
    match store.setting(&key(db))? {
        Some(dir) => Ok(PathBuf::from(dir)),
        None => default(db),
    }
}

/// The settings key of the output folder: one for the job on SQLite; one
/// per machine on PostgreSQL, where each machine writes to its own folder.
fn key(db: &Database) -> String {
    match db.location {
        Location::Sqlite(_) => OUT_DIR_KEY.to_string(),
        Location::Postgres(_) => format!("{OUT_DIR_KEY}@{}", crate::process::hostname()),
    }
}

fn default(db: &Database) -> Result<PathBuf> {
    let beside = match db.location.sqlite_path() {
        Some(file) => file.parent().unwrap_or(Path::new(".")),
        None => Path::new("."),
    };
    absolute(&beside.join("out"))
}

fn absolute(path: &Path) -> Result<PathBuf> {
    let path = if path.as_os_str().is_empty() {
        Path::new(".")
    } else {
        path
    };
    let absolute = std::path::absolute(path).map_err(|source| Error::Resolve {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(absolute.canonicalize().unwrap_or(absolute))
}

fn same_place(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}
