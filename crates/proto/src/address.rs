//! RFC 5321 envelope address syntax (section 4.1.2), with the RFC 6531
//! extension for UTF-8 local parts and domains.
//!
//! smtpd parses with these functions and cleanup parses again with the same
//! functions: the second check is what stops a compromised smtpd from
//! spooling an address the first one would have refused.

use std::fmt;
use thiserror::Error;

/// RFC 5321 4.5.3.1.1: maximum octets in a local part.
pub const MAX_LOCAL_PART: usize = 64;
/// RFC 5321 4.5.3.1.2: maximum octets in a domain.
pub const MAX_DOMAIN: usize = 255;
/// RFC 5321 4.5.3.1.3: maximum octets in a path, angle brackets included.
pub const MAX_PATH: usize = 256;

/// A syntactically valid mailbox, `local@domain`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Mailbox {
    /// The local part exactly as the client sent it (quotes included).
    pub local: String,
    /// The domain or address literal exactly as sent.
    pub domain: String,
}

impl Mailbox {
    /// Whether any octet is outside ASCII (RFC 6531 needs SMTPUTF8 then).
    pub fn is_utf8(&self) -> bool {
        !self.local.is_ascii() || !self.domain.is_ascii()
    }

    /// The domain in lower case, for comparisons (domains are case-insensitive).
    pub fn domain_lowercase(&self) -> String {
        self.domain.to_lowercase()
    }
}

impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

/// Why an address is not acceptable; each says which rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AddressError {
    #[error("path is not enclosed in <>")]
    MissingBrackets,
    #[error("path is longer than {MAX_PATH} octets")]
    PathTooLong,
    #[error("address has no @domain part")]
    MissingDomain,
    #[error("local part is empty or longer than {MAX_LOCAL_PART} octets")]
    BadLocalLength,
    #[error("domain is empty or longer than {MAX_DOMAIN} octets")]
    BadDomainLength,
    #[error("local part has invalid syntax")]
    BadLocalPart,
    #[error("domain has invalid syntax")]
    BadDomain,
    #[error("address literal has invalid syntax")]
    BadAddressLiteral,
    #[error("UTF-8 address without SMTPUTF8")]
    Utf8NotAllowed,
    #[error("invalid source route")]
    BadSourceRoute,
}

/// Parses a `Reverse-path`: `<>` gives `None`.
pub fn parse_reverse_path(input: &str, allow_utf8: bool) -> Result<Option<Mailbox>, AddressError> {
    if input == "<>" {
        return Ok(None);
    }
    parse_path(input, allow_utf8).map(Some)
}

/// Parses a `Path`: `<` [source route `:`] mailbox `>`. The obsolete source
/// route is checked for syntax and dropped, as RFC 5321 section C allows.
pub fn parse_path(input: &str, allow_utf8: bool) -> Result<Mailbox, AddressError> {
    if input.len() > MAX_PATH {
        return Err(AddressError::PathTooLong);
    }
    let inner = input.strip_prefix('<').and_then(|s| s.strip_suffix('>')).ok_or(AddressError::MissingBrackets)?;
    let mailbox = match inner.strip_prefix('@') {
        Some(_) => {
            let (route, rest) = inner.split_once(':').ok_or(AddressError::BadSourceRoute)?;
            for hop in route.split(',') {
                let domain = hop.strip_prefix('@').ok_or(AddressError::BadSourceRoute)?;
                check_domain(domain, allow_utf8).map_err(|_| AddressError::BadSourceRoute)?;
            }
            rest
        }
        None => inner,
    };
    parse_mailbox(mailbox, allow_utf8)
}

/// Parses a bare `Mailbox` (`local@domain`).
pub fn parse_mailbox(input: &str, allow_utf8: bool) -> Result<Mailbox, AddressError> {
    if !allow_utf8 && !input.is_ascii() {
        return Err(AddressError::Utf8NotAllowed);
    }
    let at = local_part_end(input)?;
    let (local, domain) = (&input[..at], &input[at + 1..]);
    if local.is_empty() || local.len() > MAX_LOCAL_PART {
        return Err(AddressError::BadLocalLength);
    }
    if domain.is_empty() || domain.len() > MAX_DOMAIN {
        return Err(AddressError::BadDomainLength);
    }
    if domain.starts_with('[') {
        check_address_literal(domain)?;
    } else {
        check_domain(domain, allow_utf8)?;
    }
    Ok(Mailbox { local: local.to_owned(), domain: domain.to_owned() })
}

/// Finds the `@` that ends the local part, validating the local part on the
/// way (a quoted string may itself contain `@`).
fn local_part_end(input: &str) -> Result<usize, AddressError> {
    let bytes = input.as_bytes();
    if bytes.first() == Some(&b'"') {
        let mut i = 1;
        loop {
            match bytes.get(i) {
                None => return Err(AddressError::BadLocalPart),
                Some(b'\\') => match bytes.get(i + 1) {
                    Some(32..=126) => i += 2,
                    _ => return Err(AddressError::BadLocalPart),
                },
                Some(b'"') => break,
                Some(&c) if is_qtext(c) => i += 1,
                Some(_) => return Err(AddressError::BadLocalPart),
            }
        }
        return match bytes.get(i + 1) {
            Some(b'@') => Ok(i + 1),
            None => Err(AddressError::MissingDomain),
            Some(_) => Err(AddressError::BadLocalPart),
        };
    }
    let at = input.rfind('@').ok_or(AddressError::MissingDomain)?;
    let local = &input[..at];
    if local.is_empty() {
        return Err(AddressError::BadLocalLength);
    }
    for atom in local.split('.') {
        if atom.is_empty() || !atom.chars().all(is_atext) {
            return Err(AddressError::BadLocalPart);
        }
    }
    Ok(at)
}

