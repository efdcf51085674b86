//! Politeness per host: how many requests one host gets at once, how fast,
//! and when it asked to be left alone.
//!
//! - `--per-host-workers N` caps the requests in flight to one host.
//! - `--per-host-rate R` spaces that host's requests at least 1/R apart.
//! - A `Retry-After` on a 429 or 503 pauses every request to that host until
//!   then. Pauses overlap (the later end wins) and are not a reason to cut
//!   the rate: the server said when to come back, and everything waiting for
//!   the host goes then.
//! - Adaptive throttling (`Throttle`) lowers a host's rate only while
//!   lowering it reduces the 429s and 503s that come without Retry-After.
//!
//! A host is asked for a permit without waiting (`try_acquire`): the
//! dispatcher (src/runner/dispatch.rs) hands a worker the next job of a host
//! that is ready now, so no worker ever waits for a host.
//!
//! A host's state lives while it has something to remember: requests in
//! flight, a pause, a pace, or what adaptive throttling learnt. A host
//! with none of these, unused for `KEEP_ALIVE`, is forgotten, so that a
//! run over 10,000 hosts holds only those in use. Its connection is then
//! gone too: a host called after that long, with nothing else in flight,
//! has its connection closed after the answer instead of kept idle (see
//! `keeps_connection`).
//!
//! Over TLS a host's first request goes alone, for `FIRST_ALONE` at most:
//! until its answer comes, the client does not know whether the server
//! speaks HTTP/2, and requests sent meanwhile would each open a connection
//! (and a TLS handshake) that ALPN then shows to be one too many, since
//! HTTP/2 carries them all on one. curl waits for the first connection in
//! the same way. The bound keeps a host whose first answer is slow from
//! holding the rest back for long.
//!
//! A host that answers over HTTP/2 gets a few connections rather than one
//! when it has more than `STREAMS_PER_CONNECTION` requests in flight: a
//! connection carries at most as many streams at once as the server allows
//! (its SETTINGS_MAX_CONCURRENT_STREAMS), and further requests on it wait
//! for a stream to end. Each connection is a lane (`Hosts::lane`); a lane
//! is opened when the lanes already open are full, and its first request
//! goes alone, as the host's very first one did.
//!
//! governor's keyed limiter holds a fixed quota per key; a rate that moves
//! with the server's answers needs its own pacing, which is a next-slot
//! time per host.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::rate::Rate;

/// How long a connection is kept open unused, and a host's state kept
/// when there is nothing else to remember of it.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// The longest a host's other requests wait for its first answer over TLS:
/// enough for a TLS handshake and a request across the world.
const FIRST_ALONE: Duration = Duration::from_secs(1);
/// How often hosts with nothing to remember are looked for.
const SWEEP: Duration = Duration::from_secs(1);
/// The most connections kept open unused for a host's next request: at
/// about 25 KB each, 25 MB. A run that visits more hosts than this within
/// the keep-alive closes the connection of a host with nothing else in
/// flight after its answer.
pub const MOST_KEPT: usize = 1024;

/// The requests one HTTP/2 connection carries at once before a host's next
/// request goes over another: half the 100 streams at once that RFC 9113
/// asks servers to allow at least (nginx allows 128, Apache and h2o 100),
/// so that a server's limit does not hold back a run of many workers, and
/// because the answers of a hundred streams come sooner over two
/// connections than over one (bench/README.md).
pub const STREAMS_PER_CONNECTION: usize = 50;

/// The lowest rate adaptive throttling goes down to.
const MIN_RATE: f64 = 0.5;
/// A measurement window lasts at least this long...
const WINDOW: Duration = Duration::from_secs(1);
/// ...and holds at least this many answers, unless it has no throttled
/// answer at all, or lasted `LONGEST_WINDOW`.
const WINDOW_ANSWERS: u32 = 20;
const LONGEST_WINDOW: Duration = Duration::from_secs(3);
/// A window where at least this share of at least `WINDOW_ANSWERS / 2`
/// answers were throttled ends at once: the host is overloaded, and every
/// further request until the end of the window would be wasted.
const OVERLOAD_SHARE: f64 = 0.5;
/// Shares of throttled answers above this, when some answers were accepted,
/// are never taken for background noise: a server that refuses half of
/// everything is saying "slower".
const NOISE_MAX: f64 = 0.25;
/// The smallest share above the noise that counts as throttling.
const MARGIN: f64 = 0.03;
/// A cut takes the rate to this share of what the server accepted...
const CUT_TO_ACCEPTED: f64 = 0.95;
/// ...but always by at least 10%, and at most to an eighth.
const SMALLEST_CUT: f64 = 0.9;
const DEEPEST_CUT: f64 = 1.0 / 8.0;
/// Near the capacity the server showed, the rate creeps up by 1% per
/// healthy window; elsewhere growth starts at 2% and doubles with every
/// healthy window in a row, up to doubling the rate.
const CREEP: f64 = 0.01;
const FIRST_GROWTH: f64 = 0.02;

#[derive(Debug, Clone, Copy)]
pub struct Politeness {
    pub per_host_workers: Option<usize>,
    pub per_host_rate: Option<Rate>,
    pub adaptive: bool,
    /// The longest Retry-After honoured (`--max-retry-after`).
    pub max_retry_after: Duration,
}

impl Default for Politeness {
    fn default() -> Politeness {
        Politeness {
            per_host_workers: None,
            per_host_rate: None,
            adaptive: false,
            max_retry_after: Duration::from_secs(300),
        }
    }
}

pub struct Hosts {
    politeness: Politeness,
    /// How many runs share the per-host limits: on a queue shared by
    /// several machines each run takes its part of them.
    share: std::sync::atomic::AtomicUsize,
    hosts: Mutex<Table>,
    /// Woken when a request to some host ends, which may free a slot.
    freed: Notify,
}

struct Table {
    hosts: HashMap<String, HostState>,
    swept: Instant,
    /// Connections kept open unused, as counted at the last sweep, plus
    /// those kept since.
    kept: usize,
}

