//! Just enough of an HTTP/1.1 server for the demo: plain TCP on 127.0.0.1,
//! a thread per connection, keep-alive, and answers that can wait, fail
//! or break off mid-body. A handler picks each answer from the path and
//! from how many times that path was asked for before.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// A request as the handler sees it.
pub struct Request {
    pub path: String,
    /// How many earlier requests asked for this path (0 for the first).
    pub previous: usize,
}

/// How to answer.
pub enum Reply {
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
        Reply::Full {
            status,
            headers: Vec::new(),
            body: format!("{{\"error\": \"status {status}\"}}").into_bytes(),
        }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Reply {
        if let Reply::Full { headers, .. } = &mut self {
            headers.push((name.to_string(), value.to_string()));
        }
        self
    }

    pub fn delayed(self, delay: Duration) -> Reply {
        if delay.is_zero() {
            self
        } else {
            Reply::Delayed(delay, Box::new(self))
        }
    }
}

type Handler = dyn Fn(&Request) -> Reply + Send + Sync;

pub struct Server {
    addr: SocketAddr,
}

impl Server {
    /// Listens on 127.0.0.1, on a port the system picks.
    pub fn start(
        handler: impl Fn(&Request) -> Reply + Send + Sync + 'static,
    ) -> io::Result<Server> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let handler: Arc<Handler> = Arc::new(handler);
        let asked = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = stream.set_nodelay(true);
                let (handler, asked) = (handler.clone(), asked.clone());
                thread::spawn(move || serve(stream, &*handler, &asked));
            }
        });
        Ok(Server { addr })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// Answers the requests of one connection until it ends.
fn serve(stream: TcpStream, handler: &Handler, asked: &Mutex<HashMap<String, usize>>) {
    let mut reader = BufReader::new(stream);
    while let Ok(Some((path, close))) = read_request(&mut reader) {
        let previous = {
            let mut asked = asked.lock().unwrap_or_else(|e| e.into_inner());
            let count = asked.entry(path.clone()).or_default();
            *count += 1;
            *count - 1
        };
        let reply = handler(&Request { path, previous });
        match answer(reader.get_mut(), reply, close) {
            Ok(true) => {}
            _ => return,
        }
    }
}

/// The path of the next request and whether the client asked to close.
fn read_request(reader: &mut impl BufRead) -> io::Result<Option<(String, bool)>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let Some(path) = line.split_whitespace().nth(1).map(str::to_string) else {
        return Ok(None);
    };
    let (mut length, mut close) = (0usize, false);
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 {
            return Ok(None);
        }
        let Some((name, value)) = header.trim_end().split_once(':') else {
            break;
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            length = value.parse().unwrap_or(0);
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    io::copy(&mut reader.take(length as u64), &mut io::sink())?;
    Ok(Some((path, close)))
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
    }
}

fn head(status: u16, headers: &[(String, String)], length: usize, close: bool) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        _ => "Status",
    };
    let mut text = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Length: {length}\r\n\
         Content-Type: application/json\r\n"
    );
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    if close {
        text.push_str("Connection: close\r\n");
    }
    text.push_str("\r\n");
    text.into_bytes()
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

/// The body served for item `i`: JSON of 200 bytes to about 30 KB, the
/// same on every call, different for every item (the tests' server makes
/// the same bodies).
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
