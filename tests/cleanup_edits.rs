//! Issue 12: the filters' edits, applied by the real, sandboxed cleanup.
//! The test speaks smtpd's side of the cleanup protocol on cleanup's
//! private socket (smtpd relays the edits its milters and policy servers
//! decide; the end-to-end tests through a real milter drive them over
//! SMTP). What is proved here is cleanup's part under its production
//! sandbox: the rebuilt file (a second `incoming/<id>.tmp`), the commit
//! into `hold/`, the discard, and delivery of the edited message.

use mortal_proto::envelope::{BodyType, ClientInfo, Notify, RecipientInfo, SenderInfo};
use mortal_proto::ipc::{Decoder, Edit, PROTOCOL_VERSION, Reply, Request, encode_data};
use mortal_proto::milter::{EsmtpArgs, HeaderName, HeaderValue, MilterAddress, Modification};
use mortal_proto::queue_id::QueueId;
use mortal_proto::spool::QueueDir;
use mortal_tests::{Instance, Options};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// One transaction on cleanup's socket: returns the queue id and the
/// answer as `code status text`.
fn transaction(mortal: &Instance, recipients: &[&str], content: &[u8], edits: Vec<Edit>) -> (QueueId, String) {
    let mut sock = UnixStream::connect(mortal.spool().join("run/private/cleanup")).expect("connect to cleanup");
    sock.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
    let mut out = Vec::new();
    Request::Hello { version: PROTOCOL_VERSION }.encode(&mut out);
    Request::Client(ClientInfo {
        addr: "192.0.2.1".parse().expect("client address"),
        name: "unknown".into(),
        helo: "client.test".into(),
        protocol: "ESMTP".into(),
        tls: String::new(),
        auth: None,
    })
    .encode(&mut out);
    Request::Sender(SenderInfo {
        address: "a@example.test".into(),
        body: BodyType::SevenBit,
        smtputf8: false,
        ret: None,
        envid: String::new(),
    })
    .encode(&mut out);
    for r in recipients {
        Request::Recipient(RecipientInfo { address: (*r).into(), notify: Notify::default(), orcpt: String::new() })
            .encode(&mut out);
    }
    encode_data(content, &mut out);
    for e in edits {
        Request::Edit(e).encode(&mut out);
    }
    Request::End.encode(&mut out);
    sock.write_all(&out).expect("write the transaction");
    let mut decoder = Decoder::new();
    let Reply::QueueId(id) = read_reply(&mut sock, &mut decoder) else { panic!("no queue id") };
    let Reply::Answer { code, status, text } = read_reply(&mut sock, &mut decoder) else { panic!("no answer") };
    (id, format!("{code} {status} {text}"))
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

fn milter(m: Modification) -> Edit {
    Edit::Milter(m)
}

fn field(name: &str, value: &[u8]) -> (HeaderName, HeaderValue) {
    (HeaderName::new(name).expect("field name"), HeaderValue::new(value).expect("field value"))
}

const MESSAGE: &[u8] = b"From: a@example.test\r\nSubject: edits\r\nMessage-ID: <e2e@example.test>\r\n\
Date: Thu, 1 Jan 2026 00:00:00 +0000\r\n\r\noriginal body\r\n";

#[test]
fn edited_message_is_delivered_as_the_filters_left_it() {
    let mortal = Instance::start();
    let (greylist, greylist_value) = field("X-Greylist", b" delayed 300 seconds");
    let (spam, spam_value) = field("X-Spam", b"yes\n\tscore=9");
    let (subject, subject_value) = field("Subject", b"[SPAM] edits");
    let edits = vec![
        Edit::Prepend { name: greylist, value: greylist_value },
        milter(Modification::AddHeader { name: spam, value: spam_value }),
        milter(Modification::ChangeHeader { index: 1, name: subject, value: subject_value }),
        milter(Modification::ReplaceBody(b"new body\nsecond line\n".to_vec())),
        milter(Modification::AddRecipientWithArgs {
            address: MilterAddress::new("<c@example.test>").expect("address"),
            args: EsmtpArgs::new("NOTIFY=NEVER").expect("args"),
        }),
        milter(Modification::DeleteRecipient(MilterAddress::new("<b@example.test>").expect("address"))),
    ];
    let (id, answer) = transaction(&mortal, &["b@example.test"], MESSAGE, edits);
    assert_eq!(answer, format!("250 2.0.0 Ok: queued as {id}"));
    let got = mortal.wait_for_delivery("c@example.test", 1);
    let text = String::from_utf8(got[0].clone()).expect("utf-8");
    // Maildir files have LF line ends; the prepend is above Received, the
    // milter's edits below it.
    let at = text.find("X-Greylist: delayed 300 seconds\nReceived: from client.test (unknown [192.0.2.1])\n");
    assert!(at.is_some(), "{text}");
    assert!(
        text.ends_with(
            "From: a@example.test\nSubject: [SPAM] edits\nMessage-ID: <e2e@example.test>\n\
             Date: Thu, 1 Jan 2026 00:00:00 +0000\nX-Spam: yes\n\tscore=9\n\nnew body\nsecond line\n"
        ),
        "{text}"
    );
    // Nothing of the first file is left.
    mortal.wait_for_empty_queue();
    assert!(mortal.queue_files(QueueDir::Incoming).is_empty());
}

#[test]
fn held_message_waits_in_hold_and_discarded_one_leaves_nothing() {
    let mortal = Instance::start();
    let (name, value) = field("X-Quarantine", b"yes");
    let hold = vec![
        milter(Modification::AddHeader { name, value }),
        Edit::Hold { reason: "milter quarantine: suspicious".into() },
    ];
    let (held, answer) = transaction(&mortal, &["b@example.test"], MESSAGE, hold);
    assert_eq!(answer, format!("250 2.0.0 Ok: queued as {held}"));
    mortal.wait_for_log(&format!("{held}: hold: milter quarantine: suspicious"));
    assert_eq!(mortal.queue_files(QueueDir::Hold), [held.to_string()]);
    assert!(!mortal.queue_files(QueueDir::Incoming).iter().any(|f| f.starts_with(held.as_str())));

    let discard = vec![Edit::Hold { reason: "policy HOLD".into() }, Edit::Discard { reason: "policy DISCARD".into() }];
    let (dropped, answer) = transaction(&mortal, &["b@example.test"], MESSAGE, discard);
    assert_eq!(answer, format!("250 2.0.0 Ok: queued as {dropped}"));
    mortal.wait_for_log(&format!("{dropped}: discard: policy DISCARD"));
    for q in [QueueDir::Incoming, QueueDir::Hold] {
        assert!(!mortal.queue_files(q).iter().any(|f| f.starts_with(dropped.as_str())), "{q}");
    }
}

/// The refusals and the discard of the last recipient log Postfix-shaped
/// lines with the queue id, which operators' tools key on.
#[test]
fn refusals_and_an_emptied_envelope_are_logged() {
    let mortal = Instance::start_with(Options { extra: "[cleanup]\nedit_limit = 2\n".into(), ..Options::default() });
    let hold = || Edit::Hold { reason: "x".into() };
    let (id, answer) = transaction(&mortal, &["b@example.test"], MESSAGE, vec![hold(), hold(), hold()]);
    assert_eq!(answer, "451 4.3.5 Error: too many edits from filters");
    mortal.wait_for_log(&format!("warning: {id}: filters sent more than edit_limit (2) edits"));
    mortal.wait_for_log(&format!("{id}: reject: edit_limit exceeded: 451 4.3.5 Error: too many edits from filters"));

    let bad = vec![milter(Modification::AddRecipient(MilterAddress::new("<no domain>").expect("address")))];
    let (id, answer) = transaction(&mortal, &["b@example.test"], MESSAGE, bad);
    assert_eq!(answer, "451 4.3.5 Error: invalid recipient from filters");
    mortal.wait_for_log(&format!("warning: {id}: filter added invalid recipient <no domain>: "));

    let delete = vec![milter(Modification::DeleteRecipient(MilterAddress::new("b@example.test").expect("address")))];
    let (id, answer) = transaction(&mortal, &["b@example.test"], MESSAGE, delete);
    assert_eq!(answer, format!("250 2.0.0 Ok: queued as {id}"));
    mortal.wait_for_log(&format!("{id}: discard: all recipients deleted by filters"));
    for q in [QueueDir::Incoming, QueueDir::Hold] {
        assert!(!mortal.queue_files(q).iter().any(|f| f.starts_with(id.as_str())), "{q}");
    }
}
