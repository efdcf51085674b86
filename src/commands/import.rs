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
use uuid::Uuid;

use crate::cli::{ImportArgs, ImportFormat};
use crate::clock::unix_ms;
use crate::commands::Status;
use crate::domain::{InsertResult, NewUrl};
use crate::format::thousands;
use crate::store::{Database, Open, Store};
use crate::urlfile::{self, Entry, Format, Line};

/// URLs per transaction: big enough to be fast, small enough that a run
/// working on the same database is not held up.
const BATCH: usize = 10_000;
/// How long a parsed line waits for its transaction at most, so that a
/// slow stream still lands as it comes.
const MAX_BATCH_DELAY: Duration = Duration::from_secs(1);
/// Parsed lines handed over from the reading thread at once, at most.
const CHUNK: usize = 1024;
/// Bytes of text in a chunk after which it is handed over: long lines
/// make fewer lines per chunk, so that memory stays flat with them too.
const CHUNK_TEXT: usize = 256 * 1024;
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

/// Parsed lines, handed from the reading thread to the writing one. The
/// text of every entry (URL, host, name, request) sits in one buffer, so a
/// chunk is two allocations, not a few per line; a written chunk goes back
/// to the reading thread to be filled again, so that in the long run
/// nothing is allocated or freed per line.
#[derive(Default)]
struct Chunk {
    text: String,
    lines: Vec<Parsed>,
}

/// A line of the list, parsed and ready to insert, with its number.
enum Parsed {
    Entry { line: u64, row: Row },
    Reject { line: u64, reason: String },
}

/// A URL's row, prepared on the reading thread: where its parts are in
/// the text of its chunk.
struct Row {
    url: Span,
    request: Option<Span>,
    request_hash: Span,
    host: Span,
    path: Span,
    /// The name was given by the line, not made up.
    named: bool,
}

/// A part of a chunk's text, by byte offsets.
#[derive(Clone, Copy)]
struct Span {
    start: u32,
    end: u32,
}

impl Chunk {
    fn is_full(&self) -> bool {
        self.lines.len() >= CHUNK || self.text.len() >= CHUNK_TEXT
    }

    fn clear(&mut self) {
        self.text.clear();
        self.lines.clear();
    }

    fn get(&self, span: Span) -> &str {
        &self.text[span.start as usize..span.end as usize]
    }

    /// Adds `more` to the text, or a part of it: where it is.
    fn push(&mut self, more: &str) -> Span {
        let start = self.offset();
        self.text.push_str(more);
        Span {
            start,
            end: self.offset(),
        }
    }

    /// The end of the text. A chunk is handed over at `CHUNK_TEXT` bytes
    /// after at most one line longer than `urlfile::MAX_LINE`, and one
    /// line's text is a few times its length: far below `u32::MAX`.
    fn offset(&self) -> u32 {
        self.text.len() as u32
    }

    /// Adds an entry of the list as a row: its text, and a generated name
    /// (from `names`) unless it has one.
    fn push_entry(&mut self, line: u64, entry: Entry, names: &mut FileNames) {
        let url = self.push(entry.url.as_str());
        let host = urlfile::host_range(&entry.url);
        let host = Span {
            start: url.start + host.start as u32,
            end: url.start + host.end as u32,
        };
        let (request, request_hash) = match &entry.request {
            Some(request) => (
                Some(self.push(&request.to_json())),
                self.push(&request.hash()),
            ),
            None => (None, self.push("")),
        };
        let named = entry.name.is_some();
        let path = match &entry.name {
            Some(name) => self.push(name),
            None => {
                let start = self.offset();
                names.push_next(&mut self.text);
                Span {
                    start,
                    end: self.offset(),
                }
            }
        };
        let row = Row {
            url,
            request,
            request_hash,
            host,
            path,
            named,
        };
        self.lines.push(Parsed::Entry { line, row });
    }

    fn new_url(&self, row: &Row) -> NewUrl<'_> {
        NewUrl {
            url: self.get(row.url),
            request: row.request.map(|span| self.get(span)),
            request_hash: self.get(row.request_hash),
            host: self.get(row.host),
            path: self.get(row.path),
            named: row.named,
        }
    }
}

