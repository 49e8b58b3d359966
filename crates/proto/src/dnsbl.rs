//! DNS block and allow lists as postscreen weighs them
//! (`postscreen_dnsbl_sites`): what one list site is, which answers count
//! as a listing, and the name a client's address is looked up under.
//!
//! # Syntax
//! A site is `domain[=filter][*weight]`, as in Postfix:
//! ```text
//! zen.example*3                       listed: +3
//! list.example=127.0.0.[2..11]*2      only answers 127.0.0.2 to .11 count
//! wl.example*-2                       an allowlist: listed, -2
//! x.example=127.0.[0..255].[2;4;8..10]
//! ```
//! The domain is a DNS name of letters, digits and hyphens (kept in lower
//! case, a final dot dropped). The filter is four octet patterns, each a
//! number (0 to 255) or a `[`list`]` of numbers and ranges `a..b`
//! separated by `;`. The weight is an integer (default
//! [`DEFAULT_WEIGHT`]) of at most [`MAX_WEIGHT`] either way; a negative
//! weight makes the site an allowlist. Parsing is strict, and
//! [`DnsblSite`]'s `Display` writes what `FromStr` reads back.
//!
//! # Security
//! An answer decides nothing by itself: the caller adds the weights of the
//! sites that list a client and compares the sum with its threshold, and
//! an answer outside 127.0.0.0/8 never counts without a filter that asks
//! for it ([`DnsblSite::matches`]).
//!
//! # Standards
//! RFC 5782 (DNS blacklists and whitelists: the reversed-address query
//! name, answers in 127.0.0.0/8, IPv6 nibble order); RFC 1035 2.3.4 (name
//! and label lengths).
//!
//! No I/O here: smtpd's `dnsbl` module asks the DNS.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;
use thiserror::Error;

/// The weight of a site that names none (Postfix's default).
pub const DEFAULT_WEIGHT: i32 = 1;

/// Largest weight either way: enough to outweigh any sensible threshold,
/// small enough that no list of sites can overflow the sum.
pub const MAX_WEIGHT: i32 = 100;

/// Longest domain name (RFC 1035 2.3.4, without the final dot).
pub const MAX_DOMAIN: usize = 253;

/// Longest label of a domain name (RFC 1035 2.3.4).
pub const MAX_LABEL: usize = 63;

/// Why a site is not `domain[=filter][*weight]`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SiteError {
    #[error("empty DNSBL domain (syntax: domain[=filter][*weight])")]
    EmptyDomain,
    #[error("DNSBL domain {domain:?}: {reason}")]
    BadDomain { domain: String, reason: &'static str },
    #[error("DNSBL reply filter {filter:?}: {reason} (syntax: four of N or [N;N..N], N from 0 to 255)")]
    BadFilter { filter: String, reason: String },
    #[error("DNSBL weight {weight:?}: {reason}")]
    BadWeight { weight: String, reason: String },
}

/// One list site of `postscreen_dnsbl_sites`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsblSite {
    /// The list's domain, lower case, no final dot.
    pub domain: String,
    /// Which answers count; `None`: any in 127.0.0.0/8 but 127.255.255.0/24.
    pub filter: Option<ReplyFilter>,
    /// What a listing adds to the client's score; negative for allowlists.
    pub weight: i32,
}

impl DnsblSite {
    /// Whether `answer`, an A record of this site's query, lists the client.
    ///
    /// With a filter, the filter decides. Without one, any address in
    /// 127.0.0.0/8 lists (RFC 5782 2.3: list answers are there), except
    /// 127.255.255.0/24: Spamhaus answers 127.255.255.252 to .255 when it
    /// refuses a query (a public resolver, too many queries, a typo in the
    /// name), and counting that as a listing would block every client. An
    /// answer outside 127.0.0.0/8 is a resolver that makes names up (an
    /// NXDOMAIN rewritten to an ad server) or a list that was shut down by
    /// listing the world; it never counts.
    pub fn matches(&self, answer: Ipv4Addr) -> bool {
        match &self.filter {
            Some(filter) => filter.matches(answer),
            None => {
                let [first, second, third, _] = answer.octets();
                first == 127 && !(second == 255 && third == 255)
            }
        }
    }
}

impl FromStr for DnsblSite {
    type Err = SiteError;

    fn from_str(s: &str) -> Result<Self, SiteError> {
        let (head, weight) = match s.split_once('*') {
            Some((head, weight)) => (head, parse_weight(weight)?),
            None => (s, DEFAULT_WEIGHT),
        };
        let (domain, filter) = head.split_once('=').map_or((head, None), |(domain, filter)| (domain, Some(filter)));
        let domain = parse_domain(domain)?;
        let filter = filter.map(str::parse).transpose()?;
        Ok(DnsblSite { domain, filter, weight })
    }
}

