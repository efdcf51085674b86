//! Request rates: the `--rate` syntax and the limiter that enforces it.
//! `--rate` holds for the whole job: the runs live on a shared queue each
//! take an equal part of it ([`SharedRate`]).
//!
//! A rate is kept as the interval between two requests. The limiter is a
//! governor GCRA with a burst of about 50 ms worth of requests: enough that a
//! worker waking late from its timer does not lose its slot, small enough that
//! the server never sees more than the rate over any window it can notice.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// How much time a burst may cover.
const BURST_WINDOW: Duration = Duration::from_millis(50);
/// The fastest rate: the limiter counts in microseconds.
const MAX_PER_SECOND: f64 = 1_000_000.0;
/// The slowest rate: one request a day. Slower is a typo, not a plan.
const SLOWEST_INTERVAL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Time between two requests.
    interval: Duration,
}

impl Rate {
    /// Parses `50`, `50/s`, `600/m`, `1000/h` or `0.5/s`.
    pub fn parse(text: &str) -> Result<Rate, String> {
        let invalid = || format!("{text:?} is not a rate like 50, 50/s, 600/m or 1000/h");
        let (count, unit) = match text.trim().split_once('/') {
            Some((count, unit)) => (count.trim(), unit.trim()),
            None => (text.trim(), "s"),
        };
        let unit = match unit {
            "s" | "sec" | "second" => 1.0,
            "m" | "min" | "minute" => 60.0,
            "h" | "hour" => 3600.0,
            _ => return Err(invalid()),
        };
        let count: f64 = count.parse().map_err(|_| invalid())?;
        if count.is_nan() {
            return Err(invalid());
        }
        if count <= 0.0 {
            return Err(format!("{text:?}: the rate must be above zero"));
        }
        let per_second = count / unit;
        if per_second > MAX_PER_SECOND {
            return Err(format!(
                "{text:?} is more than 1,000,000 requests per second, the fastest rate \
                 jobrun takes (leave the option out for no limit)"
            ));
        }
        if per_second < 1.0 / SLOWEST_INTERVAL.as_secs_f64() {
            return Err(format!(
                "{text:?} is less than one request a day (0.042/h), the slowest rate jobrun takes"
            ));
        }
        // Between 1 µs and a day, by the checks above.
        let interval = Duration::from_secs_f64(1.0 / per_second).min(SLOWEST_INTERVAL);
        Ok(Rate { interval })
    }

    pub fn per_second(self) -> f64 {
        1.0 / self.interval.as_secs_f64()
    }

    /// A limiter that lets requests through at this rate.
    pub fn limiter(self) -> DefaultDirectRateLimiter {
        let burst = (BURST_WINDOW.as_secs_f64() / self.interval.as_secs_f64()).floor() as u32;
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        // with_period is None only for a zero interval, which parse rules out.
        let quota = Quota::with_period(self.interval)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
            .allow_burst(burst);
        RateLimiter::direct(quota)
    }
}

/// A rate shared by the runs on one queue: this run's part of it, which
/// changes as runs come and go.
pub struct SharedRate {
    whole: Rate,
    /// Among how many runs, and the limiter for this run's part.
    part: Mutex<(u64, Arc<DefaultDirectRateLimiter>)>,
}

impl SharedRate {
    /// The whole rate, to one run until told otherwise.
    pub fn new(whole: Rate) -> SharedRate {
        SharedRate {
            whole,
            part: Mutex::new((1, Arc::new(whole.limiter()))),
        }
    }

    /// Gives this run its part of the rate, shared among `runs` runs (at
    /// least one). A new part starts with a fresh burst, of 50 ms worth of
    /// requests at most.
    pub fn share_among(&self, runs: u64) {
        let runs = runs.max(1);
        let mut part = self.part.lock().unwrap_or_else(|e| e.into_inner());
        if part.0 != runs {
            let interval = self
                .whole
                .interval
                .saturating_mul(u32::try_from(runs).unwrap_or(u32::MAX));
            *part = (runs, Arc::new(Rate { interval }.limiter()));
        }
    }

    /// Waits until this run's part lets one more request through.
    pub async fn until_ready(&self) {
        let limiter = self
            .part
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone();
        limiter.until_ready().await;
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/s", self.per_second())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_give_the_same_interval() {
        let ten = Rate::parse("10").unwrap();
        assert_eq!(Rate::parse("10/s").unwrap(), ten);
        assert_eq!(Rate::parse("600/m").unwrap(), ten);
        assert_eq!(Rate::parse("36000/h").unwrap(), ten);
        assert_eq!(
            Rate::parse(" 0.5/s ").unwrap().interval,
            Duration::from_secs(2)
        );
    }

    #[test]
    fn rates_out_of_range_are_told_the_real_limit() {
        for (text, reason) in [
            ("1e309", "more than 1,000,000 requests per second"),
            ("inf", "more than 1,000,000 requests per second"),
            ("1000001", "more than 1,000,000 requests per second"),
            ("1e-300", "less than one request a day"),
            ("0.04/h", "less than one request a day"),
            ("NaN", "not a rate like"),
            ("-1", "above zero"),
            ("0/m", "above zero"),
        ] {
            let error = Rate::parse(text).unwrap_err();
            assert!(error.contains(reason), "{text}: {error}");
        }
        assert_eq!(
            Rate::parse("1000000").unwrap().interval,
            Duration::from_micros(1)
        );
        assert!(Rate::parse("0.05/h").is_ok());
    }

    #[test]
    fn runs_sharing_a_rate_each_take_their_part() {
        let shared = SharedRate::new(Rate::parse("100").unwrap());
        // A burst of 50 ms worth (5 requests), then one every 10 ms.
        let allowed = |shared: &SharedRate| {
            let limiter = shared.part.lock().unwrap().1.clone();
            (0..100).filter(|_| limiter.check().is_ok()).count()
        };
        assert_eq!(allowed(&shared), 5);
        shared.share_among(4);
        // 25/s: 50 ms hold one request.
        assert_eq!(allowed(&shared), 1);
        shared.share_among(0);
        assert_eq!(allowed(&shared), 5, "no runs counted is this run alone");
    }

    #[test]
    fn nonsense_is_rejected() {
        for text in ["", "fast", "10/d", "0", "-5/s", "NaN", "inf", "1e9/s", "5/"] {
            assert!(Rate::parse(text).is_err(), "{text}");
        }
    }
}
