//! The optional reverse lookup of the client (`[smtpd] reverse_lookup`),
//! with Postfix's semantics: the PTR name of the client's address counts
//! only when its own A/AAAA records contain that address again (forward
//! confirmation), and only when it is a valid host name. Anything else (no
//! PTR, no confirmation, an error, a timeout, a hostile answer) is
//! `unknown`, and the whole lookup never takes longer than
//! `reverse_lookup_timeout`, so the greeting is never later than that.
//!
//! The resolver is built once per process, before the sandbox: from
//! `[smtpd] resolvers`, or else from /etc/resolv.conf, which is read then
//! because smtpd can no longer read any file afterwards. It never reads
//! /etc/hosts: names come from the DNS or not at all.

use crate::engine::UNKNOWN_NAME;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::xfer::{DnsHandle, FirstAnswer};
use hickory_resolver::proto::op::{DnsRequestOptions, Query, ResponseCode};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use hickory_resolver::{NameServerPool, PoolContext, TlsConfig};
use mortal_proto::config::Smtpd;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

/// Where the nameservers come from when `[smtpd] resolvers` is empty.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// The nameserver port of /etc/resolv.conf entries.
pub const DNS_PORT: u16 = 53;

/// Longest host name accepted (RFC 1035 2.3.4, without the final dot).
pub const MAX_NAME: usize = 253;

/// Longest label of a host name (RFC 1035 2.3.4).
pub const MAX_LABEL: usize = 63;

/// PTR names tried for forward confirmation: a client with more PTR
/// records than this cannot make smtpd look up all of them.
pub const MAX_PTR_NAMES: usize = 4;

/// Why the resolver could not be set up.
#[derive(Debug, Error)]
pub enum DnsError {
    #[error("read {RESOLV_CONF}: {0}")]
    ResolvConf(#[source] std::io::Error),
    #[error("{RESOLV_CONF}: {0}")]
    Parse(String),
    #[error("no nameserver in {RESOLV_CONF} or [smtpd] resolvers")]
    NoNameserver,
    #[error("resolver: {0}")]
    Build(String),
}

/// The nameservers `[smtpd]` names: `resolvers`, or else those of
/// /etc/resolv.conf (read now), on port 53. The sandbox allows exactly
/// these ports (Landlock) when `reverse_lookup` is on.
pub fn nameservers(smtpd: &Smtpd) -> Result<Vec<SocketAddr>, DnsError> {
    if !smtpd.resolvers.is_empty() {
        return Ok(smtpd.resolvers.clone());
    }
    let text = std::fs::read_to_string(Path::new(RESOLV_CONF)).map_err(DnsError::ResolvConf)?;
    resolv_conf_nameservers(&text)
}

/// The `nameserver` lines of resolv.conf text (resolv.conf(5)), on port
/// 53. Only the addresses matter: the names looked up here are always
/// absolute, so search domains and options have no use.
pub fn resolv_conf_nameservers(text: &str) -> Result<Vec<SocketAddr>, DnsError> {
    let mut servers = Vec::new();
    for line in text.lines() {
        let mut words = line.split_ascii_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(addr) = words.next() else { return Err(DnsError::Parse(format!("{line:?}: no address"))) };
        // A link-local IPv6 server may carry a zone (`fe80::1%eth0`),
        // which a socket address without scope id cannot reach: skip it.
        if addr.contains('%') {
            continue;
        }
        let ip: IpAddr = addr.parse().map_err(|_| DnsError::Parse(format!("{line:?}: not an IP address")))?;
        servers.push(SocketAddr::new(ip, DNS_PORT));
    }
    Ok(servers)
}

/// A stub resolver for the reverse lookups of one smtpd process. It asks
/// the nameservers directly rather than through hickory's `Resolver`,
/// which answers loopback addresses and `localhost` itself (RFC 6761):
/// smtpd wants the nameservers' answer or nothing, and its tests need a
/// loopback nameserver that is really asked.
pub struct ReverseResolver {
    pool: NameServerPool<TokioRuntimeProvider>,
    timeout: Duration,
}

impl std::fmt::Debug for ReverseResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReverseResolver").field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

impl ReverseResolver {
    /// The resolver `[smtpd]` asks for, or `None` when `reverse_lookup` is
    /// off. Reads /etc/resolv.conf when `resolvers` is empty, so call it
    /// before the sandbox, inside the runtime that will run the lookups.
    pub fn from_config(smtpd: &Smtpd) -> Result<Option<Self>, DnsError> {
        if !smtpd.reverse_lookup {
            return Ok(None);
        }
        Self::new(&nameservers(smtpd)?, smtpd.reverse_lookup_timeout).map(Some)
    }

