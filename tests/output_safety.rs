//! jobrun touches only what it wrote: no file lands outside `--out` through
//! a symlink, no file jobrun did not write is deleted, the state database is
//! never a target, a bad name fails its own URL and nothing else, and an
//! error while making the last batch durable is not reported as a finish.

mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::*;

/// A server that answers `/ok/…` with a body naming the path, `/gone/…`
/// with 404, `/drip/…` with a body sent a byte every 50 ms, and `/once/…`
/// with a body the first time and 404 after.
fn named_server() -> Server {
    Server::start(|request| {
        let body = body_of(&request.path);
        match request.path.split('/').nth(1) {
            Some("ok") => Reply::ok(body),
            Some("drip") => Reply::Drip {
                body,
                gap: Duration::from_millis(50),
            },
            Some("once") if request.previous == 0 => Reply::ok(body),
            _ => Reply::status(404),
        }
    })
}

fn body_of(path: &str) -> Vec<u8> {
    format!("{{\"body of\": \"{path}\"}}").into_bytes()
}

/// Imports one JSON Lines job per (path on `server`, output name).
fn import_named(job: &Job, server: &Server, named: &[(&str, &str)]) {
    let lines: Vec<String> = named
        .iter()
        .map(|(path, name)| {
            let url = server.url(path);
            serde_json::json!({"url": url, "name": name}).to_string()
        })
        .collect();
    std::fs::write(job.dir().join("jobs.jsonl"), lines.join("\n") + "\n").unwrap();
    assert_success(&job.jobrun(&["import", "jobs.jsonl"]), "import");
}

/// Each row's state and error, keyed by the URL's path on `server`.
fn rows_by_path(job: &Job, server: &Server) -> BTreeMap<String, (String, String)> {
    job.export()
        .into_iter()
        .map(|(url, row)| {
            let path = url.strip_prefix(&server.url("")).unwrap().to_string();
            let state = row["state"].as_str().unwrap().to_string();
            let error = row["error"].as_str().unwrap_or("").to_string();
            (path, (state, error))
        })
        .collect()
}

