//! Several processes on one database: runs in other PID namespaces, runs
//! that wait for each other, two first runs racing for `--out`, an import
//! fed slowly through a pipe, and the read-only commands on read-only
//! files and filesystems.

mod support;

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use jobrun::clock::now_ms;
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

#[test]
fn a_run_in_another_pid_namespace_is_judged_by_its_heartbeat_not_taken_for_dead() {
    if !is_root() {
        eprintln!("skipped: `unshare --pid` needs root");
        return;
    }
    let server = item_server(Duration::from_millis(40));
    let (job, urls) = Job::with_items(&server, 300);
    let mut run = job.command();
    run.args(["run", "--workers", "4"]);
    // It claims 256 URLs at once, and holds most of them for a while.
    let inside = spawn_piped(in_new_pid_namespace(&run));
    server.wait_for_hits(8, "the first run's requests");
    assert_eq!(runs_recorded(&job), 1);
    let outside = job.spawn_run(&["--workers", "4"]);
    wait_for(Duration::from_secs(30), "the second run to start", || {
        runs_recorded(&job) == 2
    });
    let before = server.hit_count();
    wait_for(Duration::from_secs(30), "more requests", || {
        server.hit_count() >= before + 8
    });
    for run in ["run-1", "run-2"] {
        assert!(
            job.out().join(TEMP_DIR).join(run).is_dir(),
            "{run}'s temp folder was removed while it ran"
        );
    }
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
    let server = item_server(Duration::from_millis(300));
    let (job, urls) = Job::with_items(&server, 16);
    // The first run claims all sixteen and fetches two at a time.
    let first = job.spawn_run_until_hits(&["--workers", "2"], &server, 1);
    let second = job.spawn_run(&["--workers", "2", "--progress-every", "100ms"]);
    let second = second.wait_with_output().unwrap();
    assert_success(&second, "the second run");
    let report = job.report_json();
    assert_eq!(
        report["done"], 16,
        "the second run exited 0 before every URL was done: {report}"
    );
    assert_stderr_contains(&second, "waiting for run #1 (pid");
    assert_success(&first.wait_with_output().unwrap(), "the first run");
    assert_no_url_fetched_twice(&server);
    job.assert_all_files_right(&server, &urls);
}

