//! The milter client (Postfix `smtpd_milters`, Sendmail milter protocol
//! up to version 6, codec in `mortal_proto::milter`).
//!
//! Each session connects to every configured milter when the client
//! connects (`connect_timeout` for the connection and the option
//! negotiation) and sends it the dialogue as it happens: CONNECT, HELO,
//! MAIL, RCPT, DATA and unknown commands, each after the macros of its
//! stage, each answer awaited for `command_timeout`; an event the milter
//! said it will not answer goes out with the next write instead. The message content goes to the milters at
//! its end, one milter after the other (headers, end of headers, body in
//! chunks, end of message; `content_timeout` per answer, restarted by
//! SMFIR_PROGRESS), and each later milter sees the message as the
//! earlier ones edited it, as in Postfix, so OpenDMARC reads what
//! OpenDKIM added. The milters' modifications go to cleanup, which
//! applies them, in order.
//!
//! A milter that cannot be reached, is too slow, or breaks the protocol
//! is logged (`warning: milter inet:...: ...`) and from then on gets its
//! `default_action` for the rest of the session: `tempfail` refuses each
//! command with `451 4.7.1 Service unavailable - try again later`,
//! `reject` with `550 5.7.1 Command rejected`, `accept` carries on
//! without it, `quarantine` carries on and holds every message.

use super::verdict::{CheckStage, Decision, FilterReply, Note, RefusedBy};
use super::{Endpoint, Stream};
use crate::engine::{Check, Subject};
use mortal_proto::config::{Config, Milter, MilterDefaultAction};
use mortal_proto::header::{HeaderEnd, find_header_end};
use mortal_proto::ipc::Edit;
use mortal_proto::milter::{
    ClientAddress, Command, Connect, Decoder, EnvelopeArgs, HeaderName, HeaderValue, MAX_BODY_CHUNK, MacroLists,
    MacroName, MilterAddress, MilterError, Modification, Offer, Placement, ProtocolSteps, Reply, Stage, negotiate_from,
    place_header,
};
use mortal_proto::queue_id::QueueId;
use mortal_proto::smtp_status::{EnhancedStatus, ReplyCode, StatusClass};
use mortal_proto::tls::TlsSummary;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

/// Octets read from a milter at a time.
const READ_CHUNK: usize = 16 * 1024;

/// What the macros of a stage are made of.
#[derive(Debug, Clone)]
pub struct MacroFacts {
    pub hostname: String,
    pub client: SocketAddr,
    pub client_name: String,
    pub server: SocketAddr,
    pub helo: Option<String>,
    pub tls: Option<TlsSummary>,
    pub queue_id: Option<QueueId>,
    pub sender: Option<String>,
    pub recipient: Option<String>,
}

impl MacroFacts {
    /// The value Postfix gives macro `name`, if it has one now.
    fn value(&self, name: &MacroName) -> Option<String> {
        let domain = |a: &str| a.rsplit_once('@').map(|(_, d)| d.to_owned()).unwrap_or_default();
        Some(match name.as_str() {
            "j" | "{daemon_name}" => self.hostname.clone(),
            "v" => format!("mortal {}", env!("CARGO_PKG_VERSION")),
            "_" => format!("{} [{}]", self.client_name, self.client.ip()),
            "{daemon_addr}" => self.server.ip().to_string(),
            "{daemon_port}" => self.server.port().to_string(),
            "{client_addr}" => self.client.ip().to_string(),
            "{client_port}" => self.client.port().to_string(),
            "{client_name}" | "{client_ptr}" => self.client_name.clone(),
            "{client_resolve}" => if self.client_name == "unknown" { "FAIL" } else { "OK" }.to_owned(),
            "i" => self.queue_id?.to_string(),
            "{mail_addr}" => self.sender.clone()?,
            "{mail_host}" => domain(self.sender.as_deref()?),
            "{mail_mailer}" | "{rcpt_mailer}" => "smtp".to_owned(),
            "{rcpt_addr}" => self.recipient.clone()?,
            "{rcpt_host}" => domain(self.recipient.as_deref()?),
            "{tls_version}" => self.tls.as_ref()?.version().to_string(),
            "{cipher}" => self.tls.as_ref()?.cipher().to_owned(),
            "{cipher_bits}" => self.tls.as_ref()?.bits().to_string(),
            _ => return None,
        })
    }
}

