//! The SMTP/LMTP client shared by the `lmtp` and `smtp` agents.
//!
//! One [`Session`] is one connection: greeting, EHLO (or LHLO), optional
//! STARTTLS, then any number of mail transactions. SMTP and LMTP differ in
//! two places only: the hello command, and LMTP's one reply per accepted
//! recipient after the content (RFC 2033 4.2) where SMTP gives one for all.
//! Commands are pipelined when the server offers PIPELINING (RFC 2920):
//! MAIL, every RCPT and DATA go out in one write, replies are read in order.
//!
//! Idle sessions are kept in a [`Cache`] for `connection_reuse_time`, and a
//! cached session is probed with RSET before it carries another message.
//!
//! # Standards
//! RFC 5321 (SMTP), RFC 2033 (LMTP), RFC 2920 (PIPELINING), RFC 3207
//! (STARTTLS), RFC 1870 (SIZE), RFC 6152 (8BITMIME), RFC 6531 (SMTPUTF8),
//! RFC 3461 (DSN parameters, xtext), RFC 3463 (enhanced status codes).

use mortal_proto::config::{NextHop, Route};
use mortal_proto::delivery::{RcptResult, Report, Request, Status};
use mortal_proto::envelope::{BodyType, DsnRet, Notify};
use mortal_proto::smtp_status::{DsnAction, EnhancedStatus, ReplyClass, ReplyCode, ReplyStage, StatusClass};
use mortal_proto::tls::TlsSummary;
use mortal_proto::xtext;
use rustls::{ClientConnection, StreamOwned};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// RFC 5321 4.5.3.1.5: a reply line is at most 512 octets; we allow some
/// slack for sloppy servers but never an unbounded line.
const MAX_REPLY_LINE: usize = 4096;
/// Lines in one multi-line reply (an EHLO reply has one per extension).
const MAX_REPLY_LINES: usize = 100;
/// Content is written in pieces of this size.
const WRITE_CHUNK: usize = 64 * 1024;
/// How long a QUIT to a connection being closed may take.
const QUIT_TIMEOUT: Duration = Duration::from_secs(2);

/// `4.4.1`: no answer from host (connect failed).
const NO_ANSWER: EnhancedStatus = EnhancedStatus::new(StatusClass::Persistent, 4, 1);
/// `4.4.2`: bad connection (lost or timed out).
const BAD_CONNECTION: EnhancedStatus = EnhancedStatus::new(StatusClass::Persistent, 4, 2);
/// `4.5.0`: other or undefined protocol status.
const PROTOCOL_ERROR: EnhancedStatus = EnhancedStatus::new(StatusClass::Persistent, 5, 0);
/// `4.7.5`: cryptographic failure.
pub const CRYPTO_FAILURE: EnhancedStatus = EnhancedStatus::new(StatusClass::Persistent, 7, 5);

/// Which protocol a session speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Smtp,
    Lmtp,
}

/// One server reply, possibly multi-line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: ReplyCode,
    /// Text of each line, without the code and separator.
    pub lines: Vec<String>,
}

impl Reply {
    /// The reply on one line, as logged: `550 5.1.1 <b@x>: unknown user`.
    pub fn text(&self) -> String {
        format!("{} {}", self.code, self.lines.join(" ")).trim_end().to_owned()
    }

    /// The RFC 3463 code of the reply (RFC 2034: the first word of its
    /// text), or `X.0.0` of the reply's class when it has none or one of
    /// another class. A `3yz` where a final reply was due counts as
    /// permanent, as it does for the recipient (`route::RcptResult`).
    pub fn enhanced(&self) -> EnhancedStatus {
        let class = self.code.status_class().unwrap_or(StatusClass::Permanent);
        let first = self.lines.first().map(String::as_str).unwrap_or_default();
        let word = first.split(' ').next().unwrap_or_default();
        match word.parse::<EnhancedStatus>() {
            Ok(status) if status.class() == class => status,
            _ => EnhancedStatus::undefined(class),
        }
    }

    pub fn is_ok(&self) -> bool {
        self.code.is_positive()
    }
}

/// A failure of the whole session (connect, greeting, lost connection):
/// every recipient of the transaction gets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// RFC 3463 status.
    pub dsn: EnhancedStatus,
    /// Postfix-shaped text: `connect to 127.0.0.1[127.0.0.1]:24: Connection refused`.
    pub text: String,
    /// The server's reply, when one caused the failure.
    pub reply: Option<Reply>,
}

impl Failure {
    fn io(peer: &str, during: &str, e: &io::Error) -> Self {
        let text = match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                format!("conversation with {peer} timed out while {during}")
            }
            _ => format!("lost connection with {peer} while {during}: {e}"),
        };
        Failure { dsn: BAD_CONNECTION, text, reply: None }
    }

    fn protocol(peer: &str, during: &str, what: &str) -> Self {
        Failure { dsn: PROTOCOL_ERROR, text: format!("protocol error with {peer} while {during}: {what}"), reply: None }
    }
}

/// What the server offered in its EHLO/LHLO reply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extensions {
    pub pipelining: bool,
    pub starttls: bool,
    pub eightbitmime: bool,
    pub smtputf8: bool,
    pub dsn: bool,
    pub chunking: bool,
    pub binarymime: bool,
    /// SIZE limit, when announced (0: announced without a limit).
    pub size: Option<u64>,
}

