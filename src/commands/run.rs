//! `jobrun run`: turns the options into a run plan, settles the output
//! folder, runs, and sums up.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::backoff::Backoff;
use crate::cli::{RunArgs, parse_headers};
use crate::commands::{Status, human_bytes, thousands};
use crate::fetch::FetchOptions;
use crate::hosts::Politeness;
use crate::output;
use crate::progress::Display;
use crate::runner::{self, RunPlan};
use crate::store::{Open, RunEnd, Store};

/// The settings key of the output folder.
pub const OUT_DIR_KEY: &str = "out_dir";

pub fn run(db: &Path, args: RunArgs, display: Display) -> Result<Status> {
    let headers = parse_headers(&args.headers).map_err(anyhow::Error::msg)?;
    if args.backoff_max < args.backoff_base {
        bail!("--backoff-max must not be shorter than --backoff-base");
    }
    let store = Store::open(db, Open::MustExist)?;
    let out_dir = settle_out_dir(&store, db, args.out.as_deref())?;
    let plan = RunPlan {
        out_dir: out_dir.clone(),
        workers: args.workers,
        fetch: FetchOptions {
            headers,
            timeout: args.timeout,
            workers: args.workers,
            limiter: args.rate.map(|rate| rate.limiter()),
            backoff: Backoff {
                base: args.backoff_base,
                max: args.backoff_max,
            },
            max_attempts: args.max_attempts,
            politeness: Politeness {
                per_host_workers: args.per_host_workers,
                per_host_rate: args.per_host_rate,
                adaptive: !args.no_adaptive,
                max_retry_after: args.max_retry_after,
            },
            user_agent: args.user_agent,
            max_bytes: args.max_bytes,
            insecure: args.insecure,
        },
        command: resume_command(db, std::env::args().skip(1)),
        display,
    };
    let totals = runner::execute(store, plan)?;

    let counts = Store::open(db, Open::MustExist)?.state_counts()?;
    let seconds = totals.elapsed.as_secs_f64();
    let finished = totals.done + totals.failed;
    tracing::info!(
        "run #{}: {} done, {} failed, {} retries, {} in {:.1} s ({:.0} URLs/s)",
        totals.run,
        thousands(totals.done),
        thousands(totals.failed),
        thousands(totals.retried),
        human_bytes(totals.bytes as i64),
        seconds,
        if seconds > 0.0 {
            finished as f64 / seconds
        } else {
            0.0
        },
    );
    tracing::info!(
        "{} of {} URLs done, {} failed, {} pending; files in {}",
        thousands(counts.done),
        thousands(counts.total),
        thousands(counts.failed),
        thousands(counts.pending + counts.running),
        out_dir.display()
    );
    Ok(match totals.end {
        Some(RunEnd::Interrupted) => {
            tracing::warn!("interrupted; run the same command again to resume");
            Status::Interrupted
        }
        Some(RunEnd::Error(message)) => {
            tracing::error!("{message}");
            tracing::info!("URLs not finished went back to pending; fix the cause and run again");
            Status::Fatal
        }
        _ if counts.failed > 0 => Status::Partial,
        _ => Status::Success,
    })
}

/// The output folder: the one recorded in the database, else `--out`, else
/// `out` beside the database; recorded on first use.
fn settle_out_dir(store: &Store, db: &Path, requested: Option<&Path>) -> Result<PathBuf> {
    let requested = requested.map(absolute).transpose()?;
    if let Some(recorded) = store.setting(OUT_DIR_KEY)? {
        let recorded = PathBuf::from(recorded);
        if let Some(requested) = requested
            && !same_place(&requested, &recorded)
        {
            bail!(
                "{} writes its files to {} (recorded on its first run), not {}. \
                 Run without --out, or use another database for another folder",
                db.display(),
                recorded.display(),
                requested.display()
            );
        }
        return Ok(recorded);
    }
    let chosen = match requested {
        Some(dir) => dir,
        None => default_out_dir(db)?,
    };
    // A folder that cannot be one (a file, say) must not be recorded: the
    // user could then never choose another.
    output::ensure_folder(&chosen)?;
    let text = chosen
        .to_str()
        .with_context(|| format!("the output folder {} is not valid UTF-8", chosen.display()))?;
    Ok(PathBuf::from(store.setting_or_insert(OUT_DIR_KEY, text)?))
}

/// The output folder as recorded, or where the first run will put it.
pub fn out_dir_of(store: &Store, db: &Path) -> Result<PathBuf> {
    match store.setting(OUT_DIR_KEY)? {
        Some(dir) => Ok(PathBuf::from(dir)),
        None => default_out_dir(db),
    }
}

fn default_out_dir(db: &Path) -> Result<PathBuf> {
    absolute(&db.parent().unwrap_or(Path::new(".")).join("out"))
}

pub fn absolute(path: &Path) -> Result<PathBuf> {
    let path = if path.as_os_str().is_empty() {
        Path::new(".")
    } else {
        path
    };
    let absolute = std::path::absolute(path)
        .with_context(|| format!("cannot resolve the path {}", path.display()))?;
    Ok(absolute.canonicalize().unwrap_or(absolute))
}

fn same_place(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// The command that resumes this run: the same options with `--db` made
/// explicit, and header values replaced, since they are often secrets.
fn resume_command(db: &Path, args: impl Iterator<Item = String>) -> String {
    let mut words = vec![
        "jobrun".to_string(),
        "--db".into(),
        shell_quote(&db.display().to_string()),
    ];
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        if arg == "--db" {
            args.next();
        } else if arg.starts_with("--db=") {
        } else if arg == "--header" {
            words.push(arg);
            if let Some(header) = args.next() {
                words.push(shell_quote(&mask_header(&header)));
            }
        } else if let Some(header) = arg.strip_prefix("--header=") {
            words.push(shell_quote(&format!("--header={}", mask_header(header))));
        } else {
            words.push(shell_quote(&arg));
        }
    }
    words.join(" ")
}

fn mask_header(header: &str) -> String {
    match header.split_once(':') {
        Some((name, _)) => format!("{}: …", name.trim()),
        None => "…".into(),
    }
}

fn shell_quote(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./:=,@%+".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(args: &[&str]) -> String {
        resume_command(Path::new("my jobs.db"), args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn the_resume_command_names_the_database_and_hides_header_values() {
        assert_eq!(
            words(&["--db", "x.db", "run", "--workers", "8"]),
            "jobrun --db 'my jobs.db' run --workers 8"
        );
        let command = words(&[
            "run",
            "--header",
            "Authorization: Bearer s3cret",
            "--header=X-K:v2",
        ]);
        assert!(
            !command.contains("s3cret") && !command.contains("v2"),
            "{command}"
        );
        assert!(command.contains("'Authorization: …'"), "{command}");
    }
}
