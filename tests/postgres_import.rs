//! `jobrun import` into PostgreSQL killed with SIGKILL at chosen points of
//! a batch: halfway through its COPY into requests, or into jobs, halfway
//! through the insert from the staging table of a list imported again, and
//! just after a commit. To stop the import at a chosen row, the test holds
//! an uncommitted row with that URL (or job id) in a transaction of its
//! own: the import waits there for it, and is killed while it waits.
//! Batches commit without waiting for the disk during an import; the
//! server keeps running here, so every committed batch stays. After each
//! kill the queue holds exactly the distinct URLs of a first part of the
//! list, in its order, with their jobs, and every counter matches a count
//! of the rows; importing the list again adds the rest and counts the
//! others as duplicates. (A crash of the server itself, which can lose the
//! last batches committed without waiting, cannot be tested here.)

mod support;

use std::collections::{HashMap, HashSet};
use std::process::{Child, Stdio};
use std::time::Duration;

use support::*;

/// Distinct URLs in the list.
const URLS: usize = 80_000;
/// Hosts they are spread over, so that per-host counts are checked too.
const HOSTS: usize = 7;
/// Where a kill point of a first import lies: past a first batch (10,000
/// lines), and early enough that the rest of the first half, which holds
/// no repeats, spans more than two batches after it.
const FAST: std::ops::Range<usize> = 12_000..16_000;
/// Where a kill point in the staging table lies: a batch (under 7,000
/// URLs of the second half) past the first repeat of an earlier batch's
/// URL, so that every batch from there on meets rows already there.
const STAGED: std::ops::Range<usize> = URLS / 2 + 7_000..URLS * 3 / 4;
/// How long a kill point may take to come.
const LIMIT: Duration = Duration::from_secs(120);

/// The `i`-th distinct URL of the list.
fn url(i: usize) -> String {
    format!("http://h{}.test/items/{i}.json", i % HOSTS)
}

/// The list: every URL once, the first half alone; in the second half,
/// after every third URL a repeat of one of the first half (a URL of an
/// earlier batch), and after every fifth a repeat of the one before it.
fn list() -> Vec<String> {
    let mut lines = Vec::new();
    for i in 0..URLS {
        lines.push(url(i));
        if i >= URLS / 2 && i % 3 == 2 {
            lines.push(url(i / 2));
        }
        if i >= URLS / 2 && i % 5 == 0 {
            lines.push(url(i - 1));
        }
    }
    lines
}

/// A queue in a schema of its own, the list written to urls.txt, and a
/// connection of the test's own to watch the import.
struct Import {
    job: Job,
    url: String,
    lines: Vec<String>,
    watch: postgres::Client,
}

impl Import {
    fn new() -> Import {
        let job = Job::on(Backend::Postgres);
        let url = job.postgres().expect("a job on PostgreSQL").url.clone();
        let lines = list();
        job.write("urls.txt", lines.join("\n") + "\n");
        // The tables, for the rows the tests hold before an import starts.
        job.write("empty.txt", "");
        assert_success(
            &job.command_on(&url)
                .args(["import", "empty.txt"])
                .output()
                .expect("run jobrun import"),
            "an import of an empty list",
        );
        let watch = postgres::Client::connect(&url, postgres::NoTls).expect("connect to the queue");
        Import {
            job,
            url,
            lines,
            watch,
        }
    }

    fn number(&mut self, query: &str) -> i64 {
        self.watch
            .query_one(query, &[])
            .expect("query the queue")
            .get(0)
    }

