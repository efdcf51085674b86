//! A `--db` that is not a file: a folder or a FIFO is refused by every
//! command with a message that says what it is, and is left as it was; `-`
//! (standard input or output elsewhere) is refused before anything is made.

mod support;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use support::*;

/// Each command that opens the database.
const EVERY_COMMAND: [&[&str]; 6] = [
    &["import", "urls.txt"],
    &["run"],
    &["retry"],
    &["report"],
    &["export"],
    &["verify"],
];

fn refused_by_every_command(job: &Job, db: &Path, what: &str) {
    for command in EVERY_COMMAND {
        let output = job
            .command_on(db)
            .args(command)
            .output()
            .expect("run jobrun");
        assert_eq!(
            output.status.code(),
            Some(2),
            "{command:?}: {}",
            stderr(&output)
        );
        assert_stderr_contains(&output, &format!("{} is {what}", db.display()));
        assert_stderr_contains(&output, "nothing was changed");
    }
}

#[test]
fn a_db_that_is_a_folder_is_refused_by_every_command_and_left_alone() {
    let job = Job::new();
    job.write("urls.txt", "http://a.test/1\n");
    let db = job.dir().join("state");
    std::fs::create_dir(&db).unwrap();
    refused_by_every_command(&job, &db, "a folder");
    assert_eq!(std::fs::read_dir(&db).unwrap().count(), 0);
}

#[test]
fn a_db_that_is_a_fifo_is_refused_by_every_command_and_never_opened() {
    let job = Job::new();
    job.write("urls.txt", "http://a.test/1\n");
    let db = job.dir().join("state.db");
    let status = std::process::Command::new("mkfifo")
        .arg(&db)
        .status()
        .expect("run mkfifo");
    assert!(status.success());
    refused_by_every_command(&job, &db, "a FIFO");
    assert!(std::fs::symlink_metadata(&db).is_ok());
    let beside: Vec<_> = std::fs::read_dir(job.dir())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(beside.len(), 2, "{beside:?}");
}

#[test]
fn a_db_of_a_dash_is_refused_by_every_command_and_no_file_is_made() {
    let job = Job::new();
    job.write("urls.txt", "http://a.test/1\n");
    for command in EVERY_COMMAND {
        for from_env in [false, true] {
            let mut jobrun = job.command_on("-");
            if from_env {
                // The same through JOBRUN_DB: --db is not given at all.
                jobrun = std::process::Command::new(env!("CARGO_BIN_EXE_jobrun"));
                jobrun.current_dir(job.dir()).env("JOBRUN_DB", "-");
            }
            let output = jobrun.args(command).output().expect("run jobrun");
            assert_eq!(
                output.status.code(),
                Some(2),
                "{command:?}: {}",
                stderr(&output)
            );
            assert_stderr_contains(&output, "not on standard input or output");
            assert_stderr_contains(&output, "./- for a file named -");
        }
    }
    assert!(!job.dir().join("-").exists());
    assert!(!job.dir().join("--wal").exists());
    // A file named - is still possible, written as a path.
    let output = job
        .command_on("./-")
        .args(["import", "urls.txt"])
        .output()
        .expect("run jobrun");
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(job.dir().join("-").is_file());
    // Any other name the system allows stays usable, also one that is not UTF-8.
    let odd = Path::new(OsStr::from_bytes(b"state-\xff.db"));
    let output = job
        .command_on(odd)
        .args(["import", "urls.txt"])
        .output()
        .expect("run jobrun");
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(job.dir().join(odd).is_file());
}

#[test]
fn a_db_that_is_a_symlink_to_nothing_yet_is_made_private_and_a_broken_one_is_named() {
    use std::os::unix::fs::{PermissionsExt, symlink};
    let job = Job::new();
    job.write("urls.txt", "http://a.test/1\n");
    std::fs::create_dir(job.dir().join("real")).expect("make a folder");

    // A link to where the database is to be: it is made there, private.
    symlink("real/state.db", job.dir().join("link.db")).expect("make a link");
    let output = job
        .command_on("link.db")
        .args(["import", "urls.txt"])
        .output();
    let output = output.expect("run jobrun");
    assert_success(&output, "import through a link");
    let meta = std::fs::metadata(job.dir().join("real/state.db")).expect("the database");
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "a database made through a link is readable by others"
    );
    let report = job.command_on("real/state.db").arg("report").output();
    assert_success(&report.expect("run jobrun"), "report on the target");

    // A link into a folder that does not exist, and a loop: each named.
    symlink("nowhere/state.db", job.dir().join("dangling.db")).expect("make a link");
    symlink("loop-b", job.dir().join("loop-a")).expect("make a link");
    symlink("loop-a", job.dir().join("loop-b")).expect("make a link");
    for (db, says) in [
        (
            "dangling.db",
            "dangling.db, a symbolic link to nowhere/state.db: make the folder",
        ),
        (
            "loop-a",
            "loop-a is a symbolic link to loop-b that cannot be followed",
        ),
    ] {
        let output = job.command_on(db).args(["import", "urls.txt"]).output();
        let output = output.expect("run jobrun");
        assert_eq!(output.status.code(), Some(2), "{db}: {}", stderr(&output));
        assert_stderr_contains(&output, says);
    }
    assert!(!job.dir().join("nowhere").exists(), "a folder was made");
}
