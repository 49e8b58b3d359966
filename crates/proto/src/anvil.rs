//! The anvil protocol: smtpd asks the anvil service for per-client counts.
//!
//! Like Postfix's `anvil(8)`, anvil only counts; smtpd compares the counts
//! with its limits and decides. Each smtpd session that is subject to the
//! limits opens one Unix stream connection to `private/anvil` and keeps it
//! for the whole SMTP session: **the open connection is the lease** that
//! anvil counts as one concurrent connection from the client's address. A
//! session that ends, and an smtpd that crashes or is killed, closes it,
//! so the concurrency count can never leak.
//!
//! Every record is fixed-size, so neither side ever parses anything of
//! variable length from the other:
//!
//! ```text
//! request (20 octets): magic 0xA7, version 1, op, family (4, 6 or 'L'), subject (16 octets)
//! reply   (12 octets): magic 0xA8, version 1, op, status, count (u32 BE), rate (u32 BE)
//! ```
//!
//! An IPv4 address fills the first 4 subject octets and the other 12 must
//! be zero; family `L` carries a [`LoginDigest`] (an AUTH login, counted
//! for itself wherever it connects from). The first request on a
//! connection is [`Op::Connect`], the others [`Op::Message`],
//! [`Op::AuthFailure`] or [`Op::AuthFailures`] for the same address, or
//! [`Op::UserMessage`] and [`Op::UserRecipient`] for a login
//! ([`Conversation`] enforces it). Each request gets exactly one reply,
//! in order: for `Connect`,
//! `count` is the client's open connections including this one and `rate`
//! its connections in the current `rate_time_unit`; for `Message`, `count`
//! is unchanged and `rate` counts the messages (MAIL commands) in the
//! current unit, this one included; for the login ops `count` is 0 and
//! `rate` the login's messages or recipients in its current unit.
//! [`Status::Untracked`] means anvil
//! could not keep an entry for the client (its table is full): the caller
//! must then apply no limit, since a rate limiter must never become the
//! reason mail is refused.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use thiserror::Error;

/// Octets in a request record.
pub const REQUEST_LEN: usize = 20;
/// Octets in a reply record.
pub const REPLY_LEN: usize = 12;
/// Protocol version carried in every record.
pub const ANVIL_VERSION: u8 = 1;
const REQUEST_MAGIC: u8 = 0xA7;
const REPLY_MAGIC: u8 = 0xA8;

/// What a request asks anvil to count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A new connection from the address: one more open connection (for as
    /// long as this anvil connection stays open) and one more in the rate.
    Connect,
    /// A new message (MAIL) from the address of this connection.
    Message,
    /// A failed AUTH from the address of this connection: `rate` counts
    /// the failures in the current unit, this one included.
    AuthFailure,
    /// How many AUTH failures the address has in the current unit
    /// (`rate`), counting nothing: asked before an AUTH starts.
    AuthFailures,
    /// A new message (MAIL) from a login: `rate` counts the login's
    /// messages in the current unit, this one included.
    UserMessage,
    /// A recipient (RCPT) from a login: `rate` counts its recipients.
    UserRecipient,
}

impl Op {
    fn code(self) -> u8 {
        match self {
            Op::Connect => 1,
            Op::Message => 2,
            Op::AuthFailure => 3,
            Op::AuthFailures => 4,
            Op::UserMessage => 5,
            Op::UserRecipient => 6,
        }
    }

    fn from_code(code: u8) -> Option<Op> {
        match code {
            1 => Some(Op::Connect),
            2 => Some(Op::Message),
            3 => Some(Op::AuthFailure),
            4 => Some(Op::AuthFailures),
            5 => Some(Op::UserMessage),
            6 => Some(Op::UserRecipient),
            _ => None,
        }
    }
}

/// What a count is kept for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subject {
    /// A client address (its network, as smtpd groups clients).
    Client(IpAddr),
    /// An AUTH login.
    Login(LoginDigest),
}