/// Every file under `dir` with its content, symlinks as "-> target".
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(dir: &Path, found: &mut BTreeMap<PathBuf, String>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            let kind = entry.file_type().unwrap();
            if kind.is_symlink() {
                let target = std::fs::read_link(&path).unwrap();
                found.insert(path, format!("-> {}", target.display()));
            } else if kind.is_dir() {
                found.insert(path.clone(), "folder".into());
                walk(&path, found);
            } else {
                found.insert(path.clone(), std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    let mut found = BTreeMap::new();
    walk(dir, &mut found);
    found
}

/// Creates the output folder, and a folder `elsewhere` beside it holding
/// `files` (name, text) for a symlink to lead to.
fn folder_beside_out(job: &Job, files: &[(&str, &str)]) -> PathBuf {
    let elsewhere = job.dir().join("elsewhere");
    for (name, text) in files {
        write(&elsewhere.join(name), text);
    }
    std::fs::create_dir_all(job.out()).unwrap();
    elsewhere
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn assert_failed_naming(rows: &BTreeMap<String, (String, String)>, path: &str, named: &Path) {
    let (state, error) = &rows[path];
    assert_eq!(state, "failed", "{path}: {error}");
    let named = named.display().to_string();
    assert!(error.contains(&named), "{path}: no {named} in {error:?}");
}

#[test]
fn a_url_that_fails_for_good_deletes_no_file_jobrun_did_not_write() {
    let server = named_server();
    let job = Job::new();
    let elsewhere = folder_beside_out(&job, &[("x.json", "a file outside --out")]);
    write(&job.out().join("mine.json"), "the user's own file");
    symlink(&elsewhere, job.out().join("link")).unwrap();
    import_named(
        &job,
        &server,
        &[
            ("/gone/1", "mine.json"),
            ("/gone/2", "link/x.json"),
            ("/ok/3", "fine.json"),
        ],
    );
    let before = (snapshot(&job.out()), snapshot(&elsewhere));
    let output = job.run(&[]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let rows = rows_by_path(&job, &server);
    assert_eq!(rows["/gone/1"].0, "failed");
    assert_eq!(rows["/gone/2"].0, "failed");
    assert_eq!(rows["/ok/3"].0, "done");
    let mut after = (snapshot(&job.out()), snapshot(&elsewhere));
    after.0.remove(&job.out().join("fine.json"));
    assert_eq!(after, before, "a file jobrun did not write was changed");

    // The database itself, with --out . and a name equal to its own.
    let server = named_server();
    let job = Job::new();
    import_named(
        &job,
        &server,
        &[
            ("/gone/1", "jobrun.db"),
            ("/gone/2", "jobrun.db-wal"),
            ("/ok/3", "fine.json"),
        ],
    );
    let output = job.run(&["--out", "."]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let report = job.report_json();
    assert_eq!(
        (report["done"].as_u64(), report["failed"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(server.hit_count(), 3);
}

#[test]
fn a_symlinked_folder_inside_out_never_leads_a_download_outside() {
    let server = named_server();
    let job = Job::new();
    let elsewhere = folder_beside_out(
        &job,
        &[
            ("x.json", "a file outside --out"),
            ("target.json", "another file outside --out"),
        ],
    );
    symlink(&elsewhere, job.out().join("link")).unwrap();
    symlink(elsewhere.join("target.json"), job.out().join("y.json")).unwrap();
    symlink(&elsewhere, job.out().join("deep")).unwrap();
    import_named(
        &job,
        &server,
        &[
            ("/ok/1", "link/x.json"),
            ("/ok/2", "link/new.json"),
            ("/ok/3", "y.json"),
            ("/ok/4", "deep/sub/z.json"),
            ("/ok/5", "fine/a.json"),
        ],
    );
    let outside = snapshot(&elsewhere);
    let output = job.run(&[]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert_eq!(
        snapshot(&elsewhere),
        outside,
        "a download landed outside --out"
    );
    let rows = rows_by_path(&job, &server);
    assert_failed_naming(&rows, "/ok/1", &job.out().join("link"));
    assert_failed_naming(&rows, "/ok/2", &job.out().join("link"));
    assert_failed_naming(&rows, "/ok/3", &job.out().join("y.json"));
    assert_failed_naming(&rows, "/ok/4", &job.out().join("deep"));
    assert_eq!(rows["/ok/5"].0, "done");
    assert_eq!(
        std::fs::read(job.out().join("fine/a.json")).unwrap(),
        body_of("/ok/5")
    );
    assert!(
        std::fs::symlink_metadata(job.out().join("y.json"))
            .unwrap()
            .is_symlink()
    );
    assert!(job.temp_files().is_empty());
}

#[test]
fn an_out_that_is_itself_a_symlink_to_a_folder_is_followed() {
    let server = item_server(Duration::ZERO);
    let job = Job::new();
    let real = job.dir().join("real");
    std::fs::create_dir_all(&real).unwrap();
    symlink(&real, job.out()).unwrap();
    let urls = item_urls(&server, 20);
    job.import(&urls);
    assert_success(&job.run(&[]), "a run into a symlinked --out");
    assert_eq!(job.assert_done_rows_have_their_files(), 20);
    let real = real.canonicalize().unwrap();
    for (url, row) in job.export() {
        let path = PathBuf::from(row["path"].as_str().unwrap());
        assert!(path.starts_with(&real), "{url}: {}", path.display());
    }
    assert_eq!(
        std::fs::read_dir(&real).unwrap().count(),
        20,
        "debris in --out"
    );
}

#[test]
fn a_symlinked_temp_area_stops_the_run_and_what_it_points_to_is_untouched() {
    let server = named_server();
    let job = Job::new();
    let elsewhere = folder_beside_out(
        &job,
        &[
            ("run-1/0/5", "looks like a temp file"),
            ("notes.txt", "someone's notes"),
        ],
    );
    symlink(&elsewhere, job.out().join(TEMP_DIR)).unwrap();
    import_named(&job, &server, &[("/ok/1", "a.json")]);
    let before = snapshot(&elsewhere);

    let output = job.run(&[]);
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{message}");
    assert!(
        message.contains(&format!("{TEMP_DIR} is a symbolic link")) && message.contains("remove"),
        "{message}"
    );
    assert_eq!(
        snapshot(&elsewhere),
        before,
        "the link's target was changed"
    );
    assert_eq!(server.hit_count(), 0, "fetched with nowhere safe to write");
    let report = job.report_json();
    assert_eq!(report["pending"], 1, "{report}");
    assert_eq!(report["last_run"]["state"], "error", "{report}");
}

#[test]
fn the_temp_area_clean_up_removes_only_what_jobrun_made() {
    let server = named_server();
    let job = Job::new();
    import_named(&job, &server, &[("/ok/1", "a.json")]);
    assert_success(&job.run(&[]), "first run");
    // What a run #1 killed in the middle would leave, and things jobrun
    // never makes.
    let temp = job.out().join(TEMP_DIR);
    write(&temp.join("run-1/3/77"), "a temp file of run #1");
    write(&temp.join("run-1/keep.txt"), "not jobrun's");
    write(&temp.join("notes.txt"), "not jobrun's either");

    let output = job.run(&[]);
    assert_success(&output, "second run");
    let message = stderr(&output);
    assert!(
        !temp.join("run-1/3/77").exists(),
        "a dead run's temp file was kept"
    );
    assert!(
        !temp.join("run-1/3").exists(),
        "a dead run's shard folder was kept"
    );
    for theirs in ["run-1/keep.txt", "notes.txt"] {
        let path = temp.join(theirs);
        assert!(path.exists(), "{theirs} was removed");
        assert!(
            message.contains(&path.display().to_string()),
            "{theirs} not reported: {message}"
        );
    }
}

#[test]
fn a_download_named_like_the_database_never_replaces_it() {
    let server = named_server();
    let job = Job::new();
    import_named(
        &job,
        &server,
        &[
            ("/ok/1", "jobrun.db"),
            ("/ok/2", "jobrun.db-wal"),
            ("/ok/3", "jobrun.db-shm"),
            ("/ok/4", "jobrun.db-journal"),
            ("/ok/5", "fine.json"),
        ],
    );
    let output = job.run(&["--out", "."]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let rows = rows_by_path(&job, &server);
    for (path, name) in [
        ("/ok/1", "jobrun.db"),
        ("/ok/2", "jobrun.db-wal"),
        ("/ok/3", "jobrun.db-shm"),
        ("/ok/4", "jobrun.db-journal"),
    ] {
        assert_failed_naming(&rows, path, &job.dir().join(name));
        assert!(rows[path].1.contains("state database"), "{:?}", rows[path]);
    }
    assert_eq!(rows["/ok/5"].0, "done");
    assert_ne!(std::fs::read(job.db()).unwrap(), body_of("/ok/1"));
    assert_eq!(job.report_json()["last_run"]["state"], "finished");
}

#[test]
fn a_hard_link_to_the_database_is_never_a_target() {
    let server = named_server();
    let job = Job::new();
    import_named(
        &job,
        &server,
        &[("/ok/1", "copy.db"), ("/ok/2", "fine.json")],
    );
    std::fs::create_dir_all(job.out()).unwrap();
    std::fs::hard_link(job.db(), job.out().join("copy.db")).unwrap();
    let output = job.run(&[]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let rows = rows_by_path(&job, &server);
    assert_failed_naming(&rows, "/ok/1", &job.out().join("copy.db"));
    assert_eq!(rows["/ok/2"].0, "done");
}

#[test]
fn an_error_making_the_last_batch_durable_ends_the_run_as_an_error() {
    let server = named_server();
    let job = Job::new();
    import_named(&job, &server, &[("/drip/1", "a.json")]);
    let child = job.spawn_run(&[]);
    // The body is in its temp file, arriving a byte at a time; the output
    // folder goes away before it can be made durable.
    wait_for(Duration::from_secs(30), "the temp file", || {
        !job.temp_files().is_empty() || job.unnamed_temp_bodies(child.id()) > 0
    });
    let moved = job.dir().join("out.moved");
    std::fs::rename(job.out(), &moved).unwrap();
    let output = child.wait_with_output().unwrap();
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{message}");
    assert!(message.contains("run again"), "{message}");
    let report = job.report_json();
    assert_eq!(report["last_run"]["state"], "error", "{report}");
    assert_eq!(report["done"], 0, "{report}");
    assert_eq!(report["pending"], 1, "{report}");
    let text = job.jobrun(&["report"]);
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("stopped by an error"),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );
    assert!(
        !moved.join("a.json").exists(),
        "a file left in place without its commit"
    );

    assert_success(&job.run(&[]), "the run after the folder is back");
    assert_eq!(
        std::fs::read(job.out().join("a.json")).unwrap(),
        body_of("/drip/1")
    );
}

#[test]
fn one_bad_name_fails_only_its_url_and_the_rest_of_its_batch_is_done() {
    let server = named_server();
    let job = Job::new();
    let out = job.out();
    write(
        &out.join("dir.json/keep.txt"),
        "a folder where a file is named",
    );
    write(&out.join("file"), "a file where a folder is needed");
    let fifo = out.join("fifo.json");
    let c_fifo = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o644) }, 0);
    // Whoever opens the FIFO to read would let this writer through.
    let (opened_tx, opened) = std::sync::mpsc::channel();
    let writer = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            let file = std::fs::OpenOptions::new().write(true).open(&fifo);
            let _ = opened_tx.send(());
            drop(file);
        })
    };
    // Another filesystem mounted inside --out: one syncfs would not cover it.
    let mount = Mount::tmpfs(&out.join("mnt"), 1 << 20, "a name on another mount");

    let mut named = vec![
        ("/ok/dir".to_string(), "dir.json".to_string()),
        ("/ok/file".into(), "file/x.json".into()),
        ("/ok/fifo".into(), "fifo.json".into()),
        ("/ok/mnt".into(), "mnt/x.json".into()),
    ];
    for i in 0..20 {
        named.push((format!("/ok/{i}"), format!("n/{i}.json")));
    }
    let named_refs: Vec<(&str, &str)> = named
        .iter()
        .map(|(p, n)| (p.as_str(), n.as_str()))
        .collect();
    import_named(&job, &server, &named_refs);

    for round in ["first run", "second run"] {
        let output = job.run(&[]);
        assert_eq!(
            output.status.code(),
            Some(1),
            "{round}: {}",
            stderr(&output)
        );
        let rows = rows_by_path(&job, &server);
        assert_failed_naming(&rows, "/ok/dir", &out.join("dir.json"));
        assert_failed_naming(&rows, "/ok/file", &out.join("file"));
        assert_failed_naming(&rows, "/ok/fifo", &fifo);
        if mount.is_some() {
            assert_failed_naming(&rows, "/ok/mnt", &out.join("mnt"));
        }
        for i in 0..20 {
            assert_eq!(rows[&format!("/ok/{i}")].0, "done", "{round}");
            let body = std::fs::read(out.join(format!("n/{i}.json"))).unwrap();
            assert_eq!(body, body_of(&format!("/ok/{i}")));
        }
        assert_eq!(job.report_json()["last_run"]["state"], "finished");
        assert!(job.temp_files().is_empty(), "{round}");
    }
    assert_eq!(server.hit_count(), 24, "a URL was fetched twice");
    assert_eq!(
        std::fs::read_to_string(out.join("dir.json/keep.txt")).unwrap(),
        "a folder where a file is named"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("file")).unwrap(),
        "a file where a folder is needed"
    );
    assert!(
        std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo()
    );
    assert!(opened.try_recv().is_err(), "jobrun opened the FIFO");
    // Let the writer go: open the FIFO to read, without waiting.
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    writer.join().unwrap();
    drop(reader);
    if let Some(mount) = mount {
        assert!(!out.join("mnt/x.json").exists());
        drop(mount);
    }
}

#[test]
fn a_file_renamed_before_a_crash_goes_if_its_url_then_fails_for_good() {
    let server = named_server();
    let job = Job::new();
    import_named(&job, &server, &[("/once/1", "a.json")]);
    job.run_crashing_at("names-synced", &[]);
    let report = job.report_json();
    assert_eq!(report["done"], 0, "{report}");
    assert!(
        job.out().join("a.json").exists(),
        "not renamed before the crash"
    );

    // Fetched again, the URLs now fail for good: the files jobrun put in
    // place without committing them go, and so does the temp area.
    let output = job.run(&[]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert_eq!(job.report_json()["failed"], 1);
    assert_eq!(job.files(), Vec::<PathBuf>::new(), "debris after the crash");
}
