//! `[smtpd.restrictions]`: Postfix's restriction lists, evaluated where
//! the engine stops for its filters. Each list is a round of access(5)
//! actions ([`PolicyRound`]): the first restriction with an opinion ends
//! it, `permit`/OK permits, and DEFER_IF_PERMIT and DEFER_IF_REJECT
//! soften what comes after. Every restriction names what it refuses the
//! way Postfix does (`<name>: Sender address rejected: ...`), whatever
//! list it stands in, so the log lines are those fail2ban and pflogsumm
//! know.
//!
//! The tables are loaded once per process ([`Restrictor::load`]), before
//! the sandbox; the DNS checks (`reject_unknown_*_domain`,
//! `reject_rbl_client`, `permit_dnswl_client`) ask the nameservers of
//! `[smtpd] resolvers`, each answer bounded by the configured timeouts.
//! A table or DNS answer smtpd cannot use (a result that is no access(5)
//! action) is a `451 4.3.5 Server configuration error`, never an accept.

use super::verdict::{CheckStage, Decision, FilterReply, PolicyRound};
use crate::dnsbl::Dnsbl;
use crate::engine::{Facts, UNKNOWN_NAME};
use crate::mailhost::{DomainResolver, DomainStatus};
use crate::verify::{Probe, Verifier};
use mortal_proto::config::{Config, FilterStage};
use mortal_proto::policy::Action;
use mortal_proto::restriction::Restriction;
use mortal_proto::smtp_status::{EnhancedStatus, ReplyCode, StatusClass};
use mortal_proto::table::{LookupError, Table, TableError, TableSpec};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

/// What a process needs to evaluate its restriction lists: the tables
/// they name, loaded, and the resolvers of the DNS checks.
#[derive(Default)]
pub struct Restrictor {
    tables: Vec<(TableSpec, Table)>,
    domains: Option<DomainResolver>,
    dnsbl: Option<Arc<Dnsbl>>,
    /// `reject_unverified_recipient`'s probes and cache.
    verifier: Option<Verifier>,
}

impl std::fmt::Debug for Restrictor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Restrictor").field("tables", &self.tables.len()).finish_non_exhaustive()
    }
}

impl Restrictor {
    /// Loads every table the lists name (each once). Call before the
    /// sandbox: smtpd reads no file afterwards.
    pub fn load(config: &Config) -> Result<Restrictor, TableError> {
        let mut tables: Vec<(TableSpec, Table)> = Vec::new();
        // Both listeners' lists: a process learns its listener's role
        // after loading (see `Config::for_role`).
        let lists = config.smtpd.restrictions.all().chain(config.smtpd.submission.restrictions.all());
        let login_maps = config.smtpd.auth.sender_login_maps.iter();
        for spec in lists.filter_map(Restriction::table).chain(login_maps) {
            if !tables.iter().any(|(s, _)| s == spec) {
                tables.push((spec.clone(), Table::load_with(spec, config.server.table_timeout)?));
            }
        }
        let verifier = crate::verify::enabled(config).then(Verifier::default);
        Ok(Restrictor { tables, domains: None, dnsbl: None, verifier })
    }

    /// Adds the resolvers of the DNS checks (built inside the runtime).
    pub fn with_dns(mut self, domains: Option<DomainResolver>, dnsbl: Option<Arc<Dnsbl>>) -> Self {
        self.domains = domains;
        self.dnsbl = dnsbl;
        self
    }

    pub fn dnsbl(&self) -> Option<&Arc<Dnsbl>> {
        self.dnsbl.as_ref()
    }

    fn table(&self, spec: &TableSpec) -> Option<&Table> {
        self.tables.iter().find(|(s, _)| s == spec).map(|(_, t)| t)
    }
}

