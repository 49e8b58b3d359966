//! Postfix's policy delegation protocol (SMTPD_POLICY_README), as a
//! sans-I/O codec: the query smtpd sends a policy server (postgrey,
//! policyd-spf, any `check_policy_service` server) and the action it
//! answers.
//!
//! A query is `name=value` lines ending with an empty line; the reply is
//! the same shape and must carry `action=`; a connection carries one query
//! after another. [`Query`] holds the attributes Postfix sends, typed, and
//! [`Query::encode`] writes all of them, in Postfix's order, with an empty
//! value where nothing is known, because servers written against Postfix
//! read them by name and expect each to be present. No value can break
//! the framing: a line break or NUL in a value (a client's HELO name, a
//! certificate subject) is written as `?`, as nothing but text of one
//! line belongs there.
//!
//! [`ReplyDecoder`] takes the server's bytes as they come and gives the
//! [`Action`] once the empty line arrived; it bounds the line length, the
//! number of attributes and the whole reply, insists on printable UTF-8,
//! and refuses a reply without `action`. [`Action::parse`] reads the
//! action as access(5) defines it (`OK`, `DUNNO`, `REJECT text`, `DEFER
//! text`, `DEFER_IF_REJECT`, `DEFER_IF_PERMIT`, `4NN text`, `5NN text`,
//! `PREPEND header: value`, `HOLD`, `DISCARD`, `WARN`, `INFO`), and keeps
//! what mortal does not carry out (`FILTER`, `REDIRECT`, `BCC`,
//! restriction class names) as [`Action::Unsupported`] for the caller to
//! log and answer with its default.

use crate::milter::HeaderName;
use crate::queue_id::QueueId;
use crate::smtp_status::{EnhancedStatus, ReplyClass, ReplyCode};
use std::fmt::{self, Write as _};
use std::net::IpAddr;
use thiserror::Error;

/// Longest reply line the decoder takes, newline excluded. A policy reply
/// is one `action=` line with at most an SMTP reply's text (512 octets
/// with its code), plus a few attributes some servers add.
pub const MAX_LINE: usize = 2048;
/// Most attributes in one reply.
pub const MAX_ATTRIBUTES: usize = 32;
/// Longest text an action may carry to the client (an SMTP reply line is
/// 512 octets with its code and CRLF: RFC 5321 4.5.3.1.5).
pub const MAX_TEXT: usize = 500;

/// The SMTP stage a query is made at (`protocol_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Connect,
    Helo,
    Ehlo,
    Mail,
    Rcpt,
    Data,
    EndOfMessage,
    Vrfy,
    Etrn,
}

impl Stage {
    /// The `protocol_state` value, as Postfix sends it.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Connect => "CONNECT",
            Stage::Helo => "HELO",
            Stage::Ehlo => "EHLO",
            Stage::Mail => "MAIL",
            Stage::Rcpt => "RCPT",
            Stage::Data => "DATA",
            Stage::EndOfMessage => "END-OF-MESSAGE",
            Stage::Vrfy => "VRFY",
            Stage::Etrn => "ETRN",
        }
    }
}

/// TLS facts about the client's session, when it has one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFacts {
    /// `encryption_protocol`: `TLSv1.3`.
    pub protocol: String,
    /// `encryption_cipher`.
    pub cipher: String,
    /// `encryption_keysize`.
    pub keysize: u32,
    /// `ccert_subject`, `ccert_issuer`, `ccert_fingerprint`,
    /// `ccert_pubkey_fingerprint`: empty without a verified client
    /// certificate.
    pub ccert_subject: String,
    pub ccert_issuer: String,
    pub ccert_fingerprint: String,
    pub ccert_pubkey_fingerprint: String,
}

/// What the client authenticated as, when it did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SaslFacts {
    /// `sasl_method`: `PLAIN`.
    pub method: String,
    /// `sasl_username`.
    pub username: String,
    /// `sasl_sender`: the MAIL FROM AUTH= parameter.
    pub sender: String,
}

