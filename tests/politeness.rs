//! Politeness as the servers see it: Retry-After honoured and capped, pauses
//! and per-host caps that hold no worker another host could use, per-host
//! caps never exceeded, throttling that recovers after a burst of 429s, and
//! 429/503 counts per host in the report.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use support::*;

/// URLs of `per_host` items on each server, interleaved: one of each in turn.
fn interleaved(servers: &[&Server], per_host: u64) -> Vec<String> {
    (0..per_host)
        .flat_map(|i| {
            servers
                .iter()
                .map(move |s| s.url(&format!("/items/{i}.json")))
        })
        .collect()
}

/// Serves items; `fault(item, earlier)` may answer instead.
fn item_server_on(
    address: &str,
    delay: Duration,
    fault: impl Fn(u64, usize) -> Option<Reply> + Send + Sync + 'static,
) -> Server {
    Server::start_on(address, move |request| match item_of(&request.path) {
        Some(i) => {
            fault(i, request.previous).unwrap_or_else(|| Reply::ok(item_body(i)).delayed(delay))
        }
        None => Reply::status(404),
    })
}

#[test]
fn retry_after_is_never_violated_as_timed_at_the_server() {
    // Every item's first request is answered 429 with Retry-After: 1.
    let server = faulty_item_server(Duration::from_millis(2), |_, earlier| {
        (earlier == 0).then(|| Reply::status(429).with_header("Retry-After", "1"))
    });
    let (job, urls) = Job::with_items(&server, 40);
    job.run_ok(&["--workers", "10", "--backoff-base", "1ms"]);
    job.assert_all_files_right(&server, &urls);
    let hits = server.hits();
    let mut by_path: HashMap<&str, Vec<Instant>> = HashMap::new();
    for hit in &hits {
        by_path.entry(&hit.path).or_default().push(hit.at);
    }
    for (path, times) in &by_path {
        assert_eq!(times.len(), 2, "{path}: one 429, then the file");
        assert!(
            times[1] - times[0] >= Duration::from_secs(1),
            "{path} was asked for again {:?} after its Retry-After: 1",
            times[1] - times[0]
        );
    }
    // The host is paused too: after a 429 has been answered (and the
    // requests already on their way have arrived), nothing comes for a second.
    let first_answers: Vec<Instant> = by_path.values().map(|times| times[0]).collect();
    for &answered in &first_answers {
        let early = hits
            .iter()
            .filter(|h| {
                h.at > answered + Duration::from_millis(150)
                    && h.at < answered + Duration::from_secs(1)
            })
            .count();
        assert_eq!(early, 0, "requests during a Retry-After pause");
    }
}

#[test]
fn a_paused_host_does_not_hold_workers_that_other_hosts_could_use() {
    let paused = item_server_on("127.0.0.1:0", Duration::ZERO, |_, _| {
        Some(Reply::status(429).with_header("Retry-After", "30"))
    });
    let free = item_server_on("127.0.0.2:0", Duration::from_millis(5), |_, _| None);
    let job = Job::new();
    job.import(&interleaved(&[&paused, &free], 40));
    let mut child = job.spawn_run(&["--workers", "4"]);
    wait_for(Duration::from_secs(60), "the free host's 40 URLs", || {
        free.hit_count() >= 40
    });
    let first_pause = paused.hits()[0].at;
    let last_free = free.hits().iter().map(|h| h.at).max().unwrap();
    assert!(
        last_free < first_pause + Duration::from_secs(30),
        "the free host's URLs waited {:?} for the paused host",
        last_free - first_pause
    );
    assert!(
        paused.hit_count() <= 4,
        "a paused host got {} requests",
        paused.hit_count()
    );
    signal(&child, libc::SIGINT);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let report = job.report_json();
    assert_eq!(report["done"], 40, "{report}");
    assert_eq!(report["running"], 0, "{report}");
}

