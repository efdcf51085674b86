//! The command line as the user types it: clap definitions and the parsers
//! that turn single option values into checked types. Nothing here touches
//! the database or the network; `commands` turns these into work.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use crate::log::LogFormat;
use crate::rate::Rate;
use crate::request::unsendable_header;
use crate::retryable::RetryStatuses;

/// The most workers (`--workers`, `--per-host-workers`): each holds a
/// connection and a file, and no machine serves more at once.
pub const MAX_WORKERS: u64 = 100_000;
/// The most attempts per URL: at the default `--backoff-max`, years of
/// retrying.
pub const MAX_ATTEMPTS: u64 = 1_000_000;
/// The longest duration any option takes: a request, a retry delay or a
/// lock wait longer than a day is a typo.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
/// The largest `--max-bytes`: sizes are stored as signed 64-bit numbers.
pub const MAX_SIZE: u64 = i64::MAX as u64;

/// Fetch long lists of HTTP URLs into files, crash-safe and resumable.
///
/// The list lives in a SQLite state database: `import` loads it, `run` fetches
/// every URL into its own file (kill it at any time and run it again), and
/// `report` says where the job stands.
#[derive(Debug, Parser)]
#[command(name = "jobrun", version, propagate_version = true)]
pub struct Cli {
    /// The state database.
    #[arg(long, global = true, env = "JOBRUN_DB", default_value = "jobrun.db", value_parser = db_path())]
    pub db: PathBuf,

    /// More detail: -v logs every retry and failure, -vv every request.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,

    /// Only warnings and errors: no progress display, no summaries.
    #[arg(short, long, global = true)]
    pub quiet: bool,

