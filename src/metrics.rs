//! `run --metrics ADDR`: the run's counters in the Prometheus text
//! exposition format (version 0.0.4) at `GET /metrics`, for scrapers that
//! watch long jobs on several machines.
//!
//! On the hot path a request costs a few relaxed atomic adds ([`Requests`]);
//! everything else is read from the counters the progress display already
//! keeps, when a scrape asks. The server is a small HTTP/1.1 responder on the
//! run's own runtime: one request per connection, bounded in size, time and
//! number of connections, so a slow or hostile client cannot hold up the run.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener as StdListener, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::clock::now_ms;
use crate::counters::{BUCKETS_MS, Counters, OUTCOMES, Start};
use crate::hosts::{HostView, Hosts};

/// At most this many hosts get their own series, so that a job over a
/// million hosts does not make a million series.
const MAX_HOSTS: usize = 50;

/// Scrapes served at once; more wait for their turn in the listen queue.
const MAX_CONNECTIONS: usize = 8;

/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest request head read; a scrape needs a few hundred bytes.
const MAX_REQUEST: usize = 8 * 1024;

/// Everything a scrape shows, read at one moment.
#[derive(Debug, Default)]
struct Snapshot {
    start: Start,
    done: u64,
    failed: u64,
    retried: u64,
    bytes: u64,
    in_flight: u64,
    retry_waiting: u64,
    by_outcome: [u64; OUTCOMES.len()],
    buckets: [u64; BUCKETS_MS.len() + 1],
    sum_ms: u64,
    /// Hosts that are paused or throttled.
    hosts: Vec<HostView>,
}

/// Where a scrape reads from.
#[derive(Clone)]
pub struct Source {
    pub counters: Arc<Counters>,
    pub start: Start,
    pub hosts: Arc<Hosts>,
}

impl Source {
    fn snapshot(&self) -> Snapshot {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let counters = &self.counters;
        let requests = &counters.requests;
        Snapshot {
            start: self.start,
            done: load(&counters.done),
            failed: load(&counters.failed),
            retried: load(&counters.retried),
            bytes: load(&counters.bytes),
            in_flight: load(&requests.in_flight),
            retry_waiting: counters.retries.waiting(now_ms()),
            by_outcome: requests.by_outcome.each_ref().map(load),
            buckets: requests.buckets.each_ref().map(load),
            sum_ms: load(&requests.sum_ms),
            hosts: self.hosts.restrained(),
        }
    }
}

/// One metric family: its HELP and TYPE lines, then its samples.
struct Family<'a> {
    out: &'a mut String,
    name: &'a str,
}