/// What the milters decided about one event.
#[derive(Debug, Default)]
pub struct Outcome {
    pub decision: Decision,
    pub notes: Vec<Note>,
    pub edits: Vec<Edit>,
}

/// One session's milters, in the configured order.
pub struct Milters {
    clients: Vec<Client>,
    hostname: String,
}

struct Client {
    config: Milter,
    endpoint: Endpoint,
    base_macros: MacroLists,
    conn: Option<Conn>,
    state: State,
    /// The milter accepted the current message: no more events for it.
    done_with_message: bool,
    /// It got MAIL for the current message (and so must hear ABORT).
    in_message: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not yet connected (before CONNECT).
    Idle,
    Active,
    /// It accepted the session: no more events.
    Accepted,
    /// It failed: its default action stands in for it.
    Failed,
}

/// The byte stream to one milter.
struct Wire {
    stream: Stream,
    decoder: Decoder,
    out: Vec<u8>,
}

/// A negotiated connection.
struct Conn {
    wire: Wire,
    agreement: mortal_proto::milter::Agreement,
}

/// What one milter answered to one event.
enum Answer {
    Continue,
    Accept,
    Discard,
    Refuse(FilterReply),
}

type MilterFault = super::Fault<MilterError>;

impl From<MilterError> for MilterFault {
    fn from(e: MilterError) -> Self {
        MilterFault::Protocol(e)
    }
}

/// What mortal offers: Postfix's offer, less rejected recipients (which
/// smtpd never sends). With HDR_LEADSPC (OpenDKIM asks for it) a milter
/// gets header values exactly as they came, leading space included, and
/// its header edits keep theirs; without, both go without the space after
/// the colon, as libmilter passes them.
fn offer(version: u32) -> Offer {
    Offer { version, steps: ProtocolSteps::ALL.difference(ProtocolSteps::RCPT_REJ), ..Offer::default() }
}

/// A header edit of a HDR_LEADSPC milter, as cleanup takes edits (it
/// writes `name: value`): one leading space or tab fewer. A value without
/// one gains the space cleanup writes, which only adds white space.
fn without_lead_space(m: Modification) -> Modification {
    let strip = |v: HeaderValue| {
        let bytes = v.as_bytes();
        match bytes.first() {
            Some(b' ' | b'\t') => HeaderValue::new(&bytes[1..]).unwrap_or(v),
            _ => v,
        }
    };
    match m {
        Modification::AddHeader { name, value } => Modification::AddHeader { name, value: strip(value) },
        Modification::InsertHeader { index, name, value } => {
            Modification::InsertHeader { index, name, value: strip(value) }
        }
        Modification::ChangeHeader { index, name, value } => {
            Modification::ChangeHeader { index, name, value: strip(value) }
        }
        other => other,
    }
}

fn reject_reply() -> FilterReply {
    FilterReply::new(ReplyCode::of(550), EnhancedStatus::new(StatusClass::Permanent, 7, 1), "Command rejected")
}

fn tempfail_reply() -> FilterReply {
    FilterReply::new(
        ReplyCode::of(451),
        EnhancedStatus::new(StatusClass::Persistent, 7, 1),
        "Service unavailable - try again later",
    )
}

impl Milters {
    pub fn new(config: &Config) -> Self {
        let clients = config
            .smtpd
            .milters
            .iter()
            .map(|m| Client {
                endpoint: Endpoint::new(&m.endpoint),
                config: m.clone(),
                base_macros: config.smtpd.milter_macros.clone(),
                conn: None,
                state: State::Idle,
                done_with_message: false,
                in_message: false,
            })
            .collect();
        Self { clients, hostname: config.server.hostname.clone() }
    }

