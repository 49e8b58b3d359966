//! Reply texts, in one place so they can be audited against Postfix and
//! RFC 3463: every reply carries an enhanced status code, except the
//! greeting, the HELO/EHLO responses (RFC 2034 section 3) and `354`.
//! A reply is a [`Reply`] (typed code and status) until the engine writes
//! it as a line.

use mortal_proto::smtp_status::{EnhancedStatus, ReplyCode};
use std::borrow::Cow;
use std::fmt;

/// RFC 5321 4.5.3.1.5: a reply line is at most 512 octets, `<CR><LF>`
/// included.
pub const MAX_REPLY_LINE: usize = 512;

/// One single-line reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: ReplyCode,
    /// Absent only where RFC 2034 has none (see the module header).
    pub status: Option<EnhancedStatus>,
    pub text: Cow<'static, str>,
}

impl Reply {
    /// `code class.subject.detail text`, the class taken from the code so
    /// the two always agree.
    ///
    /// # Panics
    /// For a code outside `200..=599`, a `3yz` code (it has no enhanced
    /// status) or parts over 999: in a constant, a compile error.
    pub const fn new(code: u16, subject: u16, detail: u16, text: &'static str) -> Self {
        let code = ReplyCode::of(code);
        let Some(class) = code.status_class() else { panic!("a 3yz reply has no enhanced status code") };
        Self { code, status: Some(EnhancedStatus::new(class, subject, detail)), text: Cow::Borrowed(text) }
    }

    /// A reply without an enhanced status code.
    pub const fn bare(code: u16, text: &'static str) -> Self {
        Self { code: ReplyCode::of(code), status: None, text: Cow::Borrowed(text) }
    }

    /// The same code and status with another text.
    pub fn with_text(self, text: String) -> Self {
        Self { text: Cow::Owned(text), ..self }
    }

    /// The reply line without `<CR><LF>`, bounded by [`clean_line`].
    pub fn line(&self) -> String {
        clean_line(&self.to_string())
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            Some(status) => write!(f, "{} {status} {}", self.code, self.text),
            None => write!(f, "{} {}", self.code, self.text),
        }
    }
}

pub const OK: Reply = Reply::new(250, 0, 0, "Ok");
pub const MAIL_OK: Reply = Reply::new(250, 1, 0, "Ok");
pub const RCPT_OK: Reply = Reply::new(250, 1, 5, "Ok");
pub const START_DATA: Reply = Reply::bare(354, "End data with <CR><LF>.<CR><LF>");
pub const BYE: Reply = Reply::new(221, 0, 0, "Bye");
/// Never confirms or denies an address (no user enumeration). The text is
/// sendmail's, the code the one RFC 5321 3.5.3 prescribes for this case.
pub const VRFY: Reply = Reply::new(252, 5, 2, "Cannot VRFY user; try RCPT to attempt delivery");
pub const HELP: Reply = Reply::new(214, 0, 0, "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP");

pub const UNKNOWN_COMMAND: Reply = Reply::new(500, 5, 2, "Error: command not recognized");
pub const NOT_IMPLEMENTED: Reply = Reply::new(502, 5, 1, "Error: command not implemented");
pub const BAD_SYNTAX: Reply = Reply::new(500, 5, 2, "Error: bad syntax");
pub const LINE_TOO_LONG: Reply = Reply::new(500, 5, 2, "Error: line too long");
pub const BARE_LF: Reply = Reply::new(500, 5, 2, "Error: bare <LF> received");
pub const BARE_CR: Reply = Reply::new(500, 5, 2, "Error: bare <CR> received");

pub const NEED_HELO: Reply = Reply::new(503, 5, 1, "Error: send HELO/EHLO first");
pub const NESTED_MAIL: Reply = Reply::new(503, 5, 1, "Error: nested MAIL command");
pub const NEED_MAIL: Reply = Reply::new(503, 5, 1, "Error: need MAIL command");
pub const NEED_RCPT: Reply = Reply::new(503, 5, 1, "Error: need RCPT command");
pub const NO_VALID_RECIPIENTS: Reply = Reply::new(554, 5, 1, "Error: no valid recipients");
pub const SYNC_ERROR: Reply = Reply::new(554, 5, 0, "Error: SMTP protocol synchronization");

