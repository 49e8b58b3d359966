//! One message transaction from smtpd, checked record by record.
//!
//! The conversation order is `mortal_proto::ipc::RequestSequence`; this
//! module adds the content rules: address syntax, accepted domains,
//! duplicate recipients, the size limits, and the header fix-ups. A refusal
//! that smtpd could not have known about (size, hops) is remembered and
//! answered at `End`, so smtpd, which streams the data, is never cut off
//! mid-write; a protocol violation is answered at once and ends the
//! conversation.
//!
//! The filters' `Edit` records are collected as they come
//! (`crate::edit`) and applied at `End`: a message they change is
//! rebuilt into a second temporary file before the one commit, one they
//! only hold is committed into `hold/`, one they discard is dropped with a
//! 250.

use crate::checks::{self, BodyChecker, ContentChecks};
use crate::edit::{EditReject, Edits, Limits};
use crate::header::{self, Envelope, HeaderEnd, HeaderReject};
use crate::spool::{self, Destination, Spool};
use mortal_libmaster::log;
use mortal_proto::address;
use mortal_proto::config::Config;
use mortal_proto::envelope::{ClientInfo, RecipientInfo, SenderInfo};
use mortal_proto::ipc::{Decoder, Edit, IpcError, Reply, Request, RequestInPlace, RequestSequence};
use mortal_proto::queue_file::{Encoder, QueuedRecipient};
use mortal_proto::queue_id::QueueId;
use mortal_proto::relay;
use mortal_proto::smtp_status::{EnhancedStatus, ReplyCode, StatusClass};
use mortal_proto::spool::TempFile;
use mortal_proto::table::Aliases;
use std::cell::RefCell;
use std::collections::HashSet;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::time::SystemTime;

/// RFC 3848 `with` values (and their RFC 6531 UTF8 forms) smtpd may claim.
const KNOWN_PROTOCOLS: &[&str] =
    &["SMTP", "ESMTP", "ESMTPA", "ESMTPS", "ESMTPSA", "UTF8SMTP", "UTF8SMTPA", "UTF8SMTPS", "UTF8SMTPSA"];
/// Bytes read from smtpd per call.
const READ_CHUNK: usize = 64 * 1024;

/// What every transaction in this process shares.
#[derive(Debug)]
pub struct Context<'a> {
    config: &'a Config,
    spool: &'a Spool,
    /// `[server] virtual_alias_maps`, loaded at process start.
    aliases: &'a Aliases,
    /// `[cleanup] header_checks` and `body_checks`, loaded at start.
    checks: &'a ContentChecks,
    pid: u32,
    /// The read buffer, kept from one transaction (connection) to the
    /// next: a fresh one per message cost a 64 KiB allocation, zeroed.
    decoder: RefCell<Decoder>,
}

impl<'a> Context<'a> {
    pub fn new(config: &'a Config, spool: &'a Spool, aliases: &'a Aliases, checks: &'a ContentChecks) -> Self {
        Self { config, spool, aliases, checks, pid: std::process::id(), decoder: RefCell::new(Decoder::new()) }
    }
}

/// A reply code with the enhanced status that goes with it.
type Outcome = (ReplyCode, EnhancedStatus);

/// `250 2.0.0`
const QUEUED: Outcome = (ReplyCode::of(250), EnhancedStatus::undefined(StatusClass::Success));
/// `451 4.3.0`: mail system error, try again.
const TEMPORARY: Outcome = (ReplyCode::of(451), EnhancedStatus::new(StatusClass::Persistent, 3, 0));
/// `552 5.3.4`: message too big for system.
const TOO_BIG: Outcome = (ReplyCode::of(552), EnhancedStatus::new(StatusClass::Permanent, 3, 4));
/// `554 5.4.6`: routing loop detected.
const LOOP: Outcome = (ReplyCode::of(554), EnhancedStatus::new(StatusClass::Permanent, 4, 6));
/// `452 4.3.1`: the spool is below `queue_minfree`.
const NO_SPACE: Outcome = (ReplyCode::of(452), EnhancedStatus::new(StatusClass::Persistent, 3, 1));
/// `550 5.7.1`: a header or body check's REJECT (Postfix's cleanup reply).
const CONTENT_REJECTED: Outcome = (ReplyCode::of(550), EnhancedStatus::new(StatusClass::Permanent, 7, 1));
/// The text of a REJECT that gives none.
const CONTENT_REJECTED_TEXT: &str = "Message content rejected";
/// `451 4.3.5`: system incorrectly configured (a filter asked for more
/// than this host allows, as for Postfix's policy server failures).
const FILTER_ERROR: Outcome = (ReplyCode::of(451), EnhancedStatus::new(StatusClass::Persistent, 3, 5));