    /// An SMTP-stage event (everything but the end of the message).
    pub async fn event(&mut self, check: &Check, macros: &MacroFacts) -> Outcome {
        let (stage, command) = match (&check.stage, &check.subject) {
            (CheckStage::Connect, _) => (Stage::Connect, connect_command(macros)),
            (CheckStage::Helo, Subject::Helo(name)) => (Stage::Helo, Command::Helo(name.clone())),
            (CheckStage::Mail, Subject::Mail { params }) => {
                let address = bracketed(macros.sender.as_deref().unwrap_or_default());
                (Stage::Mail, Command::Mail(EnvelopeArgs { address, params: params.clone() }))
            }
            (CheckStage::Rcpt, Subject::Rcpt { address, params }) => {
                (Stage::Rcpt, Command::Rcpt(EnvelopeArgs { address: bracketed(address), params: params.clone() }))
            }
            (CheckStage::Data, _) => (Stage::Data, Command::Data),
            (CheckStage::Unknown, Subject::Unknown(line)) => (Stage::Unknown, Command::Unknown(line.clone())),
            _ => return Outcome::default(),
        };
        let mut outcome = Outcome::default();
        let hostname = self.hostname.clone();
        for client in &mut self.clients {
            if check.stage == CheckStage::Connect {
                client.open().await;
            }
            if stage == Stage::Mail {
                client.done_with_message = false;
                client.in_message = true;
            }
            let answer = client.exchange(stage, &command, macros, &hostname).await;
            match answer {
                Answer::Continue => {}
                Answer::Accept => match stage {
                    Stage::Connect | Stage::Helo => client.state = State::Accepted,
                    _ => client.done_with_message = true,
                },
                Answer::Discard => match stage {
                    Stage::Connect | Stage::Helo => {
                        tracing::warn!(
                            "warning: milter {}: SMFIR_DISCARD is not allowed at {}: ignored",
                            client.endpoint,
                            check_name(check.stage)
                        );
                    }
                    _ => {
                        outcome
                            .notes
                            .push(Note { word: "milter-discard", text: "milter triggers DISCARD action".into() });
                        outcome.edits.push(Edit::Discard { reason: format!("milter {}", client.endpoint) });
                        client.done_with_message = true;
                    }
                },
                Answer::Refuse(reply) => {
                    outcome.decision = Decision::Refuse { reply, by: RefusedBy::Milter };
                    return outcome;
                }
            }
        }
        outcome
    }

    /// The message: to each milter in turn, as the milters before it
    /// edited it; their edits, quarantines and final word.
    pub async fn end_of_message(&mut self, macros: &MacroFacts, content: &[u8]) -> Outcome {
        let mut message = Message::parse(content);
        let mut outcome = Outcome::default();
        let hostname = self.hostname.clone();
        let count = self.clients.len();
        for (i, client) in self.clients.iter_mut().enumerate() {
            let result = client.message(&message, macros, &hostname).await;
            client.in_message = false;
            for quarantine in result.quarantines {
                outcome.notes.push(Note { word: "milter-hold", text: "milter triggers HOLD action".into() });
                outcome.edits.push(Edit::Hold { reason: format!("milter {}: {quarantine}", client.endpoint) });
            }
            let replaces_body = result.modifications.iter().any(|m| matches!(m, Modification::ReplaceBody(_)));
            if replaces_body {
                // Only the last replacement reaches cleanup: it is the body.
                outcome.edits.retain(|e| !matches!(e, Edit::Milter(Modification::ReplaceBody(_))));
                message.body.clear();
            }
            for m in result.modifications {
                if i + 1 < count {
                    message.apply(&m);
                }
                outcome.edits.push(Edit::Milter(m));
            }
            match result.answer {
                Answer::Continue | Answer::Accept => {}
                Answer::Discard => {
                    outcome.notes.push(Note { word: "milter-discard", text: "milter triggers DISCARD action".into() });
                    outcome.edits.push(Edit::Discard { reason: format!("milter {}", client.endpoint) });
                    return outcome;
                }
                Answer::Refuse(reply) => {
                    outcome.decision = Decision::Refuse { reply, by: RefusedBy::Milter };
                    return outcome;
                }
            }
        }
        outcome
    }

    /// The transaction was abandoned before its end.
    pub async fn abort(&mut self) {
        for client in &mut self.clients {
            if std::mem::take(&mut client.in_message) && client.state == State::Active {
                client.send_only(Command::Abort).await;
            }
            client.done_with_message = false;
        }
    }

