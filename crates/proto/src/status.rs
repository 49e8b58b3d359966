//! Child → master status records and master → child commands; and the
//! operator's control socket requests.
//!
//! Each child owns one Unix stream socket to the master (its stdout; the
//! same socket is its stdin, see `mortal_libmaster::child`). Records are a fixed
//! eight octets, so the master never parses anything variable from a child
//! that may be compromised, and a child can only ever speak for itself: the
//! master knows which pid sits at the other end of each socket.

use crate::service::Service;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Octets in one status record.
pub const STATUS_LEN: usize = 8;
/// First octet of every record, catching a desynchronised stream.
const STATUS_MAGIC: u8 = 0xA5;

/// What a child tells the master.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildState {
    /// Initialised and waiting for work: the master may count it as spare.
    Ready,
    /// Serving a session.
    Busy,
    /// Finished a session and waiting for the next.
    Idle,
    /// About to serve its last session (or leaving for another reason):
    /// the master spawns the replacement now, before capacity dips.
    Retiring,
}

/// One decoded status record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusRecord {
    pub state: ChildState,
    /// Sessions served so far by this child.
    pub sessions: u32,
}

impl StatusRecord {
    pub fn encode(&self) -> [u8; STATUS_LEN] {
        let kind = match self.state {
            ChildState::Ready => 1,
            ChildState::Busy => 2,
            ChildState::Idle => 3,
            ChildState::Retiring => 4,
        };
        let s = self.sessions.to_be_bytes();
        [STATUS_MAGIC, kind, 0, 0, s[0], s[1], s[2], s[3]]
    }

    /// Decodes one record; `None` for anything not exactly as encoded, which
    /// the master treats as a misbehaving child.
    pub fn decode(bytes: &[u8; STATUS_LEN]) -> Option<Self> {
        if bytes[0] != STATUS_MAGIC || bytes[2] != 0 || bytes[3] != 0 {
            return None;
        }
        let state = match bytes[1] {
            1 => ChildState::Ready,
            2 => ChildState::Busy,
            3 => ChildState::Idle,
            4 => ChildState::Retiring,
            _ => return None,
        };
        let sessions = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        Some(Self { state, sessions })
    }
}

/// Master → child: one octet. End of stream means the master is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MasterCommand {
    /// Finish the current session (if any) and exit.
    Retire,
}

impl MasterCommand {
    pub fn encode(self) -> u8 {
        match self {
            MasterCommand::Retire => b'R',
        }
    }

    pub fn decode(byte: u8) -> Option<Self> {
        match byte {
            b'R' => Some(MasterCommand::Retire),
            _ => None,
        }
    }
}

/// The operator's control socket, in the run directory: `mortal status`,
/// `reload` and `stop` talk to the master over it. The master accepts
/// connections only from root and from its own user (checked with
/// `SO_PEERCRED`), and the socket file is mode 0600.
pub const CONTROL_SOCKET: &str = "master.sock";
/// Longest request line, newline included.
pub const CONTROL_REQUEST_MAX: usize = 64;
/// First word of a reply that reports failure; each line of the reason
/// follows it (`error: <file>:<line>: <key>: <message>`).
pub const CONTROL_ERROR: &str = "error:";
/// The reply to a request that was carried out.
pub const CONTROL_OK: &str = "ok";

/// One request on the control socket: a single line, then the master
/// replies and closes. `status` is answered with one JSON document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlRequest {
    Status,
    Reload,
    Stop,
}

impl ControlRequest {
    pub fn as_str(self) -> &'static str {
        match self {
            ControlRequest::Status => "status",
            ControlRequest::Reload => "reload",
            ControlRequest::Stop => "stop",
        }
    }

    /// Parses a request line (without its newline); anything else is
    /// refused whole.
    pub fn parse(line: &[u8]) -> Option<Self> {
        match line {
            b"status" => Some(ControlRequest::Status),
            b"reload" => Some(ControlRequest::Reload),
            b"stop" => Some(ControlRequest::Stop),
            _ => None,
        }
    }
}

/// Why a child left its pool, for the retirement counters of
/// [`ServiceDoc::retired`] and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetireReason {
    /// Served `max_use` sessions.
    MaxUse,
    /// Idle for `max_idle` above `min_spare`, or idle above `max_spare`.
    Idle,
    /// Reached its drawn lifetime and exited by itself.
    Lifetime,
    /// Killed: a session outlasted `session_deadline`.
    Deadline,
    /// Killed: still alive `overdue_grace` after its lifetime.
    Overdue,
    /// Died without being asked: crash, exit before READY, or killed for
    /// breaking the status protocol.
    Crash,
    /// Of an older configuration generation.
    Reload,
    /// The master is stopping.
    Stop,
}