/// One policy query: everything Postfix's smtpd tells a policy server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub stage: Stage,
    /// `protocol_name`: `SMTP` or `ESMTP`.
    pub protocol_name: String,
    pub helo_name: String,
    /// Once a recipient was accepted: Postfix sends the queue id from then.
    pub queue_id: Option<QueueId>,
    /// The envelope sender without brackets; empty for `<>` and before MAIL.
    pub sender: String,
    /// The recipient of this RCPT; empty at other stages.
    pub recipient: String,
    /// Recipients accepted so far (Postfix counts them from DATA on; 0
    /// before).
    pub recipient_count: u32,
    pub client_address: IpAddr,
    pub client_port: u16,
    /// The verified client host name, `unknown` when there is none.
    pub client_name: String,
    /// The name the client's address maps to, verified or not; `unknown`.
    pub reverse_client_name: String,
    /// The same value for every query about one message (postgrey keys
    /// nothing on it, but policyd-spf and rate limiters do).
    pub instance: String,
    /// The SIZE parameter or, at END-OF-MESSAGE, the message size; 0 when
    /// unknown.
    pub size: u64,
    /// The domain of an ETRN; empty otherwise.
    pub etrn_domain: String,
    /// `stress=yes` when the server is overloaded.
    pub stress: bool,
    pub sasl: SaslFacts,
    pub tls: Option<TlsFacts>,
    /// The address and port the client connected to.
    pub server_address: IpAddr,
    pub server_port: u16,
    /// `policy_context`: the operator's label for this check.
    pub policy_context: String,
}

impl Query {
    /// The query as the server reads it: every attribute Postfix sends,
    /// in its order, then the empty line.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = String::with_capacity(1024);
        let tls = self.tls.clone().unwrap_or_default();
        let keysize = if self.tls.is_some() { tls.keysize.to_string() } else { "0".to_owned() };
        let fields: [(&str, &dyn fmt::Display); 29] = [
            ("request", &"smtpd_access_policy"),
            ("protocol_state", &self.stage.name()),
            ("protocol_name", &self.protocol_name),
            ("helo_name", &self.helo_name),
            ("queue_id", &self.queue_id.as_ref().map_or("", QueueId::as_str)),
            ("sender", &self.sender),
            ("recipient", &self.recipient),
            ("recipient_count", &self.recipient_count),
            ("client_address", &self.client_address),
            ("client_name", &self.client_name),
            ("reverse_client_name", &self.reverse_client_name),
            ("instance", &self.instance),
            ("sasl_method", &self.sasl.method),
            ("sasl_username", &self.sasl.username),
            ("sasl_sender", &self.sasl.sender),
            ("size", &self.size),
            ("ccert_subject", &tls.ccert_subject),
            ("ccert_issuer", &tls.ccert_issuer),
            ("ccert_fingerprint", &tls.ccert_fingerprint),
            ("ccert_pubkey_fingerprint", &tls.ccert_pubkey_fingerprint),
            ("encryption_protocol", &tls.protocol),
            ("encryption_cipher", &tls.cipher),
            ("encryption_keysize", &keysize),
            ("etrn_domain", &self.etrn_domain),
            ("stress", &if self.stress { "yes" } else { "" }),
            ("client_port", &self.client_port),
            ("policy_context", &self.policy_context),
            ("server_address", &self.server_address),
            ("server_port", &self.server_port),
        ];
        let mut value = String::new();
        for (name, v) in fields {
            value.clear();
            let _ = write!(value, "{v}");
            out.push_str(name);
            out.push('=');
            out.extend(value.chars().map(|c| if matches!(c, '\n' | '\r' | '\0') { '?' } else { c }));
            out.push('\n');
        }
        out.push('\n');
        out.into_bytes()
    }
}

/// Why a reply was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PolicyError {
    #[error("reply line longer than {MAX_LINE} octets")]
    LineTooLong,
    #[error("more than {MAX_ATTRIBUTES} attributes in a reply")]
    TooManyAttributes,
    #[error("reply line without '=': {0:?}")]
    NotAnAttribute(String),
    #[error("reply is not printable UTF-8 text")]
    NotText,
    #[error("reply without an action attribute")]
    NoAction,
    #[error("bytes after the end of the reply")]
    TrailingData,
    #[error("empty action")]
    EmptyAction,
    #[error("action {verb} needs a text")]
    MissingText { verb: &'static str },
    #[error("action text longer than {MAX_TEXT} octets")]
    TextTooLong,
    #[error("bad reply code in action {0:?}")]
    BadCode(String),
}

