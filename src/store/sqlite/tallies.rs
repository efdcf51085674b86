//! The counters behind `report` and the start of a run (migration
//! `08-tallies`): rows by origin, state and last HTTP status, with the bytes
//! of done rows, and the last errors of rows not done.
//!
//! Triggers keep them for every row up to a mark (`tallied.id`). Rows
//! imported after it are added to them a batch at a time, after each import
//! transaction: a trigger on insert would make SQLite keep a statement
//! journal for every insert, which took an import of 100,000 URLs from 3.5
//! to 5.1 billion instructions. Usually an import's rows are counted from
//! what it says it inserted, without reading them again; when another
//! connection wrote meanwhile, or rows past the mark changed, they are read
//! and counted. Until they are folded in, the queries here count those rows
//! themselves: at most a batch of them, or what an import killed between
//! its commit and its fold left (or one whose folds failed: the rows are
//! imported all the same), which the next command that writes folds in.
//! jobrun never deletes a row, so a new row's id is always past the mark.
//!
//! A run's commits count their own changes instead ([`BatchCounts`]): the
//! trigger's upserts, once per outcome, were most of what the counters cost
//! a run. The batch adds up what its statements change by counter and
//! writes each counter once, and meanwhile a row in `queue_counting` (see
//! migration `09-queue-counts`) keeps the trigger out of it.

use std::collections::HashMap;

use crate::store::Result;
use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::SqliteStore;
use super::compact::split_url;
use crate::domain::{InsertResult, NewUrl};

/// The rows not counted by the tallies yet, each with its counter: its
/// state (running counts as pending), its last HTTP status (0 for none), the
/// bytes it adds (those of a done row) and its error if it is not done.
macro_rules! new_rows {
    () => {
        "(SELECT id, origin_id,
             CASE WHEN state = 'running' THEN 'pending' ELSE state END AS counted_state,
             coalesce(http_status, 0) AS status,
             CASE WHEN state = 'done' THEN coalesce(bytes, 0) ELSE 0 END AS done_bytes,
             CASE WHEN state <> 'done' THEN error END AS open_error
         FROM urls WHERE id > (SELECT id FROM tallied))"
    };
}

/// Rows and bytes by origin, state and status: the tallies and the rows not
/// folded into them yet, in one statement (one snapshot).
pub(super) const TALLIES: &str = concat!(
    "SELECT origin_id, state, status, sum(rows) AS rows, sum(bytes) AS bytes FROM (
         SELECT origin_id, state, status, rows, bytes FROM tallies
         UNION ALL
         SELECT origin_id, counted_state, status, 1, done_bytes FROM ",
    new_rows!(),
    ")
     GROUP BY origin_id, state, status HAVING sum(rows) > 0"
);

/// The last errors of rows not done, most common first, with their counts
/// and the id of a row that had each; ?1 is how many.
pub(super) const TOP_ERRORS: &str = concat!(
    "SELECT error, sum(rows) AS rows, min(example_id) AS example_id FROM (
         SELECT error, rows, example_id FROM error_tallies
         UNION ALL
         SELECT open_error, 1, id FROM ",
    new_rows!(),
    " WHERE open_error IS NOT NULL)
     GROUP BY error HAVING sum(rows) > 0 ORDER BY 2 DESC, error LIMIT ?1"
);

/// Adds the rows past the mark to the tallies, read one by one.
const FOLD_BY_READING: &str = concat!(
    "INSERT INTO tallies (origin_id, state, status, rows, bytes)
     SELECT origin_id, counted_state, status, count(*), sum(done_bytes) FROM ",
    new_rows!(),
    " WHERE true GROUP BY origin_id, counted_state, status
     ON CONFLICT DO UPDATE SET rows = rows + excluded.rows, bytes = bytes + excluded.bytes;
     INSERT INTO error_tallies (error, rows, example_id)
     SELECT open_error, count(*), min(id) FROM ",
    new_rows!(),
    " WHERE open_error IS NOT NULL GROUP BY open_error
     ON CONFLICT DO UPDATE SET rows = rows + excluded.rows;"
);

