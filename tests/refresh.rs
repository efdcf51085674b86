//! `jobrun refresh`: done URLs fetched again with the validators stored
//! with them. A 304 or the same body keeps the file untouched, a changed
//! body replaces it durably, a failed refresh keeps the old file and says
//! so, `--older-than` picks only old files, and a killed refresh resumes.

mod support;

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use support::*;

/// How an item tells a client whether it changed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Validator {
    ETag,
    LastModified,
    /// Neither: only the body's sha256 can tell.
    None,
}

fn validator_of(item: u64) -> Validator {
    match item % 3 {
        0 => Validator::ETag,
        1 => Validator::LastModified,
        _ => Validator::None,
    }
}

/// Items whose body changes when the test bumps their version, each
/// answering conditional requests by its kind of validator, counting the
/// 304s it sends.
struct VersionedServer {
    server: Server,
    versions: Arc<Mutex<HashMap<u64, u32>>>,
    not_modified: Arc<AtomicUsize>,
}

fn body_of(item: u64, version: u32) -> Vec<u8> {
    let mut body = item_body(item);
    if version > 0 {
        body.extend_from_slice(format!("version {version}\n").as_bytes());
    }
    body
}

impl VersionedServer {
    /// `fault(item, earlier_requests)` may answer instead.
    fn start(fault: impl Fn(u64, usize) -> Option<Reply> + Send + Sync + 'static) -> Self {
        let versions = Arc::new(Mutex::new(HashMap::<u64, u32>::new()));
        let not_modified = Arc::new(AtomicUsize::new(0));
        let server = {
            let (versions, not_modified) = (versions.clone(), not_modified.clone());
            Server::start(move |request| {
                let Some(item) = item_of(&request.path) else {
                    return Reply::status(404);
                };
                if let Some(reply) = fault(item, request.previous) {
                    return reply;
                }
                let version = *versions.lock().unwrap().get(&item).unwrap_or(&0);
                let etag = format!("\"{item}-v{version}\"");
                // One day apart per version, in the HTTP date format.
                let modified = httpdate(1_700_000_000 + u64::from(version) * 86_400);
                let unchanged = match validator_of(item) {
                    Validator::ETag => request.header("If-None-Match") == Some(etag.as_str()),
                    Validator::LastModified => {
                        request.header("If-Modified-Since") == Some(modified.as_str())
                    }
                    Validator::None => false,
                };
                // A little time per answer, so that a refresh can be
                // caught half-way.
                let reply = if unchanged {
                    not_modified.fetch_add(1, Ordering::SeqCst);
                    Reply::Full {
                        status: 304,
                        headers: Vec::new(),
                        body: Vec::new(),
                    }
                } else {
                    Reply::ok(body_of(item, version))
                };
                let reply = match validator_of(item) {
                    Validator::ETag => reply.with_header("ETag", &etag),
                    Validator::LastModified => reply.with_header("Last-Modified", &modified),
                    Validator::None => reply,
                };
                reply.delayed(Duration::from_millis(2))
            })
        };
        VersionedServer {
            server,
            versions,
            not_modified,
        }
    }

    fn bump(&self, items: impl IntoIterator<Item = u64>) {
        let mut versions = self.versions.lock().unwrap();
        for item in items {
            *versions.entry(item).or_default() += 1;
        }
    }

    fn current_body(&self, url: &str) -> Vec<u8> {
        let path = url
            .strip_prefix(&self.server.url(""))
            .expect("url on server");
        let item = item_of(path).expect("item url");
        body_of(
            item,
            *self.versions.lock().unwrap().get(&item).unwrap_or(&0),
        )
    }
}

fn httpdate(unix: u64) -> String {
    httpdate_of(SystemTime::UNIX_EPOCH + Duration::from_secs(unix))
}

fn httpdate_of(time: SystemTime) -> String {
    // RFC 7231 IMF-fixdate, from humantime's RFC 3339 form.
    let rfc3339 = humantime::format_rfc3339_seconds(time).to_string();
    let (date, clock) = rfc3339.trim_end_matches('Z').split_once('T').unwrap();
    let parts: Vec<u64> = date.split('-').map(|p| p.parse().unwrap()).collect();
    let (year, month, day) = (parts[0], parts[1], parts[2]);
    let days = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 86_400;
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{weekday}, {day:02} {} {year} {clock} GMT",
        months[(month - 1) as usize]
    )
}

