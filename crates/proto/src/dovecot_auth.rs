//! Dovecot's authentication protocol, version 1.2, the client's side, as
//! a sans-I/O codec: how smtpd asks Dovecot's auth service to check an
//! SMTP AUTH exchange (RFC 4954), as Postfix's smtpd does with
//! `smtpd_sasl_type = dovecot`. smtpd relays the client's base64 data
//! and Dovecot decides; nothing here decodes a password.
//!
//! # Summary
//! The protocol is lines of tab-separated fields ending in LF. Both sides
//! open with a handshake: the client sends [`client_handshake`]
//! (`VERSION 1 2`, `CPID <pid>`), the server `VERSION`, one `MECH` line
//! per mechanism with its security flags, `SPID`, `CUID`, `COOKIE` and
//! `DONE`, which [`HandshakeReader`] reads into a [`Handshake`]. Then the
//! client starts an exchange with [`AuthRequest::encode`] (`AUTH <id>
//! <mechanism> service=smtp nologin lip= rip= lport= rport= [secured]
//! [resp=<base64>]`) and answers each challenge with [`encode_continue`]
//! (`CONT <id> <base64>`); the server answers each with one
//! [`ServerReply`] line: `CONT` (a challenge), `OK` (with the user) or
//! `FAIL` (with a reason, and whether the failure is temporary). Field
//! values use Dovecot's tab-escaping ([`tab_escape`], [`tab_unescape`]):
//! `\x01` followed by `0`, `1`, `t`, `r` or `n` stands for NUL, `\x01`,
//! TAB, CR and LF.
//!
//! # Security
//! The server is trusted to decide, not to be well-formed. Every line is
//! bounded by [`MAX_LINE`] as [`LineReader`] splits the bytes, before any
//! is parsed, so no server can make its reader allocate without bound.
//! The handshake is bounded in lines and mechanisms; unknown handshake
//! lines are skipped (Dovecot adds some over time), an unknown reply verb
//! ends the conversation. A reply names its request id, which the client
//! checks with [`ServerReply::answering`]. The user name of a success is
//! kept exactly or refused (it becomes the session's identity); the
//! reason of a failure, shown to the SMTP client, is made printable and
//! cut to [`MAX_REASON`]. Nothing the client relays can break the
//! framing: a mechanism is a validated [`MechanismName`], its data must be
//! base64 text, and every value goes through the tab-escaping. The
//! encoders return the request line to write and keep nothing, since it
//! carries a password.
//!
//! # Standards
//! Dovecot's "Authentication Protocol" (doc.dovecot.org, developer
//! manual, v1.2, as spoken by Dovecot 2.2 to 2.4); RFC 4954 (SMTP AUTH:
//! `=` is an empty initial response); RFC 4422 section 3.1 (mechanism
//! names); RFC 4648 section 4 (the base64 alphabet).
//!
//! # Diagnostics
//! [`EncodeError`] says why a request could not be written (the SMTP
//! client's fault); [`DecodeError`] says which rule the server broke.
//! Neither ever holds the client's data.

use std::borrow::Cow;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use thiserror::Error;

/// The protocol's major version: a server with another one speaks
/// another protocol.
pub const MAJOR_VERSION: u32 = 1;
/// The minor version the client announces. From 1.2 on, an empty
/// `resp=` is an empty initial response rather than an absent one, which
/// RFC 4954's `=` needs.
pub const MINOR_VERSION: u32 = 2;
/// Longest line either side may send, its LF excluded: Dovecot's own
/// limit (`AUTH_CLIENT_MAX_LINE_LENGTH`, 16384 since 2.0), above which it
/// drops the connection; it holds Postfix's 12288-octet response limit.
pub const MAX_LINE: usize = 16_384;
/// Longest SASL mechanism name (RFC 4422 section 3.1).
pub const MAX_MECHANISM_NAME: usize = 20;
/// Most mechanisms a handshake may offer; Dovecot knows about twenty.
pub const MAX_MECHANISMS: usize = 64;
/// Most lines a handshake may have before `DONE`.
pub const MAX_HANDSHAKE_LINES: usize = 256;
/// Longest failure reason kept, in octets: it goes into an SMTP reply
/// line, which is 512 octets with its code (RFC 5321 4.5.3.1.5).
pub const MAX_REASON: usize = 400;
/// Longest user name accepted in a reply, in octets.
pub const MAX_USER: usize = 512;
/// The service name Dovecot's passdb and userdb see (`%s`), as Postfix
/// sends it (`smtpd_sasl_service`).
pub const SERVICE: &str = "smtp";

/// The escape octet of Dovecot's tab-escaping.
const ESCAPE: u8 = 0x01;

/// Why a request could not be written: the SMTP client sent something
/// that is not what RFC 4954 allows there.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EncodeError {
    #[error("{what} is not base64 text")]
    NotBase64 { what: &'static str },
    #[error("request longer than {MAX_LINE} octets")]
    TooLong,
}

/// Which rule a server's line broke.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("line longer than {MAX_LINE} octets")]
    LineTooLong,
    #[error("escape octet at the end of a field")]
    TruncatedEscape,
    #[error("handshake does not start with VERSION: {0:?}")]
    NoVersion(String),
    #[error("VERSION sent twice")]
    RepeatedVersion,
    #[error("protocol version {major}.{minor}, not {MAJOR_VERSION}.x")]
    Incompatible { major: u32, minor: u32 },
    #[error("malformed {verb} line")]
    Malformed { verb: &'static str },
    #[error("SPID before any MECH: an auth-master or auth-userdb socket, not auth-client")]
    WrongSocket,
    #[error("not a SASL mechanism name: {0:?}")]
    BadMechanism(String),
    #[error("more than {MAX_MECHANISMS} mechanisms")]
    TooManyMechanisms,
    #[error("no mechanism offered")]
    NoMechanisms,
    #[error("more than {MAX_HANDSHAKE_LINES} handshake lines")]
    HandshakeTooLong,
    #[error("unknown reply {0:?}")]
    UnknownReply(String),
    #[error("reply to request {got}, expected {expected}")]
    IdMismatch { expected: AuthId, got: AuthId },
    #[error("user name is not printable UTF-8 text of at most {MAX_USER} octets")]
    BadUser,
    #[error("challenge is not base64 text")]
    BadChallenge,
    #[error("data from the server while no request was waiting")]
    Unsolicited,
}

