//! `[[smtpd.milter]]`, `[smtpd.milter_macros]` and `[[smtpd.policy]]`:
//! the content filters (Sendmail milters) and policy servers smtpd asks,
//! with Postfix's defaults (`smtpd_milters`, `milter_*`,
//! `check_policy_service`, `smtpd_policy_service_*`).

use super::{NextHop, Resolver, raw};
use crate::milter::{MacroLists, MacroName, Stage as MilterStage};
use crate::policy::{self, Action};
use serde::Deserialize;
use std::fmt;
use std::time::Duration;

/// Postfix `milter_connect_timeout`.
pub const DEFAULT_MILTER_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Postfix `milter_command_timeout`.
pub const DEFAULT_MILTER_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Postfix `milter_content_timeout`.
pub const DEFAULT_MILTER_CONTENT_TIMEOUT: Duration = Duration::from_secs(300);
/// Postfix `smtpd_policy_service_timeout`.
pub const DEFAULT_POLICY_TIMEOUT: Duration = Duration::from_secs(100);
/// Postfix `smtpd_policy_service_max_idle`.
pub const DEFAULT_POLICY_MAX_IDLE: Duration = Duration::from_secs(300);
/// Postfix `smtpd_policy_service_max_ttl`.
pub const DEFAULT_POLICY_MAX_TTL: Duration = Duration::from_secs(1000);
/// Postfix `smtpd_policy_service_try_limit`.
pub const DEFAULT_POLICY_TRY_LIMIT: u32 = 2;
/// Postfix `smtpd_policy_service_retry_delay`.
pub const DEFAULT_POLICY_RETRY_DELAY: Duration = Duration::from_secs(1);
/// Postfix `smtpd_policy_service_default_action`.
pub const DEFAULT_POLICY_DEFAULT_ACTION: &str = "451 4.3.5 Server configuration problem";

/// What happens to a message when a milter cannot be used (down, too slow,
/// speaking garbage): Postfix `milter_default_action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MilterDefaultAction {
    /// `451 4.7.1 Service unavailable - try again later` for the
    /// transaction (the default): nothing unchecked gets through.
    Tempfail,
    /// Carry on as if the milter did not exist.
    Accept,
    /// `550 5.7.1 Command rejected`.
    Reject,
    /// Accept, and park the message in `hold/`.
    Quarantine,
}

impl fmt::Display for MilterDefaultAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MilterDefaultAction::Tempfail => "tempfail",
            MilterDefaultAction::Accept => "accept",
            MilterDefaultAction::Reject => "reject",
            MilterDefaultAction::Quarantine => "quarantine",
        })
    }
}

/// One `[[smtpd.milter]]`: a Sendmail milter, asked in the order the
/// file lists them (the order matters: OpenDMARC reads what OpenDKIM
/// added).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Milter {
    /// `unix:/path` or `inet:IP:PORT`.
    pub endpoint: NextHop,
    /// Longest wait to connect and negotiate.
    pub connect_timeout: Duration,
    /// Longest wait for the answer to an SMTP-stage event.
    pub command_timeout: Duration,
    /// Longest wait for the answer to a content event (a header, a body
    /// chunk, the end of the message).
    pub content_timeout: Duration,
    pub default_action: MilterDefaultAction,
    /// The milter protocol version offered (2 to 6; Postfix
    /// `milter_protocol`).
    pub protocol: u32,
}

/// A stage at which a policy server is asked (Postfix's restriction
/// lists: `smtpd_client_restrictions` ... `smtpd_end_of_data_restrictions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FilterStage {
    /// When the client connects, before the greeting.
    Connect,
    /// HELO or EHLO.
    Helo,
    /// MAIL FROM.
    Mail,
    /// Each RCPT TO (the default, as Postfix's `check_policy_service`
    /// in `smtpd_recipient_restrictions`).
    Rcpt,
    /// DATA, or the first BDAT.
    Data,
    /// The end of the message content, before cleanup's answer.
    EndOfMessage,
}

