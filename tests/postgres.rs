//! jobrun on a PostgreSQL queue (`--db postgres://…`): several runs on one
//! queue, a run killed while others work, and the commands that read and
//! change the queue. The server is `JOBRUN_TEST_PG` (default
//! postgres://postgres@127.0.0.1:5432/test); each test works in a schema of
//! its own, dropped at the end. A server that cannot be reached fails the
//! tests: they never skip.

mod support;

use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::*;

fn server_url() -> String {
    std::env::var("JOBRUN_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// A job whose queue is a schema of its own on the test server.
struct PgJob {
    job: Job,
    url: String,
    schema: String,
}

impl PgJob {
    fn new() -> PgJob {
        let base = server_url();
        let schema = format!("jobrun_it_{}_{:x}", std::process::id(), fastrand::u64(..));
        let mut admin = postgres::Client::connect(&base, postgres::NoTls)
            .expect("the test PostgreSQL server (JOBRUN_TEST_PG) must be reachable");
        admin
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .expect("create a test schema");
        let separator = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{separator}options=-c%20search_path%3D{schema}");
        PgJob {
            job: Job::new(),
            url,
            schema,
        }
    }

    fn jobrun(&self, args: &[&str]) -> Output {
        self.job
            .command_on(&self.url)
            .args(args)
            .output()
            .expect("run jobrun")
    }

    fn spawn_run(&self, args: &[&str]) -> Child {
        self.job.spawn_run_on(&self.url, args)
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

    fn report(&self) -> Value {
        let output = self.jobrun(&["report", "--json"]);
        assert_success(&output, "report --json");
        serde_json::from_slice(&output.stdout).expect("report --json is JSON")
    }
}

impl Drop for PgJob {
    fn drop(&mut self) {
        if let Ok(mut admin) = postgres::Client::connect(&server_url(), postgres::NoTls) {
            let _ = admin.batch_execute(&format!("DROP SCHEMA {} CASCADE", self.schema));
        }
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
