//! Security: TLS certificates are checked unless --insecure says not to,
//! --header values stay out of everything jobrun writes or prints even when
//! everything goes wrong, and no recorded file name leads outside --out.

mod support;

use std::time::Duration;

use support::*;

#[test]
fn a_self_signed_certificate_is_refused_unless_insecure() {
    let server = Server::start_tls(|request| match item_of(&request.path) {
        Some(i) => Reply::ok(item_body(i)),
        None => Reply::status(404),
    });
    let urls = item_urls(&server, 3);
    assert!(urls[0].starts_with("https://127.0.0.1:"));

    let job = Job::with_urls(&urls);
    let output = job.run(&[]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    for row in job.export().values() {
        assert_eq!(row["state"], "failed", "{row}");
        assert_eq!(row["attempts"], 1, "a refused certificate is not retried");
        let error = row["error"].as_str().unwrap();
        assert!(
            error.starts_with("TLS certificate not trusted: invalid peer certificate")
                && error.ends_with(
                    "(--cacert FILE trusts a private CA; --insecure accepts any certificate)"
                ),
            "{error}"
        );
    }
    assert_eq!(
        server.hit_count(),
        0,
        "a request went to an untrusted server"
    );
    assert!(job.files().is_empty());

    let job = Job::with_urls(&urls);
    assert_success(&job.run(&["--insecure"]), "run --insecure");
    job.assert_all_files_right(&server, &urls);
}

/// Everything a job leaves that a person or another program may read: the
/// database and its WAL, and what report and export print.
fn everything_written(job: &Job) -> Vec<(String, Vec<u8>)> {
    let mut written = vec![
        ("jobrun.db".to_string(), std::fs::read(job.db()).unwrap()),
        (
            "jobrun.db-wal".to_string(),
            std::fs::read(job.dir().join("jobrun.db-wal")).unwrap_or_default(),
        ),
    ];
    for args in [
        &["report"][..],
        &["report", "--json"],
        &["export"],
        &["export", "--format", "csv"],
    ] {
        let output = job.jobrun(args);
        written.push((format!("{args:?}"), [output.stdout, output.stderr].concat()));
    }
    written
}

#[test]
fn header_values_stay_secret_whatever_goes_wrong() {
    const SECRETS: [&str; 2] = ["s3cret-bearer", "s3cret-key"];
    let other = item_server(Duration::ZERO);
    let away = other.url("/items/1.json");
    let server = Server::start(move |request| match request.path.as_str() {
        "/500" => Reply::status(500),
        "/404" => Reply::status(404),
        "/reset" => Reply::ResetMidBody {
            body: item_body(1),
            sent: 100,
        },
        "/loop" => Reply::redirect(302, "/loop"),
        "/away" => Reply::redirect(302, &away),
        "/stall" => Reply::Stall(Duration::from_secs(5)),
        "/slow" => Reply::ok(item_body(2)).delayed(Duration::from_secs(5)),
        _ => Reply::status(404),
    });
    let job = Job::new();
    let paths = [
        "/500", "/404", "/reset", "/loop", "/away", "/stall", "/slow",
    ];
    let mut urls: Vec<String> = paths.iter().map(|p| server.url(p)).collect();
    urls.push("http://127.0.0.1:1/refused".into());
    job.import(&urls);
    let args = [
        "--header",
        "Authorization: Bearer s3cret-bearer",
        "--header=X-Api-Key: s3cret-key",
        "--timeout",
        "500ms",
        "--backoff-base",
        "10ms",
        "--max-attempts",
        "2",
    ];

    // A run killed in the middle records its command for the resume hint.
    let child = job.spawn_run(&args);
    wait_for(Duration::from_secs(30), "the slow request", || {
        server.hits_per_path().contains_key("/slow")
    });
    signal(&child, libc::SIGKILL);
    let killed = child.wait_with_output().unwrap();
    let mut printed = vec![("killed run".to_string(), killed.stderr)];
    printed.extend(everything_written(&job));
    let resumed = job.run(&args);
    assert_eq!(resumed.status.code(), Some(1), "{}", stderr(&resumed));
    printed.push(("resumed run".into(), resumed.stderr));
    printed.extend(everything_written(&job));

    let report = job.report_json();
    assert!(
        report["errors"].as_array().unwrap().len() >= 4,
        "the failures did not happen: {report}"
    );
    for (what, bytes) in &printed {
        for secret in SECRETS {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{secret} is in {what}"
            );
        }
    }
    // The headers were sent, so they had something to leak.
    let sent = server.hits()[0].headers.clone();
    assert!(sent.iter().any(|(_, v)| v == "Bearer s3cret-bearer"));
    assert!(sent.iter().any(|(_, v)| v == "s3cret-key"));
}

#[test]
fn a_recorded_file_name_that_leads_outside_out_is_refused() {
    let server = item_server(Duration::ZERO);
    let (job, urls) = Job::with_items(&server, 4);
    let outside = job.dir().join("outside.json");
    let bad_names = [
        "../escaped.json".to_string(),
        outside.display().to_string(),
        format!("{TEMP_DIR}/run-1/1"),
    ];
    // A database edited by hand, or by a tool that does not know the rules.
    let sql = job.sql();
    for (i, name) in bad_names.iter().enumerate() {
        sql.execute(
            "UPDATE urls SET path = ?1
             WHERE (SELECT prefix FROM origins WHERE id = origin_id) || url = ?2",
            rusqlite::params![name, urls[i]],
        )
        .unwrap();
    }
    drop(sql);

    let output = job.run(&[]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let rows = job.export();
    for (url, name) in urls.iter().zip(&bad_names) {
        let row = &rows[url];
        assert_eq!(row["state"], "failed", "{row}");
        let error = row["error"].as_str().unwrap();
        assert!(error.contains(&format!("{name:?}")), "{error}");
    }
    assert_eq!(rows[&urls[3]]["state"], "done");
    assert!(!job.dir().join("escaped.json").exists());
    assert!(!outside.exists());
    assert_eq!(server.hit_count(), 1, "a refused URL was fetched");
    assert!(!job.out().join(TEMP_DIR).exists());
}