impl Extensions {
    fn parse(reply: &Reply) -> Self {
        let mut ext = Extensions::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let keyword = words.next().unwrap_or_default().to_ascii_uppercase();
            match keyword.as_str() {
                "PIPELINING" => ext.pipelining = true,
                "STARTTLS" => ext.starttls = true,
                "8BITMIME" => ext.eightbitmime = true,
                "SMTPUTF8" => ext.smtputf8 = true,
                "DSN" => ext.dsn = true,
                "CHUNKING" => ext.chunking = true,
                "BINARYMIME" => ext.binarymime = true,
                "SIZE" => ext.size = Some(words.next().and_then(|w| w.parse().ok()).unwrap_or(0)),
                _ => {}
            }
        }
        ext
    }
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
    /// Between taking the TCP stream for the TLS handshake and putting the
    /// TLS stream back; never used for I/O.
    Closed,
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
            Stream::Closed => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
            Stream::Closed => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
            Stream::Closed => Ok(()),
        }
    }
}

/// Timeouts of a session.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub command: Duration,
}

/// The envelope and content of one transaction.
#[derive(Debug)]
pub struct Envelope<'a> {
    pub sender: &'a str,
    pub recipients: Vec<EnvelopeRecipient<'a>>,
    pub content: &'a [u8],
    pub body: BodyType,
    pub smtputf8: bool,
    pub ret: Option<DsnRet>,
    pub envid: &'a str,
    /// Pass NOTIFY/ORCPT/RET/ENVID on (relaying to a DSN-capable server);
    /// otherwise this hop is the end of DSN tracking.
    pub pass_dsn: bool,
}

#[derive(Debug)]
pub struct EnvelopeRecipient<'a> {
    pub address: &'a str,
    pub notify: Notify,
    pub orcpt: &'a str,
}

/// The answer for one recipient, and to which command it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RcptReply {
    pub reply: Reply,
    /// `MAIL FROM`, `RCPT TO`, `DATA`, `end of DATA` or `BDAT`.
    pub stage: ReplyStage,
}

/// One connection to an LMTP or SMTP server.
pub struct Session {
    stream: Stream,
    rbuf: Vec<u8>,
    dialect: Dialect,
    /// `host[addr]:port` or the socket path, as logged (`relay=`).
    pub peer: String,
    pub ext: Extensions,
    /// What STARTTLS negotiated, once it succeeded.
    pub tls: Option<TlsSummary>,
    hostname: String,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("peer", &self.peer).field("ext", &self.ext).finish_non_exhaustive()
    }
}

/// `host[addr]:port` for a literal address, the way Postfix logs relays.
pub fn peer_name(addr: &SocketAddr) -> String {
    format!("{}[{}]:{}", addr.ip(), addr.ip(), addr.port())
}

impl Session {
    /// Connects, reads the greeting and says EHLO/LHLO as `hostname`.
    pub fn connect(hop: &NextHop, dialect: Dialect, hostname: &str, t: Timeouts) -> Result<Self, Failure> {
        let (stream, peer) = match hop {
            NextHop::Inet(addr) => {
                let peer = peer_name(addr);
                let s = TcpStream::connect_timeout(addr, t.connect).map_err(|e| Failure {
                    dsn: NO_ANSWER,
                    text: format!("connect to {peer}: {e}"),
                    reply: None,
                })?;
                let _ = s.set_nodelay(true);
                s.set_read_timeout(Some(t.command))
                    .and_then(|()| s.set_write_timeout(Some(t.command)))
                    .map_err(|e| Failure { dsn: NO_ANSWER, text: format!("connect to {peer}: {e}"), reply: None })?;
                (Stream::Tcp(s), peer)
            }
            NextHop::Unix(path) => {
                let peer = path.display().to_string();
                let s = UnixStream::connect(path)
                    .and_then(|s| {
                        s.set_read_timeout(Some(t.command))?;
                        s.set_write_timeout(Some(t.command))?;
                        Ok(s)
                    })
                    .map_err(|e| Failure { dsn: NO_ANSWER, text: format!("connect to {peer}: {e}"), reply: None })?;
                (Stream::Unix(s), peer)
            }
        };
        let mut session = Session {
            stream,
            rbuf: Vec::new(),
            dialect,
            peer,
            ext: Extensions::default(),
            tls: None,
            hostname: hostname.to_owned(),
        };
        let greeting = session.read_reply("receiving the initial server greeting")?;
        if greeting.code.get() != 220 {
            return Err(session.refused(greeting, ReplyStage::Greeting));
        }
        session.hello()?;
        Ok(session)
    }

    /// EHLO (falling back to HELO for an old SMTP server) or LHLO.
    pub fn hello(&mut self) -> Result<(), Failure> {
        let verb = if self.dialect == Dialect::Lmtp { ReplyStage::Lhlo } else { ReplyStage::Ehlo };
        let reply = self.command(&format!("{verb} {}", self.hostname), verb)?;
        if reply.is_ok() {
            self.ext = Extensions::parse(&reply);
            return Ok(());
        }
        if self.dialect == Dialect::Smtp && reply.code.get() >= 500 {
            let reply = self.command(&format!("HELO {}", self.hostname), ReplyStage::Helo)?;
            if reply.is_ok() {
                self.ext = Extensions::default();
                return Ok(());
            }
            return Err(self.refused(reply, ReplyStage::Helo));
        }
        Err(self.refused(reply, verb))
    }

