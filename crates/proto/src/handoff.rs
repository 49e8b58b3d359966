//! handoff: how postscreen passes a client's connection to an smtpd child.
//!
//! postscreen opens one Unix stream connection per client to
//! [`crate::config::Config::smtpd_handoff_socket`], where idle smtpd
//! children wait as they wait on a TCP listener. It sends a [`Header`]
//! with the client's TCP socket attached (`SCM_RIGHTS`), then the octets
//! it read from the client after the greeting (the first command, perhaps
//! more: at most [`MAX_INPUT`]). smtpd answers one octet, [`ACK`], once it
//! holds the socket; postscreen then closes its copy. No answer within the
//! smtpd pool's `overload_wait` means every smtpd is busy, and postscreen
//! tells the client so itself.
//!
//! ```text
//! 0      2        3       4                 8                  12
//! | "PS" | version | flags | input length, BE | DNSBL score, BE | input ...
//! ```
//!
//! The score is postscreen's `[smtpd.dnsbl]` verdict when it screened the
//! client (`action = "drop"`: it refused listed clients itself), so smtpd
//! neither asks the lists again nor loses the allowlisting.

use thiserror::Error;

/// Octets before the input.
pub const HEADER_LEN: usize = 12;
/// Most client input passed along: a line of SMTP with room to spare
/// (RFC 5321 allows 512 octets a command; postscreen reads no more than
/// this before it passes the connection on).
pub const MAX_INPUT: usize = 4096;
/// smtpd's answer: it holds the socket.
pub const ACK: u8 = b'+';

const MAGIC: [u8; 2] = *b"PS";
const VERSION: u8 = 1;
/// The client has the whole greeting: smtpd must not send its own.
const GREETED: u8 = 1;
/// The DNSBL score field holds postscreen's screening.
const SCORED: u8 = 2;

/// What travels with a client's socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handoff {
    /// postscreen sent the whole `220` greeting.
    pub greeted: bool,
    /// The client's `[smtpd.dnsbl]` score, when postscreen screened it.
    pub dnsbl_score: Option<i32>,
    /// What the client sent after the greeting, to be read before the socket.
    pub input: Vec<u8>,
}

/// The fixed part, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub greeted: bool,
    pub dnsbl_score: Option<i32>,
    /// Octets of input that follow.
    pub input_len: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HandoffError {
    #[error("not a hand-off header")]
    BadMagic,
    #[error("hand-off version {0}, expected {VERSION}")]
    BadVersion(u8),
    #[error("unknown hand-off flags {0:#04x}")]
    UnknownFlags(u8),
    #[error("hand-off input of {0} octets, more than {MAX_INPUT}")]
    TooLong(usize),
}

impl Handoff {
    /// The header and input as one write; input beyond [`MAX_INPUT`] is
    /// the caller's error, refused here.
    pub fn encode(&self) -> Result<Vec<u8>, HandoffError> {
        if self.input.len() > MAX_INPUT {
            return Err(HandoffError::TooLong(self.input.len()));
        }
        let mut out = Vec::with_capacity(HEADER_LEN + self.input.len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        let greeted = if self.greeted { GREETED } else { 0 };
        out.push(greeted | if self.dnsbl_score.is_some() { SCORED } else { 0 });
        // MAX_INPUT fits in u32.
        out.extend_from_slice(&(self.input.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.dnsbl_score.unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&self.input);
        Ok(out)
    }
}

impl Header {
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, HandoffError> {
        if b[..2] != MAGIC {
            return Err(HandoffError::BadMagic);
        }
        if b[2] != VERSION {
            return Err(HandoffError::BadVersion(b[2]));
        }
        if b[3] & !(GREETED | SCORED) != 0 {
            return Err(HandoffError::UnknownFlags(b[3]));
        }
        let len = u32::from_be_bytes([b[4], b[5], b[6], b[7]]) as usize;
        if len > MAX_INPUT {
            return Err(HandoffError::TooLong(len));
        }
        let score = i32::from_be_bytes([b[8], b[9], b[10], b[11]]);
        Ok(Header { greeted: b[3] & GREETED != 0, dnsbl_score: (b[3] & SCORED != 0).then_some(score), input_len: len })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(bytes: &[u8]) -> [u8; HEADER_LEN] {
        bytes[..HEADER_LEN].try_into().unwrap()
    }

    #[test]
    fn round_trips_and_refuses_what_it_never_writes() {
        let h = Handoff { greeted: true, dnsbl_score: Some(-2), input: b"EHLO client.example\r\n".to_vec() };
        let wire = h.encode().unwrap();
        assert_eq!(&wire[..HEADER_LEN], b"PS\x01\x03\x00\x00\x00\x15\xff\xff\xff\xfe");
        let got = Header::decode(&header(&wire));
        assert_eq!(got, Ok(Header { greeted: true, dnsbl_score: Some(-2), input_len: 21 }));
        assert_eq!(&wire[HEADER_LEN..], b"EHLO client.example\r\n");
        let bare = Handoff { greeted: false, dnsbl_score: None, input: Vec::new() }.encode().unwrap();
        assert_eq!(Header::decode(&header(&bare)), Ok(Header { greeted: false, dnsbl_score: None, input_len: 0 }));
        assert_eq!(Header::decode(b"XS\x01\x01\0\0\0\0\0\0\0\0"), Err(HandoffError::BadMagic));
        assert_eq!(Header::decode(b"PS\x02\x01\0\0\0\0\0\0\0\0"), Err(HandoffError::BadVersion(2)));
        assert_eq!(Header::decode(b"PS\x01\x05\0\0\0\0\0\0\0\0"), Err(HandoffError::UnknownFlags(5)));
        assert_eq!(Header::decode(b"PS\x01\x01\0\0\x10\x01\0\0\0\0"), Err(HandoffError::TooLong(4097)));
        let long = Handoff { greeted: true, dnsbl_score: None, input: vec![b'a'; MAX_INPUT + 1] };
        assert_eq!(long.encode(), Err(HandoffError::TooLong(MAX_INPUT + 1)));
        assert!(Handoff { greeted: true, dnsbl_score: None, input: vec![b'a'; MAX_INPUT] }.encode().is_ok());
    }
}
