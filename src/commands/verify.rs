//! `jobrun verify`: re-reads every done file and checks it against the
//! size and sha256 recorded when it was fetched. Missing and damaged files
//! are listed by path; `--requeue` sends their URLs back to pending.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::path::Path;

use anyhow::Result;
use sha2::{Digest, Sha256};

use crate::cli::VerifyArgs;
use crate::commands::Status;
use crate::format::thousands;
use crate::out_dir;
use crate::redact::redact_url;
use crate::store::{Database, Open};

pub fn run(db: &Database, args: VerifyArgs) -> Result<Status> {
    let mut store = db.open(if args.requeue {
        Open::MustExist
    } else {
        Open::ReadOnly
    })?;
    let out_dir = out_dir::recorded_or_default(&*store, db)?;
    let mut checked = 0u64;
    let mut bad = Vec::new();
    // Files another machine wrote are in its own output folder: counted by
    // machine, not checked here.
    let here = crate::process::hostname();
    let mut elsewhere = std::collections::BTreeMap::<String, u64>::new();
    store.done_files(&mut |file| {
        if let Some(host) = file.written_on.filter(|host| *host != here) {
            *elsewhere.entry(host).or_default() += 1;
            return Ok(());
        }
        checked += 1;
        let path = out_dir.join(&file.path);
        if let Some(problem) = check(&path, file.bytes, &file.sha256)? {
            println!("{problem}: {} ({})", path.display(), redact_url(&file.url));
            bad.push(file.id);
        }
        Ok(())
    })?;
    tracing::info!(
        "checked {} files: {} missing or damaged",
        thousands(checked),
        thousands(bad.len() as u64)
    );
    for (host, files) in &elsewhere {
        tracing::info!(
            "{} files written on {host} are in its output folder, not checked here: run \
             `jobrun verify` there",
            thousands(*files)
        );
    }
    if bad.is_empty() {
        return Ok(Status::Success);
    }
    if args.requeue {
        store.requeue_damaged(&bad)?;
        tracing::info!(
            "{} URLs are pending again; fetch them with `jobrun --db {} run`",
            thousands(bad.len() as u64),
            db.shown()
        );
    } else {
        tracing::info!("`jobrun verify --requeue` sends them back to pending to fetch again");
    }
    Ok(Status::Partial)
}

/// What is wrong with a done file, if anything.
fn check(path: &Path, bytes: Option<u64>, sha256: &[u8]) -> Result<Option<String>> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Some("missing".into())),
        Err(e) => return Ok(Some(format!("unreadable ({e})"))),
    };
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 256 * 1024];
    let mut size = 0u64;
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                size += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Ok(Some(format!("unreadable ({e})"))),
        }
    }
    match bytes {
        Some(bytes) if bytes == size => {}
        Some(bytes) => return Ok(Some(format!("damaged: {size} bytes, {bytes} expected"))),
        None => return Ok(Some(format!("damaged: {size} bytes, no size recorded"))),
    }
    if hasher.finalize().as_slice() != sha256 {
        return Ok(Some("damaged: sha256 differs".into()));
    }
    Ok(None)
}
