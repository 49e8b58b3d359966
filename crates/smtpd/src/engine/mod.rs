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
//! finally [`Session::finish`] for the `disconnect` log line. Everything a
//! session knows comes in when it is built: the configuration and the
//! process's [`RelayPolicy`] (with the recipient map loaded at start).
//!
//! ```
//! use mortal_smtpd::engine::{Action, Answer, Session};
//! use mortal_smtpd::relay::RelayPolicy;
//! use std::sync::Arc;
//!
//! let toml = "[server]\nhostname = \"mx.example.test\"\naccepted_domains = [\"example.test\"]\n";
//! let config = mortal_proto::config::Config::parse(toml, "mortal.toml".as_ref()).unwrap();
//! let relay = Arc::new(RelayPolicy::default());
//! let mut session = Session::new(Arc::new(config), relay, "192.0.2.1".parse().unwrap());
//! session.feed(b"EHLO client.test\r\n");
//! session.feed(b"MAIL FROM:<a@example.test>\r\n");
//! let actions: Vec<Action> = std::iter::from_fn(|| session.next_action()).collect();
//! assert!(matches!(actions.last(), Some(Action::StartTransaction { .. })));
//! session.transaction_opened("0000000010000100000A".parse().unwrap());
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
//!
//! STARTTLS (RFC 3207): TLS is the driver's business. The session answers
//! `220 2.0.0 Ready to start TLS`, emits [`Action::StartTls`] and waits;
//! the driver swaps the stream and reports [`Session::tls_established`]
//! (or [`Session::tls_failed`]). Everything learned before is forgotten
//! then: EHLO must come again. STARTTLS ends a pipelining group, so
//! plaintext sent after it in the same packet (the CVE-2011-0411 class of
//! command injection) is refused with the synchronization error above and
//! never reaches the TLS session.
//!
//! BDAT (RFC 3030): a chunk is read exactly as long as announced and
//! always read, even when the command is refused (no recipients, too big,
//! a failed transaction), because the client sends it regardless; see
//! [`bdat`] for the content rules. The reply to `BDAT ... LAST` is
//! cleanup's answer, as for DATA.
//!
//! Once `soft_error_limit` errors were made, every reply is preceded by
//! [`Action::Sleep`] (`error_sleep`), Postfix's tarpit for clients that
//! probe.

pub mod auth;
pub mod bdat;
pub mod check;
pub mod command;
pub mod data;
pub mod dsn;
pub mod line;
pub mod reply;
mod stats;

/// Inputs for the decoders' agreement tests: many short strings over the
/// octets that steer them (an ordinary octet, dot, CR, LF), from a fixed
/// xorshift sequence so a failure reproduces. Yields each input with the
/// random word it came from (for choosing a split point).
#[cfg(test)]
pub(crate) fn steering_inputs(count: usize) -> impl Iterator<Item = (Vec<u8>, u64)> {
    const ALPHABET: &[u8] = b"a.\r\n";
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..count).map(move |_| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let len = (seed % 24) as usize;
        let input = (0..len).map(|i| ALPHABET[((seed >> (2 * i % 60)) & 3) as usize]).collect();
        (input, seed)
    })
}

pub use auth::{AuthAnswer, SaslData};
pub use check::{Check, Facts, Subject};
pub use data::MAX_TEXT_LINE;
pub use line::MAX_COMMAND_LINE;

use crate::filter::verdict::{CheckStage, FilterReply};
use crate::relay::RelayPolicy;
use bdat::{ChunkDecoder, ChunkPolicy};
use command::{Command, Param, ParseError, Verb};
use data::{ContentError, DataReceiver};
use dsn::DsnReply as _;
use line::{Line, LineReader};
use mortal_proto::address::{self, AddressError};
use mortal_proto::config::{BareNewline, Config, ListenerRole};
use mortal_proto::envelope::{BodyType, ClientInfo, DsnRet, Notify, RecipientInfo, SaslLogin, SenderInfo};
use mortal_proto::queue_id::QueueId;
use mortal_proto::smtp_status::{EnhancedStatus, ReplyCode};
use mortal_proto::tls::TlsSummary;
use reply::Reply;
use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// Octets of unexpected client input quoted in a log line.
pub const LOG_EXCERPT: usize = 100;

/// The client host name when it is not known: always, unless `[smtpd]
/// reverse_lookup` found a forward-confirmed one (the driver looks it up,
/// see `crate::dns`), as in Postfix.
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
    /// Ask the filters (policy servers, milters) about this stage, then
    /// call [`Session::check_done`] with their verdict.
    Check(Check),
    /// Start an AUTH exchange with the authentication server: the
    /// mechanism (upper case) and the client's initial response, if it
    /// gave one (empty for `=`); then call [`Session::auth_answer`].
    AuthStart { mechanism: String, initial: Option<SaslData> },
    /// Pass the client's response to the last challenge on; then call
    /// [`Session::auth_answer`].
    AuthContinue(SaslData),
    /// The client gave up on the exchange (or botched its response): the
    /// driver forgets it, and expects no answer.
    AuthCancel,
    /// Write what is pending (the 220 to STARTTLS), then run the TLS
    /// handshake on the connection and report [`Session::tls_established`]
    /// or [`Session::tls_failed`].
    StartTls,
    /// Wait this long before carrying on with the actions after it (the
    /// error tarpit, `error_sleep`).
    Sleep(Duration),
    /// Write what is pending and close the connection.
    Close,
}

/// cleanup's verdict on a transaction (`Reply::Answer` of the IPC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub code: ReplyCode,
    pub status: EnhancedStatus,
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
        body: BodyType,
        smtputf8: bool,
        declared_size: u64,
        /// MAIL's parameters, for the filters.
        params: Vec<String>,
    },
    /// Waiting for the filters' verdict on a stage.
    Checking(check::Pending),
    /// Reading message content.
    Data(DataReceiver),
    /// Reading a BDAT chunk.
    Chunk(Chunk),
    /// `220 Ready to start TLS` was sent; waiting for the handshake.
    Handshake,
    /// AUTH: waiting for the authentication server's answer.
    Authenticating {
        mechanism: String,
    },
    /// AUTH: a `334` challenge was sent; the next line is the client's
    /// response.
    AuthResponse {
        mechanism: String,
    },
    /// The message is complete; waiting for cleanup's answer to DATA or
    /// to `BDAT ... LAST`.
    AwaitingAnswer {
        verb: Verb,
    },
    Closed,
}