impl fmt::Display for DnsblSite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.domain)?;
        if let Some(filter) = &self.filter {
            write!(f, "={filter}")?;
        }
        if self.weight != DEFAULT_WEIGHT {
            write!(f, "*{}", self.weight)?;
        }
        Ok(())
    }
}

/// `domain` in lower case without its final dot, if it is a DNS name of
/// letters, digits and hyphens (none at either end of a label).
fn parse_domain(domain: &str) -> Result<String, SiteError> {
    let bad = |reason| SiteError::BadDomain { domain: domain.to_owned(), reason };
    let name = domain.strip_suffix('.').unwrap_or(domain);
    if name.is_empty() {
        return Err(SiteError::EmptyDomain);
    }
    if name.len() > MAX_DOMAIN {
        return Err(bad("longer than 253 octets"));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(bad("empty label"));
        }
        if label.len() > MAX_LABEL {
            return Err(bad("label longer than 63 octets"));
        }
        if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(bad("only letters, digits, hyphens and dots are allowed"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(bad("a label starts or ends with a hyphen"));
        }
    }
    Ok(name.to_ascii_lowercase())
}

/// An optional `-` and decimal digits, no leading zero, within
/// [`MAX_WEIGHT`].
fn parse_weight(weight: &str) -> Result<i32, SiteError> {
    let bad = |reason: String| SiteError::BadWeight { weight: weight.to_owned(), reason };
    let digits = weight.strip_prefix('-').unwrap_or(weight);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("not an integer".to_owned()));
    }
    if digits.len() > 1 && digits.starts_with('0') {
        return Err(bad("leading zero".to_owned()));
    }
    match weight.parse::<i32>() {
        Ok(w) if w.abs() <= MAX_WEIGHT => Ok(w),
        _ => Err(bad(format!("outside -{MAX_WEIGHT}..{MAX_WEIGHT}"))),
    }
}

/// Which A records of a site count as a listing: a pattern per octet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyFilter {
    pub octets: [OctetPattern; 4],
}

impl ReplyFilter {
    pub fn matches(&self, answer: Ipv4Addr) -> bool {
        self.octets.iter().zip(answer.octets()).all(|(pattern, octet)| pattern.matches(octet))
    }
}

/// One octet of a [`ReplyFilter`]: a number, or a `[`list`]` of numbers
/// and ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OctetPattern {
    Value(u8),
    /// Never empty; a number is a range of one.
    List(Vec<OctetRange>),
}

impl OctetPattern {
    pub fn matches(&self, octet: u8) -> bool {
        match self {
            OctetPattern::Value(v) => *v == octet,
            OctetPattern::List(ranges) => ranges.iter().any(|r| (r.first..=r.last).contains(&octet)),
        }
    }
}

/// `first..last` inclusive, `first <= last`; written as one number when
/// they are equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OctetRange {
    pub first: u8,
    pub last: u8,
}

impl FromStr for ReplyFilter {
    type Err = SiteError;

    fn from_str(s: &str) -> Result<Self, SiteError> {
        let bad = |reason: String| SiteError::BadFilter { filter: s.to_owned(), reason };
        let parts: Vec<&str> = split_octets(s);
        let Ok(parts) = <[&str; 4]>::try_from(parts) else {
            return Err(bad("not four octets".to_owned()));
        };
        let mut octets = parts.map(|_| OctetPattern::Value(0));
        for (slot, part) in octets.iter_mut().zip(parts) {
            *slot = parse_pattern(part).map_err(bad)?;
        }
        Ok(ReplyFilter { octets })
    }
}

/// `s` split at the dots outside brackets (a range's `..` is inside).
fn split_octets(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (i, c) in s.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            '.' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn parse_pattern(part: &str) -> Result<OctetPattern, String> {
    let Some(inner) = part.strip_prefix('[') else { return parse_octet(part).map(OctetPattern::Value) };
    let inner = inner.strip_suffix(']').ok_or_else(|| format!("{part:?}: no closing ']'"))?;
    if inner.is_empty() {
        return Err(format!("{part:?}: empty list"));
    }
    let ranges = inner.split(';').map(parse_range).collect::<Result<Vec<_>, _>>()?;
    Ok(OctetPattern::List(ranges))
}

fn parse_range(item: &str) -> Result<OctetRange, String> {
    let (first, last) = match item.split_once("..") {
        Some((first, last)) => (parse_octet(first)?, parse_octet(last)?),
        None => {
            let v = parse_octet(item)?;
            (v, v)
        }
    };
    if first > last {
        return Err(format!("{item:?}: reversed range"));
    }
    Ok(OctetRange { first, last })
}

/// A decimal number from 0 to 255 without leading zeros.
fn parse_octet(s: &str) -> Result<u8, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{s:?}: not a number"));
    }
    if s.len() > 1 && s.starts_with('0') {
        return Err(format!("{s:?}: leading zero"));
    }
    s.parse().map_err(|_| format!("{s:?}: above 255"))
}