impl Parsed {
    fn line(&self) -> u64 {
        match self {
            Parsed::Entry { line, .. } | Parsed::Reject { line, .. } => *line,
        }
    }
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
        let file = File::open(&args.file).with_context(|| format!("cannot open {name}"))?;
        // A folder opens, and fails only at the first read: after the
        // database was made. It is refused before.
        if file.metadata().is_ok_and(|meta| meta.is_dir()) {
            anyhow::bail!("{name} is a folder, not a list of URLs: give the file inside it");
        }
        Input::File(file)
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
    // Written chunks go back to the reading thread to be filled again. It
    // makes a new one only when none has come back, so there are never
    // more than those in flight, in the batch and being filled.
    let (spent, to_reuse) = flume::unbounded();
    let reader_name = name.to_string();
    let reader = std::thread::Builder::new()
        .name("jobrun-import-reader".into())
        .spawn(move || read_list(input, &reader_name, &suffix, format, tx, to_reuse))
        .context("cannot start the thread that reads the list")?;
    let mut counts = Counts::default();
    let mut batch = Batch::default();
    let mut since: Option<Instant> = None;
    loop {
        let received = match since {
            Some(since) => rx.recv_deadline(since + MAX_BATCH_DELAY),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match received {
            Ok(Ok(chunk)) => {
                batch.lines += chunk.lines.len();
                batch.chunks.push(chunk);
                since.get_or_insert_with(Instant::now);
                if batch.lines < BATCH {
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

/// The chunks of the next transaction.
#[derive(Default)]
struct Batch {
    chunks: Vec<Chunk>,
    /// Lines in them.
    lines: usize,
}

impl Batch {
    fn parsed(&self) -> impl Iterator<Item = (&Chunk, &Parsed)> {
        self.chunks
            .iter()
            .flat_map(|chunk| chunk.lines.iter().map(move |parsed| (chunk, parsed)))
    }
}

/// Writes `batch` in one transaction, says which lines were rejected, in
/// order, and hands its chunks to `spent` to be filled again.
fn write_batch(
    store: &mut dyn Store,
    batch: &mut Batch,
    name: &str,
    counts: &mut Counts,
    spent: &flume::Sender<Chunk>,
) -> Result<()> {
    if batch.lines == 0 {
        return Ok(());
    }
    let new: Vec<NewUrl<'_>> = batch
        .parsed()
        .filter_map(|(chunk, parsed)| match parsed {
            Parsed::Entry { row, .. } => Some(chunk.new_url(row)),
            Parsed::Reject { .. } => None,
        })
        .collect();
    let mut results = store
        .import(&new)
        .with_context(|| {
            let line = |parsed: Option<(&Chunk, &Parsed)>| parsed.map_or(0, |(_, p)| p.line());
            format!(
                "{name}: lines {} to {} were not imported: importing the list again adds \
                 whatever is missing and counts the rest as duplicates",
                line(batch.parsed().next()),
                line(batch.parsed().last())
            )
        })?
        .into_iter();
    drop(new);
    let mut reject = |line: u64, reason: &str| {
        counts.rejected += 1;
        if counts.rejected <= MAX_SHOWN {
            tracing::warn!("{name}:{line}: {reason}");
        }
    };
    // Rejected lines are told in the order of the list, among the others.
    for (_, parsed) in batch.parsed() {
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
    for chunk in batch.chunks.drain(..) {
        // Dropped here when the reading thread has ended.
        let _ = spent.send(chunk);
    }
    batch.lines = 0;
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
    tx: flume::Sender<Result<Chunk>>,
    to_reuse: flume::Receiver<Chunk>,
) {
    let handoff = |input: Box<dyn Read>| Handoff {
        input,
        chunk: Chunk::default(),
        tx: tx.clone(),
        to_reuse: to_reuse.clone(),
    };
    let mut reader = BufReader::with_capacity(
        256 * 1024,
        match input {
            Input::Stdin => handoff(Box::new(io::stdin())),
            Input::File(file) => handoff(Box::new(file)),
        },
    );
    if let Err(error) = parse_lines(&mut reader, name, suffix, format) {
        let _ = reader.get_mut().hand_over();
        let _ = tx.send(Err(error));
        return;
    }
    let _ = reader.get_mut().hand_over();
}

/// Parses the lines of `reader`; an error says where in the list, `name`.
fn parse_lines(
    reader: &mut BufReader<Handoff>,
    name: &str,
    suffix: &str,
    mut format: Option<Format>,
) -> Result<()> {
    let mut buf = Vec::new();
    let mut line = 0u64;
    let mut names = FileNames::new(suffix);
    while let Some(complete) = urlfile::read_line(reader, &mut buf).map_err(|error| {
        if error.kind() == io::ErrorKind::InvalidData {
            anyhow!("{name}:{}: {error}", line + 1)
        } else {
            anyhow!(error).context(format!("cannot read {name}"))
        }
    })? {
        line += 1;
        if format.is_none() && complete {
            format = Format::detect(&buf);
        }
        let parsed = if complete {
            urlfile::parse_line(&buf, line == 1, format.unwrap_or(Format::Lines))
        } else {
            Line::Reject(format!("line longer than {} bytes", urlfile::MAX_LINE))
        };
        let chunk = &mut reader.get_mut().chunk;
        match parsed {
            Line::Skip => continue,
            Line::Reject(reason) => chunk.lines.push(Parsed::Reject { line, reason }),
            Line::Entry(entry) => chunk.push_entry(line, entry, &mut names),
        }
        if chunk.is_full() {
            reader.get_mut().hand_over()?;
        }
    }
    Ok(())
}

/// The input of the reading thread. Before every read, which may wait,
/// it hands over the lines parsed so far, so that none is held back while
/// the input is slow.
struct Handoff {
    input: Box<dyn Read>,
    chunk: Chunk,
    tx: flume::Sender<Result<Chunk>>,
    /// Written chunks, to be filled again.
    to_reuse: flume::Receiver<Chunk>,
}

impl Handoff {
    fn hand_over(&mut self) -> io::Result<()> {
        if self.chunk.lines.is_empty() {
            return Ok(());
        }
        let mut next = self.to_reuse.try_recv().unwrap_or_default();
        next.clear();
        self.tx
            .send(Ok(std::mem::replace(&mut self.chunk, next)))
            .map_err(|_| io::Error::other("the import stopped"))
    }
}

impl Read for Handoff {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.hand_over()?;
        self.input.read(buf)
    }
}

/// New output file names: a version 7 UUID, which starts with the time,
/// and the extension. Each name sorts after the one before: within a
/// millisecond (or while the clock stands or goes back), the UUID's random
/// part is that of the name before plus one. An index on paths then only
/// ever grows at its end: PostgreSQL inserts into its rightmost page without
/// searching the tree, and fills each page before it starts the next, where
/// names in random order within a millisecond split pages in the middle.
/// The random part comes from fastrand: asking the system for it once per
/// URL took a twentieth of an import.
struct FileNames<'a> {
    suffix: &'a str,
    /// The milliseconds of the last name.
    millis: u64,
    /// The 74 random bits of the last name.
    random: u128,
}

/// A version 7 UUID's random bits: 12 in `rand_a`, 62 in `rand_b`.
const RANDOM_BITS: u32 = 74;

impl FileNames<'_> {
    fn new(suffix: &str) -> FileNames<'_> {
        FileNames {
            suffix,
            millis: 0,
            random: 0,
        }
    }

    /// Adds the next name to `text`.
    fn push_next(&mut self, text: &mut String) {
        let now = unix_ms(SystemTime::now()) as u64;
        let next = self.random + 1;
        if now > self.millis || next >> RANDOM_BITS != 0 {
            self.millis = now.max(self.millis + 1);
            // One bit short of the whole: room to count up from there.
            self.random = fastrand::u128(..) >> (128 - (RANDOM_BITS - 1));
        } else {
            self.random = next;
        }
        let (rand_a, rand_b) = (self.random >> 62, self.random & ((1 << 62) - 1));
        let uuid = Uuid::from_u128(
            (u128::from(self.millis) << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b,
        );
        text.push_str(uuid.hyphenated().encode_lower(&mut Uuid::encode_buffer()));
        text.push_str(self.suffix);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_names_are_version_7_uuids_in_ascending_order() {
        let mut names = FileNames::new(".json");
        let mut text = String::new();
        let mut last = String::new();
        for _ in 0..10_000 {
            text.clear();
            names.push_next(&mut text);
            let uuid = Uuid::parse_str(text.strip_suffix(".json").expect("the extension"))
                .expect("a UUID");
            assert_eq!(uuid.get_version_num(), 7, "{text}");
            assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122, "{text}");
            assert!(text > last, "{text} does not sort after {last}");
            last.clone_from(&text);
        }
        // A clock that goes back, or a millisecond's random part used up.
        names.millis += 1000;
        names.random = (1 << RANDOM_BITS) - 1;
        for _ in 0..3 {
            text.clear();
            names.push_next(&mut text);
            assert!(text > last, "{text} does not sort after {last}");
            last.clone_from(&text);
        }
    }
}