    /// Upgrades the connection with STARTTLS and says EHLO again.
    pub fn starttls(
        &mut self,
        config: Arc<rustls::ClientConfig>,
        name: rustls::pki_types::ServerName<'static>,
    ) -> Result<(), Failure> {
        let reply = self.command("STARTTLS", ReplyStage::StartTls)?;
        if reply.code.get() != 220 {
            return Err(self.refused(reply, ReplyStage::StartTls));
        }
        if !self.rbuf.is_empty() {
            // Bytes sent before the handshake would be injected plaintext
            // (CVE-2011-0411 and kin): refuse them.
            return Err(Failure::protocol(&self.peer, "starting TLS", "data after the STARTTLS reply"));
        }
        let Stream::Tcp(tcp) = std::mem::replace(&mut self.stream, Stream::Closed) else {
            return Err(Failure::protocol(&self.peer, "starting TLS", "not a plaintext TCP session"));
        };
        let conn = ClientConnection::new(config, name).map_err(|e| Failure {
            dsn: CRYPTO_FAILURE,
            text: format!("TLS set-up for {}: {e}", self.peer),
            reply: None,
        })?;
        let mut tls = StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
                return Err(Failure {
                    dsn: CRYPTO_FAILURE,
                    text: format!("TLS handshake with {} failed: {e}", self.peer),
                    reply: None,
                });
            }
        }
        self.tls = Some(TlsSummary::of(&tls.conn));
        self.stream = Stream::Tls(Box::new(tls));
        self.hello()
    }

    /// Runs one mail transaction. `Ok` holds one answer per recipient (in
    /// order); `Err` means the session broke and must not be reused.
    pub fn send(&mut self, env: &Envelope<'_>) -> Result<Vec<RcptReply>, Failure> {
        let mail = self.mail_command(env);
        let rcpts: Vec<String> = env.recipients.iter().map(|r| self.rcpt_command(r, env.pass_dsn)).collect();
        let bdat = self.uses_bdat(env);
        let (mail_reply, rcpt_replies, data_reply) = if self.ext.pipelining {
            let mut batch = String::new();
            for line in std::iter::once(&mail).chain(&rcpts) {
                batch.push_str(line);
                batch.push_str("\r\n");
            }
            if !bdat {
                batch.push_str("DATA\r\n");
            }
            self.write(batch.as_bytes(), "sending MAIL FROM")?;
            let mail_reply = self.read_reply("receiving the MAIL FROM reply")?;
            let mut rcpt_replies = Vec::with_capacity(rcpts.len());
            for _ in &rcpts {
                rcpt_replies.push(self.read_reply("receiving the RCPT TO reply")?);
            }
            let data = if bdat { None } else { Some(self.read_reply("receiving the DATA reply")?) };
            (mail_reply, rcpt_replies, data)
        } else {
            let mail_reply = self.command(&mail, ReplyStage::MailFrom)?;
            let mut rcpt_replies = Vec::with_capacity(rcpts.len());
            if mail_reply.is_ok() {
                for r in &rcpts {
                    rcpt_replies.push(self.command(r, ReplyStage::RcptTo)?);
                }
            }
            let any = rcpt_replies.iter().any(Reply::is_ok);
            let data = if any && !bdat { Some(self.command("DATA", ReplyStage::Data)?) } else { None };
            (mail_reply, rcpt_replies, data)
        };
        let n = env.recipients.len();
        if !mail_reply.is_ok() {
            self.abort(data_reply.as_ref())?;
            return Ok(vec![RcptReply { reply: mail_reply, stage: ReplyStage::MailFrom }; n]);
        }
        let answers: Vec<Option<RcptReply>> = rcpt_replies
            .into_iter()
            .map(|r| (!r.is_ok()).then_some(RcptReply { reply: r, stage: ReplyStage::RcptTo }))
            .collect();
        let accepted = answers.iter().filter(|a| a.is_none()).count();
        if bdat && accepted > 0 {
            // RFC 3030: binary content goes as one last chunk, unstuffed.
            self.write(format!("BDAT {} LAST\r\n", env.content.len()).as_bytes(), "sending BDAT")?;
            self.write(env.content, "sending message body -- message may be sent more than once")?;
            return self.final_replies(answers, ReplyStage::Bdat);
        }
        match data_reply {
            Some(d) if d.code.get() == 354 && accepted > 0 => {}
            Some(d) if d.code.get() == 354 => {
                // A server that takes DATA with no recipient gets an
                // empty message it must refuse; the session is suspect.
                self.write(b".\r\n", "aborting DATA")?;
                let _ = self.read_reply("receiving the end of DATA reply")?;
                return Err(Failure::protocol(&self.peer, "sending DATA", "354 without any accepted recipient"));
            }
            Some(d) if accepted > 0 => {
                self.abort(None)?;
                return Ok(fill(answers, &RcptReply { reply: d, stage: ReplyStage::Data }));
            }
            _ => {
                self.abort(None)?;
                return Ok(answers.into_iter().map(|a| a.expect("every recipient was refused")).collect());
            }
        }
        self.write_content(env.content)?;
        self.final_replies(answers, ReplyStage::EndOfData)
    }

    /// The replies after the content: LMTP gives one per accepted
    /// recipient, in order (RFC 2033 4.2), SMTP one for all.
    fn final_replies(
        &mut self,
        mut answers: Vec<Option<RcptReply>>,
        stage: ReplyStage,
    ) -> Result<Vec<RcptReply>, Failure> {
        let during = format!("receiving the {stage} reply");
        if self.dialect == Dialect::Lmtp {
            for slot in answers.iter_mut().filter(|a| a.is_none()) {
                let reply = self.read_reply(&during)?;
                *slot = Some(RcptReply { reply, stage });
            }
            Ok(answers.into_iter().map(|a| a.expect("filled above")).collect())
        } else {
            let reply = self.read_reply(&during)?;
            Ok(fill(answers, &RcptReply { reply, stage }))
        }
    }

    /// BINARYMIME content goes with BDAT when the server takes it; else it
    /// is sent with DATA only if it is 8-bit clean (see `refuses`).
    fn uses_bdat(&self, env: &Envelope<'_>) -> bool {
        env.body == BodyType::BinaryMime && self.ext.chunking && self.ext.binarymime
    }

    /// RSET: ends a failed transaction, and probes a cached session.
    pub fn reset(&mut self) -> Result<(), Failure> {
        let reply = self.command("RSET", ReplyStage::Rset)?;
        if reply.is_ok() { Ok(()) } else { Err(self.refused(reply, ReplyStage::Rset)) }
    }

    /// Says QUIT and waits briefly for the answer; the connection closes
    /// either way when the session is dropped.
    pub fn quit(mut self) {
        let _ = self.set_timeout(QUIT_TIMEOUT);
        let _ = self.command("QUIT", ReplyStage::Quit);
    }

    fn set_timeout(&self, t: Duration) -> io::Result<()> {
        match &self.stream {
            Stream::Tcp(s) => s.set_read_timeout(Some(t)),
            Stream::Unix(s) => s.set_read_timeout(Some(t)),
            Stream::Tls(s) => s.sock.set_read_timeout(Some(t)),
            Stream::Closed => Ok(()),
        }
    }

    /// After a refused MAIL or DATA: RSET, reading a pipelined DATA reply
    /// first. A `354` there means the server wants content: end it empty.
    fn abort(&mut self, pending_data: Option<&Reply>) -> Result<(), Failure> {
        if pending_data.is_some_and(|d| d.code.get() == 354) {
            self.write(b".\r\n", "aborting DATA")?;
            let _ = self.read_reply("receiving the end of DATA reply")?;
        }
        self.reset()
    }

    fn mail_command(&self, env: &Envelope<'_>) -> String {
        let mut cmd = format!("MAIL FROM:<{}>", env.sender);
        if self.ext.size.is_some() {
            cmd.push_str(&format!(" SIZE={}", env.content.len()));
        }
        if self.uses_bdat(env) {
            cmd.push_str(" BODY=BINARYMIME");
        } else if env.body != BodyType::SevenBit && self.ext.eightbitmime {
            cmd.push_str(" BODY=8BITMIME");
        }
        if env.smtputf8 && self.ext.smtputf8 {
            cmd.push_str(" SMTPUTF8");
        }
        if env.pass_dsn && self.ext.dsn {
            match env.ret {
                Some(DsnRet::Full) => cmd.push_str(" RET=FULL"),
                Some(DsnRet::Headers) => cmd.push_str(" RET=HDRS"),
                None => {}
            }
            if !env.envid.is_empty() {
                cmd.push_str(&format!(" ENVID={}", xtext::encode(env.envid)));
            }
        }
        cmd
    }

    fn rcpt_command(&self, r: &EnvelopeRecipient<'_>, pass_dsn: bool) -> String {
        let mut cmd = format!("RCPT TO:<{}>", r.address);
        if pass_dsn && self.ext.dsn {
            let n = r.notify;
            if n.never {
                cmd.push_str(" NOTIFY=NEVER");
            } else if !n.is_default() {
                let words: Vec<&str> = [(n.success, "SUCCESS"), (n.failure, "FAILURE"), (n.delay, "DELAY")]
                    .iter()
                    .filter_map(|&(on, w)| on.then_some(w))
                    .collect();
                cmd.push_str(&format!(" NOTIFY={}", words.join(",")));
            }
            if let Some((kind, addr)) = r.orcpt.split_once(';') {
                cmd.push_str(&format!(" ORCPT={kind};{}", xtext::encode(addr)));
            }
        }
        cmd
    }

    /// Sends the content dot-stuffed (RFC 5321 4.5.2) with every line
    /// ending in CRLF, then the terminating `.`.
    fn write_content(&mut self, content: &[u8]) -> Result<(), Failure> {
        let mut out = Vec::with_capacity(WRITE_CHUNK + 1024);
        dot_stuff(content, WRITE_CHUNK, &mut out, |bytes| self.write(bytes, "sending message body"))?;
        self.write(&out, "sending end of data -- message may be sent more than once")
    }

    fn command(&mut self, line: &str, name: ReplyStage) -> Result<Reply, Failure> {
        self.write(format!("{line}\r\n").as_bytes(), &format!("sending {name}"))?;
        self.read_reply(&format!("receiving the {name} reply"))
    }

    fn write(&mut self, bytes: &[u8], during: &str) -> Result<(), Failure> {
        self.stream.write_all(bytes).and_then(|()| self.stream.flush()).map_err(|e| Failure::io(&self.peer, during, &e))
    }

    /// Reads one reply; bounded in line length, line count and time (the
    /// socket's read timeout).
    fn read_reply(&mut self, during: &str) -> Result<Reply, Failure> {
        let mut lines = Vec::new();
        let mut code: Option<ReplyCode> = None;
        loop {
            let line = self.read_line(during)?;
            let bytes = line.as_bytes();
            let valid = bytes.len() >= 3
                && bytes[..3].iter().all(u8::is_ascii_digit)
                && (bytes.len() == 3 || bytes[3] == b' ' || bytes[3] == b'-');
            if !valid {
                return Err(Failure::protocol(&self.peer, during, &format!("malformed reply {line:?}")));
            }
            let this = line[..3].parse::<ReplyCode>().ok().filter(|this| code.is_none_or(|code| code == *this));
            let Some(this) = this else {
                return Err(Failure::protocol(&self.peer, during, &format!("bad reply code in {line:?}")));
            };
            code = Some(this);
            lines.push(line.get(4..).unwrap_or_default().to_owned());
            if bytes.len() == 3 || bytes[3] == b' ' {
                return Ok(Reply { code: this, lines });
            }
            if lines.len() >= MAX_REPLY_LINES {
                return Err(Failure::protocol(&self.peer, during, "reply with too many lines"));
            }
        }
    }

    fn read_line(&mut self, during: &str) -> Result<String, Failure> {
        loop {
            if let Some(i) = self.rbuf.iter().position(|&b| b == b'\n') {
                let raw: Vec<u8> = self.rbuf.drain(..=i).collect();
                let raw = raw.strip_suffix(b"\n").unwrap_or(&raw);
                let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
                // Reply text ends up in logs and DSNs: no control characters.
                let text: String =
                    String::from_utf8_lossy(raw).chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
                return Ok(text);
            }
            if self.rbuf.len() > MAX_REPLY_LINE {
                return Err(Failure::protocol(&self.peer, during, "reply line too long"));
            }
            let mut buf = [0u8; 4096];
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    return Err(Failure::io(&self.peer, during, &io::Error::from(io::ErrorKind::UnexpectedEof)));
                }
                Ok(n) => self.rbuf.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Failure::io(&self.peer, during, &e)),
            }
        }
    }

    /// A reply that refuses the session: `host X refused to talk to me` or
    /// `host X said: ... (in reply to ... command)`.
    fn refused(&self, reply: Reply, stage: ReplyStage) -> Failure {
        let text = if stage == ReplyStage::Greeting {
            format!("host {} refused to talk to me: {}", self.peer, reply.text())
        } else {
            format!("host {} said: {} (in reply to {stage} command)", self.peer, reply.text())
        };
        // The session is unusable, but the next hop is fixed: retry later
        // rather than bounce mail over a misbehaving or busy server.
        let dsn = reply.enhanced().with_class(StatusClass::Persistent);
        Failure { dsn, text, reply: Some(reply) }
    }
}

