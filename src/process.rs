//! Telling a live run from a dead one, without guessing wrong either way.
//!
//! A run records its pid, PID namespace, process start time, boot id and
//! host. A pid means something only inside its PID namespace on one boot of
//! one kernel: when both match this process's, the run's process is looked
//! up directly (a reused pid has another start time), so a killed run is
//! known dead at once. Anything else (a run in a container with its own PID
//! namespace, on another machine, or one recorded before namespaces were)
//! is judged by its heartbeat, which a live run renews far more often than
//! the threshold.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use crate::domain::{Liveness, RunInfo, RunStart};

/// A run that cannot be looked up is presumed dead when its heartbeat is
/// this old. Runs renew it every few seconds (`HEARTBEAT` in the runner),
/// whatever they are doing.
pub const STALE_HEARTBEAT: Duration = Duration::from_secs(60);

/// This process, as a run records it.
pub fn this_process(command: String) -> RunStart {
    let pid = std::process::id();
    // Only a /proc of this process's own PID namespace can say anything
    // about pids: without one (`unshare --pid` without `--mount-proc`), the
    // run is judged by its heartbeat, and judges the others that way.
    let own_proc = own_proc();
    RunStart {
        pid,
        pid_ns: own_proc.then(pid_namespace).flatten(),
        host: hostname(),
        boot_id: boot_id(),
        proc_start: own_proc.then(|| process_start(pid)).flatten().unwrap_or(0),
        command,
    }
}

/// Whether `run`, recorded as unfinished, is still going, as seen by `me`.
pub fn liveness(run: &RunInfo, me: &RunStart, now_ms: i64) -> Liveness {
    let recorded = &run.start;
    let same_boot = !recorded.boot_id.is_empty() && recorded.boot_id == me.boot_id;
    let can_look_up = same_boot && me.pid_ns.is_some() && recorded.proc_start != 0;
    if can_look_up && recorded.pid_ns == me.pid_ns {
        return if process_exists(recorded.pid, recorded.proc_start) {
            Liveness::Alive
        } else {
            Liveness::Gone
        };
    }
    // Recorded without its namespace: if a process with its pid and start
    // time is here, that is the run; if not, it may be in another namespace.
    if can_look_up && recorded.pid_ns.is_none() && process_exists(recorded.pid, recorded.proc_start)
    {
        return Liveness::Alive;
    }
    by_heartbeat(run, me, now_ms)
}

/// A run judged only by how long ago it last said it was alive.
fn by_heartbeat(run: &RunInfo, me: &RunStart, now_ms: i64) -> Liveness {
    let silent = now_ms.saturating_sub(run.heartbeat_at);
    let recorded = &run.start;
    if silent <= STALE_HEARTBEAT.as_millis() as i64 {
        Liveness::Alive
    } else if !recorded.boot_id.is_empty()
        && recorded.boot_id != me.boot_id
        && recorded.host == me.host
    {
        Liveness::Rebooted
    } else {
        Liveness::Gone
    }
}

/// Whether /proc shows this process's own PID namespace.
fn own_proc() -> bool {
    std::fs::read_link("/proc/self")
        .is_ok_and(|link| link.as_os_str() == std::process::id().to_string().as_str())
}

/// The inode of this process's PID namespace, which identifies it.
fn pid_namespace() -> Option<u64> {
    std::fs::metadata("/proc/self/ns/pid").ok().map(|m| m.ino())
}

/// This machine's name, as `gethostname` gives it.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().to_string())
        .unwrap_or_default()
}

/// The fields of /proc/PID/stat after the command name, which may itself
/// hold spaces and parentheses.
fn proc_stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    Some(after_name.split_whitespace().map(str::to_string).collect())
}

/// Start time of a process in clock ticks since boot (field 22 of stat).
fn process_start(pid: u32) -> Option<u64> {
    proc_stat_fields(pid)?.get(19)?.parse().ok()
}

fn process_exists(pid: u32, recorded_start: u64) -> bool {
    if std::path::Path::new("/proc/self/stat").exists() {
        let Some(fields) = proc_stat_fields(pid) else {
            return false;
        };
        // A zombie has exited; only its exit status is left to collect.
        let state = fields.first().map(String::as_str).unwrap_or("X");
        if state == "Z" || state == "X" {
            return false;
        }
        let start = fields.get(19).and_then(|s| s.parse::<u64>().ok());
        return start == Some(recorded_start);
    }
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_of(start: &RunStart) -> RunInfo {
        RunInfo {
            id: crate::domain::RunId(1),
            start: RunStart {
                command: String::new(),
                ..start.clone()
            },
            started_at: 0,
            heartbeat_at: 0,
            ended_at: None,
            outcome: None,
            message: None,
            done: 0,
            failed: 0,
            retried: 0,
            bytes: 0,
        }
    }

    #[test]
    fn this_process_is_alive_and_a_reused_pid_is_not() {
        let me = this_process(String::new());
        assert!(me.proc_start > 0, "no start time read from /proc");
        assert!(me.pid_ns.is_some(), "no PID namespace read from /proc");
        let mut run = run_of(&me);
        assert_eq!(liveness(&run, &me, 0), Liveness::Alive);
        let parent = std::os::unix::process::parent_id();
        run.start.pid = parent;
        run.start.proc_start = process_start(parent).unwrap();
        assert_eq!(liveness(&run, &me, 0), Liveness::Alive);
        run.start.proc_start += 1;
        assert_eq!(liveness(&run, &me, 0), Liveness::Gone);
    }

    #[test]
    fn another_boot_means_rebooted_and_another_host_goes_by_heartbeat() {
        let me = this_process(String::new());
        let mut run = run_of(&me);
        run.start.boot_id = "another-boot".into();
        run.heartbeat_at = 1_000_000;
        assert_eq!(liveness(&run, &me, 1_000_000 + 61_000), Liveness::Rebooted);
        // Another machine may share the host name: a fresh heartbeat is alive.
        assert_eq!(liveness(&run, &me, 1_000_000 + 1000), Liveness::Alive);
        run.start.host = "elsewhere".into();
        assert_eq!(liveness(&run, &me, 1_000_000 + 1000), Liveness::Alive);
        assert_eq!(liveness(&run, &me, 1_000_000 + 61_000), Liveness::Gone);
    }

    #[test]
    fn a_pid_from_another_namespace_is_never_looked_up_here() {
        let me = this_process(String::new());
        let mut run = run_of(&me);
        // A pid that exists here, recorded in another namespace: it may be
        // any process there, alive or not; only the heartbeat tells.
        run.start.pid_ns = me.pid_ns.map(|ns| ns + 1);
        run.start.pid = 1;
        run.start.proc_start = 1;
        run.heartbeat_at = 1_000_000;
        assert_eq!(liveness(&run, &me, 1_000_000 + 1000), Liveness::Alive);
        assert_eq!(liveness(&run, &me, 1_000_000 + 61_000), Liveness::Gone);
    }

    #[test]
    fn a_run_recorded_without_its_namespace_is_alive_if_found_else_by_heartbeat() {
        let me = this_process(String::new());
        let mut run = run_of(&me);
        run.start.pid_ns = None;
        assert_eq!(liveness(&run, &me, 1_000_000_000), Liveness::Alive);
        run.start.proc_start += 1;
        run.heartbeat_at = 1_000_000;
        assert_eq!(liveness(&run, &me, 1_000_000 + 1000), Liveness::Alive);
        assert_eq!(liveness(&run, &me, 1_000_000 + 61_000), Liveness::Gone);
    }
}
