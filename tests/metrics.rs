//! `run --metrics`: the Prometheus text format served while a run goes on,
//! agreeing with what the server saw; a bad or busy address stops the run
//! at its start.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use support::*;

/// One scrape: the samples by series (`name{labels}`), and the families
/// with their types.
#[derive(Debug)]
struct Scrape {
    samples: BTreeMap<String, f64>,
    types: BTreeMap<String, String>,
}

impl Scrape {
    fn value(&self, series: &str) -> f64 {
        *self
            .samples
            .get(series)
            .unwrap_or_else(|| panic!("no {series} in {:#?}", self.samples))
    }
}

/// An HTTP/1.1 request to `addr`: the status line, the headers and the body.
fn http(addr: &str, method: &str, path: &str) -> (String, String, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to the metrics address");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("a response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no head in {response:?}"));
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_string(), body.to_string())
}

/// Scrapes `/metrics` and checks the text format: every sample line is
/// `name{labels} value`, every family has HELP and TYPE lines, and every
/// histogram's buckets are cumulative with `+Inf` equal to `_count`.
fn scrape(addr: &str) -> Scrape {
    let (status, headers, body) = http(addr, "GET", "/metrics");
    assert!(status.ends_with("200 OK"), "{status}");
    assert!(
        headers
            .to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{headers}"
    );
    let mut helps = HashSet::new();
    let mut types = BTreeMap::new();
    let mut samples = BTreeMap::new();
    for line in body.lines() {
        if let Some(help) = line.strip_prefix("# HELP ") {
            let (name, text) = help.split_once(' ').expect("HELP name text");
            assert!(!text.is_empty(), "{line}");
            helps.insert(name.to_string());
            continue;
        }
        if let Some(kind) = line.strip_prefix("# TYPE ") {
            let (name, kind) = kind.split_once(' ').expect("TYPE name kind");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(helps.contains(name), "TYPE before HELP for {name}");
            types.insert(name.to_string(), kind.to_string());
            continue;
        }
        assert!(!line.starts_with('#') && !line.is_empty(), "{line:?}");
        let (series, value) = line.rsplit_once(' ').expect("series value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a number in {line}"));
        let name = series.split('{').next().unwrap();
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                && name.starts_with("jobrun_"),
            "{line}"
        );
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            let inner = labels
                .strip_prefix('{')
                .and_then(|l| l.strip_suffix('}'))
                .unwrap_or_else(|| panic!("labels in {line}"));
            for pair in inner.split("\",") {
                let (label, quoted) = pair.split_once('=').expect("label=value");
                assert!(label.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
                assert!(quoted.starts_with('"'), "{line}");
            }
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|base| types.get(*base).is_some_and(|k| k == "histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "{name}: no TYPE line before it");
        assert!(
            types[family] != "counter" || name.ends_with("_total"),
            "counter {name} without _total"
        );
        samples.insert(series.to_string(), value);
    }
    for (name, kind) in &types {
        if kind != "histogram" {
            continue;
        }
        let bounds = samples
            .keys()
            .filter(|series| series.starts_with(&format!("{name}_bucket{{")))
            .count();
        assert!(bounds > 5, "{name} has {bounds} buckets");
        let mut by_bound: Vec<(f64, f64)> = samples
            .iter()
            .filter_map(|(series, value)| {
                let le = series
                    .strip_prefix(&format!("{name}_bucket{{le=\""))?
                    .strip_suffix("\"}")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, *value))
            })
            .collect();
        by_bound.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert_eq!(by_bound.len(), bounds);
        assert!(
            by_bound.windows(2).all(|w| w[0].1 <= w[1].1),
            "{name} buckets not cumulative: {by_bound:?}"
        );
        let (top, inf) = by_bound.last().copied().unwrap();
        assert_eq!(top, f64::INFINITY, "{name} has no +Inf bucket");
        assert_eq!(
            inf,
            samples[&format!("{name}_count")],
            "{name}: +Inf != _count"
        );
        assert!(samples.contains_key(&format!("{name}_sum")));
    }
    Scrape { samples, types }
}