    /// The session ends.
    pub async fn quit(&mut self) {
        for client in &mut self.clients {
            if client.state == State::Active || client.state == State::Accepted {
                client.send_only(Command::Quit).await;
            }
            client.conn = None;
        }
    }
}

fn check_name(stage: CheckStage) -> &'static str {
    match stage {
        CheckStage::Connect => "CONNECT",
        CheckStage::Helo => "HELO",
        _ => "this stage",
    }
}

fn connect_command(m: &MacroFacts) -> Command {
    let name = (m.client_name != "unknown").then_some(m.client_name.as_str());
    let address = match m.client {
        SocketAddr::V4(a) => ClientAddress::Inet(a),
        SocketAddr::V6(a) => ClientAddress::Inet6(a),
    };
    Command::Connect(Connect { hostname: Connect::hostname_for(name, m.client.ip()), address })
}

/// `<address>` as a milter gets it; `<>` for the null sender.
fn bracketed(address: &str) -> MilterAddress {
    MilterAddress::new(&format!("<{address}>")).unwrap_or_else(|| MilterAddress::new("<>").expect("<> is an address"))
}

/// What one milter said about the message.
struct MessageResult {
    answer: Answer,
    modifications: Vec<Modification>,
    quarantines: Vec<String>,
}

impl Client {
    /// Connects and negotiates; on failure the default action applies.
    async fn open(&mut self) {
        let limit = self.config.connect_timeout;
        match timeout(limit, self.negotiate()).await {
            Ok(Ok(conn)) => {
                self.conn = Some(conn);
                self.state = State::Active;
            }
            Ok(Err(MilterFault::Io(e))) => self.failed(&format!("connect to Milter service {}: {e}", self.endpoint)),
            Ok(Err(e)) => self.failed(&format!("milter {}: initial handshake: {e}", self.endpoint)),
            Err(_) => self.failed(&format!("milter {}: initial handshake: timeout exceeded", self.endpoint)),
        }
    }

    async fn negotiate(&self) -> Result<Conn, MilterFault> {
        let stream = self.endpoint.connect().await?;
        let offer = offer(self.config.protocol);
        let mut wire = Wire { stream, decoder: Decoder::new(), out: Vec::new() };
        Command::OptNeg(offer).encode(&mut wire.out)?;
        wire.flush().await?;
        let options = loop {
            if let Some(options) = wire.decoder.next_options()? {
                break options;
            }
            wire.fill().await?;
        };
        let agreement = negotiate_from(&offer, &options, self.base_macros.clone())?;
        Ok(Conn { wire, agreement })
    }

    /// A failure: logged once, and the milter is out for the session.
    fn failed(&mut self, why: &str) {
        tracing::warn!("warning: {why}");
        self.conn = None;
        self.state = State::Failed;
    }

    /// What the default action says for an event, now that the milter is
    /// out.
    fn default_answer(&self) -> Answer {
        match self.config.default_action {
            MilterDefaultAction::Tempfail => Answer::Refuse(tempfail_reply()),
            MilterDefaultAction::Reject => Answer::Refuse(reject_reply()),
            MilterDefaultAction::Accept | MilterDefaultAction::Quarantine => Answer::Continue,
        }
    }

    /// Sends one SMTP-stage event and reads its answer.
    async fn exchange(&mut self, stage: Stage, command: &Command, macros: &MacroFacts, hostname: &str) -> Answer {
        match self.state {
            State::Failed => return self.default_answer(),
            State::Accepted | State::Idle => return Answer::Continue,
            State::Active if self.done_with_message && !matches!(stage, Stage::Connect | Stage::Helo) => {
                return Answer::Continue;
            }
            State::Active => {}
        }
        let limit = self.config.command_timeout;
        match self.send_event(stage, command, macros, limit).await {
            Ok(None) => Answer::Continue,
            Ok(Some(reply)) => self.answer(reply, hostname),
            Err(e) => {
                self.failed(&format!("milter {}: {}: {e}", self.endpoint, command.name()));
                self.default_answer()
            }
        }
    }

