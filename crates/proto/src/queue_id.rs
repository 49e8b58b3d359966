//! Queue ids: unique across restarts, sortable by arrival.
//!
//! An id is 20 upper-case hex digits: 9 for the arrival second, 5 for the
//! microsecond and 6 for the pid of the process that made it (cleanup, or
//! the queue manager for the DSNs it writes). Two such processes never share
//! a pid at the same instant, and one process makes ids one at a time (it
//! also creates the file with `O_EXCL`), so ids never collide; fixed width
//! makes string order equal arrival order. The upper-case hex shape also
//! matches what Postfix log parsers expect of a queue id (`[0-9A-F]+`).
//!
//! A [`QueueId`] is valid by construction: it is made either by
//! [`QueueId::new`] or by parsing ([`QueueId::parse`], [`FromStr`]), which
//! accepts nothing but that shape. Every path under the spool is built from
//! one, so a name read from the network, a file or a command line can never
//! name another file.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use thiserror::Error;

/// Characters in a queue id.
pub const QUEUE_ID_LEN: usize = 20;
/// Hex digits of the arrival second.
const SECS_DIGITS: usize = 9;
/// Hex digits of the arrival microsecond.
const MICROS_DIGITS: usize = 5;
/// Where the writer's pid starts.
const PID_START: usize = SECS_DIGITS + MICROS_DIGITS;

/// A text that is not a queue id.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{0:?} is not a queue id ({QUEUE_ID_LEN} upper-case hex digits)")]
pub struct BadQueueId(pub String);

/// One message's name in the spool and in the logs.
///
/// Ordering is arrival order (then the writer's pid), which is also the
/// order of the text form.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QueueId([u8; QUEUE_ID_LEN]);

impl QueueId {
    /// The id of a message arriving at `now`, made by process `pid`.
    /// The second is kept modulo 16⁹ and the pid modulo 16⁶ (the widths
    /// of their fields).
    pub fn new(now: SystemTime, pid: u32) -> Self {
        let since = now.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        let text =
            format!("{:09X}{:05X}{:06X}", since.as_secs() & 0xF_FFFF_FFFF, since.subsec_micros(), pid & 0xFF_FFFF);
        let mut bytes = [0; QUEUE_ID_LEN];
        bytes.copy_from_slice(text.as_bytes());
        Self(bytes)
    }

    /// Reads an id: exactly [`QUEUE_ID_LEN`] upper-case hex digits,
    /// nothing else.
    pub fn parse(s: &str) -> Result<Self, BadQueueId> {
        let bytes: [u8; QUEUE_ID_LEN] = s.as_bytes().try_into().map_err(|_| BadQueueId(s.to_owned()))?;
        if bytes.iter().all(|b| matches!(b, b'0'..=b'9' | b'A'..=b'F')) {
            Ok(Self(bytes))
        } else {
            Err(BadQueueId(s.to_owned()))
        }
    }

    /// The text form, as in file names and logs.
    pub fn as_str(&self) -> &str {
        // Only hex digits are ever stored (see `new` and `parse`).
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// The arrival time encoded in the id, to the microsecond.
    pub fn arrival(&self) -> SystemTime {
        let secs = self.field(0, SECS_DIGITS);
        let micros = self.field(SECS_DIGITS, PID_START);
        UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros)
    }

    /// The pid of the process that made the id (and wrote the file).
    pub fn pid(&self) -> u32 {
        // Six hex digits always fit.
        u32::try_from(self.field(PID_START, QUEUE_ID_LEN)).unwrap_or(u32::MAX)
    }

    fn field(&self, from: usize, to: usize) -> u64 {
        // Hex digits by construction, at most 9 of them: always in range.
        u64::from_str_radix(&self.as_str()[from..to], 16).unwrap_or(0)
    }
}

impl FromStr for QueueId {
    type Err = BadQueueId;

    fn from_str(s: &str) -> Result<Self, BadQueueId> {
        Self::parse(s)
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "QueueId({})", self.as_str())
    }
}

