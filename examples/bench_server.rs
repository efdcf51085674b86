//! The benchmark's data and its slow API (see bench/run.sh).
//!
//!     bench_server generate --items N --dir DIR
//!     bench_server serve --dir DIR [--delay-ms MS] [--url-file FILE] [--note-first-request]
//!     bench_server serve --synthetic BYTES [--delay-ms MS] [--url-file FILE]
//!     bench_server serve ... [--tls DIR [--max-streams N]] [--bind ADDR] [--bucket RATE:BURST] [--faults 500=P,429=P,reset=P]
//!                            [--first STATUS:SECS] [--always STATUS:SECS] [--hits FILE]
//!     bench_server free-port
//!
//! `generate` writes `DIR/items/<i>.json` for i < N (JSON of 5 to 40 KB, about 20 KB on
//! average, the same bytes on every machine) and `DIR/manifest.tsv` (i, bytes, sha256).
//! Existing items are kept.
//!
//! `serve` answers `GET /items/<i>.json` on 127.0.0.1 over HTTP/1.1 with keep-alive, each
//! answer `--delay-ms` after its request: an API whose latency, not its CPU, sets the pace.
//! It is written on tokio rather than on the tests' thread-per-connection server so that
//! a thousand connections cost it little: the client, not the server, should be measured.
//! Bodies come from `--dir`, or with `--synthetic` are made up: BYTES bytes starting with
//! the item's number, for URL lists too long to keep as files.
//!
//! Faults, for the politeness benchmark (bench/politeness.sh), checked in this order:
//! `--always STATUS:SECS` answers every request with STATUS and `Retry-After: SECS`;
//! `--first STATUS:SECS` does so for the first request of each item; `--bucket RATE:BURST`
//! is a token bucket that answers 429 (without Retry-After) when it is empty; `--faults`
//! answers the given percentages of requests with 500, with 429 and `Retry-After: 1`, or
//! with half the body and a TCP reset, at random. `--bind` listens on another loopback
//! address (127.0.0.2, ...) to stand for another host; `--hits FILE` writes a line per
//! request: unix milliseconds, item and status. `--bind` takes a comma-separated list, and
//! `--listeners N` listens on N ports of each address (hosts are host:port for jobrun);
//! `--url-file` then lists every `http://ADDR:PORT`, one a line.
//!
//! It listens with a backlog of 8,192 (capped by `net.core.somaxconn`), so that a thousand
//! clients connecting at once are not dropped and made to wait a second for a retry.
//!
//! `GET /connections` answers how many connections the server has accepted so far (this
//! request's own included), so that a bench can count the connections a client opened.
//!
//! `--tls DIR` serves HTTP/2 over TLS instead (ALPN `h2` only, up to `--max-streams`
//! streams at once per connection, 128 unless given), with a certificate for 127.0.0.1 from a CA made at start, whose certificate
//! it writes to `DIR/ca.pem` for the clients to trust (`--cacert`); the URLs are then https.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("generate") => generate(&args[1..]),
        Some("serve") => serve(&args[1..]),
        Some("free-port") => free_port(),
        _ => Err("usage: bench_server generate|serve|free-port [options]".into()),
    };
    if let Err(message) = result {
        eprintln!("bench_server: {message}");
        std::process::exit(2);
    }
}

/// `--name value` pairs, and flags without a value.
struct Options(Vec<String>);

impl Options {
    fn value(&self, name: &str) -> Option<&str> {
        let at = self.0.iter().position(|a| a == name)?;
        self.0.get(at + 1).map(String::as_str)
    }

    fn number(&self, name: &str) -> Result<Option<u64>, String> {
        self.value(name)
            .map(|v| v.parse().map_err(|_| format!("{name}: not a number: {v}")))
            .transpose()
    }

    fn flag(&self, name: &str) -> bool {
        self.0.iter().any(|a| a == name)
    }
}

