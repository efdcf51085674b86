//! The temp files a run writes bodies to, in hostile surroundings: a low
//! descriptor limit (`ulimit -n`), more workers than descriptors, and an
//! output filesystem that runs out of inodes in the middle of a run. Each
//! ends in a clear message or a finished run, and nothing recorded is lost:
//! no URL spends an attempt or fails on a problem of this machine.

mod support;

use std::os::unix::process::CommandExt;
use std::process::Output;
use std::time::Duration;

use support::*;

/// `jobrun run ARGS` with at most `files` descriptors (soft and hard).
fn run_with_descriptors(job: &Job, files: u64, args: &[&str]) -> Output {
    let mut command = job.command();
    command.arg("run").args(args);
    // SAFETY: setrlimit is async-signal-safe and touches only the child.
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: files,
                rlim_max: files,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.output().expect("run jobrun")
}

/// (state, URLs, attempts) for every state, from the database.
fn states(job: &Job) -> Vec<(String, i64, i64)> {
    job.sql()
        .prepare("SELECT state, count(*), sum(attempts) FROM urls GROUP BY state ORDER BY state")
        .unwrap()
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// With 96 descriptors, four workers have room: the files made ahead of
/// need leave enough for the connections and the database.
#[test]
fn a_low_descriptor_limit_leaves_room_for_the_connections() {
    let server = item_server(Duration::ZERO);
    let (job, urls) = Job::with_items(&server, 400);
    let output = run_with_descriptors(&job, 96, &["--workers", "4"]);
    assert_success(&output, "a run with ulimit -n 96");
    job.assert_all_files_right(&server, &urls);
}

/// More workers than descriptors: the run stops with what to do, and the
/// URLs it could not connect for spent no attempt and are pending; once
/// the limit is raised, a run finishes them.
#[test]
fn out_of_descriptors_the_run_stops_with_what_to_do_and_no_url_spends_an_attempt() {
    let server = item_server(Duration::from_millis(5));
    let (job, urls) = Job::with_items(&server, 400);
    let output = run_with_descriptors(&job, 128, &["--workers", "200"]);
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{message}");
    assert!(message.contains("ulimit -n"), "{message}");
    assert!(!message.contains("panicked"), "{message}");
    for (state, urls, attempts) in states(&job) {
        match state.as_str() {
            "done" => assert_eq!(attempts, urls, "done URLs took one attempt each"),
            "pending" => assert_eq!(attempts, 0, "{urls} pending URLs spent attempts"),
            other => panic!("{urls} URLs {other} after the run stopped"),
        }
    }
    job.assert_done_rows_have_their_files();
    assert_success(
        &job.run(&["--workers", "200"]),
        "the run with the usual limit",
    );
    job.assert_all_files_right(&server, &urls);
}

/// An output filesystem with 200 inodes for 300 bodies: once they are
/// gone, no temp file can be made. The run stops saying the disk is full,
/// no URL is blamed or left running, and the done URLs have their files;
/// with inodes to spare, the next run finishes and leaves no temp file.
#[test]
fn an_output_filesystem_out_of_inodes_stops_the_run_and_loses_nothing() {
    let server = item_server(Duration::ZERO);
    let (job, urls) = Job::with_items(&server, 300);
    let Some(disk) = Mount::tmpfs(&job.out(), 64 << 20, "inodes run out") else {
        return;
    };
    disk.remount("size=64m,nr_inodes=200");
    let output = job.run(&["--workers", "8"]);
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{message}");
    assert!(message.contains("No space left on device"), "{message}");
    assert!(message.contains("the disk is full"), "{message}");
    assert!(!message.contains("panicked"), "{message}");
    for (state, urls, attempts) in states(&job) {
        match state.as_str() {
            "done" => assert_eq!(attempts, urls, "done URLs took one attempt each"),
            "pending" => assert_eq!(attempts, 0, "{urls} pending URLs spent attempts"),
            other => panic!("{urls} URLs {other} after the run stopped"),
        }
    }
    job.assert_done_rows_have_their_files();

    disk.remount("size=64m,nr_inodes=4096");
    assert_success(
        &job.run(&["--workers", "8"]),
        "the run with inodes to spare",
    );
    job.assert_all_files_right(&server, &urls);
    assert_eq!(job.temp_files(), Vec::<std::path::PathBuf>::new());
}