/// RFC 5322 atext, plus any non-ASCII character (RFC 6531 UTF8-non-ascii);
/// whether non-ASCII is allowed at all was decided by the caller.
fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || (!c.is_ascii() && !c.is_control())
}

/// RFC 5321 qtextSMTP, plus UTF-8 octets (validated as UTF-8 by `str`).
fn is_qtext(c: u8) -> bool {
    matches!(c, 32 | 33 | 35..=91 | 93..=126) || c >= 0x80
}

/// `Domain = sub-domain *("." sub-domain)`, `sub-domain = Let-dig [Ldh-str]`.
fn check_domain(domain: &str, allow_utf8: bool) -> Result<(), AddressError> {
    if domain.is_empty() || domain.len() > MAX_DOMAIN {
        return Err(AddressError::BadDomainLength);
    }
    for label in domain.split('.') {
        let ok_char = |c: char| c.is_ascii_alphanumeric() || (allow_utf8 && !c.is_ascii() && c.is_alphanumeric());
        let valid = !label.is_empty()
            && label.len() <= 63
            && label.chars().all(|c| ok_char(c) || c == '-')
            && label.chars().next().is_some_and(ok_char)
            && label.chars().last().is_some_and(ok_char);
        if !valid {
            return Err(AddressError::BadDomain);
        }
    }
    Ok(())
}

/// `address-literal = "[" ( IPv4 / "IPv6:" IPv6 / General ) "]"`.
fn check_address_literal(literal: &str) -> Result<(), AddressError> {
    let inner = literal.strip_prefix('[').and_then(|s| s.strip_suffix(']')).ok_or(AddressError::BadAddressLiteral)?;
    let valid = if let Some(v6) = inner.strip_prefix("IPv6:") {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else if let Some((tag, content)) = inner.split_once(':') {
        // General-address-literal: Standardized-tag ":" 1*dcontent.
        check_domain(tag, false).is_ok()
            && !content.is_empty()
            && content.bytes().all(|c| matches!(c, 33..=90 | 94..=126))
    } else {
        inner.parse::<std::net::Ipv4Addr>().is_ok()
    };
    if valid { Ok(()) } else { Err(AddressError::BadAddressLiteral) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AddressError::*;

    #[test]
    fn paths_table() {
        let cases: &[(&str, bool, Result<&str, AddressError>)] = &[
            ("<alice@example.test>", false, Ok("alice@example.test")),
            ("<a.b+c@sub.example.test>", false, Ok("a.b+c@sub.example.test")),
            ("<\"john doe\"@example.test>", false, Ok("\"john doe\"@example.test")),
            ("<\"a@b\"@example.test>", false, Ok("\"a@b\"@example.test")),
            ("<@relay.test,@r2.test:bob@example.test>", false, Ok("bob@example.test")),
            ("<root@[127.0.0.1]>", false, Ok("root@[127.0.0.1]")),
            ("<root@[IPv6:::1]>", false, Ok("root@[IPv6:::1]")),
            ("<jürgen@example.test>", true, Ok("jürgen@example.test")),
            ("<jürgen@example.test>", false, Err(Utf8NotAllowed)),
            ("alice@example.test", false, Err(MissingBrackets)),
            ("<alice>", false, Err(MissingDomain)),
            ("<@example.test>", false, Err(BadSourceRoute)),
            ("<a..b@example.test>", false, Err(BadLocalPart)),
            ("<a b@example.test>", false, Err(BadLocalPart)),
            ("<alice@-example.test>", false, Err(BadDomain)),
            ("<alice@example..test>", false, Err(BadDomain)),
            ("<alice@exa_mple.test>", false, Err(BadDomain)),
            ("<alice@>", false, Err(BadDomainLength)),
            ("<alice@[300.1.1.1]>", false, Err(BadAddressLiteral)),
            ("<\"unterminated@example.test>", false, Err(BadLocalPart)),
        ];
        for (input, utf8, expected) in cases {
            let got = parse_path(input, *utf8).map(|m| m.to_string());
            assert_eq!(got, expected.clone().map(String::from), "input {input:?}");
        }
    }

    #[test]
    fn limits() {
        let long_local = format!("<{}@example.test>", "a".repeat(65));
        assert_eq!(parse_path(&long_local, false), Err(BadLocalLength));
        let long_path = format!("<a@{}.test>", "b".repeat(260));
        assert_eq!(parse_path(&long_path, false), Err(PathTooLong));
        assert_eq!(parse_reverse_path("<>", false), Ok(None));
    }
}
