//! The relay rule: whether mail for a recipient domain may be taken from a
//! client, decided the same way by smtpd (at RCPT) and by cleanup (which
//! checks again without trusting smtpd).
//!
//! - A domain in `[server] accepted_domains` (compared without regard to
//!   case, exactly: a subdomain is another domain) is [`Relay::Local`],
//!   whoever the client is.
//! - Any other domain, address literals included, is relaying: allowed
//!   ([`Relay::Trusted`]) only to a client inside `[server]
//!   trusted_networks`, otherwise [`Relay::Denied`]. mortal is never an
//!   open relay.
//!
//! What smtpd adds for local domains (the recipient map) is smtpd's: this
//! is only the rule both sides must agree on.

use crate::config::Config;
use std::net::IpAddr;

/// What the relay rule says about one recipient domain and client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relay {
    /// The domain is one of ours.
    Local,
    /// Another domain, from a client in `trusted_networks`.
    Trusted,
    /// Another domain from anyone else: `554 5.7.1 Relay access denied`.
    Denied,
}

impl Relay {
    pub fn is_allowed(self) -> bool {
        self != Relay::Denied
    }
}

/// The relay rule for the address `local@domain`: [`decide`], except that
/// a local part that routes on by itself (`user%elsewhere`, `host!user`,
/// a quoted `"user@elsewhere"`: Postfix's sender-specified routing) is
/// relaying even in an accepted domain, whatever a table later makes of
/// it (Postfix's `allow_untrusted_routing = no`).
pub fn decide_address(config: &Config, client: IpAddr, local: &str, domain: &str) -> Relay {
    match decide(config, client, domain) {
        Relay::Local if local.contains(['%', '!', '@']) => {
            if crate::config::networks_contain(&config.server.trusted_networks, client) {
                Relay::Trusted
            } else {
                Relay::Denied
            }
        }
        other => other,
    }
}

/// The relay rule for mail to `domain` (as in the address: a name or an
/// address literal) from a client at `client`.
pub fn decide(config: &Config, client: IpAddr, domain: &str) -> Relay {
    if config.accepts_domain(domain) {
        Relay::Local
    } else if crate::config::networks_contain(&config.server.trusted_networks, client) {
        Relay::Trusted
    } else {
        Relay::Denied
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(extra: &str) -> Config {
        let text = format!("[server]\naccepted_domains = [\"example.test\", \"Mixed.Example\"]\n{extra}");
        Config::parse(&text, Path::new("mortal.toml")).expect("valid config")
    }

    /// Sender-specified routing in an accepted domain is relaying.
    #[test]
    fn routing_local_parts_relay() {
        let plain = config("");
        let trusted = config("trusted_networks = [\"10.0.0.0/8\"]\n");
        let (outside, inside): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "10.1.2.3".parse().unwrap());
        for local in ["user%elsewhere.test", "elsewhere.test!user", "\"user@elsewhere.test\""] {
            assert_eq!(decide_address(&plain, outside, local, "example.test"), Relay::Denied, "{local}");
            assert_eq!(decide_address(&trusted, inside, local, "example.test"), Relay::Trusted, "{local}");
        }
        assert_eq!(decide_address(&plain, outside, "user", "example.test"), Relay::Local);
        assert_eq!(decide_address(&plain, outside, "user", "elsewhere.test"), Relay::Denied);
    }

    #[test]
    fn relay_table() {
        let plain = config("");
        let trusted = config("trusted_networks = [\"10.0.0.0/8\", \"192.0.2.128/25\", \"2001:db8::/32\", \"::1\"]\n");
        let outside = "192.0.2.1";
        let inside = "10.1.2.3";
        use Relay::{Denied, Local, Trusted};
        for (cfg, client, domain, expected) in [
            // Accepted domains, from anyone, in any case.
            (&plain, outside, "example.test", Local),
            (&plain, outside, "EXAMPLE.TEST", Local),
            (&plain, outside, "mixed.example", Local),
            (&trusted, inside, "example.test", Local),
            // Not a suffix match: subdomains and look-alikes are other domains.
            (&plain, outside, "sub.example.test", Denied),
            (&plain, outside, "example.test.evil.test", Denied),
            (&plain, outside, "evil-example.test", Denied),
            (&plain, outside, "elsewhere.test", Denied),
            (&trusted, inside, "sub.example.test", Trusted),
            // Address literals are never accepted domains.
            (&plain, outside, "[127.0.0.1]", Denied),
            (&plain, outside, "[IPv6:::1]", Denied),
            (&trusted, inside, "[192.0.2.1]", Trusted),
            // Trusted networks, both families, v4 clients seen as v6-mapped.
            (&trusted, outside, "elsewhere.test", Denied),
            (&trusted, inside, "elsewhere.test", Trusted),
            (&trusted, "192.0.2.200", "elsewhere.test", Trusted),
            (&trusted, "::ffff:10.9.9.9", "elsewhere.test", Trusted),
            (&trusted, "2001:db8:1::25", "elsewhere.test", Trusted),
            (&trusted, "2001:db9::25", "elsewhere.test", Denied),
            (&trusted, "::1", "elsewhere.test", Trusted),
            (&trusted, "::2", "elsewhere.test", Denied),
            (&plain, "127.0.0.1", "elsewhere.test", Denied),
        ] {
            let client: IpAddr = client.parse().expect("address");
            assert_eq!(decide(cfg, client, domain), expected, "{domain} from {client}");
        }
    }

    #[test]
    fn no_accepted_domains_means_only_trusted_relaying() {
        let none = Config::parse("[server]\ntrusted_networks = [\"10.0.0.0/8\"]\n", Path::new("m.toml")).unwrap();
        assert_eq!(decide(&none, "192.0.2.1".parse().unwrap(), "example.test"), Relay::Denied);
        assert_eq!(decide(&none, "10.0.0.1".parse().unwrap(), "example.test"), Relay::Trusted);
        assert!(!Relay::Denied.is_allowed() && Relay::Local.is_allowed() && Relay::Trusted.is_allowed());
    }
}