/// What the policy server decided, as access(5) defines the actions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `OK`: this check permits.
    Ok,
    /// `DUNNO`: no opinion; the next check decides.
    Dunno,
    /// `REJECT [text]`: refuse with the configured reject code.
    Reject(Option<String>),
    /// `DEFER [text]`: refuse temporarily with the configured defer code.
    Defer(Option<String>),
    /// `DEFER_IF_REJECT [text]`: defer, if a later check would reject.
    DeferIfReject(Option<String>),
    /// `DEFER_IF_PERMIT [text]`: defer, if a later check would permit.
    DeferIfPermit(Option<String>),
    /// `4NN text` or `5NN text`: this exact reply (the text may start with
    /// an enhanced status code).
    Reply { code: ReplyCode, status: Option<EnhancedStatus>, text: String },
    /// `PREPEND header: value`: a header line to add to the message.
    Prepend(String),
    /// `HOLD [text]`: accept, and keep the message in the hold queue.
    Hold(Option<String>),
    /// `DISCARD [text]`: accept, and drop the message.
    Discard(Option<String>),
    /// `WARN text`: log a warning, no opinion.
    Warn(String),
    /// `INFO text`: log an informational line, no opinion.
    Info(String),
    /// An action mortal does not carry out (`FILTER`, `REDIRECT`, `BCC`,
    /// a restriction class or a restriction name): the caller logs it
    /// and applies its default.
    Unsupported(String),
}

impl Action {
    /// Reads one `action=` value. Verbs are case-insensitive, as in
    /// Postfix; the text is what follows the verb and white space.
    pub fn parse(value: &str) -> Result<Action, PolicyError> {
        let value = value.trim();
        if value.is_empty() {
            return Err(PolicyError::EmptyAction);
        }
        let (verb, rest) = match value.find(|c: char| c.is_ascii_whitespace()) {
            Some(i) => (&value[..i], value[i..].trim_start()),
            None => (value, ""),
        };
        let text = |rest: &str| -> Result<Option<String>, PolicyError> {
            match rest {
                "" => Ok(None),
                t if t.len() > MAX_TEXT => Err(PolicyError::TextTooLong),
                t => Ok(Some(t.to_owned())),
            }
        };
        let needed = |verb: &'static str, rest: &str| -> Result<String, PolicyError> {
            text(rest)?.ok_or(PolicyError::MissingText { verb })
        };
        let upper = verb.to_ascii_uppercase();
        Ok(match upper.as_str() {
            "OK" => Action::Ok,
            "DUNNO" => Action::Dunno,
            "REJECT" => Action::Reject(text(rest)?),
            "DEFER" => Action::Defer(text(rest)?),
            "DEFER_IF_REJECT" => Action::DeferIfReject(text(rest)?),
            "DEFER_IF_PERMIT" => Action::DeferIfPermit(text(rest)?),
            "HOLD" => Action::Hold(text(rest)?),
            "DISCARD" => Action::Discard(text(rest)?),
            "WARN" => Action::Warn(needed("WARN", rest)?),
            "INFO" => Action::Info(needed("INFO", rest)?),
            "PREPEND" => Action::Prepend(prepend(rest)?),
            _ if verb.len() == 3 && verb.bytes().all(|b| b.is_ascii_digit()) => reply(verb, rest)?,
            // A bare number that is no reply code, or any word we do not know:
            // Postfix would take it as a restriction or class name.
            _ => Action::Unsupported(value[..value.floor_char_boundary(MAX_TEXT)].to_owned()),
        })
    }
}