impl<'a> Family<'a> {
    fn new(out: &'a mut String, name: &'a str, kind: &str, help: &str) -> Family<'a> {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Family { out, name }
    }

    /// A sample of the family, or of one of its series (`_bucket`, `_sum`).
    fn sample(&mut self, suffix: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        let _ = write!(self.out, "{}{suffix}", self.name);
        if !labels.is_empty() {
            self.out.push('{');
            for (at, (label, value)) in labels.iter().enumerate() {
                if at > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{label}=\"{}\"", escape_label(value));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// A label value as the text format wants it: backslash, quote and line
/// feed escaped.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

/// A whole scrape, in the text exposition format.
fn render(snapshot: &Snapshot) -> String {
    let mut out = String::with_capacity(4096);
    let s = snapshot;
    let finished = s.start.done + s.start.failed + s.done + s.failed;
    let single = [
        (
            "jobrun_urls_done_total",
            "counter",
            "URLs this run fetched and recorded as done.",
            s.done,
        ),
        (
            "jobrun_urls_failed_total",
            "counter",
            "URLs this run recorded as failed for good.",
            s.failed,
        ),
        (
            "jobrun_retries_scheduled_total",
            "counter",
            "Retries this run scheduled.",
            s.retried,
        ),
        (
            "jobrun_written_bytes_total",
            "counter",
            "Body bytes this run wrote and recorded.",
            s.bytes,
        ),
        (
            "jobrun_requests_in_flight",
            "gauge",
            "Attempts under way now (a wait for --rate included).",
            s.in_flight,
        ),
        (
            "jobrun_urls_waiting_for_retry",
            "gauge",
            "URLs whose next attempt is not yet due.",
            s.retry_waiting,
        ),
        (
            "jobrun_job_urls",
            "gauge",
            "URLs in the job.",
            s.start.total,
        ),
        (
            "jobrun_job_urls_done",
            "gauge",
            "URLs of the job done (at the run's start, plus this run's).",
            s.start.done + s.done,
        ),
        (
            "jobrun_job_urls_failed",
            "gauge",
            "URLs of the job failed for good (at the run's start, plus this run's).",
            s.start.failed + s.failed,
        ),
        (
            "jobrun_job_urls_pending",
            "gauge",
            "URLs of the job neither done nor failed.",
            s.start.total.saturating_sub(finished),
        ),
        (
            "jobrun_hosts_restrained",
            "gauge",
            "Hosts paused or held below their rate; the most restrained 50 get host series.",
            s.hosts.len() as u64,
        ),
    ];
    for (name, kind, help, value) in single {
        Family::new(&mut out, name, kind, help).sample("", &[], value);
    }
    let mut requests = Family::new(
        &mut out,
        "jobrun_requests_total",
        "counter",
        "Attempts this run finished, by HTTP status class (error: no HTTP answer).",
    );
    for (outcome, count) in OUTCOMES.iter().zip(s.by_outcome) {
        requests.sample("", &[("outcome", outcome)], count);
    }

    let mut hosts: Vec<&HostView> = s.hosts.iter().collect();
    // The most restrained first, when there are too many to show.
    hosts.sort_by(|a, b| {
        (b.paused_for, b.throttled_share)
            .partial_cmp(&(a.paused_for, a.throttled_share))
            .unwrap_or(std::cmp::Ordering::Equal)
            .then_with(|| a.host.cmp(&b.host))
    });
    hosts.truncate(MAX_HOSTS);
    let mut paused = Family::new(
        &mut out,
        "jobrun_host_paused_seconds",
        "gauge",
        "Seconds left of a host's pause (Retry-After).",
    );
    for view in &hosts {
        let left = view.paused_for.unwrap_or_default().as_secs_f64();
        paused.sample("", &[("host", &view.host)], left);
    }
    let mut rate = Family::new(
        &mut out,
        "jobrun_host_rate_limit",
        "gauge",
        "Requests per second adaptive throttling allows a host now.",
    );
    for view in &hosts {
        if let Some(limit) = view.adaptive_rate {
            rate.sample("", &[("host", &view.host)], limit);
        }
    }
    let mut share = Family::new(
        &mut out,
        "jobrun_host_throttled_ratio",
        "gauge",
        "Share of a host's answers in this run that were 429 or 503.",
    );
    for view in &hosts {
        share.sample("", &[("host", &view.host)], view.throttled_share);
    }

    let mut histogram = Family::new(
        &mut out,
        "jobrun_request_duration_seconds",
        "histogram",
        "Time from sending a request to the end of its answer.",
    );
    let mut cumulative = 0;
    for (bound, count) in BUCKETS_MS.iter().zip(s.buckets) {
        cumulative += count;
        let le = (*bound as f64 / 1000.0).to_string();
        histogram.sample("_bucket", &[("le", &le)], cumulative);
    }
    // The count is the buckets' sum, so that `+Inf` and `_count` agree even
    // while requests finish during the scrape.
    cumulative += s.buckets[BUCKETS_MS.len()];
    histogram.sample("_bucket", &[("le", "+Inf")], cumulative);
    histogram.sample("_sum", &[], s.sum_ms as f64 / 1000.0);
    histogram.sample("_count", &[], cumulative);
    out
}

/// Parses and binds `--metrics ADDR` before the run starts, so that a bad
/// or busy address stops it at once. `:PORT` is short for
/// `127.0.0.1:PORT`: host names stay on this machine unless another address
/// is asked for.
pub fn bind(address: &str) -> Result<(StdListener, SocketAddr), BindError> {
    let full = match address.strip_prefix(':') {
        Some(port) => format!("127.0.0.1:{port}"),
        None => address.to_string(),
    };
    let candidates: Vec<SocketAddr> = full
        .to_socket_addrs()
        .map_err(|error| BindError::Address {
            address: address.to_string(),
            error,
        })?
        .collect();
    let listener = StdListener::bind(&candidates[..]).map_err(|source| BindError::Busy {
        address: address.to_string(),
        source,
    })?;
    listener
        .set_nonblocking(true)
        .and_then(|()| listener.local_addr())
        .map(|local| (listener, local))
        .map_err(|source| BindError::Socket {
            address: address.to_string(),
            source,
        })
}

/// Why `--metrics` cannot serve where it is asked to.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error(
        "--metrics {address}: not an address to listen on ({error}); \
         give HOST:PORT, e.g. 127.0.0.1:9464, or :0 for any free port"
    )]
    Address {
        address: String,
        error: std::io::Error,
    },
    #[error(
        "--metrics {address}: cannot listen there; is another program using the port? \
         Choose another, or :0 for any free port"
    )]
    Busy {
        address: String,
        source: std::io::Error,
    },
    #[error("--metrics {address}: cannot set up the socket")]
    Socket {
        address: String,
        source: std::io::Error,
    },
}

/// Serves scrapes until the task is dropped with the run's runtime.
pub async fn serve(listener: StdListener, source: Source) {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!("metrics: cannot serve: {error}");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors, say: the run goes on without
                // this scrape, and the next accept tries again.
                tracing::debug!("metrics: cannot accept a connection: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let source = source.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(READ_TIMEOUT * 2, answer(stream, &source)).await;
            drop(slot);
        });
    }
}