impl RetireReason {
    pub const ALL: [RetireReason; 8] = [
        RetireReason::MaxUse,
        RetireReason::Idle,
        RetireReason::Lifetime,
        RetireReason::Deadline,
        RetireReason::Overdue,
        RetireReason::Crash,
        RetireReason::Reload,
        RetireReason::Stop,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RetireReason::MaxUse => "max_use",
            RetireReason::Idle => "idle",
            RetireReason::Lifetime => "lifetime",
            RetireReason::Deadline => "deadline",
            RetireReason::Overdue => "overdue",
            RetireReason::Crash => "crash",
            RetireReason::Reload => "reload",
            RetireReason::Stop => "stop",
        }
    }
}

/// What `mortal status` shows a child doing: the master's scoreboard
/// phase, with a busy child past its lifetime shown as `overdue`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BoardState {
    Starting,
    Idle,
    Busy,
    Retiring,
    Overdue,
}

impl BoardState {
    /// Display order.
    pub const ALL: [BoardState; 5] =
        [BoardState::Starting, BoardState::Idle, BoardState::Busy, BoardState::Retiring, BoardState::Overdue];

    pub fn as_str(self) -> &'static str {
        match self {
            BoardState::Starting => "starting",
            BoardState::Idle => "idle",
            BoardState::Busy => "busy",
            BoardState::Retiring => "retiring",
            BoardState::Overdue => "overdue",
        }
    }
}

/// The reply to [`ControlRequest::Status`], one JSON document: the master,
/// each service with its counters, and every child. The master writes it,
/// `mortal status` reads it (and `--json` prints it as it came), and so
/// do the tests: all three use this one definition. Durations are whole
/// milliseconds (`_ms`), the READY latencies fractional ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusDoc {
    pub master: MasterDoc,
    pub services: Vec<ServiceDoc>,
    pub children: Vec<ChildDoc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MasterDoc {
    pub pid: u32,
    /// Configuration generation: 1 at start, one more per reload.
    pub generation: u64,
    pub uptime_ms: u64,
    /// A stop has begun.
    pub stopping: bool,
}

/// One service: a listener and its pool (or its single process).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceDoc {
    pub service: Service,
    /// `127.0.0.1:2525`, or a socket path.
    pub endpoint: String,
    pub process_limit: Option<u32>,
    /// Spawning paused by the crash throttle.
    pub throttled: bool,
    /// Short of spares with no room under `process_limit`.
    pub at_limit: bool,
    /// Children spawned.
    pub spawns: u64,
    /// Children gone, per reason; every reason is present.
    pub retired: BTreeMap<RetireReason, u64>,
    /// Clients answered `421 Service busy` by the master.
    pub overload_rejects: u64,
    /// fork+exec-to-READY times of its children.
    pub ready: ReadyDoc,
    /// Its children now, per state.
    pub children: StateCounts,
}

/// Children of one service per [`BoardState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StateCounts {
    pub starting: u64,
    pub idle: u64,
    pub busy: u64,
    pub retiring: u64,
    pub overdue: u64,
}

impl StateCounts {
    pub fn get(&self, state: BoardState) -> u64 {
        match state {
            BoardState::Starting => self.starting,
            BoardState::Idle => self.idle,
            BoardState::Busy => self.busy,
            BoardState::Retiring => self.retiring,
            BoardState::Overdue => self.overdue,
        }
    }

    pub fn add(&mut self, state: BoardState) {
        let n = match state {
            BoardState::Starting => &mut self.starting,
            BoardState::Idle => &mut self.idle,
            BoardState::Busy => &mut self.busy,
            BoardState::Retiring => &mut self.retiring,
            BoardState::Overdue => &mut self.overdue,
        };
        *n += 1;
    }
}

/// A service's fork+exec-to-READY times, in milliseconds: the cumulative
/// histogram over the master's life and exact quantiles of the latest
/// `window` children.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadyDoc {
    pub count: u64,
    pub sum_ms: f64,
    /// Cumulative, in order; the last bucket is `+Inf` (`le_ms: null`).
    pub buckets: Vec<ReadyBucket>,
    pub window: u64,
    pub latest: ReadyQuantiles,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReadyBucket {
    pub le_ms: Option<f64>,
    pub count: u64,
}

/// Quantiles of the latest READY times; `None` before the first READY.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct ReadyQuantiles {
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
}

impl ReadyQuantiles {
    /// The quantiles reported, in field order.
    pub const QUANTILES: [f64; 3] = [0.5, 0.9, 0.99];
}

/// One child.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildDoc {
    pub pid: u32,
    pub service: Service,
    /// Its service's endpoint (a service may have several listeners).
    pub endpoint: String,
    /// The configuration generation it was started with.
    pub generation: u64,
    pub state: BoardState,
    pub sessions: u32,
    pub age_ms: u64,
    /// Time in its current state.
    pub since_ms: u64,
    /// Its drawn lifetime; `None` when unlimited.
    pub lifetime_ms: Option<u64>,
}

