//! The SMTP session as a sans-IO state machine.
//!
//! A [`Session`] takes client bytes ([`Session::feed`]) and produces
//! [`Action`]s ([`Session::next_action`]): replies to write, log lines, and
//! the steps of the cleanup conversation. Steps that need an answer from
//! cleanup suspend the session until the driver reports the outcome
//! ([`Session::transaction_opened`], [`Session::cleanup_answer`],
//! [`Session::cleanup_failed`]); client input received meanwhile waits in
//! the session's buffer. Time and the socket are the driver's business: it
//! calls [`Session::timed_out`] or [`Session::connection_lost`] and
//! finally [`Session::finish`] for the `disconnect` log line.
//!
//! ```
//! use mortal_smtpd::engine::{Action, Answer, Session};
//! use std::sync::Arc;
//!
//! let toml = "[server]\nhostname = \"mx.example.test\"\naccepted_domains = [\"example.test\"]\n";
//! let config = mortal_proto::config::Config::parse(toml, "mortal.toml".as_ref()).unwrap();
//! let mut session = Session::new(Arc::new(config), "192.0.2.1".parse().unwrap());
//! session.feed(b"EHLO client.test\r\n");
//! session.feed(b"MAIL FROM:<a@example.test>\r\n");
//! let actions: Vec<Action> = std::iter::from_fn(|| session.next_action()).collect();
//! assert!(matches!(actions.last(), Some(Action::StartTransaction { .. })));
//! session.transaction_opened("0000000010000100000A".into());
//! assert_eq!(session.next_action(), Some(Action::Log("0000000010000100000A: client=unknown[192.0.2.1]".into())));
//! assert_eq!(session.next_action(), Some(Action::Reply("250 2.1.0 Ok\r\n".into())));
//! ```
//!
//! Pipelining (RFC 2920): every complete command in the buffer is handled
//! before the session asks for more input, so the driver writes the replies
//! of a group in one go. A command that must end a group, or any command of
//! a client that did not negotiate PIPELINING, followed by more input, is
//! answered `554 5.5.0 Error: SMTP protocol synchronization` and the
//! session ends, as with Postfix's `smtpd_forbid_unauth_pipelining`. Input
//! sent before the greeting ([`Session::early_input`]) is the same offence.

pub mod command;
pub mod data;
pub mod line;
pub mod reply;
mod stats;

pub use data::MAX_TEXT_LINE;
pub use line::MAX_COMMAND_LINE;

use command::{Command, Param, ParseError, Verb};
use data::{ContentError, DataReceiver};
use line::{Line, LineReader};
use mortal_proto::address::{self, AddressError};
use mortal_proto::config::Config;
use mortal_proto::ipc::{BodyType, ClientInfo, Notify, RecipientInfo, SenderInfo};
use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;

/// Octets of unexpected client input quoted in a log line.
pub const LOG_EXCERPT: usize = 100;

/// The client host name: smtpd never looks names up (no DNS in the child,
/// no time spent on hostile resolvers), so it is always Postfix's `unknown`.
pub const UNKNOWN_NAME: &str = "unknown";

/// What the driver must do next, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write this to the client: one or more complete reply lines, each
    /// ending in `<CR><LF>`. The driver may hold replies back until the
    /// session wants input, which batches a pipelined group.
    Reply(String),
    /// Log this line at `info` level (message only; the log format adds
    /// the program tag).
    Log(String),
    /// Open a cleanup transaction: connect, send `Hello`, `Client` and
    /// `Sender`, then call [`Session::transaction_opened`] with the queue id,
    /// or [`Session::cleanup_answer`] / [`Session::cleanup_failed`].
    StartTransaction { client: ClientInfo, sender: SenderInfo },
    /// Send this accepted recipient to cleanup.
    Recipient(RecipientInfo),
    /// Send this dot-unstuffed content (`<CR><LF>` lines) to cleanup.
    Data(Vec<u8>),
    /// The message is complete: send `End`, then call
    /// [`Session::cleanup_answer`] with cleanup's answer (or
    /// [`Session::cleanup_failed`]).
    EndOfData,
    /// Drop the cleanup connection: cleanup discards what it has.
    AbortTransaction,
    /// Write what is pending and close the connection.
    Close,
}

