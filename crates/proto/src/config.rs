//! `mortal.toml`: one typed struct per section, defaults in one place.
//!
//! Unknown keys are errors (`deny_unknown_fields`), and every error names
//! the file, the line and the key, whether TOML syntax, a type mismatch or
//! a semantic rule (`prefork` above `process_limit`, say) was broken.
//! Relative paths are resolved against the directory of the config file, so
//! the checkout's `etc/mortal.toml` works from any working directory.

use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
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
    #[serde(default)]
    pub anvil: Anvil,
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
    /// Unprivileged user the daemons run as when the master starts as root
    /// (default `mortal`; it must exist then). Ignored in development mode,
    /// where every process keeps the invoking user.
    pub user: Option<String>,
    /// Client networks (CIDR) that may relay to any domain (Postfix
    /// mynetworks); they are also exempt from the per-client limits. They
    /// are not exempt from any protocol rule (bare LF, pipelining).
    pub trusted_networks: Vec<crate::cidr::Cidr>,
    /// File of accepted recipient addresses, one per line (Postfix
    /// local_recipient_maps); unset: every address of an accepted domain.
    /// smtpd reads it at process start, so `mortal reload` reloads it.
    pub recipient_map: Option<PathBuf>,
    /// Prometheus text file (node_exporter textfile collector) the master
    /// rewrites atomically every few seconds: children per state, spawns,
    /// retirements by reason, throttles. Unset: none.
    pub metrics_file: Option<PathBuf>,
}

impl Default for Server {
    fn default() -> Self {
        Self {
            hostname: "localhost".into(),
            spool_dir: PathBuf::from("/var/spool/mortal"),
            run_dir: None,
            accepted_domains: Vec::new(),
            user: None,
            trusted_networks: Vec::new(),
            recipient_map: None,
            metrics_file: None,
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
    /// Errors after which every reply is delayed by `error_sleep`
    /// (Postfix smtpd_soft_error_limit); 0 disables the delay.
    pub soft_error_limit: u32,
    /// Delay before each reply once `soft_error_limit` is reached.
    #[serde(deserialize_with = "duration")]
    pub error_sleep: Duration,
    /// Slowest content a client may send during DATA/BDAT, in octets per
    /// second averaged over `data_rate_window`; slower gets 421 and the
    /// session ends, so a slowloris cannot hold a child. 0 disables it.
    pub min_data_rate: u64,
    /// Time spent waiting for content over which `min_data_rate` is measured.
    #[serde(deserialize_with = "duration")]
    pub data_rate_window: Duration,
    /// What a bare `<LF>` in DATA content gets: `reject` (550 after the
    /// terminator) or `normalize` (taken as `<CR><LF>`; it still never ends
    /// the message).
    pub bare_newline: BareNewline,
    /// Offer SMTPUTF8 (RFC 6531).
    pub smtputf8: bool,
    /// Offer CHUNKING and BINARYMIME (RFC 3030).
    pub chunking: bool,
    /// Offer DSN (RFC 3461).
    pub dsn: bool,
    /// Certificate chain for STARTTLS (PEM), leaf first. Read at process
    /// start; STARTTLS is offered only when it and `tls_key_file` are set.
    pub tls_cert_file: Option<PathBuf>,
    /// Private key for `tls_cert_file` (PEM).
    pub tls_key_file: Option<PathBuf>,
    /// `may`: offer STARTTLS when a certificate is configured; `none`: never.
    pub tls_security: TlsSecurity,
    /// Longest a TLS handshake may take after `220 Ready to start TLS`.
    #[serde(deserialize_with = "duration")]
    pub tls_handshake_timeout: Duration,
    /// Addresses to listen on behind a load balancer: every connection must
    /// open with a PROXY protocol v1 or v2 header (haproxy) naming the real
    /// client, which is then what is logged, limited and put in `Received:`.
    pub proxy_listen: Vec<SocketAddr>,
    /// Peers (CIDR) allowed to send the PROXY header; a connection to a
    /// `proxy_listen` address from anyone else is dropped.
    pub proxy_trusted: Vec<crate::cidr::Cidr>,
    /// Longest wait for the whole PROXY header.
    #[serde(deserialize_with = "duration")]
    pub proxy_timeout: Duration,
    /// Connections one client address may have open at once across all
    /// smtpd processes (Postfix smtpd_client_connection_count_limit); 0: no limit.
    pub client_connection_count_limit: u32,
    /// Connections one client may open per `[anvil] rate_time_unit`
    /// (Postfix smtpd_client_connection_rate_limit); 0 (the default, as in
    /// Postfix): no limit.
    pub client_connection_rate_limit: u32,
    /// MAIL commands one client may send per `[anvil] rate_time_unit`
    /// (Postfix smtpd_client_message_rate_limit); 0 (the default): no limit.
    pub client_message_rate_limit: u32,
    /// Clients (CIDR) exempt from the three limits above, besides
    /// `trusted_networks` (Postfix smtpd_client_event_limit_exceptions,
    /// whose default, $mynetworks, includes the loopback networks).
    pub client_limit_exceptions: Vec<crate::cidr::Cidr>,
    /// IPv4 clients are counted per network of this many bits (Postfix
    /// smtpd_client_ipv4_prefix_length).
    pub client_ipv4_prefix_length: u8,
    /// IPv6 clients are counted per network of this many bits (Postfix
    /// smtpd_client_ipv6_prefix_length): one host commonly holds a whole
    /// /64 or more, so counting single addresses would limit nothing.
    pub client_ipv6_prefix_length: u8,
    /// Look the client's name up in the DNS (PTR, then forward-confirmed
    /// with A/AAAA) for `name[addr]` in logs and `Received:`; off: every
    /// client is `unknown[addr]`.
    pub reverse_lookup: bool,
    /// Longest wait for the whole reverse lookup; the greeting is never
    /// later than this.
    #[serde(deserialize_with = "duration")]
    pub reverse_lookup_timeout: Duration,
    /// Nameservers (literal `IP:port`) for `reverse_lookup`; empty: those
    /// of /etc/resolv.conf, read when smtpd starts.
    pub resolvers: Vec<SocketAddr>,
}

/// `[smtpd] tls_security` (Postfix smtpd_tls_security_level).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsSecurity {
    None,
    May,
}

/// `[smtpd] bare_newline`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BareNewline {
    Reject,
    Normalize,
}

