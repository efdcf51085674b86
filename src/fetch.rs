//! One attempt at one URL: wait for the host and the rate limit, send the
//! request, stream a 2xx body into the row's temp file while hashing it, and
//! say what happened. Which failures are worth a retry is decided here, in
//! `FetchError::is_permanent`.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use governor::DefaultDirectRateLimiter;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{Client, StatusCode, Url};
use sha2::{Digest, Sha256};

use crate::backoff::{Backoff, parse_retry_after};
use crate::store::{Claim, Completion, unix_ms};

/// How much of an error response is read, so the connection can be reused.
const ERROR_BODY_DRAIN: usize = 64 * 1024;

/// What a request needs that does not change during a run.
pub struct Fetcher {
    client: Client,
    limiter: Option<DefaultDirectRateLimiter>,
    pauses: HostPauses,
    backoff: Backoff,
    max_attempts: u32,
    timeout: Duration,
}

pub struct FetchOptions {
    pub headers: HeaderMap,
    pub timeout: Duration,
    pub workers: usize,
    pub limiter: Option<DefaultDirectRateLimiter>,
    pub backoff: Backoff,
    pub max_attempts: u32,
}

/// A failed attempt, as the server or the network caused it.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("HTTP {}", status_text(*.status))]
    Status {
        status: StatusCode,
        retry_after: Option<Duration>,
    },
    #[error("timed out after {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("{0}")]
    Network(String),
    #[error("body cut short: {0}")]
    Truncated(String),
    #[error("{0}")]
    Redirect(String),
    #[error("invalid URL: {0}")]
    InvalidUrl(String),
}

impl FetchError {
    /// Permanent failures are not retried: the same request would fail again.
    pub fn is_permanent(&self) -> bool {
        match self {
            FetchError::Status { status, .. } => {
                !matches!(status.as_u16(), 408 | 425 | 429 | 500 | 502 | 503 | 504)
            }
            FetchError::Timeout(_) | FetchError::Network(_) | FetchError::Truncated { .. } => false,
            FetchError::Redirect(_) | FetchError::InvalidUrl(_) => true,
        }
    }

    fn status(&self) -> Option<u16> {
        match self {
            FetchError::Status { status, .. } => Some(status.as_u16()),
            _ => None,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            FetchError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

fn status_text(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("{} {reason}", status.as_u16()),
        None => status.as_u16().to_string(),
    }
}

/// A 2xx body, complete in its temp file (not yet synced).
#[derive(Debug)]
pub struct Body {
    pub status: u16,
    pub bytes: u64,
    pub sha256: [u8; 32],
}

/// The attempt could not write its file: a problem of this machine (disk
/// full, folder gone), not of the URL, so the run stops.
#[derive(Debug)]
pub struct LocalError(pub anyhow::Error);

impl Fetcher {
    pub fn new(options: FetchOptions) -> anyhow::Result<Fetcher> {
        // reqwest is built without a default crypto provider (aws-lc is a
        // slow C build); ring must be installed before the first client.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = Client::builder()
            .user_agent(concat!("jobrun/", env!("CARGO_PKG_VERSION")))
            .default_headers(options.headers)
            .timeout(options.timeout)
            .connect_timeout(options.timeout.min(Duration::from_secs(10)))
            // A worker's next request can start before its last connection
            // is back in the pool; hyper then opens another one, and a pool
            // capped at one per worker closes the spare again. Room for the
            // spares keeps every connection alive (20 workers: ~90 connections
            // for 20,000 URLs instead of ~2,000).
            .pool_max_idle_per_host(options.workers * 2)
            .tcp_nodelay(true)
            .build()
            .context("cannot set up the HTTP client")?;
        Ok(Fetcher {
            client,
            limiter: options.limiter,
            pauses: HostPauses::default(),
            backoff: options.backoff,
            max_attempts: options.max_attempts,
            timeout: options.timeout,
        })
    }

    /// Makes one attempt at `claim`, writing a 2xx body to `temp`, and says
    /// what the database should record.
    pub async fn attempt(&self, claim: &Claim, temp: &Path) -> Result<Attempt, LocalError> {
        let result = self.fetch_into(&claim.url, temp).await;
        let settled = match result {
            Ok(body) => Attempt::Body(body),
            Err(Fetch::Failed(error)) => Attempt::Failed(self.settle(claim, &error)),
            Err(Fetch::Local(error)) => return Err(error),
        };
        if matches!(settled, Attempt::Failed(_)) {
            let _ = std::fs::remove_file(temp);
        }
        Ok(settled)
    }

    async fn fetch_into(&self, url: &str, temp: &Path) -> Result<Body, Fetch> {
        let url = Url::parse(url).map_err(|e| FetchError::InvalidUrl(e.to_string()))?;
        let host = host_key(&url);
        self.pauses.wait(&host).await;
        if let Some(limiter) = &self.limiter {
            limiter.until_ready().await;
        }
        let mut response = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| self.describe(e, false))?;
        let status = response.status();
        if !status.is_success() {
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, SystemTime::now()));
            if let Some(delay) = retry_after
                && matches!(status.as_u16(), 429 | 503)
            {
                self.pauses.pause(&host, Instant::now() + delay);
            }
            drain(&mut response).await;
            return Err(FetchError::Status {
                status,
                retry_after,
            }
            .into());
        }
        let mut file = File::create(temp)
            .with_context(|| format!("cannot create {}", temp.display()))
            .map_err(|e| Fetch::Local(LocalError(e)))?;
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        loop {
            let chunk = match response.chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(e) => return Err(self.describe(e, true)),
            };
            hasher.update(&chunk);
            file.write_all(&chunk)
                .with_context(|| format!("cannot write {}", temp.display()))
                .map_err(|e| Fetch::Local(LocalError(e)))?;
            bytes += chunk.len() as u64;
        }
        Ok(Body {
            status: status.as_u16(),
            bytes,
            sha256: hasher.finalize().into(),
        })
    }

    /// Turns a failed attempt into a retry (with its time) or a failure.
    fn settle(&self, claim: &Claim, error: &FetchError) -> Completion {
        let attempts = claim.attempts + 1;
        let status = error.status();
        let message = error.to_string();
        if error.is_permanent() || attempts >= self.max_attempts {
            let error = if error.is_permanent() {
                message
            } else {
                format!("{message} (gave up after {attempts} attempts)")
            };
            return Completion::Failed {
                id: claim.id,
                status,
                error,
            };
        }
        let delay = self
            .backoff
            .delay(attempts)
            .max(error.retry_after().unwrap_or_default());
        Completion::Retry {
            id: claim.id,
            status,
            error: message,
            next_attempt_at: unix_ms(SystemTime::now() + delay),
        }
    }

    /// A short account of a reqwest error: its kind and its root cause,
    /// without the URL (the row has it), so that equal failures read the
    /// same and group together in the report.
    fn describe(&self, error: reqwest::Error, in_body: bool) -> Fetch {
        if error.is_timeout() {
            return FetchError::Timeout(self.timeout).into();
        }
        let cause = root_cause(&error);
        if error.is_redirect() {
            return FetchError::Redirect(cause).into();
        }
        if error.is_builder() {
            return FetchError::InvalidUrl(cause).into();
        }
        if in_body {
            return FetchError::Truncated(cause).into();
        }
        if error.is_connect() {
            return FetchError::Network(format!("cannot connect: {cause}")).into();
        }
        FetchError::Network(format!("request failed: {cause}")).into()
    }
}

