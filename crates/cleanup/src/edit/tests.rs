//! The edits as smtpd relays them, through a whole cleanup transaction
//! (`session::serve` over a socket pair, a spool in a temporary
//! directory), checked in the committed queue file.

use super::*;
use crate::session::{self, Context};
use crate::spool::Spool;
use mortal_proto::date::{self, TimeZone};
use mortal_proto::envelope::{BodyType, ClientInfo, DsnRet};
use mortal_proto::ipc::{self, Decoder, Reply, Request};
use mortal_proto::queue_file::{QueueFile, RecipientState};
use mortal_proto::queue_id::QueueId;
use mortal_proto::spool::QueueDir;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// The client's message: fields 0 to 6, then a two-line body.
const MESSAGE: &[u8] = b"From: a@example.test\r\nTo: b@example.test\r\nSubject: hello\r\nX-Tag: one\r\n\
x-tag: two\r\n\tfolded\r\nMessage-ID: <m1@example.test>\r\nDate: Thu, 1 Jan 2026 00:00:00 +0000\r\n\
\r\nbody line 1\r\nbody line 2\r\n";
const FIELDS: &str = "From: a@example.test\r\nTo: b@example.test\r\nSubject: hello\r\nX-Tag: one\r\n\
x-tag: two\r\n\tfolded\r\nMessage-ID: <m1@example.test>\r\nDate: Thu, 1 Jan 2026 00:00:00 +0000\r\n";
const BODY: &str = "\r\nbody line 1\r\nbody line 2\r\n";

/// A spool and a config for one test; removed when dropped.
struct Fixture {
    dir: PathBuf,
    config: Config,
}

/// What the transaction answered and left behind.
struct Outcome {
    answer: String,
    id: QueueId,
    queued: Option<QueueFile>,
    held: Option<QueueFile>,
    /// Every name this transaction left in incoming/ and hold/.
    left: Vec<String>,
}

impl Fixture {
    /// `extra`: more config tables, appended after `[server]`.
    fn new(name: &str, extra: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("mortal-cleanup-edit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let text = format!(
            "[server]\nhostname = \"mx.example.test\"\nspool_dir = \"{}\"\naccepted_domains = [\"example.test\"]\n{extra}",
            dir.join("spool").display()
        );
        let config = Config::parse_for(&text, &dir.join("mortal.toml"), false).unwrap();
        config.spool().create_dirs().unwrap();
        Self { dir, config }
    }

    fn run(&self, recipients: &[&str], content: &[u8], edits: Vec<Edit>) -> Outcome {
        let mut out = Vec::new();
        let client = ClientInfo {
            addr: "192.0.2.1".parse().unwrap(),
            name: "unknown".into(),
            helo: "c.test".into(),
            protocol: "ESMTP".into(),
            tls: String::new(),
            auth: None,
        };
        let sender = SenderInfo {
            address: "a@example.test".into(),
            body: BodyType::SevenBit,
            smtputf8: false,
            ret: None,
            envid: String::new(),
        };
        Request::Hello { version: ipc::PROTOCOL_VERSION }.encode(&mut out);
        Request::Client(client).encode(&mut out);
        Request::Sender(sender).encode(&mut out);
        for r in recipients {
            let r = RecipientInfo { address: (*r).into(), notify: Notify::default(), orcpt: String::new() };
            Request::Recipient(r).encode(&mut out);
        }
        ipc::encode_data(content, &mut out);
        for e in edits {
            Request::Edit(e).encode(&mut out);
        }
        Request::End.encode(&mut out);

        let before = self.spooled();
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        let mut writer = ours.try_clone().unwrap();
        let spool = Spool::open(&self.config).unwrap();
        std::thread::scope(|s| {
            s.spawn(move || writer.write_all(&out).unwrap());
            session::serve(
                theirs,
                &Context::new(
                    &self.config,
                    &spool,
                    &mortal_proto::table::Aliases::default(),
                    &crate::checks::ContentChecks::default(),
                ),
            );
        });
        let mut back = Vec::new();
        ours.read_to_end(&mut back).unwrap();
        let mut decoder = Decoder::new();
        decoder.feed(&back);
        let (mut id, mut answer) = (None, None);
        while let Some(reply) = decoder.next_reply().unwrap() {
            match reply {
                Reply::QueueId(q) => id = Some(q),
                Reply::Answer { code, status, text } => answer = Some(format!("{code} {status} {text}")),
            }
        }
        let id = id.expect("a queue id");
        let read = |queue: QueueDir| {
            let path = self.config.spool().path(queue, &id);
            path.exists().then(|| QueueFile::decode(&std::fs::read(path).unwrap()).unwrap())
        };
        let left: Vec<String> = self.spooled().into_iter().filter(|n| !before.contains(n)).collect();
        Outcome {
            answer: answer.expect("an answer"),
            id,
            queued: read(QueueDir::Incoming),
            held: read(QueueDir::Hold),
            left,
        }
    }
}

