//! The Sendmail milter protocol, version 6, as Postfix speaks it to mail
//! filters (rspamd, OpenDKIM, OpenDMARC, clamav-milter, ...): a sans-IO
//! codec for the MTA's side. It encodes the MTA's commands ([`Command`]),
//! decodes the filter's answers ([`Reply`], [`MilterOptions`]) from bytes
//! fed in any pieces ([`Decoder`]), and computes what the option
//! negotiation agreed ([`negotiate`]). Who connects, when each command is
//! sent and what a reply does to the session is the client's business,
//! not this module's.
//!
//! # Wire format
//! Every packet is a big-endian `u32` length, one command octet and
//! `length - 1` octets of payload. Strings are NUL-terminated; numbers are
//! big-endian `u32` (`u16` for the client port).
//!
//! ```text
//! MTA                                                   milter
//!   OPTNEG(version 6, actions offered, steps offered) ->
//!                                                     <- OPTNEG(version, actions, steps
//!                                                          [, stage, "macro names"]...)
//!   MACRO(stage, name, value ...)  CONNECT(...)        ->
//!                                                     <- CONTINUE | ACCEPT | REJECT | ...
//!   ... HELO, MAIL, RCPT, DATA, HEADER x N, EOH, BODY x N ...
//!   BODYEOB                                            ->
//!                                                     <- modifications (ADDHEADER, CHGFROM, ...)
//!                                                        x N, then the final reply
//!   QUIT                                               ->
//! ```
//!
//! # Why not `miltr-common`
//! The MIT crate `miltr-common` 0.1.3 was judged first. It lacks what
//! Postfix relies on (CHGFROM, ADDRCPT_PAR, PROGRESS, the SETSYMLIST macro
//! lists are commented out as unsupported), it decodes leniently (replies
//! with payload they must not carry are accepted, header names and texts
//! are taken lossily as UTF-8 and never checked, a multi-line reply code
//! is not recognised), and it brings `bytes`, `asynchronous-codec`,
//! `enum_dispatch`, `itertools` and `num_enum` for what is a few hundred
//! lines of parsing here. So the codec is mortal's own, written from the
//! protocol's documentation (draft-adams-milter-protocol, libmilter's
//! `mfdef.h` constants, Postfix's MILTER_README and the behaviour of its
//! `milter8.c`).
//!
//! # Security
//! The filter is a separate program, often on another host: everything it
//! sends is untrusted. The decoder refuses a packet longer than
//! [`MAX_PACKET_LEN`] before buffering it, an unknown command octet, a
//! payload a command must not carry or a string missing its NUL, any
//! string over its limit, a header name that is not an RFC 5322
//! field-name, a header value with NUL or a line break that does not fold,
//! a reply code that is not 4xx/5xx or whose text has control characters,
//! and (in [`negotiate`]) a filter that asks for actions not offered. A
//! filter can make its own conversation fail; it cannot make mortal
//! allocate without bound, nor smuggle a header line or an SMTP reply line
//! of its own. What a permitted modification may do to a message is still
//! checked by cleanup, which applies it.
//!
//! # Standards
//! draft-adams-milter-protocol (protocol version 2, extended by Sendmail
//! 8.14's version 6), RFC 5322 section 2.2 (header fields), RFC 5321
//! section 4.2 (replies), RFC 3463 (enhanced status codes).
//!
//! # Diagnostics
//! Every error names the packet's command and the rule it broke, so the
//! client can log Postfix's `warning: milter NAME: ...` line with it.

use crate::address::MAX_PATH;
use crate::smtp_status::{EnhancedStatus, ReplyCode, StatusClass};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
use thiserror::Error;

/// The protocol version mortal offers (Postfix's `milter_protocol = 6`).
pub const PROTOCOL_VERSION: u32 = 6;
/// The oldest version a filter may answer with: libmilter's protocol 2
/// (Sendmail 8.11); Postfix accepts 2, 3, 4 and 6.
pub const MIN_PROTOCOL_VERSION: u32 = 2;
/// Largest body chunk in one BODY command or REPLBODY reply: libmilter's
/// `MILTER_CHUNK_SIZE`, which a filter built on it never exceeds (mortal
/// offers neither `MDS_256K` nor `MDS_1M`).
pub const MAX_BODY_CHUNK: usize = 65535;
/// Room in a packet beyond the largest chunk: the command octet and the
/// fields that go with a value (a header's index and name).
pub const PACKET_MARGIN: usize = 2048;
/// Largest packet, command octet included, either way. A length field
/// above it ends the conversation before anything is buffered.
pub const MAX_PACKET_LEN: usize = MAX_BODY_CHUNK + PACKET_MARGIN;
/// Longest header field name: a whole RFC 5322 line.
pub const MAX_HEADER_NAME: usize = 998;
/// Longest header value a filter may add or change (folded lines
/// included); cleanup's `header_size_limit` still applies to the result.
pub const MAX_HEADER_VALUE: usize = MAX_BODY_CHUNK - MAX_HEADER_NAME - 8;
/// Longest envelope address a filter may name, angle brackets included.
pub const MAX_ADDRESS: usize = MAX_PATH + 2;
/// Longest ESMTP parameter string (`NOTIFY=... ORCPT=...`) of ADDRCPT_PAR
/// and CHGFROM, and of each parameter mortal passes in MAIL and RCPT.
pub const MAX_ESMTP_ARGS: usize = 2048;
/// Longest quarantine reason.
pub const MAX_REASON: usize = 1024;
/// Lines in one custom reply: libmilter's `MAXREPLIES`.
pub const MAX_REPLY_LINES: usize = 32;
/// Longest line of a custom reply, code included: libmilter's
/// `MAXREPLYLEN`.
pub const MAX_REPLY_LINE: usize = 980;
/// Longest macro name (`{daemon_name}`) and the longest list of names a
/// filter may ask for at one stage.
pub const MAX_MACRO_NAME: usize = 64;
pub const MAX_MACRO_LIST: usize = 4096;
/// Longest macro value, HELO name, host name, unknown command or other
/// string mortal sends.
pub const MAX_STRING: usize = 4096;
/// Macros in one MACRO command, and ESMTP parameters in one MAIL or RCPT.
pub const MAX_ITEMS: usize = 64;

const OCTETS_IN_LENGTH: usize = 4;

// MTA → milter commands (SMFIC_*).
const C_ABORT: u8 = b'A';
const C_BODY: u8 = b'B';
const C_CONNECT: u8 = b'C';
const C_MACRO: u8 = b'D';
const C_BODYEOB: u8 = b'E';
const C_HELO: u8 = b'H';
const C_QUIT_NC: u8 = b'K';
const C_HEADER: u8 = b'L';
const C_MAIL: u8 = b'M';
const C_EOH: u8 = b'N';
const C_OPTNEG: u8 = b'O';
const C_QUIT: u8 = b'Q';
const C_RCPT: u8 = b'R';
const C_DATA: u8 = b'T';
const C_UNKNOWN: u8 = b'U';

// milter → MTA replies (SMFIR_*).
const R_ADDRCPT: u8 = b'+';
const R_DELRCPT: u8 = b'-';
const R_ADDRCPT_PAR: u8 = b'2';
const R_SHUTDOWN: u8 = b'4';
const R_ACCEPT: u8 = b'a';
const R_REPLBODY: u8 = b'b';
const R_CONTINUE: u8 = b'c';
const R_DISCARD: u8 = b'd';
const R_CHGFROM: u8 = b'e';
const R_ADDHEADER: u8 = b'h';
const R_INSHEADER: u8 = b'i';
const R_CHGHEADER: u8 = b'm';
const R_PROGRESS: u8 = b'p';
const R_QUARANTINE: u8 = b'q';
const R_REJECT: u8 = b'r';
const R_SKIP: u8 = b's';
const R_TEMPFAIL: u8 = b't';
const R_REPLYCODE: u8 = b'y';

// Address families of CONNECT (SMFIA_*).
const FAMILY_UNKNOWN: u8 = b'U';
const FAMILY_UNIX: u8 = b'L';
const FAMILY_INET: u8 = b'4';
const FAMILY_INET6: u8 = b'6';

