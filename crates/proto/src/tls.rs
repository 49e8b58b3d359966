//! What a TLS handshake negotiated, in the one shape Postfix logs it and
//! writes it in `Received:` (`(using ...)`), for smtpd's server side and the
//! SMTP/LMTP clients alike:
//! `TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384 (256/256 bits)`.
//!
//! Cipher suite names are the IANA ones rustls uses. The key size is read
//! from the suite's name (`AES_128` is 128 bits; every other suite mortal
//! negotiates, AES-256 and ChaCha20, has 256).

use std::fmt;
use std::str::FromStr;
use thiserror::Error;

/// A TLS protocol version, by its wire value (RFC 8446 `ProtocolVersion`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    Tls12,
    Tls13,
    /// Any other wire value; mortal offers and accepts only 1.2 and 1.3.
    Other(u16),
}

impl TlsVersion {
    pub fn from_wire(value: u16) -> TlsVersion {
        match value {
            0x0303 => TlsVersion::Tls12,
            0x0304 => TlsVersion::Tls13,
            other => TlsVersion::Other(other),
        }
    }
}

impl fmt::Display for TlsVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsVersion::Tls12 => f.write_str("TLSv1.2"),
            TlsVersion::Tls13 => f.write_str("TLSv1.3"),
            TlsVersion::Other(value) => write!(f, "TLS 0x{value:04x}"),
        }
    }
}

/// The version and cipher suite of an established TLS session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSummary {
    version: TlsVersion,
    cipher: String,
}

impl TlsSummary {
    /// From the negotiated version's wire value and the cipher suite's
    /// IANA name (`TLS13_AES_256_GCM_SHA384`), as rustls reports them.
    pub fn new(version: u16, cipher: &str) -> TlsSummary {
        TlsSummary { version: TlsVersion::from_wire(version), cipher: cipher.to_owned() }
    }

    pub fn version(&self) -> TlsVersion {
        self.version
    }

    pub fn cipher(&self) -> &str {
        &self.cipher
    }

    /// Symmetric key bits of the cipher suite.
    pub fn bits(&self) -> u32 {
        if self.cipher.contains("AES_128") { 128 } else { 256 }
    }
}

impl fmt::Display for TlsSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bits = self.bits();
        write!(f, "{} with cipher {} ({bits}/{bits} bits)", self.version, self.cipher)
    }
}

/// What rustls negotiated on `conn` (either side); call it once the
/// handshake is complete, when both the version and the suite are known.
#[cfg(feature = "rustls")]
impl TlsSummary {
    pub fn of(conn: &rustls::CommonState) -> TlsSummary {
        let version = conn.protocol_version().map_or(0, u16::from);
        let cipher = conn.negotiated_cipher_suite().and_then(|s| s.suite().as_str()).unwrap_or("unknown");
        TlsSummary::new(version, cipher)
    }
}

/// A string that is not what [`TlsSummary`] writes.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{0:?} is not \"TLSv1.x with cipher NAME (B/B bits)\"")]
pub struct TlsSummaryError(String);

/// Reads back exactly what `Display` writes (test scripts and the fuzz
/// harness describe handshakes this way); anything else is an error.
impl FromStr for TlsSummary {
    type Err = TlsSummaryError;

    fn from_str(s: &str) -> Result<TlsSummary, TlsSummaryError> {
        let bad = || TlsSummaryError(s.to_owned());
        let (version, rest) = s.split_once(" with cipher ").ok_or_else(bad)?;
        let version = match version {
            "TLSv1.2" => TlsVersion::Tls12,
            "TLSv1.3" => TlsVersion::Tls13,
            _ => return Err(bad()),
        };
        let (cipher, _) = rest.split_once(' ').filter(|(c, _)| !c.is_empty()).ok_or_else(bad)?;
        let summary = TlsSummary { version, cipher: cipher.to_owned() };
        if summary.to_string() != s {
            return Err(bad());
        }
        Ok(summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postfix_shape() {
        for (version, cipher, shown) in [
            (0x0304, "TLS13_AES_256_GCM_SHA384", "TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384 (256/256 bits)"),
            (0x0304, "TLS13_AES_128_GCM_SHA256", "TLSv1.3 with cipher TLS13_AES_128_GCM_SHA256 (128/128 bits)"),
            (
                0x0304,
                "TLS13_CHACHA20_POLY1305_SHA256",
                "TLSv1.3 with cipher TLS13_CHACHA20_POLY1305_SHA256 (256/256 bits)",
            ),
            (
                0x0303,
                "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
                "TLSv1.2 with cipher TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 (128/128 bits)",
            ),
            (
                0x0302,
                "TLS_RSA_WITH_AES_256_CBC_SHA",
                "TLS 0x0302 with cipher TLS_RSA_WITH_AES_256_CBC_SHA (256/256 bits)",
            ),
        ] {
            let summary = TlsSummary::new(version, cipher);
            assert_eq!(summary.to_string(), shown);
            if version >= 0x0303 {
                assert_eq!(shown.parse(), Ok(summary), "{shown}");
            }
        }
    }

    #[test]
    fn only_the_written_shape_parses() {
        for bad in [
            "",
            "TLSv1.3",
            "TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384",
            "TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384 (128/128 bits)",
            "TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384 (256/256 bits) ",
            "TLSv1.1 with cipher TLS_RSA_WITH_AES_256_CBC_SHA (256/256 bits)",
            "TLSv1.3 with cipher  (256/256 bits)",
        ] {
            assert!(bad.parse::<TlsSummary>().is_err(), "{bad:?}");
        }
    }
}
