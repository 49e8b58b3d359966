//! Postfix's SMTP access restrictions (`smtpd_client_restrictions` ...
//! `smtpd_end_of_data_restrictions`): the building blocks of
//! `[smtpd.restrictions]`, as written in the configuration, parsed once
//! when it is loaded, so a misspelt restriction is a `mortal check` error
//! at its line and never a surprise in a session.
//!
//! Each list is evaluated in order by smtpd (`mortal_smtpd::filter::
//! restrict`): the first restriction with an opinion (permit, reject,
//! defer) ends the list; at its end the command is permitted. What each
//! one does and replies is Postfix's (postconf(5)); the doc comment of
//! each variant says it in one line.

use crate::dnsbl::DnsblSite;
use crate::table::TableSpec;
use std::fmt;

/// One restriction of a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restriction {
    /// `permit`: ends the list, permitting.
    Permit,
    /// `reject`: `554 5.7.1 <name>: ... rejected: Access denied`.
    Reject,
    /// `defer`: `450 4.7.1 <name>: ... rejected: Access denied`.
    Defer,
    /// `defer_if_permit`: a later permit becomes a deferral.
    DeferIfPermit,
    /// `defer_if_reject`: a later rejection becomes a deferral.
    DeferIfReject,
    /// `permit_mynetworks`: permits clients in `[server] trusted_networks`.
    PermitMynetworks,
    /// `check_client_access TABLE`: the client's name, its parent domains,
    /// its address and the address's networks, looked up in TABLE.
    CheckClientAccess(TableSpec),
    /// `check_helo_access TABLE`: the HELO name and its parent domains.
    CheckHeloAccess(TableSpec),
    /// `check_sender_access TABLE`: the sender in access(5)'s address
    /// order (`<>` for the null sender).
    CheckSenderAccess(TableSpec),
    /// `check_recipient_access TABLE`: the recipient likewise.
    CheckRecipientAccess(TableSpec),
    /// `reject_invalid_helo_hostname`: `501 5.5.2 ... Invalid name`.
    RejectInvalidHeloHostname,
    /// `reject_non_fqdn_helo_hostname`: `504 5.5.2 ... need
    /// fully-qualified hostname`.
    RejectNonFqdnHeloHostname,
    /// `reject_non_fqdn_sender`: `504 5.5.2 ... need fully-qualified
    /// address`.
    RejectNonFqdnSender,
    /// `reject_non_fqdn_recipient`: likewise for the recipient.
    RejectNonFqdnRecipient,
    /// `reject_unknown_sender_domain`: the sender's domain has no MX nor
    /// address record (450 4.1.8; a DNS failure defers if permitted).
    RejectUnknownSenderDomain,
    /// `reject_unknown_recipient_domain`: likewise for a recipient domain
    /// that is not accepted here (450 4.1.2).
    RejectUnknownRecipientDomain,
    /// `reject_unknown_client_hostname`: the client has no
    /// forward-confirmed name (`450 4.7.25 Client host rejected: cannot
    /// find your hostname, [addr]`); needs `reverse_lookup`.
    RejectUnknownClientHostname,
    /// `reject_unauth_pipelining`: always in force in mortal, whatever the
    /// lists say (smtpd answers `554 5.5.0 Error: SMTP protocol
    /// synchronization` before any list sees the command); accepted so
    /// that a Postfix list carries over.
    RejectUnauthPipelining,
    /// `reject_unauth_destination`: a recipient domain not in
    /// `accepted_domains` gets `554 5.7.1 <addr>: Relay access denied`.
    RejectUnauthDestination,
    /// `reject_rbl_client DOMAIN[=FILTER]`: the client's address is
    /// listed there: `554 5.7.1 Service unavailable; Client host [addr]
    /// blocked using DOMAIN`.
    RejectRblClient(DnsblSite),
    /// `permit_dnswl_client DOMAIN[=FILTER]`: permits a client listed there.
    PermitDnswlClient(DnsblSite),
    /// `reject_unverified_recipient`: probes the recipient at the server
    /// its route delivers to (LMTP or SMTP RCPT, cached per
    /// `[smtpd.verify]`): refused there is `550 5.1.1 <addr>: Recipient
    /// address rejected: undeliverable address: ...`.
    RejectUnverifiedRecipient,
    /// `check_policy_service`: asks the `[[smtpd.policy]]` servers of the
    /// stage here (without it, they are asked at the end of the list).
    CheckPolicyService,
    /// `permit_sasl_authenticated`: permits a client that logged in with
    /// AUTH.
    PermitSaslAuthenticated,
    /// `reject_sender_login_mismatch`: the sender is owned (in `[smtpd.auth]
    /// sender_login_maps`) by logins other than the client's, or the client
    /// logged in and the sender is owned by nobody: `553 5.7.1 <sender>:
    /// Sender address rejected: not owned by user NAME`.
    RejectSenderLoginMismatch,
}

