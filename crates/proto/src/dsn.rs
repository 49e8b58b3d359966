//! Delivery status notification parameters (RFC 3461): MAIL's `RET=` and
//! `ENVID=`, RCPT's `NOTIFY=` and `ORCPT=`, decoded from xtext
//! ([`crate::xtext`]). Pure and total: every input gives a value or a
//! [`DsnError`], never a panic. smtpd parses them from MAIL and RCPT;
//! cleanup parses them from a milter's ADDRCPT_PAR and CHGFROM arguments;
//! one home, so both accept exactly the same values.
//!
//! Decoded values travel to cleanup and into the queue file and, later,
//! into DSN messages, so they are held to printable ASCII (RFC 3461 4.4
//! demands it of ENVID; for ORCPT it keeps control characters and raw
//! octets out of headers), and to the lengths the IPC records carry.

use crate::address::MAX_PATH;
use crate::envelope::{DsnRet, MAX_ENVID, Notify};
use crate::xtext;
use thiserror::Error;

/// Longest decoded ORCPT value, `addr-type;` included: what the IPC
/// recipient record carries (an address type plus a path).
pub const MAX_ORCPT: usize = MAX_PATH + 32;

/// Longest encoded ORCPT parameter value (RFC 3461 4.2: "500 characters").
pub const MAX_ORCPT_ENCODED: usize = 500;

/// Which DSN parameter was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum DsnError {
    #[error("bad RET parameter syntax")]
    BadRet,
    #[error("bad ENVID parameter syntax")]
    BadEnvid,
    #[error("bad NOTIFY parameter syntax")]
    BadNotify,
    #[error("bad ORCPT parameter syntax")]
    BadOrcpt,
}

/// `RET=FULL|HDRS` (RFC 3461 4.3), case-insensitive.
pub fn parse_ret(value: Option<&str>) -> Result<DsnRet, DsnError> {
    match value {
        Some(v) if v.eq_ignore_ascii_case("FULL") => Ok(DsnRet::Full),
        Some(v) if v.eq_ignore_ascii_case("HDRS") => Ok(DsnRet::Headers),
        _ => Err(DsnError::BadRet),
    }
}

/// `ENVID=xtext` (RFC 3461 4.4): at most [`MAX_ENVID`] printable ASCII
/// characters once decoded.
pub fn parse_envid(value: Option<&str>) -> Result<String, DsnError> {
    let decoded = value.and_then(|v| xtext::decode(v).ok()).ok_or(DsnError::BadEnvid)?;
    if decoded.is_empty() || decoded.len() > MAX_ENVID {
        return Err(DsnError::BadEnvid);
    }
    Ok(decoded)
}

/// `NOTIFY=NEVER` or a comma list of `SUCCESS`, `FAILURE`, `DELAY`
/// (RFC 3461 4.1); NEVER combines with nothing, and nothing repeats.
pub fn parse_notify(value: Option<&str>) -> Result<Notify, DsnError> {
    let value = value.ok_or(DsnError::BadNotify)?;
    let mut n = Notify::default();
    for word in value.split(',') {
        let flag = match word.to_ascii_uppercase().as_str() {
            "NEVER" => &mut n.never,
            "SUCCESS" => &mut n.success,
            "FAILURE" => &mut n.failure,
            "DELAY" => &mut n.delay,
            _ => return Err(DsnError::BadNotify),
        };
        if std::mem::replace(flag, true) {
            return Err(DsnError::BadNotify);
        }
    }
    if n.never && (n.success || n.failure || n.delay) {
        return Err(DsnError::BadNotify);
    }
    Ok(n)
}