/// Why bytes are not a valid milter conversation, or a value cannot be
/// sent in one.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MilterError {
    #[error("packet declares {len} octets, more than the limit of {limit}")]
    Oversized { len: usize, limit: usize },
    #[error("packet of length 0 has no command octet")]
    EmptyPacket,
    #[error("input ends inside a packet")]
    Truncated,
    #[error("unknown command octet {0:#04x}")]
    UnknownCommand(u8),
    #[error("{command} ends inside its {field}")]
    TruncatedPayload { command: &'static str, field: &'static str },
    #[error("{command} carries {left} unexpected octets")]
    TrailingBytes { command: &'static str, left: usize },
    #[error("{command}: {field} of {len} octets exceeds the limit of {limit}")]
    TooLong { command: &'static str, field: &'static str, len: usize, limit: usize },
    #[error("{command}: {field} is not valid UTF-8")]
    NotUtf8 { command: &'static str, field: &'static str },
    #[error("{command}: {field} contains a NUL or control character")]
    BadCharacter { command: &'static str, field: &'static str },
    #[error("{command}: {name:?} is not a header field name")]
    BadHeaderName { command: &'static str, name: String },
    #[error("{command}: header value has a NUL or a line break that does not fold")]
    BadHeaderValue { command: &'static str },
    #[error("malformed reply: {0}")]
    BadReply(String),
    #[error("{0:?} is not a macro name (one character, or {{name}})")]
    BadMacroName(String),
    #[error("macro stage {0} does not exist")]
    UnknownMacroStage(u32),
    #[error("macro stage {0} listed twice")]
    DuplicateMacroStage(u32),
    #[error("CONNECT: unknown address family {0:#04x}")]
    UnknownFamily(u8),
    #[error("CONNECT: {0:?} is not an address of the family given")]
    BadConnectAddress(String),
    #[error("protocol version {milter} conflicts with MTA protocol version {ours}")]
    VersionConflict { milter: u32, ours: u32 },
    #[error("request mask {asked:#x} conflicts with MTA request mask {offered:#x}")]
    ActionsNotOffered { asked: u32, offered: u32 },
    #[error("macro lists sent without the SETSYMLIST action")]
    SymlistNotNegotiated,
    #[error("{0} was not negotiated")]
    ActionNotNegotiated(&'static str),
    #[error("{command}: {count} items, more than the limit of {limit}")]
    TooManyItems { command: &'static str, count: usize, limit: usize },
}

macro_rules! flag_set {
    ($(#[$doc:meta])* $name:ident { $($(#[$fdoc:meta])* $flag:ident = $bit:expr,)+ }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub struct $name(u32);

        impl $name {
            $($(#[$fdoc])* pub const $flag: Self = Self($bit);)+
            /// Every flag this codec knows.
            pub const ALL: Self = Self(0 $(| $bit)+);
            const NAMES: &[(&str, u32)] = &[$((stringify!($flag), $bit),)+];

            pub const fn empty() -> Self {
                Self(0)
            }

            pub const fn bits(self) -> u32 {
                self.0
            }

            /// `None` when `bits` has a flag this codec does not know.
            pub const fn from_bits(bits: u32) -> Option<Self> {
                if bits & !Self::ALL.0 == 0 { Some(Self(bits)) } else { None }
            }

            /// The known flags of `bits`, others dropped.
            pub const fn from_bits_truncate(bits: u32) -> Self {
                Self(bits & Self::ALL.0)
            }

            pub const fn contains(self, other: Self) -> bool {
                self.0 & other.0 == other.0
            }

            pub const fn intersects(self, other: Self) -> bool {
                self.0 & other.0 != 0
            }

            pub const fn is_empty(self) -> bool {
                self.0 == 0
            }

            pub const fn union(self, other: Self) -> Self {
                Self(self.0 | other.0)
            }

            pub const fn intersection(self, other: Self) -> Self {
                Self(self.0 & other.0)
            }

            pub const fn difference(self, other: Self) -> Self {
                Self(self.0 & !other.0)
            }
        }

        impl std::ops::BitOr for $name {
            type Output = Self;
            fn bitor(self, other: Self) -> Self {
                self.union(other)
            }
        }

        impl std::ops::BitAnd for $name {
            type Output = Self;
            fn bitand(self, other: Self) -> Self {
                self.intersection(other)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut first = true;
                for (name, bit) in Self::NAMES {
                    if self.0 & bit != 0 {
                        f.write_str(if first { "" } else { "|" })?;
                        f.write_str(name)?;
                        first = false;
                    }
                }
                if first {
                    f.write_str("(none)")?;
                }
                Ok(())
            }
        }
    };
}

flag_set! {
    /// What a filter may do at the end of a message (`SMFIF_*`).
    Actions {
        ADDHDRS = 1 << 0,
        CHGBODY = 1 << 1,
        ADDRCPT = 1 << 2,
        DELRCPT = 1 << 3,
        /// Change and delete headers (insert too, in Postfix).
        CHGHDRS = 1 << 4,
        QUARANTINE = 1 << 5,
        CHGFROM = 1 << 6,
        ADDRCPT_PAR = 1 << 7,
        /// Send its own macro lists in the OPTNEG answer.
        SETSYMLIST = 1 << 8,
    }
}

flag_set! {
    /// Protocol steps (`SMFIP_*`): events the filter does not want
    /// (`NO*`), events it will not answer (`NR_*`), and extensions.
    ProtocolSteps {
        NOCONNECT = 1 << 0,
        NOHELO = 1 << 1,
        NOMAIL = 1 << 2,
        NORCPT = 1 << 3,
        NOBODY = 1 << 4,
        NOHDRS = 1 << 5,
        NOEOH = 1 << 6,
        /// No reply per header (once `NOHREPL`).
        NR_HDR = 1 << 7,
        NOUNKNOWN = 1 << 8,
        NODATA = 1 << 9,
        /// The MTA understands SKIP.
        SKIP = 1 << 10,
        /// The filter wants rejected recipients too.
        RCPT_REJ = 1 << 11,
        NR_CONN = 1 << 12,
        NR_HELO = 1 << 13,
        NR_MAIL = 1 << 14,
        NR_RCPT = 1 << 15,
        NR_DATA = 1 << 16,
        NR_UNKN = 1 << 17,
        NR_EOH = 1 << 18,
        NR_BODY = 1 << 19,
        /// Header values keep their leading space.
        HDR_LEADSPC = 1 << 20,
    }
}

impl ProtocolSteps {
    /// The events a filter may decline (`SMFIP_NOSEND_MASK`).
    pub const NO_SEND: Self = Self(
        Self::NOCONNECT.0
            | Self::NOHELO.0
            | Self::NOMAIL.0
            | Self::NORCPT.0
            | Self::NOBODY.0
            | Self::NOHDRS.0
            | Self::NOEOH.0
            | Self::NOUNKNOWN.0
            | Self::NODATA.0,
    );

    /// The steps defined by protocol `version` (Postfix's
    /// `MILTER8_V*_PROTO_MASK`); `None` for a version Postfix does not
    /// speak. A filter of an older version must not be sent the events its
    /// version lacks.
    pub const fn of_version(version: u32) -> Option<Self> {
        let v2 = Self::NOCONNECT.0
            | Self::NOHELO.0
            | Self::NOMAIL.0
            | Self::NORCPT.0
            | Self::NOBODY.0
            | Self::NOHDRS.0
            | Self::NOEOH.0;
        let v3 = v2 | Self::NOUNKNOWN.0;
        let v4 = v3 | Self::NODATA.0;
        match version {
            2 => Some(Self(v2)),
            3 => Some(Self(v3)),
            4 | 5 => Some(Self(v4)),
            6 => Some(Self::ALL),
            _ => None,
        }
    }
}

/// A conversation stage: the command an event is, the stage its macros
/// belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    Connect,
    Helo,
    Mail,
    Rcpt,
    Data,
    Header,
    EndOfHeaders,
    Body,
    EndOfMessage,
    Unknown,
}

impl Stage {
    const ALL: [Stage; 10] = [
        Stage::Connect,
        Stage::Helo,
        Stage::Mail,
        Stage::Rcpt,
        Stage::Data,
        Stage::Header,
        Stage::EndOfHeaders,
        Stage::Body,
        Stage::EndOfMessage,
        Stage::Unknown,
    ];

    /// The command octet of the stage's event, which a MACRO command names.
    pub const fn command_code(self) -> u8 {
        match self {
            Stage::Connect => C_CONNECT,
            Stage::Helo => C_HELO,
            Stage::Mail => C_MAIL,
            Stage::Rcpt => C_RCPT,
            Stage::Data => C_DATA,
            Stage::Header => C_HEADER,
            Stage::EndOfHeaders => C_EOH,
            Stage::Body => C_BODY,
            Stage::EndOfMessage => C_BODYEOB,
            Stage::Unknown => C_UNKNOWN,
        }
    }

    fn from_command_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.command_code() == code)
    }

    /// The macro list number (`SMFIM_*`) a filter uses for this stage in
    /// its OPTNEG answer; `None` for stages without one.
    pub const fn symlist_number(self) -> Option<u32> {
        match self {
            Stage::Connect => Some(0),
            Stage::Helo => Some(1),
            Stage::Mail => Some(2),
            Stage::Rcpt => Some(3),
            Stage::Data => Some(4),
            Stage::EndOfMessage => Some(5),
            Stage::EndOfHeaders => Some(6),
            Stage::Header | Stage::Body | Stage::Unknown => None,
        }
    }

    fn from_symlist_number(n: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.symlist_number() == Some(n))
    }

    /// The step that says the filter does not want this event.
    pub const fn no_send(self) -> ProtocolSteps {
        match self {
            Stage::Connect => ProtocolSteps::NOCONNECT,
            Stage::Helo => ProtocolSteps::NOHELO,
            Stage::Mail => ProtocolSteps::NOMAIL,
            Stage::Rcpt => ProtocolSteps::NORCPT,
            Stage::Data => ProtocolSteps::NODATA,
            Stage::Header => ProtocolSteps::NOHDRS,
            Stage::EndOfHeaders => ProtocolSteps::NOEOH,
            Stage::Body => ProtocolSteps::NOBODY,
            Stage::Unknown => ProtocolSteps::NOUNKNOWN,
            Stage::EndOfMessage => ProtocolSteps::empty(),
        }
    }

    /// The step that says the filter does not answer this event.
    pub const fn no_reply(self) -> ProtocolSteps {
        match self {
            Stage::Connect => ProtocolSteps::NR_CONN,
            Stage::Helo => ProtocolSteps::NR_HELO,
            Stage::Mail => ProtocolSteps::NR_MAIL,
            Stage::Rcpt => ProtocolSteps::NR_RCPT,
            Stage::Data => ProtocolSteps::NR_DATA,
            Stage::Header => ProtocolSteps::NR_HDR,
            Stage::EndOfHeaders => ProtocolSteps::NR_EOH,
            Stage::Body => ProtocolSteps::NR_BODY,
            Stage::Unknown => ProtocolSteps::NR_UNKN,
            Stage::EndOfMessage => ProtocolSteps::empty(),
        }
    }
}

/// The macros Postfix sends at each stage by default (`postconf -d
/// milter_connect_macros` and its siblings). Headers are sent with the
/// end-of-header macros, as Postfix does; the body gets none.
pub const DEFAULT_MACROS: [(Stage, &[&str]); 8] = [
    (Stage::Connect, &["j", "{daemon_name}", "{daemon_addr}", "v", "_"]),
    (Stage::Helo, &["{tls_version}", "{cipher}", "{cipher_bits}", "{cert_subject}", "{cert_issuer}"]),
    (
        Stage::Mail,
        &["i", "{auth_type}", "{auth_authen}", "{auth_author}", "{mail_addr}", "{mail_host}", "{mail_mailer}"],
    ),
    (Stage::Rcpt, &["i", "{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}"]),
    (Stage::Data, &["i"]),
    (Stage::EndOfHeaders, &["i"]),
    (Stage::EndOfMessage, &["i"]),
    (Stage::Unknown, &[]),
];

/// A macro name as it travels: one character (`j`, `i`, `_`), or a word in
/// braces (`{daemon_name}`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacroName(String);

impl MacroName {
    pub fn new(name: &str) -> Result<Self, MilterError> {
        let word = |w: &str| !w.is_empty() && w.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        let ok = name.len() <= MAX_MACRO_NAME
            && match name.as_bytes() {
                [c] => c.is_ascii_graphic() && !matches!(c, b'{' | b'}'),
                [b'{', .., b'}'] => word(&name[1..name.len() - 1]),
                _ => false,
            };
        if ok { Ok(Self(name.to_owned())) } else { Err(MilterError::BadMacroName(name.chars().take(80).collect())) }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MacroName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which macros go to one filter at each stage: Postfix's defaults, with
/// the lists the filter sent in its OPTNEG answer in their place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MacroLists {
    lists: Vec<(Stage, Vec<MacroName>)>,
}

impl Default for MacroLists {
    fn default() -> Self {
        let lists = DEFAULT_MACROS
            .iter()
            .map(|(stage, names)| {
                (*stage, names.iter().map(|n| MacroName::new(n).expect("default macro names are valid")).collect())
            })
            .collect();
        Self { lists }
    }
}

impl MacroLists {
    /// The names for `stage` (headers take the end-of-header list).
    pub fn names(&self, stage: Stage) -> &[MacroName] {
        let stage = if stage == Stage::Header { Stage::EndOfHeaders } else { stage };
        self.lists.iter().find(|(s, _)| *s == stage).map_or(&[], |(_, n)| n)
    }

    /// Replaces the list of `stage`.
    pub fn set(&mut self, stage: Stage, names: Vec<MacroName>) {
        match self.lists.iter_mut().find(|(s, _)| *s == stage) {
            Some((_, n)) => *n = names,
            None => self.lists.push((stage, names)),
        }
    }

    /// The MACRO command for `stage`, with the value `lookup` gives each
    /// name; names without a value are left out, as Postfix does. `None`
    /// when the stage has no macros to send.
    pub fn command(&self, stage: Stage, lookup: impl Fn(&MacroName) -> Option<String>) -> Option<Command> {
        let macros: Vec<(MacroName, String)> =
            self.names(stage).iter().filter_map(|n| lookup(n).map(|v| (n.clone(), v))).collect();
        (!macros.is_empty()).then_some(Command::Macro { stage, macros })
    }
}

/// An RFC 5322 field name (printable ASCII but colon, 1 to
/// [`MAX_HEADER_NAME`] octets).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HeaderName(String);

impl HeaderName {
    pub fn new(name: &str) -> Option<Self> {
        let ok =
            (1..=MAX_HEADER_NAME).contains(&name.len()) && name.bytes().all(|b| (33..=126).contains(&b) && b != b':');
        ok.then(|| Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HeaderName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A header value: octets without NUL, whose line breaks (LF or CRLF) each
/// start a folded continuation (followed by a space or tab), at most
/// [`MAX_HEADER_VALUE`] octets. Octets above 127 pass: headers are not
/// always ASCII.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct HeaderValue(Vec<u8>);

impl HeaderValue {
    pub fn new(value: &[u8]) -> Option<Self> {
        if value.len() > MAX_HEADER_VALUE || value.contains(&0) {
            return None;
        }
        for (i, &b) in value.iter().enumerate() {
            let folds = |at: usize| matches!(value.get(at), Some(b' ' | b'\t'));
            let ok = match b {
                b'\n' => folds(i + 1),
                b'\r' => value.get(i + 1) == Some(&b'\n') && folds(i + 2),
                _ => true,
            };
            if !ok {
                return None;
            }
        }
        Some(Self(value.to_vec()))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// An envelope address as a filter names it (`<user@example.org>` or
/// without brackets), at most [`MAX_ADDRESS`] octets of UTF-8 without
/// control characters. Its RFC 5321 syntax is cleanup's to check, where
/// the edit is applied.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MilterAddress(String);

impl MilterAddress {
    pub fn new(address: &str) -> Option<Self> {
        (!address.is_empty() && address.len() <= MAX_ADDRESS && printable(address)).then(|| Self(address.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MilterAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// ESMTP parameters as one string (`NOTIFY=SUCCESS ORCPT=rfc822;a@b`), at
/// most [`MAX_ESMTP_ARGS`] octets without control characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct EsmtpArgs(String);

impl EsmtpArgs {
    pub fn new(args: &str) -> Option<Self> {
        (args.len() <= MAX_ESMTP_ARGS && printable(args)).then(|| Self(args.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn printable(s: &str) -> bool {
    !s.chars().any(char::is_control)
}

/// What mortal offers in its OPTNEG command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offer {
    pub version: u32,
    pub actions: Actions,
    pub steps: ProtocolSteps,
}

impl Default for Offer {
    /// Postfix's offer: version 6, every action, every step.
    fn default() -> Self {
        Self { version: PROTOCOL_VERSION, actions: Actions::ALL, steps: ProtocolSteps::ALL }
    }
}

/// Where the SMTP client is, as CONNECT tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAddress {
    /// No address (a local submission): `SMFIA_UNKNOWN`.
    Unknown,
    /// A Unix-domain socket path.
    Unix(String),
    Inet(SocketAddrV4),
    Inet6(SocketAddrV6),
}

/// The CONNECT command's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// The client's name; Postfix sends `[address]` when the name is
    /// unknown, as Sendmail does ([`Connect::hostname_for`]).
    pub hostname: String,
    pub address: ClientAddress,
}

impl Connect {
    /// The host name Sendmail would send: the verified name, or the
    /// address in brackets when there is none.
    pub fn hostname_for(name: Option<&str>, addr: IpAddr) -> String {
        match name {
            Some(n) if !n.is_empty() && n != "unknown" => n.to_owned(),
            _ => format!("[{addr}]"),
        }
    }
}

/// MAIL or RCPT: the address in angle brackets and the ESMTP parameters,
/// one string each, as Postfix passes the command's arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeArgs {
    pub address: MilterAddress,
    pub params: Vec<String>,
}

/// What the MTA sends (`SMFIC_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    OptNeg(Offer),
    /// The macros of the next event of `stage`.
    Macro {
        stage: Stage,
        macros: Vec<(MacroName, String)>,
    },
    Connect(Connect),
    Helo(String),
    Mail(EnvelopeArgs),
    Rcpt(EnvelopeArgs),
    Data,
    Header {
        name: HeaderName,
        value: HeaderValue,
    },
    EndOfHeaders,
    /// At most [`MAX_BODY_CHUNK`] octets ([`Command::body_chunks`]).
    Body(Vec<u8>),
    EndOfMessage,
    Abort,
    Quit,
    /// Quit this message's conversation, keep the connection for another.
    QuitNewConnection,
    /// A command smtpd did not recognise, as the client sent it.
    Unknown(String),
}

impl Command {
    pub const fn name(&self) -> &'static str {
        match self {
            Command::OptNeg(_) => "SMFIC_OPTNEG",
            Command::Macro { .. } => "SMFIC_MACRO",
            Command::Connect(_) => "SMFIC_CONNECT",
            Command::Helo(_) => "SMFIC_HELO",
            Command::Mail(_) => "SMFIC_MAIL",
            Command::Rcpt(_) => "SMFIC_RCPT",
            Command::Data => "SMFIC_DATA",
            Command::Header { .. } => "SMFIC_HEADER",
            Command::EndOfHeaders => "SMFIC_EOH",
            Command::Body(_) => "SMFIC_BODY",
            Command::EndOfMessage => "SMFIC_BODYEOB",
            Command::Abort => "SMFIC_ABORT",
            Command::Quit => "SMFIC_QUIT",
            Command::QuitNewConnection => "SMFIC_QUIT_NC",
            Command::Unknown(_) => "SMFIC_UNKNOWN",
        }
    }

    /// `content` as BODY commands of at most [`MAX_BODY_CHUNK`] octets.
    pub fn body_chunks(content: &[u8]) -> impl Iterator<Item = Command> + '_ {
        content.chunks(MAX_BODY_CHUNK).map(|c| Command::Body(c.to_vec()))
    }

    /// Appends the packet to `out`. Fails, appending nothing, for a string
    /// with a NUL or over its limit, or a body chunk over
    /// [`MAX_BODY_CHUNK`]: values that the wire cannot carry.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), MilterError> {
        let command = self.name();
        let mut p = Payload::new(command);
        let code = match self {
            Command::OptNeg(offer) => {
                p.u32(offer.version);
                p.u32(offer.actions.bits());
                p.u32(offer.steps.bits());
                C_OPTNEG
            }
            Command::Macro { stage, macros } => {
                p.items(macros.len())?;
                p.octet(stage.command_code());
                for (name, value) in macros {
                    p.string("macro name", name.as_str(), MAX_MACRO_NAME)?;
                    p.string("macro value", value, MAX_STRING)?;
                }
                C_MACRO
            }
            Command::Connect(c) => {
                p.string("host name", &c.hostname, MAX_STRING)?;
                match &c.address {
                    ClientAddress::Unknown => p.octet(FAMILY_UNKNOWN),
                    ClientAddress::Unix(path) => {
                        p.octet(FAMILY_UNIX);
                        p.u16(0);
                        p.string("address", path, MAX_STRING)?;
                    }
                    ClientAddress::Inet(a) => {
                        p.octet(FAMILY_INET);
                        p.u16(a.port());
                        p.string("address", &a.ip().to_string(), MAX_STRING)?;
                    }
                    ClientAddress::Inet6(a) => {
                        p.octet(FAMILY_INET6);
                        p.u16(a.port());
                        p.string("address", &a.ip().to_string(), MAX_STRING)?;
                    }
                }
                C_CONNECT
            }
            Command::Helo(name) => {
                p.string("HELO name", name, MAX_STRING)?;
                C_HELO
            }
            Command::Mail(args) | Command::Rcpt(args) => {
                p.items(args.params.len())?;
                p.string("address", args.address.as_str(), MAX_ADDRESS)?;
                for param in &args.params {
                    p.string("ESMTP parameter", param, MAX_ESMTP_ARGS)?;
                }
                if matches!(self, Command::Mail(_)) { C_MAIL } else { C_RCPT }
            }
            Command::Data => C_DATA,
            Command::Header { name, value } => {
                p.string("header name", name.as_str(), MAX_HEADER_NAME)?;
                p.bytes0("header value", value.as_bytes(), MAX_HEADER_VALUE)?;
                C_HEADER
            }
            Command::EndOfHeaders => C_EOH,
            Command::Body(chunk) => {
                if chunk.len() > MAX_BODY_CHUNK {
                    return Err(MilterError::TooLong {
                        command,
                        field: "body chunk",
                        len: chunk.len(),
                        limit: MAX_BODY_CHUNK,
                    });
                }
                p.raw(chunk);
                C_BODY
            }
            Command::EndOfMessage => C_BODYEOB,
            Command::Abort => C_ABORT,
            Command::Quit => C_QUIT,
            Command::QuitNewConnection => C_QUIT_NC,
            Command::Unknown(line) => {
                p.string("command", line, MAX_STRING)?;
                C_UNKNOWN
            }
        };
        p.finish(code, out);
        Ok(())
    }

    /// Decodes a packet the MTA sent (for test filters and round trips).
    pub fn decode(packet: Packet<'_>) -> Result<Self, MilterError> {
        let command = command_name(packet.command).ok_or(MilterError::UnknownCommand(packet.command))?;
        let mut r = Reader::new(command, packet.payload);
        let cmd = match packet.command {
            C_OPTNEG => Command::OptNeg(Offer {
                version: r.u32("version")?,
                actions: Actions::from_bits_truncate(r.u32("actions")?),
                steps: ProtocolSteps::from_bits_truncate(r.u32("protocol steps")?),
            }),
            C_MACRO => {
                let code = r.octet("stage")?;
                let stage = Stage::from_command_code(code).ok_or(MilterError::UnknownCommand(code))?;
                let mut macros = Vec::new();
                while !r.is_empty() {
                    if macros.len() == MAX_ITEMS {
                        return Err(MilterError::TooManyItems { command, count: macros.len() + 1, limit: MAX_ITEMS });
                    }
                    let name = MacroName::new(r.string("macro name", MAX_MACRO_NAME)?)?;
                    macros.push((name, r.string("macro value", MAX_STRING)?.to_owned()));
                }
                Command::Macro { stage, macros }
            }
            C_CONNECT => {
                let hostname = r.string("host name", MAX_STRING)?.to_owned();
                let family = r.octet("family")?;
                let address = if family == FAMILY_UNKNOWN {
                    ClientAddress::Unknown
                } else {
                    let port = r.u16("port")?;
                    let text = r.string("address", MAX_STRING)?;
                    let bad = || MilterError::BadConnectAddress(text.chars().take(80).collect());
                    match family {
                        FAMILY_UNIX => ClientAddress::Unix(text.to_owned()),
                        FAMILY_INET => {
                            ClientAddress::Inet(SocketAddrV4::new(text.parse::<Ipv4Addr>().map_err(|_| bad())?, port))
                        }
                        FAMILY_INET6 => ClientAddress::Inet6(SocketAddrV6::new(
                            text.parse::<Ipv6Addr>().map_err(|_| bad())?,
                            port,
                            0,
                            0,
                        )),
                        other => return Err(MilterError::UnknownFamily(other)),
                    }
                };
                Command::Connect(Connect { hostname, address })
            }
            C_HELO => Command::Helo(r.string("HELO name", MAX_STRING)?.to_owned()),
            C_MAIL | C_RCPT => {
                let address = r.address("address")?;
                let mut params = Vec::new();
                while !r.is_empty() {
                    if params.len() == MAX_ITEMS {
                        return Err(MilterError::TooManyItems { command, count: params.len() + 1, limit: MAX_ITEMS });
                    }
                    params.push(r.string("ESMTP parameter", MAX_ESMTP_ARGS)?.to_owned());
                }
                let args = EnvelopeArgs { address, params };
                if packet.command == C_MAIL { Command::Mail(args) } else { Command::Rcpt(args) }
            }
            C_DATA => Command::Data,
            C_HEADER => {
                let (name, value) = r.header()?;
                Command::Header { name, value }
            }
            C_EOH => Command::EndOfHeaders,
            C_BODY => Command::Body(r.rest("body chunk", MAX_BODY_CHUNK)?.to_vec()),
            C_BODYEOB => Command::EndOfMessage,
            C_ABORT => Command::Abort,
            C_QUIT => Command::Quit,
            C_QUIT_NC => Command::QuitNewConnection,
            C_UNKNOWN => Command::Unknown(r.string("command", MAX_STRING)?.to_owned()),
            other => return Err(MilterError::UnknownCommand(other)),
        };
        r.end()?;
        Ok(cmd)
    }
}

fn command_name(code: u8) -> Option<&'static str> {
    Some(match code {
        C_OPTNEG => "SMFIC_OPTNEG",
        C_MACRO => "SMFIC_MACRO",
        C_CONNECT => "SMFIC_CONNECT",
        C_HELO => "SMFIC_HELO",
        C_MAIL => "SMFIC_MAIL",
        C_RCPT => "SMFIC_RCPT",
        C_DATA => "SMFIC_DATA",
        C_HEADER => "SMFIC_HEADER",
        C_EOH => "SMFIC_EOH",
        C_BODY => "SMFIC_BODY",
        C_BODYEOB => "SMFIC_BODYEOB",
        C_ABORT => "SMFIC_ABORT",
        C_QUIT => "SMFIC_QUIT",
        C_QUIT_NC => "SMFIC_QUIT_NC",
        C_UNKNOWN => "SMFIC_UNKNOWN",
        _ => return None,
    })
}

/// The filter's OPTNEG answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MilterOptions {
    pub version: u32,
    /// The raw request mask: [`negotiate`] checks it against the offer.
    pub actions: u32,
    /// The raw steps; flags this codec does not know are dropped by
    /// [`negotiate`], as by Postfix.
    pub steps: u32,
    /// The filter's own macro lists (SETSYMLIST), in the order sent.
    pub macro_lists: Vec<(Stage, Vec<MacroName>)>,
}

impl MilterOptions {
    /// Decodes the filter's answer to OPTNEG.
    pub fn decode(packet: Packet<'_>) -> Result<Self, MilterError> {
        if packet.command != C_OPTNEG {
            return Err(MilterError::BadReply(format!(
                "unexpected reply {:?} in initial handshake",
                char::from(packet.command)
            )));
        }
        let mut r = Reader::new("SMFIC_OPTNEG", packet.payload);
        let (version, actions, steps) = (r.u32("version")?, r.u32("actions")?, r.u32("protocol steps")?);
        let mut macro_lists: Vec<(Stage, Vec<MacroName>)> = Vec::new();
        while !r.is_empty() {
            let number = r.u32("macro stage")?;
            let stage = Stage::from_symlist_number(number).ok_or(MilterError::UnknownMacroStage(number))?;
            if macro_lists.iter().any(|(s, _)| *s == stage) {
                return Err(MilterError::DuplicateMacroStage(number));
            }
            let list = r.string("macro list", MAX_MACRO_LIST)?;
            let names = list.split_ascii_whitespace().map(MacroName::new).collect::<Result<Vec<_>, _>>()?;
            macro_lists.push((stage, names));
        }
        Ok(Self { version, actions, steps, macro_lists })
    }

    /// The packet a filter sends (for test filters and round trips).
    ///
    /// # Panics
    /// If a macro list has no SMFIM number (only stages with one can be
    /// listed) or is longer than [`MAX_MACRO_LIST`].
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut p = Payload::new("SMFIC_OPTNEG");
        p.u32(self.version);
        p.u32(self.actions);
        p.u32(self.steps);
        for (stage, names) in &self.macro_lists {
            p.u32(stage.symlist_number().expect("a stage with a macro list number"));
            let list: Vec<&str> = names.iter().map(MacroName::as_str).collect();
            p.string("macro list", &list.join(" "), MAX_MACRO_LIST).expect("macro names are bounded");
        }
        p.finish(C_OPTNEG, out);
    }
}

/// What an option negotiation agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreement {
    /// The filter's version (at most ours).
    pub version: u32,
    /// What the filter may do at the end of a message.
    pub actions: Actions,
    /// The steps of the offer the filter asked for.
    pub steps: ProtocolSteps,
    /// Events the filter's version does not define: never sent.
    pub not_in_version: ProtocolSteps,
    /// The macros to send it at each stage.
    pub macros: MacroLists,
}

/// Checks the filter's answer against `offer` and computes what was
/// agreed: its actions must be a subset of those offered; its steps are
/// kept where offered; its version must be between
/// [`MIN_PROTOCOL_VERSION`] and ours; its macro lists replace Postfix's
/// defaults stage by stage, and need the SETSYMLIST action.
pub fn negotiate(offer: &Offer, answer: &MilterOptions) -> Result<Agreement, MilterError> {
    negotiate_from(offer, answer, MacroLists::default())
}

/// [`negotiate`], with `base` (the operator's macro lists) in place of
/// Postfix's defaults where the filter does not send its own.
pub fn negotiate_from(offer: &Offer, answer: &MilterOptions, base: MacroLists) -> Result<Agreement, MilterError> {
    let conflict = || MilterError::VersionConflict { milter: answer.version, ours: offer.version };
    if answer.version > offer.version || answer.version < MIN_PROTOCOL_VERSION {
        return Err(conflict());
    }
    let version_steps = ProtocolSteps::of_version(answer.version).ok_or_else(conflict)?;
    let actions = Actions::from_bits(answer.actions)
        .filter(|a| offer.actions.contains(*a))
        .ok_or(MilterError::ActionsNotOffered { asked: answer.actions, offered: offer.actions.bits() })?;
    if !answer.macro_lists.is_empty() && !actions.contains(Actions::SETSYMLIST) {
        return Err(MilterError::SymlistNotNegotiated);
    }
    let mut macros = base;
    for (stage, names) in &answer.macro_lists {
        macros.set(*stage, names.clone());
    }
    Ok(Agreement {
        version: answer.version,
        actions,
        steps: ProtocolSteps::from_bits_truncate(answer.steps) & offer.steps,
        not_in_version: ProtocolSteps::NO_SEND.difference(version_steps),
        macros,
    })
}

impl Agreement {
    /// Whether the event of `stage` goes to the filter at all (its macros
    /// still do, as Postfix sends them).
    pub fn sends(&self, stage: Stage) -> bool {
        !self.steps.intersects(stage.no_send()) && !self.not_in_version.intersects(stage.no_send())
    }

    /// Whether the filter answers the event of `stage`.
    pub fn expects_reply(&self, stage: Stage) -> bool {
        !self.steps.intersects(stage.no_reply())
    }

    /// Refuses a reply whose action was not negotiated: a modification,
    /// or QUARANTINE, without its action (libmilter's rule: a filter can
    /// only ask for what it declared).
    pub fn permits(&self, reply: &Reply) -> Result<(), MilterError> {
        let needed = match reply {
            Reply::Modify(m) => m.action(),
            Reply::Quarantine(_) => Actions::QUARANTINE,
            _ => return Ok(()),
        };
        if self.actions.contains(needed) { Ok(()) } else { Err(MilterError::ActionNotNegotiated(reply.name())) }
    }
}

/// A custom reply (REPLYCODE): one code, an optional enhanced status
/// code, one or more lines of text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomReply {
    code: ReplyCode,
    status: Option<EnhancedStatus>,
    lines: Vec<String>,
}

impl CustomReply {
    /// `None` unless the code is 4xx/5xx, the status (if any) has the same
    /// class, there are 1 to [`MAX_REPLY_LINES`] lines, and each line is
    /// printable and short enough as sent (`%` doubled, a leading digit
    /// escaped).
    pub fn new(code: ReplyCode, status: Option<EnhancedStatus>, lines: Vec<String>) -> Option<Self> {
        let class = code.status_class().filter(|c| *c != StatusClass::Success)?;
        let ok = status.is_none_or(|s| s.class() == class)
            && (1..=MAX_REPLY_LINES).contains(&lines.len())
            && lines.iter().all(|l| printable(l) && Self::wire_line_len(status, l) <= MAX_REPLY_LINE);
        ok.then_some(Self { code, status, lines })
    }

    /// The length of `line` as sent: code, separator, status, `%`
    /// doubled, a leading digit escaped when there is no status.
    fn wire_line_len(status: Option<EnhancedStatus>, line: &str) -> usize {
        let escape = usize::from(status.is_none() && line.starts_with(|c: char| c.is_ascii_digit()));
        4 + status.map_or(0, |s| s.to_string().len() + 1) + escape + line.len() + line.matches('%').count()
    }

    pub fn code(&self) -> ReplyCode {
        self.code
    }

    pub fn status(&self) -> Option<EnhancedStatus> {
        self.status
    }

    pub fn lines(&self) -> &[String] {
        &self.lines
    }

    /// Parses the reply text as libmilter sends it: `ddd[-| ][x.y.z ]text`
    /// lines joined by CRLF, `%` escaping the next character.
    fn parse(text: &[u8]) -> Result<Self, MilterError> {
        let bad = |why: &str| {
            MilterError::BadReply(format!("{why}: {:?}", String::from_utf8_lossy(&text[..text.len().min(100)])))
        };
        let text = std::str::from_utf8(text).map_err(|_| bad("not UTF-8"))?;
        let raw: Vec<&str> = text.split("\r\n").collect();
        if raw.len() > MAX_REPLY_LINES {
            return Err(bad("too many lines"));
        }
        let (mut code, mut status, mut lines) = (None, None, Vec::new());
        for (i, line) in raw.iter().enumerate() {
            let last = i + 1 == raw.len();
            if line.len() > MAX_REPLY_LINE || !printable(line) {
                return Err(bad("line too long or not printable"));
            }
            let (Some(digits), Some(sep)) = (line.get(..3), line.as_bytes().get(3)) else {
                return Err(bad("line without a reply code"));
            };
            if *sep != if last { b' ' } else { b'-' } {
                return Err(bad("wrong separator after the reply code"));
            }
            let this: ReplyCode = digits.parse().map_err(|_| bad("not a reply code"))?;
            if !matches!(this.get() / 100, 4 | 5) || code.is_some_and(|c| c != this) {
                return Err(bad("reply code not 4xx/5xx or not the same on every line"));
            }
            code = Some(this);
            let rest = &line[4..];
            let (first_word, after) = rest.split_once(' ').unwrap_or((rest, ""));
            // Like Postfix, a text may start with a digit, but not with
            // one of another class than the code's.
            let this_status = match first_word.parse::<EnhancedStatus>() {
                Ok(s) if u16::from(s.class().digit()) == this.get() / 100 => Some(s),
                Ok(_) => return Err(bad("enhanced status class differs from the reply code")),
                Err(_) if rest.as_bytes().first().is_some_and(|d| d.is_ascii_digit() && *d != digits.as_bytes()[0]) => {
                    return Err(bad("enhanced status class differs from the reply code"));
                }
                Err(_) => None,
            };
            if i > 0 && this_status != status {
                return Err(bad("enhanced status code not the same on every line"));
            }
            status = this_status;
            let body = if this_status.is_some() { after } else { rest };
            lines.push(unescape_percent(body));
        }
        let code = code.ok_or_else(|| bad("empty"))?;
        // A line at the limit may not fit once re-sent (a leading digit
        // escaped): refused, so that what decodes can always be sent on.
        Self::new(code, status, lines).ok_or_else(|| bad("line too long"))
    }

    /// The text as it travels: `%` doubled, lines joined by CRLF.
    fn to_wire(&self) -> String {
        let mut s = String::new();
        for (i, line) in self.lines.iter().enumerate() {
            if i > 0 {
                s.push_str("\r\n");
            }
            let sep = if i + 1 == self.lines.len() { ' ' } else { '-' };
            s.push_str(&format!("{}{sep}", self.code));
            if let Some(st) = self.status {
                s.push_str(&format!("{st} "));
            }
            // A leading digit is escaped so that it cannot be read back
            // as an enhanced status code.
            if self.status.is_none() && line.starts_with(|c: char| c.is_ascii_digit()) {
                s.push('%');
            }
            s.push_str(&line.replace('%', "%%"));
        }
        s
    }
}

/// Sendmail takes a reply as a format string, so filters double `%`;
/// like Postfix, `%` keeps the character after it and is dropped.
fn unescape_percent(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '%' {
            out.extend(chars.next());
        } else {
            out.push(c);
        }
    }
    out
}

/// A change to the message a filter asks for at its end. Indexes are as
/// the filter sends them: CHGHEADER's counts headers of that name from 1
/// (0 taken as 1, as by Sendmail); INSHEADER's counts all headers from 0,
/// the top.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Modification {
    AddHeader {
        name: HeaderName,
        value: HeaderValue,
    },
    InsertHeader {
        index: u32,
        name: HeaderName,
        value: HeaderValue,
    },
    /// An empty value deletes the header.
    ChangeHeader {
        index: u32,
        name: HeaderName,
        value: HeaderValue,
    },
    /// One chunk of the new body; the chunks in order are the whole body.
    ReplaceBody(Vec<u8>),
    AddRecipient(MilterAddress),
    AddRecipientWithArgs {
        address: MilterAddress,
        args: EsmtpArgs,
    },
    DeleteRecipient(MilterAddress),
    ChangeSender {
        address: MilterAddress,
        args: EsmtpArgs,
    },
}

impl Modification {
    pub const fn name(&self) -> &'static str {
        match self {
            Modification::AddHeader { .. } => "SMFIR_ADDHEADER",
            Modification::InsertHeader { .. } => "SMFIR_INSHEADER",
            Modification::ChangeHeader { .. } => "SMFIR_CHGHEADER",
            Modification::ReplaceBody(_) => "SMFIR_REPLBODY",
            Modification::AddRecipient(_) => "SMFIR_ADDRCPT",
            Modification::AddRecipientWithArgs { .. } => "SMFIR_ADDRCPT_PAR",
            Modification::DeleteRecipient(_) => "SMFIR_DELRCPT",
            Modification::ChangeSender { .. } => "SMFIR_CHGFROM",
        }
    }

    /// The action that must have been negotiated.
    pub const fn action(&self) -> Actions {
        match self {
            Modification::AddHeader { .. } | Modification::InsertHeader { .. } => Actions::ADDHDRS,
            Modification::ChangeHeader { .. } => Actions::CHGHDRS,
            Modification::ReplaceBody(_) => Actions::CHGBODY,
            Modification::AddRecipient(_) => Actions::ADDRCPT,
            Modification::AddRecipientWithArgs { .. } => Actions::ADDRCPT_PAR,
            Modification::DeleteRecipient(_) => Actions::DELRCPT,
            Modification::ChangeSender { .. } => Actions::CHGFROM,
        }
    }
}

/// A header modification's kind, as [`place_header`] reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderOp {
    /// SMFIR_ADDHEADER.
    Add,
    /// SMFIR_INSHEADER at this index (0: the top).
    Insert(u32),
    /// SMFIR_CHGHEADER of this occurrence (from 1; 0 taken as 1).
    Change(u32),
}

