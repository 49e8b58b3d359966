//! smtpd's policy delegation client against a scripted policy server
//! (`support::policy`): the replies and log lines Postfix gives for each
//! access(5) action, what smtpd tells the server, connection reuse, and
//! the default action when the server is down, slow or talks nonsense.
//! postgrey itself is in tests/filters.rs.

use mortal_tests::policy::ScriptedPolicy;
use mortal_tests::{ClosedPort, Instance, Options, Smtp};
use std::time::{Duration, Instant};

fn start(endpoint: &str, keys: &str) -> Instance {
    let extra = format!("[[smtpd.policy]]\nendpoint = \"{endpoint}\"\n{keys}\n");
    Instance::start_with(Options { extra, ..Options::default() })
}

fn transaction(inst: &Instance) -> Smtp {
    let mut smtp = Smtp::connect(inst.port).expect("connect");
    assert!(smtp.cmd("EHLO client.test").unwrap().starts_with("250"));
    assert_eq!(smtp.cmd("MAIL FROM:<a@example.org> SIZE=300").unwrap(), "250 2.1.0 Ok\r\n");
    smtp
}

/// Each action's reply, exactly as Postfix words it, and its log line;
/// the message still reaches the recipients the server let through.
#[test]
fn rcpt_answers_follow_the_server() {
    let policy = ScriptedPolicy::start();
    let inst = start(&policy.endpoint(), "");
    let mut smtp = transaction(&inst);
    let cases = [
        ("reject", "554 5.7.1 <reject@example.test>: Recipient address rejected: go away\r\n"),
        (
            "greylist",
            "450 4.2.0 <greylist@example.test>: Recipient address rejected: Greylisted, see http://postgrey.example/help\r\n",
        ),
        ("code", "550 5.1.1 <code@example.test>: Recipient address rejected: no such user here\r\n"),
        ("warn", "250 2.1.5 Ok\r\n"),
        ("ok", "250 2.1.5 Ok\r\n"),
    ];
    for (local, want) in cases {
        assert_eq!(smtp.cmd(&format!("RCPT TO:<{local}@example.test>")).unwrap(), want, "{local}");
    }
    assert!(smtp.cmd("DATA").unwrap().starts_with("354"));
    let queued = smtp.cmd("Subject: policy\r\n\r\nhello\r\n.").unwrap();
    assert!(queued.starts_with("250 2.0.0 Ok: queued as "), "{queued}");
    inst.wait_for_delivery("ok@example.test", 1);
    inst.wait_for_delivery("warn@example.test", 1);
    inst.wait_for_log(
        "NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 554 5.7.1 <reject@example.test>: Recipient address \
         rejected: go away; from=<a@example.org> to=<reject@example.test> proto=ESMTP helo=<client.test>",
    );
    inst.wait_for_log(
        "NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 450 4.2.0 <greylist@example.test>: Recipient address \
         rejected: Greylisted, see http://postgrey.example/help; from=<a@example.org> to=<greylist@example.test>",
    );
    inst.wait_for_log(
        "NOQUEUE: warn: RCPT from unknown[127.0.0.1]: odd one; from=<a@example.org> to=<warn@example.test> \
         proto=ESMTP helo=<client.test>",
    );
    // One connection carried every query of the session.
    let queries = policy.queries();
    assert_eq!((queries.len(), policy.connections()), (5, 1));
    let first = &queries[0];
    for (name, value) in [
        ("request", "smtpd_access_policy"),
        ("protocol_state", "RCPT"),
        ("protocol_name", "ESMTP"),
        ("helo_name", "client.test"),
        ("sender", "a@example.org"),
        ("recipient", "reject@example.test"),
        ("recipient_count", "0"),
        ("client_address", "127.0.0.1"),
        ("client_name", "unknown"),
        ("reverse_client_name", "unknown"),
        ("size", "300"),
        ("server_address", "127.0.0.1"),
        ("server_port", &inst.port.to_string()),
        ("encryption_protocol", ""),
        ("etrn_domain", ""),
    ] {
        assert_eq!(first.get(name).map(String::as_str), Some(value), "{name} in {first:?}");
    }
    assert_eq!(first.len(), 29, "every attribute Postfix sends: {first:?}");
    // One message, one instance.
    let instance = &first["instance"];
    assert!(!instance.is_empty());
    assert!(queries.iter().all(|q| &q["instance"] == instance), "{queries:?}");
}

/// A server that cannot be reached gets its default action: Postfix's
/// `451 4.3.5 Server configuration problem`, after `try_limit` tries.
#[test]
fn an_unreachable_server_gets_the_default_action() {
    let closed = ClosedPort::new();
    let endpoint = format!("inet:127.0.0.1:{}", closed.port);
    let inst = start(&endpoint, "retry_delay = \"100ms\"");
    let mut smtp = transaction(&inst);
    assert_eq!(
        smtp.cmd("RCPT TO:<x@example.test>").unwrap(),
        "451 4.3.5 <x@example.test>: Recipient address rejected: Server configuration problem\r\n"
    );
    inst.wait_for_log(&format!("warning: problem talking to server {endpoint}: Connection refused"));
}