/// The answer to smtpd, plus the reason to log when it is a refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    code: ReplyCode,
    status: EnhancedStatus,
    text: String,
}

impl Answer {
    fn new((code, status): Outcome, text: impl Into<String>) -> Self {
        Self { code, status, text: text.into() }
    }
    fn write_error() -> Self {
        Answer::new(TEMPORARY, "Error: queue file write error")
    }
    fn protocol_error() -> Self {
        Answer::new(TEMPORARY, "Error: internal protocol error")
    }
}

/// Runs one conversation on `stream` and answers it.
pub fn serve(mut stream: UnixStream, ctx: &Context<'_>) {
    // The JSON log's `queue_id` and `client` for every line of this
    // transaction, recorded as they become known.
    let _message = log::message_span().entered();
    if let Err(e) = stream.set_read_timeout(Some(ctx.config.cleanup.ipc_timeout)) {
        tracing::warn!("warning: set ipc timeout: {e}");
        return;
    }
    let mut tx = Transaction::new(ctx);
    let answer = match tx.run(&mut stream) {
        Some(answer) => answer,
        None => return,
    };
    let mut out = Vec::new();
    Reply::Answer { code: answer.code, status: answer.status, text: answer.text }.encode(&mut out);
    if let Err(e) = stream.write_all(&out) {
        // smtpd went away after the file was committed: the message is
        // queued and will be delivered; the client will retry and may
        // cause a duplicate, which at-least-once delivery allows.
        tracing::warn!("warning: {}: lost connection to smtpd before answering: {e}", tx.log_id());
    }
}

struct Transaction<'a> {
    ctx: &'a Context<'a>,
    seq: RequestSequence,
    client: Option<ClientInfo>,
    sender: Option<SenderInfo>,
    id: Option<QueueId>,
    arrival: SystemTime,
    file: Option<TempFile>,
    recipients: Vec<RecipientInfo>,
    /// Recipients smtpd sent (before alias expansion).
    received: usize,
    seen: HashSet<String>,
    /// Content held until the end of the header section is known.
    header_buf: Vec<u8>,
    /// The header section as the client sent it, kept for the filters'
    /// edits (at most `header_size_limit`).
    client_header: Vec<u8>,
    /// Octets of the file before its content records.
    envelope_len: u64,
    /// Octets of content before the body (the fixed-up header section).
    body_offset: usize,
    /// Octets of content written.
    content_len: u64,
    /// Present once the header is fixed up and content streams to disk.
    encoder: Option<Encoder>,
    message_id: String,
    size: u64,
    /// A refusal decided mid-data, answered at `End`.
    refusal: Option<Answer>,
    edits: Edits,
    /// What header_checks and body_checks decided.
    verdict: checks::Verdict,
    body: BodyChecker,
    /// When the checks began on this message (their time limit).
    checks_started: std::time::Instant,
}

impl<'a> Transaction<'a> {
    fn new(ctx: &'a Context<'a>) -> Self {
        Self {
            ctx,
            seq: RequestSequence::default(),
            client: None,
            sender: None,
            id: None,
            arrival: SystemTime::now(),
            file: None,
            recipients: Vec::new(),
            received: 0,
            seen: HashSet::new(),
            header_buf: Vec::new(),
            client_header: Vec::new(),
            envelope_len: 0,
            body_offset: 0,
            content_len: 0,
            encoder: None,
            message_id: String::new(),
            size: 0,
            refusal: None,
            edits: Edits::default(),
            verdict: checks::Verdict::default(),
            body: BodyChecker::default(),
            checks_started: std::time::Instant::now(),
        }
    }