pub const BAD_SENDER: Reply = Reply::new(501, 1, 7, "Bad sender address syntax");
pub const BAD_RECIPIENT: Reply = Reply::new(501, 1, 3, "Bad recipient address syntax");
pub const UTF8_ADDRESS: Reply = Reply::new(553, 6, 7, "Must declare SMTPUTF8 to send unicode address");
pub const BAD_SIZE: Reply = Reply::new(501, 5, 4, "Bad message size syntax");
pub const BAD_BODY: Reply = Reply::new(501, 5, 4, "Bad BODY keyword syntax");
pub const TOO_BIG: Reply = Reply::new(552, 3, 4, "Message size exceeds fixed limit");
pub const TOO_MANY_RECIPIENTS: Reply = Reply::new(452, 5, 3, "Error: too many recipients");
pub const QUEUE_WRITE_ERROR: Reply = Reply::new(451, 3, 0, "Error: queue file write error");

pub const STARTTLS_READY: Reply = Reply::new(220, 0, 0, "Ready to start TLS");
pub const TLS_ACTIVE: Reply = Reply::new(554, 5, 1, "Error: TLS already active");
pub const TRANSACTION_IN_PROGRESS: Reply = Reply::new(503, 5, 1, "Error: MAIL transaction in progress");
pub const BAD_SMTPUTF8: Reply = Reply::new(501, 5, 4, "Bad SMTPUTF8 parameter syntax");
/// A UTF-8 address whose octets were not valid UTF-8 (the command line
/// was decoded lossily): it cannot be the address the client meant.
pub const MALFORMED_UTF8_ADDRESS: Reply = Reply::new(553, 6, 7, "Error: malformed UTF-8 in address");
/// RFC 3030 3: DATA and BDAT never mix in one transaction.
pub const DATA_AFTER_BDAT: Reply = Reply::new(503, 5, 1, "Error: DATA after BDAT; send RSET");
/// RFC 3030 3: a BINARYMIME body can only be sent with BDAT.
pub const BINARYMIME_NEEDS_BDAT: Reply = Reply::new(503, 5, 1, "Error: BODY=BINARYMIME requires BDAT");
pub const BDAT_NEEDS_EHLO: Reply = Reply::new(503, 5, 1, "Error: send EHLO first");

/// The reply to a BDAT chunk that is not the last.
pub fn chunk_ok(size: u64) -> Reply {
    OK.with_text(format!("Ok: {size} octets"))
}

/// `501 5.5.4`: invalid command arguments.
const BAD_ARGUMENTS: Reply = const { Reply::new(501, 5, 4, "") };

pub fn duplicate_option(keyword: &str) -> Reply {
    BAD_ARGUMENTS.with_text(format!("Error: duplicate {keyword} parameter"))
}

/// Content errors are answered after the terminator. RFC 5321 4.3.2 lists
/// 550 among the replies to the end of data (500 is for command lines).
pub const DATA_BARE_LF: Reply = Reply::new(550, 5, 2, "Error: bare <LF> received");
pub const DATA_BARE_CR: Reply = Reply::new(550, 5, 2, "Error: bare <CR> received");
pub const DATA_LINE_TOO_LONG: Reply = Reply::new(550, 5, 2, "Error: text line too long");

pub fn syntax(expected: &str) -> Reply {
    BAD_ARGUMENTS.with_text(format!("Syntax: {expected}"))
}

pub fn unsupported_option(keyword: &str) -> Reply {
    const { Reply::new(555, 5, 4, "") }.with_text(format!("Unsupported option: {keyword}"))
}

/// Postfix's exact text, which fail2ban's stock filter matches.
pub fn relay_denied(address: &str) -> Reply {
    const { Reply::new(554, 7, 1, "") }.with_text(format!("<{address}>: Relay access denied"))
}

pub fn greeting(hostname: &str, banner: &str) -> Reply {
    const { Reply::bare(220, "") }.with_text(format!("{hostname} {banner}"))
}

/// The reply to HELO (no extensions, no enhanced status code).
pub fn helo(hostname: &str) -> Reply {
    const { Reply::bare(250, "") }.with_text(hostname.to_owned())
}

pub fn too_many_errors(hostname: &str) -> Reply {
    const { Reply::new(421, 7, 0, "") }.with_text(format!("{hostname} Error: too many errors"))
}

