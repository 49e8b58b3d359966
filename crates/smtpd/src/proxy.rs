//! The PROXY protocol header (haproxy's `proxy-protocol.txt`, versions 1
//! and 2) as a sans-IO parser.
//!
//! A load balancer in TCP mode (`send-proxy`, `send-proxy-v2`) opens each
//! connection with one header naming the client it speaks for. [`parse`]
//! takes the bytes received so far and answers "need more", the header and
//! its length, or why this is not a valid header; it never looks past the
//! header, so whatever follows (a client that talked before the greeting)
//! stays with the caller. It is a pure function of its input: the fuzz
//! target and the table tests call it exactly as the driver does.
//!
//! # Security
//! The bytes come from the network. Only peers in `proxy_trusted` are
//! believed at all (the caller checks that before reading). The parser is
//! strict and bounded: a v1 line is at most [`V1_MAX_LINE`] octets with
//! single spaces, literal addresses of the announced family and decimal
//! ports; a v2 header is at most [`V2_MAX_HEADER`] octets, its address
//! block must fit the family, and its TLVs must tile the rest exactly.
//! Input that cannot become a header is refused as soon as that is
//! certain, so an ordinary SMTP client (`EHLO ...`) is refused at once.
//!
//! # Standards
//! The PROXY protocol, versions 1 and 2 (haproxy `doc/proxy-protocol.txt`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use thiserror::Error;

/// Longest v1 header, `<CR><LF>` included (the specification's bound:
/// `PROXY TCP6` with two full-length IPv6 addresses).
pub const V1_MAX_LINE: usize = 107;
/// The 12-octet v2 signature.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Fixed part of a v2 header: signature, version/command, family, length.
pub const V2_FIXED: usize = 16;
/// Longest v2 header accepted. The format allows 16 + 65535 octets; the
/// addresses plus every TLV haproxy can send (unique id, ALPN, authority,
/// TLS facts with a client certificate's names) fit well in 4 KiB, and a
/// balancer sending more is misconfigured, not to be buffered.
pub const V2_MAX_HEADER: usize = 4096;
const V1_PREFIX: &[u8] = b"PROXY ";

/// A decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    /// 1 or 2.
    pub version: u8,
    /// The connection as the balancer saw it; `None` when the header names
    /// no client (v1 `UNKNOWN`, v2 `LOCAL`, or a v2 family other than TCP
    /// over IPv4 or IPv6): the balancer's own connection, such as a health
    /// check, for which the socket's own addresses stand.
    pub addresses: Option<Addresses>,
}

/// The client's and the balancer's ends of the proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

/// Why the input is not a PROXY header. The peer is at fault in every case.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProxyError {
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("v1 header longer than {V1_MAX_LINE} octets")]
    V1TooLong,
    #[error("malformed v1 header: {0}")]
    V1Syntax(&'static str),
    #[error("unsupported v2 version {0}")]
    V2Version(u8),
    #[error("unsupported v2 command {0}")]
    V2Command(u8),
    #[error("unsupported v2 address family/transport {0:#04x}")]
    V2Family(u8),
    #[error("v2 address block of {0} octets is too short for its family")]
    V2Short(usize),
    #[error("v2 header of {0} octets exceeds {V2_MAX_HEADER}")]
    V2TooLong(usize),
    #[error("malformed v2 TLV")]
    V2Tlv,
}

/// Parses the header at the start of `input`: `Ok(None)` when more input is
/// needed, `Ok(Some((header, length)))` once it is complete, where
/// `length` octets of `input` are the header.
pub fn parse(input: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    let common = input.len().min(V2_SIGNATURE.len());
    if input[..common] == V2_SIGNATURE[..common] {
        return if input.len() < V2_SIGNATURE.len() { Ok(None) } else { parse_v2(input) };
    }
    let common = input.len().min(V1_PREFIX.len());
    if input[..common] == V1_PREFIX[..common] {
        return if input.len() < V1_PREFIX.len() { Ok(None) } else { parse_v1(input) };
    }
    Err(ProxyError::NotProxy)
}

