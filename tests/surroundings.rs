//! Broken surroundings: a disk that fills up, an output folder that is
//! read-only, a file, or removed during the run; a database locked by
//! another process, damaged, not SQLite, or written by a newer jobrun. Each
//! must end in a clear message, lose nothing recorded, and leave a state
//! from which a later run finishes once the cause is gone.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::*;

/// The run stopped on an error of this machine: exit 2, the message has
/// every one of `expected`, no URL is left running and none was blamed.
fn assert_stopped_cleanly(job: &Job, output: &std::process::Output, expected: &[&str]) {
    let message = stderr(output);
    assert_eq!(output.status.code(), Some(2), "{message}");
    for part in expected {
        assert!(message.contains(part), "no {part:?} in:\n{message}");
    }
    assert!(!message.contains("panicked"), "{message}");
    let report = job.report_json();
    assert_eq!(report["running"], 0, "{report}");
    assert_eq!(report["failed"], 0, "a URL was blamed: {report}");
}

#[test]
fn a_full_disk_stops_the_run_clearly_and_a_run_after_freeing_space_finishes() {
    let job = Job::new();
    // 1 MiB holds about 60 of the 200 bodies (200 bytes to 30 KB each).
    let Some(disk) = Mount::tmpfs(&job.out(), 1 << 20, "disk full") else {
        return;
    };
    let server = item_server(Duration::ZERO);
    let urls = item_urls(&server, 200);
    job.import(&urls);
    let output = job.run(&["--workers", "4"]);
    assert_stopped_cleanly(
        &job,
        &output,
        &[
            "No space left on device",
            "the disk is full: free some space",
        ],
    );
    job.assert_done_rows_have_their_files();
    let done = job.report_json()["done"].as_u64().unwrap();
    assert!(done < 200, "everything fit on the small disk");

    disk.remount("size=64m");
    assert_success(&job.run(&["--workers", "4"]), "the run after freeing space");
    job.assert_all_files_right(&server, &urls);
    eprintln!("disk full: {done} of 200 done when the disk filled up");
}

