//! Child → master status records and master → child commands; and the
//! operator's control socket requests.
//!
//! Each child owns one Unix stream socket to the master (its stdout; the
//! same socket is its stdin, see `mortal_libmaster::child`). Records are a fixed
//! eight octets, so the master never parses anything variable from a child
//! that may be compromised, and a child can only ever speak for itself: the
//! master knows which pid sits at the other end of each socket.

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
}