/// Postfix `access_map_reject_code` for plain `reject`.
const REJECT_CODE: u16 = 554;
/// Postfix `invalid_hostname_reject_code`.
const INVALID_HOSTNAME_CODE: u16 = 501;
/// Postfix `non_fqdn_reject_code`.
const NON_FQDN_CODE: u16 = 504;
/// Postfix `unknown_client_reject_code`.
const UNKNOWN_CLIENT_CODE: u16 = 450;
/// Postfix `relay_domains_reject_code`.
const RELAY_CODE: u16 = 554;
/// Postfix `maps_rbl_reject_code`.
const RBL_CODE: u16 = 554;

/// What one list is evaluated about: the session's facts and, at RCPT,
/// the recipient.
pub struct Subject<'a> {
    pub facts: &'a Facts<'a>,
    pub recipient: Option<&'a str>,
}

/// How a list ended.
pub enum ListEnd {
    /// `permit` or OK: the list permits, and ends.
    Permitted,
    /// The end of the list: permitted, unless a DEFER_IF_PERMIT came.
    Finished,
    Refused(Decision),
}

/// One list's evaluation. `ask_policy` is called where the list says
/// `check_policy_service`.
pub struct ListRound<'a> {
    restrictor: &'a Restrictor,
    config: &'a Config,
    subject: &'a Subject<'a>,
    /// The stage the list belongs to (its replies name that subject).
    stage: FilterStage,
    pub round: PolicyRound,
    /// Sender and recipient domains already looked up this session.
    cache: &'a mut HashMap<String, DomainStatus>,
}

/// What a restriction found: nothing, an access action, or a reply
/// already in its final form.
enum Found {
    Dunno,
    Permit,
    Action(CheckStage, String, Action),
    Reply(FilterReply),
    DeferIfPermit(FilterReply),
    /// `check_policy_service`: the caller asks the servers.
    Policy,
}

impl<'a> ListRound<'a> {
    pub fn new(
        restrictor: &'a Restrictor,
        config: &'a Config,
        subject: &'a Subject<'a>,
        stage: FilterStage,
        cache: &'a mut HashMap<String, DomainStatus>,
    ) -> Self {
        let (check_stage, name) = own_subject(stage, subject);
        Self { restrictor, config, subject, stage, round: PolicyRound::new(check_stage, name), cache }
    }

    /// Evaluates the list from restriction `from` on; stops at the end,
    /// at a decision, or at `check_policy_service` (returning its index:
    /// the caller asks the servers, stops at their refusal, and otherwise
    /// carries on from the next restriction with the same round).
    pub async fn run(&mut self, list: &[Restriction], from: usize) -> Result<ListEnd, usize> {
        for (i, restriction) in list.iter().enumerate().skip(from) {
            let found = self.evaluate(restriction).await;
            let decided = match found {
                Found::Dunno => None,
                Found::Permit => return Ok(self.permitted()),
                Found::Policy => return Err(i),
                Found::Action(stage, name, action) => {
                    self.round.about(stage, name);
                    self.round.take(&action)
                }
                Found::Reply(reply) => Some(self.round.take_reply(reply)),
                Found::DeferIfPermit(reply) => {
                    self.round.defer_if_permit(reply);
                    None
                }
            };
            match decided {
                None => {}
                Some(Decision::Continue) => return Ok(ListEnd::Permitted),
                Some(refused) => return Ok(ListEnd::Refused(refused)),
            }
        }
        Ok(ListEnd::Finished)
    }

    /// `permit`: the round's permit (a DEFER_IF_PERMIT turns it).
    fn permitted(&mut self) -> ListEnd {
        match self.round.take(&Action::Ok) {
            Some(Decision::Continue) | None => ListEnd::Permitted,
            Some(refused) => ListEnd::Refused(refused),
        }
    }

