//! `header_checks` and `body_checks` (Postfix's header_checks(5)): each
//! logical header field of the message as received (continuation lines
//! joined, without their line breaks) and each body line is looked up in
//! the configured tables, usually `regexp:`/`pcre:`, and the first result
//! is carried out: `REJECT` the message, `HOLD` it in `hold/`, `DISCARD`
//! it, `WARN` or `INFO` in the log, `IGNORE` (drop the line), `PREPEND` a
//! line before it, `REPLACE` it; `DUNNO` and `OK` do nothing.
//!
//! The checks see the message as the client sent it, before the filters'
//! edits are applied (a milter sees the same message): a header a check
//! removed is not there for a milter's edit to find. They are bounded per
//! message: body lines past `body_checks_size_limit` octets are not
//! looked at (Postfix's default 51200), and once `checks_time_limit` has
//! passed the rest of the message is let through unchecked, with a
//! warning. Every table result is an action or a `warning:` line; nothing
//! in a table can make cleanup accept what its other checks refuse.

use mortal_proto::config::Config;
use mortal_proto::table::{Table, TableError};
use std::time::{Duration, Instant};

/// Longest text a table result may put in a header or body line.
pub const MAX_LINE_TEXT: usize = 998;

/// What one table result asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckAction {
    Reject(Option<String>),
    Hold(Option<String>),
    Discard(Option<String>),
    Warn(Option<String>),
    Info(Option<String>),
    Ignore,
    Prepend(String),
    Replace(String),
    Dunno,
}

impl CheckAction {
    /// A table result: the verb (any case) and its text.
    pub fn parse(result: &str) -> Result<CheckAction, String> {
        let result = result.trim();
        let (verb, text) = match result.split_once(char::is_whitespace) {
            Some((v, t)) => (v, Some(t.trim())),
            None => (result, None),
        };
        let text = text.filter(|t| !t.is_empty()).map(str::to_owned);
        let line = |what: &str| -> Result<String, String> {
            match &text {
                Some(t) if t.len() <= MAX_LINE_TEXT && !t.contains(['\r', '\n', '\0']) => Ok(t.clone()),
                Some(_) => Err(format!("{what} text longer than {MAX_LINE_TEXT} octets or not one line")),
                None => Err(format!("{what} needs a text")),
            }
        };
        Ok(match verb.to_ascii_uppercase().as_str() {
            "REJECT" => CheckAction::Reject(text),
            "HOLD" => CheckAction::Hold(text),
            "DISCARD" => CheckAction::Discard(text),
            "WARN" => CheckAction::Warn(text),
            "INFO" => CheckAction::Info(text),
            "IGNORE" => CheckAction::Ignore,
            "PREPEND" => CheckAction::Prepend(line("PREPEND")?),
            "REPLACE" => CheckAction::Replace(line("REPLACE")?),
            "DUNNO" | "OK" => CheckAction::Dunno,
            other => return Err(format!("{other:?} is not a header_checks(5) action mortal carries out")),
        })
    }
}

/// Where a decision came from: `header Subject: ...` or `body ...`, as
/// Postfix's log lines name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub what: String,
    pub text: Option<String>,
}

/// One line to log about the message: `warning`, `info`, `replace`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub word: &'static str,
    pub found: Found,
}

/// What the checks decided about one message so far.
#[derive(Debug, Default)]
pub struct Verdict {
    pub reject: Option<Found>,
    pub hold: Option<Found>,
    pub discard: Option<Found>,
    pub notes: Vec<Note>,
    /// The time limit passed and checking stopped.
    pub timed_out: bool,
}

impl Verdict {
    /// A decision that ends the checking (the message is not kept as is).
    fn decided(&self) -> bool {
        self.reject.is_some() || self.discard.is_some()
    }
}

/// The tables of one cleanup process, loaded at start.
#[derive(Debug, Default)]
pub struct ContentChecks {
    header: Vec<Table>,
    body: Vec<Table>,
    body_limit: usize,
    time_limit: Duration,
}