    /// A resolver asking `servers` (over UDP, TCP when an answer is
    /// truncated), giving up on the whole lookup after `timeout`.
    pub fn new(servers: &[SocketAddr], timeout: Duration) -> Result<Self, DnsError> {
        Ok(ReverseResolver { pool: name_server_pool(servers, timeout)?, timeout })
    }

    /// The client's forward-confirmed name, or `unknown`; never takes
    /// longer than the timeout.
    pub async fn client_name(&self, addr: IpAddr) -> String {
        let addr = addr.to_canonical();
        match tokio::time::timeout(self.timeout, self.confirmed(addr)).await {
            Ok(Some(name)) => name,
            Ok(None) | Err(_) => UNKNOWN_NAME.to_owned(),
        }
    }

    async fn confirmed(&self, addr: IpAddr) -> Option<String> {
        let ptr = self.query(Name::from(addr), RecordType::PTR).await?;
        let names: Vec<Name> = ptr
            .into_iter()
            .filter_map(|record| match record.data {
                RData::PTR(name) => Some(name.0),
                _ => None,
            })
            .take(MAX_PTR_NAMES)
            .collect();
        let family = if addr.is_ipv4() { RecordType::A } else { RecordType::AAAA };
        for mut name in names {
            let Some(host) = valid_host_name(&name.to_ascii()) else { continue };
            // Absolute, so no search domain is ever tried.
            name.set_fqdn(true);
            let Some(forward) = self.query(name, family).await else { continue };
            let confirmed = forward.iter().any(|record| match &record.data {
                RData::A(a) => IpAddr::V4(a.0) == addr,
                RData::AAAA(aaaa) => IpAddr::V6(aaaa.0) == addr,
                _ => false,
            });
            if confirmed {
                return Some(host);
            }
            tracing::warn!("warning: hostname {host} does not resolve to address {addr}");
        }
        None
    }

