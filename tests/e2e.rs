//! End to end: the real master, smtpd, cleanup and queue binaries on a
//! loopback port, driven by real clients (Python's smtplib, swaks) and by a
//! raw SMTP client where precision matters.

use mortal_proto::date::{self, TimeZone};
use mortal_proto::queue_id::QueueId;
use mortal_proto::spool::QueueDir;
use mortal_tests::{Instance, Options, Smtp, TempDir, body_of, process_exists, python, wait_for};
use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, SystemTime};

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
    // The queue logs `removed` after the unlink that emptied the queue.
    mortal.wait_for_log(": removed");
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
    // MAIL was accepted, so the transaction exists but has no recipient.
    assert_eq!(s.cmd("DATA").unwrap(), "554 5.5.1 Error: no valid recipients\r\n", "DATA without recipients");
    assert!(s.cmd("QUIT").unwrap().starts_with("221"));
    mortal.wait_for_log("NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 554 5.7.1 <victim@elsewhere.test>");
    // Cleanup opened incoming/<id>.tmp at MAIL; once smtpd has ended the
    // session (its disconnect line) and the file is gone, nothing of the
    // transaction is left anywhere that could still become mail.
    mortal.wait_for_log("disconnect from unknown[127.0.0.1] ehlo=1 mail=1 rcpt=0/1 data=0/1 quit=1 commands=3/5");
    mortal.wait_for_empty_queue();
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
    let dir = TempDir::new("check");
    let config = dir.0.join("bad.toml");
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
        .find_map(|l| l.split("]: ").nth(1)?.split(':').next()?.parse::<QueueId>().ok())
        .expect("queue id in the log");
    let pid = id.pid();
    assert!(mortal.queue_files(QueueDir::Incoming).contains(&format!("{id}.tmp")), "cleanup is writing {id}.tmp");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let gone = wait_for("cleanup reaped", || (!process_exists(pid)).then_some(()));
    assert!(gone.is_some(), "cleanup {pid} still running");
    s.send_raw(b"last line\r\n.\r\n").unwrap();
    let reply = s.read_reply().unwrap();
    assert!(reply.starts_with("451 4.3.0"), "a killed cleanup must give a temporary failure, got {reply}");
    assert!(s.cmd("QUIT").unwrap().starts_with("221"));
    // The queue manager removes the orphan once its writer is gone.
    let cleaned = wait_for("orphaned temp file removed", || {
        mortal.queue_files(QueueDir::Incoming).iter().all(|f| !f.starts_with(id.as_str())).then_some(())
    });
    assert!(
        cleaned.is_some(),
        "left in incoming/: {:?}\n{}",
        mortal.queue_files(QueueDir::Incoming),
        mortal.log_text()
    );
    for q in [QueueDir::Incoming, QueueDir::Active, QueueDir::Deferred, QueueDir::Corrupt] {
        assert!(mortal.queue_files(q).is_empty(), "{q}/ must be empty: {:?}", mortal.queue_files(q));
    }
    assert!(mortal.delivered("victim@example.test").is_empty(), "nothing may be delivered");
}

/// Issue 11: log stamps are in the host's local time zone (here `TZ`, set
/// to an offset no test host uses), since their readers take a stamp
/// without a zone as local time.
#[test]
fn log_stamps_are_in_local_time() {
    let zone = "<-0330>3:30";
    let mortal = Instance::start_with(Options { env: vec![("TZ".into(), zone.into())], ..Options::default() });
    let before = SystemTime::now();
    let reply = Smtp::connect(mortal.port).unwrap().mail("a@example.test", "local@example.test", "hi");
    assert!(reply.starts_with("250 "), "{reply}");
    let log = mortal.wait_for_log(": removed");
    let after = SystemTime::now();
    let line = log.lines().find(|l| l.ends_with(": removed")).unwrap();
    // The stamp of any second the message was in flight, written 3h30 west.
    let zone = TimeZone::posix(zone).unwrap();
    let secs = after.duration_since(before).unwrap().as_secs() + 2;
    let stamps: Vec<String> =
        (0..=secs).map(|s| date::syslog(before - Duration::from_secs(1) + Duration::from_secs(s), &zone)).collect();
    assert!(stamps.iter().any(|stamp| line.starts_with(&format!("{stamp} "))), "{line} is none of {stamps:?}");
}