struct HostState {
    in_flight: usize,
    /// Whether an answer (or a failure to get one) came back since this
    /// state was made: a connection to the host is then known.
    answered: bool,
    /// When the first request before any answer was sent.
    first_sent: Option<Instant>,
    /// When its last request ended.
    last_end: Option<Instant>,
    /// Whether its last request kept its connection open.
    kept_open: bool,
    next_slot: Instant,
    paused_until: Option<Instant>,
    /// The Retry-After that was asked for, when it was longer than the cap.
    capped_from: Option<Duration>,
    throttle: Throttle,
    /// Answers in this run, and how many were 429 or 503.
    answers: u64,
    throttled: u64,
    /// Whether the last answer came over HTTP/2.
    h2: bool,
    /// The host's connections (one unless it speaks HTTP/2), with the
    /// requests in flight on each.
    lanes: Vec<Lane>,
}

/// One of a host's connections, as the requests see it: over HTTP/1, the
/// connections of one client's pool (see `connections`).
#[derive(Debug, Clone, Copy, Default)]
struct Lane {
    in_flight: usize,
    /// Whether a request on it was answered: before that, the connection
    /// may not be open yet, and other requests would each open one.
    answered: bool,
    /// Connections opened or being opened, less those known to be closed
    /// (see `Hosts::wants_connection`).
    connections: usize,
    /// Connections being opened now.
    opening: usize,
}

/// The connection a request goes over (see `Hosts::lane`); dropping it
/// frees its place there.
pub struct LaneGuard<'a> {
    hosts: &'a Hosts,
    host: &'a str,
    index: usize,
    kept: std::cell::Cell<bool>,
}

impl LaneGuard<'_> {
    /// Which of the host's connections: 0 for its first.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The request's connection stays open for the next one: its answer
    /// was read to the end, and neither side asked to close it. Unless
    /// this is said, the connection is taken to be closed when the request
    /// ends (see `Hosts::wants_connection`).
    pub fn connection_kept(&self) {
        self.kept.set(true);
    }

    /// The request got an answer (over HTTP/2 or not: `over_h2`), or
    /// failed to (None): the lane's connection is known now.
    pub fn answered(&self, over_h2: Option<bool>) {
        self.hosts.with_host(self.host, Instant::now(), |state| {
            if let Some(over_h2) = over_h2 {
                state.h2 = over_h2;
            }
            if let Some(lane) = state.lanes.get_mut(self.index) {
                lane.answered = true;
            }
        });
    }
}

impl Drop for LaneGuard<'_> {
    fn drop(&mut self) {
        let closed = !self.kept.get();
        self.hosts.with_host(self.host, Instant::now(), |state| {
            if let Some(lane) = state.lanes.get_mut(self.index) {
                lane.in_flight = lane.in_flight.saturating_sub(1);
                if closed {
                    lane.connections = lane.connections.saturating_sub(1);
                }
            }
        });
    }
}

/// Whether a request that found no idle connection should open one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connect {
    Open,
    /// Wait for one to come back to the pool; `opening`: some are being
    /// opened.
    Wait {
        opening: bool,
    },
}

/// How a request reaches its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Plain,
    /// TLS, where ALPN may pick HTTP/2.
    Tls,
}

/// Why a host cannot take a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Paused or paced until then.
    Until(Instant),
    /// All its `--per-host-workers` slots are taken.
    Slot,
}

/// What the progress display shows of a host.
#[derive(Debug, Clone)]
pub struct HostView {
    pub host: String,
    pub paused_for: Option<Duration>,
    /// The Retry-After the host asked for, when it was capped.
    pub capped_from: Option<Duration>,
    /// Present when adaptive throttling holds the host below its limit.
    pub adaptive_rate: Option<f64>,
    /// The share of this run's answers that were 429 or 503.
    pub throttled_share: f64,
}

/// A request's place at a host; dropping it frees the slot.
pub struct HostPermit {
    hosts: Arc<Hosts>,
    host: String,
}

impl Drop for HostPermit {
    fn drop(&mut self) {
        let now = Instant::now();
        self.hosts.with_host(&self.host, now, |state| {
            state.in_flight = state.in_flight.saturating_sub(1);
            state.last_end = Some(now);
        });
        self.hosts.freed.notify_one();
    }
}

/// What became of a request, as the politeness rules see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Anything but a 429 or 503: a body, another status, a network error.
    Other,
    /// A 429 or 503 without Retry-After: the signal adaptive throttling
    /// acts on.
    Throttled,
    /// A 429 or 503 with Retry-After: the host is paused instead.
    Paused,
}

impl Hosts {
    pub fn new(politeness: Politeness) -> Hosts {
        Hosts {
            politeness,
            share: std::sync::atomic::AtomicUsize::new(1),
            hosts: Mutex::new(Table {
                hosts: HashMap::new(),
                swept: Instant::now(),
                kept: 0,
            }),
            freed: Notify::new(),
        }
    }

    /// Shares the per-host limits among `runs` runs (at least one): each
    /// takes an equal part, one request in flight and its rate at least.
    pub fn share_among(&self, runs: u64) {
        let runs = usize::try_from(runs).unwrap_or(usize::MAX).max(1);
        self.share.store(runs, std::sync::atomic::Ordering::Relaxed);
    }