#[test]
fn a_waiting_run_takes_over_the_urls_of_a_run_that_dies_meanwhile() {
    let server = item_server(Duration::from_millis(300));
    let (job, urls) = Job::with_items(&server, 40);
    let first = job.spawn_run_until_hits(&["--workers", "2"], &server, 1);
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
        let (job, _) = Job::with_items(&server, 20);
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

/// jobrun on the database `db`, in the job's folder.
fn jobrun_on(job: &Job, db: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_jobrun"))
        .current_dir(job.dir())
        .arg("--db")
        .arg(db)
        .args(args)
        .output()
        .expect("run jobrun")
}

/// Runs report, export and verify on `db`, which must work and leave every
/// byte of it, and of its side files, as it was.
fn assert_read_only_commands_read(job: &Job, db: &Path, urls: usize) {
    let side = |suffix: &str| {
        let mut path = db.as_os_str().to_owned();
        path.push(suffix);
        std::path::PathBuf::from(path)
    };
    // SQLite's readers may leave an empty log beside a database that had
    // none; what is in the database and its log must not change.
    let snapshot = || ["", "-wal"].map(|suffix| std::fs::read(side(suffix)).unwrap_or_default());
    let before = snapshot();
    let report = jobrun_on(job, db, &["report", "--json"]);
    assert_success(&report, "report");
    let report: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    assert_eq!(report["done"], urls, "{report}");
    let export = jobrun_on(job, db, &["export", "--format", "csv"]);
    assert_success(&export, "export");
    assert_eq!(
        export.stdout.iter().filter(|&&b| b == b'\n').count(),
        urls + 1
    );
    let verify = jobrun_on(job, db, &["verify"]);
    assert_success(&verify, "verify");
    assert_stderr_contains(&verify, &format!("checked {urls} files: 0 missing"));
    assert!(
        snapshot() == before,
        "a read-only command changed {}",
        db.display()
    );
}

#[test]
fn report_export_and_verify_only_read_and_work_on_a_read_only_filesystem_or_file() {
    let server = item_server(Duration::ZERO);
    let (job, urls) = Job::with_items(&server, 30);
    // A connection held open keeps the run's last commits in the
    // write-ahead log, as after a crash.
    let holder = job.sql();
    holder
        .query_row("SELECT count(*) FROM urls", [], |_| Ok(()))
        .unwrap();
    job.run_ok(&[]);
    let copy = |folder: &Path, with_log: bool| {
        std::fs::create_dir_all(folder).unwrap();
        let suffixes: &[&str] = if with_log {
            &["", "-wal", "-shm"]
        } else {
            &[""]
        };
        for suffix in suffixes {
            std::fs::copy(
                job.dir().join(format!("jobrun.db{suffix}")),
                folder.join(format!("jobrun.db{suffix}")),
            )
            .unwrap();
        }
    };
    // The database with its log, and without one (all in the file).
    copy(&job.dir().join("ro/logged"), true);
    let log = std::fs::metadata(job.dir().join("ro/logged/jobrun.db-wal")).unwrap();
    assert!(log.len() > 0, "the run's commits are not in the log");
    drop(holder);
    assert!(!job.dir().join("jobrun.db-wal").exists());
    copy(&job.dir().join("ro/plain"), false);

    // A read-only file (root may still write it: the bytes tell).
    let plain = job.dir().join("ro/plain/jobrun.db");
    std::fs::set_permissions(&plain, std::os::unix::fs::PermissionsExt::from_mode(0o444)).unwrap();
    assert_read_only_commands_read(&job, &plain, urls.len());

    // A read-only filesystem, with and without a write-ahead log.
    let Some(mount) = Mount::tmpfs(&job.dir().join("mnt"), 8 << 20, "read-only filesystem") else {
        return;
    };
    for kind in ["logged", "plain"] {
        let folder = job.dir().join("mnt").join(kind);
        std::fs::create_dir_all(&folder).unwrap();
        for entry in std::fs::read_dir(job.dir().join("ro").join(kind)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), folder.join(entry.file_name())).unwrap();
        }
    }
    mount.remount("ro");
    for kind in ["logged", "plain"] {
        let db = job.dir().join("mnt").join(kind).join("jobrun.db");
        assert_read_only_commands_read(&job, &db, urls.len());
    }
    // A command that writes says why it cannot.
    let db = job.dir().join("mnt/plain/jobrun.db");
    let retry = jobrun_on(&job, &db, &["retry"]);
    assert_eq!(retry.status.code(), Some(2));
    assert_stderr_contains(&retry, "cannot be written here");
    assert_stderr_contains(&retry, "only read");
}

#[test]
fn read_only_commands_refuse_a_missing_empty_or_foreign_file_and_change_nothing() {
    let job = Job::new();
    let db = job.db();
    let refuse = |expected: &str| {
        let before = std::fs::read(&db).ok();
        for args in [&["report"][..], &["export"], &["verify"]] {
            let output = job.jobrun(args);
            let message = stderr(&output);
            assert_eq!(output.status.code(), Some(2), "{args:?}: {message}");
            assert!(message.contains(expected), "{args:?}: {message}");
            assert_eq!(std::fs::read(&db).ok(), before, "{args:?} changed the file");
        }
        for suffix in ["-wal", "-shm", "-journal"] {
            let side = job.dir().join(format!("jobrun.db{suffix}"));
            assert!(!side.exists(), "{} was created", side.display());
        }
    };
    refuse("there is no database at");
    std::fs::write(&db, b"").unwrap();
    refuse("is empty, not a jobrun database");
    std::fs::remove_file(&db).unwrap();
    // A SQLite database without a table: a header and nothing else.
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch("PRAGMA user_version = 0; VACUUM")
        .unwrap();
    drop(conn);
    assert!(std::fs::metadata(&db).unwrap().len() > 0);
    refuse("holds no jobrun data");
}