/// Issue 11: `[log] format = "json"` carries the context of each line as
/// fields: the client in smtpd and cleanup, the queue id in cleanup and
/// the queue manager, and for every line its service, pid, severity and
/// an RFC 3339 time with the local offset.
#[test]
fn json_log_lines_carry_client_queue_id_and_severity() {
    let opts = Options { env: vec![("TZ".into(), "<-0330>3:30".into())], ..Options::default() };
    let mortal = Instance::start_edited(opts, |text| {
        assert!(text.contains("format = \"postfix\"\n"), "{text}");
        text.replacen("format = \"postfix\"\n", "format = \"json\"\n", 1)
    });
    let reply = Smtp::connect(mortal.port).unwrap().mail("a@example.test", "json@example.test", "hi");
    assert!(reply.starts_with("250 "), "{reply}");
    mortal.wait_for_log(": removed\"");
    let lines: Vec<serde_json::Value> = mortal
        .log_text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON object: {l}: {e}")))
        .collect();
    for v in &lines {
        assert!(v["timestamp"].as_str().is_some_and(|t| t.ends_with("-03:30")), "{v}");
        assert!(v["pid"].as_u64().is_some_and(|p| p > 0), "{v}");
        assert!(["info", "warning", "error", "fatal", "debug"].contains(&v["severity"].as_str().unwrap_or("")), "{v}");
        assert!(["master", "smtpd", "cleanup", "queue", "anvil"].contains(&v["service"].as_str().unwrap_or("")), "{v}");
    }
    let find = |service: &str, what: &str| {
        lines
            .iter()
            .find(|v| v["service"] == service && v["message"].as_str().is_some_and(|m| m.contains(what)))
            .unwrap_or_else(|| panic!("no {service} line with {what:?} in {lines:#?}"))
    };
    let connect = find("smtpd", "connect from ");
    let client = connect["message"].as_str().unwrap().strip_prefix("connect from ").unwrap();
    assert!(client.ends_with("[127.0.0.1]"), "{connect}");
    assert_eq!(connect["client"], client, "{connect}");
    let spooled = find("cleanup", ": message-id=<");
    let id = spooled["message"].as_str().unwrap().split(':').next().unwrap();
    assert_eq!(spooled["queue_id"], id, "{spooled}");
    assert_eq!(spooled["client"], client, "{spooled}");
    assert_eq!(find("queue", &format!("{id}: removed"))["queue_id"], id);
    assert_eq!(find("smtpd", &format!("{id}: client="))["client"], client);
}

/// Virtual aliases (Postfix virtual_alias_maps) with a recipient table:
/// an alias is a known recipient at RCPT, cleanup queues what it expands
/// to (a list, a catch-all domain rewrite, an extension carried along),
/// an unknown user is refused during the dialogue, and an alias loop is a
/// temporary failure, never a lost or half-delivered message.
#[test]
fn virtual_aliases_expand_before_the_message_is_queued() {
    let dir = mortal_tests::TempDir::new("aliases");
    let users = dir.0.join("users");
    std::fs::write(&users, "alice@example.test\nbob@example.test\n").unwrap();
    let virtual_map = dir.0.join("virtual");
    std::fs::write(
        &virtual_map,
        "# the test's aliases\nlist@example.test alice@example.test, bob@example.test\n\
         loop1@example.test loop2@example.test\nloop2@example.test loop1@example.test\n\
         @localhost @example.test\n",
    )
    .unwrap();
    let mortal = Instance::start_with(Options {
        server_extra: format!(
            "recipient_map = {:?}\nvirtual_alias_maps = [\"texthash:{}\"]\nrecipient_delimiter = \"+\"\n",
            users.display().to_string(),
            virtual_map.display()
        ),
        ..Options::default()
    });
    let mut smtp = Smtp::connect(mortal.port).unwrap();
    assert!(smtp.cmd("EHLO client.test").unwrap().starts_with("250"));
    assert_eq!(smtp.cmd("MAIL FROM:<a@example.org>").unwrap(), "250 2.1.0 Ok\r\n");
    assert_eq!(smtp.cmd("RCPT TO:<list@example.test>").unwrap(), "250 2.1.5 Ok\r\n");
    assert_eq!(smtp.cmd("RCPT TO:<alice+news@localhost>").unwrap(), "250 2.1.5 Ok\r\n");
    assert_eq!(
        smtp.cmd("RCPT TO:<carol@example.test>").unwrap(),
        "550 5.1.1 <carol@example.test>: Recipient address rejected: User unknown in local recipient table\r\n"
    );
    assert!(smtp.cmd("DATA").unwrap().starts_with("354"));
    let queued = smtp.cmd("Subject: aliases\r\n\r\nhello\r\n.").unwrap();
    assert!(queued.starts_with("250 2.0.0 Ok: queued as "), "{queued}");
    for rcpt in ["alice@example.test", "bob@example.test", "alice+news@example.test"] {
        let got = mortal.wait_for_delivery(rcpt, 1);
        let text = String::from_utf8_lossy(&got[0]).into_owned();
        assert!(text.contains(&format!("Delivered-To: {rcpt}\n")), "{rcpt}: {text}");
    }
    assert!(mortal.delivered("list@example.test").is_empty());

    // A loop: the transaction fails with 451, nothing is queued.
    assert_eq!(smtp.cmd("MAIL FROM:<a@example.org>").unwrap(), "250 2.1.0 Ok\r\n");
    // cleanup refuses the recipient it cannot expand; smtpd, which streams
    // the transaction, hears it by the end of the data at the latest.
    assert_eq!(smtp.cmd("RCPT TO:<loop1@example.test>").unwrap(), "250 2.1.5 Ok\r\n");
    let data = smtp.cmd("DATA").unwrap();
    let end = if data.starts_with("354") { smtp.cmd("Subject: loop\r\n\r\nx\r\n.").unwrap() } else { data };
    mortal.wait_for_log("virtual alias loop: <loop1@example.test> expands to itself through other aliases");
    assert_eq!(end, "451 4.3.0 Error: virtual alias expansion failed\r\n");
}