    async fn evaluate(&mut self, restriction: &Restriction) -> Found {
        let facts = self.subject.facts;
        let client = || (CheckStage::Connect, format!("{}[{}]", facts.name, facts.addr));
        match restriction {
            Restriction::Permit => Found::Permit,
            Restriction::Reject => {
                self.own(Action::Reply { code: ReplyCode::of(REJECT_CODE), status: None, text: "Access denied".into() })
            }
            Restriction::Defer => self.own(Action::Defer(None)),
            Restriction::DeferIfPermit => self.own(Action::DeferIfPermit(None)),
            Restriction::DeferIfReject => self.own(Action::DeferIfReject(None)),
            Restriction::PermitMynetworks => {
                if self.config.server.trusted_networks.iter().any(|n| n.contains(&facts.addr.to_canonical())) {
                    Found::Permit
                } else {
                    Found::Dunno
                }
            }
            Restriction::CheckClientAccess(spec) => {
                let keys = client_keys(facts.name, facts.addr);
                let (stage, name) = client();
                self.access(spec, &keys, stage, name)
            }
            Restriction::CheckHeloAccess(spec) => match facts.helo {
                Some(helo) => self.access(spec, &domain_keys(helo), CheckStage::Helo, helo.to_owned()),
                None => Found::Dunno,
            },
            Restriction::CheckSenderAccess(spec) => match facts.sender {
                Some(sender) => {
                    let keys = address_keys(sender, self.config.server.recipient_delimiter);
                    self.access(spec, &keys, CheckStage::Mail, sender.to_owned())
                }
                None => Found::Dunno,
            },
            Restriction::CheckRecipientAccess(spec) => match self.subject.recipient {
                Some(rcpt) => {
                    let keys = address_keys(rcpt, self.config.server.recipient_delimiter);
                    self.access(spec, &keys, CheckStage::Rcpt, rcpt.to_owned())
                }
                None => Found::Dunno,
            },
            Restriction::RejectInvalidHeloHostname => match facts.helo {
                Some(helo) if !helo.starts_with('[') && !valid_hostname(helo) => Found::Action(
                    CheckStage::Helo,
                    helo.to_owned(),
                    reply_action(INVALID_HOSTNAME_CODE, 5, 5, 2, "Invalid name"),
                ),
                _ => Found::Dunno,
            },
            Restriction::RejectNonFqdnHeloHostname => match facts.helo {
                Some(helo) if !helo.starts_with('[') && !fqdn(helo) => Found::Action(
                    CheckStage::Helo,
                    helo.to_owned(),
                    reply_action(NON_FQDN_CODE, 5, 5, 2, "need fully-qualified hostname"),
                ),
                _ => Found::Dunno,
            },
            Restriction::RejectNonFqdnSender => match facts.sender {
                Some(sender) if !sender.is_empty() && !fqdn_address(sender) => Found::Action(
                    CheckStage::Mail,
                    sender.to_owned(),
                    reply_action(NON_FQDN_CODE, 5, 5, 2, "need fully-qualified address"),
                ),
                _ => Found::Dunno,
            },
            Restriction::RejectNonFqdnRecipient => match self.subject.recipient {
                Some(rcpt) if !fqdn_address(rcpt) => Found::Action(
                    CheckStage::Rcpt,
                    rcpt.to_owned(),
                    reply_action(NON_FQDN_CODE, 5, 5, 2, "need fully-qualified address"),
                ),
                _ => Found::Dunno,
            },
            Restriction::RejectUnknownSenderDomain => match facts.sender {
                Some(sender) if !sender.is_empty() => self.unknown_domain(sender, CheckStage::Mail).await,
                _ => Found::Dunno,
            },
            Restriction::RejectUnknownRecipientDomain => match self.subject.recipient {
                Some(rcpt) if !self.accepted(rcpt) => self.unknown_domain(rcpt, CheckStage::Rcpt).await,
                _ => Found::Dunno,
            },
            Restriction::RejectUnknownClientHostname => {
                if facts.name == UNKNOWN_NAME {
                    Found::Reply(FilterReply::new(
                        ReplyCode::of(UNKNOWN_CLIENT_CODE),
                        EnhancedStatus::new(StatusClass::Persistent, 7, 25),
                        format!("Client host rejected: cannot find your hostname, [{}]", facts.addr),
                    ))
                } else {
                    Found::Dunno
                }
            }
            // smtpd refuses improper pipelining itself, before any list
            // sees the command (`554 5.5.0 Error: SMTP protocol
            // synchronization`), as Postfix 3.9's smtpd_forbid_unauth_pipelining.
            Restriction::RejectUnauthPipelining => Found::Dunno,
            Restriction::RejectUnauthDestination => match self.subject.recipient {
                Some(rcpt) if !self.accepted(rcpt) => Found::Reply(FilterReply::new(
                    ReplyCode::of(RELAY_CODE),
                    EnhancedStatus::new(StatusClass::Permanent, 7, 1),
                    format!("<{rcpt}>: Relay access denied"),
                )),
                _ => Found::Dunno,
            },
            Restriction::RejectRblClient(site) => {
                let Some(dnsbl) = self.restrictor.dnsbl() else { return Found::Dunno };
                let screening = dnsbl.screen(std::slice::from_ref(site), facts.addr).await;
                if screening.score > 0 {
                    Found::Reply(FilterReply::new(
                        ReplyCode::of(RBL_CODE),
                        EnhancedStatus::new(StatusClass::Permanent, 7, 1),
                        format!("Service unavailable; Client host [{}] blocked using {}", facts.addr, site.domain),
                    ))
                } else {
                    Found::Dunno
                }
            }
            Restriction::PermitDnswlClient(site) => {
                let Some(dnsbl) = self.restrictor.dnsbl() else { return Found::Dunno };
                let screening = dnsbl.screen(std::slice::from_ref(site), facts.addr).await;
                if screening.score > 0 { Found::Permit } else { Found::Dunno }
            }
            Restriction::RejectUnverifiedRecipient => match self.subject.recipient {
                Some(rcpt) => self.verified(rcpt).await,
                None => Found::Dunno,
            },
            Restriction::CheckPolicyService => Found::Policy,
            Restriction::PermitSaslAuthenticated => {
                if facts.login.is_some() {
                    Found::Permit
                } else {
                    Found::Dunno
                }
            }
            Restriction::RejectSenderLoginMismatch => match facts.sender {
                Some(sender) if !sender.is_empty() => self.sender_login(sender),
                _ => Found::Dunno,
            },
        }
    }