/// Reads one request head and answers it.
async fn answer(mut stream: TcpStream, source: &Source) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&chunk[..n]);
        }
        Ok::<(), std::io::Error>(())
    };
    if tokio::time::timeout(READ_TIMEOUT, read).await.is_err() {
        return Ok(());
    }
    let line = head
        .split(|&b| b == b'\r' || b == b'\n')
        .next()
        .unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split(' ');
    let (method, target) = (
        words.next().unwrap_or_default(),
        words.next().unwrap_or_default(),
    );
    let path = target.split('?').next().unwrap_or_default();
    let response = match (method, path) {
        ("GET", "/metrics") => reply(
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            &render(&source.snapshot()),
        ),
        (_, "/metrics") => reply("405 Method Not Allowed", "text/plain", "only GET\n"),
        _ => reply("404 Not Found", "text/plain", "metrics are at /metrics\n"),
    };
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

fn reply(status: &str, content_type: &str, body: &str) -> String {
    let allow = if status.starts_with("405") {
        "Allow: GET\r\n"
    } else {
        ""
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_value(text: &str, series: &str) -> Option<String> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .map(str::to_string)
    }

    #[test]
    fn the_text_format_has_help_type_and_cumulative_buckets() {
        let mut snapshot = Snapshot {
            start: Start {
                total: 100,
                done: 10,
                failed: 5,
            },
            done: 20,
            failed: 3,
            retried: 4,
            bytes: 12345,
            in_flight: 7,
            retry_waiting: 2,
            by_outcome: [20, 0, 3, 4, 1],
            sum_ms: 1500,
            hosts: vec![HostView {
                host: "a\"b\\c.test".into(),
                paused_for: Some(Duration::from_millis(2500)),
                capped_from: None,
                adaptive_rate: Some(1.5),
                throttled_share: 0.25,
            }],
            ..Snapshot::default()
        };
        snapshot.buckets[0] = 3;
        snapshot.buckets[5] = 2;
        snapshot.buckets[13] = 1;
        let text = render(&snapshot);
        for (series, value) in [
            ("jobrun_urls_done_total", "20"),
            ("jobrun_urls_failed_total", "3"),
            ("jobrun_retries_scheduled_total", "4"),
            ("jobrun_written_bytes_total", "12345"),
            ("jobrun_requests_total{outcome=\"2xx\"}", "20"),
            ("jobrun_requests_total{outcome=\"error\"}", "1"),
            ("jobrun_requests_in_flight", "7"),
            ("jobrun_job_urls", "100"),
            ("jobrun_job_urls_done", "30"),
            ("jobrun_job_urls_failed", "8"),
            ("jobrun_job_urls_pending", "62"),
            ("jobrun_urls_waiting_for_retry", "2"),
            ("jobrun_hosts_restrained", "1"),
            (
                "jobrun_host_paused_seconds{host=\"a\\\"b\\\\c.test\"}",
                "2.5",
            ),
            ("jobrun_host_rate_limit{host=\"a\\\"b\\\\c.test\"}", "1.5"),
            (
                "jobrun_host_throttled_ratio{host=\"a\\\"b\\\\c.test\"}",
                "0.25",
            ),
            ("jobrun_request_duration_seconds_bucket{le=\"0.005\"}", "3"),
            ("jobrun_request_duration_seconds_bucket{le=\"0.1\"}", "3"),
            ("jobrun_request_duration_seconds_bucket{le=\"0.25\"}", "5"),
            ("jobrun_request_duration_seconds_bucket{le=\"60\"}", "5"),
            ("jobrun_request_duration_seconds_bucket{le=\"+Inf\"}", "6"),
            ("jobrun_request_duration_seconds_sum", "1.5"),
            ("jobrun_request_duration_seconds_count", "6"),
        ] {
            assert_eq!(
                sample_value(&text, series).as_deref(),
                Some(value),
                "{series} in\n{text}"
            );
        }
        // Every family is introduced once, before its samples.
        let mut families = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                families.push(rest.split(' ').next().unwrap_or_default().to_string());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap_or_default();
                let family = families.last().expect("a TYPE line first");
                assert!(name.starts_with(family.as_str()), "{name} under {family}");
            }
        }
        assert_eq!(text.matches("# HELP ").count(), families.len());
    }

    #[test]
    fn only_the_most_restrained_hosts_get_series() {
        let hosts = (0..MAX_HOSTS + 10)
            .map(|i| HostView {
                host: format!("h{i}.test"),
                paused_for: None,
                capped_from: None,
                adaptive_rate: Some(1.0),
                throttled_share: i as f64 / 100.0,
            })
            .collect();
        let text = render(&Snapshot {
            hosts,
            ..Snapshot::default()
        });
        assert_eq!(
            text.matches("jobrun_host_throttled_ratio{").count(),
            MAX_HOSTS
        );
        assert!(text.contains("{host=\"h59.test\"}"));
        assert!(!text.contains("{host=\"h0.test\"}"));
        assert_eq!(
            sample_value(&text, "jobrun_hosts_restrained").as_deref(),
            Some("60")
        );
    }

    #[test]
    fn a_bad_address_is_named() {
        let error = format!("{:#}", bind("nonsense").unwrap_err());
        assert!(error.contains("--metrics nonsense"), "{error}");
        let (taken, at) = bind(":0").expect("a free port");
        let error = format!("{:#}", bind(&at.to_string()).unwrap_err());
        assert!(
            error.contains(&at.to_string()) && error.contains("another program"),
            "{error}"
        );
        drop(taken);
    }
}
