//! Relay control at RCPT: which recipients this host takes, and from whom.
//!
//! - A recipient in an `accepted_domains` domain is accepted, unless a
//!   `recipient_map` is configured and does not list it: then
//!   `550 5.1.1 <addr>: Recipient address rejected: User unknown in local
//!   recipient table` (Postfix's local_recipient_maps reply, which
//!   fail2ban's stock filter knows). `postmaster` in an accepted domain is
//!   always accepted (RFC 5321 section 4.5.1).
//! - Any other recipient is relaying: allowed only to clients in
//!   `trusted_networks`, otherwise `554 5.7.1 <addr>: Relay access denied`.
//!
//! The recipient map is read once, when the smtpd process starts
//! ([`install`]); `mortal reload` replaces every smtpd process, so it
//! reloads the map. Its format: one address per line, compared without
//! regard to case; blank lines and lines starting with `#` are ignored.
//! cleanup checks the domain rule again (with the same trusted networks),
//! without trusting smtpd.

use crate::engine::reply;
use mortal_proto::address::{self, Mailbox};
use mortal_proto::config::{Config, networks_contain};
use std::collections::HashSet;
use std::io::Read;
use std::net::IpAddr;
use std::path::Path;
use std::sync::OnceLock;
use thiserror::Error;

/// Largest recipient map read, in octets (about a million addresses).
pub const MAX_RECIPIENT_MAP: u64 = 64 * 1024 * 1024;

/// The map this process loaded at start; unset means none is configured.
static RECIPIENT_MAP: OnceLock<RecipientMap> = OnceLock::new();

/// The addresses listed in a recipient map, lower-cased.
#[derive(Debug, Clone, Default)]
pub struct RecipientMap {
    addresses: HashSet<String>,
}

/// Why a recipient map could not be used.
#[derive(Debug, Error)]
pub enum RecipientMapError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("larger than {MAX_RECIPIENT_MAP} octets")]
    TooLarge,
    #[error("line {line}: {text:?} is not an address: {why}")]
    Address { line: usize, text: String, why: address::AddressError },
}

impl RecipientMap {
    pub fn parse(text: &str) -> Result<RecipientMap, RecipientMapError> {
        let mut addresses = HashSet::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mailbox = address::parse_mailbox(line, true).map_err(|why| RecipientMapError::Address {
                line: i + 1,
                text: line.to_owned(),
                why,
            })?;
            addresses.insert(key(&mailbox));
        }
        Ok(RecipientMap { addresses })
    }

    pub fn load(path: &Path) -> Result<RecipientMap, RecipientMapError> {
        let mut text = String::new();
        let file = std::fs::File::open(path)?;
        file.take(MAX_RECIPIENT_MAP + 1).read_to_string(&mut text)?;
        if text.len() as u64 > MAX_RECIPIENT_MAP {
            return Err(RecipientMapError::TooLarge);
        }
        RecipientMap::parse(&text)
    }

    pub fn contains(&self, mailbox: &Mailbox) -> bool {
        self.addresses.contains(&key(mailbox))
    }

    pub fn len(&self) -> usize {
        self.addresses.len()
    }

    pub fn is_empty(&self) -> bool {
        self.addresses.is_empty()
    }
}

fn key(mailbox: &Mailbox) -> String {
    format!("{}@{}", mailbox.local, mailbox.domain).to_lowercase()
}

/// Loads `[server] recipient_map`, if set, for [`check_recipient`] in this
/// process; the daemon calls it once at start and stops when it fails, as
/// serving without the map would accept mail for unknown users.
pub fn install(config: &Config) -> Result<(), RecipientMapError> {
    let Some(path) = &config.server.recipient_map else { return Ok(()) };
    let map = RecipientMap::load(path)?;
    tracing::debug!("{}: {} recipients", path.display(), map.len());
    // A second call keeps the first map: one per process lifetime.
    let _ = RECIPIENT_MAP.set(map);
    Ok(())
}