/// Where a header modification lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    Append,
    Insert(usize),
    Replace(usize),
    Remove(usize),
    /// A deletion of a field that is not there.
    Nothing,
}

/// libmilter's placement rules, in one place for everyone who edits a
/// header section (cleanup, which applies the edits, and smtpd, which
/// shows the next milter the edited message): ADDHEADER appends;
/// INSHEADER inserts at its index, appending past the end; CHGHEADER
/// replaces the index-th field of that name (case-insensitive), removes
/// it when the value is empty, and when there are fewer fields of that
/// name adds one (smfi_chgheader), or does nothing for an empty value.
/// `names` are the section's field names, in order.
pub fn place_header<'a>(
    op: HeaderOp,
    name: &HeaderName,
    value_is_empty: bool,
    names: impl ExactSizeIterator<Item = &'a [u8]>,
) -> Placement {
    let len = names.len();
    match op {
        HeaderOp::Add => Placement::Append,
        HeaderOp::Insert(index) => {
            let at = index as usize;
            if at >= len { Placement::Append } else { Placement::Insert(at) }
        }
        HeaderOp::Change(index) => {
            let nth = index.max(1) as usize - 1;
            let found = names
                .enumerate()
                .filter(|(_, n)| n.eq_ignore_ascii_case(name.as_str().as_bytes()))
                .nth(nth)
                .map(|(i, _)| i);
            match (found, value_is_empty) {
                (Some(i), true) => Placement::Remove(i),
                (Some(i), false) => Placement::Replace(i),
                (None, true) => Placement::Nothing,
                (None, false) => Placement::Append,
            }
        }
    }
}

