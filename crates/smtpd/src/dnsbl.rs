//! Weighted DNS block and allow list lookups, as Postfix's postscreen
//! makes them (`postscreen_dnsbl_sites`): every site of a list is asked
//! about the client at once, and the weights of the sites that list it
//! add up to the client's score, which the caller compares with its
//! threshold. An allowlist is a site with a negative weight.
//!
//! # Summary
//! [`Dnsbl`] is built once per process and shared by all its sessions.
//! [`Dnsbl::screen`] asks the A record of the client's reversed address
//! under each site's domain (`mortal_proto::dnsbl::query_name`), all in
//! parallel, and returns a [`Screening`]: the score, the sites that
//! listed the client and the sites that did not answer. Answers are
//! cached per process for their TTL, so a client that comes back costs
//! no query.
//!
//! # Security
//! A list is a third party that may be slow, down or wrong; none of that
//! may hold a session or decide it alone. The whole screening takes at
//! most the timeout; a site that fails (no answer in time, SERVFAIL, a
//! network error) counts as not listing the client, is named in
//! [`Screening::failed`] and logged, and its failure is not cached, so the
//! next client asks again. Which answers count is the site's filter, and
//! without one only 127.0.0.0/8 outside Spamhaus's error codes
//! (`DnsblSite::matches`). The cache is bounded ([`MAX_CACHE_ENTRIES`])
//! and its entries live at most [`MAX_TTL`]. The nameservers are those the
//! caller names, asked directly as [`crate::dns`] does: never /etc/hosts,
//! never a name the resolver answers itself. A TXT reason
//! ([`Dnsbl::txt`]) is cut to [`MAX_TXT`] octets of printable ASCII before
//! anyone can put it in a reply or a log.
//!
//! # Standards
//! RFC 5782 (DNSxL query names and answers), RFC 2308 (negative caching:
//! the SOA minimum of an NXDOMAIN answer).
//!
//! # Diagnostics
//! `warning: dnsbl <domain>: lookup of <query name>: <reason>` for each
//! site that failed.

use crate::dns::{DnsError, name_server_pool};
use hickory_resolver::NameServerPool;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::xfer::{DnsHandle, FirstAnswer};
use hickory_resolver::net::{DnsError as ResponseError, NetError, NoRecords};
use hickory_resolver::proto::op::{DnsRequestOptions, Query, ResponseCode};
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use mortal_proto::dnsbl::{DnsblSite, query_name};
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::{Duration, Instant};

/// Shortest time an answer is cached, whatever its TTL: a list that
/// answers with TTL 0 still costs one query per client per minute, not one
/// per connection (postscreen_dnsbl_min_ttl).
pub const MIN_TTL: Duration = Duration::from_secs(60);

/// Longest time an answer is cached, whatever its TTL: a client delisted
/// today is not blocked for a day (postscreen_dnsbl_max_ttl).
pub const MAX_TTL: Duration = Duration::from_secs(3600);

/// How long "not listed" is cached when the answer carries no SOA to say
/// (rbldnsd without `$SOA`): a client listed a moment later is seen within
/// a minute.
pub const NEGATIVE_TTL: Duration = MIN_TTL;

/// Most answers one process keeps: a client that walks through addresses
/// cannot make the cache grow without bound.
pub const MAX_CACHE_ENTRIES: usize = 10_000;

/// Longest TXT reason returned, in octets: it has to fit in an SMTP reply
/// line (512 octets, RFC 5321 4.5.3.1.5) with the code and text around it.
pub const MAX_TXT: usize = 200;

/// The outcome of screening one client against a list of sites.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Screening {
    /// The sum of the weights of the sites that listed the client.
    pub score: i32,
    /// (domain, weight) of each site that listed the client, in the order
    /// of the sites; a site named twice is here twice.
    pub hits: Vec<(String, i32)>,
    /// Domains that did not answer in time or failed, each once.
    pub failed: Vec<String>,
}

