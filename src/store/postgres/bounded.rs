//! Every wait for the server, bounded. A server or a network that hangs
//! while keeping its sockets open (a stuck proxy, a frozen virtual machine)
//! is seen by neither `statement_timeout` nor TCP keepalive: the kernel at
//! the other end still acknowledges. So the connection's own stream keeps
//! the time: once the server owes an answer (jobrun has sent something and
//! not yet read the `ReadyForQuery` that ends the server's turn) or will not
//! take jobrun's bytes, a wait longer than the limit fails the connection
//! with [`Unanswered`], and the command stops. What the server had
//! committed stays; the transaction it was in is rolled back by the server.
//!
//! The stream lies under the protocol and above TLS: the connector does the
//! TLS request (libpq's `sslmode`) itself, bounded too, so that the client
//! hands it the plain socket in every mode and the stream sees the
//! protocol's messages whatever carries them.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use postgres::Socket;
use postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, Sleep};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::store::Unanswered;

/// A poll this long after the end of a wait (a quarter of the limit, a
/// second at least) means nobody was waiting: the program was busy between
/// two statements (a reader of `export` that paused, say) and the runtime
/// that keeps the time was not running. The wait starts again then instead
/// of ending; a real wait is woken by its timer at its end, late only by
/// the time the machine takes to run the process again.
fn late(limit: Duration) -> Duration {
    (limit / 4).max(Duration::from_secs(1))
}

/// The longest limit kept: a year.
const MAX_MS: u64 = 365 * 24 * 3600 * 1000;

/// The limit one connection's waits are held to, and the database as
/// messages show it (any password as `***`).
#[derive(Debug)]
pub struct AnswerLimit {
    /// The limit as the user knows it (`--db-timeout`, or the lease and a
    /// margin).
    limit_ms: AtomicU64,
    /// Added to it: a run's lead for its own watch.
    slack_ms: AtomicU64,
    db: String,
}

impl AnswerLimit {
    pub fn new(db: String, limit: Duration, slack: Duration) -> Arc<AnswerLimit> {
        let bound = AnswerLimit {
            limit_ms: AtomicU64::new(0),
            slack_ms: AtomicU64::new(0),
            db,
        };
        bound.set(limit, slack);
        Arc::new(bound)
    }

    /// How long a wait may last.
    pub fn get(&self) -> Duration {
        self.said() + Duration::from_millis(self.slack_ms.load(Ordering::Relaxed))
    }

    fn said(&self) -> Duration {
        Duration::from_millis(self.limit_ms.load(Ordering::Relaxed))
    }

    /// Sets the limit of the waits that start from now on.
    pub fn set(&self, limit: Duration, slack: Duration) {
        // Capped, so that adding it to an instant never overflows.
        let ms = |d: Duration| u64::try_from(d.as_millis()).map_or(MAX_MS, |ms| ms.min(MAX_MS));
        self.limit_ms.store(ms(limit).max(1), Ordering::Relaxed);
        self.slack_ms.store(ms(slack), Ordering::Relaxed);
    }

    fn exceeded(&self, waited: Duration) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            Unanswered {
                db: self.db.clone(),
                waited,
                limit: self.said(),
            },
        )
    }
}

/// The [`Unanswered`] in a client error's causes, if a wait ran out.
pub fn unanswered<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a Unanswered> {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(found) = error.downcast_ref::<Unanswered>() {
            return Some(found);
        }
        if let Some(found) = error
            .downcast_ref::<io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<Unanswered>())
        {
            return Some(found);
        }
        cause = error.source();
    }
    None
}

/// Connects as `sslmode` says (`tls`: None for `disable`; else the TLS
/// client and whether TLS is required), every stream bounded by `limit`.
pub struct BoundedConnect {
    pub tls: Option<(MakeRustlsConnect, bool)>,
    pub limit: Arc<AnswerLimit>,
}

type RustlsConnect = <MakeRustlsConnect as MakeTlsConnect<Socket>>::TlsConnect;
type RustlsStream = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;

