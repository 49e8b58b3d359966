//! The queue file: one message with its envelope, as cleanup writes it and
//! queue reads it. Documented for operators in `docs/queue-format.md`.
//!
//! ```text
//! magic "MORTALQ\0"
//! V  version            u32
//! I  queue id           str
//! T  arrival            u64 microseconds since the Unix epoch
//! C  client             str addr, str name, str helo, str protocol
//! S  sender             str address, u8 body (7|8), u8 smtputf8 (0|1)
//! R  recipient  x N>=1  u8 state (0 pending, 1 delivered, 2 failed), str address
//! M  content    x N>=0  raw message bytes, at most 64 KiB a record
//! Z  end                u32 CRC-32 of every byte before this record
//! ```
//!
//! Content comes in chunks so a writer can stream it, and the end record's
//! checksum covers everything, so a torn write, a truncation or a flipped bit
//! is detected and the file goes to `corrupt/` instead of being delivered
//! half. The reader is strict about order and accepts nothing after `Z`.

use crate::address::MAX_PATH;
use crate::ipc::{BodyType, ClientInfo, MAX_TEXT_FIELD, SenderInfo};
use crate::queue_id;
use crate::record::{FieldReader, Fields, FrameError, put_record, take_record};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use thiserror::Error;

/// First octets of every queue file.
pub const MAGIC: &[u8; 8] = b"MORTALQ\0";
/// Format version written by this build.
pub const VERSION: u32 = 1;
/// Largest content chunk in one `M` record.
pub const MAX_CONTENT_CHUNK: usize = 64 * 1024;

/// Delivery state of one recipient, persisted so a partial delivery is
/// never repeated for the recipients already done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecipientState {
    Pending,
    Delivered,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedRecipient {
    pub address: String,
    pub state: RecipientState,
}

/// Everything a queue file says, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueFile {
    pub id: String,
    pub arrival: SystemTime,
    pub client: ClientInfo,
    pub sender: SenderInfo,
    pub recipients: Vec<QueuedRecipient>,
    pub content: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum QueueFileError {
    #[error("not a mortal queue file (bad magic)")]
    BadMagic,
    #[error("unsupported queue file version {0}")]
    Version(u32),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("file ends before the end record")]
    Truncated,
    #[error("record {got:?} where {expected} was expected")]
    OutOfOrder { got: char, expected: &'static str },
    #[error("invalid value in record {0:?}")]
    BadValue(char),
    #[error("checksum mismatch: file says {stored:08x}, content gives {computed:08x}")]
    Checksum { stored: u32, computed: u32 },
    #[error("{0} bytes after the end record")]
    TrailingData(usize),
}

/// Streaming encoder: returns the bytes to append for each part, keeping the
/// running checksum. `cleanup` writes them to its temporary file as they come.
#[derive(Debug)]
pub struct Encoder {
    crc: crc32fast::Hasher,
}

impl Encoder {
    /// Starts a file: magic and every envelope record.
    pub fn start(
        id: &str,
        arrival: SystemTime,
        client: &ClientInfo,
        sender: &SenderInfo,
        recipients: &[QueuedRecipient],
    ) -> (Self, Vec<u8>) {
        let mut out = MAGIC.to_vec();
        put_record(&mut out, b'V', &Fields::new().u32(VERSION).finish());
        put_record(&mut out, b'I', &Fields::new().str(id).finish());
        let micros = arrival.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_micros();
        put_record(&mut out, b'T', &Fields::new().u64(u64::try_from(micros).unwrap_or(u64::MAX)).finish());
        put_record(
            &mut out,
            b'C',
            &Fields::new().str(&client.addr).str(&client.name).str(&client.helo).str(&client.protocol).finish(),
        );
        let body = match sender.body {
            BodyType::SevenBit => 7,
            BodyType::EightBitMime => 8,
        };
        put_record(&mut out, b'S', &Fields::new().str(&sender.address).u8(body).u8(u8::from(sender.smtputf8)).finish());
        for r in recipients {
            put_record(&mut out, b'R', &recipient_payload(r));
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(&out);
        (Self { crc }, out)
    }

    /// Encodes content, split into records of at most [`MAX_CONTENT_CHUNK`].
    pub fn content(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(bytes.len() + bytes.len() / MAX_CONTENT_CHUNK * 5 + 5);
        for chunk in bytes.chunks(MAX_CONTENT_CHUNK) {
            put_record(&mut out, b'M', chunk);
        }
        self.crc.update(&out);
        out
    }

    /// The end record, sealing everything before it.
    pub fn finish(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(9);
        put_record(&mut out, b'Z', &self.crc.finalize().to_be_bytes());
        out
    }
}

fn recipient_payload(r: &QueuedRecipient) -> Vec<u8> {
    let state = match r.state {
        RecipientState::Pending => 0,
        RecipientState::Delivered => 1,
        RecipientState::Failed => 2,
    };
    Fields::new().u8(state).str(&r.address).finish()
}

impl QueueFile {
    /// Encodes the whole file at once (queue uses it to rewrite state).
    pub fn encode(&self) -> Vec<u8> {
        let (mut enc, mut out) = Encoder::start(&self.id, self.arrival, &self.client, &self.sender, &self.recipients);
        out.extend(enc.content(&self.content));
        out.extend(enc.finish());
        out
    }

    /// Decodes and verifies a complete file.
    pub fn decode(bytes: &[u8]) -> Result<Self, QueueFileError> {
        if !bytes.starts_with(MAGIC) {
            return Err(QueueFileError::BadMagic);
        }
        let mut pos = MAGIC.len();
        // Each call yields (type, payload, offset of the record's first byte).
        let mut next = || -> Result<(u8, &[u8], usize), QueueFileError> {
            let (rec, used) = take_record(&bytes[pos..], MAX_CONTENT_CHUNK)?.ok_or(QueueFileError::Truncated)?;
            let start = pos;
            pos += used;
            Ok((rec.kind, rec.payload, start))
        };
        let expect = |kind: u8, want: u8, expected: &'static str| {
            if kind == want { Ok(()) } else { Err(QueueFileError::OutOfOrder { got: kind as char, expected }) }
        };

