//! PROXY protocol (haproxy v1 and v2) on `[smtpd] proxy_listen`: the real
//! client address is what smtpd logs and what cleanup writes into
//! `Received:`; only `proxy_trusted` peers may send the header; HAProxy
//! itself, with `send-proxy` and `send-proxy-v2`, interoperates (issue 4).

use mortal_tests::netpeer::{Haproxy, connect_from, connect_to, proxy_v1, proxy_v2};
use mortal_tests::{Instance, Options, Smtp, wait_for};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

const BALANCER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const HEALTH_CHECKER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const STRANGER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// The proxy listener's address: not the plain listener's 127.0.0.1, as
/// both take their ports from the kernel and smtpd tells them apart by
/// address.
const PROXY_LISTENER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 10);

/// An instance with a plain listener and a proxy listener on a port the
/// master takes from the kernel; the proxy listener's address is returned
/// too.
fn start(proxy_timeout: &str) -> (Instance, SocketAddrV4) {
    start_with(proxy_timeout, "")
}

fn start_with(proxy_timeout: &str, smtpd_extra: &str) -> (Instance, SocketAddrV4) {
    let mut mortal = Instance::start_with(Options {
        smtpd_extra: format!(
            "proxy_listen = [\"{PROXY_LISTENER}:0\"]\nproxy_trusted = [\"127.0.0.1/32\", \"127.0.0.3\"]\n\
             proxy_timeout = \"{proxy_timeout}\"\n{smtpd_extra}"
        ),
        ..Options::default()
    });
    let proxy = SocketAddrV4::new(PROXY_LISTENER, mortal.proxy_port());
    (mortal, proxy)
}

fn sa(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

#[test]
fn proxy_headers_name_the_client_in_log_and_received() {
    // Two connections a minute per client, loopback included: the limits
    // must apply to the client named in the header, never to the balancer.
    let (mortal, proxy) = start_with("5s", "client_connection_rate_limit = 2\nclient_limit_exceptions = []\n");
    let dst = proxy;

    // v1 from the balancer.
    let mut c = Smtp::over(connect_to(BALANCER, proxy).unwrap());
    c.send_raw(&proxy_v1(sa("192.0.2.10:40001"), dst)).unwrap();
    assert!(c.read_reply().unwrap().starts_with("220 "));
    assert!(c.mail("a@example.test", "v1@example.test", "via v1").starts_with("250 "));
    c.cmd("QUIT").unwrap();
    mortal.wait_for_log("connect from unknown[192.0.2.10]");
    let got = mortal.wait_for_delivery("v1@example.test", 1);
    let text = String::from_utf8_lossy(&got[0]);
    assert!(text.contains("Received: from client.test (unknown [192.0.2.10])"), "{text}");

    // v2 PROXY from the balancer.
    let mut c = Smtp::over(connect_to(BALANCER, proxy).unwrap());
    c.send_raw(&proxy_v2(1, sa("198.51.100.7:40002"), dst)).unwrap();
    assert!(c.read_reply().unwrap().starts_with("220 "));
    assert!(c.mail("a@example.test", "v2@example.test", "via v2").starts_with("250 "));
    c.cmd("QUIT").unwrap();
    let got = mortal.wait_for_delivery("v2@example.test", 1);
    let text = String::from_utf8_lossy(&got[0]);
    assert!(text.contains("Received: from client.test (unknown [198.51.100.7])"), "{text}");
    let log = mortal.wait_for_log("disconnect from unknown[198.51.100.7]");
    assert!(log.contains(": client=unknown[198.51.100.7]"), "{log}");

    // v2 LOCAL (a health check): the socket's own peer stands, and the
    // balancer's own connections are never limited.
    for _ in 0..3 {
        let mut c = Smtp::over(connect_to(HEALTH_CHECKER, proxy).unwrap());
        c.send_raw(&proxy_v2(0, sa("203.0.113.1:1"), dst)).unwrap();
        assert!(c.read_reply().unwrap().starts_with("220 "));
        c.cmd("QUIT").unwrap();
    }
    let log = mortal.wait_for_log("connect from unknown[127.0.0.3]");
    assert!(!log.contains("203.0.113.1"), "LOCAL addresses must be ignored\n{log}");

    // The client behind the balancer is what is limited: its third
    // connection is refused, by its own address.
    for n in 1..=3 {
        let mut c = Smtp::over(connect_to(BALANCER, proxy).unwrap());
        c.send_raw(&proxy_v1(sa("192.0.2.99:40100"), dst)).unwrap();
        let reply = c.read_reply().unwrap();
        if n < 3 {
            assert!(reply.starts_with("220 "), "connection {n}: {reply}");
            c.cmd("QUIT").unwrap();
        } else {
            assert_eq!(reply, "421 4.7.0 mortal.test Error: too many connections from 192.0.2.99\r\n");
        }
    }
    mortal.wait_for_log("warning: Connection rate limit exceeded: 3 from unknown[192.0.2.99] for service smtp");

    // The plain listener takes no header.
    let mut plain = Smtp::connect(mortal.port).unwrap();
    assert!(plain.greeting.starts_with("220 "));
    assert!(plain.cmd("QUIT").unwrap().starts_with("221 "));
}

#[test]
fn untrusted_garbled_slow_and_early_peers_are_handled() {
    let (mortal, proxy) = start("1s");
    let dst = proxy;

    // A valid header, but from a peer outside proxy_trusted: dropped unread.
    let mut c = Smtp::over(connect_to(STRANGER, proxy).unwrap());
    let _ = c.send_raw(&proxy_v1(sa("192.0.2.66:1234"), dst));
    assert!(c.closed(), "an untrusted peer must get no greeting");
    let log =
        mortal.wait_for_log("warning: haproxy: connection from unknown[127.0.0.2] refused: not in smtpd.proxy_trusted");
    assert!(!log.contains("connect from unknown[192.0.2.66]"), "{log}");

    // A trusted peer that sends SMTP instead of a header.
    let mut c = Smtp::over(connect_to(BALANCER, proxy).unwrap());
    c.send_raw(b"EHLO client.test\r\n").unwrap();
    assert!(c.closed());
    mortal.wait_for_log("warning: haproxy read from unknown[127.0.0.1]: not a PROXY protocol header");

    // Half a header, then silence: dropped after proxy_timeout.
    let started = Instant::now();
    let mut c = Smtp::over(connect_to(BALANCER, proxy).unwrap());
    c.send_raw(b"PROXY TCP4 192.0.2.").unwrap();
    assert!(c.closed());
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(5), "waited {waited:?}");
    mortal.wait_for_log("warning: haproxy read from unknown[127.0.0.1]: timeout error");

    // The client behind the balancer talked before the greeting: the
    // bytes after the header are early input, handled as such.
    let mut c = Smtp::over(connect_to(BALANCER, proxy).unwrap());
    let mut bytes = proxy_v1(sa("192.0.2.11:40003"), dst);
    bytes.extend_from_slice(b"EHLO early.test\r\n");
    c.send_raw(&bytes).unwrap();
    let greeting = c.read_reply().unwrap();
    assert!(greeting.starts_with("220 "), "{greeting}");
    assert!(c.read_reply().unwrap().starts_with("554 5.5.0"));
    mortal.wait_for_log("improper command pipelining after CONNECT from unknown[192.0.2.11]");

    // None of this disturbed the pool.
    let mut c = Smtp::over(connect_to(BALANCER, proxy).unwrap());
    c.send_raw(&proxy_v2(1, sa("192.0.2.12:40004"), dst)).unwrap();
    assert!(c.read_reply().unwrap().starts_with("220 "));
    c.cmd("QUIT").unwrap();
    mortal.wait_for_log("disconnect from unknown[192.0.2.12]");
}

