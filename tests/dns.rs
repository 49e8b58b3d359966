//! `[smtpd] reverse_lookup` (issue 4, DNS): the client's name comes from
//! a forward-confirmed PTR lookup, asked of a test nameserver on a
//! loopback port (never the real DNS), and reaches `connect from`, the
//! other log lines and `Received:`; an unconfirmed name or a silent
//! nameserver gives `unknown`, and the greeting waits no longer than
//! `reverse_lookup_timeout`.

use mortal_tests::dns::{self, TestDns};
use mortal_tests::{Instance, Options, Smtp};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

const REVERSE_NAME: &str = "1.0.0.127.in-addr.arpa.";

/// Sends one message from 127.0.0.1 and returns it as delivered.
fn send_one(mortal: &Instance, rcpt: &str) -> String {
    let mut smtp = Smtp::connect(mortal.port).expect("connect");
    assert!(smtp.greeting.starts_with("220 "), "{}", smtp.greeting);
    assert!(smtp.cmd("EHLO client.test").expect("EHLO").starts_with("250"));
    assert!(smtp.cmd("MAIL FROM:<a@example.test>").expect("MAIL").starts_with("250"));
    assert!(smtp.cmd(&format!("RCPT TO:<{rcpt}>")).expect("RCPT").starts_with("250"));
    assert!(smtp.cmd("DATA").expect("DATA").starts_with("354"));
    let reply = smtp.cmd("Subject: dns\r\n\r\nhello\r\n.").expect("end of data");
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    let _ = smtp.cmd("QUIT");
    let got = mortal.wait_for_delivery(rcpt, 1);
    String::from_utf8_lossy(&got[0]).into_owned()
}

#[test]
fn confirmed_name_reaches_log_and_received() {
    let server = TestDns::answering(Ipv4Addr::LOCALHOST);
    let mortal = Instance::start_with(Options { smtpd_extra: server.smtpd_keys("2s"), ..Options::default() });
    let text = send_one(&mortal, "named@example.test");
    assert!(text.contains("Received: from client.test (client.example.test [127.0.0.1])"), "{text}");
    mortal.wait_for_log("disconnect from client.example.test[127.0.0.1] ehlo=1");
    let log = mortal.log_text();
    assert!(log.contains("connect from client.example.test[127.0.0.1]"), "{log}");
    assert!(log.contains("client=client.example.test[127.0.0.1]"), "{log}");
    assert!(!log.contains("unknown[127.0.0.1]"), "every session was named:\n{log}");
    assert!(server.asked(REVERSE_NAME, dns::PTR) && server.asked(dns::PTR_NAME, dns::A));
}

#[test]
fn unconfirmed_name_is_unknown() {
    // The PTR name's A record is another address: a forged PTR.
    let server = TestDns::answering(Ipv4Addr::new(192, 0, 2, 1));
    let mortal = Instance::start_with(Options { smtpd_extra: server.smtpd_keys("2s"), ..Options::default() });
    let text = send_one(&mortal, "forged@example.test");
    assert!(text.contains("Received: from client.test (unknown [127.0.0.1])"), "{text}");
    mortal.wait_for_log("disconnect from unknown[127.0.0.1] ehlo=1");
    let log = mortal.log_text();
    assert!(log.contains("connect from unknown[127.0.0.1]"), "{log}");
    assert!(log.contains("warning: hostname client.example.test does not resolve to address 127.0.0.1"), "{log}");
    assert!(!log.contains("client.example.test["), "{log}");
    // The name was looked up, and refused for the forward answer.
    assert!(server.asked(REVERSE_NAME, dns::PTR) && server.asked(dns::PTR_NAME, dns::A));
}

#[test]
fn truncated_answers_are_asked_again_over_tcp() {
    // The sandbox's TCP rule for the nameserver port is what lets this
    // through: smtpd has no other TCP port to connect to.
    let server = TestDns::truncating();
    let mortal = Instance::start_with(Options { smtpd_extra: server.smtpd_keys("2s"), ..Options::default() });
    let mut smtp = Smtp::connect(mortal.port).expect("connect");
    assert!(smtp.greeting.starts_with("220 "), "{}", smtp.greeting);
    let _ = smtp.cmd("QUIT");
    // The start-up probe's session was the first such.
    let log = mortal.wait_for_log_count("disconnect from client.example.test[127.0.0.1] quit=1", 2);
    assert!(server.asked(REVERSE_NAME, dns::PTR), "UDP first");
    assert!(server.asked(REVERSE_NAME, dns::PTR + dns::TCP) && server.asked(dns::PTR_NAME, dns::A + dns::TCP));
    assert!(!log.contains("killed by signal"), "{log}");
}

#[test]
fn silent_nameserver_delays_greeting_by_at_most_the_timeout() {
    const TIMEOUT: Duration = Duration::from_secs(1);
    const SLACK: Duration = Duration::from_millis(1500);
    let server = TestDns::silent();
    let mortal = Instance::start_with(Options { smtpd_extra: server.smtpd_keys("1s"), ..Options::default() });
    let started = Instant::now();
    let mut smtp = Smtp::connect(mortal.port).expect("connect");
    let waited = started.elapsed();
    assert!(smtp.greeting.starts_with("220 "), "{}", smtp.greeting);
    // At least most of the timeout: the lookup really was tried.
    assert!(waited >= TIMEOUT - Duration::from_millis(100), "greeting after {waited:?}");
    assert!(waited <= TIMEOUT + SLACK, "greeting after {waited:?}");
    let _ = smtp.cmd("QUIT");
    // The start-up probe's session was the first such.
    mortal.wait_for_log_count("disconnect from unknown[127.0.0.1] quit=1 commands=1", 2);
}
