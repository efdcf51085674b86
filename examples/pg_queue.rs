//! The PostgreSQL queue's own speed, without HTTP (see bench/pg_queue.sh
//! and bench/pg_scale.sh).
//!
//!     pg_queue [--urls N] [--batch B] [--runs R] [--import-batch I]
//!              [--fill N] [--batches K] [--keep] [--reuse SCHEMA]
//!
//! In a schema of its own on `JOBRUN_BENCH_PG` (default the tests' server,
//! postgres://postgres@127.0.0.1:5432/test), dropped at the end unless
//! `--keep`: imports N URLs over 1,000 hosts in batches of I (as `jobrun
//! import` does, 10,000), or with `--fill N` writes N pending rows straight
//! into the store's tables with `INSERT … SELECT generate_series` (indexes
//! built after, counters set to match), then R runs, each on its own
//! connection and thread, claim B rows at a time and complete the previous
//! batch as done in the same call (as the run owner does) until the queue is
//! empty, or until each has made K calls. Prints the seconds of each phase,
//! jobs per second, the median and 99th percentile of the calls' times, and
//! checks that every row claimed was completed exactly once. With `--keep`
//! it prints the `--db` URL of the schema, for `jobrun report`. With
//! `--reuse SCHEMA` it neither imports nor fills, nor drops: the runs claim
//! what a kept schema still holds (a 10,000,000-row fill takes minutes). It
//! also prints the five slowest calls, numbered run after run.

use std::io::Write;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use jobrun::domain::{
    Completion, Fetched, HostFilter, InsertResult, Liveness, NewUrl, RunEnd, RunStart, Validators,
    Work,
};
use jobrun::store::{Open, OpenOptions, PostgresStore, Store};

struct Options {
    urls: usize,
    batch: usize,
    runs: usize,
    import_batch: usize,
    fill: bool,
    batches: Option<usize>,
    keep: bool,
    reuse: Option<String>,
}

fn main() -> Result<()> {
    let mut options = Options {
        urls: 1_000_000,
        batch: 1024,
        runs: 1,
        import_batch: 10_000,
        fill: false,
        batches: None,
        keep: false,
        reuse: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--keep" {
            options.keep = true;
            continue;
        }
        if flag == "--reuse" {
            options.reuse = Some(args.next().context("--reuse needs a schema")?);
            continue;
        }
        let value: usize = args
            .next()
            .with_context(|| format!("{flag} needs a number"))?
            .parse()
            .with_context(|| format!("{flag} needs a number"))?;
        match flag.as_str() {
            "--urls" => options.urls = value,
            "--batch" => options.batch = value,
            "--runs" => options.runs = value,
            "--import-batch" => options.import_batch = value,
            "--fill" => {
                options.urls = value;
                options.fill = true;
            }
            "--batches" => options.batches = Some(value),
            other => bail!("unknown option {other}"),
        }
    }
    let base = std::env::var("JOBRUN_BENCH_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string());
    let mut admin = postgres::Client::connect(&base, postgres::NoTls)
        .with_context(|| format!("cannot connect to {base}"))?;
    let schema = match &options.reuse {
        Some(schema) => schema.clone(),
        None => {
            let schema = format!("jobrun_bench_{}", std::process::id());
            admin.batch_execute(&format!("CREATE SCHEMA {schema}"))?;
            schema
        }
    };
    let separator = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{separator}options=-c%20search_path%3D{schema}");
    let result = bench(&url, &options, &mut admin);
    let result = if options.keep || options.reuse.is_some() {
        // Said even when the benchmark failed: the schema is still there.
        let said = say(format_args!(
            "kept: --db '{url}' (DROP SCHEMA {schema} CASCADE when done)"
        ));
        result.and(said)
    } else {
        admin.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))?;
        result
    };
    match result {
        Err(e) if stdout_closed(&e) => Ok(()),
        result => result,
    }
}

