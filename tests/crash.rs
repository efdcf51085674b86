//! Crashes, on purpose and at every step: a storm of `kill -9` at random
//! moments of runs against a server that fails in every way it can, and a
//! crash right after each step of making a body durable. After each, the
//! next run must restore every invariant: done means durable, one URL one
//! file, no debris, retry budgets kept, resume at once.

mod support;

use std::collections::HashSet;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use support::*;

/// The faults of `hostile_item_server`, by item; None for a well-behaved
/// item. The number says on how many first requests the fault happens.
fn fault_of(item: u64) -> Option<(&'static str, usize)> {
    // A fixed scramble of the item number, so faults are spread evenly and
    // the same on every run of the test.
    let roll = item.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 57; // 0..128
    let times = 1 + (item % 2) as usize;
    Some(match roll {
        0..=3 => ("500", times),
        4..=5 => ("502", times),
        6..=7 => ("503", times),
        8..=9 => ("504", 1),
        10 => ("429", 1),
        11..=13 => ("reset", times),
        14..=15 => ("short", times),
        16 => ("stall", 1),
        _ => return None,
    })
}

/// Items with 0–5 ms of latency, about one in seven failing its first one
/// or two requests: 5xx, 429 with Retry-After, a reset mid-body, a body
/// shorter than its Content-Length, or a stall past the client's timeout.
fn hostile_item_server() -> Server {
    Server::start(|request| {
        let Some(item) = item_of(&request.path) else {
            return Reply::status(404);
        };
        let body = item_body(item);
        let reply = match fault_of(item) {
            Some((fault, times)) if request.previous < times => match fault {
                "429" => Reply::status(429).with_header("Retry-After", "1"),
                "reset" => {
                    let sent = body.len() / 2;
                    Reply::ResetMidBody { body, sent }
                }
                "short" => {
                    let claimed = body.len() + 10;
                    Reply::ShortBody { body, claimed }
                }
                "stall" => Reply::Stall(Duration::from_secs(3)),
                status => Reply::status(status.parse().unwrap()),
            },
            _ => Reply::ok(body),
        };
        reply.jittered(Duration::ZERO, Duration::from_millis(5))
    })
}

const MAX_ATTEMPTS: u64 = 5;

/// Options for every run of the storm: short timeouts and backoff so that
/// faults cost little time.
const STORM_RUN: &[&str] = &[
    "--workers",
    "16",
    "--timeout",
    "1s",
    "--backoff-base",
    "20ms",
    "--backoff-max",
    "200ms",
    "--max-attempts",
    "5",
];

fn assert_attempts_within_budget(job: &Job, server: &Server) {
    let hits = server.hits_per_path();
    for (url, row) in job.export() {
        let attempts = row["attempts"].as_u64().unwrap();
        assert!(attempts <= MAX_ATTEMPTS, "{url}: {attempts} attempts");
        let path = url.strip_prefix(&server.url("")).unwrap();
        let fetched = hits.get(path).copied().unwrap_or(0) as u64;
        assert!(
            attempts <= fetched,
            "{url}: {attempts} attempts recorded, {fetched} requests seen"
        );
    }
}

/// Time from starting a run to its first request at the server.
fn first_request_after(server: &Server, started: Instant, before: usize) -> Duration {
    wait_for(Duration::from_secs(10), "the run's first request", || {
        server.hit_count() > before
    });
    let hits = server.hits();
    hits[before..]
        .iter()
        .map(|hit| hit.at)
        .min()
        .expect("a request")
        .saturating_duration_since(started)
}

