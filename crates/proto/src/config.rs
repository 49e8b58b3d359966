//! `mortal.toml`: one typed struct per section, defaults in one place.
//!
//! Unknown keys are errors (`deny_unknown_fields`), and every error names
//! the file, the line and the key, whether TOML syntax, a type mismatch or
//! a semantic rule (`prefork` above `process_limit`, say) was broken.
//! Relative paths are resolved against the directory of the config file, so
//! the checkout's `etc/mortal.toml` works from any working directory.

use serde::{Deserialize, Deserializer};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A loaded, validated configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: Server,
    #[serde(default)]
    pub log: Log,
    #[serde(default)]
    pub smtpd: Smtpd,
    #[serde(default)]
    pub cleanup: Cleanup,
    #[serde(default)]
    pub queue: Queue,
    #[serde(default)]
    pub delivery: Delivery,
    #[serde(default)]
    pub process: Processes,
    /// The file this was loaded from.
    #[serde(skip)]
    pub source: PathBuf,
}

/// `[server]`: identity, paths, and what mail this host accepts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    /// Our host name, as in greetings and `Received:` (Postfix myhostname).
    pub hostname: String,
    /// Root of the queue directories.
    pub spool_dir: PathBuf,
    /// Pid file, control socket and the private sockets between daemons.
    /// Default: `<spool_dir>/run`.
    pub run_dir: Option<PathBuf>,
    /// Domains we accept mail for (Postfix mydestination / relay_domains).
    /// Anything else is refused with 554 5.7.1: mortal is never an open relay.
    pub accepted_domains: Vec<String>,
    /// Unprivileged user the daemons run as when the master starts as root.
    pub user: Option<String>,
}

impl Default for Server {
    fn default() -> Self {
        Self {
            hostname: "localhost".into(),
            spool_dir: PathBuf::from("/var/spool/mortal"),
            run_dir: None,
            accepted_domains: Vec::new(),
            user: None,
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    pub format: LogFormat,
    /// A `tracing` filter directive: `info`, `debug`, `mortal_smtpd=debug`...
    pub level: String,
    /// Program tag prefix in `postfix` format: lines read
    /// `<syslog_name>/<service>[pid]:`. The default has the shape of a
    /// Postfix named service, which fail2ban and pflogsumm already match.
    pub syslog_name: String,
}

impl Default for Log {
    fn default() -> Self {
        Self { format: LogFormat::Postfix, level: "info".into(), syslog_name: "postfix/mortal".into() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Classic syslog-shaped lines (`mortal/smtpd[123]: connect from ...`)
    /// that fail2ban and pflogsumm already parse.
    Postfix,
    /// One JSON object per event with every structured field.
    Json,
}

/// `[smtpd]`: the SMTP server's protocol limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Smtpd {
    /// Addresses to listen on (literal IPs: no name lookups).
    pub listen: Vec<SocketAddr>,
    /// Text after the host name in the 220 greeting.
    pub banner: String,
    /// Largest message accepted, in octets (SIZE, RFC 1870).
    pub message_size_limit: u64,
    /// Most recipients in one transaction; more get 452 4.5.3.
    pub recipient_limit: u32,
    /// Longest wait for a client's next command or data line.
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
    /// Errors in one session before it is closed with 421.
    pub hard_error_limit: u32,
}

impl Default for Smtpd {
    fn default() -> Self {
        Self {
            listen: vec!["0.0.0.0:25".parse().expect("literal address")],
            banner: "ESMTP mortal".into(),
            message_size_limit: 10_240_000,
            recipient_limit: 1000,
            timeout: Duration::from_secs(300),
            hard_error_limit: 20,
        }
    }
}

/// `[cleanup]`: what cleanup enforces again, without trusting smtpd.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Cleanup {
    /// Longest wait for the next record from smtpd.
    #[serde(deserialize_with = "duration")]
    pub ipc_timeout: Duration,
    /// Largest header section, in octets.
    pub header_size_limit: usize,
    /// More `Received:` headers than this means a mail loop (554 5.4.6).
    pub hopcount_limit: usize,
}

impl Default for Cleanup {
    fn default() -> Self {
        Self { ipc_timeout: Duration::from_secs(3600), header_size_limit: 102_400, hopcount_limit: 50 }
    }
}

/// `[queue]`: scheduling.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Queue {
    /// Periodic scan of incoming/ and deferred/, the backstop for a lost wake-up.
    #[serde(deserialize_with = "duration")]
    pub scan_interval: Duration,
    /// First retry delay after a temporary failure.
    #[serde(deserialize_with = "duration")]
    pub minimal_backoff: Duration,
    /// Retry delays double up to this.
    #[serde(deserialize_with = "duration")]
    pub maximal_backoff: Duration,
    /// Deliveries running at once.
    pub delivery_concurrency: u32,
    /// Messages in `active/` at once (Postfix qmgr_message_active_limit).
    pub active_limit: u32,
}

impl Default for Queue {
    fn default() -> Self {
        Self {
            scan_interval: Duration::from_secs(60),
            minimal_backoff: Duration::from_secs(300),
            maximal_backoff: Duration::from_secs(4000),
            delivery_concurrency: 20,
            active_limit: 20_000,
        }
    }
}

/// `[delivery]`: where accepted mail goes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Delivery {
    pub transport: Transport,
    /// Root of the per-recipient Maildirs (`<root>/<recipient>/{tmp,new,cur}`).
    /// Default: `<spool_dir>/maildir`.
    pub maildir_root: Option<PathBuf>,
}

