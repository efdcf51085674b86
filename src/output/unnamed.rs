//! Unnamed temp files: bodies written where no folder lists them.
//!
//! A file opened with `O_TMPFILE` has no name until its batch links it in,
//! after the data sync. Creating one takes no folder's lock (named temp
//! files kept the workers and the renames waiting for each other) and a
//! crash leaves nothing to clean: the filesystem frees a file nobody named.
//! A thread of their own creates them ahead of need, so the runtime that
//! drives the requests does not wait while the filesystem finds an inode;
//! when none is ready, one is created on the spot. That thread is woken
//! only once half of them are taken, not for every file.
//!
//! Each file holds a descriptor until its batch links it, so only so many
//! are held at once; past that, and where the filesystem has no
//! `O_TMPFILE` or a file cannot be linked back in, bodies go to named temp
//! files.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{JoinHandle, Thread};

use rustix::fs::{AtFlags, CWD, Mode, OFlags};

/// Files created ahead of need, at most: fewer when the descriptor limit
/// is low (half the files that may be held), for each holds a descriptor.
const AHEAD: usize = 32;

/// Unnamed files held at most, whatever the descriptor limit: two full
/// batches of 1,024 (one syncing, one gathering). Past that, while the disk
/// lags, bodies go to named files, which are closed once written.
const MOST_HELD: usize = 2048;

/// The name the start-up check links its file under, in the run's folder.
pub const PROBE: &str = "probe";

/// The unnamed files of one run: those created ahead, and those holding a
/// body until its batch links it.
pub struct Unnamed {
    /// None once the run is over, which ends the thread.
    ahead: Option<flume::Receiver<OwnedFd>>,
    maker: Thread,
    made: Option<JoinHandle<()>>,
    linking: Linking,
    folders: Arc<Spread>,
    /// Written bodies by row, until their batch takes them.
    written: Mutex<HashMap<i64, Arc<File>>>,
    most_held: usize,
    taken_ahead: AtomicU64,
    created_on_the_spot: AtomicU64,
}