    /// Macros, then the event; its reply when one is due.
    async fn send_event(
        &mut self,
        stage: Stage,
        command: &Command,
        macros: &MacroFacts,
        limit: Duration,
    ) -> Result<Option<Reply>, MilterFault> {
        let conn = self.conn.as_mut().ok_or(MilterFault::Eof)?;
        if let Some(m) = conn.agreement.macros.command(stage, |n| macros.value(n)) {
            m.encode(&mut conn.wire.out)?;
        }
        // What the milter will not answer waits in the buffer and goes
        // with the next write (the next answered event, the end of the
        // message, ABORT or QUIT): one write and one wake-up of the
        // milter per message instead of one per event.
        if !conn.agreement.sends(stage) {
            return Ok(None);
        }
        command.encode(&mut conn.wire.out)?;
        if !conn.agreement.expects_reply(stage) {
            return Ok(None);
        }
        conn.wire.flush().await?;
        conn.wire.final_reply(limit).await.map(Some)
    }

    /// The answer a reply makes.
    fn answer(&mut self, reply: Reply, hostname: &str) -> Answer {
        match reply {
            Reply::Continue | Reply::Skip => Answer::Continue,
            Reply::Accept => Answer::Accept,
            Reply::Discard => Answer::Discard,
            Reply::Reject => Answer::Refuse(reject_reply()),
            Reply::Tempfail => Answer::Refuse(tempfail_reply()),
            Reply::Shutdown => Answer::Refuse(FilterReply::new(
                ReplyCode::of(421),
                EnhancedStatus::new(StatusClass::Persistent, 7, 0),
                format!("{hostname} Server closing connection"),
            )),
            Reply::ReplyCode(custom) => {
                let class = custom.code().status_class().unwrap_or(StatusClass::Permanent);
                let status = custom.status().unwrap_or(EnhancedStatus::new(class, 7, 1));
                Answer::Refuse(FilterReply { code: custom.code(), status, lines: custom.lines().to_vec() })
            }
            // Only at the end of a message; anywhere else it breaks the
            // protocol, and the milter is treated as failed.
            Reply::Modify(_) | Reply::Quarantine(_) | Reply::Progress => {
                self.failed(&format!("milter {}: unexpected {} reply", self.endpoint, reply.name()));
                self.default_answer()
            }
        }
    }

    /// Sends the whole message and the end of message; gathers the
    /// modifications until the final reply.
    async fn message(&mut self, message: &Message, macros: &MacroFacts, hostname: &str) -> MessageResult {
        let mut result = MessageResult { answer: Answer::Continue, modifications: Vec::new(), quarantines: Vec::new() };
        match self.state {
            State::Failed => {
                if self.config.default_action == MilterDefaultAction::Quarantine {
                    result.quarantines.push("milter_default_action quarantine".into());
                }
                result.answer = self.default_answer();
                return result;
            }
            State::Accepted | State::Idle => return result,
            State::Active if self.done_with_message => return result,
            State::Active => {}
        }
        match self.send_message(message, macros, &mut result).await {
            Ok(Some(reply)) => result.answer = self.answer(reply, hostname),
            Ok(None) => {}
            Err(e) => {
                self.failed(&format!("milter {}: end of message: {e}", self.endpoint));
                // Nothing it said about this message counts.
                result.modifications.clear();
                result.quarantines.clear();
                if self.config.default_action == MilterDefaultAction::Quarantine {
                    result.quarantines.push("milter_default_action quarantine".into());
                }
                result.answer = self.default_answer();
            }
        }
        result
    }

