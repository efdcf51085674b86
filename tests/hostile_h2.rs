//! HTTP/2 servers that misbehave within the protocol: one that sends
//! GOAWAY after a few streams on each connection, one that refuses streams
//! (RST_STREAM REFUSED_STREAM), one that refuses them all. Every URL must
//! end right (done, or failed with a clear error once its attempts are
//! spent), none may be fetched more often than the retry rules allow, and
//! the connections stay few.

mod support;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use support::pki::TestCa;
use support::*;

/// How the server misbehaves.
#[derive(Debug, Clone, Copy)]
enum Trick {
    /// A graceful GOAWAY once a connection has taken this many streams:
    /// those already taken are answered, later ones refused.
    GoAwayAfter(usize),
    /// An immediate GOAWAY (NO_ERROR) once a connection has taken this
    /// many streams: the streams taken but not answered yet are lost.
    CutAfter(usize),
    /// Every `n`th stream of a connection is refused.
    RefuseEvery(usize),
    /// Every stream is refused.
    RefuseAll,
    /// Once a connection has taken this many streams, a SETTINGS frame
    /// lowers SETTINGS_MAX_CONCURRENT_STREAMS to 1.
    SqueezeAfter(usize),
}

#[derive(Default)]
struct Counts {
    accepted: AtomicUsize,
    open: AtomicUsize,
    most_open: AtomicUsize,
    /// Requests that reached the server, by path.
    arrived: Mutex<HashMap<String, usize>>,
    /// Whole answers sent, by path.
    answered: Mutex<HashMap<String, usize>>,
    /// The most streams already open when one came after the client had
    /// acknowledged a limit of one stream at a time.
    open_past_the_limit: AtomicUsize,
    /// Connections whose client acknowledged that limit.
    squeezed: AtomicUsize,
}

struct Hostile {
    addr: SocketAddr,
    counts: Arc<Counts>,
}

impl Hostile {
    fn start(ca: &TestCa, trick: Trick) -> Hostile {
        let mut config = (*ca.server_config(None)).clone();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        listener.set_nonblocking(true).expect("non-blocking");
        let counts = Arc::new(Counts::default());
        let served = counts.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("a listener");
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let (acceptor, counts) = (acceptor.clone(), served.clone());
                    counts.accepted.fetch_add(1, Ordering::SeqCst);
                    let open = counts.open.fetch_add(1, Ordering::SeqCst) + 1;
                    counts.most_open.fetch_max(open, Ordering::SeqCst);
                    tokio::spawn(async move {
                        serve(acceptor, stream, trick, &counts).await;
                        counts.open.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            });
        });
        Hostile { addr, counts }
    }

    fn url(&self, path: &str) -> String {
        format!("https://{}{}", self.addr, path)
    }

    /// Says how many connections it took, for the test's output.
    fn tell(&self, what: &str) {
        eprintln!(
            "{what}: {} connections, at most {} at once; a URL reached it {} times at most",
            self.counts.accepted.load(Ordering::SeqCst),
            self.counts.most_open.load(Ordering::SeqCst),
            self.most_per_path(&self.counts.arrived)
        );
    }

    fn most_per_path(&self, map: &Mutex<HashMap<String, usize>>) -> usize {
        map.lock().unwrap().values().copied().max().unwrap_or(0)
    }
}

