//! The run coordinator: one loop on the database thread that owns the
//! run's state and the SQLite connection. Every input is one [`Event`]:
//! a worker's outcome, the sync thread's answer, a free host, the stop
//! signal, the workers' end, or a tick when nothing came before the next
//! deadline. Each is recorded by `handle`; then `turn` does what has come
//! due: commit and claim in one transaction, hand bodies to the sync
//! thread. Workers never touch SQL, and nothing else decides when the run
//! stops.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{Result, RunError};
use flume::RecvTimeoutError;
use tokio::sync::Notify;

use crate::clock::now_ms;
use crate::counters::Counters;
use crate::crashpoint::{self, Step};
use crate::domain::{Claim, Completion, HostFilter, Lease, RunEnd, RunId, Work};
use crate::output::{OutputDir, Written, check_output_name};
use crate::store::Store;

use super::dispatch::SharedFilter;
use super::durability::{Durability, MAX_BATCH};
use super::messages::{Event, Job};
use super::peers::Peers;
use super::schedule::ClaimSchedule;
use super::syncer::Syncer;
use super::watch::Busy;

/// The shortest time between two turns of the loop while events come in.
/// Waking for every event costs a thread switch per URL; events that come
/// in during this pause are taken in one go instead.
const MIN_TURN: Duration = Duration::from_millis(2);

pub struct Coordinator {
    store: Box<dyn Store>,
    out: Arc<OutputDir>,
    syncer: Syncer,
    run: RunId,
    /// Rows to fetch, or done rows to refresh.
    work: Work,
    events: flume::Receiver<Event>,
    queue: JobQueue,
    /// Claimed rows not yet completed, with the file last recorded as
    /// theirs, if any.
    in_flight: HashMap<i64, (Lease, Option<Written>)>,
    durability: Durability,
    schedule: ClaimSchedule,
    /// Which hosts claims leave out, kept by the dispatcher.
    host_filter: SharedFilter,
    /// How the run ends, once it is stopping.
    stopping: Option<RunEnd<RunError>>,
    /// Tells the workers' side that the run is stopping.
    wind_down: Arc<Notify>,
    counters: Arc<Counters>,
    peers: Peers,
    /// Whether the loop is waiting for events, for the watch on the
    /// database.
    busy: Arc<Busy>,
}

/// What the coordinator is given besides the store and the folder.
pub struct Links {
    pub jobs: flume::Sender<Job>,
    /// The job queue's own receiver, to take unstarted jobs back on a stop.
    pub queued: flume::Receiver<Job>,
    pub events: flume::Receiver<Event>,
    /// For the sync thread's answers.
    pub events_tx: flume::Sender<Event>,
    pub wind_down: Arc<Notify>,
    pub host_filter: SharedFilter,
    pub counters: Arc<Counters>,
    pub peers: Peers,
    pub busy: Arc<Busy>,
}

/// What a turn found.
enum Turn {
    Continue,
    NothingLeft,
}

impl Coordinator {
    pub fn new(
        store: Box<dyn Store>,
        out: OutputDir,
        run: RunId,
        work: Work,
        mut links: Links,
    ) -> Result<Coordinator> {
        let now = Instant::now();
        links.peers.share_limits(&*store, now)?;
        let out = Arc::new(out);
        let syncer = Syncer::start(out.clone(), links.events_tx)?;
        Ok(Coordinator {
            store,
            out,
            syncer,
            run,
            work,
            events: links.events,
            queue: JobQueue::new(links.jobs, links.queued),
            in_flight: HashMap::new(),
            durability: Durability::new(now, links.peers.heartbeat),
            schedule: ClaimSchedule::new(now),
            host_filter: links.host_filter,
            stopping: None,
            wind_down: links.wind_down,
            counters: links.counters,
            peers: links.peers,
            busy: links.busy,
        })
    }

