//! `jobrun report`: where the job stands, from the database alone, so it
//! works during a run (it only reads, and WAL readers never block the
//! writer), after a crash or after a reboot.

use std::fmt::Write as _;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Result;
use serde::Serialize;

use crate::cli::ReportArgs;
use crate::clock::now_ms;
use crate::commands::Status;
use crate::domain::{JobState, RefreshCounts, RunInfo, RunOutcome, RunStart, Summary};
use crate::format::{human_bytes, thousands};
use crate::out_dir;
use crate::process;
use crate::redact::redact_url;
use crate::store::{Database, Open, Store};

/// How many distinct errors the report lists.
const TOP_ERRORS: usize = 10;
/// How many runs the report lists.
const RECENT_RUNS: usize = 5;

#[derive(Serialize)]
struct Report {
    database: PathBuf,
    out_dir: Option<PathBuf>,
    #[serde(flatten)]
    summary: Summary,
    /// The last `jobrun refresh` round, if any: its URLs by outcome.
    refresh: Option<RefreshCounts>,
    /// The newest run, also first in `runs`.
    last_run: Option<RunView>,
    runs: Vec<RunView>,
}

#[derive(Clone, Serialize)]
struct RunView {
    id: i64,
    /// running, finished, interrupted, error, killed or rebooted.
    state: RunState,
    message: Option<String>,
    pid: u32,
    started_at: String,
    ended_at: Option<String>,
    seconds: f64,
    done: u64,
    failed: u64,
    retried: u64,
    bytes: u64,
    /// URLs finished (done or failed) per second of the run.
    urls_per_s: f64,
    /// The command that resumes the job, on the newest run when the job is
    /// not finished.
    resume: Option<String>,
}

pub fn run(db: &Database, args: ReportArgs) -> Result<Status> {
    let store = db.open(Open::ReadOnly)?;
    if args.failed {
        return list_failed(&*store, args.json);
    }
    let mut summary = store.summary(TOP_ERRORS)?;
    for error in &mut summary.errors {
        error.example = redact_url(&error.example).into_owned();
    }
    let unfinished = summary.counts.pending + summary.counts.running > 0;
    let me = process::this_process(String::new());
    let now = now_ms();
    let runs: Vec<RunView> = store
        .recent_runs(RECENT_RUNS)?
        .into_iter()
        .enumerate()
        .map(|(i, run)| view(run, &me, now, i == 0 && unfinished))
        .collect();
    let report = Report {
        database: PathBuf::from(db.shown()),
        out_dir: out_dir::recorded(&*store, db)?,
        summary,
        refresh: store.refresh_counts()?,
        last_run: runs.first().cloned(),
        runs,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(Status::Success)
}

fn list_failed(store: &dyn Store, json: bool) -> Result<Status> {
    let mut out = BufWriter::new(std::io::stdout().lock());
    store.failed(&mut |mut row| {
        row.url = redact_url(&row.url).into_owned();
        if json {
            serde_json::to_writer(&mut out, &row)?;
            writeln!(out)?;
        } else {
            writeln!(out, "{}\t{}", row.url, row.error.as_deref().unwrap_or("-"))?;
        }
        Ok(())
    })?;
    out.flush()?;
    Ok(Status::Success)
}

/// Where a run stands: still going, or how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunState {
    Running,
    Ended(RunOutcome),
}

impl Serialize for RunState {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(match self {
            RunState::Running => "running",
            RunState::Ended(outcome) => outcome.as_str(),
        })
    }
}

fn view(run: RunInfo, me: &RunStart, now: i64, resumable: bool) -> RunView {
    let state = match (run.outcome, run.ended_at) {
        (Some(outcome), Some(_)) => RunState::Ended(outcome),
        _ => match process::liveness(&run, me, now).outcome() {
            None => RunState::Running,
            Some(outcome) => RunState::Ended(outcome),
        },
    };
    let end = match run.ended_at {
        Some(ended) => ended,
        None if state == RunState::Running => now,
        None => run.heartbeat_at,
    };
    let seconds = (end - run.started_at).max(0) as f64 / 1000.0;
    let finished = (run.done + run.failed) as f64;
    let resume = (resumable && state != RunState::Running).then(|| run.start.command.clone());
    RunView {
        id: run.id.0,
        state,
        message: run.message,
        pid: run.start.pid,
        started_at: timestamp(run.started_at),
        ended_at: run.ended_at.map(timestamp),
        seconds,
        done: run.done,
        failed: run.failed,
        retried: run.retried,
        bytes: run.bytes,
        urls_per_s: if seconds > 0.0 {
            (finished / seconds).round()
        } else {
            0.0
        },
        resume,
    }
}

fn timestamp(unix_ms: i64) -> String {
    let time = UNIX_EPOCH + Duration::from_millis(unix_ms.max(0) as u64);
    humantime::format_rfc3339_seconds(time).to_string()
}

fn how_it_ended(run: &RunView) -> String {
    match run.state {
        RunState::Running => format!("running now (pid {})", run.pid),
        RunState::Ended(RunOutcome::Finished) => "finished".into(),
        RunState::Ended(RunOutcome::Interrupted) => "stopped by Ctrl-C or SIGTERM".into(),
        RunState::Ended(RunOutcome::Error) => format!(
            "stopped by an error: {}",
            run.message.as_deref().unwrap_or("unknown")
        ),
        RunState::Ended(RunOutcome::Killed) => {
            format!("cut short: process {} is gone (killed or crashed)", run.pid)
        }
        RunState::Ended(RunOutcome::Rebooted) => "cut short: the machine restarted".into(),
    }
}

