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
//!                       code (RFC 3463, empty: none yet), str its text
//! M  content    x N>=0  raw message bytes, at most 64 KiB a record
//! Z  end                u32 CRC-32 of every byte before this record
//! ```
//!
//! This is version 2. Version 1 differs only in `R`, whose last field was
//! one string `code text`; it is still read (the code taken from the
//! first word, `4.0.0` when that is no code), and written as version 2 the
//! next time the file is rewritten.
//!
//! The envelope model is [`crate::envelope`]; this module is its on-disk
//! codec and shares no record layout with the IPC codec.
//!
//! Content comes in chunks so a writer can stream it, and the end record's
//! checksum covers everything, so a torn write, a truncation or a flipped bit
//! is detected and the file goes to `corrupt/` instead of being delivered
//! half. The reader is strict about order and accepts nothing after `Z`.

use crate::address::MAX_PATH;
use crate::envelope::{
    BodyType, ClientInfo, DsnRet, MAX_ENVID, Notify, RecipientInfo, SenderInfo, is_printable, parse_client_addr,
};
use crate::queue_id::QueueId;
use crate::record::{FieldReader, Fields, FrameError, put_record, record_header, take_record};
use crate::smtp_status::{EnhancedStatus, StatusClass};
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use thiserror::Error;

/// First octets of every queue file.
pub const MAGIC: &[u8; 8] = b"MORTALQ\0";
/// Format version written by this build.
pub const VERSION: u32 = 2;
/// The oldest version this build still reads.
pub const OLDEST_READABLE_VERSION: u32 = 1;
/// Limit for short text fields (host names, protocol names, status text).
pub const MAX_TEXT_FIELD: usize = 1024;
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
    /// The outcome of the last delivery attempt for this recipient, shown
    /// by queue listings and used in DSNs; `None` before the first.
    pub status: Option<DeliveryStatus>,
}

/// What the last delivery attempt for a recipient said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryStatus {
    pub code: EnhancedStatus,
    /// `connect to 127.0.0.1[127.0.0.1]:24: Connection refused`.
    pub text: String,
}

impl fmt::Display for DeliveryStatus {
    /// `4.4.1 connect to ...`, as queue listings show it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.text.is_empty() { self.code.fmt(f) } else { write!(f, "{} {}", self.code, self.text) }
    }
}

