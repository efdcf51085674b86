//! Wall-clock time as jobrun records it: unix milliseconds.

use std::time::{SystemTime, UNIX_EPOCH};

/// `time` in milliseconds since the unix epoch (0 before it).
pub fn unix_ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Now, in unix milliseconds.
pub fn now_ms() -> i64 {
    unix_ms(SystemTime::now())
}
