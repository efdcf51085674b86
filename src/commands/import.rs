//! `jobrun import FILE`: streams a URL list (plain or JSON Lines) into the
//! database, giving each new URL its output file name once and for all:
//! the name from the line, or a time-ordered UUID plus the extension.
//!
//! A thread reads and parses the list; this one writes what it parsed, one
//! transaction per batch. The write lock is held only while a batch is
//! written, never while the input is awaited, so a list fed slowly through
//! a pipe holds up no other command; a batch is written at 10,000 URLs, or
//! a second after its first line came, whichever is first.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow};
use flume::RecvTimeoutError;
use reqwest::Url;
use uuid::Builder;

use crate::cli::{ImportArgs, ImportFormat};
use crate::clock::unix_ms;
use crate::commands::Status;
use crate::domain::{InsertResult, NewUrl};
use crate::format::thousands;
use crate::request::RequestSpec;
use crate::store::{Database, Open, Store};
use crate::urlfile::{self, Entry, Format, Line};

/// URLs per transaction: big enough to be fast, small enough that a run
/// working on the same database is not held up.
const BATCH: usize = 10_000;
/// How long a parsed line waits for its transaction at most, so that a
/// slow stream still lands as it comes.
const MAX_BATCH_DELAY: Duration = Duration::from_secs(1);
/// Parsed lines handed over from the reading thread at once.
const CHUNK: usize = 1024;
/// Chunks in flight between the threads: memory stays flat.
const CHUNKS_AHEAD: usize = 16;
/// Rejected lines shown one by one; the rest are only counted.
const MAX_SHOWN: u64 = 100;

#[derive(Debug, Default)]
struct Counts {
    imported: u64,
    duplicate: u64,
    rejected: u64,
}

/// A line of the list, parsed and ready to insert, with its number.
enum Parsed {
    Entry { line: u64, row: Row },
    Reject { line: u64, reason: String },
}

/// A URL's row, prepared on the reading thread.
struct Row {
    url: Url,
    request: Option<String>,
    request_hash: String,
    host: String,
    path: String,
    /// The name was given by the line, not made up.
    named: bool,
}

/// Where the list comes from.
enum Input {
    Stdin,
    File(File),
}

