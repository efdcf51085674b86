//! A small HTTP/1.1 server for tests and the demo, on 127.0.0.1 with a port
//! the system picks, over plain TCP or TLS with a self-signed certificate.
//! It is written on plain sockets so that it can misbehave the way real
//! servers do: reset mid-body, stall, lie about the length, drip bytes,
//! send endless bodies or gzip bombs. A handler decides each answer from the
//! request and from how many times that path was asked for before; every
//! request is logged with its time so a test can count fetches per URL and
//! the gaps between them.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A request as the handler sees it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// How many earlier requests asked for this path (0 for the first).
    pub previous: usize,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One logged request.
#[derive(Debug, Clone)]
pub struct Hit {
    pub path: String,
    pub at: Instant,
    pub headers: Vec<(String, String)>,
}

/// How to answer.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A complete response.
    Full {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Wait, then answer.
    Delayed(Duration, Box<Reply>),
    /// Headers with the full Content-Length, `sent` bytes of the body, then
    /// a TCP reset.
    ResetMidBody { body: Vec<u8>, sent: usize },
    /// Headers claiming `claimed` bytes, the shorter body, then a clean close.
    ShortBody { body: Vec<u8>, claimed: usize },
    /// The body one byte at a time, `gap` apart.
    Drip { body: Vec<u8>, gap: Duration },
    /// Say nothing for this long, then close.
    Stall(Duration),
    /// A 200 with `length` bytes of `huge_byte`, generated as they are sent;
    /// without Content-Length when `declared` is false (the end of the body
    /// is then the end of the connection).
    Huge { length: u64, declared: bool },
}

impl Reply {
    pub fn ok(body: Vec<u8>) -> Reply {
        Reply::Full {
            status: 200,
            headers: Vec::new(),
            body,
        }
    }

    pub fn status(status: u16) -> Reply {
        let body = format!("{{\"error\": \"status {status}\"}}").into_bytes();
        Reply::Full {
            status,
            headers: Vec::new(),
            body,
        }
    }

    pub fn with_header(self, name: &str, value: &str) -> Reply {
        match self {
            Reply::Full {
                status,
                mut headers,
                body,
            } => {
                headers.push((name.to_string(), value.to_string()));
                Reply::Full {
                    status,
                    headers,
                    body,
                }
            }
            other => other,
        }
    }

    pub fn redirect(status: u16, location: &str) -> Reply {
        Reply::status(status).with_header("Location", location)
    }

    pub fn delayed(self, delay: Duration) -> Reply {
        if delay.is_zero() {
            self
        } else {
            Reply::Delayed(delay, Box::new(self))
        }
    }

    /// Answers after a random delay between `min` and `max`.
    pub fn jittered(self, min: Duration, max: Duration) -> Reply {
        let spread = max.saturating_sub(min);
        self.delayed(min + spread.mul_f64(fastrand::f64()))
    }

    /// A 200 whose body is `body` gzipped, with `Content-Encoding: gzip`.
    pub fn gzip(body: &[u8]) -> Reply {
        Reply::encoded("gzip", body)
    }

    /// A 200 with a small gzip body that decodes to `decoded` zero bytes.
    pub fn gzip_bomb(decoded: u64) -> Reply {
        Reply::bomb("gzip", decoded)
    }

    /// A 200 whose body is `body` compressed with `encoding` (`gzip`,
    /// `deflate`, `br` or `zstd`), with that `Content-Encoding`.
    pub fn encoded(encoding: &str, body: &[u8]) -> Reply {
        Reply::ok(encode(encoding, |out| out.write_all(body)))
            .with_header("Content-Encoding", encoding)
    }

    /// A 200 with a small body in `encoding` that decodes to `decoded`
    /// zero bytes.
    pub fn bomb(encoding: &str, decoded: u64) -> Reply {
        Reply::ok(bomb(encoding, decoded)).with_header("Content-Encoding", encoding)
    }
}

/// What `write` writes, compressed with `encoding` (HTTP's `deflate` is the
/// zlib format).
fn encode(encoding: &str, write: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> Vec<u8> {
    let level = flate2::Compression::best();
    let encoded = match encoding {
        "gzip" => {
            let mut encoder = flate2::write::GzEncoder::new(Vec::new(), level);
            write(&mut encoder).and_then(|()| encoder.finish())
        }
        "deflate" => {
            let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), level);
            write(&mut encoder).and_then(|()| encoder.finish())
        }
        "br" => {
            let mut encoder = brotli::CompressorWriter::new(Vec::new(), 64 * 1024, 5, 22);
            write(&mut encoder).map(|()| encoder.into_inner())
        }
        "zstd" => zstd::stream::write::Encoder::new(Vec::new(), 3)
            .and_then(|mut encoder| write(&mut encoder).and_then(|()| encoder.finish())),
        other => panic!("no encoder for {other:?}"),
    };
    encoded.expect("compress into memory")
}

