//! AUTH (RFC 4954), as the session sees it: which listener offers it, the
//! `334` dialogue with the client, and what a login changes afterwards.
//! The password check itself is the authentication server's (Dovecot's):
//! the session emits [`Action::AuthStart`] and [`Action::AuthContinue`]
//! with the client's base64 data, and the driver reports the server's
//! answer ([`Session::auth_answer`]). smtpd never decodes, logs or keeps
//! that data: [`SaslData`] hides it from `Debug`, and it lives only as
//! long as the action that carries it.
//!
//! Offered only under TLS (Postfix `smtpd_tls_auth_only = yes`, RFC 4954
//! 4 and RFC 8314): on a submission listener, before STARTTLS, AUTH and
//! MAIL get `530 5.7.0 Must issue a STARTTLS command first`, and MAIL
//! without a login gets `530 5.7.0 Authentication required`. A failed
//! AUTH is an error towards `hard_error_limit`, logged as Postfix does
//! (`warning: unknown[ip]: SASL PLAIN authentication failed: ...`, the
//! line fail2ban's postfix-sasl filter matches).

use super::command::{Verb, is_base64};
use super::line::Line;
use super::reply::{self, Reply};
use super::{Action, Phase, Session};
use mortal_proto::envelope::SaslLogin;
use std::fmt;

/// The mechanisms offered: the two every client has, which send the
/// password itself, hence TLS only. Dovecot still decides whether it
/// supports each.
pub const MECHANISMS: [&str; 2] = ["PLAIN", "LOGIN"];

pub const AUTH_OK: Reply = Reply::new(235, 7, 0, "Authentication successful");
pub const MUST_STARTTLS: Reply = Reply::new(530, 7, 0, "Must issue a STARTTLS command first");
pub const AUTH_REQUIRED: Reply = Reply::new(530, 7, 0, "Authentication required");
pub const ALREADY_AUTHENTICATED: Reply = Reply::new(503, 5, 1, "Error: already authenticated");
pub const UNSUPPORTED_MECHANISM: Reply = Reply::new(504, 5, 4, "Unsupported authentication mechanism");
pub const ABORTED: Reply = Reply::new(501, 7, 0, "Authentication aborted");
pub const CANNOT_DECODE: Reply = Reply::new(501, 5, 2, "Cannot decode response");
pub const RESPONSE_TOO_LONG: Reply = Reply::new(500, 5, 6, "Authentication Exchange line is too long");
pub const TEMPORARY_FAILURE: Reply = Reply::new(454, 7, 0, "Temporary authentication failure");

/// What a failed AUTH tells the client and the log when the server gave
/// no usable reason.
const GENERIC_FAILURE: &str = "authentication failure";
/// Longest server reason passed on to the client and the log.
const MAX_REASON: usize = 100;

/// A client's SASL data (base64, possibly holding a password). `Debug`
/// never shows it, so no log or panic message can.
#[derive(Clone, PartialEq, Eq)]
pub struct SaslData(String);

impl SaslData {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SaslData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SaslData(<{} octets>)", self.0.len())
    }
}

/// The authentication server's answer, as the driver reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthAnswer {
    /// Another round: this base64 challenge goes to the client in a `334`.
    Challenge(String),
    /// The client is `username`.
    Success { username: String },
    /// Wrong credentials. `reason` is the server's, if it gave one;
    /// `over_limit` is the client's failure count once it passed `[smtpd.auth]
    /// failure_limit` (then the session ends with 421).
    Failure { reason: Option<String>, over_limit: Option<u32> },
    /// The server could not be asked or could not decide (down, timed
    /// out, a temporary failure): `454 4.7.0`, try again later.
    Unavailable,
    /// The client already has this many failures, past `failure_limit`:
    /// the server was not asked, and the session ends with 421.
    Blocked(u32),
}

impl Session {
    /// Whether AUTH is on offer now: configured for this listener, under
    /// TLS, and not done yet.
    pub(super) fn auth_offered(&self) -> bool {
        self.tls.is_some() && self.login.is_none() && self.config.smtpd.auth.offered_on(self.role)
    }

    /// The EHLO keyword advertising AUTH, when it is on offer.
    pub(super) fn auth_keyword(&self) -> Option<String> {
        self.auth_offered().then(|| format!("AUTH {}", MECHANISMS.join(" ")))
    }

    /// Who the client logged in as, if it did.
    pub fn login(&self) -> Option<&SaslLogin> {
        self.login.as_ref()
    }

