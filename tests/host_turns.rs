//! Host-aware scheduling as the servers see it: with one request per host at
//! a time and more hosts than workers, every worker is kept busy.

mod support;

use std::time::{Duration, Instant};

use support::*;

/// Requests that arrived within `latency` before `at`: with every answer
/// taking `latency`, the requests the servers were serving at that moment.
fn in_flight_at(arrivals: &[Instant], at: Instant, latency: Duration) -> usize {
    arrivals
        .iter()
        .filter(|&&arrived| arrived <= at && at < arrived + latency)
        .count()
}

#[test]
fn every_worker_is_busy_when_hosts_outnumber_workers() {
    let latency = Duration::from_millis(50);
    let servers: Vec<Server> = (2..22)
        .map(|i| {
            Server::start_on(&format!("127.0.0.{i}:0"), move |request| {
                match item_of(&request.path) {
                    Some(i) => Reply::ok(item_body(i)).delayed(latency),
                    None => Reply::status(404),
                }
            })
        })
        .collect();
    let per_host = 40;
    let urls: Vec<String> = (0..per_host)
        .flat_map(|i| {
            servers
                .iter()
                .map(move |s| s.url(&format!("/items/{i}.json")))
        })
        .collect();
    let job = Job::with_urls(&urls);
    let workers = 10;
    job.run_ok(&["--workers", &workers.to_string(), "--per-host-workers", "1"]);
    let mut arrivals: Vec<Instant> = servers
        .iter()
        .flat_map(|s| s.hits().into_iter().map(|h| h.at))
        .collect();
    arrivals.sort();
    assert_eq!(arrivals.len(), urls.len());
    for server in &servers {
        assert_eq!(server.most_in_flight(), 1, "{}", server.url(""));
    }
    // Sample every 5 ms from the first request to the last answer, leaving
    // out the first and last 100 ms (the start, the drain).
    let (first, last) = (arrivals[0], arrivals[arrivals.len() - 1] + latency);
    let step = Duration::from_millis(5);
    let mut samples = Vec::new();
    let mut at = first + Duration::from_millis(100);
    while at + Duration::from_millis(100) < last {
        samples.push(in_flight_at(&arrivals, at, latency));
        at += step;
    }
    // Most of the time, at least 7 in 10 workers: a loaded machine costs
    // one or two; a dispatcher that leaves workers idle costs half.
    let enough = workers * 7 / 10;
    let busy = samples.iter().filter(|&&n| n >= enough).count();
    let share = busy as f64 / samples.len() as f64;
    let mut sorted = samples.clone();
    sorted.sort();
    eprintln!(
        "{} samples over {:?}: median in flight {}, {:.0}% at {enough} or more",
        samples.len(),
        last - first,
        sorted[sorted.len() / 2],
        share * 100.0,
    );
    assert!(
        share >= 0.5,
        "the servers saw {enough} or more requests in flight only {:.0}% of the time \
         (median {}), with {workers} workers and {} hosts",
        share * 100.0,
        sorted[sorted.len() / 2],
        servers.len()
    );
    assert_eq!(job.report_json()["done"], urls.len());
}
