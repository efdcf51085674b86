//! One attempt at one URL: wait for the host and the rate limit, send the
//! request, stream a 2xx body into the row's temp file while hashing it, and
//! say what happened. Which failures are worth a retry is decided here, in
//! `FetchError::is_permanent`.

use std::io::Write;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use crate::rate::{Rate, SharedRate};
use reqwest::header::{
    CONNECTION, ETAG, HeaderMap, HeaderValue, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED,
    LOCATION, RANGE, RETRY_AFTER,
};
use reqwest::redirect;
use reqwest::{Client, StatusCode, Url};
use sha2::{Digest, Sha256};

use crate::backoff::{Backoff, parse_retry_after};
use crate::clock::unix_ms;
use crate::connect_gate::{self, ConnectGate};
use crate::domain::{Claim, Completion, Validators};
use crate::hosts::{Answer, Hosts, KEEP_ALIVE, Politeness, STREAMS_PER_CONNECTION};
use crate::output::{TempFile, local_write_error, out_of_descriptors};
use crate::proxy::Proxies;
use crate::request::RequestSpec;
use crate::retryable::RetryStatuses;
use crate::tls::{ClientTls, Roots};

/// The longest validator (`ETag`, `Last-Modified`) stored; a longer one is
/// not a validator but junk, and is not kept.
const MAX_VALIDATOR: usize = 1024;

/// How much of an error response is read, so the connection can be reused.
const ERROR_BODY_DRAIN: usize = 64 * 1024;

/// What a request needs that does not change during a run.
pub struct Fetcher {
    clients: Clients,
    /// The roots https servers are verified against, read when first
    /// needed.
    roots: Arc<Roots>,
    rate: Option<Arc<SharedRate>>,
    hosts: Arc<Hosts>,
    backoff: Backoff,
    max_attempts: u32,
    timeout: Duration,
    connect_timeout: Duration,
    max_bytes: u64,
    /// Whether every request asks for a range (`--header "Range: …"`).
    range_for_all: bool,
    retry_on: RetryStatuses,
    max_retry_after: Duration,
}

pub struct FetchOptions {
    pub headers: HeaderMap,
    pub timeout: Duration,
    pub workers: usize,
    /// Requests per second of the whole job (`--rate`).
    pub rate: Option<Rate>,
    pub backoff: Backoff,
    pub max_attempts: u32,
    pub politeness: Politeness,
    /// Replaces jobrun's own User-Agent.
    pub user_agent: Option<String>,
    /// The largest body kept, counted after decoding.
    pub max_bytes: u64,
    /// Accept any TLS certificate.
    pub insecure: bool,
    /// For opening a connection: by default 10 s; never more than `timeout`.
    pub connect_timeout: Option<Duration>,
    /// Redirects followed for one URL before it fails for good.
    pub max_redirects: usize,
    /// The HTTP statuses worth another attempt.
    pub retry_on: RetryStatuses,
    /// Extra CA roots and a client certificate.
    pub tls: ClientTls,
    pub proxies: Proxies,
}

/// A failed attempt, as the server or the network caused it.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("HTTP {}{}", status_text(*.status), capped_text(*.retry_after))]
    Status {
        status: StatusCode,
        retry_after: Option<RetryAfter>,
    },
    #[error("timed out after {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("cannot connect: no connection within {} (--connect-timeout)", humantime::format_duration(*.0))]
    ConnectTimeout(Duration),
    #[error("{0}")]
    Network(String),
    #[error("body cut short: {0}")]
    Truncated(String),
    #[error("{0}")]
    Redirect(String),
    #[error("invalid URL: {0}")]
    InvalidUrl(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("body larger than --max-bytes ({limit} bytes)", limit = crate::format::thousands(*.0))]
    TooLarge(u64),
    #[error(
        "TLS certificate not trusted: {0} (--cacert FILE trusts a private CA; --insecure accepts any certificate)"
    )]
    Certificate(String),
    #[error(
        "the server refused the TLS connection for want of a client certificate it accepts: {0} \
         (--cert FILE and --key FILE present one)"
    )]
    ClientCertificate(String),
    /// A 206 to a request that asked for no range: the body is only part
    /// of the resource. Retried like a body cut short.
    #[error(
        "HTTP 206 Partial Content, but no range was asked for: the body is not the whole resource"
    )]
    UnaskedPartial,
}

