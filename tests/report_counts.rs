//! The counters `report` reads must say what the rows say: after runs with
//! every kind of outcome on several origins, a `kill -9` mid-run, a resume,
//! `jobrun retry`, and rows edited by hand as with the sqlite3 shell.

mod support;

use std::time::Duration;

use support::*;

/// What the counters say (the rows not folded into them yet included),
/// beside what a count of every row says: by origin, state and last status
/// with the bytes of done rows, then the last errors of rows not done.
fn counters_and_recount(job: &Job) -> (Vec<String>, Vec<String>) {
    let conn = job.sql();
    let lines = |sql: &str| -> Vec<String> {
        let mut statement = conn.prepare(sql).unwrap();
        statement
            .query_map([], |row| {
                let columns = (0..4)
                    .map(|i| row.get::<_, rusqlite::types::Value>(i))
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(format!("{columns:?}"))
            })
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    };
    const COUNTED: &str = "CASE WHEN state = 'running' THEN 'pending' ELSE state END";
    const DONE_BYTES: &str = "CASE WHEN state = 'done' THEN coalesce(bytes, 0) ELSE 0 END";
    let counters = [
        lines(&format!(
            "SELECT origin_id || ' ' || state, status, sum(rows), sum(bytes) FROM (
                 SELECT origin_id, state, status, rows, bytes FROM tallies
                 UNION ALL
                 SELECT origin_id, {COUNTED}, coalesce(http_status, 0), 1, {DONE_BYTES}
                 FROM urls WHERE id > (SELECT id FROM tallied))
             GROUP BY origin_id, state, status HAVING sum(rows) <> 0 OR sum(bytes) <> 0
             ORDER BY 1, 2"
        )),
        lines(
            "SELECT error, '', sum(rows), 0 FROM (
                 SELECT error, rows FROM error_tallies
                 UNION ALL
                 SELECT error, 1 FROM urls
                 WHERE id > (SELECT id FROM tallied) AND error IS NOT NULL AND state <> 'done')
             GROUP BY error HAVING sum(rows) <> 0 ORDER BY 1",
        ),
    ]
    .concat();
    let recount = [
        lines(&format!(
            "SELECT origin_id || ' ' || {COUNTED}, coalesce(http_status, 0), count(*),
                 sum({DONE_BYTES})
             FROM urls GROUP BY 1, 2 ORDER BY 1, 2"
        )),
        lines(
            "SELECT error, '', count(*), 0 FROM urls
             WHERE error IS NOT NULL AND state <> 'done' GROUP BY error ORDER BY 1",
        ),
    ]
    .concat();
    (counters, recount)
}

fn assert_counters_right(job: &Job, when: &str) {
    let (counters, recount) = counters_and_recount(job);
    assert_eq!(counters, recount, "the counters {when}");
}

/// Items answered by kind: a 404 (failed at once), a 503 then the body, a
/// 429 with Retry-After then the body, a 500 every time (failed when its
/// attempts run out), and otherwise the body; each after a few milliseconds,
/// so that a run can be killed in the middle.
fn mixed_server() -> Server {
    Server::start(|request| {
        let Some(item) = item_of(&request.path) else {
            return Reply::status(404);
        };
        let first = request.previous == 0;
        let reply = match item % 7 {
            0 => Reply::status(404),
            1 if first => Reply::status(503),
            2 if first => Reply::status(429).with_header("Retry-After", "1"),
            3 => Reply::status(500),
            _ => Reply::ok(item_body(item)),
        };
        reply.jittered(Duration::from_millis(1), Duration::from_millis(6))
    })
}

#[test]
fn the_counters_say_what_the_rows_say_through_kills_resumes_retries_and_edits() {
    let servers = [mixed_server(), mixed_server(), mixed_server()];
    let urls: Vec<String> = (0..150)
        .map(|i| servers[i % 3].url(&format!("/items/{i}.json")))
        .collect();
    let job = Job::with_urls(&urls);
    assert_counters_right(&job, "after the import");
    let args = [
        "--workers",
        "6",
        "--max-attempts",
        "2",
        "--backoff-base",
        "5ms",
        "--backoff-max",
        "20ms",
    ];

    // Killed with rows claimed and outcomes of every kind recorded.
    let hits = || servers.iter().map(Server::hit_count).sum::<usize>();
    let mut run = job.spawn_run(&args);
    wait_for(Duration::from_secs(30), "60 requests", || hits() >= 60);
    signal(&run, libc::SIGKILL);
    run.wait().unwrap();
    assert!(hits() < 170, "the run finished before the kill");
    assert_counters_right(&job, "after kill -9");

    // The resumed run takes the killed run's rows back and ends with the
    // 404s and 500s failed.
    let output = job.run(&args);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let failing = (0..150).filter(|i| i % 7 == 0 || i % 7 == 3).count();
    let report = job.report_json();
    assert_eq!(report["failed"], failing, "{report}");
    assert_eq!(report["done"], 150 - failing, "{report}");
    assert_counters_right(&job, "after the resumed run");

    let output = job.jobrun(&["retry", "--status", "404"]);
    assert_success(&output, "retry");
    assert_counters_right(&job, "after retry");

    // Rows changed by hand, as with the sqlite3 shell.
    job.sql()
        .execute_batch(
            "UPDATE urls SET state = 'pending', http_status = NULL, error = 'edited by hand'
             WHERE id % 5 = 0;
             UPDATE urls SET state = 'failed', http_status = 410, error = 'gone by hand'
             WHERE id % 5 = 1 AND state = 'done';
             UPDATE urls SET bytes = bytes + 1 WHERE state = 'done';",
        )
        .unwrap();
    assert_counters_right(&job, "after rows were edited by hand");

    let output = job.run(&args);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert_counters_right(&job, "after the last run");
}
