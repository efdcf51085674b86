//! A run: the database owner on its own thread, the sync thread that makes
//! bodies durable, N workers on a tokio runtime fed by a dispatcher that
//! hands out jobs by host, and a supervisor that watches for Ctrl-C and for
//! the workers to finish.
//!
//! Shutdown: the first Ctrl-C (or SIGTERM) stops claiming; workers finish
//! what they hold for a short grace period and are then cut off; every row
//! not done goes back to pending. A second Ctrl-C exits at once, which is
//! safe too: the next run takes this one's rows back.

mod dispatch;
mod owner;
mod peers;
mod syncer;
mod worker;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;

use crate::clock::now_ms;
use crate::domain::{Claim, Completion, RunEnd, RunId, Work};
use crate::fetch::{FetchOptions, Fetcher};
use crate::output::{Leftover, OutputDir, TempFile, Written};
use crate::process;
use crate::progress::{self, Counters};
use crate::store::Store;

use dispatch::{DispatchChannels, Dispatcher};
use owner::{Owner, OwnerChannels};
use peers::Peers;

/// Up to this many workers run on one thread.
const SINGLE_THREAD_WORKERS: usize = 64;

/// How long in-flight requests may go on after a stop.
const GRACE: Duration = Duration::from_millis(1500);

/// A claimed row on its way to a worker.
#[derive(Debug)]
pub struct Job {
    pub claim: Claim,
    pub temp: TempFile,
}

/// What reaches the database owner.
pub enum Event {
    /// A worker finished an attempt; a done body comes with what it wrote.
    Finished {
        completion: Completion,
        staged: Option<Written>,
    },
    /// The sync thread's answer for the batch it was given: the rows whose
    /// names could not be used, with why, or the error that stops the run.
    Durable(Result<Vec<(i64, String)>>),
    /// A worker could not write its file: the run stops.
    Fatal(anyhow::Error),
    /// Ctrl-C: stop claiming.
    Shutdown,
    /// A host that claims left out can take jobs again: claim now.
    ClaimNow,
    /// Every worker has stopped.
    WorkersGone,
}

/// What a run is asked to do.
pub struct RunPlan {
    pub out_dir: PathBuf,
    /// The state database, which no output file may replace.
    pub db: PathBuf,
    pub workers: usize,
    /// Rows to fetch, or done rows to refresh.
    pub work: Work,
    /// The lease of a run on a shared database, which its heartbeat renews.
    pub lease: Option<Duration>,
    pub fetch: FetchOptions,
    /// The command line, secrets removed, recorded with the run.
    pub command: String,
    pub display: progress::Display,
    /// Where `--metrics` serves, bound already.
    pub metrics: Option<std::net::TcpListener>,
}

/// What one run committed.
#[derive(Debug, Default)]
pub struct RunTotals {
    pub run: RunId,
    pub done: u64,
    pub failed: u64,
    pub retried: u64,
    pub interrupted: u64,
    pub bytes: u64,
    /// Rows taken back from runs found dead at the start.
    pub reclaimed: u64,
    pub elapsed: Duration,
    pub end: Option<RunEnd>,
}