impl fmt::Display for ReplyFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, octet) in self.octets.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            write!(f, "{octet}")?;
        }
        Ok(())
    }
}

impl fmt::Display for OctetPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OctetPattern::Value(v) => write!(f, "{v}"),
            OctetPattern::List(ranges) => {
                f.write_str("[")?;
                for (i, range) in ranges.iter().enumerate() {
                    if i > 0 {
                        f.write_str(";")?;
                    }
                    write!(f, "{range}")?;
                }
                f.write_str("]")
            }
        }
    }
}

impl fmt::Display for OctetRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last { write!(f, "{}", self.first) } else { write!(f, "{}..{}", self.first, self.last) }
    }
}

/// The absolute name `client` is looked up under in `domain` (RFC 5782
/// 2.1 and 2.4): the IPv4 octets reversed (`4.3.2.1.zen.example.` for
/// 1.2.3.4), or the 32 nibbles of an IPv6 address reversed. An
/// IPv4-mapped IPv6 address is the IPv4 client it stands for.
pub fn query_name(client: IpAddr, domain: &str) -> String {
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    match client.to_canonical() {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            format!("{d}.{c}.{b}.{a}.{domain}.")
        }
        IpAddr::V6(v6) => {
            let mut name = String::with_capacity(64 + domain.len() + 1);
            for byte in v6.octets().iter().rev() {
                for nibble in [byte & 0x0f, byte >> 4] {
                    name.push(char::from_digit(u32::from(nibble), 16).expect("a nibble is a hex digit"));
                    name.push('.');
                }
            }
            name.push_str(domain);
            name.push('.');
            name
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(s: &str) -> DnsblSite {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn range(first: u8, last: u8) -> OctetRange {
        OctetRange { first, last }
    }

    #[test]
    fn parses_postscreen_syntax() {
        use OctetPattern::{List, Value};
        let table: [(&str, &str, Option<[OctetPattern; 4]>, i32); 6] = [
            ("zen.example*3", "zen.example", None, 3),
            ("bl.example", "bl.example", None, 1),
            ("wl.example*-2", "wl.example", None, -2),
            ("bl.example=127.0.0.2", "bl.example", Some([Value(127), Value(0), Value(0), Value(2)]), 1),
            (
                "list.example=127.0.0.[2..11]*2",
                "list.example",
                Some([Value(127), Value(0), Value(0), List(vec![range(2, 11)])]),
                2,
            ),
            (
                "x.example=127.0.[0..255].[2;4;8..10]",
                "x.example",
                Some([
                    Value(127),
                    Value(0),
                    List(vec![range(0, 255)]),
                    List(vec![range(2, 2), range(4, 4), range(8, 10)]),
                ]),
                1,
            ),
        ];
        for (text, domain, octets, weight) in table {
            let got = site(text);
            let want =
                DnsblSite { domain: domain.to_owned(), filter: octets.map(|octets| ReplyFilter { octets }), weight };
            assert_eq!(got, want, "{text}");
            assert_eq!(got.to_string(), text, "prints as read");
            assert_eq!(site(&got.to_string()), got, "round trip");
        }
    }

    #[test]
    fn normalizes_what_it_may() {
        let got = site("Zen.Example.*1");
        assert_eq!(got.domain, "zen.example");
        assert_eq!(got.to_string(), "zen.example");
        assert_eq!(site("a.example*0").weight, 0);
        assert_eq!(site("a.example*100").weight, MAX_WEIGHT);
        assert_eq!(site("a.example*-100").weight, -MAX_WEIGHT);
        assert_eq!(site("a.example=127.0.0.[5]").to_string(), "a.example=127.0.0.[5]");
        let long_label = "a".repeat(MAX_LABEL);
        assert_eq!(site(&format!("{long_label}.example")).domain.len(), MAX_LABEL + 8);
        let longest = format!("{}.example", vec!["abcdefghi"; 24].join("."));
        assert!(longest.len() <= MAX_DOMAIN);
        assert_eq!(site(&longest).domain, longest);
    }

    #[test]
    fn rejects_bad_sites() {
        let domain = |s: &str| matches!(s.parse::<DnsblSite>(), Err(SiteError::BadDomain { .. }));
        let filter = |s: &str| matches!(s.parse::<DnsblSite>(), Err(SiteError::BadFilter { .. }));
        let weight = |s: &str| matches!(s.parse::<DnsblSite>(), Err(SiteError::BadWeight { .. }));
        for empty in ["", ".", "*2", "=127.0.0.2", "=127.0.0.2*2"] {
            assert_eq!(empty.parse::<DnsblSite>(), Err(SiteError::EmptyDomain), "{empty:?}");
        }
        let long_label = "a".repeat(MAX_LABEL + 1);
        let long_name = vec!["abcdefghi"; 26].join(".");
        for bad in [
            "a..example",
            ".a.example",
            "a.example..",
            "a_b.example",
            "a b.example",
            "-a.example",
            "a-.example",
            "caf\u{e9}.example",
            "a.example\r\nX",
            &format!("{long_label}.example"),
            &long_name,
        ] {
            assert!(domain(bad), "{bad:?}: {:?}", bad.parse::<DnsblSite>());
        }
        for bad in [
            "a.example=",
            "a.example=127.0.0",
            "a.example=127.0.0.2.1",
            "a.example=127.0.0.256",
            "a.example=127.0.0.-1",
            "a.example=127.0.0.x",
            "a.example=127.0.0.02",
            "a.example=127.0.0.[]",
            "a.example=127.0.0.[2",
            "a.example=127.0.0.2]",
            "a.example=127.0.0.[2;]",
            "a.example=127.0.0.[;2]",
            "a.example=127.0.0.[11..2]",
            "a.example=127.0.0.[2..]",
            "a.example=127.0.0.[..2]",
            "a.example=127.0.0.[2...3]",
            "a.example=127.0.0.[1..300]",
            "a.example=127.0.0.[[2]]",
            "a.example=127.0.0.2=3",
            "a.example=127.0.0. 2",
        ] {
            assert!(filter(bad), "{bad:?}: {:?}", bad.parse::<DnsblSite>());
        }
        for bad in ["a.example*", "a.example*-", "a.example*+2", "a.example*2x", "a.example*02", "a.example*101"] {
            assert!(weight(bad), "{bad:?}: {:?}", bad.parse::<DnsblSite>());
        }
        for bad in ["a.example*-101", "a.example*99999999999", "a.example*2*3", "a.example* 2", "a.example*1.5"] {
            assert!(weight(bad), "{bad:?}: {:?}", bad.parse::<DnsblSite>());
        }
        let err = "a.example=127.0.0.[11..2]".parse::<DnsblSite>().unwrap_err().to_string();
        assert!(err.contains("\"11..2\": reversed range"), "{err}");
    }

    #[test]
    fn without_filter_127_8_but_the_error_codes_match() {
        let plain = site("zen.example");
        for listed in ["127.0.0.2", "127.0.0.11", "127.0.1.2", "127.255.254.1", "127.1.255.255"] {
            assert!(plain.matches(listed.parse().unwrap()), "{listed}");
        }
        for not in ["127.255.255.252", "127.255.255.254", "127.255.255.0", "10.0.0.2", "192.0.2.1", "128.0.0.2"] {
            assert!(!plain.matches(not.parse().unwrap()), "{not}");
        }
    }

    #[test]
    fn a_filter_decides() {
        let f = site("x.example=127.0.[0..255].[2;4;8..10]");
        for yes in ["127.0.0.2", "127.0.9.4", "127.0.255.8", "127.0.1.10"] {
            assert!(f.matches(yes.parse().unwrap()), "{yes}");
        }
        for no in ["127.0.0.3", "127.0.0.11", "127.1.0.2", "128.0.0.2"] {
            assert!(!f.matches(no.parse().unwrap()), "{no}");
        }
        // A filter may ask for what the default never counts.
        let f = site("odd.example=127.255.255.254");
        assert!(f.matches(Ipv4Addr::new(127, 255, 255, 254)));
        assert!(!f.matches(Ipv4Addr::new(127, 0, 0, 2)));
        let f = site("ten.example=10.0.0.[1..3]");
        assert!(f.matches(Ipv4Addr::new(10, 0, 0, 3)));
    }

    #[test]
    fn query_names() {
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(query_name(v4, "zen.example"), "1.2.0.192.zen.example.");
        assert_eq!(query_name("127.0.0.2".parse().unwrap(), "zen.example."), "2.0.0.127.zen.example.");
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(query_name(mapped, "zen.example"), "1.2.0.192.zen.example.");
        // RFC 5782 2.4's example.
        let v6: IpAddr = "2001:db8:1:2:3:4:567:89ab".parse().unwrap();
        assert_eq!(
            query_name(v6, "ugly.example.com"),
            "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ugly.example.com."
        );
        let loopback: IpAddr = "::1".parse().unwrap();
        let name = query_name(loopback, "bl.example");
        assert_eq!(name, format!("1.{}bl.example.", "0.".repeat(31)));
    }
}
