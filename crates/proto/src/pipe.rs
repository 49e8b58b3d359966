//! The queue → pipe conversation (protocol `pipe`, version 1): the queue
//! manager hands one message to the `pipe` delivery service (Postfix's
//! pipe(8)), which runs the configured command once per recipient.
//!
//! One Unix stream connection carries one delivery request:
//!
//! ```text
//! queue                                     pipe
//!   Hello("pipe", 1)                  ->
//!   Envelope(queue id, sender, binary) ->
//!   Recipient(address, orcpt) x N>=1  ->
//!   Data(chunk) x M>=0                ->
//!   End                               ->
//!                                     <-    Result(status, dsn, text, diagnostic) x N
//! ```
//!
//! Records use the framing of [`crate::record`]. The request carries no
//! command: the pipe service expands its own `[delivery.pipe] command`, so
//! a peer can choose at most the values the queue could (sender, recipient,
//! queue id, content), never the program or its arguments. The pipe
//! service trusts nothing else either: [`RequestDecoder`] insists on the
//! order above, on [`MAX_RECIPIENTS`] and a content limit, on a valid queue
//! id and on RFC 5321 mailbox syntax for every address, and any violation
//! ends the conversation before a command runs. Results come back one per
//! recipient in request order, each as soon as its command finished;
//! [`ResultDecoder`] checks that the status and the enhanced code agree
//! and that no text can start a new log line.

use crate::address::{MAX_PATH, parse_mailbox};
use crate::queue_id::{QUEUE_ID_LEN, QueueId};
use crate::record::{FieldReader, Fields, FrameError, RawRecord, put_record, take_record};
use crate::smtp_status::{EnhancedStatus, StatusClass};
use thiserror::Error;

/// Protocol name sent in the opening record.
pub const PROTOCOL_NAME: &str = "pipe";
/// Protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest content chunk in one `Data` record.
pub const MAX_DATA_CHUNK: usize = 64 * 1024;
/// Largest payload any record of this protocol may declare.
pub const MAX_RECORD_PAYLOAD: usize = MAX_DATA_CHUNK;
/// Recipients in one request. The queue sends one at a time today; this
/// bounds what a peer can make the service hold and run.
pub const MAX_RECIPIENTS: usize = 1000;
/// ORCPT is `addr-type;` plus at most a path's worth of address.
pub const MAX_ORCPT: usize = MAX_PATH + 32;
/// Longest result text (the command's output is at most 512 octets of it).
pub const MAX_RESULT_TEXT: usize = 2048;
/// Longest DSN diagnostic (`x-unix; ...`).
pub const MAX_DIAGNOSTIC: usize = 1024;
/// Longest protocol name in `Hello`.
pub(crate) const MAX_PROTOCOL_NAME: usize = 64;
/// Longest enhanced status code (`5.123.456`).
pub(crate) const MAX_DSN_CODE: usize = 9;
/// Octets allowed beyond `[smtpd] message_size_limit` plus `[cleanup]
/// header_size_limit`: the headers cleanup adds and a DSN's own parts
/// around a returned message.
pub const CONTENT_MARGIN: u64 = 64 * 1024;

const HELLO: u8 = b'H';
const ENVELOPE: u8 = b'S';
const RECIPIENT: u8 = b'R';
const DATA: u8 = b'D';
const END: u8 = b'E';
const RESULT: u8 = b'A';

/// The largest content a pipe request may carry under `config`.
pub fn max_content(config: &crate::config::Config) -> u64 {
    config
        .smtpd
        .message_size_limit
        .saturating_add(config.cleanup.header_size_limit as u64)
        .saturating_add(CONTENT_MARGIN)
}

/// One recipient of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipeRecipient {
    /// The mailbox, without brackets.
    pub address: String,
    /// ORCPT as `addr-type;address`, or empty.
    pub orcpt: String,
}

