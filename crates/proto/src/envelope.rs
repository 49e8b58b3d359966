//! The envelope of one message: who sent it from where, to whom, with which
//! MAIL and RCPT parameters. One model, two codecs: [`crate::ipc`] carries
//! it from smtpd to cleanup and [`crate::queue_file`] stores it, each with
//! its own record layout, so a change to the protocol never changes the
//! on-disk format by accident (or the other way round).

use std::net::IpAddr;

/// Who connected to smtpd, as smtpd saw it. cleanup writes it into the
/// `Received:` header, so every field is re-checked there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    /// The client's IP address (the PROXY-protocol source when used).
    pub addr: IpAddr,
    /// Verified client host name, or `unknown`.
    pub name: String,
    /// HELO/EHLO argument.
    pub helo: String,
    /// `SMTP`, `ESMTP`, `ESMTPS`, `UTF8SMTP`... (RFC 3848 `with` values).
    pub protocol: String,
    /// TLS in use, as it appears in `Received:` (`TLSv1.3 with cipher
    /// TLS13_AES_256_GCM_SHA384 (256/256 bits)`); empty for plaintext.
    pub tls: String,
    /// Who the client logged in as with AUTH, if it did. Carried from
    /// smtpd to cleanup only: the queue file does not keep it (nothing
    /// after cleanup needs it, and a login is personal data).
    pub auth: Option<SaslLogin>,
}

/// A client's SMTP AUTH identity: the mechanism it used and the user name
/// Dovecot confirmed (Postfix's `sasl_method` and `sasl_username`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaslLogin {
    pub method: String,
    pub username: String,
}

/// Body type declared with MAIL's BODY= parameter (RFC 6152).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyType {
    SevenBit,
    EightBitMime,
    /// RFC 3030: only with BDAT.
    BinaryMime,
}

/// MAIL's RET= (RFC 3461 4.3): how much of the message a DSN returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DsnRet {
    Full,
    Headers,
}

/// RCPT's NOTIFY= (RFC 3461 4.1). All false means the parameter was
/// absent, which RFC 3461 treats as `FAILURE,DELAY`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Notify {
    pub never: bool,
    pub success: bool,
    pub failure: bool,
    pub delay: bool,
}

impl Notify {
    /// RFC 3461 4.1: NEVER excludes every other keyword.
    pub fn is_valid(self) -> bool {
        !(self.never && (self.success || self.failure || self.delay))
    }

    pub fn is_default(self) -> bool {
        self == Notify::default()
    }

    /// Whether a failure report is wanted (explicitly, or by default).
    pub fn wants_failure(self) -> bool {
        self.failure || self.is_default()
    }

    /// Whether a delay report is wanted (explicitly, or by default).
    pub fn wants_delay(self) -> bool {
        self.delay || self.is_default()
    }
}

/// Largest ENVID (RFC 3461 4.4: 100 characters).
pub const MAX_ENVID: usize = 100;

/// One envelope recipient with its DSN parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientInfo {
    /// Forward-path without brackets.
    pub address: String,
    pub notify: Notify,
    /// ORCPT (RFC 3461 4.2) as `addr-type;address`, xtext-decoded; empty
    /// when absent.
    pub orcpt: String,
}

/// The envelope sender and MAIL parameters that travel with the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderInfo {
    /// Reverse-path without brackets; empty for the null sender `<>`.
    pub address: String,
    pub body: BodyType,
    /// MAIL carried SMTPUTF8 (RFC 6531).
    pub smtputf8: bool,
    /// RET= (RFC 3461), if given.
    pub ret: Option<DsnRet>,
    /// ENVID= (RFC 3461), xtext-decoded; empty when absent.
    pub envid: String,
}

/// Text fields end up in headers and logs: no control characters at all,
/// so nothing a peer sends can start a new header or log line. Both
/// codecs refuse a field that fails this.
pub fn is_printable(s: &str) -> bool {
    !s.chars().any(char::is_control)
}

/// The client address in text, as both codecs carry it: strictly the form
/// [`IpAddr`]'s `Display` writes (RFC 5952 for IPv6), so one address has
/// one spelling.
pub fn parse_client_addr(s: &str) -> Option<IpAddr> {
    let addr: IpAddr = s.parse().ok()?;
    (addr.to_string() == s).then_some(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_addr_is_strict_text() {
        for good in ["127.0.0.1", "192.0.2.9", "::1", "2001:db8::1", "::ffff:192.0.2.1"] {
            assert_eq!(parse_client_addr(good).map(|a| a.to_string()).as_deref(), Some(good));
        }
        for bad in ["", "unknown", "127.0.0.1 ", "2001:DB8::1", "2001:db8:0::1", "[::1]", "127.0.0.1:25", "010.0.0.1"] {
            assert_eq!(parse_client_addr(bad), None, "{bad:?}");
        }
    }
}