#[test]
fn a_read_only_output_folder_is_refused_and_nothing_is_recorded() {
    let server = item_server(Duration::ZERO);
    let (job, urls) = Job::with_items(&server, 20);
    // Root writes through permissions, so root gets a read-only mount.
    let mount = Mount::tmpfs(&job.out(), 16 << 20, "read-only output folder");
    let expected = match &mount {
        Some(mount) => {
            mount.remount("ro");
            "read-only filesystem: make it writable"
        }
        None => {
            set_mode(&job.out(), 0o555);
            "may not write in the output folder"
        }
    };
    let output = job.run(&[]);
    assert_stopped_cleanly(&job, &output, &[expected, TEMP_DIR]);
    assert_eq!(server.hit_count(), 0, "fetched with nowhere to write");
    assert_eq!(job.report_json()["pending"], 20);

    match &mount {
        Some(mount) => mount.remount("rw"),
        None => set_mode(&job.out(), 0o755),
    }
    assert_success(&job.run(&[]), "the run once the folder is writable");
    job.assert_all_files_right(&server, &urls);
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn an_out_that_is_a_file_is_refused_and_not_recorded() {
    let server = item_server(Duration::ZERO);
    let (job, urls) = Job::with_items(&server, 5);
    std::fs::write(job.dir().join("notes.txt"), b"mine").unwrap();
    let output = job.run(&["--out", "notes.txt"]);
    assert_stopped_cleanly(&job, &output, &["notes.txt is a file; give --out a folder"]);
    assert_eq!(std::fs::read(job.dir().join("notes.txt")).unwrap(), b"mine");
    // The mistake is not recorded as the job's folder: another may be given.
    assert_success(&job.run(&["--out", "out"]), "a run with a real folder");
    job.assert_all_files_right(&server, &urls);
}

#[test]
fn an_output_folder_removed_during_the_run_stops_it_and_a_new_run_finishes() {
    let server = item_server(Duration::from_millis(20));
    let (job, _) = Job::with_items(&server, 200);
    let child = job.spawn_run(&["--workers", "4"]);
    wait_for(Duration::from_secs(30), "some files", || {
        job.files().len() >= 10
    });
    // Moved away rather than deleted: the same for jobrun, and it keeps the
    // files that were in place, to check against the rows.
    let moved = job.dir().join("out.moved");
    std::fs::rename(job.out(), &moved).unwrap();
    let output = child.wait_with_output().unwrap();
    assert_stopped_cleanly(&job, &output, &["No such file or directory", "run again"]);
    assert_done_files_in(&job, &[job.out(), moved.clone()]);

    assert_success(&job.run(&["--workers", "4"]), "the run after the removal");
    let done_after_removal = assert_done_files_in(&job, &[job.out(), moved]);
    assert_eq!(done_after_removal, 200);
}

/// Every done row's file is in one of `folders` (under its own name) with
/// the body recorded; returns how many rows are done.
fn assert_done_files_in(job: &Job, folders: &[PathBuf]) -> usize {
    let mut done = 0;
    for (url, row) in job.export() {
        if row["state"] != "done" {
            continue;
        }
        done += 1;
        let name = Path::new(row["path"].as_str().unwrap())
            .file_name()
            .unwrap();
        let found = folders
            .iter()
            .filter_map(|folder| std::fs::read(folder.join(name)).ok())
            .any(|body| Some(sha256_hex(&body).as_str()) == row["sha256"].as_str());
        assert!(found, "{url} is done, but its file is nowhere");
    }
    done
}

#[test]
fn a_database_locked_by_another_process_is_reported_after_the_lock_wait() {
    let server = item_server(Duration::ZERO);
    let (job, urls) = Job::with_items(&server, 10);
    let holder = job.sql();
    holder.execute_batch("BEGIN EXCLUSIVE").unwrap();

    let started = Instant::now();
    let output = job.jobrun(&["--lock-wait", "500ms", "run"]);
    let waited = started.elapsed();
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{message}");
    assert!(
        message.contains("jobrun.db is locked by another process")
            && message.contains("--lock-wait (500ms)")
            && message.contains("close the other program"),
        "{message}"
    );
    assert!(
        waited >= Duration::from_millis(500),
        "gave up after {waited:?}"
    );
    assert!(waited < Duration::from_secs(10), "waited {waited:?}");
    assert_eq!(server.hit_count(), 0);
    let import = job.jobrun(&["--lock-wait", "200ms", "import", "urls.txt"]);
    assert_eq!(import.status.code(), Some(2));
    assert!(stderr(&import).contains("is locked by another process"));
    // Readers are not held up by a writer.
    assert_eq!(job.report_json()["pending"], 10);

    holder.execute_batch("ROLLBACK").unwrap();
    assert_success(&job.run(&[]), "the run once the lock is released");
    job.assert_all_files_right(&server, &urls);
}

/// A database with `rows` URLs, all done, checkpointed so the file holds
/// everything and no -wal file is left.
fn finished_job(rows: u64) -> Job {
    let server = item_server(Duration::ZERO);
    let job = Job::with_urls(&item_urls(&server, rows));
    job.run_ok(&["--workers", "8"]);
    job.sql()
        .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .unwrap();
    job
}

/// Runs every command on the job's database, which it must refuse with
/// `expected` and without changing a byte of it.
fn assert_every_command_refuses(job: &Job, expected: &str) {
    std::fs::write(job.dir().join("more.txt"), "http://a.test/more\n").unwrap();
    let before = std::fs::read(job.db()).unwrap();
    for args in [
        &["run"][..],
        &["import", "more.txt"],
        &["report"],
        &["report", "--json"],
        &["export"],
    ] {
        let output = job.jobrun(args);
        let message = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {message}");
        assert!(message.contains(expected), "{args:?}: {message}");
        assert!(!message.contains("panicked"), "{args:?}: {message}");
        assert_eq!(
            std::fs::read(job.db()).unwrap(),
            before,
            "{args:?} changed the database"
        );
    }
    let wal = job.dir().join("jobrun.db-wal");
    assert!(
        std::fs::metadata(&wal).map_or(true, |m| m.len() == 0),
        "something was written to the WAL"
    );
}

#[test]
fn a_damaged_database_is_refused_by_every_command_and_left_as_it_is() {
    let job = finished_job(300);
    let mut bytes = std::fs::read(job.db()).unwrap();
    let page_size = match u16::from_be_bytes([bytes[16], bytes[17]]) {
        1 => 65536,
        size => size as usize,
    };
    assert!(bytes.len() > 3 * page_size, "a database of one page");
    // Page 1 (the header and the schema) stays; every other page is noise.
    let mut noise = fastrand::Rng::with_seed(7);
    for byte in &mut bytes[page_size..] {
        *byte = noise.u8(..);
    }
    std::fs::write(job.db(), &bytes).unwrap();
    assert_every_command_refuses(&job, "jobrun.db is damaged. Restore it from a backup");
}

#[test]
fn a_file_that_is_not_sqlite_is_refused_by_every_command() {
    let job = Job::new();
    std::fs::write(job.db(), "url,state\nhttp://a.test/,done\n".repeat(100)).unwrap();
    assert_every_command_refuses(&job, "is not a SQLite database");
}

#[test]
fn a_database_from_a_newer_jobrun_is_refused_and_left_as_it_is() {
    let job = finished_job(3);
    job.sql().execute_batch("PRAGMA user_version = 99").unwrap();
    assert_every_command_refuses(&job, "was written by a newer jobrun (schema version 99");
}
