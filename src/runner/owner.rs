//! The database owner: one thread that holds the SQLite connection for the
//! whole run. It claims due rows in batches for the job queue, collects the
//! workers' outcomes, makes finished bodies durable and commits them, one
//! transaction per tick. Workers never touch SQL.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Result;
use flume::RecvTimeoutError;
use tokio::sync::Notify;

use crate::crashpoint::{self, Step};
use crate::output::{OutputDir, Staged};
use crate::progress::Counters;
use crate::store::{Completion, RunEnd, Store, now_ms};

use super::{Event, Job, RunTotals};

/// Outcomes committed together at most.
const MAX_BATCH: usize = 1024;
/// How long an outcome waits for its batch's commit at most.
const MAX_BATCH_DELAY: Duration = Duration::from_millis(20);
/// How often the run says it is alive when nothing else is committed.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// How often to look for new due rows when none were found.
const IDLE_RECHECK: Duration = Duration::from_secs(1);

pub struct Owner {
    store: Store,
    out: OutputDir,
    run: i64,
    jobs: Option<flume::Sender<Job>>,
    /// The queue's own receiver, to take unstarted jobs back on shutdown.
    queued: flume::Receiver<Job>,
    capacity: usize,
    events: flume::Receiver<Event>,
    /// Tells the supervisor that the run is stopping on its own.
    stopping_signal: Arc<Notify>,
    /// Claimed rows not yet completed, with their target files.
    in_flight: HashMap<i64, PathBuf>,
    batch: Vec<Completion>,
    staged: Vec<Staged>,
    /// Targets of rows that failed, removed before the commit.
    failed_targets: Vec<PathBuf>,
    batch_since: Option<Instant>,
    next_claim_at: Instant,
    last_commit: Instant,
    stopping: Option<RunEnd>,
    totals: RunTotals,
    counters: Arc<Counters>,
}

pub struct OwnerChannels {
    pub jobs: flume::Sender<Job>,
    pub queued: flume::Receiver<Job>,
    pub events: flume::Receiver<Event>,
    pub stopping_signal: Arc<Notify>,
}

enum Tick {
    Continue,
    NothingLeft,
}

impl Owner {
    pub fn new(
        store: Store,
        out: OutputDir,
        run: i64,
        channels: OwnerChannels,
        counters: Arc<Counters>,
    ) -> Owner {
        let now = Instant::now();
        Owner {
            store,
            out,
            run,
            capacity: channels.jobs.capacity().unwrap_or(64),
            jobs: Some(channels.jobs),
            queued: channels.queued,
            events: channels.events,
            stopping_signal: channels.stopping_signal,
            in_flight: HashMap::new(),
            batch: Vec::new(),
            staged: Vec::new(),
            failed_targets: Vec::new(),
            batch_since: None,
            next_claim_at: now,
            last_commit: now,
            stopping: None,
            totals: RunTotals::default(),
            counters,
        }
    }

    /// Runs until no URL is left, or until the workers are gone after a
    /// stop; records how the run ended.
    pub fn run(mut self) -> Result<RunTotals> {
        loop {
            let mut workers_gone = match self.events.recv_deadline(self.deadline()) {
                Ok(event) => self.handle(event),
                Err(RecvTimeoutError::Timeout) => false,
                Err(RecvTimeoutError::Disconnected) => true,
            };
            while !workers_gone && self.batch.len() < MAX_BATCH {
                match self.events.try_recv() {
                    Ok(event) => workers_gone = self.handle(event),
                    Err(_) => break,
                }
            }
            if workers_gone {
                break;
            }
            match self.tick() {
                Ok(Tick::Continue) => {}
                Ok(Tick::NothingLeft) => {
                    self.stopping.get_or_insert(RunEnd::Finished);
                    break;
                }
                Err(error) => self.stop(RunEnd::Error(format!("{error:#}"))),
            }
        }
        self.finish()
    }