#[test]
fn a_capped_host_does_not_hold_workers_that_other_hosts_could_use() {
    // The slow host answers only once the fast host has had every one of
    // its requests: workers that waited for the slow host's one slot would
    // leave the fast host's URLs, and it would never answer (after 60 s
    // it gives up, says so, and holds nothing more).
    let fast_asked = Arc::new((Mutex::new(0usize), Condvar::new()));
    let gave_up = Arc::new(Mutex::new(None::<usize>));
    let slow = {
        let (fast_asked, gave_up) = (fast_asked.clone(), gave_up.clone());
        item_server_on("127.0.0.1:0", Duration::ZERO, move |_, _| {
            if gave_up.lock().unwrap().is_some() {
                return None;
            }
            let (asked, changed) = &*fast_asked;
            let (asked, waited) = changed
                .wait_timeout_while(asked.lock().unwrap(), Duration::from_secs(60), |n| *n < 40)
                .unwrap();
            if waited.timed_out() {
                gave_up.lock().unwrap().get_or_insert(*asked);
            }
            None
        })
    };
    let fast = {
        let fast_asked = fast_asked.clone();
        item_server_on("127.0.0.2:0", Duration::ZERO, move |_, _| {
            let (asked, changed) = &*fast_asked;
            *asked.lock().unwrap() += 1;
            changed.notify_all();
            None
        })
    };
    let job = Job::new();
    // The slow host first: workers that waited for its one slot would leave
    // the fast host's URLs until the slow host's were done.
    let mut urls = item_urls(&slow, 8);
    urls.extend(item_urls(&fast, 40));
    job.import(&urls);
    // Longer than the slow host holds a request.
    job.run_ok(&[
        "--workers",
        "4",
        "--per-host-workers",
        "1",
        "--timeout",
        "120s",
    ]);
    assert_eq!(
        *gave_up.lock().unwrap(),
        None,
        "the slow host's one slot held the workers: of the fast host's 40 URLs, only \
         this many were asked for while it waited"
    );
    assert_eq!(slow.most_in_flight(), 1, "the cap held at the slow host");
    assert_eq!(fast.most_in_flight(), 1, "the cap held at the fast host");
    assert_eq!(job.report_json()["done"], 48);
}

#[test]
fn per_host_caps_are_never_exceeded_on_any_host() {
    let servers: Vec<Server> = (1..=3)
        .map(|i| {
            item_server_on(
                &format!("127.0.0.{i}:0"),
                Duration::from_millis(20),
                |_, _| None,
            )
        })
        .collect();
    let job = Job::new();
    let urls = interleaved(&servers.iter().collect::<Vec<_>>(), 30);
    job.import(&urls);
    job.run_ok(&["--workers", "12", "--per-host-workers", "2"]);
    for server in &servers {
        assert_eq!(server.most_in_flight(), 2, "{}", server.url(""));
    }
    assert_eq!(job.report_json()["done"], 90);
}

#[test]
fn throttling_recovers_after_a_burst_of_429s() {
    // Answers 429, without Retry-After, to everything from 0.3 s to 2.3 s
    // after the first request: a passing overload.
    let first = Mutex::new(None::<Instant>);
    let burst = (Duration::from_millis(300), Duration::from_millis(2300));
    let server = Server::start(move |request| {
        let start = *first.lock().unwrap().get_or_insert_with(Instant::now);
        let since = start.elapsed();
        if since >= burst.0 && since < burst.1 {
            return Reply::status(429);
        }
        match item_of(&request.path) {
            Some(i) => Reply::ok(item_body(i)).delayed(Duration::from_millis(2)),
            None => Reply::status(404),
        }
    });
    let job = Job::with_urls(&item_urls(&server, 4000));
    job.run_ok(&[
        "--workers",
        "8",
        "--max-attempts",
        "50",
        "--backoff-base",
        "10ms",
        "--backoff-max",
        "100ms",
    ]);
    let hits: Vec<Instant> = server.hits().iter().map(|h| h.at).collect();
    let start = hits[0];
    let count = |from: Duration, to: Duration| {
        hits.iter()
            .filter(|&&at| at >= start + from && at < start + to)
            .count() as f64
            / (to - from).as_secs_f64()
    };
    let before = count(Duration::from_millis(50), burst.0);
    // The best half second within eight seconds after the burst.
    let after = (0..16)
        .map(|k| {
            let from = burst.1 + Duration::from_millis(500 * k);
            count(from, from + Duration::from_millis(500))
        })
        .fold(0.0, f64::max);
    eprintln!("requests/s before the burst: {before:.0}, best after: {after:.0}");
    assert!(
        after >= before * 0.75,
        "{before:.0} requests/s before the burst, at best {after:.0} in the 8 s after it"
    );
}

