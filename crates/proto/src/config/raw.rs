//! `mortal.toml` as written: every key optional, every value as TOML gives
//! it (durations, networks and routes still strings, each with its span),
//! and the location of every key in the file.
//!
//! Only the parent module reads these types: it applies the defaults,
//! parses the strings and checks the rules, and hands out the resolved
//! [`super::Config`], which needs no `Option` where a default exists.

use super::{BareNewline, FilterStage, GreetAction, LogFormat, MilterDefaultAction, SmtpTlsSecurity, TlsSecurity};
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use toml::Spanned;

/// A string value still to be parsed (a duration, a network, a route),
/// with its place in the file for the error if it does not parse.
pub type Text = Spanned<String>;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    pub hostname: Option<String>,
    pub spool_dir: Option<PathBuf>,
    pub run_dir: Option<PathBuf>,
    pub accepted_domains: Option<Vec<String>>,
    pub user: Option<String>,
    pub trusted_networks: Option<Vec<Text>>,
    pub recipient_map: Option<PathBuf>,
    pub recipient_maps: Option<Vec<Text>>,
    pub virtual_alias_maps: Option<Vec<Text>>,
    pub table_timeout: Option<Text>,
    pub recipient_delimiter: Option<Text>,
    pub metrics_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    pub format: Option<LogFormat>,
    pub level: Option<String>,
    pub syslog_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Smtpd {
    pub listen: Option<Vec<SocketAddr>>,
    pub banner: Option<String>,
    pub message_size_limit: Option<u64>,
    pub recipient_limit: Option<u32>,
    pub timeout: Option<Text>,
    pub hard_error_limit: Option<u32>,
    pub soft_error_limit: Option<u32>,
    pub error_sleep: Option<Text>,
    pub min_data_rate: Option<u64>,
    pub data_rate_window: Option<Text>,
    pub bare_newline: Option<BareNewline>,
    pub smtputf8: Option<bool>,
    pub chunking: Option<bool>,
    pub dsn: Option<bool>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub tls_security: Option<TlsSecurity>,
    pub tls_handshake_timeout: Option<Text>,
    pub tls_sni: Vec<TlsSni>,
    pub proxy_listen: Option<Vec<SocketAddr>>,
    pub submission_listen: Option<Vec<SocketAddr>>,
    pub submissions_listen: Option<Vec<SocketAddr>>,
    pub proxy_trusted: Option<Vec<Text>>,
    pub proxy_timeout: Option<Text>,
    pub client_connection_count_limit: Option<u32>,
    pub client_connection_rate_limit: Option<u32>,
    pub client_message_rate_limit: Option<u32>,
    pub client_limit_exceptions: Option<Vec<Text>>,
    pub client_ipv4_prefix_length: Option<u8>,
    pub client_ipv6_prefix_length: Option<u8>,
    pub reverse_lookup: Option<bool>,
    pub reverse_lookup_timeout: Option<Text>,
    pub resolvers: Option<Vec<SocketAddr>>,
    pub milter: Vec<Milter>,
    pub milter_default_action: Option<MilterDefaultAction>,
    pub milter_connect_timeout: Option<Text>,
    pub milter_command_timeout: Option<Text>,
    pub milter_content_timeout: Option<Text>,
    pub milter_protocol: Option<u32>,
    pub milter_macros: MilterMacros,
    pub policy: Vec<PolicyService>,
    pub restrictions: Restrictions,
    pub dnsbl: Dnsbl,
    pub verify: Verify,
    pub auth: Auth,
    pub submission: Submission,
}

/// `[[smtpd.tls_sni]]`: every key is required.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSni {
    pub names: Vec<Text>,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// `[smtpd.auth]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    pub server: Option<Text>,
    pub timeout: Option<Text>,
    pub mx: Option<bool>,
    pub authenticated_header: Option<bool>,
    pub failure_limit: Option<u32>,
    pub response_limit: Option<usize>,
    pub sender_login_maps: Option<Vec<Text>>,
    pub user_message_rate_limit: Option<u32>,
    pub user_recipient_rate_limit: Option<u32>,
}