    fn log_id(&self) -> &str {
        self.id.as_ref().map_or("NOQUEUE", QueueId::as_str)
    }

    /// Reads records until `End` or a violation. `None`: smtpd closed the
    /// connection (RSET, QUIT or a lost client): nothing to answer.
    fn run(&mut self, stream: &mut UnixStream) -> Option<Answer> {
        let mut decoder = self.ctx.decoder.borrow_mut();
        decoder.clear();
        loop {
            loop {
                // Content is copied once, from the decoder's buffer to the
                // queue file's.
                let req = match decoder.next_request_in_place() {
                    Ok(Some(RequestInPlace::Data(chunk))) => {
                        if let Err(e) = self.seq.advance_in_place(&RequestInPlace::Data(chunk)) {
                            return Some(self.violation(&e));
                        }
                        self.data(chunk);
                        continue;
                    }
                    Ok(Some(RequestInPlace::Other(req))) => req,
                    Ok(None) => break,
                    Err(e) => return Some(self.violation(&e)),
                };
                if let Err(e) = self.seq.advance(&req) {
                    return Some(self.violation(&e));
                }
                match self.handle(req, stream) {
                    Ok(Step::Continue) => {}
                    Ok(Step::Finished(answer)) => return Some(answer),
                    Err(answer) => return Some(answer),
                }
            }
            match decoder.read_from(stream, READ_CHUNK) {
                Ok(0) => {
                    if self.id.is_some() {
                        tracing::debug!("{}: smtpd ended the transaction", self.log_id());
                    }
                    return None;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("warning: {}: read from smtpd: {e}", self.log_id());
                    return None;
                }
            }
        }
    }

    fn violation(&self, e: &IpcError) -> Answer {
        tracing::warn!("warning: {}: protocol violation from smtpd: {e}", self.log_id());
        Answer::protocol_error()
    }

    fn handle(&mut self, req: Request, stream: &mut UnixStream) -> Result<Step, Answer> {
        match req {
            Request::Hello { .. } => {}
            Request::Client(c) => {
                let c = check_client(c)?;
                log::record_client(format_args!("{}[{}]", c.name, c.addr));
                self.client = Some(c);
            }
            Request::Sender(s) => {
                self.sender = Some(self.check_sender(s)?);
                self.check_space()?;
                self.open_file(stream)?;
            }
            Request::Recipient(rcpt) => self.add_recipient(rcpt)?,
            Request::Data(chunk) => self.data(&chunk),
            Request::Edit(edit) => self.edit(edit),
            Request::End => return Ok(Step::Finished(self.finish())),
        }
        Ok(Step::Continue)
    }

    fn check_sender(&self, s: SenderInfo) -> Result<SenderInfo, Answer> {
        if !s.address.is_empty()
            && let Err(e) = address::parse_mailbox(&s.address, s.smtputf8)
        {
            tracing::warn!("warning: NOQUEUE: smtpd sent invalid sender <{}>: {e}", s.address);
            return Err(Answer::protocol_error());
        }
        Ok(s)
    }

