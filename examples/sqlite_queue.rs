//! The SQLite queue's own CPU cost per outcome, without HTTP: what the
//! thread that owns the database spends in `complete_and_claim`.
//!
//!     sqlite_queue DB [--urls N] [--batch B] [--origins O]
//!
//! Imports N URLs over O origins into a new database DB, then claims B rows
//! at a time and records the previous batch's outcomes in the same call, as
//! a run does, until the queue is empty: of every 16 outcomes, 12 bodies
//! (200), one 404 and one 410 (failed), one 503 and one reset (retried, due
//! at once). Prints the CPU time of this thread in those calls, per
//! outcome.

use anyhow::{Context, Result, bail};
use jobrun::domain::{
    Completion, Fetched, HostFilter, Liveness, NewUrl, RunEnd, RunStart, Validators, Work,
};
use jobrun::store::{Open, OpenOptions, SqliteStore, Store};

fn thread_cpu_ns() -> u128 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for the call to write.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    now.tv_sec as u128 * 1_000_000_000 + now.tv_nsec as u128
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let db = args
        .next()
        .context("usage: sqlite_queue DB [--urls N] [--batch B] [--origins O]")?;
    let (mut urls, mut batch, mut origins) = (20_000usize, 200usize, 10usize);
    while let Some(flag) = args.next() {
        let value: usize = args
            .next()
            .with_context(|| format!("{flag} needs a number"))?
            .parse()
            .with_context(|| format!("{flag} needs a number"))?;
        match flag.as_str() {
            "--urls" => urls = value,
            "--batch" => batch = value,
            "--origins" => origins = value,
            other => bail!("unknown option {other}"),
        }
    }
    let mut store = SqliteStore::open(db.as_ref(), &OpenOptions::new(Open::CreateIfMissing))?;
    let hosts: Vec<String> = (0..origins).map(|o| format!("h{o}.test")).collect();
    let lines: Vec<String> = (0..urls)
        .map(|i| format!("http://{}/items/{i}.json", hosts[i % origins]))
        .collect();
    let paths: Vec<String> = (0..urls).map(|i| format!("{i}.json")).collect();
    let new: Vec<NewUrl<'_>> = (0..urls)
        .map(|i| NewUrl {
            url: &lines[i],
            request: None,
            request_hash: "",
            host: &hosts[i % origins],
            path: &paths[i],
            named: false,
        })
        .collect();
    for chunk in new.chunks(10_000) {
        store.import(chunk)?;
    }
    let me = RunStart {
        pid: std::process::id(),
        pid_ns: None,
        host: "bench".to_string(),
        boot_id: String::new(),
        proc_start: 0,
        command: "sqlite_queue".to_string(),
    };
    let run = store.start_run(&me, &|_| Liveness::Alive)?.id;
    let (mut completions, mut outcomes, mut calls, mut cpu) = (Vec::new(), 0usize, 0usize, 0u128);
    let mut n = 0u64;
    loop {
        let started = thread_cpu_ns();
        let claims = store.complete_and_claim(
            run,
            &completions,
            batch,
            &HostFilter::default(),
            Work::Fetch,
        )?;
        cpu += thread_cpu_ns() - started;
        outcomes += completions.len();
        calls += 1;
        if claims.is_empty() {
            break;
        }
        completions = claims
            .iter()
            .map(|claim| {
                n += 1;
                let (id, lease) = (claim.id, claim.lease);
                match n % 16 {
                    0 => Completion::Failed {
                        id,
                        lease,
                        status: Some(404),
                        error: "HTTP 404 Not Found".into(),
                        millis: 3,
                    },
                    1 => Completion::Failed {
                        id,
                        lease,
                        status: Some(410),
                        error: "HTTP 410 Gone".into(),
                        millis: 3,
                    },
                    2 => Completion::Retry {
                        id,
                        lease,
                        status: Some(503),
                        error: "HTTP 503 Service Unavailable".into(),
                        next_attempt_at: 1,
                        millis: 3,
                    },
                    3 => Completion::Retry {
                        id,
                        lease,
                        status: None,
                        error: "connection reset".into(),
                        next_attempt_at: 1,
                        millis: 3,
                    },
                    _ => Completion::Done {
                        id,
                        lease,
                        fetched: Fetched {
                            status: 200,
                            bytes: 20_000 + n % 1000,
                            sha256: [7; 32],
                            millis: 2,
                            validators: Validators::default(),
                        },
                    },
                }
            })
            .collect();
    }
    store.end_run(run, &RunEnd::Finished)?;
    println!(
        "{outcomes} outcomes in {calls} calls of up to {batch}: {:.3} s CPU, {:.2} us per outcome",
        cpu as f64 / 1e9,
        cpu as f64 / 1e3 / outcomes as f64
    );
    Ok(())
}
