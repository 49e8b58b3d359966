//! Per-client limits across the whole smtpd pool (the anvil service),
//! relay control (trusted_networks, recipient_map) and the log lines
//! fail2ban's stock `postfix` filter bans on (issue 4).
//!
//! Each test talks from its own loopback source address, so the harness's
//! start-up probe (from 127.0.0.1) never counts against the limits tested.

use mortal_proto::envelope::{BodyType, ClientInfo, Notify, RecipientInfo, SenderInfo};
use mortal_proto::ipc::{Decoder, PROTOCOL_VERSION, Reply, Request, encode_data};
use mortal_proto::spool::QueueDir;
use mortal_tests::Smtp;
use mortal_tests::netpeer::{connect_from, fail2ban_regex};
use mortal_tests::{Instance, Options, TempDir, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::fs;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// The limits of the shared instance: two connections at once, ten per
/// minute, two messages per minute, loopback not exempt.
fn limited() -> Instance {
    Instance::start_with(Options {
        smtpd_prefork: 4,
        smtpd_min_spare: 2,
        smtpd_max_spare: 6,
        smtpd_extra: "client_connection_count_limit = 2\nclient_connection_rate_limit = 10\n\
                      client_message_rate_limit = 2\nclient_limit_exceptions = []\n"
            .into(),
        extra: "\n[anvil]\nrate_time_unit = \"60s\"\n".into(),
        ..Options::default()
    })
}

fn greet(src: Ipv4Addr, port: u16) -> (Smtp, String) {
    let mut c = Smtp::over(connect_from(src, port).expect("connect"));
    let greeting = c.read_reply().unwrap_or_else(|e| format!("no greeting: {e}"));
    (c, greeting)
}

#[test]
fn limits_apply_across_the_pool() {
    let mortal = limited();

    // Concurrency: the third connection at once is refused, Postfix's way.
    let src = Ipv4Addr::new(127, 0, 0, 5);
    let (first, g1) = greet(src, mortal.port);
    let (_second, g2) = greet(src, mortal.port);
    assert!(g1.starts_with("220 ") && g2.starts_with("220 "), "{g1}{g2}");
    let (mut third, g3) = greet(src, mortal.port);
    assert_eq!(g3, "421 4.7.0 mortal.test Error: too many connections from 127.0.0.5\r\n");
    assert!(third.closed());
    let log = mortal
        .wait_for_log("warning: Connection concurrency limit exceeded: 3 from unknown[127.0.0.5] for service smtp");
    assert!(log.contains("disconnect from unknown[127.0.0.5] commands=0"), "{log}");
    // Served by different processes, counted together; a closed session
    // frees its slot.
    drop(first);
    let again = wait_for("a free slot for 127.0.0.5", || {
        let (c, g) = greet(src, mortal.port);
        g.starts_with("220 ").then_some(c)
    });
    assert!(again.is_some(), "{}", mortal.log_text());

    // Connection rate: ten a minute, the eleventh is refused.
    let src = Ipv4Addr::new(127, 0, 0, 6);
    for i in 1..=10 {
        let (mut c, g) = greet(src, mortal.port);
        assert!(g.starts_with("220 "), "connection {i}: {g}");
        assert!(c.cmd("QUIT").unwrap().starts_with("221 "));
        assert!(c.closed());
    }
    let (_, g) = greet(src, mortal.port);
    assert_eq!(g, "421 4.7.0 mortal.test Error: too many connections from 127.0.0.6\r\n");
    mortal.wait_for_log("warning: Connection rate limit exceeded: 11 from unknown[127.0.0.6] for service smtp");

    // Message rate: the third MAIL in the unit gets 450 4.7.1, also on a
    // new connection.
    let src = Ipv4Addr::new(127, 0, 0, 7);
    let (mut c, g) = greet(src, mortal.port);
    assert!(g.starts_with("220 "));
    assert!(c.cmd("EHLO client.test").unwrap().starts_with("250"));
    for _ in 0..2 {
        assert_eq!(c.cmd("MAIL FROM:<a@example.test>").unwrap(), "250 2.1.0 Ok\r\n");
        assert!(c.cmd("RSET").unwrap().starts_with("250"));
    }
    assert_eq!(c.cmd("MAIL FROM:<a@example.test>").unwrap(), "450 4.7.1 Error: too much mail from 127.0.0.7\r\n");
    let (mut c2, _) = greet(src, mortal.port);
    assert!(c2.cmd("EHLO client.test").unwrap().starts_with("250"));
    assert!(c2.cmd("MAIL FROM:<a@example.test>").unwrap().starts_with("450 4.7.1"));
    let log = mortal.wait_for_log(
        "warning: Message delivery request rate limit exceeded: 4 from unknown[127.0.0.7] for service smtp",
    );
    assert!(log.contains("Message delivery request rate limit exceeded: 3 from unknown[127.0.0.7]"), "{log}");
    // Other clients are unaffected.
    let (mut other, g) = greet(Ipv4Addr::new(127, 0, 0, 8), mortal.port);
    assert!(g.starts_with("220 "));
    assert!(other.mail("a@example.test", "b@example.test", "fine").starts_with("250 2.0.0"));
}

/// Pids of the instance's anvil process.
fn anvil_pid(mortal: &Instance) -> u32 {
    let found = wait_for("the anvil process", || mortal.children_running("mortal-anvil").first().copied());
    found.unwrap_or_else(|| panic!("no mortal-anvil child\n{}", mortal.log_text()))
}

/// Resumes a stopped process when dropped, even if the test failed.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0 as i32), Signal::SIGCONT);
    }
}