impl FetchError {
    /// Permanent failures are not retried: the same request would fail
    /// again. A status is retried when it is one of `retry_on`.
    pub fn is_permanent(&self, retry_on: &RetryStatuses) -> bool {
        match self {
            FetchError::Status { status, .. } => !retry_on.contains(status.as_u16()),
            FetchError::Timeout(_)
            | FetchError::ConnectTimeout(_)
            | FetchError::Network(_)
            | FetchError::Truncated { .. }
            | FetchError::UnaskedPartial => false,
            FetchError::Redirect(_)
            | FetchError::InvalidUrl(_)
            | FetchError::InvalidRequest(_)
            | FetchError::TooLarge(_)
            | FetchError::Certificate(_)
            | FetchError::ClientCertificate(_) => true,
        }
    }

    fn status(&self) -> Option<u16> {
        match self {
            FetchError::Status { status, .. } => Some(status.as_u16()),
            FetchError::UnaskedPartial => Some(StatusCode::PARTIAL_CONTENT.as_u16()),
            _ => None,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            FetchError::Status { retry_after, .. } => retry_after.map(|r| r.delay),
            _ => None,
        }
    }
}

/// A `Retry-After` as honoured, and as the server asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter {
    pub delay: Duration,
    pub asked: Duration,
}

impl RetryAfter {
    /// `asked`, capped at `cap` (`--max-retry-after`).
    fn capped(asked: Duration, cap: Duration) -> RetryAfter {
        RetryAfter {
            delay: asked.min(cap),
            asked,
        }
    }

    fn capped_from(&self) -> Option<Duration> {
        (self.asked > self.delay).then_some(self.asked)
    }
}