pub fn execute(mut store: Box<dyn Store>, plan: RunPlan) -> Result<RunTotals> {
    let started_at = Instant::now();
    let me = process::this_process(plan.command.clone());
    let now = now_ms();
    let started = store.start_run(&me, &|run| process::liveness(run, &me, now))?;
    for (id, state) in &started.dead {
        peers::log_dead_run(*id, *state);
    }
    if started.reclaimed > 0 {
        tracing::info!(
            "took back {} URLs from runs that were cut short",
            started.reclaimed
        );
    }
    let live: Vec<i64> = started.live.iter().map(|run| run.id.0).collect();
    let opened = OutputDir::open(&plan.out_dir, started.id.0, &live, &plan.db)
        .and_then(|(out, leftovers)| settle_leftovers(&mut *store, &out, leftovers).map(|()| out));
    let out = match opened {
        Ok(out) => out,
        Err(error) => {
            store.end_run(started.id, &RunEnd::Error(format!("{error:#}")))?;
            return Err(error);
        }
    };
    let per_host_workers = plan.fetch.politeness.per_host_workers;
    let fetcher = Arc::new(Fetcher::new(plan.fetch)?);
    let counts = store.state_counts()?;
    let counters = Arc::new(Counters::default());
    for (due, count) in store.retry_schedule(now_ms())? {
        counters.retries.add(due, count);
    }
    let view = ProgressView {
        counters: counters.clone(),
        start: match (plan.work, store.refresh_counts()?) {
            // A refresh counts the rows of its round.
            (Work::Refresh, Some(round)) => progress::Start {
                total: round.changed + round.unchanged + round.failed + round.pending,
                done: round.changed + round.unchanged,
                failed: round.failed,
            },
            _ => progress::Start {
                total: counts.total,
                done: counts.done,
                failed: counts.failed,
            },
        },
        display: plan.display,
    };

    // Enough claimed rows that the workers never wait for the next claim
    // (at 10,000 URLs/s, 256 last 25 ms), few enough that a stop hands back
    // little.
    let capacity = (plan.workers * 2).max(256);
    let (jobs_tx, jobs_rx) = flume::bounded::<Job>(capacity);
    let (events_tx, events_rx) = flume::bounded::<Event>(capacity.max(1024));
    let stopping = Arc::new(Notify::new());
    let host_filter = Arc::default();
    let dispatcher = Dispatcher::new(
        fetcher.hosts(),
        capacity,
        per_host_workers,
        Arc::clone(&host_filter),
    );
    let owner = Owner::new(
        store,
        out,
        started.id,
        plan.work,
        OwnerChannels {
            jobs: jobs_tx,
            queued: jobs_rx.clone(),
            events: events_rx,
            events_tx: events_tx.clone(),
            stopping_signal: stopping.clone(),
            host_filter,
        },
        counters.clone(),
        Peers::new(me, started.id, counters, plan.lease, fetcher.hosts()),
    )?;
    let owner = std::thread::Builder::new()
        .name("jobrun-db".into())
        .spawn(move || owner.run())
        .context("cannot start the database thread")?;

    // One thread costs less CPU per URL (no work stealing, no wake-ups
    // across cores) and is enough for a few dozen workers; a thousand need a
    // thread per core.
    let mut runtime = if plan.workers <= SINGLE_THREAD_WORKERS {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = runtime
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    if let Some(listener) = plan.metrics {
        // Dropped with the runtime: the metrics stop with the run.
        runtime.spawn(crate::metrics::serve(
            listener,
            crate::metrics::Source {
                counters: view.counters.clone(),
                start: view.start,
                hosts: fetcher.hosts(),
            },
        ));
    }
    runtime.block_on(supervise(
        plan.workers,
        fetcher,
        dispatcher,
        jobs_rx,
        events_tx,
        stopping,
        view,
    ))?;
    drop(runtime);

    let mut totals = owner
        .join()
        .map_err(|_| anyhow::anyhow!("the database thread panicked"))??;
    totals.run = started.id;
    totals.reclaimed = started.reclaimed;
    totals.elapsed = started_at.elapsed();
    Ok(totals)
}

/// Settles what runs that died left in the output folder, with the rows'
/// states read under the write lock: no run may claim one of those rows
/// while its file is being looked at.
pub(super) fn settle_leftovers(
    store: &mut dyn Store,
    out: &OutputDir,
    leftovers: Vec<Leftover>,
) -> Result<()> {
    let ids: Vec<i64> = leftovers.iter().flat_map(Leftover::ids).collect();
    if ids.is_empty() {
        out.settle(leftovers, &HashMap::new());
        return Ok(());
    }
    let mut leftovers = Some(leftovers);
    store.with_row_states(&ids, &mut |states| {
        out.settle(leftovers.take().unwrap_or_default(), states);
        Ok(())
    })
}

/// What the progress display needs.
struct ProgressView {
    counters: Arc<Counters>,
    start: progress::Start,
    display: progress::Display,
}

/// Runs the workers until they are done, handling Ctrl-C and SIGTERM.
async fn supervise(
    workers: usize,
    fetcher: Arc<Fetcher>,
    dispatcher: Dispatcher,
    jobs: flume::Receiver<Job>,
    events: flume::Sender<Event>,
    stopping: Arc<Notify>,
    view: ProgressView,
) -> Result<()> {
    let progress = tokio::spawn(progress::show(
        view.counters.clone(),
        view.start,
        fetcher.hosts(),
        view.display,
    ));
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch for Ctrl-C")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch for SIGTERM")?;
    let mut set = JoinSet::new();
    // Hands a job over only when a worker is free to send it at once, so a
    // host's permit is never held by a job waiting for a worker.
    let (work_tx, work_rx) = flume::bounded(workers);
    let idle = Arc::new(Semaphore::new(workers));
    set.spawn(dispatcher.run(DispatchChannels {
        jobs,
        work: work_tx,
        idle: idle.clone(),
        events: events.clone(),
    }));
    for _ in 0..workers {
        set.spawn(worker::work(
            fetcher.clone(),
            work_rx.clone(),
            idle.clone(),
            events.clone(),
            view.counters.clone(),
        ));
    }
    drop(work_rx);
    let mut interrupted = false;
    let mut grace: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        tokio::select! {
            _ = interrupt.recv() => {
                if interrupted {
                    tracing::warn!("stopped at once; the next run takes the unfinished URLs back");
                    std::process::exit(130);
                }
                interrupted = true;
                tracing::warn!("stopping: finishing requests in flight (Ctrl-C again to stop at once)");
                let _ = events.send_async(Event::Shutdown).await;
                grace.get_or_insert_with(|| Box::pin(tokio::time::sleep(GRACE)));
            }
            _ = terminate.recv() => {
                interrupted = true;
                let _ = events.send_async(Event::Shutdown).await;
                grace.get_or_insert_with(|| Box::pin(tokio::time::sleep(GRACE)));
            }
            _ = stopping.notified() => {
                grace.get_or_insert_with(|| Box::pin(tokio::time::sleep(GRACE)));
            }
            _ = async { grace.as_mut().expect("guarded").await }, if grace.is_some() => {
                set.abort_all();
                grace = None;
            }
            joined = set.join_next() => {
                if joined.is_none() {
                    break;
                }
            }
        }
    }
    progress.abort();
    let _ = progress.await;
    let _ = events.send_async(Event::WorkersGone).await;
    Ok(())
}
