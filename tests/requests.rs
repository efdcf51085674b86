//! Requests and their input: no Referer hands a URL's query to another
//! host, URL passwords never show in what jobrun prints, saved bodies are
//! whole and decoded, and the list and the options are checked up front
//! with messages that say where and why.

mod support;

use std::process::Output;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::*;

/// Writes `lines` to `file` in the job folder and imports it.
fn import_file(job: &Job, file: &str, lines: &[&str]) -> Output {
    std::fs::write(job.dir().join(file), lines.join("\n") + "\n").expect("write the list");
    job.jobrun(&["import", file])
}

/// Everything `output` printed, on either stream.
fn printed(output: &Output) -> String {
    stdout(output) + &stderr(output)
}

#[test]
fn no_referer_is_sent_so_query_keys_stay_with_their_host() {
    let other = Server::start_on("127.0.0.2:0", |request| match item_of(&request.path) {
        Some(i) => Reply::ok(item_body(i)),
        None => Reply::status(404),
    });
    let target = other.url("/items/1.json");
    let server = Server::start(move |request| {
        if request.path.starts_with("/start") {
            Reply::redirect(302, &target)
        } else {
            Reply::status(404)
        }
    });
    let job = Job::new();
    let url = server.url("/start?api_key=k3y-s3cret");
    job.import(std::slice::from_ref(&url));
    job.run_ok(&[]);

    let hits = other.hits();
    assert_eq!(hits.len(), 1, "the redirect was not followed: {hits:?}");
    let referer = hits[0]
        .headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("referer"));
    assert_eq!(referer, None, "the other host was told where it came from");
    let row = &job.export()[&url];
    let saved = std::fs::read(row["path"].as_str().unwrap()).unwrap();
    assert_eq!(saved, item_body(1));
}

