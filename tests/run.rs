//! `jobrun run` against real local servers: what becomes done, what is
//! retried and when, what fails, and what lands on disk.

mod support;

use std::time::{Duration, SystemTime};

use support::*;

#[test]
fn happy_path_every_file_is_byte_identical() {
    let server = item_server(Duration::ZERO);
    let (job, urls) = Job::with_items(&server, 300);
    let output = job.run(&["--workers", "8"]);
    assert_success(&output, "run");
    job.assert_all_files_right(&server, &urls);
    assert_eq!(server.hit_count(), 300, "each URL fetched once");
    let report = job.report_json();
    assert_eq!(report["done"], 300);
    assert_eq!(report["total"], 300);
    assert_eq!(report["failed"], 0);
    assert_eq!(report["last_run"]["state"], "finished");
}

#[test]
fn a_500_is_retried_until_it_succeeds() {
    let server = faulty_item_server(Duration::ZERO, |_, earlier| {
        (earlier < 2).then(|| Reply::status(500))
    });
    let (job, urls) = Job::with_items(&server, 5);
    let output = job.run(&["--backoff-base", "10ms"]);
    assert_success(&output, "run");
    job.assert_all_files_right(&server, &urls);
    for row in job.export().values() {
        assert_eq!(row["attempts"], 3, "{row}");
        assert_eq!(row["http_status"], 200);
    }
    assert!(server.hits_per_path().values().all(|&n| n == 3));
}

on_both_backends! {
    fn a_404_fails_at_once_without_retry_or_file(backend) {
        let server = Server::start(|request| match item_of(&request.path) {
            Some(0) => Reply::status(404),
            Some(i) => Reply::ok(item_body(i)),
            None => Reply::status(404),
        });
        let (job, urls) = Job::with_items_on(backend, &server, 3);
        let output = job.run(&["--backoff-base", "10ms"]);
        assert_eq!(
            output.status.code(),
            Some(1),
            "some URLs failed: exit 1\n{}",
            stderr(&output)
        );
        let rows = job.export();
        let failed = &rows[&urls[0]];
        assert_eq!(failed["state"], "failed");
        assert_eq!(failed["attempts"], 1);
        assert_eq!(failed["http_status"], 404);
        assert_eq!(failed["error"], "HTTP 404 Not Found");
        assert!(
            !std::path::Path::new(failed["path"].as_str().unwrap()).exists(),
            "no error-page file"
        );
        assert_eq!(server.hits_per_path()["/items/0.json"], 1);
        assert_eq!(job.files().len(), 2);
        let report = job.report_json();
        assert_eq!(report["failed"], 1);
        assert_eq!(report["errors"][0]["error"], "HTTP 404 Not Found");
    }
}

on_both_backends! {
    fn retries_stop_at_max_attempts(backend) {
        let server = Server::start(|_| Reply::status(503));
        let job = Job::with_urls_on(backend, &item_urls(&server, 2));
        let output = job.run(&["--max-attempts", "3", "--backoff-base", "5ms"]);
        assert_eq!(output.status.code(), Some(1));
        for row in job.export().values() {
            assert_eq!(row["state"], "failed");
            assert_eq!(row["attempts"], 3);
            let error = row["error"].as_str().unwrap();
            assert!(
                error.contains("503") && error.contains("gave up after 3 attempts"),
                "{error}"
            );
        }
        assert!(server.hits_per_path().values().all(|&n| n == 3));
        assert!(job.files().is_empty());
    }
}

#[test]
fn retry_after_in_seconds_delays_the_retry_and_pauses_the_host() {
    // Item 0 answers 429 once; with one worker, item 1 comes after it and
    // must wait for the pause too.
    let server = faulty_item_server(Duration::ZERO, |item, earlier| {
        (item == 0 && earlier == 0).then(|| Reply::status(429).with_header("Retry-After", "1"))
    });
    let (job, urls) = Job::with_items(&server, 2);
    job.run_ok(&["--workers", "1", "--backoff-base", "1ms"]);
    job.assert_all_files_right(&server, &urls);
    let first = server.times_of("/items/0.json");
    assert_eq!(first.len(), 2);
    let wait = first[1] - first[0];
    assert!(wait >= Duration::from_millis(950), "retried after {wait:?}");
    let other = server.times_of("/items/1.json")[0];
    assert!(
        other - first[0] >= Duration::from_millis(950),
        "host not paused: {:?}",
        other - first[0]
    );
}

#[test]
fn retry_after_as_an_http_date_is_honoured() {
    let server = faulty_item_server(Duration::ZERO, |_, earlier| {
        (earlier == 0).then(|| {
            let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(2));
            Reply::status(503).with_header("Retry-After", &date)
        })
    });
    let (job, urls) = Job::with_items(&server, 1);
    job.run_ok(&["--backoff-base", "1ms"]);
    let times = server.times_of("/items/0.json");
    // The date has whole seconds: 2 s ahead is at least 1 s ahead.
    assert!(
        times[1] - times[0] >= Duration::from_millis(950),
        "{:?}",
        times[1] - times[0]
    );
    job.assert_all_files_right(&server, &urls);
}

#[test]
fn a_reset_mid_body_is_retried_and_leaves_no_truncated_file() {
    let server = faulty_item_server(Duration::ZERO, |item, earlier| {
        (earlier == 0).then(|| {
            let body = item_body(item);
            let sent = body.len() / 2;
            Reply::ResetMidBody { body, sent }
        })
    });
    let (job, urls) = Job::with_items(&server, 20);
    job.run_ok(&["--backoff-base", "1ms"]);
    job.assert_all_files_right(&server, &urls);
    assert!(server.hits_per_path().values().all(|&n| n == 2));
}