/// Whether this hop ends DSN tracking for the recipients it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// LMTP: the server delivers into the mailbox; success DSNs are ours.
    Final,
    /// SMTP relay: NOTIFY travels on when the server offers DSN; else we
    /// owe a `relayed` DSN (RFC 3461 5.2.2).
    Relay,
}

/// A session failure, as every recipient of the batch sees it.
pub fn failure_result(f: &Failure) -> RcptResult {
    RcptResult {
        diagnostic: f.reply.as_ref().map(|r| format!("smtp; {}", r.text())),
        ..RcptResult::new(Status::Deferred, f.dsn, &f.text)
    }
}

/// A server's answer for one recipient.
pub fn reply_result(r: &RcptReply, peer: &str, remote_mta: &str, success_action: Option<DsnAction>) -> RcptResult {
    let status = match r.reply.code.class() {
        ReplyClass::PositiveCompletion => Status::Sent,
        ReplyClass::TransientNegative => Status::Deferred,
        // A 3yz where a final answer was due is as good as a 5yz.
        ReplyClass::PositiveIntermediate | ReplyClass::PermanentNegative => Status::Bounced,
    };
    let text = if status == Status::Sent {
        r.reply.text()
    } else {
        format!("host {peer} said: {} (in reply to {} command)", r.reply.text(), r.stage)
    };
    RcptResult {
        diagnostic: Some(format!("smtp; {}", r.reply.text())),
        remote_mta: Some(remote_mta.to_owned()),
        success_action: if status == Status::Sent { success_action } else { None },
        ..RcptResult::new(status, r.reply.enhanced(), text)
    }
}

