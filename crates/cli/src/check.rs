//! check: the risky-but-valid settings `mortal check` warns about.
//!
//! Errors (what `Config::parse` refuses) stop the mail system from
//! starting; these do not, but each one gives away part of what mortal is
//! for: an open relay, children that never die, a private key others can
//! read. Each warning names the file, the line, the column and the key,
//! like an error, located by the same [`Config::locate`].

use ipnet::IpNet;
use mortal_proto::config::{Config, Location, MilterDefaultAction, NextHop, ProcessPolicy, SpawnMode};
use mortal_proto::policy::Action;
use mortal_proto::service::Service;
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// A relay network wider than this (IPv4 prefix) is mostly other people.
const WIDE_V4_PREFIX: u8 = 8;
/// The same for IPv6 (a /32 is a whole provider's allocation).
const WIDE_V6_PREFIX: u8 = 32;
/// Permission bit: readable by every user.
const WORLD_READABLE: u32 = 0o004;

/// One risky setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// `table.key`.
    pub key: String,
    /// The key, or where the file leaves it out, its table.
    pub location: Option<Location>,
    pub message: String,
}

/// Formats as `file:line:column: key: warning: message`, given the file.
#[derive(Debug)]
pub struct Located<'a>(pub &'a Path, pub &'a Warning);

impl fmt::Display for Located<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Located(file, w) = self;
        write!(f, "{}", file.display())?;
        if let Some(at) = w.location {
            write!(f, ":{at}")?;
        }
        write!(f, ": {}: warning: {}", w.key, w.message)
    }
}

/// Every warning for `config`.
pub fn warnings(config: &Config) -> Vec<Warning> {
    let mut out = Vec::new();
    let mut warn = |table: &str, key: &str, message: String| {
        out.push(Warning { key: format!("{table}.{key}"), location: config.locate(table, key), message });
    };
    relay_warnings(config, &mut warn);
    filter_warnings(config, &mut warn);
    // The delivery-agent pools matter only where they exist.
    let pools = [Service::Smtpd, Service::Cleanup].into_iter().chain(config.agents());
    for service in pools {
        if let Some(policy) = config.process.pool(service) {
            lifetime_warnings(&format!("process.{service}"), policy, &mut warn);
        }
    }
    for (name, life) in [("queue", &config.process.queue), ("anvil", &config.process.anvil)] {
        if life.max_lifetime.is_zero() {
            warn(&format!("process.{name}"), "max_lifetime", "is 0s (unlimited): the process lives for ever".into());
        }
    }
    let keys = config.smtpd.tls_key_file.iter().map(|k| ("smtpd".to_owned(), "tls_key_file", k));
    let sni_keys =
        config.smtpd.tls_sni.iter().enumerate().map(|(i, s)| (format!("smtpd.tls_sni[{i}]"), "key_file", &s.key_file));
    for (table, name, key) in keys.chain(sni_keys) {
        match std::fs::metadata(key) {
            Ok(meta) if meta.mode() & WORLD_READABLE != 0 => warn(
                &table,
                name,
                format!(
                    "{} is readable by every user (mode {:04o}): chmod 600 it (smtpd reads it before it drops root)",
                    key.display(),
                    meta.mode() & 0o7777
                ),
            ),
            Ok(_) => {}
            Err(e) => warn(&table, name, format!("cannot read {}: {e} (STARTTLS will fail)", key.display())),
        }
    }
    out
}

fn relay_warnings(config: &Config, warn: &mut impl FnMut(&str, &str, String)) {
    if config.server.accepted_domains.is_empty() && config.server.trusted_networks.is_empty() {
        warn(
            "server",
            "accepted_domains",
            "is empty: every recipient is refused with 554 5.7.1, so this host accepts no mail".into(),
        );
    }
    for net in config.server.trusted_networks.iter().filter(|n| is_wide(n)) {
        warn(
            "server",
            "trusted_networks",
            format!("{net} lets a large part of the Internet relay through this host to any domain: an open relay"),
        );
    }
    for net in config.smtpd.proxy_trusted.iter().filter(|n| is_wide(n)) {
        warn(
            "smtpd",
            "proxy_trusted",
            format!("{net} lets nearly anyone claim any client address with a PROXY header"),
        );
    }
}