#[test]
fn kill_storm_then_a_final_run_gets_every_file_right() {
    let server = hostile_item_server();
    let job = Job::new();
    let urls = item_urls(&server, 2000);
    let faulty = (0..2000).filter(|&i| fault_of(i).is_some()).count();
    assert!(faulty >= 200, "only {faulty} of 2000 URLs meet a fault");
    job.import(&urls);

    // KILL_STORM_SEED=N replays the kill moments of an earlier run.
    let seed = std::env::var("KILL_STORM_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("kill storm: seed {seed}, {faulty} of 2000 URLs meet a fault");
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut kills = 0;
    let mut first_requests = Vec::new();
    for cycle in 0..40 {
        if kills == 12 {
            break;
        }
        let before = server.hit_count();
        let started = Instant::now();
        let mut child = job.spawn_run(STORM_RUN);
        if rng.bool() {
            // Anywhere in the run's first moments: reclaiming, cleaning up,
            // claiming, the first commits.
            std::thread::sleep(Duration::from_millis(rng.u64(0..300)));
        } else {
            first_requests.push(first_request_after(&server, started, before));
            let more = rng.usize(20..150);
            wait_for(Duration::from_secs(60), "requests", || {
                server.hit_count() >= before + more || child.try_wait().unwrap().is_some()
            });
        }
        if child.try_wait().unwrap().is_some() {
            panic!("cycle {cycle}: the run ended before its kill (seed {seed})");
        }
        signal(&child, libc::SIGKILL);
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
        kills += 1;
        job.assert_done_rows_have_their_files();
        assert_attempts_within_budget(&job, &server);
    }
    assert!(kills >= 10, "{kills} kills (seed {seed})");
    let done_before_final = job.report_json()["done"].as_u64().unwrap();
    assert!(done_before_final < 2000, "nothing left for the final run");

    let before = server.hit_count();
    let started = Instant::now();
    let child = job.spawn_run(STORM_RUN);
    first_requests.push(first_request_after(&server, started, before));
    let output = child.wait_with_output().unwrap();
    assert_success(&output, "the final run");

    job.assert_all_files_right(&server, &urls);
    assert_attempts_within_budget(&job, &server);
    let slowest = first_requests.iter().max().unwrap();
    eprintln!(
        "kill storm: {kills} kills, {done_before_final} done before the final run, \
         {} requests in all, slowest first request after a start {slowest:?}",
        server.hit_count()
    );
    assert!(
        *slowest < Duration::from_millis(1500),
        "a run's first request came {slowest:?} after its start: {first_requests:?}"
    );
    let unfinished = runs_where(&job, "ended_at IS NULL");
    assert_eq!(unfinished, 0, "a killed run was never marked ended");
}

/// How many runs the database records under `condition`.
fn runs_where(job: &Job, condition: &str) -> i64 {
    job.sql()
        .query_row(
            &format!("SELECT count(*) FROM runs WHERE {condition}"),
            [],
            |row| row.get(0),
        )
        .unwrap()
}

/// Files in the output folder (outside its temp area) that belong to no
/// done row: bodies renamed into place whose commit never came.
fn files_of_no_done_row(job: &Job) -> Vec<PathBuf> {
    let done: HashSet<PathBuf> = job
        .export()
        .values()
        .filter(|row| row["state"] == "done")
        .map(|row| PathBuf::from(row["path"].as_str().unwrap()))
        .collect();
    job.files()
        .into_iter()
        .filter(|f| !f.starts_with(job.out().join(TEMP_DIR)) && !done.contains(f))
        .collect()
}

#[test]
fn a_crash_after_any_step_of_the_durability_protocol_costs_at_most_a_refetch() {
    // Each step is crashed at on its second or third pass, so that earlier
    // batches are committed and the crash lands in the middle of a run.
    for armed in [
        "temp-written:2",
        "data-synced:2",
        "renamed:3",
        "names-synced:2",
        "committed:2",
    ] {
        let server = item_server(Duration::from_millis(5));
        let (job, urls) = Job::with_items(&server, 100);
        job.run_crashing_at(armed, &["--workers", "4"]);

        // Before any repair: no done row lacks its file.
        let done = job.assert_done_rows_have_their_files();
        assert!(done < 100, "{armed}: everything was done before the crash");
        let temps = job.temp_files();
        let orphans = files_of_no_done_row(&job);
        match armed.split(':').next().unwrap() {
            // Bodies written, not yet renamed: only temp files hold them.
            "temp-written" | "data-synced" => {
                assert!(!temps.is_empty(), "{armed}: no temp file left");
                assert!(orphans.is_empty(), "{armed}: renamed early: {orphans:?}");
            }
            // Renamed into place, not committed: files no done row owns.
            "renamed" | "names-synced" => {
                assert!(
                    !orphans.is_empty(),
                    "{armed}: no file renamed before the crash"
                )
            }
            _ => assert!(orphans.is_empty(), "{armed}: {orphans:?}"),
        }

        let resumed = job.run(&["--workers", "4"]);
        assert_success(&resumed, armed);
        job.assert_all_files_right(&server, &urls);
        let report = job.report_json();
        assert_eq!(report["last_run"]["state"], "finished", "{armed}");
        for (url, row) in job.export() {
            assert_eq!(
                row["attempts"], 1,
                "{armed}: a crash cost an attempt: {url}"
            );
        }
        let fetched_twice = server.hits_per_path().values().filter(|&&n| n > 1).count();
        assert!(
            server.hits_per_path().values().all(|&n| n <= 2),
            "{armed}: a URL was fetched more than twice"
        );
        let killed = runs_where(&job, "outcome = 'killed'");
        assert_eq!(
            killed, 1,
            "{armed}: the crashed run is not recorded as killed"
        );
        eprintln!(
            "{armed}: {done} done at the crash, {} temp files, {} renamed without a commit, \
             {fetched_twice} fetched again",
            temps.len(),
            orphans.len()
        );
    }
}