impl Smtpd {
    /// Whether STARTTLS is offered: enabled, with a certificate and key.
    pub fn tls_offered(&self) -> bool {
        self.tls_security == TlsSecurity::May && self.tls_cert_file.is_some() && self.tls_key_file.is_some()
    }
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
            soft_error_limit: 10,
            error_sleep: Duration::from_secs(1),
            min_data_rate: 500,
            data_rate_window: Duration::from_secs(10),
            bare_newline: BareNewline::Reject,
            smtputf8: true,
            chunking: true,
            dsn: true,
            tls_cert_file: None,
            tls_key_file: None,
            tls_security: TlsSecurity::May,
            tls_handshake_timeout: Duration::from_secs(60),
            proxy_listen: Vec::new(),
            proxy_trusted: vec![
                "127.0.0.1/32".parse().expect("literal CIDR"),
                "::1/128".parse().expect("literal CIDR"),
            ],
            proxy_timeout: Duration::from_secs(5),
            client_connection_count_limit: 50,
            client_connection_rate_limit: 0,
            client_message_rate_limit: 0,
            client_limit_exceptions: vec![
                "127.0.0.0/8".parse().expect("literal CIDR"),
                "::1/128".parse().expect("literal CIDR"),
            ],
            client_ipv4_prefix_length: 32,
            client_ipv6_prefix_length: 84,
            reverse_lookup: false,
            reverse_lookup_timeout: Duration::from_secs(2),
            resolvers: Vec::new(),
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
    /// Deliveries to one destination (a next hop, or a local route and
    /// recipient domain) at once, within `delivery_concurrency`.
    pub destination_concurrency_limit: u32,
    /// A message still undeliverable after this long is returned to its
    /// sender (Postfix maximal_queue_lifetime).
    #[serde(deserialize_with = "duration")]
    pub queue_lifetime: Duration,
    /// The same for mail from `<>` (bounces), which is dropped with a log
    /// line instead: a bounce is never bounced.
    #[serde(deserialize_with = "duration")]
    pub bounce_queue_lifetime: Duration,
    /// Send one "delayed" DSN once a message has waited this long; `0s`
    /// (the default) sends none.
    #[serde(deserialize_with = "duration")]
    pub delay_warning_time: Duration,
}

impl Default for Queue {
    fn default() -> Self {
        Self {
            scan_interval: Duration::from_secs(60),
            minimal_backoff: Duration::from_secs(300),
            maximal_backoff: Duration::from_secs(4000),
            delivery_concurrency: 20,
            active_limit: 20_000,
            destination_concurrency_limit: 20,
            queue_lifetime: Duration::from_secs(5 * 86_400),
            bounce_queue_lifetime: Duration::from_secs(5 * 86_400),
            delay_warning_time: Duration::ZERO,
        }
    }
}

/// `[delivery]`: where accepted mail goes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Delivery {
    /// The default route, for every recipient domain not in `routes`.
    pub transport: Route,
    /// `[delivery.routes]`: recipient domain (lower case) to route.
    pub routes: BTreeMap<String, Route>,
    /// Root of the per-recipient Maildirs (`<root>/<recipient>/{tmp,new,cur}`).
    /// Default: `<spool_dir>/maildir`.
    pub maildir_root: Option<PathBuf>,
    /// `[delivery.pipe]`: the command behind the `pipe` route.
    pub pipe: Pipe,
    /// STARTTLS policy of the `smtp` relay client.
    pub smtp_tls_security: SmtpTlsSecurity,
    /// PEM file of CA certificates for `encrypt`; default: the Mozilla
    /// roots built in (webpki-roots).
    pub smtp_tls_ca_file: Option<PathBuf>,
    /// Longest wait for a TCP or Unix connection to an LMTP or SMTP next hop.
    #[serde(deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// Longest wait for any one reply (or for sending the content) in an
    /// LMTP or SMTP session.
    #[serde(deserialize_with = "duration")]
    pub command_timeout: Duration,
    /// An idle LMTP/SMTP connection is kept this long for the next message
    /// to the same next hop, then closed (Postfix
    /// smtp_connection_cache_time_limit); `0s` disables reuse.
    #[serde(deserialize_with = "duration")]
    pub connection_reuse_time: Duration,
}

impl Default for Delivery {
    fn default() -> Self {
        Self {
            transport: Route::Maildir,
            routes: BTreeMap::new(),
            maildir_root: None,
            pipe: Pipe::default(),
            smtp_tls_security: SmtpTlsSecurity::May,
            smtp_tls_ca_file: None,
            connect_timeout: Duration::from_secs(30),
            command_timeout: Duration::from_secs(300),
            connection_reuse_time: Duration::from_secs(2),
        }
    }
}

/// `[delivery.pipe]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pipe {
    /// argv template, never run through a shell: an absolute program path,
    /// then arguments where `${sender}`, `${recipient}`, `${queue_id}` and
    /// `${original_recipient}` are expanded.
    pub command: Vec<String>,
    /// The user the pipe service, and so the command, runs as when mortal
    /// runs as root: required then, and neither root nor `[server] user`
    /// (the command never runs as root, nor with the mail user's rights
    /// over the spool). Ignored, with a warning, when mortal runs
    /// unprivileged.
    pub user: Option<String>,
    /// The command is killed after this long and the delivery deferred.
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
}

impl Default for Pipe {
    fn default() -> Self {
        Self { command: Vec::new(), user: None, timeout: Duration::from_secs(1000) }
    }
}

impl Pipe {
    /// What is wrong with `command`, for a config that routes mail to it.
    fn problems(&self) -> Vec<String> {
        let Some(program) = self.command.first() else {
            return vec!["must name the program to run (a route uses pipe)".into()];
        };
        let mut out = Vec::new();
        if !Path::new(program).is_absolute() {
            out.push(format!("{program:?} must be an absolute path (the command never runs through a shell or PATH)"));
        }
        for arg in &self.command {
            let mut rest = arg.as_str();
            while let Some(i) = rest.find("${") {
                let name = rest[i + 2..].split('}').next().unwrap_or_default();
                if !rest[i + 2..].contains('}') || !PIPE_MACROS.contains(&name) {
                    out.push(format!("{arg:?}: unknown expansion; use ${{{}}}", PIPE_MACROS.join("}, ${")));
                    break;
                }
                rest = &rest[i + 3 + name.len()..];
            }
        }
        out
    }
}

/// The expansions a `[delivery.pipe] command` may use.
pub const PIPE_MACROS: [&str; 4] = ["sender", "recipient", "queue_id", "original_recipient"];

/// STARTTLS policy for relaying (Postfix smtp_tls_security_level).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTlsSecurity {
    /// Never use TLS.
    None,
    /// Opportunistic: STARTTLS when offered, any certificate accepted.
    May,
    /// Mandatory: STARTTLS required and the certificate verified.
    Encrypt,
}

