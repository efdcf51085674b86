//! Habits from curl, wget and aria2c: a private CA (`--cacert`), client
//! certificates (`--cert`, `--key`), proxies (`--proxy`, `--noproxy` and
//! the environment), curl's short flags, `--connect-timeout`,
//! `--max-redirs`, `--retry-on`, HTTP/2 over TLS, and manual pages and
//! completions that cover all of it.

mod support;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use support::h2::H2Server;
use support::pki::TestCa;
use support::proxy::Proxy;
use support::*;

/// Every variable a proxy can come from, so that the machine's own
/// settings do not decide a test.
const PROXY_VARIABLES: [&str; 11] = [
    "http_proxy",
    "HTTP_PROXY",
    "https_proxy",
    "HTTPS_PROXY",
    "all_proxy",
    "ALL_PROXY",
    "no_proxy",
    "NO_PROXY",
    "REQUEST_METHOD",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

/// `jobrun run ARGS` with `env` as the only proxy settings.
fn run_with_env(job: &Job, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command: Command = job.command();
    for var in PROXY_VARIABLES {
        command.env_remove(var);
    }
    command.envs(env.iter().copied()).arg("run").args(args);
    command.output().expect("run jobrun")
}

fn run(job: &Job, args: &[&str]) -> Output {
    run_with_env(job, args, &[])
}

/// `jobrun run --cacert CACERT --cert CERT [--key KEY]`.
fn run_with_client_cert(job: &Job, cacert: &Path, cert: &Path, key: Option<&Path>) -> Output {
    let mut args = vec!["--cacert", path_arg(cacert), "--cert", path_arg(cert)];
    if let Some(key) = key {
        args.extend(["--key", path_arg(key)]);
    }
    run(job, &args)
}

fn item_handler(request: &Request) -> Reply {
    match item_of(&request.path) {
        Some(i) => Reply::ok(item_body(i)),
        None => Reply::status(404),
    }
}

/// Each URL's last error; all URLs must have failed.
fn failure_errors(job: &Job) -> Vec<String> {
    job.export()
        .values()
        .map(|row| {
            assert_eq!(row["state"], "failed", "{row}");
            row["error"].as_str().expect("error").to_string()
        })
        .collect()
}

fn path_arg(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

#[test]
fn an_http2_only_server_gets_its_streams_over_few_connections() {
    // A server that speaks only HTTP/2 (as ALPN tells) is fetched at all,
    // and many requests share a connection instead of opening one each.
    let ca = TestCa::new("jobrun HTTP/2 test CA");
    let server = H2Server::start(&ca, Duration::from_millis(20));
    fetch_items_over_h2(&ca, &server, 400, "50", "run against an HTTP/2-only server");
    assert!(
        server.most_streams_at_once() >= 10,
        "at most {} streams at once on one connection, with 50 workers",
        server.most_streams_at_once()
    );
    assert!(
        server.accepted() <= 2,
        "{} connections for 400 requests from 50 workers",
        server.accepted()
    );
}

#[test]
fn a_server_allowing_fewer_streams_than_workers_gets_a_few_connections() {
    // A connection carries at most the server's SETTINGS_MAX_CONCURRENT_STREAMS
    // at once; more workers than that must not wait in line behind them.
    let ca = TestCa::new("jobrun HTTP/2 test CA");
    let server = H2Server::start_with_streams(&ca, Duration::from_millis(100), 50);
    fetch_items_over_h2(
        &ca,
        &server,
        900,
        "150",
        "run against an HTTP/2 server allowing 50 streams per connection",
    );
    assert!(
        server.most_streams_in_all() >= 100,
        "at most {} streams at once from 150 workers, 50 allowed per connection",
        server.most_streams_in_all()
    );
    assert!(
        server.accepted() <= 3,
        "{} connections for 150 workers at 50 streams each",
        server.accepted()
    );
}

#[test]
fn a_private_ca_given_with_cacert_is_trusted_and_the_refusal_names_cacert() {
    let ca = TestCa::new("jobrun test CA");
    let server = Server::start_tls_with(ca.server_config(None), item_handler);
    let (job, urls) = Job::with_items(&server, 3);
    let output = run(&job, &[]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    for error in failure_errors(&job) {
        let cacert = error.find("--cacert").expect("the message names --cacert");
        let insecure = error
            .find("--insecure")
            .expect("the message names --insecure");
        assert!(cacert < insecure, "--cacert comes first: {error}");
    }
    assert_eq!(
        server.hit_count(),
        0,
        "a request went to an untrusted server"
    );

    let job = Job::with_urls(&urls);
    let cacert = ca.write(&job.dir().join("ca.pem"));
    assert_success(&run(&job, &["--cacert", path_arg(&cacert)]), "run --cacert");
    job.assert_all_files_right(&server, &urls);
}

#[test]
fn the_system_ca_certificates_are_needed_only_by_https_urls() {
    // SSL_CERT_FILE naming a file without a certificate stands in for a
    // system without CA certificates: no concern of a plain-http run.
    let server = Server::start(item_handler);
    let (job, urls) = Job::with_items(&server, 3);
    let no_store = job.dir().join("no-certificates.pem");
    std::fs::write(&no_store, "no certificate here\n").expect("write the empty store");
    let without_roots = [("SSL_CERT_FILE", path_arg(&no_store))];
    let output = run_with_env(&job, &[], &without_roots);
    assert_success(&output, "a plain-http run without CA certificates");
    job.assert_all_files_right(&server, &urls);

    // An https URL stops the run at once, saying what is missing and what
    // to do; nothing is sent and nothing is lost.
    let ca = TestCa::new("jobrun test CA");
    let server = Server::start_tls_with(ca.server_config(None), item_handler);
    let (job, urls) = Job::with_items(&server, 3);
    let output = run_with_env(&job, &[], &without_roots);
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{message}");
    assert!(
        message.contains("cannot verify https servers")
            && message.contains("No CA certificates were loaded from the system")
            && message.contains("--cacert"),
        "{message}"
    );
    assert_eq!(server.hit_count(), 0);
    assert_eq!(job.report_json()["pending"], 3);

    // --cacert is enough then.
    let cacert = ca.write(&job.dir().join("ca.pem"));
    let output = run_with_env(&job, &["--cacert", path_arg(&cacert)], &without_roots);
    assert_success(&output, "run --cacert without system CA certificates");
    job.assert_all_files_right(&server, &urls);
}

#[test]
fn cacert_adds_to_the_platform_roots_instead_of_replacing_them() {
    // SSL_CERT_FILE stands in for the system's store: its CA stays trusted
    // when --cacert adds another.
    let (system_ca, private_ca) = (TestCa::new("system CA"), TestCa::new("private CA"));
    let public = Server::start_tls_with(system_ca.server_config(None), item_handler);
    let private = Server::start_tls_with(private_ca.server_config(None), item_handler);
    let mut urls = item_urls(&public, 2);
    urls.extend((2..4).map(|i| private.url(&format!("/items/{i}.json"))));

    let job = Job::with_urls(&urls);
    let system_store = system_ca.write(&job.dir().join("system.pem"));
    let cacert = private_ca.write(&job.dir().join("private.pem"));
    let output = run_with_env(
        &job,
        &["--cacert", path_arg(&cacert)],
        &[("SSL_CERT_FILE", path_arg(&system_store))],
    );
    assert_success(&output, "run --cacert with a system store");
    job.assert_all_files_are(&urls, |url| {
        let path = &url[url.find("/items/").expect("item URL")..];
        item_body(item_of(path).expect("item"))
    });
    assert_eq!((public.hit_count(), private.hit_count()), (2, 2));
}

#[test]
fn a_server_that_requires_a_client_certificate_gets_one_from_cert_and_key() {
    let (ca, client_ca) = (TestCa::new("server CA"), TestCa::new("client CA"));
    let server = Server::start_tls_with(ca.server_config(Some(&client_ca)), item_handler);
    let (job, urls) = Job::with_items(&server, 3);
    let cacert = ca.write(&job.dir().join("ca.pem"));
    let output = run(&job, &["--cacert", path_arg(&cacert)]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    for row in job.export().values() {
        assert_eq!(row["attempts"], 1, "a refused client is not retried: {row}");
        let error = row["error"].as_str().unwrap();
        assert!(
            error.contains("client certificate") && error.contains("--cert"),
            "{error}"
        );
    }
    assert_eq!(server.hit_count(), 0);

    // A certificate from a CA the server does not know is refused too.
    let stranger = TestCa::new("unknown CA").client_cert();
    let job = Job::with_urls(&urls);
    let (cert, key) = stranger.write(job.dir(), "stranger");
    let output = run_with_client_cert(&job, &cacert, &cert, Some(&key));
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(failure_errors(&job).iter().all(|e| e.contains("--cert")));
    assert_eq!(server.hit_count(), 0);

    let client = client_ca.client_cert();
    let job = Job::with_urls(&urls);
    let (cert, key) = client.write(job.dir(), "client");
    let output = run_with_client_cert(&job, &cacert, &cert, Some(&key));
    assert_success(&output, "run --cert --key");
    job.assert_all_files_right(&server, &urls);

    // --cert alone, with the key in the same file.
    let job = Job::with_urls(&urls);
    let both = job.dir().join("both.pem");
    std::fs::write(&both, format!("{}{}", client.cert_pem, client.key_pem)).unwrap();
    let output = run_with_client_cert(&job, &cacert, &both, None);
    assert_success(&output, "run --cert with the key in its file");
    job.assert_all_files_right(&server, &urls);
}

#[test]
fn unusable_tls_files_stop_the_run_at_start_naming_the_file() {
    let ca = TestCa::new("server CA");
    let server = Server::start_tls_with(ca.server_config(None), item_handler);
    let job = Job::with_urls(&item_urls(&server, 2));
    let dir = job.dir();
    let cacert = ca.write(&dir.join("ca.pem"));
    let (one, two) = (ca.client_cert(), ca.client_cert());
    let (cert, _) = one.write(dir, "one");
    let (_, other_key) = two.write(dir, "two");
    std::fs::write(dir.join("notes.txt"), "not a certificate\n").unwrap();
    let missing = dir.join("missing.pem");
    let notes = dir.join("notes.txt");

    for (args, names) in [
        (
            vec!["--cacert", path_arg(&missing)],
            vec![path_arg(&missing)],
        ),
        (
            vec!["--cacert", path_arg(&notes)],
            vec![path_arg(&notes), "no certificate"],
        ),
        (vec!["--cacert", path_arg(dir)], vec![path_arg(dir)]),
        (
            vec!["--cert", path_arg(&cert)],
            vec![path_arg(&cert), "--key"],
        ),
        (
            vec!["--cert", path_arg(&cert), "--key", path_arg(&other_key)],
            vec![path_arg(&cert), path_arg(&other_key), "cannot be used"],
        ),
        (
            vec!["--cert", path_arg(&cert), "--key", path_arg(&notes)],
            vec![path_arg(&notes), "private key"],
        ),
    ] {
        let mut all = args.clone();
        if !args.contains(&"--cacert") {
            all.extend(["--cacert", path_arg(&cacert)]);
        }
        let output = run(&job, &all);
        let message = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {message}");
        for name in names {
            assert!(message.contains(name), "{args:?} names {name}: {message}");
        }
        assert!(!message.contains("panicked"), "{message}");
    }
    assert_eq!(server.hit_count(), 0, "a request went out");
    assert_eq!(job.report_json()["pending"], 2);
}

#[test]
fn an_http_proxy_carries_every_request_and_noproxy_bypasses_it() {
    let server = Server::start(item_handler);
    let urls = item_urls(&server, 4);
    let proxy = Proxy::http();

    let job = Job::with_urls(&urls);
    assert_success(&run(&job, &["-x", &proxy.url()]), "run -x");
    job.assert_all_files_right(&server, &urls);
    let mut targets = proxy.targets();
    targets.sort();
    assert_eq!(targets, urls, "every request went through the proxy");

    // The environment, as curl reads it.
    let job = Job::with_urls(&urls);
    assert_success(
        &run_with_env(&job, &[], &[("http_proxy", &proxy.url())]),
        "run with http_proxy",
    );
    job.assert_all_files_right(&server, &urls);
    assert_eq!(proxy.count(), 8);

    let url = proxy.url();
    for (args, env) in [
        (vec!["--proxy", &url, "--noproxy", "127.0.0.1"], vec![]),
        (vec!["--proxy", &url, "--noproxy", "*"], vec![]),
        (
            vec![],
            vec![("ALL_PROXY", url.as_str()), ("no_proxy", "127.0.0.0/8")],
        ),
    ] {
        let job = Job::with_urls(&urls);
        assert_success(&run_with_env(&job, &args, &env), "run past the proxy");
        job.assert_all_files_right(&server, &urls);
        assert_eq!(proxy.count(), 8, "{args:?} {env:?}: the proxy was used");
    }
    assert_eq!(server.hit_count(), 20);

    // https URLs go through a CONNECT tunnel, from https_proxy.
    let ca = TestCa::new("server CA");
    let tls = Server::start_tls_with(ca.server_config(None), item_handler);
    let (job, urls) = Job::with_items(&tls, 3);
    let cacert = ca.write(&job.dir().join("ca.pem"));
    let output = run_with_env(
        &job,
        &["--cacert", path_arg(&cacert)],
        &[("https_proxy", &url), ("http_proxy", "http://127.0.0.1:9")],
    );
    assert_success(&output, "run with https_proxy");
    job.assert_all_files_right(&tls, &urls);
    let tunnels = &proxy.targets()[8..];
    assert!(!tunnels.is_empty(), "no tunnel went through the proxy");
    assert!(
        tunnels.iter().all(|t| *t == tls.addr().to_string()),
        "{tunnels:?}"
    );
}

#[test]
fn a_socks5_proxy_carries_every_connection_also_from_all_proxy() {
    let ca = TestCa::new("server CA");
    let plain = Server::start(item_handler);
    let tls = Server::start_tls_with(ca.server_config(None), item_handler);
    let socks = Proxy::socks5();

    for (scheme, server, env) in [
        ("socks5", &plain, false),
        ("socks5h", &plain, false),
        ("socks5", &tls, false),
        ("socks5", &plain, true),
    ] {
        let before = socks.count();
        let (job, urls) = Job::with_items(server, 3);
        let cacert = ca.write(&job.dir().join("ca.pem"));
        let url = socks.url_as(scheme);
        let output = if env {
            run_with_env(&job, &["-j", "1"], &[("ALL_PROXY", &url)])
        } else {
            run(
                &job,
                &["-j", "1", "--proxy", &url, "--cacert", path_arg(&cacert)],
            )
        };
        assert_success(&output, &format!("run through {url} to {}", server.url("")));
        job.assert_all_files_right(server, &urls);
        let through: Vec<String> = socks.targets()[before..].to_vec();
        assert!(
            !through.is_empty(),
            "{scheme}: nothing went through the proxy"
        );
        let target = server.addr().to_string();
        assert!(through.iter().all(|t| *t == target), "{through:?}");
    }

    let (job, urls) = Job::with_items(&plain, 3);
    let before = socks.count();
    let output = run(
        &job,
        &["--proxy", &socks.url(), "--noproxy", "localhost,127.0.0.1"],
    );
    assert_success(&output, "run --noproxy");
    job.assert_all_files_right(&plain, &urls);
    assert_eq!(socks.count(), before, "--noproxy went through the proxy");
}

#[test]
fn an_unsupported_proxy_scheme_stops_the_run_before_any_request() {
    let server = Server::start(item_handler);
    let job = Job::with_urls(&item_urls(&server, 2));
    for (args, env, names) in [
        (
            vec![],
            vec![("ALL_PROXY", "ftp://u:s3cret@127.0.0.1:21")],
            "ALL_PROXY",
        ),
        (
            vec![],
            vec![("https_proxy", "socks4://127.0.0.1:1080")],
            "https_proxy",
        ),
        (
            vec!["--proxy", "gopher://u:s3cret@127.0.0.1:70"],
            vec![],
            "--proxy",
        ),
        (vec!["-x", "http://u:s3cret@"], vec![], "--proxy"),
    ] {
        let output = run_with_env(&job, &args, &env);
        let message = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?} {env:?}: {message}");
        assert!(message.contains(names), "names {names}: {message}");
        assert!(
            !message.contains("s3cret"),
            "a proxy password was printed: {message}"
        );
    }
    assert_eq!(server.hit_count(), 0, "a request went out");
    assert_eq!(job.report_json()["pending"], 2);
}

#[test]
fn curl_short_flags_mean_what_curl_means() {
    let server = Server::start_tls(|request| match item_of(&request.path) {
        Some(i) => Reply::ok(item_body(i)).delayed(Duration::from_millis(30)),
        None => Reply::status(404),
    });
    let (job, urls) = Job::with_items(&server, 8);
    let output = run(
        &job,
        &[
            "-k",
            "-H",
            "X-Token: t0ken",
            "-A",
            "curl-like/8",
            "-j",
            "2",
            "-v",
        ],
    );
    assert_success(&output, "run -k -H -A -j -v");
    job.assert_all_files_right(&server, &urls);
    for hit in server.hits() {
        let header = |name: &str| {
            hit.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(header("x-token"), Some("t0ken"), "{}", hit.path);
        assert_eq!(header("user-agent"), Some("curl-like/8"), "{}", hit.path);
    }
    assert!(
        server.most_in_flight() <= 2,
        "-j 2 let {} in",
        server.most_in_flight()
    );

    // The command recorded for the run keeps -H's value secret.
    let command: String = job
        .sql()
        .query_row("SELECT command FROM runs", [], |row| row.get(0))
        .expect("the run's command");
    assert!(command.contains("-H 'X-Token: …'"), "{command}");
    assert!(!command.contains("t0ken"), "{command}");
}

#[test]
fn max_redirs_limits_the_redirect_chain() {
    let server = Server::start(|request| {
        let hops = request
            .path
            .strip_prefix("/chain/")
            .and_then(|n| n.parse::<u32>().ok());
        match hops {
            Some(0) => Reply::ok(item_body(0)),
            Some(n) => Reply::redirect(302, &format!("/chain/{}", n - 1)),
            None => Reply::status(404),
        }
    });
    let three = server.url("/chain/3");
    let one = server.url("/chain/1");
    for (url, limit, done) in [
        (&three, "2", false),
        (&three, "3", true),
        (&one, "0", false),
        (&three, "10", true),
    ] {
        let job = Job::new();
        job.import(std::slice::from_ref(url));
        let output = run(&job, &["--max-redirs", limit]);
        let row = &job.export()[url.as_str()];
        if done {
            assert_success(&output, &format!("--max-redirs {limit}"));
            assert_eq!(row["state"], "done");
        } else {
            assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
            assert_eq!(row["state"], "failed");
            assert_eq!(row["attempts"], 1);
            let expected = format!("more than {limit} redirects (--max-redirs)");
            assert_eq!(row["error"].as_str(), Some(expected.as_str()));
        }
    }
}

#[test]
fn retry_on_chooses_which_statuses_are_retried() {
    // /flaky/404 and /flaky/503 fail once with that status, then serve.
    let server = Server::start(|request| {
        let status = request
            .path
            .strip_prefix("/flaky/")
            .and_then(|s| s.parse().ok());
        match (status, request.previous) {
            (Some(status), 0) => Reply::status(status),
            (Some(_), _) => Reply::ok(item_body(1)),
            (None, _) => Reply::status(404),
        }
    });
    let fast = ["--backoff-base", "10ms", "--backoff-max", "10ms"];
    let (url_404, url_503) = (server.url("/flaky/404"), server.url("/flaky/503"));
    let state_after = |retry_on: Option<&str>| {
        let job = Job::new();
        job.import(&[url_404.clone(), url_503.clone()]);
        let mut args = fast.to_vec();
        if let Some(list) = retry_on {
            args.extend(["--retry-on", list]);
        }
        run(&job, &args);
        let rows = job.export();
        (
            rows[&url_404]["state"].as_str().unwrap().to_string(),
            rows[&url_503]["state"].as_str().unwrap().to_string(),
        )
    };
    let expect = |a: &str, b: &str| (a.to_string(), b.to_string());
    // Each URL is asked for anew by every job; only the first answer fails.
    assert_eq!(
        state_after(Some("404")),
        expect("done", "failed"),
        "a list replaces the default"
    );
    assert_eq!(
        state_after(None),
        expect("done", "done"),
        "the default retries 503, not 404"
    );
    let hits = server.hits_per_path();
    assert_eq!((hits["/flaky/404"], hits["/flaky/503"]), (3, 2));
}

#[test]
fn connect_timeout_bounds_the_connection_and_its_handshake() {
    // A listener that takes connections and never speaks: the TLS
    // handshake never finishes, as behind a broken middlebox.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}/items/0.json", silent.local_addr().unwrap());
    // Connections are kept open, unanswered, until the test process ends.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in silent.incoming() {
            held.push(stream);
        }
    });
    let job = Job::new();
    job.import(std::slice::from_ref(&url));
    let started = Instant::now();
    let output = run(
        &job,
        &[
            "--connect-timeout",
            "300ms",
            "--timeout",
            "60s",
            "--max-attempts",
            "1",
        ],
    );
    let took = started.elapsed();
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let row = &job.export()[&url];
    assert_eq!(
        row["error"].as_str(),
        Some(
            "cannot connect: no connection within 300ms (--connect-timeout) (gave up after 1 attempts)"
        )
    );
    // Without the option the limit would be min(--timeout, 10s) = 10s.
    assert!(took < Duration::from_secs(8), "the run took {took:?}");
}

#[test]
fn man_pages_exist_for_every_command_and_name_their_options() {
    let job = Job::new();
    let dir = job.dir().join("man");
    assert_success(&job.jobrun(&["man", "--dir", path_arg(&dir)]), "man --dir");
    let main = std::fs::read_to_string(dir.join("jobrun.1")).expect("jobrun.1");
    let stdout = job.jobrun(&["man"]);
    assert_eq!(
        String::from_utf8_lossy(&stdout.stdout),
        main,
        "`jobrun man` prints jobrun.1"
    );

    let commands = [
        "import",
        "run",
        "report",
        "export",
        "retry",
        "verify",
        "completions",
        "man",
    ];
    let see_also = &main[main.find(".SH \"SEE ALSO\"").expect("a SEE ALSO section")..];
    for command in commands {
        let file = dir.join(format!("jobrun-{command}.1"));
        let page = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{file:?}: {e}"));
        assert!(
            page.contains(&format!(".TH jobrun-{command} 1")),
            "{command}"
        );
        assert!(
            see_also.contains(&format!("jobrun\\-{command}\\fR(1)")),
            "{see_also}"
        );
        let printed = job.jobrun(&["man", command]);
        assert_eq!(
            String::from_utf8_lossy(&printed.stdout),
            page,
            "jobrun man {command}"
        );
    }
    // Every page the main page refers to exists.
    for reference in main.split("jobrun\\-").skip(1) {
        let name: String = reference
            .chars()
            .take_while(|c| c.is_ascii_lowercase())
            .collect();
        assert!(
            dir.join(format!("jobrun-{name}.1")).exists(),
            "jobrun-{name}(1) is referred to"
        );
    }
    let run_page = std::fs::read_to_string(dir.join("jobrun-run.1")).unwrap();
    for option in [
        "\\-\\-cacert",
        "\\-\\-cert",
        "\\-\\-key",
        "\\-\\-proxy",
        "\\-\\-noproxy",
        "\\-\\-connect\\-timeout",
        "\\-\\-max\\-redirs",
        "\\-\\-retry\\-on",
        "\\-\\-workers",
        "\\-\\-max\\-bytes",
        "\\fB\\-H\\fR",
        "\\fB\\-x\\fR",
        "\\fB\\-k\\fR",
        "\\fB\\-A\\fR",
        "\\fB\\-j\\fR",
    ] {
        assert!(run_page.contains(option), "jobrun-run.1 lacks {option}");
    }
    let report_page = std::fs::read_to_string(dir.join("jobrun-report.1")).unwrap();
    assert!(report_page.contains("\\-\\-failed") && report_page.contains("\\-\\-json"));

    let output = job.jobrun(&["man", "nonsense"]);
    assert_eq!(output.status.code(), Some(2));
    assert_stderr_contains(&output, "pages exist for: import, run");
}

#[test]
fn completions_name_every_new_option() {
    let job = Job::new();
    for shell in ["bash", "zsh", "fish"] {
        let output = job.jobrun(&["completions", shell]);
        assert_success(&output, shell);
        let script = String::from_utf8_lossy(&output.stdout);
        for option in [
            "cacert",
            "cert",
            "key",
            "proxy",
            "noproxy",
            "connect-timeout",
            "max-redirs",
            "retry-on",
            "dir",
        ] {
            let spelled = match shell {
                "fish" => format!("-l {option} "),
                _ => format!("--{option}"),
            };
            assert!(script.contains(&spelled), "{shell}: no {spelled}");
        }
    }
    let bash = job.jobrun(&["completions", "bash"]);
    let bash = String::from_utf8_lossy(&bash.stdout);
    let run_options = bash
        .lines()
        .find(|line| line.contains("--cacert") && line.contains("opts="))
        .expect("bash: the options of run");
    for short in ["-H", "-k", "-x", "-A", "-j"] {
        assert!(
            run_options.split(['"', ' ']).any(|word| word == short),
            "bash: no {short} in {run_options}"
        );
    }
}

/// Fetches `count` items of `server` (its certificate from `ca`) with
/// `workers`, and checks that the run succeeded (`what`) and every file is
/// the item's body.
fn fetch_items_over_h2(ca: &TestCa, server: &H2Server, count: usize, workers: &str, what: &str) {
    let urls: Vec<String> = (0..count)
        .map(|i| server.url(&format!("/items/{i}.json")))
        .collect();
    let job = Job::new();
    job.import(&urls);
    let cacert = ca.write(&job.dir().join("ca.pem"));
    assert_success(
        &run(&job, &["--workers", workers, "--cacert", path_arg(&cacert)]),
        what,
    );
    job.assert_all_files_are(&urls, |url| {
        item_body(
            item_of(url.strip_prefix(&server.url("")).expect("an item URL")).expect("an item"),
        )
    });
}
