//! What the filters decide at one stage, and how a round of policy
//! answers becomes one decision, in Postfix's words (smtpd_check and
//! access(5)): the reply codes, the `<name>: Recipient address rejected:
//! text` shape, DEFER_IF_PERMIT and DEFER_IF_REJECT, and the actions that
//! only log or mark the message (WARN, INFO, HOLD, DISCARD, PREPEND).
//! Pure: no I/O, so every rule is tested on its own.

use crate::engine::reply::clean_line;
use mortal_proto::config::FilterStage;
use mortal_proto::ipc::Edit;
use mortal_proto::milter::{HeaderName, HeaderValue};
use mortal_proto::policy::Action;
use mortal_proto::smtp_status::{EnhancedStatus, ReplyCode, StatusClass};

/// Where the session stops to ask its filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CheckStage {
    Connect,
    Helo,
    Mail,
    Rcpt,
    Data,
    EndOfMessage,
    /// A command smtpd does not know (milters only: SMFIC_UNKNOWN).
    Unknown,
}

impl CheckStage {
    /// The policy stage of the same name, if policy servers are asked here.
    pub fn policy(self) -> Option<FilterStage> {
        Some(match self {
            CheckStage::Connect => FilterStage::Connect,
            CheckStage::Helo => FilterStage::Helo,
            CheckStage::Mail => FilterStage::Mail,
            CheckStage::Rcpt => FilterStage::Rcpt,
            CheckStage::Data => FilterStage::Data,
            CheckStage::EndOfMessage => FilterStage::EndOfMessage,
            CheckStage::Unknown => return None,
        })
    }

    /// What Postfix says is refused at this stage: `<name>: Recipient
    /// address rejected: ...`.
    fn reply_class(self) -> &'static str {
        match self {
            CheckStage::Connect => "Client host",
            CheckStage::Helo => "Helo command",
            CheckStage::Mail => "Sender address",
            CheckStage::Rcpt => "Recipient address",
            CheckStage::Data => "Data command",
            CheckStage::EndOfMessage => "End-of-data",
            CheckStage::Unknown => "Command",
        }
    }
}

/// A reply a filter chose: one line, or several (a milter's multi-line
/// SMFIR_REPLYCODE), each with the same code and enhanced status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterReply {
    pub code: ReplyCode,
    pub status: EnhancedStatus,
    /// At least one.
    pub lines: Vec<String>,
}

impl FilterReply {
    /// A one-line reply.
    pub fn new(code: ReplyCode, status: EnhancedStatus, text: impl Into<String>) -> Self {
        Self { code, status, lines: vec![text.into()] }
    }

    /// The reply as the client gets it: every line `<CR><LF>`-terminated,
    /// `-` after the code on all but the last, each cut to the RFC 5321
    /// line length.
    pub fn wire(&self) -> String {
        let mut out = String::new();
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i + 1 == self.lines.len() { ' ' } else { '-' };
            out.push_str(&clean_line(&format!("{}{sep}{} {line}", self.code, self.status)));
            out.push_str("\r\n");
        }
        out
    }

    /// The reply in one log line: the first line, then the others after
    /// a space.
    pub fn log_text(&self) -> String {
        clean_line(&format!("{} {} {}", self.code, self.status, self.lines.join(" ")))
    }

    /// 421 or 521 (RFC 7504): the session ends after this reply.
    pub fn closes(&self) -> bool {
        matches!(self.code.get(), 421 | 521)
    }
}

/// Who refused, which is the word of the log line (`reject:` for a
/// policy server, `milter-reject:` for a milter, as Postfix logs them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedBy {
    Policy,
    Milter,
}

impl RefusedBy {
    pub fn log_word(self) -> &'static str {
        match self {
            RefusedBy::Policy => "reject",
            RefusedBy::Milter => "milter-reject",
        }
    }
}

/// What the filters decided about a command (or the message).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Decision {
    #[default]
    Continue,
    Refuse {
        reply: FilterReply,
        by: RefusedBy,
    },
}

/// A line to log about the command, in the `reject:` shape with another
/// word: `warn`, `info`, `hold`, `discard`, `milter-hold`,
/// `milter-discard`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub word: &'static str,
    pub text: String,
}

/// The outcome of one check: the decision and what to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    pub notes: Vec<Note>,
}

impl Verdict {
    pub fn proceed() -> Self {
        Verdict { decision: Decision::Continue, notes: Vec::new() }
    }

    /// The command is refused with `reply`, as `by` decided.
    pub fn refused(reply: FilterReply, by: RefusedBy) -> Self {
        Verdict { decision: Decision::Refuse { reply, by }, notes: Vec::new() }
    }
}