/// Runs one request over a cached session to `key` or a new one from
/// `connect`, and turns the answers into per-recipient results. A session
/// that ended its transaction cleanly goes back to the cache.
pub fn deliver(
    cache: &Cache,
    key: &Route,
    request: &Request,
    hop: Hop,
    connect: impl FnOnce() -> Result<Session, Failure>,
) -> Report {
    let all = |r: RcptResult, relay: String| Report { relay, results: vec![r; request.recipients.len()] };
    let mut session = match cache.take(key).map_or_else(connect, Ok) {
        Ok(s) => s,
        Err(f) => return all(failure_result(&f), "none".into()),
    };
    let pass_dsn = hop == Hop::Relay && session.ext.dsn;
    let env = &request.envelope;
    let envelope = Envelope {
        sender: &env.sender,
        recipients: request
            .recipients
            .iter()
            .map(|r| EnvelopeRecipient { address: &r.address, notify: r.notify, orcpt: &r.orcpt })
            .collect(),
        content: &request.content,
        body: env.body,
        smtputf8: env.smtputf8,
        ret: env.ret,
        envid: &env.envid,
        pass_dsn,
    };
    let success_action = match hop {
        Hop::Final => Some(DsnAction::Delivered),
        Hop::Relay if pass_dsn => None,
        Hop::Relay => Some(DsnAction::Relayed),
    };
    if let Some(refusal) = session.refuses(&envelope) {
        let peer = session.peer.clone();
        cache.put(key, session);
        return all(refusal, peer);
    }
    let peer = session.peer.clone();
    match session.send(&envelope) {
        Ok(replies) => {
            let remote = session.remote_mta();
            let results = replies.iter().map(|r| reply_result(r, &peer, &remote, success_action)).collect();
            cache.put(key, session);
            Report { relay: peer, results }
        }
        Err(f) => all(failure_result(&f), peer),
    }
}