    /// How messages are written to standard error.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// How long to wait for another process's write lock on the database
    /// before giving up: `500ms`, `30s`, `2m`.
    #[arg(
        long,
        global = true,
        env = "JOBRUN_LOCK_WAIT",
        default_value = "30s",
        value_parser = parse_duration
    )]
    pub lock_wait: Duration,

    /// With a PostgreSQL --db: how long one wait for the server may last
    /// (connecting, or one answer) before the command gives up with exit
    /// status 2, for a server or network that hangs [default: the lease +
    /// 10s, 40s unless the job's lease is set].
    #[arg(long, global = true, env = "JOBRUN_DB_TIMEOUT", value_parser = parse_duration)]
    pub db_timeout: Option<Duration>,

    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size of `run`'s options costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Add URLs to the database, one per line (`-` reads standard input).
    Import(ImportArgs),
    /// Fetch every due URL into its file, with retries, until none is left.
    Run(RunArgs),
    /// Fetch done URLs again, asking the server for changed bodies only
    /// (If-None-Match, If-Modified-Since); unchanged files stay untouched.
    Refresh(RefreshArgs),
    /// Say where the job stands: states, HTTP statuses, errors, the last run.
    Report(ReportArgs),
    /// Write one record per URL (state, file, status, size, sha256, error).
    Export(ExportArgs),
    /// Send failed URLs back to pending with a fresh retry budget.
    Retry(RetryArgs),
    /// Check every done file against its recorded size and sha256.
    Verify(VerifyArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(CompletionsArgs),
    /// Print the manual page (roff), e.g. `jobrun man > jobrun.1`, or write
    /// one page per command with `--dir`.
    Man(ManArgs),
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Print the page of this command (`jobrun man run`) instead of the main one.
    #[arg(value_name = "COMMAND", conflicts_with = "dir")]
    pub command: Option<String>,

    /// Write jobrun.1 and a jobrun-COMMAND.1 for every command into DIR.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RetryArgs {
    /// Only URLs whose last HTTP status was CODE.
    #[arg(long, value_name = "CODE", value_parser = parse_status)]
    pub status: Option<u16>,

    /// Only URLs whose last error contains TEXT.
    #[arg(long, value_name = "TEXT")]
    pub error: Option<String>,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Send missing and damaged files' URLs back to pending to fetch again.
    #[arg(long)]
    pub requeue: bool,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// A file with one http or https URL per line, or `-` for standard input.
    /// Blank lines and lines starting with `#` are skipped.
    pub file: PathBuf,

    /// Extension of the output file names (`json`, `.html`, or `""` for none).
    /// Names given in JSON Lines are kept as they are.
    #[arg(long, default_value = "json", value_parser = parse_extension)]
    pub ext: String,

    /// How the list is written: one URL per line, or JSON Lines with
    /// `url`, `method`, `headers`, `body` and `name`. `auto` looks at the
    /// first entry.
    #[arg(long, value_enum, default_value = "auto")]
    pub format: ImportFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ImportFormat {
    Auto,
    Lines,
    Jsonl,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Folder for the output files [default: `out` beside the database].
    /// Recorded on the first run; later runs must use the same folder.
    #[arg(long, help_heading = "Output")]
    pub out: Option<PathBuf>,

    /// Requests in flight at once (at most 100,000).
    #[arg(short = 'j', long, default_value = "20", value_parser = parse_workers, help_heading = "Politeness")]
    pub workers: usize,

    /// Requests per second for the whole run: `50`, `50/s`, `600/m`, `1000/h`.
    /// From one a day to 1,000,000/s; unlimited when not given.
    #[arg(long, value_parser = Rate::parse, help_heading = "Politeness")]
    pub rate: Option<Rate>,

    /// Attempts per URL before it is marked failed (at most 1,000,000).
    #[arg(long, default_value = "5", value_parser = parse_max_attempts, help_heading = "Retries")]
    pub max_attempts: u32,

    /// Time limit for one request, body included: `500ms`, `30s`, `2m`
    /// (at most `24h`, like every duration).
    #[arg(long, default_value = "30s", value_parser = parse_duration, help_heading = "Requests")]
    pub timeout: Duration,

    /// Time limit for opening a connection, TLS handshake and proxy included;
    /// never longer than --timeout [default: 10s].
    #[arg(long, value_name = "DUR", value_parser = parse_duration, help_heading = "Requests")]
    pub connect_timeout: Option<Duration>,

    /// Redirects followed for one URL before it fails for good; 0 follows none.
    #[arg(long = "max-redirs", value_name = "N", default_value = "10",
          value_parser = clap::value_parser!(u16).range(0..=1000), help_heading = "Requests")]
    pub max_redirects: u16,

    /// A header sent with every request, `Name: value`; repeat for more.
    /// Values are never written to the database or to messages.
    #[arg(
        short = 'H',
        long = "header",
        value_name = "NAME: VALUE",
        help_heading = "Requests"
    )]
    pub headers: Vec<String>,

    /// First retry delay; each later attempt doubles it, with full jitter.
    #[arg(long, default_value = "1s", value_parser = parse_duration, help_heading = "Retries")]
    pub backoff_base: Duration,

    /// Longest retry delay.
    #[arg(long, default_value = "5m", value_parser = parse_duration, help_heading = "Retries")]
    pub backoff_max: Duration,

    /// The HTTP statuses that are retried, comma-separated. A list replaces
    /// the default; the word `default` stands for it, so `--retry-on
    /// default,404` adds 404. Other statuses outside 2xx fail at once.
    #[arg(long, value_name = "STATUS,...", default_value_t = RetryStatuses::default(),
          value_parser = RetryStatuses::parse, help_heading = "Retries")]
    pub retry_on: RetryStatuses,

    /// Requests per second to any one host (same syntax as --rate).
    #[arg(long, value_parser = Rate::parse, help_heading = "Politeness")]
    pub per_host_rate: Option<Rate>,

    /// Requests in flight to any one host.
    #[arg(long, value_parser = parse_workers, help_heading = "Politeness")]
    pub per_host_workers: Option<usize>,

    /// With a PostgreSQL --db: how long this run's heartbeat may be silent
    /// before runs on other machines take its URLs [default: the job's
    /// setting `lease`, else 30s].
    #[arg(long, value_parser = humantime::parse_duration, help_heading = "Runs")]
    pub lease: Option<std::time::Duration>,

    /// Turn off adaptive throttling (lowering a host's rate while that
    /// reduces its 429s and 503s, raising it again while answers are healthy).
    #[arg(long, help_heading = "Politeness")]
    pub no_adaptive: bool,

    /// The longest Retry-After honoured; a server asking for more is
    /// called again after this, and the URL's error says so.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub max_retry_after: Duration,

    /// The User-Agent header [default: jobrun/VERSION].
    #[arg(short = 'A', long, value_parser = parse_user_agent, help_heading = "Requests")]
    pub user_agent: Option<String>,

    /// How often a status line is written when standard error is not a
    /// terminal (on a terminal, a progress bar is shown instead).
    #[arg(long, default_value = "5s", value_parser = parse_duration, help_heading = "Output")]
    pub progress_every: Duration,

    /// Serve live metrics in the Prometheus text format at
    /// `http://ADDR/metrics` while the run goes on: `127.0.0.1:9464`, or
    /// `:PORT` for 127.0.0.1 (`:0`: any free port, logged at the start).
    #[arg(long, value_name = "ADDR", help_heading = "Output")]
    pub metrics: Option<String>,

    /// Largest body kept, after decoding: `10MB`, `512KiB`, `2GiB`, or bytes
    /// (at most 8 EiB).
    /// A larger one fails for good and leaves no file.
    #[arg(long, default_value = "1GiB", value_parser = parse_size, help_heading = "Output")]
    pub max_bytes: u64,

    /// Accept any TLS certificate (self-signed, expired, another host's).
    /// Anyone on the way can then read and change the responses.
    #[arg(short = 'k', long, help_heading = "TLS")]
    pub insecure: bool,

    /// CA certificates (PEM, one or more) trusted in addition to the
    /// system's, for servers with a private CA.
    #[arg(long, value_name = "FILE", help_heading = "TLS")]
    pub cacert: Option<PathBuf>,

    /// A client certificate (PEM, with its chain) for servers that ask for
    /// one; the file may hold the private key too.
    #[arg(long, value_name = "FILE", help_heading = "TLS")]
    pub cert: Option<PathBuf>,

    /// The private key of --cert (PEM, unencrypted), if not in its file.
    #[arg(long, value_name = "FILE", requires = "cert", help_heading = "TLS")]
    pub key: Option<PathBuf>,

    /// Send every request through this proxy: http://, https://, socks5://
    /// or socks5h:// (the proxy resolves host names) [default: from
    /// http_proxy, https_proxy, all_proxy].
    #[arg(short = 'x', long, value_name = "URL", help_heading = "Proxy")]
    pub proxy: Option<String>,

    /// Hosts and domains fetched without a proxy, comma-separated
    /// (`example.com` also covers its subdomains, `10.0.0.0/8` a network);
    /// `*` turns proxies off [default: from no_proxy].
    #[arg(long, value_name = "LIST", help_heading = "Proxy")]
    pub noproxy: Option<String>,
}

