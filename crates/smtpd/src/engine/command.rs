//! The command parser: one command line (CRLF already removed) in, one
//! [`Command`] out. Pure and total: any input gives a command or a
//! [`ParseError`] naming the syntax that was expected, never a panic.
//!
//! Like Postfix's command table, each verb carries the flags the session
//! needs ([`Verb::ends_group`] for RFC 2920), and each flag cites its RFC.

/// Longest EHLO/HELO argument: a domain is at most 255 octets (RFC 5321
/// 4.5.3.1.2); an IPv6 address literal is shorter.
pub const MAX_HELO_NAME: usize = 255;

/// The commands smtpd implements, in the order Postfix reports them in its
/// `disconnect from ...` line; `Unknown` covers everything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Helo,
    Ehlo,
    Starttls,
    Auth,
    Mail,
    Rcpt,
    Data,
    Bdat,
    Rset,
    Noop,
    Vrfy,
    Help,
    Quit,
    Unknown,
}

impl Verb {
    /// Every verb, in report order.
    pub const ALL: [Verb; 14] = [
        Verb::Helo,
        Verb::Ehlo,
        Verb::Starttls,
        Verb::Auth,
        Verb::Mail,
        Verb::Rcpt,
        Verb::Data,
        Verb::Bdat,
        Verb::Rset,
        Verb::Noop,
        Verb::Vrfy,
        Verb::Help,
        Verb::Quit,
        Verb::Unknown,
    ];

    /// The name used in replies and in `... after <NAME> from ...` logs.
    pub fn name(self) -> &'static str {
        match self {
            Verb::Helo => "HELO",
            Verb::Ehlo => "EHLO",
            Verb::Starttls => "STARTTLS",
            Verb::Auth => "AUTH",
            Verb::Mail => "MAIL",
            Verb::Rcpt => "RCPT",
            Verb::Data => "DATA",
            Verb::Bdat => "BDAT",
            Verb::Rset => "RSET",
            Verb::Noop => "NOOP",
            Verb::Vrfy => "VRFY",
            Verb::Help => "HELP",
            Verb::Quit => "QUIT",
            Verb::Unknown => "UNKNOWN",
        }
    }

    /// The syntax quoted in `501 5.5.4 Syntax: ...`.
    pub fn syntax(self) -> &'static str {
        match self {
            Verb::Helo => "HELO hostname",
            Verb::Ehlo => "EHLO hostname",
            Verb::Starttls => "STARTTLS",
            Verb::Auth => "AUTH mechanism",
            Verb::Mail => "MAIL FROM:<address>",
            Verb::Rcpt => "RCPT TO:<address>",
            Verb::Data => "DATA",
            Verb::Bdat => "BDAT count [LAST]",
            Verb::Rset => "RSET",
            Verb::Noop => "NOOP [text]",
            Verb::Vrfy => "VRFY address",
            Verb::Help => "HELP [command]",
            Verb::Quit => "QUIT",
            Verb::Unknown => "command",
        }
    }

    /// RFC 2920 section 3.1: "EHLO, DATA, VRFY, EXPN, TURN, QUIT, and NOOP
    /// ... can only appear as the last command in a group". HELO changes
    /// state exactly like EHLO, so it ends a group too (Postfix agrees).
    /// RSET is deliberately absent: the RFC does not list it, and clients
    /// pipeline `RSET` + `MAIL` in practice. STARTTLS ends a group because
    /// RFC 3207 5 requires it: input pipelined after it was sent in the
    /// clear, and acting on it is the CVE-2011-0411 class of injection.
    /// BDAT does not: its chunk follows it, and RFC 3030 4.2 lets clients
    /// pipeline BDAT commands.
    pub fn ends_group(self) -> bool {
        matches!(self, Verb::Helo | Verb::Ehlo | Verb::Starttls | Verb::Data | Verb::Vrfy | Verb::Noop | Verb::Quit)
    }
}

/// One ESMTP parameter (`KEYWORD[=value]`, RFC 5321 4.1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Param<'a> {
    pub keyword: &'a str,
    pub value: Option<&'a str>,
}