/// The address of `--metrics :0`, from the run's log.
/// Scrapes `addr` until a scrape meets `condition`, and returns that scrape;
/// panics after `limit`.
fn scrape_until(
    addr: &str,
    limit: Duration,
    what: &str,
    condition: impl Fn(&Scrape) -> bool,
) -> Scrape {
    let mut last = None;
    wait_for(limit, what, || {
        let scrape = scrape(addr);
        let met = condition(&scrape);
        last = Some(scrape);
        met
    });
    last.expect("at least one scrape")
}

fn metrics_address(lines: &std::sync::mpsc::Receiver<String>) -> String {
    let mut seen = Vec::new();
    loop {
        let line = lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no metrics address logged: {seen:?}"));
        if let Some(at) = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split("/metrics").next())
        {
            return at.to_string();
        }
        seen.push(line);
    }
}

#[test]
fn metrics_are_served_during_a_run_and_agree_with_the_server() {
    const URLS: u64 = 120;
    // Item 0 is held until the test lets it go, so that the run is still
    // going when everything else is settled. Items ending in 9 are missing
    // (failed for good); items ending in 5 fail once with a 500 (retried).
    let release = Arc::new(AtomicBool::new(false));
    let held = release.clone();
    let server = faulty_item_server(Duration::from_millis(20), move |item, previous| {
        if item == 0 {
            while !held.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            None
        } else if item % 10 == 9 {
            Some(Reply::status(404))
        } else if item % 10 == 5 && previous == 0 {
            Some(Reply::status(500))
        } else {
            None
        }
    });
    let (job, _) = Job::with_items(&server, URLS);
    let mut child = job.spawn_run(&[
        "-j",
        "4",
        "--backoff-base",
        "10ms",
        "--backoff-max",
        "20ms",
        "--metrics",
        ":0",
    ]);
    let lines = stderr_lines(&mut child);
    let addr = metrics_address(&lines);
    // A client that never finishes its request holds up no scrape.
    let mut idle = TcpStream::connect(&addr).unwrap();
    idle.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();

    let first = scrape_until(
        &addr,
        Duration::from_secs(30),
        "a first URL done",
        |scrape| scrape.value("jobrun_urls_done_total") >= 1.0,
    );
    assert!(child.try_wait().unwrap().is_none(), "the run ended early");

    let (failed_for_good, retried) = (URLS / 10, URLS / 10);
    let done = URLS - 1 - failed_for_good;
    let last = scrape_until(
        &addr,
        Duration::from_secs(60),
        "all but the held URL settled",
        |scrape| {
            scrape.value("jobrun_urls_done_total") as u64 == done
                && scrape.value("jobrun_urls_failed_total") as u64 == failed_for_good
                && scrape.value("jobrun_urls_waiting_for_retry") == 0.0
        },
    );
    assert!(child.try_wait().unwrap().is_none(), "the run ended early");

    // Counters never go down between scrapes.
    for (series, before) in &first.samples {
        let name = series.split('{').next().unwrap();
        let family = name
            .strip_suffix("_bucket")
            .or_else(|| name.strip_suffix("_count"))
            .or_else(|| name.strip_suffix("_sum"))
            .filter(|base| first.types.get(*base).is_some_and(|k| k == "histogram"))
            .unwrap_or(name);
        if matches!(first.types[family].as_str(), "counter" | "histogram") {
            assert!(last.samples[series] >= *before, "{series} went down");
        }
    }

    // What the server answered, item 0 being in flight still.
    let hits = server.hit_count() as f64;
    let answered = hits - 1.0;
    let bytes: usize = (1..URLS)
        .filter(|i| i % 10 != 9)
        .map(|i| item_body(i).len())
        .sum();
    for (series, expected) in [
        ("jobrun_urls_done_total", done as f64),
        ("jobrun_urls_failed_total", failed_for_good as f64),
        ("jobrun_retries_scheduled_total", retried as f64),
        ("jobrun_written_bytes_total", bytes as f64),
        ("jobrun_requests_total{outcome=\"2xx\"}", done as f64),
        ("jobrun_requests_total{outcome=\"3xx\"}", 0.0),
        (
            "jobrun_requests_total{outcome=\"4xx\"}",
            failed_for_good as f64,
        ),
        ("jobrun_requests_total{outcome=\"5xx\"}", retried as f64),
        ("jobrun_requests_total{outcome=\"error\"}", 0.0),
        ("jobrun_request_duration_seconds_count", answered),
        ("jobrun_requests_in_flight", 1.0),
        ("jobrun_job_urls", URLS as f64),
        ("jobrun_job_urls_done", done as f64),
        ("jobrun_job_urls_failed", failed_for_good as f64),
        ("jobrun_job_urls_pending", 1.0),
    ] {
        assert_eq!(last.value(series), expected, "{series}");
    }
    assert_eq!(
        answered,
        (done + failed_for_good + retried) as f64,
        "the server saw other requests"
    );
    // Every served item took at least its 20 ms.
    assert!(last.value("jobrun_request_duration_seconds_sum") >= done as f64 * 0.02);
    assert!(
        last.value("jobrun_request_duration_seconds_bucket{le=\"0.01\"}")
            <= (failed_for_good + retried) as f64
    );
    for family in [
        "jobrun_host_paused_seconds",
        "jobrun_host_rate_limit",
        "jobrun_host_throttled_ratio",
    ] {
        assert_eq!(last.types[family], "gauge");
    }

    // Only GET /metrics is served.
    let (status, _, _) = http(&addr, "GET", "/other");
    assert!(status.ends_with("404 Not Found"), "{status}");
    let (status, headers, _) = http(&addr, "POST", "/metrics");
    assert!(status.ends_with("405 Method Not Allowed"), "{status}");
    assert!(headers.contains("Allow: GET"), "{headers}");

    // The metrics stop with the run.
    drop(idle);
    release.store(true, Ordering::SeqCst);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "some URLs failed for good");
    assert!(
        TcpStream::connect(&addr).is_err(),
        "metrics still served after the run"
    );
    assert_eq!(job.report_json()["done"], done + 1);
}