impl FilterStage {
    /// Every stage, in the order of the dialogue (and of Postfix's
    /// restriction lists).
    pub const ALL: [FilterStage; 6] = [
        FilterStage::Connect,
        FilterStage::Helo,
        FilterStage::Mail,
        FilterStage::Rcpt,
        FilterStage::Data,
        FilterStage::EndOfMessage,
    ];

    /// The `protocol_state` a query at this stage carries (HELO and EHLO
    /// are told apart by the caller).
    pub fn protocol_state(self, esmtp: bool) -> policy::Stage {
        match self {
            FilterStage::Connect => policy::Stage::Connect,
            FilterStage::Helo if esmtp => policy::Stage::Ehlo,
            FilterStage::Helo => policy::Stage::Helo,
            FilterStage::Mail => policy::Stage::Mail,
            FilterStage::Rcpt => policy::Stage::Rcpt,
            FilterStage::Data => policy::Stage::Data,
            FilterStage::EndOfMessage => policy::Stage::EndOfMessage,
        }
    }
}

/// One `[[smtpd.policy]]`: a policy delegation server (postgrey,
/// policyd-spf, a rate limiter), asked at `stages` in the order the file
/// lists the servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyService {
    /// `unix:/path` or `inet:IP:PORT`.
    pub endpoint: NextHop,
    /// Where it is asked; each stage at most once.
    pub stages: Vec<FilterStage>,
    /// Longest time for one query: connect, write and read (Postfix
    /// `smtpd_policy_service_timeout`).
    pub timeout: Duration,
    /// An idle connection is closed after this long (`..._max_idle`).
    pub max_idle: Duration,
    /// A connection is not reused once this old (`..._max_ttl`).
    pub max_ttl: Duration,
    /// Attempts per query before the default action (`..._try_limit`).
    pub try_limit: u32,
    /// Pause between attempts (`..._retry_delay`).
    pub retry_delay: Duration,
    /// What a query that fails gets (`..._default_action`): an access(5)
    /// action, `451 4.3.5 Server configuration problem` by default.
    pub default_action: Action,
    /// Queries per connection before it is closed; 0: no limit
    /// (`..._request_limit`).
    pub request_limit: u32,
    /// `policy_context` sent with every query (`..._policy_context`).
    pub context: String,
}

impl PolicyService {
    /// A service at `endpoint` with Postfix's defaults, asked at RCPT.
    pub fn new(endpoint: NextHop) -> Self {
        Self {
            endpoint,
            stages: vec![FilterStage::Rcpt],
            timeout: DEFAULT_POLICY_TIMEOUT,
            max_idle: DEFAULT_POLICY_MAX_IDLE,
            max_ttl: DEFAULT_POLICY_MAX_TTL,
            try_limit: DEFAULT_POLICY_TRY_LIMIT,
            retry_delay: DEFAULT_POLICY_RETRY_DELAY,
            default_action: Action::parse(DEFAULT_POLICY_DEFAULT_ACTION).expect("the default action parses"),
            request_limit: 0,
            context: String::new(),
        }
    }
}

/// The milter stage each `[smtpd.milter_macros]` key names.
const MACRO_KEYS: [(&str, MilterStage); 8] = [
    ("connect", MilterStage::Connect),
    ("helo", MilterStage::Helo),
    ("mail", MilterStage::Mail),
    ("rcpt", MilterStage::Rcpt),
    ("data", MilterStage::Data),
    ("end_of_header", MilterStage::EndOfHeaders),
    ("end_of_data", MilterStage::EndOfMessage),
    ("unknown_command", MilterStage::Unknown),
];