/// Prints a line of the report. Whoever reads it may stop early (`| head
/// -1`): a closed stdout is an error that ends the benchmark, not a panic,
/// so that its schema is still dropped, and `main` then exits quietly.
fn say(line: std::fmt::Arguments<'_>) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(line)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush())
        .context("cannot write to stdout")
}

/// Whether `error` is a write to a stdout that nobody reads any more.
fn stdout_closed(error: &anyhow::Error) -> bool {
    error
        .downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}

fn open(url: &str) -> Result<PostgresStore> {
    let options = OpenOptions {
        lock_wait: Duration::from_secs(30),
        ..OpenOptions::new(Open::CreateIfMissing)
    };
    Ok(PostgresStore::open(url, &options)?)
}

fn bench(url: &str, options: &Options, admin: &mut postgres::Client) -> Result<()> {
    let mut store = open(url)?;
    let started = Instant::now();
    if options.reuse.is_some() {
        let counts = store.state_counts()?;
        say(format_args!(
            "reused: {} rows pending, {} done",
            counts.pending, counts.done
        ))?;
    } else if options.fill {
        fill(url, options.urls)?;
        say(format_args!(
            "fill: {} rows in {:.2} s",
            options.urls,
            started.elapsed().as_secs_f64()
        ))?;
    } else {
        let cpu_before = server_cpu(admin)?;
        let imported = import(&mut store, options.urls, options.import_batch)?;
        let secs = started.elapsed().as_secs_f64();
        let cpu = server_cpu(admin)? - cpu_before;
        say(format_args!(
            "import: {imported} URLs in {secs:.2} s ({:.0} URLs/s); server CPU {:.1} µs per URL",
            imported as f64 / secs,
            cpu * 1e6 / imported.max(1) as f64
        ))?;
    }
    let done_before = store.state_counts()?.done;
    // The runs start together, and stop together before their connections
    // close, so that the CPU time of the server's backends can be read.
    let gate = Arc::new(Barrier::new(options.runs + 1));
    let workers: Vec<_> = (0..options.runs)
        .map(|n| {
            let url = url.to_string();
            let (batch, batches) = (options.batch, options.batches);
            let gate = gate.clone();
            std::thread::spawn(move || work(&url, n as u32, batch, batches, &gate))
        })
        .collect();
    gate.wait();
    let cpu_before = server_cpu(admin)?;
    let started = Instant::now();
    gate.wait();
    gate.wait();
    let secs = started.elapsed().as_secs_f64();
    let cpu = server_cpu(admin)? - cpu_before;
    gate.wait();
    let mut jobs = 0;
    let mut calls = Vec::new();
    for worker in workers {
        let (done, times) = worker
            .join()
            .map_err(|_| anyhow::anyhow!("a run panicked"))??;
        jobs += done;
        calls.extend(times);
    }
    let mut slowest: Vec<(usize, Duration)> = calls.iter().copied().enumerate().collect();
    slowest.sort_by_key(|&(_, time)| std::cmp::Reverse(time));
    let slowest: Vec<String> = slowest
        .iter()
        .take(5)
        .map(|(n, time)| format!("#{} {:.1} ms", n + 1, time.as_secs_f64() * 1000.0))
        .collect();
    calls.sort();
    let at = |q: f64| calls[((calls.len() - 1) as f64 * q) as usize].as_secs_f64() * 1000.0;
    say(format_args!(
        "claim+complete: {jobs} jobs in {secs:.2} s ({:.0} jobs/s), {} run(s), batches of {}; \
         per call: median {:.1} ms, p99 {:.1} ms, {} calls; server CPU {:.1} µs per job",
        jobs as f64 / secs,
        options.runs,
        options.batch,
        at(0.5),
        at(0.99),
        calls.len(),
        cpu * 1e6 / jobs.max(1) as f64
    ))?;
    say(format_args!(
        "slowest calls (numbered run after run): {}",
        slowest.join(", ")
    ))?;
    let counts = store.state_counts()?;
    let drained = options.batches.is_none() && options.reuse.is_none();
    if counts.done.saturating_sub(done_before) != jobs as u64 || (drained && jobs != options.urls) {
        bail!(
            "{} rows done, {jobs} completed, of {}",
            counts.done.saturating_sub(done_before),
            options.urls
        );
    }
    Ok(())
}

