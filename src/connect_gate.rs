//! One connection per request in flight, not more: a layer around the HTTP
//! client's connector that holds back a connection a host does not need.
//!
//! hyper's pool opens a connection for every request that finds none idle,
//! and when an idle one comes back while that connection is still being
//! opened (the connection of a request just answered), it hands the request
//! the idle one and keeps the new one too. The request whose connection was
//! taken then opens yet another. On a busy machine, where opening a
//! connection waits for the runtime's next turn, a run's start turned this
//! into 9% to 41% more connections than workers. Here a request to a host
//! that has as many connections as requests in flight (`Hosts::wants_connection`)
//! waits before opening one, while connections are being opened and a
//! moment more: meanwhile the pool serves it, and the connection is then
//! never opened. A connection that closed without jobrun knowing it is
//! replaced after that moment.
//!
//! The request's host travels with the task that sends it (`sending`);
//! when the pool has served the request, hyper finishes the connection on a
//! task of its own, without the host, and it is given up there.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::hosts::{Connect, Hosts};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How often a held-back connection looks again whether it is needed.
const TICK: Duration = Duration::from_millis(5);
/// How long a connection is held back while none is being opened: a
/// request just answered hands its connection back within this on a
/// loaded machine; if none comes, one closed unseen.
const SHORT_HOLD: Duration = Duration::from_millis(50);

tokio::task_local! {
    /// The request the current task is sending.
    static SENDING: Sending;
}

struct Sending {
    host: Arc<str>,
    /// Whether its connector was called already: a second connection is
    /// for a redirect, perhaps to another host, and is not held back.
    connecting: Cell<bool>,
}

/// Runs `send`, the sending of a request to `host`, so that the connector
/// knows the host.
pub async fn sending<F: Future>(host: &str, send: F) -> F::Output {
    let sending = Sending {
        host: Arc::from(host),
        connecting: Cell::new(false),
    };
    SENDING.scope(sending, send).await
}

/// The layer for the connector of the client of `lane`.
#[derive(Clone)]
pub struct ConnectGate {
    hosts: Arc<Hosts>,
    lane: usize,
    /// The longest a connection is held back while others are being
    /// opened (they come to the pool when open): half the connect timeout,
    /// which covers the wait.
    longest_hold: Duration,
}

impl ConnectGate {
    pub fn new(hosts: Arc<Hosts>, lane: usize, connect_timeout: Duration) -> ConnectGate {
        ConnectGate {
            hosts,
            lane,
            longest_hold: connect_timeout / 2,
        }
    }
}

impl<S> tower_layer::Layer<S> for ConnectGate {
    type Service = Gated<S>;

    fn layer(&self, inner: S) -> Gated<S> {
        Gated {
            inner,
            gate: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Gated<S> {
    inner: S,
    gate: ConnectGate,
}

impl<S, R> tower_service::Service<R> for Gated<S>
where
    S: tower_service::Service<R, Error = BoxError>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        // The connector is called on the task that sends the request.
        let host = SENDING
            .try_with(|sending| (!sending.connecting.replace(true)).then(|| sending.host.clone()))
            .ok()
            .flatten();
        let connect = self.inner.call(request);
        let gate = self.gate.clone();
        Box::pin(async move {
            let Some(host) = host else {
                return connect.await;
            };
            gate.admit(&host).await?;
            // Also when the connection is given up half-way (a request cut
            // off at a stop, its timeout).
            let mut opening = Opening {
                gate: &gate,
                host: &host,
                opened: false,
            };
            let connected = connect.await;
            opening.opened = connected.is_ok();
            connected
        })
    }
}

/// A connection being opened, until dropped.
struct Opening<'a> {
    gate: &'a ConnectGate,
    host: &'a str,
    opened: bool,
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        self.gate
            .hosts
            .connection_opened(self.host, self.gate.lane, self.opened);
    }
}

impl ConnectGate {
    /// Lets a connection to `host` be opened now, or after holding it back
    /// for as long as the host may not need it; an error when the request
    /// it was for went over a connection from the pool meanwhile.
    async fn admit(&self, host: &str) -> Result<(), BoxError> {
        let start = Instant::now();
        let mut idle_since = start;
        loop {
            match self.hosts.wants_connection(host, self.lane) {
                Connect::Open => return Ok(()),
                Connect::Wait { opening: true } => idle_since = Instant::now(),
                Connect::Wait { opening: false } => {}
            }
            let now = Instant::now();
            if now >= idle_since + SHORT_HOLD || now >= start + self.longest_hold {
                self.hosts.opens_connection(host, self.lane);
                return Ok(());
            }
            tokio::time::sleep(TICK).await;
            if SENDING.try_with(|_| ()).is_err() {
                return Err("not opened: the request went over a connection from the pool".into());
            }
        }
    }
}