/// Filters smtpd cannot reach once chrooted, and filters whose failure
/// lets mail through unchecked.
fn filter_warnings(config: &Config, warn: &mut impl FnMut(&str, &str, String)) {
    let private = config.private_dir();
    let milters = config.smtpd.milters.iter().enumerate().map(|(i, m)| (format!("smtpd.milter[{i}]"), &m.endpoint));
    let policy = config.smtpd.policy.iter().enumerate().map(|(i, p)| (format!("smtpd.policy[{i}]"), &p.endpoint));
    let auth = config.smtpd.auth.server.iter().map(|s| ("smtpd.auth".to_owned(), s));
    for (table, endpoint) in milters.chain(policy).chain(auth) {
        if let NextHop::Unix(path) = endpoint
            && !path.starts_with(&private)
        {
            warn(
                &table,
                if table == "smtpd.auth" { "server" } else { "endpoint" },
                format!(
                    "{} is outside {}: smtpd, chrooted there when mortal starts as root, cannot reach it; \
                     let the filter listen below that directory, or on inet:",
                    path.display(),
                    private.display()
                ),
            );
        }
    }
    // socketmap tables smtpd asks: a unix socket outside its chroot is
    // out of reach, as for a filter.
    let access = config.smtpd.restrictions.all().filter_map(mortal_proto::restriction::Restriction::table);
    let smtpd_tables = config.server.recipient_maps.iter().chain(&config.server.virtual_alias_maps).chain(access);
    for spec in smtpd_tables {
        if let mortal_proto::table::TableSpec::Socketmap(map) = spec
            && let NextHop::Unix(path) = &map.endpoint
            && !path.starts_with(&private)
        {
            warn(
                "server",
                "recipient_maps",
                format!(
                    "{spec}: {} is outside {}, where smtpd is chrooted when mortal starts as root; \
                     let the socketmap server listen below that directory, or on inet:",
                    path.display(),
                    private.display()
                ),
            );
        }
    }
    let verifies = config
        .smtpd
        .restrictions
        .all()
        .any(|r| *r == mortal_proto::restriction::Restriction::RejectUnverifiedRecipient);
    for route in config.routes().filter(|_| verifies) {
        if let mortal_proto::config::Route::Lmtp(NextHop::Unix(path)) = route
            && !path.starts_with(&private)
        {
            warn(
                "smtpd.restrictions",
                "recipient",
                format!(
                    "reject_unverified_recipient cannot probe {}: it is outside {}, where smtpd is chrooted \
                     when mortal starts as root; let the LMTP server listen below that directory, or on inet:",
                    path.display(),
                    private.display()
                ),
            );
        }
    }
    for (i, m) in config.smtpd.milters.iter().enumerate() {
        if m.default_action == MilterDefaultAction::Accept {
            warn(
                &format!("smtpd.milter[{i}]"),
                "default_action",
                "is accept: while the milter is down or slow, mail passes unchecked".into(),
            );
        }
    }
    for (i, p) in config.smtpd.policy.iter().enumerate() {
        if matches!(p.default_action, Action::Ok | Action::Dunno) {
            warn(
                &format!("smtpd.policy[{i}]"),
                "default_action",
                "permits: while the policy server is down or slow, its checks are skipped".into(),
            );
        }
    }
}

/// The longest `max_lifetime` a pool with `spawn = "fork"` passes
/// without a warning: its children share one address-space layout (the
/// zygote's) that long.
const FORK_LAYOUT_LIFETIME: std::time::Duration = std::time::Duration::from_secs(3600);