on_both_backends! {
    fn url_passwords_are_hidden_in_reports_failure_lists_verify_and_every_log(backend) {
        const PASSWORD: &str = "hunter2-pw";
        // Two hosts, so that the report lists hosts too.
        let handler = |request: &Request| match request.path.as_str() {
            "/missing" => Reply::status(404),
            "/flaky" => Reply::status(500),
            path => match item_of(path) {
                Some(i) => Reply::ok(item_body(i)),
                None => Reply::status(404),
            },
        };
        let one = Server::start(handler);
        let two = Server::start_on("127.0.0.2:0", handler);
        let with_password = |server: &Server, path: &str| {
            server
                .url(path)
                .replacen("://", &format!("://user:{PASSWORD}@"), 1)
        };
        let urls = [
            with_password(&one, "/items/1.json"),
            with_password(&one, "/missing"),
            with_password(&two, "/flaky"),
            with_password(&two, "/items/2.json"),
        ];
        let job = Job::with_urls_on(backend, &urls);
        let quick = [
            "--max-attempts",
            "2",
            "--backoff-base",
            "10ms",
            "--progress-every",
            "20ms",
        ];
        let run = job.run(&[&["-vv"][..], &quick].concat());
        assert_eq!(run.status.code(), Some(1), "{}", stderr(&run));
        let authorized = one.hits().iter().chain(two.hits().iter()).all(|hit| {
            hit.headers.iter().any(|(name, value)| {
                name.eq_ignore_ascii_case("authorization") && value.starts_with("Basic ")
            })
        });
        assert!(authorized, "the password in the URL was not used");
        assert!(
            stderr(&run).contains("user:***@"),
            "-vv names no URL: {}",
            stderr(&run)
        );

        // A done file goes missing, so that verify lists its URL.
        let done = &job.export()[&urls[0]];
        std::fs::remove_file(done["path"].as_str().unwrap()).unwrap();
        let mut outputs = vec![("run -vv".to_string(), run)];
        for args in [
            &["report"][..],
            &["report", "--json"],
            &["report", "--failed"],
            &["report", "--failed", "--json"],
            &["verify"],
            &["-v", "verify", "--requeue"],
            &["retry"],
        ] {
            outputs.push((format!("{args:?}"), job.jobrun(args)));
        }
        outputs.push((
            "run -vv --log-format json".into(),
            job.run(&[&["-vv", "--log-format", "json"][..], &quick].concat()),
        ));
        for (what, output) in &outputs {
            let text = printed(output);
            assert!(
                !text.contains(PASSWORD),
                "{what} shows the password:\n{text}"
            );
        }
        let shown = |what: &str| {
            let (_, output) = outputs.iter().find(|(w, _)| w == what).unwrap();
            printed(output)
        };
        for what in [
            r#"["report"]"#,
            r#"["report", "--json"]"#,
            r#"["report", "--failed"]"#,
            r#"["report", "--failed", "--json"]"#,
            r#"["verify"]"#,
            "run -vv --log-format json",
        ] {
            assert!(shown(what).contains("user:***@"), "{what}: {}", shown(what));
        }
        assert!(
            shown(r#"["report"]"#).contains("127.0.0.2:"),
            "no hosts listed"
        );

        // export prints the URL as imported: the row is the job's truth.
        let export = job.jobrun(&["export"]);
        assert!(stdout(&export).contains(PASSWORD), "{}", stdout(&export));
    }
}

#[test]
fn a_206_to_a_request_without_range_is_retried_never_saved_as_done() {
    let partial = || Reply::Full {
        status: 206,
        headers: vec![("Content-Range".into(), "bytes 0-9/1000".into())],
        body: b"0123456789".to_vec(),
    };
    let server = Server::start(move |request| match request.path.as_str() {
        "/partial" | "/ranged" => partial(),
        _ => Reply::status(404),
    });
    let job = Job::new();
    let unasked = server.url("/partial");
    let asked = server.url("/ranged");
    let imported = import_file(
        &job,
        "urls.jsonl",
        &[
            &format!(r#"{{"url": "{unasked}"}}"#),
            &format!(r#"{{"url": "{asked}", "headers": {{"Range": "bytes=0-9"}}}}"#),
        ],
    );
    assert_success(&imported, "import");
    let run = job.run(&["--max-attempts", "2", "--backoff-base", "10ms"]);
    assert_eq!(run.status.code(), Some(1), "{}", stderr(&run));
    let rows = job.export();
    let row = &rows[&unasked];
    assert_eq!(row["state"], "failed", "{row}");
    assert_eq!(row["attempts"], 2, "a partial body is retried: {row}");
    assert_eq!(row["http_status"], 206, "{row}");
    let error = row["error"].as_str().unwrap();
    assert!(error.contains("no range was asked for"), "{error}");
    assert!(!std::path::Path::new(row["path"].as_str().unwrap()).exists());
    let ranged = &rows[&asked];
    assert_eq!(
        ranged["state"], "done",
        "a range asked for is kept: {ranged}"
    );
    let saved = std::fs::read(ranged["path"].as_str().unwrap()).unwrap();
    assert_eq!(saved, b"0123456789");
    assert!(job.temp_files().is_empty());

    // A Range sent with every request (--header) asks for a 206 too.
    let job = Job::new();
    job.import(std::slice::from_ref(&unasked));
    assert_success(
        &job.run(&["--header", "Range: bytes=0-9"]),
        "run --header Range",
    );
    assert_eq!(job.export()[&unasked]["state"], "done");
}

#[test]
fn deflate_br_and_zstd_bodies_are_saved_decoded_and_a_zstd_bomb_is_stopped_at_max_bytes() {
    const BOMB: u64 = 64 << 20;
    const ENCODINGS: [&str; 4] = ["gzip", "deflate", "br", "zstd"];
    let server = Server::start(|request| match item_of(&request.path) {
        Some(i) => Reply::encoded(ENCODINGS[i as usize % 4], &item_body(i)),
        None if request.path == "/bomb" => Reply::bomb("zstd", BOMB),
        None => Reply::status(404),
    });
    let Reply::Full { body: bomb, .. } = Reply::bomb("zstd", BOMB) else {
        unreachable!()
    };
    assert!(bomb.len() < 1_000_000, "the bomb itself is over the limit");
    let job = Job::new();
    let mut urls = item_urls(&server, 8);
    urls.push(server.url("/bomb"));
    job.import(&urls);
    let run = job.run(&["--max-bytes", "1MB"]);
    assert_eq!(run.status.code(), Some(1), "{}", stderr(&run));
    let rows = job.export();
    for (i, url) in urls[..8].iter().enumerate() {
        let row = &rows[url];
        assert_eq!(row["state"], "done", "{row}");
        let saved = std::fs::read(row["path"].as_str().unwrap()).unwrap();
        assert!(
            saved == item_body(i as u64),
            "{}: saved as sent, not decoded",
            ENCODINGS[i % 4]
        );
    }
    let bomb = &rows[&urls[8]];
    assert_eq!(bomb["state"], "failed", "{bomb}");
    assert_eq!(bomb["attempts"], 1, "{bomb}");
    let error = bomb["error"].as_str().unwrap();
    assert!(error.contains("body larger than --max-bytes"), "{error}");
    assert!(!std::path::Path::new(bomb["path"].as_str().unwrap()).exists());
    assert!(job.temp_files().is_empty());
    for hit in server.hits() {
        let accepted = hit
            .headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case("accept-encoding"))
            .map(|(_, value)| value.clone())
            .unwrap_or_default();
        for encoding in ENCODINGS {
            assert!(
                accepted.contains(encoding),
                "{encoding} not asked for: {accepted:?}"
            );
        }
    }
}

#[test]
fn waiting_for_a_retry_counts_only_urls_whose_retry_time_is_still_to_come() {
    let server = Server::start(|_| Reply::status(503));
    let job = Job::new();
    job.import(&[server.url("/a"), server.url("/b"), server.url("/c")]);
    // One failed attempt each, then stop: all three wait for a retry.
    let run = job.run(&["--max-attempts", "1"]);
    assert_eq!(run.status.code(), Some(1), "{}", stderr(&run));
    assert_success(&job.jobrun(&["retry"]), "retry");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let conn = job.sql();
    // /a is due since a minute, /b in an hour, /c was never tried.
    for (path, next) in [("/a", now - 60_000), ("/b", now + 3_600_000), ("/c", 0)] {
        conn.execute(
            "UPDATE urls SET next_attempt_at = ?1, attempts = 1
             WHERE (SELECT prefix FROM origins WHERE id = origin_id) || url = ?2",
            rusqlite::params![next, server.url(path)],
        )
        .unwrap();
    }
    drop(conn);
    let report = job.report_json();
    assert_eq!(report["pending"], 3, "{report}");
    assert_eq!(report["retry_waiting"], 1, "{report}");
    let text = stdout(&job.jobrun(&["report"]));
    assert!(text.contains("(1 waiting for a retry)"), "{text}");
}

on_both_backends! {
    fn export_csv_of_an_empty_database_prints_the_header(backend) {
        let job = Job::on(backend);
        assert_success(&import_file(&job, "urls.txt", &["# nothing yet"]), "import");
        let export = job.jobrun(&["export", "--format", "csv"]);
        assert_success(&export, "export --format csv");
        assert_eq!(
            stdout(&export),
            "url,state,path,http_status,attempts,bytes,sha256,error\n"
        );
    }
}

on_both_backends! {
    fn a_fragment_does_not_make_a_second_job(backend) {
        let server = item_server(Duration::ZERO);
        let url = server.url("/items/3.json");
        let job = Job::on(backend);
        let imported = import_file(
            &job,
            "urls.txt",
            &[&format!("{url}#1"), &format!("{url}#2")],
        );
        assert_success(&imported, "import");
        assert_stderr_contains(&imported, "1 imported, 1 duplicate, 0 rejected");
        job.run_ok(&[]);
        assert_eq!(server.hits_per_path().get("/items/3.json"), Some(&1));
        let rows = job.export();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(
            rows[&url]["state"], "done",
            "the URL is stored without its fragment"
        );
    }
}

on_both_backends! {
    fn a_url_without_a_host_is_rejected_not_guessed(backend) {
        let job = Job::on(backend);
        let imported = import_file(
            &job,
            "urls.txt",
            &["http://a.test/ok", "http:///x", "https:/y"],
        );
        assert_eq!(imported.status.code(), Some(1), "{}", stderr(&imported));
        let messages = stderr(&imported);
        for line in [2, 3] {
            let expected = format!("urls.txt:{line}: the URL has no host");
            assert!(messages.contains(&expected), "{expected}: {messages}");
        }
        let rows = job.export();
        assert_eq!(rows.keys().collect::<Vec<_>>(), ["http://a.test/ok"]);
    }
}

on_both_backends! {
    fn json_lines_names_with_control_characters_are_rejected(backend) {
        let job = Job::on(backend);
        let imported = import_file(
            &job,
            "urls.jsonl",
            &[
                r#"{"url": "http://a.test/1", "name": "one\ntwo.json"}"#,
                r#"{"url": "http://a.test/2", "name": "tab\tbed.json"}"#,
                r#"{"url": "http://a.test/3", "name": "c1\u009b.json"}"#,
                r#"{"url": "http://a.test/4", "name": "del\u007f.json"}"#,
                r#"{"url": "http://a.test/5", "name": "fine.json"}"#,
            ],
        );
        assert_eq!(imported.status.code(), Some(1), "{}", stderr(&imported));
        let messages = stderr(&imported);
        for line in 1..=4 {
            let expected = format!("urls.jsonl:{line}: \"name\" ");
            let shown = messages.lines().find(|m| m.contains(&expected));
            assert!(
                shown.is_some_and(|m| m.contains("control character")),
                "line {line}: {messages}"
            );
        }
        assert!(
            messages.contains("1 imported, 0 duplicate, 4 rejected"),
            "{messages}"
        );
    }
}

on_both_backends! {
    fn a_repeated_json_lines_request_with_another_name_is_rejected_with_the_name_it_has(backend) {
        let job = Job::on(backend);
        let post = r#""url": "http://a.test/orders", "method": "POST", "body": {"id": 1}"#;
        let imported = import_file(
            &job,
            "urls.jsonl",
            &[
                &format!(r#"{{{post}, "name": "first.json"}}"#),
                &format!(r#"{{{post}, "name": "second.json"}}"#),
                &format!(r#"{{{post}, "name": "first.json"}}"#),
                &format!(r#"{{{post}}}"#),
            ],
        );
        assert_eq!(imported.status.code(), Some(1), "{}", stderr(&imported));
        let messages = stderr(&imported);
        assert!(
            messages.contains(
                "urls.jsonl:2: the same request is already imported with the name \"first.json\", \
                 not \"second.json\""
            ),
            "{messages}"
        );
        assert!(
            messages.contains("1 imported, 2 duplicate, 1 rejected"),
            "{messages}"
        );
        let rows = job.export();
        assert!(
            rows["http://a.test/orders"]["path"]
                .as_str()
                .unwrap()
                .ends_with("/first.json")
        );
    }
}

on_both_backends! {
    fn host_content_length_and_hop_by_hop_headers_from_json_lines_are_rejected(backend) {
        let server = echo_server();
        let job = Job::on(backend);
        let url = server.url("/echo");
        let names = [
            "Host",
            "Content-Length",
            "transfer-encoding",
            "Connection",
            "Keep-Alive",
            "TE",
            "Trailer",
            "Upgrade",
            "Proxy-Connection",
        ];
        let mut lines: Vec<String> = names
            .iter()
            .map(|name| {
                format!(r#"{{"url": "{url}", "method": "POST", "body": "abc", "headers": {{"{name}": "99"}}}}"#)
            })
            .collect();
        lines.push(format!(
            r#"{{"url": "{url}", "method": "POST", "body": "abc", "headers": {{"X-Fine": "1"}}}}"#
        ));
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        let imported = import_file(&job, "urls.jsonl", &lines);
        assert_eq!(imported.status.code(), Some(1), "{}", stderr(&imported));
        let messages = stderr(&imported);
        for (i, name) in names.iter().enumerate() {
            let expected = format!(
                "urls.jsonl:{}: \"headers\": {name:?} cannot be given",
                i + 1
            );
            assert!(messages.contains(&expected), "{expected}: {messages}");
        }
        assert!(
            messages.contains("1 imported, 0 duplicate, 9 rejected"),
            "{messages}"
        );
        job.run_ok(&["--timeout", "10s"]);
        let hits = server.hits();
        assert_eq!(hits.len(), 1);
        let sent = |name: &str| {
            hits[0]
                .headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        assert_eq!(sent("x-fine").as_deref(), Some("1"));
        assert_eq!(sent("content-length").as_deref(), Some("3"));
    }
}

#[test]
fn numeric_options_are_refused_with_their_real_limits() {
    let job = Job::new();
    for (args, says, not_said) in [
        (
            "run --rate 1e309",
            "more than 1,000,000 requests per second",
            "above zero",
        ),
        (
            "run --rate 1e-300",
            "less than one request a day",
            "not a rate",
        ),
        ("run --rate NaN", "not a rate like", "above zero"),
        (
            "run --per-host-rate inf",
            "more than 1,000,000 requests per second",
            "above zero",
        ),
        (
            "run --workers 100001",
            "more than 100,000",
            "not a whole number",
        ),
        (
            "run --workers 99999999999999999999999",
            "more than 100,000",
            "not a whole number",
        ),
        (
            "run --max-attempts 99999999999",
            "more than 1,000,000",
            "not a whole number",
        ),
        (
            "run --timeout 1000000y",
            "longer than 24h",
            "not a duration",
        ),
        (
            "run --max-bytes 99999999999TB",
            "more than 8 EiB",
            "not a size",
        ),
        ("retry --status 99999", "from 100 to 999", "too large"),
    ] {
        let args: Vec<&str> = args.split(' ').collect();
        let output = job.jobrun(&args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let message = stderr(&output);
        assert!(message.contains(says), "{args:?}: {message}");
        assert!(!message.contains(not_said), "{args:?}: {message}");
    }
    assert!(!job.db().exists(), "a refused command touched the database");
}

#[test]
fn a_stored_request_with_a_framing_header_fails_without_being_sent() {
    // A row imported before such headers were refused at import.
    let server = echo_server();
    let job = Job::new();
    let url = server.url("/echo");
    let line = format!(r#"{{"url": "{url}", "method": "POST", "body": "abc"}}"#);
    assert_success(&import_file(&job, "urls.jsonl", &[&line]), "import");
    job.sql()
        .execute(
            r#"UPDATE urls SET request = '{"method":"POST","headers":{"Content-Length":"99"},"body":"abc"}'"#,
            [],
        )
        .unwrap();
    let run = job.run(&["--timeout", "10s"]);
    assert_eq!(run.status.code(), Some(1), "{}", stderr(&run));
    let row = &job.export()[&url];
    assert_eq!(row["state"], "failed", "{row}");
    let error = row["error"].as_str().unwrap();
    assert!(
        error.contains("\"Content-Length\" cannot be given"),
        "{error}"
    );
    assert_eq!(server.hit_count(), 0, "the request was sent");
}
