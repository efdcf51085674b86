//! Telling a live run from a dead one. A run records its pid, host, boot id
//! and process start time; a later run on the same machine can then see at
//! once whether that process still exists (a reused pid has another start
//! time), instead of waiting for a lease to expire. Runs on another host can
//! only be judged by their heartbeat.

use std::time::Duration;

use crate::store::{Liveness, RunInfo, RunStart};

/// A run on another host is presumed dead when its heartbeat is this old.
pub const STALE_HEARTBEAT: Duration = Duration::from_secs(60);

/// This process, as a run records it.
pub fn this_process(command: String) -> RunStart {
    let pid = std::process::id();
    RunStart {
        pid,
        host: hostname(),
        boot_id: boot_id(),
        proc_start: process_start(pid).unwrap_or(0),
        command,
    }
}

/// Whether `run`, recorded as unfinished, is still going, as seen by `me`.
pub fn liveness(run: &RunInfo, me: &RunStart, now_ms: i64) -> Liveness {
    if run.host != me.host {
        let silent = now_ms.saturating_sub(run.heartbeat_at);
        return if silent > STALE_HEARTBEAT.as_millis() as i64 {
            Liveness::Gone
        } else {
            Liveness::Alive
        };
    }
    if !run.boot_id.is_empty() && run.boot_id != me.boot_id {
        return Liveness::Rebooted;
    }
    if run.pid == me.pid && run.proc_start == me.proc_start {
        return Liveness::Alive;
    }
    if process_exists(run.pid, run.proc_start) {
        Liveness::Alive
    } else {
        Liveness::Gone
    }
}

fn hostname() -> String {
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
        return recorded_start == 0 || start == Some(recorded_start);
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
            id: 1,
            pid: start.pid,
            host: start.host.clone(),
            boot_id: start.boot_id.clone(),
            proc_start: start.proc_start,
            command: String::new(),
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
        let mut run = run_of(&me);
        assert_eq!(liveness(&run, &me, 0), Liveness::Alive);
        let parent = std::os::unix::process::parent_id();
        run.pid = parent;
        run.proc_start = process_start(parent).unwrap();
        assert_eq!(liveness(&run, &me, 0), Liveness::Alive);
        run.proc_start += 1;
        assert_eq!(liveness(&run, &me, 0), Liveness::Gone);
    }

    #[test]
    fn another_boot_means_rebooted_and_another_host_goes_by_heartbeat() {
        let me = this_process(String::new());
        let mut run = run_of(&me);
        run.boot_id = "another-boot".into();
        assert_eq!(liveness(&run, &me, 0), Liveness::Rebooted);
        run.host = "elsewhere".into();
        run.heartbeat_at = 1_000_000;
        assert_eq!(liveness(&run, &me, 1_000_000 + 1000), Liveness::Alive);
        assert_eq!(liveness(&run, &me, 1_000_000 + 61_000), Liveness::Gone);
    }
}