impl ContentChecks {
    pub fn load(config: &Config) -> Result<Self, TableError> {
        let c = &config.cleanup;
        let timeout = config.server.table_timeout;
        Ok(Self {
            header: c.header_checks.iter().map(|s| Table::load_with(s, timeout)).collect::<Result<_, _>>()?,
            body: c.body_checks.iter().map(|s| Table::load_with(s, timeout)).collect::<Result<_, _>>()?,
            body_limit: c.body_checks_size_limit,
            time_limit: c.checks_time_limit,
        })
    }

    pub fn has_body_checks(&self) -> bool {
        !self.body.is_empty()
    }

    /// The first result for `key` among `tables`, as an action; a result
    /// that is none is logged and ignored, as Postfix does.
    fn action(tables: &[Table], key: &str, log_id: &str) -> CheckAction {
        let mut found = None;
        for table in tables {
            match table.lookup(key) {
                Ok(Some(result)) => {
                    found = Some(result);
                    break;
                }
                Ok(None) => {}
                // A check that cannot be made is skipped: the message is
                // not refused for a table server's trouble.
                Err(e) => tracing::warn!("warning: {log_id}: header_checks/body_checks: {e}"),
            }
        }
        let Some(result) = found else { return CheckAction::Dunno };
        CheckAction::parse(&result).unwrap_or_else(|e| {
            tracing::warn!("warning: {log_id}: header_checks/body_checks result {result:?}: {e}");
            CheckAction::Dunno
        })
    }

    /// Checks the header section `header` (as received: field lines and
    /// their continuations, CRLF or LF ended, without the empty line) and
    /// returns it as the checks leave it.
    pub fn header(&self, header: &[u8], started: Instant, verdict: &mut Verdict, log_id: &str) -> Vec<u8> {
        if self.header.is_empty() {
            return header.to_vec();
        }
        let mut out = Vec::with_capacity(header.len());
        for field in fields(header) {
            if verdict.decided() || verdict.timed_out || self.over_time(started, verdict, log_id) {
                out.extend_from_slice(field);
                continue;
            }
            let logical = unfold(field);
            let found = |text: Option<String>| Found { what: format!("header {logical}"), text };
            match Self::action(&self.header, &logical, log_id) {
                CheckAction::Dunno => out.extend_from_slice(field),
                CheckAction::Ignore => {}
                CheckAction::Prepend(line) => {
                    push_line(&mut out, &line);
                    out.extend_from_slice(field);
                }
                CheckAction::Replace(line) => {
                    verdict.notes.push(Note { word: "replace", found: found(Some(line.clone())) });
                    push_line(&mut out, &line);
                }
                other => {
                    out.extend_from_slice(field);
                    decide(other, found, verdict);
                }
            }
        }
        out
    }

    fn over_time(&self, started: Instant, verdict: &mut Verdict, log_id: &str) -> bool {
        if started.elapsed() <= self.time_limit {
            return false;
        }
        verdict.timed_out = true;
        tracing::warn!(
            "warning: {log_id}: header_checks and body_checks stopped after checks_time_limit ({:?}): \
             the rest of the message is not checked",
            self.time_limit
        );
        true
    }
}

/// REJECT, HOLD, DISCARD, WARN, INFO: recorded in the verdict.
fn decide(action: CheckAction, found: impl Fn(Option<String>) -> Found, verdict: &mut Verdict) {
    match action {
        CheckAction::Reject(text) => verdict.reject = Some(found(text)),
        CheckAction::Hold(text) => {
            verdict.hold.get_or_insert(found(text));
        }
        CheckAction::Discard(text) => verdict.discard = Some(found(text)),
        CheckAction::Warn(text) => verdict.notes.push(Note { word: "warning", found: found(text) }),
        CheckAction::Info(text) => verdict.notes.push(Note { word: "info", found: found(text) }),
        CheckAction::Dunno | CheckAction::Ignore | CheckAction::Prepend(_) | CheckAction::Replace(_) => {}
    }
}

