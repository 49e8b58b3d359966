//! The queue → delivery agent conversation (protocol `delivery`, version
//! 1): the queue manager hands one batch of recipients at a time to the
//! delivery agent of its route (Postfix's lmtp(8), smtp(8) and pipe(8)):
//! `lmtp` and `smtp` talk to the next hop, `pipe` runs its configured
//! command once per recipient; each answers one result per recipient.
//!
//! One Unix stream connection opens with `Hello` and then carries any
//! number of deliveries, strictly one after the other, so that an agent
//! keeps its connection to the next hop between the queue's deliveries:
//!
//! ```text
//! queue                                                  agent
//!   Hello("delivery", 1)                            ->
//!   Envelope(queue id, route, sender, body, smtputf8,
//!            ret, envid)                            ->
//!   Recipient(address, notify, orcpt) x N>=1        ->
//!   Data(chunk) x M>=0                              ->
//!   End                                             ->
//!                                                   <-  Report(relay, keep)
//!                                                   <-  Result(status, dsn, text,
//!                                                         diagnostic, remote mta,
//!                                                         success action) x N
//!   (the next Envelope, if keep was 1)              ->
//! ```
//!
//! Records use the framing of [`crate::record`]. The route names the next
//! hop (`lmtp:unix:/path`, `smtp:inet:192.0.2.1:25`) or `pipe`; the agent
//! delivers only over a route its own configuration gives the recipients'
//! domains, and the pipe agent runs only its own `[delivery.pipe]
//! command`, so a peer chooses at most which configured route is used and
//! the values the queue could (sender, recipients, queue id, content),
//! never an address, a program or an argument of its own. [`RequestDecoder`]
//! insists on the order above, on a protocol version, on a valid queue id,
//! on RFC 5321 mailbox syntax for every address, on [`MAX_RECIPIENTS`]
//! and a content limit ([`max_content`]), and on silence while a report is
//! owed; any violation ends the conversation before a byte goes to the
//! next hop or a command runs. `keep` says whether the agent takes another
//! delivery on this connection (it does not after its last use; the pipe
//! agent never does). Results may follow the report's header one by one,
//! as each recipient's delivery ends. [`ReportDecoder`] checks that each
//! status and its enhanced code agree, and that no text can start a new
//! log line.

use crate::address::{MAX_PATH, parse_mailbox};
use crate::config::Route;
use crate::envelope::{BodyType, DsnRet, MAX_ENVID, Notify};
use crate::queue_id::QueueId;
use crate::record::{FieldReader, Fields, FrameError, RawRecord, put_record, record_header, take_record};
use crate::smtp_status::{DsnAction, EnhancedStatus, StatusClass};
use crate::wire::{body_from_wire, body_to_wire, notify_from_wire, notify_to_wire, ret_from_wire, ret_to_wire};
use thiserror::Error;

/// Protocol name sent in the opening record.
pub const PROTOCOL_NAME: &str = "delivery";
/// Protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest content chunk in one `Data` record.
pub const MAX_DATA_CHUNK: usize = 64 * 1024;
/// Largest payload a request record may declare.
pub const MAX_RECORD_PAYLOAD: usize = MAX_DATA_CHUNK;
/// Recipients in one request (the queue sends at most its batch size, 50).
pub const MAX_RECIPIENTS: usize = 1000;
/// ORCPT is `addr-type;` plus at most a path's worth of address.
pub const MAX_ORCPT: usize = MAX_PATH + 32;
/// Longest route (`lmtp:unix:` and a socket path).
pub const MAX_ROUTE: usize = 1024;
/// Longest result text; longer replies are cut by the encoder.
pub const MAX_RESULT_TEXT: usize = 2048;
/// Longest DSN diagnostic (`smtp; 550 5.1.1 ...`).
pub const MAX_DIAGNOSTIC: usize = 2048;
/// Longest Remote-MTA value and relay name (`dns; host`, a socket path).
pub const MAX_RELAY: usize = 1024;
/// Longest protocol name in `Hello`.
const MAX_PROTOCOL_NAME: usize = 64;
/// Longest enhanced status code (`5.123.456`).
const MAX_DSN_CODE: usize = 9;
/// Octets allowed beyond `[smtpd] message_size_limit` plus `[cleanup]
/// header_size_limit`: the headers cleanup adds and a DSN's own parts
/// around a returned message.
pub const CONTENT_MARGIN: u64 = 64 * 1024;

/// The largest content a request may carry under `config`: what the
/// queue can hold, so an agent refuses nothing the queue could send.
pub fn max_content(config: &crate::config::Config) -> u64 {
    config
        .smtpd
        .message_size_limit
        .saturating_add(config.cleanup.header_size_limit as u64)
        .saturating_add(CONTENT_MARGIN)
}

const HELLO: u8 = b'H';
const ENVELOPE: u8 = b'S';
const RECIPIENT: u8 = b'R';
const DATA: u8 = b'D';
const END: u8 = b'E';
const REPORT: u8 = b'P';
const RESULT: u8 = b'A';

