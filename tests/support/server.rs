//! A small HTTP/1.1 server for tests and the demo, on 127.0.0.1 with a port
//! the system picks. It is written on plain sockets so that it can misbehave
//! the way real servers do: reset mid-body, stall, lie about the length,
//! drip bytes. A handler decides each answer from the request and from how
//! many times that path was asked for before; every request is logged with
//! its time so a test can count fetches per URL and the gaps between them.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

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
}

pub type Handler = dyn Fn(&Request) -> Reply + Send + Sync;

pub struct Server {
    addr: SocketAddr,
    log: Arc<Mutex<Vec<Hit>>>,
    stop: Arc<AtomicBool>,
    in_flight: Arc<InFlight>,
}

/// Requests being answered now, and the most there ever were at once.
#[derive(Default)]
struct InFlight {
    now: AtomicUsize,
    most: AtomicUsize,
}

impl Server {
    pub fn start(handler: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> Server {
        Server::start_on("127.0.0.1:0", handler)
    }

    pub fn start_on(
        address: &str,
        handler: impl Fn(&Request) -> Reply + Send + Sync + 'static,
    ) -> Server {
        let listener = TcpListener::bind(address).expect("bind the test server");
        let addr = listener.local_addr().expect("test server address");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Arc<Handler> = Arc::new(handler);
        let counts = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
        let in_flight = Arc::new(InFlight::default());
        {
            let (log, stop, in_flight) = (log.clone(), stop.clone(), in_flight.clone());
            thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let (handler, log, counts) = (handler.clone(), log.clone(), counts.clone());
                    let in_flight = in_flight.clone();
                    thread::spawn(move || {
                        let _ = serve(stream, &*handler, &log, &counts, &in_flight);
                    });
                }
            });
        }
        Server {
            addr,
            log,
            stop,
            in_flight,
        }
    }

    /// The most requests this server was answering at one time.
    pub fn most_in_flight(&self) -> usize {
        self.in_flight.most.load(Ordering::SeqCst)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
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
    stream: TcpStream,
    handler: &Handler,
    log: &Mutex<Vec<Hit>>,
    counts: &Mutex<HashMap<String, usize>>,
    in_flight: &InFlight,
) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let Some(request) = read_request(&mut reader, counts)? else {
            return Ok(());
        };
        log.lock().unwrap().push(Hit {
            path: request.path.clone(),
            at: Instant::now(),
            headers: request.headers.clone(),
        });
        let close = request
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let now = in_flight.now.fetch_add(1, Ordering::SeqCst) + 1;
        in_flight.most.fetch_max(now, Ordering::SeqCst);
        let answered = answer(&mut writer, handler(&request), close);
        in_flight.now.fetch_sub(1, Ordering::SeqCst);
        if !answered? {
            return Ok(());
        }
    }
}

fn read_request(
    reader: &mut BufReader<TcpStream>,
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

fn head(status: u16, headers: &[(String, String)], length: usize, close: bool) -> Vec<u8> {
    let mut text = format!(
        "HTTP/1.1 {status} {}\r\nContent-Length: {length}\r\n",
        reason(status)
    );
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
fn answer(stream: &mut TcpStream, reply: Reply, close: bool) -> io::Result<bool> {
    match reply {
        Reply::Full {
            status,
            headers,
            body,
        } => {
            let mut bytes = head(status, &headers, body.len(), close);
            bytes.extend_from_slice(&body);
            stream.write_all(&bytes)?;
            Ok(!close)
        }
        Reply::Delayed(delay, reply) => {
            thread::sleep(delay);
            answer(stream, *reply, close)
        }
        Reply::ResetMidBody { body, sent } => {
            let mut bytes = head(200, &[], body.len(), false);
            bytes.extend_from_slice(&body[..sent.min(body.len())]);
            stream.write_all(&bytes)?;
            reset(stream);
            Ok(false)
        }
        Reply::ShortBody { body, claimed } => {
            let mut bytes = head(200, &[], claimed, true);
            bytes.extend_from_slice(&body);
            stream.write_all(&bytes)?;
            let _ = stream.shutdown(Shutdown::Both);
            Ok(false)
        }
        Reply::Drip { body, gap } => {
            stream.write_all(&head(200, &[], body.len(), close))?;
            for byte in body {
                thread::sleep(gap);
                stream.write_all(&[byte])?;
            }
            Ok(!close)
        }
        Reply::Stall(duration) => {
            thread::sleep(duration);
            Ok(false)
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
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
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
