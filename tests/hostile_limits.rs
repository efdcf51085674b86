//! jobrun under the limits of the machine it runs on: too few file
//! descriptors to start.

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
