//! The smtpd → cleanup conversation (protocol `cleanup`, version 1).
//!
//! One Unix stream connection carries one message transaction:
//!
//! ```text
//! smtpd                              cleanup
//!   Hello(cleanup, 1)          ->
//!   Client(addr, name, helo..) ->
//!   Sender(path, body, utf8..) ->
//!                              <-    QueueId(id)
//!   Recipient(path) x N        ->
//!   Data(chunk) x M            ->
//!   Edit(edit) x K             ->
//!   End                        ->
//!                              <-    Answer(code, enhanced, text)
//! ```
//!
//! `Client`, `Sender` and `Recipient` carry the envelope model of
//! [`crate::envelope`] in this protocol's own layout (the client address as
//! its canonical text); the queue file encodes the same model separately,
//! so changing one never changes the other. `Answer` carries a
//! [`ReplyCode`] and an [`EnhancedStatus`] of the same class.
//!
//! Records use the framing of [`crate::record`]. The reader on each side is
//! strict in Postfix's `ATTR_FLAG_STRICT` sense: an unknown record, an
//! oversized record, a malformed field or a record out of order ends the
//! conversation. [`RequestSequence`] encodes the order rule once so cleanup
//! (and the fuzz target) check exactly the same thing.
//!
//! `Edit` records carry what smtpd's filters decided about the message
//! ([`Edit`]): a policy server's PREPEND, HOLD or DISCARD, a milter's
//! header, body, recipient and sender changes, its quarantine. smtpd only
//! relays them, after the content and before `End`, in the order the
//! filters gave them; cleanup applies them before the commit and checks
//! the result as it checks everything else.

use crate::address::MAX_PATH;
use crate::envelope::{ClientInfo, MAX_ENVID, RecipientInfo, SaslLogin, SenderInfo, is_printable, parse_client_addr};
use crate::milter::{EsmtpArgs, HeaderName, HeaderValue, MAX_BODY_CHUNK, MilterAddress, Modification};
use crate::queue_id::QueueId;
use crate::record::{FieldReader, Fields, FrameError, RECORD_HEADER_LEN, RawRecord, put_record, take_record};
use crate::smtp_status::{EnhancedStatus, ReplyCode};
use crate::wire::{body_from_wire, body_to_wire, notify_from_wire, notify_to_wire, ret_from_wire, ret_to_wire};
use thiserror::Error;

/// Protocol name sent in the opening record.
pub const PROTOCOL_NAME: &str = "cleanup";
/// Protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest content chunk in one `Data` record.
pub const MAX_DATA_CHUNK: usize = 64 * 1024;
/// Largest payload any record of this protocol may declare: a content
/// chunk, or an `Edit` carrying a milter's largest header or body chunk
/// with its fields.
pub const MAX_RECORD_PAYLOAD: usize = MAX_DATA_CHUNK + 4096;
/// Limit for short text fields (host names, protocol names, reply text).
pub const MAX_TEXT_FIELD: usize = 1024;

const HELLO: u8 = b'H';
const CLIENT: u8 = b'C';
const SENDER: u8 = b'S';
const RECIPIENT: u8 = b'R';
const DATA: u8 = b'D';
const END: u8 = b'E';
const EDIT: u8 = b'X';
const QUEUE_ID: u8 = b'Q';
const ANSWER: u8 = b'A';

/// smtpd → cleanup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Hello { version: u32 },
    Client(ClientInfo),
    Sender(SenderInfo),
    Recipient(RecipientInfo),
    Data(Vec<u8>),
    Edit(Edit),
    End,
}

/// A change to the message that smtpd's filters decided; cleanup applies
/// it before the queue file is committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    /// A policy server's `PREPEND name:value`: a header field at the very
    /// top, above cleanup's `Received:`, written `name:value` exactly.
    Prepend { name: HeaderName, value: HeaderValue },
    /// A milter's end-of-message change, as the milter sent it. Header
    /// indexes refer to the header section the client sent (which is what
    /// the milters saw); the edits of all milters come in milter order.
    Milter(Modification),
    /// Keep the message in `hold/` (a policy HOLD, a milter's quarantine,
    /// `quarantine` as a milter's default action), with the reason logged.
    Hold { reason: String },
    /// Accept the message and drop it (a policy or milter DISCARD): the
    /// client gets 250, nothing is queued, and the reason is logged.
    Discard { reason: String },
}