/// How one recipient's delivery attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Sent,
    Deferred,
    Bounced,
}

impl Status {
    fn to_wire(self) -> u8 {
        match self {
            Status::Sent => 0,
            Status::Deferred => 1,
            Status::Bounced => 2,
        }
    }

    fn from_wire(b: u8) -> Option<Self> {
        match b {
            0 => Some(Status::Sent),
            1 => Some(Status::Deferred),
            2 => Some(Status::Bounced),
            _ => None,
        }
    }

    /// The class its enhanced status code must have.
    pub fn class(self) -> StatusClass {
        match self {
            Status::Sent => StatusClass::Success,
            Status::Deferred => StatusClass::Persistent,
            Status::Bounced => StatusClass::Permanent,
        }
    }
}

/// The DSN actions a delivered recipient may be owed (RFC 3464 2.3.3),
/// in wire order (1, 2).
const SUCCESS_ACTIONS: [DsnAction; 2] = [DsnAction::Delivered, DsnAction::Relayed];

/// One recipient's result, with what a log line and a DSN need: every
/// agent answers with these, in the queue manager or over this protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RcptResult {
    pub status: Status,
    /// RFC 3463 code.
    pub dsn: EnhancedStatus,
    /// Human text: `250 2.0.0 Ok`, `host X said: 550 ... (in reply to RCPT TO command)`.
    pub text: String,
    /// RFC 3464 Diagnostic-Code (`smtp; 550 5.1.1 ...`), when a peer answered.
    pub diagnostic: Option<String>,
    /// RFC 3464 Remote-MTA (`dns; 127.0.0.1`), for network agents.
    pub remote_mta: Option<String>,
    /// The DSN action a NOTIFY=SUCCESS recipient is owed: `delivered` by
    /// final delivery, `relayed` by a relay to a server without DSN, none
    /// when the next hop took over DSN duty (RFC 3461 5.2).
    pub success_action: Option<DsnAction>,
}

impl RcptResult {
    pub fn new(status: Status, dsn: EnhancedStatus, text: impl Into<String>) -> Self {
        Self { status, dsn, text: text.into(), diagnostic: None, remote_mta: None, success_action: None }
    }

    /// A delivery that ends here (Maildir, pipe, LMTP, discard).
    pub fn delivered(text: impl Into<String>) -> Self {
        Self {
            success_action: Some(DsnAction::Delivered),
            ..Self::new(Status::Sent, EnhancedStatus::undefined(StatusClass::Success), text)
        }
    }

    /// Appends the encoded record to `out`. Over-long texts are cut (at a
    /// character boundary) and control characters become spaces, and a
    /// code that is not an RFC 3463 code of the status's class (a next hop
    /// can answer anything) goes as the class's `X.0.0`, so an encoded
    /// result always decodes.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let class = self.status.class();
        let dsn = if self.dsn.class() == class { self.dsn } else { EnhancedStatus::undefined(class) };
        let action = match self.success_action.and_then(|a| SUCCESS_ACTIONS.iter().position(|s| *s == a)) {
            Some(i) if self.status == Status::Sent => i as u8 + 1,
            _ => 0,
        };
        let payload = Fields::new()
            .u8(self.status.to_wire())
            .str(&dsn.to_string())
            .str(&clean(&self.text, MAX_RESULT_TEXT))
            .str(&clean(self.diagnostic.as_deref().unwrap_or_default(), MAX_DIAGNOSTIC))
            .str(&clean(self.remote_mta.as_deref().unwrap_or_default(), MAX_RELAY))
            .u8(action)
            .finish();
        put_record(out, RESULT, &payload);
    }

    fn decode(rec: RawRecord<'_>) -> Result<Self, DeliveryError> {
        if rec.kind != RESULT {
            return Err(unexpected(rec.kind, "Result"));
        }
        let mut f = FieldReader::new(rec.payload);
        let status = Status::from_wire(f.u8()?).ok_or(DeliveryError::BadValue("Result status"))?;
        let dsn: EnhancedStatus = f.str(MAX_DSN_CODE)?.parse().map_err(|_| DeliveryError::BadValue("Result code"))?;
        if dsn.class() != status.class() {
            return Err(DeliveryError::BadValue("Result code"));
        }
        let text = printable(f.str(MAX_RESULT_TEXT)?, "Result text")?;
        let diagnostic = printable(f.str(MAX_DIAGNOSTIC)?, "Result diagnostic")?;
        let remote_mta = printable(f.str(MAX_RELAY)?, "Result remote MTA")?;
        let success_action = match (f.u8()?, status) {
            (0, _) => None,
            (n @ 1..=2, Status::Sent) => Some(SUCCESS_ACTIONS[usize::from(n) - 1]),
            _ => return Err(DeliveryError::BadValue("Result success action")),
        };
        f.finish()?;
        Ok(RcptResult {
            status,
            dsn,
            text: text.to_owned(),
            diagnostic: (!diagnostic.is_empty()).then(|| diagnostic.to_owned()),
            remote_mta: (!remote_mta.is_empty()).then(|| remote_mta.to_owned()),
            success_action,
        })
    }
}