/// cleanup's verdict on a transaction (`Reply::Answer` of the IPC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub code: u16,
    pub enhanced: String,
    pub text: String,
}

/// Where the session is.
#[derive(Debug)]
enum Phase {
    /// Reading command lines.
    Command,
    /// MAIL was accepted by us; waiting for cleanup's queue id.
    Opening {
        sender: String,
    },
    /// Reading message content.
    Data(DataReceiver),
    /// The terminator arrived; waiting for cleanup's answer.
    AwaitingAnswer,
    Closed,
}

#[derive(Debug)]
struct Helo {
    name: String,
    /// EHLO (and so PIPELINING and the MAIL parameters) rather than HELO.
    esmtp: bool,
}

/// An open cleanup transaction.
#[derive(Debug)]
struct Transaction {
    /// Reverse-path without brackets; empty for `<>`.
    sender: String,
    queue_id: String,
    recipients: u32,
    /// Set when cleanup failed or refused mid-transaction: every further
    /// RCPT and the DATA get this reply, and no 250 can follow.
    failure: Option<String>,
}

/// One SMTP session.
#[derive(Debug)]
pub struct Session {
    config: Arc<Config>,
    addr: IpAddr,
    /// `unknown[addr]`, as in every log line.
    client: String,
    /// Received, unprocessed input; `pos` is where processing stands.
    input: Vec<u8>,
    pos: usize,
    lines: LineReader,
    phase: Phase,
    helo: Option<Helo>,
    txn: Option<Transaction>,
    actions: VecDeque<Action>,
    errors: u32,
    stats: stats::Stats,
    /// The last command seen, for `... after <CMD> from ...` (Postfix's
    /// `state->where`).
    last: &'static str,
    /// The client talked before the greeting.
    spoke_early: bool,
}

impl Session {
    /// Starts a session with a client at `addr`: queues the `connect from`
    /// log line and the greeting.
    pub fn new(config: Arc<Config>, addr: IpAddr) -> Self {
        // A v4 client on a dual-stack socket appears as ::ffff:a.b.c.d;
        // log and pass on the address it really has, as Postfix does.
        let addr = addr.to_canonical();
        let greeting = reply::greeting(&config.server.hostname, &config.smtpd.banner);
        let mut session = Session {
            config,
            addr,
            client: format!("{UNKNOWN_NAME}[{addr}]"),
            input: Vec::new(),
            pos: 0,
            lines: LineReader::default(),
            phase: Phase::Command,
            helo: None,
            txn: None,
            actions: VecDeque::new(),
            errors: 0,
            stats: stats::Stats::default(),
            last: "CONNECT",
            spoke_early: false,
        };
        session.log(format!("connect from {}", session.client));
        session.reply(&greeting);
        session
    }

    /// Input the client sent before it could have seen the greeting (the
    /// driver looks before writing it). Such a client is not speaking SMTP
    /// in good faith: its first command is answered with 554 and the
    /// session ends (Postfix logs this as pipelining after CONNECT).
    pub fn early_input(&mut self, input: &[u8]) {
        if input.is_empty() || self.is_closed() {
            return;
        }
        self.spoke_early = true;
        self.log(format!("improper command pipelining after CONNECT from {}: {}", self.client, excerpt(input)));
        self.feed(input);
    }

    /// Takes client input and handles every complete command in it (or
    /// content, during DATA), until it runs out or must wait for cleanup.
    pub fn feed(&mut self, input: &[u8]) {
        if self.is_closed() {
            return;
        }
        self.input.extend_from_slice(input);
        self.process();
    }

