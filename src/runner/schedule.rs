//! When the coordinator claims rows next. At once while rows keep coming
//! and the queue has room; when a claim came short, not before the next
//! due row (a retry's time), within bounds: not sooner than a few
//! milliseconds, so that an empty database is not polled in a loop, and not
//! later than a second, so that rows another run gives back are found (a
//! tenth of a second while other live runs still hold URLs).

use std::time::{Duration, Instant};

/// How often to look for new due rows when none were found.
pub const IDLE_RECHECK: Duration = Duration::from_secs(1);
/// How soon to look again when a claim came short while hosts were left
/// out: the rows there may all be theirs.
pub const FILTERED_RECHECK: Duration = Duration::from_millis(100);
/// How soon to look again when a claim came short otherwise.
pub const SOONEST_RECHECK: Duration = Duration::from_millis(5);
/// How often a run with nothing left looks again while other live runs
/// still hold URLs: the job ends when the last of them is done, not up to
/// a second later.
pub const PEER_RECHECK: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub struct ClaimSchedule {
    next_at: Instant,
}

impl ClaimSchedule {
    /// The first claim is due at once.
    pub fn new(now: Instant) -> ClaimSchedule {
        ClaimSchedule { next_at: now }
    }

    pub fn next_at(&self) -> Instant {
        self.next_at
    }

    pub fn due(&self, now: Instant) -> bool {
        now >= self.next_at
    }

    /// Claim at the next turn: a host came free, or the run went idle.
    pub fn claim_now(&mut self, now: Instant) {
        self.next_at = now;
    }

    /// A retry was scheduled for `at`: claim by then at the latest.
    pub fn retry_at(&mut self, at: Instant) {
        self.next_at = self.next_at.min(at);
    }

    /// A claim came short at `now`. `next_due` is when the earliest row not
    /// yet due comes due, if any; `filtered` whether the claim left hosts out.
    pub fn came_short(&mut self, now: Instant, next_due: Option<Instant>, filtered: bool) {
        let latest = now + IDLE_RECHECK;
        let soonest = now
            + if filtered {
                FILTERED_RECHECK
            } else {
                SOONEST_RECHECK
            };
        self.next_at = next_due.map_or(latest, |due| due.clamp(soonest, latest));
    }

    /// Nothing is left to claim but other live runs hold URLs: look again
    /// soon, for their end or for URLs they give back.
    pub fn waiting_for_peers(&mut self, now: Instant) {
        self.next_at = self.next_at.min(now + PEER_RECHECK);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_claim_is_due_at_once() {
        let now = Instant::now();
        let schedule = ClaimSchedule::new(now);
        assert!(schedule.due(now));
        assert_eq!(schedule.next_at(), now);
    }

    #[test]
    fn a_short_claim_waits_for_the_next_due_row_within_bounds() {
        let now = Instant::now();
        let mut schedule = ClaimSchedule::new(now);
        let in_300_ms = now + Duration::from_millis(300);
        schedule.came_short(now, Some(in_300_ms), false);
        assert_eq!(schedule.next_at(), in_300_ms);
        assert!(!schedule.due(now));
        assert!(schedule.due(in_300_ms));

        schedule.came_short(now, None, false);
        assert_eq!(
            schedule.next_at(),
            now + IDLE_RECHECK,
            "nothing due: look every second"
        );
        schedule.came_short(now, Some(now + Duration::from_secs(60)), false);
        assert_eq!(
            schedule.next_at(),
            now + IDLE_RECHECK,
            "never later than a second"
        );
        schedule.came_short(now, Some(now), false);
        assert_eq!(
            schedule.next_at(),
            now + SOONEST_RECHECK,
            "never a busy loop"
        );
        schedule.came_short(now, Some(now), true);
        assert_eq!(
            schedule.next_at(),
            now + FILTERED_RECHECK,
            "hosts left out may hold every due row"
        );
    }

    #[test]
    fn a_run_waiting_for_other_runs_looks_again_soon() {
        let now = Instant::now();
        let mut schedule = ClaimSchedule::new(now);
        schedule.came_short(now, None, false);
        schedule.waiting_for_peers(now);
        assert_eq!(schedule.next_at(), now + PEER_RECHECK);
        schedule.came_short(now, Some(now), false);
        schedule.waiting_for_peers(now);
        assert_eq!(
            schedule.next_at(),
            now + SOONEST_RECHECK,
            "a row due sooner is not delayed"
        );
    }

    #[test]
    fn a_retry_or_a_free_host_brings_the_claim_forward_never_back() {
        let now = Instant::now();
        let mut schedule = ClaimSchedule::new(now);
        schedule.came_short(now, None, false);
        let soon = now + Duration::from_millis(50);
        schedule.retry_at(soon);
        assert_eq!(schedule.next_at(), soon);
        schedule.retry_at(now + Duration::from_millis(500));
        assert_eq!(schedule.next_at(), soon, "a later retry does not delay it");
        schedule.claim_now(now);
        assert!(schedule.due(now));
    }
}
