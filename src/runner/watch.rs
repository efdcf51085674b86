//! Whether the database still answers the run. On a shared queue a run
//! whose database stops answering (a cut network, a hung server or proxy)
//! would wait for ever on its next statement, while the other runs take its
//! URLs back once its lease has run out. So the coordinator says when it
//! starts and stops waiting on anything but its own events, and the
//! workers' side watches: once one wait has lasted longer than the lease
//! and a margin, the run gives up with an error, leaving what a crash
//! leaves (its rows go to the other runs; the next run here clears its
//! temp files). An answer that comes sooner, after the lease, is refused by
//! the store instead: the run was taken for dead.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use crate::clock::now_ms;

/// How long past its lease a run waits for its database before giving up:
/// time for a connection that comes back to hear that the run was taken for
/// dead, or to carry on when no other run took its URLs.
pub const MARGIN: Duration = Duration::from_secs(10);

/// Since when the coordinator has been busy (unix ms), 0 while it waits
/// for events.
#[derive(Debug, Default)]
pub struct Busy {
    since_ms: AtomicI64,
}

impl Busy {
    pub fn start(&self) {
        self.since_ms.store(now_ms().max(1), Ordering::Relaxed);
    }

    pub fn idle(&self) {
        self.since_ms.store(0, Ordering::Relaxed);
    }

    /// Completes once one busy spell has lasted longer than `limit`, with
    /// how long it has lasted.
    pub async fn longer_than(&self, limit: Duration) -> Duration {
        let limit_ms = i64::try_from(limit.as_millis()).unwrap_or(i64::MAX);
        let every = (limit / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            tokio::time::sleep(every).await;
            let since = self.since_ms.load(Ordering::Relaxed);
            let busy = now_ms().saturating_sub(since);
            if since > 0 && busy > limit_ms {
                return Duration::from_millis(busy as u64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_long_busy_spell_is_noticed_and_waiting_for_events_is_not() {
        let busy = Busy::default();
        let limit = Duration::from_millis(100);
        let idle = tokio::time::timeout(Duration::from_millis(400), busy.longer_than(limit)).await;
        assert!(idle.is_err(), "waiting for events is not being busy");
        busy.start();
        let spell = tokio::time::timeout(Duration::from_secs(5), busy.longer_than(limit))
            .await
            .expect("noticed");
        assert!(spell > limit, "{spell:?}");
    }
}
