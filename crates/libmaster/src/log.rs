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
//! pflogsumm read our lines unchanged. The stamp has no zone, and those
//! readers take it as local time, so it is written in the host's local
//! time zone, as syslogd does.
//!
//! `json` writes one object per event:
//!
//! ```text
//! {"client":"unknown[192.0.2.1]","host":"mx1","message":"connect from unknown[192.0.2.1]",
//!  "pid":4242,"service":"smtpd","severity":"info","timestamp":"2026-11-28T05:30:00.125000+01:00"}
//! ```
//!
//! `message` is the text of the `postfix` line, unchanged; `severity` is
//! Postfix's (`info`, `warning`, `error`, `fatal`, `panic`), from the
//! event's level (an error whose text starts `fatal:` or `panic:` is
//! that); `timestamp` is RFC 3339 with the local offset; `service`, `pid`
//! and `host` say who wrote it. `client` and `queue_id` come from the
//! context the event happened in: smtpd runs each session inside a
//! [`session_span`] (the client, once known), cleanup each transaction and
//! the queue manager each delivery inside a [`message_span`] (the queue
//! id). The JSON format flattens every enclosing span's fields, and any
//! field given on the event itself, into the object; the `postfix` format
//! writes the message only. Spans rather than fields on each event keep
//! the ~100 log calls and their pinned text untouched, and give every
//! line of a session or message its context, including lines written by
//! shared code (the child loop, the IPC layer) that does not know it.
//!
//! The local time zone is loaded once, in [`init`], which every daemon
//! runs at start-up before it chroots or enters Landlock: after that,
//! `TZ` names and `/etc/localtime` can no longer be read. [`local_zone`]
//! hands the loaded zone to the code that writes `Date:` fields.
//!
//! Each line is formatted whole and written in one call, so lines of many
//! processes sharing one stderr never interleave.