/// Imports `urls` lines in batches of `import_batch`, made on a thread of
/// their own while the store writes the batch before (as `jobrun import`
/// reads its list), so that the figure is the store's.
fn import(store: &mut PostgresStore, urls: usize, import_batch: usize) -> Result<usize> {
    let import_batch = import_batch.max(1);
    let (batches, made) = std::sync::mpsc::sync_channel(1);
    let maker = std::thread::spawn(move || {
        let mut lines = Vec::with_capacity(import_batch);
        for i in 0..urls {
            let host = format!("h{}.example", i % 1000);
            lines.push((
                format!("https://{host}/items/{i}.json"),
                host,
                format!("{i}.json"),
            ));
            if lines.len() == import_batch || i + 1 == urls {
                let full = std::mem::replace(&mut lines, Vec::with_capacity(import_batch));
                if batches.send(full).is_err() {
                    return;
                }
            }
        }
    });
    store.expect_bulk_writes()?;
    let mut imported = 0;
    for lines in made {
        let batch: Vec<NewUrl<'_>> = lines
            .iter()
            .map(|(url, host, path)| NewUrl {
                url,
                request: None,
                request_hash: "",
                host,
                path,
                named: false,
            })
            .collect();
        imported += store
            .import(&batch)?
            .iter()
            .filter(|r| **r == InsertResult::Inserted)
            .count();
    }
    if maker.join().is_err() {
        bail!("the thread that makes the import's lines panicked");
    }
    store.finish_bulk_writes()?;
    Ok(imported)
}

/// N pending rows, as an import of the same URLs would leave them, written
/// with the tables' indexes dropped and built again after: minutes faster
/// at 10,000,000 rows than inserting through them.
fn fill(url: &str, urls: usize) -> Result<()> {
    let mut client = postgres::Client::connect(url, postgres::NoTls)?;
    client.batch_execute("SET maintenance_work_mem = '512MB'")?;
    let tables = "'requests'::regclass, 'jobs'::regclass";
    let constraints: Vec<(String, String, String)> = client
        .query(
            &format!(
                "SELECT conrelid::regclass::text, conname::text, pg_get_constraintdef(oid)
                 FROM pg_constraint WHERE conrelid IN ({tables}) AND contype IN ('p', 'u')"
            ),
            &[],
        )?
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    let indexes: Vec<(String, String)> = client
        .query(
            &format!(
                "SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index
                 WHERE indrelid IN ({tables})
                   AND NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conindid = indexrelid)"
            ),
            &[],
        )?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    for (name, _) in &indexes {
        client.batch_execute(&format!("DROP INDEX {name}"))?;
    }
    for (table, name, _) in &constraints {
        client.batch_execute(&format!("ALTER TABLE {table} DROP CONSTRAINT {name}"))?;
    }
    let n = urls as i64;
    client.execute(
        "INSERT INTO requests (url, host, path)
         SELECT 'https://h' || i % 1000 || '.example/items/' || i || '.json',
                'h' || i % 1000 || '.example', i || '.json'
         FROM generate_series(0, $1::bigint - 1) AS i",
        &[&n],
    )?;
    client.batch_execute(
        "INSERT INTO jobs (id, host) SELECT id, host FROM requests;
         INSERT INTO host_counts (slot, host, pending, done, failed, answers, status_429,
                                  status_503)
         SELECT 0, host, count(*), 0, 0, 0, 0, 0 FROM jobs GROUP BY host",
    )?;
    client.execute(
        "INSERT INTO tallies (slot, state, status, rows, bytes) VALUES (0, 'pending', 0, $1, 0)",
        &[&n],
    )?;
    for (table, name, definition) in &constraints {
        client.batch_execute(&format!(
            "ALTER TABLE {table} ADD CONSTRAINT {name} {definition}"
        ))?;
    }
    for (_, definition) in &indexes {
        client.batch_execute(definition)?;
    }
    client.batch_execute("VACUUM ANALYZE requests")?;
    client.batch_execute("VACUUM ANALYZE jobs")?;
    // The fill's gigabytes written out now, not while the claims are timed
    // (needs a superuser or pg_checkpoint; skipped without).
    if let Err(e) = client.batch_execute("CHECKPOINT") {
        say(format_args!("no CHECKPOINT after the fill: {e}"))?;
    }
    Ok(())
}

