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
//! 0      2        3       4                 8
//! | "PS" | version | flags | input length, BE | input ...
//! ```

use thiserror::Error;

/// Octets before the input.
pub const HEADER_LEN: usize = 8;
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

/// What travels with a client's socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handoff {
    /// postscreen sent the whole `220` greeting.
    pub greeted: bool,
    /// What the client sent after the greeting, to be read before the socket.
    pub input: Vec<u8>,
}

/// The fixed part, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub greeted: bool,
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
        out.push(if self.greeted { GREETED } else { 0 });
        // MAX_INPUT fits in u32.
        out.extend_from_slice(&(self.input.len() as u32).to_be_bytes());
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
        if b[3] & !GREETED != 0 {
            return Err(HandoffError::UnknownFlags(b[3]));
        }
        let len = u32::from_be_bytes([b[4], b[5], b[6], b[7]]) as usize;
        if len > MAX_INPUT {
            return Err(HandoffError::TooLong(len));
        }
        Ok(Header { greeted: b[3] & GREETED != 0, input_len: len })
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
        let h = Handoff { greeted: true, input: b"EHLO client.example\r\n".to_vec() };
        let wire = h.encode().unwrap();
        assert_eq!(&wire[..HEADER_LEN], b"PS\x01\x01\x00\x00\x00\x15");
        assert_eq!(Header::decode(&header(&wire)), Ok(Header { greeted: true, input_len: 21 }));
        assert_eq!(&wire[HEADER_LEN..], b"EHLO client.example\r\n");
        let bare = Handoff { greeted: false, input: Vec::new() }.encode().unwrap();
        assert_eq!(Header::decode(&header(&bare)), Ok(Header { greeted: false, input_len: 0 }));
        assert_eq!(Header::decode(b"XS\x01\x01\0\0\0\0"), Err(HandoffError::BadMagic));
        assert_eq!(Header::decode(b"PS\x02\x01\0\0\0\0"), Err(HandoffError::BadVersion(2)));
        assert_eq!(Header::decode(b"PS\x01\x03\0\0\0\0"), Err(HandoffError::UnknownFlags(3)));
        assert_eq!(Header::decode(b"PS\x01\x01\0\0\x10\x01"), Err(HandoffError::TooLong(4097)));
        let long = Handoff { greeted: true, input: vec![b'a'; MAX_INPUT + 1] };
        assert_eq!(long.encode(), Err(HandoffError::TooLong(MAX_INPUT + 1)));
        assert!(Handoff { greeted: true, input: vec![b'a'; MAX_INPUT] }.encode().is_ok());
    }
}