fn generate(args: &[String]) -> Result<(), String> {
    let options = Options(args.to_vec());
    let items = options.number("--items")?.ok_or("--items N is needed")?;
    let dir = PathBuf::from(options.value("--dir").ok_or("--dir DIR is needed")?);
    let items_dir = dir.join("items");
    std::fs::create_dir_all(&items_dir).map_err(|e| format!("{}: {e}", items_dir.display()))?;
    let manifest_path = dir.join("manifest.tsv");
    let mut manifest = std::io::BufWriter::new(
        std::fs::File::create(&manifest_path)
            .map_err(|e| format!("{}: {e}", manifest_path.display()))?,
    );
    for i in 0..items {
        let body = item_body(i);
        let path = items_dir.join(format!("{i}.json"));
        if std::fs::read(&path).ok().as_deref() != Some(&body[..]) {
            std::fs::write(&path, &body).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        writeln!(manifest, "{i}\t{}\t{:x}", body.len(), Sha256::digest(&body))
            .map_err(|e| format!("{}: {e}", manifest_path.display()))?;
    }
    manifest
        .flush()
        .map_err(|e| format!("{}: {e}", manifest_path.display()))
}

/// Item `i`: JSON of 5 to 40 KB (a triangular distribution peaking at 15 KB,
/// so 20 KB on average), from a generator seeded with `i`.
fn item_body(i: u64) -> Vec<u8> {
    const LOW: f64 = 5.0 * 1024.0;
    const HIGH: f64 = 40.0 * 1024.0;
    const PEAK: f64 = 15.0 * 1024.0;
    let mut rng = fastrand::Rng::with_seed(i);
    let u = rng.f64();
    let split = (PEAK - LOW) / (HIGH - LOW);
    let size = if u < split {
        LOW + (u * (HIGH - LOW) * (PEAK - LOW)).sqrt()
    } else {
        HIGH - ((1.0 - u) * (HIGH - LOW) * (HIGH - PEAK)).sqrt()
    } as usize;
    let mut body = format!(
        "{{\"id\": {i}, \"name\": \"item-{i}\", \"price\": {}.{:02}, \"payload\": \"",
        rng.u32(1..1000),
        rng.u32(0..100)
    )
    .into_bytes();
    const HEX: &[u8; 16] = b"0123456789abcdef";
    while body.len() + 3 < size {
        body.push(HEX[rng.usize(0..16)]);
    }
    body.extend_from_slice(b"\"}\n");
    body
}

fn free_port() -> Result<(), String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    println!("{port}");
    Ok(())
}

/// Where the bodies come from.
enum Bodies {
    Files(PathBuf),
    Synthetic(usize),
}

/// One answer's body: a file is sent with sendfile, without copying it
/// through this process (the copies were most of the server's CPU).
enum Body {
    File(std::fs::File, u64),
    Bytes(Vec<u8>),
}

impl Bodies {
    fn get(&self, i: u64) -> Option<Body> {
        match self {
            Bodies::Files(dir) => {
                let file = std::fs::File::open(dir.join(format!("{i}.json"))).ok()?;
                let length = file.metadata().ok()?.len();
                Some(Body::File(file, length))
            }
            Bodies::Synthetic(size) => {
                let mut body = format!("{{\"id\": {i}, \"pad\": \"").into_bytes();
                body.resize(size.saturating_sub(3).max(body.len()), b'x');
                body.extend_from_slice(b"\"}\n");
                Some(Body::Bytes(body))
            }
        }
    }
}

impl Body {
    fn len(&self) -> u64 {
        match self {
            Body::File(_, length) => *length,
            Body::Bytes(bytes) => bytes.len() as u64,
        }
    }
}

struct Api {
    bodies: Bodies,
    delay: Duration,
    /// Whether to say when the first request came (for resume timings).
    note_first: AtomicBool,
    faults: Faults,
    /// Connections accepted so far.
    accepted: AtomicU64,
    /// Streams at once per HTTP/2 connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    max_streams: u32,
}

/// How the API misbehaves on purpose.
#[derive(Default)]
struct Faults {
    /// Every request: this status, with Retry-After seconds.
    always: Option<(u16, u64)>,
    /// The first request of each item: this status, with Retry-After seconds.
    first: Option<(u16, u64)>,
    seen: Mutex<HashSet<u64>>,
    /// Requests per second and burst; 429 when empty.
    bucket: Option<Mutex<Bucket>>,
    /// Shares (0 to 1) of 500s, of 429s with Retry-After 1, and of resets.
    mix: [f64; 3],
    hits: Option<Mutex<std::io::BufWriter<std::fs::File>>>,
}

struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

/// What to answer instead of the item.
enum Fault {
    Status(u16, Option<u64>),
    Reset,
}

