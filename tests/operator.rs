//! What an operator sees and does: JSON Lines requests, the report,
//! `retry`, `verify`, politeness per host, logging, completions.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

#[test]
fn json_lines_send_method_headers_and_body_into_named_files() {
    let server = Server::start(|request| {
        let echo = format!(
            "{} {} {} {}",
            request.method,
            request.path,
            request.header("x-shop").unwrap_or("-"),
            String::from_utf8_lossy(&request.body)
        );
        Reply::ok(echo.into_bytes())
    });
    let job = Job::new();
    let lines = [
        format!(
            r#"{{"url": "{}", "method": "POST", "headers": {{"X-Shop": "north"}}, "body": {{"id": 17}}, "name": "orders/17.json"}}"#,
            server.url("/orders")
        ),
        format!(
            r#"{{"url": "{}", "method": "POST", "body": "id=18", "name": "orders/18.txt"}}"#,
            server.url("/orders")
        ),
        format!(r#"{{"url": "{}"}}"#, server.url("/plain")),
        format!(
            r#"{{"url": "{}", "name": "../escape.json"}}"#,
            server.url("/x")
        ),
        format!(
            r#"{{"url": "{}", "name": "orders/17.json"}}"#,
            server.url("/other")
        ),
        format!(
            r#"{{"url": "{}", "name": "orders/17.json/inner"}}"#,
            server.url("/inner")
        ),
        format!(
            r#"{{"url": "{}", "name": "orders"}}"#,
            server.url("/folder")
        ),
    ];
    job.write("jobs.jsonl", lines.join("\n"));
    let output = job.jobrun(&["import", "jobs.jsonl"]);
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{message}");
    assert!(
        message.contains("jobs.jsonl:4: \"name\" \"../escape.json\""),
        "{message}"
    );
    assert!(
        message.contains("jobs.jsonl:5: \"name\" \"orders/17.json\" is already used"),
        "{message}"
    );
    assert!(
        message.contains("jobs.jsonl:6:") && message.contains("another URL's file"),
        "{message}"
    );
    assert!(
        message.contains("jobs.jsonl:7:") && message.contains("is a folder of another URL's file"),
        "{message}"
    );
    assert!(
        message.contains("3 imported, 0 duplicate, 4 rejected"),
        "{message}"
    );

    job.run_ok(&["--user-agent", "shop-sync/2"]);
    let read = |name: &str| std::fs::read_to_string(job.out().join(name)).unwrap();
    assert_eq!(read("orders/17.json"), r#"POST /orders north {"id":17}"#);
    assert_eq!(read("orders/18.txt"), "POST /orders - id=18");
    let agents: Vec<String> = server
        .hits()
        .iter()
        .map(|h| {
            h.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("user-agent"))
                .unwrap()
                .1
                .clone()
        })
        .collect();
    assert!(agents.iter().all(|a| a == "shop-sync/2"), "{agents:?}");
}

on_both_backends! {
    fn the_same_url_with_two_bodies_is_two_jobs(backend) {
        let server = echo_server();
        let job = Job::on(backend);
        let url = server.url("/search");
        let lines = [
            format!(r#"{{"url": "{url}", "method": "POST", "body": "q=a"}}"#),
            format!(r#"{{"url": "{url}", "method": "POST", "body": "q=b"}}"#),
            format!(r#"{{"url": "{url}", "method": "POST", "body": "q=a"}}"#),
        ];
        job.write("jobs.jsonl", lines.join("\n"));
        let output = job.jobrun(&["import", "--format", "jsonl", "jobs.jsonl"]);
        assert_stderr_contains(&output, "2 imported, 1 duplicate");
        job.run_ok(&[]);
        let mut bodies: Vec<String> = job
            .files()
            .iter()
            .map(|f| std::fs::read_to_string(f).unwrap())
            .collect();
        bodies.sort();
        assert_eq!(bodies, ["q=a", "q=b"]);
    }
}

on_both_backends! {
    fn the_report_explains_hosts_errors_durations_and_runs(backend) {
        let good = item_server(Duration::from_millis(5));
        let bad = Server::start(|request| match item_of(&request.path) {
            Some(0) => Reply::status(404),
            Some(i) => Reply::ok(item_body(i)),
            None => Reply::status(404),
        });
        let job = Job::on(backend);
        let mut urls = item_urls(&good, 4);
        urls.extend(item_urls(&bad, 3));
        job.import(&urls);
        assert_eq!(job.run(&[]).status.code(), Some(1));
        let report = job.report_json();
        let hosts = report["hosts"].as_array().unwrap();
        assert_eq!(hosts.len(), 2, "{report}");
        let bad_host = hosts.iter().find(|h| h["failed"] == 1).unwrap();
        assert_eq!(bad_host["done"], 2);
        let error = &report["errors"][0];
        assert_eq!(error["error"], "HTTP 404 Not Found");
        assert_eq!(error["example"], bad.url("/items/0.json"));
        let durations = &report["durations"];
        assert_eq!(durations["requests"], 7, "{report}");
        assert!(durations["p50_ms"].as_f64().unwrap() <= durations["p99_ms"].as_f64().unwrap());
        assert_eq!(report["runs"].as_array().unwrap().len(), 1);
        assert!(report["runs"][0]["urls_per_s"].as_f64().unwrap() > 0.0);

        let text = job.report_text();
        for part in [
            "Hosts:",
            "e.g. ",
            "Request times (7 requests): p50",
            "Last run #1: finished",
            "URLs/s",
        ] {
            assert!(text.contains(part), "{part} missing from:\n{text}");
        }
        let failed = job.jobrun(&["report", "--failed"]);
        let listed = String::from_utf8(failed.stdout).unwrap();
        assert_eq!(
            listed.trim(),
            format!("{}\tHTTP 404 Not Found", bad.url("/items/0.json"))
        );
        let failed_json = job.jobrun(&["report", "--failed", "--json"]);
        let row: Value = serde_json::from_slice(&failed_json.stdout).unwrap();
        assert_eq!(row["http_status"], 404);
    }
}

on_both_backends! {
    fn retry_sends_matching_failures_back_with_a_fresh_budget(backend) {
        let fixed = Arc::new(Mutex::new(false));
        let flag = fixed.clone();
        let server = Server::start(move |request| match item_of(&request.path) {
            Some(i) if i < 2 && !*flag.lock().unwrap() => Reply::status(404),
            Some(2) if !*flag.lock().unwrap() => Reply::status(410),
            Some(i) => Reply::ok(item_body(i)),
            None => Reply::status(404),
        });
        let (job, urls) = Job::with_items_on(backend, &server, 4);
        assert_eq!(job.run(&[]).status.code(), Some(1));
        assert_eq!(job.report_json()["failed"], 3);
        *fixed.lock().unwrap() = true;

        let output = job.jobrun(&["retry", "--status", "404"]);
        assert_success(&output, "retry");
        assert_stderr_contains(
            &output,
            "2 failed URLs with HTTP status 404 are pending again",
        );
        let report = job.report_json();
        assert_eq!(
            (report["failed"].as_u64(), report["pending"].as_u64()),
            (Some(1), Some(2))
        );
        let output = job.jobrun(&["retry", "--error", "410 Gone"]);
        assert_stderr_contains(&output, "1 failed URLs whose error contains");
        assert_success(&job.run(&[]), "run after retry");
        job.assert_all_files_right(&server, &urls);
        for row in job.export().values() {
            assert_eq!(row["attempts"], 1, "the budget was fresh: {row}");
        }
    }
}

on_both_backends! {
    fn verify_finds_missing_and_damaged_files_and_requeue_repairs_them(backend) {
        let server = item_server(Duration::ZERO);
        let (job, urls) = Job::with_items_on(backend, &server, 5);
        job.run_ok(&[]);
        assert_success(&job.jobrun(&["verify"]), "verify of a good job");

        let rows = job.export();
        let missing = rows[&urls[0]]["path"].as_str().unwrap().to_string();
        let damaged = rows[&urls[1]]["path"].as_str().unwrap().to_string();
        let flipped = rows[&urls[2]]["path"].as_str().unwrap().to_string();
        std::fs::remove_file(&missing).unwrap();
        std::fs::write(&damaged, b"short").unwrap();
        let mut bytes = std::fs::read(&flipped).unwrap();
        bytes[10] ^= 1;
        std::fs::write(&flipped, bytes).unwrap();

        let output = job.jobrun(&["verify"]);
        assert_eq!(output.status.code(), Some(1));
        let listed = String::from_utf8(output.stdout).unwrap();
        assert!(listed.contains(&format!("missing: {missing}")), "{listed}");
        assert!(
            listed.contains("damaged: 5 bytes") && listed.contains(&damaged),
            "{listed}"
        );
        assert!(
            listed.contains(&format!("damaged: sha256 differs: {flipped}")),
            "{listed}"
        );
        assert_eq!(listed.lines().count(), 3);

        assert_eq!(job.jobrun(&["verify", "--requeue"]).status.code(), Some(1));
        assert_eq!(job.report_json()["pending"], 3);
        assert_success(&job.run(&[]), "run after requeue");
        job.assert_all_files_right(&server, &urls);
        assert_success(&job.jobrun(&["verify"]), "verify after repair");
    }
}

#[test]
fn per_host_workers_caps_requests_in_flight_to_one_host() {
    let server = item_server(Duration::from_millis(20));
    let job = Job::with_urls(&item_urls(&server, 30));
    job.run_ok(&["--workers", "10", "--per-host-workers", "2"]);
    assert_eq!(server.most_in_flight(), 2);
}

#[test]
fn per_host_rate_spaces_one_host_and_not_another() {
    let slow = item_server(Duration::ZERO);
    let fast = item_server(Duration::ZERO);
    let job = Job::new();
    let mut urls = item_urls(&slow, 11);
    urls.extend(item_urls(&fast, 11));
    job.import(&urls);
    job.run_ok(&["--workers", "4", "--per-host-rate", "10/s"]);
    // Each host has the rate to itself: both are spaced, whatever the
    // other does. How long the whole run took is left to the benchmarks:
    // on a loaded machine, start-up and the filesystem syncs alone took
    // more than 10 s.
    for server in [&slow, &fast] {
        let mut times: Vec<Instant> = server.hits().into_iter().map(|h| h.at).collect();
        times.sort();
        assert_eq!(times.len(), 11);
        let span = *times.last().unwrap() - times[0];
        eprintln!("11 requests to {} over {span:?}", server.url(""));
        // 11 requests at 10/s are sent over 1 s at least. A hit is timed
        // when the server's thread gets to it: on a loaded machine the
        // first can be timed late by a wait for a CPU (tens of
        // milliseconds), which shortens the span seen here, so 200 ms are
        // left for that. Without the limit the 11 take a few milliseconds.
        assert!(
            span >= Duration::from_millis(800),
            "11 requests at 10/s to {} took {span:?}",
            server.url("")
        );
    }
}

/// A server that allows `per_second` requests (a token bucket of five) and
/// answers 429 to the rest, like many rate-limited APIs.
fn rate_limited_server(per_second: f64) -> Server {
    let bucket = Mutex::new((5.0f64, Instant::now()));
    Server::start(move |request| {
        let mut bucket = bucket.lock().unwrap();
        let now = Instant::now();
        bucket.0 = (bucket.0 + (now - bucket.1).as_secs_f64() * per_second).min(5.0);
        bucket.1 = now;
        if bucket.0 < 1.0 {
            return Reply::status(429);
        }
        bucket.0 -= 1.0;
        match item_of(&request.path) {
            Some(i) => Reply::ok(item_body(i)),
            None => Reply::status(404),
        }
    })
}

fn throttled_run(adaptive: bool) -> (usize, Value) {
    let server = rate_limited_server(40.0);
    let job = Job::with_urls(&item_urls(&server, 120));
    let mut args = vec![
        "--workers",
        "16",
        "--max-attempts",
        "20",
        "--backoff-base",
        "100ms",
    ];
    if !adaptive {
        args.push("--no-adaptive");
    }
    assert_success(&job.run(&args), "run against a rate-limited server");
    (server.hit_count(), job.report_json())
}

#[test]
fn adaptive_throttling_wastes_fewer_requests_on_429s() {
    let (with, report) = throttled_run(true);
    assert_eq!(report["done"], 120);
    let (without, report) = throttled_run(false);
    assert_eq!(report["done"], 120);
    // 120 URLs: every request past 120 was answered 429.
    let (wasted_with, wasted_without) = (with - 120, without - 120);
    eprintln!("429s with adaptive throttling: {wasted_with}, without: {wasted_without}");
    assert!(
        wasted_with * 2 < wasted_without,
        "429s with adaptive throttling: {wasted_with}, without: {wasted_without}"
    );
}

#[test]
fn status_lines_show_counts_rates_and_paused_hosts_when_not_on_a_terminal() {
    let server = faulty_item_server(Duration::from_millis(20), |item, earlier| {
        (item == 0 && earlier == 0).then(|| Reply::status(429).with_header("Retry-After", "2"))
    });
    let job = Job::with_urls(&item_urls(&server, 60));
    let output = job.run(&[
        "--workers",
        "2",
        "--progress-every",
        "300ms",
        "--backoff-base",
        "1ms",
    ]);
    assert_success(&output, "run");
    let text = stderr(&output);
    let status: Vec<&str> = text.lines().filter(|l| l.contains(" done, ")).collect();
    assert!(status.len() >= 2, "{text}");
    assert!(
        status
            .iter()
            .any(|l| l.contains("/60 done") && l.contains("URLs/s") && l.contains("ETA")),
        "{text}"
    );
    assert!(
        status.iter().any(|l| l.contains("paused")),
        "no paused host shown:\n{text}"
    );
}

on_both_backends! {
    fn report_works_while_a_run_is_going(backend) {
        let server = item_server(Duration::from_millis(10));
        let job = Job::with_urls_on(backend, &item_urls(&server, 400));
        let child = job.spawn_run(&["--workers", "4"]);
        wait_for(Duration::from_secs(30), "the run to start", || {
            server.hit_count() > 20
        });
        let mut seen_running = false;
        for _ in 0..5 {
            let report = job.report_json();
            let done = report["done"].as_u64().unwrap();
            assert!(done <= 400);
            seen_running |=
                report["last_run"]["state"] == "running" && report["last_run"]["resume"].is_null();
        }
        assert!(seen_running, "the report did not see the run going");
        let output = child.wait_with_output().unwrap();
        assert_success(&output, "run with reports alongside");
        assert_eq!(job.report_json()["done"], 400);
    }
}

#[test]
fn logging_is_verbose_json_or_quiet_on_request() {
    let server = faulty_item_server(Duration::ZERO, |_, earlier| {
        (earlier == 0).then(|| Reply::status(500))
    });
    let (job, urls) = Job::with_items(&server, 2);
    let verbose = job.run(&["-v", "--backoff-base", "1ms"]);
    let text = stderr(&verbose);
    assert!(
        text.contains("debug: retry") && text.contains("HTTP 500"),
        "{text}"
    );

    let job = Job::with_urls(&urls);
    let json = job.jobrun(&["--log-format", "json", "run", "--backoff-base", "1ms"]);
    assert_success(&json, "run with json logs");
    for line in stderr(&json).lines() {
        let event: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert!(
            event.get("level").is_some() && event.get("message").is_some(),
            "{line}"
        );
    }

    let job = Job::with_urls(&urls);
    let quiet = job.run(&["--quiet", "--backoff-base", "1ms"]);
    assert_success(&quiet, "quiet run");
    assert_eq!(stderr(&quiet), "", "--quiet printed something");
}

#[test]
fn completions_and_man_page_are_generated() {
    let job = Job::new();
    let bash = job.jobrun(&["completions", "bash"]);
    assert_success(&bash, "completions");
    let script = String::from_utf8(bash.stdout).unwrap();
    assert!(
        script.contains("jobrun") && script.contains("verify"),
        "{script}"
    );
    let man = job.jobrun(&["man"]);
    assert_success(&man, "man");
    let page = String::from_utf8(man.stdout).unwrap();
    assert!(
        page.starts_with(".ie") || page.contains(".TH jobrun"),
        "{page}"
    );
}

#[test]
fn a_terminal_shows_a_progress_bar_with_count_rate_and_eta() {
    let tmux = |args: &[&str]| {
        std::process::Command::new("tmux")
            .args(["-L", &format!("jobrun-test-{}", std::process::id())])
            .args(args)
            .output()
            .expect("tmux is needed for this test (apt-get install tmux)")
    };
    let server = faulty_item_server(Duration::from_millis(25), |item, earlier| {
        (item == 7 && earlier == 0).then(|| Reply::status(500))
    });
    let job = Job::with_urls(&item_urls(&server, 300));
    let command = format!(
        "env -u http_proxy -u HTTP_PROXY -u https_proxy -u HTTPS_PROXY -u ALL_PROXY {} --db {} run -v --workers 2 --backoff-base 1ms; sleep 30",
        env!("CARGO_BIN_EXE_jobrun"),
        job.db().display()
    );
    let started = tmux(&[
        "new-session",
        "-d",
        "-s",
        "progress",
        "-x",
        "160",
        "-y",
        "20",
        &command,
    ]);
    assert_success(&started, "tmux new-session");
    let mut screen = String::new();
    wait_for(
        Duration::from_secs(30),
        "a progress bar with rate and ETA",
        || {
            let capture = tmux(&["capture-pane", "-p", "-t", "progress"]);
            screen = String::from_utf8_lossy(&capture.stdout).into_owned();
            screen.contains("/300 done")
                && screen.contains("URLs/s")
                && screen.contains("ETA ")
                && !screen.contains("ETA unknown")
        },
    );
    wait_for(Duration::from_secs(60), "the run to finish", || {
        let capture = tmux(&["capture-pane", "-p", "-t", "progress"]);
        screen = String::from_utf8_lossy(&capture.stdout).into_owned();
        screen.contains("300 of 300 URLs done")
    });
    tmux(&["kill-server"]);
    assert!(
        !screen.contains("/300 done ·"),
        "the bar was left on screen:\n{screen}"
    );
    assert_eq!(job.report_json()["done"], 300);
}