/// `4NN text` / `5NN text`; the text is required, as access(5) says.
fn reply(verb: &str, rest: &str) -> Result<Action, PolicyError> {
    let code: ReplyCode = verb.parse().map_err(|_| PolicyError::BadCode(verb.to_owned()))?;
    if !matches!(code.class(), ReplyClass::TransientNegative | ReplyClass::PermanentNegative) {
        return Err(PolicyError::BadCode(verb.to_owned()));
    }
    if rest.is_empty() {
        return Err(PolicyError::MissingText { verb: "4NN/5NN" });
    }
    if rest.len() > MAX_TEXT {
        return Err(PolicyError::TextTooLong);
    }
    // An enhanced code of the reply's class starts the text, if given.
    let (first, after) = match rest.find(|c: char| c.is_ascii_whitespace()) {
        Some(i) => (&rest[..i], rest[i..].trim_start()),
        None => (rest, ""),
    };
    match first.parse::<EnhancedStatus>() {
        Ok(status) if Some(status.class()) == code.status_class() => {
            Ok(Action::Reply { code, status: Some(status), text: after.to_owned() })
        }
        Ok(_) => Err(PolicyError::BadCode(format!("{verb} {first}"))),
        Err(_) => Ok(Action::Reply { code, status: None, text: rest.to_owned() }),
    }
}

/// `PREPEND name: value` with an RFC 5322 field name.
fn prepend(rest: &str) -> Result<String, PolicyError> {
    if rest.len() > MAX_TEXT {
        return Err(PolicyError::TextTooLong);
    }
    let Some((name, _)) = rest.split_once(':') else {
        return Err(PolicyError::MissingText { verb: "PREPEND" });
    };
    if HeaderName::new(name).is_none() {
        return Err(PolicyError::MissingText { verb: "PREPEND" });
    }
    Ok(rest.to_owned())
}

/// Reads replies from a policy server, as the bytes arrive.
#[derive(Debug, Default)]
pub struct ReplyDecoder {
    line: Vec<u8>,
    action: Option<String>,
    attributes: usize,
    done: bool,
    /// Bytes came after the reply's end in the same feed.
    trailing: bool,
}

