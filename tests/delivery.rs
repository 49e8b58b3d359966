//! Delivery end to end: the real binaries hand mail to real next hops
//! (Dovecot LMTP, an aiosmtpd relay, a pipe command) and to a scripted
//! LMTP server where a test must choose each reply: per-recipient 5xx and
//! 4xx, DSNs to the sender, crash recovery, corrupt queue files, and the
//! fsync order behind "a 250 survives a power cut".

use mortal_proto::envelope::{BodyType, ClientInfo, Notify, SenderInfo};
use mortal_proto::queue_file::{QueueFile, QueuedRecipient, RecipientState};
use mortal_proto::queue_id::QueueId;
use mortal_proto::service::Service;
use mortal_proto::spool::QueueDir;
use mortal_proto::status::RetireReason;
use mortal_tests::delivery::{
    Aiosmtpd, Dovecot, FakeLmtp, Guard, TempDir, cleanup_pids, queue_pid, send, start_mortal,
};
use mortal_tests::{Instance, Options, wait_for};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

fn options(delivery: &str) -> Options {
    Options { extra: delivery.to_owned(), ..Options::default() }
}

fn message(subject: &str, body: &str) -> String {
    format!("From: a@example.test\r\nTo: x@example.test\r\nSubject: {subject}\r\n\r\n{body}\r\n")
}

/// The `n`th DSN in `rcpt`'s mortal Maildir, as text.
fn dsn_for(mortal: &Instance, rcpt: &str, n: usize) -> String {
    let got = mortal.wait_for_delivery(rcpt, n);
    String::from_utf8_lossy(&got[n - 1]).into_owned()
}

#[test]
fn dovecot_lmtp_delivers_into_its_maildir_and_reuses_the_connection() {
    let dovecot = Dovecot::start();
    let mortal = start_mortal(
        options(&format!(
            "[delivery]\ntransport = \"lmtp:unix:{}\"\nconnection_reuse_time = \"30s\"\n",
            dovecot.socket.display()
        )),
        &["example.test"],
        "",
    );
    send(mortal.port, "a@example.test", &["bob@example.test", "carol@example.test"], &message("one", ".dot\r\nbody"));
    // The second message only once the first is done (its file removed,
    // after the connection went back to the queue's idle list): reuse is
    // for consecutive deliveries; two at once rightly take two sessions.
    mortal.wait_for_log(": removed");
    send(mortal.port, "a@example.test", &["bob@example.test"], &message("two", "second"));
    let bob = dovecot.wait_for_delivery("bob@example.test", 2);
    let carol = dovecot.wait_for_delivery("carol@example.test", 1);
    assert!(bob.iter().any(|m| m.contains("Subject: one") && m.contains("\n.dot\n")), "{bob:?}");
    assert!(bob.iter().any(|m| m.contains("Subject: two")), "{bob:?}");
    assert!(carol[0].contains("Received: from "), "{carol:?}");
    mortal.wait_for_empty_queue();
    let log = mortal.log_text();
    let sent: Vec<&str> = log.lines().filter(|l| l.contains("status=sent (250 2.0.0 <")).collect();
    assert_eq!(sent.len(), 3, "{log}");
    assert!(sent.iter().all(|l| l.contains(&format!("relay={}", dovecot.socket.display()))), "{log}");
    // Both messages went over one LMTP session (the second reused it).
    let connects = dovecot.log_text().matches("Connect from local").count();
    assert_eq!(connects, 1, "{}", dovecot.log_text());
}

#[test]
fn smtp_relay_reaches_aiosmtpd() {
    let sink = Aiosmtpd::start(None);
    let mortal = start_mortal(
        options(&format!("[delivery]\n[delivery.routes]\n\"relay.test\" = \"smtp:inet:127.0.0.1:{}\"\n", sink.port)),
        &["example.test", "relay.test"],
        "",
    );
    send(mortal.port, "a@example.test", &["r1@relay.test", "r2@relay.test"], &message("relayed", "via smtp"));
    let got = wait_for("aiosmtpd got the message", || {
        let t = sink.received_text();
        t.contains(".END").then_some(t)
    })
    .unwrap_or_else(|| panic!("nothing relayed\n{}", mortal.log_text()));
    assert!(got.starts_with("FROM a@example.test TO r1@relay.test,r2@relay.test plain"), "{got}");
    assert!(got.contains("Subject: relayed") && got.contains("via smtp"), "{got}");
    let relay = format!("relay=127.0.0.1[127.0.0.1]:{}", sink.port);
    mortal.wait_for_log(&format!("to=<r2@relay.test>, {relay}"));
    assert!(mortal.log_text().contains("status=sent (250 2.0.0 Ok: stored)"), "{}", mortal.log_text());
    mortal.wait_for_empty_queue();
}