/// `Edit` kinds: the first field of an `Edit` record.
mod edit_kind {
    pub const PREPEND: u8 = b'P';
    pub const HOLD: u8 = b'H';
    pub const DISCARD: u8 = b'D';
    pub const ADD_HEADER: u8 = b'a';
    pub const INSERT_HEADER: u8 = b'i';
    pub const CHANGE_HEADER: u8 = b'c';
    pub const REPLACE_BODY: u8 = b'b';
    pub const ADD_RECIPIENT: u8 = b'r';
    pub const ADD_RECIPIENT_ARGS: u8 = b'R';
    pub const DELETE_RECIPIENT: u8 = b'd';
    pub const CHANGE_SENDER: u8 = b's';
}

impl Edit {
    fn encode(&self) -> Vec<u8> {
        use edit_kind::*;
        let f = Fields::new();
        let header = |f: Fields, kind: u8, index: Option<u32>, name: &HeaderName, value: &HeaderValue| {
            let f = f.u8(kind);
            let f = match index {
                Some(i) => f.u32(i),
                None => f,
            };
            f.str(name.as_str()).bytes(value.as_bytes()).finish()
        };
        match self {
            Edit::Prepend { name, value } => header(f, PREPEND, None, name, value),
            Edit::Hold { reason } => f.u8(HOLD).str(reason).finish(),
            Edit::Discard { reason } => f.u8(DISCARD).str(reason).finish(),
            Edit::Milter(m) => match m {
                Modification::AddHeader { name, value } => header(f, ADD_HEADER, None, name, value),
                Modification::InsertHeader { index, name, value } => {
                    header(f, INSERT_HEADER, Some(*index), name, value)
                }
                Modification::ChangeHeader { index, name, value } => {
                    header(f, CHANGE_HEADER, Some(*index), name, value)
                }
                Modification::ReplaceBody(chunk) => f.u8(REPLACE_BODY).bytes(chunk).finish(),
                Modification::AddRecipient(a) => f.u8(ADD_RECIPIENT).str(a.as_str()).finish(),
                Modification::AddRecipientWithArgs { address, args } => {
                    f.u8(ADD_RECIPIENT_ARGS).str(address.as_str()).str(args.as_str()).finish()
                }
                Modification::DeleteRecipient(a) => f.u8(DELETE_RECIPIENT).str(a.as_str()).finish(),
                Modification::ChangeSender { address, args } => {
                    f.u8(CHANGE_SENDER).str(address.as_str()).str(args.as_str()).finish()
                }
            },
        }
    }

    fn decode(f: &mut FieldReader<'_>) -> Result<Self, IpcError> {
        use edit_kind::*;
        let bad = || IpcError::BadValue("Edit");
        let name = |f: &mut FieldReader<'_>| HeaderName::new(f.str(crate::milter::MAX_HEADER_NAME)?).ok_or_else(bad);
        let value =
            |f: &mut FieldReader<'_>| HeaderValue::new(f.bytes(crate::milter::MAX_HEADER_VALUE)?).ok_or_else(bad);
        let address = |f: &mut FieldReader<'_>| MilterAddress::new(f.str(crate::milter::MAX_ADDRESS)?).ok_or_else(bad);
        let args = |f: &mut FieldReader<'_>| EsmtpArgs::new(f.str(crate::milter::MAX_ESMTP_ARGS)?).ok_or_else(bad);
        Ok(match f.u8()? {
            PREPEND => Edit::Prepend { name: name(f)?, value: value(f)? },
            HOLD => Edit::Hold { reason: printable(f.str(MAX_TEXT_FIELD)?, "Edit")? },
            DISCARD => Edit::Discard { reason: printable(f.str(MAX_TEXT_FIELD)?, "Edit")? },
            ADD_HEADER => Edit::Milter(Modification::AddHeader { name: name(f)?, value: value(f)? }),
            INSERT_HEADER => {
                let index = f.u32()?;
                Edit::Milter(Modification::InsertHeader { index, name: name(f)?, value: value(f)? })
            }
            CHANGE_HEADER => {
                let index = f.u32()?;
                Edit::Milter(Modification::ChangeHeader { index, name: name(f)?, value: value(f)? })
            }
            REPLACE_BODY => Edit::Milter(Modification::ReplaceBody(f.bytes(MAX_BODY_CHUNK)?.to_vec())),
            ADD_RECIPIENT => Edit::Milter(Modification::AddRecipient(address(f)?)),
            ADD_RECIPIENT_ARGS => {
                Edit::Milter(Modification::AddRecipientWithArgs { address: address(f)?, args: args(f)? })
            }
            DELETE_RECIPIENT => Edit::Milter(Modification::DeleteRecipient(address(f)?)),
            CHANGE_SENDER => Edit::Milter(Modification::ChangeSender { address: address(f)?, args: args(f)? }),
            _ => return Err(bad()),
        })
    }
}

/// cleanup → smtpd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The id the message will be queued under (sent after `Sender`).
    QueueId(QueueId),
    /// The outcome after `End` (or earlier, to abort the transaction).
    /// The status's class always matches the code's.
    Answer { code: ReplyCode, status: EnhancedStatus, text: String },
}