impl ReplyDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes more bytes; returns the action once the reply's empty line
    /// arrived. The server may send nothing more before the next query:
    /// bytes after the reply in the same feed leave the action valid but
    /// set [`ReplyDecoder::has_trailing`], and a feed after the reply is
    /// an error, so the caller uses the answer and drops the connection.
    /// After a reply, [`ReplyDecoder::reset`] readies the decoder for the
    /// next one.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<Action>, PolicyError> {
        if self.done && !bytes.is_empty() {
            return Err(PolicyError::TrailingData);
        }
        for (i, &b) in bytes.iter().enumerate() {
            if b != b'\n' {
                if self.line.len() >= MAX_LINE {
                    return Err(PolicyError::LineTooLong);
                }
                self.line.push(b);
                continue;
            }
            let line = std::mem::take(&mut self.line);
            let line = line.strip_suffix(b"\r").unwrap_or(&line);
            if line.is_empty() {
                let value = self.action.take().ok_or(PolicyError::NoAction)?;
                self.done = true;
                // Bytes the server sent unasked: the reply stands, the
                // connection is out of step (see `has_trailing`).
                self.trailing = i + 1 < bytes.len();
                return Action::parse(&value).map(Some);
            }
            self.attributes += 1;
            if self.attributes > MAX_ATTRIBUTES {
                return Err(PolicyError::TooManyAttributes);
            }
            let text = std::str::from_utf8(line).map_err(|_| PolicyError::NotText)?;
            if text.chars().any(char::is_control) {
                return Err(PolicyError::NotText);
            }
            let Some((name, value)) = text.split_once('=') else {
                return Err(PolicyError::NotAnAttribute(text.chars().take(64).collect()));
            };
            // Other attributes are allowed and ignored, as Postfix does.
            if name == "action" {
                self.action = Some(value.to_owned());
            }
        }
        Ok(None)
    }

    /// Whether bytes followed the last reply in the feed that ended it:
    /// the connection is out of step and must not carry another query.
    pub fn has_trailing(&self) -> bool {
        self.trailing
    }

    /// Whether a reply has begun and not ended (a connection closing now
    /// lost it).
    pub fn is_partial(&self) -> bool {
        !self.done && (!self.line.is_empty() || self.attributes > 0)
    }

    /// Readies the decoder for the next reply on the same connection.
    pub fn reset(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp_status::StatusClass;
    use std::net::Ipv4Addr;

    fn query() -> Query {
        Query {
            stage: Stage::Rcpt,
            protocol_name: "ESMTP".into(),
            helo_name: "mail.example.test".into(),
            queue_id: None,
            sender: "a@example.test".into(),
            recipient: "b@example.test".into(),
            recipient_count: 0,
            client_address: Ipv4Addr::new(192, 0, 2, 1).into(),
            client_port: 40000,
            client_name: "unknown".into(),
            reverse_client_name: "unknown".into(),
            instance: "1a2b.3c4d.0".into(),
            size: 1234,
            etrn_domain: String::new(),
            stress: false,
            sasl: SaslFacts::default(),
            tls: None,
            server_address: Ipv4Addr::LOCALHOST.into(),
            server_port: 25,
            policy_context: String::new(),
        }
    }

    #[test]
    fn query_carries_every_attribute_in_postfix_order() {
        let text = String::from_utf8(query().encode()).unwrap();
        assert!(text.starts_with(
            "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\nhelo_name=mail.example.test\nqueue_id=\nsender=a@example.test\nrecipient=b@example.test\nrecipient_count=0\nclient_address=192.0.2.1\nclient_name=unknown\nreverse_client_name=unknown\ninstance=1a2b.3c4d.0\n"
        ), "{text}");
        assert!(
            text.ends_with("client_port=40000\npolicy_context=\nserver_address=127.0.0.1\nserver_port=25\n\n"),
            "{text}"
        );
        assert!(text.contains("\nencryption_keysize=0\n") && text.contains("\nstress=\n"), "{text}");
        assert_eq!(text.matches('\n').count(), 30, "{text}");
    }

    #[test]
    fn no_value_can_break_the_framing() {
        let mut q = query();
        q.helo_name = "evil\nrecipient=x@y\r\n\n".into();
        q.tls = Some(TlsFacts { ccert_subject: "CN=a\0b".into(), keysize: 256, ..TlsFacts::default() });
        q.queue_id = Some("0000000010000100000A".parse().unwrap());
        let text = String::from_utf8(q.encode()).unwrap();
        assert!(text.contains("\nhelo_name=evil?recipient=x@y???\n"), "{text}");
        assert!(text.contains("\nccert_subject=CN=a?b\n") && text.contains("\nencryption_keysize=256\n"), "{text}");
        assert!(text.contains("\nqueue_id=0000000010000100000A\n"), "{text}");
        assert_eq!(text.matches("recipient=").count(), 2, "only recipient= and the neutralised HELO: {text}");
        assert_eq!(text.find("\n\n"), Some(text.len() - 2));
    }

    #[test]
    fn actions_read_as_access5_defines_them() {
        let es = |s: &str| s.parse::<EnhancedStatus>().unwrap();
        let cases: Vec<(&str, Action)> = vec![
            ("OK", Action::Ok),
            ("dunno", Action::Dunno),
            ("REJECT", Action::Reject(None)),
            ("reject go away", Action::Reject(Some("go away".into()))),
            (
                "DEFER_IF_PERMIT Greylisted, see http://postgrey.schweikert.ch/help/example.test.html",
                Action::DeferIfPermit(Some(
                    "Greylisted, see http://postgrey.schweikert.ch/help/example.test.html".into(),
                )),
            ),
            ("DEFER_IF_REJECT", Action::DeferIfReject(None)),
            ("DEFER try later", Action::Defer(Some("try later".into()))),
            (
                "450 4.2.0 Greylisted",
                Action::Reply { code: ReplyCode::of(450), status: Some(es("4.2.0")), text: "Greylisted".into() },
            ),
            ("554 no", Action::Reply { code: ReplyCode::of(554), status: None, text: "no".into() }),
            ("PREPEND X-Greylist: delayed 300 seconds", Action::Prepend("X-Greylist: delayed 300 seconds".into())),
            ("HOLD", Action::Hold(None)),
            ("DISCARD spam", Action::Discard(Some("spam".into()))),
            ("WARN odd client", Action::Warn("odd client".into())),
            ("INFO seen", Action::Info("seen".into())),
            ("FILTER smtp:[127.0.0.1]:10025", Action::Unsupported("FILTER smtp:[127.0.0.1]:10025".into())),
            ("REDIRECT a@b.test", Action::Unsupported("REDIRECT a@b.test".into())),
            ("reject_unauth_destination", Action::Unsupported("reject_unauth_destination".into())),
            ("  OK  ", Action::Ok),
        ];
        for (value, want) in cases {
            assert_eq!(Action::parse(value), Ok(want), "{value}");
        }
        let errors: Vec<(&str, PolicyError)> = vec![
            ("", PolicyError::EmptyAction),
            ("250 fine", PolicyError::BadCode("250".into())),
            ("354 go on", PolicyError::BadCode("354".into())),
            ("450", PolicyError::MissingText { verb: "4NN/5NN" }),
            ("550 4.7.1 class mismatch", PolicyError::BadCode("550 4.7.1".into())),
            ("WARN", PolicyError::MissingText { verb: "WARN" }),
            ("PREPEND no colon", PolicyError::MissingText { verb: "PREPEND" }),
            ("PREPEND bad name: x", PolicyError::MissingText { verb: "PREPEND" }),
        ];
        for (value, want) in errors {
            assert_eq!(Action::parse(value), Err(want), "{value}");
        }
        let long = format!("REJECT {}", "x".repeat(MAX_TEXT + 1));
        assert_eq!(Action::parse(&long), Err(PolicyError::TextTooLong));
        // What is not carried out is kept for the log, cut to MAX_TEXT
        // octets on a character boundary (found by the fuzzer).
        let Ok(Action::Unsupported(kept)) = Action::parse(&"é".repeat(MAX_TEXT)) else { panic!() };
        assert_eq!((kept.len(), kept.chars().count()), (MAX_TEXT, MAX_TEXT / 2));
        assert_eq!(ReplyCode::of(450).status_class(), Some(StatusClass::Persistent));
    }

    #[test]
    fn replies_are_decoded_across_reads_and_one_at_a_time() {
        let reply = b"action=DEFER_IF_PERMIT Greylisted\nother=ignored\n\n";
        for split in 0..=reply.len() {
            let mut d = ReplyDecoder::new();
            let first = d.feed(&reply[..split]).unwrap();
            let second = d.feed(&reply[split..]).unwrap();
            let got = first.or(second);
            assert_eq!(got, Some(Action::DeferIfPermit(Some("Greylisted".into()))), "split {split}");
        }
        let mut d = ReplyDecoder::new();
        assert_eq!(d.feed(b"action=dunno\r\n\r\n").unwrap(), Some(Action::Dunno));
        assert_eq!(d.feed(b"x"), Err(PolicyError::TrailingData));
        d.reset();
        assert!(!d.is_partial());
        assert_eq!(d.feed(b"action=OK\n").unwrap(), None);
        assert!(d.is_partial());
        assert_eq!(d.feed(b"\n").unwrap(), Some(Action::Ok));
        assert!(!d.has_trailing());
        // Bytes after the reply: the answer stands, the connection is out
        // of step, and any further feed is refused.
        let mut d = ReplyDecoder::new();
        assert_eq!(d.feed(b"action=OK\n\nextra").unwrap(), Some(Action::Ok));
        assert!(d.has_trailing());
        assert_eq!(d.feed(b"more"), Err(PolicyError::TrailingData));
    }

    #[test]
    fn bad_replies_are_refused() {
        let cases: Vec<(Vec<u8>, PolicyError)> = vec![
            (b"\n".to_vec(), PolicyError::NoAction),
            (b"foo=bar\n\n".to_vec(), PolicyError::NoAction),
            (b"just text\n".to_vec(), PolicyError::NotAnAttribute("just text".into())),
            (b"action=\xff\n".to_vec(), PolicyError::NotText),
            (b"action=a\tb\n".to_vec(), PolicyError::NotText),
            (vec![b'a'; MAX_LINE + 1], PolicyError::LineTooLong),
            ("x=1\n".repeat(MAX_ATTRIBUTES + 1).into_bytes(), PolicyError::TooManyAttributes),
            (b"action=\n\n".to_vec(), PolicyError::EmptyAction),
        ];
        for (bytes, want) in cases {
            assert_eq!(ReplyDecoder::new().feed(&bytes), Err(want), "{:?}", String::from_utf8_lossy(&bytes));
        }
    }
}
