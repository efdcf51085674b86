//! The relay that bounds every wait for PostgreSQL over a Unix socket, as
//! a hostile machine sees it: jobrun killed in the middle of connecting, a
//! `$TMPDIR` it cannot use, and another process that connects to the
//! relay's socket before jobrun's own client does.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use support::*;

/// A "server" socket `.s.PGSQL.5432` in a folder of its own that accepts
/// connections, counts them and never answers.
struct Silent {
    dir: tempfile::TempDir,
    accepted: Arc<AtomicUsize>,
}

impl Silent {
    fn start() -> Silent {
        let dir = tempfile::tempdir().expect("a folder for the silent server");
        let listener = UnixListener::bind(dir.path().join(".s.PGSQL.5432")).expect("bind");
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming().map_while(Result::ok) {
                counted.fetch_add(1, Ordering::SeqCst);
                held.push(stream);
            }
        });
        Silent { dir, accepted }
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// A PostgreSQL URL naming the Unix socket folders `dirs`, in that order.
fn url_of_folders(dirs: &[&Path]) -> String {
    let hosts: Vec<String> = dirs
        .iter()
        .map(|dir| dir.to_str().expect("a UTF-8 folder").replace('/', "%2F"))
        .collect();
    format!(
        "postgres://postgres@{}:5432/test?sslmode=disable",
        hosts.join(",")
    )
}

/// `jobrun report` on `url` with `$TMPDIR` at `tmpdir`, started.
fn spawn_report(job: &Job, url: &str, tmpdir: &Path) -> Child {
    job.command_on(url)
        .env("TMPDIR", tmpdir)
        .args(["--db-timeout", "60s", "report"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start jobrun")
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .expect("read the temp folder")
        .map(|entry| entry.expect("an entry").path())
        .collect()
}

#[test]
fn jobrun_killed_while_connecting_over_a_unix_socket_leaves_nothing_in_tmpdir() {
    let job = Job::new();
    let tmpdir = job.dir().join("tmp");
    std::fs::create_dir(&tmpdir).unwrap();
    // The first host takes the connection and never answers; the second is
    // yet to be tried.
    let silent = Silent::start();
    let second = tempfile::tempdir().unwrap();
    let url = url_of_folders(&[silent.dir(), second.path()]);
    let mut report = spawn_report(&job, &url, &tmpdir);
    wait_for(Duration::from_secs(30), "jobrun to connect", || {
        silent.accepted() > 0
    });
    let while_connecting = entries(&tmpdir);
    report.kill().expect("kill -9 jobrun");
    let status = report.wait().unwrap();
    assert_eq!(status.code(), None, "jobrun ended before it was killed");
    assert_eq!(
        while_connecting,
        Vec::<PathBuf>::new(),
        "what jobrun had in $TMPDIR while connecting"
    );
    assert_eq!(
        entries(&tmpdir),
        Vec::<PathBuf>::new(),
        "what jobrun left in $TMPDIR, killed"
    );
}

/// The relay sockets of process `pid` that listen now, as /proc/net/unix
/// names them: `@name` for an abstract one, else its path.
fn listening_relays(pid: u32) -> Vec<String> {
    let table = std::fs::read_to_string("/proc/net/unix").expect("read /proc/net/unix");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // Num RefCount Protocol Flags Type St Inode Path; the flag
            // 00010000 marks a listening socket.
            let (flags, path) = (fields.get(3)?, fields.get(7)?);
            (flags.ends_with("10000") && path.contains(&format!("jobrun-pg-{pid}-")))
                .then(|| path.to_string())
        })
        .collect()
}

fn connect_to(name: &str) -> std::io::Result<UnixStream> {
    match name.strip_prefix('@') {
        Some(abstract_name) => {
            use std::os::linux::net::SocketAddrExt;
            let address = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)?;
            UnixStream::connect_addr(&address)
        }
        None => UnixStream::connect(name),
    }
}

#[test]
fn another_process_connecting_to_the_relay_gets_nowhere() {
    let job = Job::new();
    let tmpdir = job.dir().join("tmp");
    std::fs::create_dir(&tmpdir).unwrap();
    let silent = Silent::start();
    // The second host counts who reaches it through the relay.
    let second = Silent::start();
    let url = url_of_folders(&[silent.dir(), second.dir()]);
    let mut report = spawn_report(&job, &url, &tmpdir);
    wait_for(Duration::from_secs(30), "jobrun to connect", || {
        silent.accepted() > 0
    });
    let relays = listening_relays(report.id());
    assert_eq!(relays.len(), 1, "the second host's relay: {relays:?}");
    let mut stranger = connect_to(&relays[0]).expect("connect to the relay's socket");
    stranger
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // A startup message, as a client would send.
    let _ = stranger.write_all(&[0, 0, 0, 8, 0, 3, 0, 0]);
    let mut answer = [0; 16];
    let read = stranger.read(&mut answer);
    report.kill().expect("kill jobrun");
    report.wait().unwrap();
    assert!(
        matches!(&read, Ok(0))
            || read
                .as_ref()
                .is_err_and(|e| e.kind() == ErrorKind::ConnectionReset),
        "the relay kept another process's connection open: {read:?}"
    );
    assert_eq!(
        second.accepted(),
        0,
        "another process reached the server through jobrun's relay"
    );
}

