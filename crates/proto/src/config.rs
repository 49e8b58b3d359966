//! `mortal.toml`: one typed struct per section, defaults in one place.
//!
//! The file is read in two steps. [`raw`] is the file as written: every key
//! optional, durations, networks and routes still strings, each with its
//! span, and the place of every key. [`Config::parse`] resolves it into
//! [`Config`]: defaults applied, paths resolved, strings parsed, rules
//! checked, so that nothing downstream unwraps an `Option` a default fills.
//!
//! Unknown keys are errors (`deny_unknown_fields`), and every error names
//! the file, the line and column, and the key, whether TOML syntax, a type
//! mismatch, a value that does not parse or a rule (`prefork` above
//! `process_limit`, say) was broken. Relative paths are resolved against
//! the directory of the config file, so the checkout's `etc/mortal.toml`
//! works from any working directory.

mod auth;
mod filter;
mod postscreen;
mod raw;
mod restrict;

pub use auth::{
    Auth, DEFAULT_AUTH_FAILURE_LIMIT, DEFAULT_AUTH_RESPONSE_LIMIT, DEFAULT_AUTH_TIMEOUT,
    DEFAULT_USER_MESSAGE_RATE_LIMIT, DEFAULT_USER_RECIPIENT_RATE_LIMIT, ListenerRole, Submission,
};
pub use filter::{
    DEFAULT_MILTER_COMMAND_TIMEOUT, DEFAULT_MILTER_CONNECT_TIMEOUT, DEFAULT_MILTER_CONTENT_TIMEOUT,
    DEFAULT_POLICY_DEFAULT_ACTION, DEFAULT_POLICY_MAX_IDLE, DEFAULT_POLICY_MAX_TTL, DEFAULT_POLICY_RETRY_DELAY,
    DEFAULT_POLICY_TIMEOUT, DEFAULT_POLICY_TRY_LIMIT, FilterStage, Milter, MilterDefaultAction, PolicyService,
};
pub use postscreen::{GreetAction, HANDOFFS_IN_FLIGHT, NOFILE_RESERVE as POSTSCREEN_NOFILE_RESERVE, Postscreen};
pub use restrict::{
    DEFAULT_DNSBL_THRESHOLD, DEFAULT_DNSBL_TIMEOUT, DEFAULT_RESTRICTION_DNS_TIMEOUT,
    DEFAULT_UNKNOWN_ADDRESS_REJECT_CODE, Dnsbl, DnsblAction, MAX_DNSBL_SITES, MAX_RESTRICTIONS, Restrictions, Verify,
};

use crate::service::Service;
use ipnet::{IpNet, Ipv4Net};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A loaded, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: Server,
    pub log: Log,
    pub smtpd: Smtpd,
    pub cleanup: Cleanup,
    pub queue: Queue,
    pub delivery: Delivery,
    pub process: Processes,
    pub anvil: Anvil,
    pub postscreen: Postscreen,
    /// The file this was loaded from.
    pub source: PathBuf,
    /// Where that file sets each key.
    keys: KeyLocations,
}

/// `[server]`: identity, paths, and what mail this host accepts.
#[derive(Debug, Clone)]
pub struct Server {
    /// Our host name, as in greetings and `Received:` (Postfix myhostname).
    pub hostname: String,
    /// Root of the queue directories.
    pub spool_dir: PathBuf,
    /// Pid file, control socket and the private sockets between daemons.
    /// Default: `<spool_dir>/run`.
    pub run_dir: PathBuf,
    /// Domains we accept mail for (Postfix mydestination / relay_domains).
    /// Anything else is refused with 554 5.7.1: mortal is never an open relay.
    pub accepted_domains: Vec<String>,
    /// Unprivileged user the daemons run as when the master starts as root
    /// (default [`DEFAULT_SERVER_USER`]; it must exist then). Ignored in
    /// development mode, where every process keeps the invoking user.
    pub user: String,
    /// Client networks (CIDR) that may relay to any domain (Postfix
    /// mynetworks); they are also exempt from the per-client limits. They
    /// are not exempt from any protocol rule (bare LF, pipelining).
    pub trusted_networks: Vec<IpNet>,
    /// File of accepted recipient addresses, one per line (Postfix
    /// local_recipient_maps); unset: every address of an accepted domain.
    /// smtpd reads it at process start, so `mortal reload` reloads it.
    pub recipient_map: Option<PathBuf>,
    /// Tables of valid recipients (Postfix local_recipient_maps and
    /// relay_recipient_maps): an address of an accepted domain that none of
    /// them (nor `recipient_map`, nor the virtual aliases) has is refused at
    /// RCPT with `550 5.1.1`. Keys as Postfix looks them up:
    /// `user+ext@domain`, `user@domain`, `user+ext`, `user`, `@domain`;
    /// the results are not used. Empty (with no `recipient_map`): every
    /// address of an accepted domain.
    pub recipient_maps: Vec<crate::table::TableSpec>,
    /// Longest wait for a remote table's server (socketmap, tcp): connect,
    /// write, answer; past it the lookup fails temporarily (451 4.3.0).
    pub table_timeout: Duration,
    /// Virtual alias tables (Postfix virtual_alias_maps), in order: cleanup
    /// expands each recipient through them before the message is queued,
    /// and smtpd takes an aliased address as a known recipient.
    pub virtual_alias_maps: Vec<crate::table::TableSpec>,
    /// The separator of an address extension (`user+ext`: Postfix
    /// recipient_delimiter); none by default, as in Postfix.
    pub recipient_delimiter: Option<char>,
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
            run_dir: PathBuf::from("/var/spool/mortal/run"),
            accepted_domains: Vec::new(),
            user: DEFAULT_SERVER_USER.into(),
            trusted_networks: Vec::new(),
            recipient_map: None,
            recipient_maps: Vec::new(),
            virtual_alias_maps: Vec::new(),
            table_timeout: crate::socketmap::TIMEOUT,
            recipient_delimiter: None,
            metrics_file: None,
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone)]
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
#[derive(Debug, Clone)]
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
    pub timeout: Duration,
    /// Errors in one session before it is closed with 421.
    pub hard_error_limit: u32,
    /// Errors after which every reply is delayed by `error_sleep`
    /// (Postfix smtpd_soft_error_limit); 0 disables the delay.
    pub soft_error_limit: u32,
    /// Delay before each reply once `soft_error_limit` is reached.
    pub error_sleep: Duration,
    /// Slowest content a client may send during DATA/BDAT, in octets per
    /// second averaged over `data_rate_window`; slower gets 421 and the
    /// session ends, so a slowloris cannot hold a child. 0 disables it.
    pub min_data_rate: u64,
    /// Time spent waiting for content over which `min_data_rate` is measured.
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
    pub tls_handshake_timeout: Duration,
    /// `[[smtpd.tls_sni]]`: further certificates, each for the server
    /// names a client may ask for in its TLS hello (SNI); any other name,
    /// or none, gets `tls_cert_file` (Postfix `tls_server_sni_maps`).
    pub tls_sni: Vec<SniCertificate>,
    /// Addresses to listen on behind a load balancer: every connection must
    /// open with a PROXY protocol v1 or v2 header (haproxy) naming the real
    /// client, which is then what is logged, limited and put in `Received:`.
    pub proxy_listen: Vec<SocketAddr>,
    /// Peers (CIDR) allowed to send the PROXY header; a connection to a
    /// `proxy_listen` address from anyone else is dropped.
    pub proxy_trusted: Vec<IpNet>,
    /// Longest wait for the whole PROXY header.
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
    pub client_limit_exceptions: Vec<IpNet>,
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
    pub reverse_lookup_timeout: Duration,
    /// Nameservers (literal `IP:port`) for `reverse_lookup`; empty: those
    /// of /etc/resolv.conf, read when smtpd starts.
    pub resolvers: Vec<SocketAddr>,
    /// `[[smtpd.milter]]`: the Sendmail milters every session talks to, in
    /// order (Postfix smtpd_milters).
    pub milters: Vec<Milter>,
    /// `[smtpd.milter_macros]`: the macros sent at each stage (Postfix's
    /// `milter_*_macros`), before a milter asks for its own.
    pub milter_macros: crate::milter::MacroLists,
    /// `[[smtpd.policy]]`: the policy delegation servers asked, in order
    /// (Postfix check_policy_service).
    pub policy: Vec<PolicyService>,
    /// `[smtpd.restrictions]`: Postfix's smtpd_*_restrictions.
    pub restrictions: Restrictions,
    /// `[smtpd.dnsbl]`: postscreen's weighted DNS lists.
    pub dnsbl: Dnsbl,
    /// `[smtpd.verify]`: how `reject_unverified_recipient` probes.
    pub verify: Verify,
    /// Addresses for mail submission (port 587, RFC 6409): STARTTLS and
    /// AUTH before any MAIL.
    pub submission_listen: Vec<SocketAddr>,
    /// Addresses for mail submission over implicit TLS (port 465, RFC
    /// 8314): TLS from the first octet, AUTH before any MAIL.
    pub submissions_listen: Vec<SocketAddr>,
    /// `[smtpd.auth]`: SMTP AUTH through Dovecot.
    pub auth: Auth,
    /// `[smtpd.submission]`: the submission listeners' restriction lists.
    pub submission: Submission,
}

