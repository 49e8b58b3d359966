//! Reply texts, in one place so they can be audited against Postfix and
//! RFC 3463: every reply carries an enhanced status code, except the
//! greeting and the HELO/EHLO responses (RFC 2034 section 3).

/// RFC 5321 4.5.3.1.5: a reply line is at most 512 octets, `<CR><LF>`
/// included.
pub const MAX_REPLY_LINE: usize = 512;

pub const OK: &str = "250 2.0.0 Ok";
pub const MAIL_OK: &str = "250 2.1.0 Ok";
pub const RCPT_OK: &str = "250 2.1.5 Ok";
pub const START_DATA: &str = "354 End data with <CR><LF>.<CR><LF>";
pub const BYE: &str = "221 2.0.0 Bye";
/// Never confirms or denies an address (no user enumeration). The text is
/// sendmail's, the code the one RFC 5321 3.5.3 prescribes for this case.
pub const VRFY: &str = "252 2.5.2 Cannot VRFY user; try RCPT to attempt delivery";
pub const HELP: &str = "214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP";

pub const UNKNOWN_COMMAND: &str = "500 5.5.2 Error: command not recognized";
pub const NOT_IMPLEMENTED: &str = "502 5.5.1 Error: command not implemented";
pub const BAD_SYNTAX: &str = "500 5.5.2 Error: bad syntax";
pub const LINE_TOO_LONG: &str = "500 5.5.2 Error: line too long";
pub const BARE_LF: &str = "500 5.5.2 Error: bare <LF> received";
pub const BARE_CR: &str = "500 5.5.2 Error: bare <CR> received";

pub const NEED_HELO: &str = "503 5.5.1 Error: send HELO/EHLO first";
pub const NESTED_MAIL: &str = "503 5.5.1 Error: nested MAIL command";
pub const NEED_MAIL: &str = "503 5.5.1 Error: need MAIL command";
pub const NEED_RCPT: &str = "503 5.5.1 Error: need RCPT command";
pub const NO_VALID_RECIPIENTS: &str = "554 5.5.1 Error: no valid recipients";
pub const SYNC_ERROR: &str = "554 5.5.0 Error: SMTP protocol synchronization";

pub const BAD_SENDER: &str = "501 5.1.7 Bad sender address syntax";
pub const BAD_RECIPIENT: &str = "501 5.1.3 Bad recipient address syntax";
pub const UTF8_ADDRESS: &str = "553 5.6.7 Must declare SMTPUTF8 to send unicode address";
pub const BAD_SIZE: &str = "501 5.5.4 Bad message size syntax";
pub const BAD_BODY: &str = "501 5.5.4 Bad BODY keyword syntax";
pub const TOO_BIG: &str = "552 5.3.4 Message size exceeds fixed limit";
pub const TOO_MANY_RECIPIENTS: &str = "452 4.5.3 Error: too many recipients";
pub const QUEUE_WRITE_ERROR: &str = "451 4.3.0 Error: queue file write error";

pub const STARTTLS_READY: &str = "220 2.0.0 Ready to start TLS";
pub const TLS_ACTIVE: &str = "554 5.5.1 Error: TLS already active";
pub const TRANSACTION_IN_PROGRESS: &str = "503 5.5.1 Error: MAIL transaction in progress";
pub const BAD_SMTPUTF8: &str = "501 5.5.4 Bad SMTPUTF8 parameter syntax";
/// A UTF-8 address whose octets were not valid UTF-8 (the command line
/// was decoded lossily): it cannot be the address the client meant.
pub const MALFORMED_UTF8_ADDRESS: &str = "553 5.6.7 Error: malformed UTF-8 in address";
/// RFC 3030 3: DATA and BDAT never mix in one transaction.
pub const DATA_AFTER_BDAT: &str = "503 5.5.1 Error: DATA after BDAT; send RSET";
/// RFC 3030 3: a BINARYMIME body can only be sent with BDAT.
pub const BINARYMIME_NEEDS_BDAT: &str = "503 5.5.1 Error: BODY=BINARYMIME requires BDAT";
pub const BDAT_NEEDS_EHLO: &str = "503 5.5.1 Error: send EHLO first";