        let (k, p, _) = next()?;
        expect(k, b'V', "V (version)")?;
        let mut f = FieldReader::new(p);
        let version = f.u32()?;
        f.finish()?;
        if version != VERSION {
            return Err(QueueFileError::Version(version));
        }

        let (k, p, _) = next()?;
        expect(k, b'I', "I (queue id)")?;
        let mut f = FieldReader::new(p);
        let id = f.str(MAX_TEXT_FIELD)?.to_owned();
        f.finish()?;
        if !queue_id::is_valid(&id) {
            return Err(QueueFileError::BadValue('I'));
        }

        let (k, p, _) = next()?;
        expect(k, b'T', "T (arrival)")?;
        let mut f = FieldReader::new(p);
        let arrival = UNIX_EPOCH + Duration::from_micros(f.u64()?);
        f.finish()?;

        let (k, p, _) = next()?;
        expect(k, b'C', "C (client)")?;
        let mut f = FieldReader::new(p);
        let client = ClientInfo {
            addr: f.str(MAX_TEXT_FIELD)?.to_owned(),
            name: f.str(MAX_TEXT_FIELD)?.to_owned(),
            helo: f.str(MAX_TEXT_FIELD)?.to_owned(),
            protocol: f.str(MAX_TEXT_FIELD)?.to_owned(),
        };
        f.finish()?;

        let (k, p, _) = next()?;
        expect(k, b'S', "S (sender)")?;
        let mut f = FieldReader::new(p);
        let address = f.str(MAX_PATH)?.to_owned();
        let body = match f.u8()? {
            7 => BodyType::SevenBit,
            8 => BodyType::EightBitMime,
            _ => return Err(QueueFileError::BadValue('S')),
        };
        let smtputf8 = match f.u8()? {
            0 => false,
            1 => true,
            _ => return Err(QueueFileError::BadValue('S')),
        };
        f.finish()?;
        let sender = SenderInfo { address, body, smtputf8 };

        let mut recipients = Vec::new();
        let mut content = Vec::new();
        loop {
            let (k, p, start) = next()?;
            match k {
                b'R' if content.is_empty() => {
                    let mut f = FieldReader::new(p);
                    let state = match f.u8()? {
                        0 => RecipientState::Pending,
                        1 => RecipientState::Delivered,
                        2 => RecipientState::Failed,
                        _ => return Err(QueueFileError::BadValue('R')),
                    };
                    let address = f.str(MAX_PATH)?.to_owned();
                    f.finish()?;
                    recipients.push(QueuedRecipient { address, state });
                }
                b'M' if !recipients.is_empty() => content.extend_from_slice(p),
                b'Z' if !recipients.is_empty() => {
                    let stored: [u8; 4] = p.try_into().map_err(|_| QueueFileError::BadValue('Z'))?;
                    let stored = u32::from_be_bytes(stored);
                    let computed = crc32fast::hash(&bytes[..start]);
                    if stored != computed {
                        return Err(QueueFileError::Checksum { stored, computed });
                    }
                    let end = start + 9;
                    if end != bytes.len() {
                        return Err(QueueFileError::TrailingData(bytes.len() - end));
                    }
                    break;
                }
                other => {
                    let expected = if recipients.is_empty() { "R (recipient)" } else { "M or Z" };
                    return Err(QueueFileError::OutOfOrder { got: other as char, expected });
                }
            }
        }
        Ok(QueueFile { id, arrival, client, sender, recipients, content })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> QueueFile {
        QueueFile {
            id: "0000000010000100000A".into(),
            arrival: UNIX_EPOCH + Duration::from_micros(1_800_000_000_123_456),
            client: ClientInfo {
                addr: "127.0.0.1".into(),
                name: "localhost".into(),
                helo: "client.test".into(),
                protocol: "ESMTP".into(),
            },
            sender: SenderInfo { address: "a@example.test".into(), body: BodyType::SevenBit, smtputf8: false },
            recipients: vec![
                QueuedRecipient { address: "b@example.test".into(), state: RecipientState::Pending },
                QueuedRecipient { address: "c@example.test".into(), state: RecipientState::Delivered },
            ],
            content: (0..200_000u32).map(|i| (i % 251) as u8).collect(),
        }
    }

    #[test]
    fn round_trip() {
        let q = sample();
        assert_eq!(QueueFile::decode(&q.encode()).unwrap(), q);
    }

    #[test]
    fn every_truncation_detected() {
        let bytes = sample().encode();
        for cut in (0..bytes.len()).step_by(997).chain(bytes.len() - 9..bytes.len()) {
            assert!(QueueFile::decode(&bytes[..cut]).is_err(), "truncated at {cut} accepted");
        }
    }

    #[test]
    fn every_flipped_byte_detected() {
        let bytes = sample().encode();
        // Every envelope byte and a sample of content bytes.
        for i in (0..300).chain((300..bytes.len()).step_by(1013)) {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(QueueFile::decode(&b).is_err(), "flip at {i} accepted");
        }
    }

    #[test]
    fn trailing_and_foreign_rejected() {
        let mut bytes = sample().encode();
        bytes.push(0);
        assert_eq!(QueueFile::decode(&bytes), Err(QueueFileError::TrailingData(1)));
        assert_eq!(QueueFile::decode(b"From alice Mon Jan 1"), Err(QueueFileError::BadMagic));
    }
}