/// Whether `name` is a host name as a TLS client sends it in SNI (RFC 6066
/// 3: a DNS name, no trailing dot): labels of 1 to 63 letters, digits
/// and hyphens, not starting or ending with a hyphen, 253 octets at most.
pub fn is_host_name(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Whether a listener bound to `listen`'s address hands out connections
/// at the local address `local` (ports aside): its own address, or any of
/// its family for a wildcard (`0.0.0.0`, `[::]`).
pub fn covers(listen: SocketAddr, local: SocketAddr) -> bool {
    let ip = local.ip().to_canonical();
    listen.ip() == ip || listen.ip() == local.ip() || (listen.ip().is_unspecified() && listen.is_ipv4() == ip.is_ipv4())
}

/// One `[[smtpd.tls_sni]]`: a certificate chain and key, and the names
/// (lower case) it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SniCertificate {
    pub names: Vec<String>,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
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
    /// Whether smtpd asks the DNS at all: reverse lookups, DNS-based
    /// restrictions or DNSBL screening.
    pub fn uses_dns(&self) -> bool {
        self.reverse_lookup
            || self.restrictions.use_dns()
            || self.submission.restrictions.use_dns()
            || self.dnsbl.enabled()
    }

    /// The role of the children waiting on the listener bound to `local`
    /// (a connection's local address: a wildcard listener hands out
    /// connections at a concrete address with its port; ports of 0 are
    /// refused for the submission listeners, so the port decides).
    pub fn role_of(&self, local: SocketAddr) -> ListenerRole {
        let on = |list: &[SocketAddr]| list.iter().any(|l| l.port() == local.port() && covers(*l, local));
        if on(&self.submissions_listen) {
            ListenerRole::Submissions
        } else if on(&self.submission_listen) {
            ListenerRole::Submission
        } else {
            ListenerRole::Mx
        }
    }

    /// `[smtpd]` as the children of a listener of `role` apply it: a
    /// submission listener's children use `[smtpd.submission]`'s lists
    /// and no DNS list screening (that is for mail from strangers).
    pub fn for_role(&self, role: ListenerRole) -> Smtpd {
        let mut smtpd = self.clone();
        if role.is_submission() {
            smtpd.restrictions = self.submission.restrictions.clone();
            smtpd.dnsbl = Dnsbl::default();
        }
        smtpd
    }

    /// Whether STARTTLS is offered: enabled, with a certificate and key.
    pub fn tls_offered(&self) -> bool {
        self.tls_security == TlsSecurity::May && self.tls_cert_file.is_some() && self.tls_key_file.is_some()
    }
}

impl Default for Smtpd {
    fn default() -> Self {
        Self {
            listen: vec![SocketAddr::from((Ipv4Addr::UNSPECIFIED, 25))],
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
            tls_sni: Vec::new(),
            proxy_listen: Vec::new(),
            proxy_trusted: vec![
                IpNet::from(IpAddr::from(Ipv4Addr::LOCALHOST)),
                IpNet::from(IpAddr::from(Ipv6Addr::LOCALHOST)),
            ],
            proxy_timeout: Duration::from_secs(5),
            submission_listen: Vec::new(),
            submissions_listen: Vec::new(),
            auth: Auth::default(),
            submission: Submission::default(),
            client_connection_count_limit: 50,
            client_connection_rate_limit: 0,
            client_message_rate_limit: 0,
            client_limit_exceptions: vec![
                IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(127, 0, 0, 0), 8)),
                IpNet::from(IpAddr::from(Ipv6Addr::LOCALHOST)),
            ],
            client_ipv4_prefix_length: 32,
            client_ipv6_prefix_length: 84,
            reverse_lookup: false,
            reverse_lookup_timeout: Duration::from_secs(2),
            resolvers: Vec::new(),
            milters: Vec::new(),
            milter_macros: crate::milter::MacroLists::default(),
            policy: Vec::new(),
            restrictions: Restrictions::default(),
            dnsbl: Dnsbl::default(),
            verify: Verify::default(),
        }
    }
}

/// `[cleanup]`: what cleanup enforces again, without trusting smtpd.
#[derive(Debug, Clone)]
pub struct Cleanup {
    /// Longest wait for the next record from smtpd.
    pub ipc_timeout: Duration,
    /// Largest header section, in octets.
    pub header_size_limit: usize,
    /// More `Received:` headers than this means a mail loop (554 5.4.6).
    pub hopcount_limit: usize,
    /// Most edits (milter modifications, policy PREPEND/HOLD/DISCARD) one
    /// message may carry; more is refused with 451 4.3.5.
    pub edit_limit: u32,
    /// Tables each logical header field is looked up in (Postfix
    /// header_checks): REJECT, HOLD, DISCARD, WARN, INFO, IGNORE, PREPEND,
    /// REPLACE.
    pub header_checks: Vec<crate::table::TableSpec>,
    /// Tables each body line is looked up in (Postfix body_checks).
    pub body_checks: Vec<crate::table::TableSpec>,
    /// Octets of body body_checks looks at (Postfix's default 51200).
    pub body_checks_size_limit: usize,
    /// Longest time the checks may spend on one message; the rest of it
    /// then passes unchecked, with a warning.
    pub checks_time_limit: Duration,
    /// Free octets the spool's file system keeps (Postfix queue_minfree):
    /// below it, MAIL gets `452 4.3.1 Insufficient system storage` before
    /// any data is sent, so the queue manager always has room to record
    /// deliveries (which free space). Default: three messages of
    /// `message_size_limit` plus [`QUEUE_MINFREE_SLACK`].
    pub queue_minfree: u64,
}

/// What the default `queue_minfree` adds to three maximum-size messages:
/// room for the queue manager's state updates and the logs.
pub const QUEUE_MINFREE_SLACK: u64 = 8 * 1024 * 1024;

impl Default for Cleanup {
    fn default() -> Self {
        Self {
            ipc_timeout: Duration::from_secs(3600),
            header_size_limit: 102_400,
            hopcount_limit: 50,
            edit_limit: 1000,
            header_checks: Vec::new(),
            body_checks: Vec::new(),
            body_checks_size_limit: 51_200,
            checks_time_limit: Duration::from_secs(2),
            queue_minfree: 3 * Smtpd::default().message_size_limit + QUEUE_MINFREE_SLACK,
        }
    }
}

/// `[queue]`: scheduling.
#[derive(Debug, Clone)]
pub struct Queue {
    /// Periodic scan of incoming/ and deferred/, the backstop for a lost wake-up.
    pub scan_interval: Duration,
    /// First retry delay after a temporary failure.
    pub minimal_backoff: Duration,
    /// Retry delays double up to this.
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
    pub queue_lifetime: Duration,
    /// The same for mail from `<>` (bounces), which is dropped with a log
    /// line instead: a bounce is never bounced.
    pub bounce_queue_lifetime: Duration,
    /// Send one "delayed" DSN once a message has waited this long; `0s`
    /// (the default) sends none.
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
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The default route, for every recipient domain not in `routes`.
    pub transport: Route,
    /// `[delivery.routes]`: recipient domain (lower case) to route.
    pub routes: BTreeMap<String, Route>,
    /// Root of the per-recipient Maildirs (`<root>/<recipient>/{tmp,new,cur}`).
    /// Default: `<spool_dir>/maildir`.
    pub maildir_root: PathBuf,
    /// `[delivery.pipe]`: the command behind the `pipe` route.
    pub pipe: Pipe,
    /// STARTTLS policy of the `smtp` relay client.
    pub smtp_tls_security: SmtpTlsSecurity,
    /// PEM file of CA certificates for `encrypt`; default: the Mozilla
    /// roots built in (webpki-roots).
    pub smtp_tls_ca_file: Option<PathBuf>,
    /// Longest wait for a TCP or Unix connection to an LMTP or SMTP next hop.
    pub connect_timeout: Duration,
    /// Longest wait for any one reply (or for sending the content) in an
    /// LMTP or SMTP session.
    pub command_timeout: Duration,
    /// An idle LMTP/SMTP connection is kept this long for the next message
    /// to the same next hop, then closed (Postfix
    /// smtp_connection_cache_time_limit); `0s` disables reuse.
    pub connection_reuse_time: Duration,
}

impl Default for Delivery {
    fn default() -> Self {
        Self {
            transport: Route::Maildir,
            routes: BTreeMap::new(),
            maildir_root: PathBuf::from("/var/spool/mortal/maildir"),
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
#[derive(Debug, Clone)]
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

impl Route {
    /// The delivery agent that carries this route, or `None` for the
    /// routes the queue manager delivers itself (Maildir, discard). The
    /// one route → agent mapping: the master runs a pool for each agent
    /// some route names ([`Config::agents`]), the queue hands the route's
    /// batches to that agent's socket ([`Config::agent_socket`]), and an
    /// agent serves only the routes it carries ([`Service::carries`]).
    pub fn agent(&self) -> Option<Service> {
        match self {
            Route::Pipe => Some(Service::Pipe),
            Route::Lmtp(_) => Some(Service::Lmtp),
            Route::Smtp(_) => Some(Service::Smtp),
            Route::Maildir | Route::Discard => None,
        }
    }
}

/// A server's address: an LMTP next hop, a milter, a policy server.
/// Written `unix:/path` or `inet:IP:PORT` (a literal address: no name
/// lookups; IPv6 as `[::1]:24`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NextHop {
    Unix(PathBuf),
    Inet(SocketAddr),
}

impl std::str::FromStr for NextHop {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!("{s:?} names no socket path"));
            }
            return Ok(NextHop::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = s.strip_prefix("inet:") {
            return addr
                .parse::<SocketAddr>()
                .map(NextHop::Inet)
                .map_err(|_| format!("{s:?}: {addr:?} is not a literal IP:PORT (IPv6 as [::1]:24)"));
        }
        Err(format!("{s:?} is not unix:/path or inet:IP:PORT"))
    }
}

impl fmt::Display for NextHop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NextHop::Unix(p) => write!(f, "unix:{}", p.display()),
            NextHop::Inet(a) => write!(f, "inet:{a}"),
        }
    }
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
        if let Some(hop) = s.strip_prefix("lmtp:") {
            return hop.parse().map(Route::Lmtp).map_err(|e| format!("route {s:?}: {e}: {SYNTAX}"));
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
            Route::Lmtp(hop) => write!(f, "lmtp:{hop}"),
            Route::Smtp(a) => write!(f, "smtp:inet:{a}"),
        }
    }
}

/// `[anvil]`: the per-client counting service (Postfix anvil).
#[derive(Debug, Clone)]
pub struct Anvil {
    /// The window in which connection and message rates are counted
    /// (Postfix anvil_rate_time_unit).
    pub rate_time_unit: Duration,
}

impl Default for Anvil {
    fn default() -> Self {
        Self { rate_time_unit: Duration::from_secs(60) }
    }
}