impl Fixture {
    /// Every name in incoming/ and hold/, as `queue/name`.
    fn spooled(&self) -> Vec<String> {
        let mut all: Vec<String> = [QueueDir::Incoming, QueueDir::Hold]
            .into_iter()
            .flat_map(|q| names(&self.config.spool().dir(q)).into_iter().map(move |n| format!("{q}/{n}")))
            .collect();
        all.sort();
        all
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
}

impl Outcome {
    fn queued_ok(&self) -> &QueueFile {
        assert_eq!(self.answer, format!("250 2.0.0 Ok: queued as {}", self.id));
        assert_eq!(self.left, [format!("incoming/{}", self.id)]);
        self.queued.as_ref().unwrap()
    }

    /// A refusal leaves nothing behind.
    fn refused(&self, answer: &str) {
        assert_eq!(self.answer, answer);
        assert!(self.left.is_empty(), "{:?}", self.left);
    }
}

/// cleanup's own trace field, as `header::fix_up` writes it.
fn received(qf: &QueueFile, only_recipient: Option<&str>) -> String {
    let only = only_recipient.map(|r| format!("\r\n\tfor <{r}>")).unwrap_or_default();
    format!(
        "Received: from c.test (unknown [192.0.2.1])\r\n\tby mx.example.test (mortal) with ESMTP id {}{only}; {}\r\n",
        qf.id,
        date::rfc5322(qf.arrival, &TimeZone::UTC)
    )
}

fn content(qf: &QueueFile) -> String {
    String::from_utf8(qf.content.clone()).unwrap()
}

fn addresses(qf: &QueueFile) -> Vec<&str> {
    qf.recipients.iter().map(|r| r.address.as_str()).collect()
}

fn name(n: &str) -> HeaderName {
    HeaderName::new(n).unwrap()
}

fn value(v: &[u8]) -> HeaderValue {
    HeaderValue::new(v).unwrap()
}

fn address(a: &str) -> MilterAddress {
    MilterAddress::new(a).unwrap()
}

fn add(n: &str, v: &[u8]) -> Edit {
    Edit::Milter(Modification::AddHeader { name: name(n), value: value(v) })
}

fn insert(index: u32, n: &str, v: &[u8]) -> Edit {
    Edit::Milter(Modification::InsertHeader { index, name: name(n), value: value(v) })
}

fn change(index: u32, n: &str, v: &[u8]) -> Edit {
    Edit::Milter(Modification::ChangeHeader { index, name: name(n), value: value(v) })
}

#[test]
fn no_edits_keep_the_message_as_sent() {
    let f = Fixture::new("none", "");
    let out = f.run(&["b@example.test"], MESSAGE, vec![]);
    let qf = out.queued_ok();
    assert_eq!(content(qf), format!("{}{FIELDS}{BODY}", received(qf, Some("b@example.test"))));
}

#[test]
fn add_header_appends_with_one_space_and_crlf_folds() {
    let f = Fixture::new("add", "");
    let out = f.run(&["b@example.test"], MESSAGE, vec![add("X-Spam", b"yes\n\tscore=9"), add("X-Empty", b"")]);
    let qf = out.queued_ok();
    assert_eq!(
        content(qf),
        format!("{}{FIELDS}X-Spam: yes\r\n\tscore=9\r\nX-Empty: \r\n{BODY}", received(qf, Some("b@example.test")))
    );
    assert_eq!(addresses(qf), ["b@example.test"]);
}

#[test]
fn insert_header_counts_from_zero_below_received() {
    let f = Fixture::new("insert", "");
    let edits = vec![
        insert(0, "Authentication-Results", b"mx; dkim=pass"),
        // After the first: 0 A-R, 1 From, 2 To, 3 Subject.
        insert(3, "X-Mid", b"m"),
        insert(99, "X-End", b"e"),
    ];
    let out = f.run(&["b@example.test"], MESSAGE, edits);
    let qf = out.queued_ok();
    assert_eq!(
        content(qf),
        format!(
            "{}Authentication-Results: mx; dkim=pass\r\nFrom: a@example.test\r\nTo: b@example.test\r\n\
             X-Mid: m\r\nSubject: hello\r\nX-Tag: one\r\nx-tag: two\r\n\tfolded\r\n\
             Message-ID: <m1@example.test>\r\nDate: Thu, 1 Jan 2026 00:00:00 +0000\r\nX-End: e\r\n{BODY}",
            received(qf, Some("b@example.test"))
        )
    );
}

#[test]
fn change_header_by_name_and_index_deletes_and_adds() {
    let f = Fixture::new("change", "");
    let edits = vec![
        // The second X-Tag, whatever its case, folded lines and all.
        change(2, "X-TAG", b"changed"),
        // Index 0 is taken as 1; an empty value deletes.
        change(0, "subject", b""),
        // No third X-Tag: an empty value does nothing...
        change(3, "X-Tag", b""),
        // ... and a value adds the field (libmilter's smfi_chgheader).
        change(5, "X-New", b"added"),
    ];
    let out = f.run(&["b@example.test"], MESSAGE, edits);
    let qf = out.queued_ok();
    assert_eq!(
        content(qf),
        format!(
            "{}From: a@example.test\r\nTo: b@example.test\r\nX-Tag: one\r\nX-TAG: changed\r\n\
             Message-ID: <m1@example.test>\r\nDate: Thu, 1 Jan 2026 00:00:00 +0000\r\nX-New: added\r\n{BODY}",
            received(qf, Some("b@example.test"))
        )
    );
}

#[test]
fn prepend_goes_above_received_in_order() {
    let f = Fixture::new("prepend", "");
    let edits = vec![
        Edit::Prepend { name: name("X-Greylist"), value: value(b" delayed 300 seconds") },
        insert(0, "X-First", b"client section"),
        Edit::Prepend { name: name("X-Second"), value: value(b"two") },
    ];
    let out = f.run(&["b@example.test"], MESSAGE, edits);
    let qf = out.queued_ok();
    assert_eq!(
        content(qf),
        format!(
            "X-Greylist: delayed 300 seconds\r\nX-Second:two\r\n{}X-First: client section\r\n{FIELDS}{BODY}",
            received(qf, Some("b@example.test"))
        )
    );
}

#[test]
fn replace_body_joins_chunks_and_writes_crlf() {
    let f = Fixture::new("body", "");
    let chunk = |b: &[u8]| Edit::Milter(Modification::ReplaceBody(b.to_vec()));
    // A CRLF split between two chunks stays one line end.
    let edits = vec![chunk(b"new\nbody\r"), chunk(b"\nend\n"), add("X-After", b"body")];
    let out = f.run(&["b@example.test"], MESSAGE, edits);
    let qf = out.queued_ok();
    assert_eq!(
        content(qf),
        format!("{}{FIELDS}X-After: body\r\n\r\nnew\r\nbody\r\nend\r\n", received(qf, Some("b@example.test")))
    );
    // A message without a body gets one, after the empty line.
    let out = f.run(
        &["b@example.test"],
        b"Subject: x\r\nMessage-ID: <m@x>\r\nDate: Thu, 1 Jan 2026 00:00:00 +0000\r\n",
        vec![chunk(b"only\n")],
    );
    let qf = out.queued_ok();
    assert_eq!(
        content(qf),
        format!(
            "{}Subject: x\r\nMessage-ID: <m@x>\r\nDate: Thu, 1 Jan 2026 00:00:00 +0000\r\n\r\nonly\r\n",
            received(qf, Some("b@example.test"))
        )
    );
}

#[test]
fn recipients_added_and_deleted() {
    let f = Fixture::new("rcpt", "");
    let edits = vec![
        // Outside accepted_domains: a milter may, as in Postfix.
        Edit::Milter(Modification::AddRecipientWithArgs {
            address: address("<d@elsewhere.test>"),
            args: EsmtpArgs::new("NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;D+40elsewhere.test FOO=bar").unwrap(),
        }),
        // A duplicate (domain case aside) is dropped.
        Edit::Milter(Modification::AddRecipient(address("b@EXAMPLE.TEST"))),
        Edit::Milter(Modification::DeleteRecipient(address("<c@Example.Test>"))),
        // Not a recipient: ignored.
        Edit::Milter(Modification::DeleteRecipient(address("C@example.test"))),
        Edit::Milter(Modification::AddRecipient(address("<e@example.test>"))),
        // A bad NOTIFY is ignored, the recipient kept.
        Edit::Milter(Modification::AddRecipientWithArgs {
            address: address("f@example.test"),
            args: EsmtpArgs::new("NOTIFY=ALWAYS").unwrap(),
        }),
    ];
    let out = f.run(&["b@example.test", "c@example.test"], MESSAGE, edits);
    let qf = out.queued_ok();
    assert_eq!(addresses(qf), ["b@example.test", "d@elsewhere.test", "e@example.test", "f@example.test"]);
    assert!(qf.recipients.iter().all(|r| r.state == RecipientState::Pending && r.status.is_none()));
    let d = &qf.recipients[1];
    assert_eq!(d.notify, Notify { success: true, failure: true, ..Notify::default() });
    assert_eq!(d.orcpt, "rfc822;D@elsewhere.test");
    assert_eq!((qf.recipients[2].notify, qf.recipients[2].orcpt.as_str()), (Notify::default(), ""));
    assert_eq!(qf.recipients[3].notify, Notify::default());
    // Several recipients: none is named in Received.
    assert_eq!(content(qf), format!("{}{FIELDS}{BODY}", received(qf, None)));
}

#[test]
fn deleting_every_recipient_discards() {
    let f = Fixture::new("rcpt-none", "");
    let edits = vec![Edit::Milter(Modification::DeleteRecipient(address("<b@example.test>")))];
    let out = f.run(&["b@example.test"], MESSAGE, edits);
    assert_eq!(out.answer, format!("250 2.0.0 Ok: queued as {}", out.id));
    assert!(out.left.is_empty(), "{:?}", out.left);
}

#[test]
fn sender_changed_with_ret_and_envid() {
    let f = Fixture::new("sender", "");
    let edits = vec![Edit::Milter(Modification::ChangeSender {
        address: address("<new@example.org>"),
        args: EsmtpArgs::new("RET=HDRS ENVID=abc+2B1 SIZE=5").unwrap(),
    })];
    let out = f.run(&["b@example.test"], MESSAGE, edits);
    let qf = out.queued_ok();
    assert_eq!(
        (qf.sender.address.as_str(), qf.sender.ret, qf.sender.envid.as_str()),
        ("new@example.org", Some(DsnRet::Headers), "abc+1")
    );
    assert_eq!(content(qf), format!("{}{FIELDS}{BODY}", received(qf, Some("b@example.test"))));

    let null = vec![Edit::Milter(Modification::ChangeSender { address: address("<>"), args: EsmtpArgs::default() })];
    let out = f.run(&["b@example.test"], MESSAGE, null);
    let qf = out.queued_ok();
    assert_eq!((qf.sender.address.as_str(), qf.sender.ret), ("", None));
}

#[test]
fn hold_commits_into_hold() {
    let f = Fixture::new("hold", "");
    let out = f.run(&["b@example.test"], MESSAGE, vec![Edit::Hold { reason: "milter quarantine: suspicious".into() }]);
    assert_eq!(out.answer, format!("250 2.0.0 Ok: queued as {}", out.id));
    assert_eq!(out.left, [format!("hold/{}", out.id)]);
    assert!(out.queued.is_none());
    let qf = out.held.as_ref().unwrap();
    assert_eq!(content(qf), format!("{}{FIELDS}{BODY}", received(qf, Some("b@example.test"))));

    // Held and edited: the rebuilt file goes to hold/.
    let edits = vec![add("X-Held", b"yes"), Edit::Hold { reason: "policy HOLD".into() }];
    let out = f.run(&["b@example.test"], MESSAGE, edits);
    assert_eq!(out.answer, format!("250 2.0.0 Ok: queued as {}", out.id));
    assert!(out.left.contains(&format!("hold/{}", out.id)) && out.queued.is_none(), "{:?}", out.left);
    let qf = out.held.as_ref().unwrap();
    assert_eq!(content(qf), format!("{}{FIELDS}X-Held: yes\r\n{BODY}", received(qf, Some("b@example.test"))));
}

#[test]
fn discard_keeps_nothing_and_wins_over_hold() {
    let f = Fixture::new("discard", "");
    let edits = vec![
        Edit::Hold { reason: "policy HOLD".into() },
        add("X-Spam", b"yes"),
        Edit::Discard { reason: "milter DISCARD".into() },
    ];
    let out = f.run(&["b@example.test"], MESSAGE, edits);
    assert_eq!(out.answer, format!("250 2.0.0 Ok: queued as {}", out.id));
    assert!(out.left.is_empty(), "{:?}", out.left);
}

#[test]
fn edit_limit_refuses_one_edit_more() {
    let f = Fixture::new("limit", "[cleanup]\nedit_limit = 3\n");
    let three = vec![add("X-1", b"1"), add("X-2", b"2"), add("X-3", b"3")];
    let out = f.run(&["b@example.test"], MESSAGE, three.clone());
    let qf = out.queued_ok();
    assert_eq!(
        content(qf),
        format!("{}{FIELDS}X-1: 1\r\nX-2: 2\r\nX-3: 3\r\n{BODY}", received(qf, Some("b@example.test")))
    );
    let four = [three, vec![Edit::Hold { reason: "x".into() }]].concat();
    f.run(&["b@example.test"], MESSAGE, four).refused("451 4.3.5 Error: too many edits from filters");
}

#[test]
fn header_size_limit_applies_after_the_edits() {
    // The client's section is 160 octets; the limit leaves room for 11
    // more: `X-A: 1234` and its CRLF.
    assert_eq!(FIELDS.len(), 160);
    let f = Fixture::new("header-limit", "[cleanup]\nheader_size_limit = 171\n");
    let fits = f.run(&["b@example.test"], MESSAGE, vec![add("X-A", b"1234")]);
    fits.queued_ok();
    f.run(&["b@example.test"], MESSAGE, vec![add("X-A", b"12345")])
        .refused("552 5.3.4 Error: message header size exceeds limit");
    // A prepend counts too.
    f.run(&["b@example.test"], MESSAGE, vec![Edit::Prepend { name: name("X-A"), value: value(b"123456") }])
        .refused("552 5.3.4 Error: message header size exceeds limit");
}

#[test]
fn message_size_limit_applies_to_the_new_body() {
    // 160 octets of header, the empty line, then the body: 138 fit.
    let f = Fixture::new("size-limit", "[smtpd]\nmessage_size_limit = 300\n");
    let body = |n: usize| Edit::Milter(Modification::ReplaceBody(vec![b'x'; n]));
    f.run(&["b@example.test"], MESSAGE, vec![body(138)]).queued_ok();
    f.run(&["b@example.test"], MESSAGE, vec![body(139)]).refused("552 5.3.4 Error: message file too big");
    // A body over the limit alone is refused as it arrives.
    f.run(&["b@example.test"], MESSAGE, vec![body(301)]).refused("552 5.3.4 Error: message file too big");
}

#[test]
fn recipient_limit_and_syntax_apply_to_added_recipients() {
    let f = Fixture::new("rcpt-limit", "[smtpd]\nrecipient_limit = 2\n");
    let rcpt = |a: &str| Edit::Milter(Modification::AddRecipient(address(a)));
    let out = f.run(&["b@example.test"], MESSAGE, vec![rcpt("c@example.test")]);
    assert_eq!(addresses(out.queued_ok()), ["b@example.test", "c@example.test"]);
    f.run(&["b@example.test"], MESSAGE, vec![rcpt("c@example.test"), rcpt("d@example.test")])
        .refused("451 4.3.5 Error: too many recipients");
    f.run(&["b@example.test"], MESSAGE, vec![rcpt("<not an address>")])
        .refused("451 4.3.5 Error: invalid recipient from filters");
    f.run(&["b@example.test"], MESSAGE, vec![rcpt("<>")]).refused("451 4.3.5 Error: invalid recipient from filters");
    let bad_sender = Edit::Milter(Modification::ChangeSender { address: address("a@@x"), args: EsmtpArgs::default() });
    f.run(&["b@example.test"], MESSAGE, vec![bad_sender]).refused("451 4.3.5 Error: invalid sender from filters");
}

#[test]
fn header_fields_split_with_folds_and_a_missing_line_end() {
    let fields = split_fields(b"A: 1\r\n\tmore\r\nB: 2\nC: 3");
    let fields: Vec<&[u8]> = fields.iter().map(|f| f.as_ref()).collect();
    assert_eq!(fields, [&b"A: 1\r\n\tmore\r\n"[..], b"B: 2\n", b"C: 3\r\n"]);
    assert_eq!(to_crlf(b"a\nb\r\nc\r"), b"a\r\nb\r\nc\r");
    assert!(same_mailbox("Bob@Example.Test", "Bob@example.test"));
    assert!(!same_mailbox("bob@example.test", "Bob@example.test"));
}

#[test]
fn a_large_body_is_copied_whole_into_the_rebuilt_file() {
    let f = Fixture::new("large", "");
    // Several content records and more than one read-back.
    let body: String = (0..8000).map(|i| format!("line {i:05} of the body\r\n")).collect();
    let message = [FIELDS.as_bytes(), b"\r\n", body.as_bytes()].concat();
    let out = f.run(&["b@example.test"], &message, vec![insert(1, "X-Big", b"yes")]);
    let qf = out.queued_ok();
    let expected = format!(
        "{}From: a@example.test\r\nX-Big: yes\r\n{}\r\n{body}",
        received(qf, Some("b@example.test")),
        &FIELDS["From: a@example.test\r\n".len()..]
    );
    assert!(qf.content.len() > 2 * mortal_proto::queue_file::MAX_CONTENT_CHUNK);
    assert!(content(qf) == expected, "the rebuilt content differs");
}

#[test]
fn hop_limit_applies_after_the_edits() {
    let f = Fixture::new("hops", "[cleanup]\nhopcount_limit = 1\n");
    let hop = || add("Received", b"from a by b; Thu, 1 Jan 2026 00:00:00 +0000");
    f.run(&["b@example.test"], MESSAGE, vec![hop()]).queued_ok();
    f.run(&["b@example.test"], MESSAGE, vec![hop(), hop()]).refused("554 5.4.6 Error: too many hops");
}