    /// `reject_sender_login_mismatch` (Postfix's wording): the sender's
    /// owners, from `[smtpd.auth] sender_login_maps` (the address, then
    /// `@domain`), must include the login; a logged-in client may not use
    /// an address nobody owns, and an owned address needs its owner
    /// logged in.
    fn sender_login(&self, sender: &str) -> Found {
        let login = self.subject.facts.login.map(|l| l.username.as_str());
        let mut keys = vec![sender.to_owned()];
        if let Some((_, domain)) = sender.rsplit_once('@') {
            keys.push(format!("@{domain}"));
        }
        let mut owners = None;
        for spec in &self.config.smtpd.auth.sender_login_maps {
            match self.first_of(spec, &keys, sender) {
                Ok(None) => {}
                Ok(found) => {
                    owners = found;
                    break;
                }
                Err(refusal) => return refusal,
            }
        }
        let owned_by = |login: &str| {
            owners.as_deref().is_some_and(|o| {
                o.split([',', ' ', '\t']).filter(|w| !w.is_empty()).any(|w| w.eq_ignore_ascii_case(login))
            })
        };
        let text = match (login, &owners) {
            (Some(login), _) if owned_by(login) => return Found::Dunno,
            (Some(login), _) => format!("not owned by user {login}"),
            (None, Some(_)) => "not logged in".to_owned(),
            (None, None) => return Found::Dunno,
        };
        Found::Action(CheckStage::Mail, sender.to_owned(), reply_action(553, 5, 7, 1, &text))
    }