fn push_line(out: &mut Vec<u8>, line: &str) {
    out.extend_from_slice(line.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The header fields of `header`, each with its continuation lines and
/// line ends, in order; together they are all of `header`.
fn fields(header: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut pos = 0;
    while pos < header.len() {
        let end = header[pos..].iter().position(|&b| b == b'\n').map_or(header.len(), |i| pos + i + 1);
        let next_is_continuation = header.get(end).is_some_and(|&b| b == b' ' || b == b'\t');
        if !next_is_continuation {
            out.push(&header[start..end]);
            start = end;
        }
        pos = end;
    }
    if start < header.len() {
        out.push(&header[start..]);
    }
    out
}

/// A field as one line: its line breaks removed, the rest (the folding
/// white space too) kept; bytes that are not UTF-8 are replaced.
fn unfold(field: &[u8]) -> String {
    let text = String::from_utf8_lossy(field);
    text.replace("\r\n", "").replace('\n', "")
}

/// body_checks over the body as it streams by: complete lines are checked
/// and passed on as the checks leave them; past the size limit (or after
/// a decision, or the time limit) the rest passes unchanged.
#[derive(Debug, Default)]
pub struct BodyChecker {
    /// A line not yet complete.
    partial: Vec<u8>,
    /// Octets of body looked at so far.
    checked: usize,
    /// Checking is over for this message.
    done: bool,
}

impl BodyChecker {
    /// Takes `chunk` of the body; what to write goes to `out`.
    pub fn feed(
        &mut self,
        checks: &ContentChecks,
        chunk: &[u8],
        out: &mut Vec<u8>,
        started: Instant,
        verdict: &mut Verdict,
        log_id: &str,
    ) {
        if self.done || checks.body.is_empty() {
            out.extend_from_slice(chunk);
            return;
        }
        let mut rest = chunk;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            let (line, after) = rest.split_at(i + 1);
            rest = after;
            if self.done {
                out.extend_from_slice(line);
                continue;
            }
            self.partial.extend_from_slice(line);
            let whole = std::mem::take(&mut self.partial);
            self.line(checks, &whole, out, started, verdict, log_id);
        }
        if self.done {
            out.extend_from_slice(rest);
        } else {
            self.partial.extend_from_slice(rest);
            // A line longer than what is left to check is not checked.
            if self.checked + self.partial.len() > checks.body_limit {
                out.append(&mut self.partial);
                self.done = true;
            }
        }
    }

    /// The end of the body: the last line, if it had no line end.
    pub fn finish(
        &mut self,
        checks: &ContentChecks,
        out: &mut Vec<u8>,
        started: Instant,
        verdict: &mut Verdict,
        log_id: &str,
    ) {
        let last = std::mem::take(&mut self.partial);
        if !last.is_empty() {
            if self.done {
                out.extend_from_slice(&last);
            } else {
                self.line(checks, &last, out, started, verdict, log_id);
            }
        }
        self.done = true;
    }

    fn line(
        &mut self,
        checks: &ContentChecks,
        line: &[u8],
        out: &mut Vec<u8>,
        started: Instant,
        verdict: &mut Verdict,
        log_id: &str,
    ) {
        self.checked += line.len();
        if self.checked > checks.body_limit
            || verdict.decided()
            || verdict.timed_out
            || checks.over_time(started, verdict, log_id)
        {
            self.done = true;
            out.extend_from_slice(line);
            return;
        }
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches(['\r', '\n']);
        let found = |t: Option<String>| Found { what: format!("body {text}"), text: t };
        match ContentChecks::action(&checks.body, text, log_id) {
            CheckAction::Dunno => out.extend_from_slice(line),
            CheckAction::Ignore => {}
            CheckAction::Prepend(new) => {
                push_line(out, &new);
                out.extend_from_slice(line);
            }
            CheckAction::Replace(new) => {
                verdict.notes.push(Note { word: "replace", found: found(Some(new.clone())) });
                push_line(out, &new);
            }
            other => {
                out.extend_from_slice(line);
                decide(other, found, verdict);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mortal_proto::table::TableSpec;

    fn checks(header: &str, body: &str, body_limit: usize) -> ContentChecks {
        let table = |text: &str| {
            let spec = TableSpec::Regexp("/etc/mortal/checks".into());
            Table::parse(&spec, text).unwrap()
        };
        ContentChecks {
            header: if header.is_empty() { vec![] } else { vec![table(header)] },
            body: if body.is_empty() { vec![] } else { vec![table(body)] },
            body_limit,
            time_limit: Duration::from_secs(10),
        }
    }

    #[test]
    fn actions_parse_like_header_checks_5() {
        assert_eq!(CheckAction::parse("reject spam"), Ok(CheckAction::Reject(Some("spam".into()))));
        assert_eq!(CheckAction::parse("HOLD"), Ok(CheckAction::Hold(None)));
        assert_eq!(CheckAction::parse("PREPEND X-Seen: yes"), Ok(CheckAction::Prepend("X-Seen: yes".into())));
        assert_eq!(CheckAction::parse("OK"), Ok(CheckAction::Dunno));
        assert!(CheckAction::parse("PREPEND").unwrap_err().contains("needs a text"));
        assert!(CheckAction::parse("REDIRECT a@b").unwrap_err().contains("not a header_checks(5) action"));
    }

    #[test]
    fn header_lines_are_matched_unfolded_and_edited() {
        let c = checks(
            "/^Subject:.*cheap pills/ REJECT no pills\n/^X-Drop:/ IGNORE\n/^X-Old: (.*)/ REPLACE X-New: $1\n\
             /^From:/ PREPEND X-From-Seen: yes\n/^X-Watch:/ WARN watched\n",
            "",
            0,
        );
        let header =
            b"From: a@example.org\r\nX-Drop: me\r\nX-Old: value\r\nX-Watch: 1\r\nSubject: buy\r\n cheap pills\r\n";
        let mut verdict = Verdict::default();
        let out = c.header(header, Instant::now(), &mut verdict, "ID");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "X-From-Seen: yes\r\nFrom: a@example.org\r\nX-New: value\r\nX-Watch: 1\r\nSubject: buy\r\n cheap pills\r\n"
        );
        assert_eq!(
            verdict.reject,
            Some(Found { what: "header Subject: buy cheap pills".into(), text: Some("no pills".into()) })
        );
        let words: Vec<&str> = verdict.notes.iter().map(|n| n.word).collect();
        assert_eq!(words, ["replace", "warning"]);
    }

    #[test]
    fn body_lines_across_chunks_and_the_size_limit() {
        let c = checks("", "/^unsubscribe now$/ DISCARD\n/secret/ REPLACE [redacted]\n/^hold me/ HOLD\n", 40);
        let mut verdict = Verdict::default();
        let mut body = BodyChecker::default();
        let mut out = Vec::new();
        let started = Instant::now();
        for chunk in [&b"hello\r\nthe sec"[..], b"ret is\r\nhold me\r\n", b"unsubscribe now\r\n", b"tail"] {
            body.feed(&c, chunk, &mut out, started, &mut verdict, "ID");
        }
        body.finish(&c, &mut out, started, &mut verdict, "ID");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "hello\r\n[redacted]\r\nhold me\r\nunsubscribe now\r\ntail",
            "the line past 40 octets is not checked"
        );
        assert_eq!(verdict.hold.as_ref().map(|f| f.what.as_str()), Some("body hold me"));
        assert_eq!(verdict.discard, None, "past body_checks_size_limit");
    }
}
