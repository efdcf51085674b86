//! The database owner: one thread that holds the SQLite connection for the
//! whole run. It claims due rows in batches for the job queue, collects the
//! workers' outcomes, has the sync thread make finished bodies durable and
//! then commits them, one transaction per tick. Workers never touch SQL.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Result;
use flume::RecvTimeoutError;
use tokio::sync::Notify;

use crate::clock::now_ms;
use crate::crashpoint::{self, Step};
use crate::domain::{Claim, Completion, HostFilter, Lease, RunEnd, RunId, Work};
use crate::output::{OutputDir, Written, check_output_name};
use crate::progress::Counters;
use crate::store::Store;

use super::dispatch::SharedFilter;
use super::peers::Peers;
use super::syncer::Syncer;
use super::{Event, Job, RunTotals};

/// Outcomes committed together at most.
const MAX_BATCH: usize = 1024;
/// How long an outcome waits for its batch's commit at most.
const MAX_BATCH_DELAY: Duration = Duration::from_millis(20);
/// The shortest time between two turns of the loop while events come in.
/// Waking for every event costs a thread switch per URL; events that come
/// in during this pause are taken in one go instead.
const MIN_TURN: Duration = Duration::from_millis(2);
/// How often the run says it is alive when nothing else is committed.
/// How often to look for new due rows when none were found.
const IDLE_RECHECK: Duration = Duration::from_secs(1);
/// How soon to look again when a claim came short while hosts were left
/// out: the rows there may all be theirs.
const FILTERED_RECHECK: Duration = Duration::from_millis(100);

pub struct Owner {
    store: Box<dyn Store>,
    out: Arc<OutputDir>,
    syncer: Syncer,
    run: RunId,
    /// Rows to fetch, or done rows to refresh.
    work: Work,
    jobs: Option<flume::Sender<Job>>,
    /// The queue's own receiver, to take unstarted jobs back on shutdown.
    queued: flume::Receiver<Job>,
    capacity: usize,
    events: flume::Receiver<Event>,
    /// Tells the supervisor that the run is stopping on its own.
    stopping_signal: Arc<Notify>,
    /// Which hosts claims leave out, kept by the dispatcher.
    host_filter: SharedFilter,
    /// Claimed rows not yet completed, with their lease and the file last
    /// recorded as theirs, if any.
    in_flight: HashMap<i64, (Lease, Option<Written>)>,
    /// Outcomes ready to commit: failures, and bodies already durable.
    batch: Vec<Completion>,
    batch_since: Option<Instant>,
    /// A sync result came in: commit its bodies without waiting.
    commit_now: bool,
    /// Bodies not yet handed to the sync thread, and their outcomes.
    staged: Vec<Written>,
    unsynced: Vec<Completion>,
    unsynced_since: Option<Instant>,
    /// The outcomes of the bodies the sync thread is working on.
    syncing: Option<Vec<Completion>>,
    /// The recorded files of rows that failed, removed before the commit
    /// if they are still the very files recorded.
    failed_targets: Vec<Written>,
    next_claim_at: Instant,
    last_commit: Instant,
    stopping: Option<RunEnd>,
    totals: RunTotals,
    counters: Arc<Counters>,
    peers: Peers,
}

pub struct OwnerChannels {
    pub jobs: flume::Sender<Job>,
    pub queued: flume::Receiver<Job>,
    pub events: flume::Receiver<Event>,
    /// For the sync thread's answers.
    pub events_tx: flume::Sender<Event>,
    pub stopping_signal: Arc<Notify>,
    pub host_filter: SharedFilter,
}

enum Tick {
    Continue,
    NothingLeft,
}

impl Owner {
    pub fn new(
        store: Box<dyn Store>,
        out: OutputDir,
        run: RunId,
        work: Work,
        channels: OwnerChannels,
        counters: Arc<Counters>,
        peers: Peers,
    ) -> Result<Owner> {
        let now = Instant::now();
        peers.share_limits(store.as_ref())?;
        let out = Arc::new(out);
        let syncer = Syncer::start(out.clone(), channels.events_tx)?;
        Ok(Owner {
            store,
            out,
            syncer,
            run,
            work,
            capacity: channels.jobs.capacity().unwrap_or(64),
            jobs: Some(channels.jobs),
            queued: channels.queued,
            events: channels.events,
            stopping_signal: channels.stopping_signal,
            host_filter: channels.host_filter,
            in_flight: HashMap::new(),
            batch: Vec::new(),
            batch_since: None,
            commit_now: false,
            staged: Vec::new(),
            unsynced: Vec::new(),
            unsynced_since: None,
            syncing: None,
            failed_targets: Vec::new(),
            next_claim_at: now,
            last_commit: now,
            stopping: None,
            totals: RunTotals::default(),
            counters,
            peers,
        })
    }