    /// `reject_unverified_recipient`: Postfix's replies for an address the
    /// probe found undeliverable (the configured code, `x.1.1`) and for
    /// one it could not verify (a deferral if nothing else refuses).
    async fn verified(&self, rcpt: &str) -> Found {
        let Some(verifier) = &self.restrictor.verifier else { return Found::Dunno };
        match verifier.verify(self.config, rcpt).await {
            Probe::Deliverable | Probe::NotProbed => Found::Dunno,
            Probe::Undeliverable { server, reply } => {
                let code = self.config.smtpd.verify.reject_code;
                let class = code.status_class().unwrap_or(StatusClass::Permanent);
                Found::Action(
                    CheckStage::Rcpt,
                    rcpt.to_owned(),
                    Action::Reply {
                        code,
                        status: Some(EnhancedStatus::new(class, 1, 1)),
                        text: format!(
                            "undeliverable address: host {server} said: {reply} (in reply to RCPT TO command)"
                        ),
                    },
                )
            }
            Probe::Unknown(why) => {
                let round = PolicyRound::new(CheckStage::Rcpt, rcpt);
                Found::DeferIfPermit(round.reply_for(
                    ReplyCode::of(450),
                    EnhancedStatus::new(StatusClass::Persistent, 1, 1),
                    &format!("unverified address: {why}"),
                ))
            }
        }
    }

    /// An action about the list's own subject.
    fn own(&self, action: Action) -> Found {
        let (stage, name) = own_subject(self.stage, self.subject);
        Found::Action(stage, name, action)
    }

    /// The result for the first of `keys` in the table; `Err` holds the
    /// refusal when the table could not answer (`451 4.3.0 <name>:
    /// Temporary lookup failure`, or Postfix's configuration error).
    fn first_of(&self, spec: &TableSpec, keys: &[String], name: &str) -> Result<Option<String>, Found> {
        let Some(table) = self.restrictor.table(spec) else { return Err(config_error(spec, "not loaded")) };
        for key in keys {
            match table.lookup(key) {
                Ok(Some(result)) => return Ok(Some(result)),
                Ok(None) => {}
                Err(LookupError::Temporary(why)) => {
                    tracing::warn!("warning: access table {spec}: {why}");
                    return Err(Found::Reply(FilterReply::new(
                        ReplyCode::of(451),
                        EnhancedStatus::new(StatusClass::Persistent, 3, 0),
                        format!("<{name}>: Temporary lookup failure"),
                    )));
                }
                Err(LookupError::Permanent(why)) => return Err(config_error(spec, &why)),
            }
        }
        Ok(None)
    }

    /// The first of `keys` in the table, as an access(5) action.
    fn access(&self, spec: &TableSpec, keys: &[String], stage: CheckStage, name: String) -> Found {
        let result = match self.first_of(spec, keys, &name) {
            Ok(Some(result)) => result,
            Ok(None) => return Found::Dunno,
            Err(refusal) => return refusal,
        };
        match Action::parse(&result) {
            Ok(Action::Unsupported(what)) => config_error(spec, &format!("{what:?} is not an access(5) action")),
            Ok(action) => Found::Action(stage, name, action),
            Err(e) => config_error(spec, &e.to_string()),
        }
    }

    fn accepted(&self, address: &str) -> bool {
        let domain = address.rsplit_once('@').map_or("", |(_, d)| d);
        self.config.server.accepted_domains.iter().any(|d| d.eq_ignore_ascii_case(domain))
    }

