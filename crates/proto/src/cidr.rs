//! CIDR network blocks (`192.0.2.0/24`, `2001:db8::/32`) for the address
//! lists in `mortal.toml`: `[server] trusted_networks` and `[smtpd]
//! proxy_trusted`.
//!
//! Parsing is strict: a literal address, `/`, a prefix length no longer
//! than the family allows, and no host bits set below the prefix
//! (`192.0.2.1/24` is a typo for either `/32` or `.0/24`, and guessing
//! which would widen or narrow a trust list silently). A bare address
//! means a single host. Matching treats an IPv4-mapped IPv6 address
//! (`::ffff:192.0.2.1`, what a dual-stack socket reports) as the IPv4
//! address it is.

use serde::{Deserialize, Deserializer};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use thiserror::Error;

/// One network block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

/// Why a CIDR string was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CidrError {
    #[error("{0:?} is not an IP address")]
    Address(String),
    #[error("{0:?} is not a prefix length")]
    Prefix(String),
    #[error("prefix /{prefix} is longer than {max} bits")]
    PrefixTooLong { prefix: u8, max: u8 },
    #[error("{0} has host bits set below its prefix (did you mean {1}?)")]
    HostBits(String, Cidr),
}

impl Cidr {
    /// The block `network/prefix`, checked like a parsed one.
    pub fn new(network: IpAddr, prefix: u8) -> Result<Cidr, CidrError> {
        let max = max_prefix(network);
        if prefix > max {
            return Err(CidrError::PrefixTooLong { prefix, max });
        }
        let cidr = Cidr { network, prefix };
        let masked = Cidr { network: mask(network, prefix), prefix };
        if masked != cidr {
            return Err(CidrError::HostBits(format!("{network}/{prefix}"), masked));
        }
        Ok(cidr)
    }

    /// The block of `prefix` bits (capped at the family's length) that
    /// holds `addr`: `2001:db8::1` with 84 is `2001:db8::/84`.
    pub fn containing(addr: IpAddr, prefix: u8) -> Cidr {
        let addr = addr.to_canonical();
        let prefix = prefix.min(max_prefix(addr));
        Cidr { network: mask(addr, prefix), prefix }
    }

    /// Whether `addr` lies inside this block.
    pub fn contains(&self, addr: IpAddr) -> bool {
        // Compare in the block's own family, mapping across it where an
        // address has a form in both.
        let addr = match (self.network, addr) {
            (IpAddr::V4(_), addr) => addr.to_canonical(),
            (IpAddr::V6(_), IpAddr::V4(a)) => IpAddr::V6(a.to_ipv6_mapped()),
            (IpAddr::V6(_), addr) => addr,
        };
        addr.is_ipv4() == self.network.is_ipv4() && mask(addr, self.prefix) == self.network
    }

    pub fn network(&self) -> IpAddr {
        self.network
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }
}

/// Whether any block of `list` contains `addr`.
pub fn contains_any(list: &[Cidr], addr: IpAddr) -> bool {
    list.iter().any(|c| c.contains(addr))
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let network: IpAddr = addr.parse().map_err(|_| CidrError::Address(addr.to_owned()))?;
        let prefix = match prefix {
            None => max_prefix(network),
            // `u8::from_str` would take "+8"; a prefix is digits only.
            Some(p) if !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse().map_err(|_| CidrError::Prefix(p.to_owned()))?
            }
            Some(p) => return Err(CidrError::Prefix(p.to_owned())),
        };
        Cidr::new(network, prefix)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|e: CidrError| serde::de::Error::custom(format!("{s:?}: {e}")))
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

/// `addr` with every bit below `prefix` cleared.
fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let keep = u32::MAX.checked_shl(32 - u32::from(prefix.min(32))).unwrap_or(0);
            IpAddr::V4((bits & keep).into())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let keep = u128::MAX.checked_shl(128 - u32::from(prefix.min(128))).unwrap_or(0);
            IpAddr::V6((bits & keep).into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parse_table() {
        for (input, expected) in [
            ("127.0.0.0/8", Ok("127.0.0.0/8")),
            ("192.0.2.7", Ok("192.0.2.7/32")),
            ("0.0.0.0/0", Ok("0.0.0.0/0")),
            ("::1", Ok("::1/128")),
            ("2001:db8::/32", Ok("2001:db8::/32")),
            ("::/0", Ok("::/0")),
            ("192.0.2.1/24", Err("has host bits set below its prefix (did you mean 192.0.2.0/24?)")),
            ("192.0.2.0/33", Err("prefix /33 is longer than 32 bits")),
            ("2001:db8::/129", Err("prefix /129 is longer than 128 bits")),
            ("192.0.2.0/", Err("is not a prefix length")),
            ("192.0.2.0/+8", Err("is not a prefix length")),
            ("192.0.2.0/0008", Err("is not a prefix length")),
            ("192.0.2.0/8/8", Err("is not a prefix length")),
            ("example.test/8", Err("is not an IP address")),
            ("", Err("is not an IP address")),
            (" 127.0.0.1", Err("is not an IP address")),
        ] {
            let got = input.parse::<Cidr>().map(|c| c.to_string()).map_err(|e| e.to_string());
            match (got, expected) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{input}"),
                (Err(got), Err(want)) => assert!(got.contains(want), "{input}: {got}"),
                (got, want) => panic!("{input}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn containment_table() {
        for (cidr, addr, inside) in [
            ("127.0.0.0/8", "127.0.0.2", true),
            ("127.0.0.0/8", "128.0.0.1", false),
            ("127.0.0.1/32", "127.0.0.1", true),
            ("127.0.0.1/32", "127.0.0.2", false),
            ("0.0.0.0/0", "203.0.113.9", true),
            ("0.0.0.0/0", "2001:db8::1", false),
            ("192.0.2.0/24", "::ffff:192.0.2.200", true),
            ("192.0.2.0/24", "::ffff:192.0.3.1", false),
            ("::ffff:192.0.2.0/120", "192.0.2.5", true),
            ("::1/128", "::1", true),
            ("::1/128", "127.0.0.1", false),
            ("2001:db8::/32", "2001:db8:ffff::1", true),
            ("2001:db8::/32", "2001:db9::1", false),
            ("::/0", "2001:db8::1", true),
            ("10.0.0.0/31", "10.0.0.1", true),
            ("10.0.0.0/31", "10.0.0.2", false),
        ] {
            let c: Cidr = cidr.parse().unwrap();
            assert_eq!(c.contains(ip(addr)), inside, "{cidr} contains {addr}");
        }
    }

    #[test]
    fn containing_blocks() {
        for (addr, prefix, block) in [
            ("2001:db8:1:2:3:4:5:6", 84, "2001:db8:1:2:3::/84"),
            ("2001:db8::1", 128, "2001:db8::1/128"),
            ("192.0.2.77", 24, "192.0.2.0/24"),
            ("192.0.2.77", 84, "192.0.2.77/32"),
            ("::ffff:192.0.2.77", 32, "192.0.2.77/32"),
            ("192.0.2.77", 0, "0.0.0.0/0"),
        ] {
            assert_eq!(Cidr::containing(ip(addr), prefix).to_string(), block, "{addr}/{prefix}");
        }
    }

    #[test]
    fn lists() {
        let list: Vec<Cidr> = ["10.0.0.0/8", "::1"].iter().map(|s| s.parse().unwrap()).collect();
        assert!(contains_any(&list, ip("10.1.2.3")));
        assert!(contains_any(&list, ip("::1")));
        assert!(!contains_any(&list, ip("127.0.0.1")));
        assert!(!contains_any(&[], ip("127.0.0.1")));
    }
}