/// A BDAT chunk being read.
#[derive(Debug)]
struct Chunk {
    /// Octets still to read.
    remaining: u64,
    size: u64,
    last: bool,
    /// The reply refusing this chunk, decided before reading it: the chunk
    /// is read and dropped.
    refusal: Option<Reply>,
    /// The refusal was logged already (a filter's, logged when it came).
    refusal_logged: bool,
}

/// What the BDAT chunks of a transaction have added up to.
#[derive(Debug)]
struct BdatState {
    size: u64,
    decoder: ChunkDecoder,
}

/// MAIL's parameters.
#[derive(Debug)]
struct MailParams {
    /// SIZE, 0 when not given.
    size: u64,
    body: BodyType,
    smtputf8: bool,
    ret: Option<DsnRet>,
    envid: String,
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
    queue_id: QueueId,
    recipients: u32,
    /// Set when cleanup failed or refused mid-transaction (or a BDAT chunk
    /// was refused): every further RCPT, BDAT and the DATA get this reply,
    /// and no 250 can follow.
    failure: Option<Reply>,
    body: BodyType,
    /// MAIL carried SMTPUTF8: UTF-8 addresses are allowed.
    smtputf8: bool,
    /// Set by the first BDAT: DATA is refused from then on.
    bdat: Option<BdatState>,
    /// MAIL's SIZE parameter, 0 when not given.
    declared_size: u64,
}

/// One SMTP session.
#[derive(Debug)]
pub struct Session {
    config: Arc<Config>,
    /// Who may receive mail here (accepted domains, trusted networks, the
    /// recipient map), shared by the sessions of this process.
    relay: Arc<RelayPolicy>,
    addr: IpAddr,
    /// The client's host name: [`UNKNOWN_NAME`] or a forward-confirmed one.
    name: String,
    /// `name[addr]`, as in every log line.
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
    /// The TLS in use, once STARTTLS completed.
    tls: Option<TlsSummary>,
    /// Where the filters want to be asked.
    plan: check::Plan,
    /// A filter's refusal at CONNECT, given to every MAIL.
    connect_refusal: Option<FilterReply>,
    /// What the listener the client came through is for.
    role: ListenerRole,
    /// Who the client logged in as with AUTH.
    login: Option<SaslLogin>,
    /// postscreen sent the greeting: this session never sends one.
    greeted: bool,
}

impl Session {
    /// Starts a session with a client at `addr`: queues the `connect from`
    /// log line and the greeting.
    pub fn new(config: Arc<Config>, relay: Arc<RelayPolicy>, addr: IpAddr) -> Self {
        Self::with_name(config, relay, addr, UNKNOWN_NAME)
    }

    /// [`Session::new`] for a client whose host name is `name` (the
    /// driver's forward-confirmed reverse lookup, already a valid host
    /// name, or [`UNKNOWN_NAME`]), which then appears in every log line
    /// and in `Received:`.
    pub fn with_name(config: Arc<Config>, relay: Arc<RelayPolicy>, addr: IpAddr, name: &str) -> Self {
        Self::on_listener(config, relay, addr, name, ListenerRole::Mx, None)
    }

    /// [`Session::with_name`] for a client of a listener with `role`;
    /// `tls` is what the handshake negotiated when the listener speaks
    /// TLS from the first octet (`submissions_listen`), which the driver
    /// has done before the greeting.
    pub fn on_listener(
        config: Arc<Config>,
        relay: Arc<RelayPolicy>,
        addr: IpAddr,
        name: &str,
        role: ListenerRole,
        tls: Option<TlsSummary>,
    ) -> Self {
        Self::start(config, relay, addr, name, role, tls, false)
    }

    /// A session with a client postscreen passed on: the client has the
    /// whole greeting already, so the session starts by reading its first
    /// command (which postscreen hands over too, for [`Session::feed`]).
    pub fn greeted_by_postscreen(
        config: Arc<Config>,
        relay: Arc<RelayPolicy>,
        addr: IpAddr,
        name: &str,
        role: ListenerRole,
    ) -> Self {
        Self::start(config, relay, addr, name, role, None, true)
    }

    fn start(
        config: Arc<Config>,
        relay: Arc<RelayPolicy>,
        addr: IpAddr,
        name: &str,
        role: ListenerRole,
        tls: Option<TlsSummary>,
        greeted: bool,
    ) -> Self {
        // A v4 client on a dual-stack socket appears as ::ffff:a.b.c.d;
        // log and pass on the address it really has, as Postfix does.
        let addr = addr.to_canonical();
        let greeting = reply::greeting(&config.server.hostname, &config.smtpd.banner);
        let mut session = Session {
            relay,
            addr,
            name: name.to_owned(),
            client: format!("{name}[{addr}]"),
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
            tls: None,
            plan: check::Plan::of(&config),
            connect_refusal: None,
            role,
            login: None,
            greeted,
            config,
        };
        session.log(format!("connect from {}", session.client));
        if let Some(info) = tls {
            session.log(format!("Anonymous TLS connection established from {}: {info}", session.client));
            session.tls = Some(info);
        }
        if !session.ask(CheckStage::Connect, Subject::None, check::Pending::Connect) && !session.greeted {
            session.reply(&greeting);
        }
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
        matches!(self.phase, Phase::Command | Phase::Data(_) | Phase::Chunk(_) | Phase::AuthResponse { .. })
    }