impl Faults {
    fn parse(options: &Options) -> Result<Faults, String> {
        let status_secs = |name: &str| -> Result<Option<(u16, u64)>, String> {
            options
                .value(name)
                .map(|v| {
                    let (status, secs) = v.split_once(':').unwrap_or((v, "1"));
                    match (status.parse(), secs.parse()) {
                        (Ok(status), Ok(secs)) => Ok((status, secs)),
                        _ => Err(format!("{name}: expected STATUS:SECS, got {v}")),
                    }
                })
                .transpose()
        };
        let bucket = match options.value("--bucket") {
            Some(v) => {
                let (rate, burst) = v.split_once(':').unwrap_or((v, "1"));
                let (Ok(rate), Ok(burst)) = (rate.parse::<f64>(), burst.parse::<f64>()) else {
                    return Err(format!("--bucket: expected RATE:BURST, got {v}"));
                };
                Some(Mutex::new(Bucket {
                    rate,
                    burst,
                    tokens: burst,
                    at: Instant::now(),
                }))
            }
            None => None,
        };
        let mut mix = [0.0; 3];
        if let Some(v) = options.value("--faults") {
            for part in v.split(',') {
                let (kind, percent) = part
                    .split_once('=')
                    .ok_or_else(|| format!("--faults: expected KIND=PERCENT, got {part}"))?;
                let percent: f64 = percent
                    .parse()
                    .map_err(|_| format!("--faults: not a number: {percent}"))?;
                let slot = match kind {
                    "500" => 0,
                    "429" => 1,
                    "reset" => 2,
                    _ => return Err(format!("--faults: unknown kind {kind}")),
                };
                mix[slot] = percent / 100.0;
            }
        }
        let hits = match options.value("--hits") {
            Some(path) => Some(Mutex::new(std::io::BufWriter::new(
                std::fs::File::create(path).map_err(|e| format!("{path}: {e}"))?,
            ))),
            None => None,
        };
        Ok(Faults {
            always: status_secs("--always")?,
            first: status_secs("--first")?,
            seen: Mutex::default(),
            bucket,
            mix,
            hits,
        })
    }

    fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        mutex.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The fault for this request of `item`, if any.
    fn pick(&self, item: u64) -> Option<Fault> {
        if let Some((status, secs)) = self.always {
            return Some(Fault::Status(status, Some(secs)));
        }
        if let Some((status, secs)) = self.first
            && Self::lock(&self.seen).insert(item)
        {
            return Some(Fault::Status(status, Some(secs)));
        }
        if let Some(bucket) = &self.bucket {
            let mut bucket = Self::lock(bucket);
            let now = Instant::now();
            bucket.tokens =
                (bucket.tokens + (now - bucket.at).as_secs_f64() * bucket.rate).min(bucket.burst);
            bucket.at = now;
            if bucket.tokens < 1.0 {
                return Some(Fault::Status(429, None));
            }
            bucket.tokens -= 1.0;
        }
        let roll = fastrand::f64();
        let [p500, p429, reset] = self.mix;
        if roll < p500 {
            Some(Fault::Status(500, None))
        } else if roll < p500 + p429 {
            Some(Fault::Status(429, Some(1)))
        } else if roll < p500 + p429 + reset {
            Some(Fault::Reset)
        } else {
            None
        }
    }

    fn log(&self, item: Option<u64>, status: u16) {
        if let Some(hits) = &self.hits {
            let ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            let item = item.map_or("-".to_string(), |i| i.to_string());
            let mut hits = Self::lock(hits);
            // Flushed per line: the server is stopped with a signal.
            let _ = writeln!(hits, "{ms} {item} {status}").and_then(|()| hits.flush());
        }
    }
}

