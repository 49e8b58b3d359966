//! SMTP status vocabulary: basic reply codes (RFC 5321 4.2), enhanced
//! status codes (RFC 3463), DSN actions (RFC 3464 2.3.3) and the stage of a
//! conversation a reply answered. smtpd's replies, cleanup's answers, the
//! delivery agents, the queue file and the DSNs all use these types, so a
//! status is parsed once, where it enters, and written once, where it
//! leaves.
//!
//! (`crate::status` is a different thing: the child → master records.)

use std::fmt;
use std::str::FromStr;
use thiserror::Error;

/// Why a text is not a reply code, enhanced status code or DSN action.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StatusParseError {
    #[error("{0:?} is not an SMTP reply code (200-599)")]
    ReplyCode(String),
    #[error("{0:?} is not an enhanced status code (RFC 3463)")]
    Enhanced(String),
    #[error("{0:?} is not a DSN action (RFC 3464)")]
    Action(String),
}

/// The class of an enhanced status code (RFC 3463 3.1): the first digit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StatusClass {
    /// `2`: the action succeeded.
    Success,
    /// `4`: persistent transient failure; a retry may succeed.
    Persistent,
    /// `5`: permanent failure.
    Permanent,
}

impl StatusClass {
    pub const fn digit(self) -> u8 {
        match self {
            StatusClass::Success => 2,
            StatusClass::Persistent => 4,
            StatusClass::Permanent => 5,
        }
    }

    pub const fn from_digit(d: u8) -> Option<Self> {
        match d {
            2 => Some(StatusClass::Success),
            4 => Some(StatusClass::Persistent),
            5 => Some(StatusClass::Permanent),
            _ => None,
        }
    }
}

/// Largest subject or detail number: RFC 3463 allows three digits.
pub const MAX_STATUS_PART: u16 = 999;

/// An enhanced status code, `class.subject.detail` (RFC 3463 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EnhancedStatus {
    class: StatusClass,
    subject: u16,
    detail: u16,
}

impl EnhancedStatus {
    /// # Panics
    /// If `subject` or `detail` exceeds [`MAX_STATUS_PART`]; in a constant
    /// that is a compile error.
    pub const fn new(class: StatusClass, subject: u16, detail: u16) -> Self {
        assert!(subject <= MAX_STATUS_PART && detail <= MAX_STATUS_PART, "RFC 3463 allows three digits");
        Self { class, subject, detail }
    }

    /// As [`EnhancedStatus::new`], `None` for parts out of range (for
    /// decoders).
    pub const fn checked(class: StatusClass, subject: u16, detail: u16) -> Option<Self> {
        if subject <= MAX_STATUS_PART && detail <= MAX_STATUS_PART {
            Some(Self { class, subject, detail })
        } else {
            None
        }
    }

    /// `X.0.0`: "other undefined status" of a class (RFC 3463 3.1), what a
    /// reply without its own enhanced code stands for.
    pub const fn undefined(class: StatusClass) -> Self {
        Self::new(class, 0, 0)
    }

    pub const fn class(self) -> StatusClass {
        self.class
    }

    pub const fn subject(self) -> u16 {
        self.subject
    }

    pub const fn detail(self) -> u16 {
        self.detail
    }

    /// The same subject and detail in another class: `5.7.5` as a
    /// temporary failure is `4.7.5`.
    pub const fn with_class(self, class: StatusClass) -> Self {
        Self { class, ..self }
    }
}

impl fmt::Display for EnhancedStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class.digit(), self.subject, self.detail)
    }
}

impl FromStr for EnhancedStatus {
    type Err = StatusParseError;

    /// Strict RFC 3463 syntax: class `2`, `4` or `5`; subject and detail of
    /// one to three digits without a leading zero, so that parsing and
    /// [`Display`](fmt::Display) give back the same text.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || StatusParseError::Enhanced(s.chars().take(32).collect());
        let mut parts = s.split('.');
        let (Some(class), Some(subject), Some(detail), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let class = match class.as_bytes() {
            [d] => StatusClass::from_digit(d.wrapping_sub(b'0')).ok_or_else(bad)?,
            _ => return Err(bad()),
        };
        let number = |p: &str| {
            let canonical = (1..=3).contains(&p.len())
                && p.bytes().all(|b| b.is_ascii_digit())
                && !(p.len() > 1 && p.starts_with('0'));
            canonical.then(|| p.parse::<u16>().ok()).flatten()
        };
        let (Some(subject), Some(detail)) = (number(subject), number(detail)) else { return Err(bad()) };
        Ok(Self::new(class, subject, detail))
    }
}