    /// Whether the session is reading message content, where the driver
    /// enforces `min_data_rate`: DATA, a BDAT chunk, and the BDAT commands
    /// between chunks (else a client could trickle one-octet chunks).
    pub fn in_content(&self) -> bool {
        match self.phase {
            Phase::Data(_) | Phase::Chunk(_) => true,
            Phase::Command => self.txn.as_ref().is_some_and(|t| t.bdat.is_some()),
            _ => false,
        }
    }

    /// The TLS handshake after [`Action::StartTls`] completed; `info` says
    /// what was negotiated, as `Received:` shows it. RFC 3207 4.2: the
    /// session starts over, so EHLO is needed again.
    ///
    /// # Panics
    /// If no [`Action::StartTls`] is outstanding (a driver bug).
    pub fn tls_established(&mut self, info: TlsSummary) {
        assert!(matches!(self.phase, Phase::Handshake), "tls_established without an outstanding StartTls");
        self.stats.count(Verb::Starttls, true);
        self.log(format!("Anonymous TLS connection established from {}: {info}", self.client));
        self.tls = Some(info);
        self.helo = None;
        self.abort_transaction();
        self.lines = LineReader::default();
        self.input.clear();
        self.pos = 0;
        self.phase = Phase::Command;
    }

    /// The TLS handshake failed (or timed out): the connection is in an
    /// unknown state, so the session ends.
    pub fn tls_failed(&mut self, reason: &str) {
        if self.is_closed() {
            return;
        }
        self.log(format!("SSL_accept error from {}: {reason}", self.client));
        self.log(format!("lost connection after STARTTLS from {}", self.client));
        self.close();
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// cleanup accepted the sender and named the queue id.
    ///
    /// # Panics
    /// If no [`Action::StartTransaction`] is outstanding: that is a driver
    /// bug, and carrying on could attach a message to the wrong envelope.
    pub fn transaction_opened(&mut self, queue_id: QueueId) {
        let Phase::Opening { sender, body, smtputf8, declared_size, params } =
            std::mem::replace(&mut self.phase, Phase::Command)
        else {
            panic!("transaction_opened without an outstanding StartTransaction");
        };
        let login = match &self.login {
            Some(l) => format!(", sasl_method={}, sasl_username={}", l.method, l.username),
            None => String::new(),
        };
        self.log(format!("{queue_id}: client={}{login}", self.client));
        self.txn = Some(Transaction {
            sender,
            queue_id,
            recipients: 0,
            failure: None,
            body,
            smtputf8,
            bdat: None,
            declared_size,
        });
        if !self.ask(CheckStage::Mail, Subject::Mail { params }, check::Pending::Mail) {
            self.succeed(Verb::Mail, &reply::MAIL_OK);
        }
        self.process();
    }

    /// cleanup answered: the final answer after [`Action::EndOfData`], or
    /// an early refusal at any other point of the transaction.
    pub fn cleanup_answer(&mut self, answer: Answer) {
        self.cleanup_outcome(reply::from_answer(answer.code, answer.status, &answer.text));
    }

    /// cleanup could not be reached or the conversation broke: the client
    /// gets `451 4.3.0` where it would have needed cleanup's word.
    pub fn cleanup_failed(&mut self) {
        self.cleanup_outcome(reply::QUEUE_WRITE_ERROR);
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

    /// The client sent message content slower than `min_data_rate`
    /// (`rate` octets/s over the last window): treated as a timeout, so a
    /// slowloris cannot hold the process.
    pub fn too_slow(&mut self, rate: u64, min_rate: u64) {
        if self.is_closed() {
            return;
        }
        self.log(format!(
            "data rate {rate} octets/s below min_data_rate {min_rate} after {} from {}",
            self.last, self.client
        ));
        self.timed_out();
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
                Phase::Chunk(_) => self.next_chunk(),
                Phase::AuthResponse { .. } => self.next_auth_response(),
                Phase::Opening { .. }
                | Phase::Checking(_)
                | Phase::Handshake
                | Phase::Authenticating { .. }
                | Phase::AwaitingAnswer { .. }
                | Phase::Closed => false,
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
            Line::BareLf => self.malformed_line(&reply::BARE_LF, pending),
            Line::BareCr => self.malformed_line(&reply::BARE_CR, pending),
            Line::TooLong => self.malformed_line(&reply::LINE_TOO_LONG, pending),
        }
        true
    }

    fn malformed_line(&mut self, text: &Reply, pending: bool) {
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
            Ok(Command::Unknown)
                if self.ask(CheckStage::Unknown, Subject::Unknown(line.to_owned()), check::Pending::Unknown) => {}
            Ok(cmd) => self.execute(cmd),
            Err(ParseError::Empty) => self.fail(Verb::Unknown, &reply::BAD_SYNTAX),
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
        self.reply(&reply::SYNC_ERROR);
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
            Command::StartTls => self.starttls(),
            Command::Auth { mechanism, initial } => self.auth(mechanism, initial),
            Command::Bdat { size, last } => self.bdat(size, last),
            Command::Rset => {
                self.abort_transaction();
                self.succeed(Verb::Rset, &reply::OK);
            }
            Command::Noop => self.succeed(Verb::Noop, &reply::OK),
            Command::Vrfy(_) => self.succeed(Verb::Vrfy, &reply::VRFY),
            Command::Help => self.succeed(Verb::Help, &reply::HELP),
            Command::Quit => {
                self.succeed(Verb::Quit, &reply::BYE);
                self.close();
            }
            Command::NotImplemented(_) => self.fail(Verb::Unknown, &reply::NOT_IMPLEMENTED),
            Command::Unknown => self.fail(Verb::Unknown, &reply::UNKNOWN_COMMAND),
        }
    }

    fn syntax_error(&mut self, verb: Verb) {
        let text = reply::syntax(verb.syntax());
        match verb {
            Verb::Rcpt | Verb::Data => self.reject(verb, &text, None),
            // The chunk length is unknown, so where the next command starts
            // is too: the session cannot go on.
            Verb::Bdat if self.config.smtpd.chunking => {
                self.reject(verb, &text, None);
                self.close();
            }
            _ => self.fail(verb, &text),
        }
    }