    /// The next thing to do, if any.
    pub fn next_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Whether the session can use more client input now (false while it
    /// waits for cleanup, and once closed).
    pub fn wants_input(&self) -> bool {
        matches!(self.phase, Phase::Command | Phase::Data(_))
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// cleanup accepted the sender and named the queue id.
    ///
    /// # Panics
    /// If no [`Action::StartTransaction`] is outstanding: that is a driver
    /// bug, and carrying on could attach a message to the wrong envelope.
    pub fn transaction_opened(&mut self, queue_id: String) {
        let Phase::Opening { sender } = std::mem::replace(&mut self.phase, Phase::Command) else {
            panic!("transaction_opened without an outstanding StartTransaction");
        };
        self.log(format!("{queue_id}: client={}", self.client));
        self.txn = Some(Transaction { sender, queue_id, recipients: 0, failure: None });
        self.succeed(Verb::Mail, reply::MAIL_OK);
        self.process();
    }

    /// cleanup answered: the final answer after [`Action::EndOfData`], or
    /// an early refusal at any other point of the transaction.
    pub fn cleanup_answer(&mut self, answer: Answer) {
        self.cleanup_outcome(reply::from_answer(answer.code, &answer.enhanced, &answer.text));
    }

    /// cleanup could not be reached or the conversation broke: the client
    /// gets `451 4.3.0` where it would have needed cleanup's word.
    pub fn cleanup_failed(&mut self) {
        self.cleanup_outcome(reply::QUEUE_WRITE_ERROR.to_owned());
    }

    /// The client sent nothing for `smtpd.timeout`.
    pub fn timed_out(&mut self) {
        if self.is_closed() {
            return;
        }
        self.log(format!("timeout after {} from {}", self.last, self.client));
        self.reply(&reply::timeout(&self.config.server.hostname));
        self.close();
    }

    /// The client went away without QUIT.
    pub fn connection_lost(&mut self) {
        if self.is_closed() {
            return;
        }
        self.log(format!("lost connection after {} from {}", self.last, self.client));
        self.close();
    }

    /// Ends the session: the `disconnect from ...` line with the command
    /// counters.
    pub fn finish(self) -> String {
        format!("disconnect from {} {}", self.client, self.stats.summary())
    }

    /// Works through the buffered input until it runs out or the session
    /// has to wait for cleanup (or is over).
    fn process(&mut self) {
        loop {
            let progressed = match self.phase {
                Phase::Command => self.next_command(),
                Phase::Data(_) => self.next_content(),
                Phase::Opening { .. } | Phase::AwaitingAnswer | Phase::Closed => false,
            };
            if !progressed {
                break;
            }
        }
        self.input.drain(..self.pos);
        self.pos = 0;
    }

    /// Handles one command line; false when no complete line is buffered.
    fn next_command(&mut self) -> bool {
        let (line, used) = self.lines.next(&self.input[self.pos..]);
        self.pos += used;
        let Some(line) = line else { return false };
        let pending = self.pos < self.input.len();
        match line {
            Line::Text(bytes) => self.command_line(&String::from_utf8_lossy(&bytes), pending),
            Line::BareLf => self.malformed_line(reply::BARE_LF, pending),
            Line::BareCr => self.malformed_line(reply::BARE_CR, pending),
            Line::TooLong => self.malformed_line(reply::LINE_TOO_LONG, pending),
        }
        true
    }

    fn malformed_line(&mut self, text: &str, pending: bool) {
        self.last = Verb::Unknown.name();
        if !self.out_of_sync(Verb::Unknown, false, pending) {
            self.fail(Verb::Unknown, text);
        }
    }

    fn command_line(&mut self, line: &str, pending: bool) {
        let parsed = command::parse(line);
        let (verb, name, ends_group) = match &parsed {
            Ok(cmd) => (cmd.verb(), cmd.name(), cmd.ends_group()),
            Err(ParseError::Syntax(verb)) => (*verb, verb.name(), verb.ends_group()),
            Err(ParseError::Empty) => (Verb::Unknown, Verb::Unknown.name(), false),
        };
        self.last = name;
        if self.out_of_sync(verb, ends_group, pending) {
            return;
        }
        match parsed {
            Ok(cmd) => self.execute(cmd),
            Err(ParseError::Empty) => self.fail(Verb::Unknown, reply::BAD_SYNTAX),
            Err(ParseError::Syntax(verb)) => self.syntax_error(verb),
        }
    }

    /// RFC 2920 and RFC 5321 4.3.1 synchronisation: pipelining needs the
    /// PIPELINING extension, and even then not past a group-ending
    /// command. A violation ends the session.
    fn out_of_sync(&mut self, verb: Verb, ends_group: bool, pending: bool) -> bool {
        let pipelining = self.helo.as_ref().is_some_and(|h| h.esmtp);
        if !self.spoke_early && !(pending && (ends_group || !pipelining)) {
            return false;
        }
        if !self.spoke_early {
            let rest = excerpt(&self.input[self.pos..]);
            self.log(format!("improper command pipelining after {} from {}: {rest}", self.last, self.client));
        }
        self.stats.count(verb, false);
        self.reply(reply::SYNC_ERROR);
        self.close();
        true
    }

    fn execute(&mut self, cmd: Command<'_>) {
        match cmd {
            Command::Ehlo(name) => self.helo(name, true),
            Command::Helo(name) => self.helo(name, false),
            Command::Mail { path, params } => self.mail(path, &params),
            Command::Rcpt { path, params } => self.rcpt(path, &params),
            Command::Data => self.data(),
            Command::Rset => {
                self.abort_transaction();
                self.succeed(Verb::Rset, reply::OK);
            }
            Command::Noop => self.succeed(Verb::Noop, reply::OK),
            Command::Vrfy(_) => self.succeed(Verb::Vrfy, reply::VRFY),
            Command::Help => self.succeed(Verb::Help, reply::HELP),
            Command::Quit => {
                self.succeed(Verb::Quit, reply::BYE);
                self.close();
            }
            Command::NotImplemented(_) => self.fail(Verb::Unknown, reply::NOT_IMPLEMENTED),
            Command::Unknown => self.fail(Verb::Unknown, reply::UNKNOWN_COMMAND),
        }
    }

    fn syntax_error(&mut self, verb: Verb) {
        let text = reply::syntax(verb.syntax());
        match verb {
            Verb::Rcpt | Verb::Data => self.reject(verb, &text, None),
            _ => self.fail(verb, &text),
        }
    }

    /// EHLO/HELO; a repeated one resets the transaction (RFC 5321 4.1.4).
    fn helo(&mut self, name: &str, esmtp: bool) {
        self.abort_transaction();
        self.helo = Some(Helo { name: name.to_owned(), esmtp });
        let hostname = &self.config.server.hostname;
        if !esmtp {
            let text = format!("250 {hostname}");
            return self.succeed(Verb::Helo, &text);
        }
        let lines = [
            hostname.clone(),
            "PIPELINING".into(),
            format!("SIZE {}", self.config.smtpd.message_size_limit),
            "ENHANCEDSTATUSCODES".into(),
            "8BITMIME".into(),
        ];
        self.stats.count(Verb::Ehlo, true);
        self.reply_multiline(250, &lines);
    }

    fn mail(&mut self, path: &str, params: &[Param<'_>]) {
        let Some(helo) = &self.helo else { return self.fail(Verb::Mail, reply::NEED_HELO) };
        let helo = helo.name.clone();
        if self.txn.is_some() {
            return self.fail(Verb::Mail, reply::NESTED_MAIL);
        }
        let sender = match address::parse_reverse_path(path, false) {
            Ok(mailbox) => mailbox.map(|m| m.to_string()).unwrap_or_default(),
            Err(AddressError::Utf8NotAllowed) => return self.fail(Verb::Mail, reply::UTF8_ADDRESS),
            Err(_) => return self.fail(Verb::Mail, reply::BAD_SENDER),
        };
        let body = match self.mail_params(params) {
            Ok(body) => body,
            Err(text) => return self.fail(Verb::Mail, &text),
        };
        let client = ClientInfo {
            addr: self.addr.to_string(),
            name: UNKNOWN_NAME.into(),
            helo,
            protocol: self.protocol().into(),
            tls: String::new(),
        };
        let info = SenderInfo { address: sender.clone(), body, smtputf8: false, ret: None, envid: String::new() };
        self.actions.push_back(Action::StartTransaction { client, sender: info });
        self.phase = Phase::Opening { sender };
    }

    /// SIZE (RFC 1870) and BODY (RFC 6152), only after EHLO: a HELO client
    /// was offered no extensions, so it may use none (RFC 5321 4.1.1.11).
    fn mail_params(&self, params: &[Param<'_>]) -> Result<BodyType, String> {
        let esmtp = self.helo.as_ref().is_some_and(|h| h.esmtp);
        let mut body = BodyType::SevenBit;
        for p in params {
            match (esmtp, p.keyword.to_ascii_uppercase().as_str(), p.value) {
                (true, "SIZE", value) => {
                    if parse_size(value).ok_or(reply::BAD_SIZE)? > self.config.smtpd.message_size_limit {
                        return Err(reply::TOO_BIG.into());
                    }
                }
                (true, "BODY", Some(v)) if v.eq_ignore_ascii_case("7BIT") => body = BodyType::SevenBit,
                (true, "BODY", Some(v)) if v.eq_ignore_ascii_case("8BITMIME") => body = BodyType::EightBitMime,
                (true, "BODY", _) => return Err(reply::BAD_BODY.into()),
                _ => return Err(reply::unsupported_option(p.keyword)),
            }
        }
        Ok(body)
    }

    fn rcpt(&mut self, path: &str, params: &[Param<'_>]) {
        let Some(txn) = &self.txn else { return self.reject(Verb::Rcpt, reply::NEED_MAIL, Some(path)) };
        if let Some(failure) = txn.failure.clone() {
            return self.reject(Verb::Rcpt, &failure, Some(path));
        }
        // Checked first, as Postfix does: past the limit nothing else matters.
        if txn.recipients >= self.config.smtpd.recipient_limit {
            return self.reject(Verb::Rcpt, reply::TOO_MANY_RECIPIENTS, Some(path));
        }
        if let Some(p) = params.first() {
            return self.reject(Verb::Rcpt, &reply::unsupported_option(p.keyword), Some(path));
        }
        let address = match self.recipient(path) {
            Ok(address) => address,
            Err(text) => return self.reject(Verb::Rcpt, &text, Some(path)),
        };
        if let Some(txn) = &mut self.txn {
            txn.recipients += 1;
        }
        self.actions.push_back(Action::Recipient(RecipientInfo {
            address,
            notify: Notify::default(),
            orcpt: String::new(),
        }));
        self.succeed(Verb::Rcpt, reply::RCPT_OK);
    }

    /// The address to deliver to, or the reply refusing it. Only domains in
    /// `accepted_domains` are accepted: mortal is never an open relay.
    fn recipient(&self, path: &str) -> Result<String, String> {
        // RFC 5321 4.5.1: `<Postmaster>` without a domain must be accepted;
        // it means the postmaster of the first (primary) accepted domain.
        if path.eq_ignore_ascii_case("<postmaster>") {
            return match self.config.server.accepted_domains.first() {
                Some(domain) => Ok(format!("postmaster@{domain}")),
                None => Err(reply::relay_denied("postmaster")),
            };
        }
        let mailbox = address::parse_path(path, false).map_err(|e| match e {
            AddressError::Utf8NotAllowed => reply::UTF8_ADDRESS.to_owned(),
            _ => reply::BAD_RECIPIENT.to_owned(),
        })?;
        if !self.config.accepts_domain(&mailbox.domain) {
            return Err(reply::relay_denied(&mailbox.to_string()));
        }
        Ok(mailbox.to_string())
    }

    fn data(&mut self) {
        let failure = match &self.txn {
            None => Some(reply::NEED_RCPT.to_owned()),
            Some(txn) if txn.failure.is_some() => txn.failure.clone(),
            Some(txn) if txn.recipients == 0 => Some(reply::NO_VALID_RECIPIENTS.to_owned()),
            Some(_) => None,
        };
        if let Some(text) = failure {
            return self.reject(Verb::Data, &text, None);
        }
        // The DATA count is settled by the reply after the terminator.
        self.reply(reply::START_DATA);
        self.phase = Phase::Data(DataReceiver::new(self.config.smtpd.message_size_limit));
    }

    /// Passes content on; true when the terminator was reached.
    fn next_content(&mut self) -> bool {
        let Phase::Data(rx) = &mut self.phase else { return false };
        let mut chunk = Vec::new();
        let progress = rx.receive(&self.input[self.pos..], &mut chunk);
        let error = rx.error();
        self.pos += progress.consumed;
        let healthy = self.txn.as_ref().is_some_and(|t| t.failure.is_none());
        if healthy && !chunk.is_empty() {
            self.actions.push_back(Action::Data(chunk));
        }
        if progress.finished {
            self.end_of_data(error);
        }
        progress.finished
    }

    fn end_of_data(&mut self, error: Option<ContentError>) {
        self.last = "END-OF-MESSAGE";
        self.phase = Phase::Command;
        let content_error = error.map(|e| match e {
            ContentError::BareLf => reply::DATA_BARE_LF,
            ContentError::BareCr => reply::DATA_BARE_CR,
            ContentError::LineTooLong => reply::DATA_LINE_TOO_LONG,
            ContentError::TooBig => reply::TOO_BIG,
        });
        if let Some(text) = content_error {
            self.log_reject("END-OF-MESSAGE", text, None);
            self.abort_transaction();
            return self.fail(Verb::Data, text);
        }
        if let Some(failure) = self.txn.as_ref().and_then(|t| t.failure.clone()) {
            self.abort_transaction();
            return self.fail(Verb::Data, &failure);
        }
        self.actions.push_back(Action::EndOfData);
        self.phase = Phase::AwaitingAnswer;
    }

    /// Applies cleanup's verdict (`text` is the reply it maps to) to
    /// whatever the session is waiting for.
    fn cleanup_outcome(&mut self, text: String) {
        // A 250 means "queued" only as the answer to End; anywhere else it
        // is cleanup misbehaving, and no success may be inferred from it.
        let failure = if reply::code(&text) == 250 { reply::QUEUE_WRITE_ERROR.to_owned() } else { text.clone() };
        match &self.phase {
            Phase::Opening { .. } => {
                self.phase = Phase::Command;
                self.fail(Verb::Mail, &failure);
                self.process();
            }
            Phase::AwaitingAnswer => {
                self.phase = Phase::Command;
                self.txn = None;
                if reply::code(&text) == 250 {
                    self.succeed(Verb::Data, &text);
                } else {
                    self.fail(Verb::Data, &text);
                }
                self.process();
            }
            Phase::Command | Phase::Data(_) => {
                if let Some(txn) = &mut self.txn {
                    txn.failure.get_or_insert(failure);
                }
            }
            Phase::Closed => {}
        }
    }

    fn abort_transaction(&mut self) {
        if self.txn.take().is_some() {
            self.actions.push_back(Action::AbortTransaction);
        }
    }

    fn close(&mut self) {
        // A command cut short by the end of the session failed.
        match self.phase {
            Phase::Opening { .. } => self.stats.count(Verb::Mail, false),
            Phase::Data(_) | Phase::AwaitingAnswer => self.stats.count(Verb::Data, false),
            Phase::Command | Phase::Closed => {}
        }
        self.abort_transaction();
        self.actions.push_back(Action::Close);
        self.phase = Phase::Closed;
        self.input.clear();
        self.pos = 0;
    }

    fn succeed(&mut self, verb: Verb, text: &str) {
        self.stats.count(verb, true);
        self.reply(text);
    }

    /// A failed command: counted, answered, and closer to the error limit.
    fn fail(&mut self, verb: Verb, text: &str) {
        self.stats.count(verb, false);
        self.reply(text);
        self.errors += 1;
        // A limit of 0 would refuse every session outright; take it as 1.
        if self.errors >= self.config.smtpd.hard_error_limit.max(1) && !self.is_closed() {
            self.log(format!("too many errors after {} from {}", self.last, self.client));
            self.reply(&reply::too_many_errors(&self.config.server.hostname));
            self.close();
        }
    }

    /// A refused RCPT or DATA: logged in Postfix's `reject:` shape, which
    /// fail2ban and pflogsumm match, then failed.
    fn reject(&mut self, verb: Verb, text: &str, path: Option<&str>) {
        self.log_reject(verb.name(), text, path);
        self.fail(verb, text);
    }

    fn log_reject(&mut self, stage: &str, text: &str, path: Option<&str>) {
        // A queue id is only shown once a recipient was accepted: before
        // that nothing can be queued under it (Postfix shows NOQUEUE then).
        let queue_id = match &self.txn {
            Some(t) if t.recipients > 0 => t.queue_id.as_str(),
            _ => "NOQUEUE",
        };
        let mut line = format!("{queue_id}: reject: {stage} from {}: {};", self.client, reply::clean_line(text));
        if let Some(t) = &self.txn {
            line.push_str(&format!(" from=<{}>", t.sender));
        }
        if let Some(path) = path {
            let bare = path.strip_prefix('<').and_then(|p| p.strip_suffix('>')).unwrap_or(path);
            line.push_str(&format!(" to=<{}>", excerpt(bare.as_bytes())));
        }
        line.push_str(&format!(" proto={}", self.protocol()));
        if let Some(h) = &self.helo {
            line.push_str(&format!(" helo=<{}>", h.name));
        }
        self.log(line);
    }

    fn protocol(&self) -> &'static str {
        if self.helo.as_ref().is_some_and(|h| h.esmtp) { "ESMTP" } else { "SMTP" }
    }

    fn reply(&mut self, text: &str) {
        self.actions.push_back(Action::Reply(format!("{}\r\n", reply::clean_line(text))));
    }

    /// `250-first`, ..., `250 last`, as one write.
    fn reply_multiline(&mut self, code: u16, lines: &[String]) {
        let mut out = String::new();
        for (i, line) in lines.iter().enumerate() {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            out.push_str(&reply::clean_line(&format!("{code}{sep}{line}")));
            out.push_str("\r\n");
        }
        self.actions.push_back(Action::Reply(out));
    }

    fn log(&mut self, line: String) {
        self.actions.push_back(Action::Log(line));
    }
}

/// `SIZE=<digits>` (RFC 1870): a value too large for u64 is certainly
/// over the limit, so it saturates instead of failing.
fn parse_size(value: Option<&str>) -> Option<u64> {
    let v = value?;
    if v.is_empty() || v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(v.parse().unwrap_or(u64::MAX))
}

/// Client bytes made safe for a log line: at most [`LOG_EXCERPT`] octets,
/// `<CR>`/`<LF>`/`<TAB>` shown as `\r`/`\n`/`\t`, anything else outside
/// printable ASCII as `?`, so no input can forge or split a log line.
pub fn excerpt(input: &[u8]) -> String {
    let mut out = String::new();
    for &b in input.iter().take(LOG_EXCERPT) {
        match b {
            b'\r' => out.push_str("\\r"),
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            b' '..=b'~' => out.push(char::from(b)),
            _ => out.push('?'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpts_are_single_printable_lines() {
        assert_eq!(excerpt(b"MAIL FROM:<a>\r\nRCPT\x00\xff"), "MAIL FROM:<a>\\r\\nRCPT??");
        assert_eq!(excerpt(&[b'x'; 500]).len(), LOG_EXCERPT);
    }

    #[test]
    fn clients_are_named_by_their_real_address() {
        let config = Arc::new(Config::parse("", std::path::Path::new("mortal.toml")).expect("defaults"));
        for (addr, logged) in [
            ("::ffff:192.0.2.9", "unknown[192.0.2.9]"),
            ("2001:db8::1", "unknown[2001:db8::1]"),
            ("::1", "unknown[::1]"),
        ] {
            let mut session = Session::new(Arc::clone(&config), addr.parse().expect("address"));
            assert_eq!(session.next_action(), Some(Action::Log(format!("connect from {logged}"))));
            assert_eq!(session.next_action(), Some(Action::Reply("220 localhost ESMTP mortal\r\n".into())));
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size(Some("0")), Some(0));
        assert_eq!(parse_size(Some("10240000")), Some(10_240_000));
        assert_eq!(parse_size(Some("99999999999999999999")), Some(u64::MAX));
        assert_eq!(parse_size(Some("999999999999999999999")), None);
        assert_eq!(parse_size(Some("-1")), None);
        assert_eq!(parse_size(Some("1e6")), None);
        assert_eq!(parse_size(None), None);
    }
}
