//! Unnamed temp files: bodies written where no folder lists them.
//!
//! A file opened with `O_TMPFILE` has no name until its batch links it in,
//! after the data sync. Creating one takes no folder's lock (named temp
//! files kept the workers and the renames waiting for each other) and a
//! crash leaves nothing to clean: the filesystem frees a file nobody named.
//! A thread of their own creates them ahead of need, so the runtime that
//! drives the requests does not wait while the filesystem finds an inode;
//! when none is ready, one is created on the spot.
//!
//! Each file holds a descriptor until its batch links it, so only so many
//! are held at once; past that, and where the filesystem has no
//! `O_TMPFILE` or a file cannot be linked back in, bodies go to named temp
//! files.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rustix::fs::{AtFlags, CWD, Mode, OFlags};
use rustix::io::Errno;

/// Files created ahead of need.
const AHEAD: usize = 32;

/// Unnamed files held at most, whatever the descriptor limit: two full
/// batches (one syncing, one gathering) and then some.
const MOST_HELD: usize = 4096;

/// The name the start-up check links its file under, in the run's folder.
pub const PROBE: &str = "probe";

/// The unnamed files of one run: those created ahead, and those holding a
/// body until its batch links it.
pub struct Unnamed {
    ahead: flume::Receiver<OwnedFd>,
    /// Where a file is created when none is ready.
    folder: OwnedFd,
    /// Written bodies by row, until their batch takes them.
    written: Mutex<HashMap<i64, Arc<File>>>,
    most_held: usize,
    taken_ahead: AtomicU64,
    created_on_the_spot: AtomicU64,
}

impl Unnamed {
    /// Checks that unnamed files can be created in `run_folder` and linked
    /// back in, and starts the thread that creates them ahead. None when
    /// they cannot (the body files are then named).
    pub fn start(run_folder: &OwnedFd) -> Option<Unnamed> {
        let most_held = descriptor_budget();
        if most_held == 0 {
            tracing::debug!("named temp files: the descriptor limit is too low for unnamed ones");
            return None;
        }
        if let Err(error) = probe(run_folder.as_fd()) {
            tracing::debug!("named temp files: no unnamed file on this filesystem ({error})");
            return None;
        }
        let (ready, ahead) = flume::bounded(AHEAD);
        let (folder, maker) = (run_folder.try_clone().ok()?, run_folder.try_clone().ok()?);
        // Ends when the run drops `ahead`, or on the first error (files are
        // then created on the spot, which reports it).
        std::thread::Builder::new()
            .name("jobrun-tmpfiles".into())
            .spawn(move || {
                while let Ok(fd) = create(maker.as_fd()) {
                    if ready.send(fd).is_err() {
                        return;
                    }
                }
            })
            .ok()?;
        Some(Unnamed {
            ahead,
            folder,
            written: Mutex::default(),
            most_held,
            taken_ahead: AtomicU64::new(0),
            created_on_the_spot: AtomicU64::new(0),
        })
    }

    /// A file for row `id`'s body, kept for its batch; None when as many
    /// as may be are held (the caller creates a named one).
    pub fn create(&self, id: i64) -> Option<io::Result<Arc<File>>> {
        if self.held().len() >= self.most_held {
            return None;
        }
        let fd = match self.ahead.try_recv() {
            Ok(fd) => {
                self.taken_ahead.fetch_add(1, Ordering::Relaxed);
                fd
            }
            Err(_) => {
                self.created_on_the_spot.fetch_add(1, Ordering::Relaxed);
                match create(self.folder.as_fd()) {
                    Ok(fd) => fd,
                    Err(error) => return Some(Err(error.into())),
                }
            }
        };
        let file = Arc::new(File::from(fd));
        self.held().insert(id, file.clone());
        Some(Ok(file))
    }

    /// Takes row `id`'s written body, to link it in or to drop it. None
    /// when it was written to a named file.
    pub fn take(&self, id: i64) -> Option<Arc<File>> {
        self.held().remove(&id)
    }

    /// How many files came ready and how many were created on the spot.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.taken_ahead.load(Ordering::Relaxed),
            self.created_on_the_spot.load(Ordering::Relaxed),
        )
    }

    fn held(&self) -> MutexGuard<'_, HashMap<i64, Arc<File>>> {
        self.written.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Gives the unnamed `file` the name `name` in `folder`. Through
/// `/proc/self/fd`, which any user may do; without `/proc`, with
/// `AT_EMPTY_PATH`, which only some may.
pub fn link(file: &File, folder: BorrowedFd<'_>, name: &str) -> rustix::io::Result<()> {
    let proc = format!("/proc/self/fd/{}", file.as_raw_fd());
    match rustix::fs::linkat(CWD, &proc, folder, name, AtFlags::SYMLINK_FOLLOW) {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        Err(Errno::NOENT) => rustix::fs::linkat(file, "", folder, name, AtFlags::EMPTY_PATH),
        other => other,
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn create(folder: BorrowedFd<'_>) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        folder,
        ".",
        OFlags::WRONLY | OFlags::TMPFILE | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o666),
    )
}

/// Elsewhere there is no `O_TMPFILE`: temp files are named.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn create(_folder: BorrowedFd<'_>) -> rustix::io::Result<OwnedFd> {
    Err(Errno::OPNOTSUPP)
}

/// Creates an unnamed file, links it under [`PROBE`] and removes it.
fn probe(folder: BorrowedFd<'_>) -> rustix::io::Result<()> {
    let file = File::from(create(folder)?);
    let _ = rustix::fs::unlinkat(folder, PROBE, AtFlags::empty());
    link(&file, folder, PROBE)?;
    rustix::fs::unlinkat(folder, PROBE, AtFlags::empty())
}

/// How many unnamed files may be held: a quarter of the descriptors this
/// process may open, the rest being for connections and the database.
fn descriptor_budget() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the limit into `limit`, which outlives the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 0;
    }
    usize::try_from(limit.rlim_cur / 4)
        .unwrap_or(MOST_HELD)
        .min(MOST_HELD)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn run_folder() -> (tempfile::TempDir, OwnedFd) {
        let dir = tempfile::tempdir().unwrap();
        let fd = rustix::fs::open(
            dir.path(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
        (dir, fd)
    }

    #[test]
    fn past_the_most_held_a_body_gets_a_named_file() {
        let (_dir, folder) = run_folder();
        let mut unnamed = Unnamed::start(&folder).expect("O_TMPFILE on the test's filesystem");
        unnamed.most_held = 2;
        assert!(unnamed.create(1).is_some());
        assert!(unnamed.create(2).is_some());
        assert!(unnamed.create(3).is_none());
        // Once a batch takes one, there is room again.
        assert!(unnamed.take(1).is_some());
        assert!(unnamed.create(3).is_some());
    }

    #[test]
    fn a_linked_file_has_what_was_written_and_the_probe_is_gone() {
        let (dir, folder) = run_folder();
        let unnamed = Unnamed::start(&folder).expect("O_TMPFILE on the test's filesystem");
        assert!(!dir.path().join(PROBE).exists());
        let file = unnamed.create(7).unwrap().unwrap();
        (&*file).write_all(b"body").unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let file = unnamed.take(7).unwrap();
        link(&file, folder.as_fd(), "seven").unwrap();
        assert_eq!(std::fs::read(dir.path().join("seven")).unwrap(), b"body");
        assert_eq!(
            link(&file, folder.as_fd(), "seven"),
            Err(Errno::EXIST),
            "a link replaced a file"
        );
    }
}