/// Why a conversation ends early.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IpcError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("unknown record type {0:#04x}")]
    UnknownRecord(u8),
    #[error("record {got:?} out of order: expected {expected}")]
    OutOfOrder { got: &'static str, expected: &'static str },
    #[error("peer speaks {name} version {version}, not {PROTOCOL_NAME} version {PROTOCOL_VERSION}")]
    WrongProtocol { name: String, version: u32 },
    #[error("invalid field value in {0} record")]
    BadValue(&'static str),
}

impl Request {
    /// Record name used in diagnostics.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "Hello",
            Request::Client(_) => "Client",
            Request::Sender(_) => "Sender",
            Request::Recipient(_) => "Recipient",
            Request::Data(_) => "Data",
            Request::Edit(_) => "Edit",
            Request::End => "End",
        }
    }

    /// Appends the encoded record to `out`.
    ///
    /// # Panics
    /// If a `Data` chunk exceeds [`MAX_DATA_CHUNK`] (use [`encode_data`]).
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Request::Hello { version } => {
                put_record(out, HELLO, &Fields::new().str(PROTOCOL_NAME).u32(*version).finish())
            }
            Request::Client(c) => put_record(out, CLIENT, &encode_client(c)),
            Request::Sender(s) => put_record(out, SENDER, &encode_sender(s)),
            Request::Recipient(r) => put_record(out, RECIPIENT, &encode_recipient(r)),
            Request::Data(chunk) => {
                assert!(chunk.len() <= MAX_DATA_CHUNK, "Data chunk over MAX_DATA_CHUNK");
                put_record(out, DATA, chunk)
            }
            Request::Edit(e) => put_record(out, EDIT, &e.encode()),
            Request::End => put_record(out, END, &[]),
        }
    }

    /// Decodes one record's payload, checking every field.
    pub fn decode(rec: RawRecord<'_>) -> Result<Self, IpcError> {
        let mut f = FieldReader::new(rec.payload);
        let req = match rec.kind {
            HELLO => {
                let name = f.str(MAX_TEXT_FIELD)?.to_owned();
                let version = f.u32()?;
                if name != PROTOCOL_NAME || version != PROTOCOL_VERSION {
                    return Err(IpcError::WrongProtocol { name, version });
                }
                Request::Hello { version }
            }
            CLIENT => Request::Client(decode_client(&mut f)?),
            SENDER => Request::Sender(decode_sender(&mut f)?),
            RECIPIENT => Request::Recipient(decode_recipient(&mut f)?),
            DATA if rec.payload.len() > MAX_DATA_CHUNK => return Err(IpcError::BadValue("Data")),
            DATA => return Ok(Request::Data(rec.payload.to_vec())),
            EDIT => Request::Edit(Edit::decode(&mut f)?),
            END => Request::End,
            other => return Err(IpcError::UnknownRecord(other)),
        };
        f.finish()?;
        Ok(req)
    }
}

// This protocol's encoding of the envelope (crate::envelope). The queue
// file has its own (crate::queue_file); the two may differ.

fn encode_client(c: &ClientInfo) -> Vec<u8> {
    let fields = Fields::new().str(&c.addr.to_string()).str(&c.name).str(&c.helo).str(&c.protocol).str(&c.tls);
    match &c.auth {
        None => fields.u8(0),
        Some(login) => fields.u8(1).str(&login.method).str(&login.username),
    }
    .finish()
}

fn decode_client(f: &mut FieldReader<'_>) -> Result<ClientInfo, IpcError> {
    let addr = parse_client_addr(f.str(MAX_TEXT_FIELD)?).ok_or(IpcError::BadValue("Client"))?;
    Ok(ClientInfo {
        addr,
        name: printable(f.str(MAX_TEXT_FIELD)?, "Client")?,
        helo: printable(f.str(MAX_TEXT_FIELD)?, "Client")?,
        protocol: printable(f.str(MAX_TEXT_FIELD)?, "Client")?,
        tls: printable(f.str(MAX_TEXT_FIELD)?, "Client")?,
        auth: match f.u8()? {
            0 => None,
            1 => Some(SaslLogin {
                method: printable(f.str(MAX_TEXT_FIELD)?, "Client")?,
                username: printable(f.str(MAX_TEXT_FIELD)?, "Client")?,
            }),
            _ => return Err(IpcError::BadValue("Client")),
        },
    })
}

fn encode_sender(s: &SenderInfo) -> Vec<u8> {
    let ret = ret_to_wire(s.ret);
    Fields::new().str(&s.address).u8(body_to_wire(s.body)).u8(u8::from(s.smtputf8)).u8(ret).str(&s.envid).finish()
}

