//! Child → master status records and master → child commands.
//!
//! Each child owns one Unix stream socket to the master (its stdout; the
//! same socket is its stdin, see `mortal_master::child`). Records are a fixed
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
}