impl Screening {
    /// The blocklist to name in a rejection: the listing site of largest
    /// positive weight, the first of them on a tie; `None` when only
    /// allowlists (or nothing) listed the client.
    pub fn blocked_by(&self) -> Option<&str> {
        let mut best: Option<&(String, i32)> = None;
        for hit in self.hits.iter().filter(|(_, weight)| *weight > 0) {
            if best.is_none_or(|(_, top)| hit.1 > *top) {
                best = Some(hit);
            }
        }
        best.map(|(domain, _)| domain.as_str())
    }
}

/// The DNS list client of one process: a nameserver pool and the cache
/// of answers. Cloning shares both.
#[derive(Clone)]
pub struct Dnsbl {
    pool: NameServerPool<TokioRuntimeProvider>,
    timeout: Duration,
    cache: Arc<Mutex<Cache>>,
}

impl std::fmt::Debug for Dnsbl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dnsbl").field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

/// What one query name's lookup gave.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Lookup {
    /// The A records (none: NXDOMAIN or no A record, not listed).
    Answered(Vec<Ipv4Addr>),
    /// Why there is no answer.
    Failed(String),
}

impl Dnsbl {
    /// A client asking `servers` (over UDP, TCP when an answer is
    /// truncated); [`Dnsbl::screen`] takes at most `timeout`. Call it
    /// inside the runtime that will run the lookups.
    pub fn new(servers: &[SocketAddr], timeout: Duration) -> Result<Dnsbl, DnsError> {
        let pool = name_server_pool(servers, timeout)?;
        Ok(Dnsbl { pool, timeout, cache: Arc::new(Mutex::new(Cache::new(MAX_CACHE_ENTRIES))) })
    }

    /// Screens `client` against `sites`: every distinct query name is
    /// looked up at once (from the cache when it can), each bounded by
    /// the one deadline, so the call takes at most the timeout whatever
    /// the number of sites.
    pub async fn screen(&self, sites: &[DnsblSite], client: IpAddr) -> Screening {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut names: Vec<(&str, String)> = Vec::new();
        for site in sites {
            if !names.iter().any(|(domain, _)| *domain == site.domain) {
                names.push((&site.domain, query_name(client, &site.domain)));
            }
        }
        let lookups = join_all(names.iter().map(|(domain, name)| async move {
            let lookup = match tokio::time::timeout_at(deadline, self.lookup(name)).await {
                Ok(lookup) => lookup,
                Err(_) => Lookup::Failed(format!("no answer within {:?}", self.timeout)),
            };
            if let Lookup::Failed(reason) = &lookup {
                let shown = name.strip_suffix('.').unwrap_or(name);
                tracing::warn!("warning: dnsbl {domain}: lookup of {shown}: {reason}");
            }
            lookup
        }))
        .await;
        let answers: HashMap<&str, Lookup> = names.iter().map(|(domain, _)| *domain).zip(lookups).collect();
        tally(sites, &answers)
    }

    /// The A records of `name`, from the cache or the nameservers; a
    /// definite answer is cached, a failure is not.
    async fn lookup(&self, name: &str) -> Lookup {
        if let Some(answers) = self.cache().get(name, Instant::now()) {
            return Lookup::Answered(answers);
        }
        let query_name = match Name::from_ascii(name) {
            Ok(query_name) => query_name,
            Err(e) => return Lookup::Failed(format!("bad query name: {e}")),
        };
        let response = self
            .pool
            .lookup(Query::query(query_name, RecordType::A), DnsRequestOptions::default())
            .first_answer()
            .await;
        let (answers, ttl) = match response {
            Ok(response) if matches!(response.response_code, ResponseCode::NoError | ResponseCode::NXDomain) => {
                let answers: Vec<(Ipv4Addr, u32)> = response
                    .answers
                    .iter()
                    .filter_map(|record| match &record.data {
                        RData::A(a) => Some((a.0, record.ttl)),
                        _ => None,
                    })
                    .collect();
                let ttl = answers.iter().map(|(_, ttl)| *ttl).min();
                (answers.into_iter().map(|(a, _)| a).collect(), ttl.map_or(NEGATIVE_TTL, seconds))
            }
            Ok(response) => return Lookup::Failed(format!("response code {}", response.response_code)),
            Err(NetError::Dns(ResponseError::NoRecordsFound(NoRecords {
                response_code: ResponseCode::NXDomain | ResponseCode::NoError,
                negative_ttl,
                ..
            }))) => (Vec::new(), negative_ttl.map_or(NEGATIVE_TTL, seconds)),
            Err(e) => return Lookup::Failed(e.to_string()),
        };
        self.cache().insert(name, answers.clone(), ttl, Instant::now());
        Lookup::Answered(answers)
    }