/// Says so when a Retry-After was capped: a URL retried long before the
/// server asked must not look like a jobrun mistake.
fn capped_text(retry_after: Option<RetryAfter>) -> String {
    match retry_after.and_then(|r| r.capped_from().map(|asked| (asked, r.delay))) {
        Some((asked, delay)) => format!(
            " (Retry-After {} s capped to {} s by --max-retry-after)",
            asked.as_secs(),
            delay.as_secs()
        ),
        None => String::new(),
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
    /// From sending the request to the end of the body.
    pub millis: u32,
    /// The response's `ETag` and `Last-Modified`, for a later refresh.
    pub validators: Validators,
}

/// What a request brought back.
enum Fetched {
    Body(Body),
    /// A 304 to a refresh's conditional request.
    NotModified(Validators),
}

/// A problem of this machine, not of the URL, so the run stops: the
/// attempt could not write its file (disk full, folder gone), or https
/// servers cannot be verified for want of CA certificates.
#[derive(Debug)]
pub enum LocalError {
    Output(crate::output::Error),
    Client(ClientError),
}

/// The HTTP client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Proxy(#[from] crate::proxy::Error),
    #[error("cannot set up the HTTP client")]
    Build(#[source] reqwest::Error),
    #[error("cannot set up TLS")]
    Tls(#[source] crate::tls::Error),
    /// The platform's CA certificates, read at the first https URL, cannot
    /// be used.
    #[error("{0}")]
    Roots(String),
}

/// What every HTTP client of a run is built from.
struct ClientSettings {
    user_agent: String,
    headers: HeaderMap,
    timeout: Duration,
    connect_timeout: Duration,
    workers: usize,
    max_redirects: usize,
    /// Shared by every client: the roots behind it are read once.
    tls: rustls::ClientConfig,
    proxies: Proxies,
    hosts: Arc<Hosts>,
}

impl ClientSettings {
    /// The client of the host's connection `lane` (see `Hosts::lane`).
    fn build(&self, lane: usize) -> Result<Client, ClientError> {
        let builder = Client::builder()
            .user_agent(self.user_agent.clone())
            .default_headers(self.headers.clone())
            .timeout(self.timeout)
            .connect_timeout(self.connect_timeout)
            // A worker's next request can start before its last connection
            // is back in the pool; hyper then opens another one, and a pool
            // capped at one per worker closes the spare again. Room for the
            // spares keeps every connection alive instead of opening a new
            // one for most requests.
            .pool_max_idle_per_host(self.workers * 2)
            // Over thousands of hosts, each visited now and then, connections
            // kept idle for reqwest's default 90 s add up to one socket and
            // its buffers per host; a few seconds still covers a host's next
            // URL and its first retries.
            .pool_idle_timeout(KEEP_ALIVE)
            .tcp_nodelay(true)
            .redirect(redirect_policy(self.max_redirects))
            // A Referer would hand the URL, query keys included, to whatever
            // host a redirect leads to.
            .referer(false)
            .tls_backend_preconfigured(self.tls.clone())
            .connector_layer(ConnectGate::new(
                self.hosts.clone(),
                lane,
                self.connect_timeout,
            ));
        let builder = self.proxies.clone().apply(builder)?;
        builder.build().map_err(ClientError::Build)
    }
}

/// The run's HTTP clients: the first for every host, the others each for
/// one more connection to a host over HTTP/2 (a lane, see `Hosts::lane`),
/// built when first needed.
struct Clients {
    first: Client,
    more: Vec<OnceLock<Client>>,
    settings: ClientSettings,
}

impl Clients {
    /// How many lanes a host may have.
    fn count(&self) -> usize {
        1 + self.more.len()
    }

    /// The client of lane `index`; the first one if that client cannot be
    /// built (as the first one was, from the same settings).
    fn get(&self, index: usize) -> &Client {
        let Some(slot) = index.checked_sub(1).and_then(|i| self.more.get(i)) else {
            return &self.first;
        };
        if let Some(client) = slot.get() {
            return client;
        }
        match self.settings.build(index) {
            Ok(client) => slot.get_or_init(|| client),
            Err(_) => &self.first,
        }
    }
}

impl Fetcher {
    pub fn new(options: FetchOptions) -> Result<Fetcher, ClientError> {
        // reqwest is built without a default crypto provider (aws-lc is a
        // slow C build); ring must be installed before the first client.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let range_for_all = options.headers.contains_key(RANGE);
        // The request's own limit covers its connection too, so a longer
        // connect timeout could never be reached, nor said in a message.
        let connect_timeout = options
            .connect_timeout
            .unwrap_or(Duration::from_secs(10))
            .min(options.timeout);
        let (tls, roots) = options
            .tls
            .client_config(options.insecure)
            .map_err(ClientError::Tls)?;
        let hosts = Arc::new(Hosts::new(options.politeness));
        let settings = ClientSettings {
            user_agent: options
                .user_agent
                .unwrap_or_else(|| concat!("jobrun/", env!("CARGO_PKG_VERSION")).to_string()),
            headers: options.headers,
            timeout: options.timeout,
            connect_timeout,
            workers: options.workers,
            max_redirects: options.max_redirects,
            tls,
            proxies: options.proxies,
            hosts: hosts.clone(),
        };
        let first = settings.build(0)?;
        // A host over HTTP/2 gets another connection for every
        // STREAMS_PER_CONNECTION workers beyond the first ones, each from a
        // client of its own: reqwest keeps one HTTP/2 connection per host
        // in a client's pool.
        let lanes = options.workers.div_ceil(STREAMS_PER_CONNECTION).max(1);
        Ok(Fetcher {
            clients: Clients {
                first,
                more: (1..lanes).map(|_| OnceLock::new()).collect(),
                settings,
            },
            roots,
            rate: options.rate.map(|rate| Arc::new(SharedRate::new(rate))),
            hosts,
            backoff: options.backoff,
            max_attempts: options.max_attempts,
            timeout: options.timeout,
            connect_timeout,
            max_bytes: options.max_bytes,
            range_for_all,
            retry_on: options.retry_on,
            max_retry_after: options.politeness.max_retry_after,
        })
    }
    /// `--rate`, this run's part of it, to share among the live runs.
    pub fn rate(&self) -> Option<Arc<SharedRate>> {
        self.rate.clone()
    }

    /// The hosts' politeness state, for the progress display.
    pub fn hosts(&self) -> Arc<Hosts> {
        self.hosts.clone()
    }

    /// Makes one attempt at `claim`, writing a 2xx body to `temp`, and says
    /// what the database should record.
    pub async fn attempt(&self, claim: &Claim, temp: &TempFile) -> Result<Attempt, LocalError> {
        let mut sent_at = None;
        let result = self.fetch_into(claim, temp, &mut sent_at).await;
        let millis = sent_at.map_or(0, |at: Instant| {
            at.elapsed().as_millis().min(u32::MAX as u128) as u32
        });
        let settled = match result {
            Ok(Fetched::NotModified(validators)) => Attempt::Unchanged(Completion::Unchanged {
                id: claim.id,
                lease: claim.lease,
                status: StatusCode::NOT_MODIFIED.as_u16(),
                millis,
                validators,
            }),
            // The same body again: the file stays as it is, untouched.
            Ok(Fetched::Body(body))
                if claim.refresh && claim.recorded == Some((body.bytes, body.sha256)) =>
            {
                temp.remove();
                Attempt::Unchanged(Completion::Unchanged {
                    id: claim.id,
                    lease: claim.lease,
                    status: body.status,
                    millis,
                    validators: body.validators,
                })
            }
            Ok(Fetched::Body(mut body)) => {
                body.millis = millis;
                Attempt::Body(body)
            }
            Err(Fetch::Failed(error)) => Attempt::Failed(self.settle(claim, &error, millis)),
            Err(Fetch::Local(error)) => return Err(error),
        };
        if matches!(settled, Attempt::Failed(_)) {
            temp.remove();
        }
        Ok(settled)
    }

    /// The request for `claim`, and whether it asks for a range (so that
    /// a 206 is the answer it wants).
    fn build_request(
        &self,
        client: &Client,
        claim: &Claim,
        url: Url,
    ) -> Result<(reqwest::RequestBuilder, bool), Fetch> {
        let Some(json) = &claim.request else {
            return Ok((client.get(url), self.range_for_all));
        };
        let spec = RequestSpec::from_json(json).map_err(FetchError::InvalidRequest)?;
        // Checked at import already; again here for rows imported by a
        // jobrun that let framing headers through.
        spec.check().map_err(FetchError::InvalidRequest)?;
        let mut request = client.request(spec.method(), url);
        let mut asks_range = self.range_for_all;
        for (name, value) in &spec.headers {
            asks_range |= name.eq_ignore_ascii_case(RANGE.as_str());
            request = request.header(name.as_str(), value.as_str());
        }
        if let Some(body) = spec.body {
            request = request.body(body);
        }
        Ok((request, asks_range))
    }

    async fn fetch_into(
        &self,
        claim: &Claim,
        temp: &TempFile,
        sent_at: &mut Option<Instant>,
    ) -> Result<Fetched, Fetch> {
        let url = Url::parse(&claim.url).map_err(|e| FetchError::InvalidUrl(e.to_string()))?;
        if url.scheme() == "https" {
            self.roots
                .ready()
                .map_err(|error| Fetch::Local(LocalError::Client(ClientError::Roots(error))))?;
        }
        // Politeness is kept per host as recorded at import (see Claim::host).
        let host = &claim.host;
        if let Some(rate) = &self.rate {
            rate.until_ready().await;
        }
        let lane = self.hosts.lane(host, self.clients.count());
        let (mut request, asks_range) =
            self.build_request(self.clients.get(lane.index()), claim, url)?;
        if claim.refresh {
            request = conditional(request, &claim.validators);
        }
        let mut closes = false;
        if !self.hosts.keeps_connection(host) {
            // Over thousands of hosts visited in turn, each idle connection
            // would wait out its timeout unused, with its buffers.
            request = request.header(CONNECTION, "close");
            closes = true;
        }
        let started = Instant::now();
        *sent_at = Some(started);
        let mut response = match connect_gate::sending(host, request.send()).await {
            Ok(response) => response,
            Err(error) => {
                lane.answered(None);
                self.hosts.answered(host, started, Answer::Other);
                return Err(self.describe(error, false));
            }
        };
        lane.answered(Some(response.version() == reqwest::Version::HTTP_2));
        closes |= response.version() == reqwest::Version::HTTP_10
            || response
                .headers()
                .get(CONNECTION)
                .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"close"));
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()))
            .map(|asked| RetryAfter::capped(asked, self.max_retry_after));
        let throttled = matches!(status.as_u16(), 429 | 503);
        self.hosts.answered(
            host,
            started,
            match (throttled, retry_after) {
                (false, _) => Answer::Other,
                (true, None) => Answer::Throttled,
                (true, Some(_)) => Answer::Paused,
            },
        );
        // Only an answer to a conditional request: a 304 to a request that
        // asked for no condition says nothing about the stored body.
        let asked_condition =
            claim.validators.etag.is_some() || claim.validators.last_modified.is_some();
        if claim.refresh && asked_condition && status == StatusCode::NOT_MODIFIED {
            if !closes && drain(&mut response).await {
                lane.connection_kept();
            }
            return Ok(Fetched::NotModified(validators(response.headers())));
        }
        if let Some(refused) = unfollowed_redirect(&response) {
            return Err(refused.into());
        }
        if !status.is_success() {
            if let Some(retry_after) = retry_after
                && throttled
            {
                if let Some(asked) = retry_after.capped_from() {
                    tracing::warn!(
                        "{host} asked not to be called for {} s; pausing it for {} s \
                         (--max-retry-after)",
                        asked.as_secs(),
                        retry_after.delay.as_secs()
                    );
                }
                self.hosts.pause(
                    host,
                    Instant::now() + retry_after.delay,
                    retry_after.capped_from(),
                );
            }
            if drain(&mut response).await && !closes {
                lane.connection_kept();
            }
            return Err(FetchError::Status {
                status,
                retry_after,
            }
            .into());
        }
        if status == StatusCode::PARTIAL_CONTENT && !asks_range {
            if drain(&mut response).await && !closes {
                lane.connection_kept();
            }
            return Err(FetchError::UnaskedPartial.into());
        }
        self.check_size(response.content_length().unwrap_or(0))?;
        let mut file = temp.create().map_err(|e| {
            Fetch::Local(LocalError::Output(local_write_error(
                e,
                "cannot create",
                &temp.path(),
            )))
        })?;
        let validators = validators(response.headers());
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        loop {
            let chunk = match response.chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => {
                    if !closes {
                        lane.connection_kept();
                    }
                    break;
                }
                Err(e) => return Err(self.describe(e, true)),
            };
            bytes += chunk.len() as u64;
            self.check_size(bytes)?;
            hasher.update(&chunk);
            file.write_all(&chunk).map_err(|e| {
                Fetch::Local(LocalError::Output(local_write_error(
                    e,
                    "cannot write",
                    &temp.path(),
                )))
            })?;
        }
        Ok(Fetched::Body(Body {
            status: status.as_u16(),
            bytes,
            sha256: hasher.finalize().into(),
            millis: 0,
            validators,
        }))
    }

    /// Refuses a body once it is known to be over the size limit, before
    /// more of it is written.
    fn check_size(&self, bytes: u64) -> Result<(), FetchError> {
        if bytes > self.max_bytes {
            return Err(FetchError::TooLarge(self.max_bytes));
        }
        Ok(())
    }

    /// Turns a failed attempt into a retry (with its time) or a failure.
    fn settle(&self, claim: &Claim, error: &FetchError, millis: u32) -> Completion {
        let attempts = claim.attempts + 1;
        let status = error.status();
        let message = error.to_string();
        let permanent = error.is_permanent(&self.retry_on);
        if permanent || attempts >= self.max_attempts {
            let error = if permanent {
                message
            } else {
                format!("{message} (gave up after {attempts} attempts)")
            };
            return Completion::Failed {
                id: claim.id,
                lease: claim.lease,
                status,
                error,
                millis,
            };
        }
        let delay = self
            .backoff
            .delay(attempts)
            .max(error.retry_after().unwrap_or_default());
        Completion::Retry {
            id: claim.id,
            lease: claim.lease,
            status,
            error: message,
            next_attempt_at: unix_ms(SystemTime::now() + delay),
            millis,
        }
    }

    /// A short account of a reqwest error: its kind and its root cause,
    /// without the URL (the row has it), so that equal failures read the
    /// same and group together in the report.
    fn describe(&self, error: reqwest::Error, in_body: bool) -> Fetch {
        if error.is_timeout() {
            if error.is_connect() {
                return FetchError::ConnectTimeout(self.connect_timeout).into();
            }
            return FetchError::Timeout(self.timeout).into();
        }
        let cause = root_cause(&error);
        match tls_refusal(&error) {
            Some(TlsRefusal::ServerCertificate) => return FetchError::Certificate(cause).into(),
            Some(TlsRefusal::ClientCertificate) => {
                return FetchError::ClientCertificate(cause).into();
            }
            None => {}
        }
        if error.is_redirect() {
            return FetchError::Redirect(cause).into();
        }
        if error.is_builder() {
            return FetchError::InvalidUrl(cause).into();
        }
        if in_body {
            return FetchError::Truncated(cause).into();
        }
        if let Some(local) = local_cause(&error) {
            return Fetch::Local(LocalError::Output(local));
        }
        if error.is_connect() {
            return FetchError::Network(format!("cannot connect: {cause}")).into();
        }
        FetchError::Network(format!("request failed: {cause}")).into()
    }
}

