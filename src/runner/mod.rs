//! A run. The coordinator, on the database thread, owns the run's state
//! and decides everything: what to claim, when to commit, when to stop. The
//! sync thread makes bodies durable for it. On an async runtime, the crew:
//! N workers fed by a dispatcher that hands out jobs by host. Jobs go down
//! to the crew, events come up to the coordinator (`messages.rs`).
//!
//! Shutdown: the stop signal (the first Ctrl-C or SIGTERM, which `main`
//! watches) stops claiming; workers finish what they hold for a short grace
//! period and are then cut off; every row not done goes back to pending.

mod coordinator;
mod crew;
mod dispatch;
mod durability;
mod error;
mod messages;
mod peers;
mod schedule;
mod syncer;
mod watch;
mod worker;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::clock::now_ms;
use crate::counters::{self, Counters};
use crate::domain::{RunEnd, RunId, RunStart, Work, message_of};
use crate::fetch::{FetchOptions, Fetcher};
use crate::output::OutputDir;
use crate::process;
use crate::progress;
use crate::store::Store;

use coordinator::{Coordinator, Links};
use crew::Crew;
use dispatch::Dispatcher;
use peers::Peers;
use watch::{Busy, Watch};

pub use crew::{SignalError, StopSignal};
pub use error::{Result, RunError};
use messages::{Event, Job};

/// Up to this many workers run on one thread. On several threads a worker
/// can send its next request before the connection of its last one is back
/// in the pool (hyper hands it back from a task of its own), and every such
/// race opens a connection more: 207 to 239 connections for 200 workers
/// against one host, against 200 on one thread, at the same CPU per URL,
/// and 855 for 500 workers. A thousand workers against a 100 ms API are
/// 10,000 requests a second, within one thread.
const SINGLE_THREAD_WORKERS: usize = 1024;

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
    /// How long one wait for the database may last before the run gives
    /// up (a shared database: past the lease, the run's URLs are others').
    pub answer_within: Option<Duration>,
    pub fetch: FetchOptions,
    /// The command line, secrets removed, recorded with the run.
    pub command: String,
    pub display: progress::Display,
    /// Where `--metrics` serves, bound already.
    pub metrics: Option<std::net::TcpListener>,
    /// The process ends soon after the run: the workers' sockets, buffers
    /// and tasks are left for the exit to take, which costs less than
    /// closing and freeing them one by one (with a thousand workers, tens of
    /// milliseconds of the run's end). Everything the run promises is
    /// durable and committed before that point, in either case.
    pub process_ends_after: bool,
}

/// What one run committed.
#[derive(Debug, Default)]
pub struct RunTotals {
    pub run: RunId,
    pub done: u64,
    pub failed: u64,
    pub retried: u64,
    pub bytes: u64,
    pub elapsed: Duration,
    pub end: Option<RunEnd<RunError>>,
}

/// Runs `plan` until no URL is left, or until `stop` completes and the
/// work in flight is settled.
pub fn execute(mut store: Box<dyn Store>, plan: RunPlan, stop: StopSignal) -> Result<RunTotals> {
    let started_at = Instant::now();
    if plan.workers > SINGLE_THREAD_WORKERS {
        one_malloc_arena();
    }
    // Before the run is registered: a runtime that cannot start (no file
    // descriptors left) ends the command with nothing recorded or made.
    let runtime = runtime(plan.workers)?;
    let me = process::this_process(plan.command.clone());
    let (run, out) = start(&mut store, &plan, &me)?;
    let per_host_workers = plan.fetch.politeness.per_host_workers;
    let fetcher = Arc::new(Fetcher::new(plan.fetch)?);
    let counters = Arc::new(Counters::default());
    let progress_start = progress_start(&*store, plan.work, &counters)?;

    // Enough claimed rows that the workers never wait for the next claim
    // (at 10,000 URLs/s, 256 last 25 ms), few enough that a stop hands back
    // little.
    let capacity = (plan.workers * 2).max(256);
    let (jobs_tx, jobs_rx) = flume::bounded::<Job>(capacity);
    let (events_tx, events_rx) = flume::bounded::<Event>(capacity.max(1024));
    let wind_down = Arc::new(Notify::new());
    let host_filter = Arc::default();
    let busy = Arc::new(Busy::default());
    let crew = Crew {
        workers: plan.workers,
        fetcher: fetcher.clone(),
        dispatcher: Dispatcher::new(
            fetcher.hosts(),
            capacity,
            per_host_workers,
            Arc::clone(&host_filter),
        ),
        jobs: jobs_rx.clone(),
        events: events_tx.clone(),
        wind_down: wind_down.clone(),
        counters: counters.clone(),
    };
    let coordinator = Coordinator::new(
        store,
        out,
        run,
        plan.work,
        Links {
            jobs: jobs_tx,
            queued: jobs_rx,
            events: events_rx,
            events_tx,
            wind_down,
            host_filter,
            counters: counters.clone(),
            peers: Peers::new(
                me,
                run,
                counters.clone(),
                plan.lease,
                fetcher.hosts(),
                fetcher.rate(),
            ),
            busy: busy.clone(),
        },
    )?;
    // How the coordinator ended, sent as it ends: waited for beside the
    // watch, which a join could not be.
    let (ended_tx, ended) = flume::bounded::<Result<RunEnd<RunError>>>(1);
    std::thread::Builder::new()
        .name("jobrun-db".into())
        .spawn(move || {
            let _ = ended_tx.send(coordinator.run());
        })
        .map_err(|error| RunError::Start {
            what: "cannot start the database thread",
            error,
        })?;

    let watch = Watch {
        busy,
        limit: plan.answer_within,
        db: crate::redact::redact_url(&plan.db.display().to_string()).into_owned(),
        run,
    };
    // A database that stopped answering leaves the database thread waiting:
    // it is left behind, and goes with the process.
    let end = run_crew(
        (runtime, crew),
        stop,
        plan.display,
        plan.metrics,
        progress_start,
        Ending { ended, watch },
        plan.process_ends_after,
    )??;
    Ok(RunTotals {
        run,
        elapsed: started_at.elapsed(),
        end: Some(end),
        ..RunTotals::counted(&counters)
    })
}