/// `[process.<service>]`: the lifetime policy of each pre-forked service.
#[derive(Debug, Clone)]
pub struct Processes {
    pub smtpd: ProcessPolicy,
    pub cleanup: ProcessPolicy,
    /// The `pipe` delivery service, which exists only while a route uses
    /// pipe. Keys it does not set take [`ProcessPolicy::pipe_default`]'s
    /// values, not the general defaults.
    pub pipe: ProcessPolicy,
    /// The `lmtp` delivery agent, present only while a route uses LMTP;
    /// unset keys take [`ProcessPolicy::agent_default`]'s values. A use
    /// (`max_use`) is one delivery.
    pub lmtp: ProcessPolicy,
    /// The `smtp` delivery agent, present only while a route relays by
    /// SMTP; defaults as `lmtp`.
    pub smtp: ProcessPolicy,
    /// The queue manager's lifetime (one process).
    pub queue: SingleLife,
    /// anvil's lifetime (one process).
    pub anvil: SingleLife,
    /// Each postscreen's lifetime (one process per `[smtpd] listen`
    /// address, when `[postscreen] enabled`).
    pub postscreen: SingleLife,
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
            postscreen: SingleLife::default(),
        }
    }
}

impl Processes {
    /// `[process.<service>]` of a pre-forked service; `None` for the
    /// single-process queue and anvil, whose lives are [`SingleLife`].
    pub fn pool(&self, service: Service) -> Option<&ProcessPolicy> {
        match service {
            Service::Smtpd => Some(&self.smtpd),
            Service::Cleanup => Some(&self.cleanup),
            Service::Pipe => Some(&self.pipe),
            Service::Lmtp => Some(&self.lmtp),
            Service::Smtp => Some(&self.smtp),
            Service::Queue | Service::Anvil | Service::Postscreen => None,
        }
    }

    /// The lifetime rules of every process of `service`: its pool's
    /// policy, or a single process's life as one
    /// ([`SingleLife::as_policy`]).
    pub fn policy(&self, service: Service) -> ProcessPolicy {
        match service {
            Service::Smtpd => self.smtpd,
            Service::Cleanup => self.cleanup,
            Service::Pipe => self.pipe,
            Service::Lmtp => self.lmtp,
            Service::Smtp => self.smtp,
            Service::Queue => self.queue.as_policy(),
            Service::Anvil => self.anvil.as_policy(),
            Service::Postscreen => self.postscreen.as_policy(),
        }
    }
}

/// `[process.queue]` and `[process.anvil]`: the lifetime of a service that
/// runs exactly one process. There is no pool to size and no session to
/// count: the process lives `max_lifetime` (drawn with `lifetime_jitter`),
/// is then asked to retire, gets `overdue_grace` to finish what it runs
/// (the queue its deliveries), and is terminated after that. Its
/// replacement starts once it has exited, so two queue managers never
/// share the spool.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SingleLife {
    /// Wall-clock life from spawn; "0s": unlimited.
    pub max_lifetime: Duration,
    /// Each life is drawn from `[max_lifetime * (1 - lifetime_jitter), max_lifetime]`.
    pub lifetime_jitter: f64,
    /// How long a retiring process may finish its work before SIGTERM.
    pub overdue_grace: Duration,
    /// SIGTERM to SIGKILL.
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
            overload_wait: Duration::ZERO,
            spawn: SpawnMode::Exec,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
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
    pub max_idle: Duration,
    /// Wall-clock life of a child, from its spawn; "0s": unlimited.
    pub max_lifetime: Duration,
    /// Each child's life is drawn uniformly from
    /// `[max_lifetime * (1 - lifetime_jitter), max_lifetime]`, so children
    /// spawned together never die together. At least 0, below 1.
    pub lifetime_jitter: f64,
    /// A session running longer is stuck (deadlock or compromise): the
    /// child gets SIGTERM, then SIGKILL; "0s": no deadline.
    pub session_deadline: Duration,
    /// How long a child past its lifetime may still finish its session
    /// before it is killed anyway: load never makes a child immortal.
    pub overdue_grace: Duration,
    /// How long a child told to stop with SIGTERM (past a session deadline
    /// or its overdue grace) has to finish its last words, e.g. smtpd's
    /// `421` to its client, before SIGKILL.
    pub term_grace: Duration,
    /// smtpd only: how long clients may wait in the listen backlog while
    /// every child is busy at `process_limit`, before the master answers
    /// them `421 4.3.2` itself (without reading a byte); "0s": never.
    /// Default [`DEFAULT_OVERLOAD_WAIT`]; other services may not set it.
    pub overload_wait: Duration,
    /// How a new child starts: a fresh `exec` of its binary (the default,
    /// a new address-space layout for every child) or a `fork` of a
    /// prepared template process (cheaper; every child shares the
    /// template's layout).
    pub spawn: SpawnMode,
}

/// `[process.<service>] spawn`: how the master starts a child of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpawnMode {
    /// fork+exec of the daemon's binary: each child loads its own
    /// configuration and gets its own address-space layout (ASLR), so
    /// what one child reveals of its memory says nothing of another's.
    #[default]
    Exec,
    /// A fork of the service's template process (the zygote), which was
    /// exec'd once and has loaded the configuration: a child skips exec,
    /// dynamic loading and configuration parsing, but shares the
    /// template's address-space layout and stack canary with every
    /// sibling until the template is replaced (each `max_lifetime`, and at
    /// every reload).
    Fork,
}

impl SpawnMode {
    pub fn name(self) -> &'static str {
        match self {
            SpawnMode::Exec => "exec",
            SpawnMode::Fork => "fork",
        }
    }
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
    /// sets nothing: each child carries one delivery at a time, so the
    /// limit is the queue's default `delivery_concurrency` (20), and a few
    /// spares keep a burst from waiting for the spawn rate to ramp up.
    pub fn agent_default() -> Self {
        Self { process_limit: 20, prefork: 2, min_spare: 2, max_spare: 10, max_use: 100, ..Self::default() }
    }

    /// The policy of `[process.pipe]` when the table sets nothing: a
    /// small pool, since each child runs one command at a time and
    /// delivery concurrency is the queue's to limit.
    pub fn pipe_default() -> Self {
        Self { process_limit: 20, prefork: 1, min_spare: 1, max_spare: 4, max_use: 100, ..Self::default() }
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
            overload_wait: DEFAULT_OVERLOAD_WAIT,
            spawn: SpawnMode::Exec,
        }
    }
}

/// A place in `mortal.toml`: 1-based line, and 1-based column counted in
/// characters, as editors and compilers count them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

impl Location {
    /// The place of byte `offset` in `text`.
    pub fn of(text: &str, offset: usize) -> Location {
        let before = &text.as_bytes()[..offset.min(text.len())];
        let line_start = before.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let tail = &before[line_start..];
        let column = std::str::from_utf8(tail).map_or(tail.len(), |s| s.chars().count()) + 1;
        Location { line: before.iter().filter(|&&b| b == b'\n').count() + 1, column }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// The offsets of the newlines in `text`.
fn newline_offsets(text: &[u8]) -> impl Iterator<Item = usize> + '_ {
    text.iter().enumerate().filter(|&(_, &b)| b == b'\n').map(|(i, _)| i)
}

/// Where each key of a loaded file is written, for messages about it.
/// Found on first use: it takes a second parse of the file, which every
/// child would otherwise pay at start for messages it almost never writes.
#[derive(Debug, Clone, Default)]
struct KeyLocations {
    text: std::sync::Arc<str>,
    found: std::sync::OnceLock<BTreeMap<Vec<String>, Location>>,
}

impl KeyLocations {
    fn of(text: &str) -> KeyLocations {
        KeyLocations { text: text.into(), found: std::sync::OnceLock::new() }
    }

    fn all(&self) -> &BTreeMap<Vec<String>, Location> {
        self.found.get_or_init(|| {
            let text = &*self.text;
            let spans = raw::KeySpans::of(text).0;
            // One pass for the line starts, then a binary search per key.
            let line_starts: Vec<usize> =
                std::iter::once(0).chain(newline_offsets(text.as_bytes()).map(|i| i + 1)).collect();
            let locate = |offset: usize| {
                let offset = offset.min(text.len());
                let line = line_starts.partition_point(|&start| start <= offset);
                let start = line_starts[line - 1];
                let tail = &text.as_bytes()[start..offset];
                let column = std::str::from_utf8(tail).map_or(tail.len(), |s| s.chars().count()) + 1;
                Location { line, column }
            };
            spans.into_iter().map(|(path, span)| (path, locate(span.start))).collect()
        })
    }