pub fn run(db: &Database, args: ImportArgs) -> Result<Status> {
    let from_stdin = args.file.as_os_str() == "-";
    let name = if from_stdin {
        "<stdin>".to_string()
    } else {
        args.file.display().to_string()
    };
    let input = if from_stdin {
        Input::Stdin
    } else {
        Input::File(File::open(&args.file).with_context(|| format!("cannot open {name}"))?)
    };
    let suffix = if args.ext.is_empty() {
        String::new()
    } else {
        format!(".{}", args.ext)
    };
    let mut store = db.open(Open::CreateIfMissing)?;
    let format = match args.format {
        ImportFormat::Auto => None,
        ImportFormat::Lines => Some(Format::Lines),
        ImportFormat::Jsonl => Some(Format::JsonLines),
    };
    store.expect_bulk_writes()?;
    let imported = import(&mut *store, input, &name, suffix, format);
    let finished = store.finish_bulk_writes();
    let counts = imported?;
    finished?;
    if counts.rejected > MAX_SHOWN {
        tracing::info!(
            "{name}: {} more rejected lines not shown",
            thousands(counts.rejected - MAX_SHOWN)
        );
    }
    tracing::info!(
        "{}: {} imported, {} duplicate, {} rejected",
        db.shown(),
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

/// Writes what the reading thread parses, a batch per transaction. A read
/// error ends the import after what came before it is written.
fn import(
    store: &mut dyn Store,
    input: Input,
    name: &str,
    suffix: String,
    format: Option<Format>,
) -> Result<Counts> {
    let (tx, rx) = flume::bounded(CHUNKS_AHEAD);
    // Written batches go back to the reading thread, which frees them: its
    // allocations freed here would make the two threads take turns at the
    // allocator's lock.
    let (spent, to_free) = flume::bounded(1);
    let reader_name = name.to_string();
    let reader = std::thread::Builder::new()
        .name("jobrun-import-reader".into())
        .spawn(move || read_list(input, &reader_name, &suffix, format, tx, to_free))
        .context("cannot start the thread that reads the list")?;
    let mut counts = Counts::default();
    let mut batch: Vec<Parsed> = Vec::new();
    let mut since: Option<Instant> = None;
    loop {
        let received = match since {
            Some(since) => rx.recv_deadline(since + MAX_BATCH_DELAY),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match received {
            Ok(Ok(chunk)) => {
                batch.extend(chunk);
                since.get_or_insert_with(Instant::now);
                if batch.len() < BATCH {
                    continue;
                }
            }
            Ok(Err(error)) => {
                write_batch(store, &mut batch, name, &mut counts, &spent)?;
                return Err(error);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        write_batch(store, &mut batch, name, &mut counts, &spent)?;
        since = None;
    }
    write_batch(store, &mut batch, name, &mut counts, &spent)?;
    // The reader has let go of its end: it has finished, or panicked.
    reader
        .join()
        .map_err(|_| anyhow!("the thread reading {name} failed"))?;
    Ok(counts)
}

/// Writes `batch` in one transaction, says which lines were rejected, in
/// order, and hands the written lines to `spent` to be freed.
fn write_batch(
    store: &mut dyn Store,
    batch: &mut Vec<Parsed>,
    name: &str,
    counts: &mut Counts,
    spent: &flume::Sender<Vec<Parsed>>,
) -> Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let new: Vec<NewUrl<'_>> = batch
        .iter()
        .filter_map(|parsed| match parsed {
            Parsed::Entry { row, .. } => Some(NewUrl {
                url: row.url.as_str(),
                request: row.request.as_deref(),
                request_hash: &row.request_hash,
                host: &row.host,
                path: &row.path,
                named: row.named,
            }),
            Parsed::Reject { .. } => None,
        })
        .collect();
    let mut results = store
        .import(&new)
        .with_context(|| {
            let line = |parsed: Option<&Parsed>| match parsed {
                Some(Parsed::Entry { line, .. } | Parsed::Reject { line, .. }) => *line,
                None => 0,
            };
            format!(
                "{name}: lines {} to {} were not imported: importing the list again adds \
                 whatever is missing and counts the rest as duplicates",
                line(batch.first()),
                line(batch.last())
            )
        })?
        .into_iter();
    let mut reject = |line: u64, reason: &str| {
        counts.rejected += 1;
        if counts.rejected <= MAX_SHOWN {
            tracing::warn!("{name}:{line}: {reason}");
        }
    };
    // Rejected lines are told in the order of the list, among the others.
    for parsed in batch.iter() {
        match parsed {
            Parsed::Reject { line, reason } => reject(*line, reason),
            Parsed::Entry { line, .. } => match results.next() {
                Some(InsertResult::Inserted) => counts.imported += 1,
                Some(InsertResult::Duplicate) => counts.duplicate += 1,
                Some(InsertResult::NameTaken(reason)) => reject(*line, &reason),
                None => anyhow::bail!("the database gave fewer results than URLs imported"),
            },
        }
    }
    // Freed here when the reading thread has ended or is behind.
    let _ = spent.try_send(std::mem::take(batch));
    Ok(())
}

/// The reading thread: parses the list and hands the lines over in chunks,
/// and always before it may wait for more input. Ends at the end of the
/// input, on a read error (handed over too), or when the writer is gone.
fn read_list(
    input: Input,
    name: &str,
    suffix: &str,
    format: Option<Format>,
    tx: flume::Sender<Result<Vec<Parsed>>>,
    to_free: flume::Receiver<Vec<Parsed>>,
) {
    let handoff = |input: Box<dyn Read>| Handoff {
        input,
        chunk: Vec::new(),
        tx: tx.clone(),
        to_free: to_free.clone(),
    };
    let mut reader = BufReader::with_capacity(
        256 * 1024,
        match input {
            Input::Stdin => handoff(Box::new(io::stdin())),
            Input::File(file) => handoff(Box::new(file)),
        },
    );
    if let Err(error) = parse_lines(&mut reader, suffix, format) {
        let _ = reader.get_mut().hand_over();
        let _ = tx.send(Err(error.context(format!("cannot read {name}"))));
        return;
    }
    let _ = reader.get_mut().hand_over();
}

fn parse_lines(
    reader: &mut BufReader<Handoff>,
    suffix: &str,
    mut format: Option<Format>,
) -> Result<()> {
    let mut buf = Vec::new();
    let mut line = 0u64;
    while let Some(complete) = urlfile::read_line(reader, &mut buf)? {
        line += 1;
        if format.is_none() && complete {
            format = Format::detect(&buf);
        }
        let parsed = if complete {
            urlfile::parse_line(&buf, line == 1, format.unwrap_or(Format::Lines))
        } else {
            Line::Reject(format!("line longer than {} bytes", urlfile::MAX_LINE))
        };
        let parsed = match parsed {
            Line::Skip => continue,
            Line::Reject(reason) => Parsed::Reject { line, reason },
            Line::Entry(entry) => Parsed::Entry {
                line,
                row: prepare(entry, suffix),
            },
        };
        let handoff = reader.get_mut();
        handoff.chunk.push(parsed);
        if handoff.chunk.len() >= CHUNK {
            handoff.hand_over()?;
        }
    }
    Ok(())
}

/// The input of the reading thread. Before every read, which may wait,
/// it hands over the lines parsed so far, so that none is held back while
/// the input is slow.
struct Handoff {
    input: Box<dyn Read>,
    chunk: Vec<Parsed>,
    tx: flume::Sender<Result<Vec<Parsed>>>,
    /// Batches written, to be freed on this thread.
    to_free: flume::Receiver<Vec<Parsed>>,
}

impl Handoff {
    fn hand_over(&mut self) -> io::Result<()> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        self.to_free.try_iter().for_each(drop);
        self.tx
            .send(Ok(std::mem::take(&mut self.chunk)))
            .map_err(|_| io::Error::other("the import stopped"))
    }
}

impl Read for Handoff {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.hand_over()?;
        self.input.read(buf)
    }
}

fn prepare(entry: Entry, suffix: &str) -> Row {
    Row {
        request: entry.request.as_ref().map(|r| r.to_json()),
        request_hash: entry
            .request
            .as_ref()
            .map(RequestSpec::hash)
            .unwrap_or_default(),
        host: urlfile::host_of(&entry.url),
        named: entry.name.is_some(),
        path: entry.name.unwrap_or_else(|| file_name(suffix)),
        url: entry.url,
    }
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
