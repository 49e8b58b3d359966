//! stat: what the master tells its operator, from a snapshot of
//! the scoreboard: the `status` document of the control socket
//! (`mortal_proto::status::StatusDoc`, read by `mortal status`) and the Prometheus text file (node_exporter's
//! textfile collector format, `[server] metrics_file`).
//!
//! Both are rendered from a [`Snapshot`], a plain copy taken by the event
//! loop, so formatting never touches live state and is easy to test.
//!
//! Besides counts, each service carries [`ReadyLatency`]: how long its
//! children took from just before fork+exec to their READY record (exec,
//! dynamic start-up, reading the configuration, entering the sandbox). It
//! is the price of the pattern's fresh address space per child, so it is
//! exposed as a Prometheus histogram (`mortal_child_ready_seconds`) and,
//! exactly, as quantiles of the latest children
//! (`mortal_child_ready_recent_seconds`, a summary).

use crate::event_loop::ServiceKind;
use crate::life::Reason;
use mortal_proto::status::{
    BoardState, ChildDoc, MasterDoc, ReadyBucket, ReadyDoc, ReadyQuantiles, ServiceDoc, StateCounts, StatusDoc,
};
use std::fmt::Write as _;
use std::io;
use std::path::Path;
use std::time::Duration;

/// The master at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub pid: u32,
    pub generation: u64,
    pub uptime: Duration,
    pub stopping: bool,
    pub services: Vec<ServiceStat>,
    pub children: Vec<ChildStat>,
}

/// One service (a listener and its pool).
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceStat {
    pub service: ServiceKind,
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
    /// fork+exec-to-READY times of its children.
    pub ready: ReadyLatency,
}

/// Upper bounds of the fork+exec-to-READY histogram buckets (`+Inf`
/// follows). Doubling from 0.5 ms, about an exec of a small binary on an
/// idle machine, to 1.024 s, a pool starting dozens of children at once on
/// a loaded machine; a slower start lands in `+Inf`, and one past
/// `event_loop::START_DEADLINE` is killed.
pub const READY_BUCKETS: [Duration; 12] = [
    Duration::from_micros(500),
    Duration::from_millis(1),
    Duration::from_millis(2),
    Duration::from_millis(4),
    Duration::from_millis(8),
    Duration::from_millis(16),
    Duration::from_millis(32),
    Duration::from_millis(64),
    Duration::from_millis(128),
    Duration::from_millis(256),
    Duration::from_millis(512),
    Duration::from_millis(1024),
];

/// READY latencies kept per service for exact quantiles: the latest this
/// many children (16 KiB per service), so memory stays bounded however
/// long the master runs.
pub const READY_SAMPLES: usize = 1024;

/// Quantiles of the latest READY latencies that are reported: one per
/// field of the status document's `latest`.
pub const READY_QUANTILES: [f64; 3] = ReadyQuantiles::QUANTILES;

/// fork+exec-to-READY times of one service's children: a cumulative
/// histogram over the master's life, and the latest [`READY_SAMPLES`]
/// values for exact quantiles.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReadyLatency {
    /// Observations per bucket, not cumulative: one per [`READY_BUCKETS`]
    /// bound, then `+Inf`.
    buckets: [u64; READY_BUCKETS.len() + 1],
    count: u64,
    sum: Duration,
    /// Ring of the latest samples; `next` is where the next one goes once
    /// it is full.
    recent: Vec<Duration>,
    next: usize,
}

impl ReadyLatency {
    /// Records one child's time from spawn to READY.
    pub fn observe(&mut self, elapsed: Duration) {
        let bucket = READY_BUCKETS.iter().position(|le| elapsed <= *le).unwrap_or(READY_BUCKETS.len());
        self.buckets[bucket] += 1;
        self.count += 1;
        self.sum = self.sum.saturating_add(elapsed);
        if self.recent.len() < READY_SAMPLES {
            self.recent.push(elapsed);
        } else {
            self.recent[self.next] = elapsed;
        }
        self.next = (self.next + 1) % READY_SAMPLES;
    }

    /// Children that reported READY.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Their total time from spawn to READY.
    pub fn sum(&self) -> Duration {
        self.sum
    }

    /// `(upper bound, observations at or below it)` for every bucket,
    /// `None` (`+Inf`) last, as Prometheus counts them.
    pub fn cumulative(&self) -> Vec<(Option<Duration>, u64)> {
        let bounds = READY_BUCKETS.iter().copied().map(Some).chain([None]);
        let mut total = 0;
        bounds
            .zip(self.buckets)
            .map(|(le, n)| {
                total += n;
                (le, total)
            })
            .collect()
    }

    /// How many latest samples the quantiles are computed from.
    pub fn window(&self) -> usize {
        self.recent.len()
    }

