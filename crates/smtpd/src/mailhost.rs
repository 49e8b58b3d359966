//! Whether a mail domain exists, for `reject_unknown_sender_domain` and
//! `reject_unknown_recipient_domain`: Postfix's rule (smtpd_check.c,
//! reject_unknown_mailhost) is that a domain can receive mail when it
//! has an MX record, or else an address record; a null MX (RFC 7505: one
//! MX of preference 0 and exchange `.`) says it never receives any.
//! NXDOMAIN or no such record is "not found"; any failure to get an
//! answer (SERVFAIL, a timeout) is "try again", which the restriction
//! turns into a deferral, never a rejection.

use hickory_resolver::NameServerPool;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::xfer::{DnsHandle, FirstAnswer};
use hickory_resolver::proto::op::{DnsRequestOptions, Query, ResponseCode};
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use std::time::Duration;

/// What the DNS says about a mail domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainStatus {
    /// An MX or an address record.
    Exists,
    /// RFC 7505: the domain accepts no mail.
    NullMx,
    /// NXDOMAIN, or neither MX nor address records.
    NotFound,
    /// No usable answer in time.
    TryAgain,
}

/// Asks one process's nameservers about mail domains.
pub struct DomainResolver {
    pool: NameServerPool<TokioRuntimeProvider>,
    timeout: Duration,
}

impl DomainResolver {
    /// From a pool of the configured nameservers; every lookup (all its
    /// queries together) gives up after `timeout`.
    pub fn new(pool: NameServerPool<TokioRuntimeProvider>, timeout: Duration) -> Self {
        Self { pool, timeout }
    }

    pub async fn status(&self, domain: &str) -> DomainStatus {
        match tokio::time::timeout(self.timeout, self.lookup(domain)).await {
            Ok(status) => status,
            Err(_) => DomainStatus::TryAgain,
        }
    }

    async fn lookup(&self, domain: &str) -> DomainStatus {
        let Ok(mut name) = Name::from_ascii(domain) else { return DomainStatus::NotFound };
        // Absolute: no search domain is ever tried.
        name.set_fqdn(true);
        match self.query(name.clone(), RecordType::MX).await {
            Answer::Failed => return DomainStatus::TryAgain,
            Answer::NoSuchName => return DomainStatus::NotFound,
            Answer::Records(records) => {
                let mx: Vec<_> = records
                    .iter()
                    .filter_map(|r| match r {
                        RData::MX(mx) => Some(mx),
                        _ => None,
                    })
                    .collect();
                if mx.len() == 1 && mx[0].preference == 0 && mx[0].exchange.is_root() {
                    return DomainStatus::NullMx;
                }
                if !mx.is_empty() {
                    return DomainStatus::Exists;
                }
            }
        }
        let mut failed = false;
        for rtype in [RecordType::A, RecordType::AAAA] {
            match self.query(name.clone(), rtype).await {
                Answer::Records(r) if r.iter().any(|d| matches!(d, RData::A(_) | RData::AAAA(_))) => {
                    return DomainStatus::Exists;
                }
                Answer::Failed => failed = true,
                Answer::Records(_) | Answer::NoSuchName => {}
            }
        }
        if failed { DomainStatus::TryAgain } else { DomainStatus::NotFound }
    }

    async fn query(&self, name: Name, rtype: RecordType) -> Answer {
        let response = self.pool.lookup(Query::query(name, rtype), DnsRequestOptions::default()).first_answer().await;
        match response {
            Ok(r) => match r.metadata.response_code {
                ResponseCode::NoError => Answer::Records(r.answers.iter().map(|rec| rec.data.clone()).collect()),
                ResponseCode::NXDomain => Answer::NoSuchName,
                _ => Answer::Failed,
            },
            Err(e) if e.is_nx_domain() => Answer::NoSuchName,
            Err(e) if e.is_no_records_found() => Answer::Records(Vec::new()),
            Err(_) => Answer::Failed,
        }
    }
}

enum Answer {
    Records(Vec<RData>),
    NoSuchName,
    Failed,
}