/// Each URL's file: its path, inode and modification time.
fn file_stamps(job: &Job) -> HashMap<String, (PathBuf, u64, i64, i64)> {
    job.export()
        .into_iter()
        .map(|(url, row)| {
            let path = PathBuf::from(row["path"].as_str().expect("path"));
            let meta = std::fs::metadata(&path).expect("the file of a done URL");
            (url, (path, meta.ino(), meta.mtime(), meta.mtime_nsec()))
        })
        .collect()
}

#[test]
fn refresh_replaces_changed_files_and_leaves_unchanged_ones_untouched() {
    let server = VersionedServer::start(|_, _| None);
    let (job, urls) = Job::with_items(&server.server, 12);
    job.run_ok(&[]);
    let before = file_stamps(&job);
    // One changed item of each kind of validator.
    let changed = [3, 4, 5];
    server.bump(changed);
    let hits_before = server.server.hit_count();

    let output = job.subcommand("refresh", &[]);
    assert_success(&output, "refresh");

    assert_eq!(
        server.server.hit_count() - hits_before,
        12,
        "one request per URL"
    );
    // Of the nine unchanged, those with an ETag or Last-Modified got a 304.
    let conditional = (0..12)
        .filter(|i| !changed.contains(i) && validator_of(*i) != Validator::None)
        .count();
    assert_eq!(server.not_modified.load(Ordering::SeqCst), conditional);
    job.assert_all_files_are(&urls, |url| server.current_body(url));
    let after = file_stamps(&job);
    for (i, url) in urls.iter().enumerate() {
        let (was, now) = (&before[url], &after[url]);
        if changed.contains(&(i as u64)) {
            assert_ne!(was.1, now.1, "{url}: a changed body is a new file");
        } else {
            assert_eq!(was, now, "{url}: an unchanged file is left untouched");
        }
    }
    let report = job.report_json();
    let round = &report["refresh"];
    assert_eq!(round["changed"], 3, "{round}");
    assert_eq!(round["unchanged"], 9, "{round}");
    assert_eq!(round["failed"], 0, "{round}");
    assert_eq!(round["pending"], 0, "{round}");
    let text = job.report_text();
    assert!(
        text.contains("refresh #1: 3 changed, 9 unchanged, 0 failed"),
        "{text}"
    );
}

#[test]
fn refresh_sends_the_stored_validators_and_stores_new_ones() {
    let server = VersionedServer::start(|_, _| None);
    let (job, _) = Job::with_items(&server.server, 3);
    job.run_ok(&[]);
    server.bump([0, 1]);
    assert_success(&job.subcommand("refresh", &[]), "refresh");
    let sent = |item: u64, header: &str| -> Vec<Option<String>> {
        server
            .server
            .hits()
            .iter()
            .filter(|hit| hit.path == format!("/items/{item}.json"))
            .map(|hit| {
                hit.headers
                    .iter()
                    .find(|(name, _)| name.eq_ignore_ascii_case(header))
                    .map(|(_, value)| value.clone())
            })
            .collect()
    };
    assert_eq!(sent(0, "If-None-Match"), [None, Some("\"0-v0\"".into())]);
    assert_eq!(
        sent(1, "If-Modified-Since"),
        [None, Some(httpdate(1_700_000_000))]
    );
    assert_eq!(sent(2, "If-None-Match"), [None, None]);
    // The new validators are stored: a second refresh gets 304s for both.
    let before = server.not_modified.load(Ordering::SeqCst);
    assert_success(&job.subcommand("refresh", &[]), "second refresh");
    assert_eq!(server.not_modified.load(Ordering::SeqCst) - before, 2);
    let round = &job.report_json()["refresh"];
    assert_eq!(round["round"], 2, "{round}");
    assert_eq!(round["unchanged"], 3, "{round}");
}