    /// Runs until no URL is left, or until the workers are gone after a
    /// stop; records how the run ended, and returns it.
    pub fn run(mut self) -> Result<RunEnd<RunError>> {
        loop {
            self.busy.idle();
            let first = match self.events.recv_deadline(self.deadline()) {
                Ok(event) => event,
                Err(RecvTimeoutError::Timeout) => Event::Tick,
                Err(RecvTimeoutError::Disconnected) => Event::WorkersGone,
            };
            self.busy.start();
            let turn_start = Instant::now();
            let mut came = usize::from(!matches!(first, Event::Tick));
            let mut flow = self.handle(first);
            // The events that came in meanwhile, in one go.
            while flow.is_continue() && came < MAX_BATCH {
                let Ok(event) = self.events.try_recv() else {
                    break;
                };
                flow = self.handle(event);
                came += 1;
            }
            if flow.is_break() {
                break;
            }
            match self.turn() {
                Ok(Turn::Continue) => {}
                Ok(Turn::NothingLeft) => {
                    self.stopping.get_or_insert(RunEnd::Finished);
                    break;
                }
                Err(error) => self.stop(RunEnd::Error(error)),
            }
            if came > 0 {
                let pause = (turn_start + MIN_TURN).min(self.deadline());
                std::thread::sleep(pause.saturating_duration_since(Instant::now()));
            }
        }
        self.finish()
    }

    /// Records one event; breaks when the workers are all gone.
    fn handle(&mut self, event: Event) -> ControlFlow<()> {
        match event {
            Event::Finished { completion, staged } => self.collect(completion, staged),
            Event::Durable(answer) => {
                if let Some(error) = self.durability.synced(answer, Instant::now()) {
                    self.stop(RunEnd::Error(error.into()));
                }
            }
            Event::Fatal(error) => self.stop(RunEnd::Error(error)),
            Event::Stop => self.stop(RunEnd::Interrupted),
            Event::ClaimNow => self.schedule.claim_now(Instant::now()),
            Event::Tick => {}
            Event::WorkersGone => return ControlFlow::Break(()),
        }
        ControlFlow::Continue(())
    }

    /// Takes a worker's outcome (or a job given back unstarted).
    fn collect(&mut self, completion: Completion, staged: Option<Written>) {
        let now = Instant::now();
        let recorded = self
            .in_flight
            .remove(&completion.id())
            .and_then(|(_, recorded)| recorded);
        match &completion {
            Completion::Retry {
                next_attempt_at, ..
            } => self.schedule.retry_at(instant_of(*next_attempt_at)),
            Completion::Failed { .. } => {
                if let Some(recorded) = recorded {
                    self.durability.remove_before_commit(recorded);
                }
            }
            _ => {}
        }
        match staged {
            Some(body) => self.durability.stage(completion, body, now),
            None => self.durability.ready(completion, now),
        }
        if self.in_flight.is_empty() {
            // Idle now: look for due rows, or find that none are left.
            self.schedule.claim_now(now);
        }
    }

    /// When the loop must wake up even if no event comes.
    fn deadline(&self) -> Instant {
        let mut deadline = self.durability.deadline();
        if self.queue.wants_more() {
            deadline = deadline.min(self.schedule.next_at());
        }
        deadline.max(Instant::now())
    }

    /// Commits and claims when due, then hands the bodies waiting for the
    /// disk to the sync thread. In that order: a batch is committed before
    /// the next one's files are renamed, so a crash leaves renamed files of
    /// at most one uncommitted batch.
    fn turn(&mut self) -> Result<Turn> {
        let turn = self.commit_and_claim()?;
        if self.durability.sync_due(Instant::now()) {
            self.syncer.sync(self.durability.start_sync())?;
        }
        Ok(turn)
    }

