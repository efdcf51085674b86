//! The PostgreSQL queue's own speed, without HTTP (see bench/pg_queue.sh).
//!
//!     pg_queue [--urls N] [--batch B] [--runs R] [--import-batch I]
//!
//! In a schema of its own on `JOBRUN_BENCH_PG` (default the tests' server,
//! postgres://postgres@127.0.0.1:5432/test), dropped at the end: imports N
//! URLs over 1,000 hosts in batches of I (as `jobrun import` does, 10,000),
//! then R runs, each on its own connection and thread, claim B rows at a
//! time and complete the previous batch as done in the same call (as the
//! run owner does) until the queue is empty. Prints the seconds of each
//! phase, jobs per second, and checks that every row is done exactly once.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use jobrun::domain::{
    Completion, Fetched, HostFilter, InsertResult, Liveness, NewUrl, RunEnd, RunStart, Validators,
    Work,
};
use jobrun::store::{Open, OpenOptions, PostgresStore, Store};

fn main() -> Result<()> {
    let mut urls = 1_000_000usize;
    let mut batch = 1024usize;
    let mut runs = 1usize;
    let mut import_batch = 10_000usize;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value: usize = args
            .next()
            .with_context(|| format!("{flag} needs a number"))?
            .parse()
            .with_context(|| format!("{flag} needs a number"))?;
        match flag.as_str() {
            "--urls" => urls = value,
            "--batch" => batch = value,
            "--runs" => runs = value,
            "--import-batch" => import_batch = value,
            other => bail!("unknown option {other}"),
        }
    }
    let base = std::env::var("JOBRUN_BENCH_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string());
    let schema = format!("jobrun_bench_{}", std::process::id());
    let mut admin = postgres::Client::connect(&base, postgres::NoTls)
        .with_context(|| format!("cannot connect to {base}"))?;
    admin.batch_execute(&format!("CREATE SCHEMA {schema}"))?;
    let separator = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{separator}options=-c%20search_path%3D{schema}");
    let result = bench(&url, urls, batch, runs, import_batch);
    admin.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))?;
    result
}

fn open(url: &str) -> Result<PostgresStore> {
    let options = OpenOptions {
        lock_wait: Duration::from_secs(30),
        ..OpenOptions::new(Open::CreateIfMissing)
    };
    Ok(PostgresStore::open(url, &options)?)
}

fn bench(url: &str, urls: usize, batch: usize, runs: usize, import_batch: usize) -> Result<()> {
    let mut store = open(url)?;
    let started = Instant::now();
    let mut lines = Vec::with_capacity(import_batch);
    let mut imported = 0;
    for i in 0..urls {
        let host = format!("h{}.example", i % 1000);
        lines.push((
            format!("https://{host}/items/{i}.json"),
            host,
            format!("{i}.json"),
        ));
        if lines.len() == import_batch || i + 1 == urls {
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
            lines.clear();
        }
    }
    let import_secs = started.elapsed().as_secs_f64();
    println!(
        "import: {imported} URLs in {import_secs:.2} s ({:.0} URLs/s)",
        imported as f64 / import_secs
    );
    let started = Instant::now();
    let workers: Vec<_> = (0..runs)
        .map(|n| {
            let url = url.to_string();
            std::thread::spawn(move || work(&url, n as u32, batch))
        })
        .collect();
    let mut jobs = 0;
    for worker in workers {
        jobs += worker
            .join()
            .map_err(|_| anyhow::anyhow!("a run panicked"))??;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "claim+complete: {jobs} jobs in {secs:.2} s ({:.0} jobs/s), {runs} run(s), batches of {batch}",
        jobs as f64 / secs
    );
    let counts = store.state_counts()?;
    if counts.done != urls as u64 || jobs != urls {
        bail!("{} rows done, {jobs} completed, of {urls}", counts.done);
    }
    Ok(())
}

/// One run: claim, complete what it claimed last time, until nothing is left.
fn work(url: &str, n: u32, batch: usize) -> Result<usize> {
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
    let mut completions = Vec::new();
    let mut jobs = 0;
    loop {
        let claims = store.complete_and_claim(
            run,
            &completions,
            batch,
            &HostFilter::default(),
            Work::Fetch,
        )?;
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
    store.end_run(run, &RunEnd::Finished)?;
    Ok(jobs)
}