/// `[smtpd.submission]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Submission {
    pub restrictions: Restrictions,
}

/// `[smtpd.verify]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Verify {
    pub sender: Option<String>,
    pub positive_expire: Option<Text>,
    pub negative_expire: Option<Text>,
    pub negative_cache: Option<bool>,
    pub timeout: Option<Text>,
    pub reject_code: Option<u16>,
    pub cache_size: Option<usize>,
}

/// `[smtpd.restrictions]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Restrictions {
    pub delay_reject: Option<bool>,
    pub client: Option<Vec<Text>>,
    pub helo: Option<Vec<Text>>,
    pub sender: Option<Vec<Text>>,
    pub recipient: Option<Vec<Text>>,
    pub data: Option<Vec<Text>>,
    pub end_of_data: Option<Vec<Text>>,
    pub unknown_address_reject_code: Option<u16>,
    pub dns_timeout: Option<Text>,
}

/// `[smtpd.dnsbl]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Dnsbl {
    pub sites: Option<Vec<Text>>,
    pub threshold: Option<i32>,
    pub allowlist_threshold: Option<i32>,
    pub action: Option<super::DnsblAction>,
    pub timeout: Option<Text>,
}

/// `[[smtpd.milter]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Milter {
    pub endpoint: Text,
    pub default_action: Option<MilterDefaultAction>,
    pub connect_timeout: Option<Text>,
    pub command_timeout: Option<Text>,
    pub content_timeout: Option<Text>,
    pub protocol: Option<u32>,
}

/// `[smtpd.milter_macros]`: a list per stage replaces Postfix's default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MilterMacros {
    pub connect: Option<Vec<Text>>,
    pub helo: Option<Vec<Text>>,
    pub mail: Option<Vec<Text>>,
    pub rcpt: Option<Vec<Text>>,
    pub data: Option<Vec<Text>>,
    pub end_of_header: Option<Vec<Text>>,
    pub end_of_data: Option<Vec<Text>>,
    pub unknown_command: Option<Vec<Text>>,
}

