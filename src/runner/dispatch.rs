//! The dispatcher: between the claimed jobs and the workers, it hands each
//! idle worker the next job of a host that can take a request now, so a
//! paused, throttled or capped host never holds a worker that another
//! host's URL could use.
//!
//! Claimed jobs wait in a queue per host; hosts take turns (round-robin), so
//! a host with most of the list does not starve the others. A host's permit
//! (`Hosts::try_acquire`) is taken here and travels with the job; a worker
//! never waits for a host.
//!
//! What the claims should leave out is told to the database owner through a
//! shared `HostFilter`: hosts blocked for more than a second, and hosts with
//! a per-host limit (`--per-host-workers`, a rate) that have a few
//! seconds' worth of jobs waiting. Hosts without a limit are never left
//! out: they are never blocked, and the buffer's bound holds them back.
//! When the buffer is full, the hosts left out give back what they hold
//! beyond one job (a limited host: beyond its cap), so that other hosts'
//! jobs can come in; a paused host keeps the rest, and everything it holds
//! goes the moment its pause ends, together.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::domain::{Completion, HostFilter};
use crate::hosts::{HostPermit, Hosts, Transport, Wait};

use super::messages::{Event, Job};

/// How often the claim filter is brought up to date.
const REFRESH: Duration = Duration::from_millis(100);
/// A host that cannot be sent a request for longer than this is left out of
/// claims.
const LONG_WAIT: Duration = Duration::from_secs(1);
/// The most hosts a claim leaves out.
const MOST_SKIPPED: usize = 1000;
/// Jobs a host with a per-host limit may have waiting before claims leave
/// it out: at least this many, at least four per `--per-host-workers` slot,
/// and at least two seconds' worth at its rate.
const LIMITED_QUEUE: usize = 16;

/// Whether a URL is fetched over TLS.
fn is_https(url: &str) -> bool {
    url.get(..6)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https:"))
}

/// A job and its host's permit, on the way to a worker.
pub type Dispatched = (Job, HostPermit);

/// The claim filter, written here and read by the database owner.
pub type SharedFilter = Arc<Mutex<HostFilter>>;

pub struct Dispatcher {
    hosts: Arc<Hosts>,
    queues: HashMap<String, VecDeque<Job>>,
    /// Hosts with queued jobs, in the order of their next turn.
    turns: VecDeque<String>,
    queued: usize,
    /// Jobs held at most.
    limit: usize,
    per_host_workers: Option<usize>,
    /// Hosts blocked for long, and limited hosts with enough jobs waiting:
    /// together, what claims leave out.
    blocked: HashSet<String>,
    full: HashSet<String>,
    filter: SharedFilter,
    last_refresh: Instant,
}

pub struct DispatchChannels {
    pub jobs: flume::Receiver<Job>,
    pub work: flume::Sender<Dispatched>,
    /// One permit per idle worker.
    pub idle: Arc<Semaphore>,
    pub events: flume::Sender<Event>,
}

impl Dispatcher {
    pub fn new(
        hosts: Arc<Hosts>,
        limit: usize,
        per_host_workers: Option<usize>,
        filter: SharedFilter,
    ) -> Dispatcher {
        Dispatcher {
            hosts,
            queues: HashMap::new(),
            turns: VecDeque::new(),
            queued: 0,
            limit,
            per_host_workers,
            blocked: HashSet::new(),
            full: HashSet::new(),
            filter,
            last_refresh: Instant::now(),
        }
    }

    /// Hands out jobs until the owner stops sending them and every job held
    /// was handed out; on a stop (the channel closes early) the jobs still
    /// held go back to pending.
    pub async fn run(mut self, channels: DispatchChannels) {
        let DispatchChannels {
            jobs,
            work,
            idle,
            events,
        } = channels;
        loop {
            let Ok(worker) = idle.acquire().await else {
                return;
            };
            worker.forget();
            let dispatched = loop {
                let closed = self.take_in(&jobs);
                if closed {
                    self.give_back_all(&events).await;
                    return;
                }
                let now = Instant::now();
                if now >= self.last_refresh + REFRESH {
                    self.refresh(now, &events).await;
                }
                let earliest = match self.pick(&events) {
                    Ok(dispatched) => break dispatched,
                    Err(earliest) => earliest,
                };
                let wake = earliest
                    .unwrap_or(now + REFRESH)
                    .min(self.last_refresh + REFRESH);
                let room = self.queued < self.limit;
                tokio::select! {
                    job = jobs.recv_async(), if room => match job {
                        Ok(job) => self.push(job),
                        Err(_) => {
                            self.give_back_all(&events).await;
                            return;
                        }
                    },
                    _ = tokio::time::sleep_until(wake.into()) => {}
                    _ = self.hosts.slot_freed() => {}
                }
            };
            if work.send_async(dispatched).await.is_err() {
                return;
            }
        }
    }

    /// Takes in claimed jobs while there is room; true when the owner has
    /// stopped sending them (the channel is closed and empty).
    fn take_in(&mut self, jobs: &flume::Receiver<Job>) -> bool {
        while self.queued < self.limit {
            match jobs.try_recv() {
                Ok(job) => self.push(job),
                Err(flume::TryRecvError::Empty) => return false,
                Err(flume::TryRecvError::Disconnected) => return true,
            }
        }
        false
    }

