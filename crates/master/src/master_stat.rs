//! master_stat: what the master tells its operator, from a snapshot of
//! the scoreboard: the `status` document of the control socket (JSON, read
//! by `mortal status`) and the Prometheus text file (node_exporter's
//! textfile collector format, `[server] metrics_file`).
//!
//! Both are rendered from a [`Snapshot`], a plain copy taken by the event
//! loop, so formatting never touches live state and is easy to test.

use crate::master_life::Reason;
use serde_json::{Value, json};
use std::fmt::Write as _;
use std::fs;
use std::io::{self, Write as _};
use std::path::Path;
use std::time::Duration;

/// Scoreboard states, in display order.
pub const STATES: [&str; 5] = ["starting", "idle", "busy", "retiring", "overdue"];

/// The master at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub master_pid: u32,
    pub generation: u64,
    pub uptime: Duration,
    pub stopping: bool,
    pub services: Vec<ServiceStat>,
    pub children: Vec<ChildStat>,
}

/// One service (a listener and its pool).
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceStat {
    pub name: &'static str,
    pub endpoint: String,
    pub process_limit: Option<u32>,
    /// Spawning paused by the crash throttle.
    pub throttled: bool,
    /// Short of spares with no room under `process_limit`.
    pub at_limit: bool,
    pub spawns: u64,
    /// Retirements per reason, in [`Reason::ALL`] order.
    pub retired: [u64; Reason::ALL.len()],
    /// Clients answered `421 Service busy` by the master.
    pub overload_rejects: u64,
}

/// One child.
#[derive(Debug, Clone, PartialEq)]
pub struct ChildStat {
    pub pid: u32,
    /// Index into [`Snapshot::services`].
    pub service: usize,
    pub generation: u64,
    pub state: &'static str,
    pub sessions: u32,
    pub age: Duration,
    /// Time in its current state.
    pub since: Duration,
    /// Its drawn lifetime, `None` when unlimited.
    pub life: Option<Duration>,
}

impl Snapshot {
    /// Children of service `index` in `state`.
    fn count(&self, index: usize, state: &str) -> usize {
        self.children.iter().filter(|c| c.service == index && c.state == state).count()
    }

