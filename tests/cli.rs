//! `mortal queue ...` end to end (issue 6): a real instance whose mail
//! cannot be delivered (its transport is an LMTP port nobody listens on),
//! so messages stay queued with real delay reasons while the queue manager
//! keeps retrying them; the CLI lists them (text, and JSON checked with a
//! JSON parser), shows, holds, releases, requeues, flushes and deletes
//! them, and each change is seen to take effect in the spool and in the
//! queue manager's log. Messages that must stay put for a test are placed
//! straight into `deferred/` with a retry time an hour away.

use mortal_proto::envelope::{BodyType, ClientInfo, SenderInfo};
use mortal_proto::queue_file::{DeliveryStatus, QueueFile, QueuedRecipient, RecipientState};
use mortal_proto::queue_id::QueueId;
use mortal_proto::spool::QueueDir;
use mortal_tests::{ClosedPort, Instance, Options, Smtp, bin_dir, wait_for};
use serde_json::Value;
use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

/// sysexits statuses documented in `mortal queue --help`.
const EXIT_NOT_FOUND: i32 = 66;
const EXIT_BUSY: i32 = 75;
const EXIT_DENIED: i32 = 77;
/// Unprivileged accounts the permission tests run the CLI as (one of them
/// may be the mail user the test instance runs as).
const NOBODY: u32 = 65534;
const DAEMON: u32 = 1;
/// Attempts of a message that keeps failing which span more than the test
/// config's maximal_backoff (2s) plus its scan interval (1s): each gap is at
/// least minimal_backoff (1s), so four attempts span three such gaps. Any
/// other message that was due has been tried meanwhile.
const WITNESS_ATTEMPTS: usize = 4;

/// One run of the `mortal` binary.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn mortal(inst: &Instance, args: &[&str]) -> Run {
    run(Command::new(bin_dir().join("mortal")).arg("--config").arg(&inst.config).args(args))
}

fn mortal_as(inst: &Instance, uid: u32, args: &[&str]) -> Run {
    run(Command::new(bin_dir().join("mortal")).arg("--config").arg(&inst.config).args(args).uid(uid).gid(uid))
}

fn run(cmd: &mut Command) -> Run {
    let out = cmd.output().expect("run mortal");
    Run {
        code: out.status.code().expect("mortal exits, it is not killed"),
        stdout: String::from_utf8(out.stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8(out.stderr).expect("utf-8 stderr"),
    }
}

/// An instance whose every delivery attempt fails with a refused
/// connection, while the port it returns lives.
fn stuck_instance() -> (Instance, ClosedPort) {
    let closed = ClosedPort::new();
    let inst = Instance::start_with(Options {
        extra: format!("\n[delivery]\ntransport = \"lmtp:inet:127.0.0.1:{}\"\n", closed.port),
        ..Options::default()
    });
    (inst, closed)
}

/// Sends one message over SMTP; returns its queue id.
fn send(inst: &Instance, from: &str, to: &[&str], subject: &str) -> QueueId {
    let mut s = Smtp::connect(inst.port).expect("connect");
    assert!(s.cmd("EHLO client.test").unwrap().starts_with("250"));
    assert!(s.cmd(&format!("MAIL FROM:<{from}>")).unwrap().starts_with("250"));
    for rcpt in to {
        let reply = s.cmd(&format!("RCPT TO:<{rcpt}>")).unwrap();
        assert!(reply.starts_with("250"), "{reply}");
    }
    assert!(s.cmd("DATA").unwrap().starts_with("354"));
    let message = format!("From: <{from}>\r\nSubject: {subject}\r\n\r\nbody of {subject}\r\n.\r\n");
    s.send_raw(message.as_bytes()).unwrap();
    let reply = s.read_reply().unwrap();
    let _ = s.cmd("QUIT");
    let id = reply.trim_end().rsplit(' ').next().unwrap_or_default().parse();
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    id.unwrap_or_else(|e| panic!("{e}: {reply}"))
}

static PLACED: AtomicU32 = AtomicU32::new(0);

/// Writes a valid queue file into `queue/` as the queue manager would
/// (temporary name, then rename), with its mtime (for `deferred/`, the
/// retry time) `retry_in` from now.
/// `status` is the last attempt's code and text, if there was one.
fn place(
    inst: &Instance,
    queue: QueueDir,
    sender: &str,
    rcpt: &str,
    status: Option<(&str, &str)>,
    retry_in: Duration,
) -> QueueId {
    let n = PLACED.fetch_add(1, Ordering::Relaxed);
    let arrival = SystemTime::now() + Duration::from_micros(u64::from(n));
    let id = QueueId::new(arrival, 0xC11_000 + n);
    let qf = QueueFile {
        id,
        arrival,
        client: ClientInfo {
            addr: std::net::Ipv4Addr::LOCALHOST.into(),
            name: "unknown".into(),
            helo: "placed.test".into(),
            protocol: "ESMTP".into(),
            tls: String::new(),
            auth: None,
        },
        sender: SenderInfo {
            address: sender.into(),
            body: BodyType::SevenBit,
            smtputf8: false,
            ret: None,
            envid: String::new(),
        },
        recipients: vec![QueuedRecipient {
            address: rcpt.into(),
            state: RecipientState::Pending,
            notify: Default::default(),
            orcpt: String::new(),
            status: status.map(|(code, text)| DeliveryStatus { code: code.parse().unwrap(), text: text.into() }),
        }],
        content: format!("Subject: placed {n}\r\n\r\nplaced body {n}\r\n").into_bytes(),
    };
    let temp = inst.spool_layout().temp_path(queue, &id);
    fs::write(&temp, qf.encode()).unwrap();
    File::options().write(true).open(&temp).unwrap().set_modified(SystemTime::now() + retry_in).unwrap();
    fs::rename(&temp, inst.spool_layout().path(queue, &id)).unwrap();
    id
}

/// The `list --json` records, each line parsed on its own.
fn list_json(inst: &Instance, extra: &[&str]) -> Vec<Value> {
    let args: Vec<&str> = ["queue", "list", "--json"].iter().chain(extra).copied().collect();
    let r = mortal(inst, &args);
    assert_eq!(r.code, 0, "{r:?}");
    r.stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}"))).collect()
}