    /// Chooses the queue id and creates its file, then tells smtpd the id.
    /// `queue_minfree`: below it no new message is taken (`452 4.3.1`,
    /// before the client sends any data), so what is queued can still be
    /// delivered and recorded. A file system that cannot say how full it
    /// is does not stop mail: the write itself still reports trouble.
    fn check_space(&self) -> Result<(), Answer> {
        let minfree = self.ctx.config.cleanup.queue_minfree;
        match self.ctx.spool.free_space() {
            Ok(free) if free < minfree => {
                tracing::warn!(
                    "warning: NOQUEUE: not enough free space in the spool: {free} octets free, below queue_minfree {minfree}"
                );
                Err(Answer::new(NO_SPACE, "Insufficient system storage"))
            }
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::warn!("warning: NOQUEUE: free space of the spool: {e}");
                Ok(())
            }
        }
    }

    fn open_file(&mut self, stream: &mut UnixStream) -> Result<(), Answer> {
        let (id, file) = loop {
            let now = SystemTime::now();
            let id = QueueId::new(now, self.ctx.pid);
            match self.ctx.spool.create(&id) {
                Ok(file) => {
                    self.arrival = now;
                    break (id, file);
                }
                // Two ids from one process within a microsecond: take the next.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    tracing::warn!("warning: NOQUEUE: create queue file in incoming/: {e}");
                    return Err(Answer::write_error());
                }
            }
        };
        let mut out = Vec::new();
        Reply::QueueId(id).encode(&mut out);
        log::record_queue_id(id);
        self.id = Some(id);
        self.file = Some(file);
        stream.write_all(&out).map_err(|e| {
            tracing::warn!("warning: {}: write to smtpd: {e}", self.log_id());
            Answer::protocol_error()
        })
    }

    fn add_recipient(&mut self, rcpt: RecipientInfo) -> Result<(), Answer> {
        let addr = &rcpt.address;
        let utf8 = self.sender.as_ref().is_some_and(|s| s.smtputf8);
        let mailbox = address::parse_mailbox(addr, utf8).map_err(|e| {
            tracing::warn!("warning: {}: smtpd sent invalid recipient <{addr}>: {e}", self.log_id());
            Answer::protocol_error()
        })?;
        // smtpd's relay rule, applied again. The client address is the one
        // check_client accepted (the real one behind a PROXY header); the
        // conversation order puts it before any recipient.
        let Some((client, login)) = self.client.as_ref().map(|c| (c.addr, c.auth.is_some())) else {
            tracing::warn!("warning: {}: smtpd sent recipient <{addr}> before the client", self.log_id());
            return Err(Answer::protocol_error());
        };
        // A client smtpd says logged in may relay, but only where AUTH is
        // configured at all: a compromised smtpd on a host without AUTH
        // cannot make this an open relay by claiming a login.
        let authenticated = login && self.ctx.config.smtpd.auth.server.is_some();
        if !authenticated
            && !relay::decide_address(self.ctx.config, client, &mailbox.local, &mailbox.domain).is_allowed()
        {
            tracing::warn!("warning: {}: smtpd sent recipient <{addr}> outside accepted_domains", self.log_id());
            return Err(Answer::protocol_error());
        }
        self.received += 1;
        if self.received > self.ctx.config.smtpd.recipient_limit as usize {
            tracing::warn!("warning: {}: smtpd sent more than recipient_limit recipients", self.log_id());
            return Err(Answer::protocol_error());
        }
        for rcpt in self.expand(rcpt)? {
            let Ok(mailbox) = address::parse_mailbox(&rcpt.address, true) else {
                tracing::warn!("warning: {}: virtual alias result <{}> is not an address", self.log_id(), rcpt.address);
                return Err(Answer::new(TEMPORARY, "Error: virtual alias expansion failed"));
            };
            // Duplicates differ at most in the case of the domain.
            if self.seen.insert(format!("{}@{}", mailbox.local, mailbox.domain_lowercase())) {
                self.recipients.push(rcpt);
            }
        }
        Ok(())
    }

    /// `rcpt` through the virtual alias tables: the addresses it is
    /// delivered to, each with its NOTIFY and, for DSNs, its original
    /// address (its ORCPT, or `rfc822;<address>` when it had none).
    fn expand(&self, rcpt: RecipientInfo) -> Result<Vec<RecipientInfo>, Answer> {
        if self.ctx.aliases.is_empty() {
            return Ok(vec![rcpt]);
        }
        let targets = self.ctx.aliases.expand(&rcpt.address).map_err(|e| {
            tracing::warn!("warning: {}: {e}", self.log_id());
            Answer::new(TEMPORARY, "Error: virtual alias expansion failed")
        })?;
        if targets.len() == 1 && targets[0] == rcpt.address {
            return Ok(vec![rcpt]);
        }
        let orcpt = if rcpt.orcpt.is_empty() { format!("rfc822;{}", rcpt.address) } else { rcpt.orcpt.clone() };
        Ok(targets
            .into_iter()
            .map(|address| RecipientInfo { address, notify: rcpt.notify, orcpt: orcpt.clone() })
            .collect())
    }

    fn data(&mut self, chunk: &[u8]) {
        if self.refusal.is_some() {
            return;
        }
        self.size += chunk.len() as u64;
        if self.size > self.ctx.config.smtpd.message_size_limit {
            self.refuse(Answer::new(TOO_BIG, "Error: message file too big"), "message_size_limit exceeded");
            return;
        }
        if self.encoder.is_some() {
            self.write_body(chunk);
            return;
        }
        self.header_buf.extend_from_slice(chunk);
        self.try_header(false);
    }

    /// Collects one filter edit; a refusal is answered at `End`, like one
    /// decided mid-data.
    fn edit(&mut self, edit: Edit) {
        if self.refusal.is_some() {
            return;
        }
        if let Err(reject) = self.edits.push(edit, &Limits::of(self.ctx.config)) {
            let (answer, why) = self.edit_refusal(reject);
            self.refuse(answer, &why);
        }
    }

    /// The answer refusing what the filters asked, and the reason for the
    /// `reject:` line; a `warning:` names the rule when the filters, not
    /// the message, are at fault.
    fn edit_refusal(&self, reject: EditReject) -> (Answer, String) {
        let id = self.log_id();
        match reject {
            EditReject::TooMany => {
                let limit = self.ctx.config.cleanup.edit_limit;
                tracing::warn!("warning: {id}: filters sent more than edit_limit ({limit}) edits");
                (Answer::new(FILTER_ERROR, "Error: too many edits from filters"), "edit_limit exceeded".to_owned())
            }
            EditReject::TooBig => (
                Answer::new(TOO_BIG, "Error: message file too big"),
                "message_size_limit exceeded by the filters' edits".to_owned(),
            ),
            EditReject::BadRecipient { address, error } => {
                tracing::warn!("warning: {id}: filter added invalid recipient <{address}>: {error}");
                (Answer::new(FILTER_ERROR, "Error: invalid recipient from filters"), format!("<{address}>: {error}"))
            }
            EditReject::BadSender { address, error } => {
                tracing::warn!("warning: {id}: filter changed the sender to invalid <{address}>: {error}");
                (Answer::new(FILTER_ERROR, "Error: invalid sender from filters"), format!("<{address}>: {error}"))
            }
        }
    }

    fn refuse(&mut self, answer: Answer, why: &str) {
        self.refusal = Some(self.rejected(answer, why));
        self.file = None;
    }

    /// Logs the refusal and returns its answer.
    fn rejected(&self, answer: Answer, why: &str) -> Answer {
        tracing::info!("{}: reject: {why}: {} {} {}", self.log_id(), answer.code, answer.status, answer.text);
        answer
    }

    /// Once the header section is complete: fix it up, write the envelope
    /// and everything buffered, and stream the rest.
    fn try_header(&mut self, at_end: bool) {
        let (len, separator) = match header::find_header_end(&self.header_buf, at_end) {
            HeaderEnd::Undecided => {
                if self.header_buf.len() > self.ctx.config.cleanup.header_size_limit {
                    self.refuse(
                        Answer::new(TOO_BIG, "Error: message header size exceeds limit"),
                        "header_size_limit exceeded",
                    );
                }
                return;
            }
            HeaderEnd::Separator { len } => (len, true),
            HeaderEnd::NoSeparator { len } => (len, false),
        };
        if len > self.ctx.config.cleanup.header_size_limit {
            self.refuse(Answer::new(TOO_BIG, "Error: message header size exceeds limit"), "header_size_limit exceeded");
            return;
        }
        let (Some(id), Some(client), Some(sender)) = (self.id, self.client.as_ref(), self.sender.as_ref()) else {
            unreachable!("RequestSequence puts Client and Sender before Data");
        };
        let env = Envelope {
            queue_id: id,
            hostname: &self.ctx.config.server.hostname,
            client,
            recipients: &self.recipients,
            arrival: self.arrival,
            zone: mortal_libmaster::log::local_zone(),
            authenticated_header: self.ctx.config.smtpd.auth.authenticated_header,
        };
        // header_checks see the header as the client sent it; cleanup's
        // fix-ups and the filters' edits apply to what they leave.
        self.checks_started = std::time::Instant::now();
        let checked =
            self.ctx.checks.header(&self.header_buf[..len], self.checks_started, &mut self.verdict, id.as_str());
        let fixed = match header::fix_up(&checked, &env, self.ctx.config.cleanup.hopcount_limit) {
            Ok(f) => f,
            Err(HeaderReject::TooManyHops(n)) => {
                self.refuse(Answer::new(LOOP, "Error: too many hops"), &format!("{n} Received: headers"));
                return;
            }
        };
        let queued: Vec<QueuedRecipient> = self.recipients.iter().map(QueuedRecipient::pending).collect();
        let (encoder, start) = Encoder::start(&id, self.arrival, client, sender, &queued);
        self.encoder = Some(encoder);
        self.message_id = fixed.message_id;
        let mut rest = std::mem::take(&mut self.header_buf).split_off(len);
        self.client_header = checked;
        self.envelope_len = start.len() as u64;
        self.body_offset = fixed.bytes.len();
        self.write_raw(&start);
        self.write_content(&fixed.bytes);
        if !separator && !rest.is_empty() {
            // A body line right after the header: keep the structure valid.
            self.write_content(b"\r\n");
        }
        // The empty line ending the header is no body line to check.
        let blank = match rest.first() {
            Some(b'\r') if separator => 2,
            Some(b'\n') if separator => 1,
            _ => 0,
        };
        let body = rest.split_off(blank.min(rest.len()));
        self.write_content(&rest);
        self.write_body(&body);
    }

    /// Body content, through body_checks when there are any.
    fn write_body(&mut self, chunk: &[u8]) {
        if !self.ctx.checks.has_body_checks() {
            return self.write_content(chunk);
        }
        let mut out = Vec::with_capacity(chunk.len() + 64);
        let id = self.log_id().to_owned();
        self.body.feed(self.ctx.checks, chunk, &mut out, self.checks_started, &mut self.verdict, &id);
        self.write_content(&out);
    }

    /// `from unknown[addr]; from=<s> to=<r> proto=ESMTP helo=<h>`: what
    /// cleanup's header and body check lines say about the message, as
    /// Postfix's do.
    fn check_context(&self) -> String {
        let client = self.client.as_ref();
        format!(
            "from {}[{}]; from=<{}> to=<{}> proto={} helo=<{}>",
            client.map_or("unknown", |c| c.name.as_str()),
            client.map(|c| c.addr.to_string()).unwrap_or_default(),
            self.sender.as_ref().map_or("", |s| s.address.as_str()),
            self.recipients.first().map_or("", |r| r.address.as_str()),
            client.map_or("SMTP", |c| c.protocol.as_str()),
            client.map_or("", |c| c.helo.as_str()),
        )
    }

    /// Applies what header_checks and body_checks decided, at `End`:
    /// their notes are logged; a REJECT is the answer (nothing is kept).
    fn content_verdict(&mut self) -> Result<(), Answer> {
        let id = self.log_id().to_owned();
        let context = self.check_context();
        for note in &self.verdict.notes {
            let text = note.found.text.as_deref().unwrap_or_default();
            tracing::info!("{id}: {}: {} {context}: {text}", note.word, note.found.what);
        }
        if let Some(found) = &self.verdict.reject {
            let text = found.text.clone().unwrap_or_else(|| CONTENT_REJECTED_TEXT.to_owned());
            let answer = Answer::new(CONTENT_REJECTED, text);
            tracing::info!("{id}: reject: {} {context}: {} {}", found.what, answer.status, answer.text);
            return Err(answer);
        }
        Ok(())
    }

    fn write_content(&mut self, bytes: &[u8]) {
        let (Some(enc), Some(file)) = (self.encoder.as_mut(), self.file.as_mut()) else { return };
        let written = enc.content_to(bytes, file);
        self.content_len += bytes.len() as u64;
        self.check_write(written);
    }

    fn write_raw(&mut self, bytes: &[u8]) {
        let Some(file) = self.file.as_mut() else { return };
        let written = file.write_all(bytes);
        self.check_write(written);
    }

    fn check_write(&mut self, written: io::Result<()>) {
        if let Err(e) = written {
            tracing::warn!("warning: {}: write queue file: {e}", self.log_id());
            self.refusal = Some(Answer::write_error());
            self.file = None;
        }
    }

    fn finish(&mut self) -> Answer {
        if self.refusal.is_none() && self.encoder.is_none() {
            self.try_header(true);
        }
        if self.refusal.is_none() && self.ctx.checks.has_body_checks() {
            let mut out = Vec::new();
            let id = self.log_id().to_owned();
            self.body.finish(self.ctx.checks, &mut out, self.checks_started, &mut self.verdict, &id);
            self.write_content(&out);
        }
        if let Some(answer) = self.refusal.take() {
            return answer;
        }
        if let Err(answer) = self.content_verdict() {
            self.file = None;
            return answer;
        }
        let (Some(encoder), Some(mut file), Some(id)) = (self.encoder.take(), self.file.take(), self.id) else {
            unreachable!("a transaction without refusal has written its header");
        };
        // DISCARD wins over everything else: nothing is kept, so nothing
        // else needs checking. Dropping the file removes it.
        if let Some(reason) = self.edits.discard() {
            drop(file);
            tracing::info!("{id}: discard: {reason}");
            return Answer::new(QUEUED, format!("Ok: queued as {id}"));
        }
        if let Some(found) = &self.verdict.discard {
            drop(file);
            let text = found.text.as_deref().unwrap_or("triggers DISCARD action");
            tracing::info!("{id}: discard: {} {}: {text}", found.what, self.check_context());
            return Answer::new(QUEUED, format!("Ok: queued as {id}"));
        }
        if self.edits.change_file() {
            // The first file is never sealed: it is only read back.
            file = match self.rebuild(file, id) {
                Ok(Some(file)) => file,
                Ok(None) => {
                    tracing::info!("{id}: discard: all recipients deleted by filters");
                    return Answer::new(QUEUED, format!("Ok: queued as {id}"));
                }
                Err(answer) => return answer,
            };
        } else if let Err(e) = file.write_all(&encoder.finish()) {
            tracing::warn!("warning: {id}: write queue file: {e}");
            return Answer::write_error();
        }
        let held = self.edits.hold().is_some() || self.verdict.hold.is_some();
        let to = if held { Destination::Hold } else { Destination::Incoming };
        if let Err(e) = self.ctx.spool.commit(file, &id, to) {
            tracing::warn!("warning: {id}: commit queue file: {e}");
            return Answer::write_error();
        }
        tracing::info!("{id}: message-id=<{}>", self.message_id);
        match (self.edits.hold(), &self.verdict.hold) {
            (Some(reason), _) => tracing::info!("{id}: hold: {reason}"),
            (None, Some(found)) => {
                let text = found.text.as_deref().unwrap_or("triggers HOLD action");
                tracing::info!("{id}: hold: {} {}: {text}", found.what, self.check_context());
            }
            (None, None) => self.ctx.spool.wake_queue(),
        }
        Answer::new(QUEUED, format!("Ok: queued as {id}"))
    }

    /// Writes the message as the filters' edits left it into a new
    /// temporary file in place of `first` (the unedited message, not
    /// sealed), checking the result as the original was checked. `None`:
    /// no recipient is left, and nothing is kept.
    fn rebuild(&mut self, first: TempFile, id: QueueId) -> Result<Option<TempFile>, Answer> {
        let limits = Limits::of(self.ctx.config);
        let (Some(client), Some(mut sender)) = (self.client.as_ref(), self.sender.clone()) else {
            unreachable!("RequestSequence puts Client and Sender before End");
        };
        let mut recipients = self.recipients.clone();
        if let Err(reject) = self.edits.envelope(&mut sender, &mut recipients, id.as_str()) {
            let (answer, why) = self.edit_refusal(reject);
            return Err(self.rejected(answer, &why));
        }
        if recipients.is_empty() {
            return Ok(None);
        }
        if recipients.len() > limits.recipients {
            tracing::warn!("warning: {id}: filters left more than recipient_limit ({}) recipients", limits.recipients);
            let answer = Answer::new(FILTER_ERROR, "Error: too many recipients");
            return Err(self.rejected(answer, "recipient_limit exceeded"));
        }
        let edited = self.edits.header(&self.client_header);
        if edited.len() > limits.header_size {
            let answer = Answer::new(TOO_BIG, "Error: message header size exceeds limit");
            return Err(self.rejected(answer, "header_size_limit exceeded after the filters' edits"));
        }
        let body = self.edits.body();
        // The message as the filters left it, without cleanup's own
        // fix-ups, as the limit is applied to an unedited one.
        let tail = match &body {
            Some(body) => 2 + body.len() as u64,
            None => self.content_len - self.body_offset as u64,
        };
        if edited.len() as u64 + tail > limits.message_size {
            let answer = Answer::new(TOO_BIG, "Error: message file too big");
            return Err(self.rejected(answer, "message_size_limit exceeded after the filters' edits"));
        }
        let env = Envelope {
            queue_id: id,
            hostname: &self.ctx.config.server.hostname,
            client,
            recipients: &recipients,
            arrival: self.arrival,
            zone: mortal_libmaster::log::local_zone(),
            authenticated_header: self.ctx.config.smtpd.auth.authenticated_header,
        };
        let fixed = match header::fix_up(&edited.fields, &env, self.ctx.config.cleanup.hopcount_limit) {
            Ok(f) => f,
            Err(HeaderReject::TooManyHops(n)) => {
                return Err(self.rejected(Answer::new(LOOP, "Error: too many hops"), &format!("{n} Received: headers")));
            }
        };
        let queued: Vec<QueuedRecipient> = recipients.iter().map(QueuedRecipient::pending).collect();
        let (mut encoder, start) = Encoder::start(&id, self.arrival, client, &sender, &queued);
        let written = (|| -> io::Result<TempFile> {
            let (mut reader, mut file) = self.ctx.spool.restart(first, &id, self.envelope_len)?;
            file.write_all(&start)?;
            encoder.content_to(&edited.prepends, &mut file)?;
            encoder.content_to(&fixed.bytes, &mut file)?;
            match &body {
                Some(body) => {
                    encoder.content_to(b"\r\n", &mut file)?;
                    encoder.content_to(body, &mut file)?;
                }
                None => {
                    spool::copy_content(&mut reader, self.body_offset, |chunk| encoder.content_to(chunk, &mut file))?
                }
            }
            file.write_all(&encoder.finish())?;
            Ok(file)
        })();
        let file = written.map_err(|e| {
            tracing::warn!("warning: {id}: write queue file: {e}");
            Answer::write_error()
        })?;
        self.message_id = fixed.message_id;
        self.sender = Some(sender);
        self.recipients = recipients;
        Ok(Some(file))
    }
}

enum Step {
    Continue,
    Finished(Answer),
}

/// The client record ends up in `Received:`; smtpd is not believed about it.
fn check_client(c: ClientInfo) -> Result<ClientInfo, Answer> {
    let name_ok = c.name == "unknown" || address::parse_mailbox(&format!("x@{}", c.name), false).is_ok();
    let helo_ok = c.helo.len() <= 255;
    if !name_ok || !helo_ok || !KNOWN_PROTOCOLS.contains(&c.protocol.as_str()) {
        tracing::warn!(
            "warning: NOQUEUE: smtpd sent an invalid client record: addr={:?} name={:?} helo={:?} proto={:?}",
            c.addr,
            c.name,
            c.helo,
            c.protocol
        );
        return Err(Answer::protocol_error());
    }
    Ok(c)
}
