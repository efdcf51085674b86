//! Store-level tests against a real PostgreSQL: `JOBRUN_TEST_PG`, by
//! default postgres://postgres@127.0.0.1:5432/test. Each test works in a
//! schema of its own, dropped at the end. A server that cannot be reached
//! fails the tests: they never skip.

use std::time::Duration;

use crate::store::Result;

use super::*;
use crate::clock::now_ms;
use crate::domain::{Fetched, Lease, Validators};
use crate::store::{Open, contract};

pub(crate) fn test_url() -> String {
    std::env::var("JOBRUN_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

fn test_limit() -> std::sync::Arc<bounded::AnswerLimit> {
    bounded::AnswerLimit::new(test_url(), Duration::from_secs(30), Duration::ZERO)
}

/// A schema of its own on the test server, dropped when this goes.
pub(crate) struct Schema {
    pub url: String,
    name: String,
}

impl Schema {
    pub(crate) fn new() -> Schema {
        let base = test_url();
        let name = format!("jobrun_test_{}_{:x}", std::process::id(), fastrand::u64(..));
        let mut admin = connect::connect(&base, Duration::from_secs(5), test_limit())
            .expect("the test PostgreSQL server (JOBRUN_TEST_PG) must be reachable");
        admin
            .batch_execute(&format!("CREATE SCHEMA {name}"))
            .expect("cannot create a test schema");
        let separator = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{separator}options=-c%20search_path%3D{name}");
        Schema { url, name }
    }

    pub(crate) fn open(&self) -> PostgresStore {
        self.open_with_lease(None)
    }

    pub(crate) fn open_with_lease(&self, lease: Option<Duration>) -> PostgresStore {
        let options = OpenOptions {
            mode: Open::CreateIfMissing,
            lease,
            lock_wait: Duration::from_secs(5),
            ..OpenOptions::new(Open::CreateIfMissing)
        };
        PostgresStore::open(&self.url, &options).unwrap()
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        if let Ok(mut admin) = connect::connect(&test_url(), Duration::from_secs(5), test_limit()) {
            let _ = admin.batch_execute(&format!("DROP SCHEMA {} CASCADE", self.name));
        }
    }
}

fn me(pid: u32) -> RunStart {
    RunStart {
        pid,
        pid_ns: None,
        host: "test-host".to_string(),
        boot_id: "boot".to_string(),
        proc_start: 1,
        command: "jobrun run".to_string(),
    }
}

fn alive(_: &RunInfo) -> Liveness {
    Liveness::Alive
}

fn import(store: &mut PostgresStore, urls: &[(&str, &str)]) -> Vec<InsertResult> {
    let owned: Vec<(String, String, String)> = urls
        .iter()
        .map(|(url, host)| (url.to_string(), host.to_string(), format!("{url}.body")))
        .collect();
    let batch: Vec<NewUrl<'_>> = owned
        .iter()
        .map(|(url, host, path)| NewUrl {
            url,
            request: None,
            request_hash: "",
            host,
            path,
            named: false,
        })
        .collect();
    store.import(&batch).unwrap()
}

fn claim(store: &mut PostgresStore, run: RunId, n: usize) -> Vec<Claim> {
    store
        .complete_and_claim(run, &[], n, &HostFilter::default(), Work::Fetch)
        .unwrap()
}

fn done(claim: &Claim, bytes: u64) -> Completion {
    Completion::Done {
        id: claim.id,
        lease: claim.lease,
        fetched: Fetched {
            status: 200,
            bytes,
            sha256: [7; 32],
            millis: 12,
            validators: Validators::default(),
        },
    }
}

fn counts(store: &PostgresStore) -> (u64, u64, u64, u64) {
    let c = store.state_counts().unwrap();
    (c.pending, c.running, c.done, c.failed)
}

#[test]
fn claims_and_outcomes_keep_the_counters() -> Result<()> {
    let schema = Schema::new();
    let mut store = schema.open();
    let results = import(
        &mut store,
        &[
            ("a1", "a"),
            ("a2", "a"),
            ("a3", "a"),
            ("b1", "b"),
            ("b2", "b"),
        ],
    );
    assert!(results.iter().all(|r| *r == InsertResult::Inserted));
    let run = store.start_run(&me(1), &alive)?.id;
    let claims = claim(&mut store, run, 4);
    assert_eq!(claims.len(), 4);
    assert!(
        claims
            .iter()
            .all(|c| c.lease.run == run && c.lease.fence == 1)
    );
    assert_eq!(counts(&store), (1, 4, 0, 0));
    let outcomes = vec![
        done(&claims[0], 100),
        Completion::Retry {
            id: claims[1].id,
            lease: claims[1].lease,
            status: Some(503),
            error: "HTTP 503".to_string(),
            next_attempt_at: now_ms() + 60_000,
            millis: 5,
        },
        Completion::Failed {
            id: claims[2].id,
            lease: claims[2].lease,
            status: Some(404),
            error: "HTTP 404".to_string(),
            millis: 5,
        },
        Completion::Unstarted {
            id: claims[3].id,
            lease: claims[3].lease,
        },
    ];
    let more = store.complete_and_claim(run, &outcomes, 0, &HostFilter::default(), Work::Fetch)?;
    assert!(more.is_empty());
    assert_eq!(counts(&store), (3, 0, 1, 1));
    let summary = store.summary(5)?;
    assert_eq!(summary.counts.total, 5);
    assert_eq!(summary.counts.retry_waiting, 1);
    assert_eq!(summary.bytes, 100);
    let statuses: Vec<(u16, u64)> = summary
        .http_statuses
        .iter()
        .map(|s| (s.status, s.count))
        .collect();
    assert_eq!(statuses, [(200, 1), (404, 1), (503, 1)]);
    let errors: Vec<(&str, u64)> = summary
        .errors
        .iter()
        .map(|e| (e.error.as_str(), e.count))
        .collect();
    assert_eq!(errors, [("HTTP 404", 1), ("HTTP 503", 1)]);
    let hosts: Vec<(&str, u64, u64, u64)> = summary
        .hosts
        .iter()
        .map(|h| (h.host.as_str(), h.total, h.answers, h.status_503))
        .collect();
    assert_eq!(hosts, [("a", 3, 3, 1), ("b", 2, 0, 0)]);
    assert_eq!(summary.durations.map(|d| d.requests), Some(3));
    assert_eq!(store.requeue_failed(Some(404), None)?, 1);
    assert_eq!(counts(&store), (4, 0, 1, 0));
    // A second connection's counts add up with the first's.
    let mut other = schema.open();
    let run2 = other.start_run(&me(2), &alive)?.id;
    let claims = claim(&mut other, run2, 10);
    assert_eq!(claims.len(), 3, "the retry is not due yet");
    let outcomes: Vec<Completion> = claims.iter().map(|c| done(c, 1)).collect();
    other.complete_and_claim(run2, &outcomes, 0, &HostFilter::default(), Work::Fetch)?;
    assert_eq!(counts(&store), (1, 0, 4, 0));
    let mut exported = Vec::new();
    store.export(&mut |row| {
        exported.push((row.url, row.state));
        Ok(())
    })?;
    assert_eq!(exported.len(), 5);
    Ok(())
}

/// Every counter report reads against a count of the rows themselves.
fn assert_counters_match_rows(store: &PostgresStore, answers_are_attempts: bool) {
    let summary = store.summary(100).unwrap();
    let mut client = store.client().unwrap();
    let mut by_state = StateCounts::default();
    for row in client
        .query("SELECT state, count(*) FROM jobs GROUP BY state", &[])
        .unwrap()
    {
        let rows = count(row.get(1));
        by_state.total += rows;
        match row.get::<_, &str>(0) {
            "pending" => by_state.pending = rows,
            "running" => by_state.running = rows,
            "done" => by_state.done = rows,
            _ => by_state.failed = rows,
        }
    }
    let counted = &summary.counts;
    assert_eq!(
        (counted.total, counted.pending, counted.running),
        (by_state.total, by_state.pending, by_state.running)
    );
    assert_eq!(
        (counted.done, counted.failed),
        (by_state.done, by_state.failed)
    );
    let bytes: i64 = client
        .query_one(
            "SELECT coalesce(sum(bytes), 0)::bigint FROM jobs WHERE state = 'done'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(summary.bytes, count(bytes));
    let statuses: Vec<(u16, u64)> = client
        .query(
            "SELECT http_status, count(*) FROM jobs WHERE http_status > 0
             GROUP BY http_status ORDER BY http_status",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get::<_, i32>(0) as u16, count(row.get(1))))
        .collect();
    let counted: Vec<(u16, u64)> = summary
        .http_statuses
        .iter()
        .map(|s| (s.status, s.count))
        .collect();
    assert_eq!(counted, statuses);
    let hosts: Vec<(String, u64, u64, u64, u64, u64)> = client
        .query(
            "SELECT host, count(*), count(*) FILTER (WHERE state IN ('pending', 'running')),
                 count(*) FILTER (WHERE state = 'done'), count(*) FILTER (WHERE state = 'failed'),
                 sum(attempts)::bigint
             FROM jobs GROUP BY host ORDER BY host",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| {
            (
                row.get(0),
                count(row.get(1)),
                count(row.get(2)),
                count(row.get(3)),
                count(row.get(4)),
                count(row.get(5)),
            )
        })
        .collect();
    let counted: Vec<(String, u64, u64, u64, u64, u64)> = summary
        .hosts
        .iter()
        .map(|h| {
            let answers = if answers_are_attempts { h.answers } else { 0 };
            (
                h.host.clone(),
                h.total,
                h.pending,
                h.done,
                h.failed,
                answers,
            )
        })
        .collect();
    let hosts: Vec<_> = hosts
        .into_iter()
        .map(|(host, total, pending, done, failed, attempts)| {
            let attempts = if answers_are_attempts { attempts } else { 0 };
            (host, total, pending, done, failed, attempts)
        })
        .collect();
    assert_eq!(counted, hosts);
    let errors: Vec<(String, u64)> = client
        .query(
            "SELECT error, count(*) FROM jobs WHERE state <> 'done' AND error IS NOT NULL
             GROUP BY error ORDER BY 2 DESC, 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get(0), count(row.get(1))))
        .collect();
    let counted: Vec<(String, u64)> = summary
        .errors
        .iter()
        .map(|e| (e.error.clone(), e.count))
        .collect();
    assert_eq!(counted, errors);
}

#[test]
fn counters_equal_a_count_of_the_rows_through_claims_outcomes_rescues_and_folds() -> Result<()> {
    let schema = Schema::new();
    let mut store = schema.open();
    let hosts = ["a", "b", "c", "d", "e", "f", "g"];
    let names: Vec<(String, &str)> = (0..300)
        .map(|i| (format!("u{i}"), hosts[i % hosts.len()]))
        .collect();
    let mut lines: Vec<(&str, &str)> = names.iter().map(|(u, h)| (u.as_str(), *h)).collect();
    // Duplicates within the batch and of earlier imports count nothing.
    lines.extend_from_slice(&[("u1", "b"), ("u2", "c")]);
    import(&mut store, &lines[..150]);
    import(&mut store, &lines[100..]);
    assert_counters_match_rows(&store, true);
    let run = store.start_run(&me(1), &alive)?.id;
    let mut outcomes = Vec::new();
    // Small batches, so that far more than 16 changes per host are written
    // and folded on the way.
    for round in 0..120 {
        let claims =
            store.complete_and_claim(run, &outcomes, 3, &HostFilter::default(), Work::Fetch)?;
        outcomes = claims
            .iter()
            .enumerate()
            .map(|(i, c)| match (round + i) % 6 {
                0 | 1 => done(c, (round * 10 + i) as u64),
                2 => Completion::Retry {
                    id: c.id,
                    lease: c.lease,
                    status: Some(503),
                    error: "HTTP 503".to_string(),
                    next_attempt_at: now_ms() - 1,
                    millis: 5,
                },
                3 => Completion::Failed {
                    id: c.id,
                    lease: c.lease,
                    status: Some(404 + (round % 2) as u16),
                    error: format!("HTTP {}", 404 + round % 2),
                    millis: 5,
                },
                4 => Completion::Interrupted {
                    id: c.id,
                    lease: c.lease,
                },
                _ => Completion::Unstarted {
                    id: c.id,
                    lease: c.lease,
                },
            })
            .collect();
        if round % 40 == 0 {
            assert_counters_match_rows(&store, true);
        }
    }
    assert_counters_match_rows(&store, true);
    let folded: i64 = store
        .client()?
        .query_one("SELECT count(*) FROM host_counts", &[])?
        .get(0);
    assert!(folded > 0, "no change was folded");
    // The run dies holding its last claims; another takes them back.
    let gone = |_: &RunInfo| Liveness::Gone;
    let mut other = schema.open();
    let started = other.start_run(&me(2), &gone)?;
    assert_eq!(started.reclaimed, outcomes.len() as u64);
    assert_counters_match_rows(&store, true);
    assert!(store.requeue_failed(Some(404), None)? > 0);
    assert_counters_match_rows(&store, false);
    let claims = claim(&mut other, started.id, 50);
    let finished: Vec<Completion> = claims.iter().map(|c| done(c, 1)).collect();
    other.complete_and_claim(
        started.id,
        &finished,
        0,
        &HostFilter::default(),
        Work::Fetch,
    )?;
    assert_counters_match_rows(&other, false);
    Ok(())
}

/// Every row of the tallies, by state and last HTTP status (rows and
/// bytes), against a `count(*)` of the rows, and every report figure with
/// `assert_counters_match_rows`.
fn assert_tallies_match_rows(store: &PostgresStore, answers_are_attempts: bool) {
    let mut client = store.client().unwrap();
    let mut read = |sql: &str| -> Vec<(String, i32, i64, i64)> {
        client
            .query(sql, &[])
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
            .collect()
    };
    let tallied = read(
        "SELECT state, status, sum(rows)::bigint, sum(bytes)::bigint FROM tallies
         GROUP BY state, status HAVING sum(rows) <> 0 OR sum(bytes) <> 0 ORDER BY 1, 2",
    );
    let counted = read(
        "SELECT state, coalesce(http_status, 0), count(*),
             coalesce(sum(bytes) FILTER (WHERE state = 'done'), 0)::bigint
         FROM jobs GROUP BY 1, 2 ORDER BY 1, 2",
    );
    drop(client);
    assert_eq!(tallied, counted);
    assert_counters_match_rows(store, answers_are_attempts);
}

/// A claim of pending rows counts itself, by each row's last HTTP status,
/// and the trigger on jobs leaves it alone but counts every statement after
/// it: rows retried after a 503 are claimed, completed in every way, given
/// back by a run's end and rescued from a dead run, and a refresh claims
/// done rows (counted by the trigger), with the tallies checked at each step.
#[test]
fn claims_count_their_rows_by_status_and_the_statements_after_them_are_counted() -> Result<()> {
    let schema = Schema::new();
    let mut store = schema.open();
    let names: Vec<(String, &str)> = (0..40)
        .map(|i| (format!("s{i}"), ["a", "b", "c"][i % 3]))
        .collect();
    let lines: Vec<(&str, &str)> = names.iter().map(|(u, h)| (u.as_str(), *h)).collect();
    import(&mut store, &lines);
    let run = store.start_run(&me(1), &alive)?.id;
    let retry = |c: &Claim, status: u16| Completion::Retry {
        id: c.id,
        lease: c.lease,
        status: Some(status),
        error: format!("HTTP {status}"),
        next_attempt_at: now_ms() - 1,
        millis: 3,
    };
    // Every row answered 503 or 429 once, due again at once.
    let claims = claim(&mut store, run, 40);
    assert_tallies_match_rows(&store, true);
    let outcomes: Vec<Completion> = claims
        .iter()
        .enumerate()
        .map(|(i, c)| retry(c, if i % 2 == 0 { 503 } else { 429 }))
        .collect();
    // The retried rows are claimed again in the same call, with their status.
    let claims =
        store.complete_and_claim(run, &outcomes, 30, &HostFilter::default(), Work::Fetch)?;
    assert_eq!(claims.len(), 30);
    assert_tallies_match_rows(&store, true);
    let outcomes: Vec<Completion> = claims
        .iter()
        .enumerate()
        .map(|(i, c)| match i % 6 {
            0 | 1 => done(c, 100 + i as u64),
            2 => retry(c, 500),
            3 => Completion::Failed {
                id: c.id,
                lease: c.lease,
                status: Some(404),
                error: "HTTP 404".to_string(),
                millis: 4,
            },
            4 => Completion::Interrupted {
                id: c.id,
                lease: c.lease,
            },
            _ => Completion::Unstarted {
                id: c.id,
                lease: c.lease,
            },
        })
        .collect();
    // Outcomes, then a claim, then, in the next call, outcomes again.
    let claims =
        store.complete_and_claim(run, &outcomes, 8, &HostFilter::default(), Work::Fetch)?;
    assert_eq!(claims.len(), 8);
    assert_tallies_match_rows(&store, true);
    let outcomes: Vec<Completion> = claims.iter().map(|c| done(c, 7)).collect();
    let held = store.complete_and_claim(run, &outcomes, 5, &HostFilter::default(), Work::Fetch)?;
    assert_eq!(held.len(), 5);
    assert_tallies_match_rows(&store, true);
    // A claim that finds nothing counts nothing, and what follows it is
    // counted.
    let mut other = schema.open();
    let second = other.start_run(&me(2), &alive)?.id;
    let rest = claim(&mut other, second, 100);
    assert!(claim(&mut other, second, 10).is_empty());
    assert_tallies_match_rows(&store, true);
    let outcomes: Vec<Completion> = rest.iter().map(|c| retry(c, 503)).collect();
    let again =
        other.complete_and_claim(second, &outcomes, 100, &HostFilter::default(), Work::Fetch)?;
    assert!(!again.is_empty());
    assert_tallies_match_rows(&store, true);
    // The second run ends: its rows go back to pending with their status.
    other.end_run(second, &RunEnd::Interrupted)?;
    assert_tallies_match_rows(&store, true);
    // The first dies holding five rows; a third run rescues them.
    let gone = |_: &RunInfo| Liveness::Gone;
    let mut third = schema.open();
    let started = third.start_run(&me(3), &gone)?;
    assert_eq!(started.reclaimed, 5);
    assert_tallies_match_rows(&store, true);
    // Everything left is done; a refresh then claims done rows (the
    // trigger counts those claims).
    loop {
        let claims = claim(&mut third, started.id, 50);
        if claims.is_empty() {
            break;
        }
        let outcomes: Vec<Completion> = claims.iter().map(|c| done(c, 3)).collect();
        third.complete_and_claim(
            started.id,
            &outcomes,
            0,
            &HostFilter::default(),
            Work::Fetch,
        )?;
    }
    assert!(third.requeue_failed(None, None)? > 0);
    assert_tallies_match_rows(&store, false);
    third.start_refresh(None)?;
    let claims =
        third.complete_and_claim(started.id, &[], 10, &HostFilter::default(), Work::Refresh)?;
    assert_eq!(claims.len(), 10);
    assert_tallies_match_rows(&store, false);
    let outcomes: Vec<Completion> = claims.iter().map(|c| retry(c, 503)).collect();
    let more = third.complete_and_claim(
        started.id,
        &outcomes,
        10,
        &HostFilter::default(),
        Work::Refresh,
    )?;
    assert!(!more.is_empty());
    assert_tallies_match_rows(&store, false);
    Ok(())
}

/// A batch of outcomes adds one row of per-host counts, its rows' states
/// and its answers together, and a claim adds none. An attempt of a
/// refresh answered 503, which leaves its row done with the URL's own
/// status, still counts as its host's answer and its 503.
#[test]
fn a_batch_of_outcomes_appends_one_row_of_host_counts_with_its_answers() -> Result<()> {
    let schema = Schema::new();
    let mut store = schema.open();
    import(&mut store, &[("a1", "a"), ("a2", "a"), ("b1", "b")]);
    let host_rows = |store: &PostgresStore| -> i64 {
        store
            .client()
            .unwrap()
            .query_one("SELECT count(*) FROM host_changes", &[])
            .unwrap()
            .get(0)
    };
    let imported = host_rows(&store);
    let run = store.start_run(&me(1), &alive)?.id;
    let claims = claim(&mut store, run, 3);
    assert_eq!(claims.len(), 3);
    assert_eq!(
        host_rows(&store),
        imported,
        "a claim changes no per-host count"
    );
    let outcomes: Vec<Completion> = claims.iter().map(|c| done(c, 10)).collect();
    store.complete_and_claim(run, &outcomes, 0, &HostFilter::default(), Work::Fetch)?;
    assert_eq!(host_rows(&store), imported + 1);
    store.start_refresh(None)?;
    let claims = store.complete_and_claim(run, &[], 3, &HostFilter::default(), Work::Refresh)?;
    assert_eq!(claims.len(), 3);
    let outcomes: Vec<Completion> = claims
        .iter()
        .map(|c| Completion::Retry {
            id: c.id,
            lease: c.lease,
            status: Some(503),
            error: "HTTP 503".to_string(),
            next_attempt_at: now_ms() + 60_000,
            millis: 5,
        })
        .collect();
    store.complete_and_claim(run, &outcomes, 0, &HostFilter::default(), Work::Refresh)?;
    let summary = store.summary(5)?;
    let hosts: Vec<(&str, u64, u64, u64)> = summary
        .hosts
        .iter()
        .map(|h| (h.host.as_str(), h.done, h.answers, h.status_503))
        .collect();
    assert_eq!(hosts, [("a", 2, 4, 2), ("b", 1, 2, 1)]);
    Ok(())
}

/// A row of per-host counts holds no array of zeros: a count the batch does
/// not change is NULL, so that the batch does not write, compress and later
/// add up an array of zeros per host; the counts read the same.
#[test]
fn a_batch_of_outcomes_leaves_out_the_counts_it_does_not_change() -> Result<()> {
    let schema = Schema::new();
    let mut store = schema.open();
    import(&mut store, &[("a1", "a"), ("a2", "a"), ("b1", "b")]);
    let run = store.start_run(&me(1), &alive)?.id;
    let claims = claim(&mut store, run, 3);
    let outcomes: Vec<Completion> = claims
        .iter()
        .map(|c| match c.host.as_str() {
            "a" => done(c, 10),
            _ => Completion::Retry {
                id: c.id,
                lease: c.lease,
                status: Some(429),
                error: "HTTP 429".to_string(),
                next_attempt_at: now_ms() + 60_000,
                millis: 5,
            },
        })
        .collect();
    store.complete_and_claim(run, &outcomes, 0, &HostFilter::default(), Work::Fetch)?;
    // The two newest rows: the done statement's, then the retry's.
    let rows: Vec<Vec<bool>> = store
        .client()?
        .query(
            "SELECT pending IS NULL, done IS NULL, failed IS NULL, answers IS NULL,
                    status_429 IS NULL, status_503 IS NULL
             FROM host_changes ORDER BY id DESC LIMIT 2",
            &[],
        )?
        .iter()
        .map(|row| (0..6).map(|i| row.get(i)).collect())
        .collect();
    // pending, done, failed, answers, 429, 503: which are left out.
    assert_eq!(
        rows,
        [
            vec![true, true, true, false, false, true],
            vec![false, false, true, false, true, true],
        ]
    );
    let summary = store.summary(5)?;
    let hosts: Vec<(&str, u64, u64, u64, u64)> = summary
        .hosts
        .iter()
        .map(|h| (h.host.as_str(), h.pending, h.done, h.answers, h.status_429))
        .collect();
    assert_eq!(hosts, [("a", 0, 2, 2, 0), ("b", 1, 0, 1, 1)]);
    Ok(())
}

#[test]
fn claims_go_back_for_rows_behind_where_they_got_to() -> Result<()> {
    let schema = Schema::new();
    let mut store = schema.open();
    let urls = [
        ("a1", "a"),
        ("b1", "b"),
        ("a2", "a"),
        ("b2", "b"),
        ("a3", "a"),
        ("b3", "b"),
        ("a4", "a"),
        ("a5", "a"),
    ];
    import(&mut store, &urls);
    let run = store.start_run(&me(1), &alive)?.id;
    let paths = |claims: &[Claim]| -> Vec<String> {
        claims
            .iter()
            .map(|c| c.path.trim_end_matches(".body").to_string())
            .collect()
    };
    // Host b skipped: its rows passed over are the next claim's first.
    let skip_b = HostFilter {
        skip: vec!["b".to_string()],
    };
    let first = store.complete_and_claim(run, &[], 2, &skip_b, Work::Fetch)?;
    assert_eq!(paths(&first), ["a1", "a2"]);
    let second = claim(&mut store, run, 2);
    assert_eq!(paths(&second), ["b1", "b2"]);
    // Rows another run gives back behind this one's claims are still
    // claimed: here when the rows ahead run short.
    let mut other = schema.open();
    let run2 = other.start_run(&me(2), &alive)?.id;
    let theirs = claim(&mut other, run2, 2);
    assert_eq!(paths(&theirs), ["a3", "b3"]);
    let mine = claim(&mut store, run, 1);
    assert_eq!(paths(&mine), ["a4"]);
    other.end_run(run2, &RunEnd::Interrupted)?;
    let rest = claim(&mut store, run, 10);
    assert_eq!(paths(&rest), ["a3", "b3", "a5"]);
    Ok(())
}

#[test]
fn rows_given_back_behind_a_claim_are_taken_first_by_its_next_claim() -> Result<()> {
    let schema = Schema::new();
    let mut store = schema.open();
    let urls: Vec<String> = (1..=9).map(|n| format!("a{n}")).collect();
    let urls: Vec<(&str, &str)> = urls.iter().map(|url| (url.as_str(), "a")).collect();
    import(&mut store, &urls);
    let run = store.start_run(&me(1), &alive)?.id;
    let paths = |claims: &[Claim]| -> Vec<String> {
        claims
            .iter()
            .map(|c| c.path.trim_end_matches(".body").to_string())
            .collect()
    };
    let first = claim(&mut store, run, 2);
    assert_eq!(paths(&first), ["a1", "a2"]);
    let mut other = schema.open();
    let run2 = other.start_run(&me(2), &alive)?.id;
    assert_eq!(paths(&claim(&mut other, run2, 1)), ["a3"]);
    assert_eq!(paths(&claim(&mut store, run, 1)), ["a4"]);
    // Another run gives its row back while rows ahead are plenty.
    other.end_run(run2, &RunEnd::Interrupted)?;
    assert_eq!(paths(&claim(&mut store, run, 1)), ["a3"]);
    assert_eq!(paths(&claim(&mut store, run, 1)), ["a5"]);
    // `jobrun retry` in another process puts a failed row back.
    let failed = Completion::Failed {
        id: first[0].id,
        lease: first[0].lease,
        status: Some(500),
        error: "HTTP 500".to_string(),
        millis: 5,
    };
    let next = store.complete_and_claim(run, &[failed], 1, &HostFilter::default(), Work::Fetch)?;
    assert_eq!(paths(&next), ["a6"]);
    assert_eq!(schema.open().requeue_failed(None, None)?, 1);
    assert_eq!(paths(&claim(&mut store, run, 1)), ["a1"]);
    assert_eq!(paths(&claim(&mut store, run, 10)), ["a7", "a8", "a9"]);
    Ok(())
}

#[test]
fn claim_and_complete_statements_are_prepared_once_per_connection() -> Result<()> {
    let schema = Schema::new();
    let mut store = schema.open();
    let urls: Vec<String> = (1..=6).map(|n| format!("u{n}")).collect();
    let urls: Vec<(&str, &str)> = urls.iter().map(|url| (url.as_str(), "h")).collect();
    import(&mut store, &urls);
    let run = store.start_run(&me(1), &alive)?.id;
    let prepared = |store: &PostgresStore| -> i64 {
        store
            .client()
            .unwrap()
            .query_one(
                "SELECT count(*) FROM pg_prepared_statements
                 WHERE statement NOT LIKE '%pg_prepared_statements%'",
                &[],
            )
            .unwrap()
            .get(0)
    };
    let mut claims = claim(&mut store, run, 2);
    let batch = |store: &mut PostgresStore, claims: &[Claim]| -> Vec<Claim> {
        let outcomes: Vec<Completion> = claims.iter().map(|c| done(c, 10)).collect();
        store
            .complete_and_claim(run, &outcomes, 2, &HostFilter::default(), Work::Fetch)
            .unwrap()
    };
    claims = batch(&mut store, &claims);
    let after_one = prepared(&store);
    assert!(after_one > 0, "nothing stays prepared");
    claims = batch(&mut store, &claims);
    assert_eq!(claims.len(), 2);
    assert_eq!(prepared(&store), after_one);
    Ok(())
}

#[test]
fn an_outcome_with_an_old_fence_is_refused_and_nothing_of_its_batch_kept() -> Result<()> {
    let schema = Schema::new();
    let mut store = schema.open();
    import(&mut store, &[("a1", "a"), ("a2", "a")]);
    let run = store.start_run(&me(1), &alive)?.id;
    let claims = claim(&mut store, run, 2);
    let stale = Completion::Done {
        id: claims[1].id,
        lease: Lease {
            run,
            fence: claims[1].lease.fence - 1,
        },
        fetched: Fetched {
            status: 200,
            bytes: 1,
            sha256: [0; 32],
            millis: 1,
            validators: Validators::default(),
        },
    };
    let batch = [done(&claims[0], 1), stale];
    let error = store
        .complete_and_claim(run, &batch, 0, &HostFilter::default(), Work::Fetch)
        .unwrap_err();
    assert!(error.to_string().contains("taken for dead"), "{error:#}");
    assert_eq!(counts(&store), (0, 2, 0, 0));
    Ok(())
}

#[test]
fn a_run_silent_past_its_lease_loses_its_rows_to_another() -> Result<()> {
    let schema = Schema::new();
    let mut first = schema.open_with_lease(Some(Duration::from_millis(1)));
    import(&mut first, &[("a1", "a"), ("a2", "a")]);
    let run = first.start_run(&me(1), &alive)?.id;
    let claims = claim(&mut first, run, 2);
    // The lease is a millisecond: wait until the server's clock is past it.
    let mut second = schema.open();
    let started = loop {
        let started = second.start_run(&me(2), &alive)?;
        if started.reclaimed == 2 {
            break started;
        }
        second.end_run(started.id, &RunEnd::Finished)?;
    };
    assert!(started.dead.iter().any(|(id, _)| *id == run));
    // The dead run's late outcome is refused; the rows were claimed again
    // under a new fence.
    let late = [done(&claims[0], 1)];
    let error = first
        .complete_and_claim(run, &late, 0, &HostFilter::default(), Work::Fetch)
        .unwrap_err();
    assert!(error.to_string().contains("taken for dead"), "{error:#}");
    assert!(first.heartbeat(run).is_err());
    let again = claim(&mut second, started.id, 2);
    assert!(again.iter().all(|c| c.lease.fence == 2));
    let summary = second.summary(0)?;
    assert_eq!(summary.counts.running, 2);
    Ok(())
}

#[test]
fn a_url_rescued_too_often_fails_with_why() -> Result<()> {
    let schema = Schema::new();
    let mut store = schema.open();
    import(&mut store, &[("deadly", "a")]);
    let gone = |_: &RunInfo| Liveness::Gone;
    for _ in 0..RESCUE_LIMIT {
        let run = store.start_run(&me(1), &gone)?.id;
        assert_eq!(claim(&mut store, run, 1).len(), 1);
    }
    let started = store.start_run(&me(1), &gone)?;
    assert_eq!(started.reclaimed, 1);
    assert_eq!(counts(&store), (0, 0, 0, 1));
    let mut failed = Vec::new();
    store.failed(&mut |row| {
        failed.push(row.error.unwrap_or_default());
        Ok(())
    })?;
    assert_eq!(failed.len(), 1);
    assert!(
        failed[0].contains(&format!(
            "rescued {RESCUE_LIMIT} times from runs that died while fetching it"
        )),
        "{failed:?}"
    );
    // Rescued fewer times, a row only went back to pending.
    let rows = store.recent_runs(10)?;
    let killed = rows
        .iter()
        .filter(|r| r.outcome == Some(crate::domain::RunOutcome::Killed))
        .count();
    assert!(killed >= 5, "{killed}");
    Ok(())
}

/// Two imports at once, each on its own connection, batch after batch:
/// each connection holds ids of its own from the sequence, and each list's
/// rows still follow its order by id, every one with its job.
#[test]
fn two_imports_at_once_keep_each_list_in_the_order_of_its_ids() {
    let schema = Schema::new();
    let mut first = schema.open();
    let mut second = schema.open();
    let lines = |list: &str, batch: usize| -> Vec<(String, String)> {
        (0..50)
            .map(|i| {
                (
                    format!("http://{list}.test/{batch}/{i}"),
                    format!("{list}.test"),
                )
            })
            .collect()
    };
    for batch in 0..6 {
        for (store, list) in [(&mut first, "a"), (&mut second, "b")] {
            let owned = lines(list, batch);
            let urls: Vec<(&str, &str)> = owned
                .iter()
                .map(|(url, host)| (url.as_str(), host.as_str()))
                .collect();
            let results = import(store, &urls);
            assert!(results.iter().all(|r| *r == InsertResult::Inserted));
        }
    }
    let mut client = first.client().unwrap();
    let rows = client
        .query(
            "SELECT r.url, j.id IS NOT NULL FROM requests r LEFT JOIN jobs j ON j.id = r.id
             ORDER BY r.id",
            &[],
        )
        .unwrap();
    assert!(rows.iter().all(|row| row.get::<_, bool>(1)), "a job each");
    for list in ["a", "b"] {
        let expected: Vec<String> = (0..6)
            .flat_map(|batch| lines(list, batch))
            .map(|(url, _)| url)
            .collect();
        let found: Vec<String> = rows
            .iter()
            .map(|row| row.get::<_, String>(0))
            .filter(|url| url.starts_with(&format!("http://{list}.")))
            .collect();
        assert_eq!(found, expected, "list {list} in the order of its ids");
    }
}

#[test]
fn import_counts_duplicates_and_refuses_clashing_names() -> Result<()> {
    let schema = Schema::new();
    let mut store = schema.open();
    let new = |url: &'static str, path: &'static str, named: bool| NewUrl {
        url,
        request: None,
        request_hash: "",
        host: "h",
        path,
        named,
    };
    let first = store.import(&[
        new("u1", "one", false),
        new("u1", "one", false),
        new("u2", "dir", true),
        new("u3", "dir/inside", true),
        new("u4", "one", false),
        new("u5", "five", false),
    ])?;
    assert_eq!(first[0], InsertResult::Inserted);
    assert_eq!(first[1], InsertResult::Duplicate);
    assert_eq!(first[2], InsertResult::Inserted);
    assert!(
        matches!(&first[3], InsertResult::NameTaken(why) if why.contains("needs a folder")),
        "{first:?}"
    );
    assert!(
        matches!(&first[4], InsertResult::NameTaken(why) if why.contains("already used")),
        "{first:?}"
    );
    assert_eq!(first[5], InsertResult::Inserted);
    let second = store.import(&[new("u5", "five", false), new("u5", "other", true)])?;
    assert_eq!(second[0], InsertResult::Duplicate);
    assert!(
        matches!(&second[1], InsertResult::NameTaken(why) if why.contains("already imported")),
        "{second:?}"
    );
    assert_eq!(store.state_counts()?.total, 3);
    Ok(())
}

#[test]
fn settings_keep_their_first_value_and_schemas_are_checked() -> Result<()> {
    let schema = Schema::new();
    let mut store = schema.open();
    assert_eq!(store.setting("out_dir")?, None);
    assert!(
        store
            .setting_or_insert("out_dir", "/c", &mut || Err("no".into()))
            .is_err()
    );
    assert_eq!(
        store.setting_or_insert("out_dir", "/a", &mut || Ok(()))?,
        "/a"
    );
    assert_eq!(
        store.setting_or_insert("out_dir", "/b", &mut || Ok(()))?,
        "/a"
    );
    let empty = Schema::new();
    let options = OpenOptions::new(Open::MustExist);
    let error = PostgresStore::open(&empty.url, &options).err().unwrap();
    assert!(
        error.to_string().contains("holds no jobrun data"),
        "{error:#}"
    );
    Ok(())
}

/// Runs a check of the store contract on new, empty schemas.
fn check(contract: fn(contract::Fresh<'_>)) {
    let schemas = std::cell::RefCell::new(Vec::new());
    contract(&|| {
        let schema = Schema::new();
        let store = schema.open();
        schemas.borrow_mut().push(schema);
        Box::new(store)
    });
}

#[test]
fn contract_every_claim_gives_a_row_a_new_fence() {
    check(contract::every_claim_gives_a_row_a_new_fence);
}

#[test]
fn contract_an_outcome_under_an_earlier_claim_of_the_row_is_refused() {
    check(contract::an_outcome_under_an_earlier_claim_of_the_row_is_refused);
}

#[test]
fn contract_a_run_taken_for_dead_cannot_complete_what_another_claimed() {
    check(contract::a_run_taken_for_dead_cannot_complete_what_another_claimed);
}

#[test]
fn contract_an_import_says_what_became_of_each_url_in_order() {
    check(contract::an_import_says_what_became_of_each_url_in_order);
}

#[test]
fn contract_an_ended_run_gives_its_rows_back_and_says_how_it_ended() {
    check(contract::an_ended_run_gives_its_rows_back_and_says_how_it_ended);
}

#[test]
fn contract_failed_rows_go_back_with_a_fresh_budget() {
    check(contract::failed_rows_go_back_with_a_fresh_budget);
}

#[test]
fn contract_a_setting_keeps_its_first_value() {
    check(contract::a_setting_keeps_its_first_value);
}