#[derive(Debug, Args)]
pub struct RefreshArgs {
    /// Refresh only the done URLs whose file was fetched (or confirmed
    /// unchanged) longer ago than this: `12h`, `7days`, `2weeks`
    /// [default: every done URL].
    #[arg(long, value_name = "DUR", value_parser = parse_age, help_heading = "Refresh")]
    pub older_than: Option<Duration>,

    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,

    /// List the failed URLs with their last error instead.
    #[arg(long)]
    pub failed: bool,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Output format.
    #[arg(long, value_enum, default_value = "jsonl")]
    pub format: ExportFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ExportFormat {
    Jsonl,
    Csv,
}

fn parse_workers(text: &str) -> Result<usize, String> {
    parse_count(text, MAX_WORKERS).map(|n| n as usize)
}

fn parse_max_attempts(text: &str) -> Result<u32, String> {
    parse_count(text, MAX_ATTEMPTS).map(|n| n as u32)
}

/// A whole number from 1 to `max`. A number too long for any integer type
/// is over the limit too, and is told so, not that it is not a number.
fn parse_count(text: &str, max: u64) -> Result<u64, String> {
    let trimmed = text.trim();
    let digits = trimmed.strip_prefix(['+', '-']).unwrap_or(trimmed);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{text:?} is not a whole number"));
    }
    let too_many = || {
        format!(
            "{trimmed} is more than {}, the most this option takes",
            crate::format::thousands(max)
        )
    };
    match trimmed.parse::<i128>() {
        Ok(n) if n < 1 => Err(format!("{trimmed} is too few: it must be at least 1")),
        Ok(n) if n > i128::from(max) => Err(too_many()),
        Ok(n) => Ok(n as u64),
        Err(_) if trimmed.starts_with('-') => {
            Err(format!("{trimmed} is too few: it must be at least 1"))
        }
        Err(_) => Err(too_many()),
    }
}

fn parse_status(text: &str) -> Result<u16, String> {
    match text.trim().parse::<u16>() {
        Ok(status) if (100..=999).contains(&status) => Ok(status),
        _ => Err(format!(
            "{text:?} is not an HTTP status (a number from 100 to 999)"
        )),
    }
}