#[test]
fn refresh_older_than_picks_only_old_files() {
    let server = VersionedServer::start(|_, _| None);
    let (job, urls) = Job::with_items(&server.server, 6);
    job.run_ok(&[]);
    // Items 0 to 2 were fetched two days ago.
    let two_days_ago = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        - 2 * 86_400_000;
    job.sql()
        .execute(
            "UPDATE urls SET fetched_at = ?1 WHERE url LIKE '%/items/0.json'
                 OR url LIKE '%/items/1.json' OR url LIKE '%/items/2.json'",
            [two_days_ago],
        )
        .unwrap();
    server.bump(0..6);
    let before = server.server.hits_per_path();

    assert_success(
        &job.subcommand("refresh", &["--older-than", "1day"]),
        "refresh",
    );

    let after = server.server.hits_per_path();
    for i in 0..6u64 {
        let path = format!("/items/{i}.json");
        let asked = after[&path] - before[&path];
        assert_eq!(asked, usize::from(i < 3), "{path}");
    }
    let round = &job.report_json()["refresh"];
    assert_eq!(round["changed"], 3, "{round}");
    assert_eq!(round["unchanged"], 0, "{round}");
    // The others still hold their first bodies.
    job.assert_all_files_are(&urls, |url| {
        let item = item_of(url.strip_prefix(&server.server.url("")).unwrap()).unwrap();
        body_of(item, u32::from(item < 3))
    });
}

#[test]
fn a_failed_refresh_keeps_the_old_file_and_says_so() {
    // After its first fetch, item 1 answers 500, item 2 answers 404, and
    // item 5, which has no validators to send, answers a 304 all the same.
    let server = VersionedServer::start(|item, previous| match (item, previous) {
        (1, 1..) => Some(Reply::status(500)),
        (2, 1..) => Some(Reply::status(404)),
        (5, 1..) => Some(Reply::Full {
            status: 304,
            headers: Vec::new(),
            body: Vec::new(),
        }),
        _ => None,
    });
    let (job, urls) = Job::with_items(&server.server, 6);
    job.run_ok(&[]);
    let before = file_stamps(&job);
    server.bump(0..6);

    let output = job.subcommand(
        "refresh",
        &["--max-attempts", "2", "--backoff-base", "10ms"],
    );

    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert_stderr_contains(&output, "3 refreshes failed");
    let after = file_stamps(&job);
    let failed = [1, 2, 5];
    for item in failed {
        let url = &urls[item as usize];
        assert_eq!(before[url], after[url], "{url}: the old file stays");
    }
    // Still done, with their first bodies; the others changed.
    job.assert_all_files_are(&urls, |url| {
        let item = item_of(url.strip_prefix(&server.server.url("")).unwrap()).unwrap();
        body_of(item, u32::from(!failed.contains(&item)))
    });
    assert_eq!(job.assert_done_rows_have_their_files(), 6);
    let round = &job.report_json()["refresh"];
    assert_eq!(round["failed"], 3, "{round}");
    assert_eq!(round["changed"], 3, "{round}");
    assert_eq!(round["unchanged"], 0, "{round}");
    let text = job.report_text();
    assert!(
        text.contains("3 failed (failed ones keep their old files)"),
        "{text}"
    );
    // The 500 was retried, the 404 and the unasked-for 304 were not.
    let hits = server.server.hits_per_path();
    assert_eq!(hits["/items/1.json"], 3);
    assert_eq!(hits["/items/2.json"], 2);
    assert_eq!(hits["/items/5.json"], 2);
}