fn lifetime_warnings(table: &str, p: &ProcessPolicy, warn: &mut impl FnMut(&str, &str, String)) {
    if p.spawn == SpawnMode::Fork && (p.max_lifetime.is_zero() || p.max_lifetime > FORK_LAYOUT_LIFETIME) {
        let life = if p.max_lifetime.is_zero() {
            "0s (unlimited): until the next reload".to_owned()
        } else {
            format!("{}s", p.max_lifetime.as_secs())
        };
        warn(
            table,
            "spawn",
            format!(
                "is fork with max_lifetime {life}: every child shares its zygote's address-space layout that long; \
                 keep max_lifetime at {}s or less",
                FORK_LAYOUT_LIFETIME.as_secs()
            ),
        );
    }
    if p.max_use == 0 && p.max_lifetime.is_zero() {
        warn(
            table,
            "max_use",
            "is 0 and max_lifetime is 0s: children never die, so a compromised one stays compromised \
             (the Secure Pre-forking pattern is off)"
                .into(),
        );
        return;
    }
    if p.max_use == 0 {
        warn(
            table,
            "max_use",
            "is 0 (unlimited): a child serves every session until max_lifetime, so one compromise reaches all of them"
                .into(),
        );
    }
    if p.max_lifetime.is_zero() {
        warn(table, "max_lifetime", "is 0s (unlimited): a quiet child may live for ever".into());
    }
    if p.session_deadline.is_zero() {
        warn(table, "session_deadline", "is 0s: a stuck or hijacked session holds its child for ever".into());
    }
}