fn serve(args: &[String]) -> Result<(), String> {
    let options = Options(args.to_vec());
    let bodies = match (options.value("--dir"), options.number("--synthetic")?) {
        (Some(dir), None) => Bodies::Files(Path::new(dir).join("items")),
        (None, Some(size)) => Bodies::Synthetic(size as usize),
        _ => return Err("give either --dir DIR or --synthetic BYTES".into()),
    };
    let api = Arc::new(Api {
        bodies,
        delay: Duration::from_millis(options.number("--delay-ms")?.unwrap_or(0)),
        note_first: AtomicBool::new(options.flag("--note-first-request")),
        faults: Faults::parse(&options)?,
        accepted: AtomicU64::new(0),
        max_streams: options
            .number("--max-streams")?
            .map_or(Ok(128), u32::try_from)
            .map_err(|_| "--max-streams: too large".to_string())?,
    });
    let tls = match options.value("--tls") {
        Some(dir) => Some(h2_tls(Path::new(dir))?),
        None => None,
    };
    let port = options.number("--port")?.unwrap_or(0);
    let url_file = options.value("--url-file").map(PathBuf::from);
    let bind = options.value("--bind").unwrap_or("127.0.0.1").to_string();
    let listeners = options.number("--listeners")?.unwrap_or(1).max(1);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        let mut bases = Vec::new();
        for address in bind.split(',') {
            for _ in 0..listeners {
                let listener = listen(address, port as u16)
                    .map_err(|e| format!("cannot listen on {address} port {port}: {e}"))?;
                bases.push(format!(
                    "{}://{}",
                    if tls.is_some() { "https" } else { "http" },
                    listener.local_addr().map_err(|e| e.to_string())?
                ));
                let (api, tls) = (api.clone(), tls.clone());
                tokio::spawn(async move {
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            continue;
                        };
                        api.accepted.fetch_add(1, Ordering::Relaxed);
                        let api = api.clone();
                        let tls = tls.clone();
                        tokio::spawn(async move {
                            let _ = match tls {
                                Some(tls) => h2_connection(stream, tls, api).await,
                                None => connection(stream, &api).await,
                            };
                        });
                    }
                });
            }
        }
        if let Some(path) = url_file {
            std::fs::write(&path, bases.join("\n"))
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        std::future::pending::<Result<(), String>>().await
    })
}

/// Connections the kernel may hold for the server before it accepts them.
/// tokio's `bind` asks for 1,024, which a thousand clients connecting at once
/// overflow while the server's one thread is busy: the kernel then drops
/// their SYNs and each client waits a second to send it again, a second of
/// the bench's clock that is the server's doing, not the client's. The
/// kernel caps it at `net.core.somaxconn`.
const BACKLOG: u32 = 8192;

/// A listener on `address:port` with room for `BACKLOG` connections.
fn listen(address: &str, port: u16) -> std::io::Result<TcpListener> {
    let at: std::net::SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(&(address, port))?
        .next()
        .ok_or_else(|| std::io::Error::other("no address"))?;
    let socket = if at.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(at)?;
    socket.listen(BACKLOG)
}

/// Answers the requests of one connection, in order.
async fn connection(mut stream: TcpStream, api: &Api) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(4096);
    loop {
        let end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            if buf.len() > 64 * 1024 || stream.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        if api.note_first.swap(false, Ordering::Relaxed) {
            let ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            eprintln!("first request at {ms}");
        }
        let close = head
            .lines()
            .any(|l| l.eq_ignore_ascii_case("connection: close"));
        let item: Option<u64> = head
            .split(' ')
            .nth(1)
            .and_then(|path| path.strip_prefix("/items/")?.strip_suffix(".json"))
            .and_then(|i| i.parse().ok());
        if head.split(' ').nth(1) == Some("/connections") {
            let count = api.accepted.load(Ordering::Relaxed).to_string();
            let reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{count}",
                count.len()
            );
            stream.write_all(reply.as_bytes()).await?;
            continue;
        }
        let body = item.and_then(|i| api.bodies.get(i));
        if !api.delay.is_zero() {
            tokio::time::sleep(api.delay).await;
        }
        let fault = item.and_then(|i| api.faults.pick(i));
        let (status, body, retry_after) = match (fault, body) {
            (Some(Fault::Reset), Some(body)) => {
                api.faults.log(item, 0);
                return reset(stream, body).await;
            }
            (Some(Fault::Status(status, secs)), _) => (
                status,
                Body::Bytes(format!("{{\"error\": {status}}}\n").into_bytes()),
                secs,
            ),
            (_, Some(body)) => (200, body, None),
            (_, None) => (
                404,
                Body::Bytes(b"{\"error\": \"not found\"}\n".to_vec()),
                None,
            ),
        };
        api.faults.log(item, status);
        let retry_after = retry_after.map_or(String::new(), |s| format!("Retry-After: {s}\r\n"));
        let mut reply = format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{retry_after}{}\r\n",
            reason(status),
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        )
        .into_bytes();
        match body {
            Body::Bytes(bytes) => {
                reply.extend_from_slice(&bytes);
                stream.write_all(&reply).await?;
            }
            Body::File(file, length) => {
                stream.write_all(&reply).await?;
                send_file(&stream, &file, length).await?;
            }
        }
        if close {
            return Ok(());
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// The headers and half the body, then a TCP reset.
async fn reset(mut stream: TcpStream, body: Body) -> std::io::Result<()> {
    let bytes = match body {
        Body::Bytes(bytes) => bytes,
        Body::File(mut file, _) => {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut file, &mut bytes)?;
            bytes
        }
    };
    let mut reply = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        bytes.len()
    )
    .into_bytes();
    reply.extend_from_slice(&bytes[..bytes.len() / 2]);
    stream.write_all(&reply).await?;
    stream.set_zero_linger()?;
    Ok(())
}