    /// `AUTH mechanism [initial-response]`.
    pub(super) fn auth(&mut self, mechanism: &str, initial: Option<&str>) {
        if !self.config.smtpd.auth.offered_on(self.role) {
            return self.fail(Verb::Auth, &reply::NOT_IMPLEMENTED);
        }
        if self.tls.is_none() {
            return self.fail(Verb::Auth, &MUST_STARTTLS);
        }
        if self.helo.is_none() {
            return self.fail(Verb::Auth, &reply::NEED_HELO);
        }
        if self.login.is_some() {
            return self.fail(Verb::Auth, &ALREADY_AUTHENTICATED);
        }
        if self.txn.is_some() {
            return self.fail(Verb::Auth, &reply::TRANSACTION_IN_PROGRESS);
        }
        let mechanism = mechanism.to_ascii_uppercase();
        if !MECHANISMS.contains(&mechanism.as_str()) {
            return self.fail(Verb::Auth, &UNSUPPORTED_MECHANISM);
        }
        // RFC 4954 4: `=` is an initial response of zero length.
        let initial = initial.map(|r| SaslData(if r == "=" { String::new() } else { r.to_owned() }));
        self.actions.push_back(Action::AuthStart { mechanism: mechanism.clone(), initial });
        self.phase = Phase::Authenticating { mechanism };
    }

    /// The authentication server answered the outstanding
    /// [`Action::AuthStart`] or [`Action::AuthContinue`].
    ///
    /// # Panics
    /// If neither is outstanding (a driver bug).
    pub fn auth_answer(&mut self, answer: AuthAnswer) {
        let Phase::Authenticating { mechanism } = std::mem::replace(&mut self.phase, Phase::Command) else {
            panic!("auth_answer without an outstanding AuthStart or AuthContinue");
        };
        match answer {
            AuthAnswer::Challenge(challenge) => {
                self.actions.push_back(Action::Reply(format!("334 {challenge}\r\n")));
                self.phase = Phase::AuthResponse { mechanism };
            }
            AuthAnswer::Success { username } => {
                self.login = Some(SaslLogin { method: mechanism, username });
                self.succeed(Verb::Auth, &AUTH_OK);
            }
            AuthAnswer::Failure { reason, over_limit } => {
                let reason = reason
                    .filter(|r| {
                        !r.is_empty() && r.len() <= MAX_REASON && r.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
                    })
                    .unwrap_or_else(|| GENERIC_FAILURE.to_owned());
                self.log(format!("warning: {}: SASL {mechanism} authentication failed: {reason}", self.client));
                match over_limit {
                    Some(count) => self.too_many_failures(count),
                    None => {
                        let text = format!("Error: authentication failed: {reason}");
                        self.fail(Verb::Auth, &const { Reply::new(535, 7, 8, "") }.with_text(text));
                    }
                }
            }
            AuthAnswer::Blocked(count) => self.too_many_failures(count),
            AuthAnswer::Unavailable => {
                self.log(format!(
                    "warning: {}: SASL {mechanism} authentication failed: Connection lost to authentication server",
                    self.client
                ));
                self.fail(Verb::Auth, &TEMPORARY_FAILURE);
            }
        }
        self.process();
    }

    /// Past `failure_limit`: the limit's warning, 421, and the end.
    fn too_many_failures(&mut self, count: u32) {
        self.log(format!(
            "warning: AUTH failure limit exceeded: {count} from {} for service {}",
            self.client,
            self.role.name()
        ));
        self.stats.count(Verb::Auth, false);
        let text = format!("{} Error: too many failed AUTH attempts", self.config.server.hostname);
        self.reply(&const { Reply::new(421, 7, 0, "") }.with_text(text));
        self.close();
    }

    /// The client's response to a `334` challenge; false when no complete
    /// line is buffered. The line may be longer than a command line, up
    /// to `[smtpd.auth] response_limit`.
    pub(super) fn next_auth_response(&mut self) -> bool {
        let limit = self.config.smtpd.auth.response_limit + 2;
        let (line, used) = self.lines.next_within(&self.input[self.pos..], limit);
        self.pos += used;
        let Some(line) = line else { return false };
        let Phase::AuthResponse { mechanism } = std::mem::replace(&mut self.phase, Phase::Command) else {
            unreachable!("next_auth_response outside AuthResponse");
        };
        let refusal = match &line {
            Line::Text(bytes) if bytes == b"*" => Some(ABORTED),
            Line::Text(bytes) => match std::str::from_utf8(bytes) {
                Ok(text) if is_base64(text) => {
                    self.actions.push_back(Action::AuthContinue(SaslData(text.to_owned())));
                    self.phase = Phase::Authenticating { mechanism };
                    None
                }
                _ => Some(CANNOT_DECODE),
            },
            Line::TooLong => Some(RESPONSE_TOO_LONG),
            Line::BareLf | Line::BareCr => Some(CANNOT_DECODE),
        };
        if let Some(refusal) = refusal {
            self.actions.push_back(Action::AuthCancel);
            self.fail(Verb::Auth, &refusal);
        }
        true
    }
}