/// What one attempt came to.
#[derive(Debug)]
pub enum Attempt {
    Body(Body),
    Failed(Completion),
}

enum Fetch {
    Failed(FetchError),
    Local(LocalError),
}

impl From<FetchError> for Fetch {
    fn from(error: FetchError) -> Fetch {
        Fetch::Failed(error)
    }
}

/// The innermost cause of an error: the part that says what happened
/// (`Connection reset by peer`), not the layers that passed it on.
fn root_cause(error: &dyn std::error::Error) -> String {
    let mut innermost = error;
    while let Some(cause) = innermost.source() {
        innermost = cause;
    }
    innermost.to_string()
}

async fn drain(response: &mut reqwest::Response) {
    let mut read = 0;
    while read < ERROR_BODY_DRAIN {
        match response.chunk().await {
            Ok(Some(chunk)) => read += chunk.len(),
            _ => break,
        }
    }
}

/// The key a host is paused under: host and port.
fn host_key(url: &Url) -> String {
    format!(
        "{}:{}",
        url.host_str().unwrap_or(""),
        url.port_or_known_default().unwrap_or(0)
    )
}

/// Hosts that asked, with Retry-After, not to be called before a time.
/// Every worker waits on it before calling that host.
#[derive(Debug, Clone, Default)]
pub struct HostPauses(Arc<Mutex<HashMap<String, Instant>>>);

impl HostPauses {
    pub fn pause(&self, host: &str, until: Instant) {
        let mut pauses = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let entry = pauses.entry(host.to_string()).or_insert(until);
        *entry = (*entry).max(until);
    }

    /// Sleeps until `host` is no longer paused.
    pub async fn wait(&self, host: &str) {
        loop {
            let until = {
                let mut pauses = self.0.lock().unwrap_or_else(|e| e.into_inner());
                match pauses.get(host) {
                    Some(&until) if until > Instant::now() => until,
                    Some(_) => {
                        pauses.remove(host);
                        return;
                    }
                    None => return,
                }
            };
            tokio::time::sleep_until(until.into()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_statuses_follow_the_design() {
        let permanent = |code: u16| {
            FetchError::Status {
                status: StatusCode::from_u16(code).unwrap(),
                retry_after: None,
            }
            .is_permanent()
        };
        for code in [408, 425, 429, 500, 502, 503, 504] {
            assert!(!permanent(code), "{code}");
        }
        for code in [400, 401, 403, 404, 410, 501, 505, 304] {
            assert!(permanent(code), "{code}");
        }
        assert!(!FetchError::Timeout(Duration::from_secs(1)).is_permanent());
        assert!(FetchError::Redirect("loop".into()).is_permanent());
    }

    #[test]
    fn status_errors_read_well() {
        let error = FetchError::Status {
            status: StatusCode::NOT_FOUND,
            retry_after: None,
        };
        assert_eq!(error.to_string(), "HTTP 404 Not Found");
    }
}