    /// Runs until no URL is left, or until the workers are gone after a
    /// stop; records how the run ended.
    pub fn run(mut self) -> Result<RunTotals> {
        loop {
            let (mut workers_gone, mut handled) = match self.events.recv_deadline(self.deadline()) {
                Ok(event) => (self.handle(event), 1),
                Err(RecvTimeoutError::Timeout) => (false, 0),
                Err(RecvTimeoutError::Disconnected) => (true, 0),
            };
            let turn = Instant::now();
            while !workers_gone && handled < MAX_BATCH {
                match self.events.try_recv() {
                    Ok(event) => workers_gone = self.handle(event),
                    Err(_) => break,
                }
                handled += 1;
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
            if handled > 0 {
                let pause = (turn + MIN_TURN).min(self.deadline());
                std::thread::sleep(pause.saturating_duration_since(Instant::now()));
            }
        }
        self.finish()
    }

    /// Handles one event; true when the workers are all gone.
    fn handle(&mut self, event: Event) -> bool {
        match event {
            Event::Finished { completion, staged } => self.collect(completion, staged),
            Event::Durable(result) => {
                let completions = self.syncing.take().unwrap_or_default();
                self.synced(completions, result);
            }
            Event::Fatal(error) => self.stop(RunEnd::Error(format!("{error:#}"))),
            Event::Shutdown => self.stop(RunEnd::Interrupted),
            Event::ClaimNow => self.next_claim_at = Instant::now(),
            Event::WorkersGone => return true,
        }
        false
    }

    fn collect(&mut self, completion: Completion, staged: Option<Written>) {
        let recorded = self
            .in_flight
            .remove(&completion.id())
            .and_then(|(_, recorded)| recorded);
        match &completion {
            Completion::Retry {
                next_attempt_at, ..
            } => {
                self.next_claim_at = self.next_claim_at.min(instant_of(*next_attempt_at));
            }
            Completion::Failed { .. } => self.failed_targets.extend(recorded),
            _ => {}
        }
        match staged {
            Some(staged) => {
                self.unsynced.push(completion);
                self.staged.push(staged);
                self.unsynced_since.get_or_insert_with(Instant::now);
            }
            None => {
                self.batch.push(completion);
                self.batch_since.get_or_insert_with(Instant::now);
            }
        }
        if self.in_flight.is_empty() {
            // Idle now: look for due rows, or find that none are left.
            self.next_claim_at = Instant::now();
        }
    }

    /// Takes the sync thread's answer for `completions`: their bodies are
    /// durable and they may be committed, except those whose names could
    /// not be used, which fail; or none of them may be marked done.
    fn synced(&mut self, mut completions: Vec<Completion>, result: Result<Vec<(i64, String)>>) {
        match result {
            Ok(refused) if refused.is_empty() => {}
            Ok(refused) => {
                let mut refused: HashMap<i64, String> = refused.into_iter().collect();
                for completion in &mut completions {
                    if let Completion::Done {
                        id,
                        lease,
                        status,
                        millis,
                        ..
                    } = *completion
                        && let Some(error) = refused.remove(&id)
                    {
                        tracing::debug!("failed: {error}");
                        *completion = Completion::Failed {
                            id,
                            lease,
                            status: Some(status),
                            error,
                            millis,
                        };
                    }
                }
            }
            Err(error) => {
                // They go back to pending instead.
                for completion in &mut completions {
                    if let Completion::Done { id, lease, .. } = *completion {
                        *completion = Completion::Interrupted { id, lease };
                    }
                }
                self.stop(RunEnd::Error(format!("{error:#}")));
            }
        }
        self.batch.append(&mut completions);
        self.batch_since.get_or_insert_with(Instant::now);
        self.commit_now = true;
    }

    /// When the loop must wake up even if no event comes.
    fn deadline(&self) -> Instant {
        let now = Instant::now();
        let mut deadline = self.last_commit + self.peers.heartbeat;
        if let Some(since) = self.batch_since {
            deadline = deadline.min(since + MAX_BATCH_DELAY);
        }
        if let Some(since) = self.unsynced_since
            && self.syncing.is_none()
        {
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

    /// Commits and claims when due, then hands the bodies waiting for the
    /// disk to the sync thread. In that order: a batch is committed before
    /// the next one's files are renamed, so a crash leaves renamed files of
    /// at most one uncommitted batch.
    fn tick(&mut self) -> Result<Tick> {
        let tick = self.commit_and_claim()?;
        let now = Instant::now();
        let sync_due = self.staged.len() >= MAX_BATCH
            || self
                .unsynced_since
                .is_some_and(|since| now >= since + MAX_BATCH_DELAY);
        if sync_due && self.syncing.is_none() {
            self.syncer.sync(std::mem::take(&mut self.staged))?;
            self.syncing = Some(std::mem::take(&mut self.unsynced));
            self.unsynced_since = None;
        }
        Ok(tick)
    }

    fn commit_and_claim(&mut self) -> Result<Tick> {
        let now = Instant::now();
        let batch_due = self.commit_now
            || self.batch.len() >= MAX_BATCH
            || self
                .batch_since
                .is_some_and(|since| now >= since + MAX_BATCH_DELAY);
        let claim_due = self.wants_jobs() && now >= self.next_claim_at;
        let heartbeat_due = now >= self.last_commit + self.peers.heartbeat;
        if !(batch_due || claim_due || heartbeat_due) {
            return Ok(Tick::Continue);
        }
        if heartbeat_due {
            self.peers.share_limits(self.store.as_ref())?;
        }
        if !(batch_due || claim_due) && self.batch.is_empty() {
            // Only alive to say: no transaction needed.
            self.store.heartbeat(self.run)?;
            self.last_commit = now;
            return Ok(Tick::Continue);
        }
        let want = match (&self.jobs, claim_due) {
            (Some(jobs), true) => self.capacity - jobs.len(),
            _ => 0,
        };
        let claims = self.commit(want)?;
        let got = claims.len();
        if got > 0 {
            self.peers.stop_waiting();
        }
        // Rows whose recorded file name would lead outside the output folder.
        let mut refused = Vec::new();
        if let Some(jobs) = &self.jobs {
            for claim in claims {
                if let Err(error) = check_output_name(&claim.path) {
                    refused.push(Completion::Failed {
                        id: claim.id,
                        lease: claim.lease,
                        status: None,
                        error,
                        millis: 0,
                    });
                    continue;
                }
                // A failed refresh keeps its file: only a failed fetch
                // removes the file recorded before.
                let recorded = claim.recorded.filter(|_| !claim.refresh);
                let recorded = recorded.map(|(bytes, sha256)| Written {
                    id: claim.id,
                    name: claim.path.clone(),
                    bytes,
                    sha256,
                });
                self.in_flight.insert(claim.id, (claim.lease, recorded));
                let temp = self.out.temp_file(claim.id);
                // Room was counted above and only this thread sends.
                if jobs.try_send(Job { claim, temp }).is_err() {
                    anyhow::bail!("the job queue closed unexpectedly");
                }
            }
        }
        for completion in refused {
            self.collect(completion, None);
        }
        if claim_due && got < want {
            let mut next_due = self.store.next_due(self.work)?;
            if next_due.is_none() && self.in_flight.is_empty() && self.batch.is_empty() {
                // Every URL is done only when no other live run holds any.
                if !self.peers.still_working(&mut *self.store, &self.out)? {
                    return Ok(Tick::NothingLeft);
                }
                next_due = self.store.next_due(self.work)?;
            }
            let recheck = now + IDLE_RECHECK;
            let soonest = if self.filter().is_empty() {
                Duration::from_millis(5)
            } else {
                FILTERED_RECHECK
            };
            let due = next_due
                .map_or(recheck, instant_of)
                .clamp(now + soonest, recheck);
            self.next_claim_at = due;
        }
        Ok(Tick::Continue)
    }

    /// Commits the batch and claims up to `claim` rows in one transaction.
    fn commit(&mut self, claim: usize) -> Result<Vec<Claim>> {
        let claim = if self.stopping.is_some() { 0 } else { claim };
        for recorded in self.failed_targets.drain(..) {
            if let Err(error) = self.out.remove_if_written(&recorded) {
                tracing::warn!(
                    "cannot remove the file of a failed URL, {}: {error}",
                    recorded.name
                );
            }
        }
        let marks_done = self
            .batch
            .iter()
            .any(|c| matches!(c, Completion::Done { .. }));
        let filter = self.filter();
        let claims =
            self.store
                .complete_and_claim(self.run, &self.batch, claim, &filter, self.work)?;
        if marks_done {
            crashpoint::passed(Step::Committed);
        }
        self.count_committed();
        self.batch.clear();
        self.batch_since = None;
        self.commit_now = false;
        self.last_commit = Instant::now();
        Ok(claims)
    }

    fn filter(&self) -> HostFilter {
        self.host_filter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Feeds the progress display with what was just committed.
    fn count_committed(&self) {
        let counters = &self.counters;
        for completion in &self.batch {
            match completion {
                Completion::Done { bytes, .. } => {
                    counters.done.fetch_add(1, Ordering::Relaxed);
                    counters.bytes.fetch_add(*bytes, Ordering::Relaxed);
                }
                Completion::Unchanged { .. } => {
                    counters.done.fetch_add(1, Ordering::Relaxed);
                }
                Completion::Failed { .. } => {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                }
                Completion::Retry {
                    next_attempt_at, ..
                } => {
                    counters.retried.fetch_add(1, Ordering::Relaxed);
                    counters.retries.add(*next_attempt_at, 1);
                }
                Completion::Interrupted { .. } | Completion::Unstarted { .. } => {}
            }
        }
    }

    /// Stops claiming: unstarted jobs go back, workers finish what they hold.
    /// An error outranks a stop already under way for another reason (the
    /// last batch may fail after the run found nothing left): the run's end
    /// is then that error.
    fn stop(&mut self, end: RunEnd) {
        match (&self.stopping, &end) {
            (None, _) => {}
            (Some(RunEnd::Error(_)), _) => return,
            (Some(_), RunEnd::Error(_)) => {
                self.stopping = Some(end);
                return;
            }
            (Some(_), _) => return,
        }
        self.stopping = Some(end);
        while let Ok(job) = self.queued.try_recv() {
            self.in_flight.remove(&job.claim.id);
            self.batch.push(Completion::Unstarted {
                id: job.claim.id,
                lease: job.claim.lease,
            });
        }
        self.batch_since.get_or_insert_with(Instant::now);
        self.jobs = None;
        self.stopping_signal.notify_one();
    }

    fn finish(mut self) -> Result<RunTotals> {
        // Whatever is still claimed was cut short.
        let cut_short: Vec<(i64, Lease)> = self
            .in_flight
            .drain()
            .map(|(id, (lease, _))| (id, lease))
            .collect();
        self.totals.interrupted = cut_short.len() as u64;
        self.batch.extend(
            cut_short
                .into_iter()
                .map(|(id, lease)| Completion::Interrupted { id, lease }),
        );
        self.jobs = None;
        // The sync thread's batch first, committed before the rest is made
        // durable here: as in `tick`, a crash may leave renamed files of one
        // uncommitted batch at most.
        while self.syncing.is_some() {
            match self.events.recv() {
                Ok(event) => {
                    self.handle(event);
                }
                Err(_) => break,
            }
        }
        let mut committed = self.commit(0);
        if committed.is_ok() && !self.staged.is_empty() {
            let durable = self.out.make_durable(&self.staged);
            self.staged.clear();
            let completions = std::mem::take(&mut self.unsynced);
            self.synced(completions, durable);
            committed = self.commit(0);
        }
        let end = self
            .stopping
            .take()
            .unwrap_or(RunEnd::Error("the workers stopped".into()));
        let end = match committed {
            Err(error) => RunEnd::Error(format!("{error:#}")),
            Ok(_) => end,
        };
        self.store.end_run(self.run, &end)?;
        self.syncer.stop()?;
        match Arc::try_unwrap(self.out) {
            // After an error a batch may be in place and not committed: its
            // manifest stays for the next run to settle.
            Ok(out) => out.close(matches!(end, RunEnd::Error(_)))?,
            Err(_) => anyhow::bail!("the output folder is still in use"),
        }
        // What this run committed, as the progress display counted it.
        let counters = &self.counters;
        self.totals.done = counters.done.load(Ordering::Relaxed);
        self.totals.failed = counters.failed.load(Ordering::Relaxed);
        self.totals.retried = counters.retried.load(Ordering::Relaxed);
        self.totals.bytes = counters.bytes.load(Ordering::Relaxed);
        self.totals.end = Some(end);
        Ok(self.totals)
    }
}

/// The instant at which a unix-millisecond time comes.
fn instant_of(unix_ms: i64) -> Instant {
    let wait = unix_ms.saturating_sub(now_ms()).max(0) as u64;
    Instant::now() + Duration::from_millis(wait)
}
