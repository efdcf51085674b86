//! Politeness per host: how many requests one host gets at once, how fast,
//! and when it asked to be left alone.
//!
//! - `--per-host-workers N` caps the requests in flight to one host.
//! - `--per-host-rate R` spaces that host's requests at least 1/R apart.
//! - A `Retry-After` on a 429 or 503 pauses every request to that host.
//! - Adaptive throttling (AIMD): repeated 429s or 503s (at least two, and
//!   at least 5% of the host's answers over the last second or two) halve
//!   the host's rate, at most once per second; healthy
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
/// Throttling starts when, over the last second or two, at least this share
/// of a host's answers were 429 or 503 (and at least two were). A stray one,
/// with its Retry-After, only pauses the host.
const THROTTLED_SHARE: f64 = 0.05;

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
    recent: Recent,
}

/// Answers and throttling answers (429, 503) in the current second and the
/// one before.
struct Recent {
    start: Instant,
    responses: u32,
    throttles: u32,
    last_responses: u32,
    last_throttles: u32,
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
                recent: Recent {
                    start: Instant::now(),
                    responses: 0,
                    throttles: 0,
                    last_responses: 0,
                    last_throttles: 0,
                },
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
            state.recent.count(now, true);
            let (responses, throttles) = state.recent.totals();
            let repeated =
                throttles >= 2 && f64::from(throttles) >= THROTTLED_SHARE * f64::from(responses);
            let halved_lately = state
                .last_decrease
                .is_some_and(|at| now - at < DECREASE_EVERY);
            if !repeated || halved_lately {
                return;
            }
            let current = state
                .rate
                .unwrap_or_else(|| state.recent.rate(now).max(1.0));
            state.rate = Some((current / 2.0).max(MIN_RATE));
            state.adaptive = true;
            state.last_decrease = Some(now);
        });
    }

    /// A healthy response: raise a throttled rate a little.
    pub fn healthy(&self, host: &str) {
        let ceiling = self.politeness.per_host_rate.map(Rate::per_second);
        self.with_host(host, |state| {
            state.recent.count(Instant::now(), false);
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

impl Recent {
    fn count(&mut self, now: Instant, throttled: bool) {
        let elapsed = now - self.start;
        if elapsed >= Duration::from_secs(2) {
            (self.last_responses, self.last_throttles) = (0, 0);
            (self.responses, self.throttles) = (0, 0);
            self.start = now;
        } else if elapsed >= Duration::from_secs(1) {
            (self.last_responses, self.last_throttles) = (self.responses, self.throttles);
            (self.responses, self.throttles) = (0, 0);
            self.start += Duration::from_secs(1);
        }
        self.responses += 1;
        self.throttles += u32::from(throttled);
    }

    /// Answers and throttling answers over both seconds.
    fn totals(&self) -> (u32, u32) {
        (
            self.responses + self.last_responses,
            self.throttles + self.last_throttles,
        )
    }

    /// Answers per second over both seconds.
    fn rate(&self, now: Instant) -> f64 {
        let current = (now - self.start)
            .max(Duration::from_millis(100))
            .as_secs_f64();
        let span = if self.last_responses > 0 {
            current + 1.0
        } else {
            current
        };
        f64::from(self.responses + self.last_responses) / span
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