/// Where a recipient's mail goes: `maildir`, `discard`, `pipe`,
/// `lmtp:unix:/path`, `lmtp:inet:127.0.0.1:24`, `smtp:inet:[::1]:25`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Route {
    Maildir,
    /// Accept and drop (a sinkhole; what benchmarks use).
    Discard,
    /// The `[delivery.pipe]` command.
    Pipe,
    Lmtp(NextHop),
    /// Relay to a literal next hop (no MX lookups).
    Smtp(SocketAddr),
}

/// An LMTP server's address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NextHop {
    Unix(PathBuf),
    Inet(SocketAddr),
}

impl std::str::FromStr for Route {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        const SYNTAX: &str = "expected maildir, discard, pipe, lmtp:unix:/path, lmtp:inet:IP:PORT or smtp:inet:IP:PORT";
        let inet = |a: &str| {
            a.parse::<SocketAddr>()
                .map_err(|_| format!("route {s:?}: {a:?} is not a literal IP:PORT (IPv6 as [::1]:24)"))
        };
        match s {
            "maildir" => return Ok(Route::Maildir),
            "discard" => return Ok(Route::Discard),
            "pipe" => return Ok(Route::Pipe),
            _ => {}
        }
        if let Some(path) = s.strip_prefix("lmtp:unix:") {
            if path.is_empty() {
                return Err(format!("{s:?} names no socket path: {SYNTAX}"));
            }
            return Ok(Route::Lmtp(NextHop::Unix(PathBuf::from(path))));
        }
        if let Some(addr) = s.strip_prefix("lmtp:inet:") {
            return Ok(Route::Lmtp(NextHop::Inet(inet(addr)?)));
        }
        if let Some(addr) = s.strip_prefix("smtp:inet:") {
            return Ok(Route::Smtp(inet(addr)?));
        }
        Err(format!("unknown route {s:?}: {SYNTAX}"))
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Route::Maildir => f.write_str("maildir"),
            Route::Discard => f.write_str("discard"),
            Route::Pipe => f.write_str("pipe"),
            Route::Lmtp(NextHop::Unix(p)) => write!(f, "lmtp:unix:{}", p.display()),
            Route::Lmtp(NextHop::Inet(a)) => write!(f, "lmtp:inet:{a}"),
            Route::Smtp(a) => write!(f, "smtp:inet:{a}"),
        }
    }
}

impl<'de> Deserialize<'de> for Route {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A custom error keeps TOML's span, so a bad route names its line.
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// `[anvil]`: the per-client counting service (Postfix anvil).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Anvil {
    /// The window in which connection and message rates are counted
    /// (Postfix anvil_rate_time_unit).
    #[serde(deserialize_with = "duration")]
    pub rate_time_unit: Duration,
}

impl Default for Anvil {
    fn default() -> Self {
        Self { rate_time_unit: Duration::from_secs(60) }
    }
}

/// `[process.<service>]`: the lifetime policy of each pre-forked service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Processes {
    pub smtpd: ProcessPolicy,
    pub cleanup: ProcessPolicy,
    /// The `pipe` delivery service, which exists only while a route uses
    /// pipe. Keys it does not set take [`ProcessPolicy::pipe_default`]'s
    /// values, not the general defaults.
    #[serde(deserialize_with = "pipe_policy")]
    pub pipe: ProcessPolicy,
    /// The `lmtp` delivery agent, present only while a route uses LMTP;
    /// unset keys take [`ProcessPolicy::agent_default`]'s values. A use
    /// (`max_use`) is one delivery.
    #[serde(deserialize_with = "agent_policy")]
    pub lmtp: ProcessPolicy,
    /// The `smtp` delivery agent, present only while a route relays by
    /// SMTP; defaults as `lmtp`.
    #[serde(deserialize_with = "agent_policy")]
    pub smtp: ProcessPolicy,
    /// The queue manager's lifetime (one process).
    #[serde(deserialize_with = "single_policy")]
    pub queue: SingleLife,
    /// anvil's lifetime (one process).
    #[serde(deserialize_with = "single_policy")]
    pub anvil: SingleLife,
}

impl Default for Processes {
    fn default() -> Self {
        Self {
            smtpd: ProcessPolicy::default(),
            cleanup: ProcessPolicy::default(),
            pipe: ProcessPolicy::pipe_default(),
            lmtp: ProcessPolicy::agent_default(),
            smtp: ProcessPolicy::agent_default(),
            queue: SingleLife::default(),
            anvil: SingleLife::default(),
        }
    }
}

/// `[process.pipe]` keys whose default differs from the general one: a
/// small pool, since each child runs one command at a time and delivery
/// concurrency is the queue's to limit.
const PIPE_POLICY_DEFAULTS: [(&str, u32); 5] =
    [("process_limit", 20), ("prefork", 1), ("min_spare", 1), ("max_spare", 4), ("max_use", 100)];

/// `[process.lmtp]` and `[process.smtp]` keys whose default differs from
/// the general one: each child carries one delivery at a time, so the
/// limit is the queue's default `delivery_concurrency` (20), and a few
/// spares keep a burst from waiting for the spawn rate to ramp up.
const AGENT_POLICY_DEFAULTS: [(&str, u32); 5] =
    [("process_limit", 20), ("prefork", 2), ("min_spare", 2), ("max_spare", 10), ("max_use", 100)];

/// `[process.lmtp]` / `[process.smtp]` with [`AGENT_POLICY_DEFAULTS`].
fn agent_policy<'de, D: Deserializer<'de>>(d: D) -> Result<ProcessPolicy, D::Error> {
    let mut table = toml::Table::deserialize(d)?;
    for (key, value) in AGENT_POLICY_DEFAULTS {
        table.entry(key).or_insert(toml::Value::Integer(i64::from(value)));
    }
    ProcessPolicy::deserialize(toml::Value::Table(table)).map_err(serde::de::Error::custom)
}

/// `[process.queue]` and `[process.anvil]`: the lifetime of a service that
/// runs exactly one process. There is no pool to size and no session to
/// count: the process lives `max_lifetime` (drawn with `lifetime_jitter`),
/// is then asked to retire, gets `overdue_grace` to finish what it runs
/// (the queue its deliveries), and is terminated after that. Its
/// replacement starts once it has exited, so two queue managers never
/// share the spool.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SingleLife {
    /// Wall-clock life from spawn; "0s": unlimited.
    #[serde(deserialize_with = "duration")]
    pub max_lifetime: Duration,
    /// Each life is drawn from `[max_lifetime * (1 - lifetime_jitter), max_lifetime]`.
    pub lifetime_jitter: f64,
    /// How long a retiring process may finish its work before SIGTERM.
    #[serde(deserialize_with = "duration")]
    pub overdue_grace: Duration,
    /// SIGTERM to SIGKILL.
    #[serde(deserialize_with = "duration")]
    pub term_grace: Duration,
}

