//! `[smtpd.auth]` and `[smtpd.submission]`: SMTP AUTH (RFC 4954) through
//! Dovecot's authentication service (Postfix `smtpd_sasl_type = dovecot`,
//! `smtpd_sasl_path`, `smtpd_tls_auth_only`, `smtpd_sasl_authenticated_header`,
//! `smtpd_sender_login_maps`), and the restriction lists of the submission
//! listeners (`submission_listen`, port 587; `submissions_listen`, port
//! 465), which master.cf overrides with `-o smtpd_*_restrictions=...` in
//! Postfix.

use super::{NextHop, Resolver, Restrictions, raw};
use crate::table::TableSpec;
use std::time::Duration;

/// Longest wait for each answer of Dovecot's auth service (Postfix has no
/// separate setting; its `ipc_timeout` is 3600 s, far too long for a
/// client waiting on a password check).
pub const DEFAULT_AUTH_TIMEOUT: Duration = Duration::from_secs(30);
/// Failed AUTH commands one client may make per `[anvil] rate_time_unit`
/// before AUTH is refused and the session ended; 0: no limit.
pub const DEFAULT_AUTH_FAILURE_LIMIT: u32 = 10;
/// Messages (MAIL) one login may send per `[anvil] rate_time_unit`,
/// wherever it connects from: far above what a person sends, far below
/// what a stolen password is bought for.
pub const DEFAULT_USER_MESSAGE_RATE_LIMIT: u32 = 100;
/// Recipients one login may give per `[anvil] rate_time_unit`.
pub const DEFAULT_USER_RECIPIENT_RATE_LIMIT: u32 = 1000;
/// Longest base64 text one AUTH response line may carry: Postfix's
/// `smtpd_sasl_response_limit` is 12288 octets.
pub const DEFAULT_AUTH_RESPONSE_LIMIT: usize = 12_288;

/// What a listening address is for: the role of the smtpd children that
/// wait on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ListenerRole {
    /// `listen` and `proxy_listen`: mail from the Internet (port 25).
    /// AUTH only when `[smtpd.auth] mx = true`, and only under TLS.
    Mx,
    /// `submission_listen` (port 587, RFC 6409): STARTTLS, then AUTH,
    /// before any MAIL (Postfix `smtpd_tls_security_level = encrypt` and
    /// `smtpd_tls_auth_only = yes`).
    Submission,
    /// `submissions_listen` (port 465, RFC 8314): TLS from the first
    /// octet, then AUTH before any MAIL.
    Submissions,
}

impl ListenerRole {
    /// The name in log lines and `mortal status` (Postfix's master.cf
    /// service names).
    pub fn name(self) -> &'static str {
        match self {
            ListenerRole::Mx => "smtp",
            ListenerRole::Submission => "submission",
            ListenerRole::Submissions => "submissions",
        }
    }

    /// Whether the role takes mail only from authenticated clients.
    pub fn is_submission(self) -> bool {
        self != ListenerRole::Mx
    }
}

/// `[smtpd.auth]`: where Dovecot's authentication service listens and
/// how AUTH behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    /// Dovecot's auth socket (`service auth { unix_listener ... }`), or
    /// its `inet_listener`; `None`: no AUTH anywhere.
    pub server: Option<NextHop>,
    /// Longest wait for each of Dovecot's answers.
    pub timeout: Duration,
    /// Offer AUTH on the `listen` (port 25) addresses too, under TLS only
    /// (off by default: an MX has no users to authenticate).
    pub mx: bool,
    /// Record the login in `Received:` as `(Authenticated sender: NAME)`
    /// (Postfix `smtpd_sasl_authenticated_header`; off: privacy).
    pub authenticated_header: bool,
    /// Failed AUTH commands per client per `[anvil] rate_time_unit`; past
    /// it AUTH gets `421 4.7.0` and the session ends. 0: no limit.
    pub failure_limit: u32,
    /// Longest base64 response line a client may send during AUTH.
    pub response_limit: usize,
    /// Postfix `smtpd_sender_login_maps`: sender address (or `@domain`)
    /// to the logins that may use it, for `reject_sender_login_mismatch`.
    pub sender_login_maps: Vec<TableSpec>,
    /// Messages per login per `[anvil] rate_time_unit`; more get `450
    /// 4.7.1` at MAIL. 0: no limit.
    pub user_message_rate_limit: u32,
    /// Recipients per login per `[anvil] rate_time_unit`; more get `450
    /// 4.7.1` at RCPT. 0: no limit.
    pub user_recipient_rate_limit: u32,
}