/// `ORCPT=addr-type;xtext` (RFC 3461 4.2), returned decoded as
/// `addr-type;address`. The address type is an atom (`rfc822`, `utf-8`);
/// the decoded address must be non-empty printable ASCII.
pub fn parse_orcpt(value: Option<&str>) -> Result<String, DsnError> {
    let value = value.filter(|v| v.len() <= MAX_ORCPT_ENCODED).ok_or(DsnError::BadOrcpt)?;
    let (kind, address) = value.split_once(';').ok_or(DsnError::BadOrcpt)?;
    let atom = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b);
    if kind.is_empty() || !kind.bytes().all(atom) {
        return Err(DsnError::BadOrcpt);
    }
    let address = xtext::decode(address).ok().filter(|a| !a.is_empty()).ok_or(DsnError::BadOrcpt)?;
    let decoded = format!("{kind};{address}");
    if decoded.len() > MAX_ORCPT {
        return Err(DsnError::BadOrcpt);
    }
    Ok(decoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_table() {
        let n = |never, success, failure, delay| Ok(Notify { never, success, failure, delay });
        let cases: &[(Option<&str>, Result<Notify, DsnError>)] = &[
            (Some("NEVER"), n(true, false, false, false)),
            (Some("never"), n(true, false, false, false)),
            (Some("SUCCESS"), n(false, true, false, false)),
            (Some("SUCCESS,FAILURE,DELAY"), n(false, true, true, true)),
            (Some("delay,Failure"), n(false, false, true, true)),
            (Some("NEVER,SUCCESS"), Err(DsnError::BadNotify)),
            (Some("SUCCESS,SUCCESS"), Err(DsnError::BadNotify)),
            (Some("SUCCESS,"), Err(DsnError::BadNotify)),
            (Some("ALWAYS"), Err(DsnError::BadNotify)),
            (None, Err(DsnError::BadNotify)),
        ];
        for (input, want) in cases {
            assert_eq!(parse_notify(*input), *want, "input {input:?}");
        }
    }

    #[test]
    fn orcpt_table() {
        let long = format!("rfc822;{}@example.test", "a".repeat(300));
        let cases: Vec<(Option<&str>, Result<&str, DsnError>)> = vec![
            (Some("rfc822;bob@example.test"), Ok("rfc822;bob@example.test")),
            (Some("RFC822;b+2Bob@example.test"), Ok("RFC822;b+ob@example.test")),
            (Some("utf-8;bob@example.test"), Ok("utf-8;bob@example.test")),
            (Some("rfc822;"), Err(DsnError::BadOrcpt)),
            (Some(";bob@example.test"), Err(DsnError::BadOrcpt)),
            (Some("rfc822"), Err(DsnError::BadOrcpt)),
            (Some("rfc 822;bob@example.test"), Err(DsnError::BadOrcpt)),
            (Some("rfc822;bob+0A@example.test"), Err(DsnError::BadOrcpt)),
            (Some(long.as_str()), Err(DsnError::BadOrcpt)),
            (None, Err(DsnError::BadOrcpt)),
        ];
        for (input, want) in cases {
            assert_eq!(parse_orcpt(input), want.map(str::to_owned), "input {input:?}");
        }
    }

    #[test]
    fn ret_and_envid() {
        assert_eq!(parse_ret(Some("FULL")), Ok(DsnRet::Full));
        assert_eq!(parse_ret(Some("hdrs")), Ok(DsnRet::Headers));
        assert_eq!(parse_ret(Some("BODY")), Err(DsnError::BadRet));
        assert_eq!(parse_ret(None), Err(DsnError::BadRet));
        assert_eq!(parse_envid(Some("QQ314159+2Bx")), Ok("QQ314159+x".to_owned()));
        assert_eq!(parse_envid(Some(&"x".repeat(MAX_ENVID))), Ok("x".repeat(MAX_ENVID)));
        assert_eq!(parse_envid(Some(&"x".repeat(MAX_ENVID + 1))), Err(DsnError::BadEnvid));
        assert_eq!(parse_envid(Some("a+0Db")), Err(DsnError::BadEnvid));
        assert_eq!(parse_envid(None), Err(DsnError::BadEnvid));
    }
}
