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

use crate::route::{RcptResult, Report, Status};
use mortal_proto::config::NextHop;
use mortal_proto::ipc::{BodyType, DsnRet, Notify};
use mortal_proto::queue_file::QueueFile;
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

/// Which protocol a session speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Smtp,
    Lmtp,
}

/// One server reply, possibly multi-line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Text of each line, without the code and separator.
    pub lines: Vec<String>,
}

impl Reply {
    /// The reply on one line, as logged: `550 5.1.1 <b@x>: unknown user`.
    pub fn text(&self) -> String {
        format!("{} {}", self.code, self.lines.join(" ")).trim_end().to_owned()
    }

    /// The RFC 3463 code of the reply, or one derived from its class.
    pub fn enhanced(&self) -> String {
        let first = self.lines.first().map(String::as_str).unwrap_or_default();
        let word = first.split(' ').next().unwrap_or_default();
        let parts: Vec<&str> = word.split('.').collect();
        let class = (self.code / 100).to_string();
        let valid = parts.len() == 3
            && parts[0] == class
            && parts.iter().all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()));
        if valid { word.to_owned() } else { format!("{class}.0.0") }
    }

    pub fn is_ok(&self) -> bool {
        (200..300).contains(&self.code)
    }
}

/// A failure of the whole session (connect, greeting, lost connection):
/// every recipient of the transaction gets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// RFC 3463 status.
    pub dsn: String,
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
        Failure { dsn: "4.4.2".into(), text, reply: None }
    }

    fn protocol(peer: &str, during: &str, what: &str) -> Self {
        Failure { dsn: "4.5.0".into(), text: format!("protocol error with {peer} while {during}: {what}"), reply: None }
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
    /// `MAIL FROM`, `RCPT TO`, `DATA` or `end of DATA`.
    pub stage: &'static str,
}

