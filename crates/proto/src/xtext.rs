//! xtext (RFC 3461 section 4), the encoding of the DSN parameters `ENVID`
//! and `ORCPT`: smtpd decodes them from MAIL and RCPT, the SMTP and LMTP
//! clients encode them again for the next hop.
//!
//! An `xchar` is any of `!` to `~` except `+` and `=`; `+` and two
//! upper-case hex digits stand for any octet. Decoded values are held to
//! printable ASCII (space to `~`): RFC 3461 4.4 demands it of ENVID, and
//! for ORCPT it keeps control characters and raw octets out of the queue
//! file and of DSN headers. So [`decode`] of [`encode`] gives back every
//! printable ASCII string.

use thiserror::Error;

/// Why a string is not acceptable xtext.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum XtextError {
    /// An octet that is neither an `xchar` nor the start of `+HH`.
    #[error("octet {0:#04x} is not an xchar")]
    NotXchar(u8),
    /// `+` not followed by two upper-case hex digits.
    #[error("'+' is not followed by two upper-case hex digits")]
    BadEscape,
    /// The value decodes to an octet outside printable ASCII.
    #[error("decoded octet {0:#04x} is not printable ASCII")]
    NotPrintable(u8),
}

/// Encodes `s`: every octet outside `!` to `~`, and `+` and `=`, becomes `+HH`.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if is_xchar(b) {
            out.push(char::from(b));
        } else {
            out.push('+');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
    out
}

/// Decodes `s`, which must be xtext standing for printable ASCII.
pub fn decode(s: &str) -> Result<String, XtextError> {
    let bytes = s.as_bytes();
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let octet = if b == b'+' {
            let hex = bytes.get(i + 1..i + 3).ok_or(XtextError::BadEscape)?;
            i += 3;
            (hex_digit(hex[0])? << 4) | hex_digit(hex[1])?
        } else if is_xchar(b) {
            i += 1;
            b
        } else {
            return Err(XtextError::NotXchar(b));
        };
        if !(b' '..=b'~').contains(&octet) {
            return Err(XtextError::NotPrintable(octet));
        }
        out.push(char::from(octet));
    }
    Ok(out)
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn is_xchar(b: u8) -> bool {
    (b'!'..=b'~').contains(&b) && b != b'+' && b != b'='
}

fn hex_digit(h: u8) -> Result<u8, XtextError> {
    match h {
        b'0'..=b'9' => Ok(h - b'0'),
        b'A'..=b'F' => Ok(h - b'A' + 10),
        _ => Err(XtextError::BadEscape),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_table() {
        use XtextError::{BadEscape, NotPrintable, NotXchar};
        let cases: &[(&str, Result<&str, XtextError>)] = &[
            ("abc", Ok("abc")),
            ("", Ok("")),
            ("a+2Bb", Ok("a+b")),
            ("a+3Db", Ok("a=b")),
            ("+20", Ok(" ")),
            ("+7E~", Ok("~~")),
            ("user+40example.test", Ok("user@example.test")),
            // Lower-case hex is not xtext.
            ("a+2bb", Err(BadEscape)),
            ("a+2", Err(BadEscape)),
            ("a+", Err(BadEscape)),
            ("a+ZZ", Err(BadEscape)),
            ("a+G0", Err(BadEscape)),
            ("a=b", Err(NotXchar(b'='))),
            ("a b", Err(NotXchar(b' '))),
            ("a\tb", Err(NotXchar(b'\t'))),
            ("+0D+0A", Err(NotPrintable(0x0d))),
            ("+00", Err(NotPrintable(0))),
            ("+7F", Err(NotPrintable(0x7f))),
            ("+FF", Err(NotPrintable(0xff))),
            ("j\u{fc}rgen", Err(NotXchar(0xc3))),
        ];
        for (input, want) in cases {
            assert_eq!(decode(input).as_deref(), want.as_ref().map(|s| *s), "input {input:?}");
        }
    }

    #[test]
    fn encode_table() {
        assert_eq!(encode("a+b=c d"), "a+2Bb+3Dc+20d");
        assert_eq!(encode("rfc822;bob@example.test"), "rfc822;bob@example.test");
        assert_eq!(encode("\u{fc}"), "+C3+BC");
        assert_eq!(encode("\r\n\u{7f}"), "+0D+0A+7F");
        assert_eq!(encode(""), "");
    }

    /// Every printable ASCII string survives the round trip, and what
    /// [`encode`] writes is always xtext syntax.
    #[test]
    fn round_trip() {
        let printable: String = (b' '..=b'~').map(char::from).collect();
        for s in [printable.as_str(), "", "+", "=", "++==  ", "QQ314159+x", "a b"] {
            let encoded = encode(s);
            assert!(encoded.bytes().all(|b| is_xchar(b) || b == b'+'), "{encoded}");
            assert_eq!(decode(&encoded).as_deref(), Ok(s), "{s:?} as {encoded:?}");
        }
        for b in (0u8..=255).filter(|b| !(b' '..=b'~').contains(b)) {
            let escaped = format!("+{}{}", char::from(HEX[usize::from(b >> 4)]), char::from(HEX[usize::from(b & 15)]));
            assert_eq!(decode(&escaped), Err(XtextError::NotPrintable(b)), "{escaped}");
        }
        // Beyond ASCII, encoding is still defined (octet by octet), and the
        // decoder refuses what it gives.
        assert_eq!(decode(&encode("j\u{fc}rgen")), Err(XtextError::NotPrintable(0xc3)));
    }
}