    /// The answer records for `name` and `rtype`; `None` on any error or
    /// a response other than NOERROR.
    async fn query(&self, name: Name, rtype: RecordType) -> Option<Vec<Record>> {
        let response = self.pool.lookup(Query::query(name, rtype), DnsRequestOptions::default()).first_answer().await;
        let response = response.ok()?;
        if response.metadata.response_code != ResponseCode::NoError {
            return None;
        }
        Some(response.answers.clone())
    }
}

/// A pool asking exactly `servers` (over UDP, TCP when an answer is
/// truncated), once each, waiting at most `timeout` for an answer, and
/// never reading /etc/hosts. The reverse lookups and the DNS list lookups
/// ([`crate::dnsbl`]) ask their nameservers the same way.
pub fn name_server_pool(
    servers: &[SocketAddr],
    timeout: Duration,
) -> Result<NameServerPool<TokioRuntimeProvider>, DnsError> {
    if servers.is_empty() {
        return Err(DnsError::NoNameserver);
    }
    let name_servers: Vec<NameServerConfig> = servers
        .iter()
        .map(|server| {
            let mut ns = NameServerConfig::udp_and_tcp(server.ip());
            for connection in &mut ns.connections {
                connection.port = server.port();
            }
            ns
        })
        .collect();
    let mut options = ResolverOpts::default();
    options.timeout = timeout;
    options.attempts = 1;
    options.use_hosts_file = ResolveHosts::Never;
    let tls = TlsConfig::new().map_err(|e| DnsError::Build(e.to_string()))?;
    let context = Arc::new(PoolContext::new(options, tls));
    Ok(NameServerPool::from_config(name_servers, context, TokioRuntimeProvider::default()))
}

/// `name` (a trailing dot allowed) as a host name for logs and
/// `Received:`, lower-cased, or `None` when it is not a valid host name:
/// labels of letters, digits and inner hyphens (underscores too, which
/// real PTR records carry), at most [`MAX_LABEL`] octets each and
/// [`MAX_NAME`] in all, at least two labels, the last not all digits.
/// Nothing else can reach a log line, so a hostile PTR record cannot
/// inject text into logs or headers.
pub fn valid_host_name(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > MAX_NAME || name.eq_ignore_ascii_case(UNKNOWN_NAME) {
        return None;
    }
    let labels: Vec<&str> = name.split('.').collect();
    if labels.len() < 2 {
        return None;
    }
    for label in &labels {
        let bytes = label.as_bytes();
        if bytes.is_empty() || bytes.len() > MAX_LABEL {
            return None;
        }
        if !bytes.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return None;
        }
        if bytes[0] == b'-' || bytes[bytes.len() - 1] == b'-' {
            return None;
        }
    }
    // A name whose top label is numeric would read like an address.
    if labels.last().is_some_and(|top| top.bytes().all(|b| b.is_ascii_digit())) {
        return None;
    }
    Some(name.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_resolv_conf_nameservers() {
        let text = "# comment\nsearch example.com\nnameserver 192.0.2.53\n nameserver   2001:db8::53 \n\
                    nameserver fe80::1%eth0\noptions ndots:2\n";
        let servers = resolv_conf_nameservers(text).unwrap();
        let want: Vec<SocketAddr> = vec!["192.0.2.53:53".parse().unwrap(), "[2001:db8::53]:53".parse().unwrap()];
        assert_eq!(servers, want);
        assert!(resolv_conf_nameservers("nameserver\n").is_err());
        assert!(resolv_conf_nameservers("nameserver dns.example\n").is_err());
        assert!(resolv_conf_nameservers("").unwrap().is_empty());
    }

    fn smtpd(keys: &str) -> Result<Smtpd, String> {
        let toml = format!("[smtpd]\n{keys}");
        mortal_proto::config::Config::parse(&toml, Path::new("mortal.toml"))
            .map(|c| c.smtpd)
            .map_err(|e| format!("{e:?}"))
    }

    #[test]
    fn config_keys_are_validated_and_off_by_default() {
        let default = smtpd("").unwrap();
        assert!(!default.reverse_lookup && default.resolvers.is_empty());
        assert_eq!(default.reverse_lookup_timeout, Duration::from_secs(2));
        assert!(ReverseResolver::from_config(&default).unwrap().is_none(), "off: no resolver, no resolv.conf");
        for bad in ["reverse_lookup_timeout = \"0s\"", "resolvers = [\"0.0.0.0:53\"]", "resolvers = [\"192.0.2.53:0\"]"]
        {
            let err = smtpd(bad).unwrap_err();
            assert!(err.contains("smtpd"), "{bad}: {err}");
        }
        assert!(smtpd("resolvers = [\"ns.example:53\"]").is_err(), "names are not nameserver addresses");
        let on = smtpd("reverse_lookup = true\nresolvers = [\"192.0.2.53:5353\"]").unwrap();
        assert_eq!(nameservers(&on).unwrap(), vec!["192.0.2.53:5353".parse::<SocketAddr>().unwrap()]);
        assert!(matches!(ReverseResolver::new(&[], Duration::from_secs(1)), Err(DnsError::NoNameserver)));
    }

    #[test]
    fn accepts_host_names() {
        assert_eq!(valid_host_name("client.example.test.").as_deref(), Some("client.example.test"));
        assert_eq!(valid_host_name("Mail-1.Example.COM").as_deref(), Some("mail-1.example.com"));
        assert_eq!(valid_host_name("_dmarc.x.example").as_deref(), Some("_dmarc.x.example"));
        let long_label = "a".repeat(MAX_LABEL);
        assert!(valid_host_name(&format!("{long_label}.example")).is_some());
    }

    #[test]
    fn rejects_anything_else() {
        for bad in [
            "",
            ".",
            "localhost",
            "unknown",
            "UNKNOWN.",
            "a..example",
            ".example.com",
            "-a.example",
            "a-.example",
            "a b.example",
            "a\r\nX-Injected: 1.example",
            "a\u{1b}[31m.example",
            "a\0.example",
            "evil]example.com",
            "x.example[127.0.0.1]",
            "caf\u{e9}.example",
            "1.2.3.4",
            "10.0.0.1.",
        ] {
            assert_eq!(valid_host_name(bad), None, "{bad:?} must be refused");
        }
        let long_label = "a".repeat(MAX_LABEL + 1);
        assert_eq!(valid_host_name(&format!("{long_label}.example")), None);
        let long_name = vec!["abcdefghi"; 26].join(".");
        assert!(long_name.len() > MAX_NAME);
        assert_eq!(valid_host_name(&long_name), None);
    }
}