/// access(5)'s reply code for REJECT (Postfix access_map_reject_code).
const REJECT_CODE: u16 = 554;
/// access(5)'s reply code for DEFER and the DEFER_IF_* actions (Postfix
/// access_map_defer_code).
const DEFER_CODE: u16 = 450;
/// The text when an action gives none.
const ACCESS_DENIED: &str = "Access denied";

/// One stage's round of policy answers, server after server, folded into
/// one decision as Postfix's restriction list folds them: OK permits and
/// ends the round, REJECT, DEFER and a reply code refuse and end it,
/// DUNNO, WARN, INFO, PREPEND, HOLD and DISCARD go on to the next server,
/// and at the end of the list the command is permitted. DEFER_IF_PERMIT
/// turns that permit into a deferral; DEFER_IF_REJECT turns a later
/// rejection into one.
#[derive(Debug)]
pub struct PolicyRound {
    stage: CheckStage,
    /// What the reply names: the recipient, the sender, the HELO name,
    /// `name[addr]`, `DATA` or `END-OF-MESSAGE`.
    name: String,
    defer_if_permit: Option<FilterReply>,
    defer_if_reject: Option<FilterReply>,
    notes: Vec<Note>,
    edits: Vec<Edit>,
}

impl PolicyRound {
    pub fn new(stage: CheckStage, name: impl Into<String>) -> Self {
        Self {
            stage,
            name: name.into(),
            defer_if_permit: None,
            defer_if_reject: None,
            notes: Vec::new(),
            edits: Vec::new(),
        }
    }

    /// Takes one server's action; `Some` once the round is decided.
    /// `Action::Unsupported` must have been replaced by the caller (with
    /// the service's default action) before it gets here.
    pub fn take(&mut self, action: &Action) -> Option<Decision> {
        match action {
            Action::Ok => Some(self.permit()),
            Action::Dunno | Action::Unsupported(_) => None,
            Action::Reject(text) => Some(self.reject(self.refusal(REJECT_CODE, text.as_deref()))),
            Action::Defer(text) => Some(self.refuse(self.refusal(DEFER_CODE, text.as_deref()))),
            Action::DeferIfReject(text) => {
                self.defer_if_reject.get_or_insert(self.refusal(DEFER_CODE, text.as_deref()));
                None
            }
            Action::DeferIfPermit(text) => {
                self.defer_if_permit.get_or_insert(self.refusal(DEFER_CODE, text.as_deref()));
                None
            }
            Action::Reply { code, status, text } => {
                let reply = self.reply(*code, *status, text);
                Some(if code.get() >= 500 { self.reject(reply) } else { self.refuse(reply) })
            }
            Action::Prepend(header) => {
                if let Some(edit) = prepend(header) {
                    self.edits.push(edit);
                }
                None
            }
            Action::Hold(text) => {
                let reason = self.triggers(text.as_deref(), "HOLD");
                self.notes.push(Note { word: "hold", text: reason.clone() });
                self.edits.push(Edit::Hold { reason });
                None
            }
            Action::Discard(text) => {
                let reason = self.triggers(text.as_deref(), "DISCARD");
                self.notes.push(Note { word: "discard", text: reason.clone() });
                self.edits.push(Edit::Discard { reason });
                None
            }
            Action::Warn(text) => {
                self.notes.push(Note { word: "warn", text: text.clone() });
                None
            }
            Action::Info(text) => {
                self.notes.push(Note { word: "info", text: text.clone() });
                None
            }
        }
    }

    /// What the next action is about (a restriction list names the
    /// subject of each restriction, not of the list).
    pub fn about(&mut self, stage: CheckStage, name: impl Into<String>) {
        self.stage = stage;
        self.name = name.into();
    }

    /// A reply already in its final form (`Relay access denied`, a DNSBL
    /// listing): a rejection for 5xx (which a DEFER_IF_REJECT softens), a
    /// refusal for 4xx.
    pub fn take_reply(&mut self, reply: FilterReply) -> Decision {
        if reply.code.get() >= 500 { self.reject(reply) } else { self.refuse(reply) }
    }

    /// DEFER_IF_PERMIT with a reply already formed.
    pub fn defer_if_permit(&mut self, reply: FilterReply) {
        self.defer_if_permit.get_or_insert(reply);
    }

    /// `<name>: Class rejected: text` with this code and status.
    pub fn reply_for(&self, code: ReplyCode, status: EnhancedStatus, text: &str) -> FilterReply {
        self.reply(code, Some(status), text)
    }

