//! The benchmark's data and its slow API (see bench/run.sh).
//!
//!     bench_server generate --items N --dir DIR
//!     bench_server serve --dir DIR [--delay-ms MS] [--url-file FILE] [--note-first-request]
//!     bench_server serve --synthetic BYTES [--delay-ms MS] [--url-file FILE]
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

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    });
    let port = options.number("--port")?.unwrap_or(0);
    let url_file = options.value("--url-file").map(PathBuf::from);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(("127.0.0.1", port as u16))
            .await
            .map_err(|e| format!("cannot listen on port {port}: {e}"))?;
        let address = listener.local_addr().map_err(|e| e.to_string())?;
        if let Some(path) = url_file {
            std::fs::write(&path, format!("http://{address}"))
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let api = api.clone();
            tokio::spawn(async move {
                let _ = connection(stream, &api).await;
            });
        }
    })
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
        let body = head
            .split(' ')
            .nth(1)
            .and_then(|path| path.strip_prefix("/items/")?.strip_suffix(".json"))
            .and_then(|i| i.parse().ok())
            .and_then(|i| api.bodies.get(i));
        if !api.delay.is_zero() {
            tokio::time::sleep(api.delay).await;
        }
        let (status, body) = match body {
            Some(body) => ("200 OK", body),
            None => (
                "404 Not Found",
                Body::Bytes(b"{\"error\": \"not found\"}\n".to_vec()),
            ),
        };
        let mut reply = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n",
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
