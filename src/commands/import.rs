//! `jobrun import FILE`: streams a URL list (plain or JSON Lines) into the
//! database, in batches, giving each new URL its output file name once and
//! for all: the name from the line, or a time-ordered UUID plus the
//! extension.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::Path;
use std::time::SystemTime;

use anyhow::{Context, Result};
use uuid::Builder;

use crate::cli::{ImportArgs, ImportFormat};
use crate::commands::{Status, thousands};
use crate::request::RequestSpec;
use crate::store::{InsertResult, NewUrl, Open, Store, unix_ms};
use crate::urlfile::{self, Entry, Format, Line};

/// URLs per transaction: big enough to be fast, small enough that a run
/// working on the same database is not held up.
const BATCH: usize = 10_000;
/// Rejected lines shown one by one; the rest are only counted.
const MAX_SHOWN: u64 = 100;

#[derive(Debug, Default)]
struct Counts {
    imported: u64,
    duplicate: u64,
    rejected: u64,
}

pub fn run(db: &Path, args: ImportArgs) -> Result<Status> {
    let from_stdin = args.file.as_os_str() == "-";
    let name = if from_stdin {
        "<stdin>".to_string()
    } else {
        args.file.display().to_string()
    };
    let reader: Box<dyn BufRead> = if from_stdin {
        Box::new(io::stdin().lock())
    } else {
        let file = File::open(&args.file).with_context(|| format!("cannot open {name}"))?;
        Box::new(BufReader::with_capacity(256 * 1024, file))
    };
    let suffix = if args.ext.is_empty() {
        String::new()
    } else {
        format!(".{}", args.ext)
    };
    let mut store = Store::open(db, Open::CreateIfMissing)?;
    let format = match args.format {
        ImportFormat::Auto => None,
        ImportFormat::Lines => Some(Format::Lines),
        ImportFormat::Jsonl => Some(Format::JsonLines),
    };
    store.expect_bulk_writes()?;
    let counts = import(&mut store, reader, &name, &suffix, format)?;
    if counts.rejected > MAX_SHOWN {
        tracing::info!(
            "{name}: {} more rejected lines not shown",
            thousands(counts.rejected - MAX_SHOWN)
        );
    }
    tracing::info!(
        "{}: {} imported, {} duplicate, {} rejected",
        db.display(),
        thousands(counts.imported),
        thousands(counts.duplicate),
        thousands(counts.rejected)
    );
    Ok(if counts.rejected > 0 {
        Status::Partial
    } else {
        Status::Success
    })
}

fn import(
    store: &mut Store,
    mut reader: impl BufRead,
    name: &str,
    suffix: &str,
    mut format: Option<Format>,
) -> Result<Counts> {
    let mut counts = Counts::default();
    let mut buf = Vec::new();
    let mut line_number = 0u64;
    let mut batch = store.import_batch()?;
    let mut in_batch = 0;
    while let Some(complete) =
        urlfile::read_line(&mut reader, &mut buf).with_context(|| format!("cannot read {name}"))?
    {
        line_number += 1;
        if format.is_none() && complete {
            format = Format::detect(&buf);
        }
        let line = if complete {
            urlfile::parse_line(&buf, line_number == 1, format.unwrap_or(Format::Lines))
        } else {
            Line::Reject(format!("line longer than {} bytes", urlfile::MAX_LINE))
        };
        let mut reject = |reason: &str| {
            counts.rejected += 1;
            if counts.rejected <= MAX_SHOWN {
                tracing::warn!("{name}:{line_number}: {reason}");
            }
        };
        match line {
            Line::Skip => {}
            Line::Reject(reason) => reject(&reason),
            Line::Entry(entry) => {
                match insert(&batch, &entry, suffix)? {
                    InsertResult::Inserted => counts.imported += 1,
                    InsertResult::Duplicate => counts.duplicate += 1,
                    InsertResult::NameTaken(reason) => reject(&reason),
                }
                in_batch += 1;
                if in_batch == BATCH {
                    batch.commit()?;
                    batch = store.import_batch()?;
                    in_batch = 0;
                }
            }
        }
    }
    batch.commit()?;
    Ok(counts)
}

fn insert(
    batch: &crate::store::ImportBatch<'_>,
    entry: &Entry,
    suffix: &str,
) -> Result<InsertResult> {
    let request = entry.request.as_ref().map(|r| r.to_json());
    let request_hash = entry
        .request
        .as_ref()
        .map(RequestSpec::hash)
        .unwrap_or_default();
    let path = match &entry.name {
        Some(name) => name.clone(),
        None => file_name(suffix),
    };
    let new = NewUrl {
        url: entry.url.as_str(),
        request: request.as_deref(),
        request_hash: &request_hash,
        host: &urlfile::host_of(&entry.url),
        path: &path,
    };
    batch.insert(&new, entry.name.is_some())
}

/// A new output file name: a version 7 UUID, which starts with the time, so
/// that the index on paths grows at its end, and the extension. Its random
/// part comes from fastrand: asking the system for it once per URL took a
/// twentieth of an import.
fn file_name(suffix: &str) -> String {
    let mut random = [0u8; 10];
    fastrand::fill(&mut random);
    let millis = unix_ms(SystemTime::now()) as u64;
    let uuid = Builder::from_unix_timestamp_millis(millis, &random).into_uuid();
    format!("{uuid}{suffix}")
}
