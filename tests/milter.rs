//! smtpd's milter client against a scripted milter (`support::milter`):
//! every stage reaches it with Postfix's macros; its replies become
//! Postfix's replies and `milter-reject:` lines; and a milter that is
//! down, too slow, garbled or gone gets its default action without
//! stalling the session. The live milters are in tests/filters.rs.

use mortal_tests::milter::ScriptedMilter;
use mortal_tests::{ClosedPort, Instance, Options, Smtp};
use std::time::{Duration, Instant};

fn start(endpoint: &str, keys: &str) -> Instance {
    let extra = format!("[[smtpd.milter]]\nendpoint = \"{endpoint}\"\n{keys}\n");
    Instance::start_with(Options { extra, ..Options::default() })
}

fn open(inst: &Instance) -> Smtp {
    let mut smtp = Smtp::connect(inst.port).expect("connect");
    assert!(smtp.cmd("EHLO client.test").unwrap().starts_with("250"));
    smtp
}

/// MAIL, RCPT to `to`, DATA with a small message; the reply to the end of
/// data.
fn send(smtp: &mut Smtp, to: &str) -> String {
    assert_eq!(smtp.cmd("MAIL FROM:<a@example.org>").unwrap(), "250 2.1.0 Ok\r\n");
    assert_eq!(smtp.cmd(&format!("RCPT TO:<{to}>")).unwrap(), "250 2.1.5 Ok\r\n");
    assert!(smtp.cmd("DATA").unwrap().starts_with("354"));
    smtp.cmd("Subject: milter\r\n\r\nhello\r\n.").unwrap()
}

/// The whole dialogue reaches the milter, each event after its macros,
/// and the message goes through when it says continue.
#[test]
fn every_stage_reaches_the_milter() {
    let milter = ScriptedMilter::start();
    let inst = start(&milter.endpoint(), "");
    let mut smtp = open(&inst);
    let queued = send(&mut smtp, "ok@example.test");
    assert!(queued.starts_with("250 2.0.0 Ok: queued as "), "{queued}");
    let id = queued.trim_end().rsplit(' ').next().unwrap().to_owned();
    assert_eq!(smtp.cmd("QUIT").unwrap(), "221 2.0.0 Bye\r\n");
    inst.wait_for_delivery("ok@example.test", 1);
    // Our session's connection: the one that heard HELO (the harness's
    // start-up probe only connects and quits).
    let all = milter.seen();
    let seen = all.iter().find(|c| c.iter().any(|s| s == "HELO client.test")).expect("our session");
    let at = |prefix: &str| {
        seen.iter().position(|s| s.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix:?} in {seen:#?}"))
    };
    let order = [
        "SMFIC_OPTNEG",
        "MACRO Connect j=mortal.test {daemon_name}=mortal.test {daemon_addr}=127.0.0.1 v=mortal ",
        "CONNECT [127.0.0.1] Inet(127.0.0.1:",
        "HELO client.test",
        &format!("MACRO Mail i={id} {{mail_addr}}=a@example.org {{mail_host}}=example.org {{mail_mailer}}=smtp"),
        "MAIL <a@example.org> ",
        &format!("MACRO Rcpt i={id} {{rcpt_addr}}=ok@example.test {{rcpt_host}}=example.test {{rcpt_mailer}}=smtp"),
        "RCPT <ok@example.test> ",
        "SMFIC_DATA",
        "HEADER Subject: milter",
        "SMFIC_EOH",
        "BODY hello\r\n",
        &format!("MACRO EndOfMessage i={id}"),
        "SMFIC_BODYEOB",
        "SMFIC_QUIT",
    ];
    let positions: Vec<usize> = order.iter().map(|p| at(p)).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "out of order: {seen:#?}");
    assert!(seen.iter().any(|s| s.contains(" _=unknown [127.0.0.1]")), "{seen:#?}");
}

