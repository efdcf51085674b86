//! A SQLite run that has nothing left to claim while another run holds
//! URLs waits for it, looking again ten times a second. Looking is a read:
//! the database is written only as often as the waiting run's heartbeat
//! needs, not at every look.

mod support;

use std::time::{Duration, Instant};

use jobrun::clock::now_ms;
use support::*;

/// The frames the write-ahead log holds now, read by a passive checkpoint
/// (which copies them into the database but leaves their count).
fn wal_frames(sql: &rusqlite::Connection) -> i64 {
    sql.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| row.get(1))
        .expect("a passive checkpoint")
}

/// Empties the write-ahead log, so that the frames counted next are the
/// ones written from now on.
fn empty_the_wal(sql: &rusqlite::Connection) {
    wait_for(Duration::from_secs(30), "an empty write-ahead log", || {
        let (busy, frames): (i64, i64) = sql
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .expect("a truncating checkpoint");
        busy == 0 && frames == 0
    });
}

fn heartbeat_of(sql: &rusqlite::Connection, run: i64) -> i64 {
    sql.query_row(
        "SELECT heartbeat_at FROM runs WHERE id = ?1",
        [run],
        |row| row.get(0),
    )
    .expect("the run's heartbeat")
}

#[test]
fn a_run_waiting_for_another_writes_the_database_only_for_its_heartbeat() {
    let server = item_server(Duration::ZERO);
    let (job, urls) = Job::with_items(&server, 20);
    // A run on another machine holds five URLs, its heartbeat fresh: this
    // run fetches the other fifteen, then waits for it.
    let (mut run, lines, mut seen) = job.run_waiting_for_a_run_elsewhere();
    let sql = job.sql();
    sql.busy_timeout(Duration::from_secs(30)).unwrap();
    // Its last bodies may still be on their way to the disk: once they are
    // recorded, it only waits.
    wait_for(Duration::from_secs(30), "the fifteen URLs recorded", || {
        let done: i64 = sql
            .query_row(
                "SELECT count(*) FROM urls WHERE state = 'done'",
                [],
                |row| row.get(0),
            )
            .unwrap();
        done == 15
    });
    empty_the_wal(&sql);
    let window = Duration::from_secs(3);
    let started = Instant::now();
    std::thread::sleep(window);
    let frames = wal_frames(&sql);
    let waited = started.elapsed();
    // It looked about thirty times; a renewal of its heartbeat, every five
    // seconds, writes a page or two.
    assert!(
        frames <= 4,
        "{frames} pages written in {waited:?} by a run that only waited"
    );

    // Its heartbeat is still renewed, within a few seconds.
    let before = heartbeat_of(&sql, 2);
    wait_for(Duration::from_secs(15), "a renewed heartbeat", || {
        heartbeat_of(&sql, 2) > before
    });
    assert!(run.try_wait().unwrap().is_none(), "{seen:?}");

    // The other run's heartbeat goes stale: its URLs are taken over.
    sql.execute(
        "UPDATE runs SET heartbeat_at = ?1 WHERE id = 1",
        [now_ms() - 61_000],
    )
    .unwrap();
    let status = run.wait().unwrap();
    seen.extend(lines.iter());
    assert_eq!(status.code(), Some(0), "{seen:?}");
    job.assert_all_files_right(&server, &urls);
    assert_no_url_fetched_twice(&server);
}