    /// `Ok(None)`: the milter ended the message early with CONTINUE to
    /// content it was not sent (it skipped everything); else its final
    /// reply.
    async fn send_message(
        &mut self,
        message: &Message,
        macros: &MacroFacts,
        result: &mut MessageResult,
    ) -> Result<Option<Reply>, MilterFault> {
        let limit = self.config.content_timeout;
        let lead_space = self.conn.as_ref().is_some_and(|c| c.agreement.steps.contains(ProtocolSteps::HDR_LEADSPC));
        for (name, value) in &message.headers {
            let value = if lead_space { value.clone() } else { trim_lead_space(value) };
            let command = Command::Header { name: name.clone(), value };
            if let Some(reply) = self.content_event(Stage::Header, &command, macros, limit).await?
                && !matches!(reply, Reply::Continue)
            {
                return Ok(Some(reply));
            }
        }
        if let Some(reply) = self.content_event(Stage::EndOfHeaders, &Command::EndOfHeaders, macros, limit).await?
            && !matches!(reply, Reply::Continue)
        {
            return Ok(Some(reply));
        }
        for chunk in message.body.chunks(MAX_BODY_CHUNK) {
            match self.content_event(Stage::Body, &Command::Body(chunk.to_vec()), macros, limit).await? {
                Some(Reply::Skip) => break,
                Some(Reply::Continue) | None => {}
                Some(other) => return Ok(Some(other)),
            }
        }
        let conn = self.conn.as_mut().ok_or(MilterFault::Eof)?;
        if let Some(m) = conn.agreement.macros.command(Stage::EndOfMessage, |n| macros.value(n)) {
            m.encode(&mut conn.wire.out)?;
        }
        Command::EndOfMessage.encode(&mut conn.wire.out)?;
        conn.wire.flush().await?;
        loop {
            let reply = conn.wire.reply(limit).await?;
            conn.agreement.permits(&reply)?;
            match reply {
                Reply::Progress => {}
                Reply::Modify(m) if conn.agreement.steps.contains(ProtocolSteps::HDR_LEADSPC) => {
                    result.modifications.push(without_lead_space(m));
                }
                Reply::Modify(m) => result.modifications.push(m),
                Reply::Quarantine(reason) => result.quarantines.push(reason),
                Reply::Skip => {
                    return Err(MilterFault::Protocol(MilterError::BadReply("SKIP at end of message".into())));
                }
                other => return Ok(Some(other)),
            }
        }
    }

    /// A content event: sent when the milter wants it, answered when it
    /// answers this kind.
    async fn content_event(
        &mut self,
        stage: Stage,
        command: &Command,
        macros: &MacroFacts,
        limit: Duration,
    ) -> Result<Option<Reply>, MilterFault> {
        let conn = self.conn.as_mut().ok_or(MilterFault::Eof)?;
        if !conn.agreement.sends(stage) {
            return Ok(None);
        }
        if stage != Stage::Body
            && let Some(m) = conn.agreement.macros.command(stage, |n| macros.value(n))
        {
            m.encode(&mut conn.wire.out)?;
        }
        command.encode(&mut conn.wire.out)?;
        if !conn.agreement.expects_reply(stage) {
            return Ok(None);
        }
        conn.wire.flush().await?;
        let reply = conn.wire.final_reply(limit).await?;
        match reply {
            Reply::Skip if stage != Stage::Body => {
                Err(MilterFault::Protocol(MilterError::BadReply(format!("SKIP in reply to {}", command.name()))))
            }
            Reply::Modify(_) | Reply::Quarantine(_) => {
                Err(MilterFault::Protocol(MilterError::BadReply(format!("{} before end of message", reply.name()))))
            }
            other => Ok(Some(other)),
        }
    }

    /// A command that gets no reply (ABORT, QUIT); errors end the milter.
    async fn send_only(&mut self, command: Command) {
        let Some(conn) = self.conn.as_mut() else { return };
        let sent = async {
            command.encode(&mut conn.wire.out)?;
            conn.wire.flush().await
        };
        let result = timeout(self.config.command_timeout, sent).await.map_err(|_| MilterFault::Timeout);
        if let Ok(Err(e)) | Err(e) = result
            && command != Command::Quit
        {
            self.failed(&format!("milter {}: {}: {e}", self.endpoint, command.name()));
        }
    }
}

impl Wire {
    async fn flush(&mut self) -> Result<(), MilterFault> {
        if self.out.is_empty() {
            return Ok(());
        }
        match &mut self.stream {
            Stream::Tcp(s) => s.write_all(&self.out).await?,
            Stream::Unix(s) => s.write_all(&self.out).await?,
        }
        self.out.clear();
        Ok(())
    }

    async fn fill(&mut self) -> Result<(), MilterFault> {
        let mut buf = [0; READ_CHUNK];
        let n = match &mut self.stream {
            Stream::Tcp(s) => s.read(&mut buf).await?,
            Stream::Unix(s) => s.read(&mut buf).await?,
        };
        if n == 0 {
            return Err(MilterFault::Eof);
        }
        self.decoder.feed(&buf[..n]);
        Ok(())
    }