    /// The end of the list: permitted, unless a DEFER_IF_PERMIT came.
    pub fn finish(self) -> (Decision, Vec<Note>, Vec<Edit>) {
        let mut round = self;
        let decision = round.permit();
        (decision, round.notes, round.edits)
    }

    /// The notes and edits so far, for a round that ended with a decision.
    pub fn into_parts(self) -> (Vec<Note>, Vec<Edit>) {
        (self.notes, self.edits)
    }

    fn permit(&mut self) -> Decision {
        match self.defer_if_permit.take() {
            Some(reply) => self.refuse(reply),
            None => Decision::Continue,
        }
    }

    fn reject(&mut self, reply: FilterReply) -> Decision {
        match self.defer_if_reject.take() {
            Some(defer) => self.refuse(defer),
            None => self.refuse(reply),
        }
    }

    fn refuse(&self, reply: FilterReply) -> Decision {
        Decision::Refuse { reply, by: RefusedBy::Policy }
    }

    /// `code` with the status the text starts with (when of the code's
    /// class) or `x.7.1`, and the text or "Access denied".
    fn refusal(&self, code: u16, text: Option<&str>) -> FilterReply {
        let code = ReplyCode::of(code);
        self.reply(code, None, text.unwrap_or(ACCESS_DENIED))
    }

    fn reply(&self, code: ReplyCode, status: Option<EnhancedStatus>, text: &str) -> FilterReply {
        let class = code.status_class().unwrap_or(StatusClass::Permanent);
        let (status, text) = match status {
            Some(s) => (s, text),
            None => split_status(text, class),
        };
        let text = if text.is_empty() { ACCESS_DENIED } else { text };
        FilterReply::new(code, status, format!("<{}>: {} rejected: {text}", self.name, self.stage.reply_class()))
    }

    /// `<name>: Recipient address triggers HOLD action`, or the server's
    /// text in its place.
    fn triggers(&self, text: Option<&str>, action: &str) -> String {
        match text {
            Some(t) => format!("<{}>: {} {t}", self.name, self.stage.reply_class()),
            None => format!("<{}>: {} triggers {action} action", self.name, self.stage.reply_class()),
        }
    }
}

/// An enhanced status code of `class` at the start of `text`, and the
/// rest; `class.7.1` when there is none (Postfix's dsn_split with the
/// access(5) default).
fn split_status(text: &str, class: StatusClass) -> (EnhancedStatus, &str) {
    let (first, rest) = match text.split_once(' ') {
        Some((f, r)) => (f, r.trim_start()),
        None => (text, ""),
    };
    match first.parse::<EnhancedStatus>() {
        Ok(status) if status.class() == class => (status, rest),
        _ => (EnhancedStatus::new(class, 7, 1), text),
    }
}