/// `value` with Dovecot's tab-escaping applied: NUL, `\x01`, TAB, CR
/// and LF become `\x01` and `0`, `1`, `t`, `r`, `n`, so no value can end
/// its field or its line.
pub fn tab_escape(value: &str) -> Cow<'_, str> {
    if !value.bytes().any(|b| matches!(b, 0 | ESCAPE | b'\t' | b'\r' | b'\n')) {
        return Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 8);
    for c in value.chars() {
        match c {
            '\0' => out.push_str("\u{1}0"),
            '\u{1}' => out.push_str("\u{1}1"),
            '\t' => out.push_str("\u{1}t"),
            '\r' => out.push_str("\u{1}r"),
            '\n' => out.push_str("\u{1}n"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// One field with the tab-escaping undone. As in Dovecot, `\x01` before
/// any other octet stands for that octet; an escape octet that ends the
/// field escapes nothing and is refused.
pub fn tab_unescape(field: &[u8]) -> Result<Cow<'_, [u8]>, DecodeError> {
    if !field.contains(&ESCAPE) {
        return Ok(Cow::Borrowed(field));
    }
    let mut out = Vec::with_capacity(field.len());
    let mut octets = field.iter();
    while let Some(&b) = octets.next() {
        if b != ESCAPE {
            out.push(b);
            continue;
        }
        let &escaped = octets.next().ok_or(DecodeError::TruncatedEscape)?;
        out.push(match escaped {
            b'0' => 0,
            b'1' => ESCAPE,
            b't' => b'\t',
            b'r' => b'\r',
            b'n' => b'\n',
            other => other,
        });
    }
    Ok(Cow::Owned(out))
}

/// Whether `data` is base64 text (RFC 4648 section 4, as RFC 4954 wants
/// it on the SMTP side too): letters, digits, `+` and `/`, then at most
/// two `=`, a multiple of four long. Empty text is the empty data. Whether
/// it decodes to anything sensible is Dovecot's to judge; this keeps the
/// field one field. smtpd's AUTH parser uses it too.
pub fn is_base64(data: &str) -> bool {
    let body = data.trim_end_matches('=');
    data.len().is_multiple_of(4)
        && data.len() - body.len() <= 2
        && body.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

/// A SASL mechanism name (RFC 4422 section 3.1): 1 to
/// [`MAX_MECHANISM_NAME`] upper-case letters, digits, `-` and `_`, as
/// Dovecot announces them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MechanismName(String);

impl MechanismName {
    /// `None` unless `name` is a mechanism name as servers spell it
    /// (upper case).
    pub fn new(name: &str) -> Option<Self> {
        let valid = (1..=MAX_MECHANISM_NAME).contains(&name.len())
            && name.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        valid.then(|| Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether a client's spelling names this mechanism: SMTP AUTH
    /// mechanism names are case-insensitive (RFC 4954 section 4).
    pub fn matches(&self, spelled: &str) -> bool {
        self.0.eq_ignore_ascii_case(spelled)
    }
}

/// A client's spelling of a mechanism (SMTP AUTH names are
/// case-insensitive, RFC 4954 section 4), in the server's upper case.
impl std::str::FromStr for MechanismName {
    type Err = BadMechanismName;

    fn from_str(spelled: &str) -> Result<Self, BadMechanismName> {
        MechanismName::new(&spelled.to_ascii_uppercase()).ok_or(BadMechanismName)
    }
}

/// A client named something that cannot be a SASL mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("not a SASL mechanism name")]
pub struct BadMechanismName;

impl fmt::Display for MechanismName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A security property Dovecot announces for a mechanism (the flags of
/// its `MECH` line), which Postfix's `smtpd_sasl_security_options`
/// filter on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SecurityFlag {
    /// `anonymous`: anyone may authenticate (ANONYMOUS).
    Anonymous,
    /// `plaintext`: the password crosses the connection (PLAIN, LOGIN).
    Plaintext,
    /// `dictionary`: open to a passive dictionary attack.
    Dictionary,
    /// `active`: open to an active (non-dictionary) attack.
    Active,
    /// `forward-secrecy`: breaking one session does not break others.
    ForwardSecrecy,
    /// `mutual-auth`: the server proves itself too.
    MutualAuth,
}

impl SecurityFlag {
    pub const ALL: [SecurityFlag; 6] = [
        SecurityFlag::Anonymous,
        SecurityFlag::Plaintext,
        SecurityFlag::Dictionary,
        SecurityFlag::Active,
        SecurityFlag::ForwardSecrecy,
        SecurityFlag::MutualAuth,
    ];

    /// The name on a `MECH` line.
    pub fn name(self) -> &'static str {
        match self {
            SecurityFlag::Anonymous => "anonymous",
            SecurityFlag::Plaintext => "plaintext",
            SecurityFlag::Dictionary => "dictionary",
            SecurityFlag::Active => "active",
            SecurityFlag::ForwardSecrecy => "forward-secrecy",
            SecurityFlag::MutualAuth => "mutual-auth",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// The security flags of one mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MechanismFlags(u8);

impl MechanismFlags {
    pub fn empty() -> Self {
        Self(0)
    }

    /// These flags and `flag`.
    pub fn with(self, flag: SecurityFlag) -> Self {
        Self(self.0 | flag.bit())
    }

    pub fn contains(self, flag: SecurityFlag) -> bool {
        self.0 & flag.bit() != 0
    }

    /// The flags set, in [`SecurityFlag::ALL`] order.
    pub fn iter(self) -> impl Iterator<Item = SecurityFlag> {
        SecurityFlag::ALL.into_iter().filter(move |f| self.contains(*f))
    }
}

/// A mechanism the server offers, with its security flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mechanism {
    pub name: MechanismName,
    pub flags: MechanismFlags,
}

/// The id of one authentication request, which every reply to it names.
/// Dovecot takes any number; 0 is never used, as in Postfix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AuthId(NonZeroU32);

impl AuthId {
    pub const FIRST: AuthId = AuthId(NonZeroU32::MIN);

    pub fn new(id: u32) -> Option<Self> {
        NonZeroU32::new(id).map(Self)
    }

    pub fn get(self) -> u32 {
        self.0.get()
    }

    /// The id after this one; after `u32::MAX` it starts again at 1.
    pub fn next(self) -> AuthId {
        self.0.checked_add(1).map_or(AuthId::FIRST, AuthId)
    }

    /// A decimal id as the server writes it: digits only.
    fn parse(field: &[u8]) -> Option<Self> {
        if field.is_empty() || field.len() > 10 || !field.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(field).ok()?.parse().ok().and_then(AuthId::new)
    }
}

impl fmt::Display for AuthId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The client's handshake: the protocol version it speaks and its
/// process id (Dovecot refuses 0, and ignores the value on its
/// `auth-client` sockets, which authenticate without logging in).
pub fn client_handshake(pid: NonZeroU32) -> Vec<u8> {
    format!("VERSION\t{MAJOR_VERSION}\t{MINOR_VERSION}\nCPID\t{pid}\n").into_bytes()
}

/// The start of one authentication exchange.
#[derive(Debug, Clone, Copy)]
pub struct AuthRequest<'a> {
    pub id: AuthId,
    pub mechanism: &'a MechanismName,
    /// The address and port the SMTP client connected to (`lip`,
    /// `lport`).
    pub local: SocketAddr,
    /// The SMTP client's address and port (`rip`, `rport`): Dovecot's
    /// failure penalty and its logs are per client address.
    pub remote: SocketAddr,
    /// The SMTP session is under TLS (`secured`): with it Dovecot's
    /// settings may allow mechanisms they refuse in the clear.
    pub secured: bool,
    /// The client's initial response (RFC 4954), base64 text; `=` is an
    /// empty one, sent as an empty `resp=`. `None` when the client gave
    /// none.
    pub initial: Option<&'a str>,
}

impl AuthRequest<'_> {
    /// The `AUTH` line. `nologin`: the exchange only checks the
    /// password, nothing logs in. `resp` comes last, as Dovecot requires.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let mut line = format!("AUTH\t{}\t{}", self.id, self.mechanism);
        push_field(&mut line, "service", SERVICE);
        line.push_str("\tnologin");
        push_field(&mut line, "lip", &self.local.ip().to_canonical().to_string());
        push_field(&mut line, "rip", &self.remote.ip().to_canonical().to_string());
        push_field(&mut line, "lport", &self.local.port().to_string());
        push_field(&mut line, "rport", &self.remote.port().to_string());
        if self.secured {
            line.push_str("\tsecured");
        }
        if let Some(initial) = self.initial {
            // RFC 4954 4: `=` is a response of zero length.
            let initial = if initial == "=" { "" } else { initial };
            if !is_base64(initial) {
                return Err(EncodeError::NotBase64 { what: "initial response" });
            }
            push_field(&mut line, "resp", initial);
        }
        finish_line(line)
    }
}

/// The `CONT` line carrying the client's answer to a challenge (base64
/// text; empty for an empty answer).
pub fn encode_continue(id: AuthId, response: &str) -> Result<Vec<u8>, EncodeError> {
    if !is_base64(response) {
        return Err(EncodeError::NotBase64 { what: "response" });
    }
    finish_line(format!("CONT\t{id}\t{}", tab_escape(response)))
}

fn push_field(line: &mut String, name: &str, value: &str) {
    line.push('\t');
    line.push_str(name);
    line.push('=');
    line.push_str(&tab_escape(value));
}

fn finish_line(mut line: String) -> Result<Vec<u8>, EncodeError> {
    if line.len() > MAX_LINE {
        return Err(EncodeError::TooLong);
    }
    line.push('\n');
    Ok(line.into_bytes())
}

/// Splits the server's bytes into lines, as they arrive. Each line is at
/// most [`MAX_LINE`] octets: past that, what follows is dropped unread
/// and [`LineReader::next_line`] fails once the complete lines before it
/// are taken, so the outcome does not depend on how the bytes were cut.
/// The caller takes the lines after each feed, so the buffer holds one
/// feed and one partial line.
#[derive(Debug, Default)]
pub struct LineReader {
    buf: Vec<u8>,
    /// Octets since the last LF fed.
    run: usize,
    /// A line went past [`MAX_LINE`]; nothing after it was kept.
    overlong: bool,
}

impl LineReader {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        if self.overlong {
            return;
        }
        for (i, &b) in bytes.iter().enumerate() {
            if b == b'\n' {
                self.run = 0;
                continue;
            }
            self.run += 1;
            if self.run > MAX_LINE {
                self.buf.extend_from_slice(&bytes[..i]);
                self.overlong = true;
                return;
            }
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete line, its LF removed.
    pub fn next_line(&mut self) -> Result<Option<Vec<u8>>, DecodeError> {
        if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = self.buf.drain(..=end).collect();
            line.pop();
            return Ok(Some(line));
        }
        if self.overlong {
            return Err(DecodeError::LineTooLong);
        }
        Ok(None)
    }

    /// Whether nothing is left over: no line and no part of one.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty() && !self.overlong
    }
}

/// What the server announced in its handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    pub minor_version: u32,
    /// The mechanisms offered, in the server's order, at least one. Those
    /// Dovecot marks `private` (not to be advertised: APOP,
    /// DOVECOT-TOKEN) are left out, as Postfix does.
    pub mechanisms: Vec<Mechanism>,
    /// `SPID`, `CUID` and `COOKIE`: the server's process, this
    /// connection's number and its cookie, for logs; a client that only
    /// authenticates needs none of them, so a server may leave them out.
    pub server_pid: Option<u32>,
    pub connect_uid: Option<u32>,
    pub cookie: Option<String>,
}

impl Handshake {
    /// The offered mechanism a client names, in any case.
    pub fn mechanism(&self, spelled: &str) -> Option<&Mechanism> {
        self.mechanisms.iter().find(|m| m.name.matches(spelled))
    }

    /// The handshake as a server sends it (for tests, seeds and fake
    /// servers).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = format!("VERSION\t{MAJOR_VERSION}\t{}\n", self.minor_version);
        for m in &self.mechanisms {
            out.push_str("MECH\t");
            out.push_str(m.name.as_str());
            for flag in m.flags.iter() {
                out.push('\t');
                out.push_str(flag.name());
            }
            out.push('\n');
        }
        if let Some(pid) = self.server_pid {
            out.push_str(&format!("SPID\t{pid}\n"));
        }
        if let Some(uid) = self.connect_uid {
            out.push_str(&format!("CUID\t{uid}\n"));
        }
        if let Some(cookie) = &self.cookie {
            out.push_str(&format!("COOKIE\t{cookie}\n"));
        }
        out.push_str("DONE\n");
        out.into_bytes()
    }
}

