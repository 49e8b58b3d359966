//! The log format every mortal process shares.
//!
//! `postfix` (the default) writes classic syslog-shaped lines to stderr:
//!
//! ```text
//! Nov 28 05:30:00 mx1 postfix/mortal/smtpd[4242]: connect from unknown[192.0.2.1]
//! ```
//!
//! The program tag is `<syslog_name>/<service>`. Its default,
//! `postfix/mortal`, has the shape Postfix itself uses for a named service
//! (`postfix/submission/smtpd`), so fail2ban's stock `postfix` filter and
//! pflogsumm read our lines unchanged. `json` writes one object per event
//! with every structured field. Each line is formatted whole and written in
//! one call, so lines of many processes sharing one stderr never interleave.

use mortal_proto::config::{Log, LogFormat};
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};
use tracing::{Event, Subscriber, field::Field};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Installs the global subscriber for `service` (`smtpd`, `cleanup`...).
/// Safe to call once per process; later calls are ignored.
pub fn init(service: &str, config: &Log, hostname: &str) {
    let filter = EnvFilter::try_new(&config.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match config.format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
        LogFormat::Postfix => builder
            .event_format(PostfixFormat {
                tag: format!("{}/{service}", config.syslog_name),
                hostname: hostname.to_owned(),
                pid: std::process::id(),
            })
            .try_init(),
    };
}

/// Installs a plain stderr logger for a process that has not read its
/// config yet (or could not), so the reason it stops is still logged.
pub fn init_early(service: &str) {
    init(service, &Log::default(), "localhost");
}

struct PostfixFormat {
    tag: String,
    hostname: String,
    pid: u32,
}

impl<S, N> FormatEvent<S, N> for PostfixFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, _ctx: &FmtContext<'_, S, N>, mut w: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let mut message = MessageOnly(String::new());
        event.record(&mut message);
        writeln!(w, "{} {} {}[{}]: {}", syslog_time(SystemTime::now()), self.hostname, self.tag, self.pid, message.0)
    }
}

/// Keeps the event's message; other fields belong to the JSON format.
struct MessageOnly(String);

impl tracing::field::Visit for MessageOnly {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            use fmt::Write;
            let _ = write!(self.0, "{value:?}");
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        }
    }
}

/// `Mmm dd hh:mm:ss` in UTC, the RFC 3164 timestamp log parsers expect.
fn syslog_time(t: SystemTime) -> String {
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (_, month, day) = civil_from_days(days as i64);
    format!("{} {:>2} {:02}:{:02}:{:02}", MONTHS[(month - 1) as usize], day, rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Days since 1970-01-01 to (year, month 1-12, day 1-31), proleptic
/// Gregorian (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn syslog_timestamps() {
        assert_eq!(syslog_time(UNIX_EPOCH), "Jan  1 00:00:00");
        // 2026-11-28T05:30:07Z
        assert_eq!(syslog_time(UNIX_EPOCH + Duration::from_secs(1_795_843_807)), "Nov 28 05:30:07");
        // 2024-02-29T23:59:59Z (leap day)
        assert_eq!(syslog_time(UNIX_EPOCH + Duration::from_secs(1_709_251_199)), "Feb 29 23:59:59");
    }
}
