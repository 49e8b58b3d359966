//! The queue file: one message with its envelope, as cleanup writes it and
//! queue reads it. Documented for operators in `docs/queue-format.md`.
//!
//! ```text
//! magic "MORTALQ\0"
//! V  version            u32
//! I  queue id           str
//! T  arrival            u64 microseconds since the Unix epoch
//! C  client             str addr, str name, str helo, str protocol, str tls
//! S  sender             str address, u8 body (7|8|9), u8 smtputf8 (0|1),
//!                       u8 ret (0 none, 1 FULL, 2 HDRS), str envid
//! R  recipient  x N>=1  u8 state (0 pending, 1 delivered, 2 failed),
//!                       str address, u8 notify (bits: 1 NEVER, 2 SUCCESS,
//!                       4 FAILURE, 8 DELAY), str orcpt, str last status
//! M  content    x N>=0  raw message bytes, at most 64 KiB a record
//! Z  end                u32 CRC-32 of every byte before this record
//! ```
//!
//! Content comes in chunks so a writer can stream it, and the end record's
//! checksum covers everything, so a torn write, a truncation or a flipped bit
//! is detected and the file goes to `corrupt/` instead of being delivered
//! half. The reader is strict about order and accepts nothing after `Z`.

use crate::address::MAX_PATH;
use crate::ipc::{
    ClientInfo, IpcError, MAX_TEXT_FIELD, Notify, RecipientInfo, SenderInfo, decode_client, decode_sender,
    encode_client, encode_sender,
};
use crate::queue_id::QueueId;
use crate::record::{FieldReader, Fields, FrameError, put_record, record_header, take_record};
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
    pub notify: Notify,
    /// ORCPT as `addr-type;address`, or empty.
    pub orcpt: String,
    /// The last delivery status for this recipient (`4.4.1 connect to
    /// ... refused`), shown by queue listings and used in DSNs; empty
    /// before the first attempt.
    pub status: String,
}

impl QueuedRecipient {
    /// A recipient as received, not yet attempted.
    pub fn pending(r: &RecipientInfo) -> Self {
        Self {
            address: r.address.clone(),
            state: RecipientState::Pending,
            notify: r.notify,
            orcpt: r.orcpt.clone(),
            status: String::new(),
        }
    }
}

/// Everything a queue file says, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueFile {
    pub id: QueueId,
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

/// Field errors inside a record become errors of that record.
fn in_record(kind: char) -> impl Fn(IpcError) -> QueueFileError {
    move |e| match e {
        IpcError::Frame(f) => QueueFileError::Frame(f),
        _ => QueueFileError::BadValue(kind),
    }
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
        id: &QueueId,
        arrival: SystemTime,
        client: &ClientInfo,
        sender: &SenderInfo,
        recipients: &[QueuedRecipient],
    ) -> (Self, Vec<u8>) {
        let mut out = MAGIC.to_vec();
        put_record(&mut out, b'V', &Fields::new().u32(VERSION).finish());
        put_record(&mut out, b'I', &Fields::new().str(id.as_str()).finish());
        let micros = arrival.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_micros();
        put_record(&mut out, b'T', &Fields::new().u64(u64::try_from(micros).unwrap_or(u64::MAX)).finish());
        put_record(&mut out, b'C', &encode_client(client));
        put_record(&mut out, b'S', &encode_sender(sender));
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
        self.content_to(bytes, &mut out).expect("writing to a Vec cannot fail");
        out
    }

    /// As [`Encoder::content`], written straight to `out`: the content is
    /// copied once, by `out`, instead of into records first.
    pub fn content_to(&mut self, bytes: &[u8], out: &mut impl std::io::Write) -> std::io::Result<()> {
        for chunk in bytes.chunks(MAX_CONTENT_CHUNK) {
            let header = record_header(b'M', chunk.len());
            self.crc.update(&header);
            self.crc.update(chunk);
            out.write_all(&header)?;
            out.write_all(chunk)?;
        }
        Ok(())
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
    Fields::new().u8(state).str(&r.address).u8(r.notify.to_wire()).str(&r.orcpt).str(&r.status).finish()
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
        let id = f.str(MAX_TEXT_FIELD)?;
        f.finish()?;
        let id = QueueId::parse(id).map_err(|_| QueueFileError::BadValue('I'))?;

        let (k, p, _) = next()?;
        expect(k, b'T', "T (arrival)")?;
        let mut f = FieldReader::new(p);
        let arrival = UNIX_EPOCH + Duration::from_micros(f.u64()?);
        f.finish()?;

        let (k, p, _) = next()?;
        expect(k, b'C', "C (client)")?;
        let mut f = FieldReader::new(p);
        let client = decode_client(&mut f).map_err(in_record('C'))?;
        f.finish()?;

        let (k, p, _) = next()?;
        expect(k, b'S', "S (sender)")?;
        let mut f = FieldReader::new(p);
        let sender = decode_sender(&mut f).map_err(in_record('S'))?;
        f.finish()?;

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
                    let notify = Notify::from_wire(f.u8()?).ok_or(QueueFileError::BadValue('R'))?;
                    let orcpt = f.str(MAX_PATH + 32)?.to_owned();
                    let status = f.str(MAX_TEXT_FIELD)?.to_owned();
                    f.finish()?;
                    recipients.push(QueuedRecipient { address, state, notify, orcpt, status });
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

/// Appends `content` (spooled with CRLF line ends) to `out` with LF line
/// ends, as Unix tools and Maildir readers expect; a lone CR stays.
pub fn crlf_to_lf(content: &[u8], out: &mut Vec<u8>) {
    let mut rest = content;
    while let Some(i) = rest.windows(2).position(|w| w == b"\r\n") {
        out.extend_from_slice(&rest[..i]);
        out.push(b'\n');
        rest = &rest[i + 2..];
    }
    out.extend_from_slice(rest);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipc::{BodyType, DsnRet};

    fn sample() -> QueueFile {
        QueueFile {
            id: QueueId::parse("0000000010000100000A").unwrap(),
            arrival: UNIX_EPOCH + Duration::from_micros(1_800_000_000_123_456),
            client: ClientInfo {
                addr: "127.0.0.1".into(),
                name: "localhost".into(),
                helo: "client.test".into(),
                protocol: "ESMTPS".into(),
                tls: "TLSv1.3 with cipher TLS13_AES_128_GCM_SHA256 (128/128 bits)".into(),
            },
            sender: SenderInfo {
                address: "a@example.test".into(),
                body: BodyType::SevenBit,
                smtputf8: false,
                ret: Some(DsnRet::Full),
                envid: "ENV1".into(),
            },
            recipients: vec![
                QueuedRecipient {
                    address: "b@example.test".into(),
                    state: RecipientState::Pending,
                    notify: Notify { success: true, failure: true, ..Notify::default() },
                    orcpt: "rfc822;B@example.test".into(),
                    status: "4.4.1 connect to 127.0.0.1:24: Connection refused".into(),
                },
                QueuedRecipient {
                    address: "c@example.test".into(),
                    state: RecipientState::Delivered,
                    notify: Notify::default(),
                    orcpt: String::new(),
                    status: String::new(),
                },
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