impl PipeRecipient {
    /// The original recipient: ORCPT's address when given, else the address.
    pub fn original(&self) -> &str {
        self.orcpt.split_once(';').map_or(self.address.as_str(), |(_, a)| a)
    }
}

/// A complete delivery request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipeRequest {
    pub queue_id: QueueId,
    /// Reverse-path without brackets; empty for `<>`.
    pub sender: String,
    pub recipients: Vec<PipeRecipient>,
    /// The message as queued (CRLF line ends).
    pub content: Vec<u8>,
    /// `BODY=BINARYMIME`: the content is octets, not lines, and reaches
    /// the command unchanged.
    pub binary: bool,
}

/// How one recipient's command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipeStatus {
    Delivered,
    Deferred,
    Bounced,
}

impl PipeStatus {
    fn to_wire(self) -> u8 {
        match self {
            PipeStatus::Delivered => 0,
            PipeStatus::Deferred => 1,
            PipeStatus::Bounced => 2,
        }
    }

    fn from_wire(b: u8) -> Option<Self> {
        match b {
            0 => Some(PipeStatus::Delivered),
            1 => Some(PipeStatus::Deferred),
            2 => Some(PipeStatus::Bounced),
            _ => None,
        }
    }

    /// The class its enhanced status code must have.
    pub fn class(self) -> StatusClass {
        match self {
            PipeStatus::Delivered => StatusClass::Success,
            PipeStatus::Deferred => StatusClass::Persistent,
            PipeStatus::Bounced => StatusClass::Permanent,
        }
    }
}

/// One recipient's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipeResult {
    pub status: PipeStatus,
    /// RFC 3463 code, its class matching `status`.
    pub dsn: EnhancedStatus,
    /// Text for the log line and the DSN.
    pub text: String,
    /// RFC 3464 Diagnostic-Code (`x-unix; ...`), when the command failed.
    pub diagnostic: Option<String>,
}

impl PipeResult {
    /// `dsn` takes the class of `status`, so the two always agree.
    pub fn new(status: PipeStatus, dsn: EnhancedStatus, text: impl Into<String>) -> Self {
        Self { status, dsn: dsn.with_class(status.class()), text: text.into(), diagnostic: None }
    }

    /// Appends the encoded record to `out`. Over-long texts are cut (at a
    /// character boundary) and control characters become spaces, so an
    /// encoded result always decodes.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let text = clean(&self.text, MAX_RESULT_TEXT);
        let diagnostic = clean(self.diagnostic.as_deref().unwrap_or_default(), MAX_DIAGNOSTIC);
        let payload =
            Fields::new().u8(self.status.to_wire()).str(&self.dsn.to_string()).str(&text).str(&diagnostic).finish();
        put_record(out, RESULT, &payload);
    }

    fn decode(rec: RawRecord<'_>) -> Result<Self, PipeError> {
        if rec.kind != RESULT {
            return Err(unexpected(rec.kind, "Result"));
        }
        let mut f = FieldReader::new(rec.payload);
        let status = PipeStatus::from_wire(f.u8()?).ok_or(PipeError::BadValue("Result status"))?;
        let dsn: EnhancedStatus = f.str(MAX_DSN_CODE)?.parse().map_err(|_| PipeError::BadValue("Result code"))?;
        if dsn.class() != status.class() {
            return Err(PipeError::BadValue("Result code"));
        }
        let text = printable(f.str(MAX_RESULT_TEXT)?, "Result text")?;
        let diagnostic = printable(f.str(MAX_DIAGNOSTIC)?, "Result diagnostic")?;
        f.finish()?;
        Ok(PipeResult { status, dsn, text, diagnostic: (!diagnostic.is_empty()).then_some(diagnostic) })
    }
}

