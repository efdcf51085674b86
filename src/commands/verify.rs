//! `jobrun verify`: re-reads every done file and checks it against the
//! size and sha256 recorded when it was fetched. Missing and damaged files
//! are listed by path; `--requeue` sends their URLs back to pending.
//!
//! A file is read only from inside the output folder: a symlink at its
//! name, or on the way to it, is listed, never read through; a FIFO, a
//! folder or a device there is listed, never opened for reading.

use std::fs::File;
use std::io::{self, ErrorKind, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use rustix::fs::{FileType, OFlags};

use anyhow::Result;
use sha2::{Digest, Sha256};

use crate::cli::VerifyArgs;
use crate::commands::Status;
use crate::format::thousands;
use crate::out_dir;
use crate::output::open_no_symlinks;
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
    // `--out` itself may be a symlink: it is followed, the names in it not.
    // O_DIRECTORY and O_NONBLOCK: a FIFO at `--out` is refused, not waited on.
    let root = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NONBLOCK)
        .open(&out_dir);
    store.done_files(&mut |file| {
        if let Some(host) = file.written_on.filter(|host| *host != here) {
            *elsewhere.entry(host).or_default() += 1;
            return Ok(());
        }
        checked += 1;
        let path = out_dir.join(&file.path);
        let problem = match &root {
            Ok(root) => check(root.as_fd(), &file.path, file.bytes, &file.sha256)?,
            Err(e) if e.kind() == ErrorKind::NotFound => Some("missing".into()),
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => Some(format!(
                "unreadable (the output folder {} is not a folder)",
                out_dir.display()
            )),
            Err(e) => Some(format!(
                "unreadable (cannot open the output folder {}: {e})",
                out_dir.display()
            )),
        };
        if let Some(problem) = problem {
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

/// What is wrong with the done file `name` in the output folder `root`, if
/// anything.
fn check(
    root: BorrowedFd<'_>,
    name: &str,
    bytes: Option<u64>,
    sha256: &[u8],
) -> Result<Option<String>> {
    let mut file = match open_beneath(root, name) {
        Ok(file) => file,
        Err(Opened::Not(kind)) => {
            return Ok(Some(format!(
                "not the file jobrun wrote, {kind} is at its name"
            )));
        }
        Err(Opened::Error(e)) if e == rustix::io::Errno::NOENT => {
            return Ok(Some("missing".into()));
        }
        Err(Opened::Error(e)) if e == rustix::io::Errno::LOOP => {
            return Ok(Some(
                "not the file jobrun wrote, a symlink is at its name or on the way to it \
                 (never read through)"
                    .into(),
            ));
        }
        Err(Opened::Error(e)) if e == rustix::io::Errno::XDEV => {
            return Ok(Some(
                "not the file jobrun wrote, its name leads out of the output folder or \
                 across a mount (never read there)"
                    .into(),
            ));
        }
        Err(Opened::Error(e)) => {
            return Ok(Some(format!("unreadable ({})", io::Error::from(e))));
        }
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

/// Why a done file was not opened.
enum Opened {
    /// Something other than a regular file is at the name: "a FIFO", ...
    Not(&'static str),
    Error(rustix::io::Errno),
}

impl From<rustix::io::Errno> for Opened {
    fn from(e: rustix::io::Errno) -> Opened {
        Opened::Error(e)
    }
}

/// Opens the regular file `name` inside `root` for reading, following no
/// symlink and leaving neither `root` nor its filesystem. What is at the
/// name is looked at before it is opened for reading, so that a FIFO is
/// never waited on and a device never opened.
fn open_beneath(root: BorrowedFd<'_>, name: &str) -> Result<File, Opened> {
    let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    // O_PATH opens without reading: a device is looked at, not opened.
    #[cfg(target_os = "linux")]
    regular(&open_no_symlinks(
        root,
        name,
        OFlags::PATH | OFlags::CLOEXEC,
    )?)?;
    let fd = open_no_symlinks(root, name, flags)?;
    // The name may have been replaced between the two opens.
    regular(&fd)?;
    Ok(File::from(fd))
}

fn regular(fd: &OwnedFd) -> Result<(), Opened> {
    let kind = match FileType::from_raw_mode(rustix::fs::fstat(fd)?.st_mode) {
        FileType::RegularFile => return Ok(()),
        FileType::Directory => "a folder",
        FileType::Fifo => "a FIFO",
        FileType::Socket => "a socket",
        FileType::CharacterDevice | FileType::BlockDevice => "a device",
        FileType::Symlink => "a symlink",
        FileType::Unknown => "something other than a file",
    };
    Err(Opened::Not(kind))
}