fn render(report: &Report) -> String {
    let s = &report.summary;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}: {} URLs",
        report.database.display(),
        thousands(s.counts.total)
    );
    if let Some(dir) = &report.out_dir {
        let _ = writeln!(out, "  files in {}", dir.display());
    }
    let share = |n: u64| {
        if s.counts.total > 0 {
            format!("{:5.1}%", 100.0 * n as f64 / s.counts.total as f64)
        } else {
            String::new()
        }
    };
    let width = thousands(s.counts.total).len().max(5);
    for (state, n) in [
        (JobState::Done, s.counts.done),
        (JobState::Failed, s.counts.failed),
        (JobState::Pending, s.counts.pending),
        (JobState::Running, s.counts.running),
    ] {
        let label = state.as_str();
        let mut line = format!("  {label:<8} {:>width$}  {}", thousands(n), share(n));
        if state == JobState::Pending && s.counts.retry_waiting > 0 {
            let _ = write!(
                line,
                "  ({} waiting for a retry)",
                thousands(s.counts.retry_waiting)
            );
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    if let Some(round) = &report.refresh {
        let mut line = format!(
            "  refresh #{}: {} changed, {} unchanged, {} failed",
            round.round,
            thousands(round.changed),
            thousands(round.unchanged),
            thousands(round.failed)
        );
        if round.pending > 0 {
            let _ = write!(line, ", {} not refreshed yet", thousands(round.pending));
        }
        if round.failed > 0 {
            line.push_str(" (failed ones keep their old files)");
        }
        let _ = writeln!(out, "{line}");
    }
    if !s.http_statuses.is_empty() {
        let statuses: Vec<String> = s
            .http_statuses
            .iter()
            .map(|c| format!("{} × {}", c.status, thousands(c.count)))
            .collect();
        let _ = writeln!(out, "HTTP statuses: {}", statuses.join(", "));
    }
    if !s.errors.is_empty() {
        let _ = writeln!(out, "Most common errors (URLs not done):");
        for error in &s.errors {
            let _ = writeln!(out, "  {:>8}  {}", thousands(error.count), error.error);
            let _ = writeln!(out, "            e.g. {}", error.example);
        }
    }
    if !s.hosts.is_empty() {
        let _ = writeln!(out, "Hosts:");
        let width = s.hosts.iter().map(|h| h.host.len()).max().unwrap_or(0);
        for host in &s.hosts {
            let mut line = format!(
                "  {:<width$}  {} done, {} failed, {} to go",
                host.host,
                thousands(host.done),
                thousands(host.failed),
                thousands(host.pending)
            );
            let throttled = host.status_429 + host.status_503;
            if throttled > 0 {
                let _ = write!(
                    line,
                    "; 429: {}, 503: {} of {} answers ({:.1}%)",
                    thousands(host.status_429),
                    thousands(host.status_503),
                    thousands(host.answers),
                    100.0 * throttled as f64 / host.answers.max(1) as f64
                );
            }
            let _ = writeln!(out, "{line}");
        }
    }
    let _ = writeln!(
        out,
        "Written: {} in {} files",
        human_bytes(s.bytes as i64),
        thousands(s.counts.done)
    );
    if let Some(d) = &s.durations {
        let _ = writeln!(
            out,
            "Request times ({} requests): p50 {}, p95 {}, p99 {}",
            thousands(d.requests),
            millis(d.p50_ms),
            millis(d.p95_ms),
            millis(d.p99_ms)
        );
    }
    render_runs(&mut out, report);
    if s.counts.running > 0
        && report
            .last_run
            .as_ref()
            .is_some_and(|r| r.state != RunState::Running)
    {
        let _ = writeln!(
            out,
            "Rows shown as running belong to a run that is gone; the next run takes them back."
        );
    }
    out
}

fn render_runs(out: &mut String, report: &Report) {
    let Some(last) = &report.last_run else {
        let _ = writeln!(
            out,
            "No run yet: start one with `jobrun --db {} run`",
            report.database.display()
        );
        return;
    };
    let _ = writeln!(out, "Last run #{}: {}", last.id, how_it_ended(last));
    let ended = last
        .ended_at
        .as_deref()
        .map(|t| format!(", ended {t}"))
        .unwrap_or_default();
    let _ = writeln!(out, "  started {}{ended}", last.started_at);
    let _ = writeln!(
        out,
        "  in this run: {} done, {} failed, {} retries, {}, {} URLs/s",
        thousands(last.done),
        thousands(last.failed),
        thousands(last.retried),
        human_bytes(last.bytes as i64),
        last.urls_per_s
    );
    if let Some(resume) = &last.resume {
        let _ = writeln!(out, "  resume with: {resume}");
    }
    if report.runs.len() > 1 {
        let _ = writeln!(out, "Earlier runs:");
        for run in &report.runs[1..] {
            let _ = writeln!(
                out,
                "  #{} {}: {}; {} done, {} failed in {:.0} s ({} URLs/s)",
                run.id,
                run.started_at,
                how_it_ended(run),
                thousands(run.done),
                thousands(run.failed),
                run.seconds,
                run.urls_per_s
            );
        }
    }
}

fn millis(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.1} s", ms / 1000.0)
    } else {
        format!("{ms:.0} ms")
    }
}