impl RunTotals {
    /// What this run committed, as the progress display counted it.
    fn counted(counters: &Counters) -> RunTotals {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        RunTotals {
            done: load(&counters.done),
            failed: load(&counters.failed),
            retried: load(&counters.retried),
            bytes: load(&counters.bytes),
            ..RunTotals::default()
        }
    }
}

/// How the run ends: the coordinator's word, or the watch giving up on the
/// database first.
struct Ending {
    ended: flume::Receiver<Result<RunEnd<RunError>>>,
    watch: Watch,
}

/// Runs the crew on its async runtime, made before the run was registered,
/// until its workers are gone and the coordinator has ended, with the
/// progress display beside it, and the metrics endpoint if asked for; or
/// until the watch gives up on the database. Returns how the coordinator
/// ended.
fn run_crew(
    (runtime, crew): (tokio::runtime::Runtime, Crew),
    stop: StopSignal,
    display: progress::Display,
    metrics: Option<std::net::TcpListener>,
    start: counters::Start,
    ending: Ending,
    process_ends_after: bool,
) -> Result<Result<RunEnd<RunError>>> {
    let counters = crew.counters.clone();
    let hosts = crew.fetcher.hosts();
    if let Some(listener) = metrics {
        // Dropped with the runtime: the metrics stop with the run.
        runtime.spawn(crate::metrics::serve(
            listener,
            crate::metrics::Source {
                counters: counters.clone(),
                start,
                hosts: hosts.clone(),
            },
        ));
    }
    let progress = progress::show(counters, start, hosts, display);
    let Ending { ended, watch } = ending;
    let outcome = runtime.block_on(async {
        tokio::select! {
            ended = async {
                crew.run(stop, progress).await;
                ended.recv_async().await
            } => ended.map_err(|_| RunError::Internal("the database thread panicked")),
            error = watch.gave_up() => Err(error),
        }
    });
    if outcome.is_err() {
        // Workers may be blocked on the stuck database thread.
        runtime.shutdown_background();
    } else if process_ends_after {
        // The coordinator has committed, synced and recorded the run's end
        // before it ended: what is left is connections and buffers.
        std::mem::forget(runtime);
    }
    outcome
}

/// Registers the run, taking back dead runs' rows, and opens the output
/// folder; a folder that cannot be used ends the run at once, recorded.
/// Returns the run's id and the folder.
fn start(store: &mut Box<dyn Store>, plan: &RunPlan, me: &RunStart) -> Result<(RunId, OutputDir)> {
    let now = now_ms();
    let started = store.start_run(me, &|run| process::liveness(run, me, now))?;
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
        .map_err(RunError::from)
        .and_then(|(out, leftovers)| {
            peers::settle_leftovers(&mut **store, &out, leftovers).map(|()| out)
        });
    match opened {
        Ok(out) => Ok((started.id, out)),
        Err(error) => {
            store.end_run(started.id, &RunEnd::Error(message_of(&error)))?;
            Err(error)
        }
    }
}

