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
//!
//! Over a Unix socket the client hands the connector nothing (there is no
//! TLS to start), so the client is pointed at a socket of jobrun's own
//! instead (an abstract one on Linux, which no file stands for and which
//! lets only this process's own connection through), and a task on the
//! connection's own runtime relays between it and the server's socket
//! through the bounded stream. The task runs when the client does, so a
//! wait it gives up on is the client's own: it closes the client's side
//! and leaves what it gave up on to [`relay_gave_up`], which the error of
//! the statement that was waiting reads on the same thread.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
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
        io::Error::new(io::ErrorKind::TimedOut, self.unanswered(waited))
    }

    fn unanswered(&self, waited: Duration) -> Unanswered {
        Unanswered {
            db: self.db.clone(),
            waited,
            limit: self.said(),
        }
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

thread_local! {
    /// The wait a relay running on this thread gave up on, until the error
    /// of the statement that waited takes it.
    static GAVE_UP: RefCell<Option<Unanswered>> = const { RefCell::new(None) };
    /// Why a relay running on this thread could not reach the server's
    /// socket, until the error of the connection that waited takes it.
    static UNREACHABLE: RefCell<Option<io::Error>> = const { RefCell::new(None) };
}

/// Why the relay of a connection that failed could not reach the server's
/// socket (which does not exist, say), with the socket's path.
pub fn relay_unreachable() -> Option<io::Error> {
    UNREACHABLE.with(|unreachable| unreachable.borrow_mut().take())
}

/// The wait a relay gave up on, if `error` is what the client met then: its
/// connection closed under it.
pub fn relay_gave_up(error: &postgres::Error) -> Option<Unanswered> {
    let closed = error.is_closed()
        || std::error::Error::source(error).is_some_and(|cause| cause.is::<io::Error>());
    if !closed {
        return None;
    }
    GAVE_UP.with(|gave_up| gave_up.borrow_mut().take())
}

/// A socket of jobrun's own that stands for the server's Unix socket
/// `server`. On Linux an abstract socket: it has no file, so nothing is
/// left behind whatever ends the process (`kill -9` included), and `$TMPDIR`
/// plays no part; since any process could connect to it, only this
/// process's own connection gets through. Elsewhere a socket in a folder
/// made for it alone, removed once the client is connected.
pub struct UnixRelay {
    listener: Option<UnixListener>,
    /// The socket's folder as the client is to name it.
    dir: PathBuf,
    /// The folder made for the socket, where it has a file.
    made: Option<PathBuf>,
    server: PathBuf,
}

impl UnixRelay {
    /// A socket for the server's socket in the folder `dir`, port `port`,
    /// named as the client names sockets: `.s.PGSQL.PORT` in a folder.
    pub fn new(dir: &Path, port: u16) -> io::Result<UnixRelay> {
        let name = format!(".s.PGSQL.{port}");
        for _ in 0..8 {
            let folder = format!(
                "jobrun-pg-{}-{:016x}",
                std::process::id(),
                fastrand::u64(..)
            );
            let Some((listener, ours, made)) = listen(&folder, &name)? else {
                continue;
            };
            listener.set_nonblocking(true)?;
            return Ok(UnixRelay {
                listener: Some(listener),
                dir: ours,
                made,
                server: dir.join(&name),
            });
        }
        Err(io::Error::other(
            "cannot find a free name for the relay to the server's Unix socket",
        ))
    }

    /// The folder the client is to connect in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Takes the client's connection and relays it to the server's socket,
    /// every wait for the server bounded by `limit`. Runs on the client's
    /// runtime.
    async fn run(mut self, limit: Arc<AnswerLimit>) {
        let Some(listener) = self.listener.take() else {
            return;
        };
        let accepted = match tokio::net::UnixListener::from_std(listener) {
            Ok(listener) => accept_own(&listener).await,
            Err(error) => Err(error),
        };
        self.remove();
        let Ok(mut client) = accepted else {
            return;
        };
        let wait = limit.get();
        let server =
            match tokio::time::timeout(wait, tokio::net::UnixStream::connect(&self.server)).await {
                Ok(Ok(server)) => server,
                // The client reads the end of its connection; this says why.
                Ok(Err(error)) => {
                    let error = io::Error::new(
                        error.kind(),
                        format!("cannot connect to {}: {error}", self.server.display()),
                    );
                    UNREACHABLE.with(|unreachable| *unreachable.borrow_mut() = Some(error));
                    return;
                }
                Err(_) => {
                    GAVE_UP.with(|gave_up| *gave_up.borrow_mut() = Some(limit.unanswered(wait)));
                    return;
                }
            };
        let mut server = Bounded::new(Link::Unix(server), limit);
        if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut server).await
            && let Some(unanswered) = unanswered(&error)
        {
            let unanswered = unanswered.clone();
            GAVE_UP.with(|gave_up| *gave_up.borrow_mut() = Some(unanswered));
        }
    }

    fn remove(&mut self) {
        self.listener = None;
        if let Some(made) = self.made.take() {
            let _ = std::fs::remove_file(made.join(self.server.file_name().unwrap_or_default()));
            let _ = std::fs::remove_dir(made);
        }
    }
}