#[test]
fn a_hung_or_killed_anvil_fails_open_and_is_replaced() {
    let mortal = Instance::start_with(Options {
        smtpd_extra: "client_connection_count_limit = 1\nclient_limit_exceptions = []\n".into(),
        ..Options::default()
    });
    let src = Ipv4Addr::new(127, 0, 0, 9);
    // Working anvil: the second connection at once is refused.
    let (_held, g) = greet(src, mortal.port);
    assert!(g.starts_with("220 "));
    let (_, g) = greet(src, mortal.port);
    assert!(g.starts_with("421 4.7.0"), "{g}");

    // anvil stopped (worse than dead: its socket still takes connections):
    // sessions are served after the bounded wait, without limits.
    let pid = anvil_pid(&mortal);
    kill(Pid::from_raw(pid as i32), Signal::SIGSTOP).expect("SIGSTOP anvil");
    let resume = Resume(pid);
    let src = Ipv4Addr::new(127, 0, 0, 10);
    let started = Instant::now();
    let (mut a, ga) = greet(src, mortal.port);
    let (mut b, gb) = greet(src, mortal.port);
    let waited = started.elapsed();
    assert!(ga.starts_with("220 ") && gb.starts_with("220 "), "{ga}{gb}");
    assert!(waited < Duration::from_secs(3), "fail-open took {waited:?}");
    assert!(a.mail("a@example.test", "b@example.test", "anvil down").starts_with("250 2.0.0"));
    let log = mortal.wait_for_log("timeout exceeded: no client limits for 127.0.0.10");
    assert!(log.contains("warning: anvil "), "{log}");
    assert!(b.cmd("QUIT").unwrap().starts_with("221"));
    drop(resume);

    // A broken request ends that anvil connection and nothing else.
    let socket = mortal.spool().join("run/private/anvil");
    let mut raw = UnixStream::connect(&socket).expect("connect to anvil");
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    raw.write_all(&[0xA7, 1, 2, 4, 192, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap();
    assert!(matches!(raw.read(&mut [0u8; 12]), Ok(0) | Err(_)), "Message before Connect must end the connection");
    mortal.wait_for_log("warning: protocol violation from smtpd: first request is not Connect");

    // Killed: the master starts a new anvil, which counts from zero.
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("SIGKILL anvil");
    let successor = wait_for("a new anvil", || {
        let new = anvil_pid(&mortal);
        (new != pid).then_some(new)
    });
    assert!(successor.is_some(), "{}", mortal.log_text());
    let src = Ipv4Addr::new(127, 0, 0, 11);
    let limited = wait_for("limits enforced again", || {
        let (held, g) = greet(src, mortal.port);
        assert!(g.starts_with("220 "), "{g}");
        let (_, second) = greet(src, mortal.port);
        drop(held);
        second.starts_with("421 4.7.0").then_some(())
    });
    assert!(limited.is_some(), "{}", mortal.log_text());
}

#[test]
fn relay_control_recipient_map_and_fail2ban() {
    // Declared first, so it is removed after the instance stopped; open
    // to smtpd after it dropped to the mail user.
    let dir = TempDir::new("recipient-map");
    fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let map = dir.0.join("recipients");
    fs::write(&map, "# local users\nalice@example.test\nBob@Example.test\n").unwrap();
    let mortal = Instance::start_with(Options {
        server_extra: format!(
            "trusted_networks = [\"127.0.0.20/32\"]\nrecipient_map = {:?}\n",
            map.display().to_string()
        ),
        ..Options::default()
    });
    let untrusted = Ipv4Addr::new(127, 0, 0, 21);
    let (mut c, _) = greet(untrusted, mortal.port);
    assert!(c.cmd("EHLO spammer.test").unwrap().starts_with("250"));
    assert!(c.cmd("MAIL FROM:<s@spammer.test>").unwrap().starts_with("250"));
    assert_eq!(
        c.cmd("RCPT TO:<victim@elsewhere.test>").unwrap(),
        "554 5.7.1 <victim@elsewhere.test>: Relay access denied\r\n"
    );
    assert_eq!(
        c.cmd("RCPT TO:<nobody@example.test>").unwrap(),
        "550 5.1.1 <nobody@example.test>: Recipient address rejected: User unknown in local recipient table\r\n"
    );
    assert_eq!(c.cmd("RCPT TO:<BOB@example.TEST>").unwrap(), "250 2.1.5 Ok\r\n");
    assert_eq!(c.cmd("RCPT TO:<postmaster@example.test>").unwrap(), "250 2.1.5 Ok\r\n");
    assert!(c.cmd("QUIT").unwrap().starts_with("221"));

    // A trusted network relays (cleanup agrees), but is still held to the
    // local recipient table.
    let (mut t, _) = greet(Ipv4Addr::new(127, 0, 0, 20), mortal.port);
    assert!(t.cmd("EHLO relay.test").unwrap().starts_with("250"));
    assert!(t.cmd("MAIL FROM:<app@example.test>").unwrap().starts_with("250"));
    assert!(t.cmd("RCPT TO:<nobody@example.test>").unwrap().starts_with("550 5.1.1"));
    assert!(t.cmd("RSET").unwrap().starts_with("250"));
    assert!(t.mail("app@example.test", "friend@elsewhere.test", "relayed").starts_with("250 2.0.0"));
    mortal.wait_for_delivery("friend@elsewhere.test", 1);
    assert!(t.cmd("QUIT").unwrap().starts_with("221"));

    let log = mortal.wait_for_log("NOQUEUE: reject: RCPT from unknown[127.0.0.20]: 550 5.1.1");
    assert!(
        log.contains(
            "NOQUEUE: reject: RCPT from unknown[127.0.0.21]: 554 5.7.1 <victim@elsewhere.test>: Relay access denied; \
             from=<s@spammer.test> to=<victim@elsewhere.test> proto=ESMTP helo=<spammer.test>"
        ),
        "{log}"
    );

    // fail2ban's stock filter finds every reject, unedited, and nothing else.
    let rejects: Vec<&str> = log.lines().filter(|l| l.contains(": reject: RCPT from ")).collect();
    assert_eq!(rejects.len(), 3, "{log}");
    let (matched, report) = fail2ban_regex(&mortal.log, "/etc/fail2ban/filter.d/postfix.conf");
    assert_eq!(matched, rejects, "fail2ban-regex must match exactly the reject lines:\n{report}");

    // `mortal reload` (SIGHUP) replaces the processes, which re-read the map.
    fs::write(&map, "alice@example.test\ncarol@example.test\n").unwrap();
    kill(Pid::from_raw(mortal.master_pid() as i32), Signal::SIGHUP).expect("SIGHUP master");
    let reloaded = wait_for("carol accepted after reload", || {
        let (mut c, g) = greet(untrusted, mortal.port);
        if !g.starts_with("220 ") {
            return None;
        }
        c.cmd("EHLO client.test").ok()?;
        c.cmd("MAIL FROM:<a@example.test>").ok()?;
        let reply = c.cmd("RCPT TO:<carol@example.test>").ok()?;
        reply.starts_with("250").then_some(())
    });
    assert!(reloaded.is_some(), "{}", mortal.log_text());
}

/// Checking twice is the defence: a compromised smtpd that skips the relay
/// rule still cannot spool mail for a foreign domain, because cleanup
/// applies the same rule (`mortal_proto::relay`) to what it is sent, and a
/// trusted client's relaying is accepted by both.
#[test]
fn cleanup_applies_the_relay_rule_again() {
    let mortal = Instance::start_with(Options {
        server_extra: "trusted_networks = [\"192.0.2.128/25\", \"2001:db8::/32\"]\n".into(),
        ..Options::default()
    });
    let socket = mortal.spool().join("run/private/cleanup");
    for (client, rcpt, refused) in [
        ("192.0.2.1", "victim@elsewhere.test", true),
        ("192.0.2.1", "victim@sub.example.test", true),
        ("192.0.2.1", "root@[127.0.0.1]", true),
        ("2001:db9::1", "victim@elsewhere.test", true),
        ("192.0.2.200", "friend@elsewhere.test", false),
        ("2001:db8::25", "friend@elsewhere.test", false),
        ("192.0.2.1", "alice@EXAMPLE.test", false),
    ] {
        let mut sock = UnixStream::connect(&socket).expect("connect to cleanup");
        sock.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
        let mut out = Vec::new();
        Request::Hello { version: PROTOCOL_VERSION }.encode(&mut out);
        let info = ClientInfo {
            addr: client.parse().expect("client address"),
            name: "unknown".into(),
            helo: "client.test".into(),
            protocol: "ESMTP".into(),
            tls: String::new(),
            auth: None,
        };
        Request::Client(info).encode(&mut out);
        let sender = SenderInfo {
            address: "a@example.test".into(),
            body: BodyType::SevenBit,
            smtputf8: false,
            ret: None,
            envid: String::new(),
        };
        Request::Sender(sender).encode(&mut out);
        sock.write_all(&out).expect("write envelope head");
        let mut decoder = Decoder::new();
        let Reply::QueueId(id) = read_reply(&mut sock, &mut decoder) else { panic!("no queue id for {client}") };
        let mut out = Vec::new();
        Request::Recipient(RecipientInfo { address: rcpt.into(), notify: Notify::default(), orcpt: String::new() })
            .encode(&mut out);
        encode_data(b"Subject: relay\r\n\r\nbody\r\n", &mut out);
        Request::End.encode(&mut out);
        // A refusal may come before cleanup has read all of it.
        let _ = sock.write_all(&out);
        let Reply::Answer { code, status, text } = read_reply(&mut sock, &mut decoder) else {
            panic!("no answer for {rcpt} from {client}")
        };
        if refused {
            let answer = (code.get(), status.to_string(), text.as_str());
            assert_eq!(answer, (451, "4.3.0".into(), "Error: internal protocol error"), "{rcpt} from {client}");
            mortal.wait_for_log(&format!("warning: {id}: smtpd sent recipient <{rcpt}> outside accepted_domains"));
            assert!(!mortal.queue_files(QueueDir::Incoming).iter().any(|f| f == id.as_str()), "{id} left in incoming/");
        } else {
            assert_eq!((code.get(), text), (250, format!("Ok: queued as {id}")), "{rcpt} from {client}");
        }
    }
}

fn read_reply(sock: &mut UnixStream, decoder: &mut Decoder) -> Reply {
    loop {
        if let Some(reply) = decoder.next_reply().expect("cleanup sends valid records") {
            return reply;
        }
        let mut buf = [0; 1024];
        let n = sock.read(&mut buf).expect("cleanup answers");
        assert!(n > 0, "cleanup hung up without an answer");
        decoder.feed(&buf[..n]);
    }
}
