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

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::RunError;
use crate::domain::RunId;

/// Since when the coordinator has been busy, in milliseconds since
/// `origin` (on the monotonic clock, which no clock change moves), plus one;
/// 0 while it waits for events.
#[derive(Debug)]
pub struct Busy {
    origin: Instant,
    since_ms: AtomicU64,
}

impl Default for Busy {
    fn default() -> Busy {
        Busy {
            origin: Instant::now(),
            since_ms: AtomicU64::new(0),
        }
    }
}

impl Busy {
    pub fn start(&self) {
        self.since_ms.store(self.now_ms() + 1, Ordering::Relaxed);
    }

    pub fn idle(&self) {
        self.since_ms.store(0, Ordering::Relaxed);
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    /// Completes once one busy spell has lasted longer than `limit`, with
    /// how long it has lasted.
    pub async fn longer_than(&self, limit: Duration) -> Duration {
        let every = (limit / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            tokio::time::sleep(every).await;
            let since = self.since_ms.load(Ordering::Relaxed);
            let busy = Duration::from_millis((self.now_ms() + 1).saturating_sub(since));
            if since > 0 && busy > limit {
                return busy;
            }
        }
    }
}

/// The watch on the database thread's waits, and what to say when one
/// lasts too long.
pub struct Watch {
    pub busy: Arc<Busy>,
    /// None: no limit (SQLite, whose waits are bounded by `--lock-wait`).
    pub limit: Option<Duration>,
    /// The database, as messages show it.
    pub db: String,
    pub run: RunId,
}

impl Watch {
    /// Completes, with the error the run ends with, once one wait for the
    /// database has lasted longer than the limit; never without a limit.
    pub async fn gave_up(&self) -> RunError {
        let Some(limit) = self.limit else {
            return std::future::pending().await;
        };
        let waited = self.busy.longer_than(limit).await;
        RunError::Unanswered {
            run: self.run,
            db: self.db.clone(),
            waited: waited.as_secs(),
            limit: limit.as_secs(),
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