/// Recipient tables of any kind (Postfix local_recipient_maps): here a
/// regexp table; what none knows is refused during the dialogue, and
/// postmaster always gets through.
#[test]
fn recipient_tables_refuse_unknown_users_at_rcpt() {
    let dir = mortal_tests::TempDir::new("recipient-tables");
    let users = dir.0.join("users.regexp");
    std::fs::write(&users, "# letters only\n/^[a-z]+@example\\.test$/ ok\n").unwrap();
    let mortal = Instance::start_with(Options {
        server_extra: format!("recipient_maps = [\"regexp:{}\"]\n", users.display()),
        ..Options::default()
    });
    let mut smtp = Smtp::connect(mortal.port).unwrap();
    assert!(smtp.cmd("EHLO client.test").unwrap().starts_with("250"));
    assert_eq!(smtp.cmd("MAIL FROM:<a@example.org>").unwrap(), "250 2.1.0 Ok\r\n");
    assert_eq!(smtp.cmd("RCPT TO:<alice@example.test>").unwrap(), "250 2.1.5 Ok\r\n");
    assert_eq!(smtp.cmd("RCPT TO:<PostMaster@example.test>").unwrap(), "250 2.1.5 Ok\r\n");
    assert_eq!(
        smtp.cmd("RCPT TO:<bob2@example.test>").unwrap(),
        "550 5.1.1 <bob2@example.test>: Recipient address rejected: User unknown in local recipient table\r\n"
    );
    // Under the queue id: a recipient was accepted before it.
    mortal.wait_for_log(
        ": reject: RCPT from unknown[127.0.0.1]: 550 5.1.1 <bob2@example.test>: Recipient address rejected: \
         User unknown in local recipient table; from=<a@example.org> to=<bob2@example.test> proto=ESMTP",
    );
}