    /// `reject_unknown_{sender,recipient}_domain`.
    async fn unknown_domain(&mut self, address: &str, stage: CheckStage) -> Found {
        let Some((_, domain)) = address.rsplit_once('@') else { return Found::Dunno };
        // An address literal has nothing to look up.
        if domain.starts_with('[') || domain.is_empty() {
            return Found::Dunno;
        }
        let Some(resolver) = &self.restrictor.domains else { return Found::Dunno };
        let key = domain.to_ascii_lowercase();
        let status = match self.cache.get(&key) {
            Some(s) => *s,
            None => {
                let s = resolver.status(&key).await;
                if s != DomainStatus::TryAgain {
                    self.cache.insert(key, s);
                }
                s
            }
        };
        let sender = stage == CheckStage::Mail;
        let detail = if sender { 8 } else { 2 };
        match status {
            DomainStatus::Exists => Found::Dunno,
            DomainStatus::NullMx => Found::Action(
                stage,
                address.to_owned(),
                if sender {
                    reply_action(550, 5, 7, 27, &format!("Domain {domain} does not accept mail (nullMX)"))
                } else {
                    reply_action(556, 5, 1, 10, &format!("Domain {domain} does not accept mail (nullMX)"))
                },
            ),
            DomainStatus::NotFound => {
                let code = self.config.smtpd.restrictions.unknown_address_reject_code;
                let class = code.status_class().unwrap_or(StatusClass::Persistent);
                Found::Action(
                    stage,
                    address.to_owned(),
                    Action::Reply {
                        code,
                        status: Some(EnhancedStatus::new(class, 1, detail)),
                        text: "Domain not found".into(),
                    },
                )
            }
            DomainStatus::TryAgain => {
                let round = PolicyRound::new(stage, address);
                let reply = round.reply_for(
                    ReplyCode::of(450),
                    EnhancedStatus::new(StatusClass::Persistent, 1, detail),
                    "Domain not found",
                );
                Found::DeferIfPermit(reply)
            }
        }
    }
}

/// What a list refuses when a restriction speaks about the list itself
/// (`reject`, `reject_unauth_pipelining`): the subject of its stage.
fn own_subject(stage: FilterStage, subject: &Subject<'_>) -> (CheckStage, String) {
    let facts = subject.facts;
    match stage {
        FilterStage::Connect => (CheckStage::Connect, format!("{}[{}]", facts.name, facts.addr)),
        FilterStage::Helo => (CheckStage::Helo, facts.helo.unwrap_or_default().to_owned()),
        FilterStage::Mail => (CheckStage::Mail, facts.sender.unwrap_or_default().to_owned()),
        FilterStage::Rcpt => (CheckStage::Rcpt, subject.recipient.unwrap_or_default().to_owned()),
        FilterStage::Data => (CheckStage::Data, "DATA".to_owned()),
        FilterStage::EndOfMessage => (CheckStage::EndOfMessage, "END-OF-MESSAGE".to_owned()),
    }
}

fn reply_action(code: u16, class: u8, subject: u16, detail: u16, text: &str) -> Action {
    let class = if class == 4 { StatusClass::Persistent } else { StatusClass::Permanent };
    Action::Reply {
        code: ReplyCode::of(code),
        status: Some(EnhancedStatus::new(class, subject, detail)),
        text: text.to_owned(),
    }
}

/// A table result smtpd cannot carry out: logged, and the command gets
/// Postfix's `451 4.3.5 Server configuration error`.
fn config_error(spec: &TableSpec, why: &str) -> Found {
    tracing::warn!("warning: access table {spec}: {why}");
    Found::Reply(FilterReply::new(
        ReplyCode::of(451),
        EnhancedStatus::new(StatusClass::Persistent, 3, 5),
        "Server configuration error",
    ))
}

/// check_client_access keys: the name and its parent domains (when known),
/// the address, then for IPv4 its networks (`192.0.2`, `192.0`, `192`),
/// as access(5) lists them; IPv6 networks are a cidr table's job.
pub fn client_keys(name: &str, addr: IpAddr) -> Vec<String> {
    let mut keys = Vec::new();
    if name != UNKNOWN_NAME {
        keys.extend(domain_keys(name));
    }
    let addr = addr.to_canonical();
    let text = addr.to_string();
    keys.push(text.clone());
    if addr.is_ipv4() {
        let mut rest = text.as_str();
        while let Some((head, _)) = rest.rsplit_once('.') {
            keys.push(head.to_owned());
            rest = head;
        }
    }
    keys
}

