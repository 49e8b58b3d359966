//! postscreen-style weighted DNS list lookups (`mortal_smtpd::dnsbl`)
//! against a real DNS list server: Debian's rbldnsd on a loopback port
//! (`support/rbldnsd.rs`), never the real DNS. A listing adds its site's
//! weight, an allowlist takes its weight off, a filter decides which
//! answers count, answers are cached, and a silent nameserver costs at
//! most the timeout, with the failed sites named and logged.

use mortal_proto::dnsbl::DnsblSite;
use mortal_smtpd::dnsbl::{Dnsbl, Screening};
use mortal_tests::dns::TestDns;
use mortal_tests::rbldnsd::Rbldnsd;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The per-screening timeout against rbldnsd, which answers in well
/// under a millisecond on loopback.
const TIMEOUT: Duration = Duration::from_secs(2);

/// Listed in zen.example with the default answer, and in wl.example.
const LISTED: &str = "127.0.0.2";
/// Listed in zen.example with answer 127.0.0.4 and a TXT reason.
const LISTED_WITH_CODE: &str = "127.0.0.3";
/// Listed nowhere.
const CLEAN: &str = "192.0.2.1";

/// rbldnsd serving the zones every test here uses.
fn lists() -> Rbldnsd {
    Rbldnsd::start(&[
        ("zen.example", &[LISTED, "127.0.0.3 :127.0.0.4:listed for test $"]),
        ("wl.example", &["127.0.0.2 :127.0.9.2:allowlisted"]),
    ])
}

fn sites(list: &[&str]) -> Vec<DnsblSite> {
    list.iter().map(|s| s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))).collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

fn dnsbl(server: SocketAddr, timeout: Duration) -> Dnsbl {
    Dnsbl::new(&[server], timeout).expect("DNS list client")
}

fn hits(screening: &Screening) -> Vec<(&str, i32)> {
    screening.hits.iter().map(|(domain, weight)| (domain.as_str(), *weight)).collect()
}

#[tokio::test]
async fn listed_client_scores_the_site_weight() {
    let server = lists();
    let dnsbl = dnsbl(server.addr(), TIMEOUT);
    let got = dnsbl.screen(&sites(&["zen.example*3"]), ip(LISTED)).await;
    assert_eq!(got.score, 3, "{got:?}");
    assert_eq!(hits(&got), [("zen.example", 3)]);
    assert_eq!(got.blocked_by(), Some("zen.example"));
    assert!(got.failed.is_empty(), "{got:?}");
    // An IPv4-mapped IPv6 client is asked about as the IPv4 address.
    let mapped = dnsbl.screen(&sites(&["zen.example*3"]), ip("::ffff:127.0.0.2")).await;
    assert_eq!(mapped, got);
    // The answer 127.0.0.4 lists too, and its TXT reason comes back.
    let coded = dnsbl.screen(&sites(&["zen.example*2"]), ip(LISTED_WITH_CODE)).await;
    assert_eq!((coded.score, coded.blocked_by()), (2, Some("zen.example")), "{coded:?}");
    let reason = dnsbl.txt(ip(LISTED_WITH_CODE), "zen.example").await;
    assert_eq!(reason.as_deref(), Some("listed for test 127.0.0.3"));
}

#[tokio::test]
async fn unlisted_client_scores_zero() {
    let server = lists();
    let dnsbl = dnsbl(server.addr(), TIMEOUT);
    let got = dnsbl.screen(&sites(&["zen.example*3", "wl.example*-2"]), ip(CLEAN)).await;
    assert_eq!(got, Screening::default(), "NXDOMAIN is not listed and not a failure");
    assert_eq!(got.blocked_by(), None);
    assert_eq!(dnsbl.txt(ip(CLEAN), "zen.example").await, None);
}

#[tokio::test]
async fn a_filter_that_does_not_match_the_code_does_not_list() {
    let server = lists();
    let dnsbl = dnsbl(server.addr(), TIMEOUT);
    // LISTED answers 127.0.0.2, LISTED_WITH_CODE 127.0.0.4.
    let filtered = sites(&["zen.example=127.0.0.[10..11]*5", "zen.example=127.0.0.4*7"]);
    let got = dnsbl.screen(&filtered, ip(LISTED)).await;
    assert_eq!(got, Screening::default());
    let got = dnsbl.screen(&filtered, ip(LISTED_WITH_CODE)).await;
    assert_eq!((got.score, hits(&got)), (7, vec![("zen.example", 7)]), "the filter that matches counts");
}