    /// The `status` document.
    pub fn to_json(&self) -> Value {
        let services: Vec<Value> = self
            .services
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let states: serde_json::Map<String, Value> =
                    STATES.iter().map(|st| ((*st).to_owned(), json!(self.count(i, st)))).collect();
                let retired: serde_json::Map<String, Value> =
                    Reason::ALL.iter().zip(s.retired).map(|(r, n)| (r.as_str().to_owned(), json!(n))).collect();
                json!({
                    "service": s.name,
                    "endpoint": s.endpoint,
                    "process_limit": s.process_limit,
                    "throttled": s.throttled,
                    "at_limit": s.at_limit,
                    "spawns": s.spawns,
                    "retired": retired,
                    "overload_rejects": s.overload_rejects,
                    "children": states,
                })
            })
            .collect();
        let children: Vec<Value> = self
            .children
            .iter()
            .map(|c| {
                let s = &self.services[c.service];
                json!({
                    "pid": c.pid,
                    "service": s.name,
                    "endpoint": s.endpoint,
                    "generation": c.generation,
                    "state": c.state,
                    "sessions": c.sessions,
                    "age_ms": c.age.as_millis() as u64,
                    "since_ms": c.since.as_millis() as u64,
                    "lifetime_ms": c.life.map(|l| l.as_millis() as u64),
                })
            })
            .collect();
        json!({
            "master": {
                "pid": self.master_pid,
                "generation": self.generation,
                "uptime_ms": self.uptime.as_millis() as u64,
                "stopping": self.stopping,
            },
            "services": services,
            "children": children,
        })
    }

    /// The Prometheus text exposition.
    pub fn to_prometheus(&self) -> String {
        let mut out = String::new();
        let label = |s: &ServiceStat| format!("service=\"{}\",endpoint=\"{}\"", s.name, escape(&s.endpoint));
        metric(&mut out, "mortal_children", "gauge", "Child processes by service and scoreboard state.");
        for (i, s) in self.services.iter().enumerate() {
            for state in STATES {
                let _ = writeln!(out, "mortal_children{{{},state=\"{state}\"}} {}", label(s), self.count(i, state));
            }
        }
        metric(&mut out, "mortal_spawns_total", "counter", "Children spawned (fork+exec).");
        for s in &self.services {
            let _ = writeln!(out, "mortal_spawns_total{{{}}} {}", label(s), s.spawns);
        }
        metric(&mut out, "mortal_retirements_total", "counter", "Children gone, by reason.");
        for s in &self.services {
            for (reason, n) in Reason::ALL.iter().zip(s.retired) {
                let _ = writeln!(out, "mortal_retirements_total{{{},reason=\"{}\"}} {n}", label(s), reason.as_str());
            }
        }
        metric(&mut out, "mortal_throttled", "gauge", "1 while the crash throttle pauses spawning.");
        for s in &self.services {
            let _ = writeln!(out, "mortal_throttled{{{}}} {}", label(s), u8::from(s.throttled));
        }
        metric(&mut out, "mortal_at_process_limit", "gauge", "1 while short of spares at process_limit.");
        for s in &self.services {
            let _ = writeln!(out, "mortal_at_process_limit{{{}}} {}", label(s), u8::from(s.at_limit));
        }
        metric(&mut out, "mortal_overload_rejects_total", "counter", "Clients answered 421 Service busy.");
        for s in &self.services {
            let _ = writeln!(out, "mortal_overload_rejects_total{{{}}} {}", label(s), s.overload_rejects);
        }
        metric(&mut out, "mortal_config_generation", "gauge", "Configuration generation (reloads).");
        let _ = writeln!(out, "mortal_config_generation {}", self.generation);
        metric(&mut out, "mortal_master_uptime_seconds", "gauge", "Seconds since the master started.");
        let _ = writeln!(out, "mortal_master_uptime_seconds {:.3}", self.uptime.as_secs_f64());
        out
    }
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value as the exposition format wants it.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Replaces `path` with `text` atomically: a collector reading it sees the
/// old file or the new one, never half of one. The temporary file is in
/// the same directory (so the rename stays on one file system) and starts
/// with a dot, which the textfile collector ignores.
pub fn write_atomically(path: &Path, text: &str) -> io::Result<()> {
    let name = path.file_name().ok_or_else(|| io::Error::other("metrics_file has no file name"))?;
    let tmp = path.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    let mut file = fs::File::create(&tmp)?;
    file.write_all(text.as_bytes())?;
    drop(file);
    fs::rename(&tmp, path).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        let mut retired = [0; Reason::ALL.len()];
        retired[0] = 3;
        retired[2] = 1;
        Snapshot {
            master_pid: 10,
            generation: 2,
            uptime: Duration::from_millis(1500),
            stopping: false,
            services: vec![ServiceStat {
                name: "smtpd",
                endpoint: "127.0.0.1:25".into(),
                process_limit: Some(4),
                throttled: false,
                at_limit: true,
                spawns: 7,
                retired,
                overload_rejects: 5,
            }],
            children: vec![
                ChildStat {
                    pid: 11,
                    service: 0,
                    generation: 2,
                    state: "busy",
                    sessions: 4,
                    age: Duration::from_millis(2500),
                    since: Duration::from_millis(300),
                    life: Some(Duration::from_secs(60)),
                },
                ChildStat {
                    pid: 12,
                    service: 0,
                    generation: 1,
                    state: "overdue",
                    sessions: 9,
                    age: Duration::from_secs(70),
                    since: Duration::from_secs(12),
                    life: None,
                },
            ],
        }
    }

    #[test]
    fn status_document_has_every_child_and_counter() {
        let v = snapshot().to_json();
        assert_eq!(v["master"]["generation"], 2);
        assert_eq!(v["services"][0]["children"]["busy"], 1);
        assert_eq!(v["services"][0]["children"]["overdue"], 1);
        assert_eq!(v["services"][0]["children"]["idle"], 0);
        assert_eq!(v["services"][0]["retired"]["max_use"], 3);
        assert_eq!(v["services"][0]["retired"]["lifetime"], 1);
        assert_eq!(v["services"][0]["overload_rejects"], 5);
        assert_eq!(v["children"][0]["pid"], 11);
        assert_eq!(v["children"][0]["age_ms"], 2500);
        assert_eq!(v["children"][0]["lifetime_ms"], 60_000);
        assert_eq!(v["children"][1]["lifetime_ms"], Value::Null);
        assert_eq!(v["children"][1]["service"], "smtpd");
    }

    #[test]
    fn prometheus_text_is_well_formed() {
        let mut s = snapshot();
        s.services[0].endpoint = "/run/\"x\"\\y".into();
        let text = s.to_prometheus();
        assert!(text.contains("# TYPE mortal_children gauge\n"), "{text}");
        assert!(
            text.contains("mortal_children{service=\"smtpd\",endpoint=\"/run/\\\"x\\\"\\\\y\",state=\"busy\"} 1\n")
        );
        assert!(text.contains("reason=\"max_use\"} 3\n"), "{text}");
        assert!(text.contains("mortal_spawns_total{service=\"smtpd\""), "{text}");
        assert!(text.contains("mortal_at_process_limit{service=\"smtpd\",endpoint=\"/run/\\\"x\\\"\\\\y\"} 1\n"));
        // Every sample line is `name{labels} value` or `name value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }

    #[test]
    fn metrics_file_is_replaced_whole() {
        let dir = std::env::temp_dir().join(format!("mortal-stat-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mortal.prom");
        write_atomically(&path, "a 1\n").unwrap();
        write_atomically(&path, "b 2\n").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "b 2\n");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1, "no temporary file left");
        fs::remove_dir_all(&dir).unwrap();
    }
}