/// HAProxy in TCP mode in front of mortal, with both header versions; the
/// client connects from 127.0.0.2, which is what must be logged.
#[test]
fn haproxy_send_proxy_v1_and_v2_pass_the_real_client() {
    let (mortal, proxy) = start("5s");
    for (n, send_proxy) in ["send-proxy", "send-proxy-v2"].into_iter().enumerate() {
        let haproxy = Haproxy::start(&mortal.dir, proxy, send_proxy);
        let rcpt = format!("haproxy{n}@example.test");
        let mut c = Smtp::over(connect_from(STRANGER, haproxy.port).unwrap());
        let greeting = c.read_reply().unwrap();
        assert!(greeting.starts_with("220 mortal.test"), "{send_proxy}: {greeting}");
        let reply = c.mail("a@example.test", &rcpt, send_proxy);
        assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{send_proxy}: {reply}");
        assert!(c.cmd("QUIT").unwrap().starts_with("221 "));
        let got = mortal.wait_for_delivery(&rcpt, 1);
        let text = String::from_utf8_lossy(&got[0]);
        assert!(text.contains("(unknown [127.0.0.2])"), "{send_proxy}: {text}");
        drop(haproxy);
    }
    // smtpd logs the disconnect after its reply to QUIT: wait for both.
    let log = wait_for("two disconnect lines", || {
        let log = mortal.log_text();
        (count(&log, ": disconnect from unknown[127.0.0.2]") == 2).then_some(log)
    })
    .unwrap_or_else(|| panic!("{}", mortal.log_text()));
    assert_eq!(count(&log, ": connect from unknown[127.0.0.2]"), 2, "{log}");
    assert!(!log.contains("haproxy read"), "no header errors expected\n{log}");
    // The balancer's own address is never taken for the client.
    let proxied_sessions = wait_for("client= lines", || {
        let n = count(&mortal.log_text(), ": client=unknown[127.0.0.2]");
        (n == 2).then_some(n)
    });
    assert_eq!(proxied_sessions, Some(2), "{}", mortal.log_text());
}
