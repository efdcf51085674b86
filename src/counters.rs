//! What a run counts as it goes: the coordinator adds what it commits, the
//! workers what their requests did. Atomics only, so that counting costs the
//! hot path next to nothing; the progress display and the `--metrics`
//! endpoint read them when they draw.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::clock::now_ms;
use crate::domain::Completion;
use crate::fetch::Attempt;

/// The histogram's upper bounds, in milliseconds (the resolution requests
/// are timed at): 5 ms to 60 s.
pub const BUCKETS_MS: [u64; 13] = [
    5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000,
];

/// The outcome classes of `jobrun_requests_total`, in [`Requests`] order.
pub const OUTCOMES: [&str; 5] = ["2xx", "3xx", "4xx", "5xx", "error"];

/// Counts committed by this run.
#[derive(Debug, Default)]
pub struct Counters {
    pub done: AtomicU64,
    pub failed: AtomicU64,
    /// Retries scheduled.
    pub retried: AtomicU64,
    pub bytes: AtomicU64,
    /// When the URLs waiting for a retry are due: those known at the
    /// start, and the retries recorded since.
    pub retries: RetrySchedule,
    /// Which other runs this one waits for, when it has nothing to claim.
    pub waiting_for: Mutex<Option<String>>,
    /// Counted by the workers, for `--metrics`.
    pub requests: Requests,
}

/// Retry times, counted per second. A URL waits for its retry until its
/// time comes, whether or not it has been taken yet; to the second is close
/// enough for a display, and keeps memory to the span of the retry delays
/// whatever the number of URLs waiting.
#[derive(Debug, Default)]
pub struct RetrySchedule {
    /// The end of each second (unix ms) -> retries due within it.
    by_second: Mutex<BTreeMap<i64, u64>>,
}

impl RetrySchedule {
    /// Adds `count` retries due at `due` (unix ms); one already due is not
    /// waiting. Seconds gone by are dropped here too, so that the schedule
    /// stays small when nothing displays it.
    pub fn add(&self, due: i64, count: u64) {
        let now = now_ms();
        let mut by_second = self.by_second.lock().unwrap_or_else(|e| e.into_inner());
        drop_past(&mut by_second, now);
        if due > now {
            let second_end = due.saturating_add(999).div_euclid(1000) * 1000;
            *by_second.entry(second_end).or_default() += count;
        }
    }

    /// How many retries are not yet due at `now` (unix ms).
    pub fn waiting(&self, now: i64) -> u64 {
        let mut by_second = self.by_second.lock().unwrap_or_else(|e| e.into_inner());
        drop_past(&mut by_second, now);
        by_second.values().sum()
    }
}

/// Drops the seconds that ended by `now`.
fn drop_past(by_second: &mut BTreeMap<i64, u64>, now: i64) {
    while let Some(second) = by_second.first_entry()
        && *second.key() <= now
    {
        second.remove();
    }
}

/// Where the job stood when the run started.
#[derive(Debug, Clone, Copy, Default)]
pub struct Start {
    pub total: u64,
    pub done: u64,
    pub failed: u64,
}

/// What the workers count per request: atomics only.
#[derive(Debug, Default)]
pub struct Requests {
    pub(crate) in_flight: AtomicU64,
    pub(crate) by_outcome: [AtomicU64; OUTCOMES.len()],
    /// Per bucket, not cumulative; the last one is above the largest bound.
    pub(crate) buckets: [AtomicU64; BUCKETS_MS.len() + 1],
    pub(crate) sum_ms: AtomicU64,
}

/// Counts a request as in flight until dropped (also when its worker is
/// cut off at a stop).
pub struct InFlight<'a>(&'a Requests);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Requests {
    /// A request starts.
    pub fn start(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }

    /// Counts an attempt that reached an end.
    pub fn observe(&self, attempt: &Attempt) {
        match attempt {
            Attempt::Body(body) => self.finished(Some(body.status), body.millis),
            Attempt::Unchanged(Completion::Unchanged { status, millis, .. }) => {
                self.finished(Some(*status), *millis)
            }
            Attempt::Failed(
                Completion::Retry { status, millis, .. }
                | Completion::Failed { status, millis, .. },
            ) => self.finished(*status, *millis),
            Attempt::Unchanged(_) | Attempt::Failed(_) => {}
        }
    }

    /// An attempt ended with `status` (None: no HTTP answer) after `millis`.
    fn finished(&self, status: Option<u16>, millis: u32) {
        let outcome = match status {
            Some(200..=299) => 0,
            Some(300..=399) => 1,
            Some(400..=499) => 2,
            Some(500..=599) => 3,
            _ => 4,
        };
        self.by_outcome[outcome].fetch_add(1, Ordering::Relaxed);
        let millis = u64::from(millis);
        let bucket = BUCKETS_MS.partition_point(|&bound| bound < millis);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_ms.fetch_add(millis, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_waits_only_until_its_time() {
        let retries = RetrySchedule::default();
        // A whole second an hour from now.
        let at = (now_ms() / 1000 + 3600) * 1000;
        retries.add(at + 500, 2);
        retries.add(at + 900, 1);
        retries.add(at + 2000, 4);
        retries.add(now_ms() - 10, 8);
        assert_eq!(
            retries.waiting(at - 1000),
            7,
            "one already due is not waiting"
        );
        assert_eq!(retries.waiting(at + 999), 7, "due within the second");
        assert_eq!(retries.waiting(at + 1000), 4);
        assert_eq!(retries.waiting(at + 2000), 0);
        assert!(retries.by_second.lock().unwrap().is_empty());
    }

    #[test]
    fn requests_fall_into_their_class_and_bucket() {
        let requests = Requests::default();
        {
            let _a = requests.start();
            let _b = requests.start();
            assert_eq!(requests.in_flight.load(Ordering::Relaxed), 2);
        }
        assert_eq!(requests.in_flight.load(Ordering::Relaxed), 0);
        requests.finished(Some(200), 5);
        requests.finished(Some(404), 6);
        requests.finished(Some(503), 70_000);
        requests.finished(None, 0);
        requests.finished(Some(301), 1_000);
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        assert_eq!(requests.by_outcome.each_ref().map(load), [1, 1, 1, 1, 1]);
        let buckets = requests.buckets.each_ref().map(load);
        assert_eq!(buckets[0], 2, "0 and 5 ms are within le=0.005");
        assert_eq!(buckets[1], 1, "6 ms is within le=0.01");
        assert_eq!(buckets[7], 1, "1 s is within le=1");
        assert_eq!(buckets[13], 1, "70 s is above every bound");
        assert_eq!(load(&requests.sum_ms), 71_011);
    }
}