/// Reads the server's handshake a line at a time; each line consumes the
/// reader and gives the next state.
#[derive(Debug, Default)]
pub struct HandshakeReader {
    minor_version: Option<u32>,
    mechanisms: Vec<Mechanism>,
    /// `MECH` lines seen, private ones included.
    mech_lines: usize,
    lines: usize,
    server_pid: Option<u32>,
    connect_uid: Option<u32>,
    cookie: Option<String>,
}

/// Where the handshake stands after a line.
#[derive(Debug)]
pub enum HandshakeStep {
    More(HandshakeReader),
    Done(Handshake),
}

impl HandshakeReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one line (without its LF).
    pub fn line(mut self, line: &[u8]) -> Result<HandshakeStep, DecodeError> {
        self.lines += 1;
        if self.lines > MAX_HANDSHAKE_LINES {
            return Err(DecodeError::HandshakeTooLong);
        }
        let fields: Vec<&[u8]> = line.split(|&b| b == b'\t').collect();
        let verb = fields[0];
        if self.minor_version.is_none() {
            if verb != b"VERSION" {
                return Err(DecodeError::NoVersion(shown(verb)));
            }
            self.minor_version = Some(version(&fields)?);
            return Ok(HandshakeStep::More(self));
        }
        match verb {
            b"VERSION" => return Err(DecodeError::RepeatedVersion),
            b"MECH" => self.mechanism(&fields)?,
            b"SPID" => {
                if self.mech_lines == 0 {
                    return Err(DecodeError::WrongSocket);
                }
                self.server_pid = Some(number(&fields, "SPID")?);
            }
            b"CUID" => self.connect_uid = Some(number(&fields, "CUID")?),
            b"COOKIE" => {
                let cookie = match fields.as_slice() {
                    [_, c] if (1..=64).contains(&c.len()) && c.iter().all(u8::is_ascii_hexdigit) => c,
                    _ => return Err(DecodeError::Malformed { verb: "COOKIE" }),
                };
                self.cookie = Some(String::from_utf8_lossy(cookie).into_owned());
            }
            b"DONE" => {
                // Nothing a client could use: better said now than as a
                // failure of every AUTH.
                if self.mechanisms.is_empty() {
                    return Err(DecodeError::NoMechanisms);
                }
                return Ok(HandshakeStep::Done(Handshake {
                    minor_version: self.minor_version.unwrap_or_default(),
                    mechanisms: self.mechanisms,
                    server_pid: self.server_pid,
                    connect_uid: self.connect_uid,
                    cookie: self.cookie,
                }));
            }
            // Dovecot adds handshake lines over time; the protocol says
            // to skip what one does not know.
            _ => {}
        }
        Ok(HandshakeStep::More(self))
    }

    /// `MECH <name> [<flag>...]`. Unknown flags are skipped; a private
    /// mechanism, or one already offered, is left out.
    fn mechanism(&mut self, fields: &[&[u8]]) -> Result<(), DecodeError> {
        let Some(name) = fields.get(1) else { return Err(DecodeError::Malformed { verb: "MECH" }) };
        let name = std::str::from_utf8(name)
            .ok()
            .and_then(MechanismName::new)
            .ok_or_else(|| DecodeError::BadMechanism(shown(name)))?;
        self.mech_lines += 1;
        let mut flags = MechanismFlags::empty();
        for field in &fields[2..] {
            if *field == b"private" {
                return Ok(());
            }
            if let Some(flag) = SecurityFlag::ALL.into_iter().find(|f| f.name().as_bytes() == *field) {
                flags = flags.with(flag);
            }
        }
        if self.mechanisms.iter().any(|m| m.name == name) {
            return Ok(());
        }
        if self.mechanisms.len() == MAX_MECHANISMS {
            return Err(DecodeError::TooManyMechanisms);
        }
        self.mechanisms.push(Mechanism { name, flags });
        Ok(())
    }
}