/// An agent's answer for a batch: the relay it names in the log, and one
/// result per recipient, in batch order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub relay: String,
    pub results: Vec<RcptResult>,
}

impl Report {
    /// Appends the encoded report to `out`: its header, saying whether
    /// the connection takes another delivery (`keep`), then the results.
    pub fn encode(&self, keep: bool, out: &mut Vec<u8>) {
        Self::encode_header(&self.relay, keep, out);
        for r in &self.results {
            r.encode(out);
        }
    }
}

impl Report {
    /// Appends a report's header alone to `out`, for an agent that sends
    /// each result ([`RcptResult::encode`]) as its delivery ends.
    pub fn encode_header(relay: &str, keep: bool, out: &mut Vec<u8>) {
        put_record(out, REPORT, &Fields::new().str(&clean(relay, MAX_RELAY)).u8(u8::from(keep)).finish());
    }
}

/// One recipient of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    /// The mailbox, without brackets.
    pub address: String,
    pub notify: Notify,
    /// ORCPT as `addr-type;address`, or empty.
    pub orcpt: String,
}

impl Recipient {
    /// The original recipient: ORCPT's address when given, else the address.
    pub fn original(&self) -> &str {
        self.orcpt.split_once(';').map_or(self.address.as_str(), |(_, a)| a)
    }
}

/// The envelope of a request: everything but recipients and content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub queue_id: QueueId,
    /// The next hop, an `lmtp:` or `smtp:` route, or `pipe`.
    pub route: Route,
    /// Reverse-path without brackets; empty for `<>`.
    pub sender: String,
    pub body: BodyType,
    pub smtputf8: bool,
    pub ret: Option<DsnRet>,
    pub envid: String,
}

/// A complete delivery request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub envelope: Envelope,
    pub recipients: Vec<Recipient>,
    /// The message as queued.
    pub content: Vec<u8>,
}

/// Why a conversation ends early; whoever sees one closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DeliveryError {
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
    #[error("{0} octets while no request was expected")]
    TrailingData(usize),
}

fn unexpected(got: u8, expected: &'static str) -> DeliveryError {
    DeliveryError::OutOfOrder { got, expected }
}

/// `s` without control characters and cut to `limit` octets.
fn clean(s: &str, limit: usize) -> String {
    let mut out = String::with_capacity(s.len().min(limit));
    for c in s.chars().map(|c| if c.is_control() { ' ' } else { c }) {
        if out.len() + c.len_utf8() > limit {
            break;
        }
        out.push(c);
    }
    out
}

/// Text that ends up in logs and DSNs carries no control characters.
fn printable<'a>(s: &'a str, what: &'static str) -> Result<&'a str, DeliveryError> {
    if s.chars().any(char::is_control) {
        return Err(DeliveryError::BadValue(what));
    }
    Ok(s)
}

/// The opening record of a connection.
pub fn hello() -> Vec<u8> {
    let mut out = Vec::new();
    put_record(&mut out, HELLO, &Fields::new().str(PROTOCOL_NAME).u32(PROTOCOL_VERSION).finish());
    out
}

/// The records of one request before its content.
///
/// # Panics
/// If a field exceeds the record framing's field limit: the queue sends
/// only what it decoded from a verified queue file and its own route, whose
/// fields are far shorter, so that is a programming error.
pub fn encode_head(envelope: &Envelope, recipients: &[Recipient]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    let ret = ret_to_wire(envelope.ret);
    let payload = Fields::new()
        .str(envelope.queue_id.as_str())
        .str(&envelope.route.to_string())
        .str(&envelope.sender)
        .u8(body_to_wire(envelope.body))
        .u8(u8::from(envelope.smtputf8))
        .u8(ret)
        .str(&envelope.envid)
        .finish();
    put_record(&mut out, ENVELOPE, &payload);
    for r in recipients {
        put_record(
            &mut out,
            RECIPIENT,
            &Fields::new().str(&r.address).u8(notify_to_wire(r.notify)).str(&r.orcpt).finish(),
        );
    }
    out
}

/// The content of a request as (header, chunk) pairs followed by `End`,
/// for a writer that sends each chunk from where it is (no copy of the
/// message).
pub fn content_records(content: &[u8]) -> impl Iterator<Item = ([u8; 5], &[u8])> {
    content
        .chunks(MAX_DATA_CHUNK)
        .map(|chunk| (record_header(DATA, chunk.len()), chunk))
        .chain(std::iter::once((record_header(END, 0), &[][..])))
}

impl Request {
    /// The whole request, encoded in one buffer (tests and fuzz seeds; the
    /// queue writes [`encode_head`] and [`content_records`] as they are).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = encode_head(&self.envelope, &self.recipients);
        for (header, chunk) in content_records(&self.content) {
            out.extend_from_slice(&header);
            out.extend_from_slice(chunk);
        }
        out
    }
}