fn decode_sender(f: &mut FieldReader<'_>) -> Result<SenderInfo, IpcError> {
    let address = printable(f.str(MAX_PATH)?, "Sender")?;
    let body = body_from_wire(f.u8()?).ok_or(IpcError::BadValue("Sender"))?;
    let smtputf8 = match f.u8()? {
        0 => false,
        1 => true,
        _ => return Err(IpcError::BadValue("Sender")),
    };
    let ret = ret_from_wire(f.u8()?).map_err(|()| IpcError::BadValue("Sender"))?;
    let envid = printable(f.str(MAX_ENVID)?, "Sender")?;
    Ok(SenderInfo { address, body, smtputf8, ret, envid })
}

fn encode_recipient(r: &RecipientInfo) -> Vec<u8> {
    Fields::new().str(&r.address).u8(notify_to_wire(r.notify)).str(&r.orcpt).finish()
}

fn decode_recipient(f: &mut FieldReader<'_>) -> Result<RecipientInfo, IpcError> {
    let address = printable(f.str(MAX_PATH)?, "Recipient")?;
    let notify = notify_from_wire(f.u8()?).ok_or(IpcError::BadValue("Recipient"))?;
    // ORCPT is "addr-type;" plus at most a path's worth of address.
    let orcpt = printable(f.str(MAX_PATH + 32)?, "Recipient")?;
    Ok(RecipientInfo { address, notify, orcpt })
}

/// Encodes message content as as many `Data` records as it needs.
pub fn encode_data(content: &[u8], out: &mut Vec<u8>) {
    for chunk in content.chunks(MAX_DATA_CHUNK) {
        put_record(out, DATA, chunk);
    }
}

/// See [`is_printable`].
fn printable(s: &str, record: &'static str) -> Result<String, IpcError> {
    if !is_printable(s) {
        return Err(IpcError::BadValue(record));
    }
    Ok(s.to_owned())
}

impl Reply {
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Reply::QueueId(id) => put_record(out, QUEUE_ID, &Fields::new().str(id.as_str()).finish()),
            Reply::Answer { code, status, text } => put_record(
                out,
                ANSWER,
                &Fields::new().u32(u32::from(code.get())).str(&status.to_string()).str(text).finish(),
            ),
        }
    }

    pub fn decode(rec: RawRecord<'_>) -> Result<Self, IpcError> {
        let mut f = FieldReader::new(rec.payload);
        let reply = match rec.kind {
            QUEUE_ID => {
                let id = QueueId::parse(f.str(MAX_TEXT_FIELD)?).map_err(|_| IpcError::BadValue("QueueId"))?;
                Reply::QueueId(id)
            }
            ANSWER => {
                let bad = || IpcError::BadValue("Answer");
                let code = u16::try_from(f.u32()?).ok().and_then(ReplyCode::new).ok_or_else(bad)?;
                let status: EnhancedStatus = f.str(MAX_TEXT_FIELD)?.parse().map_err(|_| bad())?;
                if code.status_class() != Some(status.class()) {
                    return Err(bad());
                }
                let text = printable(f.str(MAX_TEXT_FIELD)?, "Answer")?;
                Reply::Answer { code, status, text }
            }
            other => return Err(IpcError::UnknownRecord(other)),
        };
        f.finish()?;
        Ok(reply)
    }
}

/// A request as [`Decoder::next_request_in_place`] returns it: message
/// content is borrowed from the decoder's buffer instead of copied.
#[derive(Debug, PartialEq, Eq)]
pub enum RequestInPlace<'a> {
    Data(&'a [u8]),
    /// Any other request (never `Request::Data`).
    Other(Request),
}