    /// Handles one event; true when the workers are all gone.
    fn handle(&mut self, event: Event) -> bool {
        match event {
            Event::Finished { completion, staged } => self.collect(completion, staged),
            Event::Fatal(error) => self.stop(RunEnd::Error(format!("{error:#}"))),
            Event::Shutdown => self.stop(RunEnd::Interrupted),
            Event::WorkersGone => return true,
        }
        false
    }

    fn collect(&mut self, completion: Completion, staged: Option<Staged>) {
        let target = self.in_flight.remove(&completion.id());
        match &completion {
            Completion::Done { bytes, .. } => {
                self.totals.done += 1;
                self.totals.bytes += bytes;
            }
            Completion::Retry {
                next_attempt_at, ..
            } => {
                self.totals.retried += 1;
                self.next_claim_at = self.next_claim_at.min(instant_of(*next_attempt_at));
            }
            Completion::Failed { .. } => {
                self.totals.failed += 1;
                self.failed_targets.extend(target);
            }
            Completion::Interrupted { .. } | Completion::Unstarted { .. } => {}
        }
        self.batch.push(completion);
        self.staged.extend(staged);
        self.batch_since.get_or_insert_with(Instant::now);
        if self.in_flight.is_empty() {
            // Idle now: look for due rows, or find that none are left.
            self.next_claim_at = Instant::now();
        }
    }

    /// When the loop must wake up even if no event comes.
    fn deadline(&self) -> Instant {
        let now = Instant::now();
        let mut deadline = self.last_commit + HEARTBEAT;
        if let Some(since) = self.batch_since {
            deadline = deadline.min(since + MAX_BATCH_DELAY);
        }
        if self.wants_jobs() {
            deadline = deadline.min(self.next_claim_at);
        }
        deadline.max(now)
    }

    fn wants_jobs(&self) -> bool {
        self.stopping.is_none()
            && self
                .jobs
                .as_ref()
                .is_some_and(|jobs| jobs.len() <= self.capacity / 2)
    }

    fn tick(&mut self) -> Result<Tick> {
        let now = Instant::now();
        let batch_due = self.batch.len() >= MAX_BATCH
            || self
                .batch_since
                .is_some_and(|since| now >= since + MAX_BATCH_DELAY);
        let claim_due = self.wants_jobs() && now >= self.next_claim_at;
        let heartbeat_due = now >= self.last_commit + HEARTBEAT;
        if !(batch_due || claim_due || heartbeat_due) {
            return Ok(Tick::Continue);
        }
        let want = match (&self.jobs, claim_due) {
            (Some(jobs), true) => self.capacity - jobs.len(),
            _ => 0,
        };
        let claims = self.commit(want)?;
        let got = claims.len();
        // Rows whose recorded file name would lead outside the output folder.
        let mut refused = Vec::new();
        if let Some(jobs) = &self.jobs {
            for claim in claims {
                let target = match self.out.target_path(&claim.path) {
                    Ok(target) => target,
                    Err(error) => {
                        let (id, status) = (claim.id, None);
                        let millis = 0;
                        refused.push(Completion::Failed {
                            id,
                            status,
                            error,
                            millis,
                        });
                        continue;
                    }
                };
                self.in_flight.insert(claim.id, target.clone());
                let temp = self.out.temp_path(claim.id);
                // Room was counted above and only this thread sends.
                if jobs
                    .try_send(Job {
                        claim,
                        temp,
                        target,
                    })
                    .is_err()
                {
                    anyhow::bail!("the job queue closed unexpectedly");
                }
            }
        }
        for completion in refused {
            self.collect(completion, None);
        }
        if claim_due && got < want {
            let next_due = self.store.next_due()?;
            if next_due.is_none() && self.in_flight.is_empty() && self.batch.is_empty() {
                return Ok(Tick::NothingLeft);
            }
            let recheck = now + IDLE_RECHECK;
            let due = next_due
                .map_or(recheck, instant_of)
                .clamp(now + Duration::from_millis(5), recheck);
            self.next_claim_at = due;
        }
        Ok(Tick::Continue)
    }