#[test]
fn smtp_relay_uses_starttls_may_and_encrypt() {
    let dir = TempDir::new("tls");
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (cert_file, key_file) = (dir.0.join("cert.pem"), dir.0.join("key.pem"));
    fs::write(&cert_file, cert.pem()).unwrap();
    fs::write(&key_file, key.serialize_pem()).unwrap();
    let sink = Aiosmtpd::start(Some((&cert_file, &key_file)));
    // `encrypt` verifies against the CA file: the self-signed certificate
    // names 127.0.0.1, the next hop's address.
    let mortal = start_mortal(
        options(&format!(
            "[delivery]\nsmtp_tls_security = \"encrypt\"\nsmtp_tls_ca_file = {:?}\n[delivery.routes]\n\"relay.test\" = \"smtp:inet:127.0.0.1:{}\"\n",
            cert_file.display().to_string(),
            sink.port
        )),
        &["example.test", "relay.test"],
        "",
    );
    send(mortal.port, "a@example.test", &["t@relay.test"], &message("tls", "secret"));
    let got = wait_for("relayed over TLS", || {
        let t = sink.received_text();
        t.contains(".END").then_some(t)
    })
    .unwrap_or_else(|| panic!("nothing relayed\n{}", mortal.log_text()));
    assert!(got.starts_with("FROM a@example.test TO t@relay.test tls"), "{got}");
    mortal.wait_for_log(&format!("Verified TLS connection established to 127.0.0.1[127.0.0.1]:{}: TLSv1.3", sink.port));

    // `may` takes any certificate: opportunistic encryption.
    let may = start_mortal(
        options(&format!("[delivery]\n[delivery.routes]\n\"relay.test\" = \"smtp:inet:127.0.0.1:{}\"\n", sink.port)),
        &["example.test", "relay.test"],
        "",
    );
    send(may.port, "a@example.test", &["m@relay.test"], &message("tls-may", "secret"));
    may.wait_for_log(&format!("Untrusted TLS connection established to 127.0.0.1[127.0.0.1]:{}: TLSv1.3", sink.port));
    may.wait_for_log("to=<m@relay.test>, relay=127.0.0.1[127.0.0.1]");
    let got = wait_for("m@ relayed", || sink.received_text().contains("TO m@relay.test tls").then_some(()));
    assert!(got.is_some(), "{}", sink.received_text());

    // `encrypt` without the CA: the certificate cannot be verified, so the
    // mail is deferred, never sent in clear.
    let strict = start_mortal(
        options(&format!(
            "[delivery]\nsmtp_tls_security = \"encrypt\"\n[delivery.routes]\n\"relay.test\" = \"smtp:inet:127.0.0.1:{}\"\n",
            sink.port
        )),
        &["example.test", "relay.test"],
        "",
    );
    send(strict.port, "a@example.test", &["u@relay.test"], &message("tls2", "secret"));
    strict.wait_for_log("to=<u@relay.test>");
    let log = strict.wait_for_log("status=deferred (TLS handshake with 127.0.0.1");
    assert!(log.contains("dsn=4.7.5"), "{log}");
    assert!(!sink.received_text().contains("u@relay.test"), "nothing may be sent without verified TLS");
}

/// A pipe command that writes stdin to `<dir>/<recipient>`, tempfails for
/// `tmp@`, and fails with a message on stderr for `fail@`.
fn pipe_script(dir: &std::path::Path) -> std::path::PathBuf {
    let script = dir.join("deliver.sh");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\ncase \"$1\" in\n  tmp@*) echo 'mailbox locked' >&2; exit 75;;\n  fail@*) echo \"no such mailbox: $1\" >&2; exit 67;;\nesac\nid -u > {d}/uid\ncat > {d}/\"$1\"\necho \"$2 $3\" > {d}/\"$1\".args\n",
            d = dir.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(dir, fs::Permissions::from_mode(0o777)).unwrap();
    script
}