/// A login name as anvil counts it: 128 bits of its hash, so every record
/// stays fixed-size and anvil never holds a user name. Two logins with one
/// digest would share their counts; at 128 bits that does not happen.
/// smtpd and anvil come from one build, so they hash alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LoginDigest([u8; 16]);

impl LoginDigest {
    /// The digest of `username`, as Dovecot confirmed it (exact octets).
    pub fn of(username: &str) -> LoginDigest {
        use std::hash::{Hash, Hasher};
        let half = |salt: &str| {
            let mut h = std::hash::DefaultHasher::new();
            (salt, username).hash(&mut h);
            h.finish().to_be_bytes()
        };
        let mut octets = [0u8; 16];
        octets[..8].copy_from_slice(&half("mortal anvil login 1"));
        octets[8..].copy_from_slice(&half("mortal anvil login 2"));
        LoginDigest(octets)
    }
}

/// Family octet of a login subject.
const FAMILY_LOGIN: u8 = b'L';

/// One request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnvilRequest {
    pub op: Op,
    pub subject: Subject,
}

/// Whether anvil counted the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Counted,
    /// No entry could be kept for the client: apply no limit.
    Untracked,
}

/// One reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnvilReply {
    pub op: Op,
    pub status: Status,
    /// Open connections from the client, including the asking one.
    pub count: u32,
    /// Connections (`Connect`) or messages (`Message`) in the current unit.
    pub rate: u32,
}

/// Why a record was refused. Any error ends the conversation.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AnvilError {
    #[error("bad magic octet {0:#04x}")]
    Magic(u8),
    #[error("unsupported anvil protocol version {0}")]
    Version(u8),
    #[error("unknown operation {0}")]
    Op(u8),
    #[error("unknown address family {0}")]
    Family(u8),
    #[error("nonzero padding after an IPv4 address")]
    Padding,
    #[error("unknown status {0}")]
    Status(u8),
    #[error("first request is not Connect")]
    NotConnected,
    #[error("second Connect on one connection")]
    Reconnect,
    #[error("request for {got}, but the connection is for {leased}")]
    OtherAddress { leased: IpAddr, got: IpAddr },
    #[error("{0:?} for the wrong kind of subject")]
    WrongSubject(Op),
}

impl AnvilRequest {
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        out[0] = REQUEST_MAGIC;
        out[1] = ANVIL_VERSION;
        out[2] = self.op.code();
        // Stored in canonical form, so `::ffff:a.b.c.d` and `a.b.c.d` are
        // one client.
        match self.subject {
            Subject::Client(addr) => match addr.to_canonical() {
                IpAddr::V4(a) => {
                    out[3] = 4;
                    out[4..8].copy_from_slice(&a.octets());
                }
                IpAddr::V6(a) => {
                    out[3] = 6;
                    out[4..20].copy_from_slice(&a.octets());
                }
            },
            Subject::Login(LoginDigest(octets)) => {
                out[3] = FAMILY_LOGIN;
                out[4..20].copy_from_slice(&octets);
            }
        }
        out
    }

    pub fn decode(b: &[u8; REQUEST_LEN]) -> Result<AnvilRequest, AnvilError> {
        header(b, REQUEST_MAGIC)?;
        let op = Op::from_code(b[2]).ok_or(AnvilError::Op(b[2]))?;
        let mut octets = [0u8; 16];
        octets.copy_from_slice(&b[4..20]);
        let subject = match b[3] {
            4 if b[8..].iter().all(|&x| x == 0) => Subject::Client(IpAddr::V4(Ipv4Addr::new(b[4], b[5], b[6], b[7]))),
            4 => return Err(AnvilError::Padding),
            6 => Subject::Client(IpAddr::V6(Ipv6Addr::from(octets)).to_canonical()),
            FAMILY_LOGIN => Subject::Login(LoginDigest(octets)),
            f => return Err(AnvilError::Family(f)),
        };
        Ok(AnvilRequest { op, subject })
    }
}

