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
//! The domain rule is [`mortal_proto::relay`], which cleanup applies again
//! (with the same trusted networks), without trusting smtpd; the recipient
//! map is smtpd's own. It is read once, when the smtpd process starts
//! ([`RelayPolicy::load`]), and handed to every session; `mortal reload`
//! replaces every smtpd process, so it reloads the map. Its format: one
//! address per line, compared without regard to case; blank lines and
//! lines starting with `#` are ignored.

use crate::engine::reply::{self, Reply};
use mortal_proto::address::{self, Mailbox};
use mortal_proto::config::Config;
use mortal_proto::relay::{self, Relay};
use mortal_proto::table::{Aliases, LookupError, Table, TableError, lookup_address};
use std::collections::HashSet;
use std::io::Read;
use std::net::IpAddr;
use std::path::Path;
use thiserror::Error;

/// Largest recipient map read, in octets (about a million addresses).
pub const MAX_RECIPIENT_MAP: u64 = 64 * 1024 * 1024;

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
    /// `virtual_alias_maps` or `recipient_maps`.
    #[error("{0}")]
    Table(#[from] TableError),
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

/// The RCPT rule of one smtpd process: the relay rule and, when `[server]
/// recipient_map` is set, the map loaded from it. Built once at process
/// start and shared by every session.
#[derive(Debug, Clone, Default)]
pub struct RelayPolicy {
    /// `None`: every address of an accepted domain is taken.
    map: Option<RecipientMap>,
    /// `[server] virtual_alias_maps`: an address they have is a known
    /// recipient too (cleanup expands it).
    aliases: std::sync::Arc<Aliases>,
    /// `[server] recipient_maps`: any table kind; with the map, the
    /// recipients known here.
    tables: std::sync::Arc<Vec<Table>>,
    delimiter: Option<char>,
}

impl RelayPolicy {
    /// Loads `[server] recipient_map`, if set. A daemon that cannot stops:
    /// serving without the map would accept mail for unknown users.
    pub fn load(config: &Config) -> Result<RelayPolicy, RecipientMapError> {
        let aliases = std::sync::Arc::new(Aliases::load(config)?);
        let timeout = config.server.table_timeout;
        let tables =
            config.server.recipient_maps.iter().map(|s| Table::load_with(s, timeout)).collect::<Result<Vec<_>, _>>()?;
        let map = match &config.server.recipient_map {
            Some(path) => {
                let map = RecipientMap::load(path)?;
                tracing::debug!("{}: {} recipients", path.display(), map.len());
                Some(map)
            }
            None => None,
        };
        Ok(RelayPolicy {
            map,
            aliases,
            tables: std::sync::Arc::new(tables),
            delimiter: config.server.recipient_delimiter,
        })
    }

    /// A policy with this recipient map (instead of the configured one).
    pub fn with_map(map: RecipientMap) -> RelayPolicy {
        RelayPolicy { map: Some(map), ..RelayPolicy::default() }
    }

    /// The same policy with these recipient tables.
    pub fn with_tables(self, tables: Vec<Table>, delimiter: Option<char>) -> RelayPolicy {
        RelayPolicy { tables: std::sync::Arc::new(tables), delimiter, ..self }
    }

    /// Whether the recipient lists (map and tables) are in force and know
    /// `mailbox`; `None` when none is configured (every address of an
    /// accepted domain is taken).
    /// `Err` when a table could not answer (a socketmap server).
    fn knows(&self, mailbox: &Mailbox) -> Result<Option<bool>, LookupError> {
        if self.map.is_none() && self.tables.is_empty() {
            return Ok(None);
        }
        let address = mailbox.to_string();
        if self.map.as_ref().is_some_and(|m| m.contains(mailbox)) || self.aliases.has(&address)? {
            return Ok(Some(true));
        }
        for table in self.tables.iter() {
            if lookup_address(table, &address, self.delimiter)?.is_some() {
                return Ok(Some(true));
            }
        }
        Ok(Some(false))
    }

    /// The same policy with these virtual aliases.
    pub fn with_aliases(self, aliases: Aliases) -> RelayPolicy {
        RelayPolicy { aliases: std::sync::Arc::new(aliases), ..self }
    }

    /// The RCPT decision for `mailbox` from a client at `client`: `Err`
    /// holds the reply refusing it.
    pub fn check(&self, config: &Config, client: IpAddr, mailbox: &Mailbox) -> Result<(), Reply> {
        match relay::decide_address(config, client, &mailbox.local, &mailbox.domain) {
            Relay::Local => {
                if mailbox.local.eq_ignore_ascii_case("postmaster") {
                    return Ok(());
                }
                match self.knows(mailbox) {
                    Ok(Some(false)) => Err(user_unknown(mailbox)),
                    Ok(_) => Ok(()),
                    Err(e) => {
                        tracing::warn!("warning: recipient lookup of <{mailbox}>: {e}");
                        Err(lookup_failed(mailbox))
                    }
                }
            }
            Relay::Trusted => Ok(()),
            Relay::Denied => Err(reply::relay_denied(&mailbox.to_string())),
        }
    }
}

/// Postfix's reply when a table could not answer: try again later.
pub fn lookup_failed(mailbox: &Mailbox) -> Reply {
    const { Reply::new(451, 3, 0, "") }.with_text(format!("<{mailbox}>: Temporary lookup failure"))
}

/// Postfix's reply for a recipient missing from local_recipient_maps.
pub fn user_unknown(mailbox: &Mailbox) -> Reply {
    const { Reply::new(550, 1, 1, "") }
        .with_text(format!("<{mailbox}>: Recipient address rejected: User unknown in local recipient table"))
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
            let policy = map.cloned().map(RelayPolicy::with_map).unwrap_or_default();
            let got = policy.check(cfg, client, &mb(rcpt));
            assert_eq!(got.map_err(|r| r.line()), expected.map_err(str::to_owned), "{rcpt} from {client}");
        }
    }

    /// An address the virtual aliases have is a known recipient.
    #[test]
    fn aliased_addresses_are_known() {
        let map = RecipientMap::parse("alice@example.test\n").unwrap();
        let table =
            mortal_proto::table::Table::load(&"inline:{ list@example.test = alice@example.test }".parse().unwrap())
                .unwrap();
        let policy = RelayPolicy::with_map(map).with_aliases(Aliases::new(vec![table], None));
        let cfg = config("");
        let client: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(policy.check(&cfg, client, &mb("list@example.test")).is_ok());
        assert!(policy.check(&cfg, client, &mb("carol@example.test")).is_err());
    }

    /// Recipient tables of any kind, in Postfix's key order.
    #[test]
    fn recipient_tables_know_users_catch_alls_and_extensions() {
        let users =
            Table::load(&"inline:{ alice@example.test = ok, @sub.example.test = ok }".parse().unwrap()).unwrap();
        let policy = RelayPolicy::default().with_tables(vec![users], Some('+'));
        let text = "[server]\naccepted_domains = [\"example.test\", \"sub.example.test\"]\n";
        let cfg = Config::parse(text, Path::new("mortal.toml")).expect("valid config");
        let client: IpAddr = "192.0.2.1".parse().unwrap();
        for (rcpt, known) in [
            ("alice@example.test", true),
            ("Alice+lists@example.test", true),
            ("anyone@sub.example.test", true),
            ("postmaster@example.test", true),
            ("bob@example.test", false),
        ] {
            assert_eq!(policy.check(&cfg, client, &mb(rcpt)).is_ok(), known, "{rcpt}");
        }
    }

    #[test]
    fn bad_maps_name_the_line() {
        let err = RecipientMap::parse("alice@example.test\nnot an address\n").unwrap_err();
        assert!(err.to_string().starts_with("line 2: \"not an address\""), "{err}");
    }
}