    /// STARTTLS (RFC 3207): only when offered, once, and outside a mail
    /// transaction.
    fn starttls(&mut self) {
        if !self.config.smtpd.tls_offered() {
            return self.fail(Verb::Starttls, &reply::NOT_IMPLEMENTED);
        }
        if self.tls.is_some() {
            return self.fail(Verb::Starttls, &reply::TLS_ACTIVE);
        }
        if self.txn.is_some() {
            return self.fail(Verb::Starttls, &reply::TRANSACTION_IN_PROGRESS);
        }
        // Counted when the handshake ends, which decides success.
        self.reply(&reply::STARTTLS_READY);
        self.actions.push_back(Action::StartTls);
        self.phase = Phase::Handshake;
        // Nothing sent in the clear may reach the TLS session. Input after
        // STARTTLS already ended the session as out of sync; this holds
        // whatever the reason.
        self.input.truncate(self.pos);
    }

    /// EHLO/HELO; a repeated one resets the transaction (RFC 5321 4.1.4).
    fn helo(&mut self, name: &str, esmtp: bool) {
        self.abort_transaction();
        // Known to the filters while they decide (policy helo_name, the
        // log line); forgotten again if they refuse it.
        self.helo = Some(Helo { name: name.to_owned(), esmtp });
        let verb = if esmtp { Verb::Ehlo } else { Verb::Helo };
        if self.ask(
            CheckStage::Helo,
            Subject::Helo(name.to_owned()),
            check::Pending::Helo { verb, name: name.to_owned() },
        ) {
            return;
        }
        self.greet(name.to_owned(), esmtp);
    }

    /// The reply to an accepted HELO/EHLO.
    fn greet(&mut self, name: String, esmtp: bool) {
        self.helo = Some(Helo { name, esmtp });
        let hostname = &self.config.server.hostname;
        if !esmtp {
            return self.succeed(Verb::Helo, &reply::helo(hostname));
        }
        let smtpd = &self.config.smtpd;
        let mut lines = vec![hostname.clone(), "PIPELINING".into(), format!("SIZE {}", smtpd.message_size_limit)];
        if smtpd.tls_offered() && self.tls.is_none() {
            lines.push("STARTTLS".into());
        }
        lines.extend(self.auth_keyword());
        lines.extend(["ENHANCEDSTATUSCODES".into(), "8BITMIME".into()]);
        if smtpd.dsn {
            lines.push("DSN".into());
        }
        if smtpd.smtputf8 {
            lines.push("SMTPUTF8".into());
        }
        if smtpd.chunking {
            lines.extend(["BINARYMIME".into(), "CHUNKING".into()]);
        }
        self.stats.count(Verb::Ehlo, true);
        self.reply_multiline(const { ReplyCode::of(250) }, &lines);
    }