/// Incremental record decoder: feed it whatever the socket gave (or let it
/// read from the socket itself), take complete records out. Records are
/// taken by advancing an offset; the consumed prefix is dropped once per
/// feed or read, not once per record, so a read holding many small
/// records costs one move, not one per record. The buffer holds at most
/// one incomplete record plus one read, and never shrinks, so a long
/// conversation allocates once.
#[derive(Debug, Default)]
pub struct Decoder {
    /// `buf[start..end]` is undecoded input; the rest is room to read into.
    buf: Vec<u8>,
    /// Start of the first record not yet taken.
    start: usize,
    end: usize,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets any input, keeping the buffer: a process that decodes one
    /// conversation after another (cleanup, a transaction per connection)
    /// reuses one decoder instead of allocating and zeroing a read buffer
    /// per message.
    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        self.room_for(bytes.len()).copy_from_slice(bytes);
        self.end += bytes.len();
    }

    /// One `read` of at most `max` octets from `source` straight into the
    /// buffer (no copy through a buffer of the caller's); returns what
    /// `read` returned.
    pub fn read_from(&mut self, source: &mut impl std::io::Read, max: usize) -> std::io::Result<usize> {
        let n = source.read(self.room_for(max))?;
        self.end += n;
        Ok(n)
    }

    /// Drops the consumed prefix and returns `len` octets of room after
    /// the undecoded input.
    fn room_for(&mut self, len: usize) -> &mut [u8] {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() < self.end + len {
            self.buf.resize(self.end + len, 0);
        }
        &mut self.buf[self.end..self.end + len]
    }

    /// Whether bytes of an incomplete record are waiting.
    pub fn has_partial(&self) -> bool {
        self.start < self.end
    }

    /// Takes the next complete record through `decode`, or `None` if more
    /// bytes are needed.
    pub fn next_with<T>(
        &mut self,
        decode: impl FnOnce(RawRecord<'_>) -> Result<T, IpcError>,
    ) -> Result<Option<T>, IpcError> {
        let Some((rec, used)) = take_record(&self.buf[self.start..self.end], MAX_RECORD_PAYLOAD)? else {
            return Ok(None);
        };
        let value = decode(rec)?;
        self.start += used;
        Ok(Some(value))
    }

    pub fn next_request(&mut self) -> Result<Option<Request>, IpcError> {
        self.next_with(Request::decode)
    }

    /// As [`Decoder::next_request`], but content stays where it is: the
    /// caller copies it once, to where it goes.
    pub fn next_request_in_place(&mut self) -> Result<Option<RequestInPlace<'_>>, IpcError> {
        let Some((rec, used)) = take_record(&self.buf[self.start..self.end], MAX_RECORD_PAYLOAD)? else {
            return Ok(None);
        };
        let range = self.start + RECORD_HEADER_LEN..self.start + used;
        let kind = rec.kind;
        if kind == DATA && rec.payload.len() > MAX_DATA_CHUNK {
            return Err(IpcError::BadValue("Data"));
        }
        let other = if kind == DATA { None } else { Some(Request::decode(rec)?) };
        self.start += used;
        Ok(Some(match other {
            None => RequestInPlace::Data(&self.buf[range]),
            Some(req) => RequestInPlace::Other(req),
        }))
    }

    pub fn next_reply(&mut self) -> Result<Option<Reply>, IpcError> {
        self.next_with(Reply::decode)
    }
}

/// The order rule for requests, as a state machine cleanup drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RequestSequence {
    #[default]
    AwaitHello,
    AwaitClient,
    AwaitSender,
    AwaitFirstRecipient,
    RecipientsOrData,
    Data,
    Edits,
    Done,
}

impl RequestSequence {
    /// Advances over `req`, or says what was expected instead.
    pub fn advance(&mut self, req: &Request) -> Result<(), IpcError> {
        self.advance_over(req.name())
    }

    /// As [`RequestSequence::advance`], for a request decoded in place.
    pub fn advance_in_place(&mut self, req: &RequestInPlace<'_>) -> Result<(), IpcError> {
        match req {
            RequestInPlace::Data(_) => self.advance_over("Data"),
            RequestInPlace::Other(r) => self.advance(r),
        }
    }

    /// `name` is a [`Request::name`].
    fn advance_over(&mut self, name: &'static str) -> Result<(), IpcError> {
        use RequestSequence::*;
        let next = match (*self, name) {
            (AwaitHello, "Hello") => AwaitClient,
            (AwaitClient, "Client") => AwaitSender,
            (AwaitSender, "Sender") => AwaitFirstRecipient,
            (AwaitFirstRecipient | RecipientsOrData, "Recipient") => RecipientsOrData,
            (RecipientsOrData | Data, "Data") => Data,
            (RecipientsOrData | Data | Edits, "Edit") => Edits,
            (RecipientsOrData | Data | Edits, "End") => Done,
            (state, got) => return Err(IpcError::OutOfOrder { got, expected: state.expecting() }),
        };
        *self = next;
        Ok(())
    }