/// Why a conversation ends early; whoever sees one closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PipeError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("record type {got:#04x} where {expected} was expected")]
    OutOfOrder { got: u8, expected: &'static str },
    #[error("peer speaks {name} version {version}, not {PROTOCOL_NAME} version {PROTOCOL_VERSION}")]
    WrongProtocol { name: String, version: u32 },
    #[error("invalid {0}")]
    BadValue(&'static str),
    #[error("more than {MAX_RECIPIENTS} recipients")]
    TooManyRecipients,
    #[error("content exceeds {limit} octets")]
    ContentTooLarge { limit: u64 },
    #[error("{0} octets after the end of the conversation")]
    TrailingData(usize),
}

fn unexpected(got: u8, expected: &'static str) -> PipeError {
    PipeError::OutOfOrder { got, expected }
}

impl PipeRequest {
    /// The whole request, encoded ([`encode_request`]).
    pub fn encode(&self) -> Vec<u8> {
        encode_request(&self.queue_id, &self.sender, self.binary, &self.recipients, &self.content)
    }
}

/// A whole request, encoded, from borrowed parts (the queue's message
/// content need not be copied first).
///
/// # Panics
/// If a field exceeds the record framing's field limit: the queue sends
/// only what it decoded from a verified queue file, whose fields are far
/// shorter, so that is a programming error.
pub fn encode_request(
    queue_id: &QueueId,
    sender: &str,
    binary: bool,
    recipients: &[PipeRecipient],
    content: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 1024);
    put_record(&mut out, HELLO, &Fields::new().str(PROTOCOL_NAME).u32(PROTOCOL_VERSION).finish());
    put_record(&mut out, ENVELOPE, &Fields::new().str(queue_id.as_str()).str(sender).u8(u8::from(binary)).finish());
    for r in recipients {
        put_record(&mut out, RECIPIENT, &Fields::new().str(&r.address).str(&r.orcpt).finish());
    }
    for chunk in content.chunks(MAX_DATA_CHUNK) {
        put_record(&mut out, DATA, chunk);
    }
    put_record(&mut out, END, &[]);
    out
}

/// Where a [`RequestDecoder`] is in the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Hello,
    Envelope,
    FirstRecipient,
    RecipientsOrData,
    Data,
    Done,
}

impl Stage {
    fn expecting(self) -> &'static str {
        match self {
            Stage::Hello => "Hello",
            Stage::Envelope => "Envelope",
            Stage::FirstRecipient => "Recipient",
            Stage::RecipientsOrData => "Recipient, Data or End",
            Stage::Data => "Data or End",
            Stage::Done => "nothing (the request is complete)",
        }
    }
}

/// The pipe service's incremental, strict reader of one request: feed it
/// what the socket gave until it returns the complete request.
#[derive(Debug)]
pub struct RequestDecoder {
    buf: Vec<u8>,
    stage: Stage,
    max_content: u64,
    /// Made by the envelope record, completed by the ones after it.
    request: Option<PipeRequest>,
}

impl RequestDecoder {
    /// A decoder that refuses content above `max_content` octets
    /// ([`max_content`] of the service's configuration).
    pub fn new(max_content: u64) -> Self {
        Self { buf: Vec::new(), stage: Stage::Hello, max_content, request: None }
    }