/// Its answers to RCPT are the client's, in Postfix's words, and logged
/// as `milter-reject:`; the transaction goes on with other recipients.
#[test]
fn rcpt_replies_are_relayed() {
    let milter = ScriptedMilter::start();
    let inst = start(&milter.endpoint(), "");
    let mut smtp = open(&inst);
    assert_eq!(smtp.cmd("MAIL FROM:<a@example.org>").unwrap(), "250 2.1.0 Ok\r\n");
    for (local, want) in [
        ("reject", "550 5.7.1 Command rejected\r\n"),
        ("tempfail", "451 4.7.1 Service unavailable - try again later\r\n"),
        ("custom", "550-5.7.1 first line\r\n550 5.7.1 second line\r\n"),
        ("ok", "250 2.1.5 Ok\r\n"),
    ] {
        assert_eq!(smtp.cmd(&format!("RCPT TO:<{local}@example.test>")).unwrap(), want, "{local}");
    }
    inst.wait_for_log(
        "NOQUEUE: milter-reject: RCPT from unknown[127.0.0.1]: 550 5.7.1 Command rejected; \
         from=<a@example.org> to=<reject@example.test> proto=ESMTP helo=<client.test>",
    );
    inst.wait_for_log("milter-reject: RCPT from unknown[127.0.0.1]: 550 5.7.1 first line second line;");
    assert!(smtp.cmd("DATA").unwrap().starts_with("354"));
    assert!(smtp.cmd("Subject: s\r\n\r\nx\r\n.").unwrap().starts_with("250 2.0.0 Ok: queued as "));
    inst.wait_for_delivery("ok@example.test", 1);
    // SHUTDOWN: 421 and the end of the session.
    assert_eq!(smtp.cmd("MAIL FROM:<a@example.org>").unwrap(), "250 2.1.0 Ok\r\n");
    assert_eq!(
        smtp.cmd("RCPT TO:<shutdown@example.test>").unwrap(),
        "421 4.7.0 mortal.test Server closing connection\r\n"
    );
    assert!(smtp.closed());
}

/// A refusal at the end of the message: nothing is queued.
#[test]
fn an_end_of_message_refusal_queues_nothing() {
    let milter = ScriptedMilter::start();
    let inst = start(&milter.endpoint(), "");
    let mut smtp = open(&inst);
    assert_eq!(send(&mut smtp, "eomreject@example.test"), "550 5.7.1 Command rejected\r\n");
    inst.wait_for_log(
        "milter-reject: END-OF-MESSAGE from unknown[127.0.0.1]: 550 5.7.1 Command rejected; from=<a@example.org>",
    );
    // The next message of the session is fine.
    assert!(send(&mut smtp, "ok@example.test").starts_with("250 2.0.0 Ok: queued as "));
    inst.wait_for_delivery("ok@example.test", 1);
    assert!(inst.delivered("eomreject@example.test").is_empty());
}

/// A milter that cannot be reached: with the default `tempfail`, the
/// greeting still comes, and every command after it gets 451 4.7.1
/// (Postfix: "reject all further commands in this session with a
/// temporary status code").
#[test]
fn a_milter_that_is_down_tempfails_the_session() {
    let closed = ClosedPort::new();
    let endpoint = format!("inet:127.0.0.1:{}", closed.port);
    let inst = start(&endpoint, "");
    let mut smtp = Smtp::connect(inst.port).expect("connect");
    assert_eq!(smtp.greeting, "220 mortal.test ESMTP mortal\r\n");
    assert_eq!(smtp.cmd("EHLO client.test").unwrap(), "451 4.7.1 Service unavailable - try again later\r\n");
    inst.wait_for_log(&format!("warning: connect to Milter service {endpoint}: Connection refused"));
    inst.wait_for_log("NOQUEUE: milter-reject: CONNECT from unknown[127.0.0.1]: 451 4.7.1 Service unavailable");
}

