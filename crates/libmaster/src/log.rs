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
use std::time::SystemTime;
use tracing::{Event, Subscriber, field::Field};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Installs the global subscriber for `service` (`smtpd`, `cleanup`...).
/// The first call in a process wins; later calls are ignored, so call
/// [`init_early`] only on paths where the configuration is unavailable.
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
        writeln!(
            w,
            "{} {} {}[{}]: {}",
            mortal_proto::date::syslog(SystemTime::now()),
            self.hostname,
            self.tag,
            self.pid,
            message.0
        )
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