fn record<'a>(records: &'a [Value], id: &QueueId) -> Option<&'a Value> {
    records.iter().find(|r| r["queue_id"] == id.as_str())
}

/// Where the message is now, from the directories.
fn queue_of(inst: &Instance, id: &QueueId) -> Option<QueueDir> {
    QueueDir::ALL.into_iter().find(|&q| inst.queue_files(q).iter().any(|f| f == id.as_str()))
}

/// Delivery attempts the queue manager logged for `id`.
fn attempts(inst: &Instance, id: &QueueId) -> usize {
    inst.log_text().matches(&format!("{id}: to=<")).count()
}

/// Waits until `witness`, a message that keeps failing, was tried
/// [`WITNESS_ATTEMPTS`] more times: a positive sign that the time any due
/// message needs to be retried has passed.
fn witness_retried(inst: &Instance, witness: &QueueId) {
    let before = attempts(inst, witness);
    wait_for("the witness message retried", || (attempts(inst, witness) >= before + WITNESS_ATTEMPTS).then_some(()))
        .unwrap_or_else(|| panic!("{witness} not retried\n{}", inst.log_text()));
}

/// Runs a changing command until the message is not busy being delivered;
/// every busy answer must say so.
fn until_not_busy(inst: &Instance, args: &[&str]) -> Run {
    wait_for(&format!("{args:?} to find the message idle"), || {
        let r = mortal(inst, args);
        if r.code == EXIT_BUSY {
            assert!(r.stderr.contains("being delivered, try again"), "{r:?}");
            std::thread::sleep(Duration::from_millis(30));
            return None;
        }
        Some(r)
    })
    .expect("the message was idle at some point")
}