impl MakeTlsConnect<Socket> for BoundedConnect {
    type Stream = Bounded;
    type TlsConnect = BoundedTlsConnect;
    type Error = Infallible;

    fn make_tls_connect(&mut self, domain: &str) -> Result<BoundedTlsConnect, Infallible> {
        let tls = match &mut self.tls {
            Some((make, required)) => Some((
                MakeTlsConnect::<Socket>::make_tls_connect(make, domain)?,
                *required,
            )),
            None => None,
        };
        Ok(BoundedTlsConnect {
            tls,
            limit: self.limit.clone(),
        })
    }
}

pub struct BoundedTlsConnect {
    tls: Option<(RustlsConnect, bool)>,
    limit: Arc<AnswerLimit>,
}

impl TlsConnect<Socket> for BoundedTlsConnect {
    type Stream = Bounded;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Bounded>> + Send>>;

    fn connect(self, socket: Socket) -> Self::Future {
        Box::pin(async move {
            let limit = self.limit.get();
            let link = tokio::time::timeout(limit, negotiate(socket, self.tls))
                .await
                .map_err(|_| self.limit.exceeded(limit))??;
            Ok(Bounded::new(link, self.limit))
        })
    }
}

/// libpq's TLS request: asks the server for TLS and starts it if offered.
async fn negotiate(mut socket: Socket, tls: Option<(RustlsConnect, bool)>) -> io::Result<Link> {
    /// An `SSLRequest`: its length, then the code that asks for TLS.
    const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    let Some((tls, required)) = tls else {
        return Ok(Link::Plain(socket));
    };
    socket.write_all(&SSL_REQUEST).await?;
    let mut answer = [0];
    socket.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => Ok(Link::Tls(Box::new(tls.connect(socket).await?))),
        b'N' if !required => Ok(Link::Plain(socket)),
        b'N' => Err(io::Error::other(
            "the server does not offer TLS, which sslmode=require and verify-* ask for",
        )),
        other => Err(io::Error::other(format!(
            "the server answered the TLS request with {other:#04x}, not S or N: is it PostgreSQL?"
        ))),
    }
}

/// The connection under the protocol: plain, or TLS.
pub enum Link {
    Plain(Socket),
    Tls(Box<RustlsStream>),
}

impl AsyncRead for Link {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Link::Plain(socket) => Pin::new(socket).poll_read(cx, buf),
            Link::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Link {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Link::Plain(socket) => Pin::new(socket).poll_write(cx, buf),
            Link::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Link::Plain(socket) => Pin::new(socket).poll_flush(cx),
            Link::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Link::Plain(socket) => Pin::new(socket).poll_shutdown(cx),
            Link::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The server's messages as they come, cut at their boundaries (a type
/// byte, then a length that counts itself): enough to tell when the
/// server's turn is over.
#[derive(Debug, Default)]
struct Messages {
    header: [u8; 5],
    /// Bytes of the header read so far.
    have: usize,
    /// Bytes of the current message's body still to come.
    body_left: usize,
    /// The last message read whole was a `ReadyForQuery`.
    ready: bool,
}

impl Messages {
    /// Reads `bytes`; true when they end with a whole `ReadyForQuery`.
    fn read(&mut self, mut bytes: &[u8]) -> bool {
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(bytes.len());
                self.body_left -= n;
                bytes = &bytes[n..];
                if self.body_left == 0 {
                    self.ready = self.header[0] == b'Z';
                }
                continue;
            }
            self.ready = false;
            let n = (self.header.len() - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have < self.header.len() {
                break;
            }
            let [kind, length @ ..] = self.header;
            self.have = 0;
            self.body_left = (u32::from_be_bytes(length) as usize).saturating_sub(4);
            if self.body_left == 0 {
                self.ready = kind == b'Z';
            }
        }
        self.ready && self.have == 0 && self.body_left == 0
    }
}

/// A connection whose waits for the server are bounded.
pub struct Bounded {
    inner: Link,
    limit: Arc<AnswerLimit>,
    messages: Messages,
    /// jobrun has sent something the server has not finished answering.
    owed: bool,
    /// When the wait in progress began.
    since: Option<Instant>,
    timer: Pin<Box<Sleep>>,
    /// How long the wait that failed the connection lasted: every later
    /// use fails alike.
    gave_up: Option<Duration>,
}

impl Bounded {
    fn new(inner: Link, limit: Arc<AnswerLimit>) -> Bounded {
        Bounded {
            inner,
            limit,
            messages: Messages::default(),
            // The startup message comes first, and is owed its answer.
            owed: true,
            since: None,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            gave_up: None,
        }
    }

