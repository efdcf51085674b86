//! When to try a URL again: exponential backoff with full jitter, and the
//! server's own `Retry-After`.
//!
//! The schedule is stored in the database (attempts and next_attempt_at), so
//! all that is needed is the delay for a given attempt count; a retry-loop
//! crate would own state that belongs in the row.

use std::time::{Duration, SystemTime};

/// The longest `Retry-After` read: longer is as good as never, and a time
/// that far ahead could overflow. What is honoured is capped much lower, by
/// `--max-retry-after`, and said so.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The delay after `failed` attempts (1 for the first failure): a random
    /// time between zero and `base * 2^(failed-1)`, capped at `max`.
    pub fn delay(&self, failed: u32) -> Duration {
        let doublings = failed.saturating_sub(1).min(32);
        let ceiling = self
            .base
            .saturating_mul(1u32 << doublings.min(31))
            .min(self.max);
        ceiling.mul_f64(fastrand::f64())
    }
}

/// Parses a `Retry-After` value: delay-seconds or an HTTP date. Dates in the
/// past mean "now"; anything else unparseable is ignored.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let delay = if let Ok(seconds) = value.parse::<u64>() {
        Duration::from_secs(seconds)
    } else {
        let date = httpdate::parse_http_date(value).ok()?;
        date.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_under_a_doubling_ceiling() {
        let backoff = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        for failed in 1..40 {
            let ceiling = Duration::from_millis(100 << (failed - 1).min(4)).min(backoff.max);
            for _ in 0..50 {
                assert!(backoff.delay(failed) <= ceiling, "attempt {failed}");
            }
        }
    }

    #[test]
    fn delays_are_jittered() {
        let backoff = Backoff {
            base: Duration::from_secs(10),
            max: Duration::from_secs(10),
        };
        let delays: std::collections::HashSet<_> = (0..20).map(|_| backoff.delay(1)).collect();
        assert!(delays.len() > 10);
    }

    #[test]
    fn retry_after_accepts_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("99999999", now), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
    }

    mod never_panics {
        use proptest::prelude::*;

        use super::*;

        /// Values a server may send: numbers of any size and sign, HTTP
        /// dates from any year, and noise.
        fn retry_after_values() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<u64>().prop_map(|n| n.to_string()),
                any::<i64>().prop_map(|n| n.to_string()),
                "[0-9]{1,40}",
                // httpdate writes years up to 9999 only.
                (0u64..253_402_300_000).prop_map(|secs| {
                    httpdate::fmt_http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
                }),
                "[A-Za-z]{3}, [0-9]{1,2} [A-Za-z]{3} [0-9]{1,6} [0-9:]{1,9} GMT",
                " *[0-9.e+-]{0,12} *",
                ".*",
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(3000))]

            #[test]
            fn retry_after_is_never_longer_than_the_cap(
                value in retry_after_values(),
                now_secs in 0u64..8_000_000_000,
            ) {
                let now = SystemTime::UNIX_EPOCH + Duration::from_secs(now_secs);
                if let Some(delay) = parse_retry_after(&value, now) {
                    prop_assert!(delay <= MAX_RETRY_AFTER);
                }
            }

            #[test]
            fn delays_never_panic_and_stay_under_the_cap(
                base_ms in 1u64..u64::MAX / 2,
                max_ms in 1u64..u64::MAX / 2,
                failed in any::<u32>(),
            ) {
                let backoff = Backoff {
                    base: Duration::from_millis(base_ms),
                    max: Duration::from_millis(max_ms),
                };
                prop_assert!(backoff.delay(failed) <= backoff.max);
            }
        }
    }
}
