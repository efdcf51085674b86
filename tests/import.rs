//! `jobrun import` and the mistakes users make: every rejected line named
//! by file and line, valid lines imported anyway, nothing recorded lost.

mod support;

use std::io::Write;
use std::process::{Output, Stdio};
use std::time::Duration;

use support::*;

on_both_backends! {
    fn bad_lines_are_reported_by_line_and_good_ones_imported(backend) {
        let job = Job::on(backend);
        let text = "\u{feff}http://a.test/1\r\n\
                    # a comment\n\
                    \n\
                       https://a.test/2   \n\
                    ftp://a.test/file\n\
                    not a url\n\
                    http://a.test/1\n\
                    https://a.test/2\n\
                    mailto:someone@a.test\n\
                    http://a.test/3?q=1\n\
                    http://a.test/3?q=2";
        job.write("urls.txt", text.as_bytes());
        let output = job.jobrun(&["import", "urls.txt"]);
        assert_eq!(output.status.code(), Some(1), "rejected lines give exit 1");
        let message = stderr(&output);
        assert!(
            message.contains("urls.txt:5: unsupported scheme \"ftp\""),
            "{message}"
        );
        assert!(message.contains("urls.txt:6: not a URL"), "{message}");
        assert!(
            message.contains("urls.txt:9: unsupported scheme \"mailto\""),
            "{message}"
        );
        assert!(
            message.contains("4 imported, 2 duplicate, 3 rejected"),
            "{message}"
        );
        let rows = job.export();
        assert_eq!(rows.len(), 4);
        for url in [
            "http://a.test/1",
            "https://a.test/2",
            "http://a.test/3?q=1",
            "http://a.test/3?q=2",
        ] {
            assert!(rows.contains_key(url), "{url} missing: {:?}", rows.keys());
        }
    }
}

