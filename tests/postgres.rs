//! jobrun on a PostgreSQL queue (`--db postgres://…`): several runs on one
//! queue, a run killed while others work, a run cut off from the database,
//! and the commands that read and change the queue (the tests of bad input,
//! report, retry and verify in the other files run here too, through
//! `on_both_backends!`). The server is `JOBRUN_TEST_PG` (default
//! postgres://postgres@127.0.0.1:5432/test); each test works in a schema of
//! its own, dropped at the end. A server that cannot be reached fails the
//! tests: they never skip.

mod support;

use std::collections::HashSet;
use std::net::{SocketAddr, ToSocketAddrs};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::proxy::{TcpRelay, UnixRelay};
use support::*;

fn server_url() -> String {
    pg_server_url()
}

/// A job whose queue is a schema of its own on the test server.
struct PgJob {
    job: Job,
    url: String,
    schema: String,
}

impl PgJob {
    fn new() -> PgJob {
        let job = Job::on(Backend::Postgres);
        let schema = job.postgres().expect("a job on PostgreSQL");
        let (url, schema) = (schema.url.clone(), schema.name.clone());
        PgJob { job, url, schema }
    }

    fn jobrun(&self, args: &[&str]) -> Output {
        self.job
            .command_on(&self.url)
            .args(args)
            .output()
            .expect("run jobrun")
    }

    fn spawn_run(&self, args: &[&str]) -> Child {
        self.spawn_run_on(&self.url, args)
    }

    /// Starts `jobrun run ARGS` on the queue reached at `url`.
    fn spawn_run_on(&self, url: &str, args: &[&str]) -> Child {
        self.job.spawn_run_on(url, args)
    }

    fn import(&self, lines: &[String]) -> Output {
        let file = self.job.dir().join("urls.txt");
        std::fs::write(&file, lines.join("\n") + "\n").expect("write urls.txt");
        self.jobrun(&["import", "urls.txt"])
    }

    /// Every exported row's file holds its item's body.
    fn assert_all_files_right(&self, count: usize) {
        let output = self.jobrun(&["export"]);
        assert_success(&output, "export");
        let text = String::from_utf8(output.stdout).expect("export is UTF-8");
        let mut seen = 0;
        for line in text.lines() {
            let row: Value = serde_json::from_str(line).expect("export line is JSON");
            let url = row["url"].as_str().expect("url");
            let item = item_of(&url[url.find("/items/").expect("an item URL")..]).expect("item");
            let path = row["path"].as_str().expect("path");
            let body = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
            assert!(body == item_body(item), "{path} holds the wrong body");
            seen += 1;
        }
        assert_eq!(seen, count);
    }

    fn sql(&self, statement: &str) {
        postgres::Client::connect(&server_url(), postgres::NoTls)
            .and_then(|mut client| client.batch_execute(statement))
            .expect("run SQL on the test server");
    }

    /// The queue's URL, reached through `addr` instead of the server.
    fn url_via(&self, addr: SocketAddr) -> String {
        let (scheme, rest) = self.url.split_once("://").expect("a URL");
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let user = rest[..end]
            .rsplit_once('@')
            .map(|(user, _)| format!("{user}@"));
        format!(
            "{scheme}://{}{addr}{}",
            user.unwrap_or_default(),
            &rest[end..]
        )
    }

    /// One number from the queue's own tables.
    fn number(&self, query: &str) -> i64 {
        let mut client =
            postgres::Client::connect(&self.url, postgres::NoTls).expect("connect to the queue");
        client
            .query_one(query, &[])
            .expect("query the queue")
            .get(0)
    }

    fn report(&self) -> Value {
        let output = self.jobrun(&["report", "--json"]);
        assert_success(&output, "report --json");
        serde_json::from_slice(&output.stdout).expect("report --json is JSON")
    }
}

/// The test PostgreSQL server's address.
fn server_addr() -> SocketAddr {
    let config: postgres::Config = server_url().parse().expect("JOBRUN_TEST_PG is a URL");
    let host = match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(host)) => host.clone(),
        _ => "127.0.0.1".to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    (host.as_str(), port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .expect("the test server's address")
}

