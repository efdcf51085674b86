//! Several processes on one database: runs in other PID namespaces, runs
//! that wait for each other, two first runs racing for `--out`, an import
//! fed slowly through a pipe, and the read-only commands on read-only
//! files and filesystems.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::*;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `command`, run inside a new PID namespace with its own /proc
/// (`unshare --pid --fork --mount-proc`, as root).
fn in_new_pid_namespace(command: &Command) -> Command {
    let mut wrapped = Command::new("unshare");
    wrapped
        .args(["--pid", "--fork", "--mount-proc", "--"])
        .arg(command.get_program())
        .args(command.get_args());
    for (key, value) in command.get_envs() {
        match value {
            Some(value) => wrapped.env(key, value),
            None => wrapped.env_remove(key),
        };
    }
    if let Some(dir) = command.get_current_dir() {
        wrapped.current_dir(dir);
    }
    wrapped
}

fn spawn_piped(mut command: Command) -> Child {
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start jobrun")
}

fn runs_recorded(job: &Job) -> i64 {
    job.sql()
        .query_row("SELECT count(*) FROM runs", [], |row| row.get(0))
        .expect("count runs")
}

fn assert_no_url_fetched_twice(server: &Server) {
    let twice: Vec<_> = server
        .hits_per_path()
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .collect();
    assert!(twice.is_empty(), "fetched more than once: {twice:?}");
}

#[test]
fn a_run_in_another_pid_namespace_is_judged_by_its_heartbeat_not_taken_for_dead() {
    if !is_root() {
        eprintln!("skipped: `unshare --pid` needs root");
        return;
    }
    let server = item_server(Duration::from_millis(40));
    let job = Job::new();
    let urls = item_urls(&server, 300);
    job.import(&urls);
    let mut run = job.command();
    run.args(["run", "--workers", "4"]);
    // It claims 256 URLs at once, and holds most of them for a while.
    let inside = spawn_piped(in_new_pid_namespace(&run));
    wait_for(Duration::from_secs(30), "the first run's requests", || {
        server.hit_count() >= 8
    });
    assert_eq!(runs_recorded(&job), 1);
    let outside = job.spawn_run(&["--workers", "4"]);
    wait_for(Duration::from_secs(30), "the second run to start", || {
        runs_recorded(&job) == 2
    });
    let before = server.hit_count();
    wait_for(Duration::from_secs(30), "more requests", || {
        server.hit_count() >= before + 8
    });
    assert!(
        job.out().join(TEMP_DIR).join("run-1").is_dir(),
        "the second run removed the first one's temp folder"
    );
    let inside = inside.wait_with_output().unwrap();
    let outside = outside.wait_with_output().unwrap();
    assert_success(&inside, "the run inside the namespace");
    assert_success(&outside, "the run outside");
    assert_no_url_fetched_twice(&server);
    job.assert_all_files_right(&server, &urls);
    let outcomes: Vec<String> = job
        .sql()
        .prepare("SELECT outcome FROM runs ORDER BY id")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(outcomes, ["finished", "finished"]);
}

#[test]
fn a_run_exits_0_only_when_every_url_is_done_and_waits_for_live_runs_that_hold_some() {
    let server = item_server(Duration::from_millis(200));
    let job = Job::new();
    let urls = item_urls(&server, 12);
    job.import(&urls);
    // The first run claims all twelve and fetches two at a time.
    let first = job.spawn_run(&["--workers", "2"]);
    wait_for(Duration::from_secs(30), "the first run's requests", || {
        server.hit_count() >= 1
    });
    let second = job.spawn_run(&["--workers", "2", "--progress-every", "100ms"]);
    let second = second.wait_with_output().unwrap();
    assert_success(&second, "the second run");
    let report = job.report_json();
    assert_eq!(
        report["done"], 12,
        "the second run exited 0 before every URL was done: {report}"
    );
    assert!(
        stderr(&second).contains("waiting for run #1 (pid"),
        "{}",
        stderr(&second)
    );
    assert_success(&first.wait_with_output().unwrap(), "the first run");
    assert_no_url_fetched_twice(&server);
    job.assert_all_files_right(&server, &urls);
}

