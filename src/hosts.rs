//! Politeness per host: how many requests one host gets at once, how fast,
//! and when it asked to be left alone.
//!
//! - `--per-host-workers N` caps the requests in flight to one host.
//! - `--per-host-rate R` spaces that host's requests at least 1/R apart.
//! - A `Retry-After` on a 429 or 503 pauses every request to that host.
//! - Adaptive throttling (AIMD): repeated 429s or 503s (two within five
//!   seconds) halve the host's rate, at most once per second; healthy
//!   responses raise it again by about 5% (at least one request per second)
//!   per second, up to `--per-host-rate`. A host that was never throttled is
//!   not limited by it.
//!
//! governor's keyed limiter holds a fixed quota per key; a rate that moves
//! with the server's answers needs its own pacing, which is a next-slot
//! time per host.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::rate::Rate;

/// The lowest rate adaptive throttling goes down to.
const MIN_RATE: f64 = 0.2;
/// How often the rate may be halved.
const DECREASE_EVERY: Duration = Duration::from_secs(1);
/// Throttling starts on the second 429 or 503 within this time: a single
/// one, with its Retry-After, only pauses the host.
const REPEATED_WITHIN: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, Default)]
pub struct Politeness {
    pub per_host_workers: Option<usize>,
    pub per_host_rate: Option<Rate>,
    pub adaptive: bool,
}

pub struct Hosts {
    politeness: Politeness,
    hosts: Mutex<HashMap<String, HostState>>,
}

struct HostState {
    slots: Option<Arc<Semaphore>>,
    /// Requests per second allowed now; None for no limit.
    rate: Option<f64>,
    /// Whether `rate` was lowered by throttling.
    adaptive: bool,
    next_slot: Instant,
    paused_until: Option<Instant>,
    last_decrease: Option<Instant>,
    /// When the last 429 or 503 came.
    last_throttle: Option<Instant>,
    /// Responses since `window_start`, to know the rate a host was getting
    /// when it first pushed back.
    window_start: Instant,
    window_responses: u32,
    observed_rate: f64,
}

/// What the progress display shows of a host.
#[derive(Debug, Clone)]
pub struct HostView {
    pub host: String,
    pub paused_for: Option<Duration>,
    /// Present when adaptive throttling holds the host below its limit.
    pub adaptive_rate: Option<f64>,
}

/// A request's place at a host; dropping it frees the slot.
pub struct HostPermit {
    _slot: Option<OwnedSemaphorePermit>,
}