    /// The key `table.key` (`table` dotted, empty for the top level);
    /// where the file leaves it out, the nearest table around it that the
    /// file writes; else nothing.
    fn locate(&self, table: &str, key: &str) -> Option<Location> {
        // `smtpd.milter[0]` is the path `smtpd`, `milter`, `0`.
        let mut path: Vec<String> = table
            .split('.')
            .filter(|t| !t.is_empty())
            .flat_map(|t| match t.split_once('[') {
                Some((name, index)) => vec![name.to_owned(), index.trim_end_matches(']').to_owned()],
                None => vec![t.to_owned()],
            })
            .collect();
        path.push(key.to_owned());
        while !path.is_empty() {
            if let Some(at) = self.all().get(&path) {
                return Some(*at);
            }
            path.pop();
        }
        None
    }
}

/// A configuration problem, located as precisely as the source allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub location: Option<Location>,
    /// `table.key`, when the problem is about one key.
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(at) = self.location {
            write!(f, ":{at}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Turns a [`raw::Config`] into a [`Config`]: applies defaults, resolves
/// paths, parses the strings TOML could not type, and collects what does
/// not parse as errors at the value's own place.
struct Resolver<'a> {
    text: &'a str,
    file: &'a Path,
    /// The directory of the file, which relative paths are relative to.
    base: &'a Path,
    keys: &'a KeyLocations,
    /// Values that do not parse.
    invalid: Vec<ConfigError>,
    /// Rules broken by which keys are set, found while resolving.
    problems: Vec<(String, String, String)>,
}

impl Resolver<'_> {
    fn value_error(&mut self, key: &str, span: std::ops::Range<usize>, message: String) {
        let location = Some(Location::of(self.text, span.start));
        self.invalid.push(ConfigError { file: self.file.to_owned(), location, key: Some(key.to_owned()), message });
    }

    fn duration(&mut self, key: &str, value: Option<raw::Text>, default: Duration) -> Duration {
        let Some(value) = value else { return default };
        match humantime::parse_duration(value.get_ref()) {
            Ok(d) => d,
            Err(e) => {
                let msg = format!("{:?} is not a duration like \"300s\" or \"5m\": {e}", value.get_ref());
                self.value_error(key, value.span(), msg);
                default
            }
        }
    }

    fn networks(&mut self, key: &str, value: Option<Vec<raw::Text>>, default: Vec<IpNet>) -> Vec<IpNet> {
        let Some(list) = value else { return default };
        let mut out = Vec::with_capacity(list.len());
        for item in list {
            match parse_network(item.get_ref()) {
                Ok(net) => out.push(net),
                Err(e) => self.value_error(key, item.span(), format!("{:?}: {e}", item.get_ref())),
            }
        }
        out
    }

    fn route(&mut self, key: &str, value: raw::Text) -> Route {
        match value.get_ref().parse::<Route>() {
            Ok(Route::Lmtp(NextHop::Unix(p))) => Route::Lmtp(NextHop::Unix(self.base.join(p))),
            Ok(route) => route,
            Err(e) => {
                self.value_error(key, value.span(), e);
                Route::Discard
            }
        }
    }

    /// Table specs (`texthash:/path`...), relative paths from the file.
    fn tables(&mut self, key: &str, value: Option<Vec<raw::Text>>) -> Vec<crate::table::TableSpec> {
        let mut out = Vec::new();
        for item in value.unwrap_or_default() {
            match item.get_ref().parse::<crate::table::TableSpec>() {
                Ok(spec) => out.push(spec.relative_to(self.base)),
                Err(e) => self.value_error(key, item.span(), e),
            }
        }
        out
    }

    /// One character, not a letter, digit, `@` or white space.
    fn delimiter(&mut self, value: Option<raw::Text>) -> Option<char> {
        let value = value?;
        let mut chars = value.get_ref().chars();
        match (chars.next(), chars.next()) {
            (Some(c), None) if !c.is_alphanumeric() && !c.is_whitespace() && c != '@' && !c.is_control() => Some(c),
            _ => {
                let msg = format!("{:?} is not one delimiter character such as \"+\"", value.get_ref());
                self.value_error("server.recipient_delimiter", value.span(), msg);
                None
            }
        }
    }

    fn path(&self, value: Option<PathBuf>) -> Option<PathBuf> {
        value.map(|p| self.base.join(p))
    }

    fn config(&mut self, raw: raw::Config, source: &Path) -> Config {
        let server = self.server(raw.server);
        let delivery = self.delivery(raw.delivery, &server.spool_dir);
        Config {
            log: log(raw.log),
            cleanup: self
                .cleanup(raw.cleanup, raw.smtpd.message_size_limit.unwrap_or(Smtpd::default().message_size_limit)),
            smtpd: self.smtpd(raw.smtpd, &server.hostname),
            queue: self.queue(raw.queue),
            process: self.processes(raw.process),
            anvil: Anvil {
                rate_time_unit: self.duration(
                    "anvil.rate_time_unit",
                    raw.anvil.rate_time_unit,
                    Anvil::default().rate_time_unit,
                ),
            },
            postscreen: self.postscreen(raw.postscreen),
            server,
            delivery,
            source: source.to_owned(),
            keys: self.keys.clone(),
        }
    }

    fn server(&mut self, raw: raw::Server) -> Server {
        let d = Server::default();
        let spool_dir = self.base.join(raw.spool_dir.unwrap_or(d.spool_dir));
        Server {
            hostname: raw.hostname.unwrap_or(d.hostname),
            // Defaults derive from the already-resolved spool_dir: joining
            // the base again would double a relative base (`etc/etc/../spool`).
            run_dir: raw.run_dir.map_or_else(|| spool_dir.join("run"), |p| self.base.join(p)),
            spool_dir,
            accepted_domains: raw.accepted_domains.unwrap_or(d.accepted_domains),
            user: raw.user.unwrap_or(d.user),
            trusted_networks: self.networks("server.trusted_networks", raw.trusted_networks, d.trusted_networks),
            recipient_map: self.path(raw.recipient_map),
            recipient_maps: self.tables("server.recipient_maps", raw.recipient_maps),
            virtual_alias_maps: self.tables("server.virtual_alias_maps", raw.virtual_alias_maps),
            table_timeout: self.duration("server.table_timeout", raw.table_timeout, d.table_timeout),
            recipient_delimiter: self.delimiter(raw.recipient_delimiter),
            metrics_file: self.path(raw.metrics_file),
        }
    }

    fn smtpd(&mut self, mut raw: raw::Smtpd, hostname: &str) -> Smtpd {
        let d = Smtpd::default();
        let milters = self.milters(&mut raw);
        let milter_macros = self.milter_macros(std::mem::take(&mut raw.milter_macros));
        let policy = self.policy_services(std::mem::take(&mut raw.policy));
        let restrictions = self.restrictions(std::mem::take(&mut raw.restrictions), "smtpd.restrictions");
        let auth = self.auth(std::mem::take(&mut raw.auth));
        let submission = self.submission(std::mem::take(&mut raw.submission));
        let dnsbl = self.dnsbl(std::mem::take(&mut raw.dnsbl));
        let verify = self.verify(std::mem::take(&mut raw.verify), hostname);
        let smtpd = Smtpd {
            milters,
            milter_macros,
            policy,
            restrictions,
            dnsbl,
            verify,
            auth,
            submission,
            submission_listen: raw.submission_listen.unwrap_or_default(),
            submissions_listen: raw.submissions_listen.unwrap_or_default(),
            listen: raw.listen.unwrap_or(d.listen),
            banner: raw.banner.unwrap_or(d.banner),
            message_size_limit: raw.message_size_limit.unwrap_or(d.message_size_limit),
            recipient_limit: raw.recipient_limit.unwrap_or(d.recipient_limit),
            timeout: self.duration("smtpd.timeout", raw.timeout, d.timeout),
            hard_error_limit: raw.hard_error_limit.unwrap_or(d.hard_error_limit),
            soft_error_limit: raw.soft_error_limit.unwrap_or(d.soft_error_limit),
            error_sleep: self.duration("smtpd.error_sleep", raw.error_sleep, d.error_sleep),
            min_data_rate: raw.min_data_rate.unwrap_or(d.min_data_rate),
            data_rate_window: self.duration("smtpd.data_rate_window", raw.data_rate_window, d.data_rate_window),
            bare_newline: raw.bare_newline.unwrap_or(d.bare_newline),
            smtputf8: raw.smtputf8.unwrap_or(d.smtputf8),
            chunking: raw.chunking.unwrap_or(d.chunking),
            dsn: raw.dsn.unwrap_or(d.dsn),
            tls_cert_file: self.path(raw.tls_cert_file),
            tls_key_file: self.path(raw.tls_key_file),
            tls_security: raw.tls_security.unwrap_or(d.tls_security),
            tls_handshake_timeout: self.duration(
                "smtpd.tls_handshake_timeout",
                raw.tls_handshake_timeout,
                d.tls_handshake_timeout,
            ),
            tls_sni: self.tls_sni(std::mem::take(&mut raw.tls_sni)),
            proxy_listen: raw.proxy_listen.unwrap_or(d.proxy_listen),
            proxy_trusted: self.networks("smtpd.proxy_trusted", raw.proxy_trusted, d.proxy_trusted),
            proxy_timeout: self.duration("smtpd.proxy_timeout", raw.proxy_timeout, d.proxy_timeout),
            client_connection_count_limit: raw.client_connection_count_limit.unwrap_or(d.client_connection_count_limit),
            client_connection_rate_limit: raw.client_connection_rate_limit.unwrap_or(d.client_connection_rate_limit),
            client_message_rate_limit: raw.client_message_rate_limit.unwrap_or(d.client_message_rate_limit),
            client_limit_exceptions: self.networks(
                "smtpd.client_limit_exceptions",
                raw.client_limit_exceptions,
                d.client_limit_exceptions,
            ),
            client_ipv4_prefix_length: raw.client_ipv4_prefix_length.unwrap_or(d.client_ipv4_prefix_length),
            client_ipv6_prefix_length: raw.client_ipv6_prefix_length.unwrap_or(d.client_ipv6_prefix_length),
            reverse_lookup: raw.reverse_lookup.unwrap_or(d.reverse_lookup),
            reverse_lookup_timeout: self.duration(
                "smtpd.reverse_lookup_timeout",
                raw.reverse_lookup_timeout,
                d.reverse_lookup_timeout,
            ),
            resolvers: raw.resolvers.unwrap_or(d.resolvers),
        };
        self.restriction_rules(&smtpd);
        self.auth_rules(&smtpd);
        smtpd
    }

    /// `[[smtpd.tls_sni]]`: names that are host names (no wildcards: a
    /// client names one host), each in one entry only.
    fn tls_sni(&mut self, raw: Vec<raw::TlsSni>) -> Vec<SniCertificate> {
        let mut seen: Vec<String> = Vec::new();
        let mut out = Vec::new();
        for (i, entry) in raw.into_iter().enumerate() {
            let key = format!("smtpd.tls_sni[{i}].names");
            if entry.names.is_empty() {
                self.problems.push((format!("smtpd.tls_sni[{i}]"), "names".into(), "names no server name".into()));
            }
            let mut names = Vec::new();
            for name in entry.names {
                let lower = name.get_ref().to_ascii_lowercase();
                if !is_host_name(&lower) {
                    self.value_error(&key, name.span(), format!("{:?} is not a host name", name.get_ref()));
                } else if seen.contains(&lower) {
                    self.value_error(&key, name.span(), format!("{lower} is in another [[smtpd.tls_sni]] already"));
                } else {
                    seen.push(lower.clone());
                    names.push(lower);
                }
            }
            out.push(SniCertificate {
                names,
                cert_file: self.base.join(entry.cert_file),
                key_file: self.base.join(entry.key_file),
            });
        }
        out
    }

    fn cleanup(&mut self, raw: raw::Cleanup, message_size_limit: u64) -> Cleanup {
        let d = Cleanup::default();
        Cleanup {
            ipc_timeout: self.duration("cleanup.ipc_timeout", raw.ipc_timeout, d.ipc_timeout),
            header_size_limit: raw.header_size_limit.unwrap_or(d.header_size_limit),
            hopcount_limit: raw.hopcount_limit.unwrap_or(d.hopcount_limit),
            edit_limit: raw.edit_limit.unwrap_or(d.edit_limit),
            header_checks: self.tables("cleanup.header_checks", raw.header_checks),
            body_checks: self.tables("cleanup.body_checks", raw.body_checks),
            body_checks_size_limit: raw.body_checks_size_limit.unwrap_or(d.body_checks_size_limit),
            checks_time_limit: self.duration("cleanup.checks_time_limit", raw.checks_time_limit, d.checks_time_limit),
            queue_minfree: raw
                .queue_minfree
                .unwrap_or_else(|| message_size_limit.saturating_mul(3).saturating_add(QUEUE_MINFREE_SLACK)),
        }
    }

    fn queue(&mut self, raw: raw::Queue) -> Queue {
        let d = Queue::default();
        Queue {
            scan_interval: self.duration("queue.scan_interval", raw.scan_interval, d.scan_interval),
            minimal_backoff: self.duration("queue.minimal_backoff", raw.minimal_backoff, d.minimal_backoff),
            maximal_backoff: self.duration("queue.maximal_backoff", raw.maximal_backoff, d.maximal_backoff),
            delivery_concurrency: raw.delivery_concurrency.unwrap_or(d.delivery_concurrency),
            active_limit: raw.active_limit.unwrap_or(d.active_limit),
            destination_concurrency_limit: raw.destination_concurrency_limit.unwrap_or(d.destination_concurrency_limit),
            queue_lifetime: self.duration("queue.queue_lifetime", raw.queue_lifetime, d.queue_lifetime),
            bounce_queue_lifetime: self.duration(
                "queue.bounce_queue_lifetime",
                raw.bounce_queue_lifetime,
                d.bounce_queue_lifetime,
            ),
            delay_warning_time: self.duration("queue.delay_warning_time", raw.delay_warning_time, d.delay_warning_time),
        }
    }

    fn delivery(&mut self, raw: raw::Delivery, spool_dir: &Path) -> Delivery {
        let d = Delivery::default();
        let transport = raw.transport.map_or(d.transport, |t| self.route("delivery.transport", t));
        let mut routes = BTreeMap::new();
        let mut spellings: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (domain, route) in raw.routes {
            let route = self.route(&format!("delivery.routes.{domain}"), route);
            let lower = domain.to_lowercase();
            spellings.entry(lower.clone()).or_default().push(domain);
            routes.insert(lower, route);
        }
        // TOML sees `"A.test"` and `"a.test"` as two keys; a domain is one.
        for mut written in spellings.into_values().filter(|w| w.len() > 1) {
            written.sort_by_key(|d| self.keys.locate("delivery.routes", d));
            for domain in &written[1..] {
                let msg = format!("{domain:?} is the same domain as {:?} (domains are case-insensitive)", written[0]);
                self.problems.push(("delivery.routes".into(), domain.clone(), msg));
            }
        }
        Delivery {
            transport,
            routes,
            maildir_root: raw.maildir_root.map_or_else(|| spool_dir.join("maildir"), |p| self.base.join(p)),
            pipe: Pipe {
                command: raw.pipe.command.unwrap_or(d.pipe.command),
                user: raw.pipe.user,
                timeout: self.duration("delivery.pipe.timeout", raw.pipe.timeout, d.pipe.timeout),
            },
            smtp_tls_security: raw.smtp_tls_security.unwrap_or(d.smtp_tls_security),
            smtp_tls_ca_file: self.path(raw.smtp_tls_ca_file),
            connect_timeout: self.duration("delivery.connect_timeout", raw.connect_timeout, d.connect_timeout),
            command_timeout: self.duration("delivery.command_timeout", raw.command_timeout, d.command_timeout),
            connection_reuse_time: self.duration(
                "delivery.connection_reuse_time",
                raw.connection_reuse_time,
                d.connection_reuse_time,
            ),
        }
    }

    fn processes(&mut self, raw: raw::Processes) -> Processes {
        Processes {
            smtpd: self.policy(Service::Smtpd, raw.smtpd, ProcessPolicy::default(), None),
            cleanup: self.policy(
                Service::Cleanup,
                raw.cleanup,
                ProcessPolicy::default(),
                Some("cleanup's clients wait"),
            ),
            pipe: self.policy(
                Service::Pipe,
                raw.pipe,
                ProcessPolicy::pipe_default(),
                Some("the queue's requests wait"),
            ),
            lmtp: self.policy(
                Service::Lmtp,
                raw.lmtp,
                ProcessPolicy::agent_default(),
                Some("the queue's requests wait"),
            ),
            smtp: self.policy(
                Service::Smtp,
                raw.smtp,
                ProcessPolicy::agent_default(),
                Some("the queue's requests wait"),
            ),
            queue: self.single_life(Service::Queue, raw.queue),
            anvil: self.single_life(Service::Anvil, raw.anvil),
            postscreen: self.single_life(Service::Postscreen, raw.postscreen),
        }
    }

    /// `[process.queue]` / `[process.anvil]` over [`SingleLife`]'s defaults.
    fn single_life(&mut self, service: Service, raw: raw::SingleLife) -> SingleLife {
        let d = SingleLife::default();
        let key = |k: &str| format!("process.{service}.{k}");
        SingleLife {
            max_lifetime: self.duration(&key("max_lifetime"), raw.max_lifetime, d.max_lifetime),
            lifetime_jitter: raw.lifetime_jitter.unwrap_or(d.lifetime_jitter),
            overdue_grace: self.duration(&key("overdue_grace"), raw.overdue_grace, d.overdue_grace),
            term_grace: self.duration(&key("term_grace"), raw.term_grace, d.term_grace),
        }
    }

    /// `[process.<service>]` over `d`, the service's defaults; a service
    /// with `no_overload_wait` (why not) may not set `overload_wait`.
    fn policy(
        &mut self,
        service: Service,
        raw: raw::ProcessPolicy,
        d: ProcessPolicy,
        no_overload_wait: Option<&str>,
    ) -> ProcessPolicy {
        let table = format!("process.{service}");
        if let (Some(why), Some(_)) = (no_overload_wait, &raw.overload_wait) {
            self.problems.push((table.clone(), "overload_wait".into(), format!("applies to smtpd only ({why})")));
        }
        let key = |k: &str| format!("{table}.{k}");
        ProcessPolicy {
            process_limit: raw.process_limit.unwrap_or(d.process_limit),
            prefork: raw.prefork.unwrap_or(d.prefork),
            min_spare: raw.min_spare.unwrap_or(d.min_spare),
            max_spare: raw.max_spare.unwrap_or(d.max_spare),
            max_use: raw.max_use.unwrap_or(d.max_use),
            max_idle: self.duration(&key("max_idle"), raw.max_idle, d.max_idle),
            max_lifetime: self.duration(&key("max_lifetime"), raw.max_lifetime, d.max_lifetime),
            lifetime_jitter: raw.lifetime_jitter.unwrap_or(d.lifetime_jitter),
            session_deadline: self.duration(&key("session_deadline"), raw.session_deadline, d.session_deadline),
            overdue_grace: self.duration(&key("overdue_grace"), raw.overdue_grace, d.overdue_grace),
            term_grace: self.duration(&key("term_grace"), raw.term_grace, d.term_grace),
            overload_wait: self.duration(&key("overload_wait"), raw.overload_wait, d.overload_wait),
            spawn: raw.spawn.unwrap_or(d.spawn),
        }
    }
}

fn log(raw: raw::Log) -> Log {
    let d = Log::default();
    Log {
        format: raw.format.unwrap_or(d.format),
        level: raw.level.unwrap_or(d.level),
        syslog_name: raw.syslog_name.unwrap_or(d.syslog_name),
    }
}

/// A network block as `mortal.toml` writes it: `192.0.2.0/24`,
/// `2001:db8::/32`, or a bare address for a single host. Stricter than
/// [`IpNet`]'s own parser: the prefix is digits only, and no host bits
/// may be set below it (`192.0.2.1/24` is a typo for either `/32` or
/// `.0/24`, and guessing which would widen or narrow a trust list
/// silently).
pub fn parse_network(s: &str) -> Result<IpNet, String> {
    let (addr, prefix) = match s.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (s, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| format!("{addr:?} is not an IP address"))?;
    let net = match prefix {
        None => IpNet::from(addr),
        // `u8::from_str` would take "+8"; a prefix is digits only.
        Some(p) if !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()) => {
            let bits: u8 = p.parse().map_err(|_| format!("{p:?} is not a prefix length"))?;
            IpNet::new(addr, bits)
                .map_err(|_| format!("prefix /{bits} is longer than {} bits", IpNet::from(addr).max_prefix_len()))?
        }
        Some(p) => return Err(format!("{p:?} is not a prefix length")),
    };
    if net.trunc() != net {
        return Err(format!("{net} has host bits set below its prefix (did you mean {}?)", net.trunc()));
    }
    Ok(net)
}