/// `VERSION <major> <minor>`, the major version ours.
fn version(fields: &[&[u8]]) -> Result<u32, DecodeError> {
    let [_, major, minor] = fields else { return Err(DecodeError::Malformed { verb: "VERSION" }) };
    let (major, minor) = (decimal(major), decimal(minor));
    let (Some(major), Some(minor)) = (major, minor) else { return Err(DecodeError::Malformed { verb: "VERSION" }) };
    if major != MAJOR_VERSION {
        return Err(DecodeError::Incompatible { major, minor });
    }
    Ok(minor)
}

/// `<verb> <number>`.
fn number(fields: &[&[u8]], verb: &'static str) -> Result<u32, DecodeError> {
    match fields {
        [_, n] => decimal(n).ok_or(DecodeError::Malformed { verb }),
        _ => Err(DecodeError::Malformed { verb }),
    }
}

fn decimal(field: &[u8]) -> Option<u32> {
    if field.is_empty() || !field.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(field).ok()?.parse().ok()
}

/// Part of a server's field, printable, for an error message.
fn shown(field: &[u8]) -> String {
    String::from_utf8_lossy(&field[..field.len().min(32)])
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// What the server answered to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaslReply {
    /// `CONT`: a challenge for the client, base64 text (empty for an
    /// empty challenge), relayed as `334 <challenge>`.
    Continue { challenge: String },
    /// `OK`: the client is `user`. Dovecot always names the user; a
    /// success without one must not log anyone in (Postfix refuses it:
    /// "missing Dovecot server OK username field").
    Success { user: Option<String> },
    /// `FAIL`. `temporary`: the server could not decide (its database is
    /// down: `code=temp_fail`, or `temp` from older servers), so the SMTP
    /// client should try again later. `user`, when the server names one,
    /// is whom the client tried to be (for the log; a name that is not
    /// printable text is dropped rather than the failure lost).
    Failure { reason: Option<String>, temporary: bool, user: Option<String> },
}