#[test]
fn pipe_delivers_defers_on_75_and_bounces_with_stderr() {
    let dir = TempDir::new("pipe");
    let script = pipe_script(&dir.0);
    let mortal = start_mortal(
        options(&format!(
            "[delivery]\n[delivery.routes]\n\"pipe.test\" = \"pipe\"\n[delivery.pipe]\ncommand = [{:?}, \"${{recipient}}\", \"${{sender}}\", \"${{queue_id}}\"]\nuser = \"{}\"\ntimeout = \"10s\"\n",
            script.display().to_string(),
            mortal_tests::pipe::PIPE_USER
        )),
        &["example.test", "pipe.test"],
        "",
    );
    send(mortal.port, "a@example.test", &["ok@pipe.test", "tmp@pipe.test", "fail@pipe.test"], &message("p", "piped"));
    // The script writes the arguments file after the message is complete
    // (its `cat` ended): wait for that, not for the message file to appear.
    let args = wait_for("pipe command finished", || {
        fs::read_to_string(dir.0.join("ok@pipe.test.args")).ok().filter(|a| a.ends_with('\n'))
    })
    .unwrap_or_else(|| panic!("no pipe delivery\n{}", mortal.log_text()));
    let delivered = fs::read_to_string(dir.0.join("ok@pipe.test")).unwrap();
    assert!(delivered.contains("Subject: p\n") && delivered.contains("piped\n"), "LF line ends: {delivered:?}");
    assert!(args.starts_with("a@example.test ") && args.trim_end().len() == "a@example.test ".len() + 20, "{args}");
    if nix::unistd::geteuid().is_root() {
        let uid = mortal_tests::pipe::pipe_uid().to_string();
        assert_eq!(fs::read_to_string(dir.0.join("uid")).unwrap().trim(), uid, "runs as the configured user");
    }
    let bounce = dsn_for(&mortal, "a@example.test", 1);
    for needle in [
        "Content-Type: multipart/report; report-type=delivery-status;",
        "Final-Recipient: rfc822; fail@pipe.test",
        "Action: failed",
        "Status: 5.1.1",
        "no such mailbox: fail@pipe.test",
        "Subject: p",
    ] {
        assert!(bounce.contains(needle), "{needle} missing in DSN:\n{bounce}");
    }
    assert!(!bounce.contains("tmp@pipe.test") && !bounce.contains("Final-Recipient: rfc822; ok@"), "{bounce}");
    let log = mortal.wait_for_log("to=<tmp@pipe.test>, relay=pipe");
    assert!(log.contains("dsn=4.3.0, status=deferred (temporary failure. Command output: mailbox locked)"), "{log}");
    assert!(log.contains("status=bounced (Command died with status 67:"), "{log}");
    assert!(log.contains(": sender non-delivery notification: "), "{log}");
    // The tempfailed recipient stays queued and is retried, alone.
    let retried = wait_for("second attempt for tmp@", || {
        (mortal.log_text().matches("to=<tmp@pipe.test>").count() >= 2).then_some(())
    });
    assert!(retried.is_some(), "{}", mortal.log_text());
    let log = mortal.log_text();
    assert_eq!(log.matches("to=<ok@pipe.test>").count(), 1, "{log}");
    assert_eq!(log.matches("to=<fail@pipe.test>").count(), 1, "{log}");
    assert_eq!(mortal.delivered("a@example.test").len(), 1, "one DSN only");
}

#[test]
fn lmtp_5xx_bounces_and_only_the_4xx_recipient_is_retried() {
    let lmtp = FakeLmtp::start(Arc::new(|rcpt: &str, seen: usize| {
        match rcpt {
            r if r.starts_with("bad@") => "550 5.1.1 <bad@example.test> User doesn't exist",
            r if r.starts_with("later@") && seen == 0 => "451 4.3.0 <later@example.test> Mailbox busy",
            _ => "250 2.0.0 Ok",
        }
        .to_owned()
    }));
    let mortal = start_mortal(
        options(&format!(
            "[delivery]\n[delivery.routes]\n\"example.test\" = \"lmtp:inet:{}\"\n\"sender.test\" = \"maildir\"\n",
            lmtp.addr
        )),
        &["example.test", "sender.test"],
        "",
    );
    send(
        mortal.port,
        "s@sender.test",
        &["good@example.test", "bad@example.test", "later@example.test"],
        &message("partial", "three recipients"),
    );
    let bounce = dsn_for(&mortal, "s@sender.test", 1);
    for needle in [
        "Content-Type: multipart/report; report-type=delivery-status;",
        "Content-Type: message/delivery-status",
        "Final-Recipient: rfc822; bad@example.test",
        "Status: 5.1.1",
        &format!("Remote-MTA: dns; {}", lmtp.addr.ip()),
        "Diagnostic-Code: smtp; 550 5.1.1 <bad@example.test> User doesn't exist",
        "Subject: partial",
        "three recipients",
    ] {
        assert!(bounce.contains(needle), "{needle} missing in DSN:\n{bounce}");
    }
    assert!(!bounce.contains("Final-Recipient: rfc822; later@"), "a deferral is no failure: {bounce}");
    let done = wait_for("later@ delivered on retry", || (lmtp.deliveries("later@example.test") == 1).then_some(()));
    assert!(done.is_some(), "{}", mortal.log_text());
    mortal.wait_for_empty_queue();
    assert_eq!(lmtp.deliveries("good@example.test"), 1, "no duplicate for the recipient delivered first");
    let txs = lmtp.transactions();
    assert_eq!(txs.len(), 2, "{txs:?}");
    assert_eq!(txs[1].replies.len(), 1, "the retry carries only the deferred recipient: {txs:?}");
    let log = mortal.log_text();
    assert!(log.contains("to=<bad@example.test>, relay=127.0.0.1[127.0.0.1]:"), "{log}");
    assert!(log.contains("dsn=5.1.1, status=bounced (host 127.0.0.1[127.0.0.1]:"), "{log}");
    assert!(log.contains("(in reply to end of DATA command)"), "{log}");
    assert!(log.contains("dsn=4.3.0, status=deferred (host 127.0.0.1["), "{log}");
    assert_eq!(mortal.delivered("s@sender.test").len(), 1, "exactly one DSN");
}

