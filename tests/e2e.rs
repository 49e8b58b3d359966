//! End to end: the real master, smtpd, cleanup and queue binaries on a
//! loopback port, driven by real clients (Python's smtplib, swaks) and by a
//! raw SMTP client where precision matters.

use mortal_tests::{Instance, Options, Smtp, body_of, process_exists, python, wait_for};
use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

/// A body that exercises dot-stuffing, an empty line, 8-bit text and a
/// line of exactly 998 octets (the RFC 5321 maximum without CRLF).
fn tricky_body() -> String {
    format!(".leading dot\n..two dots\n.\nx.\n\nnon-ASCII: grüße\n{}\nlast line\n", "y".repeat(998))
}

#[test]
fn smtplib_message_arrives_byte_identical_for_each_recipient() {
    let mortal = Instance::start();
    let body = tricky_body();
    python(&format!(
        r#"
import smtplib
body = {body:?}
msg = "From: a@example.test\r\nTo: b@example.test\r\nSubject: e2e\r\n\r\n" + body.replace("\n", "\r\n")
with smtplib.SMTP("127.0.0.1", {port}) as s:
    s.ehlo("client.test")
    refused = s.sendmail("a@example.test", ["b@example.test", "c@example.test"], msg.encode("utf-8"))
    assert refused == {{}}, refused
"#,
        port = mortal.port
    ));
    for rcpt in ["b@example.test", "c@example.test"] {
        let got = mortal.wait_for_delivery(rcpt, 1);
        assert_eq!(got.len(), 1, "exactly one copy for {rcpt}");
        let text = String::from_utf8(got[0].clone()).expect("utf-8 as sent");
        assert!(text.starts_with("Return-Path: <a@example.test>\nDelivered-To: "), "{text}");
        assert!(text.contains("Received: from client.test (unknown [127.0.0.1])"), "{text}");
        assert!(text.contains("\nSubject: e2e\n"), "{text}");
        assert_eq!(String::from_utf8_lossy(body_of(&got[0])), body, "body must be byte-identical");
    }
    mortal.wait_for_empty_queue();
    let log = mortal.log_text();
    assert!(log.contains(": removed"), "{log}");
}

#[test]
fn swaks_message_is_delivered() {
    let mortal = Instance::start();
    let out = Command::new("swaks")
        .args(["--server", &format!("127.0.0.1:{}", mortal.port), "--helo", "swaks.test"])
        .args(["--from", "sender@example.test", "--to", "swaks@example.test"])
        .args(["--header", "Subject: from swaks", "--body", "hello from swaks\n.dot line"])
        .output()
        .expect("swaks is required (cargo xtask ci installs it: apt-get install swaks)");
    let transcript = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "swaks failed:\n{transcript}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(transcript.contains("<-  250 2.0.0 Ok: queued as "), "{transcript}");
    let got = mortal.wait_for_delivery("swaks@example.test", 1);
    let text = String::from_utf8_lossy(&got[0]);
    assert!(text.contains("Subject: from swaks"), "{text}");
    assert!(body_of(&got[0]).starts_with(b"hello from swaks\n.dot line"), "{text}");
    mortal.wait_for_empty_queue();
}

#[test]
fn foreign_recipient_is_refused_and_nothing_is_written() {
    let mortal = Instance::start();
    let mut s = Smtp::connect(mortal.port).unwrap();
    assert!(s.cmd("EHLO client.test").unwrap().starts_with("250"));
    assert!(s.cmd("MAIL FROM:<a@example.test>").unwrap().starts_with("250"));
    let reply = s.cmd("RCPT TO:<victim@elsewhere.test>").unwrap();
    assert!(reply.starts_with("554 5.7.1 "), "relay must be refused: {reply}");
    let reply = s.cmd("DATA").unwrap();
    assert!(reply.starts_with("554") || reply.starts_with("503"), "DATA without recipients: {reply}");
    let _ = s.cmd("QUIT");
    mortal.wait_for_log("NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 554 5.7.1 <victim@elsewhere.test>");
    std::thread::sleep(Duration::from_millis(300));
    for q in ["incoming", "active", "deferred"] {
        assert!(mortal.queue_files(q).is_empty(), "{q}/ must stay empty");
    }
    assert!(!mortal.spool().join("maildir/victim@elsewhere.test").exists());
}