/// The RCPT decision for `mailbox` from a client at `client`: `Err` holds
/// the reply refusing it.
pub fn check_recipient(config: &Config, client: IpAddr, mailbox: &Mailbox) -> Result<(), String> {
    check_with(config, RECIPIENT_MAP.get(), client, mailbox)
}

/// [`check_recipient`] with an explicit map.
pub fn check_with(
    config: &Config,
    map: Option<&RecipientMap>,
    client: IpAddr,
    mailbox: &Mailbox,
) -> Result<(), String> {
    if config.accepts_domain(&mailbox.domain) {
        let postmaster = mailbox.local.eq_ignore_ascii_case("postmaster");
        return match map {
            Some(map) if !postmaster && !map.contains(mailbox) => Err(user_unknown(mailbox)),
            _ => Ok(()),
        };
    }
    if networks_contain(&config.server.trusted_networks, client) {
        return Ok(());
    }
    Err(reply::relay_denied(&mailbox.to_string()))
}

/// Postfix's reply for a recipient missing from local_recipient_maps.
pub fn user_unknown(mailbox: &Mailbox) -> String {
    format!("550 5.1.1 <{mailbox}>: Recipient address rejected: User unknown in local recipient table")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let text = format!("[server]\naccepted_domains = [\"example.test\"]\n{extra}");
        Config::parse(&text, Path::new("mortal.toml")).expect("valid config")
    }

    fn mb(s: &str) -> Mailbox {
        address::parse_mailbox(s, true).unwrap()
    }

    #[test]
    fn relay_table() {
        let map = RecipientMap::parse("# users\nalice@example.test\n\n  Bob@Example.TEST  \n").unwrap();
        assert_eq!(map.len(), 2);
        let trusted = config("trusted_networks = [\"10.0.0.0/8\", \"::1\"]\n");
        let plain = config("");
        let inside: IpAddr = "10.1.2.3".parse().unwrap();
        let outside: IpAddr = "192.0.2.1".parse().unwrap();
        let relay = "554 5.7.1 <x@elsewhere.test>: Relay access denied";
        let unknown =
            "550 5.1.1 <carol@example.test>: Recipient address rejected: User unknown in local recipient table";
        for (cfg, map, client, rcpt, expected) in [
            (&plain, None, outside, "anyone@example.test", Ok(())),
            (&plain, None, outside, "x@elsewhere.test", Err(relay)),
            (&trusted, None, inside, "x@elsewhere.test", Ok(())),
            (&trusted, None, "::ffff:10.9.9.9".parse().unwrap(), "x@elsewhere.test", Ok(())),
            (&trusted, None, outside, "x@elsewhere.test", Err(relay)),
            (&trusted, None, "::1".parse().unwrap(), "x@elsewhere.test", Ok(())),
            (&plain, Some(&map), outside, "alice@example.test", Ok(())),
            (&plain, Some(&map), outside, "ALICE@EXAMPLE.test", Ok(())),
            (&plain, Some(&map), outside, "bob@example.test", Ok(())),
            (&plain, Some(&map), outside, "carol@example.test", Err(unknown)),
            (&plain, Some(&map), outside, "PostMaster@example.test", Ok(())),
            // Trusted clients are not exempt from the local recipient table.
            (&trusted, Some(&map), inside, "carol@example.test", Err(unknown)),
            (&trusted, Some(&map), inside, "carol@elsewhere.test", Ok(())),
        ] {
            let got = check_with(cfg, map, client, &mb(rcpt));
            assert_eq!(got, expected.map_err(str::to_owned), "{rcpt} from {client}");
        }
    }

    #[test]
    fn bad_maps_name_the_line() {
        let err = RecipientMap::parse("alice@example.test\nnot an address\n").unwrap_err();
        assert!(err.to_string().starts_with("line 2: \"not an address\""), "{err}");
    }
}