/// Where a [`RequestDecoder`] is in the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Hello,
    Envelope,
    FirstRecipient,
    RecipientsOrData,
    Data,
    /// A request was returned; its report is owed before anything else.
    Answering,
}

impl Stage {
    fn expecting(self) -> &'static str {
        match self {
            Stage::Hello => "Hello",
            Stage::Envelope => "Envelope",
            Stage::FirstRecipient => "Recipient",
            Stage::RecipientsOrData => "Recipient, Data or End",
            Stage::Data => "Data or End",
            Stage::Answering => "nothing (a report is owed)",
        }
    }
}

/// The agent's incremental, strict reader of the queue's requests: feed
/// it what the socket gave until it returns a complete request, answer
/// it, call [`RequestDecoder::answered`], and feed on.
#[derive(Debug)]
pub struct RequestDecoder {
    buf: Vec<u8>,
    stage: Stage,
    max_content: u64,
    envelope: Option<Envelope>,
    recipients: Vec<Recipient>,
    content: Vec<u8>,
}

impl RequestDecoder {
    /// A decoder that refuses content above `max_content` octets
    /// ([`max_content`] of the agent's configuration).
    pub fn new(max_content: u64) -> Self {
        Self {
            buf: Vec::new(),
            stage: Stage::Hello,
            max_content,
            envelope: None,
            recipients: Vec::new(),
            content: Vec::new(),
        }
    }

    /// Whether the decoder sits between requests (a connection may end
    /// there without losing anything).
    pub fn is_between_requests(&self) -> bool {
        self.stage == Stage::Envelope && self.buf.is_empty()
    }

    /// The report for the last request went out: the next may come.
    pub fn answered(&mut self) {
        if self.stage == Stage::Answering {
            self.stage = Stage::Envelope;
        }
    }

    /// Takes more bytes; returns a request once its `End` arrived. Bytes
    /// after `End`, before [`RequestDecoder::answered`], are an error.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<Request>, DeliveryError> {
        if self.stage == Stage::Answering {
            return Err(DeliveryError::TrailingData(bytes.len()));
        }
        self.buf.extend_from_slice(bytes);
        let buf = std::mem::take(&mut self.buf);
        let mut used = 0;
        let result = loop {
            let (kind, payload, n) = match take_record(&buf[used..], MAX_RECORD_PAYLOAD) {
                Ok(Some((rec, n))) => (rec.kind, rec.payload, n),
                Ok(None) => break Ok(None),
                Err(e) => break Err(e.into()),
            };
            used += n;
            if let Err(e) = self.advance(kind, payload) {
                break Err(e);
            }
            if self.stage == Stage::Answering {
                let left = buf.len() - used;
                if left > 0 {
                    break Err(DeliveryError::TrailingData(left));
                }
                let envelope = self.envelope.take().expect("an envelope precedes End");
                let request = Request {
                    envelope,
                    recipients: std::mem::take(&mut self.recipients),
                    content: std::mem::take(&mut self.content),
                };
                break Ok(Some(request));
            }
        };
        self.buf = buf;
        self.buf.drain(..used);
        result
    }

    fn advance(&mut self, kind: u8, payload: &[u8]) -> Result<(), DeliveryError> {
        let mut f = FieldReader::new(payload);
        self.stage = match (self.stage, kind) {
            (Stage::Hello, HELLO) => {
                let name = f.str(MAX_PROTOCOL_NAME)?.to_owned();
                let version = f.u32()?;
                if name != PROTOCOL_NAME || version != PROTOCOL_VERSION {
                    return Err(DeliveryError::WrongProtocol { name, version });
                }
                Stage::Envelope
            }
            (Stage::Envelope, ENVELOPE) => {
                self.envelope = Some(decode_envelope(&mut f)?);
                Stage::FirstRecipient
            }
            (Stage::FirstRecipient | Stage::RecipientsOrData, RECIPIENT) => {
                if self.recipients.len() >= MAX_RECIPIENTS {
                    return Err(DeliveryError::TooManyRecipients);
                }
                let address = f.str(MAX_PATH)?;
                if parse_mailbox(address, true).is_err() {
                    return Err(DeliveryError::BadValue("recipient address"));
                }
                let notify = notify_from_wire(f.u8()?).ok_or(DeliveryError::BadValue("NOTIFY"))?;
                let orcpt = printable(f.str(MAX_ORCPT)?, "original recipient")?;
                self.recipients.push(Recipient { address: address.to_owned(), notify, orcpt: orcpt.to_owned() });
                Stage::RecipientsOrData
            }
            (Stage::RecipientsOrData | Stage::Data, DATA) => {
                let total = self.content.len() as u64 + payload.len() as u64;
                if total > self.max_content {
                    return Err(DeliveryError::ContentTooLarge { limit: self.max_content });
                }
                self.content.extend_from_slice(payload);
                // Raw content, not fields: nothing to finish.
                self.stage = Stage::Data;
                return Ok(());
            }
            (Stage::RecipientsOrData | Stage::Data, END) => Stage::Answering,
            (stage, got) => return Err(unexpected(got, stage.expecting())),
        };
        f.finish()?;
        Ok(())
    }
}