    fn share(&self) -> usize {
        self.share.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.hosts.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn with_host<T>(&self, host: &str, now: Instant, f: impl FnOnce(&mut HostState) -> T) -> T {
        let mut table = self.lock();
        if now >= table.swept + SWEEP {
            table.forget_idle(now);
        }
        let hosts = &mut table.hosts;
        if let Some(state) = hosts.get_mut(host) {
            return f(state);
        }
        let mut state = HostState {
            in_flight: 0,
            answered: false,
            first_sent: None,
            last_end: None,
            kept_open: false,
            next_slot: now,
            paused_until: None,
            capped_from: None,
            throttle: Throttle::new(now),
            answers: 0,
            throttled: 0,
            h2: false,
            lanes: Vec::new(),
        };
        let result = f(&mut state);
        hosts.insert(host.to_string(), state);
        result
    }

    /// A permit for a request to `host` now, or why there is none: a free
    /// slot, no pause, its turn under the host's rate, and over TLS no first
    /// request still waiting for its answer.
    pub fn try_acquire(
        self: &Arc<Self>,
        host: &str,
        transport: Transport,
    ) -> Result<HostPermit, Wait> {
        let now = Instant::now();
        let share = self.share();
        let slots = self
            .politeness
            .per_host_workers
            .map(|slots| (slots / share).max(1));
        let ceiling = self.ceiling();
        self.with_host(host, now, |state| {
            if slots.is_some_and(|slots| state.in_flight >= slots) {
                return Err(Wait::Slot);
            }
            if transport == Transport::Tls && !state.answered && state.in_flight > 0 {
                let until = state.first_sent.unwrap_or(now) + FIRST_ALONE;
                if until > now {
                    return Err(Wait::Until(until));
                }
            }
            let rate = state.rate(ceiling);
            let free_at = state.paused_until.unwrap_or(now).max(match rate {
                Some(_) => state.next_slot,
                None => now,
            });
            if free_at > now {
                return Err(Wait::Until(free_at));
            }
            state.paused_until = None;
            state.capped_from = None;
            if let Some(rate) = rate {
                // A slot left unused long ago is not saved up for a burst.
                let unused_since = now.checked_sub(interval(rate)).unwrap_or(now);
                state.next_slot = state.next_slot.max(unused_since) + interval(rate);
            }
            if !state.answered && state.in_flight == 0 {
                state.first_sent = Some(now);
            }
            state.in_flight += 1;
            Ok(HostPermit {
                hosts: self.clone(),
                host: host.to_string(),
            })
        })
    }

    /// The connection (lane) of a request to `host` about to be sent, out of
    /// `most`: the first, unless the host answers over HTTP/2 and has
    /// `STREAMS_PER_CONNECTION` requests in flight on each of its lanes
    /// open so far. Then another lane opens, up to `most`, its first request
    /// alone until answered; with every lane full, the one with the fewest
    /// requests in flight.
    pub fn lane<'a>(&'a self, host: &'a str, most: usize) -> LaneGuard<'a> {
        let index = self.with_host(host, Instant::now(), |state| {
            if state.lanes.is_empty() {
                state.lanes.push(Lane::default());
            }
            let lanes = &mut state.lanes;
            let index = if !state.h2 || most <= 1 {
                0
            } else if let Some(free) = lanes
                .iter()
                .position(|lane| lane.answered && lane.in_flight < STREAMS_PER_CONNECTION)
            {
                free
            } else if lanes.len() < most && lanes.iter().all(|lane| lane.answered) {
                lanes.push(Lane::default());
                lanes.len() - 1
            } else {
                (0..lanes.len())
                    .filter(|&i| lanes[i].answered)
                    .min_by_key(|&i| lanes[i].in_flight)
                    .unwrap_or(0)
            };
            lanes[index].in_flight += 1;
            index
        });
        LaneGuard {
            hosts: self,
            host,
            index,
            kept: std::cell::Cell::new(false),
        }
    }

    /// Whether a request to `host` on lane `index` that found no idle
    /// connection should open one now: yes while the lane has fewer
    /// connections than requests in flight. Otherwise one of them is about
    /// to be handed back to the pool (the connection of a request just
    /// answered, or one still being opened for a request the pool has
    /// served meanwhile), and a new one would be one too many: hyper opens
    /// a connection for every request that finds none idle, also when an
    /// idle one comes a moment later, and keeps both. A run whose start is
    /// slow (a loaded machine, a thousand workers) then opened 9% to 41%
    /// more connections than it has workers. `Connect::Wait` says whether
    /// some are being opened, which then come to the pool soon.
    pub fn wants_connection(&self, host: &str, index: usize) -> Connect {
        self.with_host(host, Instant::now(), |state| {
            let Some(lane) = state.lanes.get_mut(index) else {
                return Connect::Open;
            };
            if lane.connections < lane.in_flight {
                lane.connections += 1;
                lane.opening += 1;
                Connect::Open
            } else {
                Connect::Wait {
                    opening: lane.opening > 0,
                }
            }
        })
    }

    /// A connection is opened although `wants_connection` said to wait: a
    /// connection may have closed without jobrun knowing it (the server
    /// closed an idle one).
    pub fn opens_connection(&self, host: &str, index: usize) {
        self.with_host(host, Instant::now(), |state| {
            if let Some(lane) = state.lanes.get_mut(index) {
                lane.connections += 1;
                lane.opening += 1;
            }
        });
    }

    /// A connection counted by `wants_connection` or `opens_connection` is
    /// open, or could not be opened.
    pub fn connection_opened(&self, host: &str, index: usize, opened: bool) {
        self.with_host(host, Instant::now(), |state| {
            if let Some(lane) = state.lanes.get_mut(index) {
                lane.opening = lane.opening.saturating_sub(1);
                if !opened {
                    lane.connections = lane.connections.saturating_sub(1);
                }
            }
        });
    }

    /// Whether the connection of a request to `host` about to be sent
    /// should be kept open after it. Not when nothing else is in flight to
    /// the host and either it was not called within `KEEP_ALIVE` (a list
    /// that visits thousands of hosts in turn comes back after that long,
    /// to a connection closed meanwhile anyway) or `MOST_KEPT` connections
    /// are kept already.
    pub fn keeps_connection(&self, host: &str) -> bool {
        let now = Instant::now();
        let mut table = self.lock();
        let room = table.kept < MOST_KEPT;
        let Some(state) = table.hosts.get_mut(host) else {
            return false;
        };
        let recent = state
            .last_end
            .is_some_and(|end| now.saturating_duration_since(end) <= KEEP_ALIVE);
        let keep = state.in_flight > 1 || (recent && room);
        let newly = keep && !state.kept_open;
        state.kept_open = keep;
        if newly {
            table.kept += 1;
        }
        keep
    }

    /// How many hosts have state now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().hosts.len()
    }

    /// Requests per second allowed to `host` now; None for no limit.
    pub fn rate_of(&self, host: &str) -> Option<f64> {
        let ceiling = self.ceiling();
        self.lock()
            .hosts
            .get(host)
            .map_or(ceiling, |state| state.rate(ceiling))
    }