/// `[[smtpd.policy]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyService {
    pub endpoint: Text,
    pub stages: Option<Vec<FilterStage>>,
    pub timeout: Option<Text>,
    pub max_idle: Option<Text>,
    pub max_ttl: Option<Text>,
    pub try_limit: Option<u32>,
    pub retry_delay: Option<Text>,
    pub default_action: Option<Text>,
    pub request_limit: Option<u32>,
    pub context: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Cleanup {
    pub ipc_timeout: Option<Text>,
    pub header_size_limit: Option<usize>,
    pub hopcount_limit: Option<usize>,
    pub edit_limit: Option<u32>,
    pub header_checks: Option<Vec<Text>>,
    pub body_checks: Option<Vec<Text>>,
    pub body_checks_size_limit: Option<usize>,
    pub checks_time_limit: Option<Text>,
    pub queue_minfree: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Queue {
    pub scan_interval: Option<Text>,
    pub minimal_backoff: Option<Text>,
    pub maximal_backoff: Option<Text>,
    pub delivery_concurrency: Option<u32>,
    pub active_limit: Option<u32>,
    pub destination_concurrency_limit: Option<u32>,
    pub queue_lifetime: Option<Text>,
    pub bounce_queue_lifetime: Option<Text>,
    pub delay_warning_time: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Delivery {
    pub transport: Option<Text>,
    /// Domains as written: the resolved map has them in lower case.
    pub routes: BTreeMap<String, Text>,
    pub maildir_root: Option<PathBuf>,
    pub pipe: Pipe,
    pub smtp_tls_security: Option<SmtpTlsSecurity>,
    pub smtp_tls_ca_file: Option<PathBuf>,
    pub connect_timeout: Option<Text>,
    pub command_timeout: Option<Text>,
    pub connection_reuse_time: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pipe {
    pub command: Option<Vec<String>>,
    pub user: Option<String>,
    pub timeout: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Anvil {
    pub rate_time_unit: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Postscreen {
    pub enabled: Option<bool>,
    pub greet_wait: Option<Text>,
    pub greet_action: Option<GreetAction>,
    pub greet_ttl: Option<Text>,
    pub cache_limit: Option<usize>,
    pub command_time_limit: Option<Text>,
    pub connection_limit: Option<u32>,
    pub client_connection_limit: Option<u32>,
}

/// `[process.<service>]`: one field per service, each resolved against
/// that service's own defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Processes {
    pub smtpd: ProcessPolicy,
    pub cleanup: ProcessPolicy,
    pub pipe: ProcessPolicy,
    pub lmtp: ProcessPolicy,
    pub smtp: ProcessPolicy,
    pub queue: SingleLife,
    pub anvil: SingleLife,
    pub postscreen: SingleLife,
}

/// `[process.queue]`, `[process.anvil]`, `[process.postscreen]`: a single
/// process's life only.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SingleLife {
    pub max_lifetime: Option<Text>,
    pub lifetime_jitter: Option<f64>,
    pub overdue_grace: Option<Text>,
    pub term_grace: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessPolicy {
    pub process_limit: Option<u32>,
    pub prefork: Option<u32>,
    pub min_spare: Option<u32>,
    pub max_spare: Option<u32>,
    pub max_use: Option<u32>,
    pub max_idle: Option<Text>,
    pub max_lifetime: Option<Text>,
    pub lifetime_jitter: Option<f64>,
    pub session_deadline: Option<Text>,
    pub overdue_grace: Option<Text>,
    pub term_grace: Option<Text>,
    pub overload_wait: Option<Text>,
    pub spawn: Option<super::SpawnMode>,
}

/// Where each key of the file is written: the byte span of the key
/// itself, by its path of table names (`["process", "smtpd", "prefork"]`),
/// whether the file spells it as a `[table]` header, a dotted key or an
/// inline table. Built by TOML's own parser, so it agrees with it on every
/// quoting and nesting rule.
#[derive(Debug, Default)]
pub struct KeySpans(pub BTreeMap<Vec<String>, Range<usize>>);

impl KeySpans {
    /// The keys of `text`; empty when `text` is not TOML (the parse error
    /// is reported by the typed pass).
    pub fn of(text: &str) -> KeySpans {
        let mut out = KeySpans::default();
        if let Ok(tree) = toml::from_str::<Node>(text) {
            tree.flatten(&mut Vec::new(), &mut out.0);
        }
        out
    }
}

/// A TOML value reduced to the spans of its keys.
#[derive(Debug, Default)]
struct Node(Vec<(Spanned<String>, Node)>);

impl Node {
    fn flatten(self, path: &mut Vec<String>, out: &mut BTreeMap<Vec<String>, Range<usize>>) {
        for (key, child) in self.0 {
            let span = key.span();
            path.push(key.into_inner());
            out.insert(path.clone(), span);
            child.flatten(path, out);
            path.pop();
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Node, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any TOML value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut keys = Vec::new();
        while let Some(key) = map.next_key::<Spanned<String>>()? {
            keys.push((key, map.next_value::<Node>()?));
        }
        Ok(Node(keys))
    }

    // An array's elements are named by their index (`milter`, `0`,
    // `endpoint` for `[[smtpd.milter]]`), placed at their first key;
    // elements that are no tables hold no key a rule can name.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(element) = seq.next_element::<Node>()? {
            if let Some(span) = element.0.first().map(|(k, _)| k.span()) {
                items.push((Spanned::new(span, items.len().to_string()), element));
            }
        }
        Ok(Node(items))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Node, E> {
        Ok(Node::default())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Node, E> {
        Ok(Node::default())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Node, E> {
        Ok(Node::default())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Node, E> {
        Ok(Node::default())
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Node, E> {
        Ok(Node::default())
    }
}