/// The class of a basic reply code: its first digit (RFC 5321 4.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReplyClass {
    /// `2yz`
    PositiveCompletion,
    /// `3yz`: send more (`354` after DATA).
    PositiveIntermediate,
    /// `4yz`
    TransientNegative,
    /// `5yz`
    PermanentNegative,
}

/// A basic SMTP reply code, `200` to `599` (RFC 5321 4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReplyCode(u16);

impl ReplyCode {
    /// `None` outside `200..=599`.
    pub const fn new(code: u16) -> Option<Self> {
        if code >= 200 && code <= 599 { Some(Self(code)) } else { None }
    }

    /// For constants.
    ///
    /// # Panics
    /// Outside `200..=599`; in a constant that is a compile error.
    pub const fn of(code: u16) -> Self {
        match Self::new(code) {
            Some(c) => c,
            None => panic!("SMTP reply codes are 200 to 599"),
        }
    }

    pub const fn get(self) -> u16 {
        self.0
    }

    pub const fn class(self) -> ReplyClass {
        match self.0 / 100 {
            2 => ReplyClass::PositiveCompletion,
            3 => ReplyClass::PositiveIntermediate,
            4 => ReplyClass::TransientNegative,
            _ => ReplyClass::PermanentNegative,
        }
    }

    /// The enhanced status class that goes with this code; `None` for
    /// `3yz`, which has none (RFC 3463 2).
    pub const fn status_class(self) -> Option<StatusClass> {
        StatusClass::from_digit((self.0 / 100) as u8)
    }

    pub const fn is_positive(self) -> bool {
        matches!(self.class(), ReplyClass::PositiveCompletion)
    }
}

impl fmt::Display for ReplyCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for ReplyCode {
    type Err = StatusParseError;

    /// Exactly three digits.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || StatusParseError::ReplyCode(s.chars().take(32).collect());
        if s.len() != 3 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        s.parse().ok().and_then(Self::new).ok_or_else(bad)
    }
}

impl TryFrom<u16> for ReplyCode {
    type Error = StatusParseError;

    fn try_from(code: u16) -> Result<Self, Self::Error> {
        Self::new(code).ok_or_else(|| StatusParseError::ReplyCode(code.to_string()))
    }
}

/// The `Action` of a DSN recipient (RFC 3464 2.3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DsnAction {
    Failed,
    Delayed,
    Delivered,
    Relayed,
    Expanded,
}

impl DsnAction {
    pub const fn as_str(self) -> &'static str {
        match self {
            DsnAction::Failed => "failed",
            DsnAction::Delayed => "delayed",
            DsnAction::Delivered => "delivered",
            DsnAction::Relayed => "relayed",
            DsnAction::Expanded => "expanded",
        }
    }
}

impl fmt::Display for DsnAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DsnAction {
    type Err = StatusParseError;

    /// Case-insensitive, as RFC 3464's field values are.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [DsnAction::Failed, DsnAction::Delayed, DsnAction::Delivered, DsnAction::Relayed, DsnAction::Expanded]
            .into_iter()
            .find(|a| a.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| StatusParseError::Action(s.chars().take(32).collect()))
    }
}

/// What a next hop's reply answered: the greeting or a command. Its text
/// is the one Postfix logs in `(in reply to MAIL FROM command)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplyStage {
    Greeting,
    Ehlo,
    Helo,
    Lhlo,
    StartTls,
    MailFrom,
    RcptTo,
    Data,
    /// The reply after the content's final `.`.
    EndOfData,
    Bdat,
    Rset,
    Quit,
}

impl ReplyStage {
    pub const fn as_str(self) -> &'static str {
        match self {
            ReplyStage::Greeting => "initial server greeting",
            ReplyStage::Ehlo => "EHLO",
            ReplyStage::Helo => "HELO",
            ReplyStage::Lhlo => "LHLO",
            ReplyStage::StartTls => "STARTTLS",
            ReplyStage::MailFrom => "MAIL FROM",
            ReplyStage::RcptTo => "RCPT TO",
            ReplyStage::Data => "DATA",
            ReplyStage::EndOfData => "end of DATA",
            ReplyStage::Bdat => "BDAT",
            ReplyStage::Rset => "RSET",
            ReplyStage::Quit => "QUIT",
        }
    }
}

