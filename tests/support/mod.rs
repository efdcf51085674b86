//! Shared test helpers: a job folder with its database, the real jobrun
//! binary run inside it, checks of the output folder against what the
//! server sent, and the hostile surroundings some tests need (a small
//! filesystem that fills up, a read-only one).
#![allow(dead_code)]

pub mod h2;
pub mod pki;
pub mod proxy;
pub mod server;

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

#[allow(unused_imports)]
pub use server::{Reply, Request, Server, huge_byte, item_body, item_of};

/// jobrun's temp area inside the output folder.
pub const TEMP_DIR: &str = ".jobrun-tmp";

/// Where a job's queue is: the SQLite file `jobrun.db` in its folder, or a
/// schema of its own on the test PostgreSQL server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The test PostgreSQL server: `JOBRUN_TEST_PG`, by default the local one.
/// A server that cannot be reached fails the tests that need it; they
/// never skip.
pub fn pg_server_url() -> String {
    std::env::var("JOBRUN_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// A schema of its own on the test PostgreSQL server, dropped with it.
pub struct PgSchema {
    /// The queue's URL: the server's, with the schema as its search path.
    pub url: String,
    pub name: String,
}

impl PgSchema {
    pub fn create() -> PgSchema {
        let base = pg_server_url();
        let name = format!("jobrun_it_{}_{:x}", std::process::id(), fastrand::u64(..));
        let mut admin = postgres::Client::connect(&base, postgres::NoTls)
            .expect("the test PostgreSQL server (JOBRUN_TEST_PG) must be reachable");
        admin
            .batch_execute(&format!("CREATE SCHEMA {name}"))
            .expect("create a test schema");
        let separator = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{separator}options=-c%20search_path%3D{name}");
        PgSchema { url, name }
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        if let Ok(mut admin) = postgres::Client::connect(&pg_server_url(), postgres::NoTls) {
            let _ = admin.batch_execute(&format!("DROP SCHEMA {} CASCADE", self.name));
        }
    }
}

/// Defines the test `NAME` twice, its body run once on each backend: `NAME`
/// on SQLite and `NAME::on_postgres` on PostgreSQL. The body names the
/// backend it is given (`$backend`) to make its jobs with `Job::on`.
#[allow(unused_macros)]
macro_rules! on_both_backends {
    ($(#[$meta:meta])* fn $name:ident($backend:ident) $body:block) => {
        $(#[$meta])*
        #[test]
        fn $name() {
            let $backend = $crate::support::Backend::Sqlite;
            $body
        }

        mod $name {
            #[allow(unused_imports)]
            use super::*;

            $(#[$meta])*
            #[test]
            fn on_postgres() {
                let $backend = $crate::support::Backend::Postgres;
                $body
            }
        }
    };
}
#[allow(unused_imports)]
pub(crate) use on_both_backends;

/// A fresh folder holding one job: `jobrun.db` (or a PostgreSQL schema) and
/// the `out` folder.
pub struct Job {
    dir: tempfile::TempDir,
    postgres: Option<PgSchema>,
}

impl Job {
    pub fn new() -> Job {
        Job::on(Backend::Sqlite)
    }

    /// A fresh job whose queue is on `backend`.
    pub fn on(backend: Backend) -> Job {
        Job {
            dir: tempfile::tempdir().expect("temp dir"),
            postgres: (backend == Backend::Postgres).then(PgSchema::create),
        }
    }

    pub fn backend(&self) -> Backend {
        match self.postgres {
            Some(_) => Backend::Postgres,
            None => Backend::Sqlite,
        }
    }

    /// The PostgreSQL schema of a job on PostgreSQL.
    pub fn postgres(&self) -> Option<&PgSchema> {
        self.postgres.as_ref()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn db(&self) -> PathBuf {
        self.dir().join("jobrun.db")
    }

    pub fn out(&self) -> PathBuf {
        self.dir().join("out")
    }

    /// The jobrun binary, run in the job folder against its database, with
    /// no proxy settings from the environment.
    pub fn command(&self) -> Command {
        match &self.postgres {
            Some(schema) => self.command_on(&schema.url),
            None => self.command_on(self.db()),
        }
    }

    /// The jobrun binary, run in the job folder against the database `db`
    /// (a file or a postgres:// URL), with no proxy settings from the
    /// environment.
    pub fn command_on(&self, db: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_jobrun"));
        command.current_dir(self.dir()).arg("--db").arg(db);
        for var in [
            "http_proxy",
            "https_proxy",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "all_proxy",
            "JOBRUN_DB",
        ] {
            command.env_remove(var);
        }
        command
    }

    pub fn jobrun(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("run jobrun")
    }

    /// Starts `jobrun run ARGS` and returns once `server` has seen `hits`
    /// requests (30 s at most).
    pub fn spawn_run_until_hits(&self, args: &[&str], server: &Server, hits: usize) -> Child {
        let child = self.spawn_run(args);
        server.wait_for_hits(hits, &format!("{hits} requests"));
        child
    }

    /// Records run #1 on another machine, its heartbeat fresh, holding
    /// the first five URLs; starts `jobrun run` and returns once it says it
    /// waits for that run: the run, its stderr lines, and those seen so far.
    pub fn run_waiting_for_a_run_elsewhere(
        &self,
    ) -> (Child, std::sync::mpsc::Receiver<String>, Vec<String>) {
        self.sql()
            .execute_batch(&format!(
                "INSERT INTO runs (id, pid, host, boot_id, proc_start, command, started_at,
                                   heartbeat_at)
                 VALUES (1, 1, 'elsewhere', 'another-boot', 1, 'jobrun run', {now}, {now});
                 UPDATE urls SET state = 'running', run_id = 1 WHERE id <= 5;",
                now = jobrun::clock::now_ms()
            ))
            .unwrap();
        let mut run = self.spawn_run(&["--progress-every", "100ms"]);
        let lines = stderr_lines(&mut run);
        let mut seen = Vec::new();
        wait_for(Duration::from_secs(30), "the run to wait", || {
            seen.extend(lines.try_iter());
            seen.iter()
                .any(|line| line.contains("waiting for run #1 (pid 1, 5 URLs) to finish"))
        });
        (run, lines, seen)
    }

    /// Starts `jobrun run ARGS` without waiting for it.
    pub fn spawn_run(&self, args: &[&str]) -> Child {
        spawn_run_with(self.command(), args)
    }

    /// Starts `jobrun run ARGS` on the database `db` (a file or a
    /// postgres:// URL) without waiting for it.
    pub fn spawn_run_on(&self, db: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Child {
        spawn_run_with(self.command_on(db), args)
    }

    /// A fresh job whose database is a copy of `tests/fixtures/NAME`.
    pub fn with_fixture(name: &str) -> Job {
        let job = Job::new();
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        std::fs::copy(&fixture, job.db()).expect("copy the fixture database");
        job
    }

    /// A fresh job with `urls` imported.
    pub fn with_urls(urls: &[String]) -> Job {
        Job::with_urls_on(Backend::Sqlite, urls)
    }

    /// A fresh job on `backend` with `urls` imported.
    pub fn with_urls_on(backend: Backend, urls: &[String]) -> Job {
        let job = Job::on(backend);
        job.import(urls);
        job
    }

    /// A fresh job with `count` item URLs on `server` imported, and those URLs.
    pub fn with_items(server: &Server, count: u64) -> (Job, Vec<String>) {
        Job::with_items_on(Backend::Sqlite, server, count)
    }

    /// A fresh job on `backend` with `count` item URLs on `server` imported,
    /// and those URLs.
    pub fn with_items_on(backend: Backend, server: &Server, count: u64) -> (Job, Vec<String>) {
        let urls = item_urls(server, count);
        (Job::with_urls_on(backend, &urls), urls)
    }

    /// Writes `bytes` to the file `name` in the job folder.
    pub fn write(&self, name: &str, bytes: impl AsRef<[u8]>) {
        std::fs::write(self.dir().join(name), bytes).expect("write a file in the job folder");
    }

    /// Writes `lines` to urls.txt and imports it.
    pub fn import(&self, lines: &[String]) -> Output {
        self.write("urls.txt", lines.join("\n") + "\n");
        let output = self.jobrun(&["import", "urls.txt"]);
        assert_success(&output, "import");
        output
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.subcommand("run", args)
    }

    /// `jobrun run ARGS` with the `JOBRUN_CRASH_AT=AT` test hook, which must
    /// kill the run there.
    pub fn run_crashing_at(&self, at: &str, args: &[&str]) -> Output {
        use std::os::unix::process::ExitStatusExt;
        let output = self
            .command()
            .arg("run")
            .args(args)
            .env("JOBRUN_CRASH_AT", at)
            .output()
            .expect("run jobrun");
        assert_eq!(
            output.status.signal(),
            Some(libc::SIGKILL),
            "{at}: the run was not crashed\n{}",
            stderr(&output)
        );
        output
    }

    /// `jobrun run ARGS`, which must exit 0.
    pub fn run_ok(&self, args: &[&str]) -> Output {
        let output = self.run(args);
        assert_success(&output, &format!("run {}", args.join(" ")));
        output
    }

    /// `jobrun COMMAND ARGS`.
    pub fn subcommand(&self, command: &str, args: &[&str]) -> Output {
        self.command()
            .arg(command)
            .args(args)
            .output()
            .expect("run jobrun")
    }

    /// `jobrun report`, as text.
    pub fn report_text(&self) -> String {
        stdout(&self.jobrun(&["report"]))
    }

    pub fn report_json(&self) -> Value {
        let output = self.jobrun(&["report", "--json"]);
        assert_success(&output, "report --json");
        serde_json::from_slice(&output.stdout).expect("report --json is JSON")
    }

    /// `export` as JSON values, keyed by URL.
    pub fn export(&self) -> HashMap<String, Value> {
        let output = self.jobrun(&["export"]);
        assert_success(&output, "export");
        String::from_utf8(output.stdout)
            .expect("export is UTF-8")
            .lines()
            .map(|line| {
                let row: Value = serde_json::from_str(line).expect("export line is JSON");
                (row["url"].as_str().expect("url").to_string(), row)
            })
            .collect()
    }

    /// Files in jobrun's temp area of the output folder.
    pub fn temp_files(&self) -> Vec<PathBuf> {
        let temp = self.out().join(TEMP_DIR);
        self.files()
            .into_iter()
            .filter(|f| f.starts_with(&temp))
            .collect()
    }

    /// How many bodies process `pid` holds in unnamed temp files
    /// (`O_TMPFILE`): files it has open in the temp area that have no name
    /// and have bytes in them.
    pub fn unnamed_temp_bodies(&self, pid: u32) -> usize {
        let temp = self
            .out()
            .canonicalize()
            .unwrap_or_else(|_| self.out())
            .join(TEMP_DIR);
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            return 0;
        };
        fds.flatten()
            .filter(|fd| {
                std::fs::read_link(fd.path()).is_ok_and(|target| {
                    target.starts_with(&temp)
                        && target.to_string_lossy().ends_with(" (deleted)")
                        && std::fs::metadata(fd.path()).is_ok_and(|m| m.len() > 0)
                })
            })
            .count()
    }

    /// Every file under the output folder, temp area included.
    pub fn files(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, found)
                } else {
                    found.push(path)
                }
            }
        }
        let mut found = Vec::new();
        walk(&self.out(), &mut found);
        found
    }

    /// The central promise: every URL is done, its file holds exactly what
    /// the server sent, there is one file per URL and nothing else.
    pub fn assert_all_files_right(&self, server: &Server, urls: &[String]) {
        self.assert_all_files_are(urls, |url| {
            let path = url.strip_prefix(&server.url("")).expect("url on server");
            item_body(item_of(path).expect("item url"))
        });
    }

    /// The central promise, for any server: every URL is done, its file
    /// holds exactly `body_of(url)`, there is one file per URL and nothing
    /// else in the output folder, temp area included.
    pub fn assert_all_files_are(&self, urls: &[String], body_of: impl Fn(&str) -> Vec<u8>) {
        let rows = self.export();
        assert_eq!(rows.len(), urls.len(), "export has one row per URL");
        let mut expected_files = HashSet::new();
        for url in urls {
            let row = &rows[url];
            assert_eq!(row["state"], "done", "{url}: {row}");
            let path = PathBuf::from(row["path"].as_str().expect("path"));
            let body =
                std::fs::read(&path).unwrap_or_else(|e| panic!("{url}: {}: {e}", path.display()));
            assert!(
                body == body_of(url),
                "{url}: {} differs from what was served",
                path.display()
            );
            assert_eq!(row["bytes"].as_u64(), Some(body.len() as u64), "{url}");
            assert!(
                expected_files.insert(path),
                "{url}: a path shared by two URLs"
            );
        }
        let found: HashSet<PathBuf> = self.files().into_iter().collect();
        let extra: Vec<_> = found.difference(&expected_files).collect();
        assert!(
            extra.is_empty(),
            "files that are not a done URL's: {extra:?}"
        );
        assert!(
            !self.out().join(TEMP_DIR).exists(),
            "the temp area outlived a finished run"
        );
    }

    /// "Done means durable", checkable at any moment, even after a crash:
    /// every done row's file is there and has the recorded size and sha256.
    /// Returns how many rows are done.
    pub fn assert_done_rows_have_their_files(&self) -> usize {
        let rows = self.export();
        let mut done = 0;
        for (url, row) in &rows {
            if row["state"] != "done" {
                continue;
            }
            done += 1;
            let path = Path::new(row["path"].as_str().expect("path"));
            let body = std::fs::read(path)
                .unwrap_or_else(|e| panic!("{url} is done without its file: {e}"));
            assert_eq!(row["bytes"].as_u64(), Some(body.len() as u64), "{url}");
            assert_eq!(
                row["sha256"].as_str(),
                Some(sha256_hex(&body).as_str()),
                "{url}: the file is not the body recorded"
            );
        }
        done
    }

    /// The database, opened directly, for what the CLI does not show
    /// (SQLite).
    pub fn sql(&self) -> rusqlite::Connection {
        assert_eq!(self.backend(), Backend::Sqlite, "sql() opens a SQLite file");
        let conn = rusqlite::Connection::open(self.db()).expect("open the database");
        conn.busy_timeout(Duration::from_secs(10))
            .expect("busy timeout");
        conn
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// A filesystem mounted by a test, unmounted when dropped.
pub struct Mount {
    path: PathBuf,
}

impl Mount {
    /// Mounts a tmpfs of `size` bytes at `path` (created if needed). Needs
    /// root; without it, or where mounting is not allowed, says so and
    /// returns None, and the test skips what needs it.
    pub fn tmpfs(path: &Path, size: u64, test: &str) -> Option<Mount> {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("{test}: skipped: mounting a small filesystem needs root");
            return None;
        }
        std::fs::create_dir_all(path).expect("mount point");
        let target = c_path(path);
        let options = CString::new(format!("size={size},mode=0755")).unwrap();
        // SAFETY: valid NUL-terminated strings for the duration of the call.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                options.as_ptr().cast(),
            )
        };
        if rc != 0 {
            let error = std::io::Error::last_os_error();
            eprintln!(
                "{test}: skipped: cannot mount a tmpfs at {}: {error}",
                path.display()
            );
            return None;
        }
        Some(Mount {
            path: path.to_path_buf(),
        })
    }

    /// Remounts with new options, e.g. `size=64m` or `ro`.
    pub fn remount(&self, options: &str) {
        let target = c_path(&self.path);
        let options = CString::new(options).unwrap();
        let ro = if options.as_bytes().split(|&b| b == b',').any(|o| o == b"ro") {
            libc::MS_RDONLY
        } else {
            0
        };
        // SAFETY: valid NUL-terminated strings for the duration of the call.
        let rc = unsafe {
            libc::mount(
                std::ptr::null(),
                target.as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT | ro,
                options.as_ptr().cast(),
            )
        };
        assert_eq!(rc, 0, "remount: {}", std::io::Error::last_os_error());
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let target = c_path(&self.path);
        // SAFETY: a valid NUL-terminated path.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("a path without NUL")
}

/// `count` item URLs on `server`.
pub fn item_urls(server: &Server, count: u64) -> Vec<String> {
    (0..count)
        .map(|i| server.url(&format!("/items/{i}.json")))
        .collect()
}

/// A server that serves every item, after `delay`.
pub fn item_server(delay: Duration) -> Server {
    faulty_item_server(delay, |_, _| None)
}

/// A server of items that misbehaves where `fault(item, earlier_requests)`
/// says how; otherwise it serves the item after `delay`.
pub fn faulty_item_server(
    delay: Duration,
    fault: impl Fn(u64, usize) -> Option<Reply> + Send + Sync + 'static,
) -> Server {
    Server::start(move |request| match item_of(&request.path) {
        Some(i) => {
            fault(i, request.previous).unwrap_or_else(|| Reply::ok(item_body(i)).delayed(delay))
        }
        None => Reply::status(404),
    })
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

pub fn assert_success(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed with {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        stdout(output),
        stderr(output)
    );
}

/// Asserts that the server saw no path asked for twice.
pub fn assert_no_url_fetched_twice(server: &Server) {
    let twice: Vec<_> = server
        .hits_per_path()
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .collect();
    assert!(twice.is_empty(), "fetched more than once: {twice:?}");
}

/// Asserts that standard error holds `text`.
pub fn assert_stderr_contains(output: &Output, text: &str) {
    let stderr = stderr(output);
    assert!(stderr.contains(text), "{stderr}");
}

/// Starts `command` as `jobrun run ARGS`, its output piped.
fn spawn_run_with(mut command: Command, args: &[&str]) -> Child {
    command
        .arg("run")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start jobrun run")
}

/// A server that answers every request with the request's own body.
pub fn echo_server() -> Server {
    Server::start(|request| Reply::ok(request.body.clone()))
}

/// Waits for `condition`, polling; panics after `limit`.
pub fn wait_for(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The child's stderr, line by line, as it comes.
pub fn stderr_lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Sends `signal` to a child process.
pub fn signal(child: &Child, signal: i32) {
    // SAFETY: kill with a pid we own.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    assert_eq!(rc, 0, "kill failed");
}