#[test]
fn dsn_honors_notify_never_success_and_ret_hdrs() {
    let lmtp = FakeLmtp::start(Arc::new(|rcpt: &str, _| {
        if rcpt.starts_with("bad") { "550 5.1.1 no such user" } else { "250 2.0.0 Ok" }.to_owned()
    }));
    let mortal = start_mortal(
        options(&format!(
            "[delivery]\n[delivery.routes]\n\"example.test\" = \"lmtp:inet:{}\"\n\"sender.test\" = \"maildir\"\n",
            lmtp.addr
        )),
        &["example.test", "sender.test"],
        "",
    );
    let mut s = mortal_tests::Smtp::connect(mortal.port).unwrap();
    assert!(s.cmd("EHLO c.test").unwrap().starts_with("250"));
    assert!(s.cmd("MAIL FROM:<s@sender.test> RET=HDRS ENVID=env+2B1").unwrap().starts_with("250"));
    for rcpt in [
        "RCPT TO:<good@example.test> NOTIFY=SUCCESS ORCPT=rfc822;Good@example.test",
        "RCPT TO:<bad1@example.test> NOTIFY=NEVER",
        "RCPT TO:<bad2@example.test> NOTIFY=FAILURE",
    ] {
        let reply = s.cmd(rcpt).unwrap();
        assert!(reply.starts_with("250"), "{rcpt}: {reply}");
    }
    assert!(s.cmd("DATA").unwrap().starts_with("354"));
    let reply = s.cmd("Subject: dsn\r\n\r\nbody text\r\n.").unwrap();
    assert!(reply.starts_with("250"), "{reply}");
    let _ = s.cmd("QUIT");
    let got = mortal.wait_for_delivery("s@sender.test", 2);
    let texts: Vec<String> = got.iter().map(|m| String::from_utf8_lossy(m).into_owned()).collect();
    let failure = texts.iter().find(|t| t.contains("Action: failed")).expect("a failure DSN");
    let success = texts.iter().find(|t| t.contains("Action: delivered")).expect("a success DSN");
    assert!(failure.contains("Final-Recipient: rfc822; bad2@example.test"), "{failure}");
    assert!(!failure.contains("bad1@"), "NOTIFY=NEVER: {failure}");
    assert!(failure.contains("Original-Envelope-Id: env+1"), "{failure}");
    assert!(failure.contains("text/rfc822-headers") && !failure.contains("body text"), "RET=HDRS: {failure}");
    assert!(success.contains("Final-Recipient: rfc822; good@example.test"), "{success}");
    assert!(success.contains("Original-Recipient: rfc822;Good@example.test"), "{success}");
    assert!(success.contains("Subject: Successful Mail Delivery Report"), "{success}");
    // The message and both notices are finished (three `removed` lines);
    // a notice is queued before the file it reports on is removed, so an
    // empty queue after that holds no notice about a notice either.
    let removed =
        wait_for("three removed lines", || (mortal.log_text().matches(": removed").count() >= 3).then_some(()));
    assert!(removed.is_some(), "{}", mortal.log_text());
    mortal.wait_for_empty_queue();
    assert_eq!(mortal.delivered("s@sender.test").len(), 2, "no DSN about a DSN");
}

#[test]
fn expired_mail_is_returned_and_expired_bounces_are_dropped() {
    // Nothing listens on this port: every attempt defers.
    let closed = mortal_tests::ClosedPort::new();
    let dead = closed.port;
    let mortal = start_mortal(
        options(&format!(
            "[delivery]\nconnect_timeout = \"2s\"\n[delivery.routes]\n\"example.test\" = \"lmtp:inet:127.0.0.1:{dead}\"\n\"sender.test\" = \"maildir\"\n\"gone.test\" = \"lmtp:inet:127.0.0.1:{dead}\"\n"
        )),
        &["example.test", "sender.test", "gone.test"],
        "queue_lifetime = \"1s\"\nbounce_queue_lifetime = \"1s\"\n",
    );
    send(mortal.port, "s@sender.test", &["x@example.test"], &message("old", "never arrives"));
    let bounce = dsn_for(&mortal, "s@sender.test", 1);
    assert!(bounce.contains("Action: failed") && bounce.contains("Status: 4.4.1"), "{bounce}");
    assert!(bounce.contains("connect to 127.0.0.1[127.0.0.1]"), "{bounce}");
    let log = mortal.wait_for_log("status=expired, returned to sender (connect to 127.0.0.1");
    assert!(log.contains("dsn=4.4.1"), "{log}");
    send(mortal.port, "", &["y@gone.test"], &message("bounce", "undeliverable bounce"));
    mortal.wait_for_log("to=<y@gone.test>, relay=none");
    let log = mortal.wait_for_log("status=expired, dropped (mail from <> is never returned)");
    mortal.wait_for_empty_queue();
    assert_eq!(mortal.delivered("s@sender.test").len(), 1, "{log}");
}