#[test]
fn a_busy_or_bad_metrics_address_stops_the_run_at_its_start() {
    let server = item_server(Duration::ZERO);
    let job = Job::with_urls(&item_urls(&server, 3));
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().to_string();
    for address in [busy.as_str(), "not-an-address", "127.0.0.1:99999"] {
        let output = job.run(&["--metrics", address]);
        assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
        let message = stderr(&output);
        assert!(
            message.contains(&format!("--metrics {address}")),
            "{message}"
        );
    }
    assert!(
        stderr(&job.run(&["--metrics", &busy])).contains("another program"),
        "a busy port says so"
    );
    assert_eq!(server.hit_count(), 0, "no URL fetched");
    assert_eq!(job.report_json()["done"], 0);
    drop(taken);
}

#[test]
fn a_paused_host_has_its_series_labelled_without_userinfo() {
    let server = Server::start(|_| Reply::status(429).with_header("Retry-After", "30"));
    let job = Job::new();
    let port = server.addr().port();
    job.import(&[format!("http://user:s3cret@127.0.0.1:{port}/a")]);
    let mut child = job.spawn_run(&["--metrics", ":0"]);
    let lines = stderr_lines(&mut child);
    let addr = metrics_address(&lines);
    let host = format!("127.0.0.1:{port}");
    let paused = format!("jobrun_host_paused_seconds{{host=\"{host}\"}}");
    let last = scrape_until(
        &addr,
        Duration::from_secs(30),
        "the host's pause in the metrics",
        |scrape| {
            // The pause comes with the answer, the retry with its commit.
            scrape.samples.get(&paused).is_some_and(|&left| left > 20.0)
                && scrape.value("jobrun_urls_waiting_for_retry") == 1.0
        },
    );
    assert_eq!(last.value("jobrun_hosts_restrained"), 1.0);
    assert_eq!(
        last.value(&format!("jobrun_host_throttled_ratio{{host=\"{host}\"}}")),
        1.0
    );
    assert_eq!(last.value("jobrun_requests_total{outcome=\"4xx\"}"), 1.0);
    assert_eq!(last.value("jobrun_retries_scheduled_total"), 1.0);
    let (_, _, body) = http(&addr, "GET", "/metrics");
    assert!(!body.contains("s3cret") && !body.contains("user"), "{body}");
    signal(&child, libc::SIGINT);
    assert_eq!(child.wait().unwrap().code(), Some(130));
    assert!(
        TcpStream::connect(&addr).is_err(),
        "metrics outlive the run"
    );
}