/// One run: claim, complete what it claimed last time, until nothing is left
/// or it has made `batches` calls; returns the jobs completed and the time
/// of each call.
fn work(
    url: &str,
    n: u32,
    batch: usize,
    batches: Option<usize>,
    gate: &Barrier,
) -> Result<(usize, Vec<Duration>)> {
    // Whatever happens, the gate is passed as often as the main thread expects.
    let mut passed = 0;
    let result = drain(url, n, batch, batches, gate, &mut passed);
    for _ in passed..4 {
        gate.wait();
    }
    result
}

fn drain(
    url: &str,
    n: u32,
    batch: usize,
    batches: Option<usize>,
    gate: &Barrier,
    passed: &mut usize,
) -> Result<(usize, Vec<Duration>)> {
    let mut pass = || {
        gate.wait();
        *passed += 1;
    };
    let mut store = open(url)?;
    let me = RunStart {
        pid: 1_000_000 + n,
        pid_ns: None,
        host: format!("bench-{n}"),
        boot_id: String::new(),
        proc_start: 0,
        command: "pg_queue".to_string(),
    };
    let run = store.start_run(&me, &|_| Liveness::Alive)?.id;
    pass();
    pass();
    let mut completions = Vec::new();
    let mut jobs = 0;
    let mut times = Vec::new();
    loop {
        let last = batches.is_some_and(|batches| times.len() + 1 >= batches);
        let started = Instant::now();
        let claims = store.complete_and_claim(
            run,
            &completions,
            if last { 0 } else { batch },
            &HostFilter::default(),
            Work::Fetch,
        )?;
        times.push(started.elapsed());
        jobs += completions.len();
        if claims.is_empty() {
            break;
        }
        completions = claims
            .iter()
            .map(|claim| Completion::Done {
                id: claim.id,
                lease: claim.lease,
                fetched: Fetched {
                    status: 200,
                    bytes: 1024,
                    sha256: [0; 32],
                    millis: 50,
                    validators: Validators::default(),
                },
            })
            .collect();
    }
    pass();
    pass();
    store.end_run(run, &RunEnd::Finished)?;
    Ok((jobs, times))
}

/// CPU seconds used so far by the PostgreSQL backends serving this process
/// (found by the local ports of its sockets): the server's share of the
/// work, whatever else loads the machine. Linux, server on this machine.
fn server_cpu(admin: &mut postgres::Client) -> Result<f64> {
    let mut inodes = Vec::new();
    for fd in std::fs::read_dir("/proc/self/fd")? {
        let target = std::fs::read_link(fd?.path()).unwrap_or_default();
        if let Some(inode) = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:["))
            .and_then(|t| t.strip_suffix(']'))
        {
            inodes.push(inode.to_string());
        }
    }
    let mut ports: Vec<i32> = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() > 9 && inodes.iter().any(|i| i == fields[9]) {
                let port = fields[1].rsplit(':').next().unwrap_or("0");
                ports.push(i32::from_str_radix(port, 16).unwrap_or(0));
            }
        }
    }
    let pids: Vec<i32> = admin
        .query(
            "SELECT pid FROM pg_stat_activity WHERE client_port = ANY($1)",
            &[&ports],
        )?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut ticks = 0u64;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("cannot read the CPU time of backend {pid}"))?;
        // Fields after the command's closing parenthesis: utime is the 12th, stime the 13th.
        let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        for field in fields.iter().skip(11).take(2) {
            ticks += field.parse::<u64>().unwrap_or(0);
        }
    }
    Ok(ticks as f64 / 100.0)
}