/// Answers to requests that come while holding is on are held back until
/// released; later requests are answered at once. Requests sent with the
/// header `X-Run: cut` are counted apart.
#[derive(Default)]
struct HeldAnswers {
    holding: AtomicBool,
    /// The paths whose answers were held.
    held: Mutex<Vec<String>>,
    /// The paths asked for with `X-Run: cut`.
    cut: Mutex<Vec<String>>,
    released: Mutex<bool>,
    release: Condvar,
    /// Held answers on their way out after the release.
    sent: AtomicUsize,
}

impl HeldAnswers {
    fn start() -> (Arc<HeldAnswers>, Server) {
        let answers = Arc::new(HeldAnswers::default());
        answers.holding.store(true, Ordering::SeqCst);
        let gate = answers.clone();
        let server = Server::start(move |request| {
            let Some(item) = item_of(&request.path) else {
                return Reply::status(404);
            };
            if request.header("x-run") == Some("cut") {
                gate.cut.lock().unwrap().push(request.path.clone());
            }
            if gate.holding.load(Ordering::SeqCst) {
                gate.held.lock().unwrap().push(request.path.clone());
                let mut released = gate.released.lock().unwrap();
                while !*released {
                    released = gate.release.wait(released).unwrap();
                }
                gate.sent.fetch_add(1, Ordering::SeqCst);
            }
            Reply::ok(item_body(item))
        });
        (answers, server)
    }

    fn held(&self) -> HashSet<String> {
        self.held.lock().unwrap().iter().cloned().collect()
    }

    fn asked_by_cut_run(&self) -> Vec<String> {
        self.cut.lock().unwrap().clone()
    }

    /// Requests from now on are answered at once.
    fn stop_holding(&self) {
        self.holding.store(false, Ordering::SeqCst);
    }

    fn release(&self) {
        *self.released.lock().unwrap() = true;
        self.release.notify_all();
    }
}

impl Drop for HeldAnswers {
    fn drop(&mut self) {
        self.release();
    }
}