    /// The server read or sent something: no wait in progress.
    fn answered(&mut self) {
        self.since = None;
    }

    /// The server has not read or answered yet: ready with an error once
    /// this wait has lasted longer than the limit.
    fn wait<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let now = Instant::now();
        let limit = self.limit.get();
        let since = match self.since {
            Some(since) if now < since + limit + late(limit) => since,
            _ => {
                self.timer.as_mut().reset(now + limit);
                self.since = Some(now);
                now
            }
        };
        match self.timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                let waited = now - since;
                self.gave_up = Some(waited);
                Poll::Ready(Err(self.limit.exceeded(waited)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn failed(&self) -> Option<io::Error> {
        self.gave_up.map(|waited| self.limit.exceeded(waited))
    }
}

impl AsyncRead for Bounded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(error) = this.failed() {
            return Poll::Ready(Err(error));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = &buf.filled()[before..];
                if !read.is_empty() {
                    this.answered();
                    if this.messages.read(read) {
                        this.owed = false;
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending if this.owed => this.wait(cx),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for Bounded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(error) = this.failed() {
            return Poll::Ready(Err(error));
        }
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    this.answered();
                    this.owed = true;
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => this.wait(cx),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(error) = this.failed() {
            return Poll::Ready(Err(error));
        }
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Pending => this.wait(cx),
            ready => ready,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(error) = this.failed() {
            return Poll::Ready(Err(error));
        }
        match Pin::new(&mut this.inner).poll_shutdown(cx) {
            Poll::Pending => this.wait(cx),
            ready => ready,
        }
    }
}

impl TlsStream for Bounded {
    fn channel_binding(&self) -> ChannelBinding {
        match &self.inner {
            Link::Plain(_) => ChannelBinding::none(),
            Link::Tls(tls) => tls.channel_binding(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut bytes = vec![kind];
        bytes.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        bytes.extend_from_slice(body);
        bytes
    }

    #[test]
    fn the_servers_turn_ends_with_a_whole_ready_for_query_at_any_cut() {
        let mut answer = message(b'C', b"SELECT 1\0");
        // A row whose bytes look like a ReadyForQuery does not end it.
        answer.extend(message(b'D', &message(b'Z', b"I")));
        answer.extend(message(b'Z', b"I"));
        for cut in 0..answer.len() {
            let mut messages = Messages::default();
            let first = messages.read(&answer[..cut]);
            let second = messages.read(&answer[cut..]);
            assert!(!first, "cut at {cut}");
            assert!(second, "cut at {cut}");
        }
        let mut messages = Messages::default();
        assert!(!messages.read(&message(b'D', &message(b'Z', b"I"))));
    }

    #[test]
    fn a_wait_is_said_with_the_database_and_the_limit() {
        let limit = AnswerLimit::new(
            "postgres://u:***@h/db".into(),
            Duration::from_secs(3),
            Duration::ZERO,
        );
        let error = limit.exceeded(Duration::from_millis(3200));
        let found = unanswered(&error).expect("an Unanswered inside");
        let text = found.to_string();
        assert!(text.contains("postgres://u:***@h/db"), "{text}");
        assert!(text.contains("3.2 s"), "{text}");
    }
}