    fn expecting(self) -> &'static str {
        use RequestSequence::*;
        match self {
            AwaitHello => "Hello",
            AwaitClient => "Client",
            AwaitSender => "Sender",
            AwaitFirstRecipient => "Recipient",
            RecipientsOrData => "Recipient, Data, Edit or End",
            Data => "Data, Edit or End",
            Edits => "Edit or End",
            Done => "nothing (conversation is over)",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{BodyType, DsnRet, Notify};
    use crate::smtp_status::StatusClass;
    use std::net::{IpAddr, Ipv4Addr};

    fn client() -> ClientInfo {
        ClientInfo {
            addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            name: "localhost".into(),
            helo: "client.test".into(),
            protocol: "ESMTP".into(),
            tls: String::new(),
            auth: None,
        }
    }

    fn sender() -> SenderInfo {
        SenderInfo {
            address: "a@example.test".into(),
            body: BodyType::EightBitMime,
            smtputf8: false,
            ret: Some(DsnRet::Headers),
            envid: "QQ314159".into(),
        }
    }

    fn recipient(address: &str) -> RecipientInfo {
        RecipientInfo {
            address: address.into(),
            notify: Notify { failure: true, delay: true, ..Notify::default() },
            orcpt: format!("rfc822;{address}"),
        }
    }

    fn valid_conversation() -> Vec<Request> {
        vec![
            Request::Hello { version: PROTOCOL_VERSION },
            Request::Client(client()),
            Request::Sender(sender()),
            Request::Recipient(recipient("b@example.test")),
            Request::Data(b"Subject: x\r\n\r\nhi\r\n".to_vec()),
            Request::Edit(Edit::Hold { reason: "policy said so".into() }),
            Request::End,
        ]
    }

    fn every_edit() -> Vec<Edit> {
        let name = |n: &str| HeaderName::new(n).unwrap();
        let value = |v: &[u8]| HeaderValue::new(v).unwrap();
        let address = |a: &str| MilterAddress::new(a).unwrap();
        vec![
            Edit::Prepend { name: name("X-Greylist"), value: value(b" delayed 300 seconds") },
            Edit::Hold { reason: "milter quarantine: suspicious".into() },
            Edit::Discard { reason: "policy DISCARD".into() },
            Edit::Milter(Modification::AddHeader { name: name("X-Spam"), value: value(b"yes\r\n\tscore=9") }),
            Edit::Milter(Modification::InsertHeader { index: 0, name: name("A-R"), value: value(b"mx; dkim=pass") }),
            Edit::Milter(Modification::ChangeHeader { index: 2, name: name("Subject"), value: value(b"") }),
            Edit::Milter(Modification::ReplaceBody(vec![b'x'; MAX_BODY_CHUNK])),
            Edit::Milter(Modification::AddRecipient(address("<c@example.test>"))),
            Edit::Milter(Modification::AddRecipientWithArgs {
                address: address("d@example.test"),
                args: EsmtpArgs::new("NOTIFY=NEVER").unwrap(),
            }),
            Edit::Milter(Modification::DeleteRecipient(address("<b@example.test>"))),
            Edit::Milter(Modification::ChangeSender { address: address("<>"), args: EsmtpArgs::new("").unwrap() }),
        ]
    }

    /// The AUTH login travels with the client, and only a well-formed one.
    #[test]
    fn client_login_round_trips() {
        let login = SaslLogin { method: "PLAIN".into(), username: "alice@example.test".into() };
        let with_login = ClientInfo { auth: Some(login), ..client() };
        for c in [client(), with_login] {
            let mut wire = Vec::new();
            Request::Client(c.clone()).encode(&mut wire);
            let mut dec = Decoder::new();
            dec.feed(&wire);
            assert_eq!(dec.next_request().unwrap(), Some(Request::Client(c)));
        }
        let bad = SaslLogin { method: "PLAIN".into(), username: "a\r\nb".into() };
        let mut wire = Vec::new();
        Request::Client(ClientInfo { auth: Some(bad), ..client() }).encode(&mut wire);
        let mut dec = Decoder::new();
        dec.feed(&wire);
        assert!(dec.next_request().is_err());
    }

    /// Every edit survives the wire, the largest body chunk included, and
    /// a field a filter could not have sent is refused.
    #[test]
    fn edits_round_trip_and_validate() {
        for edit in every_edit() {
            let mut wire = Vec::new();
            Request::Edit(edit.clone()).encode(&mut wire);
            let mut dec = Decoder::new();
            dec.feed(&wire);
            assert_eq!(dec.next_request().unwrap(), Some(Request::Edit(edit)));
        }
        let bad: [&[u8]; 5] = [b"Pbad name", b"Z", b"", b"a", b"H"];
        for payload in bad {
            let mut wire = Vec::new();
            put_record(&mut wire, EDIT, payload);
            let mut dec = Decoder::new();
            dec.feed(&wire);
            assert!(dec.next_request().is_err(), "{payload:?}");
        }
        // A header name with a colon, and a line break that does not fold.
        for (name, value) in [("X:Y", &b"v"[..]), ("X", &b"a\nb"[..])] {
            let mut wire = Vec::new();
            put_record(&mut wire, EDIT, &Fields::new().u8(b'a').str(name).bytes(value).finish());
            let mut dec = Decoder::new();
            dec.feed(&wire);
            assert_eq!(dec.next_request(), Err(IpcError::BadValue("Edit")), "{name} {value:?}");
        }
    }

    #[test]
    fn round_trip_byte_by_byte() {
        let mut wire = Vec::new();
        for r in valid_conversation() {
            r.encode(&mut wire);
        }
        let mut dec = Decoder::new();
        let mut seq = RequestSequence::default();
        let mut got = Vec::new();
        for b in wire {
            dec.feed(&[b]);
            while let Some(r) = dec.next_request().unwrap() {
                seq.advance(&r).unwrap();
                got.push(r);
            }
        }
        assert_eq!(got, valid_conversation());
        assert_eq!(seq, RequestSequence::Done);
    }

    /// A table row: name, wire bytes, and the error the decoder must give.
    type RejectCase = (&'static str, Vec<u8>, fn(&IpcError) -> bool);

    /// Malformed, oversized and out-of-order records: each must be refused.
    #[test]
    fn decoder_rejects_table() {
        let rec = |kind: u8, payload: &[u8]| {
            let mut v = Vec::new();
            put_record(&mut v, kind, payload);
            v
        };
        let cases: Vec<RejectCase> = vec![
            ("unknown type", rec(b'Z', b""), |e| matches!(e, IpcError::UnknownRecord(b'Z'))),
            ("oversized", vec![DATA, 0x00, 0x02, 0x00, 0x00], |e| {
                matches!(e, IpcError::Frame(FrameError::Oversized { .. }))
            }),
            ("wrong protocol", rec(HELLO, &Fields::new().str("smtp").u32(1).finish()), |e| {
                matches!(e, IpcError::WrongProtocol { .. })
            }),
            ("wrong version", rec(HELLO, &Fields::new().str(PROTOCOL_NAME).u32(2).finish()), |e| {
                matches!(e, IpcError::WrongProtocol { .. })
            }),
            ("data chunk over MAX_DATA_CHUNK", rec(DATA, &vec![b'x'; MAX_DATA_CHUNK + 1]), |e| {
                matches!(e, IpcError::BadValue("Data"))
            }),
            ("trailing bytes", rec(END, b"x"), |e| matches!(e, IpcError::Frame(FrameError::TrailingBytes { .. }))),
            ("field overrun", rec(RECIPIENT, &[0, 200, b'a']), |e| {
                matches!(e, IpcError::Frame(FrameError::FieldOverrun { .. }))
            }),
            ("bad body type", rec(SENDER, &Fields::new().str("a@b.test").u8(6).u8(0).u8(0).str("").finish()), |e| {
                matches!(e, IpcError::BadValue("Sender"))
            }),
            (
                "CRLF in helo",
                rec(CLIENT, &Fields::new().str("1.2.3.4").str("x").str("a\r\nX-Evil: 1").str("SMTP").str("").finish()),
                |e| matches!(e, IpcError::BadValue("Client")),
            ),
            (
                "client address not an address",
                rec(CLIENT, &Fields::new().str("unknown").str("x").str("h").str("SMTP").str("").finish()),
                |e| matches!(e, IpcError::BadValue("Client")),
            ),
            (
                "client address not in canonical form",
                rec(CLIENT, &Fields::new().str("2001:DB8::1").str("x").str("h").str("SMTP").str("").finish()),
                |e| matches!(e, IpcError::BadValue("Client")),
            ),
            (
                "NOTIFY=NEVER with SUCCESS",
                rec(RECIPIENT, &Fields::new().str("a@b.test").u8(0b0011).str("").finish()),
                |e| matches!(e, IpcError::BadValue("Recipient")),
            ),
            (
                "ENVID over 100",
                rec(SENDER, &Fields::new().str("a@b.test").u8(7).u8(0).u8(0).str(&"e".repeat(101)).finish()),
                |e| matches!(e, IpcError::Frame(FrameError::FieldTooLong { .. })),
            ),
            ("address over path limit", rec(RECIPIENT, &Fields::new().str(&"a".repeat(MAX_PATH + 1)).finish()), |e| {
                matches!(e, IpcError::Frame(FrameError::FieldTooLong { .. }))
            }),
        ];
        for (name, wire, want) in cases {
            let mut dec = Decoder::new();
            dec.feed(&wire);
            let err = dec.next_request().expect_err(name);
            assert!(want(&err), "{name}: got {err:?}");
        }
    }

    /// Several records and the start of another in one read: all complete
    /// ones come out, the partial one waits, and the next feed completes it.
    #[test]
    fn many_records_in_one_feed() {
        let mut wire = Vec::new();
        for _ in 0..100 {
            Request::Data(b"x".to_vec()).encode(&mut wire);
        }
        let mut end = Vec::new();
        Request::End.encode(&mut end);
        wire.extend_from_slice(&end[..2]);
        let mut dec = Decoder::new();
        dec.feed(&wire);
        for _ in 0..100 {
            assert_eq!(dec.next_request().unwrap(), Some(Request::Data(b"x".to_vec())));
        }
        assert_eq!(dec.next_request().unwrap(), None);
        assert!(dec.has_partial());
        dec.feed(&end[2..]);
        assert_eq!(dec.next_request().unwrap(), Some(Request::End));
        assert!(!dec.has_partial());
    }

    /// Reading straight into the decoder, in pieces that split records
    /// anywhere, gives the same requests as decoding the whole wire, and
    /// content comes out in place.
    #[test]
    fn in_place_reads_agree_with_whole_decoding() {
        let mut wire = Vec::new();
        let conv = valid_conversation();
        for req in &conv {
            req.encode(&mut wire);
        }
        for piece in [1, 2, 7, 64, 4096] {
            let mut source = std::io::Cursor::new(wire.clone());
            let (mut dec, mut seq, mut got) = (Decoder::new(), RequestSequence::default(), Vec::new());
            while dec.read_from(&mut source, piece).unwrap() > 0 {
                while let Some(req) = dec.next_request_in_place().unwrap() {
                    seq.advance_in_place(&req).unwrap();
                    got.push(match req {
                        RequestInPlace::Data(chunk) => Request::Data(chunk.to_vec()),
                        RequestInPlace::Other(r) => r,
                    });
                }
            }
            assert_eq!(got, conv, "pieces of {piece}");
            assert!(!dec.has_partial());
        }
        let mut dec = Decoder::new();
        Request::Data(vec![1; 3]).encode(&mut wire);
        dec.feed(&wire[wire.len() - 8..]);
        let mut seq = RequestSequence::default();
        let data = dec.next_request_in_place().unwrap().unwrap();
        assert_eq!(data, RequestInPlace::Data(&[1, 1, 1]));
        assert!(matches!(seq.advance_in_place(&data), Err(IpcError::OutOfOrder { got: "Data", .. })));
    }

    #[test]
    fn sequence_rejects_out_of_order() {
        let conv = valid_conversation();
        let orders: &[&[usize]] = &[
            &[1],                // Client before Hello
            &[0, 2],             // Sender before Client
            &[0, 1, 2, 4],       // Data before any Recipient
            &[0, 1, 2, 6],       // End before any Recipient
            &[0, 1, 2, 5],       // Edit before any Recipient
            &[0, 1, 2, 3, 4, 3], // Recipient after Data
            &[0, 1, 2, 3, 5, 4], // Data after an Edit
            &[0, 1, 2, 3, 5, 3], // Recipient after an Edit
            &[0, 1, 2, 3, 6, 4], // anything after End
            &[0, 0],             // Hello twice
        ];
        for order in orders {
            let mut seq = RequestSequence::default();
            let (last, init) = order.split_last().unwrap();
            for &i in init {
                seq.advance(&conv[i]).unwrap();
            }
            let err = seq.advance(&conv[*last]).expect_err("must be out of order");
            assert!(matches!(err, IpcError::OutOfOrder { .. }), "{order:?}: {err:?}");
        }
    }

    #[test]
    fn replies_round_trip_and_validate() {
        let replies = [
            Reply::QueueId(QueueId::parse("0000000010000100000A").unwrap()),
            Reply::Answer {
                code: ReplyCode::of(250),
                status: EnhancedStatus::undefined(StatusClass::Success),
                text: "Ok".into(),
            },
        ];
        let mut wire = Vec::new();
        for r in &replies {
            r.encode(&mut wire);
        }
        let mut dec = Decoder::new();
        dec.feed(&wire);
        assert_eq!(dec.next_reply().unwrap(), Some(replies[0].clone()));
        assert_eq!(dec.next_reply().unwrap(), Some(replies[1].clone()));

        let mut bad = Vec::new();
        put_record(&mut bad, QUEUE_ID, &Fields::new().str("../../x").finish());
        let mut dec = Decoder::new();
        dec.feed(&bad);
        assert!(dec.next_reply().is_err());

        let answer = |code: u32, status: &str| {
            let mut wire = Vec::new();
            put_record(&mut wire, ANSWER, &Fields::new().u32(code).str(status).str("text").finish());
            let mut dec = Decoder::new();
            dec.feed(&wire);
            dec.next_reply()
        };
        assert!(answer(451, "4.3.0").is_ok());
        for (code, status) in [(999, "5.0.0"), (199, "2.0.0"), (452, "5.3.4"), (354, "2.0.0"), (550, ""), (550, "5.1")]
        {
            assert_eq!(answer(code, status), Err(IpcError::BadValue("Answer")), "{code} {status:?}");
        }
    }
}