#[test]
fn a_body_shorter_than_its_length_is_retried() {
    let server = faulty_item_server(Duration::ZERO, |item, earlier| {
        (earlier == 0).then(|| {
            let body = item_body(item);
            let claimed = body.len() + 100;
            Reply::ShortBody { body, claimed }
        })
    });
    let (job, urls) = Job::with_items(&server, 5);
    job.run_ok(&["--backoff-base", "1ms"]);
    job.assert_all_files_right(&server, &urls);
}

#[test]
fn a_stalled_request_times_out_and_is_retried() {
    let server = faulty_item_server(Duration::ZERO, |_, earlier| {
        (earlier == 0).then(|| Reply::Stall(Duration::from_secs(3)))
    });
    let (job, urls) = Job::with_items(&server, 2);
    job.run_ok(&["--timeout", "300ms", "--backoff-base", "1ms"]);
    job.assert_all_files_right(&server, &urls);
}

#[test]
fn rate_holds_at_the_server() {
    let server = item_server(Duration::ZERO);
    let job = Job::with_urls(&item_urls(&server, 40));
    job.run_ok(&["--workers", "8", "--rate", "20/s"]);
    let mut times: Vec<_> = server.hits().into_iter().map(|h| h.at).collect();
    times.sort();
    assert_eq!(times.len(), 40);
    // 20/s: 40 requests need 39 intervals of 50 ms, less one burst slot.
    let span = *times.last().unwrap() - times[0];
    assert!(
        span >= Duration::from_millis(1850),
        "40 requests in {span:?}"
    );
    // No one-second window holds more than the rate, plus the burst.
    for (i, start) in times.iter().enumerate() {
        let in_window = times[i..]
            .iter()
            .take_while(|t| **t - *start < Duration::from_secs(1))
            .count();
        assert!(in_window <= 21, "{in_window} requests within one second");
    }
}

#[test]
fn headers_are_sent_and_never_stored() {
    let server = item_server(Duration::ZERO);
    let (job, _) = Job::with_items(&server, 3);
    let output = job.run(&[
        "--header",
        "Authorization: Bearer s3cret-token",
        "--header",
        "X-Extra: 1",
    ]);
    assert_success(&output, "run");
    for hit in server.hits() {
        let auth = hit
            .headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("authorization"));
        assert_eq!(auth.map(|(_, v)| v.as_str()), Some("Bearer s3cret-token"));
    }
    let db = std::fs::read(job.db()).unwrap();
    let wal = std::fs::read(job.dir().join("jobrun.db-wal")).unwrap_or_default();
    for bytes in [db, wal] {
        assert!(
            !bytes.windows(12).any(|w| w == b"s3cret-token"),
            "the header value was stored"
        );
    }
    assert!(!stderr(&output).contains("s3cret"));
}

on_both_backends! {
    fn the_output_folder_is_fixed_on_first_use(backend) {
        let server = item_server(Duration::ZERO);
        let (job, _) = Job::with_items_on(backend, &server, 2);
        job.run_ok(&["--out", "files"]);
        assert!(job.dir().join("files").is_dir());
        job.import(&[server.url("/items/9.json")]);
        let output = job.run(&["--out", "elsewhere"]);
        assert_eq!(output.status.code(), Some(2));
        let message = stderr(&output);
        assert!(
            message.contains("recorded on its first run") && message.contains("files"),
            "{message}"
        );
        assert!(!job.dir().join("elsewhere").exists());
        assert_success(&job.run(&[]), "run with the recorded folder");
        assert_eq!(job.report_json()["done"], 3);
    }
}

on_both_backends! {
    fn export_gives_every_field_as_jsonl_and_csv(backend) {
        let server = item_server(Duration::ZERO);
        let (job, urls) = Job::with_items_on(backend, &server, 2);
        job.run_ok(&[]);
        let rows = job.export();
        let row = &rows[&urls[1]];
        for field in [
            "url",
            "state",
            "path",
            "http_status",
            "attempts",
            "bytes",
            "sha256",
            "error",
        ] {
            assert!(row.get(field).is_some(), "no {field} in {row}");
        }
        let body = item_body(1);
        let sha = {
            use sha2::Digest;
            format!("{:x}", sha2::Sha256::digest(&body))
        };
        assert_eq!(row["sha256"], sha.as_str());
        let csv = job.jobrun(&["export", "--format", "csv"]);
        assert_success(&csv, "export csv");
        let text = String::from_utf8(csv.stdout).unwrap();
        let mut lines = text.lines();
        assert_eq!(
            lines.next(),
            Some("url,state,path,http_status,attempts,bytes,sha256,error")
        );
        assert_eq!(lines.count(), 2);
        assert!(text.contains(&sha));
    }
}

/// `jobrun export | head`: a reader that stops reading is not an error,
/// also when the write that finds it gone happens inside the store's loop
/// over the rows.
#[test]
fn export_to_a_reader_that_stops_early_exits_0_without_an_error() {
    use std::io::BufRead;
    use std::process::Stdio;

    // Far more than a pipe holds, so export is still writing when the
    // reader goes away.
    let urls: Vec<String> = (0..3000)
        .map(|i| format!("http://a.test/items/{i}.json"))
        .collect();
    let job = Job::with_urls(&urls);
    for format in ["jsonl", "csv"] {
        let mut child = job
            .command()
            .args(["export", "--format", format])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start jobrun export");
        let mut first = String::new();
        std::io::BufReader::new(child.stdout.take().expect("piped stdout"))
            .read_line(&mut first)
            .expect("read the first line");
        assert!(!first.is_empty(), "{format}: nothing exported");
        let output = child.wait_with_output().expect("wait for jobrun export");
        let message = stderr(&output);
        assert_eq!(output.status.code(), Some(0), "{format}: {message}");
        assert!(!message.contains("error"), "{format}: {message}");
    }
}