#[tokio::test]
async fn an_allowlist_offsets_a_listing() {
    let server = lists();
    let dnsbl = dnsbl(server.addr(), TIMEOUT);
    let got = dnsbl.screen(&sites(&["zen.example*3", "wl.example*-2"]), ip(LISTED)).await;
    assert_eq!(got.score, 1, "{got:?}");
    assert_eq!(hits(&got), [("zen.example", 3), ("wl.example", -2)]);
    assert_eq!(got.blocked_by(), Some("zen.example"));
    // Allowed more than blocked: a negative score, and no blocklist to name
    // when only the allowlist lists the client.
    let got = dnsbl.screen(&sites(&["zen.example*1", "wl.example*-5"]), ip(LISTED)).await;
    assert_eq!(got.score, -4);
    let got = dnsbl.screen(&sites(&["wl.example*-5"]), ip(LISTED)).await;
    assert_eq!((got.score, got.blocked_by()), (-5, None));
}

#[tokio::test]
async fn each_site_counts_its_own_weight() {
    let server = lists();
    let dnsbl = dnsbl(server.addr(), TIMEOUT);
    // One domain under three filters: two match 127.0.0.2.
    let got = dnsbl
        .screen(&sites(&["zen.example*2", "zen.example=127.0.0.2*3", "zen.example=127.0.0.4*50"]), ip(LISTED))
        .await;
    assert_eq!(got.score, 5, "{got:?}");
    assert_eq!(hits(&got), [("zen.example", 2), ("zen.example", 3)]);
    assert_eq!(got.blocked_by(), Some("zen.example"));
    // A site named twice counts twice, as in postscreen.
    let got = dnsbl.screen(&sites(&["zen.example*2", "zen.example*2"]), ip(LISTED)).await;
    assert_eq!((got.score, got.hits.len()), (4, 2));
}

#[tokio::test]
async fn answers_are_cached() {
    let mut server = lists();
    let dnsbl = dnsbl(server.addr(), Duration::from_secs(1));
    let list = sites(&["zen.example*3", "wl.example*-2"]);
    let listed = dnsbl.screen(&list, ip(LISTED)).await;
    assert_eq!(listed.score, 1, "{listed:?}");
    let clean = dnsbl.screen(&list, ip(CLEAN)).await;
    assert_eq!(clean, Screening::default());
    server.stop();
    // The server is gone: a client not asked about before fails now...
    let fresh = dnsbl.screen(&list, ip(LISTED_WITH_CODE)).await;
    assert_eq!(fresh.failed, ["zen.example", "wl.example"], "{fresh:?}");
    // ...and the two asked about before are answered from the cache,
    // listing and NXDOMAIN alike.
    assert_eq!(dnsbl.screen(&list, ip(LISTED)).await, listed);
    assert_eq!(dnsbl.screen(&list, ip(CLEAN)).await, clean);
    // Clones share the cache.
    assert_eq!(dnsbl.clone().screen(&list, ip(LISTED)).await, listed);
}

/// Collects what the tracing subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log buffer")).into_owned()
    }
}

#[tokio::test]
async fn a_silent_nameserver_costs_at_most_the_timeout() {
    use tracing_subscriber::util::SubscriberInitExt;
    const SILENT_TIMEOUT: Duration = Duration::from_secs(1);
    // Three sites asked one after the other would take three timeouts.
    const MARGIN: Duration = Duration::from_millis(900);
    let log = Captured::default();
    let writer = log.clone();
    // The test runs on one thread (tokio's current-thread runtime), so
    // the thread's default subscriber sees every warning of the call.
    let _subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .without_time()
        .with_level(false)
        .with_target(false)
        .finish()
        .set_default();
    let silent = TestDns::silent();
    let dnsbl = dnsbl(SocketAddr::from(([127, 0, 0, 1], silent.port)), SILENT_TIMEOUT);
    let started = Instant::now();
    let got = dnsbl.screen(&sites(&["zen.example*3", "wl.example*-2", "other.example"]), ip(LISTED)).await;
    let elapsed = started.elapsed();
    assert!(elapsed < SILENT_TIMEOUT + MARGIN, "took {elapsed:?}");
    assert_eq!(got.score, 0);
    assert!(got.hits.is_empty());
    assert_eq!(got.failed, ["zen.example", "wl.example", "other.example"]);
    let text = log.text();
    for (domain, name) in [
        ("zen.example", "2.0.0.127.zen.example"),
        ("wl.example", "2.0.0.127.wl.example"),
        ("other.example", "2.0.0.127.other.example"),
    ] {
        let line = format!("warning: dnsbl {domain}: lookup of {name}: ");
        assert!(text.contains(&line), "no {line:?} in:\n{text}");
    }
}