impl Modification {
    /// A header modification's kind, name and value; `None` for the others.
    pub fn header_op(&self) -> Option<(HeaderOp, &HeaderName, &HeaderValue)> {
        match self {
            Modification::AddHeader { name, value } => Some((HeaderOp::Add, name, value)),
            Modification::InsertHeader { index, name, value } => Some((HeaderOp::Insert(*index), name, value)),
            Modification::ChangeHeader { index, name, value } => Some((HeaderOp::Change(*index), name, value)),
            _ => None,
        }
    }
}

/// What a filter answers (`SMFIR_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Continue,
    Accept,
    Reject,
    Tempfail,
    Discard,
    /// 421: close the connection (Postfix's SHUTDOWN).
    Shutdown,
    ReplyCode(CustomReply),
    /// Put the message on hold, with the reason; not a decision: the final
    /// reply still follows.
    Quarantine(String),
    /// The filter is still working: restart the timer and read again.
    Progress,
    /// Send no more events of this kind (body chunks) for this message.
    Skip,
    Modify(Modification),
}

impl Reply {
    pub fn name(&self) -> &'static str {
        match self {
            Reply::Continue => "SMFIR_CONTINUE",
            Reply::Accept => "SMFIR_ACCEPT",
            Reply::Reject => "SMFIR_REJECT",
            Reply::Tempfail => "SMFIR_TEMPFAIL",
            Reply::Discard => "SMFIR_DISCARD",
            Reply::Shutdown => "SMFIR_SHUTDOWN",
            Reply::ReplyCode(_) => "SMFIR_REPLYCODE",
            Reply::Quarantine(_) => "SMFIR_QUARANTINE",
            Reply::Progress => "SMFIR_PROGRESS",
            Reply::Skip => "SMFIR_SKIP",
            Reply::Modify(m) => m.name(),
        }
    }

    /// Decodes one reply packet, strictly.
    pub fn decode(packet: Packet<'_>) -> Result<Self, MilterError> {
        let name = reply_name(packet.command).ok_or(MilterError::UnknownCommand(packet.command))?;
        let mut r = Reader::new(name, packet.payload);
        let reply = match packet.command {
            R_CONTINUE => Reply::Continue,
            R_ACCEPT => Reply::Accept,
            R_REJECT => Reply::Reject,
            R_TEMPFAIL => Reply::Tempfail,
            R_DISCARD => Reply::Discard,
            R_SHUTDOWN => Reply::Shutdown,
            R_PROGRESS => Reply::Progress,
            R_SKIP => Reply::Skip,
            R_REPLYCODE => {
                Reply::ReplyCode(CustomReply::parse(r.bytes0("reply text", MAX_REPLY_LINES * (MAX_REPLY_LINE + 2))?)?)
            }
            R_QUARANTINE => Reply::Quarantine(r.text("reason", MAX_REASON)?.to_owned()),
            R_ADDHEADER => {
                let (name, value) = r.header()?;
                Reply::Modify(Modification::AddHeader { name, value })
            }
            R_INSHEADER | R_CHGHEADER => {
                let index = r.u32("index")?;
                let (name, value) = r.header()?;
                Reply::Modify(if packet.command == R_INSHEADER {
                    Modification::InsertHeader { index, name, value }
                } else {
                    Modification::ChangeHeader { index, name, value }
                })
            }
            R_REPLBODY => Reply::Modify(Modification::ReplaceBody(r.rest("body chunk", MAX_BODY_CHUNK)?.to_vec())),
            R_ADDRCPT => Reply::Modify(Modification::AddRecipient(r.address("recipient")?)),
            R_DELRCPT => Reply::Modify(Modification::DeleteRecipient(r.address("recipient")?)),
            R_ADDRCPT_PAR | R_CHGFROM => {
                let address = r.address("address")?;
                let args = if r.is_empty() { EsmtpArgs::default() } else { r.esmtp_args()? };
                Reply::Modify(if packet.command == R_CHGFROM {
                    Modification::ChangeSender { address, args }
                } else {
                    Modification::AddRecipientWithArgs { address, args }
                })
            }
            other => return Err(MilterError::UnknownCommand(other)),
        };
        r.end()?;
        Ok(reply)
    }

    /// The packet a filter sends (for test filters, seeds and round trips).
    pub fn encode(&self, out: &mut Vec<u8>) {
        const VALID: &str = "a decoded or constructed value fits the wire";
        let mut p = Payload::new(self.name());
        let code = match self {
            Reply::Continue => R_CONTINUE,
            Reply::Accept => R_ACCEPT,
            Reply::Reject => R_REJECT,
            Reply::Tempfail => R_TEMPFAIL,
            Reply::Discard => R_DISCARD,
            Reply::Shutdown => R_SHUTDOWN,
            Reply::Progress => R_PROGRESS,
            Reply::Skip => R_SKIP,
            Reply::ReplyCode(c) => {
                p.string("reply text", &c.to_wire(), usize::MAX).expect(VALID);
                R_REPLYCODE
            }
            Reply::Quarantine(reason) => {
                p.string("reason", reason, MAX_REASON).expect(VALID);
                R_QUARANTINE
            }
            Reply::Modify(m) => match m {
                Modification::AddHeader { name, value } => {
                    p.header(name, value);
                    R_ADDHEADER
                }
                Modification::InsertHeader { index, name, value } => {
                    p.u32(*index);
                    p.header(name, value);
                    R_INSHEADER
                }
                Modification::ChangeHeader { index, name, value } => {
                    p.u32(*index);
                    p.header(name, value);
                    R_CHGHEADER
                }
                Modification::ReplaceBody(chunk) => {
                    p.raw(chunk);
                    R_REPLBODY
                }
                Modification::AddRecipient(a) => {
                    p.string("recipient", a.as_str(), MAX_ADDRESS).expect(VALID);
                    R_ADDRCPT
                }
                Modification::DeleteRecipient(a) => {
                    p.string("recipient", a.as_str(), MAX_ADDRESS).expect(VALID);
                    R_DELRCPT
                }
                Modification::AddRecipientWithArgs { address, args } | Modification::ChangeSender { address, args } => {
                    p.string("address", address.as_str(), MAX_ADDRESS).expect(VALID);
                    if !args.is_empty() {
                        p.string("ESMTP arguments", args.as_str(), MAX_ESMTP_ARGS).expect(VALID);
                    }
                    if matches!(m, Modification::ChangeSender { .. }) { R_CHGFROM } else { R_ADDRCPT_PAR }
                }
            },
        };
        p.finish(code, out);
    }
}