#[test]
fn delay_warning_is_sent_once() {
    let closed = mortal_tests::ClosedPort::new();
    let dead = closed.port;
    let mortal = start_mortal(
        options(&format!(
            "[delivery]\n[delivery.routes]\n\"example.test\" = \"lmtp:inet:127.0.0.1:{dead}\"\n\"sender.test\" = \"maildir\"\n"
        )),
        &["example.test", "sender.test"],
        "delay_warning_time = \"1s\"\n",
    );
    send(mortal.port, "s@sender.test", &["x@example.test"], &message("slow", "waiting"));
    let warning = dsn_for(&mortal, "s@sender.test", 1);
    assert!(warning.contains("Action: delayed") && warning.contains("Will-Retry-Until: "), "{warning}");
    assert!(warning.contains("Subject: Delayed Mail (still being retried)"), "{warning}");
    let retried =
        wait_for("two more attempts", || (mortal.log_text().matches("to=<x@example.test>").count() >= 3).then_some(()));
    assert!(retried.is_some(), "{}", mortal.log_text());
    assert_eq!(mortal.delivered("s@sender.test").len(), 1, "one delay notice per message");
}

#[test]
fn kill_9_of_queue_during_lmtp_delivery_loses_nothing() {
    // The first delivery attempt stalls after the content, as a slow
    // mailbox server would; later ones succeed.
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let answered = calls.clone();
    let lmtp = FakeLmtp::start(Arc::new(move |_: &str, _| {
        let first = answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
        if first { "STALL" } else { "250 2.0.0 Ok" }.to_owned()
    }));
    let mortal = start_mortal(
        options(&format!("[delivery]\ntransport = \"lmtp:inet:{}\"\ncommand_timeout = \"60s\"\n", lmtp.addr)),
        &["example.test"],
        "",
    );
    // The port answers as soon as an smtpd is up; the queue may still be starting.
    let before = wait_for("a queue process", || queue_pid(&mortal)).expect("a queue process");
    send(mortal.port, "a@example.test", &["crash@example.test"], &message("crash", "must survive"));
    let stalled = wait_for("delivery in progress", || (!mortal.queue_files(QueueDir::Active).is_empty()).then_some(()));
    assert!(stalled.is_some(), "{}", mortal.log_text());
    // The server has the whole content and holds back its reply.
    let held = wait_for("the content at the LMTP server", || {
        (calls.load(std::sync::atomic::Ordering::SeqCst) >= 1).then_some(())
    });
    assert!(held.is_some(), "{}", mortal.log_text());
    assert_eq!(lmtp.deliveries("crash@example.test"), 0);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(before as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let after = wait_for("a new queue process", || queue_pid(&mortal).filter(|&p| p != before));
    assert!(after.is_some(), "master did not restart queue\n{}", mortal.log_text());
    let delivered = wait_for("delivery after restart", || (lmtp.deliveries("crash@example.test") == 1).then_some(()));
    assert!(delivered.is_some(), "{}", mortal.log_text());
    mortal.wait_for_empty_queue();
    assert!(mortal.log_text().contains("recovered 1 message(s) from active/"), "{}", mortal.log_text());
    assert!(lmtp.transactions()[0].data.contains("must survive"));
}

fn sample_queue_file(id: QueueId) -> QueueFile {
    QueueFile {
        id,
        arrival: SystemTime::now(),
        client: ClientInfo {
            addr: std::net::Ipv4Addr::LOCALHOST.into(),
            name: "unknown".into(),
            helo: "c.test".into(),
            protocol: "ESMTP".into(),
            tls: String::new(),
            auth: None,
        },
        sender: SenderInfo {
            address: "a@example.test".into(),
            body: BodyType::SevenBit,
            smtputf8: false,
            ret: None,
            envid: String::new(),
        },
        recipients: vec![QueuedRecipient {
            address: "victim@example.test".into(),
            state: RecipientState::Pending,
            notify: Notify::default(),
            orcpt: String::new(),
            status: None,
        }],
        content: b"Subject: corrupt\r\n\r\nmust not be delivered\r\n".to_vec(),
    }
}

/// (type, offset of the record's first byte, payload length) of each record.
fn records(bytes: &[u8]) -> Vec<(u8, usize, usize)> {
    let mut out = Vec::new();
    let mut pos = 8;
    while pos + 5 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[pos + 1..pos + 5].try_into().unwrap()) as usize;
        out.push((bytes[pos], pos, len));
        pos += 5 + len;
    }
    out
}

