//! Load: 100,000 URLs with 500 workers against a local server, watching
//! the process from outside while it runs: its memory (VmRSS, VmHWM) and
//! its open file descriptors must stay bounded, not grow with the list.

mod support;

use std::time::{Duration, Instant};

use support::*;

const URLS: u64 = 100_000;
const WORKERS: usize = 500;

/// A small body per item, so the test measures jobrun and not the disk.
fn small_body(item: u64) -> Vec<u8> {
    format!("{{\"id\": {item}, \"square\": {}}}\n", item * item).into_bytes()
}

/// What /proc says about a process at one moment.
#[derive(Debug, Default, Clone, Copy)]
struct Sample {
    rss_kib: u64,
    peak_rss_kib: u64,
    fds: usize,
}

fn sample(pid: u32) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    Some(Sample {
        rss_kib: field("VmRSS:")?,
        peak_rss_kib: field("VmHWM:")?,
        fds: std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count(),
    })
}

#[test]
fn a_hundred_thousand_urls_with_500_workers_in_bounded_memory_and_descriptors() {
    let server = Server::start(|request| match item_of(&request.path) {
        Some(i) => Reply::ok(small_body(i)),
        None => Reply::status(404),
    });
    let (job, urls) = Job::with_items(&server, URLS);

    let started = Instant::now();
    let workers = WORKERS.to_string();
    let mut child = job.spawn_run(&["--workers", &workers]);
    let pid = child.id();
    let mut samples = Vec::new();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the run took over ten minutes"
        );
        // /proc vanishes between the exit and the wait: keep what was read.
        samples.extend(sample(pid));
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = started.elapsed();
    let mut stderr_text = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr_text).unwrap();
    assert!(status.success(), "{status:?}\n{stderr_text}");

    let peak_rss_mib = samples.iter().map(|s| s.peak_rss_kib).max().unwrap() / 1024;
    let max_fds = samples.iter().map(|s| s.fds).max().unwrap();
    // The peak at a tenth of the way and at the end: memory must not keep
    // growing with the URLs done.
    let early = samples[samples.len() / 10].rss_kib / 1024;
    let late = samples.iter().map(|s| s.rss_kib).max().unwrap() / 1024;
    eprintln!(
        "load: {URLS} URLs, {WORKERS} workers in {took:.1?}; {} samples; peak RSS {peak_rss_mib} MiB \
         (RSS {early} MiB a tenth in, at most {late} MiB); at most {max_fds} open descriptors",
        samples.len()
    );
    assert!(samples.len() >= 20, "too few samples to judge");
    // About 64 MiB when this was written, in a debug build. SQLite's page
    // cache (16 MB at most) fills as the database grows; anything kept per
    // URL would add 100,000 times its size.
    assert!(peak_rss_mib < 160, "peak RSS {peak_rss_mib} MiB");
    assert!(late < early + 48, "RSS grew from {early} MiB to {late} MiB");
    // Per worker at most a socket in use, one idle in the pool and a temp
    // file; the bodies written to unnamed files and not yet linked in by
    // their batch, at most two full batches (2,048, however far the disk
    // lags); then the database and its WAL, the output folder, the
    // runtime's own: nothing per URL.
    const UNNAMED_HELD: usize = 2048;
    assert!(
        max_fds <= 3 * WORKERS + UNNAMED_HELD + 64,
        "{max_fds} descriptors open for {WORKERS} workers"
    );

    let report = job.report_json();
    assert_eq!(report["done"], URLS, "{report}");
    job.assert_all_files_are(&urls, |url| {
        let path = url.strip_prefix(&server.url("")).unwrap();
        small_body(item_of(path).unwrap())
    });
}