/// A parsed command line. Paths are returned as sent (angle brackets
/// included); address syntax is `mortal_proto::address`'s business.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
    Helo(&'a str),
    Ehlo(&'a str),
    Mail {
        path: &'a str,
        params: Vec<Param<'a>>,
    },
    Rcpt {
        path: &'a str,
        params: Vec<Param<'a>>,
    },
    Data,
    StartTls,
    /// `AUTH mechanism [initial-response]` (RFC 4954 4): the mechanism as
    /// sent (any case), the response as sent (base64, or `=` for an empty
    /// one).
    Auth {
        mechanism: &'a str,
        initial: Option<&'a str>,
    },
    /// `BDAT count [LAST]` (RFC 3030 2): the chunk of `size` octets follows.
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Noop,
    Vrfy(&'a str),
    Help,
    Quit,
    /// A standard command smtpd does not offer (`502 5.5.1`).
    NotImplemented(&'static str),
    /// Not an SMTP command at all (`500 5.5.2`).
    Unknown,
}

/// Why a line is not a usable command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// An empty line.
    Empty,
    /// A known verb with arguments that do not fit its syntax.
    Syntax(Verb),
}

/// Standard commands smtpd knows but does not offer, with whether RFC 2920
/// makes them end a pipelining group.
const NOT_IMPLEMENTED: [(&str, bool); 5] =
    [("EXPN", true), ("TURN", true), ("ETRN", false), ("ATRN", false), ("SEND", false)];

pub use mortal_proto::dovecot_auth::{MAX_MECHANISM_NAME, is_base64};

/// Most digits accepted in a BDAT chunk size; more would not fit a u64
/// and is certainly over any size limit.
pub const MAX_BDAT_DIGITS: usize = 19;

impl Command<'_> {
    pub fn verb(&self) -> Verb {
        match self {
            Command::Helo(_) => Verb::Helo,
            Command::Ehlo(_) => Verb::Ehlo,
            Command::Mail { .. } => Verb::Mail,
            Command::Rcpt { .. } => Verb::Rcpt,
            Command::Data => Verb::Data,
            Command::StartTls => Verb::Starttls,
            Command::Auth { .. } => Verb::Auth,
            Command::Bdat { .. } => Verb::Bdat,
            Command::Rset => Verb::Rset,
            Command::Noop => Verb::Noop,
            Command::Vrfy(_) => Verb::Vrfy,
            Command::Help => Verb::Help,
            Command::Quit => Verb::Quit,
            Command::NotImplemented(_) | Command::Unknown => Verb::Unknown,
        }
    }

    /// Whether nothing may be pipelined after this command (RFC 2920 3.1).
    pub fn ends_group(&self) -> bool {
        match self {
            Command::NotImplemented(name) => NOT_IMPLEMENTED.iter().any(|(n, last)| n == name && *last),
            other => other.verb().ends_group(),
        }
    }

    /// The name logged in `... after <NAME> from ...`.
    pub fn name(&self) -> &'static str {
        match self {
            Command::NotImplemented(name) => name,
            other => other.verb().name(),
        }
    }
}

/// Parses one command line (without its CRLF).
pub fn parse(line: &str) -> Result<Command<'_>, ParseError> {
    // Trailing blanks are common from hand-typed and sloppy clients and
    // carry no meaning, so they are ignored (Postfix does the same).
    let line = line.trim_end_matches([' ', '\t']);
    if line.is_empty() {
        return Err(ParseError::Empty);
    }
    let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
    let Some(verb) = lookup(word) else {
        return Ok(NOT_IMPLEMENTED
            .iter()
            .find(|(name, _)| word.eq_ignore_ascii_case(name))
            .map_or(Command::Unknown, |(name, _)| Command::NotImplemented(name)));
    };
    let rest = rest.trim_start_matches(' ');
    let syntax = ParseError::Syntax(verb);
    match verb {
        Verb::Helo => helo_name(rest).map(Command::Helo).ok_or(syntax),
        Verb::Ehlo => helo_name(rest).map(Command::Ehlo).ok_or(syntax),
        Verb::Mail => path_and_params(rest, "FROM:").map(|(path, params)| Command::Mail { path, params }).ok_or(syntax),
        Verb::Rcpt => path_and_params(rest, "TO:").map(|(path, params)| Command::Rcpt { path, params }).ok_or(syntax),
        Verb::Vrfy if !rest.is_empty() => Ok(Command::Vrfy(rest)),
        // RFC 5321 4.1.1.9 and 4.1.1.8: NOOP and HELP take an optional string.
        Verb::Noop => Ok(Command::Noop),
        Verb::Help => Ok(Command::Help),
        Verb::Data if rest.is_empty() => Ok(Command::Data),
        Verb::Starttls if rest.is_empty() => Ok(Command::StartTls),
        Verb::Bdat => bdat(rest).ok_or(syntax),
        Verb::Auth => auth(rest).ok_or(syntax),
        Verb::Rset if rest.is_empty() => Ok(Command::Rset),
        Verb::Quit if rest.is_empty() => Ok(Command::Quit),
        _ => Err(syntax),
    }
}

