//! `jobrun report`: where the job stands, from the database alone, so it
//! works during a run, after a crash or after a reboot.

use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Result;
use serde::Serialize;

use crate::cli::ReportArgs;
use crate::commands::run::OUT_DIR_KEY;
use crate::commands::{Status, human_bytes, thousands};
use crate::process;
use crate::store::{Liveness, Open, RunInfo, Store, Summary, now_ms};

/// How many distinct errors the report lists.
const TOP_ERRORS: usize = 10;

#[derive(Serialize)]
struct Report {
    database: PathBuf,
    out_dir: Option<PathBuf>,
    #[serde(flatten)]
    summary: Summary,
    last_run: Option<LastRun>,
}

#[derive(Serialize)]
struct LastRun {
    id: i64,
    /// running, finished, interrupted, error, killed or rebooted.
    state: String,
    message: Option<String>,
    pid: u32,
    started_at: String,
    ended_at: Option<String>,
    done: i64,
    failed: i64,
    retried: i64,
    bytes: i64,
    /// The command that resumes the job, when it did not finish.
    resume: Option<String>,
}

pub fn run(db: &Path, args: ReportArgs) -> Result<Status> {
    let store = Store::open(db, Open::MustExist)?;
    let summary = store.summary(TOP_ERRORS)?;
    let last_run = store
        .recent_runs(1)?
        .into_iter()
        .next()
        .map(|run| last_run(run, &summary));
    let report = Report {
        database: db.to_path_buf(),
        out_dir: store.setting(OUT_DIR_KEY)?.map(PathBuf::from),
        summary,
        last_run,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(Status::Success)
}

fn last_run(run: RunInfo, summary: &Summary) -> LastRun {
    let state = match (&run.outcome, run.ended_at) {
        (Some(outcome), Some(_)) => outcome.clone(),
        _ => {
            let me = process::this_process(String::new());
            match process::liveness(&run, &me, now_ms()) {
                Liveness::Alive => "running".into(),
                Liveness::Gone => "killed".into(),
                Liveness::Rebooted => "rebooted".into(),
            }
        }
    };
    let unfinished = summary.pending + summary.running > 0;
    let resume = (state != "running" && unfinished).then(|| run.command.clone());
    LastRun {
        id: run.id,
        state,
        message: run.message,
        pid: run.pid,
        started_at: timestamp(run.started_at),
        ended_at: run.ended_at.map(timestamp),
        done: run.done,
        failed: run.failed,
        retried: run.retried,
        bytes: run.bytes,
        resume,
    }
}

fn timestamp(unix_ms: i64) -> String {
    let time = UNIX_EPOCH + Duration::from_millis(unix_ms.max(0) as u64);
    humantime::format_rfc3339_seconds(time).to_string()
}

fn render(report: &Report) -> String {
    use std::fmt::Write;
    let s = &report.summary;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}: {} URLs",
        report.database.display(),
        thousands(s.total)
    );
    if let Some(dir) = &report.out_dir {
        let _ = writeln!(out, "  files in {}", dir.display());
    }
    let share = |n: i64| {
        if s.total > 0 {
            format!("{:5.1}%", 100.0 * n as f64 / s.total as f64)
        } else {
            String::new()
        }
    };
    let width = thousands(s.total).len().max(5);
    for (label, n) in [
        ("done", s.done),
        ("failed", s.failed),
        ("pending", s.pending),
        ("running", s.running),
    ] {
        let mut line = format!("  {label:<8} {:>width$}  {}", thousands(n), share(n));
        if label == "pending" && s.retry_waiting > 0 {
            let _ = write!(
                line,
                "  ({} waiting for a retry)",
                thousands(s.retry_waiting)
            );
        }
        let _ = writeln!(out, "{}", line.trim_end());
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
        }
    }
    let _ = writeln!(
        out,
        "Written: {} in {} files",
        human_bytes(s.bytes),
        thousands(s.done)
    );
    match &report.last_run {
        None => {
            let _ = writeln!(
                out,
                "No run yet: start one with `jobrun --db {} run`",
                report.database.display()
            );
        }
        Some(run) => {
            let how = match run.state.as_str() {
                "running" => format!("running now (pid {})", run.pid),
                "finished" => "finished".into(),
                "interrupted" => "stopped by Ctrl-C or SIGTERM".into(),
                "error" => format!(
                    "stopped by an error: {}",
                    run.message.as_deref().unwrap_or("unknown")
                ),
                "killed" => format!("cut short: process {} is gone (killed or crashed)", run.pid),
                "rebooted" => "cut short: the machine restarted".into(),
                other => other.to_string(),
            };
            let ended = run
                .ended_at
                .as_deref()
                .map(|t| format!(", ended {t}"))
                .unwrap_or_default();
            let _ = writeln!(out, "Last run #{}: {how}", run.id);
            let _ = writeln!(out, "  started {}{ended}", run.started_at);
            let _ = writeln!(
                out,
                "  in this run: {} done, {} failed, {} retries, {}",
                thousands(run.done),
                thousands(run.failed),
                thousands(run.retried),
                human_bytes(run.bytes)
            );
            if let Some(resume) = &run.resume {
                let _ = writeln!(out, "  resume with: {resume}");
            }
        }
    }
    if s.running > 0
        && report
            .last_run
            .as_ref()
            .is_some_and(|r| r.state != "running")
    {
        let _ = writeln!(
            out,
            "Rows shown as running belong to a run that is gone; the next run takes them back."
        );
    }
    out
}