impl AnvilReply {
    pub fn encode(&self) -> [u8; REPLY_LEN] {
        let mut out = [0u8; REPLY_LEN];
        out[0] = REPLY_MAGIC;
        out[1] = ANVIL_VERSION;
        out[2] = self.op.code();
        out[3] = match self.status {
            Status::Counted => 0,
            Status::Untracked => 1,
        };
        out[4..8].copy_from_slice(&self.count.to_be_bytes());
        out[8..12].copy_from_slice(&self.rate.to_be_bytes());
        out
    }

    pub fn decode(b: &[u8; REPLY_LEN]) -> Result<AnvilReply, AnvilError> {
        header(b, REPLY_MAGIC)?;
        let op = Op::from_code(b[2]).ok_or(AnvilError::Op(b[2]))?;
        let status = match b[3] {
            0 => Status::Counted,
            1 => Status::Untracked,
            s => return Err(AnvilError::Status(s)),
        };
        let count = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
        let rate = u32::from_be_bytes([b[8], b[9], b[10], b[11]]);
        Ok(AnvilReply { op, status, count, rate })
    }
}

fn header(b: &[u8], magic: u8) -> Result<(), AnvilError> {
    if b[0] != magic {
        return Err(AnvilError::Magic(b[0]));
    }
    if b[1] != ANVIL_VERSION {
        return Err(AnvilError::Version(b[1]));
    }
    Ok(())
}

/// The order rule of one anvil connection, as anvil checks it.
#[derive(Debug, Clone, Default)]
pub struct Conversation {
    leased: Option<IpAddr>,
}

impl Conversation {
    /// Accepts `req` as the next request, or says which rule it breaks.
    pub fn advance(&mut self, req: &AnvilRequest) -> Result<(), AnvilError> {
        let Some(leased) = self.leased else {
            return match (req.op, req.subject) {
                (Op::Connect, Subject::Client(addr)) => {
                    self.leased = Some(addr);
                    Ok(())
                }
                (Op::Connect, Subject::Login(_)) => Err(AnvilError::WrongSubject(Op::Connect)),
                _ => Err(AnvilError::NotConnected),
            };
        };
        match (req.op, req.subject) {
            (Op::Connect, _) => Err(AnvilError::Reconnect),
            (Op::UserMessage | Op::UserRecipient, Subject::Login(_)) => Ok(()),
            (op @ (Op::UserMessage | Op::UserRecipient), Subject::Client(_)) => Err(AnvilError::WrongSubject(op)),
            (_, Subject::Client(addr)) if addr == leased => Ok(()),
            (_, Subject::Client(got)) => Err(AnvilError::OtherAddress { leased, got }),
            (op, Subject::Login(_)) => Err(AnvilError::WrongSubject(op)),
        }
    }