    /// Hosts that cannot be sent a request before `after`: paused, or paced
    /// slower than that.
    pub fn blocked_beyond(&self, after: Instant) -> Vec<String> {
        let ceiling = self.ceiling();
        self.lock()
            .hosts
            .iter()
            .filter(|(_, state)| {
                let paused = state.paused_until.is_some_and(|until| until > after);
                let paced = state.rate(ceiling).is_some() && state.next_slot > after;
                paused || paced
            })
            .map(|(host, _)| host.clone())
            .collect()
    }

    /// Resolves when a request to some host has ended since the last call.
    pub async fn slot_freed(&self) {
        self.freed.notified().await;
    }

    /// The host asked, with Retry-After, not to be called before `until`;
    /// `capped_from` is what it asked for when that was longer than the cap.
    pub fn pause(&self, host: &str, until: Instant, capped_from: Option<Duration>) {
        self.with_host(host, Instant::now(), |state| {
            if state.paused_until.is_none_or(|paused| until > paused) {
                state.paused_until = Some(until);
                state.capped_from = capped_from;
            }
        });
    }

    /// Records the answer to a request sent to `host` at `sent_at`.
    pub fn answered(&self, host: &str, sent_at: Instant, answer: Answer) {
        let adaptive = self.politeness.adaptive;
        let now = Instant::now();
        let first = self.with_host(host, now, |state| {
            let first = !state.answered;
            state.answered = true;
            state.answers += 1;
            state.throttled += u64::from(answer != Answer::Other);
            if adaptive && answer != Answer::Paused {
                state
                    .throttle
                    .answered(now, sent_at, answer == Answer::Throttled);
            }
            first
        });
        if first {
            // Requests held back behind the first one over TLS may go.
            self.freed.notify_one();
        }
    }

    fn ceiling(&self) -> Option<f64> {
        let share = self.share() as f64;
        self.politeness
            .per_host_rate
            .map(|rate| rate.per_second() / share)
    }

    /// Hosts that are paused or held back by adaptive throttling.
    pub fn restrained(&self) -> Vec<HostView> {
        let now = Instant::now();
        let ceiling = self.ceiling();
        let mut views: Vec<HostView> = self
            .lock()
            .hosts
            .iter()
            .filter_map(|(host, state)| {
                let paused_for = state.paused_until.filter(|&t| t > now).map(|t| t - now);
                let adaptive_rate = state
                    .throttle
                    .rate()
                    .filter(|&rate| ceiling.is_none_or(|ceiling| rate < ceiling));
                (paused_for.is_some() || adaptive_rate.is_some()).then(|| HostView {
                    host: host.clone(),
                    paused_for,
                    capped_from: paused_for.and(state.capped_from),
                    adaptive_rate,
                    throttled_share: state.throttled as f64 / state.answers.max(1) as f64,
                })
            })
            .collect();
        views.sort_by(|a, b| a.host.cmp(&b.host));
        views
    }
}

impl Table {
    /// Drops the hosts that have nothing to remember: nothing in flight,
    /// no pause or pace still running, nothing learnt by adaptive
    /// throttling, and no request for `KEEP_ALIVE`.
    fn forget_idle(&mut self, now: Instant) {
        self.swept = now;
        self.kept = 0;
        self.hosts.retain(|_, state| {
            let unused_for = state.last_end.map(|end| now.saturating_duration_since(end));
            if state.kept_open
                && state.in_flight == 0
                && unused_for.is_some_and(|t| t <= KEEP_ALIVE)
            {
                self.kept += 1;
            }
            let idle = state.in_flight == 0 && unused_for.is_some_and(|t| t > KEEP_ALIVE);
            let waiting =
                state.paused_until.is_some_and(|until| until > now) || state.next_slot > now;
            !idle || waiting || !state.throttle.is_pristine()
        });
        // A map that once held many hosts keeps its room until shrunk.
        if self.hosts.capacity() > 4 * self.hosts.len() + 64 {
            self.hosts.shrink_to_fit();
        }
    }
}

impl HostState {
    /// Requests per second allowed now; None for no limit.
    fn rate(&self, ceiling: Option<f64>) -> Option<f64> {
        match (self.throttle.rate(), ceiling) {
            (Some(rate), Some(ceiling)) => Some(rate.min(ceiling)),
            (rate, ceiling) => rate.or(ceiling),
        }
    }
}

/// Adaptive throttling of one host: the rule written down in the README's
/// Politeness paragraph.
///
/// Answers are counted in windows (a second and 20 answers, or 3 seconds;
/// answers to requests sent before the window began do not count, since
/// they were sent at another rate). At the end of a window whose share of
/// throttled answers (429 or 503 without Retry-After) is above what the
/// host answers anyway (its noise) by a clear margin, the rate is cut to
/// just under what the server accepted in that window: against a token
/// bucket that is the bucket's rate (as BBR paces at the delivery rate it
/// measured). A cut is a trial: if the next window's share is not clearly
/// lower, the throttling was not caused by the load, the cut is undone and
/// that share is learnt as the host's noise, which later windows must
/// clearly exceed before another cut. Healthy windows raise the rate: by
/// 1% per window near the capacity the server showed (as TCP Vegas probes
/// near its estimate), elsewhere by 2%, 4%, 8%, ... up to doubling, and back
/// to no limit at all once the rate is no longer what sets the pace. After
/// a cut far below the pace the host handled before (a passing burst of
/// 429s), the first healthy window goes back to half that pace at once.
#[derive(Debug, Clone)]
pub struct Throttle {
    /// Requests per second allowed; None while nothing calls for a limit.
    rate: Option<f64>,
    /// What the server accepted per second the last time a cut helped.
    capacity: Option<f64>,
    /// The share of throttled answers the host gives whatever the rate.
    noise: f64,
    window: Window,
    trial: Option<Trial>,
    /// Healthy windows in a row.
    healthy: u32,
    /// The most answers per second the host accepted (did not throttle) in
    /// a window: a pace it handled.
    best_accepted: f64,
    /// The rate was just raised to half of `best_accepted` at once.
    jumped: bool,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    answers: u32,
    throttled: u32,
}

/// A cut on probation, and the window that led to it.
#[derive(Debug, Clone, Copy)]
struct Trial {
    rate_before: Option<f64>,
    before: Window,
    accepted: f64,
}

