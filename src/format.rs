//! Numbers and byte counts as people read them. Every message, the progress
//! display and the report format them here, so they read the same
//! everywhere.

use indicatif::HumanCount;

/// `1234567` as `1,234,567`.
pub fn thousands(n: impl Into<i128>) -> String {
    let n: i128 = n.into();
    let sign = if n < 0 { "-" } else { "" };
    match u64::try_from(n.unsigned_abs()) {
        Ok(magnitude) => format!("{sign}{}", HumanCount(magnitude)),
        // Past u64, which no count of jobrun's reaches.
        Err(_) => n.to_string(),
    }
}

/// A byte count for people: `412.3 MB`. indicatif's `DecimalBytes` would
/// print `412.30 MB` and `512 B`; messages have always read as here.
pub fn human_bytes(bytes: i64) -> String {
    const UNITS: [&str; 5] = ["bytes", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(thousands(-20000), "-20,000");
        assert_eq!(thousands(u64::MAX), "18,446,744,073,709,551,615");
        assert_eq!(human_bytes(512), "512 bytes");
        assert_eq!(human_bytes(412_300_000), "412.3 MB");
    }
}