impl Resolver<'_> {
    /// An endpoint; relative socket paths are relative to the file.
    pub(super) fn endpoint(&mut self, key: &str, value: raw::Text) -> NextHop {
        match value.get_ref().parse::<NextHop>() {
            Ok(NextHop::Unix(p)) => NextHop::Unix(self.base.join(p)),
            Ok(hop) => hop,
            Err(e) => {
                self.value_error(key, value.span(), e);
                NextHop::Unix(Default::default())
            }
        }
    }

    pub(super) fn milters(&mut self, smtpd: &mut raw::Smtpd) -> Vec<Milter> {
        let default_action = smtpd.milter_default_action.unwrap_or(MilterDefaultAction::Tempfail);
        let connect = self.duration(
            "smtpd.milter_connect_timeout",
            smtpd.milter_connect_timeout.take(),
            DEFAULT_MILTER_CONNECT_TIMEOUT,
        );
        let command = self.duration(
            "smtpd.milter_command_timeout",
            smtpd.milter_command_timeout.take(),
            DEFAULT_MILTER_COMMAND_TIMEOUT,
        );
        let content = self.duration(
            "smtpd.milter_content_timeout",
            smtpd.milter_content_timeout.take(),
            DEFAULT_MILTER_CONTENT_TIMEOUT,
        );
        let protocol = smtpd.milter_protocol.unwrap_or(crate::milter::PROTOCOL_VERSION);
        let mut out = Vec::new();
        for (i, m) in std::mem::take(&mut smtpd.milter).into_iter().enumerate() {
            let key = |k: &str| format!("smtpd.milter[{i}].{k}");
            let endpoint = self.endpoint(&key("endpoint"), m.endpoint);
            let protocol = m.protocol.unwrap_or(protocol);
            if !(crate::milter::MIN_PROTOCOL_VERSION..=crate::milter::PROTOCOL_VERSION).contains(&protocol) {
                self.problems.push((
                    format!("smtpd.milter[{i}]"),
                    "protocol".into(),
                    format!(
                        "{protocol} is not a milter protocol version mortal speaks ({} to {})",
                        crate::milter::MIN_PROTOCOL_VERSION,
                        crate::milter::PROTOCOL_VERSION
                    ),
                ));
            }
            out.push(Milter {
                endpoint,
                connect_timeout: self.duration(&key("connect_timeout"), m.connect_timeout, connect),
                command_timeout: self.duration(&key("command_timeout"), m.command_timeout, command),
                content_timeout: self.duration(&key("content_timeout"), m.content_timeout, content),
                default_action: m.default_action.unwrap_or(default_action),
                protocol,
            });
        }
        out
    }

    pub(super) fn milter_macros(&mut self, raw: raw::MilterMacros) -> MacroLists {
        let mut lists = MacroLists::default();
        let given = [
            raw.connect,
            raw.helo,
            raw.mail,
            raw.rcpt,
            raw.data,
            raw.end_of_header,
            raw.end_of_data,
            raw.unknown_command,
        ];
        for ((key, stage), names) in MACRO_KEYS.into_iter().zip(given) {
            let Some(names) = names else { continue };
            let mut parsed = Vec::with_capacity(names.len());
            for name in names {
                match MacroName::new(name.get_ref()) {
                    Ok(n) => parsed.push(n),
                    Err(_) => self.value_error(
                        &format!("smtpd.milter_macros.{key}"),
                        name.span(),
                        format!("{:?} is not a macro name like \"i\" or \"{{client_addr}}\"", name.get_ref()),
                    ),
                }
            }
            lists.set(stage, parsed);
        }
        lists
    }

    pub(super) fn policy_services(&mut self, list: Vec<raw::PolicyService>) -> Vec<PolicyService> {
        let mut out = Vec::new();
        for (i, p) in list.into_iter().enumerate() {
            let key = |k: &str| format!("smtpd.policy[{i}].{k}");
            let mut service = PolicyService::new(self.endpoint(&key("endpoint"), p.endpoint));
            if let Some(stages) = p.stages {
                if stages.is_empty() {
                    self.problems.push((
                        format!("smtpd.policy[{i}]"),
                        "stages".into(),
                        "is empty: the server would never be asked".into(),
                    ));
                }
                let mut seen = Vec::new();
                for stage in stages {
                    if seen.contains(&stage) {
                        self.problems.push((
                            format!("smtpd.policy[{i}]"),
                            "stages".into(),
                            format!("names {stage:?} twice"),
                        ));
                    } else {
                        seen.push(stage);
                    }
                }
                service.stages = seen;
            }
            service.timeout = self.duration(&key("timeout"), p.timeout, service.timeout);
            service.max_idle = self.duration(&key("max_idle"), p.max_idle, service.max_idle);
            service.max_ttl = self.duration(&key("max_ttl"), p.max_ttl, service.max_ttl);
            service.retry_delay = self.duration(&key("retry_delay"), p.retry_delay, service.retry_delay);
            service.try_limit = p.try_limit.unwrap_or(service.try_limit);
            if service.try_limit == 0 {
                self.problems.push((
                    format!("smtpd.policy[{i}]"),
                    "try_limit".into(),
                    "must be at least 1: 0 would never ask the server".into(),
                ));
            }
            service.request_limit = p.request_limit.unwrap_or(service.request_limit);
            service.context = p.context.unwrap_or_default();
            if service.context.contains(['\n', '\r', '\0']) {
                self.problems.push((format!("smtpd.policy[{i}]"), "context".into(), "must be one line of text".into()));
            }
            if let Some(action) = p.default_action {
                match Action::parse(action.get_ref()) {
                    Ok(Action::Unsupported(what)) => self.value_error(
                        &key("default_action"),
                        action.span(),
                        format!("{what:?} is not an access(5) action mortal carries out"),
                    ),
                    Ok(a) => service.default_action = a,
                    Err(e) => self.value_error(&key("default_action"), action.span(), format!("{e}")),
                }
            }
            out.push(service);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::{Path, PathBuf};

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse_for(text, Path::new("/etc/mortal/mortal.toml"), false)
            .map_err(|e| e.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))
    }

    #[test]
    fn no_filters_by_default() {
        let c = parse("").unwrap();
        assert!(c.smtpd.milters.is_empty());
        assert!(c.smtpd.policy.is_empty());
        assert_eq!(c.smtpd.milter_macros, MacroLists::default());
    }

    /// Postfix's defaults, the global keys, per-milter overrides, order
    /// kept, relative socket paths from the file's directory.
    #[test]
    fn milters_resolve_with_postfix_defaults() {
        let c = parse(
            "[smtpd]\nmilter_command_timeout = \"10s\"\nmilter_default_action = \"accept\"\n\
             [[smtpd.milter]]\nendpoint = \"inet:127.0.0.1:11332\"\n\
             [[smtpd.milter]]\nendpoint = \"unix:run/opendkim.sock\"\ndefault_action = \"quarantine\"\n\
             content_timeout = \"1m\"\nprotocol = 4\n",
        )
        .unwrap();
        assert_eq!(
            c.smtpd.milters,
            [
                Milter {
                    endpoint: NextHop::Inet("127.0.0.1:11332".parse().unwrap()),
                    connect_timeout: Duration::from_secs(30),
                    command_timeout: Duration::from_secs(10),
                    content_timeout: Duration::from_secs(300),
                    default_action: MilterDefaultAction::Accept,
                    protocol: 6,
                },
                Milter {
                    endpoint: NextHop::Unix(PathBuf::from("/etc/mortal/run/opendkim.sock")),
                    connect_timeout: Duration::from_secs(30),
                    command_timeout: Duration::from_secs(10),
                    content_timeout: Duration::from_secs(60),
                    default_action: MilterDefaultAction::Quarantine,
                    protocol: 4,
                },
            ]
        );
    }

    #[test]
    fn bad_milter_settings_are_located() {
        let e = parse("[[smtpd.milter]]\nendpoint = \"tcp:1.2.3.4:5\"\n").unwrap_err();
        assert!(e.starts_with("/etc/mortal/mortal.toml:2:12: smtpd.milter[0].endpoint: "), "{e}");
        let e = parse("[[smtpd.milter]]\nendpoint = \"inet:localhost:11332\"\n").unwrap_err();
        assert!(e.contains("literal IP:PORT"), "{e}");
        let e = parse("[[smtpd.milter]]\nendpoint = \"inet:127.0.0.1:1\"\nprotocol = 7\n").unwrap_err();
        assert!(e.contains("smtpd.milter[0]") && e.contains("protocol") && e.contains("2 to 6"), "{e}");
        let e = parse("[[smtpd.milter]]\nendpoint = \"inet:127.0.0.1:1\"\ndefault_action = \"pass\"\n").unwrap_err();
        assert!(e.contains(":3:18: ") && e.contains("expected one of `tempfail`"), "{e}");
        let e = parse("[[smtpd.milter]]\nendpoint = \"inet:127.0.0.1:1\"\nflavour = 1\n").unwrap_err();
        assert!(e.contains("flavour"), "{e}");
    }

    #[test]
    fn macro_lists_replace_postfix_defaults_per_stage() {
        let c = parse("[smtpd.milter_macros]\nconnect = [\"j\", \"{client_addr}\"]\nend_of_data = []\n").unwrap();
        let names = |s| c.smtpd.milter_macros.names(s).iter().map(MacroName::as_str).collect::<Vec<_>>();
        assert_eq!(names(MilterStage::Connect), ["j", "{client_addr}"]);
        assert!(names(MilterStage::EndOfMessage).is_empty());
        assert_eq!(names(MilterStage::Rcpt), ["i", "{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}"]);
        let e = parse("[smtpd.milter_macros]\nhelo = [\"{bad name}\"]\n").unwrap_err();
        assert!(e.starts_with("/etc/mortal/mortal.toml:2:9: smtpd.milter_macros.helo: "), "{e}");
    }

    #[test]
    fn policy_services_resolve_with_postfix_defaults() {
        let c = parse(
            "[[smtpd.policy]]\nendpoint = \"inet:127.0.0.1:10023\"\n\
             [[smtpd.policy]]\nendpoint = \"unix:/run/policyd-spf.sock\"\nstages = [\"mail\", \"end_of_message\"]\n\
             timeout = \"5s\"\ndefault_action = \"DUNNO\"\ncontext = \"spf\"\ntry_limit = 1\n",
        )
        .unwrap();
        let mut postgrey = PolicyService::new(NextHop::Inet("127.0.0.1:10023".parse().unwrap()));
        assert_eq!(c.smtpd.policy[0], postgrey);
        assert_eq!(postgrey.default_action, Action::parse("451 4.3.5 Server configuration problem").unwrap());
        assert_eq!(
            (postgrey.timeout, postgrey.max_idle, postgrey.max_ttl),
            (Duration::from_secs(100), Duration::from_secs(300), Duration::from_secs(1000))
        );
        postgrey.endpoint = NextHop::Unix(PathBuf::from("/run/policyd-spf.sock"));
        postgrey.stages = vec![FilterStage::Mail, FilterStage::EndOfMessage];
        postgrey.timeout = Duration::from_secs(5);
        postgrey.default_action = Action::Dunno;
        postgrey.context = "spf".into();
        postgrey.try_limit = 1;
        assert_eq!(c.smtpd.policy[1], postgrey);
    }

    #[test]
    fn bad_policy_settings_are_refused() {
        for (text, expect) in [
            ("stages = []", "never be asked"),
            ("stages = [\"rcpt\", \"rcpt\"]", "twice"),
            ("stages = [\"quit\"]", "unknown variant"),
            ("try_limit = 0", "at least 1"),
            ("default_action = \"FILTER smtp:[10.0.0.1]\"", "not an access(5) action"),
            ("default_action = \"299 fine\"", "bad reply code"),
            ("context = \"a\\nb\"", "one line"),
        ] {
            let e = parse(&format!("[[smtpd.policy]]\nendpoint = \"inet:127.0.0.1:10023\"\n{text}\n")).unwrap_err();
            assert!(e.contains(expect), "{text}: {e}");
        }
    }
}