/// A duration above zero and at most `MAX_DURATION`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let too_long = || format!("{text:?} is longer than 24h, the longest duration jobrun takes");
    let duration = humantime::parse_duration(text.trim()).map_err(|e| match e {
        humantime::DurationError::NumberOverflow => too_long(),
        e => format!("{text:?} is not a duration like 500ms, 30s or 2m ({e})"),
    })?;
    if duration.is_zero() {
        return Err("must be longer than zero".into());
    }
    if duration > MAX_DURATION {
        return Err(too_long());
    }
    Ok(duration)
}

/// An age such as `90m`, `7days` or `2weeks`, at most about a century.
fn parse_age(text: &str) -> Result<Duration, String> {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    let age = humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not an age like 12h, 7days or 2weeks ({e})"))?;
    if age > CENTURY {
        return Err(format!("{text:?} is longer than 100 years"));
    }
    Ok(age)
}

/// A size such as `1GiB`, `10MB`, `512KiB`, `1.5GB` or plain bytes. kB, MB,
/// GB and TB count in thousands, KiB, MiB, GiB and TiB in 1024s.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let invalid = || format!("{text:?} is not a size like 10MB, 512KiB, 2GiB or 1000000");
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let number: f64 = number.parse().map_err(|_| invalid())?;
    let unit: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "mb" => 1000_u64.pow(2),
        "gb" => 1000_u64.pow(3),
        "tb" => 1000_u64.pow(4),
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return Err(invalid()),
    };
    let bytes = (number * unit as f64).round();
    // i64::MAX is not exact as an f64: it rounds up to 2^63, one past it.
    if bytes >= MAX_SIZE as f64 {
        return Err(format!(
            "{text:?} is more than 8 EiB ({} bytes), the largest size jobrun takes",
            crate::format::thousands(MAX_SIZE)
        ));
    }
    match bytes as u64 {
        0 => Err("must be at least 1 byte".into()),
        bytes => Ok(bytes),
    }
}

/// Parses the `--header` values. They are taken as plain strings by clap and
/// checked here, because clap quotes a rejected value in its message and a
/// header value is often a secret: these messages name the header only.
pub fn parse_headers(raw: &[String]) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::new();
    for (index, text) in raw.iter().enumerate() {
        let position = index + 1;
        let Some((name, value)) = text.split_once(':') else {
            return Err(format!(
                "--header #{position} is not of the form `Name: value` (its text is not shown, \
                 as it may hold a secret)"
            ));
        };
        let name = name.trim();
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("--header #{position}: {name:?} is not a valid header name"))?;
        if let Some(why) = unsendable_header(name) {
            return Err(format!(
                "--header #{position}: {name:?} cannot be given: {why}"
            ));
        }
        let mut value = HeaderValue::from_str(value.trim()).map_err(|_| {
            format!(
                "--header #{position}: the value of {name:?} has characters a header cannot carry"
            )
        })?;
        value.set_sensitive(true);
        headers.append(header, value);
    }
    Ok(headers)
}

/// A User-Agent that can be sent: checked here, so that a line break in it
/// is told as such before the run starts.
fn parse_user_agent(text: &str) -> Result<String, String> {
    HeaderValue::from_str(text)
        .map(|_| text.to_string())
        .map_err(|_| {
            "has characters a header cannot carry (a line break or another control character)"
                .into()
        })
}

/// The state database is a file (or a PostgreSQL URL), named by any path
/// the system allows: `-` would make a file of that name where a pipe was
/// meant.
fn db_path() -> impl clap::builder::TypedValueParser<Value = PathBuf> {
    use clap::builder::TypedValueParser;
    clap::builder::PathBufValueParser::new().try_map(|path: PathBuf| {
        if path.as_os_str() == "-" {
            return Err(
                "jobrun keeps its state in a database file, not on standard input or \
                        output: give a path (./- for a file named -)",
            );
        }
        Ok(path)
    })
}

