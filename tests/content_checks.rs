//! `[cleanup] header_checks` and `body_checks` end to end: each action's
//! effect on the delivered message, the client's reply and cleanup's
//! log line in Postfix's shape (pflogsumm counts `reject: header` and
//! `reject: body`).

use mortal_tests::{Instance, Options, Smtp, TempDir, body_of};
use std::fs;

/// An instance whose cleanup uses these header and body checks.
fn start(tables: &TempDir, header: &str, body: &str) -> Instance {
    let header_path = tables.0.join("header_checks");
    let body_path = tables.0.join("body_checks");
    fs::write(&header_path, header).expect("write header_checks");
    fs::write(&body_path, body).expect("write body_checks");
    let extra = format!(
        "[cleanup]\nheader_checks = [\"regexp:{}\"]\nbody_checks = [\"regexp:{}\"]\n",
        header_path.display(),
        body_path.display()
    );
    Instance::start_with(Options { extra, ..Options::default() })
}

fn send(inst: &Instance, to: &str, message: &str) -> String {
    let mut smtp = Smtp::connect(inst.port).expect("connect");
    assert!(smtp.cmd("EHLO client.test").unwrap().starts_with("250"));
    assert_eq!(smtp.cmd("MAIL FROM:<a@example.org>").unwrap(), "250 2.1.0 Ok\r\n");
    assert_eq!(smtp.cmd(&format!("RCPT TO:<{to}>")).unwrap(), "250 2.1.5 Ok\r\n");
    assert!(smtp.cmd("DATA").unwrap().starts_with("354"));
    smtp.cmd(&format!("{message}\r\n.")).unwrap()
}

const HEADER_CHECKS: &str = "\
/^Subject:.*cheap pills/ REJECT no pills here
/^Subject:.*quarantine me/ HOLD suspicious subject
/^Subject:.*drop me/ DISCARD
/^X-Mailer: (.*)/ REPLACE X-Mailer-Was: $1
/^X-Tracking:/ IGNORE
/^From:/ PREPEND X-Checked: yes
/^X-Watch:/ WARN watched header
";

const BODY_CHECKS: &str = "\
/^click here to win/ REJECT
/password: (.*)/ REPLACE password: [removed]
";

#[test]
fn header_and_body_checks_edit_the_message() {
    let tables = TempDir::new("checks");
    let inst = start(&tables, HEADER_CHECKS, BODY_CHECKS);
    let reply = send(
        &inst,
        "edited@example.test",
        "From: a@example.org\r\nX-Mailer: old 1.0\r\nX-Tracking: 1234\r\nX-Watch: on\r\nSubject: hello\r\n\r\n\
         line one\r\npassword: hunter2\r\nlast",
    );
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    let id = reply.trim_end().rsplit(' ').next().unwrap().to_owned();
    let delivered = inst.wait_for_delivery("edited@example.test", 1);
    let text = String::from_utf8_lossy(&delivered[0]).replace("\r\n", "\n");
    assert!(text.contains("X-Checked: yes\nFrom: a@example.org\nX-Mailer-Was: old 1.0\nX-Watch: on\n"), "{text}");
    assert!(!text.contains("X-Tracking"), "{text}");
    assert_eq!(
        String::from_utf8_lossy(body_of(&delivered[0])).replace("\r\n", "\n"),
        "line one\npassword: [removed]\nlast\n"
    );
    inst.wait_for_log(&format!(
        "{id}: warning: header X-Watch: on from unknown[127.0.0.1]; from=<a@example.org> to=<edited@example.test> \
         proto=ESMTP helo=<client.test>: watched header"
    ));
}

#[test]
fn reject_hold_and_discard() {
    let tables = TempDir::new("checks");
    let inst = start(&tables, HEADER_CHECKS, BODY_CHECKS);
    // REJECT: the client hears the table's text; nothing is queued.
    let reply = send(&inst, "r@example.test", "Subject: cheap pills\r\n\r\nbuy");
    assert_eq!(reply, "550 5.7.1 no pills here\r\n");
    inst.wait_for_log(
        ": reject: header Subject: cheap pills from unknown[127.0.0.1]; from=<a@example.org> to=<r@example.test> \
         proto=ESMTP helo=<client.test>: 5.7.1 no pills here",
    );
    // A body REJECT without text: Postfix's default text.
    let reply = send(&inst, "r@example.test", "Subject: prize\r\n\r\nhi\r\nclick here to win\r\n");
    assert_eq!(reply, "550 5.7.1 Message content rejected\r\n");
    inst.wait_for_log(": reject: body click here to win from unknown[127.0.0.1]; from=<a@example.org>");
    // HOLD: accepted, parked in hold/.
    let reply = send(&inst, "h@example.test", "Subject: please quarantine me\r\n\r\nbody");
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    let id = reply.trim_end().rsplit(' ').next().unwrap().to_owned();
    inst.wait_for_log(&format!(
        "{id}: hold: header Subject: please quarantine me from unknown[127.0.0.1]; from=<a@example.org> \
         to=<h@example.test> proto=ESMTP helo=<client.test>: suspicious subject"
    ));
    assert_eq!(inst.queue_files(mortal_proto::spool::QueueDir::Hold), vec![id]);
    // DISCARD: 250, and nothing kept.
    let reply = send(&inst, "d@example.test", "Subject: drop me\r\n\r\nbody");
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    let id = reply.trim_end().rsplit(' ').next().unwrap().to_owned();
    inst.wait_for_log(&format!("{id}: discard: header Subject: drop me from unknown[127.0.0.1]"));
    // A clean message after all that is delivered.
    assert!(send(&inst, "ok@example.test", "Subject: fine\r\n\r\nhello").starts_with("250 2.0.0 Ok"));
    inst.wait_for_delivery("ok@example.test", 1);
    assert!(inst.delivered("d@example.test").is_empty() && inst.delivered("h@example.test").is_empty());
}
