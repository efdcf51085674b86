//! Who holds the database's write lock, when Linux can tell: SQLite takes
//! it as a POSIX lock, which /proc/locks lists with the holder's pid. In
//! WAL mode it is byte 120 of the -shm file, next to the bytes a writer
//! also holds exclusively for a moment (the checkpoint, recovery and read
//! marks, up to byte 128), which a process stopped at that moment keeps
//! from readers too; in the rollback journal mode of a database not yet
//! switched to WAL, the reserved byte of the database file itself.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The lock bytes of the WAL index (`-shm`): WAL_WRITE_LOCK at 120, then
/// the checkpoint, recovery and read-mark locks, and the byte every
/// connection shares (128).
const WAL_LOCK_BYTES: (u64, u64) = (120, 128);
/// RESERVED_BYTE of the rollback journal mode: the byte after the pending
/// byte at 1 GiB.
const RESERVED_BYTE: (u64, u64) = (0x4000_0001, 0x4000_0001);

/// The process holding a write lock, as /proc shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockHolder {
    /// Its pid here.
    pub pid: u32,
    /// Its pid in its own PID namespace, as a run records it.
    pub own_pid: u32,
    /// The inode of its PID namespace.
    pub pid_ns: Option<u64>,
    /// Its program's file name (not its arguments, which may hold secrets).
    pub program: String,
    /// It is stopped (Ctrl-Z, a debugger) and cannot let go of the lock.
    pub stopped: bool,
}

impl LockHolder {
    /// Whether the holder is a jobrun process.
    pub fn is_jobrun(&self) -> bool {
        self.program == "jobrun"
    }
}

/// The process other than this one holding the write lock of the
/// database at `db`, if /proc/locks names one.
pub fn write_lock_holder(db: &Path) -> Option<LockHolder> {
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let mut shm = db.as_os_str().to_owned();
    shm.push("-shm");
    let targets = [
        (std::fs::metadata(&shm).ok(), WAL_LOCK_BYTES),
        (std::fs::metadata(db).ok(), RESERVED_BYTE),
    ];
    let me = std::process::id();
    let pid = locks.lines().find_map(|line| {
        let lock = parse_lock(line)?;
        let held = targets.iter().any(|(meta, (first, last))| {
            meta.as_ref().is_some_and(|meta| {
                lock.device == (dev_major(meta.dev()), dev_minor(meta.dev()))
                    && lock.inode == meta.ino()
            }) && lock.start <= *last
                && *first <= lock.end
        });
        (held && lock.pid != me).then_some(lock.pid)
    })?;
    Some(describe(pid))
}

/// What /proc says about process `pid`.
fn describe(pid: u32) -> LockHolder {
    let proc = |file: &str| std::fs::read(format!("/proc/{pid}/{file}")).unwrap_or_default();
    let status = String::from_utf8_lossy(&proc("status")).into_owned();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_default()
            .to_string()
    };
    // NSpid lists the pid in each namespace, its own last.
    let own_pid = field("NSpid:")
        .split_whitespace()
        .last()
        .and_then(|p| p.parse().ok())
        .unwrap_or(pid);
    let cmdline = proc("cmdline");
    let argv0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
    let program = Path::new(&*String::from_utf8_lossy(argv0))
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| field("Name:"));
    LockHolder {
        pid,
        own_pid,
        pid_ns: std::fs::metadata(format!("/proc/{pid}/ns/pid"))
            .ok()
            .map(|meta| meta.ino()),
        program,
        stopped: field("State:").starts_with('T'),
    }
}

/// One line of /proc/locks.
#[derive(Debug, PartialEq, Eq)]
struct Lock {
    pid: u32,
    device: (u32, u32),
    inode: u64,
    start: u64,
    end: u64,
}

/// `9: POSIX  ADVISORY  WRITE 22159 fe:00:10027026 120 120`: a granted
/// POSIX write lock (waiters are marked `->`, and OFD locks have no pid).
fn parse_lock(line: &str) -> Option<Lock> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [_, "POSIX", _, "WRITE", pid, file, start, end] = fields[..] else {
        return None;
    };
    let mut file = file.split(':');
    let major = u32::from_str_radix(file.next()?, 16).ok()?;
    let minor = u32::from_str_radix(file.next()?, 16).ok()?;
    Some(Lock {
        pid: pid.parse().ok()?,
        device: (major, minor),
        inode: file.next()?.parse().ok()?,
        start: start.parse().ok()?,
        end: if end == "EOF" {
            u64::MAX
        } else {
            end.parse().ok()?
        },
    })
}

fn dev_major(dev: u64) -> u32 {
    libc::major(dev as libc::dev_t) as u32
}

fn dev_minor(dev: u64) -> u32 {
    libc::minor(dev as libc::dev_t) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn granted_posix_write_locks_are_read_and_the_rest_skipped() {
        assert_eq!(
            parse_lock("9: POSIX  ADVISORY  WRITE 22159 fe:00:10027026 120 120"),
            Some(Lock {
                pid: 22159,
                device: (0xfe, 0),
                inode: 10027026,
                start: 120,
                end: 120
            })
        );
        assert_eq!(
            parse_lock("19: POSIX  ADVISORY  WRITE 3789 08:1a:770064 0 EOF").map(|l| l.end),
            Some(u64::MAX)
        );
        for skipped in [
            "10: POSIX  ADVISORY  READ 22159 fe:00:10027026 123 123",
            "1: FLOCK  ADVISORY  WRITE 16475 fe:00:5628150 0 EOF",
            "2: OFDLCK ADVISORY  WRITE -1 fe:00:5628150 0 EOF",
            "3: -> POSIX  ADVISORY  WRITE 22160 fe:00:10027026 120 120",
        ] {
            assert_eq!(parse_lock(skipped), None, "{skipped}");
        }
    }

    #[test]
    fn a_process_is_described_by_its_program_and_state() {
        let holder = describe(std::process::id());
        assert_eq!(holder.pid, std::process::id());
        assert!(!holder.program.is_empty() && !holder.program.contains('/'));
        assert!(!holder.stopped);
        assert!(!holder.is_jobrun());
    }
}