impl StatusDoc {
    /// The entry of `service` on `endpoint`, or its first one when
    /// `endpoint` is `None`.
    pub fn service(&self, service: Service, endpoint: Option<&str>) -> Option<&ServiceDoc> {
        self.services.iter().find(|s| s.service == service && endpoint.is_none_or(|e| s.endpoint == e))
    }

    /// The children of `service`, on any endpoint.
    pub fn children_of(&self, service: Service) -> impl Iterator<Item = &ChildDoc> {
        self.children.iter().filter(move |c| c.service == service)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for state in [ChildState::Ready, ChildState::Busy, ChildState::Idle, ChildState::Retiring] {
            let r = StatusRecord { state, sessions: 70_000 };
            assert_eq!(StatusRecord::decode(&r.encode()), Some(r));
        }
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(StatusRecord::decode(&[0; 8]), None);
        assert_eq!(StatusRecord::decode(&[STATUS_MAGIC, 9, 0, 0, 0, 0, 0, 0]), None);
        assert_eq!(StatusRecord::decode(&[STATUS_MAGIC, 1, 1, 0, 0, 0, 0, 0]), None);
        assert_eq!(MasterCommand::decode(b'x'), None);
    }

    #[test]
    fn control_requests_round_trip_and_nothing_else_parses() {
        for r in [ControlRequest::Status, ControlRequest::Reload, ControlRequest::Stop] {
            assert_eq!(ControlRequest::parse(r.as_str().as_bytes()), Some(r));
            assert!(r.as_str().len() < CONTROL_REQUEST_MAX);
        }
        for bad in [&b"STATUS"[..], b"status ", b"", b"stop\r", b"reload now"] {
            assert_eq!(ControlRequest::parse(bad), None);
        }
    }

    #[test]
    fn status_document_round_trips_with_its_json_names() {
        let doc = StatusDoc {
            master: MasterDoc { pid: 7, generation: 1, uptime_ms: 5000, stopping: false },
            services: vec![ServiceDoc {
                service: Service::Smtpd,
                endpoint: "127.0.0.1:25".into(),
                process_limit: Some(4),
                throttled: false,
                at_limit: true,
                spawns: 9,
                retired: RetireReason::ALL.into_iter().map(|r| (r, u64::from(r == RetireReason::MaxUse) * 3)).collect(),
                overload_rejects: 2,
                ready: ReadyDoc {
                    count: 1,
                    sum_ms: 1.5,
                    buckets: vec![ReadyBucket { le_ms: Some(0.5), count: 0 }, ReadyBucket { le_ms: None, count: 1 }],
                    window: 1,
                    latest: ReadyQuantiles { p50: Some(1.5), p90: Some(1.5), p99: None },
                },
                children: StateCounts { idle: 1, busy: 2, overdue: 1, ..Default::default() },
            }],
            children: vec![ChildDoc {
                pid: 4242,
                service: Service::Smtpd,
                endpoint: "127.0.0.1:25".into(),
                generation: 1,
                state: BoardState::Overdue,
                sessions: 12,
                age_ms: 61_000,
                since_ms: 2_000,
                lifetime_ms: None,
            }],
        };
        let text = serde_json::to_string(&doc).unwrap();
        for part in [
            r#""master":{"pid":7,"generation":1,"uptime_ms":5000,"stopping":false}"#,
            r#""service":"smtpd","endpoint":"127.0.0.1:25","process_limit":4"#,
            r#""retired":{"max_use":3,"idle":0,"lifetime":0,"deadline":0,"overdue":0,"crash":0,"reload":0,"stop":0}"#,
            r#""buckets":[{"le_ms":0.5,"count":0},{"le_ms":null,"count":1}]"#,
            r#""latest":{"p50":1.5,"p90":1.5,"p99":null}"#,
            r#""children":{"starting":0,"idle":1,"busy":2,"retiring":0,"overdue":1}"#,
            r#""state":"overdue","sessions":12,"age_ms":61000,"since_ms":2000,"lifetime_ms":null"#,
        ] {
            assert!(text.contains(part), "{part} in {text}");
        }
        assert_eq!(serde_json::from_str::<StatusDoc>(&text).unwrap(), doc);
        assert_eq!(doc.service(Service::Smtpd, None).unwrap().children.get(BoardState::Busy), 2);
        assert!(doc.service(Service::Smtpd, Some("[::1]:25")).is_none());
        assert_eq!(doc.children_of(Service::Smtpd).count(), 1);
        for (i, r) in RetireReason::ALL.into_iter().enumerate() {
            assert_eq!(serde_json::to_string(&r).unwrap(), format!("\"{}\"", r.as_str()), "{i}");
        }
        for s in BoardState::ALL {
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{}\"", s.as_str()));
        }
    }
}