/// `[cleanup] queue_minfree`: with less free space than the reserve, MAIL
/// is refused with `452 4.3.1` before any data is sent, and mail flows
/// again once the reserve is met (here by a `mortal reload` to a smaller
/// reserve; `root_` tests fill a real file system).
#[test]
fn mail_waits_while_the_spool_is_below_queue_minfree() {
    // More than any disk here has free.
    let extra = "[cleanup]\nqueue_minfree = 9000000000000000000\n".to_owned();
    let inst = Instance::start_with(Options { extra, ..Options::default() });
    let mut smtp = Smtp::connect(inst.port).expect("connect");
    assert!(smtp.cmd("EHLO client.test").unwrap().starts_with("250"));
    assert_eq!(smtp.cmd("MAIL FROM:<a@example.test>").unwrap(), "452 4.3.1 Insufficient system storage\r\n");
    inst.wait_for_log("warning: NOQUEUE: not enough free space in the spool: ");
    let text = std::fs::read_to_string(&inst.config)
        .unwrap()
        .replace("queue_minfree = 9000000000000000000", "queue_minfree = 0");
    std::fs::write(&inst.config, text).unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(inst.master_pid() as i32), nix::sys::signal::Signal::SIGHUP)
        .expect("SIGHUP master");
    let accepted = wait_for("MAIL accepted after the reload", || {
        let mut smtp = Smtp::connect(inst.port).ok()?;
        smtp.cmd("EHLO client.test").ok()?;
        smtp.cmd("MAIL FROM:<a@example.test>").ok()?.starts_with("250").then_some(smtp)
    });
    let mut smtp = accepted.unwrap_or_else(|| panic!("{}", inst.log_text()));
    assert_eq!(smtp.cmd("RCPT TO:<space@example.test>").unwrap(), "250 2.1.5 Ok\r\n");
    assert!(smtp.cmd("DATA").unwrap().starts_with("354"));
    assert!(smtp.cmd("Subject: room\r\n\r\nagain\r\n.").unwrap().starts_with("250 2.0.0 Ok: queued as "));
    inst.wait_for_delivery("space@example.test", 1);
}

/// A tmpfs this test mounted, unmounted again however the test ends.
struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A real small file system: messages accepted before it filled up are
/// delivered exactly once, MAIL gets `452 4.3.1` while it is full, and
/// mail flows again once space is freed.
#[test]
#[ignore = "needs root (mounts a tmpfs for the spool); cargo xtask ci runs the root_ tests as root"]
fn root_a_full_spool_refuses_new_mail_and_loses_nothing() {
    let dir = TempDir::new("tmpfs-spool");
    let mount_point = dir.0.join("fs");
    std::fs::create_dir(&mount_point).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=48m,mode=0755", "tmpfs"])
        .arg(&mount_point)
        .status()
        .expect("mount");
    assert!(mounted.success(), "mount tmpfs");
    let _tmpfs = Tmpfs(mount_point.clone());
    let spool = mount_point.join("spool");
    let extra = "[cleanup]\nqueue_minfree = 16000000\n".to_owned();
    let inst = Instance::start_edited(Options { extra, ..Options::default() }, |text| {
        text.replace("spool_dir = \"../spool\"", &format!("spool_dir = \"{}\"", spool.display()))
    });
    for n in 0..3 {
        let mut smtp = Smtp::connect(inst.port).expect("connect");
        let reply = smtp.mail("a@example.test", &format!("before{n}@example.test"), "queued before the disk filled");
        assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    }
    // Fill the file system to within 8 MB of its end: below the reserve.
    let free = nix::sys::statvfs::statvfs(&mount_point).unwrap();
    let free = free.blocks_available() * free.fragment_size();
    let filler = mount_point.join("filler");
    std::fs::write(&filler, vec![0u8; usize::try_from(free - 8_000_000).unwrap()]).unwrap();
    let mut smtp = Smtp::connect(inst.port).expect("connect");
    assert!(smtp.cmd("EHLO client.test").unwrap().starts_with("250"));
    assert_eq!(smtp.cmd("MAIL FROM:<a@example.test>").unwrap(), "452 4.3.1 Insufficient system storage\r\n");
    // The harness's helpers look in its own spool; this one is on the tmpfs.
    let delivered =
        |rcpt: &str| std::fs::read_dir(spool.join("maildir").join(rcpt).join("new")).map_or(0, |d| d.flatten().count());
    let wait_delivered = |rcpt: &str| {
        let done = wait_for(&format!("delivery to {rcpt}"), || (delivered(rcpt) >= 1).then_some(()));
        assert!(done.is_some(), "{}", inst.log_text());
    };
    // What was acknowledged is delivered, each exactly once.
    for n in 0..3 {
        wait_delivered(&format!("before{n}@example.test"));
    }
    std::fs::remove_file(&filler).unwrap();
    let mut smtp = Smtp::connect(inst.port).expect("connect");
    let reply = smtp.mail("a@example.test", "after@example.test", "room again");
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    wait_delivered("after@example.test");
    inst.wait_for_log_count(": removed", 4);
    for n in 0..3 {
        assert_eq!(delivered(&format!("before{n}@example.test")), 1, "exactly once");
    }
}