fn decode_envelope(f: &mut FieldReader<'_>) -> Result<Envelope, DeliveryError> {
    let id: QueueId = f.str(crate::queue_id::QUEUE_ID_LEN)?.parse().map_err(|_| DeliveryError::BadValue("queue id"))?;
    let route: Route = f.str(MAX_ROUTE)?.parse().map_err(|_| DeliveryError::BadValue("route"))?;
    if !matches!(route, Route::Lmtp(_) | Route::Smtp(_) | Route::Pipe) {
        return Err(DeliveryError::BadValue("route"));
    }
    let sender = f.str(MAX_PATH)?;
    if !sender.is_empty() && parse_mailbox(sender, true).is_err() {
        return Err(DeliveryError::BadValue("sender address"));
    }
    let body = body_from_wire(f.u8()?).ok_or(DeliveryError::BadValue("body type"))?;
    let smtputf8 = match f.u8()? {
        0 => false,
        1 => true,
        _ => return Err(DeliveryError::BadValue("SMTPUTF8")),
    };
    let ret = ret_from_wire(f.u8()?).map_err(|()| DeliveryError::BadValue("RET"))?;
    let envid = printable(f.str(MAX_ENVID)?, "ENVID")?;
    Ok(Envelope { queue_id: id, route, sender: sender.to_owned(), body, smtputf8, ret, envid: envid.to_owned() })
}

/// The queue's reader of one report: its header, then exactly
/// `expected` results, then nothing. Results are taken one at a time, so
/// those that arrived before a broken record still count.
#[derive(Debug)]
pub struct ReportDecoder {
    buf: Vec<u8>,
    /// Start of the first record not yet taken.
    start: usize,
    expected: usize,
    /// The header: relay and keep.
    header: Option<(String, bool)>,
    results: Vec<RcptResult>,
}

/// Largest payload of a `Result` record.
const MAX_RESULT_PAYLOAD: usize = 1 + 4 * 2 + MAX_DSN_CODE + MAX_RESULT_TEXT + MAX_DIAGNOSTIC + MAX_RELAY + 1;
/// Largest payload of a `Report` record.
const MAX_REPORT_PAYLOAD: usize = 2 + MAX_RELAY + 1;

impl ReportDecoder {
    pub fn new(expected: usize) -> Self {
        Self { buf: Vec::new(), start: 0, expected, header: None, results: Vec::with_capacity(expected) }
    }