fn lookup(word: &str) -> Option<Verb> {
    Verb::ALL.into_iter().filter(|v| *v != Verb::Unknown).find(|v| word.eq_ignore_ascii_case(v.name()))
}

/// `chunk-size [SP end-marker]` (RFC 3030 2): digits, then optionally
/// `LAST`.
fn bdat(arg: &str) -> Option<Command<'_>> {
    let mut words = arg.split(' ').filter(|w| !w.is_empty());
    let size = words.next()?;
    let last = match words.next() {
        None => false,
        Some(w) if w.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return None,
    };
    let digits = !size.is_empty() && size.len() <= MAX_BDAT_DIGITS && size.bytes().all(|b| b.is_ascii_digit());
    if !digits || words.next().is_some() {
        return None;
    }
    Some(Command::Bdat { size: size.parse().ok()?, last })
}

/// `mechanism [SP initial-response]` (RFC 4954 4): a SASL mechanism name
/// (RFC 4422 3.1: upper-case letters, digits, `-` and `_`; clients may
/// send lower case) and base64 or `=`.
fn auth(arg: &str) -> Option<Command<'_>> {
    let mut words = arg.split(' ').filter(|w| !w.is_empty());
    let mechanism = words.next()?;
    let initial = words.next();
    let valid_name = mechanism.len() <= MAX_MECHANISM_NAME
        && mechanism.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !valid_name || words.next().is_some() || initial.is_some_and(|r| r != "=" && !is_base64(r)) {
        return None;
    }
    Some(Command::Auth { mechanism, initial })
}

/// `Domain / address-literal` (RFC 5321 4.1.1.1): one word of visible
/// ASCII. The name travels to cleanup and into `Received:`, so nothing
/// else is allowed through.
fn helo_name(arg: &str) -> Option<&str> {
    let valid = !arg.is_empty() && arg.len() <= MAX_HELO_NAME && arg.bytes().all(|b| b.is_ascii_graphic());
    valid.then_some(arg)
}

/// `FROM:<path> [params]` / `TO:<path> [params]`. A space after the colon
/// is tolerated, as Postfix does, because real clients send it.
fn path_and_params<'a>(arg: &'a str, keyword: &str) -> Option<(&'a str, Vec<Param<'a>>)> {
    let head = arg.get(..keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let (path, rest) = split_path(arg[keyword.len()..].trim_start_matches(' '))?;
    if !rest.is_empty() && !rest.starts_with(' ') {
        return None;
    }
    let params = rest.split(' ').filter(|p| !p.is_empty()).map(param).collect::<Option<Vec<_>>>()?;
    Some((path, params))
}

/// Splits a path off the front of `s`. A bracketed path ends at the first
/// `>` outside a quoted local part, so `<"a>b"@example.test>` stays whole;
/// an unbracketed one ends at the first space (and is later refused by the
/// address parser, with a better message than a syntax error).
fn split_path(s: &str) -> Option<(&str, &str)> {
    if !s.starts_with('<') {
        let end = s.find(' ').unwrap_or(s.len());
        return (end > 0).then(|| s.split_at(end));
    }
    let bytes = s.as_bytes();
    let (mut quoted, mut i) = (false, 1);
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            // '>' is ASCII, so i + 1 is a character boundary.
            b'>' if !quoted => return Some(s.split_at(i + 1)),
            _ => {}
        }
        i += 1;
    }
    None
}

