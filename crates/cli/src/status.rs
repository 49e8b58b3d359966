//! status: `mortal status [--json]`, and the client side of the master's
//! control socket (`<run_dir>/master.sock`), which `reload` and `stop`
//! use too.
//!
//! The socket speaks one request line and one reply (see
//! `mortal_proto::status::ControlRequest`); `status` is answered with a
//! JSON document ([`StatusDoc`], the one definition the master writes and
//! this reads): the master, each service with its counters, and every
//! child (pid, service, generation, state, sessions, age, time in its
//! state). `--json` prints that document; the default is a table.

use anyhow::Context;
use mortal_proto::config::Config;
use mortal_proto::status::{BoardState, CONTROL_SOCKET, ControlRequest, StatusDoc};
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Longest wait for the master's reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest reply read (a status document of thousands of children fits).
const REPLY_LIMIT: u64 = 16 * 1024 * 1024;

/// Where the control socket of `config`'s master is.
pub fn control_socket(config: &Config) -> PathBuf {
    config.run_dir().join(CONTROL_SOCKET)
}

/// Sends one request and returns the reply. `NotFound` or
/// `ConnectionRefused` mean no master listens there.
pub fn request(config: &Config, command: ControlRequest) -> io::Result<String> {
    let mut sock = UnixStream::connect(control_socket(config))?;
    sock.set_read_timeout(Some(REPLY_TIMEOUT))?;
    sock.set_write_timeout(Some(REPLY_TIMEOUT))?;
    sock.write_all(format!("{}\n", command.as_str()).as_bytes())?;
    let mut reply = String::new();
    sock.take(REPLY_LIMIT).read_to_string(&mut reply)?;
    Ok(reply)
}

/// Whether an error from [`request`] means "no master here" (so a caller
/// may fall back to the pid file and signals).
pub fn no_master(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused)
}

/// `mortal status`.
pub fn status(config: &Config, json: bool) -> anyhow::Result<ExitCode> {
    let reply = match request(config, ControlRequest::Status) {
        Ok(reply) => reply,
        Err(e) if no_master(&e) => anyhow::bail!("the mail system is not running"),
        Err(e) => return Err(e).with_context(|| format!("{}", control_socket(config).display())),
    };
    let doc: StatusDoc =
        serde_json::from_str(&reply).with_context(|| format!("master replied {:?}", reply.trim_end()))?;
    if json {
        println!("{}", serde_json::to_string(&doc)?);
    } else {
        print!("{}", table(&doc));
    }
    Ok(ExitCode::SUCCESS)
}

/// The table shown without `--json`.
fn table(doc: &StatusDoc) -> String {
    let mut out = String::new();
    let m = &doc.master;
    let _ = writeln!(
        out,
        "master pid {}, configuration generation {}, up {}{}",
        m.pid,
        m.generation,
        age(m.uptime_ms),
        if m.stopping { ", stopping" } else { "" }
    );
    let _ = writeln!(out);
    let services = &doc.services;
    // Socket paths can be long: the column is as wide as its widest entry.
    let width = services.iter().map(|s| s.endpoint.len()).max().unwrap_or(0).max("ENDPOINT".len());
    let _ = writeln!(
        out,
        "{:<8} {:<width$} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} {:>7}  retired",
        "SERVICE", "ENDPOINT", "LIMIT", "START", "IDLE", "BUSY", "RETIR", "OVERD", "SPAWNS"
    );
    for s in services {
        let c = &s.children;
        let retired: Vec<String> =
            s.retired.iter().filter(|(_, n)| **n > 0).map(|(reason, n)| format!("{}={n}", reason.as_str())).collect();
        let mut flags = String::new();
        if s.throttled {
            flags.push_str(" THROTTLED");
        }
        if s.at_limit {
            flags.push_str(" AT-LIMIT");
        }
        if s.overload_rejects > 0 {
            let _ = write!(flags, " busy-421={}", s.overload_rejects);
        }
        let _ = writeln!(
            out,
            "{:<8} {:<width$} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} {:>7}  {}{flags}",
            s.service.name(),
            s.endpoint,
            s.process_limit.map_or_else(|| "-".to_owned(), |n| n.to_string()),
            c.get(BoardState::Starting),
            c.get(BoardState::Idle),
            c.get(BoardState::Busy),
            c.get(BoardState::Retiring),
            c.get(BoardState::Overdue),
            s.spawns,
            if retired.is_empty() { "-".to_owned() } else { retired.join(" ") }
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:>8} {:<8} {:>4} {:<9} {:>8} {:>9} {:>9} {:>9}",
        "PID", "SERVICE", "GEN", "STATE", "SESSIONS", "AGE", "SINCE", "LIFETIME"
    );
    for c in &doc.children {
        let _ = writeln!(
            out,
            "{:>8} {:<8} {:>4} {:<9} {:>8} {:>9} {:>9} {:>9}",
            c.pid,
            c.service.name(),
            c.generation,
            c.state.as_str(),
            c.sessions,
            age(c.age_ms),
            age(c.since_ms),
            c.lifetime_ms.map_or_else(|| "-".to_owned(), age)
        );
    }
    out
}

/// A duration in milliseconds, short: `850ms`, `42.3s`, `5m07s`, `3h02m`.
fn age(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{}m{:02}s", ms / 60_000, ms / 1000 % 60),
        _ => format!("{}h{:02}m", ms / 3_600_000, ms / 60_000 % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ages_are_short() {
        assert_eq!(age(850), "850ms");
        assert_eq!(age(42_300), "42.3s");
        assert_eq!(age(307_000), "5m07s");
        assert_eq!(age(10_920_000), "3h02m");
    }

    #[test]
    fn table_lists_services_and_children() {
        let doc: StatusDoc = serde_json::from_value(json!({
            "master": {"pid": 7, "generation": 1, "uptime_ms": 5000, "stopping": false},
            "services": [{"service": "smtpd", "endpoint": "127.0.0.1:25", "process_limit": 4, "throttled": false,
                "at_limit": true, "spawns": 9, "overload_rejects": 2,
                "retired": {"max_use": 3, "idle": 0},
                "ready": {"count": 0, "sum_ms": 0.0, "buckets": [{"le_ms": null, "count": 0}], "window": 0,
                    "latest": {"p50": null, "p90": null, "p99": null}},
                "children": {"starting": 0, "idle": 1, "busy": 2, "retiring": 0, "overdue": 1}}],
            "children": [{"pid": 4242, "service": "smtpd", "endpoint": "127.0.0.1:25", "generation": 1,
                "state": "overdue", "sessions": 12, "age_ms": 61_000, "since_ms": 2_000, "lifetime_ms": 60_000}],
        }))
        .unwrap();
        let t = table(&doc);
        assert!(t.starts_with("master pid 7, configuration generation 1, up 5.0s\n"), "{t}");
        assert!(t.contains("max_use=3 AT-LIMIT busy-421=2"), "{t}");
        assert!(!t.contains("idle=0"), "{t}");
        let row = t.lines().find(|l| l.contains("4242")).unwrap();
        assert_eq!(
            row.split_whitespace().collect::<Vec<_>>(),
            ["4242", "smtpd", "1", "overdue", "12", "1m01s", "2.0s", "1m00s"]
        );
    }
}
