//! Small proxies on 127.0.0.1 for tests. Two count what went through
//! them: an HTTP proxy that forwards absolute-form requests
//! (`GET http://host:port/path`) and tunnels `CONNECT host:port` (for
//! https URLs), and a SOCKS5 proxy that does CONNECT without
//! authentication. One connection per forwarded request is enough here:
//! the HTTP proxy asks the server to close after each answer. The third,
//! [`TcpRelay`], forwards every connection to one address and can freeze,
//! at once or as a client sends given bytes: a network that stops carrying
//! anything while the sockets stay open. [`UnixRelay`] does the same for a
//! server's Unix socket.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

pub struct Proxy {
    addr: SocketAddr,
    scheme: &'static str,
    /// Where each request or connection through the proxy went.
    targets: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    /// An HTTP proxy: `http://127.0.0.1:PORT`.
    pub fn http() -> Proxy {
        Proxy::start("http", forward_http)
    }

    /// A SOCKS5 proxy: `socks5://127.0.0.1:PORT`.
    pub fn socks5() -> Proxy {
        Proxy::start("socks5", tunnel_socks5)
    }

    /// The proxy's URL with `scheme` (`socks5h` for the same SOCKS proxy,
    /// with host names resolved by it).
    pub fn url_as(&self, scheme: &str) -> String {
        format!("{scheme}://{}", self.addr)
    }

    pub fn url(&self) -> String {
        self.url_as(self.scheme)
    }

    /// How many requests (HTTP) or connections (SOCKS5) went through.
    pub fn count(&self) -> usize {
        self.targets.lock().unwrap().len()
    }

    /// Where they went: URLs for forwarded HTTP requests, `host:port` for
    /// tunnels (CONNECT, SOCKS5).
    pub fn targets(&self) -> Vec<String> {
        self.targets.lock().unwrap().clone()
    }

    fn start(
        scheme: &'static str,
        serve: fn(TcpStream, &Mutex<Vec<String>>) -> io::Result<()>,
    ) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the test proxy");
        let addr = listener.local_addr().expect("test proxy address");
        let targets = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (targets, stop) = (targets.clone(), stop.clone());
            thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let targets = targets.clone();
                    thread::spawn(move || {
                        let _ = serve(stream, &targets);
                    });
                }
            });
        }
        Proxy {
            addr,
            scheme,
            targets,
            stop,
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // wake the accept loop
    }
}

/// Reads one absolute-form request, sends it on in origin form with
/// `Connection: close`, and copies the answer back.
fn forward_http(client: TcpStream, targets: &Mutex<Vec<String>>) -> io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Ok(());
    };
    if method == "CONNECT" {
        // The client says nothing more until the tunnel is up.
        let mut header = String::from("-");
        while !header.trim().is_empty() {
            header.clear();
            if reader.read_line(&mut header)? == 0 {
                return Ok(());
            }
        }
        targets.lock().unwrap().push(target.to_string());
        let Ok(server) = TcpStream::connect(target) else {
            return answer(client, "502 Bad Gateway");
        };
        let mut client = client;
        client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")?;
        relay(client, server);
        return Ok(());
    }
    let Some(rest) = target.strip_prefix("http://") else {
        return answer(client, "405 Method Not Allowed");
    };
    let (authority, path) = match rest.find('/') {
        Some(slash) => rest.split_at(slash),
        None => (rest, "/"),
    };
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    let mut length = 0;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header)?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':').unwrap_or((header, ""));
        let name = name.trim().to_ascii_lowercase();
        if name == "content-length" {
            length = value.trim().parse().unwrap_or(0);
        }
        if !(name.starts_with("proxy-") || name == "connection") {
            head.push_str(header);
            head.push_str("\r\n");
        }
    }
    head.push_str("Connection: close\r\n\r\n");
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    targets.lock().unwrap().push(target.to_string());
    let Ok(mut server) = TcpStream::connect(authority) else {
        return answer(client, "502 Bad Gateway");
    };
    server.write_all(head.as_bytes())?;
    server.write_all(&body)?;
    let mut client = client;
    io::copy(&mut server, &mut client)?;
    client.shutdown(Shutdown::Both)
}