#[test]
fn a_retry_after_longer_than_max_retry_after_is_capped_and_said_so() {
    let server = faulty_item_server(Duration::ZERO, |_, _| {
        Some(Reply::status(429).with_header("Retry-After", "3600"))
    });
    let job = Job::with_urls(&item_urls(&server, 1));
    let output = job.run(&[
        "--max-retry-after",
        "1s",
        "--max-attempts",
        "2",
        "--backoff-base",
        "1ms",
    ]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert_stderr_contains(&output, "asked not to be called for 3600 s");
    let times = server.times_of("/items/0.json");
    assert_eq!(times.len(), 2);
    assert!(times[1] - times[0] >= Duration::from_secs(1));
    let failed = job.jobrun(&["report", "--failed"]);
    let text = String::from_utf8_lossy(&failed.stdout);
    assert!(
        text.contains("Retry-After 3600 s capped to 1 s"),
        "the URL's error says the Retry-After was capped: {text}"
    );
}

#[test]
fn the_report_shows_429s_and_503s_per_host() {
    let throttled = faulty_item_server(Duration::ZERO, |item, earlier| match (item % 2, earlier) {
        (0, 0) => Some(Reply::status(429)),
        (1, 0) => Some(Reply::status(503)),
        _ => None,
    });
    let fine = item_server_on("127.0.0.2:0", Duration::ZERO, |_, _| None);
    // Attempts without an HTTP answer count too, with no status.
    let closed = std::net::TcpListener::bind("127.0.0.3:0").unwrap();
    let nobody = format!("http://{}/items/0.json", closed.local_addr().unwrap());
    drop(closed);
    let job = Job::new();
    let mut urls = interleaved(&[&throttled, &fine], 10);
    urls.push(nobody);
    job.import(&urls);
    let output = job.run(&[
        "--workers",
        "2",
        "--backoff-base",
        "1ms",
        "--no-adaptive",
        "--max-attempts",
        "2",
    ]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let report = job.report_json();
    let hosts = report["hosts"].as_array().expect("hosts");
    let of = |server: &Server| {
        let name = server.url("");
        let name = name.trim_start_matches("http://").trim_end_matches('/');
        hosts
            .iter()
            .find(|h| h["host"] == name)
            .unwrap_or_else(|| panic!("{name} in {report}"))
            .clone()
    };
    let (t, f) = (of(&throttled), of(&fine));
    let refused = hosts
        .iter()
        .find(|h| h["host"].as_str().unwrap().starts_with("127.0.0.3"))
        .unwrap();
    assert_eq!(
        (refused["answers"].as_i64(), refused["status_429"].as_i64()),
        (Some(2), Some(0))
    );
    assert_eq!(
        (
            t["answers"].as_i64(),
            t["status_429"].as_i64(),
            t["status_503"].as_i64()
        ),
        (Some(20), Some(5), Some(5))
    );
    assert_eq!(
        (f["answers"].as_i64(), f["status_429"].as_i64()),
        (Some(10), Some(0))
    );
    let text = String::from_utf8_lossy(&job.jobrun(&["report"]).stdout).into_owned();
    assert!(
        text.contains("429: 5, 503: 5 of 20 answers (50.0%)"),
        "{text}"
    );
}

#[test]
fn a_host_that_answers_every_request_429_is_not_held_slower_than_without_adaptive_throttling() {
    let server = Server::start(|_| Reply::status(429));
    let args = [
        "--workers",
        "8",
        "--max-attempts",
        "4",
        "--backoff-base",
        "10ms",
        "--backoff-max",
        "20ms",
    ];
    let urls = item_urls(&server, 60);
    // The run without adaptive throttling, for comparison.
    let plain = Job::new();
    plain.import(&urls);
    let started = Instant::now();
    let output = plain.run(&[&args[..], &["--no-adaptive"]].concat());
    let plain_took = started.elapsed();
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let job = Job::with_urls(&urls);
    let started = Instant::now();
    let mut child = job.spawn_run(&args);
    // Held at 0.5 requests/s, its 240 requests would take 8 minutes.
    let limit = plain_took + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the adaptive run took over {limit:?}; {} requests so far",
                server.hit_count() - 240
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = started.elapsed();
    eprintln!("every request 429: {took:?} adaptive, {plain_took:?} without");
    assert_eq!(status.code(), Some(1));
    let report = job.report_json();
    assert_eq!(report["failed"], 60, "{report}");
    assert_eq!(
        server.hit_count(),
        2 * 240,
        "four attempts of each URL, in both runs"
    );
}

#[test]
fn a_host_called_once_has_its_connection_closed_not_kept_idle() {
    // Over thousands of hosts in turn, a host is called again long after
    // its idle connection would have timed out: keeping it only holds a
    // socket and its buffers. A host with more URLs keeps its connection.
    let once: Vec<Server> = (2..12)
        .map(|i| item_server_on(&format!("127.0.0.{i}:0"), Duration::ZERO, |_, _| None))
        .collect();
    let busy = item_server_on("127.0.0.1:0", Duration::from_millis(2), |_, _| None);
    let mut urls: Vec<String> = once.iter().map(|s| s.url("/items/0.json")).collect();
    urls.extend(item_urls(&busy, 40));
    let job = Job::new();
    job.import(&urls);
    assert_success(&job.run(&["--workers", "4"]), "run");
    let closes = |hit: &server::Hit| {
        hit.headers
            .iter()
            .any(|(n, v)| n.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close"))
    };
    for server in &once {
        let hits = server.hits();
        assert_eq!(hits.len(), 1, "{}", server.url(""));
        assert!(
            closes(&hits[0]),
            "{}: a host called once kept its connection open: {:?}",
            server.url(""),
            hits[0].headers
        );
    }
    let hits = busy.hits();
    assert_eq!(hits.len(), 40);
    let closing = hits.iter().filter(|hit| closes(hit)).count();
    assert!(
        closing <= 1,
        "{closing} of the busy host's 40 requests closed their connection"
    );
    assert_eq!(job.report_json()["done"], urls.len());
}

#[test]
fn a_slow_start_opens_no_more_connections_than_workers() {
    // The server accepts nothing for 300 ms and then holds at most 51
    // connections waiting to be accepted: the other workers' connections
    // open only when they send their SYN again, a second later. Meanwhile
    // the first connections answer and go back to the pool, where a
    // worker still connecting takes one, and hyper kept its new connection
    // too: every answer in that second opened one more (200 workers: 275
    // connections).
    let server = Server::start_accepting_late(50, Duration::from_millis(300), |request| {
        match item_of(&request.path) {
            Some(i) => Reply::ok(item_body(i)),
            None => Reply::status(404),
        }
    });
    let urls = item_urls(&server, 4_000);
    let job = Job::new();
    job.import(&urls);
    assert_success(&job.run(&["--workers", "200"]), "run");
    assert_eq!(job.report_json()["done"], urls.len());
    assert!(
        server.connections_accepted() <= 210,
        "{} connections for 200 workers",
        server.connections_accepted()
    );
}

#[test]
fn a_busy_host_gets_a_connection_per_worker_and_no_more() {
    // On several threads a worker could send its next request before the
    // connection of its last one was back in the pool, and each such race
    // opened a connection more (200 workers: 207 to 239 connections).
    let server = item_server_on("127.0.0.1:0", Duration::from_millis(10), |_, _| None);
    let urls = item_urls(&server, 10_000);
    let job = Job::new();
    job.import(&urls);
    assert_success(&job.run(&["--workers", "100"]), "run");
    assert_eq!(job.report_json()["done"], urls.len());
    // The first request closes its connection, as a host's first request
    // does, and a rare race is left on one thread too: at most 5% more.
    eprintln!(
        "{} connections for 100 workers",
        server.connections_accepted()
    );
    assert!(
        server.connections_accepted() <= 105,
        "{} connections for 100 workers",
        server.connections_accepted()
    );
}