async fn serve(
    acceptor: tokio_rustls::TlsAcceptor,
    stream: tokio::net::TcpStream,
    trick: Trick,
    counts: &Arc<Counts>,
) {
    let Ok(tls) = acceptor.accept(stream).await else {
        return;
    };
    let squeeze = Arc::new(Squeeze::default());
    let tls = Squeezed::new(tls, squeeze.clone());
    let Ok(mut connection) = ::h2::server::Builder::new()
        .max_concurrent_streams(100)
        .handshake(tls)
        .await
    else {
        return;
    };
    let mut streams = 0;
    let open = Arc::new(AtomicUsize::new(0));
    while let Some(Ok((request, mut respond))) = connection.accept().await {
        streams += 1;
        if let Trick::SqueezeAfter(n) = trick
            && streams == n
        {
            squeeze.lower.store(true, Ordering::SeqCst);
        }
        let already = open.fetch_add(1, Ordering::SeqCst);
        // Frames are read ahead of the streams taken: a stream opened
        // after the acknowledgement is one with a greater id.
        if squeeze.acknowledged.load(Ordering::SeqCst)
            && u32::from(respond.stream_id()) > squeeze.before.load(Ordering::SeqCst)
        {
            counts
                .open_past_the_limit
                .fetch_max(already, Ordering::SeqCst);
        }
        let path = request.uri().path().to_string();
        *counts
            .arrived
            .lock()
            .unwrap()
            .entry(path.clone())
            .or_default() += 1;
        let refuse = match trick {
            Trick::RefuseEvery(n) => streams % n == 0,
            Trick::RefuseAll => true,
            _ => false,
        };
        if refuse {
            respond.send_reset(::h2::Reason::REFUSED_STREAM);
            open.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        match trick {
            Trick::CutAfter(n) => {
                // Answered at once, so that the cut loses only the streams
                // sent after the n-th.
                answer(respond, path, counts);
                open.fetch_sub(1, Ordering::SeqCst);
                if streams == n {
                    connection.abrupt_shutdown(::h2::Reason::NO_ERROR);
                }
            }
            _ => {
                let (counts, open) = (counts.clone(), open.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    answer(respond, path, &counts);
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        }
        if let Trick::GoAwayAfter(n) = trick
            && streams == n
        {
            connection.graceful_shutdown();
        }
    }
    if squeeze.acknowledged.load(Ordering::SeqCst) {
        counts.squeezed.fetch_add(1, Ordering::SeqCst);
    }
}

/// When to lower the client's limit of streams, and whether the client
/// has acknowledged it.
#[derive(Default)]
struct Squeeze {
    lower: AtomicBool,
    acknowledged: AtomicBool,
    /// The last stream the client opened before it acknowledged.
    before: AtomicU32,
}

/// A SETTINGS frame: SETTINGS_MAX_CONCURRENT_STREAMS (3) = 1.
const ONE_STREAM: [u8; 15] = [0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 1];

/// The client's connection preface, before its first frame.
const PREFACE: usize = 24;

/// Cuts a byte stream into HTTP/2 frames: a 9-byte header (length, type,
/// flags, stream), then the body.
#[derive(Default)]
struct Frames {
    header: [u8; 9],
    have: usize,
    body_left: usize,
}

impl Frames {
    fn at_boundary(&self) -> bool {
        self.have == 0 && self.body_left == 0
    }

    /// Reads `bytes`; for each whole header, `header` says whether to keep
    /// it. Returns the bytes kept.
    fn filter(&mut self, mut bytes: &[u8], mut keep: impl FnMut(&[u8; 9]) -> bool) -> Vec<u8> {
        let mut kept = Vec::with_capacity(bytes.len());
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(bytes.len());
                kept.extend_from_slice(&bytes[..n]);
                self.body_left -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (9 - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == 9 {
                self.have = 0;
                self.body_left =
                    u32::from_be_bytes([0, self.header[0], self.header[1], self.header[2]])
                        as usize;
                if keep(&self.header) {
                    kept.extend_from_slice(&self.header);
                }
            }
        }
        kept
    }
}

/// The server's side of a connection, where a SETTINGS frame that lowers
/// the client's limit to one stream is slipped in between two of the
/// server's frames once asked for; the client's acknowledgement of it is
/// taken out of what the server reads (the server did not send it, and
/// would take an acknowledgement it did not ask for as an error).
struct Squeezed<S> {
    inner: S,
    squeeze: Arc<Squeeze>,
    sent: Frames,
    /// The frame to slip in, from this offset; None once sent.
    slip: Option<usize>,
    read: Frames,
    preface_left: usize,
    /// Bytes read and kept, not yet handed to the server.
    ready: Vec<u8>,
}

impl<S> Squeezed<S> {
    fn new(inner: S, squeeze: Arc<Squeeze>) -> Squeezed<S> {
        Squeezed {
            inner,
            squeeze,
            sent: Frames::default(),
            slip: Some(0),
            read: Frames::default(),
            preface_left: PREFACE,
            ready: Vec::new(),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Squeezed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        while this.ready.is_empty() {
            let mut scratch = [0u8; 16 * 1024];
            let mut read = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
            let mut bytes = read.filled();
            if bytes.is_empty() {
                return Poll::Ready(Ok(()));
            }
            let preface = this.preface_left.min(bytes.len());
            this.ready.extend_from_slice(&bytes[..preface]);
            this.preface_left -= preface;
            bytes = &bytes[preface..];
            let waiting_for_ack =
                this.slip.is_none() && !this.squeeze.acknowledged.load(Ordering::SeqCst);
            let squeeze = &this.squeeze;
            let mut dropped = !waiting_for_ack;
            let kept = this.read.filter(bytes, |header| {
                let ack = header[3] == 4 && header[4] & 1 == 1;
                if ack && !dropped {
                    dropped = true;
                    squeeze.acknowledged.store(true, Ordering::SeqCst);
                    return false;
                }
                // A HEADERS frame opens a stream (the client's ids grow).
                if header[3] == 1 && !dropped {
                    let id = u32::from_be_bytes([header[5], header[6], header[7], header[8]]);
                    squeeze.before.fetch_max(id & 0x7fff_ffff, Ordering::SeqCst);
                }
                true
            });
            this.ready.extend_from_slice(&kept);
        }
        let n = this.ready.len().min(buf.remaining());
        buf.put_slice(&this.ready[..n]);
        this.ready.drain(..n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Squeezed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        while let Some(from) = this.slip
            && this.sent.at_boundary()
            && this.squeeze.lower.load(Ordering::SeqCst)
        {
            match Pin::new(&mut this.inner).poll_write(cx, &ONE_STREAM[from..]) {
                Poll::Ready(Ok(n)) => {
                    this.slip = (from + n < ONE_STREAM.len()).then_some(from + n);
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => return Poll::Pending,
            }
        }
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                this.sent.filter(&buf[..n], |_| true);
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Sends the item at `path`, counting it once it is sent whole.
fn answer(mut respond: ::h2::server::SendResponse<bytes::Bytes>, path: String, counts: &Counts) {
    let body = item_of(&path).map(item_body).unwrap_or_default();
    let response = http::Response::builder()
        .status(200)
        .header("content-length", body.len())
        .body(())
        .expect("a response");
    if let Ok(mut send) = respond.send_response(response, false)
        && send.send_data(bytes::Bytes::from(body), true).is_ok()
    {
        *counts.answered.lock().unwrap().entry(path).or_default() += 1;
    }
}

/// Imports `count` items of `server` and runs jobrun on them with `args`.
fn run_items(
    ca: &TestCa,
    server: &Hostile,
    count: usize,
    args: &[&str],
) -> (Job, Vec<String>, std::process::Output) {
    let urls: Vec<String> = (0..count)
        .map(|i| server.url(&format!("/items/{i}.json")))
        .collect();
    let job = Job::new();
    assert_success(&job.import(&urls), "import");
    let cacert = ca.write(&job.dir().join("ca.pem"));
    let output = job
        .command()
        .arg("run")
        .args(["--cacert", cacert.to_str().unwrap()])
        .args(["--backoff-base", "20ms", "--backoff-max", "100ms"])
        .args(args)
        .output()
        .expect("run jobrun");
    (job, urls, output)
}

fn assert_items_done(job: &Job, server: &Hostile, urls: &[String]) {
    job.assert_all_files_are(urls, |url| {
        item_body(
            item_of(url.strip_prefix(&server.url("")).expect("an item URL")).expect("an item"),
        )
    });
}

/// Every URL done over connections that each close gracefully after ten
/// streams, each URL answered once. The client (hyper) opens a connection
/// for every request that finds none ready while the last one closes, so
/// the connections are many (about 200 for these 300 URLs): the guard is
/// that they are never many more at once than the workers (a connection
/// still being made when another was found counts too).
#[test]
fn a_server_sending_goaway_every_ten_streams_gets_every_url_once() {
    let ca = TestCa::new("jobrun hostile HTTP/2 CA");
    let server = Hostile::start(&ca, Trick::GoAwayAfter(10));
    let (job, urls, output) = run_items(&ca, &server, 300, &["--workers", "20"]);
    server.tell("GOAWAY every ten streams");
    assert_success(&output, "a run against a server that sends GOAWAY");
    assert_items_done(&job, &server, &urls);
    assert_eq!(server.most_per_path(&server.counts.answered), 1);
    let arrived = server.most_per_path(&server.counts.arrived);
    assert!(arrived <= 3, "a URL reached the server {arrived} times");
    let most_open = server.counts.most_open.load(Ordering::SeqCst);
    assert!(most_open <= 2 * 20, "{most_open} connections open at once");
}

/// Connections closed hard (GOAWAY, then the socket at once) after ten
/// streams: the requests in flight on them meet a broken connection, a
/// retryable error. Each URL ends done, or failed once its five attempts
/// are spent, with that error; none reaches the server more often than
/// its attempts allow (each sent at most three times by the client), and
/// the exit status says that some failed.
#[test]
fn a_server_cutting_connections_ends_every_url_within_its_attempts() {
    let ca = TestCa::new("jobrun hostile HTTP/2 CA");
    let server = Hostile::start(&ca, Trick::CutAfter(10));
    let (job, _, output) = run_items(&ca, &server, 300, &["--workers", "20"]);
    server.tell("cut after ten streams");
    let rows = job.export();
    assert_eq!(rows.len(), 300);
    let mut failed = 0;
    for row in rows.values() {
        match row["state"].as_str() {
            Some("done") => {}
            Some("failed") => {
                failed += 1;
                assert_eq!(row["attempts"], 5, "{row}");
                let error = row["error"].as_str().expect("an error");
                assert!(error.contains("gave up after 5 attempts"), "{error}");
            }
            _ => panic!("a URL neither done nor failed: {row}"),
        }
    }
    let expected = if failed == 0 { 0 } else { 1 };
    assert_eq!(output.status.code(), Some(expected), "{}", stderr(&output));
    let arrived = server.most_per_path(&server.counts.arrived);
    assert!(arrived <= 15, "a URL reached the server {arrived} times");
    // A request whose connection broke may be sent again over a new one
    // while the connection it first asked for is still being made, and the
    // server counts a cut connection until its task sees the end, which
    // lags on a busy machine: a leak would be hundreds.
    let most_open = server.counts.most_open.load(Ordering::SeqCst);
    assert!(most_open <= 3 * 20, "{most_open} connections open at once");
}

#[test]
fn a_server_refusing_every_third_stream_gets_every_url_once() {
    let ca = TestCa::new("jobrun hostile HTTP/2 CA");
    let server = Hostile::start(&ca, Trick::RefuseEvery(3));
    let (job, urls, output) = run_items(&ca, &server, 300, &["--workers", "20"]);
    server.tell("every third stream refused");
    assert_success(&output, "a run against a server that refuses streams");
    assert_items_done(&job, &server, &urls);
    assert_eq!(server.most_per_path(&server.counts.answered), 1);
    let arrived = server.most_per_path(&server.counts.arrived);
    assert!(arrived <= 15, "a URL reached the server {arrived} times");
    let accepted = server.counts.accepted.load(Ordering::SeqCst);
    assert!(accepted <= 4, "{accepted} connections");
}

/// A server that refuses every stream: each URL fails once its attempts
/// are spent, with an error that says the server refused it, and reached
/// the server a bounded number of times.
#[test]
fn a_server_refusing_every_stream_fails_each_url_after_its_attempts() {
    let ca = TestCa::new("jobrun hostile HTTP/2 CA");
    let server = Hostile::start(&ca, Trick::RefuseAll);
    let (job, _, output) = run_items(&ca, &server, 20, &["--workers", "5", "--max-attempts", "3"]);
    server.tell("every stream refused");
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let rows = job.export();
    assert_eq!(rows.len(), 20);
    for row in rows.values() {
        assert_eq!(row["state"], "failed", "{row}");
        assert_eq!(row["attempts"], 3, "{row}");
        let error = row["error"].as_str().expect("an error");
        assert!(error.contains("refused"), "{error}");
    }
    let arrived = server.most_per_path(&server.counts.arrived);
    assert!(arrived <= 9, "a URL reached the server {arrived} times");
}

/// A server that lowers SETTINGS_MAX_CONCURRENT_STREAMS from 100 to 1 in
/// the middle of a connection: the client waits for its open streams to
/// end before it opens another, and every URL is done once.
#[test]
fn a_server_lowering_its_streams_to_one_mid_run_gets_every_url_once() {
    let ca = TestCa::new("jobrun hostile HTTP/2 CA");
    let server = Hostile::start(&ca, Trick::SqueezeAfter(40));
    let (job, urls, output) = run_items(&ca, &server, 300, &["--workers", "20"]);
    server.tell("streams lowered to one after forty");
    assert_success(&output, "a run against a server that lowers its streams");
    assert_items_done(&job, &server, &urls);
    assert_eq!(server.most_per_path(&server.counts.answered), 1);
    // Counted as the connection ends, once jobrun is gone.
    wait_for(
        Duration::from_secs(10),
        "the lower limit acknowledged",
        || server.counts.squeezed.load(Ordering::SeqCst) >= 1,
    );
    let past = server.counts.open_past_the_limit.load(Ordering::SeqCst);
    assert_eq!(
        past, 0,
        "a stream opened while {past} others were open, one allowed"
    );
    let accepted = server.counts.accepted.load(Ordering::SeqCst);
    assert!(accepted <= 2, "{accepted} connections");
}
