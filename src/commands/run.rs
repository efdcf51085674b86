//! `jobrun run`: turns the options into a run plan, settles the output
//! folder, runs, and sums up.

use std::path::Path;

use anyhow::{Result, bail};

use crate::backoff::Backoff;
use crate::cli::{RunArgs, parse_headers};
use crate::commands::Status;
use crate::domain::{RunEnd, Work, message_of};
use crate::fetch::FetchOptions;
use crate::format::{human_bytes, thousands};
use crate::hosts::Politeness;
use crate::metrics;
use crate::out_dir;
use crate::progress::Display;
use crate::proxy::Proxies;
use crate::runner::{self, RunPlan, StopSignal};
use crate::store::{DEFAULT_LEASE, Database, Location, Open, Store, answer_limit};
use crate::tls::ClientTls;

/// The settings key of the lease runs hold on a PostgreSQL queue, when
/// `--lease` does not say.
pub const LEASE_KEY: &str = "lease";

pub fn run(db: &Database, args: RunArgs, display: Display, stop: StopSignal) -> Result<Status> {
    let (store, plan) = prepare(db, args, display, Work::Fetch)?;
    let out_dir = plan.out_dir.clone();
    let totals = runner::execute(store, plan, stop)?;

    let counts = db.open(Open::MustExist)?.state_counts()?;
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
        Some(RunEnd::Error(error)) => {
            tracing::error!("{}", message_of(&error));
            tracing::info!("URLs not finished went back to pending; fix the cause and run again");
            Status::of_run_error(&error)
        }
        _ if counts.failed > 0 => Status::Partial,
        _ => Status::Success,
    })
}

/// Checks `run`'s options and opens the database and the output folder for
/// a run that does `work`; `refresh` takes the same options.
pub fn prepare(
    db: &Database,
    args: RunArgs,
    display: Display,
    work: Work,
) -> Result<(Box<dyn Store>, RunPlan)> {
    let headers = parse_headers(&args.headers).map_err(anyhow::Error::msg)?;
    if args.backoff_max < args.backoff_base {
        bail!("--backoff-max must not be shorter than --backoff-base");
    }
    let tls = ClientTls::load(
        args.cacert.as_deref(),
        args.cert.as_deref(),
        args.key.as_deref(),
    )?;
    let proxies = Proxies::from_options(args.proxy.as_deref(), args.noproxy.as_deref())?;
    let metrics = match args.metrics.as_deref().map(metrics::bind).transpose()? {
        Some((listener, at)) => {
            tracing::info!("metrics at http://{at}/metrics");
            Some(listener)
        }
        None => None,
    };
    let mut store = db.open_for_runs(Open::MustExist, args.lease)?;
    let out_dir = out_dir::settle(&mut *store, db, args.out.as_deref())?;
    let lease = match args.lease {
        Some(lease) => Some(lease),
        None => store
            .setting(LEASE_KEY)?
            .and_then(|text| humantime::parse_duration(&text).ok()),
    };
    let plan = RunPlan {
        out_dir: out_dir.clone(),
        db: db.path.clone(),
        workers: args.workers,
        work,
        lease,
        answer_within: match db.location {
            Location::Postgres(_) => Some(answer_limit(
                db.answer_within,
                lease.unwrap_or(DEFAULT_LEASE),
            )),
            Location::Sqlite(_) => None,
        },
        fetch: FetchOptions {
            headers,
            timeout: args.timeout,
            workers: args.workers,
            rate: args.rate,
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
            connect_timeout: args.connect_timeout,
            max_redirects: args.max_redirects.into(),
            retry_on: args.retry_on,
            tls,
            proxies,
        },
        command: resume_command(Path::new(&db.shown()), std::env::args().skip(1)),
        display,
        metrics,
        // `run` and `refresh` are the last thing the process does.
        process_ends_after: true,
    };
    Ok((store, plan))
}

/// The command that resumes this run: the same options with `--db` made
/// explicit, and header values and proxy passwords replaced, since they are
/// secrets.
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
        } else if let Some(secret) = secret_option(&arg) {
            let (prefix, mask) = (secret.prefix, secret.mask);
            match secret.attached {
                Some(value) => words.push(shell_quote(&format!("{prefix}{}", mask(value)))),
                None => {
                    words.push(shell_quote(prefix));
                    if let Some(value) = args.next() {
                        words.push(shell_quote(&mask(&value)));
                    }
                }
            }
        } else {
            words.push(shell_quote(&arg));
        }
    }
    words.join(" ")
}

/// An option whose value holds a secret, as typed.
struct SecretOption<'a> {
    /// The option, up to its value: `--header`, `--header=`, `-kH`.
    prefix: &'a str,
    /// Hides the secret part of the value.
    mask: fn(&str) -> String,
    /// The value, when it is in the same word (`--header=…`, `-H…`).
    attached: Option<&'a str>,
}

/// Whether `arg` is an option whose value holds a secret: `--header`,
/// `--proxy`, or `-H` and `-x`, also bundled with other short options as
/// clap allows (`-kH…`).
fn secret_option(arg: &str) -> Option<SecretOption<'_>> {
    let mask_of = |name: &str| match name {
        "--header" | "H" => Some(mask_header as fn(&str) -> String),
        "--proxy" | "x" => Some(crate::proxy::redact as fn(&str) -> String),
        _ => None,
    };
    if arg.starts_with("--") {
        let (name, attached) = match arg.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (arg, None),
        };
        let prefix = &arg[..arg.len() - attached.map_or(0, str::len)];
        return mask_of(name).map(|mask| SecretOption {
            prefix,
            mask,
            attached,
        });
    }
    let shorts = arg.strip_prefix('-')?;
    for (at, short) in shorts.char_indices() {
        let end = 1 + at + short.len_utf8();
        if let Some(mask) = mask_of(&short.to_string()) {
            let rest = &arg[end..];
            return Some(SecretOption {
                prefix: &arg[..end],
                mask,
                attached: (!rest.is_empty()).then_some(rest),
            });
        }
        // The rest of the word is the value of -j or -A, not an option.
        if matches!(short, 'j' | 'A') {
            return None;
        }
    }
    None
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

    #[test]
    fn the_resume_command_hides_secrets_given_with_short_options_and_proxies() {
        let command = words(&[
            "run",
            "-H",
            "X-Key: s3cret1",
            "-kHX-Other:s3cret2",
            "-j4",
            "-x",
            "http://u:s3cret3@proxy:3128",
            "--proxy=socks5h://u:s3cret4@proxy:1080",
            "-kxu:s3cret5@proxy:3128",
        ]);
        assert!(!command.contains("s3cret"), "{command}");
        assert!(command.contains("'X-Key: …'"), "{command}");
        assert!(command.contains("-j4"), "{command}");
        assert!(command.contains("http://…@proxy:3128"), "{command}");
        assert!(
            command.contains("--proxy=socks5h://…@proxy:1080"),
            "{command}"
        );
        assert_eq!(
            words(&["run", "-A", "-H"]),
            "jobrun --db 'my jobs.db' run -A -H"
        );
    }
}