    /// Takes more bytes and decodes what they complete. `Ok(true)` once the
    /// report is whole. Bytes beyond it are an error.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<bool, DeliveryError> {
        self.buf.drain(..self.start);
        self.start = 0;
        self.buf.extend_from_slice(bytes);
        loop {
            if self.is_complete() {
                let left = self.buf.len() - self.start;
                return if left > 0 { Err(DeliveryError::TrailingData(left)) } else { Ok(true) };
            }
            let limit = if self.header.is_none() { MAX_REPORT_PAYLOAD } else { MAX_RESULT_PAYLOAD };
            let Some((rec, used)) = take_record(&self.buf[self.start..], limit)? else { return Ok(false) };
            if self.header.is_none() {
                if rec.kind != REPORT {
                    return Err(unexpected(rec.kind, "Report"));
                }
                let mut f = FieldReader::new(rec.payload);
                let relay = printable(f.str(MAX_RELAY)?, "Report relay")?.to_owned();
                let keep = match f.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(DeliveryError::BadValue("Report keep")),
                };
                f.finish()?;
                self.header = Some((relay, keep));
            } else {
                let result = RcptResult::decode(rec)?;
                self.results.push(result);
            }
            self.start += used;
        }
    }

    /// Whether the header and every expected result arrived.
    pub fn is_complete(&self) -> bool {
        self.header.is_some() && self.results.len() == self.expected
    }

    /// The relay named so far, if the header arrived.
    pub fn relay(&self) -> Option<&str> {
        self.header.as_ref().map(|(r, _)| r.as_str())
    }

    /// Whether the agent takes another request on this connection
    /// (meaningful once complete).
    pub fn keep(&self) -> bool {
        self.header.as_ref().is_some_and(|(_, k)| *k)
    }

    /// The results received so far, in recipient order.
    pub fn into_results(self) -> Vec<RcptResult> {
        self.results
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn es(s: &str) -> EnhancedStatus {
        s.parse().unwrap()
    }
    use crate::config::NextHop;

    const LIMIT: u64 = 1000;
    const ID: &str = "0000000010000100000A";

    fn request() -> Request {
        Request {
            envelope: Envelope {
                queue_id: ID.parse().unwrap(),
                route: Route::Lmtp(NextHop::Unix("/run/dovecot/lmtp".into())),
                sender: "a@example.test".into(),
                body: BodyType::EightBitMime,
                smtputf8: false,
                ret: Some(DsnRet::Headers),
                envid: "env+1".into(),
            },
            recipients: vec![
                Recipient {
                    address: "b@x.test".into(),
                    notify: Notify { success: true, ..Notify::default() },
                    orcpt: "rfc822;B@x.test".into(),
                },
                Recipient { address: "c@x.test".into(), notify: Notify::default(), orcpt: String::new() },
            ],
            content: b"Subject: x\r\n\r\nhi\r\n".to_vec(),
        }
    }

    fn rec(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        put_record(&mut v, kind, payload);
        v
    }

    fn envelope_with(route: &str, sender: &str, body: u8, ret: u8) -> Vec<u8> {
        rec(ENVELOPE, &Fields::new().str(ID).str(route).str(sender).u8(body).u8(0).u8(ret).str("").finish())
    }

    fn envelope() -> Vec<u8> {
        envelope_with("smtp:inet:127.0.0.1:25", "a@example.test", 7, 0)
    }

    fn recipient(address: &str) -> Vec<u8> {
        rec(RECIPIENT, &Fields::new().str(address).u8(0).str("").finish())
    }

    fn decode_all(wire: &[u8]) -> Result<Option<Request>, DeliveryError> {
        RequestDecoder::new(LIMIT).feed(wire)
    }

    #[test]
    fn requests_round_trip_byte_by_byte_on_one_connection() {
        let mut wire = hello();
        wire.extend(request().encode());
        let mut dec = RequestDecoder::new(LIMIT);
        let mut got = Vec::new();
        for (i, b) in wire.iter().enumerate() {
            let r = dec.feed(&[*b]).unwrap();
            assert_eq!(r.is_some(), i == wire.len() - 1, "at {i}");
            got.extend(r);
        }
        assert_eq!(got, vec![request()]);
        // Nothing may come before the report went out.
        assert!(matches!(dec.feed(b"x"), Err(DeliveryError::TrailingData(1))));
        dec.answered();
        assert!(dec.is_between_requests());
        let second = Request { content: Vec::new(), ..request() };
        assert_eq!(dec.feed(&second.encode()).unwrap(), Some(second));
    }

    /// The pipe agent's requests: route `pipe`, a null sender, octets
    /// of a BINARYMIME body, no content, content at the limit.
    #[test]
    fn pipe_requests_round_trip() {
        let pipe = |body, content: &[u8]| Request {
            envelope: Envelope { route: Route::Pipe, sender: String::new(), body, ..request().envelope },
            content: content.to_vec(),
            ..request()
        };
        for r in [
            pipe(BodyType::BinaryMime, b"\x00\r\n\n\xff"),
            pipe(BodyType::SevenBit, b""),
            pipe(BodyType::SevenBit, &[b'x'; LIMIT as usize]),
        ] {
            assert_eq!(decode_all(&[hello(), r.encode()].concat()), Ok(Some(r)));
        }
        assert_eq!(request().recipients[0].original(), "B@x.test");
        assert_eq!(request().recipients[1].original(), "c@x.test");
    }

    /// An agent may send the header first and each result as its
    /// delivery ends (pipe): the queue reads the same report.
    #[test]
    fn a_report_sent_result_by_result_decodes() {
        let mut wire = Vec::new();
        Report::encode_header(&report().relay, false, &mut wire);
        let mut dec = ReportDecoder::new(3);
        assert_eq!(dec.feed(&wire), Ok(false));
        assert_eq!(dec.relay(), Some("127.0.0.1[127.0.0.1]:24"));
        for (i, r) in report().results.iter().enumerate() {
            let mut one = Vec::new();
            r.encode(&mut one);
            assert_eq!(dec.feed(&one), Ok(i == 2));
        }
        assert!(!dec.keep());
        assert_eq!(dec.into_results(), report().results);
    }

    /// A table row: name, wire bytes, and the error the decoder must give.
    type RejectCase = (&'static str, Vec<u8>, fn(&DeliveryError) -> bool);

    /// Malformed, oversized, out-of-order and wrong-version requests: each
    /// must be refused before a byte goes to a next hop.
    #[test]
    fn decoder_rejects_table() {
        let end = rec(END, b"");
        let data = |n: usize| rec(DATA, &vec![b'x'; n]);
        let cat = |parts: &[&[u8]]| parts.concat();
        let h = hello();
        let cases: Vec<RejectCase> = vec![
            ("wrong version", rec(HELLO, &Fields::new().str(PROTOCOL_NAME).u32(2).finish()), |e| {
                matches!(e, DeliveryError::WrongProtocol { version: 2, .. })
            }),
            ("pipe protocol", rec(HELLO, &Fields::new().str("pipe").u32(1).finish()), |e| {
                matches!(e, DeliveryError::WrongProtocol { .. })
            }),
            ("envelope first", envelope(), |e| matches!(e, DeliveryError::OutOfOrder { got: ENVELOPE, .. })),
            ("hello twice", cat(&[&h, &h]), |e| matches!(e, DeliveryError::OutOfOrder { .. })),
            ("data before recipient", cat(&[&h, &envelope(), &data(1)]), |e| {
                matches!(e, DeliveryError::OutOfOrder { got: DATA, .. })
            }),
            ("end before recipient", cat(&[&h, &envelope(), &end]), |e| {
                matches!(e, DeliveryError::OutOfOrder { got: END, .. })
            }),
            (
                "recipient after data",
                cat(&[&h, &envelope(), &recipient("b@x.test"), &data(1), &recipient("c@x.test")]),
                |e| matches!(e, DeliveryError::OutOfOrder { got: RECIPIENT, .. }),
            ),
            ("report from the queue", cat(&[&h, &rec(REPORT, b"")]), |e| {
                matches!(e, DeliveryError::OutOfOrder { got: REPORT, .. })
            }),
            ("pipelined second request", cat(&[&h, &envelope(), &recipient("b@x.test"), &end, &envelope()]), |e| {
                matches!(e, DeliveryError::TrailingData(_))
            }),
            (
                "bad queue id",
                cat(&[&h, &rec(ENVELOPE, &Fields::new().str("../../etc/passwdAAAA").str("").finish())]),
                |e| matches!(e, DeliveryError::BadValue("queue id")),
            ),
            ("maildir route", cat(&[&h, &envelope_with("maildir", "", 7, 0)]), |e| {
                matches!(e, DeliveryError::BadValue("route"))
            }),
            ("discard route", cat(&[&h, &envelope_with("discard", "", 7, 0)]), |e| {
                matches!(e, DeliveryError::BadValue("route"))
            }),
            ("route by name", cat(&[&h, &envelope_with("smtp:inet:mx.example:25", "", 7, 0)]), |e| {
                matches!(e, DeliveryError::BadValue("route"))
            }),
            ("bad sender", cat(&[&h, &envelope_with("smtp:inet:127.0.0.1:25", "a b@x", 7, 0)]), |e| {
                matches!(e, DeliveryError::BadValue("sender address"))
            }),
            ("bad body", cat(&[&h, &envelope_with("smtp:inet:127.0.0.1:25", "", 3, 0)]), |e| {
                matches!(e, DeliveryError::BadValue("body type"))
            }),
            ("bad ret", cat(&[&h, &envelope_with("smtp:inet:127.0.0.1:25", "", 7, 3)]), |e| {
                matches!(e, DeliveryError::BadValue("RET"))
            }),
            ("bad recipient", cat(&[&h, &envelope(), &recipient("-oProxyCommand=x")]), |e| {
                matches!(e, DeliveryError::BadValue("recipient address"))
            }),
            (
                "NEVER with SUCCESS",
                cat(&[&h, &envelope(), &rec(RECIPIENT, &Fields::new().str("b@x.test").u8(3).str("").finish())]),
                |e| matches!(e, DeliveryError::BadValue("NOTIFY")),
            ),
            (
                "CRLF in orcpt",
                cat(&[
                    &h,
                    &envelope(),
                    &rec(RECIPIENT, &Fields::new().str("b@x.test").u8(0).str("rfc822;a\r\nb").finish()),
                ]),
                |e| matches!(e, DeliveryError::BadValue("original recipient")),
            ),
            (
                "address over path limit",
                cat(&[&h, &envelope(), &recipient(&format!("{}@x.test", "a".repeat(MAX_PATH)))]),
                |e| matches!(e, DeliveryError::Frame(FrameError::FieldTooLong { .. })),
            ),
            ("trailing field bytes", cat(&[&h, &envelope(), &recipient("b@x.test"), &rec(END, b"x")]), |e| {
                matches!(e, DeliveryError::Frame(FrameError::TrailingBytes { .. }))
            }),
            ("oversized record", cat(&[&h, &[DATA, 0x00, 0x01, 0x00, 0x01]]), |e| {
                matches!(e, DeliveryError::Frame(FrameError::Oversized { .. }))
            }),
            ("content over limit", cat(&[&h, &envelope(), &recipient("b@x.test"), &data(600), &data(401)]), |e| {
                matches!(e, DeliveryError::ContentTooLarge { limit: LIMIT })
            }),
        ];
        for (name, wire, want) in cases {
            let err = decode_all(&wire).expect_err(name);
            assert!(want(&err), "{name}: got {err:?}");
        }
    }

    #[test]
    fn recipient_count_is_bounded() {
        let mut wire = [hello(), envelope()].concat();
        for i in 0..=MAX_RECIPIENTS {
            wire.extend_from_slice(&recipient(&format!("r{i}@x.test")));
        }
        assert_eq!(decode_all(&wire), Err(DeliveryError::TooManyRecipients));
    }

    fn report() -> Report {
        Report {
            relay: "127.0.0.1[127.0.0.1]:24".into(),
            results: vec![
                RcptResult {
                    diagnostic: Some("smtp; 250 2.0.0 Ok".into()),
                    remote_mta: Some("dns; 127.0.0.1".into()),
                    ..RcptResult::delivered("250 2.0.0 Ok")
                },
                RcptResult {
                    success_action: Some(DsnAction::Relayed),
                    ..RcptResult::new(Status::Sent, es("2.0.0"), "250 2.0.0 Ok: queued")
                },
                RcptResult {
                    diagnostic: Some("smtp; 550 5.1.1 no such user".into()),
                    ..RcptResult::new(Status::Bounced, es("5.1.1"), "host x said: 550 5.1.1 no such user")
                },
            ],
        }
    }

    #[test]
    fn reports_round_trip_byte_by_byte() {
        let mut wire = Vec::new();
        report().encode(true, &mut wire);
        let mut dec = ReportDecoder::new(3);
        for (i, b) in wire.iter().enumerate() {
            assert_eq!(dec.feed(&[*b]).unwrap(), i == wire.len() - 1, "at {i}");
        }
        assert_eq!((dec.relay(), dec.keep()), (Some("127.0.0.1[127.0.0.1]:24"), true));
        assert_eq!(dec.into_results(), report().results);
        // A fourth result is more than was asked for.
        let mut dec = ReportDecoder::new(3);
        let mut extra = wire.clone();
        report().results[0].encode(&mut extra);
        assert!(matches!(dec.feed(&extra), Err(DeliveryError::TrailingData(_))));
    }

    /// Results before a broken record count; the rest is the caller's to
    /// defer.
    #[test]
    fn results_before_a_broken_record_count() {
        let mut wire = Vec::new();
        let one = Report { results: report().results[..1].to_vec(), ..report() };
        one.encode(false, &mut wire);
        wire.extend_from_slice(b"garbage!");
        let mut dec = ReportDecoder::new(2);
        assert!(dec.feed(&wire).is_err());
        assert!(!dec.keep());
        assert_eq!(dec.into_results(), one.results);
    }

    #[test]
    fn result_encoding_cleans_text() {
        let long = RcptResult::new(Status::Deferred, es("4.3.0"), format!("a\nb{}", "é".repeat(MAX_RESULT_TEXT)));
        let mut wire = Vec::new();
        Report { relay: "r\r\nx".into(), results: vec![long] }.encode(false, &mut wire);
        let mut dec = ReportDecoder::new(1);
        assert!(dec.feed(&wire).unwrap());
        assert_eq!(dec.relay(), Some("r  x"));
        let got = dec.into_results();
        assert!(got[0].text.starts_with("a b") && got[0].text.len() <= MAX_RESULT_TEXT, "{}", got[0].text.len());
    }

    /// A next hop can answer anything: a deferral with a 2xx greeting's
    /// code, a 3xx code, an action on a failure. The agent still sends a
    /// report the queue accepts, with the status's own class.
    #[test]
    fn results_with_codes_of_another_class_are_encoded_with_their_own() {
        let odd = [
            RcptResult::new(Status::Deferred, es("2.0.0"), "host x refused to talk to me: 250 hi"),
            RcptResult::new(Status::Deferred, es("5.7.0"), "host x said: 354 go (in reply to STARTTLS command)"),
            RcptResult {
                success_action: Some(DsnAction::Delivered),
                ..RcptResult::new(Status::Bounced, es("5.1.1"), "no")
            },
        ];
        let mut wire = Vec::new();
        Report { relay: "x".into(), results: odd.to_vec() }.encode(false, &mut wire);
        let mut dec = ReportDecoder::new(3);
        assert!(dec.feed(&wire).unwrap());
        let got = dec.into_results();
        assert_eq!((got[0].dsn, got[1].dsn, got[2].dsn), (es("4.0.0"), es("4.0.0"), es("5.1.1")));
        assert_eq!(got[2].success_action, None);
    }

    #[test]
    fn report_decoder_rejects_table() {
        let header = rec(REPORT, &Fields::new().str("relay").u8(0).finish());
        let result = |status: u8, dsn: &str, text: &str, action: u8| {
            let fields = Fields::new().u8(status).str(dsn).str(text).str("").str("").u8(action).finish();
            [header.clone(), rec(RESULT, &fields)].concat()
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("result before header", rec(RESULT, b"")),
            ("bad keep", rec(REPORT, &Fields::new().str("relay").u8(2).finish())),
            ("newline in relay", rec(REPORT, &Fields::new().str("a\nb").u8(0).finish())),
            ("unknown status", result(7, "2.0.0", "ok", 0)),
            ("class mismatch", result(0, "5.1.1", "ok", 0)),
            ("bad code", result(1, "4.x.0", "ok", 0)),
            ("newline in text", result(1, "4.3.0", "a\r\n<id>: to=<x>, status=sent", 0)),
            ("action on a deferral", result(1, "4.3.0", "later", 1)),
            ("unknown action", result(0, "2.0.0", "ok", 3)),
            ("oversized", vec![REPORT, 0x00, 0x10, 0x00, 0x00]),
        ];
        for (name, wire) in cases {
            let mut dec = ReportDecoder::new(1);
            assert!(dec.feed(&wire).is_err(), "{name}");
        }
    }
}