use mortal_proto::config::{Log, LogFormat};
use mortal_proto::date::{self, TimeZone};
use mortal_proto::service::Process;
use serde_json::{Map, Value};
use std::ffi::OsStr;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::SystemTime;
use tracing::field::{Empty, Field, Visit};
use tracing::{Event, Level, Span, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// Field of [`session_span`]: the client as Postfix writes it,
/// `name[address]`.
pub const CLIENT: &str = "client";
/// Field of [`message_span`].
pub const QUEUE_ID: &str = "queue_id";

/// Whether the installed format writes span fields (JSON). The `postfix`
/// format writes the message only, so there the context spans are not
/// made at all: a span costs a registry slot, its formatted fields and an
/// enter and exit on every poll of smtpd's session future, for nothing.
static SPANS_WANTED: AtomicBool = AtomicBool::new(false);

/// This process's id, as every line carries it: set by [`init`], and
/// again by [`forked`] in each child of a zygote (which shares the
/// subscriber the zygote installed), so no line asks the kernel.
static PID: AtomicU32 = AtomicU32::new(0);

fn current_pid() -> u32 {
    PID.load(Ordering::Relaxed)
}

/// Called in a new process forked from a zygote: its lines carry its
/// own pid from now on.
pub(crate) fn forked() {
    PID.store(std::process::id(), Ordering::Relaxed);
}

/// The zone loaded by the first [`init`].
static LOCAL_ZONE: OnceLock<TimeZone> = OnceLock::new();
/// What [`local_zone`] gives before any [`init`] (unit tests, tools).
static UTC: TimeZone = TimeZone::UTC;

/// Installs the global subscriber for `process`, and loads the local time
/// zone. The first call in a process wins; later calls are ignored, so
/// call [`init_early`] only on paths where the configuration is
/// unavailable.
pub fn init(process: impl Into<Process>, config: &Log, hostname: &str) {
    let mut zone_error = None;
    let zone = LOCAL_ZONE.get_or_init(|| {
        system_zone(std::env::var_os("TZ").as_deref(), Path::new(LOCALTIME), Path::new(ZONEINFO)).unwrap_or_else(|e| {
            zone_error = Some(e);
            TimeZone::UTC
        })
    });
    let writer = Format {
        process: process.into(),
        syslog_name: config.syslog_name.clone(),
        hostname: hostname.to_owned(),
        pid: current_pid,
        zone: zone.clone(),
        now: SystemTime::now,
    };
    PID.store(std::process::id(), Ordering::Relaxed);
    let filter = EnvFilter::try_new(&config.level).unwrap_or_else(|_| EnvFilter::new("info"));
    // try_init, not set_global_default: it also forwards the `log` records
    // of dependencies (rustls, hickory) into this subscriber.
    if writer.subscriber(config.format, filter, std::io::stderr).try_init().is_ok()
        && let Some(e) = zone_error
    {
        tracing::warn!("warning: local time zone: {e}; log and Date: times are in UTC");
    }
}

/// The host's zone file when `TZ` is unset.
const LOCALTIME: &str = "/etc/localtime";
/// Where `TZ=Europe/Berlin` is looked up.
const ZONEINFO: &str = "/usr/share/zoneinfo";

/// The host's time zone, found the way the C library finds it: `TZ`
/// (empty is UTC; a POSIX rule; an absolute TZif path; or a zone name
/// under `zoneinfo`, with or without the leading `:`), else
/// `/etc/localtime`. Done here rather than by `TimeZone::try_system`,
/// whose name lookup loads jiff's whole zone database, which walks every
/// file under `/usr/share/zoneinfo`: at every start of every child, that
/// was most of a delivery agent's start-up.
fn system_zone(tz: Option<&OsStr>, localtime: &Path, zoneinfo: &Path) -> Result<TimeZone, String> {
    let Some(tz) = tz else {
        let data = std::fs::read(localtime).map_err(|e| format!("{}: {e}", localtime.display()))?;
        // The name is for show only; the rules are in the data.
        let name = std::fs::read_link(localtime)
            .ok()
            .and_then(|t| t.to_str().and_then(|t| t.rsplit_once("zoneinfo/")).map(|(_, n)| n.to_owned()))
            .unwrap_or_else(|| "localtime".to_owned());
        return TimeZone::tzif(&name, &data).map_err(|e| format!("{}: {e}", localtime.display()));
    };
    let tz = tz.to_str().ok_or_else(|| format!("TZ={tz:?} is not UTF-8"))?;
    let spec = tz.strip_prefix(':').unwrap_or(tz);
    if spec.is_empty() {
        return Ok(TimeZone::UTC);
    }
    let path = if spec.starts_with('/') {
        PathBuf::from(spec)
    } else if spec.split('/').any(|part| part == ".." || part.is_empty()) {
        return Err(format!("TZ={tz}: not a zone name"));
    } else {
        zoneinfo.join(spec)
    };
    match std::fs::read(&path) {
        Ok(data) => TimeZone::tzif(spec, &data).map_err(|e| format!("TZ={tz}: {}: {e}", path.display())),
        // Not a file: a POSIX rule (`EST5EDT,M3.2.0,M11.1.0`, `UTC0`).
        Err(e) => TimeZone::posix(spec).map_err(|_| format!("TZ={tz}: {}: {e}", path.display())),
    }
}

/// Installs a plain stderr logger for a process that has not read its
/// config yet (or could not), so the reason it stops is still logged.
pub fn init_early(process: impl Into<Process>) {
    init(process, &Log::default(), "localhost");
}

/// The host's time zone as [`init`] loaded it, for `Date:` fields; UTC in
/// a process that never ran [`init`]. Every form written with it carries
/// its offset, so even then the time is right.
pub fn local_zone() -> &'static TimeZone {
    LOCAL_ZONE.get().unwrap_or(&UTC)
}

/// Whether the context spans are made: only under the JSON format.
fn spans_wanted() -> bool {
    SPANS_WANTED.load(Ordering::Relaxed)
}