fn answer(mut client: TcpStream, status: &str) -> io::Result<()> {
    write!(
        client,
        "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
}

/// SOCKS5 (RFC 1928): no authentication, CONNECT only, then bytes both ways.
fn tunnel_socks5(mut client: TcpStream, targets: &Mutex<Vec<String>>) -> io::Result<()> {
    let mut greeting = [0u8; 2];
    client.read_exact(&mut greeting)?;
    let mut methods = vec![0u8; greeting[1] as usize];
    client.read_exact(&mut methods)?;
    if greeting[0] != 5 || !methods.contains(&0) {
        return client.write_all(&[5, 0xff]);
    }
    client.write_all(&[5, 0])?;
    let mut request = [0u8; 4];
    client.read_exact(&mut request)?;
    let host = match request[3] {
        1 => {
            let mut ip = [0u8; 4];
            client.read_exact(&mut ip)?;
            Ipv4Addr::from(ip).to_string()
        }
        3 => {
            let mut len = [0u8; 1];
            client.read_exact(&mut len)?;
            let mut name = vec![0u8; len[0] as usize];
            client.read_exact(&mut name)?;
            String::from_utf8_lossy(&name).into_owned()
        }
        4 => {
            let mut ip = [0u8; 16];
            client.read_exact(&mut ip)?;
            format!("[{}]", Ipv6Addr::from(ip))
        }
        _ => return client.write_all(&[5, 8, 0, 1, 0, 0, 0, 0, 0, 0]),
    };
    let mut port = [0u8; 2];
    client.read_exact(&mut port)?;
    let target = format!("{host}:{}", u16::from_be_bytes(port));
    if request[1] != 1 {
        return client.write_all(&[5, 7, 0, 1, 0, 0, 0, 0, 0, 0]);
    }
    targets.lock().unwrap().push(target.clone());
    let Ok(server) = TcpStream::connect(&target) else {
        return client.write_all(&[5, 5, 0, 1, 0, 0, 0, 0, 0, 0]);
    };
    client.write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0])?;
    relay(client, server);
    Ok(())
}

/// Copies bytes both ways until each side has closed its half.
fn relay(client: TcpStream, server: TcpStream) {
    let (Ok(mut client_read), Ok(mut server_write)) = (client.try_clone(), server.try_clone())
    else {
        return;
    };
    let upstream = thread::spawn(move || {
        let _ = io::copy(&mut client_read, &mut server_write);
        let _ = server_write.shutdown(Shutdown::Write);
    });
    let (mut server_read, mut client_write) = (server, client);
    let _ = io::copy(&mut server_read, &mut client_write);
    let _ = client_write.shutdown(Shutdown::Write);
    let _ = upstream.join();
}

/// Forwards every connection made to it to one address, byte for byte,
/// until frozen: then nothing goes through either way (new connections
/// included) and every socket stays open, as on a network that silently
/// stops carrying packets, until thawed.
pub struct TcpRelay {
    addr: SocketAddr,
    frozen: Arc<Frozen>,
    stop: Arc<AtomicBool>,
}

#[derive(Default)]
struct Frozen {
    on: Mutex<bool>,
    thawed: Condvar,
    /// Bytes that freeze the relay when a client sends them.
    trigger: Mutex<Option<Vec<u8>>>,
}

impl Frozen {
    fn wait_until_thawed(&self) {
        let mut on = self.on.lock().unwrap();
        while *on {
            on = self.thawed.wait(on).unwrap();
        }
    }

    fn set(&self, frozen: bool) {
        *self.on.lock().unwrap() = frozen;
        self.thawed.notify_all();
    }

    /// Freezes if `sent` holds the trigger.
    fn pulled_by(&self, sent: &[u8]) {
        let mut trigger = self.trigger.lock().unwrap();
        let pulled = trigger
            .as_deref()
            .is_some_and(|needle| sent.windows(needle.len()).any(|w| w == needle));
        if pulled {
            *trigger = None;
            self.set(true);
        }
    }
}

