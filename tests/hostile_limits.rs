//! jobrun under the limits of the machine it runs on: too few file
//! descriptors to start, and a database of an older schema read without
//! taking memory the size of the database.

mod support;

use std::process::Output;
use std::time::Duration;

use support::*;

/// `jobrun ARGS` on `job` with at most `files` file descriptors open
/// (`ulimit -n`).
fn jobrun_with_open_files(job: &Job, files: u32, args: &[&str]) -> Output {
    let jobrun = job.command();
    let mut command = std::process::Command::new("sh");
    command
        .current_dir(job.dir())
        .arg("-c")
        .arg(r#"ulimit -n "$0" && exec "$@""#)
        .arg(files.to_string())
        .arg(jobrun.get_program())
        .args(jobrun.get_args())
        .args(args);
    for (name, value) in jobrun.get_envs() {
        match value {
            Some(value) => command.env(name, value),
            None => command.env_remove(name),
        };
    }
    command.output().expect("run sh")
}

#[test]
fn too_few_file_descriptors_stop_a_run_with_advice_and_its_end_recorded() {
    let server = item_server(Duration::ZERO);
    let (job, urls) = Job::with_items(&server, 3);
    // From a limit too low for anything to one that lets the run finish:
    // each step runs out of descriptors somewhere else (the temp folder,
    // the async runtime, the database, a connection).
    let mut finished = false;
    for files in 8..=64 {
        let output = jobrun_with_open_files(&job, files, &["run", "--workers", "20"]);
        let text = stderr(&output);
        assert!(
            !text.contains("was cut short"),
            "ulimit -n {files}: an earlier run's end was not recorded:\n{text}"
        );
        if output.status.success() {
            finished = true;
            break;
        }
        assert_eq!(
            output.status.code(),
            Some(2),
            "ulimit -n {files}: an error stops a run with 2:\n{text}"
        );
        if text.contains("Too many open files") {
            assert!(
                text.contains("ulimit -n") && text.contains("fewer --workers"),
                "ulimit -n {files}: no advice:\n{text}"
            );
        }
        assert!(
            !text.contains("panicked"),
            "ulimit -n {files}: a panic:\n{text}"
        );
        // What earlier runs left in the temp area is jobrun's, whatever
        // stops this run from clearing it.
        assert!(
            !text.contains("jobrun did not make it"),
            "ulimit -n {files}: a run's own leftovers taken for another's:\n{text}"
        );
    }
    assert!(finished, "no run finished with up to 64 file descriptors");
    // Every earlier run ended recorded, as an error or not at all.
    let report = job.report_text();
    assert!(!report.contains("cut short"), "{report}");
    // What the runs stopped at their start left in the temp area goes with
    // the next run that has the descriptors to clear it.
    let last = job.run_ok(&[]);
    assert!(!stderr(&last).contains("cut short"), "{}", stderr(&last));
    job.assert_all_files_right(&server, &urls);
    assert!(job.temp_files().is_empty(), "{:?}", job.temp_files());
}

#[test]
fn too_few_file_descriptors_for_the_database_are_said_so_not_taken_for_a_read_only_file() {
    let job = Job::new();
    job.write("urls.txt", "http://a.test/1\n");
    for files in 4..=12 {
        let output = jobrun_with_open_files(&job, files, &["import", "urls.txt"]);
        let text = stderr(&output);
        if output.status.success() {
            continue;
        }
        assert_eq!(output.status.code(), Some(2), "ulimit -n {files}:\n{text}");
        assert!(
            text.contains("ulimit -n") && !text.contains("read-only"),
            "ulimit -n {files}: not said to be the limit:\n{text}"
        );
    }
    // Other commands need no more than their database.
    let report = jobrun_with_open_files(&job, 8, &["report"]);
    assert_success(&report, "report under ulimit -n 8");
}

/// Runs `command` to its end and returns its output and its peak resident
/// memory in KiB, as the kernel counted it for that process alone.
#[allow(clippy::zombie_processes)] // wait4 waits for it
fn output_and_peak_kib(command: &mut std::process::Command) -> (Output, i64) {
    use std::io::Read;
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start jobrun");
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let reader = std::thread::spawn(move || {
        let mut err = Vec::new();
        stderr.read_to_end(&mut err).expect("read stderr");
        err
    });
    stdout.read_to_end(&mut out).expect("read stdout");
    err.extend(reader.join().expect("stderr reader"));
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value; wait4 fills it and
    // `status` for the child this test started and has not waited for.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as libc::pid_t;
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(waited, pid, "wait4: {}", std::io::Error::last_os_error());
    use std::os::unix::process::ExitStatusExt;
    let output = Output {
        status: std::process::ExitStatus::from_raw(status),
        stdout: out,
        stderr: err,
    };
    (output, usage.ru_maxrss)
}

/// Takes the database of `job` back to schema 7, as the jobrun before the
/// counters left it: the counters' tables and triggers are what schemas 8
/// and 9 added.
fn back_to_schema_7(job: &Job) {
    job.sql()
        .execute_batch(
            "DROP TRIGGER urls_tally_update; DROP TRIGGER urls_tally_delete;
             DROP TABLE tallies; DROP TABLE error_tallies; DROP TABLE tallied;
             DROP TABLE queue_counting;
             PRAGMA user_version = 7;",
        )
        .expect("take the database back to schema 7");
}

#[test]
fn report_on_an_older_schema_takes_no_memory_the_size_of_the_database() {
    // 16,000 URLs of 2 KB: a database of about 140 MB. The list is written
    // as it is made, and nothing of the size of the database is held here:
    // a child's peak memory as the kernel counts it starts from its
    // parent's at the fork.
    let job = Job::new();
    {
        use std::io::Write;
        let filler = "x".repeat(2000);
        let file = std::fs::File::create(job.dir().join("urls.txt")).expect("create urls.txt");
        let mut list = std::io::BufWriter::new(file);
        for i in 0..16_000 {
            writeln!(list, "http://a.test/{i}/{filler}").expect("write urls.txt");
        }
        list.flush().expect("write urls.txt");
    }
    assert_success(&job.jobrun(&["import", "urls.txt"]), "import");
    let size_kib = std::fs::metadata(job.db()).expect("the database").len() as i64 / 1024;
    let (current, current_kib) = output_and_peak_kib(job.command().args(["report", "--json"]));
    assert_success(&current, "report on the current schema");
    back_to_schema_7(&job);
    let before = std::fs::metadata(job.db()).expect("the database");
    let (older, older_kib) = output_and_peak_kib(job.command().args(["report", "--json"]));
    assert_success(&older, "report on schema 7");
    let report: serde_json::Value = serde_json::from_slice(&older.stdout).expect("JSON");
    assert_eq!(report["total"], 16_000, "{report}");
    assert_eq!(report["pending"], 16_000, "{report}");
    let after = std::fs::metadata(job.db()).expect("the database");
    let version: i64 = job
        .sql()
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .expect("user_version");
    assert_eq!(version, 7, "a read-only command upgraded the file");
    assert_eq!(
        (after.len(), after.modified().ok()),
        (before.len(), before.modified().ok()),
        "a read-only command changed the file"
    );
    // The same report on the current schema is the yardstick; a copy in
    // memory would add the database's size to it. A quarter of that is
    // left for what reading an older schema may cost beside.
    eprintln!(
        "database {size_kib} KiB; report peak {current_kib} KiB on the current schema, {older_kib} KiB on \
         schema 7"
    );
    assert!(
        older_kib < current_kib + size_kib / 4,
        "report on schema 7 peaked at {older_kib} KiB, on the current schema at {current_kib} KiB, \
         for a database of {size_kib} KiB"
    );
}