impl QueuedRecipient {
    /// A recipient as received, not yet attempted.
    pub fn pending(r: &RecipientInfo) -> Self {
        Self {
            address: r.address.clone(),
            state: RecipientState::Pending,
            notify: r.notify,
            orcpt: r.orcpt.clone(),
            status: None,
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
        put_record(&mut out, b'C', &client_payload(client));
        put_record(&mut out, b'S', &sender_payload(sender));
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

/// Reads back the content of a file an [`Encoder`] is still writing (no
/// end record yet): `input` starts at a record boundary after the
/// envelope records. Returns the next content record's bytes and the
/// octets it used, `Ok(None)` when more input is needed. cleanup uses it to
/// copy a message's body into the file it rebuilds for the filters' edits.
pub fn take_content(input: &[u8]) -> Result<Option<(&[u8], usize)>, QueueFileError> {
    match take_record(input, MAX_CONTENT_CHUNK)? {
        Some((rec, used)) if rec.kind == b'M' => Ok(Some((rec.payload, used))),
        Some((rec, _)) => Err(QueueFileError::OutOfOrder { got: rec.kind as char, expected: "M (content)" }),
        None => Ok(None),
    }
}

// This format's encoding of the envelope (crate::envelope). The IPC
// protocol has its own (crate::ipc); the two may differ.

fn client_payload(c: &ClientInfo) -> Vec<u8> {
    Fields::new().str(&c.addr.to_string()).str(&c.name).str(&c.helo).str(&c.protocol).str(&c.tls).finish()
}

/// A text field, refused if it holds a control character.
fn text(f: &mut FieldReader<'_>, limit: usize, kind: char) -> Result<String, QueueFileError> {
    let s = f.str(limit)?;
    if is_printable(s) { Ok(s.to_owned()) } else { Err(QueueFileError::BadValue(kind)) }
}

fn decode_client(f: &mut FieldReader<'_>) -> Result<ClientInfo, QueueFileError> {
    let addr = parse_client_addr(f.str(MAX_TEXT_FIELD)?).ok_or(QueueFileError::BadValue('C'))?;
    Ok(ClientInfo {
        addr,
        name: text(f, MAX_TEXT_FIELD, 'C')?,
        helo: text(f, MAX_TEXT_FIELD, 'C')?,
        protocol: text(f, MAX_TEXT_FIELD, 'C')?,
        tls: text(f, MAX_TEXT_FIELD, 'C')?,
        auth: None,
    })
}

fn sender_payload(s: &SenderInfo) -> Vec<u8> {
    let body = match s.body {
        BodyType::SevenBit => 7,
        BodyType::EightBitMime => 8,
        BodyType::BinaryMime => 9,
    };
    let ret = match s.ret {
        None => 0,
        Some(DsnRet::Full) => 1,
        Some(DsnRet::Headers) => 2,
    };
    Fields::new().str(&s.address).u8(body).u8(u8::from(s.smtputf8)).u8(ret).str(&s.envid).finish()
}

fn decode_sender(f: &mut FieldReader<'_>) -> Result<SenderInfo, QueueFileError> {
    let bad = || QueueFileError::BadValue('S');
    let address = text(f, MAX_PATH, 'S')?;
    let body = match f.u8()? {
        7 => BodyType::SevenBit,
        8 => BodyType::EightBitMime,
        9 => BodyType::BinaryMime,
        _ => return Err(bad()),
    };
    let smtputf8 = match f.u8()? {
        0 => false,
        1 => true,
        _ => return Err(bad()),
    };
    let ret = match f.u8()? {
        0 => None,
        1 => Some(DsnRet::Full),
        2 => Some(DsnRet::Headers),
        _ => return Err(bad()),
    };
    let envid = text(f, MAX_ENVID, 'S')?;
    Ok(SenderInfo { address, body, smtputf8, ret, envid })
}

fn recipient_payload(r: &QueuedRecipient) -> Vec<u8> {
    let state = match r.state {
        RecipientState::Pending => 0,
        RecipientState::Delivered => 1,
        RecipientState::Failed => 2,
    };
    let notify = u8::from(r.notify.never)
        | u8::from(r.notify.success) << 1
        | u8::from(r.notify.failure) << 2
        | u8::from(r.notify.delay) << 3;
    let (code, text) = match &r.status {
        Some(s) => (s.code.to_string(), s.text.as_str()),
        None => (String::new(), ""),
    };
    Fields::new().u8(state).str(&r.address).u8(notify).str(&r.orcpt).str(&code).str(text).finish()
}

fn decode_recipient(f: &mut FieldReader<'_>, version: u32) -> Result<QueuedRecipient, QueueFileError> {
    let bad = || QueueFileError::BadValue('R');
    let state = match f.u8()? {
        0 => RecipientState::Pending,
        1 => RecipientState::Delivered,
        2 => RecipientState::Failed,
        _ => return Err(bad()),
    };
    let address = text(f, MAX_PATH, 'R')?;
    let bits = f.u8()?;
    let notify = Notify { never: bits & 1 != 0, success: bits & 2 != 0, failure: bits & 4 != 0, delay: bits & 8 != 0 };
    if bits >= 16 || !notify.is_valid() {
        return Err(bad());
    }
    let orcpt = text(f, MAX_PATH + 32, 'R')?;
    let status = if version == 1 {
        v1_status(&text(f, MAX_TEXT_FIELD, 'R')?)
    } else {
        let code = f.str(MAX_TEXT_FIELD)?;
        let text = text(f, MAX_TEXT_FIELD, 'R')?;
        match code {
            "" if text.is_empty() => None,
            "" => return Err(bad()),
            code => Some(DeliveryStatus { code: code.parse().map_err(|_| bad())?, text }),
        }
    };
    Ok(QueuedRecipient { address, state, notify, orcpt, status })
}

/// Version 1 kept `code text` in one string; its writer always put a valid
/// code first. Anything else keeps its text under `4.0.0`.
fn v1_status(s: &str) -> Option<DeliveryStatus> {
    if s.is_empty() {
        return None;
    }
    let (first, rest) = s.split_once(' ').unwrap_or((s, ""));
    Some(match first.parse() {
        Ok(code) => DeliveryStatus { code, text: rest.to_owned() },
        Err(_) => DeliveryStatus { code: EnhancedStatus::undefined(StatusClass::Persistent), text: s.to_owned() },
    })
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
        if !(OLDEST_READABLE_VERSION..=VERSION).contains(&version) {
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
        let client = decode_client(&mut f)?;
        f.finish()?;

        let (k, p, _) = next()?;
        expect(k, b'S', "S (sender)")?;
        let mut f = FieldReader::new(p);
        let sender = decode_sender(&mut f)?;
        f.finish()?;

        let mut recipients = Vec::new();
        let mut content = Vec::new();
        loop {
            let (k, p, start) = next()?;
            match k {
                b'R' if content.is_empty() => {
                    let mut f = FieldReader::new(p);
                    recipients.push(decode_recipient(&mut f, version)?);
                    f.finish()?;
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
    use std::net::{IpAddr, Ipv6Addr};

    fn sample() -> QueueFile {
        QueueFile {
            id: QueueId::parse("0000000010000100000A").unwrap(),
            arrival: UNIX_EPOCH + Duration::from_micros(1_800_000_000_123_456),
            client: ClientInfo {
                addr: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
                name: "localhost".into(),
                helo: "client.test".into(),
                protocol: "ESMTPS".into(),
                tls: "TLSv1.3 with cipher TLS13_AES_128_GCM_SHA256 (128/128 bits)".into(),
                auth: None,
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
                    status: Some(DeliveryStatus {
                        code: "4.4.1".parse().unwrap(),
                        text: "connect to 127.0.0.1:24: Connection refused".into(),
                    }),
                },
                QueuedRecipient {
                    address: "c@example.test".into(),
                    state: RecipientState::Delivered,
                    notify: Notify::default(),
                    orcpt: String::new(),
                    status: Some(DeliveryStatus { code: "2.0.0".parse().unwrap(), text: "250 2.0.0 Ok".into() }),
                },
                QueuedRecipient {
                    address: "d@example.test".into(),
                    state: RecipientState::Pending,
                    notify: Notify { never: true, ..Notify::default() },
                    orcpt: String::new(),
                    status: None,
                },
            ],
            content: (0..200_000u32).map(|i| (i % 251) as u8).collect(),
        }
    }

    #[test]
    fn round_trip() {
        let q = sample();
        let bytes = q.encode();
        assert_eq!(QueueFile::decode(&bytes).unwrap(), q);
        let status = q.recipients[0].status.as_ref().unwrap();
        assert_eq!(status.to_string(), "4.4.1 connect to 127.0.0.1:24: Connection refused");
        // The code and the text are fields of their own, not one string.
        let fields = Fields::new().str("4.4.1").str("connect to 127.0.0.1:24: Connection refused").finish();
        assert!(bytes.windows(fields.len()).any(|w| w == fields.as_slice()));
    }

    /// A file as version 1 wrote it: the same records, but the status of
    /// each recipient one string.
    fn encode_v1(q: &QueueFile, statuses: &[&str]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        put_record(&mut out, b'V', &Fields::new().u32(1).finish());
        put_record(&mut out, b'I', &Fields::new().str(q.id.as_str()).finish());
        let micros = q.arrival.duration_since(UNIX_EPOCH).unwrap().as_micros() as u64;
        put_record(&mut out, b'T', &Fields::new().u64(micros).finish());
        put_record(&mut out, b'C', &client_payload(&q.client));
        put_record(&mut out, b'S', &sender_payload(&q.sender));
        for (r, status) in q.recipients.iter().zip(statuses) {
            let state = match r.state {
                RecipientState::Pending => 0,
                RecipientState::Delivered => 1,
                RecipientState::Failed => 2,
            };
            let notify = recipient_payload(r)[3 + r.address.len()];
            put_record(
                &mut out,
                b'R',
                &Fields::new().u8(state).str(&r.address).u8(notify).str(&r.orcpt).str(status).finish(),
            );
        }
        put_record(&mut out, b'M', &q.content);
        let crc = crc32fast::hash(&out);
        put_record(&mut out, b'Z', &crc.to_be_bytes());
        out
    }

    #[test]
    fn version_1_files_are_read() {
        let mut q = sample();
        q.content.truncate(1000);
        let v1 = encode_v1(&q, &["4.4.1 connect to 127.0.0.1:24: Connection refused", "2.0.0 250 2.0.0 Ok", ""]);
        let read = QueueFile::decode(&v1).unwrap();
        assert_eq!(read, q);
        // A status without a code, which no version 1 writer produced.
        let odd = QueueFile::decode(&encode_v1(&q, &["", "", "lost somewhere"])).unwrap();
        assert_eq!(odd.recipients[2].status.as_ref().unwrap().to_string(), "4.0.0 lost somewhere");
        assert_eq!(odd.recipients[0].status, None);
        // Rewritten, it is version 2.
        assert_eq!(&read.encode()[MAGIC.len() + 5..MAGIC.len() + 9], &VERSION.to_be_bytes());
        assert_eq!(VERSION, 2);
    }

    /// A file the last version 1 build wrote (kept as a fuzz seed).
    #[test]
    fn a_version_1_file_from_the_old_writer_is_read() {
        let bytes = include_bytes!("../../../fuzz/corpus/queue_file/seed-partial-v1");
        assert_eq!(&bytes[MAGIC.len() + 5..MAGIC.len() + 9], &1u32.to_be_bytes());
        let qf = QueueFile::decode(bytes).unwrap();
        let statuses: Vec<Option<String>> =
            qf.recipients.iter().map(|r| r.status.as_ref().map(|s| format!("{}|{}", s.code, s.text))).collect();
        assert_eq!(statuses, [None, Some("4.4.1|connect to 127.0.0.1:24: Connection refused".into()), None]);
        assert_eq!(qf.client.addr, IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    }

    #[test]
    fn bad_status_fields_rejected() {
        let q = sample();
        let with_r = |payload: Vec<u8>| {
            let mut out = q.encode();
            let r = recipient_payload(&q.recipients[2]);
            let at = out.windows(r.len()).position(|w| w == r.as_slice()).unwrap();
            out.splice(at - 4..at + r.len(), (payload.len() as u32).to_be_bytes().into_iter().chain(payload));
            let end = out.len() - 9;
            let crc = crc32fast::hash(&out[..end]);
            out.truncate(end);
            put_record(&mut out, b'Z', &crc.to_be_bytes());
            QueueFile::decode(&out)
        };
        let r = |code: &str, text: &str| {
            Fields::new().u8(0).str("d@example.test").u8(1).str("").str(code).str(text).finish()
        };
        assert_eq!(with_r(r("", "")).unwrap().recipients[2].status, None);
        assert_eq!(with_r(r("4.4.5", "")).unwrap().recipients[2].status.as_ref().unwrap().to_string(), "4.4.5");
        for (code, text) in
            [("", "text without a code"), ("4.4", "x"), ("3.0.0", "x"), ("4.4.1 ", "x"), ("4.4.1", "a\nb")]
        {
            assert_eq!(with_r(r(code, text)), Err(QueueFileError::BadValue('R')), "{code:?} {text:?}");
        }
        let mut v3 = q.encode();
        v3[MAGIC.len() + 8] = 3;
        assert_eq!(QueueFile::decode(&v3), Err(QueueFileError::Version(3)));
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
    fn content_of_an_unfinished_file_is_read_back() {
        let q = sample();
        let (mut enc, start) = Encoder::start(&q.id, q.arrival, &q.client, &q.sender, &q.recipients);
        let mut body = enc.content(b"Subject: a\r\n\r\n");
        body.extend(enc.content(&q.content));
        let (mut content, mut at) = (Vec::new(), 0);
        while let Some((chunk, used)) = take_content(&body[at..]).unwrap() {
            content.extend_from_slice(chunk);
            at += used;
        }
        assert_eq!(at, body.len());
        assert_eq!(content[..14], *b"Subject: a\r\n\r\n");
        assert_eq!(content[14..], q.content[..]);
        // Only content: the envelope is not.
        assert_eq!(
            take_content(&start[MAGIC.len()..]),
            Err(QueueFileError::OutOfOrder { got: 'V', expected: "M (content)" })
        );
        assert_eq!(take_content(&body[..3]), Ok(None));
    }

    #[test]
    fn trailing_and_foreign_rejected() {
        let mut bytes = sample().encode();
        bytes.push(0);
        assert_eq!(QueueFile::decode(&bytes), Err(QueueFileError::TrailingData(1)));
        assert_eq!(QueueFile::decode(b"From alice Mon Jan 1"), Err(QueueFileError::BadMagic));
    }
}