impl Default for SingleLife {
    fn default() -> Self {
        Self {
            max_lifetime: Duration::from_secs(86_400),
            lifetime_jitter: 0.25,
            overdue_grace: Duration::from_secs(300),
            term_grace: DEFAULT_TERM_GRACE,
        }
    }
}

impl SingleLife {
    /// The same life as the pool policy the lifetime rules work on: one
    /// process, no use count, no idle retirement, no session deadline.
    pub fn as_policy(&self) -> ProcessPolicy {
        ProcessPolicy {
            process_limit: 1,
            prefork: 1,
            min_spare: 0,
            max_spare: 1,
            max_use: 0,
            max_idle: Duration::ZERO,
            max_lifetime: self.max_lifetime,
            lifetime_jitter: self.lifetime_jitter,
            session_deadline: Duration::ZERO,
            overdue_grace: self.overdue_grace,
            term_grace: self.term_grace,
            overload_wait: None,
        }
    }
}

fn single_policy<'de, D: Deserializer<'de>>(d: D) -> Result<SingleLife, D::Error> {
    SingleLife::deserialize(d)
}

/// `[process.pipe]` with [`PIPE_POLICY_DEFAULTS`] filled in first.
fn pipe_policy<'de, D: Deserializer<'de>>(d: D) -> Result<ProcessPolicy, D::Error> {
    let mut table = toml::Table::deserialize(d)?;
    for (key, value) in PIPE_POLICY_DEFAULTS {
        table.entry(key).or_insert(toml::Value::Integer(i64::from(value)));
    }
    ProcessPolicy::deserialize(toml::Value::Table(table)).map_err(serde::de::Error::custom)
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
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
    /// An idle child above `min_spare` is retired after waiting this long
    /// for a client (Postfix max_idle); "0s": never.
    #[serde(deserialize_with = "duration")]
    pub max_idle: Duration,
    /// Wall-clock life of a child, from its spawn; "0s": unlimited.
    #[serde(deserialize_with = "duration")]
    pub max_lifetime: Duration,
    /// Each child's life is drawn uniformly from
    /// `[max_lifetime * (1 - lifetime_jitter), max_lifetime]`, so children
    /// spawned together never die together. At least 0, below 1.
    pub lifetime_jitter: f64,
    /// A session running longer is stuck (deadlock or compromise): the
    /// child gets SIGTERM, then SIGKILL; "0s": no deadline.
    #[serde(deserialize_with = "duration")]
    pub session_deadline: Duration,
    /// How long a child past its lifetime may still finish its session
    /// before it is killed anyway: load never makes a child immortal.
    #[serde(deserialize_with = "duration")]
    pub overdue_grace: Duration,
    /// How long a child told to stop with SIGTERM (past a session deadline
    /// or its overdue grace) has to finish its last words, e.g. smtpd's
    /// `421` to its client, before SIGKILL.
    #[serde(deserialize_with = "duration")]
    pub term_grace: Duration,
    /// smtpd only: how long clients may wait in the listen backlog while
    /// every child is busy at `process_limit`, before the master answers
    /// them `421 4.3.2` itself (without reading a byte); "0s": never.
    /// Default [`DEFAULT_OVERLOAD_WAIT`].
    #[serde(deserialize_with = "optional_duration")]
    pub overload_wait: Option<Duration>,
}

/// `[server] user` when unset: the unprivileged user the daemons run as
/// when the master starts as root.
pub const DEFAULT_SERVER_USER: &str = "mortal";
/// `overload_wait` of an smtpd service that does not set it.
pub const DEFAULT_OVERLOAD_WAIT: Duration = Duration::from_secs(10);
/// `term_grace` of a service that does not set it.
pub const DEFAULT_TERM_GRACE: Duration = Duration::from_secs(2);
/// Longest `term_grace`: a child that ignores SIGTERM keeps its slot (and
/// whatever it was doing) for at most this long.
pub const MAX_TERM_GRACE: Duration = Duration::from_secs(60);
/// Shortest `max_lifetime` other than unlimited: a shorter life would spend
/// the pool's time spawning instead of serving.
pub const MIN_LIFETIME: Duration = Duration::from_secs(1);

impl ProcessPolicy {
    /// The policy of `[process.lmtp]` and `[process.smtp]` when the table
    /// sets nothing.
    pub fn agent_default() -> Self {
        let get = |key: &str| AGENT_POLICY_DEFAULTS.iter().find(|(k, _)| *k == key).map_or(0, |(_, v)| *v);
        Self {
            process_limit: get("process_limit"),
            prefork: get("prefork"),
            min_spare: get("min_spare"),
            max_spare: get("max_spare"),
            max_use: get("max_use"),
            ..Self::default()
        }
    }

    /// The policy of `[process.pipe]` when the table sets nothing.
    pub fn pipe_default() -> Self {
        let get = |key: &str| PIPE_POLICY_DEFAULTS.iter().find(|(k, _)| *k == key).map_or(0, |(_, v)| *v);
        Self {
            process_limit: get("process_limit"),
            prefork: get("prefork"),
            min_spare: get("min_spare"),
            max_spare: get("max_spare"),
            max_use: get("max_use"),
            ..Self::default()
        }
    }
}

