//! Limits against servers that send too much, too slowly, or send the
//! client round in circles: --max-bytes (counted after decoding, so a gzip
//! bomb is caught), gzip bodies, a body dripping past --timeout, and
//! redirects: chains, loops, other hosts, other schemes.

mod support;

use std::io::Read;
use std::time::Duration;

use support::*;

/// Runs one job over `paths` of `server`; returns the export by path.
fn run_paths(
    server: &Server,
    paths: &[&str],
    args: &[&str],
) -> (Job, std::process::Output, Vec<serde_json::Value>) {
    let job = Job::new();
    let urls: Vec<String> = paths.iter().map(|p| server.url(p)).collect();
    job.import(&urls);
    let output = job.run(args);
    let rows = job.export();
    let rows = urls.iter().map(|url| rows[url].clone()).collect();
    (job, output, rows)
}

/// The row failed for good on its first attempt with `error`, and left no
/// file behind, temp or final.
fn assert_failed_for_good(job: &Job, row: &serde_json::Value, error: &str) {
    assert_eq!(row["state"], "failed", "{row}");
    assert_eq!(row["attempts"], 1, "retried: {row}");
    let message = row["error"].as_str().unwrap();
    assert!(message.contains(error), "{message}");
    assert!(
        !std::path::Path::new(row["path"].as_str().unwrap()).exists(),
        "a file was left: {row}"
    );
    assert!(job.temp_files().is_empty(), "temp files were left");
}

#[test]
fn a_body_over_max_bytes_fails_for_good_and_leaves_no_file() {
    let server = Server::start(|request| match request.path.as_str() {
        "/declared" => Reply::Huge {
            length: 3_000_000,
            declared: true,
        },
        "/undeclared" => Reply::Huge {
            length: 3_000_000,
            declared: false,
        },
        "/at-the-limit" => Reply::Huge {
            length: 1_000_000,
            declared: false,
        },
        _ => Reply::status(404),
    });
    let (job, output, rows) = run_paths(
        &server,
        &["/declared", "/undeclared", "/at-the-limit"],
        &["--max-bytes", "1MB"],
    );
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let expected = "body larger than --max-bytes (1,000,000 bytes)";
    assert_failed_for_good(&job, &rows[0], expected);
    assert_failed_for_good(&job, &rows[1], expected);
    assert_eq!(
        rows[2]["state"], "done",
        "a body of exactly the limit is kept"
    );
    let kept = std::fs::read(rows[2]["path"].as_str().unwrap()).unwrap();
    assert_eq!(kept.len(), 1_000_000);
    assert!(
        kept.iter()
            .enumerate()
            .all(|(i, &b)| b == huge_byte(i as u64))
    );
    assert_eq!(
        server.hit_count(),
        3,
        "a body over the limit was fetched again"
    );
}

#[test]
fn a_huge_body_within_the_default_limit_is_kept_whole() {
    const LENGTH: u64 = 40 << 20;
    let server = Server::start(|_| Reply::Huge {
        length: LENGTH,
        declared: false,
    });
    let (_job, output, rows) = run_paths(&server, &["/huge"], &[]);
    assert_success(&output, "run");
    assert_eq!(rows[0]["bytes"], LENGTH);
    let mut file = std::fs::File::open(rows[0]["path"].as_str().unwrap()).unwrap();
    let mut chunk = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    loop {
        let n = file.read(&mut chunk).unwrap();
        if n == 0 {
            break;
        }
        for &byte in &chunk[..n] {
            assert_eq!(byte, huge_byte(offset), "byte {offset}");
            offset += 1;
        }
    }
    assert_eq!(offset, LENGTH);
}

#[test]
fn gzip_bodies_are_saved_decoded_and_a_gzip_bomb_is_stopped_at_max_bytes() {
    const BOMB: u64 = 64 << 20;
    let server = Server::start(|request| match item_of(&request.path) {
        Some(i) => Reply::gzip(&item_body(i)),
        None if request.path == "/bomb" => Reply::gzip_bomb(BOMB),
        None => Reply::status(404),
    });
    let Reply::Full { body: bomb, .. } = Reply::gzip_bomb(BOMB) else {
        unreachable!()
    };
    assert!(bomb.len() < 1_000_000, "the bomb itself is over the limit");
    let (job, output, rows) = run_paths(
        &server,
        &["/items/1.json", "/items/2.json", "/bomb"],
        &["--max-bytes", "1MB"],
    );
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    for (i, row) in rows[..2].iter().enumerate() {
        assert_eq!(row["state"], "done", "{row}");
        let saved = std::fs::read(row["path"].as_str().unwrap()).unwrap();
        assert_eq!(saved, item_body(i as u64 + 1), "saved as sent, not decoded");
    }
    assert_failed_for_good(&job, &rows[2], "body larger than --max-bytes");
    let asked_for_gzip = server.hits().iter().all(|hit| {
        hit.headers
            .iter()
            .any(|(n, v)| n.eq_ignore_ascii_case("accept-encoding") && v.contains("gzip"))
    });
    assert!(asked_for_gzip, "gzip was not asked for");
}