impl Default for Delivery {
    fn default() -> Self {
        Self { transport: Transport::Maildir, maildir_root: None }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Maildir,
}

/// `[process.<service>]`: the lifetime policy of each pre-forked service.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Processes {
    pub smtpd: ProcessPolicy,
    pub cleanup: ProcessPolicy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessPolicy {
    /// Hard cap on children of this service.
    pub process_limit: u32,
    /// Children started before the first connection.
    pub prefork: u32,
    /// Idle children kept ready.
    pub min_spare: u32,
    /// Idle children allowed before extras are retired.
    pub max_spare: u32,
    /// Sessions a child serves before it exits; 0 means unlimited.
    pub max_use: u32,
}

impl Default for ProcessPolicy {
    fn default() -> Self {
        Self { process_limit: 100, prefork: 2, min_spare: 1, max_spare: 10, max_use: 100 }
    }
}

/// A configuration problem, located as precisely as the source allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Parses `text` as the contents of `file`, resolves paths against the
    /// file's directory and validates. Returns every semantic problem found,
    /// not just the first; a syntax or type error stops at that error.
    pub fn parse(text: &str, file: &Path) -> Result<Config, Vec<ConfigError>> {
        let mut config: Config = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of_offset(text, s.start));
            vec![ConfigError { file: file.to_owned(), line, key: None, message: e.message().trim().to_owned() }]
        })?;
        config.source = file.to_owned();
        let base = file.parent().unwrap_or(Path::new("."));
        config.server.spool_dir = base.join(&config.server.spool_dir);
        config.server.run_dir =
            Some(base.join(config.server.run_dir.clone().unwrap_or_else(|| config.server.spool_dir.join("run"))));
        config.delivery.maildir_root = Some(
            base.join(config.delivery.maildir_root.clone().unwrap_or_else(|| config.server.spool_dir.join("maildir"))),
        );
        let problems: Vec<ConfigError> = config
            .problems()
            .into_iter()
            .map(|(table, key, message)| ConfigError {
                file: file.to_owned(),
                line: line_of_key(text, &table, &key),
                key: Some(if table.is_empty() { key } else { format!("{table}.{key}") }),
                message,
            })
            .collect();
        if problems.is_empty() { Ok(config) } else { Err(problems) }
    }

    /// Reads and parses `file`.
    pub fn load(file: &Path) -> Result<Config, Vec<ConfigError>> {
        let text = std::fs::read_to_string(file).map_err(|e| {
            vec![ConfigError { file: file.to_owned(), line: None, key: None, message: format!("cannot read: {e}") }]
        })?;
        Config::parse(&text, file)
    }

    /// Semantic rules, as (table, key, message).
    fn problems(&self) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        let mut bad = |table: &str, key: &str, msg: String| out.push((table.to_owned(), key.to_owned(), msg));
        if self.server.hostname.is_empty()
            || !self.server.hostname.chars().all(|c| c.is_ascii_alphanumeric() || ".-".contains(c))
        {
            bad("server", "hostname", "must be a host name of letters, digits, '.' and '-'".into());
        }
        for d in &self.server.accepted_domains {
            if crate::address::parse_mailbox(&format!("x@{d}"), true).is_err() {
                bad("server", "accepted_domains", format!("{d:?} is not a domain name"));
            }
        }
        if self.smtpd.listen.is_empty() {
            bad("smtpd", "listen", "needs at least one address".into());
        }
        if self.smtpd.message_size_limit == 0 {
            bad("smtpd", "message_size_limit", "must be above 0".into());
        }
        if self.smtpd.recipient_limit == 0 {
            bad("smtpd", "recipient_limit", "must be above 0".into());
        }
        if self.smtpd.timeout.is_zero() {
            bad("smtpd", "timeout", "must be above 0".into());
        }
        if self.queue.delivery_concurrency == 0 {
            bad("queue", "delivery_concurrency", "must be at least 1".into());
        }
        if self.queue.active_limit < self.queue.delivery_concurrency {
            bad("queue", "active_limit", "must be at least delivery_concurrency".into());
        }
        if self.queue.minimal_backoff > self.queue.maximal_backoff {
            bad("queue", "minimal_backoff", "must not exceed maximal_backoff".into());
        }
        for (name, p) in [("smtpd", &self.process.smtpd), ("cleanup", &self.process.cleanup)] {
            let table = format!("process.{name}");
            if p.process_limit == 0 {
                bad(&table, "process_limit", "must be at least 1".into());
            }
            if p.prefork > p.process_limit {
                bad(&table, "prefork", format!("must not exceed process_limit ({})", p.process_limit));
            }
            if p.min_spare > p.max_spare {
                bad(&table, "min_spare", format!("must not exceed max_spare ({})", p.max_spare));
            }
            if p.min_spare > p.process_limit {
                bad(&table, "min_spare", format!("must not exceed process_limit ({})", p.process_limit));
            }
        }
        out
    }

    pub fn run_dir(&self) -> &Path {
        self.server.run_dir.as_deref().expect("resolved by Config::parse")
    }

    pub fn maildir_root(&self) -> &Path {
        self.delivery.maildir_root.as_deref().expect("resolved by Config::parse")
    }

    /// Directory holding the sockets between daemons; smtpd's view of the
    /// file system is reduced to this directory.
    pub fn private_dir(&self) -> PathBuf {
        self.run_dir().join("private")
    }

    /// cleanup's listening socket (smtpd connects here).
    pub fn cleanup_socket(&self) -> PathBuf {
        self.private_dir().join("cleanup")
    }

    /// queue's wake-up socket (cleanup and the CLI connect here).
    pub fn queue_socket(&self) -> PathBuf {
        self.private_dir().join("queue")
    }

    pub fn pid_file(&self) -> PathBuf {
        self.run_dir().join("master.pid")
    }

    /// A spool subdirectory: `incoming`, `active`, `deferred`, `hold`, `corrupt`.
    pub fn queue_dir(&self, name: &str) -> PathBuf {
        self.server.spool_dir.join(name)
    }

    /// Whether mail for `domain` is accepted here (case-insensitive).
    pub fn accepts_domain(&self, domain: &str) -> bool {
        let wanted = domain.to_lowercase();
        self.server.accepted_domains.iter().any(|d| d.to_lowercase() == wanted)
    }
}