#[test]
fn a_database_of_an_older_schema_is_read_as_it_is_and_left_unchanged() {
    let job = Job::with_fixture("v1.db");
    let before = std::fs::read(job.db()).unwrap();
    assert_eq!(job.report_json()["total"], 3);
    assert_eq!(job.export().len(), 3);
    // Its output folder is not on this machine: the done file is missing.
    let verify = job.jobrun(&["verify"]);
    assert_eq!(verify.status.code(), Some(1), "{}", stderr(&verify));
    assert!(String::from_utf8_lossy(&verify.stdout).contains("missing: "));
    assert!(
        std::fs::read(job.db()).unwrap() == before,
        "a read-only command upgraded the file"
    );
}

#[test]
fn an_import_from_a_slow_pipe_holds_up_no_other_command_and_lands_as_it_comes() {
    let server = item_server(Duration::ZERO);
    let job = Job::new();
    let urls = item_urls(&server, 6);
    job.import(&urls[..1]);
    let mut import = job
        .command()
        .args(["import", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start jobrun import");
    let mut input = import.stdin.take().expect("stdin is piped");
    writeln!(input, "{}\n{}", urls[1], urls[2]).unwrap();
    input.flush().unwrap();
    // The lines land while the pipe is still open.
    wait_for(Duration::from_secs(10), "the first lines to land", || {
        job.report_json()["total"] == 3
    });
    // A writer gets the lock at once while the import waits for input.
    let run = job.jobrun(&["--lock-wait", "300ms", "run"]);
    assert_success(&run, "a run while the import waits for input");
    assert_eq!(job.report_json()["done"], 3);
    writeln!(input, "{}\n{}\n{}", urls[3], urls[4], urls[5]).unwrap();
    drop(input);
    let import = import.wait_with_output().unwrap();
    assert_success(&import, "import");
    assert_stderr_contains(&import, "5 imported, 0 duplicate, 0 rejected");
    assert_success(&job.run(&[]), "the last run");
    job.assert_all_files_right(&server, &urls);
}

/// Stops `child` (SIGSTOP) at a moment when it holds the database's write
/// lock; tries again and again until it is caught so.
fn stop_while_it_holds_the_lock(job: &Job, child: &Child) {
    // Not at once: a reader may meet a moment of a checkpoint that a second
    // look gets past; a lock held by a stopped process stays held.
    let probe = job.sql();
    probe.busy_timeout(Duration::from_millis(100)).unwrap();
    // Every thread, not only the first: the lock is the database thread's.
    let stopped = || {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", child.id())) else {
            return false;
        };
        tasks.flatten().all(|task| {
            std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
                let state = stat.rsplit(')').next().unwrap_or("").trim_start();
                state.starts_with('T') || state.starts_with('t')
            })
        })
    };
    for _ in 0..2000 {
        // A signal is delivered after kill() returns: probe only once stopped.
        signal(child, libc::SIGSTOP);
        wait_for(Duration::from_secs(5), "the process to stop", stopped);
        match probe.execute_batch("BEGIN IMMEDIATE") {
            Err(_) => return,
            Ok(()) => probe.execute_batch("ROLLBACK").unwrap(),
        }
        signal(child, libc::SIGCONT);
        std::thread::sleep(Duration::from_micros(fastrand::u64(0..3000)));
    }
    panic!("never caught holding the lock");
}