#[test]
fn a_configured_default_action_replaces_postfix_s() {
    let closed = ClosedPort::new();
    let inst = start(&format!("inet:127.0.0.1:{}", closed.port), "try_limit = 1\ndefault_action = \"DUNNO\"");
    let mut smtp = transaction(&inst);
    assert_eq!(smtp.cmd("RCPT TO:<x@example.test>").unwrap(), "250 2.1.5 Ok\r\n");
}

/// Too slow, no `action=`, a hang-up, an action mortal does not carry
/// out: each is logged and gets the default action, within `timeout`.
#[test]
fn a_misbehaving_server_gets_the_default_action() {
    let policy = ScriptedPolicy::start();
    let inst = start(&policy.endpoint(), "timeout = \"1s\"\ntry_limit = 1");
    let mut smtp = transaction(&inst);
    for (local, warning) in [
        ("slow", "timeout exceeded"),
        ("garbage", "reply line without '=': \"hello world\""),
        ("hangup", "premature end of input"),
        ("filter", "unsupported action \"FILTER smtp:[127.0.0.1]:10025\": using default_action"),
    ] {
        let started = Instant::now();
        assert_eq!(
            smtp.cmd(&format!("RCPT TO:<{local}@example.test>")).unwrap(),
            format!("451 4.3.5 <{local}@example.test>: Recipient address rejected: Server configuration problem\r\n"),
            "{local}"
        );
        assert!(started.elapsed() < Duration::from_secs(4), "{local} took {:?}", started.elapsed());
        inst.wait_for_log(warning);
    }
    // The session goes on, and a sane answer is still taken.
    assert_eq!(smtp.cmd("RCPT TO:<ok@example.test>").unwrap(), "250 2.1.5 Ok\r\n");
}

/// Asked at MAIL and at the end of the message too, when configured; the
/// end-of-message query carries the message size and recipient count.
#[test]
fn other_stages_are_asked_when_configured() {
    let policy = ScriptedPolicy::start();
    let inst = start(&policy.endpoint(), "stages = [\"mail\", \"end_of_message\"]");
    let mut smtp = transaction(&inst);
    assert_eq!(smtp.cmd("RCPT TO:<ok@example.test>").unwrap(), "250 2.1.5 Ok\r\n");
    assert!(smtp.cmd("DATA").unwrap().starts_with("354"));
    assert!(smtp.cmd("Subject: s\r\n\r\nbody\r\n.").unwrap().starts_with("250 2.0.0 Ok: queued as "));
    let queries = policy.queries();
    let states: Vec<&str> = queries.iter().map(|q| q["protocol_state"].as_str()).collect();
    assert_eq!(states, ["MAIL", "END-OF-MESSAGE"]);
    assert_eq!(queries[1]["recipient_count"], "1");
    assert_eq!(queries[1]["size"], "20");
    assert_eq!(queries[0]["instance"], queries[1]["instance"]);
}

/// PREPEND, HOLD and DISCARD mark the message; cleanup carries them out:
/// the header on top, the message in hold/, the message gone.
#[test]
fn marks_reach_the_message() {
    let policy = ScriptedPolicy::start();
    let inst = start(&policy.endpoint(), "");
    let send = |rcpt: &str| {
        let mut smtp = transaction(&inst);
        assert_eq!(smtp.cmd(&format!("RCPT TO:<{rcpt}>")).unwrap(), "250 2.1.5 Ok\r\n");
        assert!(smtp.cmd("DATA").unwrap().starts_with("354"));
        let queued = smtp.cmd("Subject: marks\r\n\r\nbody\r\n.").unwrap();
        assert!(queued.starts_with("250 2.0.0 Ok: queued as "), "{rcpt}: {queued}");
        queued.trim_end().rsplit(' ').next().unwrap().to_owned()
    };
    send("prepend@example.test");
    let got = inst.wait_for_delivery("prepend@example.test", 1);
    let text = String::from_utf8_lossy(&got[0]).into_owned();
    let lines: Vec<&str> = text.lines().take(4).collect();
    // Return-Path and Delivered-To (the Maildir delivery), the PREPEND, then Received.
    assert_eq!(lines[2], "X-Policy: tagged by the test", "{text}");
    assert!(lines[3].starts_with("Received: from client.test"), "{text}");

    let held = send("hold@example.test");
    // Logged at RCPT before the recipient counts, so under NOQUEUE, as
    // Postfix logs the first recipient's lines.
    inst.wait_for_log(
        "NOQUEUE: hold: RCPT from unknown[127.0.0.1]: <hold@example.test>: Recipient address held by the test; \
         from=<a@example.org> to=<hold@example.test> proto=ESMTP helo=<client.test>",
    );
    inst.wait_for_log(&format!("{held}: hold: <hold@example.test>: Recipient address held by the test"));
    assert_eq!(inst.queue_files(mortal_proto::spool::QueueDir::Hold), [held]);

    let dropped = send("discard@example.test");
    inst.wait_for_log(&format!("{dropped}: discard: <discard@example.test>: Recipient address dropped by the test"));
    assert!(inst.delivered("discard@example.test").is_empty());
}