impl fmt::Display for ReplyStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enhanced_status_parse_and_display_table() {
        use StatusClass::*;
        let good = [
            ("2.0.0", Success, 0, 0),
            ("4.4.5", Persistent, 4, 5),
            ("4.7.5", Persistent, 7, 5),
            ("5.1.1", Permanent, 1, 1),
            ("5.999.999", Permanent, 999, 999),
            ("4.10.100", Persistent, 10, 100),
        ];
        for (text, class, subject, detail) in good {
            let s: EnhancedStatus = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!((s.class(), s.subject(), s.detail()), (class, subject, detail), "{text}");
            assert_eq!(s.to_string(), text);
        }
        let bad = [
            "", "4", "4.4", "4.4.5.1", "3.0.0", "1.0.0", "6.0.0", "0.0.0", "45.1.1", "4..1", "4.1.", "4.1000.1",
            "4.1.1000", "4.01.1", "4.1.01", "4.+1.1", "4.-1.1", " 4.1.1", "4.1.1 ", "4.a.1", "٤.1.1", "4.4.5x",
        ];
        for text in bad {
            assert!(text.parse::<EnhancedStatus>().is_err(), "{text:?} accepted");
        }
    }

    #[test]
    fn changing_the_class_keeps_subject_and_detail() {
        for (from, to) in [("5.4.5", "4.4.5"), ("5.7.5", "4.7.5"), ("5.5.5", "4.5.5"), ("4.4.4", "4.4.4")] {
            let s: EnhancedStatus = from.parse().unwrap();
            assert_eq!(s.with_class(StatusClass::Persistent).to_string(), to);
        }
        assert_eq!(EnhancedStatus::undefined(StatusClass::Permanent).to_string(), "5.0.0");
        assert_eq!(EnhancedStatus::checked(StatusClass::Success, 1000, 0), None);
    }

    #[test]
    fn reply_code_table() {
        let good = [
            ("200", ReplyClass::PositiveCompletion, Some(StatusClass::Success)),
            ("250", ReplyClass::PositiveCompletion, Some(StatusClass::Success)),
            ("354", ReplyClass::PositiveIntermediate, None),
            ("421", ReplyClass::TransientNegative, Some(StatusClass::Persistent)),
            ("599", ReplyClass::PermanentNegative, Some(StatusClass::Permanent)),
        ];
        for (text, class, status_class) in good {
            let c: ReplyCode = text.parse().unwrap();
            assert_eq!((c.class(), c.status_class(), c.to_string()), (class, status_class, text.to_owned()));
            assert_eq!(ReplyCode::try_from(c.get()), Ok(c));
        }
        for text in ["", "25", "2500", "199", "600", "099", "+25", "25a", "999"] {
            assert!(text.parse::<ReplyCode>().is_err(), "{text:?} accepted");
        }
        assert_eq!(ReplyCode::new(199), None);
        assert_eq!(ReplyCode::new(600), None);
        assert!(ReplyCode::of(250).is_positive() && !ReplyCode::of(354).is_positive());
    }

    #[test]
    fn dsn_action_table() {
        let all = [
            (DsnAction::Failed, "failed"),
            (DsnAction::Delayed, "delayed"),
            (DsnAction::Delivered, "delivered"),
            (DsnAction::Relayed, "relayed"),
            (DsnAction::Expanded, "expanded"),
        ];
        for (action, text) in all {
            assert_eq!(action.to_string(), text);
            assert_eq!(text.parse::<DsnAction>(), Ok(action));
            assert_eq!(text.to_ascii_uppercase().parse::<DsnAction>(), Ok(action));
        }
        for text in ["", "fail", "delivered ", "bounced"] {
            assert!(text.parse::<DsnAction>().is_err(), "{text:?} accepted");
        }
    }

    #[test]
    fn reply_stage_texts_are_postfix_s() {
        let all = [
            (ReplyStage::Greeting, "initial server greeting"),
            (ReplyStage::Ehlo, "EHLO"),
            (ReplyStage::Helo, "HELO"),
            (ReplyStage::Lhlo, "LHLO"),
            (ReplyStage::StartTls, "STARTTLS"),
            (ReplyStage::MailFrom, "MAIL FROM"),
            (ReplyStage::RcptTo, "RCPT TO"),
            (ReplyStage::Data, "DATA"),
            (ReplyStage::EndOfData, "end of DATA"),
            (ReplyStage::Bdat, "BDAT"),
            (ReplyStage::Rset, "RSET"),
            (ReplyStage::Quit, "QUIT"),
        ];
        for (stage, text) in all {
            assert_eq!(stage.to_string(), text);
        }
    }
}