/// Zeros compressed in chunks, so the decoded size never sits in memory.
/// Bombs are made once per encoding, size and process: compressing is slow
/// in a debug build.
fn bomb(encoding: &str, decoded: u64) -> Vec<u8> {
    type Made = Mutex<HashMap<(String, u64), Vec<u8>>>;
    static MADE: OnceLock<Made> = OnceLock::new();
    let mut made = MADE.get_or_init(Default::default).lock().unwrap();
    made.entry((encoding.to_string(), decoded))
        .or_insert_with(|| {
            encode(encoding, |out| {
                let zeros = [0u8; 64 * 1024];
                let mut left = decoded;
                while left > 0 {
                    let n = left.min(zeros.len() as u64) as usize;
                    out.write_all(&zeros[..n])?;
                    left -= n as u64;
                }
                Ok(())
            })
        })
        .clone()
}

/// Byte `offset` of a `Reply::Huge` body.
pub fn huge_byte(offset: u64) -> u8 {
    (offset % 251) as u8
}

pub type Handler = dyn Fn(&Request) -> Reply + Send + Sync;

pub struct Server {
    addr: SocketAddr,
    scheme: &'static str,
    log: Arc<Mutex<Vec<Hit>>>,
    stop: Arc<AtomicBool>,
    in_flight: Arc<InFlight>,
    /// Connections accepted so far.
    accepted: Arc<AtomicUsize>,
}

/// Requests being answered now, and the most there ever were at once.
#[derive(Default)]
struct InFlight {
    now: AtomicUsize,
    most: AtomicUsize,
}

/// A connection the server answers on: plain TCP, or TLS over TCP.
trait Connection: Read + Write + Send + 'static {
    fn socket(&self) -> &TcpStream;
}

impl Connection for TcpStream {
    fn socket(&self) -> &TcpStream {
        self
    }
}

impl Connection for rustls::StreamOwned<rustls::ServerConnection, TcpStream> {
    fn socket(&self) -> &TcpStream {
        &self.sock
    }
}