/// With `default_action = "accept"`, mail flows without it.
#[test]
fn a_milter_that_is_down_can_be_skipped() {
    let closed = ClosedPort::new();
    let inst = start(&format!("inet:127.0.0.1:{}", closed.port), "default_action = \"accept\"");
    let mut smtp = open(&inst);
    assert!(send(&mut smtp, "ok@example.test").starts_with("250 2.0.0 Ok: queued as "));
    inst.wait_for_delivery("ok@example.test", 1);
}

/// Garbage, a stall past `content_timeout`, a hang-up: the default action
/// (tempfail) within the timeout, a warning, and the milter stays out for
/// the rest of the session.
#[test]
fn a_broken_milter_gets_the_default_action_in_time() {
    let milter = ScriptedMilter::start();
    let inst = start(&milter.endpoint(), "content_timeout = \"1s\"\ncommand_timeout = \"1s\"");
    for (local, warning) in [("garbage", "end of message: "), ("slow", "end of message: timeout exceeded")] {
        let mut smtp = open(&inst);
        let started = Instant::now();
        assert_eq!(
            send(&mut smtp, &format!("{local}@example.test")),
            "451 4.7.1 Service unavailable - try again later\r\n"
        );
        assert!(started.elapsed() < Duration::from_secs(4), "{local}: {:?}", started.elapsed());
        inst.wait_for_log(&format!("warning: milter {}: {warning}", milter.endpoint()));
        // Out for the rest of this session: the next MAIL is refused too.
        assert_eq!(
            smtp.cmd("MAIL FROM:<a@example.org>").unwrap(),
            "451 4.7.1 Service unavailable - try again later\r\n",
            "{local}"
        );
    }
    let mut smtp = open(&inst);
    assert_eq!(smtp.cmd("MAIL FROM:<a@example.org>").unwrap(), "250 2.1.0 Ok\r\n");
    assert_eq!(
        smtp.cmd("RCPT TO:<hangup@example.test>").unwrap(),
        "451 4.7.1 Service unavailable - try again later\r\n"
    );
    inst.wait_for_log(&format!("warning: milter {}: SMFIC_RCPT: premature end of input", milter.endpoint()));
}

/// SMFIR_PROGRESS restarts the content timer: a milter that keeps saying
/// it is working may take longer than `content_timeout` in all.
#[test]
fn progress_keeps_a_slow_milter_alive() {
    let milter = ScriptedMilter::start();
    let inst = start(&milter.endpoint(), "content_timeout = \"1s\"");
    let mut smtp = open(&inst);
    let started = Instant::now();
    assert!(send(&mut smtp, "progress@example.test").starts_with("250 2.0.0 Ok: queued as "));
    assert!(started.elapsed() >= Duration::from_millis(1500));
    inst.wait_for_delivery("progress@example.test", 1);
}

/// The other default actions of a milter that is down: `reject` refuses
/// with 550 5.7.1, `quarantine` takes the message and holds it.
#[test]
fn a_milter_that_is_down_rejects_or_quarantines_as_configured() {
    let closed = ClosedPort::new();
    let endpoint = format!("inet:127.0.0.1:{}", closed.port);
    let inst = start(&endpoint, "default_action = \"reject\"");
    let mut smtp = Smtp::connect(inst.port).expect("connect");
    assert_eq!(smtp.cmd("EHLO client.test").unwrap(), "550 5.7.1 Command rejected\r\n");
    drop(inst);

    let inst = start(&endpoint, "default_action = \"quarantine\"");
    let mut smtp = open(&inst);
    let queued = send(&mut smtp, "ok@example.test");
    assert!(queued.starts_with("250 2.0.0 Ok: queued as "), "{queued}");
    let id = queued.trim_end().rsplit(' ').next().unwrap().to_owned();
    inst.wait_for_log(&format!("{id}: hold: milter {endpoint}: milter_default_action quarantine"));
    assert_eq!(inst.queue_files(mortal_proto::spool::QueueDir::Hold), [id]);
}