    /// The next reply, within `limit`.
    async fn reply(&mut self, limit: Duration) -> Result<Reply, MilterFault> {
        timeout(limit, async {
            loop {
                if let Some(reply) = self.decoder.next_reply()? {
                    return Ok(reply);
                }
                self.fill().await?;
            }
        })
        .await
        .map_err(|_| MilterFault::Timeout)?
    }

    /// The next reply that is not PROGRESS (which restarts the timer).
    async fn final_reply(&mut self, limit: Duration) -> Result<Reply, MilterFault> {
        loop {
            match self.reply(limit).await? {
                Reply::Progress => {}
                other => return Ok(other),
            }
        }
    }
}

/// A header value without its leading white space, for milters that did
/// not ask for it.
fn trim_lead_space(value: &HeaderValue) -> HeaderValue {
    let bytes = value.as_bytes();
    let start = bytes.iter().position(|&b| b != b' ' && b != b'\t').unwrap_or(bytes.len());
    HeaderValue::new(&bytes[start..]).unwrap_or_default()
}

/// The message as the milters see it: header fields (values as after the
/// colon, leading space included, continuation lines joined by LF, as
/// libmilter passes them) and the body.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Message {
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Vec<u8>,
}

impl Message {
    /// Splits `content` (`<CR><LF>` lines) the way cleanup does: fields
    /// and their continuations up to the empty line, or up to the first
    /// line that is neither.
    fn parse(content: &[u8]) -> Message {
        let (len, body_start) = match find_header_end(content, true) {
            HeaderEnd::Separator { len } => {
                (len, len + content[len..].iter().position(|&b| b == b'\n').map_or(0, |nl| nl + 1))
            }
            HeaderEnd::NoSeparator { len } => (len, len),
            // Not with `at_end`: the whole input is then the header.
            HeaderEnd::Undecided => (content.len(), content.len()),
        };
        let mut headers: Vec<(String, Vec<u8>)> = Vec::new();
        for line in content[..len].split_inclusive(|&b| b == b'\n') {
            let text = line.strip_suffix(b"\r\n").or(line.strip_suffix(b"\n")).unwrap_or(line);
            match headers.last_mut() {
                Some((_, value)) if matches!(text.first(), Some(b' ' | b'\t')) => {
                    value.push(b'\n');
                    value.extend_from_slice(text);
                }
                _ => {
                    // find_header_end vouched for `name:` here.
                    let colon = text.iter().position(|&b| b == b':').unwrap_or(text.len());
                    let value = text.get(colon + 1..).unwrap_or_default();
                    headers.push((String::from_utf8_lossy(&text[..colon]).into_owned(), value.to_vec()));
                }
            }
        }
        let headers = headers
            .into_iter()
            .filter_map(|(n, v)| Some((HeaderName::new(&n)?, HeaderValue::new(&v).unwrap_or_default())))
            .collect();
        Message { headers, body: content[body_start..].to_vec() }
    }