#[test]
fn corrupt_file_of_every_record_type_goes_to_corrupt() {
    let mortal = start_mortal(Options::default(), &["example.test"], "");
    let base = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() & 0xF_FFFF_FFFF;
    let good = sample_queue_file("00000000000000000000".parse().unwrap()).encode();
    let kinds: Vec<u8> = records(&good).iter().map(|r| r.0).collect();
    assert_eq!(kinds, b"VITCSRMZ", "every record type is exercised");
    let mut ids = Vec::new();
    let mut n = 0u32;
    for (kind, start, len) in records(&good) {
        for mode in ["flip", "truncate"] {
            n += 1;
            let id: QueueId = format!("{base:09X}{n:05X}FFFFFF").parse().unwrap();
            let mut bytes = sample_queue_file(id).encode();
            let mid = start + 5 + len / 2;
            match mode {
                "flip" => bytes[mid] ^= 0x21,
                _ => bytes.truncate(mid),
            }
            let temp = mortal.spool().join(format!("{id}.part"));
            fs::write(&temp, &bytes).unwrap();
            fs::rename(&temp, mortal.spool_layout().path(QueueDir::Incoming, &id)).unwrap();
            ids.push((id, kind as char, mode));
        }
    }
    for (id, kind, mode) in &ids {
        mortal.wait_for_log(&format!("warning: {id}: corrupt queue file ("));
        assert!(
            mortal.queue_files(QueueDir::Corrupt).contains(&id.to_string()),
            "{mode} in {kind} record not quarantined"
        );
    }
    // Every file is in corrupt/, which the queue never reads again: what
    // was not delivered by now never will be.
    mortal.wait_for_empty_queue();
    assert!(mortal.delivered("victim@example.test").is_empty(), "a corrupt file was delivered");
}

/// strace the cleanup and queue processes over one message: cleanup must
/// rename the complete file into place, fsync the file and the directory,
/// and only then answer (the answer becomes smtpd's 250); queue must make
/// the Maildir copy durable before it removes the queue file.
#[test]
fn fsync_ordering_under_strace() {
    let mortal = start_mortal(Options::default(), &["example.test"], "");
    let dir = TempDir::new("strace");
    let mut pids = cleanup_pids(&mortal);
    pids.extend(queue_pid(&mortal));
    let out = dir.0.join("trace");
    let mut cmd = Command::new("strace");
    // -y names each descriptor's file, so the file and directory syncs can be told apart.
    cmd.args([
        "-f",
        "-y",
        "-tt",
        "-e",
        "trace=fsync,fdatasync,rename,renameat,renameat2,unlink,unlinkat,write,sendto",
        "-o",
    ])
    .arg(&out)
    .stdin(Stdio::null())
    .stderr(Stdio::null());
    for p in &pids {
        cmd.arg("-p").arg(p.to_string());
    }
    let mut strace = Guard::spawn("strace", &mut cmd);
    // Attached means each process names strace as its tracer.
    let traced = |pid: &u32| {
        fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
            s.lines().any(|l| l.strip_prefix("TracerPid:").is_some_and(|t| t.trim() == strace.pid().to_string()))
        })
    };
    let attached = wait_for("strace attached", || pids.iter().all(traced).then_some(()));
    strace.assert_running("strace cannot attach (ptrace not permitted?)");
    assert!(attached.is_some(), "strace did not attach to {pids:?}");
    send(mortal.port, "a@example.test", &["traced@example.test"], &message("trace", "fsync order"));
    mortal.wait_for_delivery("traced@example.test", 1);
    mortal.wait_for_empty_queue();
    // The last call of interest is the queue's unlink of active/<id>.
    let unlinked = wait_for("the unlink of the active/ file in the trace", || {
        fs::read_to_string(&out).ok()?.lines().any(|l| l.contains("unlink") && l.contains("/active/")).then_some(())
    });
    assert!(unlinked.is_some(), "{}", fs::read_to_string(&out).unwrap_or_default());
    drop(strace);
    let trace = fs::read_to_string(&out).unwrap();
    let lines: Vec<&str> = trace.lines().collect();
    let find =
        |from: usize, pred: &dyn Fn(&str) -> bool| lines.iter().skip(from).position(|l| pred(l)).map(|i| i + from);
    // cleanup: rename(incoming/<id>.tmp -> <id>) < fsync(file) < fsync(incoming/) < answer write
    let rename = find(0, &|l| l.contains("rename") && l.contains("/incoming/") && l.contains(".tmp"))
        .unwrap_or_else(|| panic!("no incoming rename in trace:\n{trace}"));
    let pid_of = |l: &str| l.split_whitespace().next().unwrap_or_default().to_owned();
    let cleanup = pid_of(lines[rename]);
    let is_sync = |l: &str| l.contains("fsync(") || l.contains("fdatasync(");
    let file_sync = find(rename, &|l| pid_of(l) == cleanup && is_sync(l) && !l.contains("/incoming>"))
        .unwrap_or_else(|| panic!("no fsync of the queue file after the rename:\n{trace}"));
    assert!(lines[file_sync].contains("/incoming/"), "the file synced is the queue file:\n{trace}");
    let dir_sync = find(rename, &|l| pid_of(l) == cleanup && is_sync(l) && l.contains("/incoming>"))
        .unwrap_or_else(|| panic!("no fsync of incoming/ after the rename:\n{trace}"));
    let answer = find(rename, &|l| pid_of(l) == cleanup && (l.contains("write(") || l.contains("sendto(")))
        .unwrap_or_else(|| panic!("no answer after the rename:\n{trace}"));
    assert!(answer > file_sync && answer > dir_sync, "cleanup answered before both syncs:\n{trace}");
    // queue: maildir fdatasync < rename tmp->new < fsync(new/) < unlink(active/<id>)
    let new = find(0, &|l| l.contains("rename") && l.contains("/maildir/traced@example.test/new/"))
        .unwrap_or_else(|| panic!("no maildir rename:\n{trace}"));
    let queue = pid_of(lines[new]);
    assert!(lines[..new].iter().any(|l| pid_of(l) == queue && l.contains("fdatasync(")), "{trace}");
    let new_sync = find(new, &|l| pid_of(l) == queue && l.contains("fsync(")).expect("fsync of new/");
    let unlink = find(0, &|l| l.contains("unlink") && l.contains("/active/"))
        .unwrap_or_else(|| panic!("no unlink of active/ file:\n{trace}"));
    assert!(unlink > new_sync, "queue file removed only after the Maildir copy is durable:\n{trace}");
    let syncs = lines.iter().filter(|l| l.contains("fsync(") || l.contains("fdatasync(")).count();
    eprintln!("fsync+fdatasync calls for one message, one Maildir recipient: {syncs}");
    assert_eq!(syncs, 4, "cleanup: file + dir, queue: maildir file + dir\n{trace}");
}