#[test]
fn max_use_recycles_children_without_refusing_anyone() {
    let mortal = Instance::start_with(Options {
        smtpd_process_limit: 1,
        smtpd_prefork: 1,
        smtpd_min_spare: 1,
        smtpd_max_spare: 1,
        smtpd_max_use: 3,
        ..Options::default()
    });
    for i in 0..10 {
        let mut s = Smtp::connect(mortal.port).unwrap_or_else(|e| panic!("session {i} refused: {e}"));
        assert!(s.greeting.starts_with("220 "), "session {i}: {}", s.greeting);
        assert!(s.cmd("NOOP").unwrap().starts_with("250"), "session {i}");
        assert!(s.cmd("QUIT").unwrap().starts_with("221"), "session {i}");
    }
    mortal.wait_for_log("disconnect from");
    // The start-up probe of Instance::start is an 11th session.
    let pids = wait_for("connect lines of 10 sessions", || {
        let pids = smtpd_pids_that_connected(&mortal);
        (pids.len() >= 4).then_some(pids)
    });
    let pids = pids.unwrap_or_default();
    assert!(pids.len() >= 4, "10 sessions with max_use=3 need at least 4 children, saw {pids:?}");
}

fn smtpd_pids_that_connected(mortal: &Instance) -> BTreeSet<u32> {
    mortal
        .log_text()
        .lines()
        .filter(|l| l.contains("/smtpd[") && l.contains(": connect from "))
        .filter_map(|l| l.split("/smtpd[").nth(1)?.split(']').next()?.parse().ok())
        .collect()
}

#[test]
fn killed_busy_child_is_replaced_and_next_client_served() {
    let mortal = Instance::start();
    let before = mortal.children();
    let mut victim_session = Smtp::connect(mortal.port).unwrap();
    assert!(victim_session.cmd("EHLO client.test").unwrap().starts_with("250"));
    // The busy child is the smtpd that logged the latest connect.
    let log = mortal.wait_for_log("connect from unknown[127.0.0.1]");
    let pid: u32 = log
        .lines()
        .rev()
        .find(|l| l.contains("/smtpd[") && l.contains(": connect from "))
        .and_then(|l| l.split("/smtpd[").nth(1)?.split(']').next()?.parse().ok())
        .expect("pid of the busy smtpd");
    assert!(before.contains(&pid) || mortal.children().contains(&pid), "{pid} is a child of the master");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    assert!(victim_session.closed(), "the client of a killed child sees the connection drop");
    let gone = wait_for("killed child reaped", || (!process_exists(pid)).then_some(()));
    assert!(gone.is_some(), "child {pid} still there");
    let mut next = Smtp::connect(mortal.port).expect("next client is served");
    assert!(next.greeting.starts_with("220 "));
    assert!(next.cmd("QUIT").unwrap().starts_with("221"));
    mortal.wait_for_log(&format!("pid {pid} killed by signal 9"));
}