    /// The client address this connection holds a lease for.
    pub fn leased(&self) -> Option<IpAddr> {
        self.leased
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn client(s: &str) -> Subject {
        Subject::Client(ip(s))
    }

    #[test]
    fn requests_round_trip_in_canonical_form() {
        for (op, addr, canonical) in [
            (Op::Connect, "192.0.2.1", "192.0.2.1"),
            (Op::Message, "2001:db8::25", "2001:db8::25"),
            (Op::Connect, "::ffff:192.0.2.9", "192.0.2.9"),
            (Op::Connect, "::1", "::1"),
            (Op::AuthFailure, "192.0.2.7", "192.0.2.7"),
            (Op::AuthFailures, "2001:db8::7", "2001:db8::7"),
        ] {
            let bytes = AnvilRequest { op, subject: client(addr) }.encode();
            assert_eq!(AnvilRequest::decode(&bytes), Ok(AnvilRequest { op, subject: client(canonical) }));
        }
        for op in [Op::UserMessage, Op::UserRecipient] {
            let subject = Subject::Login(LoginDigest::of("alice@example.test"));
            let bytes = AnvilRequest { op, subject }.encode();
            assert_eq!(AnvilRequest::decode(&bytes), Ok(AnvilRequest { op, subject }));
        }
    }

    #[test]
    fn replies_round_trip() {
        for reply in [
            AnvilReply { op: Op::Connect, status: Status::Counted, count: 3, rate: 70_000 },
            AnvilReply { op: Op::Message, status: Status::Untracked, count: 0, rate: u32::MAX },
        ] {
            assert_eq!(AnvilReply::decode(&reply.encode()), Ok(reply));
        }
    }

    #[test]
    fn malformed_records_are_refused() {
        let good = AnvilRequest { op: Op::Connect, subject: client("192.0.2.1") }.encode();
        let cases: [(usize, u8, AnvilError); 6] = [
            (0, 0x00, AnvilError::Magic(0)),
            (1, 2, AnvilError::Version(2)),
            (2, 0, AnvilError::Op(0)),
            (2, 7, AnvilError::Op(7)),
            (3, 5, AnvilError::Family(5)),
            (19, 1, AnvilError::Padding),
        ];
        for (at, value, err) in cases {
            let mut bad = good;
            bad[at] = value;
            assert_eq!(AnvilRequest::decode(&bad), Err(err), "octet {at} = {value}");
        }
        let mut reply = AnvilReply { op: Op::Connect, status: Status::Counted, count: 1, rate: 1 }.encode();
        reply[3] = 7;
        assert_eq!(AnvilReply::decode(&reply), Err(AnvilError::Status(7)));
        // A request is not a reply.
        assert_eq!(AnvilReply::decode(good[..REPLY_LEN].try_into().unwrap()), Err(AnvilError::Magic(0xA7)));
    }

    #[test]
    fn conversation_order() {
        let connect = |a: &str| AnvilRequest { op: Op::Connect, subject: client(a) };
        let message = |a: &str| AnvilRequest { op: Op::Message, subject: client(a) };
        let mut c = Conversation::default();
        assert_eq!(c.advance(&message("192.0.2.1")), Err(AnvilError::NotConnected));
        assert_eq!(c.advance(&connect("192.0.2.1")), Ok(()));
        assert_eq!(c.leased(), Some(ip("192.0.2.1")));
        assert_eq!(c.advance(&message("192.0.2.1")), Ok(()));
        assert_eq!(c.advance(&message("192.0.2.1")), Ok(()));
        for op in [Op::AuthFailures, Op::AuthFailure] {
            assert_eq!(c.advance(&AnvilRequest { op, subject: client("192.0.2.1") }), Ok(()));
            let other = AnvilRequest { op, subject: client("192.0.2.3") };
            assert_eq!(
                c.advance(&other),
                Err(AnvilError::OtherAddress { leased: ip("192.0.2.1"), got: ip("192.0.2.3") })
            );
        }
        assert_eq!(
            c.advance(&message("192.0.2.2")),
            Err(AnvilError::OtherAddress { leased: ip("192.0.2.1"), got: ip("192.0.2.2") })
        );
        assert_eq!(c.advance(&connect("192.0.2.1")), Err(AnvilError::Reconnect));
        // Login counts go with any lease, and only for logins.
        let login = Subject::Login(LoginDigest::of("alice"));
        assert_eq!(c.advance(&AnvilRequest { op: Op::UserMessage, subject: login }), Ok(()));
        assert_eq!(c.advance(&AnvilRequest { op: Op::UserRecipient, subject: login }), Ok(()));
        assert_eq!(
            c.advance(&AnvilRequest { op: Op::UserMessage, subject: client("192.0.2.1") }),
            Err(AnvilError::WrongSubject(Op::UserMessage))
        );
        assert_eq!(
            c.advance(&AnvilRequest { op: Op::Message, subject: login }),
            Err(AnvilError::WrongSubject(Op::Message))
        );
        let mut fresh = Conversation::default();
        assert_eq!(fresh.advance(&AnvilRequest { op: Op::UserMessage, subject: login }), Err(AnvilError::NotConnected));
        assert_eq!(
            fresh.advance(&AnvilRequest { op: Op::Connect, subject: login }),
            Err(AnvilError::WrongSubject(Op::Connect))
        );
        // Distinct logins, distinct digests; one login, one digest.
        assert_ne!(LoginDigest::of("alice"), LoginDigest::of("Alice"));
        assert_eq!(LoginDigest::of("alice"), LoginDigest::of("alice"));
    }
}