/// Throughput of receive → queue → LMTP delivery into Dovecot: `cargo
/// test --release -p mortal-tests --test delivery -- --ignored --nocapture`
/// (after `cargo build --release --workspace --bins`).
#[test]
#[ignore = "benchmark: run by hand"]
fn bench_dovecot_lmtp_throughput() {
    const MESSAGES: usize = 1000;
    const CLIENTS: usize = 4;
    let dovecot = Dovecot::start();
    let mortal = start_mortal(
        options(&format!("[delivery]\ntransport = \"lmtp:unix:{}\"\n", dovecot.socket.display())),
        &["example.test"],
        "",
    );
    let started = Instant::now();
    mortal_tests::python(&format!(
        r#"
import smtplib, threading
def client(n):
    with smtplib.SMTP("127.0.0.1", {port}) as s:
        for i in range(n):
            s.sendmail("a@example.test", ["bench@example.test"], b"Subject: bench\r\n\r\n" + (b"x" * 76 + b"\r\n") * 26)
threads = [threading.Thread(target=client, args=({per},)) for _ in range({CLIENTS})]
[t.start() for t in threads]
[t.join() for t in threads]
"#,
        port = mortal.port,
        per = MESSAGES / CLIENTS,
    ));
    let received = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(120);
    while dovecot.delivered("bench@example.test").len() < MESSAGES && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let total = started.elapsed();
    let delivered = dovecot.delivered("bench@example.test").len();
    assert_eq!(delivered, MESSAGES, "{}", mortal.log_text());
    eprintln!(
        "{MESSAGES} messages, {CLIENTS} clients: accepted in {:.2}s, delivered by Dovecot in {:.2}s: {:.0} msg/s end to end",
        received.as_secs_f64(),
        total.as_secs_f64(),
        MESSAGES as f64 / total.as_secs_f64()
    );
}

/// Pids of the running processes of `program` (`mortal-lmtp`, ...).
fn pids_of(mortal: &Instance, program: &str) -> Vec<u32> {
    mortal
        .children()
        .into_iter()
        .filter(|pid| {
            fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe.file_name().is_some_and(|n| n == program))
        })
        .collect()
}