impl Restriction {
    /// The restriction's name, as written.
    pub fn name(&self) -> &'static str {
        match self {
            Restriction::Permit => "permit",
            Restriction::Reject => "reject",
            Restriction::Defer => "defer",
            Restriction::DeferIfPermit => "defer_if_permit",
            Restriction::DeferIfReject => "defer_if_reject",
            Restriction::PermitMynetworks => "permit_mynetworks",
            Restriction::CheckClientAccess(_) => "check_client_access",
            Restriction::CheckHeloAccess(_) => "check_helo_access",
            Restriction::CheckSenderAccess(_) => "check_sender_access",
            Restriction::CheckRecipientAccess(_) => "check_recipient_access",
            Restriction::RejectInvalidHeloHostname => "reject_invalid_helo_hostname",
            Restriction::RejectNonFqdnHeloHostname => "reject_non_fqdn_helo_hostname",
            Restriction::RejectNonFqdnSender => "reject_non_fqdn_sender",
            Restriction::RejectNonFqdnRecipient => "reject_non_fqdn_recipient",
            Restriction::RejectUnknownSenderDomain => "reject_unknown_sender_domain",
            Restriction::RejectUnknownRecipientDomain => "reject_unknown_recipient_domain",
            Restriction::RejectUnknownClientHostname => "reject_unknown_client_hostname",
            Restriction::RejectUnauthPipelining => "reject_unauth_pipelining",
            Restriction::RejectUnauthDestination => "reject_unauth_destination",
            Restriction::RejectRblClient(_) => "reject_rbl_client",
            Restriction::PermitDnswlClient(_) => "permit_dnswl_client",
            Restriction::RejectUnverifiedRecipient => "reject_unverified_recipient",
            Restriction::CheckPolicyService => "check_policy_service",
            Restriction::PermitSaslAuthenticated => "permit_sasl_authenticated",
            Restriction::RejectSenderLoginMismatch => "reject_sender_login_mismatch",
        }
    }

    /// Whether it means anything only with AUTH offered.
    pub fn needs_auth(&self) -> bool {
        matches!(self, Restriction::PermitSaslAuthenticated | Restriction::RejectSenderLoginMismatch)
    }

    /// The table it looks up, if any.
    pub fn table(&self) -> Option<&TableSpec> {
        match self {
            Restriction::CheckClientAccess(t)
            | Restriction::CheckHeloAccess(t)
            | Restriction::CheckSenderAccess(t)
            | Restriction::CheckRecipientAccess(t) => Some(t),
            _ => None,
        }
    }

    /// Whether it asks the DNS (the resolver must be set up, and the
    /// sandbox must let smtpd reach the nameservers).
    pub fn uses_dns(&self) -> bool {
        matches!(
            self,
            Restriction::RejectUnknownSenderDomain
                | Restriction::RejectUnknownRecipientDomain
                | Restriction::RejectRblClient(_)
                | Restriction::PermitDnswlClient(_)
        )
    }

    /// The same restriction with its table's path relative to `base`.
    pub fn relative_to(self, base: &std::path::Path) -> Restriction {
        match self {
            Restriction::CheckClientAccess(t) => Restriction::CheckClientAccess(t.relative_to(base)),
            Restriction::CheckHeloAccess(t) => Restriction::CheckHeloAccess(t.relative_to(base)),
            Restriction::CheckSenderAccess(t) => Restriction::CheckSenderAccess(t.relative_to(base)),
            Restriction::CheckRecipientAccess(t) => Restriction::CheckRecipientAccess(t.relative_to(base)),
            other => other,
        }
    }
}

impl std::str::FromStr for Restriction {
    type Err = String;