/// Where the job stands as the run starts, for the progress display; the
/// retries already scheduled go into `counters`.
fn progress_start(store: &dyn Store, work: Work, counters: &Counters) -> Result<counters::Start> {
    for (due, count) in store.retry_schedule(now_ms())? {
        counters.retries.add(due, count);
    }
    Ok(match (work, store.refresh_counts()?) {
        // A refresh counts the rows of its round.
        (Work::Refresh, Some(round)) => counters::Start {
            total: round.changed + round.unchanged + round.failed + round.pending,
            done: round.changed + round.unchanged,
            failed: round.failed,
        },
        _ => {
            let counts = store.state_counts()?;
            counters::Start {
                total: counts.total,
                done: counts.done,
                failed: counts.failed,
            }
        }
    })
}

/// Keeps every thread's allocations in one glibc heap, for a run on
/// several runtime threads. By default glibc gives each new thread a heap
/// of its own (up to eight per core), and a connection's buffers, grown on
/// one runtime thread and freed on another, leave each heap with free space
/// the others cannot use: with a thousand workers, a tenth of the run's
/// memory. The big buffers are a few per URL, so the one heap's lock is
/// rarely contended, and most small blocks do not take it (glibc caches them per
/// thread). Called before the run starts its threads.
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a limit glibc reads when it next needs a
    // heap for a thread; it takes no pointers.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// One thread costs less CPU per URL (no work stealing, no wake-ups across
/// cores) and opens no spare connections (see `SINGLE_THREAD_WORKERS`).
fn runtime(workers: usize) -> Result<tokio::runtime::Runtime> {
    let mut runtime = if workers <= SINGLE_THREAD_WORKERS {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    runtime
        .enable_all()
        .build()
        .map_err(|error| RunError::Start {
            what: "cannot start the async runtime",
            error,
        })
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use reqwest::header::HeaderMap;

    use super::*;
    use crate::backoff::Backoff;
    use crate::domain::NewUrl;
    use crate::hosts::Politeness;
    use crate::store::{self, Location, Open, OpenOptions};

    fn open(db: &std::path::Path, mode: Open) -> Box<dyn Store> {
        store::open(&Location::Sqlite(db.to_path_buf()), &OpenOptions::new(mode)).unwrap()
    }

    fn plan(dir: &std::path::Path, db: PathBuf) -> RunPlan {
        RunPlan {
            out_dir: dir.join("out"),
            db,
            workers: 2,
            work: Work::Fetch,
            lease: None,
            answer_within: None,
            fetch: FetchOptions {
                headers: HeaderMap::new(),
                timeout: Duration::from_secs(60),
                workers: 2,
                rate: None,
                backoff: Backoff {
                    base: Duration::from_secs(1),
                    max: Duration::from_secs(60),
                },
                max_attempts: 5,
                politeness: Politeness::default(),
                user_agent: None,
                max_bytes: 1 << 20,
                insecure: false,
                connect_timeout: None,
                max_redirects: 10,
                retry_on: Default::default(),
                tls: Default::default(),
                proxies: Default::default(),
            },
            command: "jobrun run".into(),
            display: progress::Display::Off,
            metrics: None,
            process_ends_after: false,
        }
    }

    /// A run is stopped by the future it is given, without any signal: the
    /// requests in flight (to a server that never answers) are cut off and
    /// every URL goes back to pending.
    #[test]
    fn a_run_stops_when_its_stop_future_completes() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("jobrun.db");
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let at = server.local_addr().unwrap();
        let mut store = open(&db, Open::CreateIfMissing);
        let urls: Vec<String> = (0..4).map(|i| format!("http://{at}/{i}.json")).collect();
        let paths: Vec<String> = (0..4).map(|i| format!("{i}.json")).collect();
        let host = at.to_string();
        let batch: Vec<NewUrl<'_>> = urls
            .iter()
            .zip(&paths)
            .map(|(url, path)| NewUrl {
                url,
                request: None,
                request_hash: "",
                host: &host,
                path,
                named: true,
            })
            .collect();
        store.import(&batch).unwrap();
        std::fs::create_dir(dir.path().join("out")).unwrap();

        // The stop comes once the server holds a request; its connections
        // stay open and unanswered until the test ends.
        let (requested, stop) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            let mut requested = Some(requested);
            for connection in server.incoming() {
                held.push(connection);
                if let Some(requested) = requested.take() {
                    let _ = requested.send(());
                }
            }
        });
        let stop: StopSignal =
            Box::pin(async { stop.await.map_err(|_| "the server thread ended".into()) });
        let totals = execute(store, plan(dir.path(), db.clone()), stop).unwrap();

        assert!(
            matches!(totals.end, Some(RunEnd::Interrupted)),
            "{:?}",
            totals.end
        );
        assert_eq!(totals.done, 0);
        let counts = open(&db, Open::MustExist).state_counts().unwrap();
        assert_eq!((counts.pending, counts.running, counts.done), (4, 0, 0));
    }
}