    fn mail(&mut self, path: &str, params: &[Param<'_>]) {
        let Some(helo) = &self.helo else { return self.fail(Verb::Mail, &reply::NEED_HELO) };
        let helo = helo.name.clone();
        if self.txn.is_some() {
            return self.fail(Verb::Mail, &reply::NESTED_MAIL);
        }
        if let Some(refusal) = self.connect_refusal.clone() {
            return self.refused(Verb::Mail, &refusal);
        }
        // Submission takes mail only from logged-in clients, and they log
        // in only under TLS.
        if self.role.is_submission() && self.login.is_none() {
            let refusal = if self.tls.is_none() { auth::MUST_STARTTLS } else { auth::AUTH_REQUIRED };
            return self.fail(Verb::Mail, &refusal);
        }
        let param_strings = check::param_strings(params);
        let params = match self.mail_params(params) {
            Ok(params) => params,
            Err(text) => return self.fail(Verb::Mail, &text),
        };
        if params.smtputf8 && path.contains(char::REPLACEMENT_CHARACTER) {
            return self.fail(Verb::Mail, &reply::MALFORMED_UTF8_ADDRESS);
        }
        let sender = match address::parse_reverse_path(path, params.smtputf8) {
            Ok(mailbox) => mailbox.map(|m| m.to_string()).unwrap_or_default(),
            Err(AddressError::Utf8NotAllowed) => return self.fail(Verb::Mail, &reply::UTF8_ADDRESS),
            Err(_) => return self.fail(Verb::Mail, &reply::BAD_SENDER),
        };
        let client = ClientInfo {
            addr: self.addr,
            name: self.name.clone(),
            helo,
            protocol: self.protocol_for(params.smtputf8).into(),
            tls: self.tls.as_ref().map(TlsSummary::to_string).unwrap_or_default(),
            auth: self.login.clone(),
        };
        let MailParams { body, smtputf8, ret, envid, size } = params;
        let info = SenderInfo { address: sender.clone(), body, smtputf8, ret, envid };
        self.actions.push_back(Action::StartTransaction { client, sender: info });
        self.phase = Phase::Opening { sender, body, smtputf8, declared_size: size, params: param_strings };
    }

    /// SIZE (RFC 1870), BODY (RFC 6152, RFC 3030 BINARYMIME), SMTPUTF8
    /// (RFC 6531), RET and ENVID (RFC 3461), each at most once and only
    /// when offered: a HELO client was offered no extensions, so it may
    /// use none (RFC 5321 4.1.1.11).
    fn mail_params(&self, params: &[Param<'_>]) -> Result<MailParams, Reply> {
        let esmtp = self.helo.as_ref().is_some_and(|h| h.esmtp);
        let smtpd = &self.config.smtpd;
        let mut out =
            MailParams { size: 0, body: BodyType::SevenBit, smtputf8: false, ret: None, envid: String::new() };
        let mut seen: Vec<String> = Vec::new();
        for p in params {
            let keyword = p.keyword.to_ascii_uppercase();
            if seen.contains(&keyword) {
                return Err(reply::duplicate_option(&keyword));
            }
            match (esmtp, keyword.as_str(), p.value) {
                (true, "SIZE", value) => {
                    out.size = parse_size(value).ok_or(reply::BAD_SIZE)?;
                    if out.size > smtpd.message_size_limit {
                        return Err(reply::TOO_BIG);
                    }
                }
                (true, "BODY", Some(v)) if v.eq_ignore_ascii_case("7BIT") => out.body = BodyType::SevenBit,
                (true, "BODY", Some(v)) if v.eq_ignore_ascii_case("8BITMIME") => out.body = BodyType::EightBitMime,
                (true, "BODY", Some(v)) if smtpd.chunking && v.eq_ignore_ascii_case("BINARYMIME") => {
                    out.body = BodyType::BinaryMime;
                }
                (true, "BODY", _) => return Err(reply::BAD_BODY),
                (true, "SMTPUTF8", None) if smtpd.smtputf8 => out.smtputf8 = true,
                (true, "SMTPUTF8", Some(_)) if smtpd.smtputf8 => return Err(reply::BAD_SMTPUTF8),
                (true, "RET", v) if smtpd.dsn => out.ret = Some(dsn::parse_ret(v).map_err(|e| e.reply())?),
                (true, "ENVID", v) if smtpd.dsn => out.envid = dsn::parse_envid(v).map_err(|e| e.reply())?,
                _ => return Err(reply::unsupported_option(p.keyword)),
            }
            seen.push(keyword);
        }
        Ok(out)
    }

    /// NOTIFY and ORCPT (RFC 3461), each at most once and only when DSN
    /// was offered.
    fn rcpt_params(&self, params: &[Param<'_>]) -> Result<(Notify, String), Reply> {
        let esmtp = self.helo.as_ref().is_some_and(|h| h.esmtp);
        let (mut notify, mut orcpt) = (Notify::default(), String::new());
        let mut seen: Vec<String> = Vec::new();
        for p in params {
            let keyword = p.keyword.to_ascii_uppercase();
            if seen.contains(&keyword) {
                return Err(reply::duplicate_option(&keyword));
            }
            match (esmtp && self.config.smtpd.dsn, keyword.as_str()) {
                (true, "NOTIFY") => notify = dsn::parse_notify(p.value).map_err(|e| e.reply())?,
                (true, "ORCPT") => orcpt = dsn::parse_orcpt(p.value).map_err(|e| e.reply())?,
                _ => return Err(reply::unsupported_option(p.keyword)),
            }
            seen.push(keyword);
        }
        Ok((notify, orcpt))
    }

    fn rcpt(&mut self, path: &str, params: &[Param<'_>]) {
        let Some(txn) = &self.txn else { return self.reject(Verb::Rcpt, &reply::NEED_MAIL, Some(path)) };
        if let Some(failure) = txn.failure.clone() {
            return self.reject(Verb::Rcpt, &failure, Some(path));
        }
        // Checked first, as Postfix does: past the limit nothing else matters.
        if txn.recipients >= self.config.smtpd.recipient_limit {
            return self.reject(Verb::Rcpt, &reply::TOO_MANY_RECIPIENTS, Some(path));
        }
        let (notify, orcpt) = match self.rcpt_params(params) {
            Ok(p) => p,
            Err(text) => return self.reject(Verb::Rcpt, &text, Some(path)),
        };
        let address = match self.recipient(path) {
            Ok(address) => address,
            Err(text) => return self.reject(Verb::Rcpt, &text, Some(path)),
        };
        let rcpt = RecipientInfo { address: address.clone(), notify, orcpt };
        let subject = Subject::Rcpt { address, params: check::param_strings(params) };
        if self.ask(CheckStage::Rcpt, subject, check::Pending::Rcpt { rcpt: rcpt.clone(), path: path.to_owned() }) {
            return;
        }
        self.accept_recipient(rcpt);
    }

    fn accept_recipient(&mut self, rcpt: RecipientInfo) {
        if let Some(txn) = &mut self.txn {
            txn.recipients += 1;
        }
        self.actions.push_back(Action::Recipient(rcpt));
        self.succeed(Verb::Rcpt, &reply::RCPT_OK);
    }

    /// The address to deliver to, or the reply refusing it. Only domains in
    /// `accepted_domains` are accepted, except from `trusted_networks`
    /// ([`crate::relay`]): mortal is never an open relay.
    fn recipient(&self, path: &str) -> Result<String, Reply> {
        // RFC 5321 4.5.1: `<Postmaster>` without a domain must be accepted;
        // it means the postmaster of the first (primary) accepted domain.
        if path.eq_ignore_ascii_case("<postmaster>") {
            return match self.config.server.accepted_domains.first() {
                Some(domain) => Ok(format!("postmaster@{domain}")),
                None => Err(reply::relay_denied("postmaster")),
            };
        }
        let smtputf8 = self.txn.as_ref().is_some_and(|t| t.smtputf8);
        if smtputf8 && path.contains(char::REPLACEMENT_CHARACTER) {
            return Err(reply::MALFORMED_UTF8_ADDRESS);
        }
        let mailbox = address::parse_path(path, smtputf8).map_err(|e| match e {
            AddressError::Utf8NotAllowed => reply::UTF8_ADDRESS,
            _ => reply::BAD_RECIPIENT,
        })?;
        // A logged-in client may send anywhere (cleanup agrees only where
        // AUTH is configured); mail to our own domains still meets the
        // recipient map.
        if self.login.is_some() && !self.config.accepts_domain(&mailbox.domain) {
            return Ok(mailbox.to_string());
        }
        // Accepted domains, the recipient map and trusted_networks.
        self.relay.check(&self.config, self.addr, &mailbox)?;
        Ok(mailbox.to_string())
    }

    fn data(&mut self) {
        let failure = match &self.txn {
            None => Some(reply::NEED_RCPT),
            Some(txn) if txn.bdat.is_some() => Some(reply::DATA_AFTER_BDAT),
            Some(txn) if txn.body == BodyType::BinaryMime => Some(reply::BINARYMIME_NEEDS_BDAT),
            Some(txn) if txn.failure.is_some() => txn.failure.clone(),
            Some(txn) if txn.recipients == 0 => Some(reply::NO_VALID_RECIPIENTS),
            Some(_) => None,
        };
        if let Some(text) = failure {
            return self.reject(Verb::Data, &text, None);
        }
        if !self.ask(CheckStage::Data, Subject::None, check::Pending::Data) {
            self.start_data();
        }
    }

    fn start_data(&mut self) {
        // The DATA count is settled by the reply after the terminator.
        self.reply(&reply::START_DATA);
        let normalize = self.config.smtpd.bare_newline == BareNewline::Normalize;
        self.phase = Phase::Data(DataReceiver::with_bare_newline(self.config.smtpd.message_size_limit, normalize));
    }

    /// `BDAT size [LAST]` (RFC 3030). Whatever the answer, the chunk is
    /// read first: the client sends it without waiting.
    fn bdat(&mut self, size: u64, last: bool) {
        if !self.config.smtpd.chunking {
            return self.fail(Verb::Bdat, &reply::NOT_IMPLEMENTED);
        }
        let limit = self.config.smtpd.message_size_limit;
        let refusal = match &self.txn {
            _ if !self.helo.as_ref().is_some_and(|h| h.esmtp) => Some(reply::BDAT_NEEDS_EHLO),
            None => Some(reply::NEED_RCPT),
            Some(txn) if txn.failure.is_some() => txn.failure.clone(),
            Some(txn) if txn.recipients == 0 => Some(reply::NO_VALID_RECIPIENTS),
            Some(txn) if txn.bdat.as_ref().map_or(0, |b| b.size).saturating_add(size) > limit => Some(reply::TOO_BIG),
            Some(_) => None,
        };
        let first = self.txn.as_ref().is_some_and(|t| t.bdat.is_none());
        if refusal.is_none() && first && self.ask(CheckStage::Data, Subject::None, check::Pending::Bdat { size, last })
        {
            return;
        }
        self.start_chunk(size, last, refusal, false);
    }

    /// Reads a BDAT chunk: kept, or read and dropped with `refusal`.
    fn start_chunk(&mut self, size: u64, last: bool, refusal: Option<Reply>, refusal_logged: bool) {
        if let (None, Some(txn)) = (&refusal, &mut self.txn) {
            let policy = match txn.body {
                BodyType::BinaryMime => ChunkPolicy::Binary,
                _ => ChunkPolicy::Text { normalize: self.config.smtpd.bare_newline == BareNewline::Normalize },
            };
            let state = txn.bdat.get_or_insert_with(|| BdatState { size: 0, decoder: ChunkDecoder::new(policy) });
            state.size += size;
        }
        self.phase = Phase::Chunk(Chunk { remaining: size, size, last, refusal, refusal_logged });
    }

    /// Passes chunk content on; true when the chunk is complete.
    fn next_chunk(&mut self) -> bool {
        let Phase::Chunk(chunk) = &mut self.phase else { return false };
        let available = (self.input.len() - self.pos) as u64;
        let take = usize::try_from(chunk.remaining.min(available)).expect("at most the buffered length");
        if chunk.remaining > 0 && take == 0 {
            return false;
        }
        let bytes = &self.input[self.pos..self.pos + take];
        self.pos += take;
        chunk.remaining -= take as u64;
        let keep = chunk.refusal.is_none();
        if let Some(txn) = self.txn.as_mut().filter(|t| keep && t.failure.is_none())
            && let Some(state) = &mut txn.bdat
        {
            let mut out = Vec::new();
            state.decoder.decode(bytes, &mut out);
            if !out.is_empty() {
                self.actions.push_back(Action::Data(out));
            }
        }
        if chunk.remaining > 0 {
            return true;
        }
        let Phase::Chunk(chunk) = std::mem::replace(&mut self.phase, Phase::Command) else {
            unreachable!("matched Phase::Chunk above")
        };
        self.chunk_done(chunk);
        true
    }

    /// A chunk was read completely: answer it, or end the message.
    fn chunk_done(&mut self, chunk: Chunk) {
        if let Some(text) = chunk.refusal {
            if let Some(txn) = &mut self.txn {
                txn.failure.get_or_insert(text.clone());
            }
            if chunk.refusal_logged {
                self.fail(Verb::Bdat, &text);
            } else {
                self.reject(Verb::Bdat, &text, None);
            }
            if chunk.last {
                self.abort_transaction();
            }
            return;
        }
        let error = self.txn.as_mut().and_then(|t| t.bdat.as_mut()).and_then(|state| match chunk.last {
            true => state.decoder.finish(),
            false => state.decoder.error(),
        });
        if let Some(e) = error {
            let text = content_reply(e);
            self.last = "END-OF-MESSAGE";
            self.log_reject(RejectStage::EndOfMessage, &text, None);
            if let Some(txn) = &mut self.txn {
                txn.failure.get_or_insert(text.clone());
            }
            if chunk.last {
                self.abort_transaction();
            }
            return self.fail(Verb::Bdat, &text);
        }
        if let Some(failure) = self.txn.as_ref().and_then(|t| t.failure.clone()) {
            self.reject(Verb::Bdat, &failure, None);
            if chunk.last {
                self.abort_transaction();
            }
            return;
        }
        if !chunk.last {
            return self.succeed(Verb::Bdat, &reply::chunk_ok(chunk.size));
        }
        self.last = "END-OF-MESSAGE";
        self.message_complete(Verb::Bdat);
    }

    /// The content is complete and sound: past the filters' end-of-message
    /// check, cleanup gets `End`.
    fn message_complete(&mut self, verb: Verb) {
        if !self.ask(CheckStage::EndOfMessage, Subject::None, check::Pending::EndOfMessage { verb }) {
            self.hand_over(verb);
        }
    }

    fn hand_over(&mut self, verb: Verb) {
        self.actions.push_back(Action::EndOfData);
        self.phase = Phase::AwaitingAnswer { verb };
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
        if let Some(text) = error.map(content_reply) {
            self.log_reject(RejectStage::EndOfMessage, &text, None);
            self.abort_transaction();
            return self.fail(Verb::Data, &text);
        }
        if let Some(failure) = self.txn.as_ref().and_then(|t| t.failure.clone()) {
            self.abort_transaction();
            return self.fail(Verb::Data, &failure);
        }
        self.message_complete(Verb::Data);
    }

    /// Applies cleanup's verdict (`text` is the reply it maps to) to
    /// whatever the session is waiting for.
    fn cleanup_outcome(&mut self, text: Reply) {
        // A 250 means "queued" only as the answer to End; anywhere else it
        // is cleanup misbehaving, and no success may be inferred from it.
        let queued = text.code.get() == 250;
        let failure = if queued { reply::QUEUE_WRITE_ERROR } else { text.clone() };
        match &self.phase {
            Phase::Opening { .. } => {
                self.phase = Phase::Command;
                self.fail(Verb::Mail, &failure);
                self.process();
            }
            Phase::AwaitingAnswer { verb } => {
                let verb = *verb;
                self.phase = Phase::Command;
                self.txn = None;
                if queued {
                    self.succeed(verb, &text);
                } else {
                    self.fail(verb, &text);
                }
                self.process();
            }
            Phase::Command
            | Phase::Data(_)
            | Phase::Chunk(_)
            | Phase::Handshake
            | Phase::Checking(_)
            | Phase::Authenticating { .. }
            | Phase::AuthResponse { .. } => {
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
            Phase::Data(_) => self.stats.count(Verb::Data, false),
            Phase::Chunk(_) => self.stats.count(Verb::Bdat, false),
            Phase::AwaitingAnswer { verb } => self.stats.count(verb, false),
            Phase::Handshake => self.stats.count(Verb::Starttls, false),
            Phase::Authenticating { .. } | Phase::AuthResponse { .. } => {
                self.stats.count(Verb::Auth, false);
                self.actions.push_back(Action::AuthCancel);
            }
            Phase::Checking(ref pending) => self.stats.count(pending.verb(), false),
            Phase::Command | Phase::Closed => {}
        }
        self.abort_transaction();
        self.actions.push_back(Action::Close);
        self.phase = Phase::Closed;
        self.input.clear();
        self.pos = 0;
    }

    fn succeed(&mut self, verb: Verb, text: &Reply) {
        self.stats.count(verb, true);
        self.reply(text);
    }

    /// A failed command: counted, answered, and closer to the error limit.
    fn fail(&mut self, verb: Verb, text: &Reply) {
        self.stats.count(verb, false);
        self.reply(text);
        self.count_error();
    }

    /// One more error; at `hard_error_limit` the session ends.
    fn count_error(&mut self) {
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
    fn reject(&mut self, verb: Verb, text: &Reply, path: Option<&str>) {
        self.log_reject(RejectStage::Command(verb), text, path);
        self.fail(verb, text);
    }

    fn log_reject(&mut self, stage: RejectStage, text: &Reply, path: Option<&str>) {
        self.log_event("reject", stage.name(), &text.line(), path);
    }

    /// `<id>: <word>: <STAGE> from <client>: <text>; from=<..> to=<..>
    /// proto=.. helo=<..>`: Postfix's shape for reject, warn, hold and
    /// discard lines.
    fn log_event(&mut self, word: &str, stage: &str, text: &str, path: Option<&str>) {
        // A queue id is only shown once a recipient was accepted: before
        // that nothing can be queued under it (Postfix shows NOQUEUE then).
        let queue_id = match &self.txn {
            Some(t) if t.recipients > 0 => t.queue_id.as_str(),
            _ => "NOQUEUE",
        };
        let mut line = format!("{queue_id}: {word}: {stage} from {}: {text};", self.client);
        if let Some(t) = &self.txn {
            line.push_str(&format!(" from=<{}>", t.sender));
        }
        if let Some(path) = path {
            let bare = path.strip_prefix('<').and_then(|p| p.strip_suffix('>')).unwrap_or(path);
            line.push_str(&format!(" to=<{}>", excerpt(bare.as_bytes())));
        }
        let utf8 = self.txn.as_ref().is_some_and(|t| t.smtputf8);
        line.push_str(&format!(" proto={}", self.protocol_for(utf8)));
        if let Some(h) = &self.helo {
            line.push_str(&format!(" helo=<{}>", h.name));
        }
        self.log(line);
    }

    /// The RFC 3848 / RFC 6531 `with` value: `SMTP` after HELO, else
    /// `ESMTP`, `UTF8SMTP` for a transaction with SMTPUTF8, plus `S` under
    /// TLS.
    /// RFC 3848 and RFC 6531's `with` names: S for TLS, A for AUTH.
    fn protocol_for(&self, smtputf8: bool) -> &'static str {
        let esmtp = self.helo.as_ref().is_some_and(|h| h.esmtp);
        match (esmtp, smtputf8, self.tls.is_some(), self.login.is_some()) {
            (false, _, _, _) => "SMTP",
            (true, false, false, false) => "ESMTP",
            (true, false, true, false) => "ESMTPS",
            (true, false, false, true) => "ESMTPA",
            (true, false, true, true) => "ESMTPSA",
            (true, true, false, false) => "UTF8SMTP",
            (true, true, true, false) => "UTF8SMTPS",
            (true, true, false, true) => "UTF8SMTPA",
            (true, true, true, true) => "UTF8SMTPSA",
        }
    }

    fn reply(&mut self, reply: &Reply) {
        self.tarpit();
        self.actions.push_back(Action::Reply(format!("{}\r\n", reply.line())));
    }

    /// Past `soft_error_limit` errors, every reply waits `error_sleep`.
    fn tarpit(&mut self) {
        let soft = self.config.smtpd.soft_error_limit;
        if soft > 0 && self.errors >= soft && !self.config.smtpd.error_sleep.is_zero() {
            self.actions.push_back(Action::Sleep(self.config.smtpd.error_sleep));
        }
    }

    /// `250-first`, ..., `250 last`, as one write.
    fn reply_multiline(&mut self, code: ReplyCode, lines: &[String]) {
        let mut out = String::new();
        for (i, line) in lines.iter().enumerate() {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            out.push_str(&reply::clean_line(&format!("{code}{sep}{line}")));
            out.push_str("\r\n");
        }
        self.tarpit();
        self.actions.push_back(Action::Reply(out));
    }

    fn log(&mut self, line: String) {
        self.actions.push_back(Action::Log(line));
    }
}

/// The reply refusing a message for its content.
fn content_reply(e: ContentError) -> Reply {
    match e {
        ContentError::BareLf => reply::DATA_BARE_LF,
        ContentError::BareCr => reply::DATA_BARE_CR,
        ContentError::LineTooLong => reply::DATA_LINE_TOO_LONG,
        ContentError::TooBig => reply::TOO_BIG,
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

/// The stage a `reject:` line names, in Postfix's words: the command
/// refused, or `END-OF-MESSAGE` for a message refused after its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RejectStage {
    Command(Verb),
    EndOfMessage,
}

impl RejectStage {
    fn name(self) -> &'static str {
        match self {
            RejectStage::Command(verb) => verb.name(),
            RejectStage::EndOfMessage => "END-OF-MESSAGE",
        }
    }
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
            let mut session = Session::new(Arc::clone(&config), Arc::default(), addr.parse().expect("address"));
            assert_eq!(session.next_action(), Some(Action::Log(format!("connect from {logged}"))));
            assert_eq!(session.next_action(), Some(Action::Reply("220 localhost ESMTP mortal\r\n".into())));
        }
    }

    /// A client postscreen passed on has the greeting: the session's
    /// first reply answers its first command, with or without a filter
    /// asked at CONNECT.
    #[test]
    fn a_client_greeted_by_postscreen_is_never_greeted_again() {
        for toml in ["", "[[smtpd.policy]]\nendpoint = \"inet:127.0.0.1:9\"\nstages = [\"connect\"]\n"] {
            let config = Arc::new(Config::parse(toml, std::path::Path::new("mortal.toml")).expect("config"));
            let addr = "192.0.2.9".parse().expect("address");
            let mut session = Session::greeted_by_postscreen(config, Arc::default(), addr, "unknown", ListenerRole::Mx);
            let mut actions: Vec<Action> = std::iter::from_fn(|| session.next_action()).collect();
            if let Some(Action::Check { .. }) = actions.last() {
                actions.pop();
                session.check_done(crate::filter::verdict::Verdict::proceed());
                actions.extend(std::iter::from_fn(|| session.next_action()));
            }
            assert_eq!(actions, [Action::Log("connect from unknown[192.0.2.9]".into())], "{toml}");
            session.feed(b"HELO client.test\r\n");
            assert_eq!(session.next_action(), Some(Action::Reply("250 localhost\r\n".into())), "{toml}");
        }
    }

    #[test]
    fn a_looked_up_name_reaches_logs_and_the_transaction() {
        let toml = "[server]\naccepted_domains = [\"example.test\"]\n";
        let config = Arc::new(Config::parse(toml, std::path::Path::new("mortal.toml")).expect("config"));
        let addr = "192.0.2.9".parse().expect("address");
        let mut session = Session::with_name(config, Arc::default(), addr, "mx.example.net");
        assert_eq!(session.next_action(), Some(Action::Log("connect from mx.example.net[192.0.2.9]".into())));
        session.feed(b"EHLO client.test\r\n");
        session.feed(b"MAIL FROM:<a@example.test>\r\n");
        let actions: Vec<Action> = std::iter::from_fn(|| session.next_action()).collect();
        let Some(Action::StartTransaction { client, .. }) = actions.last() else { panic!("{actions:?}") };
        assert_eq!((client.name.as_str(), client.addr.to_string().as_str()), ("mx.example.net", "192.0.2.9"));
        session.transaction_opened("0000000010000100000A".parse().unwrap());
        let logged = Action::Log("0000000010000100000A: client=mx.example.net[192.0.2.9]".into());
        assert_eq!(session.next_action(), Some(logged));
        assert!(session.finish().starts_with("disconnect from mx.example.net[192.0.2.9] "));
    }

    /// The recipient map is the session's, given when it is built: two
    /// sessions in one process can hold different ones.
    #[test]
    fn the_recipient_map_is_the_one_the_session_was_given() {
        let toml = "[server]\naccepted_domains = [\"example.test\"]\n";
        let config = Arc::new(Config::parse(toml, std::path::Path::new("mortal.toml")).expect("config"));
        let map = crate::relay::RecipientMap::parse("alice@example.test\n").expect("map");
        let listed = Arc::new(RelayPolicy::with_map(map));
        let unknown = "550 5.1.1 <carol@example.test>: Recipient address rejected: \
                       User unknown in local recipient table\r\n";
        for (relay, carol) in [(listed, unknown), (Arc::default(), "250 2.1.5 Ok\r\n")] {
            let mut session = Session::new(Arc::clone(&config), relay, "192.0.2.9".parse().expect("address"));
            session.feed(b"EHLO client.test\r\n");
            session.feed(b"MAIL FROM:<a@example.test>\r\n");
            std::iter::from_fn(|| session.next_action()).for_each(drop);
            session.transaction_opened("0000000010000100000A".parse().unwrap());
            session.feed(b"RCPT TO:<alice@example.test>\r\nRCPT TO:<carol@example.test>\r\n");
            let replies: Vec<Action> =
                std::iter::from_fn(|| session.next_action()).filter(|a| matches!(a, Action::Reply(_))).collect();
            assert_eq!(replies[1..], [Action::Reply("250 2.1.5 Ok\r\n".into()), Action::Reply(carol.into())]);
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