#[test]
fn a_lock_held_by_jobrun_names_the_run_or_process_and_blames_no_other_program() {
    let server = item_server(Duration::ZERO);
    let job = Job::with_urls(&item_urls(&server, 5_000));

    let run = job.spawn_run(&["--workers", "16"]);
    wait_for(Duration::from_secs(30), "requests", || {
        server.hit_count() > 100
    });
    stop_while_it_holds_the_lock(&job, &run);
    let retry = job.jobrun(&["--lock-wait", "200ms", "retry"]);
    let message = stderr(&retry);
    signal(&run, libc::SIGCONT);
    assert_eq!(retry.status.code(), Some(2), "{message}");
    assert!(
        message.contains(&format!("(jobrun run #1, pid {})", run.id()))
            && message.contains("It is stopped")
            && !message.contains("sqlite3 shell"),
        "{message}"
    );
    let mut run = run;
    run.kill().unwrap();
    run.wait().unwrap();

    let lines: Vec<String> = (0..50_000).map(|i| format!("http://b.test/{i}")).collect();
    std::fs::write(job.dir().join("more.txt"), lines.join("\n")).unwrap();
    let import = job
        .command()
        .args(["import", "more.txt"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("start jobrun import");
    stop_while_it_holds_the_lock(&job, &import);
    let retry = job.jobrun(&["--lock-wait", "200ms", "retry"]);
    let message = stderr(&retry);
    signal(&import, libc::SIGCONT);
    assert_eq!(retry.status.code(), Some(2), "{message}");
    assert!(
        message.contains(&format!("(jobrun, pid {})", import.id()))
            && !message.contains("sqlite3 shell"),
        "{message}"
    );
    assert_success(&import.wait_with_output().unwrap(), "the import, let go on");
    assert_eq!(job.report_json()["total"], 55_000);
}

#[test]
fn a_lock_held_by_another_program_names_it() {
    let job = Job::new();
    job.import(&["http://a.test/1".to_string()]);
    let holder = job.sql();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    let retry = job.jobrun(&["--lock-wait", "200ms", "retry"]);
    let message = stderr(&retry);
    assert_eq!(retry.status.code(), Some(2), "{message}");
    assert!(
        message.contains(&format!(
            "locked by another process (pid {}, ",
            std::process::id()
        )) && message.contains("close the other program using it (a sqlite3 shell"),
        "{message}"
    );
}

#[test]
fn a_run_taken_for_dead_by_another_stops_with_an_error_and_claims_nothing_more() {
    let server = item_server(Duration::from_millis(100));
    let (job, _) = Job::with_items(&server, 600);
    let run = job.spawn_run_until_hits(&["--workers", "4"], &server, 8);
    // What another run does to a run it judges dead: its URLs go back to
    // pending and its row is ended.
    job.sql()
        .execute_batch(
            "BEGIN IMMEDIATE;
             UPDATE urls SET state = 'pending' WHERE state = 'running' AND run_id = 1;
             UPDATE runs SET ended_at = heartbeat_at, outcome = 'killed' WHERE id = 1;
             COMMIT;",
        )
        .unwrap();
    let output = run.wait_with_output().unwrap();
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{message}");
    assert!(message.contains("run #1 was taken for dead"), "{message}");
    // Only the requests already in flight came after; nothing more was claimed.
    let report = job.report_json();
    assert_eq!(report["running"], 0, "{report}");
    assert!(server.hit_count() < 100, "{} requests", server.hit_count());
    assert_eq!(report["last_run"]["state"], "killed", "{report}");
}

#[test]
fn a_run_elsewhere_is_waited_for_while_its_heartbeat_is_fresh_and_taken_over_once_it_is_stale() {
    let server = item_server(Duration::ZERO);
    let (job, urls) = Job::with_items(&server, 20);
    // A run on another machine holds five URLs; its pid means nothing here.
    let (mut run, lines, mut seen) = job.run_waiting_for_a_run_elsewhere();
    assert_eq!(server.hit_count(), 15, "{seen:?}");
    assert!(run.try_wait().unwrap().is_none(), "{seen:?}");
    // Its heartbeat goes stale: it is presumed dead, and its URLs are taken over.
    job.sql()
        .execute(
            "UPDATE runs SET heartbeat_at = ?1 WHERE id = 1",
            [now_ms() - 61_000],
        )
        .unwrap();
    let status = run.wait().unwrap();
    seen.extend(lines.iter());
    assert_eq!(status.code(), Some(0), "{seen:?}");
    assert!(
        seen.iter().any(|line| line.contains("took back 5 URLs")),
        "{seen:?}"
    );
    job.assert_all_files_right(&server, &urls);
    assert_no_url_fetched_twice(&server);
    let outcome: String = job
        .sql()
        .query_row("SELECT outcome FROM runs WHERE id = 1", [], |row| {
            row.get(0)
        })
        .unwrap();
    assert_eq!(outcome, "killed");
}