    /// Exact quantiles (nearest rank) of the latest samples, one sort for
    /// all of `qs`; empty before the first READY.
    fn quantiles(&self, qs: &[f64]) -> Vec<Duration> {
        if self.recent.is_empty() {
            return Vec::new();
        }
        let mut sorted = self.recent.clone();
        sorted.sort_unstable();
        let n = sorted.len();
        qs.iter()
            .map(|q| {
                let rank = (q.clamp(0.0, 1.0) * n as f64).ceil() as usize;
                sorted[rank.clamp(1, n) - 1]
            })
            .collect()
    }

    /// The `ready` object of a service in the `status` document
    /// (milliseconds, like the document's ages). Buckets are a list, in
    /// order, with `le_ms: null` for `+Inf`.
    fn to_doc(&self) -> ReadyDoc {
        let buckets =
            self.cumulative().into_iter().map(|(le, count)| ReadyBucket { le_ms: le.map(millis), count }).collect();
        let latest = match self.quantiles(&READY_QUANTILES)[..] {
            [p50, p90, p99] => {
                ReadyQuantiles { p50: Some(millis(p50)), p90: Some(millis(p90)), p99: Some(millis(p99)) }
            }
            _ => ReadyQuantiles::default(),
        };
        ReadyDoc { count: self.count, sum_ms: millis(self.sum), buckets, window: self.window() as u64, latest }
    }
}

/// One child.
#[derive(Debug, Clone, PartialEq)]
pub struct ChildStat {
    pub pid: u32,
    /// Index into [`Snapshot::services`].
    pub service: usize,
    pub generation: u64,
    pub state: BoardState,
    pub sessions: u32,
    pub age: Duration,
    /// Time in its current state.
    pub since: Duration,
    /// Its drawn lifetime, `None` when unlimited.
    pub life: Option<Duration>,
}

impl Snapshot {
    /// Children of service `index` in `state`.
    fn count(&self, index: usize, state: BoardState) -> usize {
        self.children.iter().filter(|c| c.service == index && c.state == state).count()
    }