#[test]
fn four_runs_on_one_queue_fetch_every_url_once() {
    let job = PgJob::new();
    // More URLs than four runs' first claims (256 each), so all take part.
    let server = item_server(Duration::from_millis(2));
    let urls = item_urls(&server, 1200);
    assert_success(&job.import(&urls), "import");
    let runs: Vec<Child> = (0..4)
        .map(|_| job.spawn_run(&["--workers", "8", "--out", "out"]))
        .collect();
    for run in runs {
        let output = run.wait_with_output().expect("wait for a run");
        assert_success(&output, "run");
    }
    assert_no_url_fetched_twice(&server);
    assert_eq!(server.hit_count(), 1200);
    let report = job.report();
    assert_eq!(report["done"], 1200, "{report}");
    assert_eq!(report["pending"], 0, "{report}");
    let done_by_run: Vec<i64> = report["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .map(|run| run["done"].as_i64().unwrap_or(0))
        .collect();
    assert_eq!(done_by_run.iter().sum::<i64>(), 1200, "{done_by_run:?}");
    assert!(
        done_by_run.iter().filter(|&&done| done > 0).count() >= 2,
        "the runs did not share the queue: {done_by_run:?}"
    );
    job.assert_all_files_right(1200);
}

#[test]
fn the_urls_of_a_killed_run_are_finished_by_the_others() {
    let job = PgJob::new();
    // Slow enough that the first run holds URLs when it is killed.
    let server = item_server(Duration::from_millis(200));
    let urls = item_urls(&server, 60);
    assert_success(&job.import(&urls), "import");
    let mut doomed = job.spawn_run(&["--workers", "10", "--out", "out", "--lease", "2s"]);
    wait_for(Duration::from_secs(30), "the first requests", || {
        server.hit_count() >= 5
    });
    signal(&doomed, libc::SIGKILL);
    doomed.wait().expect("reap the killed run");
    let others: Vec<Child> = (0..2)
        .map(|_| job.spawn_run(&["--workers", "10", "--out", "out", "--lease", "2s"]))
        .collect();
    for run in others {
        let output = run.wait_with_output().expect("wait for a run");
        assert_success(&output, "run");
    }
    let report = job.report();
    assert_eq!(report["done"], 60, "{report}");
    assert_eq!(report["runs"][2]["state"], "killed", "{report}");
    job.assert_all_files_right(60);
}

#[test]
fn report_retry_export_and_verify_work_on_postgres() {
    let job = PgJob::new();
    let server = faulty_item_server(Duration::ZERO, |item, _| {
        (item % 5 == 0).then(|| Reply::status(404))
    });
    let mut lines = item_urls(&server, 20);
    lines.push(lines[1].clone());
    lines.push("not a url".to_string());
    let output = job.import(&lines);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("20 imported, 1 duplicate, 1 rejected"),
        "{}",
        stderr(&output)
    );
    let output = job.jobrun(&["run", "--out", "out"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let report = job.report();
    assert_eq!(
        (report["done"].as_i64(), report["failed"].as_i64()),
        (Some(16), Some(4))
    );
    assert!(
        !report["database"]
            .as_str()
            .unwrap_or_default()
            .contains("password"),
        "{report}"
    );
    let exported = job.jobrun(&["export"]);
    assert_success(&exported, "export");
    assert_eq!(
        String::from_utf8_lossy(&exported.stdout).lines().count(),
        20
    );
    let verify = job.jobrun(&["verify"]);
    assert_success(&verify, "verify");
    assert!(
        stderr(&verify).contains("checked 16 files: 0 missing"),
        "{}",
        stderr(&verify)
    );
    // Files another machine's run wrote are named, not looked for here.
    job.sql(&format!(
        "UPDATE {}.runs SET host = 'elsewhere'",
        job.schema
    ));
    let verify = job.jobrun(&["verify"]);
    assert_success(&verify, "verify");
    assert!(
        stderr(&verify).contains("16 files written on elsewhere are in its output folder"),
        "{}",
        stderr(&verify)
    );
    let retry = job.jobrun(&["retry", "--status", "404"]);
    assert_success(&retry, "retry");
    assert_eq!(job.report()["pending"], 4);
}

#[test]
fn an_unreachable_server_is_said_plainly() {
    let job = Job::new();
    let output = job
        .command_on("postgres://jobrun:secret@127.0.0.1:1/none")
        .args(["report"])
        .output()
        .expect("run jobrun");
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(err.contains("cannot connect to PostgreSQL at"), "{err}");
    assert!(!err.contains("secret"), "{err}");
}

/// A run that another machine cannot see the process of (here: one in a
/// PID namespace of its own) is judged by its heartbeat alone: killed, its
/// URLs go to the other runs once its lease has run out.
#[test]
fn a_killed_run_on_another_machine_loses_its_urls_when_its_lease_runs_out() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: `unshare --pid` needs root");
        return;
    }
    let job = PgJob::new();
    let server = item_server(Duration::from_millis(200));
    let urls = item_urls(&server, 40);
    assert_success(&job.import(&urls), "import");
    let run = job.job.command_on(&job.url);
    let mut inside = Command::new("unshare");
    inside
        .args(["--pid", "--fork", "--mount-proc", "--"])
        .arg(run.get_program())
        .args(run.get_args())
        .args(["run", "--workers", "10", "--out", "out", "--lease", "2s"])
        .current_dir(job.job.dir())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (key, value) in run.get_envs() {
        match value {
            Some(value) => inside.env(key, value),
            None => inside.env_remove(key),
        };
    }
    let mut unshare = inside.spawn().expect("start unshare");
    wait_for(Duration::from_secs(30), "the first requests", || {
        server.hit_count() >= 5
    });
    // The run itself is unshare's child; killing unshare would leave it.
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", unshare.id()))
        .expect("unshare's children");
    for pid in children.split_whitespace() {
        let pid: i32 = pid.parse().expect("a pid");
        // SAFETY: kill with a pid we started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    unshare.wait().expect("reap unshare");
    let output = job.jobrun(&["run", "--workers", "10", "--out", "out", "--lease", "2s"]);
    assert_success(&output, "run");
    let err = stderr(&output);
    assert!(
        err.contains("nothing left to claim; waiting for run #1"),
        "{err}"
    );
    assert!(err.contains("was cut short"), "{err}");
    let report = job.report();
    assert_eq!(report["done"], 40, "{report}");
    job.assert_all_files_right(40);
}

/// A run cut off from the database (a relay that stops forwarding, its
/// sockets open) while it holds URLs: it can claim nothing more; another
/// run takes its URLs once its lease has run out and finishes the job; when
/// the connection comes back, the cut-off run's outcomes are refused and it
/// stops, saying it was taken for dead. Only the URLs it asked for are
/// fetched twice (it goes on with the URLs it had claimed, and cannot
/// record them); each URL is recorded done once, by the other run, and
/// every file is right.
#[test]
fn a_run_cut_off_from_the_database_is_refused_when_it_comes_back() {
    let job = PgJob::new();
    let (answers, server) = HeldAnswers::start();
    let urls = item_urls(&server, 40);
    assert_success(&job.import(&urls), "import");
    let relay = TcpRelay::to(server_addr());
    let run_args = ["--workers", "10", "--out", "out", "--lease", "2s"];
    let cut_args = [&run_args[..], &["--header", "X-Run: cut"]].concat();
    let cut = job.spawn_run_on(&job.url_via(relay.addr()), &cut_args);
    wait_for(Duration::from_secs(30), "the first run's requests", || {
        answers.held().len() == 10
    });
    relay.freeze();
    answers.stop_holding();
    let other = job.jobrun(&[&["run"], &run_args[..]].concat());
    assert_success(&other, "the other run");
    assert!(
        stderr(&other).contains("was cut short"),
        "{}",
        stderr(&other)
    );
    // The held answers reach the cut-off run, which cannot record them.
    answers.release();
    wait_for(Duration::from_secs(30), "the held answers", || {
        answers.sent.load(Ordering::SeqCst) == 10
    });
    relay.thaw();
    let output = cut.wait_with_output().expect("wait for the cut-off run");
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("run #1 was taken for dead by another run"),
        "{}",
        stderr(&output)
    );

    let by_cut_run = answers.asked_by_cut_run();
    let asked: HashSet<&String> = by_cut_run.iter().collect();
    assert_eq!(asked.len(), by_cut_run.len(), "{by_cut_run:?}");
    assert!(answers.held().iter().all(|path| asked.contains(path)));
    let hits = server.hits_per_path();
    assert_eq!(hits.len(), 40, "every URL was fetched");
    for (path, count) in &hits {
        let expected = if asked.contains(path) { 2 } else { 1 };
        assert_eq!(*count, expected, "{path} fetched {count} times");
    }
    let report = job.report();
    assert_eq!(report["done"], 40, "{report}");
    let done_by: Vec<(i64, i64)> = report["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .map(|run| {
            (
                run["id"].as_i64().unwrap_or(0),
                run["done"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    assert!(
        done_by.contains(&(1, 0)) && done_by.contains(&(2, 40)),
        "{done_by:?}"
    );
    assert_eq!(
        job.number("SELECT count(*) FROM urls WHERE state = 'done' AND run_id = 2"),
        40
    );
    job.assert_all_files_right(40);
    assert_eq!(job.job.files().len(), 40, "{:?}", job.job.files());
}

/// A run cut off from the database for good does not wait for ever: past
/// its lease and a margin it gives up with exit status 2 and says why; its
/// URLs are finished by another run.
#[test]
fn a_run_cut_off_from_the_database_for_good_gives_up() {
    let job = PgJob::new();
    let (answers, server) = HeldAnswers::start();
    let urls = item_urls(&server, 40);
    assert_success(&job.import(&urls), "import");
    let relay = TcpRelay::to(server_addr());
    let run_args = ["--workers", "10", "--out", "out", "--lease", "2s"];
    let mut cut = job.spawn_run_on(&job.url_via(relay.addr()), &run_args);
    wait_for(Duration::from_secs(30), "the first run's requests", || {
        answers.held().len() == 10
    });
    relay.freeze();
    answers.stop_holding();
    let frozen_at = Instant::now();
    wait_for(
        Duration::from_secs(60),
        "the cut-off run to give up",
        || cut.try_wait().expect("poll the cut-off run").is_some(),
    );
    let gave_up_after = frozen_at.elapsed();
    let output = cut.wait_with_output().expect("the cut-off run's output");
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let err = stderr(&output);
    assert!(err.contains("run #1 stopped: the database"), "{err}");
    assert!(err.contains("has not answered for"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // The lease (2 s) and the margin (10 s), not for ever.
    assert!(
        gave_up_after >= Duration::from_secs(10),
        "{gave_up_after:?}"
    );

    let other = job.jobrun(&[&["run"], &run_args[..]].concat());
    assert_success(&other, "the other run");
    let report = job.report();
    assert_eq!(report["done"], 40, "{report}");
    job.assert_all_files_right(40);
}

/// `export` of a file another machine's run wrote gives it as
/// `host:/that/machine's/folder/name`, not a path in this machine's folder
/// (where it is not); rows not done, and files written here, keep their
/// path here.
#[test]
fn export_names_the_machine_and_folder_of_files_written_elsewhere() {
    let job = PgJob::new();
    let server = faulty_item_server(Duration::ZERO, |item, _| {
        (item == 0).then(|| Reply::status(404))
    });
    let urls = item_urls(&server, 6);
    assert_success(&job.import(&urls), "import");
    let output = job.jobrun(&["run", "--out", "out"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let here = |job: &PgJob| -> Vec<(String, String, String)> {
        let output = job.jobrun(&["export"]);
        assert_success(&output, "export");
        stdout(&output)
            .lines()
            .map(|line| {
                let row: Value = serde_json::from_str(line).expect("export line is JSON");
                let field = |name: &str| row[name].as_str().unwrap_or_default().to_string();
                (field("url"), field("state"), field("path"))
            })
            .collect()
    };
    let before = here(&job);
    job.sql(&format!(
        "UPDATE {0}.runs SET host = 'elsewhere';
         INSERT INTO {0}.settings (key, value) VALUES ('out_dir@elsewhere', '/data/out')",
        job.schema
    ));
    let after = here(&job);
    assert_eq!(before.len(), 6);
    for ((url, state, local), (_, _, exported)) in before.iter().zip(&after) {
        let name = &local[local.find("/out/").expect("in the output folder") + 5..];
        if state == "done" {
            assert_eq!(exported, &format!("elsewhere:/data/out/{name}"), "{url}");
        } else {
            assert_eq!(exported, local, "{url}: not done, its path stays here");
        }
    }
    // CSV says the same.
    let csv = job.jobrun(&["export", "--format", "csv"]);
    assert_success(&csv, "export --format csv");
    assert_eq!(
        stdout(&csv).matches(",elsewhere:/data/out/").count(),
        5,
        "{}",
        stdout(&csv)
    );
    // A machine that recorded no folder: the name within its folder.
    job.sql(&format!("UPDATE {0}.runs SET host = 'nowhere'", job.schema));
    for ((_, state, local), (_, _, exported)) in before.iter().zip(&here(&job)) {
        let name = &local[local.find("/out/").expect("in the output folder") + 5..];
        if state == "done" {
            assert_eq!(exported, &format!("nowhere:{name}"));
        }
    }
}

/// `url` with the password `secret` for its user, and TLS off, so that the
/// relay sees the statements go by.
fn with_password_in_clear(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = match authority.rsplit_once('@') {
        Some((user, host)) => format!("{}:secret@{host}", user.split(':').next().unwrap_or(user)),
        None => format!("postgres:secret@{authority}"),
    };
    let separator = if tail.contains('?') { '&' } else { '?' };
    format!("{scheme}://{authority}{tail}{separator}sslmode=disable")
}

/// A server that stops answering while its connections stay open (here a
/// relay that freezes as a given statement goes by, or before anything
/// does) stops every command within --db-timeout, with exit status 2 and a
/// message that names the database, its password as ***; nothing the
/// server had recorded is lost, and an import cut short counts what it
/// finds again as duplicates.
#[test]
fn every_command_gives_up_on_a_server_that_stops_answering() {
    let job = PgJob::new();
    let server = faulty_item_server(Duration::ZERO, |item, _| {
        (item == 0).then(|| Reply::status(404))
    });
    assert_success(&job.import(&item_urls(&server, 10)), "import");
    let output = job.jobrun(&["run", "--out", "out"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let more = item_urls(&server, 20).join("\n") + "\n";
    std::fs::write(job.job.dir().join("more.txt"), more).expect("write more.txt");

    let limit = Duration::from_secs(2);
    for (what, args, trigger) in [
        ("connecting", &["report"][..], None),
        ("its first message", &["report"], Some("application_name")),
        (
            "import",
            &["import", "more.txt"],
            Some("COPY import_staging"),
        ),
        (
            "report",
            &["report"],
            Some("sum(bytes)::bigint FROM tallies"),
        ),
        ("export", &["export"], Some("encode(u.sha256, 'hex')")),
        (
            "verify",
            &["verify"],
            Some("WHERE u.state = 'done' ORDER BY u.id"),
        ),
        ("retry", &["retry"], Some("strpos(error, $2)")),
        (
            "a run's start-up",
            &["run", "--out", "out"],
            Some("LOCK TABLE runs"),
        ),
    ] {
        let relay = TcpRelay::to(server_addr());
        let url = with_password_in_clear(&job.url_via(relay.addr()));
        let url = match trigger {
            Some(statement) => {
                relay.freeze_on(statement.as_bytes());
                url
            }
            // TLS as the server offers it: the TLS request goes unanswered.
            None => {
                relay.freeze();
                url.replace("sslmode=disable", "sslmode=prefer")
            }
        };
        gives_up_within(
            job.job.command_on(&url),
            args,
            what,
            limit,
            "postgres:***@127.0.0.1:",
        );
    }

    let again = job.jobrun(&["import", "more.txt"]);
    assert_success(&again, "the import again");
    assert!(
        stderr(&again).contains("10 imported, 10 duplicate"),
        "{}",
        stderr(&again)
    );
    let report = job.report();
    assert_eq!(
        (&report["done"], &report["failed"], &report["pending"]),
        (&Value::from(9), &Value::from(1), &Value::from(10)),
        "{report}"
    );
}

/// `--rate` holds for the whole job: runs on one queue share it, each
/// taking its part once it sees the others (at its start, and at its next
/// heartbeat for the runs already there), so the server sees the rate
/// asked for in all, not that rate per run.
#[test]
fn runs_on_one_queue_share_the_rate() {
    let job = PgJob::new();
    let server = faulty_item_server(Duration::ZERO, |_, _| None);
    assert_success(&job.import(&item_urls(&server, 3000)), "import");
    let args = [
        "--workers",
        "4",
        "--out",
        "out",
        "--rate",
        "40",
        "--lease",
        "6s",
    ];
    let mut runs = vec![job.spawn_run(&args)];
    server.wait_for_hits(20, "the first run's requests");
    runs.push(job.spawn_run(&args));
    wait_for(Duration::from_secs(30), "the second run to start", || {
        job.number("SELECT count(*) FROM runs") == 2
    });
    // The first run learns of the second within a heartbeat (2 s here).
    let from = Instant::now() + Duration::from_secs(3);
    let to = from + Duration::from_secs(5);
    wait_for(Duration::from_secs(60), "requests after the window", || {
        server.hits().last().is_some_and(|hit| hit.at > to)
    });
    for mut run in runs {
        let _ = run.kill();
        let _ = run.wait();
    }
    let in_window = server
        .hits()
        .iter()
        .filter(|hit| hit.at >= from && hit.at < to)
        .count();
    // 40 a second for 5 s is 200; each run at the whole rate, 400.
    assert!(
        (120..=230).contains(&in_window),
        "{in_window} requests in 5 s from two runs at --rate 40"
    );
}

/// A list mixing named and unnamed lines, with repeats and names that
/// clash with rows already there and with lines before them, is written
/// in one statement per batch, which appends one row of per-host counts,
/// and every line is counted and kept as SQLite's import counts and keeps it.
#[test]
fn named_and_unnamed_lines_with_duplicates_are_imported_in_one_statement() {
    let pg = PgJob::new();
    let import = |lines: &[String]| {
        let file = pg.job.dir().join("urls.jsonl");
        std::fs::write(&file, lines.join("\n") + "\n").expect("write urls.jsonl");
        pg.jobrun(&["import", "urls.jsonl"])
    };
    let named =
        |url: &str, name: &str| format!(r#"{{"url": "http://a.test/{url}", "name": "{name}"}}"#);
    let unnamed = |url: &str| format!(r#"{{"url": "http://a.test/{url}"}}"#);
    let first = import(&[
        named("1", "one.json"),
        unnamed("2"),
        named("3", "dir/three.json"),
    ]);
    assert_success(&first, "the first import");
    assert_stderr_contains(&first, "3 imported, 0 duplicate, 0 rejected");
    assert_eq!(pg.number("SELECT count(*) FROM host_changes"), 1);

    let mut lines = vec![
        named("1", "one.json"),    // 1: duplicate of a row there
        unnamed("2"),              // 2: duplicate of a row there
        named("4", "four.json"),   // 3
        unnamed("5"),              // 4
        named("4", "four.json"),   // 5: duplicate of line 3
        unnamed("5"),              // 6: duplicate of line 4
        named("6", "four.json"),   // 7: the name of line 3
        named("1", "uno.json"),    // 8: the request of a row there
        named("7", "dir"),         // 9: a row's folder
        named("8", "four.json/x"), // 10: needs line 3's file as a folder
        named("4", "cuatro.json"), // 11: the request of line 3
        unnamed("4"),              // 12: duplicate of line 3
    ];
    for i in 10..30 {
        lines.push(if i % 2 == 0 {
            named(&i.to_string(), &format!("items/{i}.json"))
        } else {
            unnamed(&i.to_string())
        });
    }
    lines.push(named("9", "items")); // 33: a folder of lines before it
    let second = import(&lines);
    assert_eq!(second.status.code(), Some(1), "{}", stderr(&second));
    assert_stderr_contains(&second, "22 imported, 5 duplicate, 6 rejected");
    for rejected in [
        "urls.jsonl:7: \"name\" \"four.json\" is already used by another URL",
        "urls.jsonl:8: the same request is already imported with the name \"one.json\", not \
         \"uno.json\"",
        "urls.jsonl:9: \"name\" \"dir\" is a folder of another URL's file \"dir/three.json\"",
        "urls.jsonl:10: \"name\" \"four.json/x\" needs a folder \"four.json\", which is \
         another URL's file",
        "urls.jsonl:11: the same request is already imported with the name \"four.json\", not \
         \"cuatro.json\"",
        "urls.jsonl:33: \"name\" \"items\" is a folder of another URL's file \"items/10.json\"",
    ] {
        assert_stderr_contains(&second, rejected);
    }
    // One more row of per-host counts: the second list's one batch.
    assert_eq!(pg.number("SELECT count(*) FROM host_changes"), 2);
    assert_eq!(pg.number("SELECT count(*) FROM requests"), 25);
    assert_eq!(
        pg.number("SELECT count(*) FROM jobs WHERE state = 'pending'"),
        25
    );
    let rows = pg.job.export();
    assert_eq!(rows.len(), 25);
    let path = |url: &str| {
        rows[&format!("http://a.test/{url}")]["path"]
            .as_str()
            .expect("a path")
            .to_string()
    };
    for (url, name) in [
        ("1", "/one.json"),
        ("3", "/dir/three.json"),
        ("4", "/four.json"),
    ] {
        assert!(path(url).ends_with(name), "{url}: {}", path(url));
    }
    for i in 10..30 {
        let path = path(&i.to_string());
        assert_eq!(
            path.ends_with(&format!("/items/{i}.json")),
            i % 2 == 0,
            "{i}: {path}"
        );
    }
    assert_ne!(path("2"), path("5"));
    let report = pg.report();
    assert_eq!(report["pending"], 25, "{report}");
}

/// The server's first Unix socket folder (`unix_socket_directories`) and
/// its port, as the test server tells them.
fn server_socket() -> (std::path::PathBuf, u16) {
    let mut client = postgres::Client::connect(&server_url(), postgres::NoTls)
        .expect("connect to the test server");
    let row = client
        .query_one(
            "SELECT current_setting('unix_socket_directories'), current_setting('port')::int",
            &[],
        )
        .expect("read the server's socket folder");
    let dirs: String = row.get(0);
    let port: i32 = row.get(1);
    let dir = dirs
        .split(',')
        .map(str::trim)
        .find(|dir| dir.starts_with('/'))
        .expect("the test server listens on a Unix socket");
    (dir.into(), u16::try_from(port).expect("a port"))
}

/// `--db-timeout` holds over a Unix socket as over TCP: a server that
/// stops answering on its socket (here a relay on a socket of its own that
/// freezes) stops every command within the limit, with exit status 2 and a
/// message that names the database, its password as ***.
#[test]
fn every_command_gives_up_on_a_server_that_stops_answering_on_its_unix_socket() {
    let job = PgJob::new();
    let server = faulty_item_server(Duration::ZERO, |_, _| None);
    assert_success(&job.import(&item_urls(&server, 10)), "import");
    let more = item_urls(&server, 20).join("\n") + "\n";
    std::fs::write(job.job.dir().join("more.txt"), more).expect("write more.txt");
    let (dir, port) = server_socket();
    let socket = format!(".s.PGSQL.{port}");
    // The queue's URL with the relay's folder for host: the password is
    // never checked (trust), only shown.
    let via = |relay: &UnixRelay| {
        let (scheme, rest) = job.url.split_once("://").expect("a URL");
        let tail = &rest[rest.find(['/', '?']).unwrap_or(rest.len())..];
        let folder = relay
            .dir()
            .to_str()
            .expect("a UTF-8 folder")
            .replace('/', "%2F");
        let separator = if tail.contains('?') { '&' } else { '?' };
        format!("{scheme}://postgres:secret@{folder}:{port}{tail}{separator}sslmode=disable")
    };

    // Through the relay, not frozen, a command works.
    let relay = UnixRelay::to(&dir, &socket);
    let output = job
        .job
        .command_on(via(&relay))
        .args(["report"])
        .output()
        .expect("run jobrun");
    assert_success(&output, "report through the relay");

    let limit = Duration::from_secs(2);
    for (what, args, trigger) in [
        (
            "its first message",
            &["report"][..],
            Some("application_name"),
        ),
        (
            "import",
            &["import", "more.txt"],
            Some("COPY import_staging"),
        ),
        (
            "report",
            &["report"],
            Some("sum(bytes)::bigint FROM tallies"),
        ),
        ("export", &["export"], Some("encode(u.sha256, 'hex')")),
        (
            "a run's start-up",
            &["run", "--out", "out"],
            Some("LOCK TABLE runs"),
        ),
        ("connecting", &["report"], None),
    ] {
        let relay = UnixRelay::to(&dir, &socket);
        match trigger {
            Some(statement) => relay.freeze_on(statement.as_bytes()),
            None => relay.freeze(),
        }
        gives_up_within(
            job.job.command_on(via(&relay)),
            args,
            what,
            limit,
            "postgres:***@%2F",
        );
    }

    // Nothing recorded was lost: the import was not, and adds its URLs now.
    let again = job.jobrun(&["import", "more.txt"]);
    assert_success(&again, "the import again");
    assert!(
        stderr(&again).contains("10 imported, 10 duplicate"),
        "{}",
        stderr(&again)
    );
}

/// Runs jobrun's `args` on `command` with `--db-timeout` at `limit`, against
/// a server that stopped answering (`what` waits for it), and checks that it
/// gives up within the limit and a run's lead over its watch, with exit 2
/// and a message that names the database as `shown` (the password hidden).
fn gives_up_within(mut command: Command, args: &[&str], what: &str, limit: Duration, shown: &str) {
    let started = Instant::now();
    let mut child = command
        .arg("--db-timeout")
        .arg(format!("{}s", limit.as_secs()))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start jobrun");
    let gave_up = (|| {
        while started.elapsed() < Duration::from_secs(30) {
            if child.try_wait().expect("poll jobrun").is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    })();
    let took = started.elapsed();
    if !gave_up {
        let _ = child.kill();
    }
    let output = child.wait_with_output().expect("jobrun's output");
    let err = stderr(&output);
    assert!(gave_up, "{what}: still waiting after {took:?}; {err}");
    assert_eq!(output.status.code(), Some(2), "{what}: {err}");
    assert!(err.contains("has not answered for"), "{what}: {err}");
    assert!(
        err.contains(&format!("longer than --db-timeout ({}s)", limit.as_secs())),
        "{what}: {err}"
    );
    assert!(err.contains(shown), "{what}: {err}");
    assert!(
        !err.contains("secret") && !err.contains("panicked"),
        "{what}: {err}"
    );
    assert!(took >= limit, "{what}: {took:?}");
    assert!(took < limit + Duration::from_secs(12), "{what}: {took:?}");
}
