//! Stopping and resuming: kill -9, Ctrl-C, and two runs on one database.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use support::*;

#[test]
fn kill_9_mid_run_then_resume_gets_every_file_right() {
    let server = item_server(Duration::from_millis(10));
    let (job, urls) = Job::with_items(&server, 400);
    let mut child = job.spawn_run_until_hits(&["--workers", "8"], &server, 100);
    signal(&child, libc::SIGKILL);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), None, "killed by a signal");
    let killed_at = server.hit_count();
    assert!(killed_at < 400, "the run finished before the kill");
    let report = job.report_json();
    assert_eq!(report["last_run"]["state"], "killed", "{report}");
    assert!(
        report["last_run"]["resume"]
            .as_str()
            .unwrap()
            .contains(" run"),
        "{report}"
    );

    let done_at_the_kill: HashSet<String> = job
        .export()
        .into_iter()
        .filter(|(_, row)| row["state"] == "done")
        .map(|(url, _)| url)
        .collect();

    let output = job
        .spawn_run(&["--workers", "8"])
        .wait_with_output()
        .unwrap();
    assert_success(&output, "resumed run");
    // The killed run's URLs were taken back when the run started, not
    // after waiting for its heartbeat to grow old: a run that waited
    // would first say it was waiting for the killed one.
    let said = stderr(&output);
    assert!(said.contains("was cut short"), "{said}");
    assert!(said.contains("took back"), "{said}");
    assert!(!said.contains("nothing left to claim"), "{said}");
    job.assert_all_files_right(&server, &urls);
    // A kill costs at most a re-fetch: of a URL not yet done when it came,
    // once. How many were under way depends on how far the disk had got.
    for (path, hits) in server.hits_per_path() {
        let url = server.url(&path);
        assert!(hits <= 2, "{url} fetched {hits} times");
        assert!(
            hits == 1 || !done_at_the_kill.contains(&url),
            "{url} was done before the kill and fetched again"
        );
    }
    assert_eq!(job.report_json()["last_run"]["state"], "finished");
    for row in job.export().values() {
        assert_eq!(row["attempts"], 1, "a kill costs no attempt: {row}");
    }
}

#[test]
fn ctrl_c_exits_130_with_nothing_left_running_and_resume_finishes() {
    let server = item_server(Duration::from_millis(200));
    let (job, urls) = Job::with_items(&server, 60);
    let child = job.spawn_run_until_hits(&["--workers", "4"], &server, 6);
    let interrupted_at = Instant::now();
    signal(&child, libc::SIGINT);
    let output = child.wait_with_output().unwrap();
    let took = interrupted_at.elapsed();
    assert_eq!(output.status.code(), Some(130), "{}", stderr(&output));
    assert!(took < Duration::from_secs(4), "shutdown took {took:?}");
    let report = job.report_json();
    assert_eq!(report["running"], 0, "{report}");
    assert_eq!(report["last_run"]["state"], "interrupted");
    assert!(
        report["done"].as_u64().unwrap() >= 4,
        "in-flight requests were finished: {report}"
    );
    assert!(
        job.files()
            .iter()
            .all(|f| !f.to_string_lossy().contains(".jobrun-tmp"))
    );

    assert_success(&job.run(&["--workers", "8"]), "resumed run");
    job.assert_all_files_right(&server, &urls);
}

#[test]
fn a_second_ctrl_c_exits_at_once() {
    let server = Server::start(|_| Reply::Stall(Duration::from_secs(20)));
    let job = Job::with_urls(&item_urls(&server, 4));
    let mut child = job.spawn_run(&["--workers", "4", "--timeout", "60s"]);
    let lines = stderr_lines(&mut child);
    server.wait_for_hits(4, "requests");
    signal(&child, libc::SIGINT);
    lines
        .recv_timeout(Duration::from_secs(5))
        .expect("the first Ctrl-C is acknowledged");
    let start = Instant::now();
    signal(&child, libc::SIGINT);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    // The grace period for in-flight requests is 1.5 s; this must not wait for it.
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    // The rows left running are taken back by the next run.
    let report = job.report_json();
    assert_eq!(report["last_run"]["state"], "killed", "{report}");
    assert_eq!(report["running"], 4);
}

#[test]
fn two_runs_on_one_database_never_fetch_a_url_twice() {
    let server = item_server(Duration::from_millis(2));
    let (job, urls) = Job::with_items(&server, 600);
    let first = job.spawn_run(&["--workers", "6"]);
    let second = job.spawn_run(&["--workers", "6"]);
    let first = first.wait_with_output().unwrap();
    let second = second.wait_with_output().unwrap();
    assert_success(&first, "first run");
    assert_success(&second, "second run");
    assert_no_url_fetched_twice(&server);
    assert_eq!(server.hit_count(), 600);
    job.assert_all_files_right(&server, &urls);
}
