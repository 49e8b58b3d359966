//! `[smtpd.restrictions]` and `[smtpd.dnsbl]`: Postfix's
//! `smtpd_*_restrictions` lists with `smtpd_delay_reject`, and
//! postscreen's weighted DNS block and allow lists
//! (`postscreen_dnsbl_sites`, `..._threshold`, `..._allowlist_threshold`,
//! `..._action`, `..._timeout`).

use super::{FilterStage, Resolver, raw};
use crate::dnsbl::DnsblSite;
use crate::restriction::Restriction;
use crate::smtp_status::ReplyCode;
use serde::Deserialize;
use std::time::Duration;

/// Postfix `unknown_address_reject_code`.
pub const DEFAULT_UNKNOWN_ADDRESS_REJECT_CODE: u16 = 450;
/// Longest wait for the DNS answers of one restriction
/// (`reject_unknown_sender_domain`: MX, then A and AAAA).
pub const DEFAULT_RESTRICTION_DNS_TIMEOUT: Duration = Duration::from_secs(10);
/// Postfix `postscreen_dnsbl_timeout`.
pub const DEFAULT_DNSBL_TIMEOUT: Duration = Duration::from_secs(10);
/// Postfix `postscreen_dnsbl_threshold`.
pub const DEFAULT_DNSBL_THRESHOLD: i32 = 1;
/// Most restrictions in one list: far beyond any real configuration.
pub const MAX_RESTRICTIONS: usize = 100;
/// Most `[smtpd.dnsbl] sites`: each is one DNS query per new client.
pub const MAX_DNSBL_SITES: usize = 32;

/// `[smtpd.restrictions]`: one list per stage, each empty by default (the
/// relay rule, the recipient tables and the policy servers apply anyway).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restrictions {
    /// Postfix `smtpd_delay_reject` (on by default): the client, HELO and
    /// sender lists are evaluated at each RCPT, not at their own stage,
    /// so a refusal names the recipient and clients that ignore
    /// refusals before RCPT cannot hide.
    pub delay_reject: bool,
    pub client: Vec<Restriction>,
    pub helo: Vec<Restriction>,
    pub sender: Vec<Restriction>,
    pub recipient: Vec<Restriction>,
    pub data: Vec<Restriction>,
    pub end_of_data: Vec<Restriction>,
    /// The code of `reject_unknown_sender_domain` and
    /// `reject_unknown_recipient_domain` when the domain does not exist
    /// (Postfix's default 450 keeps a DNS accident from bouncing mail).
    pub unknown_address_reject_code: ReplyCode,
    /// Longest wait for the DNS answers of one restriction; no answer in
    /// time defers (`reject_unknown_*_domain`) or counts as not listed
    /// (`reject_rbl_client`).
    pub dns_timeout: Duration,
}

impl Default for Restrictions {
    fn default() -> Self {
        Self {
            delay_reject: true,
            client: Vec::new(),
            helo: Vec::new(),
            sender: Vec::new(),
            recipient: Vec::new(),
            data: Vec::new(),
            end_of_data: Vec::new(),
            unknown_address_reject_code: ReplyCode::of(DEFAULT_UNKNOWN_ADDRESS_REJECT_CODE),
            dns_timeout: DEFAULT_RESTRICTION_DNS_TIMEOUT,
        }
    }
}

impl Restrictions {
    /// The list of `stage`, as written.
    pub fn list(&self, stage: FilterStage) -> &[Restriction] {
        match stage {
            FilterStage::Connect => &self.client,
            FilterStage::Helo => &self.helo,
            FilterStage::Mail => &self.sender,
            FilterStage::Rcpt => &self.recipient,
            FilterStage::Data => &self.data,
            FilterStage::EndOfMessage => &self.end_of_data,
        }
    }

    /// Whether any restriction asks the DNS.
    pub fn use_dns(&self) -> bool {
        self.all().any(Restriction::uses_dns)
    }

    /// Every restriction of every list.
    pub fn all(&self) -> impl Iterator<Item = &Restriction> {
        [&self.client, &self.helo, &self.sender, &self.recipient, &self.data, &self.end_of_data].into_iter().flatten()
    }

