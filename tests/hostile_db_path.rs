//! A `--db` that is not a file: a folder or a FIFO is refused by every
//! command with a message that says what it is, and is left as it was.

mod support;

use std::path::Path;

use support::*;

fn refused_by_every_command(job: &Job, db: &Path, what: &str) {
    for command in [
        &["import", "urls.txt"][..],
        &["run"],
        &["retry"],
        &["report"],
        &["export"],
        &["verify"],
    ] {
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