impl Session {
    /// What a transaction would need that this server lacks: a message
    /// over its SIZE limit, or UTF-8 addresses without SMTPUTF8. Both are
    /// permanent for this next hop.
    fn refuses(&self, env: &Envelope<'_>) -> Option<RcptResult> {
        if let Some(limit) = self.ext.size.filter(|&l| l > 0 && env.content.len() as u64 > l) {
            return Some(RcptResult::new(
                Status::Bounced,
                const { EnhancedStatus::new(StatusClass::Permanent, 3, 4) },
                format!("message size {} exceeds size limit {limit} of server {}", env.content.len(), self.peer),
            ));
        }
        if env.body == BodyType::BinaryMime && !self.uses_bdat(env) && !is_8bit_clean(env.content) {
            return Some(RcptResult::new(
                Status::Bounced,
                const { EnhancedStatus::new(StatusClass::Permanent, 6, 3) },
                format!("binary message content (BINARYMIME) cannot be sent: host {} does not offer it", self.peer),
            ));
        }
        let utf8 = !env.sender.is_ascii() || env.recipients.iter().any(|r| !r.address.is_ascii());
        if utf8 && !self.ext.smtputf8 {
            return Some(RcptResult::new(
                Status::Bounced,
                const { EnhancedStatus::new(StatusClass::Permanent, 6, 7) },
                format!("SMTPUTF8 is required, but was not offered by host {}", self.peer),
            ));
        }
        None
    }

    /// RFC 3464 Remote-MTA value.
    fn remote_mta(&self) -> String {
        match self.peer.split_once('[') {
            Some((host, _)) => format!("dns; {host}"),
            None => format!("x-unix; {}", self.peer),
        }
    }
}

/// Whether content received as BINARYMIME is valid 8BITMIME after all
/// (RFC 6152: CRLF lines of at most 998 octets, no NUL), so DATA carries
/// it unchanged.
fn is_8bit_clean(content: &[u8]) -> bool {
    const MAX_LINE: usize = 998;
    let mut len = 0;
    for (i, &b) in content.iter().enumerate() {
        match b {
            0 => return false,
            b'\r' if content.get(i + 1) != Some(&b'\n') => return false,
            b'\n' if i == 0 || content[i - 1] != b'\r' => return false,
            b'\n' => len = 0,
            b'\r' => {}
            _ => {
                len += 1;
                if len > MAX_LINE {
                    return false;
                }
            }
        }
    }
    true
}

/// Every recipient without an answer yet gets `reply`.
fn fill(answers: Vec<Option<RcptReply>>, reply: &RcptReply) -> Vec<RcptReply> {
    answers.into_iter().map(|a| a.unwrap_or_else(|| reply.clone())).collect()
}

/// Idle sessions per next hop, kept for `keep` after their last use.
#[derive(Debug)]
pub struct Cache {
    idle: Mutex<HashMap<Route, Vec<(Session, Instant)>>>,
    keep: Duration,
}

impl Cache {
    pub fn new(keep: Duration) -> Self {
        Self { idle: Mutex::new(HashMap::new()), keep }
    }

    /// The most recently used live session to `key`, probed with RSET.
    pub fn take(&self, key: &Route) -> Option<Session> {
        loop {
            let candidate = {
                let mut idle = self.idle.lock().ok()?;
                let list = idle.get_mut(key)?;
                let next = list.pop();
                if list.is_empty() {
                    idle.remove(key);
                }
                next?
            };
            let (mut session, since) = candidate;
            if since.elapsed() > self.keep {
                session.quit();
                continue;
            }
            if session.reset().is_ok() {
                return Some(session);
            }
        }
    }

    /// Keeps a session that just finished a transaction cleanly.
    pub fn put(&self, key: &Route, session: Session) {
        if self.keep.is_zero() {
            return session.quit();
        }
        if let Ok(mut idle) = self.idle.lock() {
            idle.entry(key.clone()).or_default().push((session, Instant::now()));
        }
    }

    /// Closes every idle session (at shutdown).
    pub fn expire_all(&self) {
        let all: Vec<Session> = match self.idle.lock() {
            Ok(mut idle) => idle.drain().flat_map(|(_, l)| l.into_iter().map(|(s, _)| s)).collect(),
            Err(_) => return,
        };
        all.into_iter().for_each(Session::quit);
    }

    /// Closes sessions idle for longer than `keep`.
    pub fn expire(&self) {
        let stale: Vec<Session> = {
            let Ok(mut idle) = self.idle.lock() else { return };
            let mut stale = Vec::new();
            for list in idle.values_mut() {
                let (old, fresh): (Vec<_>, Vec<_>) = list.drain(..).partition(|(_, t)| t.elapsed() > self.keep);
                *list = fresh;
                stale.extend(old.into_iter().map(|(s, _)| s));
            }
            idle.retain(|_, l| !l.is_empty());
            stale
        };
        stale.into_iter().for_each(Session::quit);
    }
}