/// One connection to an LMTP or SMTP server.
pub struct Session {
    stream: Stream,
    rbuf: Vec<u8>,
    dialect: Dialect,
    /// `host[addr]:port` or the socket path, as logged (`relay=`).
    pub peer: String,
    pub ext: Extensions,
    /// `TLSv1.3 with cipher ...` once STARTTLS succeeded.
    pub tls: Option<String>,
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
                    dsn: "4.4.1".into(),
                    text: format!("connect to {peer}: {e}"),
                    reply: None,
                })?;
                let _ = s.set_nodelay(true);
                s.set_read_timeout(Some(t.command)).and_then(|()| s.set_write_timeout(Some(t.command))).map_err(
                    |e| Failure { dsn: "4.4.1".into(), text: format!("connect to {peer}: {e}"), reply: None },
                )?;
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
                    .map_err(|e| Failure {
                        dsn: "4.4.1".into(),
                        text: format!("connect to {peer}: {e}"),
                        reply: None,
                    })?;
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
        if greeting.code != 220 {
            return Err(session.refused(greeting, "initial server greeting"));
        }
        session.hello()?;
        Ok(session)
    }

    /// EHLO (falling back to HELO for an old SMTP server) or LHLO.
    pub fn hello(&mut self) -> Result<(), Failure> {
        let verb = if self.dialect == Dialect::Lmtp { "LHLO" } else { "EHLO" };
        let reply = self.command(&format!("{verb} {}", self.hostname), verb)?;
        if reply.is_ok() {
            self.ext = Extensions::parse(&reply);
            return Ok(());
        }
        if self.dialect == Dialect::Smtp && reply.code >= 500 {
            let reply = self.command(&format!("HELO {}", self.hostname), "HELO")?;
            if reply.is_ok() {
                self.ext = Extensions::default();
                return Ok(());
            }
            return Err(self.refused(reply, "HELO"));
        }
        Err(self.refused(reply, verb))
    }

    /// Upgrades the connection with STARTTLS and says EHLO again.
    pub fn starttls(
        &mut self,
        config: Arc<rustls::ClientConfig>,
        name: rustls::pki_types::ServerName<'static>,
    ) -> Result<(), Failure> {
        let reply = self.command("STARTTLS", "STARTTLS")?;
        if reply.code != 220 {
            return Err(self.refused(reply, "STARTTLS"));
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
            dsn: "4.7.5".into(),
            text: format!("TLS set-up for {}: {e}", self.peer),
            reply: None,
        })?;
        let mut tls = StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
                return Err(Failure {
                    dsn: "4.7.5".into(),
                    text: format!("TLS handshake with {} failed: {e}", self.peer),
                    reply: None,
                });
            }
        }
        self.tls = Some(describe_tls(&tls.conn));
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
            let mail_reply = self.command(&mail, "MAIL FROM")?;
            let mut rcpt_replies = Vec::with_capacity(rcpts.len());
            if mail_reply.is_ok() {
                for r in &rcpts {
                    rcpt_replies.push(self.command(r, "RCPT TO")?);
                }
            }
            let any = rcpt_replies.iter().any(Reply::is_ok);
            let data = if any && !bdat { Some(self.command("DATA", "DATA")?) } else { None };
            (mail_reply, rcpt_replies, data)
        };
        let n = env.recipients.len();
        if !mail_reply.is_ok() {
            self.abort(data_reply.as_ref())?;
            return Ok(vec![RcptReply { reply: mail_reply, stage: "MAIL FROM" }; n]);
        }
        let answers: Vec<Option<RcptReply>> = rcpt_replies
            .into_iter()
            .map(|r| (!r.is_ok()).then_some(RcptReply { reply: r, stage: "RCPT TO" }))
            .collect();
        let accepted = answers.iter().filter(|a| a.is_none()).count();
        if bdat && accepted > 0 {
            // RFC 3030: binary content goes as one last chunk, unstuffed.
            self.write(format!("BDAT {} LAST\r\n", env.content.len()).as_bytes(), "sending BDAT")?;
            self.write(env.content, "sending message body -- message may be sent more than once")?;
            return self.final_replies(answers, "BDAT");
        }
        match data_reply {
            Some(d) if d.code == 354 && accepted > 0 => {}
            Some(d) if d.code == 354 => {
                // A server that takes DATA with no recipient gets an
                // empty message it must refuse; the session is suspect.
                self.write(b".\r\n", "aborting DATA")?;
                let _ = self.read_reply("receiving the end of DATA reply")?;
                return Err(Failure::protocol(&self.peer, "sending DATA", "354 without any accepted recipient"));
            }
            Some(d) if accepted > 0 => {
                self.abort(None)?;
                return Ok(fill(answers, &RcptReply { reply: d, stage: "DATA" }));
            }
            _ => {
                self.abort(None)?;
                return Ok(answers.into_iter().map(|a| a.expect("every recipient was refused")).collect());
            }
        }
        self.write_content(env.content)?;
        self.final_replies(answers, "end of DATA")
    }

    /// The replies after the content: LMTP gives one per accepted
    /// recipient, in order (RFC 2033 4.2), SMTP one for all.
    fn final_replies(
        &mut self,
        mut answers: Vec<Option<RcptReply>>,
        stage: &'static str,
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
        let reply = self.command("RSET", "RSET")?;
        if reply.is_ok() { Ok(()) } else { Err(self.refused(reply, "RSET")) }
    }

    /// Says QUIT and waits briefly for the answer; the connection closes
    /// either way when the session is dropped.
    pub fn quit(mut self) {
        let _ = self.set_timeout(QUIT_TIMEOUT);
        let _ = self.command("QUIT", "QUIT");
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
        if pending_data.is_some_and(|d| d.code == 354) {
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
                cmd.push_str(&format!(" ENVID={}", xtext(env.envid)));
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
                cmd.push_str(&format!(" ORCPT={kind};{}", xtext(addr)));
            }
        }
        cmd
    }

    /// Sends the content dot-stuffed (RFC 5321 4.5.2) with every line
    /// ending in CRLF, then the terminating `.`.
    fn write_content(&mut self, content: &[u8]) -> Result<(), Failure> {
        let mut out = Vec::with_capacity(WRITE_CHUNK + 1024);
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
            if out.len() >= WRITE_CHUNK {
                self.write(&out, "sending message body")?;
                out.clear();
            }
        }
        if !content.is_empty() && !at_line_start {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
        self.write(&out, "sending end of data -- message may be sent more than once")
    }

    fn command(&mut self, line: &str, name: &str) -> Result<Reply, Failure> {
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
        let mut code = 0;
        loop {
            let line = self.read_line(during)?;
            let bytes = line.as_bytes();
            let valid = bytes.len() >= 3
                && bytes[..3].iter().all(u8::is_ascii_digit)
                && (bytes.len() == 3 || bytes[3] == b' ' || bytes[3] == b'-');
            if !valid {
                return Err(Failure::protocol(&self.peer, during, &format!("malformed reply {line:?}")));
            }
            let this: u16 = line[..3].parse().expect("three digits");
            if !(200..600).contains(&this) || (code != 0 && this != code) {
                return Err(Failure::protocol(&self.peer, during, &format!("bad reply code in {line:?}")));
            }
            code = this;
            lines.push(line.get(4..).unwrap_or_default().to_owned());
            if bytes.len() == 3 || bytes[3] == b' ' {
                return Ok(Reply { code, lines });
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
    fn refused(&self, reply: Reply, stage: &str) -> Failure {
        let text = if stage == "initial server greeting" {
            format!("host {} refused to talk to me: {}", self.peer, reply.text())
        } else {
            format!("host {} said: {} (in reply to {stage} command)", self.peer, reply.text())
        };
        // The session is unusable, but the next hop is fixed: retry later
        // rather than bounce mail over a misbehaving or busy server.
        let dsn = reply.enhanced().replacen('5', "4", 1);
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

/// Runs one batch over a cached session to `key` or a new one from
/// `connect`, and turns the answers into per-recipient results. A session
/// that ended its transaction cleanly goes back to the cache.
pub fn deliver(
    cache: &Cache,
    key: &str,
    qf: &QueueFile,
    rcpts: &[usize],
    hop: Hop,
    connect: impl FnOnce() -> Result<Session, Failure>,
) -> Report {
    let all = |r: RcptResult, relay: String| Report { relay, results: vec![r; rcpts.len()] };
    let mut session = match cache.take(key).map_or_else(connect, Ok) {
        Ok(s) => s,
        Err(f) => return all(RcptResult::from_failure(&f), "none".into()),
    };
    let pass_dsn = hop == Hop::Relay && session.ext.dsn;
    let envelope = Envelope {
        sender: &qf.sender.address,
        recipients: rcpts
            .iter()
            .map(|&i| {
                let r = &qf.recipients[i];
                EnvelopeRecipient { address: &r.address, notify: r.notify, orcpt: &r.orcpt }
            })
            .collect(),
        content: &qf.content,
        body: qf.sender.body,
        smtputf8: qf.sender.smtputf8,
        ret: qf.sender.ret,
        envid: &qf.sender.envid,
        pass_dsn,
    };
    let success_action = match hop {
        Hop::Final => Some("delivered"),
        Hop::Relay if pass_dsn => None,
        Hop::Relay => Some("relayed"),
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
            let results = replies.iter().map(|r| RcptResult::from_reply(r, &peer, &remote, success_action)).collect();
            cache.put(key, session);
            Report { relay: peer, results }
        }
        Err(f) => all(RcptResult::from_failure(&f), peer),
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
                "5.3.4",
                format!("message size {} exceeds size limit {limit} of server {}", env.content.len(), self.peer),
            ));
        }
        if env.body == BodyType::BinaryMime && !self.uses_bdat(env) && !is_8bit_clean(env.content) {
            return Some(RcptResult::new(
                Status::Bounced,
                "5.6.3",
                format!("binary message content (BINARYMIME) cannot be sent: host {} does not offer it", self.peer),
            ));
        }
        let utf8 = !env.sender.is_ascii() || env.recipients.iter().any(|r| !r.address.is_ascii());
        if utf8 && !self.ext.smtputf8 {
            return Some(RcptResult::new(
                Status::Bounced,
                "5.6.7",
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

/// `TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384 (256/256 bits)`, the
/// shape Postfix logs and writes in `Received:`.
fn describe_tls(conn: &ClientConnection) -> String {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_owned(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_owned(),
        Some(v) => format!("{v:?}"),
        None => "TLS".to_owned(),
    };
    let suite = conn.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())).unwrap_or_default();
    let bits = if suite.contains("128") { 128 } else { 256 };
    format!("{version} with cipher {suite} ({bits}/{bits} bits)")
}

/// RFC 3461 4 xtext: `+` followed by two hex digits for `+`, `=`, and
/// anything outside printable ASCII.
pub fn xtext(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (33..=126).contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

/// Idle sessions per next hop, kept for `keep` after their last use.
#[derive(Debug)]
pub struct Cache {
    idle: Mutex<HashMap<String, Vec<(Session, Instant)>>>,
    keep: Duration,
}

impl Cache {
    pub fn new(keep: Duration) -> Self {
        Self { idle: Mutex::new(HashMap::new()), keep }
    }

    /// The most recently used live session to `key`, probed with RSET.
    pub fn take(&self, key: &str) -> Option<Session> {
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
    pub fn put(&self, key: &str, session: Session) {
        if self.keep.is_zero() {
            return session.quit();
        }
        if let Ok(mut idle) = self.idle.lock() {
            idle.entry(key.to_owned()).or_default().push((session, Instant::now()));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(code: u16, lines: &[&str]) -> Reply {
        Reply { code, lines: lines.iter().map(|s| (*s).to_owned()).collect() }
    }

    #[test]
    fn enhanced_codes_are_taken_or_derived() {
        assert_eq!(reply(550, &["5.1.1 <b@x> unknown"]).enhanced(), "5.1.1");
        assert_eq!(reply(451, &["4.3.0 try later"]).enhanced(), "4.3.0");
        assert_eq!(reply(550, &["unknown user"]).enhanced(), "5.0.0");
        assert_eq!(reply(450, &["5.1.1 class mismatch"]).enhanced(), "4.0.0");
        assert_eq!(reply(250, &["2.0.0 ok", "more"]).text(), "250 2.0.0 ok more");
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
        assert_eq!((answers[0].reply.code, answers[0].stage), (550, "RCPT TO"));
        assert_eq!((answers[1].reply.code, answers[1].stage), (250, "end of DATA"));
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
        assert_eq!((answers[0].reply.code, answers[0].stage), (250, "BDAT"));
        assert_eq!((answers[1].reply.code, answers[1].stage), (452, "BDAT"));
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

    #[test]
    fn xtext_encodes_specials() {
        assert_eq!(xtext("a+b=c d"), "a+2Bb+3Dc+20d");
        assert_eq!(xtext("ü"), "+C3+BC");
    }
}