#[test]
fn list_show_and_stats_describe_the_queue() {
    let (inst, _closed) = stuck_instance();
    let sent = send(&inst, "a@example.test", &["b@example.test", "c@example.test"], "cli one");
    let placed = place(
        &inst,
        QueueDir::Deferred,
        "",
        "d@example.test",
        Some(("4.4.1", "placed reason")),
        Duration::from_secs(3600),
    );

    // The first attempt records each recipient's delay reason.
    let records = wait_for("a delay reason for the sent message", || {
        let records = list_json(&inst, &[]);
        let ok =
            record(&records, &sent)?["recipients"][0]["delay_reason"].as_str().is_some_and(|r| r.starts_with("4."));
        ok.then_some(records)
    })
    .unwrap_or_else(|| panic!("no delay reason\n{}", inst.log_text()));
    assert_eq!(records.len(), 2, "{records:?}");
    let m = record(&records, &sent).unwrap();
    assert!(["deferred", "active", "incoming"].contains(&m["queue_name"].as_str().unwrap()), "{m}");
    assert_eq!(m["sender"], "a@example.test");
    assert!(m["message_size"].as_u64().unwrap() > 20, "{m}");
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    assert!(now - m["arrival_time"].as_u64().unwrap() < 60, "{m}");
    let rcpts: Vec<&str> = m["recipients"].as_array().unwrap().iter().map(|r| r["address"].as_str().unwrap()).collect();
    assert_eq!(rcpts, ["b@example.test", "c@example.test"]);
    let p = record(&records, &placed).unwrap();
    assert_eq!((p["queue_name"].as_str(), p["sender"].as_str()), (Some("deferred"), Some("")));
    assert_eq!(
        p["recipients"],
        serde_json::json!([{"address": "d@example.test", "delay_reason": "4.4.1 placed reason"}])
    );

    // Text, as in a pipe: exact figures, Postfix's shape.
    let r = mortal(&inst, &["queue", "list"]);
    assert_eq!(r.code, 0, "{r:?}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert!(lines[0].starts_with("-Queue ID-") && lines[0].contains("----Arrival Time----"), "{}", r.stdout);
    let placed_line = lines.iter().position(|l| l.starts_with(placed.as_str())).expect("placed message listed");
    assert!(lines[placed_line].ends_with("  MAILER-DAEMON"), "{}", r.stdout);
    assert_eq!(lines[placed_line + 1], "(4.4.1 placed reason)");
    assert_eq!(lines[placed_line + 2].trim_start(), "d@example.test");
    assert!(lines.iter().any(|l| l.starts_with(sent.as_str()) && l.ends_with("  a@example.test")), "{}", r.stdout);
    assert!(
        lines.last().unwrap().starts_with("-- ") && lines.last().unwrap().ends_with(" in 2 Requests."),
        "{}",
        r.stdout
    );

    // Filters.
    let ids = |extra: &[&str]| -> Vec<String> {
        list_json(&inst, extra).iter().map(|r| r["queue_id"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(ids(&["--sender", "<>"]), [placed.as_str()]);
    assert_eq!(ids(&["--sender", "A@EXAMPLE.TEST"]), [sent.as_str()]);
    assert_eq!(ids(&["--recipient", "@example.test"]).len(), 2);
    assert_eq!(ids(&["--recipient", "c@example.test"]), [sent.as_str()]);
    assert!(ids(&["--older-than", "1h"]).is_empty());
    assert_eq!(ids(&["--queue", "deferred", "--sender", ""]), [placed.as_str()]);
    let r = mortal(&inst, &["queue", "list", "--queue", "hold"]);
    assert_eq!((r.code, r.stdout.as_str()), (0, "Mail queue is empty\n"));

    // show: envelope, header, body, and each part alone.
    let r = mortal(&inst, &["queue", "show", sent.as_str()]);
    assert_eq!(r.code, 0, "{r:?}");
    for want in
        ["*** ENVELOPE ", "sender: <a@example.test>", "recipient: <b@example.test> pending", "Subject: cli one\n"]
    {
        assert!(r.stdout.contains(want), "{want:?} in\n{}", r.stdout);
    }
    assert!(r.stdout.contains("body of cli one\n*** END "), "{}", r.stdout);
    let header = mortal(&inst, &["queue", "show", &sent.as_str().to_lowercase(), "--header-only"]);
    assert!(header.stdout.contains("Subject: cli one\n") && !header.stdout.contains("body of"), "{header:?}");
    assert!(header.stdout.starts_with("Received: from client.test"), "{header:?}");
    let body = mortal(&inst, &["queue", "show", sent.as_str(), "--body-only"]);
    assert_eq!(body.stdout, "body of cli one\n");
    let json = mortal(&inst, &["queue", "show", placed.as_str(), "--json"]);
    let v: Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v["queue_name"], "deferred", "{v}");
    assert!(v["body"].as_str().unwrap().starts_with("placed body "), "{v}");
    assert!(v["header"].as_str().unwrap().starts_with("Subject: placed "), "{v}");
    assert_eq!(v["recipients"][0]["state"], "pending");

    // stats from the directories.
    let r = mortal(&inst, &["queue", "stats", "--json"]);
    let v: Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {r:?}"));
    assert_eq!(v["total"]["messages"], 2, "{v}");
    assert_eq!(v["queues"]["hold"]["messages"], 0, "{v}");
    assert!(v["queues"]["deferred"]["messages"].as_u64().unwrap() >= 1, "{v}");
    assert!(v["total"]["oldest_arrival"].as_u64().unwrap() <= now, "{v}");
    let r = mortal(&inst, &["queue", "stats"]);
    assert!(
        r.stdout.starts_with("queue") && r.stdout.lines().any(|l| l.starts_with("total") && l.contains(" 2 ")),
        "{r:?}"
    );

    // A file that fails to decode is listed (when asked for) with the
    // reason, and can be deleted.
    let bad = QueueId::new(SystemTime::now(), 0xBAD);
    fs::write(inst.spool_layout().path(QueueDir::Corrupt, &bad), b"MORTALQ\0 torn").unwrap();
    let corrupt = list_json(&inst, &["--queue", "corrupt"]);
    assert_eq!(corrupt.len(), 1, "{corrupt:?}");
    assert_eq!(
        (corrupt[0]["queue_id"].as_str(), corrupt[0]["queue_name"].as_str()),
        (Some(bad.as_str()), Some("corrupt"))
    );
    assert!(corrupt[0]["error"].as_str().is_some_and(|e| !e.is_empty()), "{corrupt:?}");
    assert!(record(&list_json(&inst, &[]), &bad).is_none(), "corrupt files only when asked for");
    let r = mortal(&inst, &["queue", "delete", bad.as_str()]);
    assert_eq!((r.code, r.stdout.trim_end()), (0, &*format!("{bad}: removed")), "{r:?}");

    // Unknown and malformed ids.
    let missing = QueueId::new(SystemTime::now(), 1);
    let r = mortal(&inst, &["queue", "show", missing.as_str()]);
    assert_eq!(r.code, EXIT_NOT_FOUND, "{r:?}");
    assert!(r.stderr.contains("not in the queue"), "{r:?}");
    assert_eq!(mortal(&inst, &["queue", "show", "../../etc/passwd"]).code, 2);
}

#[test]
fn hold_release_requeue_flush_and_delete_take_effect() {
    let (inst, _closed) = stuck_instance();
    let id = send(&inst, "a@example.test", &["b@example.test"], "held");
    inst.wait_for_log(&format!("{id}: to=<b@example.test>"));
    let witness = send(&inst, "v@example.test", &["b@example.test"], "witness");

    // hold: the queue manager may be delivering it right now; the CLI
    // says so and leaves it alone until it is back in deferred/.
    let r = until_not_busy(&inst, &["queue", "hold", id.as_str()]);
    assert_eq!((r.code, r.stdout.as_str()), (0, &*format!("{id}: placed on hold\n")), "{r:?}");
    assert!(r.stderr.contains("Placed on hold: 1 message"), "{r:?}");
    assert_eq!(queue_of(&inst, &id), Some(QueueDir::Hold));
    let held = mortal(&inst, &["queue", "list"]);
    assert!(held.stdout.lines().any(|l| l.starts_with(&format!("{id}!"))), "{held:?}");
    let before = attempts(&inst, &id);
    witness_retried(&inst, &witness);
    assert_eq!(attempts(&inst, &id), before, "a held message is not retried\n{}", inst.log_text());
    assert_eq!(queue_of(&inst, &id), Some(QueueDir::Hold));

    let r = mortal(&inst, &["queue", "hold", id.as_str()]);
    assert_eq!((r.code, r.stdout.trim_end()), (0, &*format!("{id}: already on hold")), "{r:?}");
    let r = mortal(&inst, &["queue", "requeue", id.as_str()]);
    assert_eq!(r.code, EXIT_NOT_FOUND, "{r:?}");
    assert!(r.stderr.contains("on hold: release it first"), "{r:?}");

    // release: back to incoming/, and the queue manager, woken, tries it at once.
    let r = mortal(&inst, &["queue", "release", id.as_str()]);
    assert_eq!((r.code, r.stdout.trim_end()), (0, &*format!("{id}: released from hold")), "{r:?}");
    wait_for("a new attempt after release", || (attempts(&inst, &id) > before).then_some(()))
        .unwrap_or_else(|| panic!("not retried after release\n{}", inst.log_text()));
    let r = until_not_busy(&inst, &["queue", "release", id.as_str()]);
    assert_eq!(r.code, EXIT_NOT_FOUND, "{r:?}");
    assert!(r.stderr.contains(&format!("{id}: not on hold (in ")), "{r:?}");

    // requeue and flush: due in an hour, tried now.
    let later = Duration::from_secs(3600);
    let requeued = place(&inst, QueueDir::Deferred, "x@example.test", "b@example.test", Some(("4.4.1", "old")), later);
    let flushed = place(&inst, QueueDir::Deferred, "y@example.test", "b@example.test", Some(("4.4.1", "old")), later);
    witness_retried(&inst, &id);
    assert_eq!((attempts(&inst, &requeued), attempts(&inst, &flushed)), (0, 0), "not due yet");
    let r = mortal(&inst, &["queue", "requeue", requeued.as_str()]);
    assert_eq!((r.code, r.stdout.trim_end()), (0, &*format!("{requeued}: requeued")), "{r:?}");
    let r = mortal(&inst, &["queue", "flush", flushed.as_str()]);
    assert_eq!((r.code, r.stdout.trim_end()), (0, &*format!("{flushed}: scheduled for delivery now")), "{r:?}");
    // flush without ids: every deferred message is due now.
    let all = place(&inst, QueueDir::Deferred, "w@example.test", "b@example.test", Some(("4.4.1", "old")), later);
    // Messages that keep failing cycle through active/: retry while busy.
    let r = until_not_busy(&inst, &["queue", "flush"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains(&format!("{all}: scheduled for delivery now")), "{r:?}");
    for moved in [&requeued, &flushed, &all] {
        wait_for("an attempt", || (attempts(&inst, moved) > 0).then_some(()))
            .unwrap_or_else(|| panic!("{moved} not tried\n{}", inst.log_text()));
    }

    // delete: one placed message, then everything (retrying what is busy).
    let doomed = place(&inst, QueueDir::Deferred, "z@example.test", "b@example.test", Some(("4.4.1", "old")), later);
    let r = mortal(&inst, &["queue", "delete", doomed.as_str()]);
    assert_eq!((r.code, r.stdout.trim_end()), (0, &*format!("{doomed}: removed")), "{r:?}");
    assert_eq!(queue_of(&inst, &doomed), None);
    assert_eq!(mortal(&inst, &["queue", "delete", doomed.as_str()]).code, EXIT_NOT_FOUND);
    let r = until_not_busy(&inst, &["queue", "delete", "--sender", "@example.test"]);
    assert_eq!(r.code, 0, "{r:?}");
    for gone in [&id, &witness, &requeued, &flushed, &all] {
        assert_eq!(queue_of(&inst, gone), None, "{gone} deleted\n{r:?}");
    }
    let r = mortal(&inst, &["queue", "list"]);
    assert_eq!(r.stdout, "Mail queue is empty\n", "{r:?}");
}

#[test]
fn a_message_being_delivered_is_reported_and_never_touched() {
    let (inst, _closed) = stuck_instance();
    // A file in active/ is the queue manager's: nothing the CLI does may
    // move or remove it. (The running queue manager takes files into
    // active/ itself and recovers stray ones only when it starts; a first
    // delivery attempt shows it has.)
    let first = send(&inst, "a@example.test", &["b@example.test"], "queue manager is up");
    inst.wait_for_log(&format!("{first}: to=<b@example.test>"));
    let id = place(&inst, QueueDir::Active, "a@example.test", "b@example.test", None, Duration::ZERO);
    for command in ["delete", "hold", "requeue", "flush"] {
        let args = ["queue", command, id.as_str()];
        let r = mortal(&inst, &args);
        assert_eq!(r.code, EXIT_BUSY, "{args:?}: {r:?}");
        assert!(r.stderr.contains(&format!("{id}: being delivered, try again")), "{r:?}");
        assert_eq!(queue_of(&inst, &id), Some(QueueDir::Active), "{args:?} left it in active/");
    }
    let r = mortal(&inst, &["queue", "delete", "--all"]);
    assert_eq!(r.code, EXIT_BUSY, "{r:?}");
    let r = mortal(&inst, &["queue", "list"]);
    assert!(r.stdout.lines().any(|l| l.starts_with(&format!("{id}*"))), "{r:?}");
    fs::remove_file(inst.spool_layout().path(QueueDir::Active, &id)).unwrap();
}

/// A queue file of format version 1, whose recipient status was one
/// string, is still listed and shown with its delay reason (the committed
/// fuzz seed is such a file, as the last version 1 build wrote it).
#[test]
fn version_1_queue_files_are_listed_and_shown() {
    let (inst, _closed) = stuck_instance();
    let id = "0000000010000100000A";
    let dir = inst.spool_layout().dir(QueueDir::Deferred);
    let temp = dir.join(format!("{id}.tmp"));
    fs::write(&temp, include_bytes!("../fuzz/corpus/queue_file/seed-partial-v1")).unwrap();
    File::options()
        .write(true)
        .open(&temp)
        .unwrap()
        .set_modified(SystemTime::now() + Duration::from_secs(3600))
        .unwrap();
    fs::rename(&temp, dir.join(id)).unwrap();
    let reason = "(4.4.1 connect to 127.0.0.1:24: Connection refused)";
    // The seed's body is binary: its envelope is read from the JSON form.
    let r = mortal(&inst, &["queue", "show", id, "--json"]);
    assert_eq!(r.code, 0, "{r:?}");
    let doc: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(doc["recipients"][1]["address"], "c@example.test", "{doc}");
    assert_eq!(doc["recipients"][1]["delay_reason"], reason.trim_matches(['(', ')']), "{doc}");
    assert_eq!(doc["recipients"][0]["delay_reason"], "", "{doc}");
    assert_eq!(doc["client_address"], "127.0.0.1", "{doc}");
    let r = mortal(&inst, &["queue", "list"]);
    assert_eq!(r.code, 0, "{r:?}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    let at = lines.iter().position(|l| l.starts_with(id)).unwrap_or_else(|| panic!("{id} not listed: {r:?}"));
    assert_eq!(lines[at + 1], reason, "{r:?}");
    assert_eq!(lines[at + 2].trim(), "c@example.test", "{r:?}");
    let r = mortal(&inst, &["queue", "delete", id]);
    assert_eq!(r.code, 0, "{r:?}");
}

#[test]
fn permissions_are_checked_and_explained() {
    let (inst, _closed) = stuck_instance();
    let id = place(&inst, QueueDir::Deferred, "a@example.test", "b@example.test", None, Duration::from_secs(3600));
    let deferred = inst.spool_layout().dir(QueueDir::Deferred);
    if !nix::unistd::geteuid().is_root() {
        // Unprivileged run: the spool is ours, so only a directory we
        // cannot read shows the refusal.
        set_mode(&deferred, 0o000);
        let r = mortal(&inst, &["queue", "list"]);
        set_mode(&deferred, 0o700);
        assert_eq!(r.code, EXIT_DENIED, "{r:?}");
        assert!(r.stderr.contains("reading the queue needs read access to"), "{r:?}");
        // What follows needs other users than the one running the test:
        // as root, the same refusal is shown to a third user instead.
        return;
    }
    // Started as root, the master gave the queue directories (mode 0700)
    // to the mail user; a third user may neither read nor change them.
    let owner = fs::metadata(&deferred).unwrap().uid();
    assert_ne!(owner, 0, "the master hands the spool to the mail user");
    let stranger = if owner == NOBODY { DAEMON } else { NOBODY };
    let (owner_name, stranger_name) = (user_name(owner), user_name(stranger));
    let r = mortal_as(&inst, stranger, &["queue", "list"]);
    assert_eq!(r.code, EXIT_DENIED, "{r:?}");
    assert!(r.stderr.contains("reading the queue needs read access to"), "{r:?}");
    let who = format!("you are {stranger_name} (uid {stranger}): run as root or {owner_name}");
    assert!(r.stderr.contains(&who), "{who:?} in {r:?}");

    // Readable by all, still not theirs to change.
    let dirs = QueueDir::ALL.map(|q| inst.spool_layout().dir(q));
    for dir in &dirs {
        set_mode(dir, 0o755);
    }
    let stats = mortal_as(&inst, stranger, &["queue", "stats"]);
    let hold = mortal_as(&inst, stranger, &["queue", "hold", id.as_str()]);
    for dir in &dirs {
        set_mode(dir, 0o700);
    }
    assert_eq!(stats.code, 0, "{stats:?}");
    assert_eq!(hold.code, EXIT_DENIED, "{hold:?}");
    assert!(hold.stderr.contains("changing the queue needs root or the spool owner"), "{hold:?}");
    let belongs = format!("belongs to {owner_name} (uid {owner}) and {who}");
    assert!(hold.stderr.contains(&belongs), "{belongs:?} in {hold:?}");
    assert_eq!(queue_of(&inst, &id), Some(QueueDir::Deferred), "nothing changed");

    // The spool owner may change it.
    let r = mortal_as(&inst, owner, &["queue", "hold", id.as_str()]);
    assert_eq!((r.code, r.stdout.trim_end()), (0, &*format!("{id}: placed on hold")), "{r:?}");
    assert_eq!(queue_of(&inst, &id), Some(QueueDir::Hold));
}

fn user_name(uid: u32) -> String {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)).unwrap().expect("user exists").name
}

fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// An operator half-way through editing the file must still see and stop
/// the running master: `status` and `stop` print the file's errors, warn,
/// and reach the master through the run dir; `reload` refuses.
#[test]
fn status_and_stop_reach_the_master_while_the_file_is_broken() {
    let inst = Instance::start();
    let good = fs::read_to_string(&inst.config).unwrap();
    fs::write(&inst.config, format!("{good}\n[no_such_table]\nkey = 1\n")).unwrap();
    let status = mortal(&inst, &["status"]);
    assert_eq!(status.code, 0, "{status:?}");
    assert!(status.stderr.contains("no_such_table"), "the file's error is shown: {status:?}");
    assert!(status.stderr.contains("has errors (above); reaching the running master through"), "{status:?}");
    assert!(status.stdout.contains("smtpd"), "the scoreboard is shown: {status:?}");
    let reload = mortal(&inst, &["reload"]);
    assert_eq!(reload.code, 1, "a broken file is never loaded: {reload:?}");
    let stop = mortal(&inst, &["stop"]);
    assert_eq!(stop.code, 0, "{stop:?}");
    let after = mortal(&inst, &["status"]);
    assert_ne!(after.code, 0, "the master is gone: {after:?}");
}

#[test]
fn version_and_completions() {
    let r = run(Command::new(bin_dir().join("mortal")).arg("version"));
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.starts_with("mortal ") && r.stdout.contains("queue file format version 2"), "{r:?}");
    for (shell, marker) in [("bash", "complete -F"), ("zsh", "#compdef mortal"), ("fish", "complete -c mortal")] {
        let r = run(Command::new(bin_dir().join("mortal")).args(["completions", shell]));
        assert_eq!(r.code, 0, "{r:?}");
        assert!(r.stdout.contains(marker) && r.stdout.contains("requeue"), "{shell}: {}", r.stdout);
    }
    let r = run(Command::new(bin_dir().join("mortal")).args(["queue", "--help"]));
    assert!(r.stdout.contains("Exit status:") && r.stdout.contains("75  a message was being delivered"), "{r:?}");
}

/// `mortal check` loads the lookup tables the daemons will load: a line
/// they would refuse is an error naming the file and line.
#[test]
fn check_refuses_a_bad_table_line_with_its_place() {
    let dir = mortal_tests::TempDir::new("check-tables");
    fs::write(dir.0.join("virtual"), "list@example.test alice@example.test\nlonely\n").unwrap();
    let config = dir.0.join("mortal.toml");
    fs::write(
        &config,
        "[server]\naccepted_domains = [\"example.test\"]\nvirtual_alias_maps = [\"texthash:virtual\"]\n",
    )
    .unwrap();
    let out = run(Command::new(bin_dir().join("mortal")).arg("check").arg("--config").arg(&config));
    assert_eq!(out.code, 1, "{out:?}");
    let want = format!(
        "{}: server.virtual_alias_maps: {}:2: \"lonely\" has a key and no value",
        config.display(),
        dir.0.join("virtual").display()
    );
    assert!(out.stderr.contains(&want), "{out:?}");
    fs::write(dir.0.join("virtual"), "list@example.test alice@example.test\n").unwrap();
    let out = run(Command::new(bin_dir().join("mortal")).arg("check").arg("--config").arg(&config));
    assert_eq!(out.code, 0, "{out:?}");
}