/// `/chain/N` redirects to `/chain/N-1`, `/chain/0` is item 0; `/loop/a`
/// and `/loop/b` send each other round; `/away` goes to `other`;
/// `/scheme/X` redirects to a URL with scheme X.
fn redirecting_server(other: &str) -> Server {
    let other = other.to_string();
    Server::start(move |request| {
        let path = request.path.as_str();
        if let Some(n) = path.strip_prefix("/chain/") {
            return match n.parse::<u32>().unwrap() {
                0 => Reply::ok(item_body(0)),
                n => Reply::redirect(302, &format!("/chain/{}", n - 1)),
            };
        }
        match path {
            "/loop/a" => Reply::redirect(301, "/loop/b"),
            "/loop/b" => Reply::redirect(308, "/loop/a"),
            "/away" => Reply::redirect(307, &format!("{other}/items/5.json")),
            "/scheme/ftp" => Reply::redirect(302, "ftp://127.0.0.1/file"),
            "/scheme/file" => Reply::redirect(302, "file:///etc/passwd"),
            "/scheme/data" => Reply::redirect(303, "data:text/plain,hello"),
            _ => Reply::status(404),
        }
    })
}

#[test]
fn redirects_are_followed_up_to_ten_and_never_in_loops_or_to_other_schemes() {
    let other = item_server(Duration::ZERO);
    let server = redirecting_server(&other.url(""));
    let (job, output, rows) = run_paths(
        &server,
        &[
            "/chain/10",
            "/chain/11",
            "/loop/a",
            "/away",
            "/scheme/ftp",
            "/scheme/file",
            "/scheme/data",
        ],
        &["--header", "Authorization: Bearer s3cret"],
    );
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));

    assert_eq!(rows[0]["state"], "done", "ten redirects are allowed");
    let saved = std::fs::read(rows[0]["path"].as_str().unwrap()).unwrap();
    assert_eq!(saved, item_body(0));
    assert_failed_for_good(&job, &rows[1], "more than 10 redirects");
    assert_failed_for_good(&job, &rows[2], "redirect loop");
    assert_eq!(
        rows[3]["state"], "done",
        "another host is fine: {}",
        rows[3]
    );
    let saved = std::fs::read(rows[3]["path"].as_str().unwrap()).unwrap();
    assert_eq!(saved, item_body(5));
    for (row, scheme) in rows[4..].iter().zip(["ftp", "file", "data"]) {
        let expected = format!("redirected to a URL with scheme \"{scheme}\"");
        assert_failed_for_good(&job, row, &expected);
    }
    // Credentials are not handed to another host.
    let sent_away = &other.hits()[0];
    assert!(
        !sent_away
            .headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("authorization")),
        "Authorization followed the redirect to another host"
    );
    let hits = server.hits_per_path();
    assert_eq!(hits["/chain/11"], 1);
    assert_eq!(hits["/chain/0"], 1, "only the chain of ten reached its end");
    assert_eq!(hits["/loop/a"], 1);
    assert_eq!(hits["/loop/b"], 1);
}

#[test]
fn gateway_errors_are_retried() {
    let server = faulty_item_server(Duration::ZERO, |_, earlier| match earlier {
        0 => Some(Reply::status(502)),
        1 => Some(Reply::status(504)),
        _ => None,
    });
    let (job, urls) = Job::with_items(&server, 3);
    job.run_ok(&["--backoff-base", "5ms"]);
    job.assert_all_files_right(&server, &urls);
    for row in job.export().values() {
        assert_eq!(row["attempts"], 3, "{row}");
    }
}

#[test]
fn a_body_dripping_past_the_timeout_is_cut_and_retried() {
    // 400 bytes, one every 5 ms: two seconds for a body the timeout of
    // 300 ms covers as well as the headers.
    let server = faulty_item_server(Duration::ZERO, |item, earlier| {
        (earlier == 0).then(|| Reply::Drip {
            body: item_body(item)[..400].to_vec(),
            gap: Duration::from_millis(5),
        })
    });
    let (job, urls) = Job::with_items(&server, 2);
    let output = job.run(&["--timeout", "300ms", "--backoff-base", "5ms"]);
    assert_success(&output, "run");
    job.assert_all_files_right(&server, &urls);
    // Had the timeout covered only the headers, the drip would have ended
    // in a done URL after one attempt.
    for row in job.export().values() {
        assert_eq!(row["attempts"], 2, "{row}");
    }
}