    /// The stage at which the list of `stage` is evaluated: RCPT for the
    /// client, HELO and sender lists under `delay_reject`.
    pub fn evaluated_at(&self, stage: FilterStage) -> FilterStage {
        match stage {
            FilterStage::Connect | FilterStage::Helo | FilterStage::Mail if self.delay_reject => FilterStage::Rcpt,
            other => other,
        }
    }
}

/// The key of the list of `stage`.
pub fn list_key(stage: FilterStage) -> &'static str {
    match stage {
        FilterStage::Connect => "client",
        FilterStage::Helo => "helo",
        FilterStage::Mail => "sender",
        FilterStage::Rcpt => "recipient",
        FilterStage::Data => "data",
        FilterStage::EndOfMessage => "end_of_data",
    }
}

/// Postfix `address_verify_positive_expire_time`.
pub const DEFAULT_VERIFY_POSITIVE_EXPIRE: Duration = Duration::from_secs(31 * 24 * 3600);
/// Postfix `address_verify_negative_expire_time`.
pub const DEFAULT_VERIFY_NEGATIVE_EXPIRE: Duration = Duration::from_secs(3 * 24 * 3600);
/// Longest wait for one probe (connect, greeting, LHLO/EHLO, MAIL, RCPT).
pub const DEFAULT_VERIFY_TIMEOUT: Duration = Duration::from_secs(10);
/// The refusal code for an address the probe found undeliverable.
/// Postfix's `unverified_recipient_reject_code` is 450 (a safety net while
/// an admin learns the feature); an MX that verifies wants the 550 that
/// stops backscatter, which `mortal check` does not question.
pub const DEFAULT_VERIFY_REJECT_CODE: u16 = 550;
/// Most addresses one smtpd process remembers.
pub const DEFAULT_VERIFY_CACHE_SIZE: usize = 10_000;

/// `[smtpd.verify]`: how `reject_unverified_recipient` probes (Postfix's
/// ADDRESS_VERIFICATION_README settings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verify {
    /// The probe's MAIL FROM; empty: `<>`. Default
    /// `double-bounce@<hostname>`, as Postfix's.
    pub sender: String,
    pub positive_expire: Duration,
    pub negative_expire: Duration,
    /// Whether refusals are remembered (off: every RCPT of an unknown
    /// address probes again).
    pub negative_cache: bool,
    pub timeout: Duration,
    pub reject_code: ReplyCode,
    pub cache_size: usize,
}

impl Verify {
    fn defaults(hostname: &str) -> Self {
        Self {
            sender: format!("double-bounce@{hostname}"),
            positive_expire: DEFAULT_VERIFY_POSITIVE_EXPIRE,
            negative_expire: DEFAULT_VERIFY_NEGATIVE_EXPIRE,
            negative_cache: true,
            timeout: DEFAULT_VERIFY_TIMEOUT,
            reject_code: ReplyCode::of(DEFAULT_VERIFY_REJECT_CODE),
            cache_size: DEFAULT_VERIFY_CACHE_SIZE,
        }
    }
}

impl Default for Verify {
    fn default() -> Self {
        Verify::defaults(&super::Server::default().hostname)
    }
}

/// What a DNSBL score at or above the threshold does (Postfix
/// `postscreen_dnsbl_action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DnsblAction {
    /// Log it, and carry on.
    Ignore,
    /// Refuse every RCPT with `550 5.7.1 Service unavailable; client
    /// [addr] blocked using SITE` (the client may still say QUIT; the
    /// refusals are logged as fail2ban expects).
    Enforce,
    /// Decide before the greeting: `521 5.7.1` and the connection ends.
    Drop,
}

/// `[smtpd.dnsbl]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dnsbl {
    /// `domain[=filter][*weight]`, queried in parallel for each client.
    pub sites: Vec<DnsblSite>,
    /// A combined score at or above this blocks the client.
    pub threshold: i32,
    /// When negative: a client scoring at or below it is allowlisted and
    /// skips the client restrictions (as if they started with `permit`).
    /// 0 (the default): no allowlisting.
    pub allowlist_threshold: i32,
    pub action: DnsblAction,
    /// Longest wait for all the answers; a list that has not answered by
    /// then counts as not listing the client.
    pub timeout: Duration,
}