    /// The TXT record of `client`'s listing in `domain` (the reason a
    /// list gives), as printable ASCII of at most [`MAX_TXT`] octets;
    /// `None` when there is none or it does not come within the timeout.
    /// Not cached: it is asked only for a client being rejected.
    pub async fn txt(&self, client: IpAddr, domain: &str) -> Option<String> {
        let name = Name::from_ascii(query_name(client, domain)).ok()?;
        let lookup = self.pool.lookup(Query::query(name, RecordType::TXT), DnsRequestOptions::default()).first_answer();
        let response = tokio::time::timeout(self.timeout, lookup).await.ok()?.ok()?;
        let txt = response.answers.iter().find_map(|record| match &record.data {
            RData::TXT(txt) => Some(txt.txt_data.concat()),
            _ => None,
        })?;
        Some(printable(&txt))
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        // A panic while the lock was held cannot leave an entry half
        // written: every change is one map operation.
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A TTL in seconds, within [`MIN_TTL`] and [`MAX_TTL`].
fn seconds(ttl: u32) -> Duration {
    Duration::from_secs(u64::from(ttl)).clamp(MIN_TTL, MAX_TTL)
}

/// `octets` with every octet outside space..`~` made `?`, cut to
/// [`MAX_TXT`]: a TXT record is the list's text, and may carry anything.
fn printable(octets: &[u8]) -> String {
    octets.iter().take(MAX_TXT).map(|&b| if (b' '..=b'~').contains(&b) { char::from(b) } else { '?' }).collect()
}

/// The screening of `sites` given each domain's lookup.
fn tally(sites: &[DnsblSite], answers: &HashMap<&str, Lookup>) -> Screening {
    let mut screening = Screening::default();
    for site in sites {
        match answers.get(site.domain.as_str()) {
            Some(Lookup::Answered(addresses)) => {
                if addresses.iter().any(|a| site.matches(*a)) {
                    screening.score += site.weight;
                    screening.hits.push((site.domain.clone(), site.weight));
                }
            }
            Some(Lookup::Failed(_)) => {
                if !screening.failed.contains(&site.domain) {
                    screening.failed.push(site.domain.clone());
                }
            }
            None => unreachable!("every site's domain was looked up"),
        }
    }
    screening
}

/// Runs `futures` concurrently on the caller's task (smtpd starts no
/// thread and spawns nothing for this) and returns their outputs in order.
async fn join_all<F: Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => *output = Some(value),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending { Poll::Pending } else { Poll::Ready(()) }
    })
    .await;
    outputs.into_iter().map(|output| output.expect("every future finished")).collect()
}

/// Answers by query name, each until it expires; at most `limit` of them.
#[derive(Debug)]
struct Cache {
    entries: HashMap<String, Cached>,
    limit: usize,
}

#[derive(Debug)]
struct Cached {
    answers: Vec<Ipv4Addr>,
    stored: Instant,
    expires: Instant,
}

impl Cache {
    fn new(limit: usize) -> Self {
        Cache { entries: HashMap::new(), limit }
    }