    /// Starts `jobrun import urls.txt` and returns it with the pid of the
    /// server process that serves its connection.
    fn spawn(&mut self) -> (Child, i32) {
        let mut child = self
            .job
            .command_on(&self.url)
            .args(["--lock-wait", "60s", "import", "urls.txt"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start jobrun import");
        let pid = child.id();
        let mut backend = None;
        self.until(&mut child, "the import's connection", |watch| {
            backend = backend_of(watch, pid);
            backend.is_some()
        });
        (child, backend.expect("a backend"))
    }

    /// Polls `condition` until it holds; panics if the import ends first.
    fn until(
        &mut self,
        child: &mut Child,
        what: &str,
        mut condition: impl FnMut(&mut postgres::Client) -> bool,
    ) {
        let watch = &mut self.watch;
        let mut ended = None;
        wait_for(LIMIT, what, || {
            if condition(watch) {
                return true;
            }
            ended = child.try_wait().expect("poll the import");
            ended.is_some()
        });
        assert!(
            ended.is_none(),
            "the import ended ({ended:?}) before {what}: the kill point was never reached"
        );
    }

    /// Kills the import, lets go of the row it waits at (`holder`), waits
    /// until the server has ended its connection (and rolled back its open
    /// batch: a process waiting for a lock sees its client gone only when
    /// the wait ends), and checks what it left: returns how many URLs are
    /// in the queue.
    fn kill(
        &mut self,
        mut child: Child,
        backend: i32,
        holder: Option<postgres::Client>,
        point: &str,
    ) -> usize {
        signal(&child, libc::SIGKILL);
        child.wait().expect("reap the import");
        if let Some(mut holder) = holder {
            holder.batch_execute("ROLLBACK").expect("let the row go");
        }
        wait_for(
            LIMIT,
            "the server to end the killed import's connection",
            || {
                self.number(&format!(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = {backend}"
                )) == 0
            },
        );
        self.assert_consistent(point)
    }

    /// The queue holds the distinct URLs of a first part of the list, each
    /// once, with ids in the order of the list; each has its job, pending;
    /// the counters equal a count of the rows, in all and per host.
    /// Returns how many there are.
    fn assert_consistent(&mut self, point: &str) -> usize {
        let rows = self
            .watch
            .query("SELECT url, host FROM requests ORDER BY id", &[])
            .expect("read requests");
        let queued: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
        let mut first = Vec::new();
        let mut seen = HashSet::new();
        for line in &self.lines {
            if seen.insert(line.as_str()) {
                first.push(line.clone());
            }
        }
        assert!(
            queued.len() <= first.len() && queued[..] == first[..queued.len()],
            "{point}: the queue does not hold the first {} distinct URLs of the list, in order",
            queued.len()
        );
        let count = queued.len() as i64;
        for (what, query) in [
            ("jobs", "SELECT count(*) FROM jobs"),
            (
                "pending jobs of requests",
                "SELECT count(*) FROM jobs j JOIN requests r USING (id)
                 WHERE j.state = 'pending' AND j.host = r.host",
            ),
            (
                "pending rows counted",
                "SELECT coalesce(sum(rows), 0)::bigint FROM tallies WHERE state = 'pending'",
            ),
            (
                "rows counted",
                "SELECT coalesce(sum(rows), 0)::bigint FROM tallies",
            ),
            (
                "pending rows counted per host",
                "SELECT coalesce(sum(pending), 0)::bigint FROM host_totals",
            ),
        ] {
            assert_eq!(self.number(query), count, "{point}: {what}");
        }
        let mut per_host: HashMap<String, i64> = HashMap::new();
        for row in &rows {
            *per_host.entry(row.get(1)).or_default() += 1;
        }
        let counted: HashMap<String, i64> = self
            .watch
            .query(
                "SELECT host, sum(pending)::bigint FROM host_totals GROUP BY host
                 HAVING sum(pending) <> 0",
                &[],
            )
            .expect("read host counts")
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        assert_eq!(counted, per_host, "{point}: pending rows per host");
        queued.len()
    }

    /// Imports the whole list, which holds `there` URLs already: says how
    /// many it added and how many were duplicates, and leaves every URL.
    fn import_the_rest(&mut self, there: usize) {
        let output = self.job.jobrun(&["import", "urls.txt"]);
        assert_success(&output, "the import after the kills");
        let added = URLS - there;
        // The counts without their thousands separators.
        let said = stderr(&output).replace(',', "");
        let counts = format!(
            "{added} imported {} duplicate 0 rejected",
            self.lines.len() - added
        );
        assert!(said.contains(&counts), "not {counts:?} in {said}");
        assert_eq!(self.assert_consistent("after the last import"), URLS);
    }
}

/// The server process serving a connection of the process `pid`: the one
/// whose client port is the local port of one of its TCP sockets.
fn backend_of(watch: &mut postgres::Client, pid: u32) -> Option<i32> {
    let mut inodes = HashSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()? {
        let Ok(target) = std::fs::read_link(fd.ok()?.path()) else {
            continue;
        };
        if let Some(inode) = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:["))
            .and_then(|t| t.strip_suffix(']'))
        {
            inodes.insert(inode.to_string());
        }
    }
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() > 9 && inodes.contains(fields[9]) {
                let port = fields[1].rsplit(':').next().unwrap_or("0");
                ports.push(i32::from_str_radix(port, 16).unwrap_or(0));
            }
        }
    }
    if ports.is_empty() {
        return None;
    }
    watch
        .query_opt(
            "SELECT pid FROM pg_stat_activity WHERE client_port = ANY($1) LIMIT 1",
            &[&ports],
        )
        .expect("read pg_stat_activity")
        .map(|row| row.get(0))
}

/// URLs in the queue (none before the import has made its tables).
fn queued(watch: &mut postgres::Client) -> i64 {
    match watch.query_one("SELECT count(*) FROM requests", &[]) {
        Ok(row) => row.get(0),
        Err(e) if e.code() == Some(&postgres::error::SqlState::UNDEFINED_TABLE) => 0,
        Err(e) => panic!("count requests: {e}"),
    }
}

/// Rows the server has read of the COPY its process `backend` runs into
/// `table`; -1 when it runs none.
fn copied(watch: &mut postgres::Client, backend: i32, table: &str) -> i64 {
    watch
        .query_opt(
            "SELECT tuples_processed FROM pg_stat_progress_copy
             WHERE pid = $1 AND relid = $2::text::regclass",
            &[&backend, &table],
        )
        .expect("read pg_stat_progress_copy")
        .map_or(-1, |row| row.get(0))
}

/// The statement the server process `backend` waits in for a lock, if it
/// waits for one.
fn waiting(watch: &mut postgres::Client, backend: i32) -> Option<String> {
    watch
        .query_opt(
            "SELECT query FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'",
            &[&backend],
        )
        .expect("read pg_stat_activity")
        .map(|row| row.get(0))
}

/// A connection holding `statement` in an open transaction, until it is
/// rolled back: an import that meets the same row waits for it.
fn hold(url: &str, statement: &str) -> postgres::Client {
    let mut holder = postgres::Client::connect(url, postgres::NoTls).expect("connect to the queue");
    holder
        .batch_execute(&format!("BEGIN; {statement}"))
        .expect("hold a row");
    holder
}

/// The row of a request with the `i`-th URL, held uncommitted.
fn hold_request(import: &Import, i: usize) -> postgres::Client {
    hold(
        &import.url,
        &format!(
            "INSERT INTO requests (id, url, host, path) OVERRIDING SYSTEM VALUE
             VALUES (1000000000000, '{}', 'held.test', 'held')",
            url(i)
        ),
    )
}

/// A number in `range`, different from run to run (the seed is printed, so
/// that a failure can be repeated with `JOBRUN_TEST_SEED`).
fn random(rng: &mut fastrand::Rng, range: std::ops::Range<usize>) -> usize {
    rng.usize(range)
}

fn seeded() -> fastrand::Rng {
    let seed = std::env::var("JOBRUN_TEST_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("JOBRUN_TEST_SEED={seed}");
    fastrand::Rng::with_seed(seed)
}

/// Kills the import while it waits at the row `holder` holds, in the
/// statement `statement` starts with, then lets the row go.
fn kill_while_waiting(
    import: &mut Import,
    holder: postgres::Client,
    statement: &str,
    point: &str,
) -> usize {
    let copying = statement.strip_prefix("COPY ");
    let (mut child, backend) = import.spawn();
    let mut query = None;
    import.until(&mut child, point, |watch| {
        query = waiting(watch, backend);
        query.is_some()
    });
    let query = query.unwrap_or_default();
    assert!(
        query.trim_start().starts_with(statement),
        "{point}: the import waits in another statement: {query}"
    );
    if let Some(table) = copying {
        let rows = copied(&mut import.watch, backend, table);
        assert!(rows > 0, "{point}: {rows} rows copied before the held one");
    }
    import.kill(child, backend, Some(holder), point)
}

#[test]
fn an_import_killed_halfway_through_copying_into_requests_keeps_its_committed_batches() {
    let mut import = Import::new();
    let mut rng = seeded();
    let at = random(&mut rng, FAST);
    let holder = hold_request(&import, at);
    let first = kill_while_waiting(
        &mut import,
        holder,
        "COPY requests",
        &format!("killed while copying into requests, at URL {at}"),
    );
    assert!(first > 0 && first <= at, "{first} URLs there");

    // The list again: past the part already there (a batch that meets
    // rows there, and one more that meets none), new URLs go straight into
    // the tables again.
    let at = random(&mut rng, first + 21_000..URLS / 2);
    let holder = hold_request(&import, at);
    let second = kill_while_waiting(
        &mut import,
        holder,
        "COPY requests",
        &format!("killed while copying into requests past the part there, at URL {at}"),
    );
    assert!(
        second > first && second <= at,
        "{first} then {second} URLs there"
    );
    import.import_the_rest(second);
}

#[test]
fn an_import_killed_again_and_again_adds_the_rest_when_run_once_more() {
    let mut import = Import::new();
    let mut rng = seeded();

    // A fresh queue: batches go straight into requests, then jobs.
    let id = random(&mut rng, FAST);
    let holder = hold(
        &import.url,
        &format!("INSERT INTO jobs (id, host) VALUES ({id}, 'held.test')"),
    );
    let first = kill_while_waiting(
        &mut import,
        holder,
        "COPY jobs",
        &format!("killed while copying into jobs, at id {id}"),
    );
    assert!(first > 0 && first < id, "{first} URLs there");

    // The list again: its first batch meets rows already there, and so
    // does every batch past the first repeat of an earlier batch's URL:
    // they go through the staging table.
    let at = random(&mut rng, STAGED);
    let holder = hold_request(&import, at);
    let second = kill_while_waiting(
        &mut import,
        holder,
        "WITH inserted AS",
        &format!("killed while inserting from the staging table, at URL {at}"),
    );
    assert!(
        second >= first && second <= at,
        "{first} then {second} URLs there"
    );

    // Killed as soon as a batch of new URLs is seen committed: wherever
    // the import is in the next one.
    let (mut child, backend) = import.spawn();
    import.until(&mut child, "a batch of new URLs committed", |watch| {
        queued(watch) > second as i64
    });
    let third = import.kill(child, backend, None, "killed after a commit");
    assert!(third > second, "{second} then {third} URLs there");

    import.import_the_rest(third);
}