fn reply_name(code: u8) -> Option<&'static str> {
    Some(match code {
        R_CONTINUE => "SMFIR_CONTINUE",
        R_ACCEPT => "SMFIR_ACCEPT",
        R_REJECT => "SMFIR_REJECT",
        R_TEMPFAIL => "SMFIR_TEMPFAIL",
        R_DISCARD => "SMFIR_DISCARD",
        R_SHUTDOWN => "SMFIR_SHUTDOWN",
        R_REPLYCODE => "SMFIR_REPLYCODE",
        R_QUARANTINE => "SMFIR_QUARANTINE",
        R_PROGRESS => "SMFIR_PROGRESS",
        R_SKIP => "SMFIR_SKIP",
        R_ADDHEADER => "SMFIR_ADDHEADER",
        R_INSHEADER => "SMFIR_INSHEADER",
        R_CHGHEADER => "SMFIR_CHGHEADER",
        R_REPLBODY => "SMFIR_REPLBODY",
        R_ADDRCPT => "SMFIR_ADDRCPT",
        R_ADDRCPT_PAR => "SMFIR_ADDRCPT_PAR",
        R_DELRCPT => "SMFIR_DELRCPT",
        R_CHGFROM => "SMFIR_CHGFROM",
        _ => return None,
    })
}