impl AsRef<str> for QueueId {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<std::path::Path> for QueueId {
    fn as_ref(&self) -> &std::path::Path {
        std::path::Path::new(self.as_str())
    }
}

impl PartialEq<str> for QueueId {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for QueueId {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// Serialised as its text form (`mortal queue list --json`).
impl serde::Serialize for QueueId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Read from its text form, with [`QueueId::parse`]'s rules.
impl<'de> serde::Deserialize<'de> for QueueId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_only_the_shape() {
        let table: &[(&str, bool)] = &[
            ("0000000010000100000A", true),
            ("06B0A7052D82A9C11000", true),
            ("FFFFFFFFFFFFFFFFFFFF", true),
            // lower case
            ("06b0a7052d82a9c11000", false),
            ("06B0A7052D82A9C1100a", false),
            // short, long, empty
            ("06B0A7052D82A9C1100", false),
            ("06B0A7052D82A9C110000", false),
            ("", false),
            // not hex
            ("06B0A7052D82A9C1100G", false),
            ("06B0A7052D82A9C1100-", false),
            (" 06B0A7052D82A9C1100", false),
            ("06B0A7052D82A9C1100\n", false),
            // path tricks, some of the right length
            ("../../etc/passwd", false),
            ("../../../etc/shadow1", false),
            ("/0000000010000100000", false),
            ("0000000010000100000A/..", false),
            ("0000000010000100000A.tmp", false),
            ("0000000010000100000\0", false),
            // multi-byte text of 20 octets
            ("ÄÄÄÄÄÄÄÄÄÄ", false),
        ];
        for &(text, valid) in table {
            let parsed = QueueId::parse(text);
            assert_eq!(parsed.is_ok(), valid, "{text:?}");
            assert_eq!(text.parse::<QueueId>().is_ok(), valid, "{text:?} via FromStr");
            if let Ok(id) = parsed {
                assert_eq!(id.as_str(), text, "text form round-trips");
                assert_eq!(id.to_string(), text);
            } else {
                assert_eq!(parsed, Err(BadQueueId(text.to_owned())));
            }
        }
    }

    #[test]
    fn fields_round_trip() {
        let t = UNIX_EPOCH + Duration::new(1_800_000_000, 123_456_000);
        let id = QueueId::new(t, 0xC11_000);
        assert_eq!(id.as_str(), "06B49D2001E240C11000");
        assert_eq!(id.arrival(), t);
        assert_eq!(id.pid(), 0xC11_000);
        assert_eq!(QueueId::parse(id.as_str()), Ok(id));
        // Wider than the fields: kept modulo their width, still an id.
        let wide = QueueId::new(t, 0x1234_5678);
        assert_eq!(wide.pid(), 0x34_5678);
        assert_eq!(QueueId::parse("0000000010000100000A").unwrap().arrival(), UNIX_EPOCH + Duration::new(1, 1000));
    }

    #[test]
    fn order_is_arrival_order() {
        let t1 = UNIX_EPOCH + Duration::new(1_800_000_000, 5_000);
        let later = [t1 + Duration::from_micros(1), t1 + Duration::from_secs(1), t1 + Duration::from_secs(1 << 20)];
        // A high pid earlier still sorts before a low pid later.
        let first = QueueId::new(t1, 0xFF_FFFF);
        for t in later {
            let next = QueueId::new(t, 1);
            assert!(first < next, "{first} sorts before {next}");
            assert!(first.as_str() < next.as_str(), "text order agrees");
        }
        // Same microsecond: the pid decides, deterministically.
        assert!(QueueId::new(t1, 1) < QueueId::new(t1, 2));
    }

    #[test]
    fn serde_uses_the_text_form() {
        let id = QueueId::parse("06B0A7052D82A9C11000").unwrap();
        let toml = toml::Value::try_from(id).unwrap();
        assert_eq!(toml.as_str(), Some("06B0A7052D82A9C11000"));
        let back: QueueId = toml.try_into().unwrap();
        assert_eq!(back, id);
        assert!(toml::Value::String("../x".into()).try_into::<QueueId>().is_err());
    }
}