/// `PREPEND name: value` as the edit cleanup applies; `None` (logged) if
/// it is no header line.
fn prepend(header: &str) -> Option<Edit> {
    let (name, value) = header.split_once(':')?;
    match (HeaderName::new(name), HeaderValue::new(value.as_bytes())) {
        (Some(name), Some(value)) => Some(Edit::Prepend { name, value }),
        _ => {
            tracing::warn!("warning: policy server PREPEND is not a header line: {header:?}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn act(s: &str) -> Action {
        Action::parse(s).unwrap()
    }

    fn refused(d: &Decision) -> String {
        match d {
            Decision::Refuse { reply, by: RefusedBy::Policy } => reply.log_text(),
            other => panic!("{other:?}"),
        }
    }

    /// Postfix's replies for each action, as its logs and postgrey's
    /// users know them.
    #[test]
    fn actions_become_postfix_replies() {
        let cases = [
            ("REJECT", "554 5.7.1 <b@example.test>: Recipient address rejected: Access denied"),
            ("REJECT no such user", "554 5.7.1 <b@example.test>: Recipient address rejected: no such user"),
            ("DEFER", "450 4.7.1 <b@example.test>: Recipient address rejected: Access denied"),
            ("550 5.1.1 unknown", "550 5.1.1 <b@example.test>: Recipient address rejected: unknown"),
            ("421 go away", "421 4.7.1 <b@example.test>: Recipient address rejected: go away"),
            (
                "451 4.3.5 Server configuration problem",
                "451 4.3.5 <b@example.test>: Recipient address rejected: Server configuration problem",
            ),
        ];
        for (action, want) in cases {
            let mut round = PolicyRound::new(CheckStage::Rcpt, "b@example.test");
            assert_eq!(refused(&round.take(&act(action)).unwrap()), want, "{action}");
        }
    }

    /// postgrey answers DEFER_IF_PERMIT with a status in its text: with
    /// nothing else to say, that is the deferral Postfix gives.
    #[test]
    fn defer_if_permit_defers_a_permit() {
        let mut round = PolicyRound::new(CheckStage::Rcpt, "b@example.test");
        let greylisted = "DEFER_IF_PERMIT 4.2.0 Greylisted, see http://postgrey.schweikert.ch/help/example.test.html";
        assert_eq!(round.take(&act(greylisted)), None);
        let (decision, notes, edits) = round.finish();
        assert_eq!(
            refused(&decision),
            "450 4.2.0 <b@example.test>: Recipient address rejected: Greylisted, see http://postgrey.schweikert.ch/help/example.test.html"
        );
        assert!(notes.is_empty() && edits.is_empty());
        // OK later in the list permits, which the deferral turns into 450.
        let mut round = PolicyRound::new(CheckStage::Rcpt, "b@example.test");
        round.take(&act("DEFER_IF_PERMIT"));
        assert!(refused(&round.take(&act("OK")).unwrap()).starts_with("450 4.7.1 "));
        // A REJECT later still rejects.
        let mut round = PolicyRound::new(CheckStage::Rcpt, "b@example.test");
        round.take(&act("DEFER_IF_PERMIT"));
        assert!(refused(&round.take(&act("REJECT")).unwrap()).starts_with("554 5.7.1 "));
    }

    #[test]
    fn defer_if_reject_softens_a_later_reject() {
        let mut round = PolicyRound::new(CheckStage::Mail, "a@example.org");
        round.take(&act("DEFER_IF_REJECT maybe later"));
        assert_eq!(
            refused(&round.take(&act("REJECT")).unwrap()),
            "450 4.7.1 <a@example.org>: Sender address rejected: maybe later"
        );
        let mut round = PolicyRound::new(CheckStage::Mail, "a@example.org");
        round.take(&act("DEFER_IF_REJECT"));
        assert_eq!(round.finish().0, Decision::Continue);
    }

    #[test]
    fn marks_and_notes_go_on_to_the_next_server() {
        let mut round = PolicyRound::new(CheckStage::Rcpt, "b@example.test");
        for a in
            ["PREPEND X-Greylist: delayed 300 seconds", "HOLD", "DISCARD spam trap", "WARN odd", "INFO fine", "DUNNO"]
        {
            assert_eq!(round.take(&act(a)), None, "{a}");
        }
        let (decision, notes, edits) = round.finish();
        assert_eq!(decision, Decision::Continue);
        let words: Vec<(&str, &str)> = notes.iter().map(|n| (n.word, n.text.as_str())).collect();
        assert_eq!(
            words,
            [
                ("hold", "<b@example.test>: Recipient address triggers HOLD action"),
                ("discard", "<b@example.test>: Recipient address spam trap"),
                ("warn", "odd"),
                ("info", "fine"),
            ]
        );
        assert_eq!(
            edits[0],
            Edit::Prepend {
                name: HeaderName::new("X-Greylist").unwrap(),
                value: HeaderValue::new(b" delayed 300 seconds").unwrap()
            }
        );
        assert!(matches!(&edits[1], Edit::Hold { .. }) && matches!(&edits[2], Edit::Discard { .. }));
    }

    #[test]
    fn each_stage_names_what_it_refuses() {
        for (stage, name, want) in [
            (CheckStage::Connect, "unknown[192.0.2.1]", "<unknown[192.0.2.1]>: Client host rejected"),
            (CheckStage::Helo, "bad.example", "<bad.example>: Helo command rejected"),
            (CheckStage::Mail, "", "<>: Sender address rejected"),
            (CheckStage::Data, "DATA", "<DATA>: Data command rejected"),
            (CheckStage::EndOfMessage, "END-OF-MESSAGE", "<END-OF-MESSAGE>: End-of-data rejected"),
        ] {
            let mut round = PolicyRound::new(stage, name);
            assert_eq!(refused(&round.take(&act("REJECT")).unwrap()), format!("554 5.7.1 {want}: Access denied"));
        }
    }

    #[test]
    fn multi_line_replies_keep_code_and_status_on_every_line() {
        let code = ReplyCode::of(550);
        let status = EnhancedStatus::new(StatusClass::Permanent, 7, 1);
        let reply = FilterReply { code, status, lines: vec!["first".into(), "second".into()] };
        assert_eq!(reply.wire(), "550-5.7.1 first\r\n550 5.7.1 second\r\n");
        assert_eq!(reply.log_text(), "550 5.7.1 first second");
    }
}