    fn get(&self, name: &str, now: Instant) -> Option<Vec<Ipv4Addr>> {
        self.entries.get(name).filter(|cached| cached.expires > now).map(|cached| cached.answers.clone())
    }

    /// Stores `answers` for `ttl`. When full, expired entries go first,
    /// then the oldest: a scan of the whole map, which is rare (only a
    /// full cache of live entries) and bounded by the limit.
    fn insert(&mut self, name: &str, answers: Vec<Ipv4Addr>, ttl: Duration, now: Instant) {
        if !self.entries.contains_key(name) && self.entries.len() >= self.limit {
            self.entries.retain(|_, cached| cached.expires > now);
            if self.entries.len() >= self.limit {
                let oldest = self.entries.iter().min_by_key(|(_, cached)| cached.stored).map(|(name, _)| name.clone());
                if let Some(oldest) = oldest {
                    self.entries.remove(&oldest);
                }
            }
        }
        self.entries.insert(name.to_owned(), Cached { answers, stored: now, expires: now + ttl });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(s: &str) -> DnsblSite {
        s.parse().unwrap()
    }

    fn listed(codes: &[[u8; 4]]) -> Lookup {
        Lookup::Answered(codes.iter().map(|&o| Ipv4Addr::from(o)).collect())
    }

    #[test]
    fn tally_adds_the_weights_of_matching_sites() {
        let sites = [
            site("zen.example*3"),
            site("filtered.example=127.0.0.[4..5]*2"),
            site("wl.example*-2"),
            site("zen.example*3"),
            site("clean.example*5"),
            site("down.example*4"),
            site("down.example=127.0.0.2"),
        ];
        let answers: HashMap<&str, Lookup> = [
            ("zen.example", listed(&[[127, 0, 0, 2], [127, 0, 0, 10]])),
            ("filtered.example", listed(&[[127, 0, 0, 3]])),
            ("wl.example", listed(&[[127, 0, 9, 2]])),
            ("clean.example", listed(&[])),
            ("down.example", Lookup::Failed("timed out".to_owned())),
        ]
        .into_iter()
        .collect();
        let got = tally(&sites, &answers);
        assert_eq!(got.score, 3 - 2 + 3);
        let hits: Vec<(&str, i32)> = got.hits.iter().map(|(d, w)| (d.as_str(), *w)).collect();
        assert_eq!(hits, [("zen.example", 3), ("wl.example", -2), ("zen.example", 3)]);
        assert_eq!(got.failed, ["down.example"]);
        assert_eq!(got.blocked_by(), Some("zen.example"));
    }

    #[test]
    fn blocked_by_is_the_heaviest_blocklist_first_on_ties() {
        let screening = |hits: &[(&str, i32)]| Screening {
            score: hits.iter().map(|(_, w)| w).sum(),
            hits: hits.iter().map(|(d, w)| ((*d).to_owned(), *w)).collect(),
            failed: Vec::new(),
        };
        assert_eq!(screening(&[]).blocked_by(), None);
        assert_eq!(screening(&[("wl.example", -5)]).blocked_by(), None);
        assert_eq!(screening(&[("zero.example", 0)]).blocked_by(), None);
        assert_eq!(screening(&[("a.example", 1), ("b.example", 3), ("c.example", 3)]).blocked_by(), Some("b.example"));
        assert_eq!(
            screening(&[("wl.example", -9), ("a.example", 2), ("b.example", 1)]).blocked_by(),
            Some("a.example")
        );
    }

    #[test]
    fn cache_keeps_answers_for_their_ttl() {
        let now = Instant::now();
        let mut cache = Cache::new(10);
        let two = vec![Ipv4Addr::new(127, 0, 0, 2)];
        cache.insert("2.0.0.127.zen.example.", two.clone(), seconds(0), now);
        assert_eq!(cache.get("2.0.0.127.zen.example.", now + MIN_TTL - Duration::from_secs(1)), Some(two.clone()));
        assert_eq!(cache.get("2.0.0.127.zen.example.", now + MIN_TTL), None, "TTL 0 is kept MIN_TTL");
        cache.insert("3.0.0.127.zen.example.", Vec::new(), seconds(u32::MAX), now);
        assert_eq!(cache.get("3.0.0.127.zen.example.", now + MAX_TTL - Duration::from_secs(1)), Some(Vec::new()));
        assert_eq!(cache.get("3.0.0.127.zen.example.", now + MAX_TTL), None, "a long TTL is cut to MAX_TTL");
        assert_eq!(seconds(300), Duration::from_secs(300));
        assert_eq!(cache.get("4.0.0.127.zen.example.", now), None);
    }

    #[test]
    fn a_full_cache_drops_expired_entries_then_the_oldest() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut cache = Cache::new(3);
        cache.insert("a.", Vec::new(), MIN_TTL, at(0));
        cache.insert("b.", Vec::new(), MAX_TTL, at(1));
        cache.insert("c.", Vec::new(), MAX_TTL, at(2));
        // "a." has expired: it goes, the others stay.
        cache.insert("d.", Vec::new(), MAX_TTL, at(100));
        assert_eq!(cache.entries.len(), 3);
        assert!(cache.get("b.", at(100)).is_some() && cache.get("c.", at(100)).is_some());
        // Nothing has expired: the oldest ("b.") goes.
        cache.insert("e.", Vec::new(), MAX_TTL, at(101));
        assert_eq!(cache.entries.len(), 3);
        assert!(cache.get("b.", at(101)).is_none());
        for kept in ["c.", "d.", "e."] {
            assert!(cache.get(kept, at(101)).is_some(), "{kept}");
        }
        // Replacing an entry evicts nothing.
        cache.insert("c.", vec![Ipv4Addr::new(127, 0, 0, 2)], MAX_TTL, at(102));
        assert_eq!(cache.entries.len(), 3);
        assert!(cache.get("d.", at(102)).is_some());
    }