impl Drop for UnixRelay {
    fn drop(&mut self) {
        self.remove();
    }
}

/// The first connection to `listener` that comes from this process; any
/// other is closed at once. Where the system does not tell the peer's pid
/// (FreeBSD), the socket is in a folder only this user may enter.
async fn accept_own(listener: &tokio::net::UnixListener) -> io::Result<tokio::net::UnixStream> {
    let me = i32::try_from(std::process::id()).ok();
    loop {
        let (client, _) = listener.accept().await?;
        if client
            .peer_cred()
            .is_ok_and(|peer| peer.pid().is_none_or(|pid| Some(pid) == me))
        {
            return Ok(client);
        }
    }
}

/// Listens on the abstract socket `folder/name`: the listener and the
/// folder the client is to name (the abstract name's first part, after a
/// NUL byte, as tokio reads it), or None when the name is taken.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn listen(
    folder: &str,
    name: &str,
) -> io::Result<Option<(UnixListener, PathBuf, Option<PathBuf>)>> {
    use std::os::linux::net::SocketAddrExt;
    let address = std::os::unix::net::SocketAddr::from_abstract_name(format!("{folder}/{name}"))?;
    match UnixListener::bind_addr(&address) {
        Ok(listener) => Ok(Some((listener, PathBuf::from(format!("\0{folder}")), None))),
        Err(error) if error.kind() == io::ErrorKind::AddrInUse => Ok(None),
        Err(error) => Err(error),
    }
}

/// Listens on the socket `name` in a new folder `folder` of the temp
/// folder, which only this user may enter: the listener, the folder for
/// the client and for removal, or None when the name is taken.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn listen(
    folder: &str,
    name: &str,
) -> io::Result<Option<(UnixListener, PathBuf, Option<PathBuf>)>> {
    use std::os::unix::fs::DirBuilderExt;
    let made = std::env::temp_dir().join(folder);
    match std::fs::DirBuilder::new().mode(0o700).create(&made) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => return Ok(None),
        Err(error) => return Err(error),
    }
    match UnixListener::bind(made.join(name)) {
        Ok(listener) => Ok(Some((listener, made.clone(), Some(made)))),
        Err(error) => {
            let _ = std::fs::remove_dir(&made);
            Err(error)
        }
    }
}

/// Connects as `sslmode` says (`tls`: None for `disable`; else the TLS
/// client and whether TLS is required), every stream bounded by `limit`;
/// the Unix sockets through `relays`, in the order of the hosts.
pub struct BoundedConnect {
    pub tls: Option<(MakeRustlsConnect, bool)>,
    pub limit: Arc<AnswerLimit>,
    pub relays: VecDeque<UnixRelay>,
}

type RustlsConnect = <MakeRustlsConnect as MakeTlsConnect<Socket>>::TlsConnect;
type RustlsStream = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;

impl MakeTlsConnect<Socket> for BoundedConnect {
    type Stream = Bounded;
    type TlsConnect = BoundedTlsConnect;
    type Error = Infallible;

    fn make_tls_connect(&mut self, domain: &str) -> Result<BoundedTlsConnect, Infallible> {
        // A Unix socket (no host name) has just been connected: the relays
        // start on the runtime that drives the client, all of them, each
        // taking its own socket's connection (the hosts may be tried in
        // any order, `load_balance_hosts=random`).
        if domain.is_empty() {
            for relay in self.relays.drain(..) {
                tokio::spawn(relay.run(self.limit.clone()));
            }
        }
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

/// The connection under the protocol: plain, TLS, or a relayed Unix
/// socket.
pub enum Link {
    Plain(Socket),
    Tls(Box<RustlsStream>),
    Unix(tokio::net::UnixStream),
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
            Link::Unix(socket) => Pin::new(socket).poll_read(cx, buf),
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
            Link::Unix(socket) => Pin::new(socket).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Link::Plain(socket) => Pin::new(socket).poll_flush(cx),
            Link::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
            Link::Unix(socket) => Pin::new(socket).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Link::Plain(socket) => Pin::new(socket).poll_shutdown(cx),
            Link::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
            Link::Unix(socket) => Pin::new(socket).poll_shutdown(cx),
        }
    }
}

/// Protocol messages as they go by, cut at their boundaries (a type byte,
/// then a length that counts itself; the startup message has no type
/// byte): enough to count the requests that end the client's turn and the
/// answers that end the server's.
#[derive(Debug, Default)]
struct Messages {
    header: [u8; 5],
    /// Bytes of the header read so far.
    have: usize,
    /// The next message has no type byte (the startup message).
    untyped: bool,
    /// Bytes of the current message's body still to come.
    body_left: usize,
}