on_both_backends! {
    fn urls_that_differ_only_in_their_query_get_their_own_files(backend) {
        let job = Job::on(backend);
        job.write(
            "urls.txt",
            b"http://a.test/x?page=1\nhttp://a.test/x?page=2\n",
        );
        assert_success(
            &job.jobrun(&["import", "urls.txt", "--ext", ".csv"]),
            "import",
        );
        let paths: Vec<String> = job
            .export()
            .values()
            .map(|r| r["path"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(paths.len(), 2);
        assert_ne!(paths[0], paths[1]);
        assert!(paths.iter().all(|p| p.ends_with(".csv")), "{paths:?}");
    }
}

on_both_backends! {
    fn importing_again_counts_duplicates_and_keeps_state(backend) {
        let server = item_server(std::time::Duration::ZERO);
        let (job, urls) = Job::with_items_on(backend, &server, 3);
        job.run_ok(&[]);
        let mut more = urls.clone();
        more.push(server.url("/items/3.json"));
        let output = job.import(&more);
        assert_stderr_contains(&output, "1 imported, 3 duplicate, 0 rejected");
        let report = job.report_json();
        assert_eq!(report["done"], 3);
        assert_eq!(report["pending"], 1);
    }
}

on_both_backends! {
    fn standard_input_works_and_is_named_in_messages(backend) {
        let job = Job::on(backend);
        let mut child = job
            .command()
            .args(["import", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"http://a.test/1\ngopher://a.test/\n")
            .unwrap();
        let output = child.wait_with_output().unwrap();
        assert_stderr_contains(&output, "<stdin>:2: unsupported scheme \"gopher\"");
        assert_eq!(job.report_json()["total"], 1);
    }
}

on_both_backends! {
    fn binary_and_overlong_lines_are_rejected_without_harm(backend) {
        let job = Job::on(backend);
        let mut bytes = b"http://a.test/ok\n\xff\xfe\x00garbage\n".to_vec();
        bytes.extend(std::iter::repeat_n(b'a', 100_000));
        bytes.extend_from_slice(b"\nhttp://a.test/after\n");
        job.write("urls.txt", &bytes);
        let output = job.jobrun(&["import", "urls.txt"]);
        let message = stderr(&output);
        assert!(message.contains("urls.txt:2: not valid UTF-8"), "{message}");
        assert!(
            message.contains("urls.txt:3: line longer than 65536 bytes"),
            "{message}"
        );
        assert!(message.contains("2 imported"), "{message}");
    }
}

on_both_backends! {
    fn a_missing_file_says_which(backend) {
        let job = Job::on(backend);
        let output = job.jobrun(&["import", "nope.txt"]);
        assert_eq!(output.status.code(), Some(2));
        assert_stderr_contains(&output, "cannot open nope.txt");
    }
}

#[test]
fn commands_on_a_missing_database_say_what_to_do() {
    let job = Job::new();
    for args in [&["run"][..], &["report"], &["export"]] {
        let output = job.jobrun(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let message = stderr(&output);
        assert!(
            message.contains("there is no database at") && message.contains("import"),
            "{message}"
        );
    }
    assert!(
        !job.db().exists(),
        "a read-only command created the database"
    );
}

on_both_backends! {
    fn bad_run_options_are_usage_errors(backend) {
        let job = Job::on(backend);
        job.import(&["http://a.test/1".to_string()]);
        for (args, expected) in [
            (&["run", "--workers", "0"][..], "at least 1"),
            (&["run", "--rate", "lots"], "not a rate"),
            (&["run", "--timeout", "forever"], "not a duration"),
            (&["run", "--header", "no colon"], "--header #1"),
        ] {
            let output = job.jobrun(args);
            assert_eq!(output.status.code(), Some(2), "{args:?}");
            assert!(
                stderr(&output).contains(expected),
                "{args:?}: {}",
                stderr(&output)
            );
        }
        assert_eq!(job.report_json()["pending"], 1, "nothing recorded was lost");
    }
}

#[test]
fn a_file_that_is_not_a_database_is_refused_untouched() {
    let job = Job::new();
    job.write(
        "jobrun.db",
        b"this is a text file, not SQLite, and long enough to have a header....",
    );
    let before = std::fs::read(job.db()).unwrap();
    let output = job.jobrun(&["report"]);
    assert_eq!(output.status.code(), Some(2));
    assert_stderr_contains(&output, "is not a SQLite database");
    assert_eq!(std::fs::read(job.db()).unwrap(), before);
}

#[test]
fn a_new_database_is_private_to_its_owner() {
    use std::os::unix::fs::PermissionsExt;
    let job = Job::new();
    job.import(&["http://a.test/1".to_string()]);
    let mode = std::fs::metadata(job.db()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn a_database_from_the_first_schema_still_opens() {
    // tests/fixtures/v1.db was written by the first migration: three URLs,
    // one done, one failed, one pending, and one finished run.
    let job = Job::with_fixture("v1.db");
    let report = job.report_json();
    assert_eq!(report["total"], 3, "{report}");
    assert_eq!(report["done"], 1);
    assert_eq!(report["failed"], 1);
    assert_eq!(report["pending"], 1);
    assert_eq!(report["last_run"]["state"], "finished");
    let rows = job.export();
    assert_eq!(rows["http://fixture.test/done"]["http_status"], 200);
    assert_eq!(
        rows["http://fixture.test/failed"]["error"],
        "HTTP 404 Not Found"
    );
}

/// Every column of every row of `urls`, in id order, as schema 6 kept them:
/// the URL whole, the host in the row, the file name as text.
fn rows_of_schema_6(conn: &rusqlite::Connection, sql: &str) -> Vec<Vec<rusqlite::types::Value>> {
    use rusqlite::types::Value;
    let mut statement = conn.prepare(sql).expect("prepare");
    let columns = statement.column_count();
    statement
        .query_map([], |row| {
            (0..columns)
                .map(|i| {
                    Ok(match row.get::<_, Value>(i)? {
                        // A file name kept as a UUID's 16 bytes and the rest of the name.
                        Value::Blob(bytes) if i == 5 => Value::Text(format!(
                            "{}{}",
                            uuid::Uuid::from_slice(&bytes[..16])
                                .expect("16 bytes")
                                .hyphenated(),
                            std::str::from_utf8(&bytes[16..]).expect("UTF-8 name")
                        )),
                        value => value,
                    })
                })
                .collect()
        })
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
}

/// `report --json` without the database's name, which is the only part
/// that depends on where the file is.
fn report_without_database(job: &Job) -> serde_json::Value {
    let mut report = job.report_json();
    report
        .as_object_mut()
        .expect("an object")
        .remove("database");
    report
}

#[test]
fn a_database_of_schema_6_keeps_every_row_when_made_compact() {
    // tests/fixtures/v6.db was written by jobrun at schema 6 (d523bb6): 16 URLs on two
    // hosts, one with a password, two POSTs to one URL, named and generated file names
    // (one named like a generated one, inside a folder, one in capitals); done (refreshed),
    // failed, waiting for a retry, running under a finished run, never tried, and a refresh
    // round still pending. v6-report.json and v6-export.jsonl are what that jobrun's
    // `report --json` and `export` printed for it.
    let job = Job::with_fixture("v6.db");
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut expected_report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fixtures.join("v6-report.json")).expect("read v6-report.json"),
    )
    .expect("JSON");
    expected_report.as_object_mut().unwrap().remove("database");
    let expected_export =
        std::fs::read_to_string(fixtures.join("v6-export.jsonl")).expect("read v6-export.jsonl");
    const COLUMNS: &str = "id, url, request, request_hash, host, path, state, attempts,
        interrupted, next_attempt_at, run_id, http_status, bytes, sha256, error, duration_ms,
        updated_at, etag, last_modified, fetched_at, refresh, refresh_round, refresh_error, fence";
    let before = rows_of_schema_6(
        &job.sql(),
        &format!("SELECT {COLUMNS} FROM urls ORDER BY id"),
    );
    assert_eq!(before.len(), 16);

    // Read only: the file stays at schema 6, a copy in memory is converted.
    assert_eq!(report_without_database(&job), expected_report);
    assert_eq!(stdout(&job.jobrun(&["export"])), expected_export);

    // Importing converts the file in place; the plain URLs are all there already.
    let plain: Vec<String> = job
        .export()
        .keys()
        .filter(|url| !url.ends_with("/api"))
        .cloned()
        .collect();
    let output = job.import(&plain);
    assert_stderr_contains(&output, "0 imported, 14 duplicate, 0 rejected");
    let conn = job.sql();
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .unwrap();
    assert!(version >= 7, "schema {version}");
    let after = rows_of_schema_6(
        &conn,
        &format!(
            "SELECT {} FROM urls ORDER BY id",
            COLUMNS
                .replace(
                    " url,",
                    " (SELECT prefix FROM origins WHERE id = origin_id) || url,"
                )
                .replace(
                    " host,",
                    " (SELECT host FROM origins WHERE id = origin_id),"
                )
        ),
    );
    drop(conn);
    assert_eq!(after, before);
    assert_eq!(report_without_database(&job), expected_report);
    assert_eq!(stdout(&job.jobrun(&["export"])), expected_export);

    // Converted names still clash with the names they are.
    let port = plain[0]
        .split(':')
        .nth(2)
        .unwrap()
        .split('/')
        .next()
        .unwrap();
    let taken = [
        "01a21dfb-ade8-789f-8775-39a6e63abd89.json",
        "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
        "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b/inner.txt/deeper",
        "0190A1B2-C3D4-7E5F-8A9B-0C1D2E3F4A5B.json",
        "named",
    ];
    let lines: Vec<String> = taken
        .iter()
        .enumerate()
        .map(|(i, name)| {
            format!(r#"{{"url": "http://127.0.0.1:{port}/new/{i}", "name": "{name}"}}"#)
        })
        .collect();
    job.write("named.jsonl", lines.join("\n") + "\n");
    let output = job.jobrun(&["import", "named.jsonl"]);
    assert_stderr_contains(&output, "0 imported, 0 duplicate, 5 rejected");
}

/// The counters behind `report` take an import's rows in a transaction of
/// their own, after the rows are committed: when that one fails, the rows
/// are imported all the same, and the import says so.
#[test]
fn urls_are_imported_when_the_counters_cannot_take_them() {
    let job = Job::new();
    job.write("first.txt", b"http://a.test/1\n");
    assert_success(&job.jobrun(&["import", "first.txt"]), "first import");
    job.sql()
        .execute_batch(
            "CREATE TRIGGER counters_out_of_reach BEFORE UPDATE ON tallied
             BEGIN SELECT RAISE(ABORT, 'the counters are out of reach'); END;",
        )
        .expect("the trigger");
    job.write(
        "more.txt",
        b"http://a.test/2\nhttp://a.test/3\nhttp://a.test/1\n",
    );
    let output = job.jobrun(&["import", "more.txt"]);
    assert_success(&output, "import");
    let message = stderr(&output);
    assert!(
        message.contains("2 imported, 1 duplicate, 0 rejected"),
        "{message}"
    );
    assert!(
        message.contains("the counters are out of reach"),
        "{message}"
    );
    assert!(!message.contains("not imported"), "{message}");
    assert_eq!(job.report_json()["pending"], 3);
    job.sql()
        .execute_batch("DROP TRIGGER counters_out_of_reach")
        .expect("the trigger dropped");
    // The next command that writes adds them.
    job.write("none.txt", b"");
    assert_success(&job.jobrun(&["import", "none.txt"]), "empty import");
    let mark: i64 = job
        .sql()
        .query_row("SELECT id FROM tallied", [], |row| row.get(0))
        .expect("the mark");
    assert_eq!(mark, 3);
    assert_eq!(job.report_json()["pending"], 3);
}

/// The URLs of the database in id order (SQLite).
fn urls_in_order(job: &Job) -> rusqlite::Result<Vec<String>> {
    let conn = job.sql();
    let mut select = conn.prepare(
        "SELECT (SELECT prefix FROM origins WHERE origins.id = origin_id) || url
         FROM urls ORDER BY id",
    )?;
    select.query_map([], |row| row.get(0))?.collect()
}

/// An import killed with `kill -9` halfway keeps the batches it committed:
/// the first URLs of the list, in its order, none twice; importing again
/// adds the rest after them and counts the others as duplicates.
#[test]
fn an_import_killed_halfway_keeps_the_first_urls_and_importing_again_adds_the_rest() {
    let job = Job::new();
    // Every 997th line repeats an earlier URL, so that some groups of
    // rows meet a row already there.
    let lines: Vec<String> = (0..150_000u64)
        .map(|i| {
            let item = if i % 997 == 996 { i / 2 } else { i };
            format!("http://a.test/items/{item}.json")
        })
        .collect();
    let mut unique = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for line in &lines {
        if seen.insert(line.clone()) {
            unique.push(line.clone());
        }
    }
    job.write("urls.txt", lines.join("\n"));
    let mut child = job
        .command()
        .args(["import", "urls.txt"])
        .stderr(Stdio::null())
        .spawn()
        .expect("start the import");
    wait_for(Duration::from_secs(120), "a committed batch", || {
        job.db().exists() && urls_in_order(&job).is_ok_and(|urls| !urls.is_empty())
    });
    child.kill().expect("kill -9");
    child.wait().expect("the killed import");
    let kept = urls_in_order(&job).expect("the rows");
    eprintln!("{} of {} URLs kept", kept.len(), unique.len());
    assert!(
        kept.len() < unique.len(),
        "the import ended before its kill"
    );
    assert_eq!(kept[..], unique[..kept.len()], "the first URLs, in order");
    let output = job.jobrun(&["import", "urls.txt"]);
    assert_success(&output, "import again");
    assert_stderr_contains(
        &output,
        &format!(
            "{} imported, {} duplicate, 0 rejected",
            thousands(unique.len() - kept.len()),
            thousands(lines.len() - (unique.len() - kept.len()))
        ),
    );
    assert_eq!(urls_in_order(&job).expect("the rows"), unique);
    assert_eq!(job.report_json()["pending"], unique.len());
}

fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// Waits for `child` at most `limit`; kills it and fails past that.
fn wait_at_most(child: &mut std::process::Child, limit: Duration, what: &str) -> Output {
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("look at jobrun") {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut output = Output {
        status,
        stdout: Vec::new(),
        stderr: Vec::new(),
    };
    if let Some(mut stderr) = child.stderr.take() {
        let _ = std::io::Read::read_to_end(&mut stderr, &mut output.stderr);
    }
    output
}

#[test]
fn an_input_that_never_ends_a_line_stops_the_import_and_keeps_what_came_before() {
    let job = Job::new();
    // A device: the file itself never ends, nor its one line.
    let mut import = job
        .command()
        .args(["import", "/dev/zero"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("start jobrun");
    let output = wait_at_most(&mut import, Duration::from_secs(60), "import of /dev/zero");
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(
        message.contains("/dev/zero:1: no line end in the first 64 MiB")
            && message.contains("not a list of URLs"),
        "{message}"
    );

    // A pipe: good lines, then NUL bytes for ever. The lines are kept.
    let mut feed = std::process::Command::new("sh")
        .args([
            "-c",
            "printf 'http://a.test/1\\nhttp://a.test/2\\n'; exec cat /dev/zero",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start sh");
    let mut import = job
        .command()
        .args(["import", "-"])
        .stdin(Stdio::from(feed.stdout.take().expect("the feed's output")))
        .stderr(Stdio::piped())
        .spawn()
        .expect("start jobrun");
    let output = wait_at_most(&mut import, Duration::from_secs(60), "import of NUL bytes");
    let _ = feed.kill();
    let _ = feed.wait();
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert_stderr_contains(&output, "<stdin>:3: no line end in the first 64 MiB");
    assert_eq!(job.report_json()["total"], 2);
}

#[test]
fn a_folder_given_as_the_list_is_refused_before_a_database_is_made() {
    let job = Job::new();
    std::fs::create_dir(job.dir().join("lists")).expect("make a folder");
    let output = job.jobrun(&["import", "lists"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert_stderr_contains(&output, "lists is a folder, not a list of URLs");
    assert!(
        !job.db().exists(),
        "a database was made for an import that could not read its list"
    );
}