    /// `name` or `name argument`, Postfix's spelling (case-insensitive
    /// name). Restrictions mortal does not have are named in the error,
    /// with what to use instead where there is an answer.
    fn from_str(text: &str) -> Result<Restriction, String> {
        let text = text.trim();
        let (name, arg) = match text.split_once(char::is_whitespace) {
            Some((n, a)) => (n, Some(a.trim())),
            None => (text, None),
        };
        let lower = name.to_ascii_lowercase();
        let table = |arg: Option<&str>| -> Result<TableSpec, String> {
            let arg =
                arg.ok_or_else(|| format!("{lower} needs a table, as in \"{lower} texthash:/etc/mortal/access\""))?;
            arg.parse::<TableSpec>()
        };
        let site = |arg: Option<&str>| -> Result<DnsblSite, String> {
            let arg = arg.ok_or_else(|| format!("{lower} needs a DNS list domain, as in \"{lower} zen.example\""))?;
            let site: DnsblSite = arg.parse().map_err(|e| format!("{arg:?}: {e}"))?;
            if site.weight != 1 {
                return Err(format!("{arg:?}: a weight belongs in [smtpd.dnsbl] sites, not in {lower}"));
            }
            Ok(site)
        };
        let plain = |r: Restriction| -> Result<Restriction, String> {
            match arg {
                Some(a) => Err(format!("{lower} takes no argument, not {a:?}")),
                None => Ok(r),
            }
        };
        match lower.as_str() {
            "permit" => plain(Restriction::Permit),
            "reject" => plain(Restriction::Reject),
            "defer" => plain(Restriction::Defer),
            "defer_if_permit" => plain(Restriction::DeferIfPermit),
            "defer_if_reject" => plain(Restriction::DeferIfReject),
            "permit_mynetworks" => plain(Restriction::PermitMynetworks),
            "check_client_access" => Ok(Restriction::CheckClientAccess(table(arg)?)),
            "check_helo_access" => Ok(Restriction::CheckHeloAccess(table(arg)?)),
            "check_sender_access" => Ok(Restriction::CheckSenderAccess(table(arg)?)),
            "check_recipient_access" => Ok(Restriction::CheckRecipientAccess(table(arg)?)),
            "reject_invalid_helo_hostname" | "reject_invalid_hostname" => plain(Restriction::RejectInvalidHeloHostname),
            "reject_non_fqdn_helo_hostname" | "reject_non_fqdn_hostname" => {
                plain(Restriction::RejectNonFqdnHeloHostname)
            }
            "reject_non_fqdn_sender" => plain(Restriction::RejectNonFqdnSender),
            "reject_non_fqdn_recipient" => plain(Restriction::RejectNonFqdnRecipient),
            "reject_unknown_sender_domain" => plain(Restriction::RejectUnknownSenderDomain),
            "reject_unknown_recipient_domain" => plain(Restriction::RejectUnknownRecipientDomain),
            "reject_unknown_client_hostname" | "reject_unknown_client" => {
                plain(Restriction::RejectUnknownClientHostname)
            }
            "reject_unauth_pipelining" => plain(Restriction::RejectUnauthPipelining),
            "reject_unauth_destination" => plain(Restriction::RejectUnauthDestination),
            "reject_unverified_recipient" => plain(Restriction::RejectUnverifiedRecipient),
            "reject_rbl_client" => Ok(Restriction::RejectRblClient(site(arg)?)),
            "permit_dnswl_client" => Ok(Restriction::PermitDnswlClient(site(arg)?)),
            "check_policy_service" => match arg {
                None => Ok(Restriction::CheckPolicyService),
                Some(a) => Err(format!(
                    "check_policy_service takes no argument here, not {a:?}: \
                     configure the server as [[smtpd.policy]] and name the stage in its stages"
                )),
            },
            "permit_sasl_authenticated" => plain(Restriction::PermitSaslAuthenticated),
            "reject_sender_login_mismatch" => plain(Restriction::RejectSenderLoginMismatch),
            "reject_unlisted_recipient" => {
                Err("reject_unlisted_recipient: always on in mortal ([server] recipient_maps)".to_owned())
            }
            "permit_auth_destination" | "defer_unauth_destination" => Err(format!(
                "{lower}: mortal's relay rule (accepted_domains, trusted_networks) always runs first; \
                 use reject_unauth_destination"
            )),
            _ => Err(format!("{name:?} is not a restriction mortal knows")),
        }
    }
}

impl fmt::Display for Restriction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())?;
        match self {
            Restriction::RejectRblClient(site) | Restriction::PermitDnswlClient(site) => write!(f, " {site}"),
            other => match other.table() {
                Some(t) => write!(f, " {t}"),
                None => Ok(()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_postfix_spellings_and_prints_them_back() {
        for text in [
            "permit_mynetworks",
            "check_client_access cidr:/etc/mortal/clients.cidr",
            "check_helo_access texthash:/etc/mortal/helo",
            "check_sender_access texthash:/etc/mortal/senders",
            "check_recipient_access regexp:/etc/mortal/rcpt",
            "reject_invalid_helo_hostname",
            "reject_non_fqdn_helo_hostname",
            "reject_non_fqdn_sender",
            "reject_non_fqdn_recipient",
            "reject_unknown_sender_domain",
            "reject_unknown_recipient_domain",
            "reject_unknown_client_hostname",
            "reject_unauth_pipelining",
            "reject_unauth_destination",
            "reject_unverified_recipient",
            "reject_rbl_client zen.example",
            "reject_rbl_client list.example=127.0.0.[2..11]",
            "permit_dnswl_client wl.example",
            "check_policy_service",
            "permit_sasl_authenticated",
            "reject_sender_login_mismatch",
            "permit",
            "reject",
            "defer",
            "defer_if_permit",
            "defer_if_reject",
        ] {
            let r: Restriction = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(r.to_string(), text);
        }
        assert_eq!("REJECT_NON_FQDN_HOSTNAME".parse(), Ok(Restriction::RejectNonFqdnHeloHostname));
    }

    #[test]
    fn refuses_what_it_cannot_do_and_says_why() {
        for (text, want) in [
            ("check_client_access", "needs a table"),
            ("check_client_access btree:/x", "unknown table kind"),
            ("permit_mynetworks now", "takes no argument"),
            ("reject_rbl_client", "needs a DNS list domain"),
            ("reject_rbl_client zen.example*3", "a weight belongs in [smtpd.dnsbl]"),
            ("permit_sasl_authenticated now", "takes no argument"),
            ("check_policy_service inet:127.0.0.1:10023", "[[smtpd.policy]]"),
            ("reject_everything", "not a restriction mortal knows"),
        ] {
            let err = text.parse::<Restriction>().unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
    }
}