impl Messages {
    /// jobrun's side, which starts with the startup message.
    fn from_client() -> Messages {
        Messages {
            untyped: true,
            ..Messages::default()
        }
    }

    /// Reads `bytes`, giving `whole` the type of every message they end
    /// (None for the startup message).
    fn read(&mut self, mut bytes: &[u8], mut whole: impl FnMut(Option<u8>)) {
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(bytes.len());
                self.body_left -= n;
                bytes = &bytes[n..];
                if self.body_left == 0 {
                    whole(self.kind());
                }
                continue;
            }
            let header = if self.untyped { 4 } else { 5 };
            let n = (header - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have < header {
                break;
            }
            self.have = 0;
            let at = header - 4;
            let length = [
                self.header[at],
                self.header[at + 1],
                self.header[at + 2],
                self.header[at + 3],
            ];
            self.body_left = (u32::from_be_bytes(length) as usize).saturating_sub(4);
            if self.body_left == 0 {
                whole(self.kind());
            }
        }
    }

    /// The type of the message just read whole.
    fn kind(&mut self) -> Option<u8> {
        if std::mem::take(&mut self.untyped) {
            return None;
        }
        Some(self.header[0])
    }
}

/// How many answers that end the server's turn (`ReadyForQuery`) a message
/// from jobrun asks for: the startup message, a simple `Query` and a `Sync`
/// one each; `Terminate` is answered by the end of the connection, counted
/// here so that waiting for it is bounded too.
fn asks(kind: Option<u8>) -> u64 {
    match kind {
        None | Some(b'Q' | b'S' | b'X') => 1,
        Some(_) => 0,
    }
}

/// How many owed answers a message from the server settles: a
/// `ReadyForQuery` one; a `CopyInResponse` one too, for the server ignores
/// the `Sync` sent with the statement while the copy lasts, and answers only
/// the one sent after its data.
fn settles(kind: Option<u8>) -> u64 {
    match kind {
        Some(b'Z' | b'G') => 1,
        _ => 0,
    }
}

/// A connection whose waits for the server are bounded.
pub struct Bounded {
    inner: Link,
    limit: Arc<AnswerLimit>,
    /// What jobrun sent and what the server answered, as messages.
    sent: Messages,
    answers: Messages,
    /// jobrun has sent something the server has not finished answering.
    owed: u64,
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
            sent: Messages::from_client(),
            answers: Messages::default(),
            owed: 0,
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
                    // A `Sync` sent without waiting (a rollback, say)
                    // is answered after the next request has gone.
                    let mut settled = 0;
                    this.answers.read(read, |kind| settled += settles(kind));
                    this.owed = this.owed.saturating_sub(settled);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending if this.owed > 0 => this.wait(cx),
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
                    let mut asked = 0;
                    this.sent.read(&buf[..n], |kind| asked += asks(kind));
                    this.owed += asked;
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
            Link::Plain(_) | Link::Unix(_) => ChannelBinding::none(),
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

    /// The kinds of the whole messages in `bytes`, read in two pieces cut
    /// at `cut`.
    fn kinds(mut messages: Messages, bytes: &[u8], cut: usize) -> Vec<Option<u8>> {
        let mut kinds = Vec::new();
        messages.read(&bytes[..cut], |kind| kinds.push(kind));
        messages.read(&bytes[cut..], |kind| kinds.push(kind));
        kinds
    }

    #[test]
    fn the_servers_turn_ends_with_a_whole_ready_for_query_at_any_cut() {
        let mut answer = message(b'C', b"SELECT 1\0");
        // A row whose bytes look like a ReadyForQuery does not end it.
        answer.extend(message(b'D', &message(b'Z', b"I")));
        answer.extend(message(b'Z', b"I"));
        for cut in 0..answer.len() {
            let kinds = kinds(Messages::default(), &answer, cut);
            assert_eq!(kinds, [Some(b'C'), Some(b'D'), Some(b'Z')], "cut at {cut}");
            assert_eq!(kinds.into_iter().map(settles).sum::<u64>(), 1);
        }
    }

    #[test]
    fn each_query_and_sync_jobrun_sends_is_owed_its_own_answer() {
        // The startup message (no type byte), a simple query, then a
        // statement in the extended protocol ended by its Sync.
        let mut startup = 9u32.to_be_bytes().to_vec();
        startup.extend_from_slice(b"\0\x03\0\0\0");
        let mut sent = startup;
        sent.extend(message(b'Q', b"ROLLBACK\0"));
        sent.extend(message(b'P', b"\0SELECT 1\0\0\0"));
        sent.extend(message(b'B', &[0; 8]));
        sent.extend(message(b'E', &[0; 5]));
        sent.extend(message(b'S', b""));
        for cut in 0..sent.len() {
            let kinds = kinds(Messages::from_client(), &sent, cut);
            assert_eq!(kinds.len(), 6, "cut at {cut}");
            assert_eq!(kinds.into_iter().map(asks).sum::<u64>(), 3, "cut at {cut}");
        }
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
