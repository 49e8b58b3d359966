//! queue fmt: how sizes, times and ages read in queue listings.
//!
//! Two audiences: a person at a terminal wants short human figures
//! (`1.2M`, `3h05m`), a script reading a pipe wants exact figures that
//! never change shape (bytes, RFC 3339 UTC). Every function here is pure,
//! so the formats are pinned by table tests.

use mortal_proto::date;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Binary size units after bytes.
const SIZE_UNITS: [&str; 5] = ["K", "M", "G", "T", "P"];
/// Below this many units a size gets one decimal (`1.2K`, not `1K`).
const DECIMAL_BELOW: f64 = 10.0;

/// `512`, `1.2K`, `15K`, `3.4M`: powers of 1024, one decimal below ten.
pub fn human_size(bytes: u64) -> String {
    if bytes < 1024 {
        return bytes.to_string();
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < SIZE_UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    // Rounding 9.96 to one decimal gives "10.0": print that as "10".
    if value < DECIMAL_BELOW && (value * 10.0).round() < DECIMAL_BELOW * 10.0 {
        format!("{:.1}{}", value, SIZE_UNITS[unit])
    } else {
        format!("{:.0}{}", value, SIZE_UNITS[unit])
    }
}

/// `45s`, `12m`, `3h05m`, `2d04h`: two units at most, truncated.
pub fn human_age(age: Duration) -> String {
    let s = age.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// RFC 3339 in UTC, whole seconds: `2026-11-28T05:54:20Z` (20 characters).
pub fn rfc3339(t: SystemTime) -> String {
    date::rfc3339_utc_seconds(t)
}

/// Seconds since the epoch, as `postqueue -j` gives `arrival_time`.
pub fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// How long ago `t` was; a time in the future (clock skew) is no time ago.
pub fn age_of(t: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(t).unwrap_or(Duration::ZERO)
}

/// `1 message`, `2 messages`.
pub fn count(n: usize, noun: &str) -> String {
    if n == 1 { format!("1 {noun}") } else { format!("{n} {noun}s") }
}

/// The null sender as mail tools print it.
pub fn sender_text(address: &str) -> &str {
    if address.is_empty() { "MAILER-DAEMON" } else { address }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        let table: &[(u64, &str)] = &[
            (0, "0"),
            (1023, "1023"),
            (1024, "1.0K"),
            (1229, "1.2K"),
            (10_188, "9.9K"),
            (10_220, "10K"),
            (15 * 1024, "15K"),
            (1023 * 1024, "1023K"),
            (1024 * 1024, "1.0M"),
            (3_565_158, "3.4M"),
            (10_240_000, "9.8M"),
            (5 * 1024 * 1024 * 1024, "5.0G"),
            (u64::MAX, "16384P"),
        ];
        for &(bytes, want) in table {
            assert_eq!(human_size(bytes), want, "{bytes} bytes");
        }
    }

    #[test]
    fn ages() {
        let table: &[(u64, &str)] = &[
            (0, "0s"),
            (59, "59s"),
            (60, "1m"),
            (3599, "59m"),
            (3600, "1h00m"),
            (3600 + 5 * 60 + 59, "1h05m"),
            (86_399, "23h59m"),
            (86_400, "1d00h"),
            (2 * 86_400 + 4 * 3600 + 1, "2d04h"),
            (400 * 86_400, "400d00h"),
        ];
        for &(secs, want) in table {
            assert_eq!(human_age(Duration::from_secs(secs)), want, "{secs} s");
        }
    }

    #[test]
    fn times() {
        let table: &[(u64, &str)] = &[
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (1_795_845_260, "2026-11-28T05:54:20Z"),
            (4_102_444_799, "2099-12-31T23:59:59Z"),
        ];
        for &(secs, want) in table {
            let t = UNIX_EPOCH + Duration::from_secs(secs);
            assert_eq!(rfc3339(t), want);
            assert_eq!(epoch_secs(t + Duration::from_millis(999)), secs);
        }
    }

    #[test]
    fn future_arrival_is_no_age() {
        let now = UNIX_EPOCH + Duration::from_secs(1000);
        assert_eq!(age_of(now + Duration::from_secs(5), now), Duration::ZERO);
        assert_eq!(age_of(now - Duration::from_secs(5), now), Duration::from_secs(5));
    }

    #[test]
    fn words() {
        assert_eq!(count(0, "message"), "0 messages");
        assert_eq!(count(1, "message"), "1 message");
        assert_eq!(sender_text(""), "MAILER-DAEMON");
        assert_eq!(sender_text("a@b.test"), "a@b.test");
    }
}