/// The content as DATA sends it (RFC 5321 4.5.2): a line starting with
/// `.` gets another, a bare LF becomes CRLF, an unterminated last line is
/// terminated, and `.` CRLF ends it. Whole lines are copied at once
/// (memchr finds their ends), not byte by byte: this loop is the agent's
/// main cost on large messages. Output is handed to `flush` whenever
/// `chunk` octets have gathered (its error stops the copy); what is left
/// at the end, with the terminating dot, stays in `out`.
fn dot_stuff<E>(
    content: &[u8],
    chunk: usize,
    out: &mut Vec<u8>,
    mut flush: impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<(), E> {
    let mut rest = content;
    while !rest.is_empty() {
        // At the start of a line.
        if rest[0] == b'.' {
            out.push(b'.');
        }
        let (line, end, next): (&[u8], &[u8], &[u8]) = match memchr::memchr(b'\n', rest) {
            // The CR of a CRLF is part of `line`; a bare LF gets one.
            Some(i) if i > 0 && rest[i - 1] == b'\r' => (&rest[..i], b"\n", &rest[i + 1..]),
            Some(i) => (&rest[..i], b"\r\n", &rest[i + 1..]),
            None => (rest, b"\r\n", &[][..]),
        };
        // A line longer than the chunk goes out in pieces.
        let mut piece = line;
        while out.len() + piece.len() > chunk {
            let room = chunk.saturating_sub(out.len()).max(1).min(piece.len());
            out.extend_from_slice(&piece[..room]);
            piece = &piece[room..];
            flush(out)?;
            out.clear();
        }
        out.extend_from_slice(piece);
        out.extend_from_slice(end);
        if out.len() >= chunk {
            flush(out)?;
            out.clear();
        }
        rest = next;
    }
    out.extend_from_slice(b".\r\n");
    Ok(())
}

#[cfg(test)]
mod tests {
    /// The byte-at-a-time transformation `dot_stuff` replaced, as the
    /// reference it must match.
    fn stuffed_by_bytes(content: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut at_line_start = true;
        let mut prev = 0u8;
        for &b in content {
            if at_line_start && b == b'.' {
                out.push(b'.');
            }
            if b == b'\n' && prev != b'\r' {
                out.push(b'\r');
            }
            out.push(b);
            at_line_start = b == b'\n';
            prev = b;
        }
        if !content.is_empty() && !at_line_start {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
        out
    }

    #[test]
    fn dot_stuffing_matches_the_byte_rule_at_every_chunk_size() {
        let long = "x".repeat(300);
        let cases: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b".".to_vec(),
            b"\n".to_vec(),
            b"\r\n".to_vec(),
            b"a\n.b\n..c\r\n.\r\n".to_vec(),
            b"bare\rcr\n\n\r\n\rx".to_vec(),
            b"no newline at the end".to_vec(),
            b"\n.\n\n.".to_vec(),
            format!("Subject: t\r\n\r\n{long}\n.{long}\r\n{long}").into_bytes(),
        ];
        for content in &cases {
            let want = stuffed_by_bytes(content);
            for chunk in [1, 2, 7, 64, 1024] {
                let mut sent = Vec::new();
                let mut out = Vec::new();
                let done: Result<(), ()> = dot_stuff(content, chunk, &mut out, |b| {
                    // Flushed only once a chunk gathered; at most a line end more.
                    assert!((chunk..=chunk + 2).contains(&b.len()), "chunk {chunk}: {}", b.len());
                    sent.extend_from_slice(b);
                    Ok(())
                });
                assert_eq!(done, Ok(()));
                sent.extend_from_slice(&out);
                assert_eq!(sent, want, "chunk {chunk}: {:?}", String::from_utf8_lossy(content));
            }
        }
        // A refused write stops the copy.
        let mut calls = 0;
        let refused = dot_stuff(long.as_bytes(), 10, &mut Vec::new(), |_| {
            calls += 1;
            Err("refused")
        });
        assert_eq!((refused, calls), (Err("refused"), 1));
    }
    use super::*;

    fn reply(code: u16, lines: &[&str]) -> Reply {
        Reply { code: ReplyCode::of(code), lines: lines.iter().map(|s| (*s).to_owned()).collect() }
    }

    #[test]
    fn enhanced_codes_are_taken_or_derived() {
        let cases = [
            (550, "5.1.1 <b@x> unknown", "5.1.1"),
            (451, "4.3.0 try later", "4.3.0"),
            (550, "unknown user", "5.0.0"),
            (450, "5.1.1 class mismatch", "4.0.0"),
            (550, "5.1.1000 too long", "5.0.0"),
            (354, "go ahead", "5.0.0"),
        ];
        for (code, line, want) in cases {
            assert_eq!(reply(code, &[line]).enhanced().to_string(), want, "{code} {line}");
        }
        assert_eq!(reply(250, &["2.0.0 ok", "more"]).text(), "250 2.0.0 ok more");
    }

    /// The old `refused` turned a 5yz reply's code into a 4yz one with
    /// `replacen('5', "4", 1)`, which changed the first `5` anywhere:
    /// `4.4.5` became `4.4.4` and `4.7.5` became `4.7.4`. Only the class
    /// may change.
    #[test]
    fn refusal_changes_only_the_class_not_a_5_elsewhere() {
        let (_dir, path, server) = scripted(&["250 test", "421 4.4.5 too busy", "450 4.7.5 no crypto yet"]);
        let t = Timeouts { connect: Duration::from_secs(5), command: Duration::from_secs(5) };
        let mut s = Session::connect(&NextHop::Unix(path.clone()), Dialect::Smtp, "me.test", t).unwrap();
        let busy = s.reset().unwrap_err();
        assert_eq!(busy.dsn.to_string(), "4.4.5");
        assert_eq!(busy.text, format!("host {} said: 421 4.4.5 too busy (in reply to RSET command)", path.display()));
        let crypto = s.reset().unwrap_err();
        assert_eq!(crypto.dsn.to_string(), "4.7.5");
        drop(s);
        server.join().unwrap();
        for (code, line, want) in [(550, "5.5.5 x", "4.5.5"), (554, "5.4.5 x", "4.4.5"), (550, "5.1.1 x", "4.1.1")] {
            assert_eq!(reply(code, &[line]).enhanced().with_class(StatusClass::Persistent).to_string(), want);
        }
    }

    #[test]
    fn extensions_are_parsed() {
        let r = reply(250, &["mx.test", "PIPELINING", "SIZE 1000", "8bitmime", "DSN", "STARTTLS", "SMTPUTF8"]);
        let e = Extensions::parse(&r);
        assert!(e.pipelining && e.eightbitmime && e.dsn && e.starttls && e.smtputf8);
        assert_eq!(e.size, Some(1000));
        assert_eq!(Extensions::parse(&reply(250, &["mx.test"])), Extensions::default());
    }

    /// A scripted SMTP server on a Unix socket: answers each command with
    /// the next canned reply, records what it got.
    /// The socket lives in the returned directory, removed when it drops.
    fn scripted(
        replies: &'static [&'static str],
    ) -> (tempfile::TempDir, std::path::PathBuf, std::thread::JoinHandle<String>) {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut out = conn.try_clone().unwrap();
            let mut reader = io::BufReader::new(conn);
            let mut seen = String::new();
            out.write_all(b"220 test ESMTP\r\n").unwrap();
            let mut in_data = false;
            for reply in replies {
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap() == 0 {
                        return seen;
                    }
                    seen.push_str(&line);
                    if !in_data || line == ".\r\n" {
                        break;
                    }
                }
                in_data = reply.starts_with("354");
                out.write_all(format!("{reply}\r\n").as_bytes()).unwrap();
            }
            seen
        });
        (dir, path, server)
    }

    #[test]
    fn helo_fallback_and_unpipelined_transaction() {
        let (_dir, path, server) = scripted(&[
            "502 5.5.1 EHLO not implemented",
            "250 test",
            "250 2.1.0 Ok",
            "550 5.1.1 no such user",
            "250 2.1.5 Ok",
            "354 go ahead",
            "250 2.0.0 queued",
            "221 bye",
        ]);
        let t = Timeouts { connect: Duration::from_secs(5), command: Duration::from_secs(5) };
        let mut s = Session::connect(&NextHop::Unix(path.clone()), Dialect::Smtp, "me.test", t).unwrap();
        assert_eq!(s.ext, Extensions::default());
        let rcpt = |a| EnvelopeRecipient { address: a, notify: Notify::default(), orcpt: "" };
        let env = Envelope {
            sender: "a@x.test",
            recipients: vec![rcpt("bad@y.test"), rcpt("good@y.test")],
            content: b"Subject: s\r\n\r\n.dot\r\nbare\nend",
            body: BodyType::SevenBit,
            smtputf8: false,
            ret: None,
            envid: "",
            pass_dsn: false,
        };
        let answers = s.send(&env).unwrap();
        assert_eq!((answers[0].reply.code.get(), answers[0].stage), (550, ReplyStage::RcptTo));
        assert_eq!((answers[1].reply.code.get(), answers[1].stage), (250, ReplyStage::EndOfData));
        s.quit();
        let seen = server.join().unwrap();
        assert!(seen.starts_with("EHLO me.test\r\nHELO me.test\r\nMAIL FROM:<a@x.test>\r\n"), "{seen}");
        assert!(seen.contains("\r\n\r\n..dot\r\nbare\r\nend\r\n.\r\nQUIT\r\n"), "dot-stuffed, CRLF: {seen:?}");
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn binarymime_goes_by_bdat_with_lmtp_replies_per_recipient() {
        let (_dir, path, server) = scripted(&[
            "250-test\r\n250-CHUNKING\r\n250 BINARYMIME",
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
            "250 2.1.5 Ok",
            "250 2.0.0 <a@y.test> saved",
            "452 4.2.2 <b@y.test> mailbox full",
            "221 bye",
        ]);
        let t = Timeouts { connect: Duration::from_secs(5), command: Duration::from_secs(5) };
        let mut s = Session::connect(&NextHop::Unix(path.clone()), Dialect::Lmtp, "me.test", t).unwrap();
        assert!(s.ext.chunking && s.ext.binarymime && !s.ext.pipelining);
        let rcpt = |a| EnvelopeRecipient { address: a, notify: Notify::default(), orcpt: "" };
        let env = Envelope {
            sender: "a@x.test",
            recipients: vec![rcpt("a@y.test"), rcpt("b@y.test")],
            content: b"x\0y\n",
            body: BodyType::BinaryMime,
            smtputf8: false,
            ret: None,
            envid: "",
            pass_dsn: false,
        };
        assert_eq!(s.refuses(&env), None);
        let answers = s.send(&env).unwrap();
        assert_eq!((answers[0].reply.code.get(), answers[0].stage), (250, ReplyStage::Bdat));
        assert_eq!((answers[1].reply.code.get(), answers[1].stage), (452, ReplyStage::Bdat));
        s.quit();
        let seen = server.join().unwrap();
        assert!(seen.contains("MAIL FROM:<a@x.test> BODY=BINARYMIME\r\n"), "{seen:?}");
        assert!(seen.contains("BDAT 4 LAST\r\nx\0y\nQUIT\r\n"), "sent raw, unstuffed: {seen:?}");
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn binary_content_is_checked_for_8bit_cleanliness() {
        assert!(is_8bit_clean(b"a\r\n\xc3\xbc\r\n"));
        assert!(!is_8bit_clean(b"a\nb"));
        assert!(!is_8bit_clean(b"a\rb"));
        assert!(!is_8bit_clean(b"a\0b"));
        assert!(!is_8bit_clean(&[b'x'; 999]));
        assert!(is_8bit_clean(&[b'x'; 998]));
    }
}