#[test]
fn a_waiting_run_takes_over_the_urls_of_a_run_that_dies_meanwhile() {
    let server = item_server(Duration::from_millis(300));
    let job = Job::new();
    let urls = item_urls(&server, 40);
    job.import(&urls);
    let first = job.spawn_run(&["--workers", "2"]);
    wait_for(Duration::from_secs(30), "the first run's requests", || {
        server.hit_count() >= 1
    });
    let mut second = job.spawn_run(&["--workers", "4", "--progress-every", "100ms"]);
    let lines = stderr_lines(&mut second);
    let mut seen = Vec::new();
    wait_for(Duration::from_secs(30), "the second run to wait", || {
        seen.extend(lines.try_iter());
        seen.iter().any(|line| line.contains("waiting for run #1"))
    });
    assert!(
        second.try_wait().unwrap().is_none(),
        "the second run ended while the first held URLs: {seen:?}"
    );
    signal(&first, libc::SIGKILL);
    let mut first = first;
    first.wait().unwrap();
    let status = second.wait().unwrap();
    seen.extend(lines.iter());
    assert_eq!(status.code(), Some(0), "{seen:?}");
    assert!(
        seen.iter()
            .any(|line| line.contains("run #1 was cut short")),
        "{seen:?}"
    );
    job.assert_all_files_right(&server, &urls);
    // Only what the first run had in flight when it was killed came twice.
    let repeated: usize = server.hits_per_path().values().map(|n| n - 1).sum();
    assert!(repeated <= 2, "{repeated} URLs fetched twice");
}

#[test]
fn of_two_first_runs_racing_with_different_out_one_is_refused_and_nothing_lands_in_its_folder() {
    let server = item_server(Duration::ZERO);
    // Started together, the two runs often both find no folder recorded;
    // a few rounds make sure the race is met.
    for round in 0..5 {
        let job = Job::new();
        let urls = item_urls(&server, 20);
        job.import(&urls);
        let folders = [job.dir().join("one"), job.dir().join("two")];
        let runs: Vec<Child> = folders
            .iter()
            .map(|folder| {
                let mut run = job.command();
                run.arg("run").arg("--out").arg(folder);
                spawn_piped(run)
            })
            .collect();
        let outputs: Vec<_> = runs
            .into_iter()
            .map(|run| run.wait_with_output().unwrap())
            .collect();
        let codes: Vec<_> = outputs.iter().map(|o| o.status.code()).collect();
        let (won, lost) = match codes[..] {
            [Some(0), Some(2)] => (0, 1),
            [Some(2), Some(0)] => (1, 0),
            _ => panic!(
                "round {round}: exit codes {codes:?}, one run must be refused\n{}\n{}",
                stderr(&outputs[0]),
                stderr(&outputs[1])
            ),
        };
        let refusal = stderr(&outputs[lost]);
        for folder in &folders {
            assert!(
                refusal.contains(&folder.display().to_string()),
                "round {round}: {refusal}"
            );
        }
        assert!(
            !folders[lost].exists(),
            "round {round}: the refused run created its folder"
        );
        let summary = stderr(&outputs[won]);
        assert!(
            summary.contains(&format!("files in {}", folders[won].display())),
            "round {round}: {summary}"
        );
        for row in job.export().values() {
            assert_eq!(row["state"], "done", "round {round}: {row}");
            let path = row["path"].as_str().unwrap();
            assert!(
                path.starts_with(&folders[won].display().to_string()),
                "round {round}: {path}"
            );
            assert!(
                std::path::Path::new(path).is_file(),
                "round {round}: {path}"
            );
        }
    }
}