/// Moves the mark past every row, which the tallies now count.
const MOVE_MARK: &str =
    "UPDATE tallied SET id = max(id, coalesce((SELECT max(id) FROM urls), 0)), touched = 0";

/// The rows an import transaction inserted, by origin (prefix, host): new
/// rows are pending, with no status, bytes or error.
#[derive(Default)]
pub(super) struct Inserted<'a> {
    rows: u64,
    by_origin: Vec<((&'a str, &'a str), u64)>,
}

impl<'a> Inserted<'a> {
    /// What `results` say became of `batch`.
    pub(super) fn of(batch: &[NewUrl<'a>], results: &[InsertResult]) -> Inserted<'a> {
        let mut inserted = Inserted::default();
        for (new, result) in batch.iter().zip(results) {
            if !matches!(result, InsertResult::Inserted) {
                continue;
            }
            inserted.rows += 1;
            // Lists hold long runs of one origin's URLs, and origins are few:
            // the last origin is tried first, without splitting the URL.
            if let Some(((prefix, host), rows)) = inserted.by_origin.last_mut()
                && *host == new.host
                && !prefix.is_empty()
                && new.url.starts_with(*prefix)
                && new.url[prefix.len()..].starts_with('/')
            {
                *rows += 1;
                continue;
            }
            let origin = (split_url(new.url).0, new.host);
            match inserted.by_origin.iter_mut().find(|(o, _)| *o == origin) {
                Some((_, rows)) => *rows += 1,
                None => inserted.by_origin.push((origin, 1)),
            }
        }
        inserted
    }
}

impl SqliteStore {
    /// Adds the rows of the import transaction just committed to the
    /// tallies, with any other rows past the mark, in a transaction of its
    /// own. `before` is the `data_version` read before the import
    /// transaction began.
    pub(super) fn fold_imported(&mut self, before: i64, inserted: &Inserted<'_>) -> Result<()> {
        let tx = self.write_transaction()?;
        // Another connection wrote meanwhile: its rows may be past the mark.
        let alone = data_version(&tx)? == before;
        let (mark, touched): (i64, bool) =
            tx.query_row("SELECT id, touched FROM tallied", [], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })?;
        let last: i64 = tx.query_row("SELECT coalesce(max(id), 0) FROM urls", [], |row| {
            row.get(0)
        })?;
        // Ids past the mark are as many as the rows inserted only when they
        // are these rows; untouched, they are as they were inserted.
        let mut origins = Vec::with_capacity(inserted.by_origin.len());
        if alone && !touched && last - mark == inserted.rows as i64 {
            for ((prefix, host), rows) in &inserted.by_origin {
                let id: Option<i64> = tx
                    .prepare_cached("SELECT id FROM origins WHERE prefix = ?1 AND host = ?2")?
                    .query_row(params![prefix, host], |row| row.get(0))
                    .optional()?;
                origins.push(id.map(|id| (id, *rows as i64)));
            }
        }
        if !origins.is_empty() && origins.iter().all(Option::is_some) {
            for (origin, rows) in origins.into_iter().flatten() {
                tx.prepare_cached(
                    "INSERT INTO tallies (origin_id, state, status, rows, bytes)
                     VALUES (?1, 'pending', 0, ?2, 0)
                     ON CONFLICT DO UPDATE SET rows = rows + excluded.rows",
                )?
                .execute(params![origin, rows])?;
            }
        } else if last > mark {
            tx.execute_batch(FOLD_BY_READING)?;
        }
        tx.execute(MOVE_MARK, [])?;
        tx.commit()?;
        Ok(())
    }

    /// Folds in what an import killed between its commit and its fold left.
    pub(super) fn fold_left_rows(&mut self) -> Result<()> {
        if has_untallied_rows(&self.conn)? {
            let tx = self.write_transaction()?;
            tx.execute_batch(FOLD_BY_READING)?;
            tx.execute(MOVE_MARK, [])?;
            tx.commit()?;
        }
        Ok(())
    }
}

/// A row as the tallies count it: its origin, its state (running counts as
/// pending), its last HTTP status (0 for none), the bytes it adds (those of
/// a done row) and its last error if it is not done.
pub(super) struct Counted<'a> {
    origin: i64,
    state: &'static str,
    status: i64,
    bytes: i64,
    error: Option<&'a str>,
}

