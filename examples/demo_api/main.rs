//! A local demo API for trying jobrun without the internet: serves
//! `/items/<i>.json` (JSON of 200 bytes to 30 KB) on 127.0.0.1 with a little
//! latency, and fails some first requests the way real APIs do: 500s, 429s
//! with Retry-After, connections reset mid-body, and a few 404s (which
//! fail for good until `jobrun retry` sends them back).
//!
//!     cargo run --example demo_api -- --items 2000 --url-file api.url --manifest manifest.txt
//!
//! It writes its base URL to --url-file once it is listening, and
//! `<url> <sha256>` for every item to --manifest, so a job's files can be
//! checked. It serves until it is stopped.

use std::io::Write;
use std::time::Duration;

use jobrun_test_server::{Reply, Server, item_body, item_of};
use sha2::{Digest, Sha256};

struct Options {
    items: u64,
    url_file: Option<String>,
    manifest: Option<String>,
    latency: Duration,
    /// One item in this many fails its first request.
    fault_every: u64,
}

fn parse() -> Result<Options, String> {
    let mut options = Options {
        items: 2000,
        url_file: None,
        manifest: None,
        latency: Duration::from_millis(5),
        fault_every: 30,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--items" => options.items = value()?.parse().map_err(|_| "--items: a number")?,
            "--url-file" => options.url_file = Some(value()?),
            "--manifest" => options.manifest = Some(value()?),
            "--latency-ms" => {
                let ms: u64 = value()?.parse().map_err(|_| "--latency-ms: a number")?;
                options.latency = Duration::from_millis(ms);
            }
            "--fault-every" => {
                options.fault_every = value()?.parse().map_err(|_| "--fault-every: a number")?;
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(options)
}

fn main() {
    let options = match parse() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("demo_api: {message}");
            std::process::exit(2);
        }
    };
    let (items, every, latency) = (options.items, options.fault_every.max(1), options.latency);
    let server = Server::try_start(move |request| {
        let Some(i) = item_of(&request.path).filter(|&i| i < items) else {
            return Reply::status(404);
        };
        let body = item_body(i);
        // A 429 pauses the whole host for its Retry-After, so it is rare.
        let reply = match (i % every, request.previous) {
            (1, 0) => Reply::status(500),
            (2, 0) if i % 10_000 == 2 => Reply::status(429).with_header("Retry-After", "1"),
            (3, 0) => {
                let sent = body.len() / 2;
                Reply::ResetMidBody { body, sent }
            }
            // A 404 fails for good at once; `jobrun retry` gets it later.
            (4, 0) if i % (every * 10) == 4 => Reply::status(404),
            _ => Reply::ok(body),
        };
        reply.delayed(latency)
    });
    let server = match server {
        Ok(server) => server,
        Err(error) => {
            eprintln!("demo_api: cannot listen on 127.0.0.1: {error}");
            std::process::exit(1);
        }
    };
    if let Some(path) = &options.manifest {
        let mut manifest =
            std::io::BufWriter::new(std::fs::File::create(path).expect("create manifest"));
        for i in 0..items {
            let digest = Sha256::digest(item_body(i));
            let url = server.url(&format!("/items/{i}.json"));
            writeln!(manifest, "{url} {digest:x}").expect("write manifest");
        }
    }
    if let Some(path) = &options.url_file {
        std::fs::write(path, server.url("")).expect("write url file");
    }
    eprintln!(
        "demo_api: {} items at {}/items/<i>.json",
        items,
        server.url("")
    );
    loop {
        std::thread::park();
    }
}
