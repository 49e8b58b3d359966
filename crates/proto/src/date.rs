//! date: the calendar forms mortal writes (syslog stamps, RFC 5322
//! `Date:` fields, RFC 3339), computed by `jiff`.
//!
//! Every function takes the time zone to write in; none looks one up.
//! Finding the host's zone reads `TZ` and `/etc/localtime` (and the zone
//! database), which is I/O this crate does not do, and which a daemon can
//! no longer do once it is chrooted or under Landlock: the zone is loaded
//! once at log start-up (`mortal_libmaster::log`), before the sandbox, and
//! passed in. A loaded [`TimeZone`] holds its whole rule set in memory, so
//! converting with it never touches the file system.
//!
//! Syslog stamps carry no offset, so their readers (fail2ban, pflogsumm)
//! take them as local time: they must be written in the local zone, as
//! syslogd does. RFC 5322 and RFC 3339 carry the offset, and Postfix
//! writes its `Date:` fields in local time too.

use jiff::Timestamp;
use std::time::{SystemTime, UNIX_EPOCH};

pub use jiff::tz::TimeZone;

/// `t` as jiff's timestamp. jiff spans the years -9999 to 9999; a clock
/// outside that is clamped to the nearer end rather than shown as 1970.
fn timestamp(t: SystemTime) -> Timestamp {
    Timestamp::try_from(t).unwrap_or(if t < UNIX_EPOCH { Timestamp::MIN } else { Timestamp::MAX })
}

fn format(t: SystemTime, zone: &TimeZone, pattern: &str) -> String {
    timestamp(t).to_zoned_datetime(zone.clone()).strftime(pattern).to_string()
}

/// RFC 5322 `date-time` (section 3.3) in `zone`:
/// `Sat, 28 Nov 2026 06:30:07 +0100`.
pub fn rfc5322(t: SystemTime, zone: &TimeZone) -> String {
    format(t, zone, "%a, %-d %b %Y %H:%M:%S %z")
}

/// RFC 3164 syslog timestamp in `zone`: `Nov 28 05:30:07`, the day padded
/// with a space.
pub fn syslog(t: SystemTime, zone: &TimeZone) -> String {
    format(t, zone, "%b %e %H:%M:%S")
}

/// RFC 3339 with microseconds and the offset of `zone`:
/// `2026-11-28T06:30:07.250000+01:00`.
pub fn rfc3339(t: SystemTime, zone: &TimeZone) -> String {
    format(t, zone, "%Y-%m-%dT%H:%M:%S%.6f%:z")
}

/// RFC 3339 in UTC, whole seconds: `2026-11-28T05:54:20Z`, a form whose
/// length never changes (for scripts reading `mortal queue` output).
pub fn rfc3339_utc_seconds(t: SystemTime) -> String {
    format(t, &TimeZone::UTC, "%Y-%m-%dT%H:%M:%SZ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn known_dates_in_utc() {
        let utc = TimeZone::UTC;
        assert_eq!(syslog(at(0), &utc), "Jan  1 00:00:00");
        assert_eq!(rfc5322(at(0), &utc), "Thu, 1 Jan 1970 00:00:00 +0000");
        assert_eq!(syslog(at(1_795_843_807), &utc), "Nov 28 05:30:07");
        assert_eq!(rfc5322(at(1_795_843_807), &utc), "Sat, 28 Nov 2026 05:30:07 +0000");
        assert_eq!(rfc5322(at(1_709_251_199), &utc), "Thu, 29 Feb 2024 23:59:59 +0000");
        assert_eq!(rfc3339(at(1_795_843_807) + Duration::from_millis(250), &utc), "2026-11-28T05:30:07.250000+00:00");
        assert_eq!(rfc3339_utc_seconds(at(1_795_843_807)), "2026-11-28T05:30:07Z");
    }

    #[test]
    fn local_forms_use_the_zone_and_its_offset() {
        // A POSIX rule, so the test needs no zone database: UTC-5, summer
        // time UTC-4 from the second Sunday of March to the first of November.
        let new_york = TimeZone::posix("EST5EDT,M3.2.0,M11.1.0").unwrap();
        // 2026-11-28 05:30:07 UTC is 00:30:07 the same day in New York (winter).
        assert_eq!(syslog(at(1_795_843_807), &new_york), "Nov 28 00:30:07");
        assert_eq!(rfc5322(at(1_795_843_807), &new_york), "Sat, 28 Nov 2026 00:30:07 -0500");
        assert_eq!(rfc3339(at(1_795_843_807), &new_york), "2026-11-28T00:30:07.000000-05:00");
        // One hour earlier in UTC crosses midnight back into the 27th.
        assert_eq!(syslog(at(1_795_843_807 - 3600), &new_york), "Nov 27 23:30:07");
        // Summer time: 2026-07-01 12:00:00 UTC is 08:00 EDT.
        assert_eq!(rfc5322(at(1_782_907_200), &new_york), "Wed, 1 Jul 2026 08:00:00 -0400");
        // East of Greenwich, with a half-hour offset.
        let india = TimeZone::fixed(jiff::tz::Offset::from_seconds(5 * 3600 + 1800).unwrap());
        assert_eq!(syslog(at(0), &india), "Jan  1 05:30:00");
        assert_eq!(rfc5322(at(0), &india), "Thu, 1 Jan 1970 05:30:00 +0530");
        assert_eq!(rfc3339_utc_seconds(at(0)), "1970-01-01T00:00:00Z", "always UTC");
    }
}