/// One whole packet, borrowed from the decoder's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    pub command: u8,
    pub payload: &'a [u8],
}

/// Splits a byte stream into packets, incrementally: feed what the socket
/// gave, take whole packets until `None`.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Start of the first packet not yet taken.
    start: usize,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Whether no partial packet is buffered (a peer may close here).
    pub fn is_idle(&self) -> bool {
        self.start == self.buf.len()
    }

    /// [`MilterError::Truncated`] when the stream ended inside a packet.
    pub fn finish(&self) -> Result<(), MilterError> {
        if self.is_idle() { Ok(()) } else { Err(MilterError::Truncated) }
    }

    /// The next whole packet, `None` when more input is needed. The length
    /// is checked against [`MAX_PACKET_LEN`] as soon as it is read.
    pub fn next_packet(&mut self) -> Result<Option<Packet<'_>>, MilterError> {
        let input = &self.buf[self.start..];
        let Some(header) = input.first_chunk::<OCTETS_IN_LENGTH>() else { return Ok(None) };
        let len = u32::from_be_bytes(*header) as usize;
        if len == 0 {
            return Err(MilterError::EmptyPacket);
        }
        if len > MAX_PACKET_LEN {
            return Err(MilterError::Oversized { len, limit: MAX_PACKET_LEN });
        }
        let end = OCTETS_IN_LENGTH + len;
        if input.len() < end {
            return Ok(None);
        }
        let begin = self.start;
        self.start += end;
        let packet = &self.buf[begin + OCTETS_IN_LENGTH..begin + end];
        Ok(Some(Packet { command: packet[0], payload: &packet[1..] }))
    }

    /// The next whole reply.
    pub fn next_reply(&mut self) -> Result<Option<Reply>, MilterError> {
        self.next_packet()?.map(Reply::decode).transpose()
    }

    /// The filter's OPTNEG answer.
    pub fn next_options(&mut self) -> Result<Option<MilterOptions>, MilterError> {
        self.next_packet()?.map(MilterOptions::decode).transpose()
    }

    /// The next whole command (for test filters).
    pub fn next_command(&mut self) -> Result<Option<Command>, MilterError> {
        self.next_packet()?.map(Command::decode).transpose()
    }
}

/// Builds one packet's payload.
struct Payload {
    command: &'static str,
    buf: Vec<u8>,
    items: usize,
}

impl Payload {
    fn new(command: &'static str) -> Self {
        Self { command, buf: Vec::new(), items: 0 }
    }

    fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    fn octet(&mut self, v: u8) {
        self.buf.push(v);
    }

    fn raw(&mut self, v: &[u8]) {
        self.buf.extend_from_slice(v);
    }

    fn items(&mut self, n: usize) -> Result<(), MilterError> {
        self.items = n;
        if n > MAX_ITEMS {
            return Err(MilterError::TooManyItems { command: self.command, count: n, limit: MAX_ITEMS });
        }
        Ok(())
    }

    fn bytes0(&mut self, field: &'static str, v: &[u8], limit: usize) -> Result<(), MilterError> {
        if v.len() > limit {
            return Err(MilterError::TooLong { command: self.command, field, len: v.len(), limit });
        }
        if v.contains(&0) {
            return Err(MilterError::BadCharacter { command: self.command, field });
        }
        self.buf.extend_from_slice(v);
        self.buf.push(0);
        Ok(())
    }

    fn string(&mut self, field: &'static str, v: &str, limit: usize) -> Result<(), MilterError> {
        self.bytes0(field, v.as_bytes(), limit)
    }

    fn header(&mut self, name: &HeaderName, value: &HeaderValue) {
        self.buf.extend_from_slice(name.as_str().as_bytes());
        self.buf.push(0);
        self.buf.extend_from_slice(value.as_bytes());
        self.buf.push(0);
    }

    /// Appends the packet; a payload that does not fit [`MAX_PACKET_LEN`]
    /// cannot be built from values within their limits.
    fn finish(self, code: u8, out: &mut Vec<u8>) {
        let len = u32::try_from(self.buf.len() + 1).expect("payloads are bounded far below 4 GiB");
        out.extend_from_slice(&len.to_be_bytes());
        out.push(code);
        out.extend_from_slice(&self.buf);
    }
}