impl Default for Auth {
    fn default() -> Self {
        Self {
            server: None,
            timeout: DEFAULT_AUTH_TIMEOUT,
            mx: false,
            authenticated_header: false,
            failure_limit: DEFAULT_AUTH_FAILURE_LIMIT,
            response_limit: DEFAULT_AUTH_RESPONSE_LIMIT,
            sender_login_maps: Vec::new(),
            user_message_rate_limit: DEFAULT_USER_MESSAGE_RATE_LIMIT,
            user_recipient_rate_limit: DEFAULT_USER_RECIPIENT_RATE_LIMIT,
        }
    }
}

impl Auth {
    /// Whether AUTH is offered to the children of a listener of `role`.
    pub fn offered_on(&self, role: ListenerRole) -> bool {
        self.server.is_some() && (role.is_submission() || self.mx)
    }
}

/// `[smtpd.submission]`: what differs on the submission listeners.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Submission {
    /// `[smtpd.submission.restrictions]`: the lists there, in place of
    /// `[smtpd.restrictions]` (empty by default: AUTH before MAIL is
    /// already required, and the DNS lists of an MX do not apply to
    /// one's own users).
    pub restrictions: Restrictions,
}

impl Resolver<'_> {
    pub(super) fn auth(&mut self, raw: raw::Auth) -> Auth {
        let d = Auth::default();
        let server = raw.server.map(|s| self.endpoint("smtpd.auth.server", s));
        Auth {
            server,
            timeout: self.duration("smtpd.auth.timeout", raw.timeout, d.timeout),
            mx: raw.mx.unwrap_or(d.mx),
            authenticated_header: raw.authenticated_header.unwrap_or(d.authenticated_header),
            failure_limit: raw.failure_limit.unwrap_or(d.failure_limit),
            response_limit: raw.response_limit.unwrap_or(d.response_limit),
            sender_login_maps: self.tables("smtpd.auth.sender_login_maps", raw.sender_login_maps),
            user_message_rate_limit: raw.user_message_rate_limit.unwrap_or(d.user_message_rate_limit),
            user_recipient_rate_limit: raw.user_recipient_rate_limit.unwrap_or(d.user_recipient_rate_limit),
        }
    }

    pub(super) fn submission(&mut self, raw: raw::Submission) -> Submission {
        Submission { restrictions: self.restrictions(raw.restrictions, "smtpd.submission.restrictions") }
    }

    /// What the listeners need of `[smtpd.auth]` and TLS.
    pub(super) fn auth_rules(&mut self, smtpd: &super::Smtpd) {
        let mut bad = |section: &str, key: &str, message: String| {
            self.problems.push((section.into(), key.into(), message));
        };
        let has_cert = smtpd.tls_cert_file.is_some() && smtpd.tls_key_file.is_some();
        for (key, list) in
            [("submission_listen", &smtpd.submission_listen), ("submissions_listen", &smtpd.submissions_listen)]
        {
            if list.is_empty() {
                continue;
            }
            if smtpd.auth.server.is_none() {
                bad("smtpd.auth", "server", format!("must name Dovecot's auth socket when smtpd.{key} is set"));
            }
            if !has_cert {
                bad("smtpd", key, "needs tls_cert_file and tls_key_file: AUTH is offered only under TLS".into());
            }
            if smtpd.tls_security == super::TlsSecurity::None {
                bad("smtpd", key, "needs TLS, but tls_security = \"none\"".into());
            }
            let all = smtpd.listen.iter().chain(&smtpd.proxy_listen);
            if let Some(addr) = list.iter().find(|a| all.clone().any(|b| b == *a)) {
                bad("smtpd", key, format!("{addr} is also another listener's address"));
            }
            if list.iter().any(|a| a.port() == 0) {
                bad("smtpd", key, "a port of 0 could not be told from the other listeners'".into());
            }
        }
        if let Some(addr) = smtpd.submission_listen.iter().find(|a| smtpd.submissions_listen.contains(a)) {
            bad("smtpd", "submissions_listen", format!("{addr} is also in submission_listen"));
        }
        if smtpd.auth.mx && smtpd.auth.server.is_none() {
            bad("smtpd.auth", "mx", "needs server (Dovecot's auth socket)".into());
        }
        if smtpd.auth.mx && !has_cert {
            bad("smtpd.auth", "mx", "needs tls_cert_file and tls_key_file: AUTH is offered only under TLS".into());
        }
        if !smtpd.tls_sni.is_empty() && !has_cert {
            bad(
                "smtpd",
                "tls_sni",
                "needs tls_cert_file and tls_key_file: the certificate for every other name".into(),
            );
        }
        if smtpd.auth.response_limit < 512 {
            bad("smtpd.auth", "response_limit", "below 512 octets no password fits".into());
        }
    }
}