/// The test server's first Unix socket folder and its port.
fn server_socket() -> (PathBuf, u16) {
    let mut client = postgres::Client::connect(&pg_server_url(), postgres::NoTls)
        .expect("connect to the test server");
    let row = client
        .query_one(
            "SELECT current_setting('unix_socket_directories'), current_setting('port')::int",
            &[],
        )
        .expect("read the server's socket folder");
    let dirs: String = row.get(0);
    let port: i32 = row.get(1);
    let dir = dirs
        .split(',')
        .map(str::trim)
        .find(|dir| dir.starts_with('/'))
        .expect("the test server listens on a Unix socket");
    (dir.into(), u16::try_from(port).expect("a port"))
}

/// `url` (a job's queue) with its host replaced by the Unix socket folder
/// `dir`, port `port`.
fn over_socket(url: &str, dir: &Path, port: u16) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let (user, rest) = rest.split_once('@').expect("a user");
    let tail = &rest[rest.find(['/', '?']).unwrap_or(rest.len())..];
    let folder = dir.to_str().expect("a UTF-8 folder").replace('/', "%2F");
    format!("{scheme}://{user}@{folder}:{port}{tail}")
}

#[test]
fn a_tmpdir_jobrun_cannot_use_does_not_stop_a_connection_over_a_unix_socket() {
    let job = Job::on(Backend::Postgres);
    let server = item_server(Duration::ZERO);
    assert_success(&job.import(&item_urls(&server, 3)), "import");
    let (dir, port) = server_socket();
    let url = over_socket(&job.postgres().unwrap().url, &dir, port);
    let place = job.dir().join("places");
    std::fs::create_dir(&place).unwrap();
    let a_file = place.join("a-file");
    std::fs::write(&a_file, b"not a folder").unwrap();
    let elsewhere = place.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let a_link = place.join("a-link");
    std::os::unix::fs::symlink(&elsewhere, &a_link).unwrap();
    let dangling = place.join("dangling");
    std::os::unix::fs::symlink(place.join("nothing"), &dangling).unwrap();
    // Longer than a Unix socket's path may be, with a socket name in it.
    let long = place.join("l".repeat(100));
    std::fs::create_dir(&long).unwrap();
    let full = place.join("full");
    std::fs::create_dir(&full).unwrap();
    let mount = Mount::tmpfs(&full, 64 * 1024, "a full $TMPDIR");
    if let Some(mount) = &mount {
        // Fill it: no inode is left, nor a block.
        mount.remount("size=64k,nr_inodes=16");
        let mut n = 0;
        while std::fs::File::create(full.join(n.to_string())).is_ok() {
            n += 1;
        }
        let _ = std::fs::write(full.join("0"), vec![0; 128 * 1024]);
    }
    for (what, tmpdir) in [
        ("a folder that does not exist", place.join("nothing")),
        ("a file", a_file.clone()),
        ("a symbolic link to a folder", a_link.clone()),
        ("a dangling symbolic link", dangling.clone()),
        ("a full filesystem", full.clone()),
        ("a long path", long.clone()),
    ] {
        let output = job
            .command_on(&url)
            .env("TMPDIR", &tmpdir)
            .args(["--db-timeout", "30s", "report"])
            .output()
            .expect("run jobrun");
        assert_success(&output, &format!("report with $TMPDIR {what}"));
        assert!(stdout(&output).contains('3'), "{what}: {}", stdout(&output));
    }
    assert_eq!(entries(&elsewhere), Vec::<PathBuf>::new());
    drop(mount);
}

/// Two Unix socket hosts tried in random order (`load_balance_hosts=random`):
/// each relay takes its own socket's connection, whichever host comes first.
/// Before, the relays started in the hosts' order, and a client that tried
/// the second host first waited for ever on a relay that never took it.
#[test]
fn unix_socket_hosts_tried_in_random_order_each_connect() {
    let job = Job::on(Backend::Postgres);
    let server = item_server(Duration::ZERO);
    assert_success(&job.import(&item_urls(&server, 3)), "import");
    let (dir, port) = server_socket();
    let url = over_socket(&job.postgres().unwrap().url, &dir, port);
    let folder = dir.to_str().expect("a UTF-8 folder").replace('/', "%2F");
    let url = url.replacen(&folder, &format!("{folder},{folder}"), 1);
    let url = url.replacen('?', "?load_balance_hosts=random&", 1);
    for attempt in 0..8 {
        let mut report = job
            .command_on(&url)
            .args(["--db-timeout", "5s", "report"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start jobrun");
        let started = std::time::Instant::now();
        while report.try_wait().unwrap().is_none() && started.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(10));
        }
        if report.try_wait().unwrap().is_none() {
            report.kill().unwrap();
            panic!("report {attempt} still connecting after 20 s");
        }
        assert_success(&report.wait_with_output().unwrap(), "report");
    }
}