impl Unnamed {
    /// Checks that unnamed files can be created in `run_folder` and linked
    /// back in, and starts the thread that creates them ahead, in the
    /// folders `spread` in turn. None when they cannot (the body files are
    /// then named).
    pub fn start<'a>(
        run_folder: &OwnedFd,
        spread: impl IntoIterator<Item = BorrowedFd<'a>>,
    ) -> Option<Unnamed> {
        let most_held = descriptor_budget();
        if most_held == 0 {
            tracing::debug!("named temp files: the descriptor limit is too low for unnamed ones");
            return None;
        }
        let linking = match probe(run_folder.as_fd()) {
            Ok(linking) => linking,
            Err(error) => {
                tracing::debug!("named temp files: no unnamed file on this filesystem ({error})");
                return None;
            }
        };
        // Under a low `ulimit -n`, the 32 files made ahead took every
        // descriptor left for connections.
        let (ready, ahead) = flume::bounded(AHEAD.min(most_held / 2).max(1));
        // Each folder costs a descriptor too: few when they are few.
        let folders = spread
            .into_iter()
            .take((most_held / 8).max(1))
            .map(|fd| fd.try_clone_to_owned())
            .collect::<io::Result<Vec<_>>>()
            .ok()
            .filter(|folders| !folders.is_empty())?;
        let folders = Arc::new(Spread {
            folders,
            next: AtomicUsize::new(0),
        });
        let at = folders.clone();
        let made = std::thread::Builder::new()
            .name("jobrun-tmpfiles".into())
            .spawn(move || fill(&ready, || at.create()))
            .ok()?;
        Some(Unnamed {
            ahead: Some(ahead),
            maker: made.thread().clone(),
            made: Some(made),
            linking,
            folders,
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
        let ahead = self.ahead.as_ref()?;
        let taken = ahead.try_recv();
        if ahead.len() <= ahead.capacity().unwrap_or(AHEAD) / 2 {
            self.maker.unpark();
        }
        let fd = match taken {
            Ok(fd) => {
                self.taken_ahead.fetch_add(1, Ordering::Relaxed);
                fd
            }
            Err(_) => {
                self.created_on_the_spot.fetch_add(1, Ordering::Relaxed);
                match self.folders.create() {
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

    /// Gives the unnamed `file` the name `name` in `folder`.
    pub fn link(&self, file: &File, folder: BorrowedFd<'_>, name: &str) -> rustix::io::Result<()> {
        link(self.linking, file, folder, name)
    }

    fn held(&self) -> MutexGuard<'_, HashMap<i64, Arc<File>>> {
        self.written.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Fills `ready` with files from `create`, then waits to be woken. Ends
/// when the run drops the receiving end. A create that fails (descriptors
/// or space short for a while) is tried again when the thread is next
/// woken, that is once a file is taken: meanwhile files are created on the
/// spot, which reports the error if it lasts.
fn fill(ready: &flume::Sender<OwnedFd>, mut create: impl FnMut() -> rustix::io::Result<OwnedFd>) {
    let mut spare = None;
    loop {
        let fd = match spare.take().map_or_else(&mut create, Ok) {
            Ok(fd) => fd,
            Err(_) => {
                std::thread::park();
                if ready.is_disconnected() {
                    return;
                }
                continue;
            }
        };
        match ready.try_send(fd) {
            Ok(()) => {}
            Err(flume::TrySendError::Full(fd)) => {
                spare = Some(fd);
                std::thread::park();
            }
            Err(flume::TrySendError::Disconnected(_)) => return,
        }
    }
}

/// Ends the thread, after the file it may be creating.
impl Drop for Unnamed {
    fn drop(&mut self) {
        self.ahead = None;
        self.maker.unpark();
        if let Some(made) = self.made.take() {
            let _ = made.join();
        }
    }
}

/// The folders files are created in, in turn: the filesystem looks for a
/// free inode near the file's folder, and with one folder for all, ext4
/// kept searching the same group of inodes.
struct Spread {
    folders: Vec<OwnedFd>,
    next: AtomicUsize,
}

impl Spread {
    fn create(&self) -> rustix::io::Result<OwnedFd> {
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % self.folders.len();
        create(self.folders[turn].as_fd())
    }
}

/// How an unnamed file is given a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Linking {
    /// `linkat` of the file itself (`AT_EMPTY_PATH`): Linux 6.10 and later
    /// let the process that opened it; earlier ones only a privileged one.
    EmptyPath,
    /// `linkat` of `/proc/self/fd/N`, which any process may.
    Proc,
}

fn link(how: Linking, file: &File, folder: BorrowedFd<'_>, name: &str) -> rustix::io::Result<()> {
    match how {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        Linking::EmptyPath => rustix::fs::linkat(file, "", folder, name, AtFlags::EMPTY_PATH),
        _ => {
            let proc = format!("/proc/self/fd/{}", file.as_raw_fd());
            rustix::fs::linkat(CWD, &proc, folder, name, AtFlags::SYMLINK_FOLLOW)
        }
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
    Err(rustix::io::Errno::OPNOTSUPP)
}

/// Creates an unnamed file, links it under [`PROBE`] and removes it: how
/// it could be linked.
fn probe(folder: BorrowedFd<'_>) -> rustix::io::Result<Linking> {
    let file = File::from(create(folder)?);
    let _ = rustix::fs::unlinkat(folder, PROBE, AtFlags::empty());
    let linking = match link(Linking::EmptyPath, &file, folder, PROBE) {
        Ok(()) => Linking::EmptyPath,
        Err(_) => {
            link(Linking::Proc, &file, folder, PROBE)?;
            Linking::Proc
        }
    };
    rustix::fs::unlinkat(folder, PROBE, AtFlags::empty())?;
    Ok(linking)
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
    use rustix::io::Errno;
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
        let mut unnamed =
            Unnamed::start(&folder, [folder.as_fd()]).expect("O_TMPFILE on the test's filesystem");
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
        let unnamed =
            Unnamed::start(&folder, [folder.as_fd()]).expect("O_TMPFILE on the test's filesystem");
        assert!(!dir.path().join(PROBE).exists());
        let file = unnamed.create(7).unwrap().unwrap();
        (&*file).write_all(b"body").unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let file = unnamed.take(7).unwrap();
        unnamed.link(&file, folder.as_fd(), "seven").unwrap();
        assert_eq!(std::fs::read(dir.path().join("seven")).unwrap(), b"body");
        assert_eq!(
            unnamed.link(&file, folder.as_fd(), "seven"),
            Err(Errno::EXIST),
            "a link replaced a file"
        );
    }

    #[test]
    fn both_ways_of_linking_give_the_file_its_name() {
        let (dir, folder) = run_folder();
        for (how, name) in [(Linking::EmptyPath, "a"), (Linking::Proc, "b")] {
            let file = File::from(create(folder.as_fd()).unwrap());
            (&file).write_all(name.as_bytes()).unwrap();
            match link(how, &file, folder.as_fd(), name) {
                // Before Linux 6.10, only a privileged process.
                Err(Errno::NOENT) if how == Linking::EmptyPath => continue,
                other => other.unwrap(),
            }
            assert_eq!(
                std::fs::read(dir.path().join(name)).unwrap(),
                name.as_bytes()
            );
        }
        assert!(dir.path().join("b").exists());
    }

    /// Waits until the queue holds `AHEAD` files, polling; its length
    /// after 30 s otherwise.
    fn filled(queue: &flume::Receiver<OwnedFd>) -> usize {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while queue.len() < AHEAD && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        queue.len()
    }

    #[test]
    fn the_thread_refills_what_is_taken_and_ends_with_the_run() {
        let (_dir, folder) = run_folder();
        let unnamed = Unnamed::start(&folder, [folder.as_fd()]).unwrap();
        let queue = unnamed.ahead.as_ref().unwrap();
        assert_eq!(filled(queue), AHEAD, "the thread fills the queue at start");
        // The thread is woken only by a take that leaves half or fewer: it
        // may have filled the queue again and gone back to sleep while the
        // takes went on, so they go on until the last one wakes it. Only
        // this test takes, so the length read after a take is at least
        // the one the take saw.
        let mut taken = 0;
        while taken < 3 * AHEAD || queue.len() > AHEAD / 2 {
            unnamed.create(taken as i64).unwrap().unwrap();
            taken += 1;
        }
        let (ahead, on_the_spot) = unnamed.counts();
        assert_eq!(ahead + on_the_spot, taken as u64);
        assert!(ahead > 0, "none came from the thread");
        assert_eq!(
            filled(queue),
            AHEAD,
            "woken, the thread fills the queue again"
        );
        // Dropping it waits for the thread to end.
        drop(unnamed);
    }

    #[test]
    fn a_failed_create_is_tried_again_once_the_thread_is_woken() {
        let (_dir, folder) = run_folder();
        let (ready, ahead) = flume::bounded(AHEAD);
        let mut failed = false;
        let filler = std::thread::spawn(move || {
            fill(&ready, || {
                if failed {
                    create(folder.as_fd())
                } else {
                    failed = true;
                    Err(Errno::MFILE)
                }
            })
        });
        // As a take does; a wake before the thread sleeps is kept for it.
        filler.thread().unpark();
        for n in 0..AHEAD {
            if let Err(error) = ahead.recv_timeout(std::time::Duration::from_secs(60)) {
                panic!("file {n} after a failed create: {error:?}");
            }
        }
        drop(ahead);
        filler.thread().unpark();
        filler.join().unwrap();
    }
}