/// The queue directories, in the order mail moves through them.
pub const QUEUE_DIRS: [&str; 5] = ["incoming", "active", "deferred", "hold", "corrupt"];

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s)
        .map_err(|e| serde::de::Error::custom(format!("{s:?} is not a duration like \"300s\" or \"5m\": {e}")))
}

fn line_of_offset(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

/// Finds the line where `key` is set inside `[table]` (or at top level for
/// an empty table); falls back to the table header, then to nothing.
fn line_of_key(text: &str, table: &str, key: &str) -> Option<usize> {
    let mut current = String::new();
    let mut header_line = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.split(']').next()) {
            current = name.trim().to_owned();
            if current == table {
                header_line = Some(i + 1);
            }
            continue;
        }
        if current == table && line.split('=').next().is_some_and(|k| k.trim() == key) && line.contains('=') {
            return Some(i + 1);
        }
    }
    header_line
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEV: &str = include_str!("../../../etc/mortal.toml");

    #[test]
    fn dev_config_is_valid() {
        let c = Config::parse(DEV, Path::new("/checkout/etc/mortal.toml")).unwrap();
        assert_eq!(c.smtpd.listen, vec!["127.0.0.1:2525".parse().unwrap()]);
        assert_eq!(c.server.spool_dir, Path::new("/checkout/etc/../spool"));
        assert!(c.accepts_domain("EXAMPLE.test"));
        assert!(!c.accepts_domain("elsewhere.test"));
    }

    #[test]
    fn unknown_key_names_line() {
        let text = "[server]\nhostname = \"a\"\n\n[smtpd]\nlisten = [\"127.0.0.1:25\"]\nmax_sessions = 3\n";
        let err = Config::parse(text, Path::new("m.toml")).unwrap_err();
        let msg = err[0].to_string();
        assert!(msg.starts_with("m.toml:6"), "{msg}");
        assert!(msg.contains("max_sessions"), "{msg}");
    }

    #[test]
    fn semantic_errors_name_key_and_line() {
        let text = "[process.smtpd]\nprocess_limit = 2\nprefork = 5\n";
        let err = Config::parse(text, Path::new("m.toml")).unwrap_err();
        assert_eq!(err.len(), 1);
        assert_eq!(err[0].to_string(), "m.toml:3: process.smtpd.prefork: must not exceed process_limit (2)");
    }

    #[test]
    fn bad_duration_is_explained() {
        let err = Config::parse("[smtpd]\ntimeout = \"soon\"\n", Path::new("m.toml")).unwrap_err();
        let msg = err[0].to_string();
        assert!(msg.starts_with("m.toml:2") && msg.contains("duration"), "{msg}");
    }
}