fn parse_extension(text: &str) -> Result<String, String> {
    let ext = text.trim().trim_start_matches('.');
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if ext.len() > 16 || !ext.chars().all(allowed) || ext.ends_with('.') {
        return Err(format!(
            "{text:?} is not a file extension (up to 16 letters, digits, `_`, `-` or `.`)"
        ));
    }
    Ok(ext.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("jobrun").chain(args.iter().copied()))
    }

    #[test]
    fn db_is_accepted_before_and_after_the_subcommand() {
        let before = parse(&["--db", "a.db", "report"]).unwrap();
        let after = parse(&["report", "--db", "b.db"]).unwrap();
        assert_eq!(before.db, PathBuf::from("a.db"));
        assert_eq!(after.db, PathBuf::from("b.db"));
    }

    #[test]
    fn run_options_parse_into_checked_values() {
        let cli = parse(&[
            "run",
            "--workers",
            "7",
            "--rate",
            "600/m",
            "--timeout",
            "500ms",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.workers, 7);
        assert_eq!(run.rate, Some(Rate::parse("10/s").unwrap()));
        assert_eq!(run.timeout, Duration::from_millis(500));
    }

    #[test]
    fn bad_values_are_rejected_with_a_reason() {
        for (args, reason) in [
            (&["run", "--workers", "0"][..], "at least 1"),
            (&["run", "--workers", "many"][..], "not a whole number"),
            (&["run", "--timeout", "soon"][..], "not a duration"),
            (&["run", "--timeout", "0s"][..], "longer than zero"),
            (&["run", "--rate", "fast"][..], "not a rate"),
            (&["run", "--max-attempts", "0"][..], "at least 1"),
            (&["run", "--max-bytes", "lots"][..], "not a size"),
            (&["run", "--max-bytes", "10XB"][..], "not a size"),
            (&["run", "--max-bytes", "0"][..], "at least 1 byte"),
            (&["--lock-wait", "never", "report"][..], "not a duration"),
            (&["import", "x", "--ext", "a/b"][..], "not a file extension"),
            (&["retry", "--status", "99999"][..], "from 100 to 999"),
            (&["retry", "--status", "42"][..], "from 100 to 999"),
            (
                &["run", "--user-agent", "a\nb"][..],
                "a header cannot carry",
            ),
        ] {
            let err = parse(args).unwrap_err().to_string();
            assert!(err.contains(reason), "{args:?}: {err}");
        }
    }

    #[test]
    fn numbers_out_of_range_are_told_the_real_limit() {
        for (option, value, reason) in [
            ("--workers", "100001", "more than 100,000, the most"),
            (
                "--workers",
                "99999999999999999999999999999",
                "more than 100,000",
            ),
            ("--workers", "-3", "at least 1"),
            ("--per-host-workers", "1e3", "not a whole number"),
            ("--per-host-workers", "200000", "more than 100,000"),
            (
                "--max-attempts",
                "4294967296",
                "more than 1,000,000, the most",
            ),
            ("--max-attempts", "1000001", "more than 1,000,000"),
            ("--timeout", "1000000y", "longer than 24h, the longest"),
            ("--timeout", "99999999999999999999999s", "longer than 24h"),
            ("--backoff-base", "25h", "longer than 24h"),
            ("--backoff-max", "2days", "longer than 24h"),
            ("--progress-every", "1000000y", "longer than 24h"),
            ("--max-bytes", "99999999999TB", "more than 8 EiB"),
            ("--max-bytes", "8EiB", "not a size"),
            ("--max-bytes", "9300000TB", "more than 8 EiB"),
        ] {
            let arg = format!("{option}={value}");
            let err = parse(&["run", &arg]).unwrap_err().to_string();
            assert!(err.contains(reason), "{option} {value}: {err}");
        }
        let err = parse(&["--lock-wait", "1000000y", "report"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("longer than 24h"), "{err}");
        let run = |args: &[&str]| match parse(args).unwrap().command {
            Command::Run(run) => run,
            _ => panic!("not run"),
        };
        assert_eq!(run(&["run", "--workers", "100000"]).workers, 100_000);
        assert_eq!(
            run(&["run", "--max-attempts", "1000000"]).max_attempts,
            1_000_000
        );
        assert_eq!(run(&["run", "--timeout", "24h"]).timeout, MAX_DURATION);
        assert_eq!(
            run(&["run", "--max-bytes", "8000000TB"]).max_bytes,
            8_000_000 * 1000_u64.pow(4)
        );
    }

    #[test]
    fn sizes_take_decimal_and_binary_units() {
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("10MB"), Ok(10_000_000));
        assert_eq!(parse_size("512KiB"), Ok(512 * 1024));
        assert_eq!(parse_size(" 1.5 gb "), Ok(1_500_000_000));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2TiB"), Ok(2 << 40));
        assert!(parse_size("1e3").is_err());
        assert!(parse_size("-1MB").is_err());
        assert!(parse_size("99999999999TB").is_err());
        let run = |args: &[&str]| match parse(args).unwrap().command {
            Command::Run(run) => run,
            _ => panic!("not run"),
        };
        assert_eq!(run(&["run"]).max_bytes, 1 << 30, "the default is 1 GiB");
        assert!(!run(&["run"]).insecure);
        assert_eq!(run(&["run", "--max-bytes", "10MB"]).max_bytes, 10_000_000);
    }

    #[test]
    fn headers_parse_and_are_marked_sensitive() {
        let headers = parse_headers(&["Authorization: Bearer x".into(), "X-A:b".into()]).unwrap();
        assert_eq!(headers["authorization"], "Bearer x");
        assert!(headers["authorization"].is_sensitive());
        assert_eq!(headers["x-a"], "b");
    }

    #[test]
    fn header_values_stay_out_of_error_messages() {
        for bad in [
            "NoColon s3cret",
            "X Bad: s3cret",
            "X-Key: s3cret\u{1}",
            "Content-Length: s3cret",
        ] {
            let err = parse_headers(&["A: b".into(), bad.into()]).unwrap_err();
            assert!(err.contains("--header #2"), "{err}");
            assert!(!err.contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn short_flags_and_the_new_run_options_parse() {
        let cli = parse(&[
            "run",
            "-v",
            "-j",
            "4",
            "-H",
            "A: b",
            "-k",
            "-x",
            "socks5h://p:1080",
            "-A",
            "ua/1",
            "--connect-timeout",
            "2s",
            "--max-redirs",
            "0",
            "--retry-on",
            "default,404",
            "--cacert",
            "ca.pem",
            "--cert",
            "c.pem",
            "--key",
            "k.pem",
            "--noproxy",
            "*",
        ])
        .unwrap();
        assert_eq!(cli.verbose, 1, "-v stays the global --verbose");
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(
            (run.workers, run.headers.as_slice()),
            (4, &["A: b".to_string()][..])
        );
        assert!(run.insecure);
        assert_eq!(run.proxy.as_deref(), Some("socks5h://p:1080"));
        assert_eq!(run.user_agent.as_deref(), Some("ua/1"));
        assert_eq!(run.connect_timeout, Some(Duration::from_secs(2)));
        assert_eq!(run.max_redirects, 0);
        assert!(run.retry_on.contains(404) && run.retry_on.contains(503));
        assert_eq!(run.key, Some(PathBuf::from("k.pem")));

        let Command::Run(run) = parse(&["run"]).unwrap().command else {
            panic!("not run")
        };
        assert_eq!(run.max_redirects, 10);
        assert_eq!(run.retry_on, RetryStatuses::default());
        assert_eq!(run.connect_timeout, None);
        assert!(parse(&["run", "-q", "-j", "2"]).unwrap().quiet);
    }

    #[test]
    fn new_options_refuse_what_they_cannot_use() {
        for (args, reason) in [
            (&["run", "--key", "k.pem"][..], "--cert"),
            (&["run", "--max-redirs", "many"][..], "--max-redirs"),
            (&["run", "--retry-on", "200"][..], "only 4xx and 5xx"),
            (&["run", "--connect-timeout", "0s"][..], "longer than zero"),
            (&["man", "run", "--dir", "d"][..], "cannot be used with"),
        ] {
            let err = parse(args).unwrap_err().to_string();
            assert!(err.contains(reason), "{args:?}: {err}");
        }
    }

    #[test]
    fn refresh_takes_run_options_and_an_age_of_days() {
        let Command::Refresh(refresh) = parse(&["refresh", "--older-than", "7days", "-j", "4"])
            .unwrap()
            .command
        else {
            panic!("not refresh");
        };
        assert_eq!(refresh.older_than, Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(refresh.run.workers, 4);
        let error = parse(&["refresh", "--older-than", "soon"]).unwrap_err();
        assert!(error.to_string().contains("not an age"), "{error}");
        let error = parse(&["refresh", "--older-than", "200years"]).unwrap_err();
        assert!(
            error.to_string().contains("longer than 100 years"),
            "{error}"
        );
    }

    #[test]
    fn extensions_are_normalised() {
        assert_eq!(parse_extension(".json").unwrap(), "json");
        assert_eq!(parse_extension("").unwrap(), "");
        assert_eq!(parse_extension("tar.gz").unwrap(), "tar.gz");
    }
}