impl Window {
    fn share(&self) -> f64 {
        f64::from(self.throttled) / f64::from(self.answers.max(1))
    }

    /// Answers per second, and accepted answers per second, over at least
    /// 100 ms (a first burst answered at once says little about a rate).
    fn rates(&self, now: Instant) -> (f64, f64) {
        let span = (now - self.start)
            .max(Duration::from_millis(100))
            .as_secs_f64();
        (
            f64::from(self.answers) / span,
            f64::from(self.answers - self.throttled) / span,
        )
    }
}

impl Throttle {
    pub fn new(now: Instant) -> Throttle {
        Throttle {
            rate: None,
            capacity: None,
            noise: 0.0,
            window: Window {
                start: now,
                answers: 0,
                throttled: 0,
            },
            trial: None,
            healthy: 0,
            best_accepted: 0.0,
            jumped: false,
        }
    }

    /// Requests per second allowed now; None for no limit.
    pub fn rate(&self) -> Option<f64> {
        self.rate
    }

    /// Whether there is nothing to remember: no rate, no trial, no
    /// capacity or noise learnt.
    fn is_pristine(&self) -> bool {
        self.rate.is_none() && self.trial.is_none() && self.capacity.is_none() && self.noise == 0.0
    }

    /// Counts one answer to a request sent at `sent_at`.
    pub fn answered(&mut self, now: Instant, sent_at: Instant, throttled: bool) {
        if sent_at < self.window.start {
            return;
        }
        self.window.answers += 1;
        self.window.throttled += u32::from(throttled);
        let window = self.window;
        let elapsed = now - window.start;
        let overloaded = self.trial.is_none()
            && window.answers >= WINDOW_ANSWERS / 2
            && window.share() >= OVERLOAD_SHARE;
        let full = elapsed >= WINDOW
            && (window.answers >= WINDOW_ANSWERS
                || window.throttled == 0
                || elapsed >= LONGEST_WINDOW);
        // A host that has accepted nothing, and refused everything again
        // after the cut: its trial has failed, and need not go on.
        let futile = self.trial.is_some()
            && self.best_accepted == 0.0
            && window.answers >= WINDOW_ANSWERS / 2
            && window.throttled == window.answers;
        if overloaded || full || futile {
            self.close_window(now);
        }
    }

    /// The margin by which a window's share must exceed the noise to count
    /// as throttling: 3 points, or 2.5 standard deviations of the noise
    /// over that many answers.
    fn margin(&self, answers: u32) -> f64 {
        let p = self.noise.max(0.02);
        MARGIN.max(2.5 * (p * (1.0 - p) / f64::from(answers.max(1))).sqrt())
    }

    fn close_window(&mut self, now: Instant) {
        let window = self.window;
        self.window = Window {
            start: now,
            answers: 0,
            throttled: 0,
        };
        let share = window.share();
        let (answered, accepted) = window.rates(now);
        let throttled = window.throttled >= 3 && share > self.noise + self.margin(window.answers);
        // Over a second at least: a first burst does not count as a pace.
        let sustained = f64::from(window.answers - window.throttled)
            / (now - window.start).max(WINDOW).as_secs_f64();
        let never_accepted = self.best_accepted == 0.0 && sustained == 0.0;
        if throttled && std::mem::take(&mut self.jumped) {
            // Half the old pace was too much: the server changed.
            self.best_accepted = sustained;
        } else {
            self.best_accepted = self.best_accepted.max(sustained);
        }
        if let Some(trial) = self.trial.take() {
            if !throttled || clearly_lower(trial.before, window) || evident_load(window) {
                // The cut helped: the server has a capacity, and this is it
                // (what it accepts now, when it refused everything before).
                let capacity = if trial.accepted > 0.0 {
                    trial.accepted
                } else {
                    accepted
                };
                self.capacity = Some(capacity);
            } else {
                // The same share at a lower rate: noise, not load.
                self.rate = trial.rate_before;
                let answers = f64::from(trial.before.answers + window.answers);
                self.noise = f64::from(trial.before.throttled + window.throttled) / answers;
                self.healthy = 0;
                return;
            }
        }
        if throttled {
            self.healthy = 0;
            let cut = if never_accepted {
                // A host that has accepted nothing in this run gives no
                // pace to cut towards: the mildest cut of the pace it was
                // sent at, and a trial that ends once refusing everything
                // goes on, so that it costs its retries next to nothing.
                let span = (now - window.start).max(Duration::from_millis(1));
                let sent = f64::from(window.answers) / span.as_secs_f64();
                self.rate.unwrap_or(sent) * SMALLEST_CUT
            } else {
                let current = self.rate.unwrap_or(answered);
                (accepted * CUT_TO_ACCEPTED).clamp(current * DEEPEST_CUT, current * SMALLEST_CUT)
            }
            .max(MIN_RATE);
            // Taken before the cut: a rejected trial goes back to no limit
            // when there was none, not to the pace measured in the window.
            let rate_before = self.rate_before_trial(self.rate.unwrap_or(answered));
            self.rate = Some(cut);
            self.trial = Some(Trial {
                rate_before,
                before: window,
                accepted,
            });
            if evident_load(window) {
                // Too much to be noise: no need to prove it.
                self.capacity = Some(accepted);
                self.trial = None;
            }
            return;
        }
        if share < self.noise {
            self.noise = self.noise * 0.9 + share * 0.1;
        }
        let jumped = std::mem::take(&mut self.jumped);
        let Some(rate) = self.rate else { return };
        if rate < self.best_accepted / 2.0 && !jumped {
            // Healthy again after a cut far below what the host handled
            // before (a burst of 429s, say): back to half that at once,
            // then doubling.
            self.rate = Some(self.best_accepted / 2.0);
            self.jumped = true;
            self.healthy = 7;
            return;
        }
        if answered < rate * 0.5 && window.answers > 0 {
            // The rate is not what sets the pace (latency or workers are).
            if self
                .capacity
                .is_none_or(|capacity| answered < capacity * 0.5)
            {
                self.rate = None;
                self.capacity = None;
                self.healthy = 0;
                return;
            }
        }
        let near_capacity = self
            .capacity
            .is_some_and(|capacity| rate >= capacity * 0.95 && rate <= capacity * 1.05);
        let growth = if near_capacity {
            // Growth past the band starts small again.
            self.healthy = 0;
            CREEP
        } else {
            self.healthy += 1;
            (FIRST_GROWTH * 2f64.powi(self.healthy.min(7) as i32 - 1)).min(1.0)
        };
        self.rate = Some(rate * (1.0 + growth));
    }