/// The span an SMTP session runs in; record the client into it with
/// [`record_client`] once it is known. Its level is `ERROR` so that every
/// filter that lets an event through keeps its context too. Under the
/// `postfix` format it is `Span::none()` (see [`SPANS_WANTED`]).
pub fn session_span() -> Span {
    if !spans_wanted() {
        return Span::none();
    }
    tracing::error_span!("session", client = Empty)
}

/// Records `client` (`name[address]`) into the current session or
/// message span; a later call (the name after a reverse lookup) replaces
/// it.
pub fn record_client(client: impl fmt::Display) {
    Span::current().record(CLIENT, tracing::field::display(client));
}

/// The span one message's work runs in (a cleanup transaction) before
/// its queue id exists; record the id with [`record_queue_id`] and the
/// client with [`record_client`]. See [`session_span`] for its level.
pub fn message_span() -> Span {
    if !spans_wanted() {
        return Span::none();
    }
    tracing::error_span!("message", queue_id = Empty, client = Empty)
}

/// The span the work on queued message `queue_id` runs in (a delivery
/// attempt).
pub fn queued_message_span(queue_id: impl fmt::Display) -> Span {
    if !spans_wanted() {
        return Span::none();
    }
    tracing::error_span!("message", queue_id = %queue_id)
}

/// Records the queue id into the current message span.
pub fn record_queue_id(queue_id: impl fmt::Display) {
    Span::current().record(QUEUE_ID, tracing::field::display(queue_id));
}

/// What both formats know about the writing process.
#[derive(Clone)]
struct Format {
    process: Process,
    syslog_name: String,
    hostname: String,
    /// This process's id ([`PID`]; a zygote's children share the
    /// subscriber it installed before it forked them). Fixed in tests.
    pid: fn() -> u32,
    zone: TimeZone,
    /// The clock; fixed in tests.
    now: fn() -> SystemTime,
}

impl Format {
    fn subscriber<W>(self, format: LogFormat, filter: EnvFilter, writer: W) -> Box<dyn Subscriber + Send + Sync>
    where
        W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
    {
        let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
        if format == LogFormat::Json {
            SPANS_WANTED.store(true, Ordering::Relaxed);
        }
        match format {
            LogFormat::Json => Box::new(builder.fmt_fields(JsonFields::new()).event_format(JsonFormat(self)).finish()),
            LogFormat::Postfix => Box::new(builder.event_format(PostfixFormat(self)).finish()),
        }
    }
}

/// `Nov 28 05:30:00 mx1 postfix/mortal/smtpd[4242]: <message>`.
struct PostfixFormat(Format);

impl<S, N> FormatEvent<S, N> for PostfixFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, _ctx: &FmtContext<'_, S, N>, mut w: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let f = &self.0;
        let mut message = MessageOnly(String::new());
        event.record(&mut message);
        writeln!(
            w,
            "{} {} {}/{}[{}]: {}",
            date::syslog((f.now)(), &f.zone),
            f.hostname,
            f.syslog_name,
            f.process.name(),
            (f.pid)(),
            message.0
        )
    }
}

/// One JSON object a line: the process, the enclosing spans' fields and
/// the event's.
struct JsonFormat(Format);

impl<S, N> FormatEvent<S, N> for JsonFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut w: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let f = &self.0;
        let mut object = Map::new();
        // Spans from the outermost in, so an inner span's field wins.
        for span in ctx.event_scope().into_iter().flat_map(|scope| scope.from_root()) {
            let extensions = span.extensions();
            let Some(fields) = extensions.get::<FormattedFields<N>>() else { continue };
            if let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(&fields.fields) {
                object.extend(fields);
            }
        }
        let mut visitor = JsonVisitor(&mut object);
        event.record(&mut visitor);
        let message = object.get("message").and_then(Value::as_str).unwrap_or_default();
        let severity = severity(*event.metadata().level(), message);
        object.insert("severity".into(), severity.into());
        object.insert("timestamp".into(), date::rfc3339((f.now)(), &f.zone).into());
        object.insert("service".into(), f.process.name().into());
        object.insert("pid".into(), (f.pid)().into());
        object.insert("host".into(), f.hostname.clone().into());
        writeln!(w, "{}", Value::Object(object))
    }
}

