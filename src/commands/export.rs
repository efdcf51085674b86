//! `jobrun export`: one record per URL, as JSON Lines or CSV, on standard
//! output. `path` is the absolute path of the URL's file.

use std::io::{self, BufWriter, Write};

use anyhow::Result;

use crate::cli::{ExportArgs, ExportFormat};
use crate::commands::Status;
use crate::domain::ExportRow;
use crate::out_dir;
use crate::store::{Database, Open};

pub fn run(db: &Database, args: ExportArgs) -> Result<Status> {
    let store = db.open(Open::ReadOnly)?;
    let out_dir = out_dir::recorded_or_default(&*store, db)?;
    let stdout = io::stdout().lock();
    match args.format {
        ExportFormat::Jsonl => {
            let mut writer = BufWriter::new(stdout);
            store.export(&mut |mut row| {
                row.path = out_dir.join(&row.path).display().to_string();
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
                row.path = out_dir.join(&row.path).display().to_string();
                Ok(writer.serialize(row)?)
            })?;
            writer.flush()?;
        }
    }
    Ok(Status::Success)
}