impl Hosts {
    pub fn new(politeness: Politeness) -> Hosts {
        Hosts {
            politeness,
            hosts: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, HostState>> {
        self.hosts.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn with_host<T>(&self, host: &str, f: impl FnOnce(&mut HostState) -> T) -> T {
        let mut hosts = self.lock();
        if !hosts.contains_key(host) {
            let state = HostState {
                slots: self
                    .politeness
                    .per_host_workers
                    .map(|n| Arc::new(Semaphore::new(n))),
                rate: self.politeness.per_host_rate.map(Rate::per_second),
                adaptive: false,
                next_slot: Instant::now(),
                paused_until: None,
                last_decrease: None,
                last_throttle: None,
                window_start: Instant::now(),
                window_responses: 0,
                observed_rate: 0.0,
            };
            hosts.insert(host.to_string(), state);
        }
        // Inserted just above when missing.
        f(hosts.get_mut(host).expect("host state"))
    }

    /// Waits until `host` may be sent a request: a free slot, no pause, and
    /// its turn under the host's rate.
    pub async fn acquire(&self, host: &str) -> HostPermit {
        let slots = self.with_host(host, |state| state.slots.clone());
        let slot = match slots {
            Some(slots) => slots.acquire_owned().await.ok(),
            None => None,
        };
        loop {
            let wait = self.with_host(host, |state| {
                let now = Instant::now();
                let free_at = state.paused_until.unwrap_or(now).max(match state.rate {
                    Some(_) => state.next_slot,
                    None => now,
                });
                if free_at > now {
                    return Some(free_at);
                }
                state.paused_until = None;
                if let Some(rate) = state.rate {
                    state.next_slot = state.next_slot.max(now) + interval(rate);
                }
                None
            });
            match wait {
                Some(until) => tokio::time::sleep_until(until.into()).await,
                None => return HostPermit { _slot: slot },
            }
        }
    }

    /// The host asked, with Retry-After, not to be called before `until`.
    pub fn pause(&self, host: &str, until: Instant) {
        self.with_host(host, |state| {
            state.paused_until = Some(state.paused_until.unwrap_or(until).max(until));
        });
    }

    /// A 429 or 503: halve the host's rate (adaptive throttling).
    pub fn throttled(&self, host: &str) {
        if !self.politeness.adaptive {
            return;
        }
        self.with_host(host, |state| {
            let now = Instant::now();
            state.count_response(now);
            let repeated = state
                .last_throttle
                .is_some_and(|at| now - at < REPEATED_WITHIN);
            state.last_throttle = Some(now);
            let halved_lately = state
                .last_decrease
                .is_some_and(|at| now - at < DECREASE_EVERY);
            if !repeated || halved_lately {
                return;
            }
            let current = state
                .rate
                .unwrap_or_else(|| state.recent_rate(now).max(1.0));
            state.rate = Some((current / 2.0).max(MIN_RATE));
            state.adaptive = true;
            state.last_decrease = Some(now);
        });
    }

    /// A healthy response: raise a throttled rate a little.
    pub fn healthy(&self, host: &str) {
        let ceiling = self.politeness.per_host_rate.map(Rate::per_second);
        self.with_host(host, |state| {
            state.count_response(Instant::now());
            let Some(rate) = state.rate.filter(|_| state.adaptive) else {
                return;
            };
            // About +5% (at least +1 request/s) per second of responses.
            let raised = rate + (rate * 0.05).max(1.0) / rate;
            match ceiling {
                Some(ceiling) if raised >= ceiling => {
                    state.rate = Some(ceiling);
                    state.adaptive = false;
                }
                _ => state.rate = Some(raised),
            }
        });
    }

    /// Hosts that are paused or held back by adaptive throttling.
    pub fn restrained(&self) -> Vec<HostView> {
        let now = Instant::now();
        let mut views: Vec<HostView> = self
            .lock()
            .iter()
            .filter_map(|(host, state)| {
                let paused_for = state.paused_until.filter(|&t| t > now).map(|t| t - now);
                let adaptive_rate = state.rate.filter(|_| state.adaptive);
                (paused_for.is_some() || adaptive_rate.is_some()).then(|| HostView {
                    host: host.clone(),
                    paused_for,
                    adaptive_rate,
                })
            })
            .collect();
        views.sort_by(|a, b| a.host.cmp(&b.host));
        views
    }
}

impl HostState {
    /// Responses per second lately: the last full second, or the current
    /// one if it already says more.
    fn recent_rate(&self, now: Instant) -> f64 {
        let elapsed = (now - self.window_start).max(Duration::from_millis(100));
        self.observed_rate
            .max(f64::from(self.window_responses) / elapsed.as_secs_f64())
    }

    fn count_response(&mut self, now: Instant) {
        self.window_responses += 1;
        let elapsed = now - self.window_start;
        if elapsed >= Duration::from_secs(1) {
            self.observed_rate = f64::from(self.window_responses) / elapsed.as_secs_f64();
            self.window_start = now;
            self.window_responses = 0;
        }
    }
}

fn interval(rate: f64) -> Duration {
    Duration::from_secs_f64(1.0 / rate.max(MIN_RATE))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adaptive() -> Hosts {
        Hosts::new(Politeness {
            adaptive: true,
            ..Default::default()
        })
    }

    #[test]
    fn throttling_halves_at_most_once_a_second_and_health_raises_it() {
        let hosts = adaptive();
        hosts.with_host("h", |s| s.rate = Some(40.0));
        hosts.throttled("h");
        assert!(
            hosts.restrained().is_empty(),
            "a single 429 does not throttle"
        );
        hosts.throttled("h");
        hosts.throttled("h");
        let rate = |hosts: &Hosts| hosts.restrained()[0].adaptive_rate.unwrap();
        assert_eq!(rate(&hosts), 20.0, "429s in a row halve once a second");
        for _ in 0..20 {
            hosts.healthy("h");
        }
        let raised = rate(&hosts);
        assert!(
            raised > 20.9 && raised < 21.1,
            "20 responses at 20/s: +1/s, got {raised}"
        );
    }

    #[test]
    fn a_ceiling_ends_adaptive_throttling() {
        let hosts = Hosts::new(Politeness {
            adaptive: true,
            per_host_rate: Some(Rate::parse("4/s").unwrap()),
            ..Default::default()
        });
        hosts.throttled("h");
        hosts.throttled("h");
        assert_eq!(hosts.restrained()[0].adaptive_rate, Some(2.0));
        for _ in 0..10 {
            hosts.healthy("h");
        }
        assert!(
            hosts.restrained().is_empty(),
            "back at the --per-host-rate ceiling"
        );
    }

    #[test]
    fn without_adaptive_throttling_a_429_changes_nothing() {
        let hosts = Hosts::new(Politeness::default());
        hosts.throttled("h");
        assert!(hosts.restrained().is_empty());
    }

    #[tokio::test]
    async fn a_per_host_rate_spaces_requests() {
        let hosts = Hosts::new(Politeness {
            per_host_rate: Some(Rate::parse("10/s").unwrap()),
            ..Default::default()
        });
        let start = tokio::time::Instant::now();
        for _ in 0..5 {
            drop(hosts.acquire("h").await);
        }
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(390), "{took:?}");
        let other = tokio::time::Instant::now();
        drop(hosts.acquire("other").await);
        assert!(
            other.elapsed() < Duration::from_millis(10),
            "hosts are paced apart"
        );
    }
}