impl Default for Dnsbl {
    fn default() -> Self {
        Self {
            sites: Vec::new(),
            threshold: DEFAULT_DNSBL_THRESHOLD,
            allowlist_threshold: 0,
            action: DnsblAction::Enforce,
            timeout: DEFAULT_DNSBL_TIMEOUT,
        }
    }
}

impl Dnsbl {
    /// Whether clients are screened at all (with `ignore`, only logged).
    pub fn enabled(&self) -> bool {
        !self.sites.is_empty()
    }
}

impl Resolver<'_> {
    /// Rules between the lists and the rest of `[smtpd]`.
    pub(super) fn restriction_rules(&mut self, smtpd: &super::Smtpd) {
        let sections = [
            ("smtpd.restrictions", &smtpd.restrictions, smtpd.auth.offered_on(super::ListenerRole::Mx)),
            ("smtpd.submission.restrictions", &smtpd.submission.restrictions, smtpd.auth.server.is_some()),
        ];
        for (section, r, auth) in sections {
            self.list_rules(smtpd, section, r, auth);
        }
    }

    fn list_rules(&mut self, smtpd: &super::Smtpd, section: &str, r: &Restrictions, auth: bool) {
        for stage in FilterStage::ALL {
            let key = list_key(stage);
            let list = r.list(stage);
            if list.contains(&Restriction::RejectUnknownClientHostname) && !smtpd.reverse_lookup {
                self.problems.push((
                    section.into(),
                    key.into(),
                    "reject_unknown_client_hostname needs [smtpd] reverse_lookup = true: \
                     without it every client is unknown"
                        .into(),
                ));
            }
            if list.contains(&Restriction::CheckPolicyService)
                && !smtpd.policy.iter().any(|p| p.stages.contains(&stage))
            {
                self.problems.push((
                    section.into(),
                    key.into(),
                    format!("check_policy_service: no [[smtpd.policy]] has {stage:?} in its stages"),
                ));
            }
            if !auth && list.iter().any(Restriction::needs_auth) {
                self.problems.push((
                    section.into(),
                    key.into(),
                    "permit_sasl_authenticated and reject_sender_login_mismatch need AUTH on these \
                     listeners ([smtpd.auth] server, and mx = true for the port 25 lists)"
                        .into(),
                ));
            }
            if list.contains(&Restriction::RejectSenderLoginMismatch) && smtpd.auth.sender_login_maps.is_empty() {
                self.problems.push((
                    section.into(),
                    key.into(),
                    "reject_sender_login_mismatch needs [smtpd.auth] sender_login_maps".into(),
                ));
            }
            if list.iter().filter(|x| **x == Restriction::CheckPolicyService).count() > 1 {
                self.problems.push((
                    section.into(),
                    key.into(),
                    "names check_policy_service twice: the servers would be asked twice".into(),
                ));
            }
        }
    }

    /// The lists of `section` (`smtpd.restrictions`,
    /// `smtpd.submission.restrictions`).
    pub(super) fn restrictions(&mut self, raw: raw::Restrictions, section: &str) -> Restrictions {
        let d = Restrictions::default();
        let mut list = |name: &str, value: Option<Vec<raw::Text>>| -> Vec<Restriction> {
            let key = format!("{section}.{name}");
            let items = value.unwrap_or_default();
            if items.len() > MAX_RESTRICTIONS {
                self.problems.push((
                    section.into(),
                    name.into(),
                    format!("has {} restrictions, more than {MAX_RESTRICTIONS}", items.len()),
                ));
            }
            let mut out = Vec::new();
            for item in items {
                match item.get_ref().parse::<Restriction>() {
                    Ok(r) => out.push(r.relative_to(self.base)),
                    Err(e) => self.value_error(&key, item.span(), e),
                }
            }
            out
        };
        let client = list("client", raw.client);
        let helo = list("helo", raw.helo);
        let sender = list("sender", raw.sender);
        let recipient = list("recipient", raw.recipient);
        let data = list("data", raw.data);
        let end_of_data = list("end_of_data", raw.end_of_data);
        let code = raw.unknown_address_reject_code.unwrap_or(DEFAULT_UNKNOWN_ADDRESS_REJECT_CODE);
        if !(400..600).contains(&code) {
            self.problems.push((
                section.into(),
                "unknown_address_reject_code".into(),
                format!("{code} is not a 4xx or 5xx reply code"),
            ));
        }
        Restrictions {
            delay_reject: raw.delay_reject.unwrap_or(d.delay_reject),
            client,
            helo,
            sender,
            recipient,
            data,
            end_of_data,
            unknown_address_reject_code: if (400..600).contains(&code) {
                ReplyCode::of(code)
            } else {
                d.unknown_address_reject_code
            },
            dns_timeout: self.duration(&format!("{section}.dns_timeout"), raw.dns_timeout, d.dns_timeout),
        }
    }

    pub(super) fn verify(&mut self, raw: raw::Verify, hostname: &str) -> Verify {
        let d = Verify::defaults(hostname);
        let code = raw.reject_code.unwrap_or(DEFAULT_VERIFY_REJECT_CODE);
        if !(400..600).contains(&code) {
            self.problems.push((
                "smtpd.verify".into(),
                "reject_code".into(),
                format!("{code} is not a 4xx or 5xx reply code"),
            ));
        }
        let sender = raw.sender.unwrap_or(d.sender);
        if !sender.is_empty() && crate::address::parse_mailbox(&sender, false).is_err() {
            self.problems.push(("smtpd.verify".into(), "sender".into(), format!("{sender:?} is not an address")));
        }
        Verify {
            sender,
            positive_expire: self.duration("smtpd.verify.positive_expire", raw.positive_expire, d.positive_expire),
            negative_expire: self.duration("smtpd.verify.negative_expire", raw.negative_expire, d.negative_expire),
            negative_cache: raw.negative_cache.unwrap_or(d.negative_cache),
            timeout: self.duration("smtpd.verify.timeout", raw.timeout, d.timeout),
            reject_code: if (400..600).contains(&code) { ReplyCode::of(code) } else { d.reject_code },
            cache_size: raw.cache_size.unwrap_or(d.cache_size),
        }
    }

    pub(super) fn dnsbl(&mut self, raw: raw::Dnsbl) -> Dnsbl {
        let d = Dnsbl::default();
        let mut sites = Vec::new();
        for item in raw.sites.unwrap_or_default() {
            match item.get_ref().parse::<DnsblSite>() {
                Ok(site) => sites.push(site),
                Err(e) => self.value_error("smtpd.dnsbl.sites", item.span(), format!("{:?}: {e}", item.get_ref())),
            }
        }
        if sites.len() > MAX_DNSBL_SITES {
            self.problems.push((
                "smtpd.dnsbl".into(),
                "sites".into(),
                format!("has {} sites, more than {MAX_DNSBL_SITES}", sites.len()),
            ));
        }
        let threshold = raw.threshold.unwrap_or(d.threshold);
        if threshold < 1 {
            self.problems.push((
                "smtpd.dnsbl".into(),
                "threshold".into(),
                format!("{threshold} would block clients no list names: it must be at least 1"),
            ));
        }
        let allowlist_threshold = raw.allowlist_threshold.unwrap_or(d.allowlist_threshold);
        if allowlist_threshold > 0 {
            self.problems.push((
                "smtpd.dnsbl".into(),
                "allowlist_threshold".into(),
                format!("{allowlist_threshold} would allowlist listed clients: it must be 0 (off) or negative"),
            ));
        }
        Dnsbl {
            sites,
            threshold,
            allowlist_threshold,
            action: raw.action.unwrap_or(d.action),
            timeout: self.duration("smtpd.dnsbl.timeout", raw.timeout, d.timeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse_for(text, Path::new("/etc/mortal/mortal.toml"), false)
            .map_err(|e| e.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))
    }

    #[test]
    fn lists_parse_with_postfix_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.smtpd.restrictions, Restrictions::default());
        assert!(c.smtpd.restrictions.delay_reject && !c.smtpd.dnsbl.enabled() && !c.smtpd.uses_dns());
        let c = parse(
            "[smtpd.restrictions]\nclient = [\"permit_mynetworks\", \"check_client_access cidr:clients.cidr\"]\n\
             sender = [\"reject_unknown_sender_domain\"]\ndelay_reject = false\n",
        )
        .unwrap();
        let r = &c.smtpd.restrictions;
        assert_eq!(
            r.client[1],
            Restriction::CheckClientAccess(crate::table::TableSpec::Cidr("/etc/mortal/clients.cidr".into())),
            "relative to the file"
        );
        assert_eq!(r.evaluated_at(FilterStage::Connect), FilterStage::Connect);
        assert!(c.smtpd.uses_dns(), "reject_unknown_sender_domain asks the DNS");
        let c = parse("[smtpd.restrictions]\nhelo = [\"reject_non_fqdn_helo_hostname\"]\n").unwrap();
        assert_eq!(c.smtpd.restrictions.evaluated_at(FilterStage::Helo), FilterStage::Rcpt, "delay_reject");
    }

    #[test]
    fn dnsbl_parses_postscreen_sites() {
        let c = parse(
            "[smtpd.dnsbl]\nsites = [\"zen.example*3\", \"list.example=127.0.0.[2..11]*2\", \"wl.example*-2\"]\n\
             threshold = 3\nallowlist_threshold = -1\naction = \"drop\"\ntimeout = \"5s\"\n",
        )
        .unwrap();
        let d = &c.smtpd.dnsbl;
        assert_eq!(d.sites.len(), 3);
        assert_eq!((d.sites[2].weight, d.threshold, d.allowlist_threshold), (-2, 3, -1));
        assert_eq!((d.action, d.timeout), (DnsblAction::Drop, Duration::from_secs(5)));
        assert!(c.smtpd.uses_dns());
    }

    /// The sandboxes widen by exactly the inet ports of remote tables.
    #[test]
    fn remote_table_ports_are_known_per_process() {
        let c = parse(
            "[server]\nrecipient_maps = [\"socketmap:inet:127.0.0.1:8780:users\", \"texthash:users\"]\n\
             virtual_alias_maps = [\"tcp:127.0.0.1:8781\", \"socketmap:unix:/run/m/private/sm:virtual\"]\n\
             [smtpd.restrictions]\nsender = [\"check_sender_access tcp:[::1]:8782\"]\n\
             [cleanup]\nheader_checks = [\"regexp:checks\"]\n",
        )
        .unwrap();
        assert_eq!(c.smtpd_table_ports(), [8780, 8781, 8782]);
        assert_eq!(c.cleanup_table_ports(), [8781]);
        assert!(parse("[server]\nrecipient_maps = [\"tcp:localhost:99\"]\n").unwrap_err().contains("tcp:IP:PORT"));
    }

    #[test]
    fn mistakes_are_named_at_their_key() {
        for (text, want) in [
            ("[smtpd.restrictions]\nclient = [\"reject_evrything\"]\n", "smtpd.restrictions.client"),
            ("[smtpd.restrictions]\nrecipient = [\"check_recipient_access\"]\n", "needs a table"),
            ("[smtpd.restrictions]\nclient = [\"reject_unknown_client_hostname\"]\n", "reverse_lookup"),
            ("[smtpd.restrictions]\nrecipient = [\"check_policy_service\"]\n", "no [[smtpd.policy]]"),
            ("[smtpd.restrictions]\nunknown_address_reject_code = 250\n", "not a 4xx or 5xx"),
            ("[smtpd.dnsbl]\nsites = [\"zen.example*x\"]\n", "smtpd.dnsbl.sites"),
            ("[smtpd.dnsbl]\nsites = [\"zen.example\"]\nthreshold = 0\n", "at least 1"),
            ("[smtpd.dnsbl]\nallowlist_threshold = 2\n", "0 (off) or negative"),
            ("[smtpd.dnsbl]\naction = \"maybe\"\n", "expected one of `ignore`, `enforce`, `drop`"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
    }
}