    fn commit_and_claim(&mut self) -> Result<Turn> {
        let now = Instant::now();
        let claim_due = self.queue.wants_more() && self.schedule.due(now);
        let commit_due = self.durability.commit_due(now);
        let heartbeat_due = self.durability.heartbeat_due(now);
        if !(commit_due || claim_due || heartbeat_due) {
            return Ok(Turn::Continue);
        }
        if self.peers.share_due(now) {
            // Also while busy, when the heartbeat rides on commits: runs
            // that come or go change every run's part.
            self.peers.share_limits(&*self.store, now)?;
        }
        if !(commit_due || claim_due) && self.durability.batch().is_empty() {
            // Only alive to say: no transaction needed.
            self.store.heartbeat(self.run)?;
            self.durability.renewed(now);
            return Ok(Turn::Continue);
        }
        let want = if claim_due { self.queue.room() } else { 0 };
        let claims = self.commit(want)?;
        let got = claims.len();
        if got > 0 {
            self.peers.stop_waiting();
        }
        self.hand_out(claims)?;
        if claim_due && got < want {
            let mut next_due = self.store.next_due(self.work)?;
            let mut waiting = false;
            if next_due.is_none() && self.in_flight.is_empty() && self.durability.batch().is_empty()
            {
                // Every URL is done only when no other live run holds any.
                if !self.peers.still_working(&mut *self.store, &self.out)? {
                    return Ok(Turn::NothingLeft);
                }
                next_due = self.store.next_due(self.work)?;
                waiting = true;
            }
            let filtered = !self.filter().is_empty();
            self.schedule
                .came_short(now, next_due.map(instant_of), filtered);
            if waiting {
                self.schedule.waiting_for_peers(now);
            }
        }
        Ok(Turn::Continue)
    }

    /// Sends claimed rows to the job queue; a row whose recorded file name
    /// would lead outside the output folder fails instead.
    fn hand_out(&mut self, claims: Vec<Claim>) -> Result<()> {
        let mut refused = Vec::new();
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
            // A failed refresh keeps its file: only a failed fetch removes
            // the file recorded before.
            let recorded = claim.recorded.filter(|_| !claim.refresh);
            let recorded = recorded.map(|(bytes, sha256)| Written {
                id: claim.id,
                name: claim.path.clone(),
                bytes,
                sha256,
            });
            self.in_flight.insert(claim.id, (claim.lease, recorded));
            let temp = self.out.temp_file(claim.id);
            self.queue.send(Job { claim, temp })?;
        }
        for completion in refused {
            self.collect(completion, None);
        }
        Ok(())
    }

    /// Commits the batch and claims up to `claim` rows in one transaction.
    fn commit(&mut self, claim: usize) -> Result<Vec<Claim>> {
        let claim = if self.stopping.is_some() { 0 } else { claim };
        for recorded in self.durability.take_to_remove() {
            if let Err(error) = self.out.remove_if_written(&recorded) {
                tracing::warn!(
                    "cannot remove the file of a failed URL, {}: {error}",
                    recorded.name
                );
            }
        }
        let batch = self.durability.batch();
        let marks_done = batch.iter().any(|c| matches!(c, Completion::Done { .. }));
        let filter = self.filter();
        let claims = self
            .store
            .complete_and_claim(self.run, batch, claim, &filter, self.work)?;
        if marks_done {
            crashpoint::passed(Step::Committed);
        }
        count_committed(&self.counters, batch);
        self.durability.committed(Instant::now());
        Ok(claims)
    }

    fn filter(&self) -> HostFilter {
        self.host_filter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stops claiming: unstarted jobs go back, workers finish what they hold.
    /// An error outranks a stop already under way for another reason (the
    /// last batch may fail after the run found nothing left): the run's end
    /// is then that error.
    fn stop(&mut self, end: RunEnd<RunError>) {
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
        let now = Instant::now();
        for job in self.queue.close() {
            self.in_flight.remove(&job.claim.id);
            self.durability.ready(
                Completion::Unstarted {
                    id: job.claim.id,
                    lease: job.claim.lease,
                },
                now,
            );
        }
        self.wind_down.notify_one();
    }

    /// Commits what is left, records how the run ended and closes the
    /// output folder.
    fn finish(mut self) -> Result<RunEnd<RunError>> {
        // Whatever is still claimed was cut short.
        let now = Instant::now();
        for (id, (lease, _)) in std::mem::take(&mut self.in_flight) {
            self.durability
                .ready(Completion::Interrupted { id, lease }, now);
        }
        // Jobs still queued were in flight too: counted just above.
        self.queue.close();
        // The sync thread's batch first, committed before the rest is made
        // durable here: as in `turn`, a crash may leave renamed files of one
        // uncommitted batch at most.
        while self.durability.is_syncing() {
            match self.events.recv() {
                Ok(event) => {
                    let _ = self.handle(event);
                }
                Err(_) => break,
            }
        }
        let mut committed = self.commit(0);
        if committed.is_ok() && self.durability.has_staged() {
            let bodies = self.durability.start_sync();
            let answer = self.out.make_durable(&bodies);
            if let Some(error) = self.durability.synced(answer, Instant::now()) {
                self.stop(RunEnd::Error(error.into()));
            }
            committed = self.commit(0);
        }
        let end = self
            .stopping
            .take()
            .unwrap_or(RunEnd::Error(RunError::Internal("the workers stopped")));
        let end = match committed {
            Err(error) => RunEnd::Error(error),
            Ok(_) => end,
        };
        self.store.end_run(self.run, &end.recorded())?;
        self.syncer.stop()?;
        match Arc::try_unwrap(self.out) {
            // After an error a batch may be in place and not committed: its
            // manifest stays for the next run to settle.
            Ok(out) => out.close(matches!(end, RunEnd::Error(_)))?,
            Err(_) => return Err(RunError::Internal("the output folder is still in use")),
        }
        Ok(end)
    }
}

