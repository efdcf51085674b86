//! What `verify` reads back from the output folder when a done file's name
//! has since been replaced: by a symlink to a file outside `--out`, a FIFO,
//! or a folder, or the output folder itself by a FIFO. None is read
//! through or waited on; each is listed, and `--requeue` sends its URL back
//! to pending.

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use support::*;

#[test]
fn verify_reads_nothing_through_a_symlink_and_never_waits_on_a_fifo() {
    let server = item_server(Duration::ZERO);
    let (job, urls) = Job::with_items(&server, 4);
    job.run_ok(&[]);
    let rows = job.export();
    let path = |i: usize| rows[&urls[i]]["path"].as_str().expect("path").to_string();
    let (linked, fifo, folder) = (path(0), path(1), path(2));

    // Outside --out, a file with the very bytes jobrun wrote: read through
    // the link, it would pass for the file.
    let outside = job.dir().join("outside.json");
    std::fs::rename(&linked, &outside).expect("move the file outside");
    std::os::unix::fs::symlink(&outside, &linked).expect("symlink");
    std::fs::remove_file(&fifo).expect("remove a file");
    let c_fifo = std::ffi::CString::new(fifo.as_str()).expect("a path without NUL");
    // SAFETY: mkfifo with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o644) }, 0);
    std::fs::remove_file(&folder).expect("remove a file");
    std::fs::create_dir(&folder).expect("make a folder");
    let outside_before = std::fs::read(&outside).expect("read the outside file");

    for args in [&["verify"][..], &["verify", "--requeue"][..]] {
        let output = within_20_s(&job, args);
        assert_eq!(
            output.status.code(),
            Some(1),
            "{args:?}: {}",
            stderr(&output)
        );
        let listed = stdout(&output);
        for name in [&linked, &fifo, &folder] {
            assert!(
                listed.contains(name.as_str()),
                "{args:?} does not list {name}: {listed}"
            );
        }
        assert!(listed.contains("a symlink"), "{listed}");
        assert!(listed.contains("a FIFO"), "{listed}");
        assert!(listed.contains("a folder"), "{listed}");
        assert_eq!(listed.lines().count(), 3, "{listed}");
    }
    assert_eq!(job.report_json()["pending"], 3);

    // The run replaces no symlink and no FIFO: those URLs fail, the one
    // whose folder was removed is written again. Once the user has removed
    // them, `retry` and a run write the rest. The file outside is as it was.
    std::fs::remove_dir(&folder).expect("remove the folder");
    let output = job.run(&[]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert_eq!(job.report_json()["failed"], 2);
    assert_eq!(std::fs::read(&outside).unwrap(), outside_before);
    std::fs::remove_file(&linked).expect("remove the symlink");
    std::fs::remove_file(&fifo).expect("remove the FIFO");
    assert_success(&job.jobrun(&["retry"]), "retry");
    assert_success(&job.run(&[]), "run after retry");
    job.assert_all_files_right(&server, &urls);
    assert!(!std::fs::symlink_metadata(&linked).unwrap().is_symlink());
    assert_eq!(std::fs::read(&outside).unwrap(), outside_before);
    assert_success(&job.jobrun(&["verify"]), "verify after the run");
}

/// An output folder replaced by a FIFO: `verify` says it is not a folder
/// for each file, and waits on nothing.
#[test]
fn verify_never_waits_on_a_fifo_at_the_output_folder() {
    let server = item_server(Duration::ZERO);
    let (job, _) = Job::with_items(&server, 2);
    job.run_ok(&[]);
    std::fs::rename(job.out(), job.dir().join("out.moved")).expect("move the folder");
    let c_fifo = std::ffi::CString::new(job.out().to_str().expect("UTF-8")).expect("no NUL");
    // SAFETY: mkfifo with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o644) }, 0);

    let output = within_20_s(&job, &["verify"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let listed = stdout(&output);
    assert_eq!(listed.matches("is not a folder").count(), 2, "{listed}");
}

/// `jobrun ARGS`, which must end within 20 s.
fn within_20_s(job: &Job, args: &[&str]) -> std::process::Output {
    let mut child = job
        .command()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start jobrun");
    let start = Instant::now();
    while child.try_wait().expect("wait for jobrun").is_none() {
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} was still running after 20 s: it waits on a FIFO");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("jobrun output")
}