impl Server {
    pub fn start(handler: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> Server {
        Server::start_on("127.0.0.1:0", handler)
    }

    /// As `start`, for a server that runs for long (the demo): an error
    /// instead of a panic when it cannot listen, and no request log, which
    /// would grow with every request.
    pub fn try_start(
        handler: impl Fn(&Request) -> Reply + Send + Sync + 'static,
    ) -> io::Result<Server> {
        Server::listen("127.0.0.1:0", "http", handler, Ok, false)
    }

    /// An HTTPS server with the self-signed certificate of
    /// `tests/fixtures/self-signed.crt` (for 127.0.0.1 and localhost), which
    /// no client trusts unless told to.
    pub fn start_tls(handler: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> Server {
        let certs =
            CertificateDer::pem_slice_iter(include_bytes!("../../fixtures/self-signed.crt"))
                .collect::<Result<Vec<_>, _>>()
                .expect("the test certificate");
        let key = PrivateKeyDer::from_pem_slice(include_bytes!("../../fixtures/self-signed.key"))
            .expect("the test key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("the test certificate and key");
        Server::start_tls_with(Arc::new(config), handler)
    }

    /// An HTTPS server with the given TLS settings (its certificate, and
    /// whether it asks clients for one).
    pub fn start_tls_with(
        config: Arc<rustls::ServerConfig>,
        handler: impl Fn(&Request) -> Reply + Send + Sync + 'static,
    ) -> Server {
        Server::listen(
            "127.0.0.1:0",
            "https",
            handler,
            move |stream| {
                let tls = rustls::ServerConnection::new(config.clone()).expect("TLS session");
                Ok(rustls::StreamOwned::new(tls, stream))
            },
            true,
        )
        .expect("bind the test server")
    }

    pub fn start_on(
        address: &str,
        handler: impl Fn(&Request) -> Reply + Send + Sync + 'static,
    ) -> Server {
        Server::listen(address, "http", handler, Ok, true).expect("bind the test server")
    }

    /// A server that starts accepting connections only `pause` after it
    /// listens, with room for `backlog` connections not yet accepted: the
    /// kernel drops the SYNs of the clients beyond those, and each of them
    /// connects only when it sends its SYN again, a second later. A client
    /// that opens many connections at once sees a slow start, as on a
    /// loaded machine.
    pub fn start_accepting_late(
        backlog: i32,
        pause: Duration,
        handler: impl Fn(&Request) -> Reply + Send + Sync + 'static,
    ) -> Server {
        Server::listen_with(
            "127.0.0.1:0",
            "http",
            handler,
            Ok,
            true,
            Some((backlog, pause)),
        )
        .expect("bind the test server")
    }

    fn listen<C: Connection>(
        address: &str,
        scheme: &'static str,
        handler: impl Fn(&Request) -> Reply + Send + Sync + 'static,
        wrap: impl Fn(TcpStream) -> io::Result<C> + Send + 'static,
        logged: bool,
    ) -> io::Result<Server> {
        Server::listen_with(address, scheme, handler, wrap, logged, None)
    }

    /// `late`: the backlog and the pause before the first accept (see
    /// `start_accepting_late`).
    fn listen_with<C: Connection>(
        address: &str,
        scheme: &'static str,
        handler: impl Fn(&Request) -> Reply + Send + Sync + 'static,
        wrap: impl Fn(TcpStream) -> io::Result<C> + Send + 'static,
        logged: bool,
        late: Option<(i32, Duration)>,
    ) -> io::Result<Server> {
        let listener = TcpListener::bind(address)?;
        if let Some((backlog, _)) = late {
            use std::os::fd::AsRawFd;
            // SAFETY: listen() on the listener's own open socket; Linux
            // takes the new backlog for a socket already listening.
            if unsafe { libc::listen(listener.as_raw_fd(), backlog) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        let addr = listener.local_addr()?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Arc<Handler> = Arc::new(handler);
        let counts = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
        let in_flight = Arc::new(InFlight::default());
        let accepted = Arc::new(AtomicUsize::new(0));
        {
            let (log, stop, in_flight) = (log.clone(), stop.clone(), in_flight.clone());
            let accepted = accepted.clone();
            thread::spawn(move || {
                if let Some((_, pause)) = late {
                    thread::sleep(pause);
                }
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let _ = stream.set_nodelay(true);
                    let Ok(connection) = wrap(stream) else {
                        continue;
                    };
                    let (handler, log, counts) = (handler.clone(), log.clone(), counts.clone());
                    let in_flight = in_flight.clone();
                    thread::spawn(move || {
                        let log = logged.then_some(&*log);
                        let _ = serve(connection, &*handler, log, &counts, &in_flight);
                    });
                }
            });
        }
        Ok(Server {
            addr,
            scheme,
            log,
            stop,
            in_flight,
            accepted,
        })
    }

    /// The connections this server has accepted.
    pub fn connections_accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// The most requests this server was answering at one time.
    pub fn most_in_flight(&self) -> usize {
        self.in_flight.most.load(Ordering::SeqCst)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{}", self.scheme, self.addr, path)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request so far, in arrival order.
    pub fn hits(&self) -> Vec<Hit> {
        self.log.lock().unwrap().clone()
    }

    pub fn hit_count(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// Waits until the server has seen `count` requests; panics after 30 s.
    pub fn wait_for_hits(&self, count: usize, what: &str) {
        let start = Instant::now();
        while self.hit_count() < count {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "timed out waiting for {what}"
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Requests so far, per path.
    pub fn hits_per_path(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for hit in self.log.lock().unwrap().iter() {
            *counts.entry(hit.path.clone()).or_default() += 1;
        }
        counts
    }

    /// The times at which `path` was asked for.
    pub fn times_of(&self, path: &str) -> Vec<Instant> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|h| h.path == path)
            .map(|h| h.at)
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // wake the accept loop
    }
}

fn serve(
    connection: impl Connection,
    handler: &Handler,
    log: Option<&Mutex<Vec<Hit>>>,
    counts: &Mutex<HashMap<String, usize>>,
    in_flight: &InFlight,
) -> io::Result<()> {
    let mut reader = BufReader::new(connection);
    loop {
        let Some(request) = read_request(&mut reader, counts)? else {
            return Ok(());
        };
        if let Some(log) = log {
            log.lock().unwrap().push(Hit {
                path: request.path.clone(),
                at: Instant::now(),
                headers: request.headers.clone(),
            });
        }
        let close = request
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let now = in_flight.now.fetch_add(1, Ordering::SeqCst) + 1;
        in_flight.most.fetch_max(now, Ordering::SeqCst);
        let mut leaving = Some(&in_flight.now);
        let answered = answer(reader.get_mut(), handler(&request), close, &mut leaving);
        leave(&mut leaving);
        if !answered? {
            return Ok(());
        }
    }
}

fn read_request(
    reader: &mut impl BufRead,
    counts: &Mutex<HashMap<String, usize>>,
) -> io::Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Ok(None);
    };
    let (method, path) = (method.to_string(), target.to_string());
    let mut headers = Vec::new();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 {
            return Ok(None);
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            headers.push((name.trim().to_string(), value.trim().to_string()));
        }
    }
    let length = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    let previous = {
        let mut counts = counts.lock().unwrap();
        let count = counts.entry(path.clone()).or_default();
        *count += 1;
        *count - 1
    };
    Ok(Some(Request {
        method,
        path,
        headers,
        body,
        previous,
    }))
}

/// The status line and headers; no Content-Length when `length` is None.
fn head(status: u16, headers: &[(String, String)], length: Option<u64>, close: bool) -> Vec<u8> {
    let mut text = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    if let Some(length) = length {
        text.push_str(&format!("Content-Length: {length}\r\n"));
    }
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    if !headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("content-type"))
    {
        text.push_str("Content-Type: application/json\r\n");
    }
    if close {
        text.push_str("Connection: close\r\n");
    }
    text.push_str("\r\n");
    text.into_bytes()
}

/// Writes the reply; false when the connection must end.
/// Counts a request as answered, once.
fn leave(leaving: &mut Option<&AtomicUsize>) {
    if let Some(now) = leaving.take() {
        now.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Sends `reply`. A complete reply stops counting as in flight just before
/// its last byte goes out: the client cannot have the whole answer, and so
/// cannot send its next request, before that, so a count taken at the
/// server never sees a request that follows another as overlapping it.
fn answer(
    stream: &mut impl Connection,
    reply: Reply,
    close: bool,
    leaving: &mut Option<&AtomicUsize>,
) -> io::Result<bool> {
    let length = |body: &[u8]| Some(body.len() as u64);
    match reply {
        Reply::Full {
            status,
            headers,
            body,
        } => {
            let mut bytes = head(status, &headers, length(&body), close);
            bytes.extend_from_slice(&body);
            let (most, last) = bytes.split_at(bytes.len() - 1);
            stream.write_all(most)?;
            stream.flush()?;
            leave(leaving);
            stream.write_all(last)?;
            stream.flush()?;
            Ok(!close)
        }
        Reply::Delayed(delay, reply) => {
            thread::sleep(delay);
            answer(stream, *reply, close, leaving)
        }
        Reply::ResetMidBody { body, sent } => {
            let mut bytes = head(200, &[], length(&body), false);
            bytes.extend_from_slice(&body[..sent.min(body.len())]);
            stream.write_all(&bytes)?;
            stream.flush()?;
            reset(stream.socket());
            Ok(false)
        }
        Reply::ShortBody { body, claimed } => {
            let mut bytes = head(200, &[], Some(claimed as u64), true);
            bytes.extend_from_slice(&body);
            stream.write_all(&bytes)?;
            stream.flush()?;
            let _ = stream.socket().shutdown(Shutdown::Both);
            Ok(false)
        }
        Reply::Drip { body, gap } => {
            stream.write_all(&head(200, &[], length(&body), close))?;
            for byte in body {
                thread::sleep(gap);
                stream.write_all(&[byte])?;
                stream.flush()?;
            }
            Ok(!close)
        }
        Reply::Stall(duration) => {
            thread::sleep(duration);
            Ok(false)
        }
        Reply::Huge { length, declared } => {
            let close = close || !declared;
            let content_type = [("Content-Type".into(), "application/octet-stream".into())];
            stream.write_all(&head(200, &content_type, declared.then_some(length), close))?;
            let mut chunk = vec![0u8; 64 * 1024];
            let mut sent = 0u64;
            while sent < length {
                let n = (length - sent).min(chunk.len() as u64) as usize;
                for (i, byte) in chunk[..n].iter_mut().enumerate() {
                    *byte = huge_byte(sent + i as u64);
                }
                // The client hangs up once it has had enough: not an error here.
                if stream.write_all(&chunk[..n]).is_err() {
                    return Ok(false);
                }
                sent += n as u64;
            }
            stream.flush()?;
            if close {
                let _ = stream.socket().shutdown(Shutdown::Both);
            }
            Ok(!close)
        }
    }
}

/// Closes with a TCP reset (SO_LINGER of zero) instead of a clean FIN.
fn reset(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    let _ = stream.shutdown(Shutdown::Read);
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

/// The body the demo and the tests serve for item `i`: JSON of 200 bytes to
/// about 30 KB, the same on every call, different for every item.
pub fn item_body(i: u64) -> Vec<u8> {
    let mut state = i
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        state >> 33
    };
    let size = 200 + (next() % 30_000) as usize;
    let mut body = format!("{{\"id\": {i}, \"payload\": \"").into_bytes();
    const HEX: &[u8; 16] = b"0123456789abcdef";
    while body.len() < size {
        body.push(HEX[(next() % 16) as usize]);
    }
    body.extend_from_slice(b"\"}\n");
    body
}

/// The item number of a path like `/items/17.json`.
pub fn item_of(path: &str) -> Option<u64> {
    path.strip_prefix("/items/")?
        .strip_suffix(".json")?
        .parse()
        .ok()
}