/// The bounded queue of claimed jobs on their way to the dispatcher.
struct JobQueue {
    /// None once the run stops claiming: the dispatcher then winds down.
    jobs: Option<flume::Sender<Job>>,
    /// The queue's own receiver, to take unstarted jobs back.
    queued: flume::Receiver<Job>,
    capacity: usize,
}

impl JobQueue {
    fn new(jobs: flume::Sender<Job>, queued: flume::Receiver<Job>) -> JobQueue {
        JobQueue {
            capacity: jobs.capacity().unwrap_or(64),
            jobs: Some(jobs),
            queued,
        }
    }

    /// Open, and at most half full: worth a claim.
    fn wants_more(&self) -> bool {
        self.jobs
            .as_ref()
            .is_some_and(|jobs| jobs.len() <= self.capacity / 2)
    }

    /// How many jobs fit now.
    fn room(&self) -> usize {
        self.jobs
            .as_ref()
            .map_or(0, |jobs| self.capacity.saturating_sub(jobs.len()))
    }

    fn send(&self, job: Job) -> Result<()> {
        // Room was counted before the claim, and only this thread sends.
        match &self.jobs {
            Some(jobs) if jobs.try_send(job).is_ok() => Ok(()),
            _ => Err(RunError::Internal("the job queue closed unexpectedly")),
        }
    }

    /// Closes the queue and takes back the jobs no one has taken yet.
    fn close(&mut self) -> Vec<Job> {
        self.jobs = None;
        self.queued.try_iter().collect()
    }
}

/// Feeds the progress display with what was just committed.
fn count_committed(counters: &Counters, batch: &[Completion]) {
    for completion in batch {
        match completion {
            Completion::Done { fetched, .. } => {
                counters.done.fetch_add(1, Ordering::Relaxed);
                counters.bytes.fetch_add(fetched.bytes, Ordering::Relaxed);
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

/// The instant at which a unix-millisecond time comes.
fn instant_of(unix_ms: i64) -> Instant {
    let wait = unix_ms.saturating_sub(now_ms()).max(0) as u64;
    Instant::now() + Duration::from_millis(wait)
}