/// `esmtp-keyword ["=" esmtp-value]` (RFC 5321 4.1.2).
fn param(p: &str) -> Option<Param<'_>> {
    let (keyword, value) = match p.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (p, None),
    };
    let keyword_ok = keyword.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && keyword.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    // esmtp-value = 1*(%d33-60 / %d62-126): visible ASCII except '='.
    let value_ok = value.is_none_or(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_graphic() && b != b'='));
    (keyword_ok && value_ok).then_some(Param { keyword, value })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p<'a>(keyword: &'a str, value: Option<&'a str>) -> Param<'a> {
        Param { keyword, value }
    }

    /// Input line and the expected parse, stalwart smtp-proto style.
    #[test]
    fn parse_table() {
        use Command::*;
        use ParseError::*;
        let cases: Vec<(&str, Result<Command<'_>, ParseError>)> = vec![
            ("EHLO client.test", Ok(Ehlo("client.test"))),
            ("ehlo client.test", Ok(Ehlo("client.test"))),
            ("EHLO [192.0.2.1]", Ok(Ehlo("[192.0.2.1]"))),
            ("EHLO   client.test  ", Ok(Ehlo("client.test"))),
            ("EHLO", Err(Syntax(Verb::Ehlo))),
            ("EHLO two words", Err(Syntax(Verb::Ehlo))),
            ("EHLO cli\u{1}ent", Err(Syntax(Verb::Ehlo))),
            ("EHLO jürgen.test", Err(Syntax(Verb::Ehlo))),
            ("HELO client.test", Ok(Helo("client.test"))),
            ("HELO", Err(Syntax(Verb::Helo))),
            ("MAIL FROM:<a@example.test>", Ok(Mail { path: "<a@example.test>", params: vec![] })),
            ("mail from:<a@example.test>", Ok(Mail { path: "<a@example.test>", params: vec![] })),
            ("MAIL FROM: <a@example.test>", Ok(Mail { path: "<a@example.test>", params: vec![] })),
            ("MAIL FROM:<>", Ok(Mail { path: "<>", params: vec![] })),
            (
                "MAIL FROM:<a@example.test> SIZE=1000 BODY=8BITMIME",
                Ok(Mail {
                    path: "<a@example.test>",
                    params: vec![p("SIZE", Some("1000")), p("BODY", Some("8BITMIME"))],
                }),
            ),
            (
                "MAIL FROM:<a@example.test>  size=10 ",
                Ok(Mail { path: "<a@example.test>", params: vec![p("size", Some("10"))] }),
            ),
            (
                "MAIL FROM:<a@example.test> SMTPUTF8",
                Ok(Mail { path: "<a@example.test>", params: vec![p("SMTPUTF8", None)] }),
            ),
            ("MAIL FROM:<\"a>b\"@example.test>", Ok(Mail { path: "<\"a>b\"@example.test>", params: vec![] })),
            (
                "MAIL FROM:<\"a\\\">b\"@x.test> X=1",
                Ok(Mail { path: "<\"a\\\">b\"@x.test>", params: vec![p("X", Some("1"))] }),
            ),
            ("MAIL FROM:a@example.test", Ok(Mail { path: "a@example.test", params: vec![] })),
            ("MAIL FROM:<jürgen@example.test>", Ok(Mail { path: "<jürgen@example.test>", params: vec![] })),
            ("MAIL FROM:", Err(Syntax(Verb::Mail))),
            ("MAIL", Err(Syntax(Verb::Mail))),
            ("MAIL TO:<a@example.test>", Err(Syntax(Verb::Mail))),
            ("MAIL FRÖM:<a@example.test>", Err(Syntax(Verb::Mail))),
            ("MAIL FROM:<a@example.test", Err(Syntax(Verb::Mail))),
            ("MAIL FROM:<a@example.test>SIZE=1", Err(Syntax(Verb::Mail))),
            ("MAIL FROM:<a@example.test> SIZE=", Err(Syntax(Verb::Mail))),
            ("MAIL FROM:<a@example.test> =1", Err(Syntax(Verb::Mail))),
            ("MAIL FROM:<a@example.test> -X=1", Err(Syntax(Verb::Mail))),
            ("MAIL FROM:<a@example.test> X=a=b", Err(Syntax(Verb::Mail))),
            ("RCPT TO:<b@example.test>", Ok(Rcpt { path: "<b@example.test>", params: vec![] })),
            ("RCPT TO: <b@example.test>", Ok(Rcpt { path: "<b@example.test>", params: vec![] })),
            ("RCPT TO:<postmaster>", Ok(Rcpt { path: "<postmaster>", params: vec![] })),
            (
                "RCPT TO:<b@example.test> NOTIFY=NEVER",
                Ok(Rcpt { path: "<b@example.test>", params: vec![p("NOTIFY", Some("NEVER"))] }),
            ),
            ("RCPT FROM:<b@example.test>", Err(Syntax(Verb::Rcpt))),
            ("RCPT", Err(Syntax(Verb::Rcpt))),
            ("DATA", Ok(Data)),
            ("data ", Ok(Data)),
            ("DATA now", Err(Syntax(Verb::Data))),
            ("RSET", Ok(Rset)),
            ("RSET x", Err(Syntax(Verb::Rset))),
            ("NOOP", Ok(Noop)),
            ("NOOP anything at all", Ok(Noop)),
            ("QUIT", Ok(Quit)),
            ("QUIT now", Err(Syntax(Verb::Quit))),
            ("VRFY root", Ok(Vrfy("root"))),
            ("VRFY", Err(Syntax(Verb::Vrfy))),
            ("HELP", Ok(Help)),
            ("HELP MAIL", Ok(Help)),
            ("STARTTLS", Ok(StartTls)),
            ("starttls ", Ok(StartTls)),
            ("STARTTLS now", Err(Syntax(Verb::Starttls))),
            ("expn staff", Ok(NotImplemented("EXPN"))),
            ("BDAT 10 LAST", Ok(Bdat { size: 10, last: true })),
            ("bdat 0 last", Ok(Bdat { size: 0, last: true })),
            ("BDAT 4096", Ok(Bdat { size: 4096, last: false })),
            ("BDAT  12  LAST ", Ok(Bdat { size: 12, last: true })),
            ("BDAT 9999999999999999999", Ok(Bdat { size: 9_999_999_999_999_999_999, last: false })),
            ("BDAT 99999999999999999999", Err(Syntax(Verb::Bdat))),
            ("BDAT", Err(Syntax(Verb::Bdat))),
            ("BDAT LAST", Err(Syntax(Verb::Bdat))),
            ("BDAT -1", Err(Syntax(Verb::Bdat))),
            ("BDAT +1", Err(Syntax(Verb::Bdat))),
            ("BDAT 10 FIRST", Err(Syntax(Verb::Bdat))),
            ("BDAT 10 LAST x", Err(Syntax(Verb::Bdat))),
            ("GET / HTTP/1.1", Ok(Unknown)),
            ("MAILFROM:<a@example.test>", Ok(Unknown)),
            ("\u{fffd}\u{fffd}", Ok(Unknown)),
            ("", Err(Empty)),
            ("   ", Err(Empty)),
        ];
        for (line, expected) in cases {
            assert_eq!(parse(line), expected, "line {line:?}");
        }
    }

    #[test]
    fn group_enders_follow_rfc2920() {
        let enders: Vec<&str> = [
            "EHLO x",
            "HELO x",
            "DATA",
            "VRFY x",
            "NOOP",
            "QUIT",
            "EXPN x",
            "TURN",
            "STARTTLS",
            "MAIL FROM:<>",
            "RSET",
            "BDAT 10",
            "BDAT 10 LAST",
        ]
        .into_iter()
        .filter(|l| parse(l).is_ok_and(|c| c.ends_group()))
        .collect();
        assert_eq!(enders, ["EHLO x", "HELO x", "DATA", "VRFY x", "NOOP", "QUIT", "EXPN x", "TURN", "STARTTLS"]);
    }
}