#[test]
fn graceful_stop_leaves_no_process() {
    let mut mortal = Instance::start();
    // The port answers as soon as the first smtpd is up; the other
    // services may still be starting.
    let children = wait_for("smtpd x2, cleanup, queue, anvil", || {
        let c = mortal.children();
        (c.len() >= 5).then_some(c)
    });
    let mut all = children.unwrap_or_else(|| panic!("children: {:?}\n{}", mortal.children(), mortal.log_text()));
    all.insert(mortal.master_pid());
    python(&format!(
        r#"
import smtplib
with smtplib.SMTP("127.0.0.1", {}) as s:
    s.sendmail("a@example.test", ["stop@example.test"], b"Subject: s\r\n\r\nbye\r\n")
"#,
        mortal.port
    ));
    mortal.wait_for_delivery("stop@example.test", 1);
    assert!(mortal.stop(Duration::from_secs(15)), "master exits on SIGTERM by itself");
    let left = wait_for("all mortal processes gone", || {
        let left: Vec<u32> = all.iter().copied().filter(|&p| process_exists(p)).collect();
        left.is_empty().then_some(())
    });
    assert!(
        left.is_some(),
        "processes left after stop: {:?}",
        all.iter().filter(|&&p| process_exists(p)).collect::<Vec<_>>()
    );
    assert!(!mortal.dir.join("spool/run/master.pid").exists(), "pid file removed");
}

#[test]
fn check_reports_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "[smtpd]\nlisten = [\"127.0.0.1:2525\"]\n\n[process.smtpd]\nprocess_limit = 2\nprefork = 3\n",
    )
    .unwrap();
    let out = Command::new(mortal_tests::bin_dir().join("mortal"))
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "invalid config must fail: {text}");
    assert!(text.contains("bad.toml:6:1: process.smtpd.prefork: must not exceed process_limit (2)"), "{text}");
}

/// Issue 5: kill -9 of cleanup in the middle of DATA: the client gets a
/// 4xx, nothing is queued or delivered, and the half-written file goes.
#[test]
fn killed_cleanup_mid_data_gives_4xx_and_leaves_no_file() {
    let mortal = Instance::start();
    let mut s = Smtp::connect(mortal.port).unwrap();
    assert!(s.cmd("EHLO client.test").unwrap().starts_with("250"));
    assert!(s.cmd("MAIL FROM:<a@example.test>").unwrap().starts_with("250"));
    assert!(s.cmd("RCPT TO:<victim@example.test>").unwrap().starts_with("250"));
    assert!(s.cmd("DATA").unwrap().starts_with("354"));
    s.send_raw(b"Subject: half\r\n\r\nfirst line\r\n").unwrap();
    // smtpd logs "<id>: client=..." once cleanup named the queue file; the
    // id's last six hex digits are the pid of that cleanup process.
    let log = mortal.wait_for_log(": client=unknown[127.0.0.1]");
    let id = log
        .lines()
        .filter(|l| l.contains("/smtpd[") && l.contains(": client=unknown[127.0.0.1]"))
        .find_map(|l| l.split("]: ").nth(1)?.split(':').next().map(str::to_owned))
        .expect("queue id in the log");
    assert!(mortal_proto::queue_id::is_valid(&id), "{id}");
    let pid = u32::from_str_radix(&id[14..], 16).unwrap();
    assert!(mortal.queue_files("incoming").contains(&format!("{id}.tmp")), "cleanup is writing {id}.tmp");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let gone = wait_for("cleanup reaped", || (!process_exists(pid)).then_some(()));
    assert!(gone.is_some(), "cleanup {pid} still running");
    s.send_raw(b"last line\r\n.\r\n").unwrap();
    let reply = s.read_reply().unwrap();
    assert!(reply.starts_with("451 4.3.0"), "a killed cleanup must give a temporary failure, got {reply}");
    assert!(s.cmd("QUIT").unwrap().starts_with("221"));
    // The queue manager removes the orphan once its writer is gone.
    let cleaned = wait_for("orphaned temp file removed", || {
        mortal.queue_files("incoming").iter().all(|f| !f.starts_with(&id)).then_some(())
    });
    assert!(cleaned.is_some(), "left in incoming/: {:?}\n{}", mortal.queue_files("incoming"), mortal.log_text());
    for q in ["incoming", "active", "deferred", "corrupt"] {
        assert!(mortal.queue_files(q).is_empty(), "{q}/ must be empty: {:?}", mortal.queue_files(q));
    }
    assert!(mortal.delivered("victim@example.test").is_empty(), "nothing may be delivered");
}