    /// The `status` document.
    pub fn to_doc(&self) -> StatusDoc {
        let ms = |d: Duration| d.as_millis() as u64;
        let services = self
            .services
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut children = StateCounts::default();
                for c in self.children.iter().filter(|c| c.service == i) {
                    children.add(c.state);
                }
                ServiceDoc {
                    service: s.service,
                    endpoint: s.endpoint.clone(),
                    process_limit: s.process_limit,
                    throttled: s.throttled,
                    at_limit: s.at_limit,
                    spawns: s.spawns,
                    retired: Reason::ALL.into_iter().zip(s.retired).collect(),
                    overload_rejects: s.overload_rejects,
                    ready: s.ready.to_doc(),
                    children,
                }
            })
            .collect();
        let children = self
            .children
            .iter()
            .map(|c| {
                let s = &self.services[c.service];
                ChildDoc {
                    pid: c.pid,
                    service: s.service,
                    endpoint: s.endpoint.clone(),
                    generation: c.generation,
                    state: c.state,
                    sessions: c.sessions,
                    age_ms: ms(c.age),
                    since_ms: ms(c.since),
                    lifetime_ms: c.life.map(ms),
                }
            })
            .collect();
        StatusDoc {
            master: MasterDoc {
                pid: self.pid,
                generation: self.generation,
                uptime_ms: ms(self.uptime),
                stopping: self.stopping,
            },
            services,
            children,
        }
    }

    /// The Prometheus text exposition.
    pub fn to_prometheus(&self) -> String {
        let mut out = String::new();
        let label = |s: &ServiceStat| format!("service=\"{}\",endpoint=\"{}\"", s.service, escape(&s.endpoint));
        metric(&mut out, "mortal_children", "gauge", "Child processes by service and scoreboard state.");
        for (i, s) in self.services.iter().enumerate() {
            for state in BoardState::ALL {
                let name = state.as_str();
                let _ = writeln!(out, "mortal_children{{{},state=\"{name}\"}} {}", label(s), self.count(i, state));
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
        metric(
            &mut out,
            "mortal_child_ready_seconds",
            "histogram",
            "Time from just before fork+exec to the child's READY record.",
        );
        for s in &self.services {
            for (le, n) in s.ready.cumulative() {
                let le = le_label(le);
                let _ = writeln!(out, "mortal_child_ready_seconds_bucket{{{},le=\"{le}\"}} {n}", label(s));
            }
            let _ = writeln!(out, "mortal_child_ready_seconds_sum{{{}}} {:.6}", label(s), s.ready.sum().as_secs_f64());
            let _ = writeln!(out, "mortal_child_ready_seconds_count{{{}}} {}", label(s), s.ready.count());
        }
        metric(
            &mut out,
            "mortal_child_ready_recent_seconds",
            "summary",
            &format!("fork+exec-to-READY time of the latest {READY_SAMPLES} children: exact quantiles."),
        );
        for s in &self.services {
            let values = s.ready.quantiles(&READY_QUANTILES);
            for (i, q) in READY_QUANTILES.iter().enumerate() {
                // NaN before the first READY, as Prometheus clients write
                // an empty summary.
                let v = values.get(i).map_or("NaN".to_owned(), |d| format!("{:.6}", d.as_secs_f64()));
                let _ = writeln!(out, "mortal_child_ready_recent_seconds{{{},quantile=\"{q}\"}} {v}", label(s));
            }
            let window: Duration = s.ready.recent.iter().sum();
            let _ = writeln!(out, "mortal_child_ready_recent_seconds_sum{{{}}} {:.6}", label(s), window.as_secs_f64());
            let _ = writeln!(out, "mortal_child_ready_recent_seconds_count{{{}}} {}", label(s), s.ready.window());
        }
        metric(&mut out, "mortal_config_generation", "gauge", "Configuration generation (reloads).");
        let _ = writeln!(out, "mortal_config_generation {}", self.generation);
        metric(&mut out, "mortal_master_uptime_seconds", "gauge", "Seconds since the master started.");
        let _ = writeln!(out, "mortal_master_uptime_seconds {:.3}", self.uptime.as_secs_f64());
        out
    }
}

/// Milliseconds with the nanoseconds as a fraction: whole bounds like
/// 0.5 ms print exactly.
fn millis(d: Duration) -> f64 {
    d.as_nanos() as f64 / 1e6
}

/// A bucket bound as Prometheus writes `le`: seconds, shortest form.
fn le_label(le: Option<Duration>) -> String {
    le.map_or("+Inf".into(), |d| format!("{}", d.as_nanos() as f64 / 1e9))
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
    mortal_proto::spool::replace_atomically(path, tmp, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn snapshot() -> Snapshot {
        let mut retired = [0; Reason::ALL.len()];
        retired[0] = 3;
        retired[2] = 1;
        Snapshot {
            pid: 10,
            generation: 2,
            uptime: Duration::from_millis(1500),
            stopping: false,
            services: vec![ServiceStat {
                service: ServiceKind::Smtpd,
                endpoint: "127.0.0.1:25".into(),
                process_limit: Some(4),
                throttled: false,
                at_limit: true,
                spawns: 7,
                retired,
                overload_rejects: 5,
                ready: ReadyLatency::default(),
            }],
            children: vec![
                ChildStat {
                    pid: 11,
                    service: 0,
                    generation: 2,
                    state: BoardState::Busy,
                    sessions: 4,
                    age: Duration::from_millis(2500),
                    since: Duration::from_millis(300),
                    life: Some(Duration::from_secs(60)),
                },
                ChildStat {
                    pid: 12,
                    service: 0,
                    generation: 1,
                    state: BoardState::Overdue,
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
        let v = snapshot().to_doc();
        assert_eq!(v.master.generation, 2);
        let s = &v.services[0];
        assert_eq!(s.children, StateCounts { busy: 1, overdue: 1, ..Default::default() });
        assert_eq!(s.retired[&Reason::MaxUse], 3);
        assert_eq!(s.retired[&Reason::Lifetime], 1);
        assert_eq!(s.retired.len(), Reason::ALL.len(), "every reason, zero or not");
        assert_eq!(s.overload_rejects, 5);
        assert_eq!(v.children[0].pid, 11);
        assert_eq!(v.children[0].age_ms, 2500);
        assert_eq!(v.children[0].lifetime_ms, Some(60_000));
        assert_eq!(v.children[1].lifetime_ms, None);
        assert_eq!(v.children[1].service, ServiceKind::Smtpd);
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

    fn quantile(h: &ReadyLatency, q: f64) -> Option<Duration> {
        h.quantiles(&[q]).pop()
    }

    fn ms(n: f64) -> Duration {
        Duration::from_micros((n * 1000.0).round() as u64)
    }

    #[test]
    fn ready_histogram_counts_each_sample_in_its_bucket() {
        let mut h = ReadyLatency::default();
        assert_eq!(quantile(&h, 0.5), None);
        // On a bound counts in that bucket (Prometheus `le`), just above in the next.
        for v in [0.2, 0.5, 0.6, 3.0, 3.0, 100.0, 5000.0] {
            h.observe(ms(v));
        }
        let c = h.cumulative();
        assert_eq!(c.len(), READY_BUCKETS.len() + 1);
        assert_eq!(c[0], (Some(ms(0.5)), 2), "0.2 ms and 0.5 ms are <= 0.5 ms");
        assert_eq!(c[1], (Some(ms(1.0)), 3));
        assert_eq!(c[2], (Some(ms(2.0)), 3));
        assert_eq!(c[3], (Some(ms(4.0)), 5));
        assert_eq!(c[8], (Some(ms(128.0)), 6));
        assert_eq!(c[11], (Some(ms(1024.0)), 6), "5 s is past the last bound");
        assert_eq!(c[12], (None, 7));
        assert!(c.windows(2).all(|w| w[0].1 <= w[1].1), "cumulative counts never decrease");
        assert_eq!(h.count(), 7);
        assert_eq!(h.sum(), ms(5107.3));
    }

    #[test]
    fn ready_quantiles_are_exact_over_the_latest_samples() {
        let mut h = ReadyLatency::default();
        for v in 1..=100 {
            h.observe(ms(f64::from(v)));
        }
        assert_eq!(quantile(&h, 0.5), Some(ms(50.0)));
        assert_eq!(quantile(&h, 0.9), Some(ms(90.0)));
        assert_eq!(quantile(&h, 0.99), Some(ms(99.0)));
        assert_eq!(quantile(&h, 1.0), Some(ms(100.0)));
        assert_eq!(quantile(&h, 0.0), Some(ms(1.0)));
        // The window is bounded: after READY_SAMPLES slow starts, the fast
        // ones have left it, while the histogram still counts them all.
        for _ in 0..READY_SAMPLES {
            h.observe(ms(700.0));
        }
        assert_eq!(h.window(), READY_SAMPLES);
        assert_eq!(quantile(&h, 0.0), Some(ms(700.0)));
        assert_eq!(h.count(), 100 + READY_SAMPLES as u64);
        h.observe(ms(2.0));
        assert_eq!(h.window(), READY_SAMPLES);
        assert_eq!(quantile(&h, 0.0), Some(ms(2.0)), "the newest sample replaced the oldest");
    }

    #[test]
    fn ready_latency_is_exposed_as_histogram_summary_and_json() {
        let mut s = snapshot();
        let empty = s.to_prometheus();
        assert!(empty.contains("mortal_child_ready_seconds_count{service=\"smtpd\",endpoint=\"127.0.0.1:25\"} 0\n"));
        assert!(empty.contains("quantile=\"0.5\"} NaN\n"), "{empty}");
        for v in [1.5, 3.0, 300.0] {
            s.services[0].ready.observe(ms(v));
        }
        let text = s.to_prometheus();
        assert!(text.contains("# TYPE mortal_child_ready_seconds histogram\n"), "{text}");
        let labels = "service=\"smtpd\",endpoint=\"127.0.0.1:25\"";
        for (le, n) in [("0.0005", 0), ("0.002", 1), ("0.004", 2), ("0.256", 2), ("0.512", 3), ("+Inf", 3)] {
            let line = format!("mortal_child_ready_seconds_bucket{{{labels},le=\"{le}\"}} {n}\n");
            assert!(text.contains(&line), "{line} in {text}");
        }
        assert!(text.contains(&format!("mortal_child_ready_seconds_sum{{{labels}}} 0.304500\n")), "{text}");
        assert!(text.contains(&format!("mortal_child_ready_seconds_count{{{labels}}} 3\n")), "{text}");
        assert!(text.contains(&format!("mortal_child_ready_recent_seconds{{{labels},quantile=\"0.5\"}} 0.003000\n")));
        assert!(text.contains(&format!("mortal_child_ready_recent_seconds{{{labels},quantile=\"0.99\"}} 0.300000\n")));
        assert!(text.contains(&format!("mortal_child_ready_recent_seconds_count{{{labels}}} 3\n")), "{text}");
        let v = s.to_doc();
        let ready = &v.services[0].ready;
        assert_eq!(ready.count, 3);
        assert_eq!(ready.window, 3);
        let buckets = &ready.buckets;
        assert_eq!(buckets.len(), READY_BUCKETS.len() + 1);
        assert_eq!(buckets[0], ReadyBucket { le_ms: Some(0.5), count: 0 });
        assert_eq!(buckets[3], ReadyBucket { le_ms: Some(4.0), count: 2 });
        assert_eq!(buckets[11], ReadyBucket { le_ms: Some(1024.0), count: 3 });
        assert_eq!(buckets[12], ReadyBucket { le_ms: None, count: 3 });
        assert_eq!(ready.latest, ReadyQuantiles { p50: Some(3.0), p90: Some(300.0), p99: Some(300.0) });
    }

    #[test]
    fn metrics_file_is_replaced_whole() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path();
        let path = dir.join("mortal.prom");
        write_atomically(&path, "a 1\n").unwrap();
        write_atomically(&path, "b 2\n").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "b 2\n");
        assert_eq!(fs::read_dir(dir).unwrap().count(), 1, "no temporary file left");
    }
}