    /// Takes more bytes; returns the request once `End` arrived. Bytes
    /// after `End`, in this feed or a later one, are an error.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<PipeRequest>, PipeError> {
        if self.stage == Stage::Done {
            return Err(PipeError::TrailingData(bytes.len()));
        }
        self.buf.extend_from_slice(bytes);
        let mut used = 0;
        let result = loop {
            let Some((rec, n)) = take_record(&self.buf[used..], MAX_RECORD_PAYLOAD)? else { break Ok(None) };
            let (kind, payload) = (rec.kind, rec.payload.to_vec());
            used += n;
            if let Err(e) = self.advance(kind, &payload) {
                break Err(e);
            }
            if self.stage == Stage::Done {
                let left = self.buf.len() - used;
                if left > 0 {
                    break Err(PipeError::TrailingData(left));
                }
                break Ok(self.request.take());
            }
        };
        self.buf.drain(..used);
        result
    }

    fn advance(&mut self, kind: u8, payload: &[u8]) -> Result<(), PipeError> {
        let mut f = FieldReader::new(payload);
        self.stage = match (self.stage, kind) {
            (Stage::Hello, HELLO) => {
                let name = f.str(MAX_PROTOCOL_NAME)?.to_owned();
                let version = f.u32()?;
                if name != PROTOCOL_NAME || version != PROTOCOL_VERSION {
                    return Err(PipeError::WrongProtocol { name, version });
                }
                Stage::Envelope
            }
            (Stage::Envelope, ENVELOPE) => {
                let id = QueueId::parse(f.str(QUEUE_ID_LEN)?).map_err(|_| PipeError::BadValue("queue id"))?;
                let sender = f.str(MAX_PATH)?;
                if !sender.is_empty() && parse_mailbox(sender, true).is_err() {
                    return Err(PipeError::BadValue("sender address"));
                }
                let binary = match f.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(PipeError::BadValue("body type")),
                };
                self.request = Some(PipeRequest {
                    queue_id: id,
                    sender: sender.to_owned(),
                    recipients: Vec::new(),
                    content: Vec::new(),
                    binary,
                });
                Stage::FirstRecipient
            }
            (Stage::FirstRecipient | Stage::RecipientsOrData, RECIPIENT) => {
                let request = self.request.as_mut().ok_or(unexpected(kind, Stage::Envelope.expecting()))?;
                if request.recipients.len() >= MAX_RECIPIENTS {
                    return Err(PipeError::TooManyRecipients);
                }
                let address = f.str(MAX_PATH)?;
                if parse_mailbox(address, true).is_err() {
                    return Err(PipeError::BadValue("recipient address"));
                }
                let orcpt = printable(f.str(MAX_ORCPT)?, "original recipient")?;
                request.recipients.push(PipeRecipient { address: address.to_owned(), orcpt });
                Stage::RecipientsOrData
            }
            (Stage::RecipientsOrData | Stage::Data, DATA) => {
                let request = self.request.as_mut().ok_or(unexpected(kind, Stage::Envelope.expecting()))?;
                let total = request.content.len() as u64 + payload.len() as u64;
                if total > self.max_content {
                    return Err(PipeError::ContentTooLarge { limit: self.max_content });
                }
                request.content.extend_from_slice(payload);
                // Raw content, not fields: nothing to finish.
                self.stage = Stage::Data;
                return Ok(());
            }
            (Stage::RecipientsOrData | Stage::Data, END) => Stage::Done,
            (stage, got) => return Err(unexpected(got, stage.expecting())),
        };
        f.finish()?;
        Ok(())
    }
}

/// The queue's reader of the results: exactly `expected` of them, then
/// nothing. Results are taken one at a time, so those that arrived before
/// a broken record still count.
#[derive(Debug)]
pub struct ResultDecoder {
    buf: Vec<u8>,
    /// Start of the first record not yet taken.
    start: usize,
    expected: usize,
    got: usize,
}

/// Largest payload of a `Result` record.
const MAX_RESULT_PAYLOAD: usize = 1 + 2 * 4 + MAX_DSN_CODE + MAX_RESULT_TEXT + MAX_DIAGNOSTIC;

impl ResultDecoder {
    pub fn new(expected: usize) -> Self {
        Self { buf: Vec::new(), start: 0, expected, got: 0 }
    }