    /// Makes the batch's bodies durable, then commits the batch and claims
    /// up to `claim` rows in one transaction.
    fn commit(&mut self, claim: usize) -> Result<Vec<crate::store::Claim>> {
        let durable = self.out.make_durable(&self.staged);
        self.staged.clear();
        if let Err(error) = durable {
            // Not one of these may be marked done: they go back to pending.
            for completion in &mut self.batch {
                if let Completion::Done { id, bytes, .. } = *completion {
                    *completion = Completion::Interrupted { id };
                    self.totals.done -= 1;
                    self.totals.bytes -= bytes;
                }
            }
            self.stop(RunEnd::Error(format!("{error:#}")));
        }
        let claim = if self.stopping.is_some() { 0 } else { claim };
        for target in self.failed_targets.drain(..) {
            self.out.remove_target(&target)?;
        }
        let marks_done = self
            .batch
            .iter()
            .any(|c| matches!(c, Completion::Done { .. }));
        let claims = self
            .store
            .complete_and_claim(self.run, &self.batch, claim)?;
        if marks_done {
            crashpoint::passed(Step::Committed);
        }
        self.count_committed(&claims);
        self.batch.clear();
        self.batch_since = None;
        self.last_commit = Instant::now();
        Ok(claims)
    }

    /// Feeds the progress display with what was just committed.
    fn count_committed(&self, claims: &[crate::store::Claim]) {
        let counters = &self.counters;
        for completion in &self.batch {
            match completion {
                Completion::Done { bytes, .. } => {
                    counters.done.fetch_add(1, Ordering::Relaxed);
                    counters.bytes.fetch_add(*bytes, Ordering::Relaxed);
                }
                Completion::Failed { .. } => {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                }
                Completion::Retry { .. } => {
                    counters.retry_waiting.fetch_add(1, Ordering::Relaxed);
                }
                Completion::Interrupted { .. } | Completion::Unstarted { .. } => {}
            }
        }
        let retries = claims.iter().filter(|claim| claim.attempts > 0).count() as i64;
        counters.retry_waiting.fetch_sub(retries, Ordering::Relaxed);
    }

    /// Stops claiming: unstarted jobs go back, workers finish what they hold.
    fn stop(&mut self, end: RunEnd) {
        if self.stopping.is_some() {
            return;
        }
        self.stopping = Some(end);
        while let Ok(job) = self.queued.try_recv() {
            self.in_flight.remove(&job.claim.id);
            self.batch.push(Completion::Unstarted { id: job.claim.id });
        }
        self.batch_since.get_or_insert_with(Instant::now);
        self.jobs = None;
        self.stopping_signal.notify_one();
    }

    fn finish(mut self) -> Result<RunTotals> {
        // Whatever is still claimed was cut short.
        let cut_short: Vec<i64> = self.in_flight.drain().map(|(id, _)| id).collect();
        self.totals.interrupted = cut_short.len() as u64;
        self.batch.extend(
            cut_short
                .into_iter()
                .map(|id| Completion::Interrupted { id }),
        );
        self.jobs = None;
        let committed = self.commit(0);
        let end = self
            .stopping
            .take()
            .unwrap_or(RunEnd::Error("the workers stopped".into()));
        let end = match committed {
            Err(error) => RunEnd::Error(format!("{error:#}")),
            Ok(_) => end,
        };
        self.store.end_run(self.run, &end)?;
        self.out.close()?;
        self.totals.end = Some(end);
        Ok(self.totals)
    }
}

/// The instant at which a unix-millisecond time comes.
fn instant_of(unix_ms: i64) -> Instant {
    let wait = unix_ms.saturating_sub(now_ms()).max(0) as u64;
    Instant::now() + Duration::from_millis(wait)
}