    /// A modification, as the next milter must see it (cleanup applies
    /// the same to the queue file, by the same rules).
    fn apply(&mut self, m: &Modification) {
        if let Modification::ReplaceBody(chunk) = m {
            return self.body.extend_from_slice(chunk);
        }
        let Some((op, name, value)) = m.header_op() else { return };
        let names: Vec<&[u8]> = self.headers.iter().map(|(n, _)| n.as_str().as_bytes()).collect();
        // As cleanup will write it: `name: value`.
        let spaced = HeaderValue::new(&[b" ", value.as_bytes()].concat()).unwrap_or_else(|| value.clone());
        let field = (name.clone(), spaced);
        match place_header(op, name, value.is_empty(), names.into_iter()) {
            Placement::Append => self.headers.push(field),
            Placement::Insert(i) => self.headers.insert(i, field),
            Placement::Replace(i) => self.headers[i] = field,
            Placement::Remove(i) => {
                self.headers.remove(i);
            }
            Placement::Nothing => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(n: &str) -> HeaderName {
        HeaderName::new(n).unwrap()
    }

    fn value(v: &[u8]) -> HeaderValue {
        HeaderValue::new(v).unwrap()
    }

    #[test]
    fn messages_split_as_milters_see_them() {
        let m = Message::parse(b"Subject: hi\r\nX-Long: a\r\n\tb\r\nTo:x\r\n\r\nbody\r\n.line\r\n");
        assert_eq!(
            m.headers,
            [(name("Subject"), value(b" hi")), (name("X-Long"), value(b" a\n\tb")), (name("To"), value(b"x"))]
        );
        assert_eq!(m.body, b"body\r\n.line\r\n");
        // A line that is no field ends the header section, as in cleanup.
        let m = Message::parse(b"Subject: hi\r\nnot a header\r\n");
        assert_eq!((m.headers.len(), m.body.as_slice()), (1, &b"not a header\r\n"[..]));
        let m = Message::parse(b"\r\nonly body\r\n");
        assert!(m.headers.is_empty());
        assert_eq!(m.body, b"only body\r\n");
    }

    /// libmilter's index rules, which cleanup applies the same way.
    #[test]
    fn modifications_apply_for_the_next_milter() {
        let mut m = Message::parse(b"Subject: a\r\nX-A: 1\r\nX-A: 2\r\n\r\nbody\r\n");
        m.apply(&Modification::ChangeHeader { index: 2, name: name("x-a"), value: value(b"two") });
        m.apply(&Modification::ChangeHeader { index: 0, name: name("Subject"), value: value(b"") });
        m.apply(&Modification::ChangeHeader { index: 5, name: name("X-New"), value: value(b"added") });
        m.apply(&Modification::InsertHeader { index: 0, name: name("A-R"), value: value(b"mx; dkim=pass") });
        m.apply(&Modification::AddHeader { name: name("X-Last"), value: value(b"z") });
        let names: Vec<(&str, &[u8])> = m.headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes())).collect();
        assert_eq!(
            names,
            // The changed field takes the milter's spelling, as in cleanup.
            [
                ("A-R", &b" mx; dkim=pass"[..]),
                ("X-A", b" 1"),
                ("x-a", b" two"),
                ("X-New", b" added"),
                ("X-Last", b" z")
            ]
        );
    }

    /// A HDR_LEADSPC milter gets values as they came and sends its own with
    /// their space, which cleanup's `name: value` already writes.
    #[test]
    fn leading_space_is_kept_or_trimmed_by_agreement() {
        assert_eq!(trim_lead_space(&value(b" \t hi\n\tthere")), value(b"hi\n\tthere"));
        let m = Modification::InsertHeader { index: 0, name: name("A-R"), value: value(b" mx; dkim=pass") };
        assert_eq!(
            without_lead_space(m),
            Modification::InsertHeader { index: 0, name: name("A-R"), value: value(b"mx; dkim=pass") }
        );
        let bare = Modification::AddHeader { name: name("X"), value: value(b"y") };
        assert_eq!(without_lead_space(bare.clone()), bare);
    }

    #[test]
    fn macros_have_postfix_values() {
        let facts = MacroFacts {
            hostname: "mx.example.test".into(),
            client: "192.0.2.1:40000".parse().unwrap(),
            client_name: "unknown".into(),
            server: "127.0.0.1:25".parse().unwrap(),
            helo: Some("client.test".into()),
            tls: None,
            queue_id: Some("0000000010000100000A".parse().unwrap()),
            sender: Some("a@example.org".into()),
            recipient: Some("b@example.test".into()),
        };
        let v = |n: &str| facts.value(&MacroName::new(n).unwrap());
        assert_eq!(v("j").as_deref(), Some("mx.example.test"));
        assert_eq!(v("_").as_deref(), Some("unknown [192.0.2.1]"));
        assert_eq!(v("{client_addr}").as_deref(), Some("192.0.2.1"));
        assert_eq!(v("{client_resolve}").as_deref(), Some("FAIL"));
        assert_eq!(v("i").as_deref(), Some("0000000010000100000A"));
        assert_eq!(v("{mail_host}").as_deref(), Some("example.org"));
        assert_eq!(v("{rcpt_addr}").as_deref(), Some("b@example.test"));
        assert_eq!(v("{cipher}"), None);
        assert_eq!(v("{auth_authen}"), None);
    }
}