/// Whether any block of `list` contains `addr`, an IPv4-mapped IPv6
/// address (`::ffff:192.0.2.1`, what a dual-stack socket reports) counting
/// as the IPv4 address it is, and the other way round.
pub fn networks_contain(list: &[IpNet], addr: IpAddr) -> bool {
    list.iter().any(|net| match (net, addr) {
        (IpNet::V4(net), addr) => matches!(addr.to_canonical(), IpAddr::V4(a) if net.contains(&a)),
        (IpNet::V6(net), IpAddr::V4(a)) => net.contains(&a.to_ipv6_mapped()),
        (IpNet::V6(net), IpAddr::V6(a)) => net.contains(&a),
    })
}

impl Config {
    /// Parses `text` as the contents of `file`, resolves paths against the
    /// file's directory and validates. Returns every problem found, in
    /// file order, not just the first; a syntax or type error stops at
    /// that error. The rules for a system started as root apply when this
    /// process runs as root (see [`Config::parse_for`]).
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
        let raw: raw::Config = toml::from_str(text).map_err(|e| {
            let location = e.span().map(|s| Location::of(text, s.start));
            // One line per error: TOML words some errors over two.
            let message = e.message().trim().lines().map(str::trim).collect::<Vec<_>>().join(": ");
            vec![ConfigError { file: file.to_owned(), location, key: None, message }]
        })?;
        let keys = KeyLocations::of(text);
        let base = file.parent().unwrap_or(Path::new("."));
        let mut resolver = Resolver { text, file, base, keys: &keys, invalid: Vec::new(), problems: Vec::new() };
        let config = resolver.config(raw, file);
        // Rules about values are checked only once every value parsed: a
        // default standing in for a bad one would draw false complaints.
        let mut errors = resolver.invalid;
        if errors.is_empty() {
            let problems = resolver.problems.into_iter().chain(config.problems(as_root));
            errors = problems
                .map(|(table, key, message)| ConfigError {
                    file: file.to_owned(),
                    location: config.keys.locate(&table, &key),
                    key: Some(if table.is_empty() { key } else { format!("{table}.{key}") }),
                    message,
                })
                .collect();
        }
        // File order; errors nothing locates come last.
        errors.sort_by_key(|e| (e.location.is_none(), e.location));
        if errors.is_empty() { Ok(config) } else { Err(errors) }
    }

    /// Reads and parses `file`.
    pub fn load(file: &Path) -> Result<Config, Vec<ConfigError>> {
        let text = std::fs::read_to_string(file).map_err(|e| {
            vec![ConfigError { file: file.to_owned(), location: None, key: None, message: format!("cannot read: {e}") }]
        })?;
        Config::parse(&text, file)
    }

    /// Where the file this was loaded from sets `table.key` (`table`
    /// dotted, as in `process.smtpd`); where it leaves the key out, the
    /// nearest enclosing table it writes; else nothing. For messages about
    /// a key, such as `mortal check`'s warnings.
    pub fn locate(&self, table: &str, key: &str) -> Option<Location> {
        self.keys.locate(table, key)
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
        if self.server.user.is_empty() || self.server.user == "root" {
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
        if self.routes_to(Service::Pipe) {
            for problem in self.delivery.pipe.problems() {
                bad("delivery.pipe", "command", problem);
            }
            // As root the pipe service drops to this user, never to root
            // and never to the mail user (whose rights over the spool an
            // operator's command must not have), as Postfix's pipe(8).
            let server_user = self.server.user.as_str();
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
        let postscreen_life = self.process.postscreen.as_policy();
        for (name, p) in [
            ("smtpd", &self.process.smtpd),
            ("cleanup", &self.process.cleanup),
            ("pipe", &self.process.pipe),
            ("lmtp", &self.process.lmtp),
            ("smtp", &self.process.smtp),
            ("queue", &queue_life),
            ("anvil", &anvil_life),
            ("postscreen", &postscreen_life),
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
    /// `[delivery.routes]` entry) hands mail to the delivery agent
    /// `agent` ([`Route::agent`]): only then does its pool exist (no pipe
    /// route, no process that can run the command; no LMTP or SMTP route,
    /// no process that may connect anywhere).
    pub fn routes_to(&self, agent: Service) -> bool {
        self.routes().any(|r| r.agent() == Some(agent))
    }

    /// The delivery agents some route uses, in [`Service::ALL`] order:
    /// the agent pools the master runs.
    pub fn agents(&self) -> Vec<Service> {
        Service::ALL.into_iter().filter(|&service| self.routes_to(service)).collect()
    }

    /// The TCP ports of the `inet:` socketmap tables smtpd looks up
    /// (recipient tables, virtual aliases, access tables).
    pub fn smtpd_table_ports(&self) -> Vec<u16> {
        let lists = self.smtpd.restrictions.all().chain(self.smtpd.submission.restrictions.all());
        let access = lists.filter_map(crate::restriction::Restriction::table).chain(&self.smtpd.auth.sender_login_maps);
        let tables = self.server.recipient_maps.iter().chain(&self.server.virtual_alias_maps).chain(access);
        tables.filter_map(crate::table::TableSpec::inet_port).collect()
    }

    /// The TCP ports of the `inet:` socketmap tables cleanup looks up
    /// (virtual aliases, header and body checks).
    pub fn cleanup_table_ports(&self) -> Vec<u16> {
        let c = &self.cleanup;
        let tables = self.server.virtual_alias_maps.iter().chain(&c.header_checks).chain(&c.body_checks);
        tables.filter_map(crate::table::TableSpec::inet_port).collect()
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
        &self.server.run_dir
    }

    pub fn maildir_root(&self) -> &Path {
        &self.delivery.maildir_root
    }

    /// Directory holding the sockets between daemons; smtpd's view of the
    /// file system is reduced to this directory.
    pub fn private_dir(&self) -> PathBuf {
        self.run_dir().join("private")
    }

    /// Where each postscreen leaves the clients that passed for its
    /// successor: the mail user's directory in the private one (inside
    /// postscreen's chroot).
    pub fn postscreen_cache_dir(&self) -> PathBuf {
        self.private_dir().join("postscreen")
    }

    /// The cache file of the postscreen that listens on `listen`.
    pub fn postscreen_cache_file(&self, listen: SocketAddr) -> PathBuf {
        self.postscreen_cache_dir().join(format!("cache-{listen}"))
    }

    /// cleanup's listening socket (smtpd connects here).
    pub fn cleanup_socket(&self) -> PathBuf {
        self.private_dir().join("cleanup")
    }

    /// Where smtpd children take the connections postscreen passes on
    /// (with `[postscreen] enabled`; Postfix's `smtpd pass` service).
    pub fn smtpd_handoff_socket(&self) -> PathBuf {
        self.private_dir().join("smtpd")
    }

    /// anvil's socket (smtpd connects here for per-client counts).
    pub fn anvil_socket(&self) -> PathBuf {
        self.private_dir().join("anvil")
    }

    /// queue's wake-up socket (cleanup and the CLI connect here).
    pub fn queue_socket(&self) -> PathBuf {
        self.private_dir().join("queue")
    }

    /// A delivery agent's socket, `<run_dir>/private/<name>` (`pipe`,
    /// `lmtp`, `smtp`): the master binds it, the queue connects to it.
    pub fn agent_socket(&self, agent: Service) -> PathBuf {
        self.private_dir().join(agent.name())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-key locations agree with [`Location::of`] everywhere.
    #[test]
    fn key_locations_agree_with_location_of() {
        let text = "# c\n[server]\nhostname = \"h\"\n\n[smtpd]\n  listen = [\"127.0.0.1:25\"] # é\ntimeout = \"1s\"\n";
        let spans = raw::KeySpans::of(text).0;
        let keys = KeyLocations::of(text);
        assert!(spans.len() >= 4, "{spans:?}");
        for (path, span) in spans {
            assert_eq!(keys.all()[&path], Location::of(text, span.start), "{path:?}");
        }
    }

    const DEV: &str = include_str!("../../../etc/mortal.toml");

    #[test]
    fn dev_config_is_valid() {
        let c = Config::parse(DEV, Path::new("/checkout/etc/mortal.toml")).unwrap();
        assert_eq!(c.smtpd.listen, vec!["127.0.0.1:2525".parse().unwrap()]);
        assert_eq!(c.server.spool_dir, Path::new("/checkout/etc/../spool"));
        assert!(c.accepts_domain("EXAMPLE.test"));
        assert!(!c.accepts_domain("elsewhere.test"));
    }

    /// Issue 11: the agent pools, their sockets and their policies come
    /// from the routes through `Route::agent`, one lookup each.
    #[test]
    fn agents_follow_the_routes() {
        let text = "[server]\nrun_dir = \"/r\"\n[delivery]\ntransport = \"smtp:inet:127.0.0.1:25\"\n[delivery.routes]\n\"p.test\" = \"pipe\"\n\"m.test\" = \"maildir\"\n[delivery.pipe]\ncommand = [\"/bin/true\"]\n[process.smtp]\nmax_use = 7\n";
        let c = Config::parse_for(text, Path::new("/m.toml"), false).unwrap();
        assert_eq!(c.agents(), [Service::Pipe, Service::Smtp]);
        assert!(c.routes_to(Service::Pipe) && c.routes_to(Service::Smtp) && !c.routes_to(Service::Lmtp));
        assert!(!c.routes_to(Service::Smtpd));
        assert_eq!(c.agent_socket(Service::Lmtp), Path::new("/r/private/lmtp"));
        assert_eq!(c.agent_socket(Service::Pipe), Path::new("/r/private/pipe"));
        assert_eq!(c.process.policy(Service::Smtp).max_use, 7);
        assert_eq!(c.process.pool(Service::Pipe), Some(&ProcessPolicy::pipe_default()));
        assert_eq!(c.process.pool(Service::Queue), None);
        assert_eq!(c.process.policy(Service::Queue), c.process.queue.as_policy());
        assert_eq!(c.process.policy(Service::Anvil), c.process.anvil.as_policy());
        let maildir = Config::parse_for("", Path::new("/m.toml"), false).unwrap();
        assert!(maildir.agents().is_empty());
    }

    /// A config named by a relative path resolves every path once.
    #[test]
    fn relative_config_path_resolves_defaults_once() {
        let c = Config::parse("[server]\nspool_dir = \"../spool\"\n", Path::new("etc/mortal.toml")).unwrap();
        assert_eq!(c.run_dir(), Path::new("etc/../spool/run"));
        assert_eq!(c.maildir_root(), Path::new("etc/../spool/maildir"));
    }

    /// Issue 12: `[cleanup] edit_limit` bounds the filters' edits of one
    /// message; 1000 unless set, and only a u32.
    #[test]
    fn cleanup_edit_limit() {
        let parse = |text: &str| Config::parse_for(text, Path::new("/m.toml"), false);
        assert_eq!(parse("").unwrap().cleanup.edit_limit, 1000);
        assert_eq!(parse("[cleanup]\nedit_limit = 7\n").unwrap().cleanup.edit_limit, 7);
        let errors = parse("[cleanup]\nedit_limit = -1\n").unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].to_string().contains("m.toml:2"), "{}", errors[0]);
    }

    /// Every kind of error points at the exact place: the key for a rule
    /// or an unknown key, the value (or the array element) for a value
    /// that does not parse, as TOML itself does for a type error.
    #[test]
    fn errors_name_line_and_column() {
        let table: &[(&str, &[&str])] = &[
            // Unknown key, in a table and in a nested table.
            (
                "[smtpd]\nlisten = [\"127.0.0.1:25\"]\n  max_sessions = 3\n",
                &["m.toml:3:3: unknown field `max_sessions`"],
            ),
            ("[process.pipe]\nprefork = 1\nbogus = 1\n", &["m.toml:3:1: unknown field `bogus`"]),
            // Bad type.
            ("[queue]\nactive_limit = \"many\"\n", &["m.toml:2:16: invalid type: string \"many\", expected u32"]),
            ("[smtpd]\nsmtputf8 = 1\n", &["m.toml:2:12: invalid type: integer `1`, expected a boolean"]),
            // Bad value in a nested table, in an inline table, in an array.
            (
                "[process.smtpd]\nmax_idle = \"soon\"\n",
                &["m.toml:2:12: process.smtpd.max_idle: \"soon\" is not a duration like \"300s\" or \"5m\""],
            ),
            (
                "[delivery]\npipe = { command = [\"/bin/p\"], timeout = \"x\" }\n",
                &["m.toml:2:42: delivery.pipe.timeout: \"x\" is not a duration"],
            ),
            (
                "[server]\ntrusted_networks = [\n  \"10.0.0.0/8\",\n  \"192.0.2.1/24\",\n]\n",
                &[
                    "m.toml:4:3: server.trusted_networks: \"192.0.2.1/24\": 192.0.2.1/24 has host bits set below its prefix (did you mean 192.0.2.0/24?)",
                ],
            ),
            (
                "[delivery.routes]\n\"a.test\" = \"mbox\"\n",
                &["m.toml:2:12: delivery.routes.a.test: unknown route \"mbox\""],
            ),
            // Every value error, in file order.
            (
                "[queue]\nmaximal_backoff = \"later\"\nminimal_backoff = \"sooner\"\n[smtpd]\ntimeout = \"x\"\n",
                &[
                    "m.toml:2:19: queue.maximal_backoff",
                    "m.toml:3:19: queue.minimal_backoff",
                    "m.toml:5:11: smtpd.timeout",
                ],
            ),
            // Rules: the key, however it is written.
            (
                "[process.smtpd]\nprocess_limit = 2\n  prefork = 3\n",
                &["m.toml:3:3: process.smtpd.prefork: must not exceed"],
            ),
            (
                "[process]\nsmtpd.process_limit = 2\nsmtpd.prefork = 3\n",
                &["m.toml:3:7: process.smtpd.prefork: must not exceed"],
            ),
            (
                "process = { cleanup = { process_limit = 2, prefork = 3 } }\n",
                &["m.toml:1:44: process.cleanup.prefork: must not exceed"],
            ),
            // A rule about a key the file leaves out: its table's header.
            ("[smtpd]\nproxy_listen = [\"127.0.0.1:26\"]\nproxy_trusted = []\n", &["m.toml:3:1: smtpd.proxy_trusted"]),
            ("\n[smtpd]\nlisten = []\n", &["m.toml:3:1: smtpd.listen: needs at least one address"]),
            ("[queue]\n\n\n[ queue.x ]\n", &["m.toml:4:9: unknown field `x`"]),
            // Duplicates: a key, a table, a domain in two spellings.
            ("[smtpd]\ntimeout = \"1s\"\ntimeout = \"2s\"\n", &["m.toml:3:1: duplicate key `timeout`"]),
            (
                "[anvil]\n[smtpd]\n[anvil]\n",
                &["m.toml:3:1: invalid table header: duplicate key `anvil` in document root"],
            ),
            (
                "[delivery.routes]\n\"b.test\" = \"discard\"\n\"B.Test\" = \"maildir\"\n",
                &["m.toml:3:1: delivery.routes.B.Test: \"B.Test\" is the same domain as \"b.test\""],
            ),
        ];
        for (text, want) in table {
            let got: Vec<String> = match Config::parse_for(text, Path::new("m.toml"), false) {
                Ok(_) => Vec::new(),
                Err(errors) => errors.iter().map(ToString::to_string).collect(),
            };
            assert_eq!(got.len(), want.len(), "{text:?}: {got:#?}");
            for (got, want) in got.iter().zip(*want) {
                assert!(got.starts_with(want), "{text:?}:\n{got}\n  does not start with\n{want}");
            }
        }
    }

    /// `[server] trusted_networks` and the other address lists: strict
    /// CIDR, a bare address for one host.
    #[test]
    fn networks_parse_strictly() {
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
            let got = parse_network(input).map(|c| c.to_string());
            match (got, expected) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{input}"),
                (Err(got), Err(want)) => assert!(got.contains(want), "{input}: {got}"),
                (got, want) => panic!("{input}: got {got:?}, want {want:?}"),
            }
            // The same through the file, at the element's column.
            let text = format!("[smtpd]\nproxy_trusted = [\"::1\", {input:?}]\n");
            match (Config::parse_for(&text, Path::new("m.toml"), false), expected) {
                (Ok(c), Ok(want)) => assert_eq!(c.smtpd.proxy_trusted[1].to_string(), want),
                (Err(e), Err(want)) => {
                    assert!(e[0].to_string().starts_with("m.toml:2:25: smtpd.proxy_trusted: "), "{e:?}");
                    assert!(e[0].message.contains(want), "{e:?}");
                }
                (got, want) => panic!("{input}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn network_containment() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for (net, addr, inside) in [
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
            let list = [parse_network(net).unwrap()];
            assert_eq!(networks_contain(&list, ip(addr)), inside, "{net} contains {addr}");
        }
        let list = [parse_network("10.0.0.0/8").unwrap(), parse_network("::1").unwrap()];
        assert!(networks_contain(&list, ip("10.1.2.3")));
        assert!(networks_contain(&list, ip("::1")));
        assert!(!networks_contain(&list, ip("127.0.0.1")));
        assert!(!networks_contain(&[], ip("127.0.0.1")));
        // The defaults, as Postfix's: loopback may send PROXY headers and
        // is exempt from the client limits.
        let d = Smtpd::default();
        assert!(networks_contain(&d.proxy_trusted, ip("::ffff:127.0.0.1")));
        assert!(!networks_contain(&d.proxy_trusted, ip("127.0.0.2")));
        assert!(networks_contain(&d.client_limit_exceptions, ip("127.0.0.2")));
        assert!(networks_contain(&d.client_limit_exceptions, ip("::1")));
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
        assert_eq!(err[0].to_string(), "m.toml:3:1: process.smtpd.prefork: must not exceed process_limit (2)");
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
                err[0].to_string().starts_with("m.toml:2:1: process.cleanup.term_grace: must be above 0s"),
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

    /// The submission listeners need TLS and Dovecot, and their roles are
    /// told from the connection's local address.
    #[test]
    fn submission_listeners_need_tls_and_auth_and_have_roles() {
        let tls = "tls_cert_file = \"c.pem\"\ntls_key_file = \"k.pem\"\n";
        let text = format!(
            "[smtpd]\nlisten = [\"0.0.0.0:25\"]\nsubmission_listen = [\"0.0.0.0:587\"]\n\
             submissions_listen = [\"127.0.0.1:465\", \"[::1]:465\"]\n{tls}\
             [smtpd.auth]\nserver = \"unix:run/private/auth\"\nsender_login_maps = [\"texthash:logins\"]\n\
             [smtpd.submission.restrictions]\nsender = [\"reject_sender_login_mismatch\"]\n\
             recipient = [\"permit_sasl_authenticated\", \"reject\"]\n"
        );
        let c = Config::parse(&text, Path::new("/etc/m/m.toml")).unwrap();
        assert_eq!(c.smtpd.auth.server, Some(NextHop::Unix("/etc/m/run/private/auth".into())));
        assert_eq!((c.smtpd.auth.failure_limit, c.smtpd.auth.mx), (DEFAULT_AUTH_FAILURE_LIMIT, false));
        let role = |a: &str| c.smtpd.role_of(a.parse().unwrap());
        assert_eq!(role("192.0.2.1:587"), ListenerRole::Submission);
        assert_eq!(role("[::ffff:192.0.2.1]:587"), ListenerRole::Submission);
        assert_eq!(role("127.0.0.1:465"), ListenerRole::Submissions);
        assert_eq!(role("[::1]:465"), ListenerRole::Submissions);
        assert_eq!(role("127.0.0.2:465"), ListenerRole::Mx);
        assert_eq!(role("192.0.2.1:25"), ListenerRole::Mx);
        assert!(c.smtpd.auth.offered_on(ListenerRole::Submission) && !c.smtpd.auth.offered_on(ListenerRole::Mx));
        let sub = c.smtpd.for_role(ListenerRole::Submission);
        assert_eq!(sub.restrictions.sender, vec![crate::restriction::Restriction::RejectSenderLoginMismatch]);
        assert_eq!(c.smtpd.for_role(ListenerRole::Mx).restrictions, c.smtpd.restrictions);
        for (bad, want) in [
            ("[smtpd]\nsubmission_listen = [\"0.0.0.0:587\"]\n", "smtpd.auth.server: must name Dovecot's auth socket"),
            (
                "[smtpd]\nsubmission_listen = [\"0.0.0.0:587\"]\n[smtpd.auth]\nserver = \"inet:127.0.0.1:1\"\n",
                "smtpd.submission_listen: needs tls_cert_file and tls_key_file",
            ),
            (
                &format!(
                    "[smtpd]\nsubmission_listen = [\"0.0.0.0:25\"]\n{tls}[smtpd.auth]\nserver = \"inet:127.0.0.1:1\"\n"
                ),
                "smtpd.submission_listen: 0.0.0.0:25 is also another listener's address",
            ),
            ("[smtpd.auth]\nmx = true\n", "smtpd.auth.mx: needs server"),
            ("[smtpd.auth]\nserver = \"tcp:x\"\n", "smtpd.auth.server"),
            ("[smtpd.restrictions]\nrecipient = [\"permit_sasl_authenticated\"]\n", "need AUTH on these listeners"),
            (
                &format!(
                    "[smtpd]\n{tls}[smtpd.auth]\nserver = \"inet:127.0.0.1:1\"\n[smtpd.submission.restrictions]\nsender = [\"reject_sender_login_mismatch\"]\n"
                ),
                "needs [smtpd.auth] sender_login_maps",
            ),
            ("[smtpd.auth]\nresponse_limit = 100\n", "smtpd.auth.response_limit: below 512"),
        ] {
            let err = Config::parse(bad, Path::new("m.toml")).unwrap_err();
            assert!(err.iter().any(|e| e.to_string().contains(want)), "{bad}: {err:?}");
        }
    }

    /// SNI certificates: host names, each once, relative paths from the
    /// file, and a default certificate for every other name.
    #[test]
    fn sni_certificates_name_hosts_once() {
        let tls = "[smtpd]\ntls_cert_file = \"c.pem\"\ntls_key_file = \"k.pem\"\n";
        let sni = |names: &str| {
            format!("{tls}[[smtpd.tls_sni]]\nnames = [{names}]\ncert_file = \"m.pem\"\nkey_file = \"m.key\"\n")
        };
        let c = Config::parse(&sni("\"Mail.Example.org\", \"mail.example.net\""), Path::new("/etc/m/m.toml")).unwrap();
        assert_eq!(
            c.smtpd.tls_sni,
            vec![SniCertificate {
                names: vec!["mail.example.org".into(), "mail.example.net".into()],
                cert_file: "/etc/m/m.pem".into(),
                key_file: "/etc/m/m.key".into(),
            }]
        );
        for (text, want) in [
            (sni("\"*.example.org\""), "smtpd.tls_sni[0].names: \"*.example.org\" is not a host name"),
            (sni("\"a.test\", \"A.test\""), "a.test is in another [[smtpd.tls_sni]] already"),
            (sni(""), "names no server name"),
            (sni("\"a.test\"").replace(tls, "[smtpd]\n"), "smtpd.tls_sni: needs tls_cert_file and tls_key_file"),
        ] {
            let err = Config::parse(&text, Path::new("m.toml")).unwrap_err();
            assert!(err.iter().any(|e| e.to_string().contains(want)), "{text}: {err:?}");
        }
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
    fn alias_tables_and_the_delimiter() {
        let text = "[server]\nvirtual_alias_maps = [\"texthash:virtual\", \"inline:{ a@x.test = b@x.test }\"]\nrecipient_delimiter = \"+\"\n";
        let c = Config::parse(text, Path::new("/etc/m/m.toml")).unwrap();
        assert_eq!(c.server.virtual_alias_maps[0], crate::table::TableSpec::Text("/etc/m/virtual".into()));
        assert_eq!(c.server.recipient_delimiter, Some('+'));
        for (bad, want) in [
            ("virtual_alias_maps = [\"btree:/x\"]", "server.virtual_alias_maps: unknown table kind"),
            ("recipient_delimiter = \"+-\"", "server.recipient_delimiter: \"+-\" is not one delimiter"),
            ("recipient_delimiter = \"a\"", "is not one delimiter"),
        ] {
            let err = Config::parse(&format!("[server]\n{bad}\n"), Path::new("m.toml")).unwrap_err();
            assert!(err[0].to_string().contains(want), "{bad}: {}", err[0]);
        }
    }

    #[test]
    fn bad_route_names_line() {
        for bad in ["lmtp:inet:localhost:24", "smtp:unix:/x", "lmtp:unix:", "mbox", "smtp:inet:127.0.0.1"] {
            let text = format!("[delivery]\nmaildir_root = \"m\"\n[delivery.routes]\n\"a.test\" = \"{bad}\"\n");
            let err = Config::parse(&text, Path::new("m.toml")).unwrap_err();
            let msg = err[0].to_string();
            assert!(msg.starts_with("m.toml:4:12: delivery.routes.a.test: ") && msg.contains(bad), "{bad}: {msg}");
        }
    }

    #[test]
    fn pipe_command_is_checked_when_routed() {
        let ok = "[delivery]\ntransport = \"pipe\"\n[delivery.pipe]\ncommand = [\"/bin/p\", \"${recipient}\"]\n";
        assert!(Config::parse_for(ok, Path::new("m.toml"), false).is_ok());
        let text = "[delivery]\ntransport = \"pipe\"\n[delivery.pipe]\ncommand = [\"p\", \"${rcpt}\"]\n";
        let err = Config::parse_for(text, Path::new("m.toml"), false).unwrap_err();
        assert_eq!(err.len(), 2, "{err:?}");
        assert!(err.iter().all(|e| e.to_string().starts_with("m.toml:4:1: delivery.pipe.command")), "{err:?}");
        let err = Config::parse_for("[delivery]\ntransport = \"pipe\"\n", Path::new("m.toml"), false).unwrap_err();
        assert!(err[0].message.contains("must name the program"), "{err:?}");
    }

    /// `spawn`: exec by default everywhere, `fork` where a pool says so; a
    /// misspelt mode is refused at its line.
    #[test]
    fn spawn_mode_is_exec_unless_a_pool_says_fork() {
        let c = Config::parse_for("[process.smtpd]\nspawn = \"fork\"\n", Path::new("m.toml"), false).unwrap();
        assert_eq!(c.process.smtpd.spawn, SpawnMode::Fork);
        assert_eq!(c.process.cleanup.spawn, SpawnMode::Exec);
        assert_eq!(c.process.policy(Service::Queue).spawn, SpawnMode::Exec);
        let err = Config::parse_for("[process.cleanup]\nspawn = \"vfork\"\n", Path::new("m.toml"), false).unwrap_err();
        assert!(err[0].to_string().starts_with("m.toml:2:"), "{err:?}");
        assert!(err[0].to_string().contains("vfork"), "{err:?}");
        let err = Config::parse_for("[process.queue]\nspawn = \"fork\"\n", Path::new("m.toml"), false).unwrap_err();
        assert!(err[0].to_string().contains("spawn"), "{err:?}");
    }

    /// Issue 5: started as root, a pipe route needs `[delivery.pipe] user`,
    /// neither root nor the mail user; unprivileged, the key is optional.
    #[test]
    fn pipe_user_is_required_as_root() {
        let base = "[delivery]\n[delivery.routes]\n\"p.test\" = \"pipe\"\n[delivery.pipe]\ncommand = [\"/bin/p\"]\n";
        let err = Config::parse_for(base, Path::new("m.toml"), true).unwrap_err();
        assert_eq!(err.len(), 1, "{err:?}");
        assert!(
            err[0].to_string().starts_with("m.toml:4:11: delivery.pipe.user: must name the unprivileged user"),
            "{err:?}"
        );
        assert!(Config::parse_for(base, Path::new("m.toml"), false).is_ok());
        let with = |user: &str| format!("{base}user = \"{user}\"\n");
        assert!(Config::parse_for(&with("pipeuser"), Path::new("m.toml"), true).is_ok());
        let err = Config::parse_for(&with("mortal"), Path::new("m.toml"), true).unwrap_err();
        assert!(
            err[0].to_string().starts_with("m.toml:6:1: delivery.pipe.user: must differ from [server] user"),
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
        assert_eq!(err[0].to_string(), "m.toml:3:1: process.pipe.prefork: must not exceed process_limit (1)");
        let text = "[delivery]\ntransport = \"pipe\"\n[delivery.pipe]\ncommand = [\"/bin/p\"]\ntimeout = \"100s\"\n[process.pipe]\nsession_deadline = \"50s\"\n";
        let err = Config::parse_for(text, Path::new("m.toml"), false).unwrap_err();
        assert!(
            err[0].to_string().starts_with("m.toml:7:1: process.pipe.session_deadline: must be 0s or at least"),
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
        let jitter = "m.toml:2:1: process.anvil.lifetime_jitter: must be at least 0 and below 1";
        assert!(err.iter().any(|e| e.to_string() == jitter), "{err:?}");
        let err = Config::parse_for("[process.queue]\nmax_use = 1\n", Path::new("m.toml"), false).unwrap_err();
        assert!(err[0].to_string().contains("max_use"), "{:?}", err);
        let err =
            Config::parse_for("[process.lmtp]\nsession_deadline = \"10s\"\n", Path::new("m.toml"), false).unwrap_err();
        assert!(
            err[0].to_string().starts_with("m.toml:2:1: process.lmtp.session_deadline: must be 0s or at least"),
            "{}",
            err[0]
        );
    }

    #[test]
    fn server_user_must_not_be_root() {
        let err = Config::parse("[server]\nuser = \"root\"\n", Path::new("m.toml")).unwrap_err();
        let expected = "m.toml:2:1: server.user: must name an unprivileged user: the daemons never run as root";
        assert_eq!(err[0].to_string(), expected);
        assert!(Config::parse("[server]\nuser = \"nobody\"\n", Path::new("m.toml")).is_ok());
    }

    #[test]
    fn bad_duration_is_explained() {
        let err = Config::parse("[smtpd]\ntimeout = \"soon\"\n", Path::new("m.toml")).unwrap_err();
        let msg = err[0].to_string();
        assert!(msg.starts_with("m.toml:2:11: smtpd.timeout: \"soon\" is not a duration"), "{msg}");
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
        assert_eq!(err[0].to_string(), "m.toml:2:1: smtpd.tls_cert_file: needs tls_key_file, and the other way round");
    }
}