impl TcpRelay {
    pub fn to(target: SocketAddr) -> TcpRelay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the test relay");
        let addr = listener.local_addr().expect("test relay address");
        let frozen = Arc::new(Frozen::default());
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (frozen, stop) = (frozen.clone(), stop.clone());
            thread::spawn(move || {
                for client in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(client) = client else { continue };
                    let frozen = frozen.clone();
                    thread::spawn(move || {
                        relay_one(client, || TcpStream::connect(target), &frozen)
                    });
                }
            });
        }
        TcpRelay { addr, frozen, stop }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// From now on nothing goes through, until [`TcpRelay::thaw`].
    pub fn freeze(&self) {
        self.frozen.set(true);
    }

    /// Freezes as a client sends `bytes` (in one read), before they go
    /// through: the server never sees them.
    pub fn freeze_on(&self, bytes: &[u8]) {
        *self.frozen.trigger.lock().unwrap() = Some(bytes.to_vec());
    }

    pub fn thaw(&self) {
        self.frozen.set(false);
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.thaw();
        let _ = TcpStream::connect(self.addr); // wake the accept loop
    }
}

/// A stream a relay copies, and closes for writing when done.
trait Pipe: Read + Write + Send + Sized + 'static {
    fn close_write(&self);
    /// The same stream again, for reading while the other copy writes.
    fn other_end(&self) -> io::Result<Self>;
}

impl Pipe for TcpStream {
    fn close_write(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }

    fn other_end(&self) -> io::Result<Self> {
        self.try_clone()
    }
}

impl Pipe for UnixStream {
    fn close_write(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }

    fn other_end(&self) -> io::Result<Self> {
        self.try_clone()
    }
}

/// Relays one client to a new connection to the server (`connect`), made
/// once the relay is not frozen, both ways until either side closes.
fn relay_one<P: Pipe>(client: P, connect: impl FnOnce() -> io::Result<P>, frozen: &Arc<Frozen>) {
    frozen.wait_until_thawed();
    let Ok(server) = connect() else {
        return;
    };
    let (Ok(client_read), Ok(server_read)) = (client.other_end(), server.other_end()) else {
        return;
    };
    let upstream = {
        let frozen = frozen.clone();
        thread::spawn(move || pump(client_read, server, &frozen, true))
    };
    pump(server_read, client, frozen, false);
    let _ = upstream.join();
}

/// [`TcpRelay`] for a server's Unix socket: a socket named as the server's
/// (`.s.PGSQL.PORT`) in a folder of its own, forwarding every connection
/// to the server's until frozen.
pub struct UnixRelay {
    dir: tempfile::TempDir,
    socket: PathBuf,
    frozen: Arc<Frozen>,
    stop: Arc<AtomicBool>,
}

impl UnixRelay {
    /// A relay to the socket `name` (`.s.PGSQL.5432`, say) in `server_dir`.
    pub fn to(server_dir: &Path, name: &str) -> UnixRelay {
        let dir = tempfile::tempdir().expect("a folder for the test relay");
        let socket = dir.path().join(name);
        let target = server_dir.join(name);
        let listener = UnixListener::bind(&socket).expect("bind the test relay");
        let frozen = Arc::new(Frozen::default());
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (frozen, stop) = (frozen.clone(), stop.clone());
            thread::spawn(move || {
                for client in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(client) = client else { continue };
                    let frozen = frozen.clone();
                    let target = target.clone();
                    thread::spawn(move || {
                        relay_one(client, || UnixStream::connect(&target), &frozen)
                    });
                }
            });
        }
        UnixRelay {
            dir,
            socket,
            frozen,
            stop,
        }
    }

    /// The folder of its socket: what a client takes for the server's.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// As [`TcpRelay::freeze`].
    pub fn freeze(&self) {
        self.frozen.set(true);
    }

    /// As [`TcpRelay::freeze_on`].
    pub fn freeze_on(&self, bytes: &[u8]) {
        *self.frozen.trigger.lock().unwrap() = Some(bytes.to_vec());
    }

    pub fn thaw(&self) {
        self.frozen.set(false);
    }
}

impl Drop for UnixRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.thaw();
        let _ = UnixStream::connect(&self.socket); // wake the accept loop
    }
}

/// Copies from `from` to `to` while not frozen; bytes read just as the
/// relay freezes are held until it thaws. What a client sends
/// (`from_client`) may pull the trigger.
fn pump<P: Pipe>(mut from: P, mut to: P, frozen: &Frozen, from_client: bool) {
    let mut buf = vec![0; 64 * 1024];
    loop {
        frozen.wait_until_thawed();
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if from_client {
            frozen.pulled_by(&buf[..n]);
        }
        frozen.wait_until_thawed();
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    to.close_write();
}