/// A domain and its parent domains (`mail.example.com`, `example.com`,
/// `com`): Postfix's `parent_domain_matches_subdomains` default for
/// access tables.
pub fn domain_keys(name: &str) -> Vec<String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let mut keys = vec![name.to_owned()];
    let mut rest = name;
    while let Some((_, parent)) = rest.split_once('.') {
        if parent.is_empty() {
            break;
        }
        keys.push(parent.to_owned());
        rest = parent;
    }
    keys
}

/// access(5)'s address keys: `user+ext@domain` and `user@domain` (with a
/// delimiter), the domain and its parents, then `user+ext@` and `user@`;
/// the null sender is `<>`.
pub fn address_keys(address: &str, delimiter: Option<char>) -> Vec<String> {
    if address.is_empty() {
        return vec!["<>".to_owned()];
    }
    let (local, domain) = match address.rsplit_once('@') {
        Some((l, d)) => (l, Some(d)),
        None => (address, None),
    };
    let bare = delimiter.and_then(|d| local.split_once(d)).map(|(u, _)| u).filter(|u| !u.is_empty());
    let mut keys = Vec::new();
    if let Some(domain) = domain {
        keys.push(format!("{local}@{domain}"));
        if let Some(user) = bare {
            keys.push(format!("{user}@{domain}"));
        }
        keys.extend(domain_keys(domain));
    }
    keys.push(format!("{local}@"));
    if let Some(user) = bare {
        keys.push(format!("{user}@"));
    }
    keys
}

/// RFC 1123 host name (a final dot allowed; underscores not).
fn valid_hostname(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        })
        && !name.rsplit('.').next().is_some_and(|top| top.bytes().all(|c| c.is_ascii_digit()))
}

/// A valid host name with a dot in it.
fn fqdn(name: &str) -> bool {
    valid_hostname(name) && name.strip_suffix('.').unwrap_or(name).contains('.')
}

/// An address whose domain is a fully-qualified host name (or an
/// address literal).
fn fqdn_address(address: &str) -> bool {
    match address.rsplit_once('@') {
        Some((_, domain)) => domain.starts_with('[') || fqdn(domain),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_keys_follow_access_5() {
        assert_eq!(
            client_keys("mail.example.com", "192.0.2.7".parse().unwrap()),
            ["mail.example.com", "example.com", "com", "192.0.2.7", "192.0.2", "192.0", "192"]
        );
        assert_eq!(client_keys(UNKNOWN_NAME, "::ffff:192.0.2.7".parse().unwrap())[0], "192.0.2.7");
        // IPv6 networks are for cidr tables: only the address is a key.
        assert_eq!(client_keys(UNKNOWN_NAME, "2001:db8::1".parse().unwrap()), ["2001:db8::1"]);
    }

    #[test]
    fn address_keys_follow_access_5() {
        assert_eq!(
            address_keys("joe+list@mail.example.com", Some('+')),
            [
                "joe+list@mail.example.com",
                "joe@mail.example.com",
                "mail.example.com",
                "example.com",
                "com",
                "joe+list@",
                "joe@"
            ]
        );
        assert_eq!(address_keys("", None), ["<>"]);
        assert_eq!(address_keys("postmaster", None), ["postmaster@"]);
    }

    #[test]
    fn host_name_rules() {
        for good in ["mail.example.com", "mail.example.com.", "a-b.example"] {
            assert!(fqdn(good), "{good}");
        }
        for bad in ["localhost", "-a.example", "a_b.example", "1.2.3.4", "a..b", ""] {
            assert!(!fqdn(bad), "{bad}");
        }
        assert!(valid_hostname("localhost") && !valid_hostname("bad name") && !valid_hostname("a_b"));
        assert!(fqdn_address("a@[192.0.2.1]") && fqdn_address("a@x.example") && !fqdn_address("a@x"));
    }
}