/// Postfix's severity of an event: its level, except that an error whose
/// text says it is `fatal:` (the process exits) or `panic:` is that.
fn severity(level: Level, message: &str) -> &'static str {
    match level {
        Level::ERROR if message.starts_with("fatal:") => "fatal",
        Level::ERROR if message.starts_with("panic:") => "panic",
        Level::ERROR => "error",
        Level::WARN => "warning",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    }
}

/// Keeps the event's message; other fields belong to the JSON format.
struct MessageOnly(String);

impl Visit for MessageOnly {
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

/// Every field of an event as a JSON value of its type.
struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mortal_proto::service::Service;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, UNIX_EPOCH};

    /// 2026-11-28 05:30:07.250 UTC.
    fn fixed_now() -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(1_795_843_807_250)
    }

    /// The lines `format` writes for the same events, in a zone five
    /// hours west of UTC.
    fn lines(format: LogFormat) -> Vec<String> {
        let out = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = Arc::clone(&out);
        let writer = move || SharedBuf(Arc::clone(&sink));
        let f = Format {
            process: Process::Service(Service::Cleanup),
            syslog_name: "postfix/mortal".into(),
            hostname: "mx1".into(),
            pid: || 4242,
            zone: TimeZone::posix("EST5EDT,M3.2.0,M11.1.0").unwrap(),
            now: fixed_now,
        };
        let subscriber = f.subscriber(format, EnvFilter::new("info"), writer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("outside any span");
            let _session = session_span().entered();
            record_client("unknown[192.0.2.1]");
            record_client("mail.example[192.0.2.1]");
            tracing::info!("connect from mail.example[192.0.2.1]");
            let _message = message_span().entered();
            record_queue_id("0000000010000100000A");
            tracing::warn!("warning: 0000000010000100000A: write queue file: disk full");
            tracing::error!(attempt = 3u64, "fatal: open spool: gone");
            tracing::debug!("filtered out");
        });
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_owned).collect()
    }

    /// The zone is found as the C library finds it, without jiff's zone
    /// database (whose first use walks all of /usr/share/zoneinfo).
    #[test]
    fn system_zone_follows_tz_then_localtime() {
        let dir = tempfile::tempdir().unwrap();
        let zoneinfo = dir.path().join("zoneinfo");
        std::fs::create_dir_all(zoneinfo.join("Test")).unwrap();
        // A TZif file: the POSIX footer carries the rule (version 2+).
        let tzif = |rule: &str| {
            let mut v1 = b"TZif2".to_vec();
            v1.extend_from_slice(&[0; 15]);
            // isutcnt isstdcnt leapcnt timecnt typecnt charcnt
            for n in [0u32, 0, 0, 0, 1, 4] {
                v1.extend_from_slice(&n.to_be_bytes());
            }
            let (offset, abbr): (i32, &[u8; 4]) = (-5 * 3600, b"EST\0");
            let body = |out: &mut Vec<u8>| {
                out.extend_from_slice(&offset.to_be_bytes());
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(abbr);
            };
            body(&mut v1);
            let v2_header = v1[..44].to_vec();
            v1.extend_from_slice(&v2_header);
            body(&mut v1);
            v1.extend_from_slice(format!("\n{rule}\n").as_bytes());
            v1
        };
        std::fs::write(zoneinfo.join("Test/East"), tzif("EST5")).unwrap();
        let localtime = dir.path().join("localtime");
        std::os::unix::fs::symlink(zoneinfo.join("Test/East"), &localtime).unwrap();
        let t = UNIX_EPOCH + Duration::from_secs(1_795_843_807);
        let offset = |zone: &TimeZone| date::syslog(t, zone);
        let est = TimeZone::posix("EST5").unwrap();
        let cases: [(Option<&str>, Result<&TimeZone, ()>); 7] = [
            (None, Ok(&est)),
            (Some(""), Ok(&TimeZone::UTC)),
            (Some(":"), Ok(&TimeZone::UTC)),
            (Some("Test/East"), Ok(&est)),
            (Some(":Test/East"), Ok(&est)),
            (Some("EST5"), Ok(&est)),
            (Some("../etc/passwd"), Err(())),
        ];
        for (tz, want) in cases {
            let got = system_zone(tz.map(OsStr::new), &localtime, &zoneinfo);
            match (got, want) {
                (Ok(zone), Ok(want)) => assert_eq!(offset(&zone), offset(want), "TZ={tz:?}"),
                (Err(_), Err(())) => {}
                (got, _) => panic!("TZ={tz:?}: {got:?}"),
            }
        }
        let abs = zoneinfo.join("Test/East");
        let zone = system_zone(Some(abs.as_os_str()), &localtime, &zoneinfo).unwrap();
        assert_eq!(offset(&zone), offset(&est));
        assert_eq!(system_zone(None, &localtime, &zoneinfo).unwrap().iana_name(), Some("Test/East"));
        assert!(system_zone(None, &dir.path().join("missing"), &zoneinfo).is_err());
    }

    #[derive(Clone)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn postfix_lines_keep_their_shape_in_local_time() {
        assert_eq!(
            lines(LogFormat::Postfix),
            [
                "Nov 28 00:30:07 mx1 postfix/mortal/cleanup[4242]: outside any span",
                "Nov 28 00:30:07 mx1 postfix/mortal/cleanup[4242]: connect from mail.example[192.0.2.1]",
                "Nov 28 00:30:07 mx1 postfix/mortal/cleanup[4242]: warning: 0000000010000100000A: write queue file: disk full",
                "Nov 28 00:30:07 mx1 postfix/mortal/cleanup[4242]: fatal: open spool: gone",
            ]
        );
    }

    #[test]
    fn json_objects_carry_process_context_and_severity() {
        let objects: Vec<Value> =
            lines(LogFormat::Json).iter().map(|l| serde_json::from_str(l).expect("one JSON object a line")).collect();
        assert_eq!(objects.len(), 4, "{objects:?}");
        let common = |v: &Value| {
            assert_eq!(v["timestamp"], "2026-11-28T00:30:07.250000-05:00", "{v}");
            assert_eq!(v["service"], "cleanup", "{v}");
            assert_eq!(v["pid"], 4242, "{v}");
            assert_eq!(v["host"], "mx1", "{v}");
        };
        objects.iter().for_each(common);
        assert_eq!(objects[0]["message"], "outside any span");
        assert_eq!(objects[0]["severity"], "info");
        assert!(objects[0].get("client").is_none() && objects[0].get("queue_id").is_none(), "{}", objects[0]);
        assert_eq!(objects[1]["client"], "mail.example[192.0.2.1]", "the later record wins");
        assert!(objects[1].get("queue_id").is_none(), "{}", objects[1]);
        assert_eq!(objects[2]["severity"], "warning");
        assert_eq!(objects[2]["message"], "warning: 0000000010000100000A: write queue file: disk full");
        assert_eq!(objects[2]["queue_id"], "0000000010000100000A");
        assert_eq!(objects[2]["client"], "mail.example[192.0.2.1]");
        assert_eq!(objects[3]["severity"], "fatal");
        assert_eq!(objects[3]["attempt"], 3);
        assert_eq!(objects[3]["queue_id"], "0000000010000100000A");
    }

    #[test]
    fn severity_follows_level_and_postfix_words() {
        assert_eq!(severity(Level::ERROR, "fatal: usage"), "fatal");
        assert_eq!(severity(Level::ERROR, "panic: broken"), "panic");
        assert_eq!(severity(Level::ERROR, "cannot write"), "error");
        assert_eq!(severity(Level::WARN, "warning: x"), "warning");
        assert_eq!(severity(Level::INFO, "fatal: in an info line is just text"), "info");
    }
}