/// A request that failed for want of a file descriptor here: the run
/// stops, instead of spending the URL's attempts (and failing it) on a
/// problem of this machine.
fn local_cause(error: &reqwest::Error) -> Option<crate::output::Error> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = cause {
        if let Some(io) = error.downcast_ref::<std::io::Error>()
            && let Some(advice) = out_of_descriptors(io)
        {
            return Some(crate::output::Error::Folder(format!(
                "cannot open a connection: {io}; {advice}"
            )));
        }
        cause = error.source();
    }
    None
}

/// What one attempt came to.
#[derive(Debug)]
pub enum Attempt {
    Body(Body),
    /// A refresh found the body unchanged; nothing was written.
    Unchanged(Completion),
    Failed(Completion),
}

/// Asks only for a body that differs from the one stored: `If-None-Match`
/// with the stored ETag, `If-Modified-Since` with the stored Last-Modified.
/// A stored value that is no longer a valid header is not sent.
fn conditional(
    mut request: reqwest::RequestBuilder,
    validators: &Validators,
) -> reqwest::RequestBuilder {
    let stored = [
        (IF_NONE_MATCH, &validators.etag),
        (IF_MODIFIED_SINCE, &validators.last_modified),
    ];
    for (name, value) in stored {
        if let Some(value) = value.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
            request = request.header(name, value);
        }
    }
    request
}