/// Reads one packet's payload, strictly.
struct Reader<'a> {
    command: &'static str,
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(command: &'static str, payload: &'a [u8]) -> Self {
        Self { command, rest: payload }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn take<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], MilterError> {
        let (head, rest) =
            self.rest.split_first_chunk::<N>().ok_or(MilterError::TruncatedPayload { command: self.command, field })?;
        self.rest = rest;
        Ok(*head)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, MilterError> {
        self.take::<4>(field).map(u32::from_be_bytes)
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, MilterError> {
        self.take::<2>(field).map(u16::from_be_bytes)
    }

    fn octet(&mut self, field: &'static str) -> Result<u8, MilterError> {
        self.take::<1>(field).map(|[b]| b)
    }

    /// Octets up to a NUL, which is consumed.
    fn bytes0(&mut self, field: &'static str, limit: usize) -> Result<&'a [u8], MilterError> {
        let nul = self
            .rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(MilterError::TruncatedPayload { command: self.command, field })?;
        if nul > limit {
            return Err(MilterError::TooLong { command: self.command, field, len: nul, limit });
        }
        let v = &self.rest[..nul];
        self.rest = &self.rest[nul + 1..];
        Ok(v)
    }

    fn string(&mut self, field: &'static str, limit: usize) -> Result<&'a str, MilterError> {
        let command = self.command;
        std::str::from_utf8(self.bytes0(field, limit)?).map_err(|_| MilterError::NotUtf8 { command, field })
    }

    /// A string without control characters.
    fn text(&mut self, field: &'static str, limit: usize) -> Result<&'a str, MilterError> {
        let s = self.string(field, limit)?;
        if printable(s) { Ok(s) } else { Err(MilterError::BadCharacter { command: self.command, field }) }
    }

    fn address(&mut self, field: &'static str) -> Result<MilterAddress, MilterError> {
        let s = self.text(field, MAX_ADDRESS)?;
        MilterAddress::new(s).ok_or(MilterError::BadCharacter { command: self.command, field })
    }

    fn esmtp_args(&mut self) -> Result<EsmtpArgs, MilterError> {
        let s = self.text("ESMTP arguments", MAX_ESMTP_ARGS)?;
        Ok(EsmtpArgs::new(s).expect("checked by text()"))
    }

    fn header(&mut self) -> Result<(HeaderName, HeaderValue), MilterError> {
        let command = self.command;
        let raw = self.bytes0("header name", MAX_HEADER_NAME)?;
        let name = std::str::from_utf8(raw).ok().and_then(HeaderName::new).ok_or_else(|| {
            MilterError::BadHeaderName { command, name: String::from_utf8_lossy(raw).chars().take(80).collect() }
        })?;
        let value = HeaderValue::new(self.bytes0("header value", MAX_HEADER_VALUE)?)
            .ok_or(MilterError::BadHeaderValue { command })?;
        Ok((name, value))
    }

    /// The rest of the payload, as one field.
    fn rest(&mut self, field: &'static str, limit: usize) -> Result<&'a [u8], MilterError> {
        if self.rest.len() > limit {
            return Err(MilterError::TooLong { command: self.command, field, len: self.rest.len(), limit });
        }
        Ok(std::mem::take(&mut self.rest))
    }

    fn end(&self) -> Result<(), MilterError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(MilterError::TrailingBytes { command: self.command, left: self.rest.len() })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One packet: length, command, payload.
    fn packet(command: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = u32::try_from(payload.len() + 1).unwrap().to_be_bytes().to_vec();
        out.push(command);
        out.extend_from_slice(payload);
        out
    }

    fn decode_reply(bytes: &[u8]) -> Result<Reply, MilterError> {
        let mut d = Decoder::new();
        d.feed(bytes);
        let reply = d.next_reply()?.expect("a whole packet");
        d.finish()?;
        Ok(reply)
    }

    fn name(n: &str) -> HeaderName {
        HeaderName::new(n).unwrap()
    }

    fn value(v: &str) -> HeaderValue {
        HeaderValue::new(v.as_bytes()).unwrap()
    }

    fn addr(a: &str) -> MilterAddress {
        MilterAddress::new(a).unwrap()
    }

    #[test]
    fn every_reply_decodes_from_hand_written_bytes() {
        let cases: Vec<(Vec<u8>, Reply)> = vec![
            (packet(b'c', b""), Reply::Continue),
            (packet(b'a', b""), Reply::Accept),
            (packet(b'r', b""), Reply::Reject),
            (packet(b't', b""), Reply::Tempfail),
            (packet(b'd', b""), Reply::Discard),
            (packet(b'4', b""), Reply::Shutdown),
            (packet(b'p', b""), Reply::Progress),
            (packet(b's', b""), Reply::Skip),
            (packet(b'q', b"virus found\0"), Reply::Quarantine("virus found".into())),
            (
                packet(b'y', b"554 5.7.1 Gtube pattern\0"),
                Reply::ReplyCode(
                    CustomReply::new(
                        ReplyCode::of(554),
                        Some(EnhancedStatus::new(StatusClass::Permanent, 7, 1)),
                        vec!["Gtube pattern".into()],
                    )
                    .unwrap(),
                ),
            ),
            (
                packet(b'y', b"451-4.7.1 Greylisted\r\n451 4.7.1 try 100%% later\0"),
                Reply::ReplyCode(
                    CustomReply::new(
                        ReplyCode::of(451),
                        Some(EnhancedStatus::new(StatusClass::Persistent, 7, 1)),
                        vec!["Greylisted".into(), "try 100% later".into()],
                    )
                    .unwrap(),
                ),
            ),
            (
                packet(b'y', b"550 no status here\0"),
                Reply::ReplyCode(CustomReply::new(ReplyCode::of(550), None, vec!["no status here".into()]).unwrap()),
            ),
            (
                packet(b'h', b"X-Spam\0Yes\0"),
                Reply::Modify(Modification::AddHeader { name: name("X-Spam"), value: value("Yes") }),
            ),
            (
                packet(b'i', b"\0\0\0\0DKIM-Signature\0v=1;\r\n\tb=abc\0"),
                Reply::Modify(Modification::InsertHeader {
                    index: 0,
                    name: name("DKIM-Signature"),
                    value: value("v=1;\r\n\tb=abc"),
                }),
            ),
            (
                packet(b'm', b"\0\0\0\x02Subject\0\0"),
                Reply::Modify(Modification::ChangeHeader { index: 2, name: name("Subject"), value: value("") }),
            ),
            (packet(b'b', b"new body\r\n"), Reply::Modify(Modification::ReplaceBody(b"new body\r\n".to_vec()))),
            (packet(b'+', b"<b@example.test>\0"), Reply::Modify(Modification::AddRecipient(addr("<b@example.test>")))),
            (
                packet(b'2', b"<c@example.test>\0NOTIFY=NEVER\0"),
                Reply::Modify(Modification::AddRecipientWithArgs {
                    address: addr("<c@example.test>"),
                    args: EsmtpArgs::new("NOTIFY=NEVER").unwrap(),
                }),
            ),
            (
                packet(b'2', b"<c@example.test>\0"),
                Reply::Modify(Modification::AddRecipientWithArgs {
                    address: addr("<c@example.test>"),
                    args: EsmtpArgs::default(),
                }),
            ),
            (
                packet(b'-', b"<d@example.test>\0"),
                Reply::Modify(Modification::DeleteRecipient(addr("<d@example.test>"))),
            ),
            (
                packet(b'e', b"<new@example.test>\0SIZE=100\0"),
                Reply::Modify(Modification::ChangeSender {
                    address: addr("<new@example.test>"),
                    args: EsmtpArgs::new("SIZE=100").unwrap(),
                }),
            ),
            (
                packet(b'e', b"<>\0"),
                Reply::Modify(Modification::ChangeSender { address: addr("<>"), args: EsmtpArgs::default() }),
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(decode_reply(&bytes), Ok(want.clone()), "{bytes:?}");
            let mut again = Vec::new();
            want.encode(&mut again);
            assert_eq!(decode_reply(&again), Ok(want), "encode/decode round trip");
        }
    }

    #[test]
    fn packets_arrive_in_any_pieces() {
        let mut wire = packet(b'h', b"X-A\0one\0");
        wire.extend(packet(b'p', b""));
        wire.extend(packet(b'a', b""));
        let mut d = Decoder::new();
        let mut got = Vec::new();
        for byte in &wire {
            d.feed(std::slice::from_ref(byte));
            while let Some(r) = d.next_reply().unwrap() {
                got.push(r);
            }
        }
        assert!(d.is_idle());
        assert_eq!(
            got,
            vec![
                Reply::Modify(Modification::AddHeader { name: name("X-A"), value: value("one") }),
                Reply::Progress,
                Reply::Accept
            ]
        );
        let mut d = Decoder::new();
        d.feed(&wire[..3]);
        assert_eq!(d.next_reply(), Ok(None));
        assert_eq!(d.finish(), Err(MilterError::Truncated));
    }

    #[test]
    fn framing_errors() {
        let mut d = Decoder::new();
        d.feed(&u32::try_from(MAX_PACKET_LEN + 1).unwrap().to_be_bytes());
        assert_eq!(d.next_packet(), Err(MilterError::Oversized { len: MAX_PACKET_LEN + 1, limit: MAX_PACKET_LEN }));
        let mut d = Decoder::new();
        d.feed(&[0, 0, 0, 0]);
        assert_eq!(d.next_packet(), Err(MilterError::EmptyPacket));
        assert_eq!(decode_reply(&packet(b'Z', b"")), Err(MilterError::UnknownCommand(b'Z')));
        // A whole packet, but its payload ends inside a field.
        assert_eq!(
            decode_reply(&packet(b'h', b"X-A\0no nul")),
            Err(MilterError::TruncatedPayload { command: "SMFIR_ADDHEADER", field: "header value" })
        );
        assert_eq!(
            decode_reply(&packet(b'i', b"\0\0")),
            Err(MilterError::TruncatedPayload { command: "SMFIR_INSHEADER", field: "index" })
        );
        assert_eq!(
            decode_reply(&packet(b'c', b"x")),
            Err(MilterError::TrailingBytes { command: "SMFIR_CONTINUE", left: 1 })
        );
        assert_eq!(
            decode_reply(&packet(b'+', b"<a@b>\0<c@d>\0")),
            Err(MilterError::TrailingBytes { command: "SMFIR_ADDRCPT", left: 6 })
        );
        let big = vec![b'x'; MAX_BODY_CHUNK + 1];
        assert_eq!(
            decode_reply(&packet(b'b', &big)),
            Err(MilterError::TooLong {
                command: "SMFIR_REPLBODY",
                field: "body chunk",
                len: MAX_BODY_CHUNK + 1,
                limit: MAX_BODY_CHUNK
            })
        );
        let long = [vec![b'a'; MAX_ADDRESS + 1], vec![0]].concat();
        assert!(matches!(decode_reply(&packet(b'-', &long)), Err(MilterError::TooLong { field: "recipient", .. })));
    }

    #[test]
    fn bad_reply_codes_and_texts_are_refused() {
        for text in [
            &b"250 2.0.0 fine\0"[..],
            b"354 go on\0",
            b"55 short\0",
            b"550\0",
            b"550-5.7.1 no final line\0",
            b"550-5.7.1 a\r\n451 4.7.1 b\0",
            b"550 4.7.1 class differs\0",
            b"550 4 digit of another class\0",
            b"550 5.7.1 a\r\n\0",
            b"550-5.7.1 a\r\n550 5.7.2 b\0",
            b"550 text with \x07 bell\0",
            b"550 text\nbare newline\0",
            b"550 \xff not utf-8\0",
            b"550 no nul",
            b"550 two\0nuls\0",
        ] {
            assert!(decode_reply(&packet(b'y', text)).is_err(), "{:?}", String::from_utf8_lossy(text));
        }
        let many: Vec<String> = (0..=MAX_REPLY_LINES).map(|_| "550-x".to_owned()).collect();
        let text = format!("{}\r\n550 end\0", many.join("\r\n"));
        assert!(matches!(decode_reply(&packet(b'y', text.as_bytes())), Err(MilterError::BadReply(_))));
        assert_eq!(CustomReply::new(ReplyCode::of(250), None, vec!["x".into()]), None);
        assert_eq!(
            CustomReply::new(
                ReplyCode::of(550),
                Some(EnhancedStatus::new(StatusClass::Persistent, 7, 1)),
                vec!["x".into()]
            ),
            None
        );
        // Text starting with a digit or holding `%` survives the trip.
        let odd = CustomReply::new(ReplyCode::of(550), None, vec!["5.7.1 is not a status here %".into()]).unwrap();
        let mut wire = Vec::new();
        Reply::ReplyCode(odd.clone()).encode(&mut wire);
        assert_eq!(decode_reply(&wire), Ok(Reply::ReplyCode(odd)));
    }

    #[test]
    fn header_names_values_and_addresses_are_checked() {
        for bad in [&b"\0v\0"[..], b"Sub ject\0v\0", b"Subject:\0v\0", b"Subj\xc3\xa9\0v\0"] {
            assert!(
                matches!(decode_reply(&packet(b'h', bad)), Err(MilterError::BadHeaderName { .. })),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        for bad in [&b"X\0a\nb\0"[..], b"X\0a\rb\0", b"X\0a\r\n\0", b"X\0a\n\0"] {
            assert_eq!(
                decode_reply(&packet(b'h', bad)),
                Err(MilterError::BadHeaderValue { command: "SMFIR_ADDHEADER" }),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(HeaderValue::new(b"8bit \xe4 ok\n folded").is_some());
        assert!(matches!(decode_reply(&packet(b'+', b"\0")), Err(MilterError::BadCharacter { .. })));
        assert!(matches!(decode_reply(&packet(b'+', b"<a\x1b@b>\0")), Err(MilterError::BadCharacter { .. })));
        assert!(matches!(decode_reply(&packet(b'e', b"<a@b>\0A\tB\0")), Err(MilterError::BadCharacter { .. })));
        assert!(matches!(decode_reply(&packet(b'q', b"why\r\0")), Err(MilterError::BadCharacter { .. })));
    }

    #[test]
    fn commands_round_trip() {
        let commands = vec![
            Command::OptNeg(Offer::default()),
            Command::Macro {
                stage: Stage::Connect,
                macros: vec![(MacroName::new("j").unwrap(), "mx.example.test".into())],
            },
            Command::Connect(Connect {
                hostname: "client.example.test".into(),
                address: ClientAddress::Inet("192.0.2.1:40000".parse().unwrap()),
            }),
            Command::Connect(Connect {
                hostname: "[2001:db8::1]".into(),
                address: ClientAddress::Inet6("[2001:db8::1]:25".parse().unwrap()),
            }),
            Command::Connect(Connect { hostname: "localhost".into(), address: ClientAddress::Unix("/run/s".into()) }),
            Command::Connect(Connect { hostname: "localhost".into(), address: ClientAddress::Unknown }),
            Command::Helo("client.example.test".into()),
            Command::Mail(EnvelopeArgs {
                address: addr("<a@example.test>"),
                params: vec!["SIZE=10".into(), "BODY=8BITMIME".into()],
            }),
            Command::Rcpt(EnvelopeArgs { address: addr("<b@example.test>"), params: vec![] }),
            Command::Data,
            Command::Header { name: name("Subject"), value: value("hello") },
            Command::EndOfHeaders,
            Command::Body(b"hi\r\n".to_vec()),
            Command::EndOfMessage,
            Command::Abort,
            Command::Quit,
            Command::QuitNewConnection,
            Command::Unknown("XFOO bar".into()),
        ];
        let mut wire = Vec::new();
        for c in &commands {
            c.encode(&mut wire).unwrap();
        }
        let mut d = Decoder::new();
        d.feed(&wire);
        let mut got = Vec::new();
        while let Some(c) = d.next_command().unwrap() {
            got.push(c);
        }
        assert_eq!(got, commands);
    }

    #[test]
    fn command_wire_format_is_libmilters() {
        let mut out = Vec::new();
        Command::OptNeg(Offer::default()).encode(&mut out).unwrap();
        assert_eq!(out, packet(b'O', &[0, 0, 0, 6, 0, 0, 1, 0xff, 0, 0x1f, 0xff, 0xff]));
        out.clear();
        Command::Connect(Connect {
            hostname: "[192.0.2.1]".into(),
            address: ClientAddress::Inet("192.0.2.1:25".parse().unwrap()),
        })
        .encode(&mut out)
        .unwrap();
        assert_eq!(out, packet(b'C', b"[192.0.2.1]\x004\x00\x19192.0.2.1\0"));
        out.clear();
        Command::Connect(Connect { hostname: "h".into(), address: ClientAddress::Unknown }).encode(&mut out).unwrap();
        assert_eq!(out, packet(b'C', b"h\0U"));
        out.clear();
        let macros = MacroLists::default()
            .command(Stage::Mail, |n| match n.as_str() {
                "i" => Some("QID".into()),
                "{mail_addr}" => Some("a@example.test".into()),
                _ => None,
            })
            .unwrap();
        macros.encode(&mut out).unwrap();
        assert_eq!(out, packet(b'D', b"Mi\0QID\0{mail_addr}\0a@example.test\0"));
        assert_eq!(MacroLists::default().command(Stage::Body, |_| Some("x".into())), None);
        assert_eq!(Connect::hostname_for(Some("unknown"), "192.0.2.1".parse().unwrap()), "[192.0.2.1]");
    }

    #[test]
    fn values_the_wire_cannot_carry_are_refused_by_the_encoder() {
        let mut out = Vec::new();
        assert!(matches!(Command::Helo("a\0b".into()).encode(&mut out), Err(MilterError::BadCharacter { .. })));
        let chunk = vec![0u8; MAX_BODY_CHUNK + 1];
        assert!(matches!(Command::Body(chunk.clone()).encode(&mut out), Err(MilterError::TooLong { .. })));
        assert!(out.is_empty());
        let chunks: Vec<Command> = Command::body_chunks(&chunk).collect();
        assert_eq!(chunks.len(), 2);
        assert!(chunks.iter().all(|c| c.encode(&mut out).is_ok()));
    }

    fn answer(version: u32, actions: Actions, steps: ProtocolSteps) -> MilterOptions {
        MilterOptions { version, actions: actions.bits(), steps: steps.bits(), macro_lists: Vec::new() }
    }

    #[test]
    fn negotiation_keeps_what_both_sides_want() {
        let offer = Offer {
            version: 6,
            actions: Actions::ADDHDRS | Actions::CHGHDRS | Actions::QUARANTINE,
            steps: ProtocolSteps::ALL.difference(ProtocolSteps::NR_BODY),
        };
        let a = negotiate(
            &offer,
            &MilterOptions {
                steps: (ProtocolSteps::NOUNKNOWN | ProtocolSteps::NR_HDR | ProtocolSteps::NR_BODY).bits() | 1 << 28,
                ..answer(6, Actions::ADDHDRS, ProtocolSteps::empty())
            },
        )
        .unwrap();
        assert_eq!(a.actions, Actions::ADDHDRS);
        // Not offered (NR_BODY) and unknown (MDS_256K) steps are dropped.
        assert_eq!(a.steps, ProtocolSteps::NOUNKNOWN | ProtocolSteps::NR_HDR);
        assert!(a.sends(Stage::Header) && !a.expects_reply(Stage::Header));
        assert!(!a.sends(Stage::Unknown) && a.sends(Stage::Body) && a.expects_reply(Stage::Body));
        assert_eq!(a.not_in_version, ProtocolSteps::empty());
        assert_eq!(a.macros, MacroLists::default());
        let add = Reply::Modify(Modification::AddHeader { name: name("X"), value: value("y") });
        assert_eq!(a.permits(&add), Ok(()));
        let del = Reply::Modify(Modification::DeleteRecipient(addr("<a@b>")));
        assert_eq!(a.permits(&del), Err(MilterError::ActionNotNegotiated("SMFIR_DELRCPT")));
        assert_eq!(
            a.permits(&Reply::Quarantine("x".into())),
            Err(MilterError::ActionNotNegotiated("SMFIR_QUARANTINE"))
        );
        assert_eq!(a.permits(&Reply::Accept), Ok(()));
    }

    #[test]
    fn negotiation_errors() {
        let offer = Offer { actions: Actions::ADDHDRS, ..Offer::default() };
        assert_eq!(
            negotiate(&offer, &answer(6, Actions::ADDHDRS | Actions::DELRCPT, ProtocolSteps::empty())),
            Err(MilterError::ActionsNotOffered { asked: 0x9, offered: 0x1 })
        );
        assert_eq!(
            negotiate(
                &offer,
                &MilterOptions { actions: 1 << 20, ..answer(6, Actions::empty(), ProtocolSteps::empty()) }
            ),
            Err(MilterError::ActionsNotOffered { asked: 1 << 20, offered: 0x1 })
        );
        for v in [7, 1, 0] {
            assert_eq!(
                negotiate(&offer, &answer(v, Actions::empty(), ProtocolSteps::empty())),
                Err(MilterError::VersionConflict { milter: v, ours: 6 })
            );
        }
        let lists = MilterOptions {
            macro_lists: vec![(Stage::Mail, vec![MacroName::new("{auth_type}").unwrap()])],
            ..answer(6, Actions::ADDHDRS, ProtocolSteps::empty())
        };
        assert_eq!(negotiate(&offer, &lists), Err(MilterError::SymlistNotNegotiated));
    }

    #[test]
    fn an_older_filter_is_not_sent_what_its_version_lacks() {
        let a = negotiate(&Offer::default(), &answer(2, Actions::ADDHDRS, ProtocolSteps::empty())).unwrap();
        assert_eq!(a.not_in_version, ProtocolSteps::NOUNKNOWN | ProtocolSteps::NODATA);
        assert!(!a.sends(Stage::Data) && !a.sends(Stage::Unknown) && a.sends(Stage::Rcpt));
    }

    #[test]
    fn optneg_answer_with_macro_lists() {
        let mut payload = Vec::new();
        for n in [6u32, 0x1ff, 0x4000_0000 | ProtocolSteps::NR_HDR.bits()] {
            payload.extend(n.to_be_bytes());
        }
        payload.extend(2u32.to_be_bytes());
        payload.extend(b"{auth_type} i\0");
        payload.extend(6u32.to_be_bytes());
        payload.extend(b"\0");
        let mut d = Decoder::new();
        d.feed(&packet(b'O', &payload));
        let options = d.next_options().unwrap().unwrap();
        assert_eq!(
            options.macro_lists,
            vec![
                (Stage::Mail, vec![MacroName::new("{auth_type}").unwrap(), MacroName::new("i").unwrap()]),
                (Stage::EndOfHeaders, vec![])
            ]
        );
        let mut again = Vec::new();
        options.encode(&mut again);
        assert_eq!(again, packet(b'O', &payload));
        let a = negotiate(&Offer::default(), &options).unwrap();
        assert_eq!(a.macros.names(Stage::Mail), [MacroName::new("{auth_type}").unwrap(), MacroName::new("i").unwrap()]);
        assert_eq!(a.macros.names(Stage::Header), []);
        assert_eq!(a.macros.names(Stage::Rcpt).len(), 4, "the other stages keep Postfix's defaults");
        assert_eq!(a.steps, ProtocolSteps::NR_HDR);

        let with = |stage: u32, list: &[u8]| {
            let mut p = [6u32, 0x100, 0].iter().flat_map(|n| n.to_be_bytes()).collect::<Vec<u8>>();
            p.extend(stage.to_be_bytes());
            p.extend(list);
            MilterOptions::decode(Packet { command: b'O', payload: &p })
        };
        assert_eq!(with(7, b"i\0"), Err(MilterError::UnknownMacroStage(7)));
        assert_eq!(with(0, b"{bad name}\0"), Err(MilterError::BadMacroName("{bad".into())));
        assert_eq!(with(0, b"i"), Err(MilterError::TruncatedPayload { command: "SMFIC_OPTNEG", field: "macro list" }));
        assert_eq!(with(0, b"i\0\0\0\0\0j\0"), Err(MilterError::DuplicateMacroStage(0)));
        assert!(matches!(MilterOptions::decode(Packet { command: b'c', payload: b"" }), Err(MilterError::BadReply(_))));
        assert_eq!(
            MilterOptions::decode(Packet { command: b'O', payload: &[0, 0, 0, 6, 0] }),
            Err(MilterError::TruncatedPayload { command: "SMFIC_OPTNEG", field: "actions" })
        );
    }

    #[test]
    fn default_macros_are_postfixs() {
        let lists = MacroLists::default();
        let names = |s| lists.names(s).iter().map(MacroName::as_str).collect::<Vec<_>>().join(" ");
        assert_eq!(names(Stage::Connect), "j {daemon_name} {daemon_addr} v _");
        assert_eq!(names(Stage::Helo), "{tls_version} {cipher} {cipher_bits} {cert_subject} {cert_issuer}");
        assert_eq!(
            names(Stage::Mail),
            "i {auth_type} {auth_authen} {auth_author} {mail_addr} {mail_host} {mail_mailer}"
        );
        assert_eq!(names(Stage::Rcpt), "i {rcpt_addr} {rcpt_host} {rcpt_mailer}");
        assert_eq!(
            (names(Stage::Data), names(Stage::EndOfHeaders), names(Stage::EndOfMessage)),
            ("i".into(), "i".into(), "i".into())
        );
        assert_eq!(names(Stage::Unknown), "");
        for bad in ["", "{}", "{a b}", "ab", " ", "{x", "{x}y"] {
            assert!(MacroName::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn flag_sets_know_their_bits() {
        assert_eq!(Actions::ALL.bits(), 0x1ff);
        assert_eq!(ProtocolSteps::ALL.bits(), 0x1f_ffff);
        assert_eq!(ProtocolSteps::of_version(6), Some(ProtocolSteps::ALL));
        assert_eq!(Actions::from_bits(0x200), None);
        assert_eq!(format!("{:?}", Actions::ADDHDRS | Actions::CHGFROM), "ADDHDRS|CHGFROM");
        assert_eq!(format!("{:?}", ProtocolSteps::empty()), "(none)");
    }
}
