//! `jobrun export`: one record per URL, as JSON Lines or CSV, on standard
//! output. `path` is the absolute path of the URL's file; a file written on
//! another machine (a shared PostgreSQL queue) is in that machine's output
//! folder, and its path says so as `host:/folder/name`, as scp and rsync
//! write it.

use std::collections::HashMap;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::cli::{ExportArgs, ExportFormat};
use crate::commands::Status;
use crate::domain::ExportRow;
use crate::out_dir;
use crate::store::{Database, Open};

pub fn run(db: &Database, args: ExportArgs) -> Result<Status> {
    let store = db.open(Open::ReadOnly)?;
    let out_dir = out_dir::recorded_or_default(&*store, db)?;
    let places = Places {
        here: crate::process::hostname(),
        out_dir,
        elsewhere: out_dir::recorded_elsewhere(&*store, db)?,
    };
    let stdout = io::stdout().lock();
    match args.format {
        ExportFormat::Jsonl => {
            let mut writer = BufWriter::new(stdout);
            store.export(&mut |mut row| {
                row.path = places.of(&row);
                serde_json::to_writer(&mut writer, &row)?;
                writer.write_all(b"\n")?;
                Ok(())
            })?;
            writer.flush()?;
        }
        ExportFormat::Csv => {
            // The header is written here, not by the first row: an empty
            // database still gets one.
            let mut writer = csv::WriterBuilder::new()
                .has_headers(false)
                .from_writer(stdout);
            writer.write_record(ExportRow::FIELDS)?;
            store.export(&mut |mut row| {
                row.path = places.of(&row);
                Ok(writer.serialize(row)?)
            })?;
            writer.flush()?;
        }
    }
    Ok(Status::Success)
}

/// Where the files are: this machine's output folder, and other machines'.
struct Places {
    here: String,
    out_dir: PathBuf,
    elsewhere: HashMap<String, PathBuf>,
}

impl Places {
    /// The row's file: its absolute path here, or `host:path` on the
    /// machine that wrote it (the path relative to that machine's output
    /// folder when it recorded none).
    fn of(&self, row: &ExportRow) -> String {
        match row.written_on.as_deref().filter(|host| *host != self.here) {
            None => self.out_dir.join(&row.path).display().to_string(),
            Some(host) => {
                let folder = self
                    .elsewhere
                    .get(host)
                    .map_or(Path::new(""), PathBuf::as_path);
                format!("{host}:{}", folder.join(&row.path).display())
            }
        }
    }
}