impl<'a> Counted<'a> {
    /// The counters of a row with these columns.
    pub(super) fn of(
        origin: i64,
        state: &str,
        status: Option<i64>,
        bytes: Option<i64>,
        error: Option<&'a str>,
    ) -> Counted<'a> {
        let state = match state {
            "done" => "done",
            "failed" => "failed",
            _ => "pending",
        };
        let done = state == "done";
        Counted {
            origin,
            state,
            status: status.unwrap_or(0),
            bytes: if done { bytes.unwrap_or(0) } else { 0 },
            error: if done { None } else { error },
        }
    }
}

/// What the statements of one commit change in the tallies, added up by
/// counter, written when the commit is about to be made. While it lives,
/// the update trigger counts nothing: every change of a row in between must
/// go through [`BatchCounts::change`].
pub(super) struct BatchCounts {
    /// `tallied.id`: rows past it are not in the tallies yet.
    mark: i64,
    /// Whether a row past the mark changed (`tallied.touched`).
    touched: bool,
    /// (origin, state, status) → (rows, bytes), in the order first seen; a
    /// commit's rows come from a few origins, so a list beats a map.
    rows: Vec<((i64, &'static str, i64), i64, i64)>,
    /// Error → (rows, a row that has it now).
    errors: HashMap<String, (i64, i64)>,
}

impl BatchCounts {
    /// Takes the counting of `tx`'s changes to rows over from the trigger.
    pub(super) fn begin(tx: &Transaction<'_>, run: i64) -> Result<BatchCounts> {
        tx.prepare_cached("INSERT INTO queue_counting (run_id) VALUES (?1)")?
            .execute([run])?;
        let mark = tx
            .prepare_cached("SELECT id FROM tallied")?
            .query_row([], |row| row.get(0))?;
        Ok(BatchCounts {
            mark,
            touched: false,
            rows: Vec::new(),
            errors: HashMap::new(),
        })
    }

    /// Row `id` changed from `old` to `new`.
    pub(super) fn change(&mut self, id: i64, old: Counted<'_>, new: Counted<'_>) {
        if id > self.mark {
            // Counted when the mark passes it, as it is then.
            self.touched = true;
            return;
        }
        self.add((old.origin, old.state, old.status), -1, -old.bytes);
        self.add((new.origin, new.state, new.status), 1, new.bytes);
        if old.error == new.error {
            return;
        }
        if let Some(error) = old.error {
            self.error(error, id).0 -= 1;
        }
        if let Some(error) = new.error {
            let entry = self.error(error, id);
            entry.0 += 1;
            entry.1 = id;
        }
    }

    /// The rows and example of `error`, first seen on row `id`. Only rows
    /// not done have one, a few of a batch.
    fn error(&mut self, error: &str, id: i64) -> &mut (i64, i64) {
        self.errors.entry(error.to_owned()).or_insert((0, id))
    }

    fn add(&mut self, key: (i64, &'static str, i64), rows: i64, bytes: i64) {
        match self.rows.iter_mut().rev().find(|entry| entry.0 == key) {
            Some(entry) => {
                entry.1 += rows;
                entry.2 += bytes;
            }
            None => self.rows.push((key, rows, bytes)),
        }
    }

    /// Writes the counters and gives their counting back to the trigger.
    pub(super) fn finish(self, tx: &Transaction<'_>) -> Result<()> {
        let mut add = tx.prepare_cached(
            "INSERT INTO tallies (origin_id, state, status, rows, bytes)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT DO UPDATE SET rows = rows + excluded.rows,
                 bytes = bytes + excluded.bytes",
        )?;
        for ((origin, state, status), rows, bytes) in self.rows {
            if (rows, bytes) != (0, 0) {
                add.execute(params![origin, state, status, rows, bytes])?;
            }
        }
        let mut add = tx.prepare_cached(
            "INSERT INTO error_tallies (error, rows, example_id) VALUES (?1, ?2, ?3)
             ON CONFLICT DO UPDATE SET rows = rows + excluded.rows",
        )?;
        for (error, (rows, example)) in self.errors {
            if rows != 0 {
                add.execute(params![error, rows, example])?;
            }
        }
        if self.touched {
            tx.prepare_cached("UPDATE tallied SET touched = 1 WHERE touched = 0")?
                .execute([])?;
        }
        tx.prepare_cached("DELETE FROM queue_counting")?
            .execute([])?;
        Ok(())
    }
}

/// SQLite's count of the commits of other connections seen by `conn`.
pub(super) fn data_version(conn: &Connection) -> Result<i64> {
    Ok(conn.pragma_query_value(None, "data_version", |row| row.get(0))?)
}

fn has_untallied_rows(conn: &Connection) -> Result<bool> {
    Ok(conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM urls WHERE id > (SELECT id FROM tallied))",
        [],
        |row| row.get(0),
    )?)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::domain::{
        Claim, Completion, Fetched, HostFilter, Liveness, NewUrl, RunEnd, Summary, Validators, Work,
    };
    use crate::store::{Open, OpenOptions, Store, contract};
    use rusqlite::types::ValueRef;

    /// A store of `n` URLs on three origins (two of them one host's), every
    /// one of them counted: some folded in, the last batch not, as an import
    /// killed before its fold leaves it.
    fn store_of(dir: &tempfile::TempDir, n: usize) -> SqliteStore {
        let path = dir.path().join("jobrun.db");
        let mut store = SqliteStore::open(&path, &OpenOptions::new(Open::CreateIfMissing)).unwrap();
        let origins = ["http://a.test", "https://a.test", "http://b.test:81"];
        let urls: Vec<String> = (0..n)
            .map(|i| format!("{}/items/{i}", origins[i % 3]))
            .collect();
        let names: Vec<String> = (0..n).map(|i| format!("{i}.json")).collect();
        let batch: Vec<NewUrl<'_>> = urls
            .iter()
            .zip(&names)
            .map(|(url, name)| NewUrl {
                url,
                request: None,
                request_hash: "",
                host: &url[url.find("://").unwrap() + 3..url.rfind("/items").unwrap()],
                path: name,
                named: false,
            })
            .collect();
        let half = n / 2;
        Store::import(&mut store, &batch[..half]).unwrap();
        SqliteStore::import(&mut store, &batch[half..]).unwrap();
        store
    }

    /// What `summary` must say, counted from every row.
    fn recount(store: &SqliteStore) -> String {
        let conn = &store.conn;
        let query = |sql: &str| -> Vec<String> {
            let mut statement = conn.prepare(sql).unwrap();
            let mut rows = statement.query([]).unwrap();
            let mut out = Vec::new();
            while let Some(row) = rows.next().unwrap() {
                let columns = (0..row.as_ref().column_count())
                    .map(|i| match row.get_ref(i).unwrap() {
                        ValueRef::Text(text) => String::from_utf8_lossy(text).into_owned(),
                        ValueRef::Integer(n) => n.to_string(),
                        other => format!("{other:?}"),
                    })
                    .collect::<Vec<_>>();
                out.push(columns.join(" "));
            }
            out
        };
        let states = query("SELECT state, count(*) FROM urls GROUP BY state ORDER BY state");
        let statuses = query(
            "SELECT http_status, count(*) FROM urls WHERE http_status IS NOT NULL
             GROUP BY 1 ORDER BY 1",
        );
        let bytes = query("SELECT coalesce(sum(bytes), 0) FROM urls WHERE state = 'done'");
        let hosts = query(
            "SELECT o.host, sum(u.state IN ('pending', 'running')), sum(u.state = 'done'),
                 sum(u.state = 'failed')
             FROM urls u JOIN origins o ON o.id = u.origin_id GROUP BY o.host ORDER BY o.host",
        );
        let errors = query(
            "SELECT error, count(*) FROM urls WHERE error IS NOT NULL AND state <> 'done'
             GROUP BY error ORDER BY 2 DESC, 1",
        );
        format!("{states:?}\n{statuses:?}\n{bytes:?}\n{hosts:?}\n{errors:?}")
    }

    fn shown(summary: &Summary) -> String {
        let c = &summary.counts;
        let mut states = BTreeMap::new();
        for (state, n) in [
            ("done", c.done),
            ("failed", c.failed),
            ("pending", c.pending),
            ("running", c.running),
        ] {
            if n > 0 {
                states.insert(state, n);
            }
        }
        assert_eq!(c.total, c.done + c.failed + c.pending + c.running);
        let states: Vec<String> = states.iter().map(|(s, n)| format!("{s} {n}")).collect();
        let statuses: Vec<String> = summary
            .http_statuses
            .iter()
            .map(|s| format!("{} {}", s.status, s.count))
            .collect();
        let hosts: Vec<String> = summary
            .hosts
            .iter()
            .map(|h| format!("{} {} {} {}", h.host, h.pending, h.done, h.failed))
            .collect();
        let errors: Vec<String> = summary
            .errors
            .iter()
            .map(|e| {
                assert!(e.example.contains("/items/"), "{e:?}");
                format!("{} {}", e.error, e.count)
            })
            .collect();
        format!(
            "{states:?}\n{statuses:?}\n{:?}\n{hosts:?}\n{errors:?}",
            [summary.bytes.to_string()]
        )
    }

    fn check(store: &SqliteStore) {
        assert_eq!(shown(&store.summary(100).unwrap()), recount(store));
        let counts = store.state_counts().unwrap();
        assert_eq!(
            format!("{counts:?}"),
            format!("{:?}", store.summary(0).unwrap().counts)
        );
    }

    fn outcome(i: usize, claim: &Claim) -> Completion {
        let (id, lease) = (claim.id, claim.lease);
        let fetched = |status, bytes| Fetched {
            status,
            bytes,
            sha256: [1; 32],
            millis: 2,
            validators: Validators::default(),
        };
        match i % 6 {
            0 | 1 => Completion::Done {
                id,
                lease,
                fetched: fetched(200, 10 + i as u64),
            },
            2 => Completion::Failed {
                id,
                lease,
                status: Some(404),
                error: "HTTP 404 Not Found".into(),
                millis: 3,
            },
            3 => Completion::Retry {
                id,
                lease,
                status: Some(503),
                error: "HTTP 503 Service Unavailable".into(),
                next_attempt_at: crate::clock::now_ms() + 3_600_000,
                millis: 3,
            },
            4 => Completion::Retry {
                id,
                lease,
                status: None,
                error: "connection reset".into(),
                next_attempt_at: 1,
                millis: 3,
            },
            _ => Completion::Interrupted { id, lease },
        }
    }

    #[test]
    fn the_tallies_say_what_the_rows_say_through_a_run_a_retry_and_a_refresh() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = store_of(&dir, 90);
        check(&store);
        let run = contract::start(&mut store, Liveness::Alive);
        let mut claims = Vec::new();
        for round in 0..4 {
            let outcomes: Vec<Completion> = claims
                .iter()
                .enumerate()
                .map(|(i, claim)| outcome(i + round, claim))
                .collect();
            claims = store
                .complete_and_claim(run, &outcomes, 25, &HostFilter::default(), Work::Fetch)
                .unwrap();
            check(&store);
            if round == 1 {
                // Rows past the mark have changed: this import's fold reads them.
                import_more(&mut store, round);
                check(&store);
            }
        }
        import_more(&mut store, 9);
        check(&store);
        store.requeue_failed(Some(404), None).unwrap();
        check(&store);
        store.end_run(run, &RunEnd::Finished).unwrap();
        check(&store);
        store.start_refresh(None).unwrap();
        let run = contract::start(&mut store, Liveness::Alive);
        let claims = store
            .complete_and_claim(run, &[], 10, &HostFilter::default(), Work::Refresh)
            .unwrap();
        let outcomes: Vec<Completion> = claims
            .iter()
            .enumerate()
            .map(|(i, claim)| outcome(i, claim))
            .collect();
        store
            .complete_and_claim(run, &outcomes, 0, &HostFilter::default(), Work::Refresh)
            .unwrap();
        check(&store);
        // A run killed with its rows claimed, then taken for dead.
        let claims = store
            .complete_and_claim(run, &[], 20, &HostFilter::default(), Work::Fetch)
            .unwrap();
        assert!(!claims.is_empty());
        check(&store);
        drop(store);
        let mut store = store_of_existing(&dir);
        store.reclaim_dead_runs(&|_| Liveness::Gone).unwrap();
        check(&store);
    }