    /// Takes more bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.drain(..self.start);
        self.start = 0;
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete result, or `None` when more bytes are needed (or
    /// every result arrived). Bytes beyond the last expected result are an
    /// error.
    pub fn next_result(&mut self) -> Result<Option<PipeResult>, PipeError> {
        if self.is_complete() {
            let left = self.buf.len() - self.start;
            return if left > 0 { Err(PipeError::TrailingData(left)) } else { Ok(None) };
        }
        let Some((rec, used)) = take_record(&self.buf[self.start..], MAX_RESULT_PAYLOAD)? else { return Ok(None) };
        let result = PipeResult::decode(rec)?;
        self.start += used;
        self.got += 1;
        Ok(Some(result))
    }

    /// Whether every expected result arrived.
    pub fn is_complete(&self) -> bool {
        self.got == self.expected
    }
}

/// Text that ends up in logs and DSNs carries no control characters.
pub(crate) fn printable(s: &str, what: &'static str) -> Result<String, PipeError> {
    if s.chars().any(char::is_control) {
        return Err(PipeError::BadValue(what));
    }
    Ok(s.to_owned())
}

/// `s` without control characters and cut to `limit` octets.
pub(crate) fn clean(s: &str, limit: usize) -> String {
    let mut out = String::with_capacity(s.len().min(limit));
    for c in s.chars().map(|c| if c.is_control() { ' ' } else { c }) {
        if out.len() + c.len_utf8() > limit {
            break;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: u64 = 1000;

    fn request() -> PipeRequest {
        PipeRequest {
            queue_id: QueueId::parse("0000000010000100000A").unwrap(),
            sender: "a@example.test".into(),
            recipients: vec![
                PipeRecipient { address: "b@pipe.test".into(), orcpt: "rfc822;B@pipe.test".into() },
                PipeRecipient { address: "c@pipe.test".into(), orcpt: String::new() },
            ],
            content: b"Subject: x\r\n\r\nhi\r\n".to_vec(),
            binary: false,
        }
    }

    fn rec(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        put_record(&mut v, kind, payload);
        v
    }

    fn hello() -> Vec<u8> {
        rec(HELLO, &Fields::new().str(PROTOCOL_NAME).u32(PROTOCOL_VERSION).finish())
    }

    fn envelope() -> Vec<u8> {
        rec(ENVELOPE, &Fields::new().str("0000000010000100000A").str("a@example.test").u8(0).finish())
    }

    fn recipient(address: &str) -> Vec<u8> {
        rec(RECIPIENT, &Fields::new().str(address).str("").finish())
    }

    fn decode_all(wire: &[u8]) -> Result<Option<PipeRequest>, PipeError> {
        RequestDecoder::new(LIMIT).feed(wire)
    }

    #[test]
    fn request_round_trips_byte_by_byte() {
        let wire = request().encode();
        let mut dec = RequestDecoder::new(LIMIT);
        let mut got = None;
        for (i, b) in wire.iter().enumerate() {
            let r = dec.feed(&[*b]).unwrap();
            assert_eq!(r.is_some(), i == wire.len() - 1, "at {i}");
            got = got.or(r);
        }
        assert_eq!(got, Some(request()));
        assert_eq!(request().recipients[0].original(), "B@pipe.test");
        assert_eq!(request().recipients[1].original(), "c@pipe.test");
        // Nothing may follow End.
        assert!(matches!(dec.feed(b"x"), Err(PipeError::TrailingData(1))));
    }

    #[test]
    fn null_sender_and_empty_content_are_valid() {
        let r = PipeRequest { sender: String::new(), content: Vec::new(), ..request() };
        assert_eq!(decode_all(&r.encode()).unwrap(), Some(r));
        let r = PipeRequest { content: b"\x00\r\n\n\xff".to_vec(), binary: true, ..request() };
        assert_eq!(decode_all(&r.encode()).unwrap(), Some(r));
    }

    /// A table row: name, wire bytes, and the error the decoder must give.
    type RejectCase = (&'static str, Vec<u8>, fn(&PipeError) -> bool);

    /// Malformed, oversized, out-of-order and wrong-version requests: each
    /// must be refused before a command could run.
    #[test]
    fn decoder_rejects_table() {
        let end = rec(END, b"");
        let data = |n: usize| rec(DATA, &vec![b'x'; n]);
        let cat = |parts: &[&[u8]]| parts.concat();
        let cases: Vec<RejectCase> = vec![
            ("wrong version", rec(HELLO, &Fields::new().str(PROTOCOL_NAME).u32(2).finish()), |e| {
                matches!(e, PipeError::WrongProtocol { version: 2, .. })
            }),
            ("wrong protocol", rec(HELLO, &Fields::new().str("cleanup").u32(1).finish()), |e| {
                matches!(e, PipeError::WrongProtocol { .. })
            }),
            ("envelope first", envelope(), |e| matches!(e, PipeError::OutOfOrder { got: ENVELOPE, .. })),
            ("hello twice", cat(&[&hello(), &hello()]), |e| matches!(e, PipeError::OutOfOrder { .. })),
            ("data before recipient", cat(&[&hello(), &envelope(), &data(1)]), |e| {
                matches!(e, PipeError::OutOfOrder { got: DATA, .. })
            }),
            ("end before recipient", cat(&[&hello(), &envelope(), &end]), |e| {
                matches!(e, PipeError::OutOfOrder { .. })
            }),
            (
                "recipient after data",
                cat(&[&hello(), &envelope(), &recipient("b@x.test"), &data(1), &recipient("c@x.test")]),
                |e| matches!(e, PipeError::OutOfOrder { got: RECIPIENT, .. }),
            ),
            ("unknown record", cat(&[&hello(), &rec(b'Z', b"")]), |e| {
                matches!(e, PipeError::OutOfOrder { got: b'Z', .. })
            }),
            ("trailing after end", cat(&[&hello(), &envelope(), &recipient("b@x.test"), &end, b"junk"]), |e| {
                matches!(e, PipeError::TrailingData(4))
            }),
            (
                "bad queue id",
                cat(&[&hello(), &rec(ENVELOPE, &Fields::new().str("../../etc/passwdAAAA").str("").u8(0).finish())]),
                |e| matches!(e, PipeError::BadValue("queue id")),
            ),
            (
                "bad sender",
                cat(&[
                    &hello(),
                    &rec(ENVELOPE, &Fields::new().str("0000000010000100000A").str("a b@x").u8(0).finish()),
                ]),
                |e| matches!(e, PipeError::BadValue("sender address")),
            ),
            (
                "bad body type",
                cat(&[&hello(), &rec(ENVELOPE, &Fields::new().str("0000000010000100000A").str("").u8(2).finish())]),
                |e| matches!(e, PipeError::BadValue("body type")),
            ),
            ("bad recipient", cat(&[&hello(), &envelope(), &recipient("-oProxyCommand=x")]), |e| {
                matches!(e, PipeError::BadValue("recipient address"))
            }),
            (
                "CRLF in orcpt",
                cat(&[
                    &hello(),
                    &envelope(),
                    &rec(RECIPIENT, &Fields::new().str("b@x.test").str("rfc822;a\r\nb").finish()),
                ]),
                |e| matches!(e, PipeError::BadValue("original recipient")),
            ),
            (
                "address over path limit",
                cat(&[&hello(), &envelope(), &recipient(&format!("{}@x.test", "a".repeat(MAX_PATH)))]),
                |e| matches!(e, PipeError::Frame(FrameError::FieldTooLong { .. })),
            ),
            ("trailing field bytes", cat(&[&hello(), &envelope(), &recipient("b@x.test"), &rec(END, b"x")]), |e| {
                matches!(e, PipeError::Frame(FrameError::TrailingBytes { .. }))
            }),
            ("oversized record", cat(&[&hello(), &[DATA, 0x00, 0x01, 0x00, 0x01]]), |e| {
                matches!(e, PipeError::Frame(FrameError::Oversized { .. }))
            }),
            (
                "content over limit",
                cat(&[&hello(), &envelope(), &recipient("b@x.test"), &data(600), &data(401)]),
                |e| matches!(e, PipeError::ContentTooLarge { limit: LIMIT }),
            ),
        ];
        for (name, wire, want) in cases {
            let err = decode_all(&wire).expect_err(name);
            assert!(want(&err), "{name}: got {err:?}");
        }
    }

    #[test]
    fn recipient_count_is_bounded() {
        let mut wire = cat2(&hello(), &envelope());
        for i in 0..=MAX_RECIPIENTS {
            wire.extend_from_slice(&recipient(&format!("r{i}@x.test")));
        }
        assert_eq!(decode_all(&wire), Err(PipeError::TooManyRecipients));
    }

    fn cat2(a: &[u8], b: &[u8]) -> Vec<u8> {
        [a, b].concat()
    }

    #[test]
    fn content_at_the_limit_is_accepted() {
        let r = PipeRequest { content: vec![b'x'; LIMIT as usize], ..request() };
        assert_eq!(decode_all(&r.encode()).unwrap(), Some(r));
    }

    #[test]
    fn results_round_trip_and_are_counted() {
        let results = [
            PipeResult::new(PipeStatus::Delivered, "2.0.0".parse().unwrap(), "delivered via pipe service"),
            PipeResult {
                diagnostic: Some("x-unix; no such user".into()),
                ..PipeResult::new(
                    PipeStatus::Bounced,
                    "5.1.1".parse().unwrap(),
                    "Command died with status 67: \"/bin/x\"",
                )
            },
        ];
        let mut wire = Vec::new();
        for r in &results {
            r.encode(&mut wire);
        }
        let mut dec = ResultDecoder::new(2);
        let mut got = Vec::new();
        for b in &wire {
            dec.feed(&[*b]);
            while let Some(r) = dec.next_result().unwrap() {
                got.push(r);
            }
        }
        assert_eq!(got, results);
        assert!(dec.is_complete());
        // A third result is more than was asked for.
        let mut extra = Vec::new();
        results[0].encode(&mut extra);
        dec.feed(&extra);
        assert!(matches!(dec.next_result(), Err(PipeError::TrailingData(_))));
    }

    /// A good result followed by garbage in one read: the result is taken,
    /// then the error reported.
    #[test]
    fn results_before_a_broken_record_count() {
        let mut wire = Vec::new();
        PipeResult::new(PipeStatus::Delivered, "2.0.0".parse().unwrap(), "ok").encode(&mut wire);
        wire.extend_from_slice(b"garbage!");
        let mut dec = ResultDecoder::new(2);
        dec.feed(&wire);
        assert_eq!(dec.next_result().unwrap().map(|r| r.status), Some(PipeStatus::Delivered));
        assert!(dec.next_result().is_err());
    }

    #[test]
    fn result_encoding_cleans_text() {
        let long = PipeResult::new(
            PipeStatus::Deferred,
            "4.3.0".parse().unwrap(),
            format!("a\nb{}", "é".repeat(MAX_RESULT_TEXT)),
        );
        let mut wire = Vec::new();
        long.encode(&mut wire);
        let mut dec = ResultDecoder::new(1);
        dec.feed(&wire);
        let got = [dec.next_result().unwrap().unwrap()];
        assert!(got[0].text.starts_with("a b") && got[0].text.len() <= MAX_RESULT_TEXT, "{}", got[0].text.len());
    }

    #[test]
    fn result_decoder_rejects_table() {
        let result = |status: u8, dsn: &str, text: &str| {
            rec(RESULT, &Fields::new().u8(status).str(dsn).str(text).str("").finish())
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("unknown status", result(7, "2.0.0", "ok")),
            ("class mismatch", result(0, "5.1.1", "ok")),
            ("bad code", result(1, "4.x.0", "ok")),
            ("code too long", result(1, "4.3.0000", "ok")),
            ("newline in text", result(1, "4.3.0", "a\r\n<id>: to=<x>, status=sent")),
            ("wrong record", rec(HELLO, b"")),
            ("oversized", vec![RESULT, 0x00, 0x10, 0x00, 0x00]),
        ];
        for (name, wire) in cases {
            let mut dec = ResultDecoder::new(1);
            dec.feed(&wire);
            assert!(dec.next_result().is_err(), "{name}");
        }
    }
}