fn parse_v1(input: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    let window = &input[..input.len().min(V1_MAX_LINE)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        return if input.len() >= V1_MAX_LINE { Err(ProxyError::V1TooLong) } else { Ok(None) };
    };
    if lf == 0 || window[lf - 1] != b'\r' {
        return Err(ProxyError::V1Syntax("line does not end in CRLF"));
    }
    let line = &window[V1_PREFIX.len()..lf - 1];
    if line.iter().any(|&b| !(b' '..=b'~').contains(&b)) {
        return Err(ProxyError::V1Syntax("control or non-ASCII octet"));
    }
    let line = std::str::from_utf8(line).map_err(|_| ProxyError::V1Syntax("control or non-ASCII octet"))?;
    // The specification: after UNKNOWN the receiver ignores the rest.
    if line == "UNKNOWN" || line.starts_with("UNKNOWN ") {
        return Ok(Some((ProxyHeader { version: 1, addresses: None }, lf + 1)));
    }
    let fields: Vec<&str> = line.split(' ').collect();
    let [proto, src, dst, sport, dport] = fields[..] else {
        return Err(ProxyError::V1Syntax("expected PROXY TCP4|TCP6 <src> <dst> <sport> <dport>"));
    };
    let (src, dst): (IpAddr, IpAddr) = match proto {
        "TCP4" => (v1_addr::<Ipv4Addr>(src)?.into(), v1_addr::<Ipv4Addr>(dst)?.into()),
        "TCP6" => (v1_addr::<Ipv6Addr>(src)?.into(), v1_addr::<Ipv6Addr>(dst)?.into()),
        _ => return Err(ProxyError::V1Syntax("protocol is not TCP4, TCP6 or UNKNOWN")),
    };
    let addresses =
        Addresses { source: SocketAddr::new(src, v1_port(sport)?), destination: SocketAddr::new(dst, v1_port(dport)?) };
    Ok(Some((ProxyHeader { version: 1, addresses: Some(addresses) }, lf + 1)))
}

fn v1_addr<A: std::str::FromStr>(s: &str) -> Result<A, ProxyError> {
    s.parse().map_err(|_| ProxyError::V1Syntax("address is not a literal of the announced family"))
}

fn v1_port(s: &str) -> Result<u16, ProxyError> {
    let digits = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
    let no_padding = s == "0" || !s.starts_with('0');
    match s.parse() {
        Ok(port) if digits && no_padding => Ok(port),
        _ => Err(ProxyError::V1Syntax("port is not a decimal number from 0 to 65535")),
    }
}

fn parse_v2(input: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    // Each octet is checked as soon as it has arrived.
    if let Some(&ver_cmd) = input.get(12) {
        if ver_cmd >> 4 != 2 {
            return Err(ProxyError::V2Version(ver_cmd >> 4));
        }
        if ver_cmd & 0x0F > 1 {
            return Err(ProxyError::V2Command(ver_cmd & 0x0F));
        }
    }
    if let Some(&fam) = input.get(13)
        && !matches!(fam, 0x00 | 0x11 | 0x21 | 0x31)
    {
        return Err(ProxyError::V2Family(fam));
    }
    if input.len() < V2_FIXED {
        return Ok(None);
    }
    let len = usize::from(u16::from_be_bytes([input[14], input[15]]));
    let total = V2_FIXED + len;
    if total > V2_MAX_HEADER {
        return Err(ProxyError::V2TooLong(total));
    }
    if input.len() < total {
        return Ok(None);
    }
    let local = input[12] & 0x0F == 0;
    let family = input[13];
    let payload = &input[V2_FIXED..total];
    // The address block's size per family (a Unix client's paths: 216).
    let block = match family {
        0x11 => 12,
        0x21 => 36,
        0x31 => 216,
        _ => 0,
    };
    let a = payload.get(..block).ok_or(ProxyError::V2Short(len))?;
    let port = |o: &[u8]| u16::from_be_bytes([o[0], o[1]]);
    let addresses = match family {
        0x11 => {
            let ip = |o: &[u8]| IpAddr::V4(Ipv4Addr::new(o[0], o[1], o[2], o[3]));
            let source = SocketAddr::new(ip(&a[0..4]), port(&a[8..10]));
            Some(Addresses { source, destination: SocketAddr::new(ip(&a[4..8]), port(&a[10..12])) })
        }
        0x21 => {
            let ip = |o: &[u8]| IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(o).expect("16-octet slice")));
            let source = SocketAddr::new(ip(&a[0..16]), port(&a[32..34]));
            Some(Addresses { source, destination: SocketAddr::new(ip(&a[16..32]), port(&a[34..36])) })
        }
        // A Unix-socket client, or no family: no address to log or limit.
        _ => None,
    };
    // With LOCAL or UNSPEC the rest of the block is to be ignored.
    if !local && family != 0x00 {
        check_tlvs(&payload[block..])?;
    }
    let addresses = if local { None } else { addresses };
    Ok(Some((ProxyHeader { version: 2, addresses }, total)))
}