/// The reply to a BDAT chunk that is not the last.
pub fn chunk_ok(size: u64) -> String {
    format!("250 2.0.0 Ok: {size} octets")
}

pub fn duplicate_option(keyword: &str) -> String {
    format!("501 5.5.4 Error: duplicate {keyword} parameter")
}

/// Content errors are answered after the terminator. RFC 5321 4.3.2 lists
/// 550 among the replies to the end of data (500 is for command lines).
pub const DATA_BARE_LF: &str = "550 5.5.2 Error: bare <LF> received";
pub const DATA_BARE_CR: &str = "550 5.5.2 Error: bare <CR> received";
pub const DATA_LINE_TOO_LONG: &str = "550 5.5.2 Error: text line too long";

pub fn syntax(expected: &str) -> String {
    format!("501 5.5.4 Syntax: {expected}")
}

pub fn unsupported_option(keyword: &str) -> String {
    format!("555 5.5.4 Unsupported option: {keyword}")
}

/// Postfix's exact text, which fail2ban's stock filter matches.
pub fn relay_denied(address: &str) -> String {
    format!("554 5.7.1 <{address}>: Relay access denied")
}

pub fn greeting(hostname: &str, banner: &str) -> String {
    format!("220 {hostname} {banner}")
}

pub fn too_many_errors(hostname: &str) -> String {
    format!("421 4.7.0 {hostname} Error: too many errors")
}

pub fn timeout(hostname: &str) -> String {
    format!("421 4.4.2 {hostname} Error: timeout exceeded")
}

/// The reply code of a reply line.
pub fn code(line: &str) -> u16 {
    line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0)
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
pub fn from_answer(code: u16, enhanced: &str, text: &str) -> String {
    let class = code / 100;
    if !(code == 250 || class == 4 || class == 5) {
        return QUEUE_WRITE_ERROR.to_owned();
    }
    let enhanced = if enhanced_matches(enhanced, class) { enhanced.to_owned() } else { format!("{class}.0.0") };
    clean_line(&format!("{code} {enhanced} {text}"))
}

/// `class "." subject "." detail` (RFC 3463 section 2) with the same class
/// as the reply code.
fn enhanced_matches(enhanced: &str, class: u16) -> bool {
    let parts: Vec<&str> = enhanced.split('.').collect();
    let numeric = |p: &str, max: usize| !p.is_empty() && p.len() <= max && p.bytes().all(|b| b.is_ascii_digit());
    parts.len() == 3 && parts[0] == class.to_string() && numeric(parts[1], 3) && numeric(parts[2], 3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_table() {
        let cases = [
            ((250, "2.0.0", "Ok: queued as ABC"), "250 2.0.0 Ok: queued as ABC"),
            ((554, "5.4.6", "Error: too many hops"), "554 5.4.6 Error: too many hops"),
            ((451, "4.3.0", "Error: queue file write error"), "451 4.3.0 Error: queue file write error"),
            ((452, "5.3.4", "mismatched class"), "452 4.0.0 mismatched class"),
            ((550, "", "no code"), "550 5.0.0 no code"),
            ((251, "2.1.5", "forwarded"), QUEUE_WRITE_ERROR),
            ((354, "2.0.0", "go ahead"), QUEUE_WRITE_ERROR),
            ((221, "2.0.0", "Bye"), QUEUE_WRITE_ERROR),
        ];
        for ((code, enhanced, text), want) in cases {
            assert_eq!(from_answer(code, enhanced, text), want);
        }
    }

    #[test]
    fn lines_are_bounded_and_single() {
        let long = format!("550 5.0.0 {}", "é".repeat(400));
        let cut = clean_line(&long);
        assert!(cut.len() <= MAX_REPLY_LINE - 2 && long.starts_with(&cut));
        assert_eq!(clean_line("550 5.0.0 a\r\nb"), "550 5.0.0 a??b");
        assert_eq!(code("250 2.0.0 Ok"), 250);
        assert_eq!(code("xx"), 0);
    }
}