/// One reply line: the request it answers and what it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerReply {
    pub id: AuthId,
    pub reply: SaslReply,
}

impl ServerReply {
    /// Reads one reply line (without its LF): `OK <id> [<arg>...]`, `CONT
    /// <id> <base64>`, `FAIL <id> [<arg>...]`. Arguments this client does
    /// not use are skipped, as the protocol says; any other verb is an
    /// error.
    pub fn parse(line: &[u8]) -> Result<Self, DecodeError> {
        let mut fields = line.split(|&b| b == b'\t');
        let verb: &'static str = match fields.next().unwrap_or_default() {
            b"OK" => "OK",
            b"CONT" => "CONT",
            b"FAIL" => "FAIL",
            other => return Err(DecodeError::UnknownReply(shown(other))),
        };
        let id = fields.next().and_then(AuthId::parse).ok_or(DecodeError::Malformed { verb })?;
        let reply = match verb {
            "CONT" => {
                let data = fields.next().ok_or(DecodeError::Malformed { verb })?;
                let data = tab_unescape(data)?;
                let challenge = std::str::from_utf8(&data).ok().filter(|d| is_base64(d));
                SaslReply::Continue { challenge: challenge.ok_or(DecodeError::BadChallenge)?.to_owned() }
            }
            "OK" => {
                let mut user = None;
                for field in fields {
                    if let Some(value) = field.strip_prefix(b"user=") {
                        user = Some(self::user(&tab_unescape(value)?).ok_or(DecodeError::BadUser)?);
                    }
                }
                SaslReply::Success { user }
            }
            _ => {
                let (mut reason, mut temporary, mut user) = (None, false, None);
                for field in fields {
                    if let Some(value) = field.strip_prefix(b"reason=") {
                        reason = self::reason(&tab_unescape(value)?);
                    } else if let Some(value) = field.strip_prefix(b"user=") {
                        user = self::user(&tab_unescape(value)?);
                    } else if field == b"temp" || field == b"code=temp_fail" {
                        temporary = true;
                    }
                }
                SaslReply::Failure { reason, temporary, user }
            }
        };
        Ok(ServerReply { id, reply })
    }

    /// The reply, if it answers request `request`. A reply to any other
    /// means the connection is out of step.
    pub fn answering(self, request: AuthId) -> Result<SaslReply, DecodeError> {
        if self.id != request {
            return Err(DecodeError::IdMismatch { expected: request, got: self.id });
        }
        Ok(self.reply)
    }

    /// The line as Dovecot writes it, LF included (for tests, seeds and
    /// fake servers). A temporary failure is written as 2.3 does,
    /// `code=temp_fail`.
    pub fn encode(&self) -> Vec<u8> {
        let id = self.id;
        let mut line = match &self.reply {
            SaslReply::Continue { challenge } => format!("CONT\t{id}\t{}", tab_escape(challenge)),
            SaslReply::Success { user } => {
                let mut line = format!("OK\t{id}");
                if let Some(user) = user {
                    push_field(&mut line, "user", user);
                }
                line
            }
            SaslReply::Failure { reason, temporary, user } => {
                let mut line = format!("FAIL\t{id}");
                if let Some(user) = user {
                    push_field(&mut line, "user", user);
                }
                if *temporary {
                    line.push_str("\tcode=temp_fail");
                }
                if let Some(reason) = reason {
                    push_field(&mut line, "reason", reason);
                }
                line
            }
        };
        line.push('\n');
        line.into_bytes()
    }
}

/// A user name as it must be kept: UTF-8, not empty, at most
/// [`MAX_USER`] octets, nothing that is a control character (it goes to
/// logs, `Received:` and policy queries verbatim).
fn user(value: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(value).ok()?;
    let valid = !text.is_empty() && text.len() <= MAX_USER && !text.chars().any(char::is_control);
    valid.then(|| text.to_owned())
}