impl Default for ProcessPolicy {
    fn default() -> Self {
        Self {
            process_limit: 100,
            prefork: 2,
            min_spare: 1,
            max_spare: 10,
            max_use: 100,
            max_idle: Duration::from_secs(100),
            max_lifetime: Duration::from_secs(3600),
            lifetime_jitter: 0.25,
            session_deadline: Duration::from_secs(3600),
            overdue_grace: Duration::from_secs(300),
            term_grace: DEFAULT_TERM_GRACE,
            overload_wait: None,
        }
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
    /// The rules for a system started as root apply when this process
    /// runs as root (see [`Config::parse_for`]).
    pub fn parse(text: &str, file: &Path) -> Result<Config, Vec<ConfigError>> {
        Config::parse_for(text, file, nix::unistd::geteuid().is_root())
    }

    /// Where a master started from `file` keeps its control socket and pid
    /// file, read from `text` even when the rest of it is invalid (an
    /// operator editing the file must still reach the running master):
    /// `[server] run_dir`, else `spool_dir/run`, resolved as
    /// [`Config::parse`] does. `None` when even those two keys cannot be
    /// read (not TOML, or not strings).
    pub fn locate_run_dir(text: &str, file: &Path) -> Option<PathBuf> {
        let value: toml::Table = text.parse().ok()?;
        let server = match value.get("server") {
            Some(toml::Value::Table(t)) => Some(t),
            Some(_) => return None,
            None => None,
        };
        let key = |name: &str| match server.and_then(|t| t.get(name)) {
            Some(toml::Value::String(s)) => Ok(Some(PathBuf::from(s))),
            Some(_) => Err(()),
            None => Ok(None),
        };
        let base = file.parent().unwrap_or(Path::new("."));
        let spool = base.join(key("spool_dir").ok()?.unwrap_or_else(|| Server::default().spool_dir));
        Some(key("run_dir").ok()?.map_or_else(|| spool.join("run"), |p| base.join(p)))
    }

    /// [`Config::parse`] for a mail system started as root (`as_root`),
    /// where the daemons change identity and `[delivery.pipe] user` must
    /// name who runs the pipe command, or started by another user, where
    /// every process keeps that user and the key is ignored.
    pub fn parse_for(text: &str, file: &Path, as_root: bool) -> Result<Config, Vec<ConfigError>> {
        let mut config: Config = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of_offset(text, s.start));
            vec![ConfigError { file: file.to_owned(), line, key: None, message: e.message().trim().to_owned() }]
        })?;
        config.source = file.to_owned();
        let base = file.parent().unwrap_or(Path::new("."));
        config.server.spool_dir = base.join(&config.server.spool_dir);
        // Defaults derive from the already-resolved spool_dir: joining the
        // base again would double a relative base (`etc/etc/../spool`).
        config.server.run_dir =
            Some(config.server.run_dir.take().map_or_else(|| config.server.spool_dir.join("run"), |p| base.join(p)));
        config.smtpd.tls_cert_file = config.smtpd.tls_cert_file.take().map(|p| base.join(p));
        config.smtpd.tls_key_file = config.smtpd.tls_key_file.take().map(|p| base.join(p));
        config.server.recipient_map = config.server.recipient_map.take().map(|p| base.join(p));
        config.server.metrics_file = config.server.metrics_file.take().map(|p| base.join(p));
        config.delivery.maildir_root = Some(
            config
                .delivery
                .maildir_root
                .take()
                .map_or_else(|| config.server.spool_dir.join("maildir"), |p| base.join(p)),
        );
        config.delivery.smtp_tls_ca_file = config.delivery.smtp_tls_ca_file.as_ref().map(|p| base.join(p));
        let resolve = |r: &mut Route| {
            if let Route::Lmtp(NextHop::Unix(p)) = r {
                *p = base.join(&*p);
            }
        };
        resolve(&mut config.delivery.transport);
        config.delivery.routes.values_mut().for_each(resolve);
        config.delivery.routes = std::mem::take(&mut config.delivery.routes)
            .into_iter()
            .map(|(domain, route)| (domain.to_lowercase(), route))
            .collect();
        let problems: Vec<ConfigError> = config
            .problems(as_root)
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
    fn problems(&self, as_root: bool) -> Vec<(String, String, String)> {
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
        if let Some(user) = &self.server.user
            && (user.is_empty() || user == "root")
        {
            bad("server", "user", "must name an unprivileged user: the daemons never run as root".into());
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
        if self.smtpd.tls_cert_file.is_some() != self.smtpd.tls_key_file.is_some() {
            bad("smtpd", "tls_cert_file", "needs tls_key_file, and the other way round".into());
        }
        if self.smtpd.tls_handshake_timeout.is_zero() {
            bad("smtpd", "tls_handshake_timeout", "must be above 0".into());
        }
        if self.smtpd.min_data_rate > 0 && self.smtpd.data_rate_window.is_zero() {
            bad("smtpd", "data_rate_window", "must be above 0 when min_data_rate is set".into());
        }
        // Listeners on port 0 get their ports from the kernel, so smtpd tells a
        // proxy_listen connection from a listen one by the address alone.
        let overlap = |a: &SocketAddr, b: &SocketAddr| {
            a.port() == 0
                && b.port() == 0
                && a.is_ipv4() == b.is_ipv4()
                && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
        };
        if let Some(addr) = self.smtpd.proxy_listen.iter().find(|a| self.smtpd.listen.contains(a)) {
            bad("smtpd", "proxy_listen", format!("{addr} is also in listen"));
        } else if let Some(addr) =
            self.smtpd.proxy_listen.iter().find(|p| self.smtpd.listen.iter().any(|l| overlap(p, l)))
        {
            bad(
                "smtpd",
                "proxy_listen",
                format!(
                    "{addr}: a listen address with port 0 covers it too, so its connections could not be told apart"
                ),
            );
        }
        if !self.smtpd.proxy_listen.is_empty() && self.smtpd.proxy_trusted.is_empty() {
            bad("smtpd", "proxy_trusted", "must name the load balancers when proxy_listen is set".into());
        }
        if self.smtpd.proxy_timeout.is_zero() {
            bad("smtpd", "proxy_timeout", "must be above 0".into());
        }
        if self.smtpd.reverse_lookup_timeout.is_zero() {
            bad("smtpd", "reverse_lookup_timeout", "must be above 0".into());
        }
        if let Some(addr) = self.smtpd.resolvers.iter().find(|a| a.port() == 0 || a.ip().is_unspecified()) {
            bad("smtpd", "resolvers", format!("{addr} is not a nameserver address"));
        }
        if self.smtpd.client_ipv4_prefix_length > 32 {
            bad("smtpd", "client_ipv4_prefix_length", "must be at most 32".into());
        }
        if self.smtpd.client_ipv6_prefix_length > 128 {
            bad("smtpd", "client_ipv6_prefix_length", "must be at most 128".into());
        }
        if self.anvil.rate_time_unit.is_zero() {
            bad("anvil", "rate_time_unit", "must be above 0".into());
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
        if self.queue.destination_concurrency_limit == 0 {
            bad("queue", "destination_concurrency_limit", "must be at least 1".into());
        }
        for domain in self.delivery.routes.keys() {
            if crate::address::parse_mailbox(&format!("x@{domain}"), true).is_err() {
                bad("delivery.routes", domain, format!("{domain:?} is not a domain name"));
            }
        }
        if self.pipe_routed() {
            for problem in self.delivery.pipe.problems() {
                bad("delivery.pipe", "command", problem);
            }
            // As root the pipe service drops to this user, never to root
            // and never to the mail user (whose rights over the spool an
            // operator's command must not have), as Postfix's pipe(8).
            let server_user = self.server.user.as_deref().unwrap_or(DEFAULT_SERVER_USER);
            match self.delivery.pipe.user.as_deref() {
                None if as_root => bad(
                    "delivery.pipe",
                    "user",
                    "must name the unprivileged user the pipe command runs as (mortal runs as root and a route uses pipe)"
                        .into(),
                ),
                Some(user) if as_root && user == server_user => bad(
                    "delivery.pipe",
                    "user",
                    format!("must differ from [server] user ({server_user:?}): the command must not get the mail user's rights over the spool"),
                ),
                _ => {}
            }
            let policy = &self.process.pipe;
            if !policy.session_deadline.is_zero() && policy.session_deadline < self.delivery.pipe.timeout {
                bad(
                    "process.pipe",
                    "session_deadline",
                    format!(
                        "must be 0s or at least [delivery.pipe] timeout ({:?}): a command within its time would be killed",
                        self.delivery.pipe.timeout
                    ),
                );
            }
        }
        if self.delivery.pipe.timeout.is_zero() {
            bad("delivery.pipe", "timeout", "must be above 0".into());
        }
        if self.delivery.pipe.user.as_deref() == Some("root") {
            bad("delivery.pipe", "user", "must not be root".into());
        }
        if self.delivery.connect_timeout.is_zero() {
            bad("delivery", "connect_timeout", "must be above 0".into());
        }
        if self.delivery.command_timeout.is_zero() {
            bad("delivery", "command_timeout", "must be above 0".into());
        }
        let (queue_life, anvil_life) = (self.process.queue.as_policy(), self.process.anvil.as_policy());
        for (name, p) in [
            ("smtpd", &self.process.smtpd),
            ("cleanup", &self.process.cleanup),
            ("pipe", &self.process.pipe),
            ("lmtp", &self.process.lmtp),
            ("smtp", &self.process.smtp),
            ("queue", &queue_life),
            ("anvil", &anvil_life),
        ] {
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
            if !(0.0..1.0).contains(&p.lifetime_jitter) {
                bad(&table, "lifetime_jitter", "must be at least 0 and below 1".into());
            }
            // The shortest life a child can draw, not just the longest.
            let shortest = p.max_lifetime.mul_f64(1.0 - p.lifetime_jitter.clamp(0.0, 1.0));
            if !p.max_lifetime.is_zero() && shortest < MIN_LIFETIME {
                let msg =
                    format!("must be 0s (unlimited), or with lifetime_jitter give lives of at least {MIN_LIFETIME:?}");
                bad(&table, "max_lifetime", msg);
            }
            if !p.max_lifetime.is_zero() && p.overdue_grace.is_zero() {
                bad(&table, "overdue_grace", "must be above 0: a busy child past its life needs time to finish".into());
            }
            if p.term_grace.is_zero() || p.term_grace > MAX_TERM_GRACE {
                bad(&table, "term_grace", format!("must be above 0s and at most {MAX_TERM_GRACE:?}"));
            }
        }
        if self.process.cleanup.overload_wait.is_some() {
            bad("process.cleanup", "overload_wait", "applies to smtpd only (cleanup's clients wait)".into());
        }
        for (name, p) in [("pipe", &self.process.pipe), ("lmtp", &self.process.lmtp), ("smtp", &self.process.smtp)] {
            if p.overload_wait.is_some() {
                bad(
                    &format!("process.{name}"),
                    "overload_wait",
                    "applies to smtpd only (the queue's requests wait)".into(),
                );
            }
        }
        // A delivery runs for at most a connect and a few commands; a
        // deadline below that would kill agents in healthy sessions.
        let session = self.delivery.connect_timeout.saturating_add(self.delivery.command_timeout);
        for (name, p) in [("lmtp", &self.process.lmtp), ("smtp", &self.process.smtp)] {
            if !p.session_deadline.is_zero() && p.session_deadline < session {
                bad(
                    &format!("process.{name}"),
                    "session_deadline",
                    format!("must be 0s or at least [delivery] connect_timeout + command_timeout ({session:?})"),
                );
            }
        }
        out
    }

    /// Whether some route (the default `transport` or a
    /// `[delivery.routes]` entry) hands mail to the `[delivery.pipe]`
    /// command: only then does the pipe service exist.
    pub fn pipe_routed(&self) -> bool {
        std::iter::once(&self.delivery.transport).chain(self.delivery.routes.values()).any(|r| *r == Route::Pipe)
    }

    /// Whether some route hands mail to an LMTP server: only then does
    /// the `lmtp` delivery agent exist.
    pub fn lmtp_routed(&self) -> bool {
        self.routes().any(|r| matches!(r, Route::Lmtp(_)))
    }

    /// Whether some route relays mail by SMTP: only then does the `smtp`
    /// delivery agent exist.
    pub fn smtp_routed(&self) -> bool {
        self.routes().any(|r| matches!(r, Route::Smtp(_)))
    }

    /// Every route mail may take: the default and the per-domain ones.
    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        std::iter::once(&self.delivery.transport).chain(self.delivery.routes.values())
    }

    /// The route for mail to `domain`: its `[delivery.routes]` entry, or
    /// the default `transport`.
    pub fn route_for(&self, domain: &str) -> &Route {
        self.delivery.routes.get(&domain.to_lowercase()).unwrap_or(&self.delivery.transport)
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

    /// anvil's socket (smtpd connects here for per-client counts).
    pub fn anvil_socket(&self) -> PathBuf {
        self.private_dir().join("anvil")
    }

    /// queue's wake-up socket (cleanup and the CLI connect here).
    pub fn queue_socket(&self) -> PathBuf {
        self.private_dir().join("queue")
    }

    /// The pipe delivery service's socket (the queue connects here).
    pub fn pipe_socket(&self) -> PathBuf {
        self.private_dir().join("pipe")
    }

    /// The `lmtp` delivery agent's socket (the queue connects here).
    pub fn lmtp_socket(&self) -> PathBuf {
        self.private_dir().join("lmtp")
    }

    /// The `smtp` delivery agent's socket (the queue connects here).
    pub fn smtp_socket(&self) -> PathBuf {
        self.private_dir().join("smtp")
    }

    pub fn pid_file(&self) -> PathBuf {
        self.run_dir().join("master.pid")
    }

    /// The spool under `spool_dir`: its queue directories and files.
    pub fn spool(&self) -> crate::spool::Spool {
        crate::spool::Spool::new(&self.server.spool_dir)
    }

    /// Whether mail for `domain` is accepted here (case-insensitive).
    pub fn accepts_domain(&self, domain: &str) -> bool {
        let wanted = domain.to_lowercase();
        self.server.accepted_domains.iter().any(|d| d.to_lowercase() == wanted)
    }
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s)
        .map_err(|e| serde::de::Error::custom(format!("{s:?} is not a duration like \"300s\" or \"5m\": {e}")))
}