/// A response's `ETag` and `Last-Modified`, when they are short, visible
/// text.
fn validators(headers: &HeaderMap) -> Validators {
    let read = |name| {
        headers
            .get(name)
            .and_then(|value: &HeaderValue| value.to_str().ok())
            .filter(|value| !value.is_empty() && value.len() <= MAX_VALIDATOR)
            .map(str::to_string)
    };
    Validators {
        etag: read(ETAG),
        last_modified: read(LAST_MODIFIED),
    }
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

/// Follows at most `max` redirects, never in a loop, and only to http and
/// https URLs. The messages leave the URLs out, as `describe` does.
fn redirect_policy(max: usize) -> redirect::Policy {
    redirect::Policy::custom(move |attempt| {
        if let Some(refused) = refused_scheme(attempt.url()) {
            return attempt.error(refused);
        }
        if attempt.previous().contains(attempt.url()) {
            return attempt.error("redirect loop: redirected back to a URL already visited");
        }
        // `previous` starts with the URL first asked for.
        if attempt.previous().len() > max {
            return attempt.error(format!("more than {max} redirects (--max-redirs)"));
        }
        attempt.follow()
    })
}

/// Why a redirect to `url` is not followed, if it is not http or https.
fn refused_scheme(url: &Url) -> Option<String> {
    let scheme = url.scheme();
    (!matches!(scheme, "http" | "https")).then(|| {
        format!("redirected to a URL with scheme {scheme:?} (only http and https are followed)")
    })
}

/// A redirect the client handed back unfollowed because its Location is
/// not a URL it could request (`file:///…`, `data:…`), said as such rather
/// than as a bare 3xx.
fn unfollowed_redirect(response: &reqwest::Response) -> Option<FetchError> {
    if !response.status().is_redirection() {
        return None;
    }
    let location = response.headers().get(LOCATION)?.to_str().ok()?;
    let target = response.url().join(location).ok()?;
    refused_scheme(&target).map(FetchError::Redirect)
}

/// Which side's certificate ended a TLS handshake.
enum TlsRefusal {
    /// jobrun did not trust the server's.
    ServerCertificate,
    /// The server wanted one from jobrun, or did not accept the one it got.
    ClientCertificate,
}

/// Whether a certificate was refused, which is a permanent failure, unlike
/// a handshake cut short; and whose.
fn tls_refusal(error: &(dyn std::error::Error + 'static)) -> Option<TlsRefusal> {
    use rustls::AlertDescription as Alert;
    let mut next = Some(error);
    while let Some(mut error) = next {
        next = error.source();
        // rustls errors arrive wrapped in io::Errors, whose `source` skips
        // the error they wrap.
        while let Some(inner) = error
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            error = inner;
        }
        match error.downcast_ref::<rustls::Error>() {
            Some(rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented) => {
                return Some(TlsRefusal::ServerCertificate);
            }
            // A client only receives these alerts about its own certificate.
            Some(rustls::Error::AlertReceived(
                Alert::CertificateRequired
                | Alert::BadCertificate
                | Alert::UnsupportedCertificate
                | Alert::CertificateRevoked
                | Alert::CertificateExpired
                | Alert::CertificateUnknown
                | Alert::UnknownCA,
            )) => return Some(TlsRefusal::ClientCertificate),
            _ => {}
        }
    }
    None
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

/// Reads what is left of an unwanted body, up to `ERROR_BODY_DRAIN`; whether
/// it was read to its end, so that its connection can be used again.
async fn drain(response: &mut reqwest::Response) -> bool {
    let mut read = 0;
    while read < ERROR_BODY_DRAIN {
        match response.chunk().await {
            Ok(Some(chunk)) => read += chunk.len(),
            Ok(None) => return true,
            Err(_) => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_statuses_follow_the_design() {
        let default = RetryStatuses::default();
        let permanent = |code: u16| {
            FetchError::Status {
                status: StatusCode::from_u16(code).unwrap(),
                retry_after: None,
            }
            .is_permanent(&default)
        };
        for code in [408, 425, 429, 500, 502, 503, 504] {
            assert!(!permanent(code), "{code}");
        }
        for code in [400, 401, 403, 404, 410, 501, 505, 304] {
            assert!(permanent(code), "{code}");
        }
        assert!(!FetchError::Timeout(Duration::from_secs(1)).is_permanent(&default));
        assert!(!FetchError::ConnectTimeout(Duration::from_secs(1)).is_permanent(&default));
        assert!(FetchError::Redirect("loop".into()).is_permanent(&default));
        assert!(FetchError::ClientCertificate("refused".into()).is_permanent(&default));
        assert!(!FetchError::UnaskedPartial.is_permanent(&default));
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