/// A failure reason made fit for an SMTP reply: control characters and
/// invalid UTF-8 become `?`, cut to [`MAX_REASON`] octets on a character
/// boundary; an empty reason is none.
fn reason(value: &[u8]) -> Option<String> {
    let text: String = String::from_utf8_lossy(value)
        .chars()
        .map(|c| if c.is_control() || c == '\u{fffd}' { '?' } else { c })
        .collect();
    let text = text[..text.floor_char_boundary(MAX_REASON)].to_owned();
    (!text.is_empty()).then_some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Dovecot 2.3.19.1 (Debian 12) sent on its auth-client socket
    /// with `auth_mechanisms = plain login`.
    const DOVECOT_2_3_HANDSHAKE: &[u8] = b"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\nSPID\t20123\nCUID\t1\nCOOKIE\tfc2a5c272549db3f6564695e25d50b54\nDONE\n";

    fn name(n: &str) -> MechanismName {
        MechanismName::new(n).unwrap()
    }

    fn id(n: u32) -> AuthId {
        AuthId::new(n).unwrap()
    }

    /// Feeds `bytes` in pieces of `piece` and reads the handshake.
    fn handshake(bytes: &[u8], piece: usize) -> Result<(Handshake, LineReader), DecodeError> {
        let mut lines = LineReader::new();
        let mut reader = HandshakeReader::new();
        for chunk in bytes.chunks(piece) {
            lines.feed(chunk);
            while let Some(line) = lines.next_line()? {
                reader = match reader.line(&line)? {
                    HandshakeStep::More(r) => r,
                    HandshakeStep::Done(h) => return Ok((h, lines)),
                };
            }
        }
        panic!("no DONE in {:?}", String::from_utf8_lossy(bytes));
    }

    #[test]
    fn a_recorded_dovecot_handshake_is_read() {
        let plaintext = MechanismFlags::empty().with(SecurityFlag::Plaintext);
        for piece in [1, 3, DOVECOT_2_3_HANDSHAKE.len()] {
            let (h, rest) = handshake(DOVECOT_2_3_HANDSHAKE, piece).unwrap();
            assert_eq!(
                h,
                Handshake {
                    minor_version: 2,
                    mechanisms: vec![
                        Mechanism { name: name("PLAIN"), flags: plaintext },
                        Mechanism { name: name("LOGIN"), flags: plaintext },
                    ],
                    server_pid: Some(20123),
                    connect_uid: Some(1),
                    cookie: Some("fc2a5c272549db3f6564695e25d50b54".into()),
                }
            );
            assert!(rest.is_empty());
            assert_eq!(h.encode(), DOVECOT_2_3_HANDSHAKE, "encode gives Dovecot's bytes back");
            assert_eq!(h.mechanism("login").map(|m| m.name.as_str()), Some("LOGIN"));
            assert_eq!(h.mechanism("CRAM-MD5"), None);
        }
    }

    #[test]
    fn handshake_flags_private_unknown_and_repeated_mechanisms() {
        let text = b"VERSION\t1\t3\nMECH\tAPOP\tprivate\nMECH\tANONYMOUS\tanonymous\nMECH\tSCRAM-SHA-256\tmutual-auth\tdictionary\tchannel-binding\nMECH\tPLAIN\tplaintext\nMECH\tPLAIN\nNEWTHING\twhatever\nSPID\t7\nDONE\n";
        let (h, _) = handshake(text, 5).unwrap();
        let names: Vec<&str> = h.mechanisms.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["ANONYMOUS", "SCRAM-SHA-256", "PLAIN"]);
        let scram = h.mechanism("scram-sha-256").unwrap().flags;
        assert!(scram.contains(SecurityFlag::MutualAuth) && scram.contains(SecurityFlag::Dictionary));
        assert!(!scram.contains(SecurityFlag::Plaintext));
        assert_eq!(scram.iter().collect::<Vec<_>>(), [SecurityFlag::Dictionary, SecurityFlag::MutualAuth]);
        assert!(h.mechanism("PLAIN").unwrap().flags.contains(SecurityFlag::Plaintext), "the first PLAIN line counts");
        assert_eq!((h.minor_version, h.server_pid, h.connect_uid, h.cookie), (3, Some(7), None, None));
        // What follows DONE stays in the reader: the caller sees it.
        let (_, rest) = handshake(b"VERSION\t1\t2\nMECH\tPLAIN\nDONE\nOK\t1\n", 100).unwrap();
        assert!(!rest.is_empty());
    }

    #[test]
    fn bad_handshakes_are_refused() {
        let cases: Vec<(Vec<u8>, DecodeError)> = vec![
            (b"MECH\tPLAIN\n".to_vec(), DecodeError::NoVersion("MECH".into())),
            (b"\n".to_vec(), DecodeError::NoVersion(String::new())),
            (b"VERSION\t2\t0\n".to_vec(), DecodeError::Incompatible { major: 2, minor: 0 }),
            (b"VERSION\t1\n".to_vec(), DecodeError::Malformed { verb: "VERSION" }),
            (b"VERSION\t1\tx\n".to_vec(), DecodeError::Malformed { verb: "VERSION" }),
            (b"VERSION\t-1\t2\n".to_vec(), DecodeError::Malformed { verb: "VERSION" }),
            (b"VERSION\t1\t2\nVERSION\t1\t2\n".to_vec(), DecodeError::RepeatedVersion),
            // An auth-master or auth-userdb socket: VERSION, SPID, silence.
            (b"VERSION\t1\t2\nSPID\t9\n".to_vec(), DecodeError::WrongSocket),
            (b"VERSION\t1\t2\nMECH\n".to_vec(), DecodeError::Malformed { verb: "MECH" }),
            (b"VERSION\t1\t2\nMECH\tplain\n".to_vec(), DecodeError::BadMechanism("plain".into())),
            (b"VERSION\t1\t2\nMECH\t\n".to_vec(), DecodeError::BadMechanism(String::new())),
            (
                b"VERSION\t1\t2\nMECH\tTWENTY-ONE-CHARACTERS\n".to_vec(),
                DecodeError::BadMechanism("TWENTY-ONE-CHARACTERS".into()),
            ),
            (b"VERSION\t1\t2\nMECH\tPLAIN\nSPID\tx\n".to_vec(), DecodeError::Malformed { verb: "SPID" }),
            (b"VERSION\t1\t2\nCUID\t1\t2\n".to_vec(), DecodeError::Malformed { verb: "CUID" }),
            (b"VERSION\t1\t2\nCOOKIE\tnot-hex\n".to_vec(), DecodeError::Malformed { verb: "COOKIE" }),
            (b"VERSION\t1\t2\nDONE\n".to_vec(), DecodeError::NoMechanisms),
            // Only private mechanisms: nothing a client may use.
            (b"VERSION\t1\t2\nMECH\tAPOP\tprivate\nSPID\t1\nDONE\n".to_vec(), DecodeError::NoMechanisms),
            (
                [
                    b"VERSION\t1\t2\n".to_vec(),
                    (0..=MAX_MECHANISMS).flat_map(|i| format!("MECH\tM{i}\n").into_bytes()).collect(),
                ]
                .concat(),
                DecodeError::TooManyMechanisms,
            ),
            ([b"VERSION\t1\t2\n".to_vec(), b"X\n".repeat(MAX_HANDSHAKE_LINES)].concat(), DecodeError::HandshakeTooLong),
        ];
        for (bytes, want) in cases {
            let mut lines = LineReader::new();
            lines.feed(&bytes);
            let mut reader = HandshakeReader::new();
            let got = loop {
                let line = lines.next_line().unwrap().expect("the case ends in an error before its bytes do");
                match reader.line(&line) {
                    Ok(HandshakeStep::More(r)) => reader = r,
                    Ok(HandshakeStep::Done(h)) => panic!("accepted {h:?}"),
                    Err(e) => break e,
                }
            };
            assert_eq!(got, want, "{:?}", String::from_utf8_lossy(&bytes));
        }
    }

    #[test]
    fn the_client_handshake_and_requests_are_what_dovecot_reads() {
        assert_eq!(client_handshake(NonZeroU32::new(4242).unwrap()), b"VERSION\t1\t2\nCPID\t4242\n");
        let plain = name("PLAIN");
        let mut request = AuthRequest {
            id: id(1),
            mechanism: &plain,
            local: "192.0.2.25:587".parse().unwrap(),
            remote: "198.51.100.7:40000".parse().unwrap(),
            secured: true,
            initial: Some("AGFsaWNlAHNlY3JldA=="),
        };
        assert_eq!(
            request.encode().unwrap(),
            b"AUTH\t1\tPLAIN\tservice=smtp\tnologin\tlip=192.0.2.25\trip=198.51.100.7\tlport=587\trport=40000\tsecured\tresp=AGFsaWNlAHNlY3JldA==\n"
        );
        // RFC 4954's "=" is an empty initial response: an empty resp=.
        request.initial = Some("=");
        assert!(request.encode().unwrap().ends_with(b"\tsecured\tresp=\n"));
        // No initial response, no TLS, IPv6 and IPv4-mapped addresses.
        request.initial = None;
        request.secured = false;
        request.local = "[2001:db8::25]:25".parse().unwrap();
        request.remote = "[::ffff:192.0.2.9]:1234".parse().unwrap();
        assert_eq!(
            request.encode().unwrap(),
            b"AUTH\t1\tPLAIN\tservice=smtp\tnologin\tlip=2001:db8::25\trip=192.0.2.9\tlport=25\trport=1234\n"
        );
        assert_eq!(encode_continue(id(7), "YWxpY2U=").unwrap(), b"CONT\t7\tYWxpY2U=\n");
        assert_eq!(encode_continue(id(7), "").unwrap(), b"CONT\t7\t\n");
    }

    #[test]
    fn client_data_that_is_not_base64_is_never_sent() {
        let plain = name("PLAIN");
        let request = |initial| AuthRequest {
            id: AuthId::FIRST,
            mechanism: &plain,
            local: "127.0.0.1:25".parse().unwrap(),
            remote: "127.0.0.1:1".parse().unwrap(),
            secured: false,
            initial: Some(initial),
        };
        for bad in ["a\tb", "abc\nAUTH\t2", "YQ==\tresp=x", "a=b", "a===", "é", " YQ==", "\u{1}t"] {
            assert_eq!(request(bad).encode(), Err(EncodeError::NotBase64 { what: "initial response" }), "{bad:?}");
            assert_eq!(
                encode_continue(AuthId::FIRST, bad),
                Err(EncodeError::NotBase64 { what: "response" }),
                "{bad:?}"
            );
        }
        let long = "A".repeat(MAX_LINE);
        assert_eq!(request(&long).encode(), Err(EncodeError::TooLong));
        assert_eq!(encode_continue(AuthId::FIRST, &long), Err(EncodeError::TooLong));
        // Postfix's 12288-octet response limit fits.
        assert!(encode_continue(AuthId::FIRST, &"A".repeat(12_288)).is_ok());
    }

    #[test]
    fn mechanism_names_are_sasl_names() {
        for good in ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256-PLUS", "X_Y", "GS2-KRB5", "A"] {
            assert_eq!(MechanismName::new(good).map(|m| m.to_string()), Some(good.to_owned()));
        }
        for bad in ["", "plain", "PL AIN", "PLAIN\t", "PLAIN\n", "A".repeat(21).as_str(), "É", "PLAIN="] {
            assert_eq!(MechanismName::new(bad), None, "{bad:?}");
        }
        assert!(name("CRAM-MD5").matches("cram-md5") && !name("PLAIN").matches("PLAINX"));
        assert_eq!("cram-md5".parse(), Ok(name("CRAM-MD5")));
        assert_eq!("plain\t".parse::<MechanismName>(), Err(BadMechanismName));
    }

    #[test]
    fn tab_escaping_round_trips_and_matches_dovecot() {
        assert_eq!(tab_escape("alice"), "alice");
        assert!(matches!(tab_escape("alice"), Cow::Borrowed(_)));
        assert_eq!(tab_escape("a\tb\nc\rd\u{1}e\0f"), "a\u{1}tb\u{1}nc\u{1}rd\u{1}1e\u{1}0f");
        for s in ["", "plain", "\t\t", "\u{1}", "\u{1}t", "x\ny", "ä\0\r\n\t\u{1}"] {
            assert_eq!(tab_unescape(tab_escape(s).as_bytes()).unwrap().as_ref(), s.as_bytes(), "{s:?}");
        }
        // Any other escaped octet stands for itself; a dangling escape is refused.
        assert_eq!(tab_unescape(b"a\x01xb").unwrap().as_ref(), b"axb");
        assert_eq!(tab_unescape(b"a\x01"), Err(DecodeError::TruncatedEscape));
    }

    #[test]
    fn replies_are_read_as_dovecot_writes_them() {
        let cases: Vec<(&[u8], ServerReply)> = vec![
            (b"OK\t1\tuser=alice", ServerReply { id: id(1), reply: SaslReply::Success { user: Some("alice".into()) } }),
            (
                b"OK\t3\tuser=alice@example.test\toriginal_user=Alice\tnologin\tresp=dj1yZWFs",
                ServerReply { id: id(3), reply: SaslReply::Success { user: Some("alice@example.test".into()) } },
            ),
            (
                b"CONT\t3\tVXNlcm5hbWU6",
                ServerReply { id: id(3), reply: SaslReply::Continue { challenge: "VXNlcm5hbWU6".into() } },
            ),
            (b"CONT\t5\t", ServerReply { id: id(5), reply: SaslReply::Continue { challenge: String::new() } }),
            (b"OK\t6\tnologin", ServerReply { id: id(6), reply: SaslReply::Success { user: None } }),
            (
                b"FAIL\t2\tuser=alice",
                ServerReply {
                    id: id(2),
                    reply: SaslReply::Failure { reason: None, temporary: false, user: Some("alice".into()) },
                },
            ),
            (
                b"FAIL\t4",
                ServerReply { id: id(4), reply: SaslReply::Failure { reason: None, temporary: false, user: None } },
            ),
            (
                b"FAIL\t7\tcode=invalid_base64\treason=Invalid base64 data in initial response",
                ServerReply {
                    id: id(7),
                    reply: SaslReply::Failure {
                        reason: Some("Invalid base64 data in initial response".into()),
                        temporary: false,
                        user: None,
                    },
                },
            ),
            (
                b"FAIL\t8\tuser=bob\tcode=temp_fail\treason=Internal error occurred",
                ServerReply {
                    id: id(8),
                    reply: SaslReply::Failure {
                        reason: Some("Internal error occurred".into()),
                        temporary: true,
                        user: Some("bob".into()),
                    },
                },
            ),
            (
                b"FAIL\t9\ttemp\treason=db\x01tdown\x01n",
                ServerReply {
                    id: id(9),
                    reply: SaslReply::Failure { reason: Some("db?down?".into()), temporary: true, user: None },
                },
            ),
            // A user name no log should see is dropped from a failure,
            // not the failure.
            (
                b"FAIL\t10\tuser=a\x01nb\treason=",
                ServerReply { id: id(10), reply: SaslReply::Failure { reason: None, temporary: false, user: None } },
            ),
            (
                b"OK\t4294967295\tuser=\xc3\xa4lice bob",
                ServerReply { id: id(u32::MAX), reply: SaslReply::Success { user: Some("älice bob".into()) } },
            ),
        ];
        for (line, want) in cases {
            let got = ServerReply::parse(line).unwrap_or_else(|e| panic!("{:?}: {e}", String::from_utf8_lossy(line)));
            assert_eq!(got, want, "{:?}", String::from_utf8_lossy(line));
            let wire = got.encode();
            assert_eq!(ServerReply::parse(&wire[..wire.len() - 1]), Ok(got), "encode/parse round trip");
        }
        let long = format!("FAIL\t1\treason={}", "é".repeat(MAX_REASON));
        let Ok(ServerReply { reply: SaslReply::Failure { reason: Some(r), .. }, .. }) =
            ServerReply::parse(long.as_bytes())
        else {
            panic!()
        };
        assert_eq!((r.len(), r.chars().count()), (MAX_REASON, MAX_REASON / 2), "cut on a character boundary");
        let reply = ServerReply::parse(b"CONT\t6\tVXNlcm5hbWU6").unwrap();
        assert_eq!(reply.clone().answering(id(6)), Ok(SaslReply::Continue { challenge: "VXNlcm5hbWU6".into() }));
        assert_eq!(reply.answering(id(5)), Err(DecodeError::IdMismatch { expected: id(5), got: id(6) }));
    }

    #[test]
    fn bad_replies_are_refused() {
        let cases: Vec<(&[u8], DecodeError)> = vec![
            (b"", DecodeError::UnknownReply(String::new())),
            (b"ok\t1\tuser=a", DecodeError::UnknownReply("ok".into())),
            (b"MECH\tPLAIN", DecodeError::UnknownReply("MECH".into())),
            (b"DONE", DecodeError::UnknownReply("DONE".into())),
            (b"CANCELLED\t1", DecodeError::UnknownReply("CANCELLED".into())),
            (b"\x00\xff", DecodeError::UnknownReply("?\u{fffd}".into())),
            (b"OK", DecodeError::Malformed { verb: "OK" }),
            (b"OK\t0\tuser=a", DecodeError::Malformed { verb: "OK" }),
            (b"OK\t4294967296\tuser=a", DecodeError::Malformed { verb: "OK" }),
            (b"OK\t+1\tuser=a", DecodeError::Malformed { verb: "OK" }),
            (b"FAIL\tx", DecodeError::Malformed { verb: "FAIL" }),
            (b"CONT\t1", DecodeError::Malformed { verb: "CONT" }),
            (b"CONT\t1\tnot base64", DecodeError::BadChallenge),
            (b"CONT\t1\tYQ\x01t", DecodeError::BadChallenge),
            (b"CONT\t1\tYQ\x01", DecodeError::TruncatedEscape),
            (b"OK\t1\tuser=", DecodeError::BadUser),
            (b"OK\t1\tuser=a\x01nb", DecodeError::BadUser),
            (b"OK\t1\tuser=a\x7fb", DecodeError::BadUser),
            (b"OK\t1\tuser=\xff", DecodeError::BadUser),
        ];
        for (line, want) in cases {
            assert_eq!(ServerReply::parse(line), Err(want), "{:?}", String::from_utf8_lossy(line));
        }
        let long = format!("OK\t1\tuser={}", "a".repeat(MAX_USER + 1));
        assert_eq!(ServerReply::parse(long.as_bytes()), Err(DecodeError::BadUser));
    }

    #[test]
    fn lines_are_bounded_and_independent_of_how_bytes_arrive() {
        let mut lines = LineReader::new();
        lines.feed(b"OK\t1\tuser=a\nCO");
        assert_eq!(lines.next_line(), Ok(Some(b"OK\t1\tuser=a".to_vec())));
        assert_eq!(lines.next_line(), Ok(None));
        assert!(!lines.is_empty(), "a partial line is pending");
        lines.feed(b"NT\t2\t\n");
        assert_eq!(lines.next_line(), Ok(Some(b"CONT\t2\t".to_vec())));
        assert!(lines.is_empty());
        // A line of exactly MAX_LINE octets passes; one more does not, in
        // any cut, and the complete lines before it still come out.
        let fits = [vec![b'x'; MAX_LINE], b"\n".to_vec()].concat();
        let too_long = [b"A\n".to_vec(), vec![b'x'; MAX_LINE + 1], b"\nB\n".to_vec()].concat();
        for piece in [1, 7, MAX_LINE, too_long.len()] {
            let mut lines = LineReader::new();
            fits.chunks(piece).for_each(|c| lines.feed(c));
            assert_eq!(lines.next_line().unwrap().map(|l| l.len()), Some(MAX_LINE));
            let mut lines = LineReader::new();
            let mut got = Vec::new();
            let outcome = 'feed: {
                for chunk in too_long.chunks(piece) {
                    lines.feed(chunk);
                    loop {
                        match lines.next_line() {
                            Ok(Some(line)) => got.push(line),
                            Ok(None) => break,
                            Err(e) => break 'feed Err(e),
                        }
                    }
                }
                Ok(())
            };
            assert_eq!((got, outcome), (vec![b"A".to_vec()], Err(DecodeError::LineTooLong)), "piece {piece}");
            assert!(lines.buf.len() <= MAX_LINE + 2, "nothing past the limit is kept");
        }
    }

    #[test]
    fn ids_count_from_one_and_wrap_past_zero() {
        assert_eq!(AuthId::FIRST.get(), 1);
        assert_eq!(id(41).next(), id(42));
        assert_eq!(id(u32::MAX).next(), AuthId::FIRST);
        assert_eq!(AuthId::new(0), None);
    }
}