    /// What a rejected trial goes back to: no limit if there was none.
    fn rate_before_trial(&self, current: f64) -> Option<f64> {
        self.rate.map(|_| current)
    }
}

/// Whether a window's throttled share is too high to be background noise
/// while the server still accepted some of its requests: it has a capacity
/// and is saying "slower". A host that refused every request says nothing
/// about a rate it would accept, so its cut is tried like any other, and
/// undone when refusing everything goes on at the lower rate.
fn evident_load(window: Window) -> bool {
    window.share() >= NOISE_MAX && window.throttled < window.answers
}

/// Whether `after`'s share of throttled answers is lower than `before`'s by
/// more than chance explains (a two-proportion test at about two standard
/// deviations).
fn clearly_lower(before: Window, after: Window) -> bool {
    let (n1, n2) = (f64::from(before.answers), f64::from(after.answers));
    if n1 == 0.0 || n2 == 0.0 {
        return false;
    }
    let pooled = f64::from(before.throttled + after.throttled) / (n1 + n2);
    let spread = (pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2)).sqrt();
    before.share() - after.share() > 2.0 * spread
}

fn interval(rate: f64) -> Duration {
    Duration::from_secs_f64(1.0 / rate.max(MIN_RATE))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A simulated run: `workers` requests in flight at most, each answered
    /// after `latency`, paced by the throttle, against a server that says
    /// whether a request sent at a time is throttled. Returns the requests
    /// and the throttled ones per simulated second.
    struct Sim {
        throttle: Throttle,
        start: Instant,
        now: Instant,
        next_send: Instant,
        in_flight: Vec<(Instant, Instant, bool)>,
    }

    impl Sim {
        fn new() -> Sim {
            let start = Instant::now();
            Sim {
                throttle: Throttle::new(start),
                start,
                now: start,
                next_send: start,
                in_flight: Vec::new(),
            }
        }

        /// Runs for `seconds`; returns (requests, throttled, accepted).
        fn run(
            &mut self,
            seconds: f64,
            workers: usize,
            latency: Duration,
            mut server: impl FnMut(Instant) -> bool,
        ) -> (u64, u64, u64) {
            let step = Duration::from_micros(500);
            let end = self.now + Duration::from_secs_f64(seconds);
            let (mut requests, mut throttled) = (0, 0);
            while self.now < end {
                self.now += step;
                let now = self.now;
                let throttle = &mut self.throttle;
                self.in_flight.retain(|&(sent, due, answer)| {
                    if due <= now {
                        throttle.answered(now, sent, answer);
                        false
                    } else {
                        true
                    }
                });
                while self.in_flight.len() < workers && self.next_send <= now {
                    let answer = server(now);
                    requests += 1;
                    throttled += u64::from(answer);
                    self.in_flight.push((now, now + latency, answer));
                    self.next_send = match self.throttle.rate() {
                        Some(rate) => {
                            let unused_since = now.checked_sub(interval(rate)).unwrap_or(now);
                            self.next_send.max(unused_since) + interval(rate)
                        }
                        None => now,
                    };
                }
            }
            (requests, throttled, requests - throttled)
        }

        fn seconds(&self) -> f64 {
            (self.now - self.start).as_secs_f64()
        }
    }

    /// A token bucket of `rate` per second holding `burst`, in simulated time.
    fn bucket(rate: f64, burst: f64, start: Instant) -> impl FnMut(Instant) -> bool {
        let (mut tokens, mut at) = (burst, start);
        move |now| {
            tokens = (tokens + (now - at).as_secs_f64() * rate).min(burst);
            at = now;
            if tokens >= 1.0 {
                tokens -= 1.0;
                false
            } else {
                true
            }
        }
    }

    fn noise(share: f64, seed: u64) -> impl FnMut(Instant) -> bool {
        let mut rng = fastrand::Rng::with_seed(seed);
        move |_| rng.f64() < share
    }

    #[test]
    fn against_a_token_bucket_the_rate_settles_just_under_it() {
        let mut sim = Sim::new();
        let server = bucket(50.0, 10.0, sim.start);
        let (requests, throttled, accepted) = sim.run(60.0, 50, Duration::from_millis(2), server);
        let goodput = accepted as f64 / sim.seconds();
        let share = throttled as f64 / requests as f64;
        assert!(goodput >= 45.0, "goodput {goodput:.1}/s of 50/s");
        assert!(share <= 0.03, "{throttled} of {requests} throttled");
    }

    #[test]
    fn background_noise_does_not_lower_the_rate() {
        for seed in 0..5 {
            let mut sim = Sim::new();
            // 50 workers, 50 ms: 1,000 requests/s when nothing holds them back.
            let (requests, _, _) = sim.run(30.0, 50, Duration::from_millis(50), noise(0.05, seed));
            let per_second = requests as f64 / sim.seconds();
            assert!(
                per_second >= 950.0,
                "seed {seed}: {per_second:.0}/s against 5% random 429s"
            );
            assert!(
                sim.throttle.noise > 0.02,
                "seed {seed}: the noise was learnt"
            );
        }
    }

    #[test]
    fn after_a_burst_of_429s_the_rate_recovers_within_seconds() {
        let mut sim = Sim::new();
        let latency = Duration::from_millis(20);
        sim.run(2.0, 20, latency, |_| false);
        sim.run(0.1, 20, latency, |_| true);
        assert!(
            sim.throttle.rate().is_some(),
            "a burst of 429s cuts the rate"
        );
        // Cut or not by the end of the 2 s burst (refusing everything
        // whatever the rate, it may well be undone), the rate recovers.
        sim.run(1.9, 20, latency, |_| true);
        sim.run(10.0, 20, latency, |_| false);
        // 20 workers, 20 ms: 1,000 requests/s unthrottled.
        let (requests, _, _) = sim.run(2.0, 20, latency, |_| false);
        assert!(
            requests >= 1900,
            "{requests} requests in the 2 s after recovery, rate {:?}",
            sim.throttle.rate()
        );
    }

    #[test]
    fn a_host_that_refuses_everything_is_not_held_below_the_pace_without_throttling() {
        let mut sim = Sim::new();
        // 20 workers, 20 ms: 1,000 requests/s when nothing holds them back.
        let latency = Duration::from_millis(20);
        sim.run(5.0, 20, latency, |_| true);
        assert_eq!(
            sim.throttle.rate(),
            None,
            "cutting did not reduce the 429s: the cut is undone"
        );
        let (requests, _, _) = sim.run(2.0, 20, latency, |_| true);
        assert!(requests >= 1900, "{requests} requests in 2 s");
    }

    #[test]
    fn a_host_that_never_accepted_a_request_is_sent_nearly_as_many() {
        // 8 workers, 1 ms: 8,000 requests/s when nothing holds them back.
        // The first second holds the whole trial of the first cut, and
        // what follows it: a cut to an eighth of the pace, as for a host
        // that accepted some, left 29 requests in it, and a rejected trial
        // went back to a limit instead of none.
        let latency = Duration::from_millis(1);
        let (refused, _, _) = Sim::new().run(1.0, 8, latency, |_| true);
        let (free, _, _) = Sim::new().run(1.0, 8, latency, |_| false);
        assert!(
            refused as f64 >= free as f64 * 0.9,
            "{refused} requests refusing everything, {free} accepting everything"
        );
        // Once it has accepted some, refusing everything is cut as before.
        let mut sim = Sim::new();
        sim.run(2.0, 8, latency, |_| false);
        sim.run(0.1, 8, latency, |_| true);
        let cut = sim.throttle.rate().expect("a cut");
        assert!(cut < 1000.0, "cut to {cut:.0}/s");
    }

    #[test]
    fn a_cut_that_does_not_help_is_undone() {
        let start = Instant::now();
        let mut throttle = Throttle::new(start);
        throttle.rate = Some(100.0);
        // 100 answers at 100/s, 10% throttled: a trial cut.
        let mut now = start;
        for i in 0..100 {
            now += Duration::from_millis(10);
            throttle.answered(now, now, i % 10 == 0);
        }
        now += Duration::from_millis(10);
        throttle.answered(now, now, false);
        let cut = throttle.rate().unwrap();
        assert!(cut < 100.0, "cut to {cut}");
        // The same 10% at the lower rate.
        for i in 0..100 {
            now += Duration::from_millis(12);
            throttle.answered(now, now, i % 10 == 0);
        }
        now += Duration::from_millis(12);
        throttle.answered(now, now, false);
        assert_eq!(throttle.rate(), Some(100.0), "the cut is undone");
        assert!(throttle.noise > 0.05, "noise learnt: {}", throttle.noise);
    }

    #[test]
    fn answers_to_requests_sent_before_a_cut_do_not_count_against_it() {
        let start = Instant::now();
        let mut throttle = Throttle::new(start);
        let mut now = start;
        for _ in 0..10 {
            now += Duration::from_millis(1);
            throttle.answered(now, start, true);
        }
        let cut = throttle.rate().expect("an overloaded host is cut at once");
        for _ in 0..100 {
            now += Duration::from_millis(1);
            throttle.answered(now, start, true);
        }
        assert_eq!(throttle.rate(), Some(cut), "late answers to old requests");
    }

    #[test]
    fn retry_after_pauses_without_cutting_the_rate() {
        let hosts = Hosts::new(Politeness {
            adaptive: true,
            ..Default::default()
        });
        let now = Instant::now();
        for _ in 0..50 {
            hosts.answered("h", now, Answer::Paused);
        }
        hosts.pause("h", now + Duration::from_secs(2), None);
        hosts.pause("h", now + Duration::from_secs(1), None);
        let view = &hosts.restrained()[0];
        assert_eq!(view.adaptive_rate, None, "no rate cut for Retry-After");
        assert!(
            view.paused_for.unwrap() > Duration::from_millis(1500),
            "pauses overlap: the later end wins"
        );
        assert_eq!(view.throttled_share, 1.0);
    }

    #[test]
    fn without_adaptive_throttling_a_429_changes_nothing() {
        let hosts = Hosts::new(Politeness::default());
        let now = Instant::now();
        for _ in 0..100 {
            hosts.answered("h", now, Answer::Throttled);
        }
        assert!(hosts.restrained().is_empty());
    }

    #[test]
    fn hosts_with_nothing_to_remember_are_forgotten_after_keep_alive() {
        let hosts = Arc::new(Hosts::new(Politeness {
            adaptive: true,
            ..Default::default()
        }));
        let start = Instant::now();
        drop(
            hosts
                .try_acquire("done", Transport::Plain)
                .expect("a permit"),
        );
        assert!(hosts.keeps_connection("done"), "just used");
        drop(
            hosts
                .try_acquire("paused", Transport::Plain)
                .expect("a permit"),
        );
        hosts.pause("paused", start + Duration::from_secs(60), None);
        drop(
            hosts
                .try_acquire("cut", Transport::Plain)
                .expect("a permit"),
        );
        for _ in 0..10 {
            hosts.answered("cut", Instant::now(), Answer::Throttled);
        }
        let busy = hosts
            .try_acquire("busy", Transport::Plain)
            .expect("a permit");
        assert_eq!(hosts.len(), 4);
        let later = Instant::now() + KEEP_ALIVE + Duration::from_millis(1);
        hosts.lock().forget_idle(later);
        assert_eq!(hosts.len(), 3, "the host with nothing to remember is gone");
        assert!(
            !hosts.keeps_connection("done"),
            "its connection is not kept"
        );
        assert!(hosts.rate_of("cut").is_some(), "a cut is remembered");
        assert!(
            hosts.try_acquire("paused", Transport::Plain).is_err(),
            "a pause is remembered"
        );
        drop(busy);
    }

    #[test]
    fn at_most_most_kept_connections_are_kept_unused() {
        let hosts = Arc::new(Hosts::new(Politeness::default()));
        let names: Vec<String> = (0..MOST_KEPT + 100).map(|i| format!("h{i}")).collect();
        for name in &names {
            drop(hosts.try_acquire(name, Transport::Plain).expect("a permit"));
        }
        let mut kept = 0;
        for name in &names {
            let permit = hosts.try_acquire(name, Transport::Plain).expect("a permit");
            kept += usize::from(hosts.keeps_connection(name));
            drop(permit);
        }
        assert_eq!(kept, MOST_KEPT, "hosts called again within the keep-alive");
    }

    #[test]
    fn a_host_over_http2_gets_another_lane_when_its_lanes_are_full() {
        let hosts = Arc::new(Hosts::new(Politeness::default()));
        let first = hosts.lane("h", 3);
        assert_eq!(first.index(), 0);
        // Before the host is known to speak HTTP/2, every request takes the
        // first lane: over HTTP/1 the pool opens what it needs.
        let before: Vec<_> = (0..STREAMS_PER_CONNECTION)
            .map(|_| hosts.lane("h", 3))
            .collect();
        assert!(before.iter().all(|lane| lane.index() == 0));
        drop(before);
        first.answered(Some(true));
        let full: Vec<_> = (1..STREAMS_PER_CONNECTION)
            .map(|_| hosts.lane("h", 3))
            .collect();
        assert!(full.iter().all(|lane| lane.index() == 0));
        let probe = hosts.lane("h", 3);
        assert_eq!(probe.index(), 1, "the first lane is full");
        // Until the new lane's first answer, the others wait on the least
        // busy lane that is open.
        let waiting = hosts.lane("h", 3);
        assert_eq!(waiting.index(), 0);
        drop(waiting);
        probe.answered(Some(true));
        let second: Vec<_> = (1..STREAMS_PER_CONNECTION)
            .map(|_| hosts.lane("h", 3))
            .collect();
        assert!(second.iter().all(|lane| lane.index() == 1));
        assert_eq!(hosts.lane("h", 3).index(), 2);
        drop(full);
        assert_eq!(hosts.lane("h", 3).index(), 0, "room on the first again");
        assert_eq!(hosts.lane("h", 1).index(), 0, "a run with one lane");
        first.answered(Some(false));
        assert_eq!(hosts.lane("h", 3).index(), 0, "not HTTP/2 any more");
    }

    #[test]
    fn over_tls_a_hosts_first_request_goes_alone_until_answered_or_a_second() {
        let hosts = Arc::new(Hosts::new(Politeness::default()));
        let first = hosts
            .try_acquire("h", Transport::Tls)
            .expect("a first request");
        match hosts.try_acquire("h", Transport::Tls) {
            Err(Wait::Until(at)) => {
                let wait = at - Instant::now();
                assert!(wait > FIRST_ALONE / 2 && wait <= FIRST_ALONE, "{wait:?}");
            }
            other => panic!(
                "the second waits for the first one's answer: {:?}",
                other.err()
            ),
        }
        assert!(
            hosts.try_acquire("h", Transport::Plain).is_ok(),
            "without TLS nothing waits"
        );
        hosts.answered("h", Instant::now(), Answer::Other);
        let together: Vec<_> = (0..3)
            .map(|_| hosts.try_acquire("h", Transport::Tls).expect("answered"))
            .collect();
        drop((first, together));
    }

    #[test]
    fn a_per_host_rate_spaces_requests_and_slots_cap_them() {
        let hosts = Arc::new(Hosts::new(Politeness {
            per_host_rate: Some(Rate::parse("10/s").unwrap()),
            per_host_workers: Some(2),
            ..Default::default()
        }));
        let first = hosts
            .try_acquire("h", Transport::Plain)
            .expect("a first request at once");
        match hosts.try_acquire("h", Transport::Plain) {
            Err(Wait::Until(at)) => {
                let gap = at - Instant::now();
                assert!(gap > Duration::from_millis(80), "{gap:?}");
            }
            other => panic!("the second must wait for its slot: {:?}", other.err()),
        }
        let other = hosts.try_acquire("other", Transport::Plain);
        assert!(other.is_ok(), "hosts are paced apart");
        drop(first);
        let hosts_one = Arc::new(Hosts::new(Politeness {
            per_host_workers: Some(1),
            ..Default::default()
        }));
        let held = hosts_one
            .try_acquire("h", Transport::Plain)
            .expect("a free slot");
        assert_eq!(
            hosts_one.try_acquire("h", Transport::Plain).err(),
            Some(Wait::Slot)
        );
        drop(held);
        assert!(
            hosts_one.try_acquire("h", Transport::Plain).is_ok(),
            "the slot came back"
        );
    }

    #[test]
    fn runs_sharing_a_queue_share_the_per_host_limits() {
        let hosts = Arc::new(Hosts::new(Politeness {
            per_host_rate: Some(Rate::parse("10/s").unwrap()),
            per_host_workers: Some(4),
            ..Default::default()
        }));
        hosts.share_among(2);
        let first = hosts
            .try_acquire("h", Transport::Plain)
            .expect("a first request at once");
        match hosts.try_acquire("h", Transport::Plain) {
            // Half of 10/s: a request every 200 ms.
            Err(Wait::Until(at)) => {
                let gap = at - Instant::now();
                assert!(gap > Duration::from_millis(180), "{gap:?}");
            }
            other => panic!("the second must wait for its turn: {:?}", other.err()),
        }
        drop(first);
        let slots = Arc::new(Hosts::new(Politeness {
            per_host_workers: Some(4),
            ..Default::default()
        }));
        slots.share_among(2);
        let held: Vec<_> = (0..2)
            .map(|_| {
                slots
                    .try_acquire("h", Transport::Plain)
                    .expect("a free slot")
            })
            .collect();
        assert_eq!(
            slots.try_acquire("h", Transport::Plain).err(),
            Some(Wait::Slot)
        );
        drop(held);
        slots.share_among(10);
        let one = slots
            .try_acquire("h", Transport::Plain)
            .expect("one slot at least");
        assert_eq!(
            slots.try_acquire("h", Transport::Plain).err(),
            Some(Wait::Slot)
        );
        drop(one);
    }
}
