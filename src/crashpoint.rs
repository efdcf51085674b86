//! A test hook that crashes the process at a chosen step of making a body
//! durable, to prove that a crash at any step costs at most a re-fetch.
//!
//! `JOBRUN_CRASH_AT=STEP` or `STEP:N` (read once, at the first step reached)
//! kills the process with SIGKILL, as `kill -9` would, right after the N-th
//! time (the first by default) that STEP is passed. The steps, in protocol
//! order, are the names of [`Step`]. Unset, it costs one atomic load.
//!
//! The hook exists only in debug builds, which is what `cargo test` builds:
//! a release binary has no `JOBRUN_CRASH_AT`, and `passed` is empty there.

/// A step of the durability protocol, just after it is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A batch's bodies are complete in their temp files, not yet synced.
    TempWritten,
    /// The temp files' data is on disk.
    DataSynced,
    /// One temp file was renamed to its final name.
    Renamed,
    /// The renames are on disk.
    NamesSynced,
    /// The transaction that marks the batch done is committed.
    Committed,
}

/// Marks `step` as done; does nothing in a release build.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn passed(_step: Step) {}

#[cfg(debug_assertions)]
pub use armed::passed;

/// The hook itself, in debug builds only.
#[cfg(debug_assertions)]
mod armed {
    use std::sync::LazyLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::Step;

    /// The environment variable that arms the hook.
    pub const VAR: &str = "JOBRUN_CRASH_AT";

    impl Step {
        const ALL: [Step; 5] = [
            Step::TempWritten,
            Step::DataSynced,
            Step::Renamed,
            Step::NamesSynced,
            Step::Committed,
        ];

        pub fn name(self) -> &'static str {
            match self {
                Step::TempWritten => "temp-written",
                Step::DataSynced => "data-synced",
                Step::Renamed => "renamed",
                Step::NamesSynced => "names-synced",
                Step::Committed => "committed",
            }
        }
    }

    /// The armed step and after how many passes to crash.
    static ARMED: LazyLock<Option<(Step, u64)>> = LazyLock::new(|| {
        let value = std::env::var(VAR).ok()?;
        let armed = parse(&value);
        if armed.is_none() {
            eprintln!("jobrun: ignoring {VAR}={value:?}: not STEP or STEP:N");
        }
        armed
    });

    static PASSES: AtomicU64 = AtomicU64::new(0);

    /// Marks `step` as done; crashes here if the hook is armed for this pass.
    pub fn passed(step: Step) {
        let Some((armed, at)) = *ARMED else { return };
        if armed == step && PASSES.fetch_add(1, Ordering::SeqCst) + 1 == at {
            // SAFETY: signalling our own process.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
    }

    fn parse(value: &str) -> Option<(Step, u64)> {
        let (name, count) = match value.trim().split_once(':') {
            Some((name, count)) => (name, count.parse().ok().filter(|&n| n > 0)?),
            None => (value.trim(), 1),
        };
        let step = Step::ALL.into_iter().find(|step| step.name() == name)?;
        Some((step, count))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn steps_parse_with_an_optional_count() {
            assert_eq!(parse("renamed"), Some((Step::Renamed, 1)));
            assert_eq!(parse("committed:3"), Some((Step::Committed, 3)));
            for step in Step::ALL {
                assert_eq!(parse(step.name()), Some((step, 1)));
            }
            assert_eq!(parse("renamed:0"), None);
            assert_eq!(parse("later"), None);
        }
    }
}