    #[test]
    fn txt_reasons_are_printable_and_bounded() {
        assert_eq!(printable(b"listed: see http://x.example/?1.2.3.4"), "listed: see http://x.example/?1.2.3.4");
        assert_eq!(printable(b"a\r\nb\x1b[31m\xff"), "a??b?[31m?");
        assert_eq!(printable(&[b'x'; 1000]).len(), MAX_TXT);
    }

    #[tokio::test]
    async fn no_sites_no_lookups() {
        // A port nothing answers on: any query would fail, none is made.
        let dnsbl = Dnsbl::new(&["127.0.0.1:9".parse().unwrap()], Duration::from_secs(5)).unwrap();
        let started = Instant::now();
        assert_eq!(dnsbl.screen(&[], "192.0.2.1".parse().unwrap()).await, Screening::default());
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(matches!(Dnsbl::new(&[], Duration::from_secs(1)), Err(DnsError::NoNameserver)));
    }

    /// Compiles only if a screening can move between threads (a session
    /// task spawned on a multi-threaded runtime): no lock is held across
    /// an await.
    #[allow(dead_code)]
    fn screening_is_send(dnsbl: &Dnsbl, sites: &[DnsblSite], client: IpAddr) {
        fn send<T: Send>(_: T) {}
        send(dnsbl.screen(sites, client));
        send(dnsbl.txt(client, "zen.example"));
    }

    #[tokio::test]
    async fn join_all_runs_concurrently_and_keeps_order() {
        let started = Instant::now();
        // One after the other they would take 1.2 s.
        let delays = [600u64, 200, 400];
        let got = join_all(delays.iter().map(|&ms| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            ms
        }))
        .await;
        assert_eq!(got, delays);
        assert!(started.elapsed() < Duration::from_millis(1000), "{:?}", started.elapsed());
    }
}