/// TLVs (type, 16-bit length, value) must cover the rest exactly.
fn check_tlvs(mut rest: &[u8]) -> Result<(), ProxyError> {
    while !rest.is_empty() {
        let [_, hi, lo, ..] = rest[..] else { return Err(ProxyError::V2Tlv) };
        let end = 3 + usize::from(u16::from_be_bytes([hi, lo]));
        rest = rest.get(end..).ok_or(ProxyError::V2Tlv)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn proxied(version: u8, src: &str, dst: &str) -> ProxyHeader {
        ProxyHeader { version, addresses: Some(Addresses { source: sa(src), destination: sa(dst) }) }
    }

    type Expect = Result<Option<(ProxyHeader, usize)>, ProxyError>;

    #[test]
    fn v1_table() {
        let local = ProxyHeader { version: 1, addresses: None };
        let syntax = |s| Err(ProxyError::V1Syntax(s));
        let cases: Vec<(&[u8], Expect)> = vec![
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n",
                Ok(Some((proxied(1, "192.0.2.1:56324", "198.51.100.2:25"), 44))),
            ),
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\nEHLO x\r\n",
                Ok(Some((proxied(1, "192.0.2.1:56324", "198.51.100.2:25"), 44))),
            ),
            (
                b"PROXY TCP6 2001:db8::1 2001:db8::2 65535 0\r\n",
                Ok(Some((proxied(1, "[2001:db8::1]:65535", "[2001:db8::2]:0"), 44))),
            ),
            (b"PROXY UNKNOWN\r\n", Ok(Some((local, 15)))),
            (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", Ok(Some((local, 35)))),
            // Incomplete: every prefix of a valid header asks for more.
            (b"", Ok(None)),
            (b"PRO", Ok(None)),
            (b"PROXY TCP4 192.0.2.1", Ok(None)),
            (b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r", Ok(None)),
            // Not PROXY at all: refused without waiting.
            (b"EHLO client.test\r\n", Err(ProxyError::NotProxy)),
            (b"proxy TCP4", Err(ProxyError::NotProxy)),
            (b"PROXYTCP4", Err(ProxyError::NotProxy)),
            // Malformed.
            (b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\n", syntax("line does not end in CRLF")),
            (
                b"PROXY TCP4 2001:db8::1 198.51.100.2 1 25\r\n",
                syntax("address is not a literal of the announced family"),
            ),
            (b"PROXY TCP6 192.0.2.1 2001:db8::2 1 25\r\n", syntax("address is not a literal of the announced family")),
            (
                b"PROXY TCP4 192.0.2.01 198.51.100.2 1 25\r\n",
                syntax("address is not a literal of the announced family"),
            ),
            (b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 25\r\n", syntax("port is not a decimal number from 0 to 65535")),
            (b"PROXY TCP4 192.0.2.1 198.51.100.2 +1 25\r\n", syntax("port is not a decimal number from 0 to 65535")),
            (b"PROXY TCP4 192.0.2.1 198.51.100.2 025 25\r\n", syntax("port is not a decimal number from 0 to 65535")),
            (
                b"PROXY TCP4 192.0.2.1  198.51.100.2 1 25\r\n",
                syntax("expected PROXY TCP4|TCP6 <src> <dst> <sport> <dport>"),
            ),
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.2 1\r\n",
                syntax("expected PROXY TCP4|TCP6 <src> <dst> <sport> <dport>"),
            ),
            (b"PROXY UDP4 192.0.2.1 198.51.100.2 1 2\r\n", syntax("protocol is not TCP4, TCP6 or UNKNOWN")),
            (b"PROXY TCP4 192.0.2.1\t198.51.100.2 1 2\r\n", syntax("control or non-ASCII octet")),
            (b"PROXY UNKNOWN\xff\r\n", syntax("control or non-ASCII octet")),
        ];
        for (input, expected) in cases {
            assert_eq!(parse(input), expected, "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn v1_length_bound() {
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(V1_MAX_LINE - 2, b'x');
        long.extend_from_slice(b"\r\n");
        assert_eq!(parse(&long), Ok(Some((ProxyHeader { version: 1, addresses: None }, V1_MAX_LINE))));
        let mut longer = b"PROXY UNKNOWN ".to_vec();
        longer.resize(V1_MAX_LINE, b'x');
        assert_eq!(parse(&longer), Err(ProxyError::V1TooLong));
        longer.truncate(V1_MAX_LINE - 1);
        assert_eq!(parse(&longer), Ok(None));
    }

    fn v2(ver_cmd: u8, fam: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(ver_cmd);
        out.push(fam);
        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    const V4_BLOCK: [u8; 12] = [192, 0, 2, 1, 198, 51, 100, 2, 0xDC, 0x04, 0, 25];

    #[test]
    fn v2_table() {
        let mut v6_block = Vec::new();
        v6_block.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        v6_block.extend_from_slice(&"2001:db8::2".parse::<Ipv6Addr>().unwrap().octets());
        v6_block.extend_from_slice(&[0, 1, 0, 25]);
        let with_tlvs = [&V4_BLOCK[..], &[0x04, 0, 0], &[0x05, 0, 3, b'a', b'b', b'c']].concat();
        let bad_tlv = [&V4_BLOCK[..], &[0x05, 0, 4, b'a']].concat();
        let v4 = proxied(2, "192.0.2.1:56324", "198.51.100.2:25");
        let local = ProxyHeader { version: 2, addresses: None };
        let cases: Vec<(Vec<u8>, Expect)> = vec![
            (v2(0x21, 0x11, &V4_BLOCK), Ok(Some((v4, 28)))),
            (v2(0x21, 0x21, &v6_block), Ok(Some((proxied(2, "[2001:db8::1]:1", "[2001:db8::2]:25"), 52)))),
            (v2(0x21, 0x11, &with_tlvs), Ok(Some((v4, 37)))),
            // LOCAL: addresses (and anything else in the block) ignored.
            (v2(0x20, 0x00, &[]), Ok(Some((local, 16)))),
            (v2(0x20, 0x11, &V4_BLOCK), Ok(Some((local, 28)))),
            (v2(0x20, 0x11, &[1, 2, 3]), Err(ProxyError::V2Short(3))),
            // PROXY with an unspecified family or a Unix client: no address.
            (v2(0x21, 0x00, &[9, 9]), Ok(Some((local, 18)))),
            (v2(0x21, 0x31, &[0; 216]), Ok(Some((local, 232)))),
            (v2(0x21, 0x31, &[0; 215]), Err(ProxyError::V2Short(215))),
            (v2(0x21, 0x11, &V4_BLOCK[..11]), Err(ProxyError::V2Short(11))),
            (v2(0x21, 0x21, &V4_BLOCK), Err(ProxyError::V2Short(12))),
            (v2(0x21, 0x11, &bad_tlv), Err(ProxyError::V2Tlv)),
            (v2(0x21, 0x11, &[&V4_BLOCK[..], &[0x05, 0]].concat()), Err(ProxyError::V2Tlv)),
            (v2(0x11, 0x11, &V4_BLOCK), Err(ProxyError::V2Version(1))),
            (v2(0x22, 0x11, &V4_BLOCK), Err(ProxyError::V2Command(2))),
            (v2(0x21, 0x12, &V4_BLOCK), Err(ProxyError::V2Family(0x12))),
            (v2(0x21, 0x41, &V4_BLOCK), Err(ProxyError::V2Family(0x41))),
            (v2(0x21, 0x11, &vec![0; V2_MAX_HEADER]), Err(ProxyError::V2TooLong(V2_MAX_HEADER + V2_FIXED))),
        ];
        for (input, expected) in cases {
            assert_eq!(parse(&input), expected, "{input:02x?}");
        }
    }

    #[test]
    fn v2_needs_more_until_complete_and_fails_early() {
        let full = v2(0x21, 0x11, &V4_BLOCK);
        for cut in 0..full.len() {
            assert_eq!(parse(&full[..cut]), Ok(None), "prefix of {cut} octets");
        }
        // A bad version is refused before the length has arrived.
        let mut early = V2_SIGNATURE.to_vec();
        early.push(0x31);
        assert_eq!(parse(&early), Err(ProxyError::V2Version(3)));
        // A near-signature is not PROXY.
        assert_eq!(parse(b"\r\n\r\n\0\r\nQUIX\n"), Err(ProxyError::NotProxy));
        // What follows the header is not part of it.
        let mut more = full.clone();
        more.extend_from_slice(b"EHLO x\r\n");
        assert_eq!(parse(&more).unwrap().unwrap().1, full.len());
    }

    /// A cheap stand-in for the fuzz target: no input panics, and a
    /// complete header never claims more octets than it was given.
    #[test]
    fn arbitrary_input_never_panics() {
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let prefixes: [&[u8]; 3] = [b"", b"PROXY ", &V2_SIGNATURE];
        for i in 0..20_000 {
            let mut input = prefixes[i % 3].to_vec();
            let extra = (seed % 64) as usize;
            for _ in 0..extra {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                input.push((seed >> 24) as u8);
            }
            if let Ok(Some((_, used))) = parse(&input) {
                assert!(used <= input.len());
            }
        }
    }
}
