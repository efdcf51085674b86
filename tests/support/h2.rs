//! An HTTP/2 server over TLS that speaks nothing else (ALPN `h2` only), on
//! 127.0.0.1 with a port the system picks, serving items after a delay. It
//! counts what a test asks of HTTP/2: the connections it accepted and the
//! most streams it answered at once, on one connection and on all of them.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::pki::TestCa;
use super::{item_body, item_of};

pub struct H2Server {
    addr: SocketAddr,
    counts: Arc<Counts>,
}

#[derive(Default)]
struct Counts {
    accepted: AtomicUsize,
    most_streams: AtomicUsize,
    /// Streams open now on all connections, and the most at one time.
    open: AtomicUsize,
    most_open: AtomicUsize,
}

impl H2Server {
    /// Serves `/items/<i>.json` with a certificate of `ca`, each answer
    /// `delay` after its request.
    pub fn start(ca: &TestCa, delay: Duration) -> H2Server {
        H2Server::start_with_streams(ca, delay, 128)
    }

    /// The same, allowing `max_streams` streams at once per connection
    /// (its SETTINGS_MAX_CONCURRENT_STREAMS).
    pub fn start_with_streams(ca: &TestCa, delay: Duration, max_streams: u32) -> H2Server {
        let mut config = (*ca.server_config(None)).clone();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the h2 test server");
        let addr = listener.local_addr().expect("h2 test server address");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let counts = Arc::new(Counts::default());
        let served = counts.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("the h2 test server's runtime");
            runtime.block_on(async move {
                let listener =
                    tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    served.accepted.fetch_add(1, Ordering::SeqCst);
                    let (acceptor, counts) = (acceptor.clone(), served.clone());
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(stream).await else {
                            return;
                        };
                        let Ok(mut connection) = h2::server::Builder::new()
                            .max_concurrent_streams(max_streams)
                            .handshake(tls)
                            .await
                        else {
                            return;
                        };
                        let open = Arc::new(AtomicUsize::new(0));
                        while let Some(Ok((request, mut respond))) = connection.accept().await {
                            let (open, counts) = (open.clone(), counts.clone());
                            let now = open.fetch_add(1, Ordering::SeqCst) + 1;
                            counts.most_streams.fetch_max(now, Ordering::SeqCst);
                            let in_all = counts.open.fetch_add(1, Ordering::SeqCst) + 1;
                            counts.most_open.fetch_max(in_all, Ordering::SeqCst);
                            tokio::spawn(async move {
                                tokio::time::sleep(delay).await;
                                let (status, body) = match item_of(request.uri().path()) {
                                    Some(i) => (200, item_body(i)),
                                    None => (404, Vec::new()),
                                };
                                let response = http::Response::builder()
                                    .status(status)
                                    .header("content-length", body.len())
                                    .body(())
                                    .expect("a response");
                                open.fetch_sub(1, Ordering::SeqCst);
                                counts.open.fetch_sub(1, Ordering::SeqCst);
                                if let Ok(mut send) = respond.send_response(response, false) {
                                    let _ = send.send_data(bytes::Bytes::from(body), true);
                                }
                            });
                        }
                    });
                }
            });
        });
        H2Server { addr, counts }
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://{}{}", self.addr, path)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.counts.accepted.load(Ordering::SeqCst)
    }

    /// The most streams open at one time on all connections together.
    pub fn most_streams_in_all(&self) -> usize {
        self.counts.most_open.load(Ordering::SeqCst)
    }

    /// The most streams one connection had open at one time.
    pub fn most_streams_at_once(&self) -> usize {
        self.counts.most_streams.load(Ordering::SeqCst)
    }
}