pub fn timeout(hostname: &str) -> Reply {
    const { Reply::new(421, 4, 2, "") }.with_text(format!("{hostname} Error: timeout exceeded"))
}

/// Cuts `line` to fit [`MAX_REPLY_LINE`] with its `<CR><LF>`, at a
/// character boundary, and replaces control characters: reply text that
/// echoes client or cleanup input can neither overflow nor split a line.
pub fn clean_line(line: &str) -> String {
    let mut out = String::with_capacity(line.len().min(MAX_REPLY_LINE));
    for c in line.chars().map(|c| if c.is_control() { '?' } else { c }) {
        if out.len() + c.len_utf8() > MAX_REPLY_LINE - 2 {
            break;
        }
        out.push(c);
    }
    out
}

/// The reply relaying a cleanup answer. Only a well-formed failure (4xx or
/// 5xx with a matching enhanced code) or exactly 250 passes through; an
/// answer that makes no sense becomes a queue write error, because saying
/// anything positive without cleanup's clear 250 could lose mail.
pub fn from_answer(code: ReplyCode, status: EnhancedStatus, text: &str) -> Reply {
    let Some(class) = code.status_class().filter(|_| code.get() == 250 || !code.is_positive()) else {
        return QUEUE_WRITE_ERROR;
    };
    let status = if status.class() == class { status } else { EnhancedStatus::undefined(class) };
    Reply { code, status: Some(status), text: Cow::Owned(text.to_owned()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mortal_proto::smtp_status::StatusClass;

    #[test]
    fn answers_table() {
        let cases = [
            ((250, "2.0.0", "Ok: queued as ABC"), "250 2.0.0 Ok: queued as ABC"),
            ((554, "5.4.6", "Error: too many hops"), "554 5.4.6 Error: too many hops"),
            ((451, "4.3.0", "Error: queue file write error"), "451 4.3.0 Error: queue file write error"),
            ((452, "5.3.4", "mismatched class"), "452 4.0.0 mismatched class"),
            ((251, "2.1.5", "forwarded"), "451 4.3.0 Error: queue file write error"),
            ((354, "2.0.0", "go ahead"), "451 4.3.0 Error: queue file write error"),
            ((221, "2.0.0", "Bye"), "451 4.3.0 Error: queue file write error"),
        ];
        for ((code, status, text), want) in cases {
            let got = from_answer(ReplyCode::of(code), status.parse().unwrap(), text);
            assert_eq!(got.line(), want);
        }
        let odd = from_answer(ReplyCode::of(550), EnhancedStatus::undefined(StatusClass::Success), "x");
        assert_eq!(odd.line(), "550 5.0.0 x");
    }

    /// The wire form of typed replies: the code, the status when there is
    /// one, the text.
    #[test]
    fn replies_render_table() {
        let cases = [
            (OK, "250 2.0.0 Ok"),
            (RCPT_OK, "250 2.1.5 Ok"),
            (START_DATA, "354 End data with <CR><LF>.<CR><LF>"),
            (VRFY, "252 2.5.2 Cannot VRFY user; try RCPT to attempt delivery"),
            (TOO_MANY_RECIPIENTS, "452 4.5.3 Error: too many recipients"),
            (chunk_ok(7), "250 2.0.0 Ok: 7 octets"),
            (syntax("MAIL FROM:<address>"), "501 5.5.4 Syntax: MAIL FROM:<address>"),
            (relay_denied("a@b.test"), "554 5.7.1 <a@b.test>: Relay access denied"),
            (greeting("mx.test", "ESMTP mortal"), "220 mx.test ESMTP mortal"),
            (helo("mx.test"), "250 mx.test"),
            (timeout("mx.test"), "421 4.4.2 mx.test Error: timeout exceeded"),
        ];
        for (reply, want) in cases {
            assert_eq!(reply.line(), want);
        }
    }

    #[test]
    fn lines_are_bounded_and_single() {
        let long = format!("550 5.0.0 {}", "é".repeat(400));
        let cut = clean_line(&long);
        assert!(cut.len() <= MAX_REPLY_LINE - 2 && long.starts_with(&cut));
        assert_eq!(clean_line("550 5.0.0 a\r\nb"), "550 5.0.0 a??b");
    }
}