/// Issue 11: an lmtp delivery agent killed in the middle of a delivery
/// (the next hop has the content, its reply is pending) costs a deferral,
/// never the message: the queue defers the recipient it has no result
/// for, the master replaces the agent, and the retry delivers exactly once.
#[test]
fn kill_9_of_lmtp_agent_mid_delivery_defers_and_delivers_once() {
    let stalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stalled.clone();
    let lmtp = FakeLmtp::start(Arc::new(move |_: &str, _| {
        if flag.swap(true, std::sync::atomic::Ordering::SeqCst) { "250 2.0.0 Ok" } else { "STALL" }.to_owned()
    }));
    // One agent: the one stalled is the one to kill.
    let mortal = start_mortal(
        options(&format!(
            "[delivery]\ntransport = \"lmtp:inet:{}\"\ncommand_timeout = \"60s\"\n[process.lmtp]\nprocess_limit = 1\nprefork = 1\nmin_spare = 0\nmax_spare = 1\n",
            lmtp.addr
        )),
        &["example.test"],
        "",
    );
    send(mortal.port, "a@example.test", &["agent@example.test"], &message("agent crash", "must survive"));
    let mid =
        wait_for("the next hop has the content", || stalled.load(std::sync::atomic::Ordering::SeqCst).then_some(()));
    assert!(mid.is_some(), "{}", mortal.log_text());
    let agents = pids_of(&mortal, "mortal-lmtp");
    assert_eq!(agents.len(), 1, "{agents:?}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(agents[0] as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let deferred = mortal.wait_for_log("to=<agent@example.test>, relay=none, delay=");
    assert!(
        deferred.contains(
            "dsn=4.3.0, status=deferred (lmtp delivery agent unavailable: connection closed before every result)"
        ),
        "{deferred}"
    );
    let delivered = wait_for("delivery on retry", || (lmtp.deliveries("agent@example.test") == 1).then_some(()));
    assert!(delivered.is_some(), "{}", mortal.log_text());
    mortal.wait_for_empty_queue();
    let log = mortal.log_text();
    assert_eq!(log.matches("to=<agent@example.test>").count(), 2, "one deferral, one delivery: {log}");
    assert_eq!(log.matches("status=sent (250 2.0.0 Ok)").count(), 1, "{log}");
    assert_eq!(lmtp.deliveries("agent@example.test"), 1, "exactly once");
    let replaced = pids_of(&mortal, "mortal-lmtp");
    assert!(!replaced.contains(&agents[0]), "{replaced:?}");
}

/// Issue 11: the agents are mortal like every pool: with `max_use = 2` an
/// lmtp agent serves two deliveries (the second over the kept connection
/// and the kept LMTP session), retires, and a fresh one takes the third.
#[test]
fn lmtp_agent_retires_after_max_use_and_is_replaced() {
    let lmtp = FakeLmtp::start(Arc::new(|_: &str, _| "250 2.0.0 Ok".to_owned()));
    let mortal = start_mortal(
        options(&format!(
            "[delivery]\ntransport = \"lmtp:inet:{}\"\nconnection_reuse_time = \"30s\"\n[process.lmtp]\nprocess_limit = 1\nprefork = 1\nmin_spare = 0\nmax_spare = 1\nmax_use = 2\n",
            lmtp.addr
        )),
        &["example.test"],
        "",
    );
    // The master starts the prefork agent with the rest; wait until it
    // runs (the instance is up once smtpd answers, not every pool).
    let first = wait_for("the prefork lmtp agent", || {
        let pids = pids_of(&mortal, "mortal-lmtp");
        (!pids.is_empty()).then_some(pids)
    })
    .unwrap_or_default();
    assert_eq!(first.len(), 1, "{first:?}");
    for n in 1..=3 {
        send(mortal.port, "a@example.test", &[&format!("use{n}@example.test")], &message("uses", "counted"));
        let done = wait_for("delivered", || (lmtp.deliveries(&format!("use{n}@example.test")) == 1).then_some(()));
        assert!(done.is_some(), "{}", mortal.log_text());
    }
    mortal.wait_for_empty_queue();
    let status = mortal.status();
    assert_eq!(mortal_tests::lifetime::retired(&status, Service::Lmtp, RetireReason::MaxUse), 1, "{status:?}");
    let now = pids_of(&mortal, "mortal-lmtp");
    assert!(!now.contains(&first[0]), "the first agent retired: {now:?}");
    // Uses one and two shared one LMTP session; the third came from the
    // new agent.
    let txs = lmtp.transactions();
    assert_eq!(txs.len(), 3, "{txs:?}");
    assert_eq!(lmtp.connections(), 2, "{txs:?}");
}

/// Issue 11: a kept connection does not make an agent immortal. An lmtp
/// agent waiting on the queue's kept connection (reuse time 60s) is
/// retired at its 2s lifetime at once, not after the connection's idle
/// time, and the next message goes through a new agent.
#[test]
fn lmtp_agent_holding_a_kept_connection_retires_at_its_lifetime() {
    let lmtp = FakeLmtp::start(Arc::new(|_: &str, _| "250 2.0.0 Ok".to_owned()));
    let mortal = start_mortal(
        options(&format!(
            "[delivery]\ntransport = \"lmtp:inet:{}\"\nconnection_reuse_time = \"60s\"\n[process.lmtp]\nprefork = 1\nmin_spare = 0\nmax_spare = 1\nmax_lifetime = \"2s\"\nlifetime_jitter = 0.0\n",
            lmtp.addr
        )),
        &["example.test"],
        "",
    );
    let started = Instant::now();
    send(mortal.port, "a@example.test", &["kept@example.test"], &message("kept", "connection"));
    let done = wait_for("delivered", || (lmtp.deliveries("kept@example.test") == 1).then_some(()));
    assert!(done.is_some(), "{}", mortal.log_text());
    let retired = wait_for("an lmtp agent retired for its lifetime", || {
        let status = mortal.status();
        (mortal_tests::lifetime::retired(&status, Service::Lmtp, RetireReason::Lifetime) >= 1).then_some(status)
    });
    let status = retired.unwrap_or_else(|| panic!("{:?}\n{}", mortal.status(), mortal.log_text()));
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}: {status:?}", started.elapsed());
    assert_eq!(mortal_tests::lifetime::retired(&status, Service::Lmtp, RetireReason::Overdue), 0, "{status:?}");
    send(mortal.port, "a@example.test", &["next@example.test"], &message("next", "new agent"));
    let done = wait_for("delivered by a new agent", || (lmtp.deliveries("next@example.test") == 1).then_some(()));
    assert!(done.is_some(), "{}", mortal.log_text());
    mortal.wait_for_empty_queue();
    assert!(!mortal.log_text().contains("status=deferred"), "{}", mortal.log_text());
}