    fn push(&mut self, job: Job) {
        let host = job.claim.host.clone();
        let queue = match self.queues.get_mut(&host) {
            Some(queue) => queue,
            None => {
                self.turns.push_back(host.clone());
                self.queues.entry(host.clone()).or_default()
            }
        };
        queue.push_back(job);
        let waiting = queue.len();
        self.queued += 1;
        if !self.full.contains(&host) && self.queue_cap(&host).is_some_and(|cap| waiting >= cap) {
            self.full.insert(host);
            self.write_filter();
        }
    }

    /// How many jobs a host with a per-host limit may have waiting before
    /// claims leave it out; None for a host without a limit.
    fn queue_cap(&self, host: &str) -> Option<usize> {
        let by_slots = self.per_host_workers.map(|n| n * 4);
        let by_rate = self
            .hosts
            .rate_of(host)
            .map(|rate| (rate * 2.0).ceil() as usize);
        let cap = match (by_slots, by_rate) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        Some(cap.max(LIMITED_QUEUE).min(self.limit / 2))
    }

    /// A host's queue got shorter: once under its cap, claims may take its
    /// URLs again, at once.
    fn shortened(&mut self, host: &str, waiting: usize, events: &flume::Sender<Event>) {
        if self.full.contains(host) && self.queue_cap(host).is_none_or(|cap| waiting < cap) {
            self.full.remove(host);
            self.write_filter();
            let _ = events.try_send(Event::ClaimNow);
        }
    }

    fn write_filter(&self) {
        let skip = self
            .blocked
            .union(&self.full)
            .take(MOST_SKIPPED)
            .cloned()
            .collect();
        lock(&self.filter).skip = skip;
    }

    /// The next job of the first host, in turn, that can take a request
    /// now; else the earliest time one of them can.
    fn pick(&mut self, events: &flume::Sender<Event>) -> Result<Dispatched, Option<Instant>> {
        let mut earliest: Option<Instant> = None;
        for _ in 0..self.turns.len() {
            let Some(host) = self.turns.pop_front() else {
                break;
            };
            let transport = match self.queues.get(&host).and_then(VecDeque::front) {
                Some(job) if is_https(&job.claim.url) => Transport::Tls,
                _ => Transport::Plain,
            };
            match self.hosts.try_acquire(&host, transport) {
                Ok(permit) => {
                    let Some(queue) = self.queues.get_mut(&host) else {
                        continue;
                    };
                    let Some(job) = queue.pop_front() else {
                        self.queues.remove(&host);
                        continue;
                    };
                    let waiting = queue.len();
                    if waiting == 0 {
                        self.queues.remove(&host);
                    } else {
                        self.turns.push_back(host.clone());
                    }
                    self.queued -= 1;
                    self.shortened(&host, waiting, events);
                    return Ok((job, permit));
                }
                Err(Wait::Until(at)) => {
                    earliest = Some(earliest.map_or(at, |e| e.min(at)));
                    self.turns.push_back(host);
                }
                Err(Wait::Slot) => self.turns.push_back(host),
            }
        }
        Err(earliest)
    }

    /// Brings the claim filter up to date, and tells the owner to claim at
    /// once when a host blocked for long can take requests again. When the
    /// buffer is full, blocked hosts give back their queued jobs but one,
    /// and limited hosts what they hold beyond their cap.
    async fn refresh(&mut self, now: Instant, events: &flume::Sender<Event>) {
        self.last_refresh = now;
        let blocked: HashSet<String> = self
            .hosts
            .blocked_beyond(now + LONG_WAIT)
            .into_iter()
            .collect();
        let released = self.blocked.iter().any(|host| !blocked.contains(host));
        self.blocked = blocked;
        let mut given_back = Vec::new();
        if self.queued >= self.limit {
            for host in &self.blocked {
                if let Some(queue) = self.queues.get_mut(host)
                    && queue.len() > 1
                {
                    given_back.extend(queue.drain(1..));
                }
            }
            for host in &self.full {
                let cap = self.queue_cap(host).unwrap_or(self.limit);
                if let Some(queue) = self.queues.get_mut(host)
                    && queue.len() > cap
                {
                    given_back.extend(queue.drain(cap..));
                }
            }
        }
        self.queued -= given_back.len();
        self.write_filter();
        if released {
            let _ = events.try_send(Event::ClaimNow);
        }
        for job in given_back {
            if give_back(events, job).await.is_err() {
                return;
            }
        }
    }

    async fn give_back_all(&mut self, events: &flume::Sender<Event>) {
        self.turns.clear();
        self.queued = 0;
        for (_, queue) in self.queues.drain() {
            for job in queue {
                if give_back(events, job).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Sends a job back to pending, unstarted.
async fn give_back(events: &flume::Sender<Event>, job: Job) -> Result<(), ()> {
    let completion = Completion::Unstarted {
        id: job.claim.id,
        lease: job.claim.lease,
    };
    events
        .send_async(Event::Finished {
            completion,
            staged: None,
        })
        .await
        .map_err(|_| ())
}

fn lock(filter: &Mutex<HostFilter>) -> std::sync::MutexGuard<'_, HostFilter> {
    filter.lock().unwrap_or_else(|e| e.into_inner())
}