fn is_wide(net: &IpNet) -> bool {
    match net {
        IpNet::V4(_) => net.prefix_len() < WIDE_V4_PREFIX,
        IpNet::V6(_) => net.prefix_len() < WIDE_V6_PREFIX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Vec<String> {
        let file = Path::new("/etc/mortal/mortal.toml");
        let config = Config::parse(text, file).expect("valid config");
        warnings(&config).iter().map(|w| Located(file, w).to_string()).collect()
    }

    const SAFE: &str = "[server]\naccepted_domains = [\"example.test\"]\n[smtpd]\nlisten = [\"127.0.0.1:2525\"]\n";

    #[test]
    fn safe_config_has_no_warnings() {
        assert_eq!(check(SAFE), Vec::<String>::new());
    }

    #[test]
    fn risky_settings_are_named_with_their_line() {
        let text = "[server]\ntrusted_networks = [\"0.0.0.0/0\", \"10.0.0.0/8\"]\n\
                    [smtpd]\nlisten = [\"0.0.0.0:25\"]\n\
                    [process.smtpd]\nmax_use = 0\n\
                    [process.cleanup]\nmax_use = 0\nmax_lifetime = \"0s\"\n";
        let got = check(text);
        let want = [
            "/etc/mortal/mortal.toml:2:1: server.trusted_networks: warning: 0.0.0.0/0 lets a large part of the Internet relay",
            "/etc/mortal/mortal.toml:6:1: process.smtpd.max_use: warning: is 0 (unlimited)",
            "/etc/mortal/mortal.toml:8:1: process.cleanup.max_use: warning: is 0 and max_lifetime is 0s: children never die",
        ];
        assert_eq!(got.len(), want.len(), "{got:#?}");
        for (got, want) in got.iter().zip(want) {
            assert!(got.starts_with(want), "{got}\n  does not start with\n{want}");
        }
    }

    /// A forked pool whose zygote (and so its layout) lives long is named.
    #[test]
    fn fork_spawn_with_a_long_lifetime_is_named() {
        let fork = |life: &str| check(&format!("{SAFE}[process.smtpd]\nspawn = \"fork\"\nmax_lifetime = \"{life}\"\n"));
        assert_eq!(fork("10m"), Vec::<String>::new());
        assert_eq!(fork("1h"), Vec::<String>::new());
        let got = fork("2h");
        assert_eq!(got.len(), 1, "{got:#?}");
        assert!(
            got[0].starts_with(
                "/etc/mortal/mortal.toml:6:1: process.smtpd.spawn: warning: is fork with max_lifetime 7200s"
            ),
            "{got:#?}"
        );
        let got = fork("0s");
        assert!(got.iter().any(|w| w.contains("spawn: warning: is fork with max_lifetime 0s (unlimited)")), "{got:#?}");
    }

    /// The pipe pool is checked like the others, but only with a pipe route.
    #[test]
    fn pipe_pool_lifetime_is_checked_when_routed() {
        let unlimited = "[process.pipe]\nmax_use = 0\nmax_lifetime = \"0s\"\n";
        assert_eq!(check(&format!("{SAFE}{unlimited}")), Vec::<String>::new());
        let routed = format!(
            "{SAFE}[delivery]\ntransport = \"pipe\"\n[delivery.pipe]\ncommand = [\"/bin/true\"]\nuser = \"pipeuser\"\n{unlimited}"
        );
        let got = check(&routed);
        assert_eq!(got.len(), 1, "{got:#?}");
        assert!(
            got[0].starts_with(
                "/etc/mortal/mortal.toml:11:1: process.pipe.max_use: warning: is 0 and max_lifetime is 0s"
            ),
            "{got:#?}"
        );
    }

    /// The deployment sample must stay valid as the configuration grows,
    /// and must not trip any warning but the one about its TLS key, which
    /// exists only on the mail host.
    #[test]
    fn production_sample_is_valid_and_safe() {
        let text = include_str!("../../../etc/mortal.production.toml");
        let got = check(text);
        let key_absent =
            |w: &String| w.contains("smtpd.tls_key_file: warning: cannot read /etc/mortal/tls/privkey.pem");
        assert!(got.iter().all(key_absent), "{got:#?}");
        let config = Config::parse(text, Path::new("/etc/mortal/mortal.toml")).unwrap();
        assert_eq!(config.server.spool_dir, Path::new("/var/spool/mortal"));
        assert_eq!(config.delivery.transport.to_string(), "lmtp:unix:/run/dovecot/lmtp");
        assert_eq!(config.server.user, "mortal");
    }

    #[test]
    fn no_domains_and_no_networks_accepts_nothing() {
        let got = check("[smtpd]\nlisten = [\"127.0.0.1:2525\"]\n");
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].contains("server.accepted_domains: warning: is empty"), "{got:?}");
    }

    #[test]
    fn filters_out_of_reach_or_failing_open() {
        let got = check(
            "[server]\naccepted_domains = [\"example.test\"]\n\
             [[smtpd.milter]]\nendpoint = \"unix:/run/rspamd/milter.sock\"\ndefault_action = \"accept\"\n\
             [[smtpd.milter]]\nendpoint = \"unix:/var/spool/mortal/run/private/opendkim.sock\"\n\
             [[smtpd.policy]]\nendpoint = \"inet:127.0.0.1:10023\"\ndefault_action = \"DUNNO\"\n",
        );
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(
            got[0].starts_with(
                "/etc/mortal/mortal.toml:4:1: smtpd.milter[0].endpoint: warning: /run/rspamd/milter.sock is \
                 outside /var/spool/mortal/run/private: "
            ),
            "{got:?}"
        );
        assert!(got[1].starts_with("/etc/mortal/mortal.toml:5:1: smtpd.milter[0].default_action: warning: is accept"));
        assert!(got[2].starts_with("/etc/mortal/mortal.toml:10:1: smtpd.policy[0].default_action: warning: permits"));
    }

    #[test]
    fn world_readable_tls_key() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path();
        let key = dir.join("key.pem");
        std::fs::write(&key, "not really a key").unwrap();
        let text = format!("{SAFE}tls_key_file = \"{}\"\ntls_cert_file = \"{}\"\n", key.display(), key.display());
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        let got = check(&text);
        assert!(
            got.len() == 1 && got[0].contains(":5:1: smtpd.tls_key_file: warning: ") && got[0].contains("(mode 0644)")
        );
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        assert_eq!(check(&text), Vec::<String>::new());
    }
}
