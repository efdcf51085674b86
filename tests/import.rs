//! `jobrun import` and the mistakes users make: every rejected line named
//! by file and line, valid lines imported anyway, nothing recorded lost.

mod support;

use std::io::Write;
use std::process::Stdio;

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