/// Sends `length` bytes of `file` to the socket with sendfile(2).
async fn send_file(stream: &TcpStream, file: &std::fs::File, length: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut offset: libc::off_t = 0;
    while (offset as u64) < length {
        stream.writable().await?;
        let left = (length - offset as u64) as usize;
        let sent = stream.try_io(tokio::io::Interest::WRITABLE, || {
            // SAFETY: both descriptors are open, and offset is a valid pointer.
            match unsafe { libc::sendfile(stream.as_raw_fd(), file.as_raw_fd(), &mut offset, left) }
            {
                -1 => Err(std::io::Error::last_os_error()),
                0 => Err(std::io::ErrorKind::UnexpectedEof.into()),
                _ => Ok(()),
            }
        });
        match sent {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The TLS settings of the h2 server: a CA made now, its certificate written to
/// `dir/ca.pem`, and a certificate of it for 127.0.0.1 and localhost.
fn h2_tls(dir: &Path) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let error = |e: rcgen::Error| format!("cannot make the bench certificate: {e}");
    // Distinct names: OpenSSL (curl) takes a certificate whose issuer is its
    // own subject for self-signed, and rcgen's default name is the same for both.
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(error)?;
    ca.distinguished_name
        .push(DnType::CommonName, "jobrun bench CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca =
        CertifiedIssuer::self_signed(ca, KeyPair::generate().map_err(error)?).map_err(error)?;
    let key = KeyPair::generate().map_err(error)?;
    let mut leaf =
        CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).map_err(error)?;
    leaf.distinguished_name
        .push(DnType::CommonName, "jobrun bench server");
    let cert = leaf.signed_by(&key, &ca).map_err(error)?;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).map_err(|e| format!("{}: {e}", ca_path.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Answers the streams of one HTTP/2 connection over TLS, each on a task of its own.
async fn h2_connection(
    stream: TcpStream,
    tls: tokio_rustls::TlsAcceptor,
    api: Arc<Api>,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let stream = tls.accept(stream).await?;
    let mut connection = h2::server::Builder::new()
        .max_concurrent_streams(api.max_streams)
        .handshake(stream)
        .await
        .map_err(std::io::Error::other)?;
    while let Some(accepted) = connection.accept().await {
        let Ok((request, mut respond)) = accepted else {
            break;
        };
        let api = api.clone();
        tokio::spawn(async move {
            let path = request.uri().path();
            let (status, body) = if path == "/connections" {
                let count = api.accepted.load(Ordering::Relaxed);
                (200, count.to_string().into_bytes())
            } else {
                let item: Option<u64> = path
                    .strip_prefix("/items/")
                    .and_then(|p| p.strip_suffix(".json"))
                    .and_then(|i| i.parse().ok());
                if !api.delay.is_zero() {
                    tokio::time::sleep(api.delay).await;
                }
                match item.and_then(|i| api.bodies.get(i)) {
                    Some(Body::Bytes(bytes)) => (200, bytes),
                    Some(Body::File(mut file, _)) => {
                        let mut bytes = Vec::new();
                        match std::io::Read::read_to_end(&mut file, &mut bytes) {
                            Ok(_) => (200, bytes),
                            Err(_) => (500, Vec::new()),
                        }
                    }
                    None => (404, b"{\"error\": \"not found\"}\n".to_vec()),
                }
            };
            let response = http::Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .header("content-length", body.len())
                .body(());
            let Ok(response) = response else { return };
            if let Ok(mut send) = respond.send_response(response, false) {
                let _ = send.send_data(bytes::Bytes::from(body), true);
            }
        });
    }
    Ok(())
}