    fn import_more(store: &mut SqliteStore, round: usize) {
        let urls: Vec<String> = (0..5)
            .map(|i| format!("http://c.test/more/{round}/{i}"))
            .collect();
        let names: Vec<String> = (0..5).map(|i| format!("more-{round}-{i}")).collect();
        let batch: Vec<NewUrl<'_>> = urls
            .iter()
            .zip(&names)
            .map(|(url, name)| NewUrl {
                url,
                request: None,
                request_hash: "",
                host: "c.test",
                path: name,
                named: false,
            })
            .collect();
        Store::import(store, &batch).unwrap();
    }

    fn new_urls<'a>(urls: &'a [String], names: &'a [String], host: &'a str) -> Vec<NewUrl<'a>> {
        urls.iter()
            .zip(names)
            .map(|(url, name)| NewUrl {
                url,
                request: None,
                request_hash: "",
                host,
                path: name,
                named: false,
            })
            .collect()
    }

    #[test]
    fn an_import_folds_by_reading_what_another_process_imported_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = store_of(&dir, 6);
        let urls =
            |host: &str| -> Vec<String> { (0..5).map(|i| format!("http://{host}/{i}")).collect() };
        let (x_urls, y_urls) = (urls("x.test"), urls("y.test"));
        let x_names: Vec<String> = (0..5).map(|i| format!("x{i}")).collect();
        let y_names: Vec<String> = (0..5).map(|i| format!("y{i}")).collect();
        let x = new_urls(&x_urls, &x_names, "x.test");
        let y = new_urls(&y_urls, &y_names, "y.test");
        // The first process commits its batch; before it folds it, another
        // opens the database (folding it in) and commits as many rows of
        // another host.
        let before = data_version(&first.conn).unwrap();
        let results = SqliteStore::import(&mut first, &x).unwrap();
        let mut second = store_of_existing(&dir);
        SqliteStore::import(&mut second, &y).unwrap();
        first
            .fold_imported(before, &Inserted::of(&x, &results))
            .unwrap();
        check(&first);
    }

    fn store_of_existing(dir: &tempfile::TempDir) -> SqliteStore {
        let path = dir.path().join("jobrun.db");
        SqliteStore::open(&path, &OpenOptions::new(Open::MustExist)).unwrap()
    }

    #[test]
    fn report_counts_come_from_the_tallies_not_from_the_rows() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_of(&dir, 30);
        drop(store);
        // Opening for writing folds in the rows an unfinished import left.
        let store = store_of_existing(&dir);
        // Rows changed behind the triggers' back: the counts do not see it.
        store
            .conn
            .execute_batch(
                "DROP TRIGGER IF EXISTS urls_tally_update;
                 UPDATE urls SET state = 'failed', http_status = 404;",
            )
            .unwrap();
        let summary = store.summary(10).unwrap();
        assert_eq!((summary.counts.pending, summary.counts.failed), (30, 0));
        assert!(summary.http_statuses.is_empty());
    }
}