fn optional_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
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
        if current == table
            && line.split('=').next().is_some_and(|k| k.trim().trim_matches('"') == key)
            && line.contains('=')
        {
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

    /// A config named by a relative path resolves every path once.
    #[test]
    fn relative_config_path_resolves_defaults_once() {
        let c = Config::parse("[server]\nspool_dir = \"../spool\"\n", Path::new("etc/mortal.toml")).unwrap();
        assert_eq!(c.run_dir(), Path::new("etc/../spool/run"));
        assert_eq!(c.maildir_root(), Path::new("etc/../spool/maildir"));
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

    /// The run dir is found as `parse` would resolve it, even in a file
    /// `parse` refuses.
    #[test]
    fn run_dir_is_located_in_an_invalid_file() {
        let file = Path::new("/etc/mortal/mortal.toml");
        for text in [
            "",
            "[server]\nspool_dir = \"../spool\"\n",
            "[server]\nrun_dir = \"/run/m\"\n",
            "[server]\nuser = \"nobody\"\n",
        ] {
            let parsed = Config::parse(text, file).unwrap();
            assert_eq!(Config::locate_run_dir(text, file).as_deref(), Some(parsed.run_dir()), "{text:?}");
        }
        let broken = "[server]\nspool_dir = \"/var/spool/x\"\n[process.smtpd]\nprefork = 500\nbogus = 1\n";
        assert!(Config::parse(broken, file).is_err());
        assert_eq!(Config::locate_run_dir(broken, file), Some(PathBuf::from("/var/spool/x/run")));
        assert_eq!(Config::locate_run_dir("[server\n", file), None);
        assert_eq!(Config::locate_run_dir("[server]\nrun_dir = 5\n", file), None);
    }

    #[test]
    fn term_grace_is_bounded() {
        let with = |v: &str| Config::parse(&format!("[process.cleanup]\nterm_grace = \"{v}\"\n"), Path::new("m.toml"));
        assert_eq!(with("5s").unwrap().process.cleanup.term_grace, Duration::from_secs(5));
        assert_eq!(Config::parse("", Path::new("m.toml")).unwrap().process.smtpd.term_grace, DEFAULT_TERM_GRACE);
        for bad in ["0s", "61s"] {
            let err = with(bad).unwrap_err();
            assert!(
                err[0].to_string().starts_with("m.toml:2: process.cleanup.term_grace: must be above 0s"),
                "{err:?}"
            );
        }
    }

    #[test]
    fn routes_parse_and_resolve() {
        let text = "[delivery]\ntransport = \"lmtp:unix:run/lmtp\"\n[delivery.routes]\n\"Relay.TEST\" = \"smtp:inet:[::1]:25\"\n\"x.test\" = \"lmtp:inet:127.0.0.1:24\"\n\"d.test\" = \"discard\"\n";
        let c = Config::parse(text, Path::new("/etc/m/m.toml")).unwrap();
        assert_eq!(c.delivery.transport, Route::Lmtp(NextHop::Unix("/etc/m/run/lmtp".into())));
        assert_eq!(c.route_for("relay.test"), &Route::Smtp("[::1]:25".parse().unwrap()));
        assert_eq!(c.route_for("X.TEST").to_string(), "lmtp:inet:127.0.0.1:24");
        assert_eq!(c.route_for("d.test"), &Route::Discard);
        assert_eq!(c.route_for("other.test").to_string(), "lmtp:unix:/etc/m/run/lmtp");
        assert_eq!(c.queue.destination_concurrency_limit, 20);
        assert_eq!(c.queue.queue_lifetime, Duration::from_secs(432_000));
    }

    #[test]
    fn port_zero_listeners_must_be_told_apart() {
        let text = |proxy: &str| {
            format!(
                "[smtpd]\nlisten = [\"0.0.0.0:0\"]\nproxy_listen = [\"{proxy}\"]\nproxy_trusted = [\"127.0.0.1\"]\n"
            )
        };
        let err = Config::parse(&text("127.0.0.1:0"), Path::new("m.toml")).unwrap_err();
        assert!(
            err[0].to_string().contains("smtpd.proxy_listen: 127.0.0.1:0: a listen address with port 0"),
            "{err:?}"
        );
        for fine in ["127.0.0.1:2526", "[::1]:0"] {
            assert!(Config::parse(&text(fine), Path::new("m.toml")).is_ok(), "{fine}");
        }
    }

    #[test]
    fn bad_route_names_line() {
        for bad in ["lmtp:inet:localhost:24", "smtp:unix:/x", "lmtp:unix:", "mbox", "smtp:inet:127.0.0.1"] {
            let text = format!("[delivery]\nmaildir_root = \"m\"\n[delivery.routes]\n\"a.test\" = \"{bad}\"\n");
            let err = Config::parse(&text, Path::new("m.toml")).unwrap_err();
            let msg = err[0].to_string();
            assert!(msg.starts_with("m.toml:4") && msg.contains(bad), "{bad}: {msg}");
        }
    }

    #[test]
    fn pipe_command_is_checked_when_routed() {
        let ok = "[delivery]\ntransport = \"pipe\"\n[delivery.pipe]\ncommand = [\"/bin/p\", \"${recipient}\"]\n";
        assert!(Config::parse_for(ok, Path::new("m.toml"), false).is_ok());
        let text = "[delivery]\ntransport = \"pipe\"\n[delivery.pipe]\ncommand = [\"p\", \"${rcpt}\"]\n";
        let err = Config::parse_for(text, Path::new("m.toml"), false).unwrap_err();
        assert_eq!(err.len(), 2, "{err:?}");
        assert!(err.iter().all(|e| e.to_string().starts_with("m.toml:4: delivery.pipe.command")), "{err:?}");
        let err = Config::parse_for("[delivery]\ntransport = \"pipe\"\n", Path::new("m.toml"), false).unwrap_err();
        assert!(err[0].message.contains("must name the program"), "{err:?}");
    }

    /// Issue 5: started as root, a pipe route needs `[delivery.pipe] user`,
    /// neither root nor the mail user; unprivileged, the key is optional.
    #[test]
    fn pipe_user_is_required_as_root() {
        let base = "[delivery]\n[delivery.routes]\n\"p.test\" = \"pipe\"\n[delivery.pipe]\ncommand = [\"/bin/p\"]\n";
        let err = Config::parse_for(base, Path::new("m.toml"), true).unwrap_err();
        assert_eq!(err.len(), 1, "{err:?}");
        assert!(
            err[0].to_string().starts_with("m.toml:4: delivery.pipe.user: must name the unprivileged user"),
            "{err:?}"
        );
        assert!(Config::parse_for(base, Path::new("m.toml"), false).is_ok());
        let with = |user: &str| format!("{base}user = \"{user}\"\n");
        assert!(Config::parse_for(&with("pipeuser"), Path::new("m.toml"), true).is_ok());
        let err = Config::parse_for(&with("mortal"), Path::new("m.toml"), true).unwrap_err();
        assert!(
            err[0].to_string().starts_with("m.toml:6: delivery.pipe.user: must differ from [server] user"),
            "{err:?}"
        );
        let text = format!("[server]\nuser = \"nobody\"\n{}", with("nobody"));
        assert!(Config::parse_for(&text, Path::new("m.toml"), true).is_err());
        // Unprivileged, every process is the invoking user anyway.
        assert!(Config::parse_for(&text, Path::new("m.toml"), false).is_ok());
        let err = Config::parse_for(&with("root"), Path::new("m.toml"), false).unwrap_err();
        assert!(err[0].to_string().contains("delivery.pipe.user: must not be root"), "{err:?}");
        // Without a pipe route nothing is asked of the key.
        assert!(Config::parse_for("[delivery.pipe]\ncommand = [\"/bin/p\"]\n", Path::new("m.toml"), true).is_ok());
    }

    #[test]
    fn pipe_pool_has_its_own_defaults_and_rules() {
        let c = Config::parse_for("", Path::new("m.toml"), false).unwrap();
        assert_eq!(c.process.pipe, ProcessPolicy::pipe_default());
        assert_eq!((c.process.pipe.process_limit, c.process.pipe.prefork, c.process.pipe.max_spare), (20, 1, 4));
        // A partial table keeps the pipe defaults for the keys it omits.
        let c = Config::parse_for("[process.pipe]\nmax_use = 5\n", Path::new("m.toml"), false).unwrap();
        assert_eq!(c.process.pipe, ProcessPolicy { max_use: 5, ..ProcessPolicy::pipe_default() });
        let err = Config::parse_for("[process.pipe]\nprocess_limit = 1\nprefork = 2\n", Path::new("m.toml"), false)
            .unwrap_err();
        assert_eq!(err[0].to_string(), "m.toml:3: process.pipe.prefork: must not exceed process_limit (1)");
        let text = "[delivery]\ntransport = \"pipe\"\n[delivery.pipe]\ncommand = [\"/bin/p\"]\ntimeout = \"100s\"\n[process.pipe]\nsession_deadline = \"50s\"\n";
        let err = Config::parse_for(text, Path::new("m.toml"), false).unwrap_err();
        assert!(
            err[0].to_string().starts_with("m.toml:7: process.pipe.session_deadline: must be 0s or at least"),
            "{err:?}"
        );
        assert!(Config::parse_for("[process.pipe]\nbogus = 1\n", Path::new("m.toml"), false).is_err());
    }

    /// Issue 11: the delivery agents' pools and the single processes'
    /// lifetimes have their own tables and defaults.
    #[test]
    fn agent_and_single_process_policies() {
        let c = Config::parse_for("", Path::new("m.toml"), false).unwrap();
        assert_eq!((c.process.lmtp, c.process.smtp), (ProcessPolicy::agent_default(), ProcessPolicy::agent_default()));
        assert_eq!((c.process.lmtp.process_limit, c.process.lmtp.prefork, c.process.lmtp.min_spare), (20, 2, 2));
        assert_eq!(c.process.queue.max_lifetime, Duration::from_secs(86_400));
        let c = Config::parse_for(
            "[process.smtp]\nmax_use = 7\n[process.queue]\nmax_lifetime = \"2h\"\n",
            Path::new("m.toml"),
            false,
        )
        .unwrap();
        assert_eq!(c.process.smtp, ProcessPolicy { max_use: 7, ..ProcessPolicy::agent_default() });
        assert_eq!(c.process.queue.as_policy().max_lifetime, Duration::from_secs(7200));
        assert_eq!(c.process.queue.as_policy().max_use, 0);
        let err =
            Config::parse_for("[process.anvil]\nlifetime_jitter = 1.5\n", Path::new("m.toml"), false).unwrap_err();
        assert_eq!(err[0].to_string(), "m.toml:2: process.anvil.lifetime_jitter: must be at least 0 and below 1");
        let err = Config::parse_for("[process.queue]\nmax_use = 1\n", Path::new("m.toml"), false).unwrap_err();
        assert!(err[0].to_string().contains("max_use"), "{:?}", err);
        let err =
            Config::parse_for("[process.lmtp]\nsession_deadline = \"10s\"\n", Path::new("m.toml"), false).unwrap_err();
        assert!(
            err[0].to_string().starts_with("m.toml:2: process.lmtp.session_deadline: must be 0s or at least"),
            "{}",
            err[0]
        );
    }

    #[test]
    fn server_user_must_not_be_root() {
        let err = Config::parse("[server]\nuser = \"root\"\n", Path::new("m.toml")).unwrap_err();
        let expected = "m.toml:2: server.user: must name an unprivileged user: the daemons never run as root";
        assert_eq!(err[0].to_string(), expected);
        assert!(Config::parse("[server]\nuser = \"nobody\"\n", Path::new("m.toml")).is_ok());
    }

    #[test]
    fn bad_duration_is_explained() {
        let err = Config::parse("[smtpd]\ntimeout = \"soon\"\n", Path::new("m.toml")).unwrap_err();
        let msg = err[0].to_string();
        assert!(msg.starts_with("m.toml:2") && msg.contains("duration"), "{msg}");
    }

    #[test]
    fn smtpd_extensions_and_tls() {
        let c = Config::parse("", Path::new("/etc/mortal/m.toml")).unwrap();
        assert!(c.smtpd.smtputf8 && c.smtpd.chunking && c.smtpd.dsn && !c.smtpd.tls_offered());
        assert_eq!(c.smtpd.bare_newline, BareNewline::Reject);
        let text =
            "[smtpd]\ntls_cert_file = \"tls/cert.pem\"\ntls_key_file = \"/k.pem\"\nbare_newline = \"normalize\"\n";
        let c = Config::parse(text, Path::new("/etc/mortal/m.toml")).unwrap();
        assert_eq!(c.smtpd.tls_cert_file.as_deref(), Some(Path::new("/etc/mortal/tls/cert.pem")));
        assert_eq!(c.smtpd.tls_key_file.as_deref(), Some(Path::new("/k.pem")));
        assert!(c.smtpd.tls_offered());
        assert_eq!(c.smtpd.bare_newline, BareNewline::Normalize);
        let c = Config::parse(&format!("{text}tls_security = \"none\"\n"), Path::new("m.toml")).unwrap();
        assert!(!c.smtpd.tls_offered());
        let err = Config::parse("[smtpd]\ntls_cert_file = \"c.pem\"\n", Path::new("m.toml")).unwrap_err();
        assert_eq!(err[0].to_string(), "m.toml:2: smtpd.tls_cert_file: needs tls_key_file, and the other way round");
    }
}