#[test]
fn a_refresh_killed_mid_way_resumes_and_finishes_with_every_file_right() {
    let server = VersionedServer::start(|_, _| None);
    let (job, urls) = Job::with_items(&server.server, 300);
    job.run_ok(&["--workers", "8"]);
    server.bump(0..300);
    let first = server.server.hit_count();

    let mut child = job
        .command()
        .args(["refresh", "--workers", "2"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start jobrun refresh");
    wait_for(Duration::from_secs(30), "a third of the refresh", || {
        server.server.hit_count() >= first + 100
    });
    signal(&child, libc::SIGKILL);
    child.wait().expect("wait for the killed refresh");
    // Done rows have their recorded files; the rows the killed refresh held
    // have theirs too, the old body or the new one, whole.
    job.assert_done_rows_have_their_files();
    for (url, row) in job.export() {
        let body = std::fs::read(row["path"].as_str().expect("path")).expect("the URL's file");
        let item = item_of(url.strip_prefix(&server.server.url("")).unwrap()).unwrap();
        assert!(
            body == body_of(item, 0) || body == body_of(item, 1),
            "{url}: the file is neither the old body nor the new one"
        );
    }
    let round = &job.report_json()["refresh"];
    assert!(round["pending"].as_i64().unwrap() > 0, "{round}");

    let output = job.subcommand("refresh", &[]);
    assert_success(&output, "the resumed refresh");
    assert_stderr_contains(&output, "refresh #1 is not finished");

    job.assert_all_files_are(&urls, |url| server.current_body(url));
    assert_eq!(job.assert_done_rows_have_their_files(), 300);
    let round = &job.report_json()["refresh"];
    assert_eq!(round["round"], 1, "{round}");
    assert_eq!(round["changed"], 300, "{round}");
    assert_eq!(round["pending"], 0, "{round}");
}

/// A done file's name replaced before a refresh by a symlink to a file
/// outside `--out`, a FIFO, a folder, or a hard link to a file outside:
/// the refresh writes through no link, waits on no FIFO, and changes
/// nothing outside. The symlink, FIFO and folder fail their refresh and stay;
/// the hard link's name gets the new body while the file outside keeps its
/// bytes.
#[test]
fn a_refresh_writes_nothing_through_whatever_took_a_files_name() {
    let server = VersionedServer::start(|_, _| None);
    let (job, urls) = Job::with_items(&server.server, 5);
    job.run_ok(&[]);
    let rows = job.export();
    let path = |i: usize| PathBuf::from(rows[&urls[i]]["path"].as_str().expect("path"));
    let (linked, fifo, folder, hard) = (path(0), path(1), path(2), path(3));
    let outside = job.dir().join("outside");
    std::fs::write(&outside, b"outside, linked\n").unwrap();
    std::fs::remove_file(&linked).unwrap();
    std::os::unix::fs::symlink(&outside, &linked).unwrap();
    std::fs::remove_file(&fifo).unwrap();
    let c_fifo = std::ffi::CString::new(fifo.to_str().expect("UTF-8")).unwrap();
    // SAFETY: mkfifo with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o644) }, 0);
    std::fs::remove_file(&folder).unwrap();
    std::fs::create_dir(&folder).unwrap();
    let outside_hard = job.dir().join("outside-hard");
    std::fs::write(&outside_hard, b"outside, hard linked\n").unwrap();
    std::fs::remove_file(&hard).unwrap();
    std::fs::hard_link(&outside_hard, &hard).unwrap();
    server.bump(0..5);

    let mut child = job
        .command()
        .arg("refresh")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start jobrun refresh");
    let start = std::time::Instant::now();
    while child.try_wait().expect("wait for refresh").is_none() {
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("refresh was still running after 30 s: it waits on the FIFO");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let output = child.wait_with_output().expect("refresh output");

    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert_stderr_contains(&output, "3 refreshes failed");
    assert_eq!(std::fs::read(&outside).unwrap(), b"outside, linked\n");
    assert_eq!(
        std::fs::read(&outside_hard).unwrap(),
        b"outside, hard linked\n"
    );
    assert!(std::fs::symlink_metadata(&linked).unwrap().is_symlink());
    assert!(std::fs::symlink_metadata(&folder).unwrap().is_dir());
    use std::os::unix::fs::FileTypeExt;
    assert!(
        std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo()
    );
    assert_eq!(std::fs::read(&hard).unwrap(), server.current_body(&urls[3]));
    assert_eq!(std::fs::metadata(&hard).unwrap().nlink(), 1);
    assert_eq!(
        std::fs::read(path(4)).unwrap(),
        server.current_body(&urls[4])
    );
    let round = &job.report_json()["refresh"];
    assert_eq!(round["failed"], 3, "{round}");
    assert_eq!(round["changed"], 2, "{round}");
}
