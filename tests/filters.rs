//! Issue 12, live interop of mortal's codecs with the real filters (no
//! mortal daemon): `mortal_proto::policy` against postgrey, and
//! `mortal_proto::milter` against the pymilter test milter, rspamd,
//! OpenDKIM and OpenDMARC, each started by a guard of
//! tests/support/filters.rs on loopback. Every reply is asserted exactly
//! where the daemon's configuration fixes it.

use mortal_proto::milter::{
    Actions, CustomReply, EsmtpArgs, HeaderName, HeaderValue, MilterAddress, Modification, Offer, Reply, Stage,
};
use mortal_proto::policy::{Action, Query, ReplyDecoder, SaslFacts, Stage as PolicyStage};
use mortal_proto::smtp_status::{EnhancedStatus, ReplyCode};
use mortal_tests::dns::{self, TestDns, Zone};
use mortal_tests::filters::{
    DkimKey, GTUBE, MilterConversation, OpenDkim, OpenDmarc, Outcome, POSTGREY_HOSTNAME, Postgrey, REPLY_LIMIT, Rspamd,
    TestMilter,
};
use mortal_tests::wait_for_within;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

/// A client address outside every filter's internal or ignored hosts.
const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 10), 40000);

fn message(subject: &str, body: &str) -> Vec<u8> {
    format!(
        "From: Sender <sender@example.test>\r\nTo: rcpt@example.test\r\nSubject: {subject}\r\n\
         Date: Thu, 03 Dec 2026 14:00:00 +0000\r\nMessage-ID: <{subject}@example.test>\r\n\
         X-Delete-Me: yes\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n{body}\r\n"
    )
    .into_bytes()
}

fn name(n: &str) -> HeaderName {
    HeaderName::new(n).expect("header name")
}

fn value(v: &str) -> HeaderValue {
    HeaderValue::new(v.as_bytes()).expect("header value")
}

fn addr(a: &str) -> MilterAddress {
    MilterAddress::new(a).expect("milter address")
}

// ---- policy: postgrey ----

fn policy_query(sender: &str, recipient: &str) -> Query {
    Query {
        stage: PolicyStage::Rcpt,
        protocol_name: "ESMTP".into(),
        helo_name: "client.example.test".into(),
        queue_id: None,
        sender: sender.into(),
        recipient: recipient.into(),
        recipient_count: 0,
        client_address: (*CLIENT.ip()).into(),
        client_port: CLIENT.port(),
        client_name: "unknown".into(),
        reverse_client_name: "unknown".into(),
        instance: "1a2b.3c4d5e6f.1".into(),
        size: 0,
        etrn_domain: String::new(),
        stress: false,
        sasl: SaslFacts::default(),
        tls: None,
        server_address: Ipv4Addr::LOCALHOST.into(),
        server_port: 25,
        policy_context: String::new(),
    }
}

/// One query and its action over an open connection.
fn ask(conn: &mut TcpStream, query: &Query) -> Action {
    conn.write_all(&query.encode()).expect("send policy query");
    let mut decoder = ReplyDecoder::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = match conn.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("read policy reply: {e}"),
        };
        assert!(n > 0, "postgrey closed the connection");
        if let Some(action) = decoder.feed(&buf[..n]).expect("a well-formed policy reply") {
            assert!(!decoder.has_trailing(), "bytes after the reply");
            return action;
        }
    }
}

#[test]
fn postgrey_defers_a_new_triplet_then_passes_it_after_the_delay() {
    const DELAY: Duration = Duration::from_secs(2);
    let postgrey = Postgrey::start(DELAY);
    let mut conn = TcpStream::connect(postgrey.addr()).expect("connect to postgrey");
    conn.set_read_timeout(Some(REPLY_LIMIT)).expect("read timeout");
    let query = policy_query("sender@example.org", "rcpt@example.test");
    let first_asked = Instant::now();
    assert_eq!(
        ask(&mut conn, &query),
        Action::DeferIfPermit(Some(
            "4.2.0 Greylisted, see http://postgrey.schweikert.ch/help/example.test.html".into()
        ))
    );
    // Another triplet is greylisted on its own, on the same connection.
    let other = policy_query("other@example.org", "rcpt@example.test");
    assert!(matches!(ask(&mut conn, &other), Action::DeferIfPermit(_)));
    // Retries before the delay are deferred too; the first after it passes.
    let passed = wait_for_within("postgrey to pass the triplet", DELAY * 5, || match ask(&mut conn, &query) {
        Action::DeferIfPermit(_) => {
            std::thread::sleep(Duration::from_millis(200));
            None
        }
        action => Some(action),
    })
    .unwrap_or_else(|| panic!("still greylisted after {:?}\n{}", DELAY * 5, postgrey.log_text()));
    // postgrey counts whole seconds from the second of the first query.
    assert!(first_asked.elapsed() + Duration::from_secs(1) >= DELAY, "passed before the delay");
    let Action::Prepend(header) = passed else { panic!("not PREPEND: {passed:?}") };
    let rest = header.strip_prefix("X-Greylist: delayed ").unwrap_or_else(|| panic!("{header}"));
    let (seconds, rest) = rest.split_once(' ').expect("seconds");
    assert!(seconds.parse::<u64>().is_ok_and(|s| s >= DELAY.as_secs()), "{header}");
    assert!(rest.starts_with(&format!("seconds by postgrey-1.37 at {POSTGREY_HOSTNAME}; ")), "{header}");
    let log = postgrey.log_text();
    assert!(log.contains("action=greylist, reason=new, client_name=unknown, client_address=192.0.2.10, sender=sender@example.org, recipient=rcpt@example.test"), "{log}");
    assert!(log.contains("action=pass, reason=triplet found"), "{log}");
}

// ---- milter: the pymilter test milter ----

/// What the test milter negotiates: every modification it uses, and
/// SETSYMLIST, which libmilter 8.15 asks for whenever it is offered.
fn test_milter_actions() -> Actions {
    Actions::ADDHDRS
        | Actions::CHGHDRS
        | Actions::CHGBODY
        | Actions::ADDRCPT
        | Actions::ADDRCPT_PAR
        | Actions::DELRCPT
        | Actions::QUARANTINE
        | Actions::CHGFROM
        | Actions::SETSYMLIST
}

/// One message to the test milter for `rcpts` (the first sets the case).
fn test_milter_message(milter: &TestMilter, rcpts: &[&str]) -> Outcome {
    let mut conv = MilterConversation::open(milter.port, Offer::default());
    assert_eq!(conv.agreement.version, 6);
    assert_eq!(conv.agreement.actions, test_milter_actions());
    let outcome = conv.message(CLIENT, "sender@example.test", rcpts, &message("case", "the body"));
    conv.quit();
    outcome
}

fn eom(reply: Reply, effects: Vec<Reply>) -> Outcome {
    Outcome { stage: Stage::EndOfMessage, reply, effects }
}

#[test]
fn test_milter_replies() {
    let milter = TestMilter::start();
    let cases: Vec<(&str, Outcome)> = vec![
        ("plain@example.test", eom(Reply::Continue, vec![])),
        ("accept@example.test", eom(Reply::Accept, vec![])),
        ("reject@example.test", Outcome { stage: Stage::Rcpt, reply: Reply::Reject, effects: vec![] }),
        ("tempfail@example.test", Outcome { stage: Stage::Rcpt, reply: Reply::Tempfail, effects: vec![] }),
        ("discard@example.test", eom(Reply::Discard, vec![])),
        ("quarantine@example.test", eom(Reply::Continue, vec![Reply::Quarantine("test milter quarantine".into())])),
        ("progress@example.test", eom(Reply::Continue, vec![Reply::Progress; 3])),
        (
            "replycode@example.test",
            eom(
                Reply::ReplyCode(
                    CustomReply::new(
                        "550".parse::<ReplyCode>().expect("code"),
                        Some("5.7.1".parse::<EnhancedStatus>().expect("status")),
                        vec!["test milter reject".into(), "second line".into()],
                    )
                    .expect("custom reply"),
                ),
                vec![],
            ),
        ),
    ];
    for (rcpt, expected) in cases {
        assert_eq!(test_milter_message(&milter, &[rcpt]), expected, "{rcpt}\n{}", milter.log_text());
    }
}

#[test]
fn test_milter_modifications() {
    let milter = TestMilter::start();
    let m = |x: Modification| Reply::Modify(x);
    let cases: Vec<(&[&str], Vec<Reply>)> = vec![
        (
            &["addheader@example.test"],
            vec![m(Modification::AddHeader { name: name("X-Test-Milter"), value: value("added") })],
        ),
        (
            &["insheader@example.test"],
            vec![
                m(Modification::InsertHeader { index: 0, name: name("X-Inserted-0"), value: value("at index 0") }),
                m(Modification::InsertHeader { index: 1, name: name("X-Inserted-1"), value: value("at index 1") }),
            ],
        ),
        (
            &["chgheader@example.test"],
            vec![
                m(Modification::ChangeHeader {
                    index: 1,
                    name: name("Subject"),
                    value: value("changed by test milter"),
                }),
                m(Modification::ChangeHeader { index: 1, name: name("X-Delete-Me"), value: value("") }),
            ],
        ),
        (&["replbody@example.test"], vec![m(Modification::ReplaceBody(b"replaced by test milter\r\n".to_vec()))]),
        (
            &["addrcpt@example.test"],
            vec![
                m(Modification::AddRecipient(addr("<added@example.test>"))),
                m(Modification::AddRecipientWithArgs {
                    address: addr("<added-never@example.test>"),
                    args: EsmtpArgs::new("NOTIFY=NEVER").expect("args"),
                }),
            ],
        ),
        (
            &["keep@example.test", "delrcpt@example.test"],
            vec![m(Modification::DeleteRecipient(addr("<delrcpt@example.test>")))],
        ),
        (
            &["chgfrom@example.test"],
            vec![m(Modification::ChangeSender { address: addr("<changed@example.test>"), args: EsmtpArgs::default() })],
        ),
    ];
    for (rcpts, effects) in cases {
        assert_eq!(
            test_milter_message(&milter, rcpts),
            eom(Reply::Continue, effects),
            "{rcpts:?}\n{}",
            milter.log_text()
        );
    }
}

#[test]
fn test_milter_records_what_it_received() {
    let milter = TestMilter::start();
    let outcome = test_milter_message(&milter, &["headers@example.test"]);
    assert_eq!(outcome, eom(Reply::Continue, vec![]));
    // QUIT ends the conversation: "close" is the last record.
    let records = milter.wait_for_record("close");
    let events: Vec<&str> = records.iter().map(|r| r["event"].as_str().expect("event")).collect();
    assert_eq!(
        events,
        [
            "connect", "helo", "mail", "rcpt", "data", "header", "header", "header", "header", "header", "header",
            "header", "header", "eoh", "body", "eom", "close"
        ]
    );
    assert_eq!(records[0]["hostname"], "client.example.test");
    assert_eq!((&records[0]["address"], &records[0]["port"]), (&"192.0.2.10".into(), &40000.into()));
    assert_eq!(records[0]["macros"]["j"], "mortal.test");
    assert_eq!(records[2]["address"], "<sender@example.test>");
    assert_eq!(records[2]["macros"]["i"], "4TESTQUEUEID");
    assert_eq!(records[3]["address"], "<headers@example.test>");
    let headers: Vec<(String, String)> = records
        .iter()
        .filter(|r| r["event"] == "header")
        .map(|r| (r["name"].as_str().expect("name").into(), r["value"].as_str().expect("value").into()))
        .collect();
    assert_eq!(headers[0], ("From".to_owned(), "Sender <sender@example.test>".to_owned()));
    assert_eq!(headers[2], ("Subject".to_owned(), "case".to_owned()));
    assert_eq!(headers[7], ("Content-Type".to_owned(), "text/plain; charset=us-ascii".to_owned()));
    let body = records.iter().find(|r| r["event"] == "body").expect("body");
    assert_eq!(body["chunk"], "the body\r\n");
}

#[test]
fn test_milter_slow_case_answers_after_its_sleep() {
    const SLOW: Duration = Duration::from_secs(1);
    let milter = TestMilter::start_slow(SLOW);
    let started = Instant::now();
    assert_eq!(test_milter_message(&milter, &["slow@example.test"]), eom(Reply::Continue, vec![]));
    assert!(started.elapsed() >= SLOW);
}

// ---- milter: rspamd ----

/// A client address the test domain's SPF record allows.
const ALLOWED_CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 20), 40000);

/// The records of the test domains: SPF allowing 127.0.0.1 and
/// [`ALLOWED_CLIENT`], DMARC `p=reject`.
fn test_zone() -> Zone {
    let mut zone = Zone::new();
    zone.txt("example.test", "v=spf1 ip4:127.0.0.1 ip4:192.0.2.20 -all")
        .txt("_dmarc.example.test", "v=DMARC1; p=reject")
        .a("mx.example.test", Ipv4Addr::LOCALHOST)
        .mx("example.test", 10, "mx.example.test");
    zone
}

/// The value of the first header `wanted` added or inserted, without the
/// leading space a milter that asked for HDR_LEADSPC sends.
fn header_of(outcome: &Outcome, wanted: &str) -> Option<String> {
    outcome.modifications().into_iter().find_map(|m| match m {
        Modification::AddHeader { name, value } | Modification::InsertHeader { name, value, .. }
            if name.as_str().eq_ignore_ascii_case(wanted) =>
        {
            Some(String::from_utf8_lossy(value.as_bytes()).trim_start_matches([' ', '\t']).to_owned())
        }
        _ => None,
    })
}

#[test]
fn rspamd_rejects_gtube_passes_signed_mail_and_marks_spf_failures() {
    let (zone, signed) = signed_zone("Hello there, signed.");
    let dns = TestDns::zone(zone);
    let rspamd = Rspamd::start(&dns);

    let mut conv = MilterConversation::open(rspamd.port, Offer::default());
    assert_eq!(conv.agreement.version, 6);
    let gtube = conv.message(CLIENT, "sender@example.test", &["rcpt@example.test"], &message("gtube", GTUBE));
    conv.quit();
    assert_eq!(gtube.stage, Stage::EndOfMessage);
    let expected = CustomReply::new(
        "554".parse().expect("code"),
        Some("5.7.1".parse().expect("status")),
        // GTUBE's pre-result names its own reason, not reject_message.
        vec!["Gtube pattern".into()],
    )
    .expect("custom reply");
    assert_eq!(gtube.reply, Reply::ReplyCode(expected), "{gtube:?}\n{}", rspamd.log_text());

    // From an address the SPF record allows (not 127.0.0.1: rspamd checks
    // no SPF for a loopback client).
    let allowed = ALLOWED_CLIENT;
    let mut conv = MilterConversation::open(rspamd.port, Offer::default());
    let clean = conv.message(allowed, "sender@example.test", &["rcpt@example.test"], &message("clean", "Hello there."));
    conv.quit();
    assert_eq!(clean.stage, Stage::EndOfMessage);
    // rspamd's "no action" is ACCEPT, after its headers.
    assert_eq!(clean.reply, Reply::Accept, "{clean:?}\n{}", rspamd.log_text());
    let result = header_of(&clean, "X-Spamd-Result").unwrap_or_else(|| panic!("no X-Spamd-Result: {clean:?}"));
    assert!(result.starts_with("default: False ["), "{result}");
    assert!(result.contains("R_SPF_ALLOW"), "{result}");
    let status = header_of(&clean, "X-Spam-Status").unwrap_or_else(|| panic!("no X-Spam-Status: {clean:?}"));
    assert!(status.starts_with("No, score="), "{status}");
    // The SPF record was asked of the test DNS (and so nothing else).
    assert!(dns.asked("example.test.", dns::TXT), "{:?}", dns.query_log());

    // From an address the SPF record refuses (-all): rspamd's action for
    // that score is "add header", so the message passes, marked as spam.
    let mut conv = MilterConversation::open(rspamd.port, Offer::default());
    let spf_fail = conv.message(CLIENT, "sender@example.test", &["rcpt@example.test"], &message("spf", "Hello there."));
    conv.quit();
    assert_eq!(spf_fail.stage, Stage::EndOfMessage);
    assert_eq!(spf_fail.reply, Reply::Accept, "{spf_fail:?}\n{}", rspamd.log_text());
    let result = header_of(&spf_fail, "X-Spamd-Result").unwrap_or_else(|| panic!("no X-Spamd-Result: {spf_fail:?}"));
    // "False": rspamd's is-spam is about rejecting; the action is the mark.
    assert!(result.starts_with("default: False ["), "{result}");
    assert!(result.contains("R_SPF_FAIL(") && result.contains("DMARC_POLICY_REJECT("), "{result}");
    let status = header_of(&spf_fail, "X-Spam-Status").unwrap_or_else(|| panic!("no X-Spam-Status: {spf_fail:?}"));
    assert!(status.starts_with("Yes, score="), "{status}");
    let ar = header_of(&spf_fail, "Authentication-Results").unwrap_or_else(|| panic!("no A-R: {spf_fail:?}"));
    assert!(ar.contains("spf=fail (") && ar.contains("dmarc=fail reason="), "{ar}");
    // The spam mark: X-Spam set (CHGHEADER index 1 adds it when absent).
    assert!(
        spf_fail.modifications().contains(&Modification::ChangeHeader {
            index: 1,
            name: name("X-Spam"),
            value: value("Yes")
        }),
        "{spf_fail:?}"
    );

    // Signed (the key from the test DNS: a TXT record of two strings)
    // and from an address SPF allows: DKIM, SPF and DMARC pass.
    let mut conv = MilterConversation::open(rspamd.port, Offer::default());
    let good = conv.message(ALLOWED_CLIENT, "sender@example.test", &["rcpt@example.test"], &signed);
    conv.quit();
    assert_eq!(good.reply, Reply::Accept, "{good:?}\n{}", rspamd.log_text());
    let result = header_of(&good, "X-Spamd-Result").unwrap_or_else(|| panic!("no X-Spamd-Result: {good:?}"));
    for symbol in ["R_DKIM_ALLOW(", "R_SPF_ALLOW(", "DMARC_POLICY_ALLOW("] {
        assert!(result.contains(symbol), "{symbol} missing: {result}");
    }
    let ar = header_of(&good, "Authentication-Results").unwrap_or_else(|| panic!("no A-R: {good:?}"));
    assert!(ar.contains("dkim=pass header.d=example.test header.s=sel1") && ar.contains("dmarc=pass"), "{ar}");
    assert!(dns.asked("sel1._domainkey.example.test.", dns::TXT), "{:?}", dns.query_log());
}

// ---- the test DNS ----

/// A DNS query for `name` TXT, id 0x1234, RD.
fn txt_query(name: &str) -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.trim_end_matches('.').split('.') {
        q.push(u8::try_from(label.len()).expect("label"));
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 16, 0, 1]);
    q
}

/// The character-strings of the single TXT answer of `reply` to `query`.
fn txt_strings(query: &[u8], reply: &[u8]) -> Vec<Vec<u8>> {
    assert_eq!(&reply[..2], &query[..2], "id");
    assert_eq!(u16::from_be_bytes([reply[6], reply[7]]), 1, "one answer");
    // The answer: pointer (2), type, class (4), TTL (4), rdlength (2).
    let rdata_at = query.len() + 12;
    let rdlength = usize::from(u16::from_be_bytes([reply[rdata_at - 2], reply[rdata_at - 1]]));
    let mut rdata = &reply[rdata_at..rdata_at + rdlength];
    let mut strings = Vec::new();
    while let Some((&len, rest)) = rdata.split_first() {
        strings.push(rest[..usize::from(len)].to_vec());
        rdata = &rest[usize::from(len)..];
    }
    strings
}

#[test]
fn test_dns_splits_a_long_txt_and_truncates_it_over_udp() {
    let long = "v=DKIM1; k=rsa; p=".to_owned() + &"A".repeat(600);
    let mut zone = Zone::new();
    zone.txt("big.example.test", &long).txt("small.example.test", "v=spf1 -all");
    let dns = TestDns::zone(zone);
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    udp.set_read_timeout(Some(REPLY_LIMIT)).expect("timeout");
    let mut buf = [0u8; 2048];

    let small = txt_query("small.example.test");
    udp.send_to(&small, ("127.0.0.1", dns.port)).expect("send");
    let n = udp.recv(&mut buf).expect("UDP answer");
    assert_eq!(txt_strings(&small, &buf[..n]), [b"v=spf1 -all".to_vec()]);

    // Over 512 octets: truncated (TC, no answer) over UDP ...
    let big = txt_query("BIG.example.test");
    udp.send_to(&big, ("127.0.0.1", dns.port)).expect("send");
    let n = udp.recv(&mut buf).expect("UDP answer");
    assert_eq!(n, big.len(), "the question only");
    assert_eq!(buf[2] & 0x02, 0x02, "TC set");
    assert_eq!(&buf[6..8], &[0, 0], "no answer");
    // ... and whole over TCP, in strings of at most 255 octets.
    let mut tcp = TcpStream::connect(("127.0.0.1", dns.port)).expect("connect");
    tcp.set_read_timeout(Some(REPLY_LIMIT)).expect("timeout");
    tcp.write_all(&u16::try_from(big.len()).expect("len").to_be_bytes()).expect("send");
    tcp.write_all(&big).expect("send");
    let mut len = [0u8; 2];
    tcp.read_exact(&mut len).expect("length");
    let mut reply = vec![0; usize::from(u16::from_be_bytes(len))];
    tcp.read_exact(&mut reply).expect("answer");
    let strings = txt_strings(&big, &reply);
    assert_eq!(strings.iter().map(Vec::len).collect::<Vec<_>>(), [255, 255, long.len() - 510]);
    assert_eq!(strings.concat(), long.as_bytes());

    // A name without records: NXDOMAIN.
    let none = txt_query("none.example.test");
    udp.send_to(&none, ("127.0.0.1", dns.port)).expect("send");
    let n = udp.recv(&mut buf).expect("UDP answer");
    assert_eq!((buf[3] & 0x0f, &buf[6..8]), (3, &[0u8, 0][..]), "{:?}", &buf[..n]);
    assert_eq!(
        dns.query_log(),
        [
            ("small.example.test.".to_owned(), dns::TXT),
            ("big.example.test.".to_owned(), dns::TXT),
            ("big.example.test.".to_owned(), dns::TXT + dns::TCP),
            ("none.example.test.".to_owned(), dns::TXT),
        ]
    );
}

// ---- milter: OpenDKIM, OpenDMARC ----

/// A DKIM key for `sel1._domainkey.example.test`, the test zone with its
/// public key in it, and `body` signed with it.
fn signed_zone(body: &str) -> (Zone, Vec<u8>) {
    let key = DkimKey::generate("example.test", "sel1");
    let mut zone = test_zone();
    key.publish(&mut zone);
    (zone, signed_message(&key, body))
}

fn signed_message(dkim_key: &DkimKey, body: &str) -> Vec<u8> {
    let signer = OpenDkim::signer(dkim_key);
    signer.sign("sender@example.test", "rcpt@example.test", &message("signed", body))
}

fn authentication_results(outcome: &Outcome) -> String {
    header_of(outcome, "Authentication-Results").unwrap_or_else(|| panic!("no Authentication-Results: {outcome:?}"))
}

#[test]
fn opendkim_passes_a_signed_message_and_fails_an_altered_one() {
    let (zone, signed) = signed_zone("Signed body.");
    let dns = TestDns::zone(zone);
    let verifier = OpenDkim::start(&dns);

    let mut conv = MilterConversation::open(verifier.port, Offer::default());
    let good = conv.message(CLIENT, "sender@example.test", &["rcpt@example.test"], &signed);
    conv.quit();
    assert_eq!(good.reply, Reply::Accept, "{good:?}\n{}", verifier.log_text());
    let ar = authentication_results(&good);
    // The signature's first characters (header.b) differ per signing.
    let (head, tail) = ar.split_once(" header.b=").unwrap_or_else(|| panic!("{ar}"));
    assert_eq!(
        head,
        "mortal.test;\n\tdkim=pass (2048-bit key; unprotected) header.d=example.test header.i=@example.test \
         header.a=rsa-sha256 header.s=sel1"
    );
    assert!(tail.ends_with(";\n\tdkim-atps=neutral"), "{ar}");
    assert!(dns.asked("sel1._domainkey.example.test.", dns::TXT), "{:?}", dns.query_log());

    let altered = String::from_utf8(signed).expect("text").replace("Signed body.", "Altered body.").into_bytes();
    let mut conv = MilterConversation::open(verifier.port, Offer::default());
    let bad = conv.message(CLIENT, "sender@example.test", &["rcpt@example.test"], &altered);
    conv.quit();
    assert_eq!(bad.reply, Reply::Accept, "{bad:?}\n{}", verifier.log_text());
    let ar = authentication_results(&bad);
    let (head, _) = ar.split_once(" header.b=").unwrap_or_else(|| panic!("{ar}"));
    assert_eq!(
        head,
        "mortal.test;\n\tdkim=fail reason=\"signature verification failed\" (2048-bit key; unprotected) \
         header.d=example.test header.i=@example.test header.a=rsa-sha256 header.s=sel1"
    );
}

#[test]
#[ignore = "needs root (OpenDMARC asks glibc's resolver: test DNS on 127.0.0.1:53, its own /etc/resolv.conf in a mount namespace)"]
fn root_opendmarc_after_opendkim_passes_an_aligned_signed_message() {
    let (zone, signed) = signed_zone("Signed body.");
    let dns = TestDns::zone_on_port_53(zone).expect("bind 127.0.0.1:53");
    let verifier = OpenDkim::start(&dns);
    let dmarc = OpenDmarc::start(&dns);

    let mut conv = MilterConversation::open(verifier.port, Offer::default());
    let dkim = conv.message(ALLOWED_CLIENT, "sender@example.test", &["rcpt@example.test"], &signed);
    conv.quit();
    let dkim_ar = authentication_results(&dkim);
    assert!(dkim_ar.contains("dkim=pass"), "{dkim_ar}");
    // The milters in order: OpenDMARC sees OpenDKIM's header on top.
    let mut with_ar = format!("Authentication-Results: {dkim_ar}\r\n").into_bytes();
    with_ar.extend_from_slice(&signed);

    let mut conv = MilterConversation::open(dmarc.port, Offer::default());
    let outcome = conv.message(ALLOWED_CLIENT, "sender@example.test", &["rcpt@example.test"], &with_ar);
    conv.quit();
    assert_eq!(outcome.reply, Reply::Accept, "{outcome:?}\n{}", dmarc.log_text());
    // Its own SPF check (SPFSelfValidate), then the DMARC result.
    let results: Vec<String> = outcome
        .modifications()
        .into_iter()
        .filter_map(|m| match m {
            Modification::InsertHeader { name, value, .. } if name.as_str() == "Authentication-Results" => {
                Some(String::from_utf8_lossy(value.as_bytes()).into_owned())
            }
            _ => None,
        })
        .collect();
    assert_eq!(results[0], "mortal.test; spf=pass smtp.mailfrom=example.test", "{outcome:?}");
    assert_eq!(results[1], "mortal.test; dmarc=pass (p=reject dis=none) header.from=example.test", "{outcome:?}");
    assert!(dns.asked("_dmarc.example.test.", dns::TXT), "{:?}", dns.query_log());
}

// ---- through mortal: the real filters in a running instance ----

use mortal_proto::spool::QueueDir;
use mortal_tests::{Instance, Options, Smtp};

/// A mortal instance whose smtpd asks these filters (`[[smtpd.milter]]`
/// and `[[smtpd.policy]]` tables, in order).
fn mortal_with(tables: &str) -> Instance {
    Instance::start_with(Options { extra: tables.to_owned(), ..Options::default() })
}

fn milter_table(endpoint: &str) -> String {
    format!("[[smtpd.milter]]\nendpoint = \"{endpoint}\"\n")
}

/// One transaction; the reply to the end of the data, or the first
/// refusal before it.
fn deliver(smtp: &mut Smtp, from: &str, rcpts: &[&str], message: &[u8]) -> String {
    let mail = smtp.cmd(&format!("MAIL FROM:<{from}>")).expect("MAIL");
    if !mail.starts_with("250") {
        return mail;
    }
    for rcpt in rcpts {
        let reply = smtp.cmd(&format!("RCPT TO:<{rcpt}>")).expect("RCPT");
        if !reply.starts_with("250") {
            return reply;
        }
    }
    assert!(smtp.cmd("DATA").expect("DATA").starts_with("354"));
    let text = String::from_utf8_lossy(message).replace("\r\n.", "\r\n..");
    smtp.cmd(&format!("{}.", text)).expect("end of data")
}

fn session(inst: &Instance) -> Smtp {
    let mut smtp = Smtp::connect(inst.port).expect("connect");
    assert!(smtp.cmd("EHLO client.test").unwrap().starts_with("250"));
    smtp
}

/// The header section of a delivered (LF) message, lines as written.
fn delivered_header(message: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(message);
    text.split("\n\n").next().unwrap_or_default().lines().map(str::to_owned).collect()
}

/// postgrey through mortal: the first attempt is greylisted with
/// postgrey's text in Postfix's reply, a retry after the delay passes and
/// the message arrives with postgrey's X-Greylist header on top.
#[test]
fn mortal_greylists_with_postgrey_then_delivers() {
    let postgrey = Postgrey::start(Duration::from_secs(2));
    let inst = mortal_with(&format!("[[smtpd.policy]]\nendpoint = \"{}\"\n", postgrey.endpoint()));
    let mut smtp = session(&inst);
    assert_eq!(smtp.cmd("MAIL FROM:<sender@example.org>").unwrap(), "250 2.1.0 Ok\r\n");
    assert_eq!(
        smtp.cmd("RCPT TO:<rcpt@example.test>").unwrap(),
        "450 4.2.0 <rcpt@example.test>: Recipient address rejected: Greylisted, see \
         http://postgrey.schweikert.ch/help/example.test.html\r\n"
    );
    inst.wait_for_log(
        "NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 450 4.2.0 <rcpt@example.test>: Recipient address \
         rejected: Greylisted, see http://postgrey.schweikert.ch/help/example.test.html; \
         from=<sender@example.org> to=<rcpt@example.test> proto=ESMTP helo=<client.test>",
    );
    drop(smtp);
    // Retry as a client would, until postgrey lets the triplet through.
    let queued = wait_for_within("the retry to pass", Duration::from_secs(15), || {
        let mut smtp = session(&inst);
        let reply = deliver(&mut smtp, "sender@example.org", &["rcpt@example.test"], &message("grey", "Hi."));
        if reply.starts_with("450 4.2.0") {
            std::thread::sleep(Duration::from_millis(500));
            return None;
        }
        Some(reply)
    })
    .unwrap_or_else(|| panic!("never passed:\n{}", postgrey.log_text()));
    assert!(queued.starts_with("250 2.0.0 Ok: queued as "), "{queued}");
    let got = inst.wait_for_delivery("rcpt@example.test", 1);
    let header = delivered_header(&got[0]);
    // Return-Path and Delivered-To by the Maildir delivery, then the PREPEND.
    assert!(header[2].starts_with("X-Greylist: delayed "), "{header:#?}");
    assert!(header[2].contains(&format!("by postgrey-1.37 at {POSTGREY_HOSTNAME}")), "{header:#?}");
    assert!(header[3].starts_with("Received: from client.test (unknown [127.0.0.1])"), "{header:#?}");
}

/// The pymilter test milter through mortal: each reply reaches the client
/// in Postfix's words, and each modification shows in the delivered
/// message exactly.
#[test]
fn mortal_carries_out_every_test_milter_reply_and_edit() {
    let milter = TestMilter::start();
    let inst = mortal_with(&milter_table(&milter.endpoint()));
    let mut smtp = session(&inst);
    let msg = message("original", "Original body.");
    for (rcpt, want) in [
        ("reject@example.test", "550 5.7.1 Command rejected\r\n"),
        ("tempfail@example.test", "451 4.7.1 Service unavailable - try again later\r\n"),
        ("replycode@example.test", "550-5.7.1 test milter reject\r\n550 5.7.1 second line\r\n"),
    ] {
        assert_eq!(deliver(&mut smtp, "sender@example.test", &[rcpt], &msg), want, "{rcpt}");
        assert_eq!(smtp.cmd("RSET").unwrap(), "250 2.0.0 Ok\r\n");
    }
    inst.wait_for_log(
        "NOQUEUE: milter-reject: RCPT from unknown[127.0.0.1]: 550 5.7.1 Command rejected; \
         from=<sender@example.test> to=<reject@example.test> proto=ESMTP helo=<client.test>",
    );
    inst.wait_for_log(
        "milter-reject: END-OF-MESSAGE from unknown[127.0.0.1]: 550 5.7.1 test milter reject second line;",
    );

    // Discard: the client hears 250, nothing is kept.
    let discarded = deliver(&mut smtp, "sender@example.test", &["discard@example.test"], &msg);
    assert!(discarded.starts_with("250 2.0.0 Ok: queued as "), "{discarded}");
    inst.wait_for_log("milter-discard: END-OF-MESSAGE from unknown[127.0.0.1]: milter triggers DISCARD action;");
    // Quarantine: the message waits in hold/.
    let held = deliver(&mut smtp, "sender@example.test", &["quarantine@example.test"], &msg);
    let held_id = held.trim_end().rsplit(' ').next().unwrap().to_owned();
    inst.wait_for_log(&format!("{held_id}: hold: milter {}: test milter quarantine", milter.endpoint()));
    assert_eq!(inst.queue_files(QueueDir::Hold), [held_id]);

    // Every modification on one message.
    let rcpts = [
        "addheader@example.test",
        "insheader@example.test",
        "chgheader@example.test",
        "replbody@example.test",
        "addrcpt@example.test",
        "delrcpt@example.test",
        "chgfrom@example.test",
    ];
    let queued = deliver(&mut smtp, "sender@example.test", &rcpts, &msg);
    assert!(queued.starts_with("250 2.0.0 Ok: queued as "), "{queued}");
    for rcpt in ["addheader@example.test", "added@example.test", "added-never@example.test"] {
        inst.wait_for_delivery(rcpt, 1);
    }
    inst.wait_for_empty_queue();
    assert!(inst.delivered("delrcpt@example.test").is_empty(), "the deleted recipient got it");
    assert!(inst.delivered("discard@example.test").is_empty());
    let got = &inst.delivered("addheader@example.test")[0];
    let header = delivered_header(got);
    assert_eq!(header[0], "Return-Path: <changed@example.test>", "{header:#?}");
    assert!(header[2].starts_with("Received: from client.test (unknown [127.0.0.1])"), "{header:#?}");
    // The client's section as the milter edited it, below cleanup's Received.
    let client_part: Vec<&str> =
        header.iter().skip(3).filter(|l| !l.starts_with(['\t', ' '])).map(String::as_str).collect();
    assert_eq!(
        client_part,
        [
            "X-Inserted-0: at index 0",
            "X-Inserted-1: at index 1",
            "From: Sender <sender@example.test>",
            "To: rcpt@example.test",
            "Subject: changed by test milter",
            "Date: Thu, 03 Dec 2026 14:00:00 +0000",
            "Message-ID: <original@example.test>",
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=us-ascii",
            "X-Test-Milter: added",
        ],
        "{header:#?}"
    );
    assert_eq!(mortal_tests::body_of(got), b"replaced by test milter\n");
}

/// rspamd in milter mode through mortal: GTUBE gets rspamd's own reply,
/// a clean message arrives with rspamd's headers, and a client SPF fails
/// for (named by a PROXY header) gets rspamd's X-Spam mark.
#[test]
fn mortal_with_rspamd_rejects_gtube_and_marks_what_it_decides() {
    let dns = TestDns::zone(test_zone());
    let rspamd = Rspamd::start(&dns);
    let mut inst = Instance::start_with(Options {
        extra: milter_table(&rspamd.endpoint()),
        // The PROXY listener on an address of its own (the plain one is
        // 127.0.0.1:0); its peer, the test, is 127.0.0.1 (proxy_trusted).
        smtpd_extra: "proxy_listen = [\"127.0.0.11:0\"]".into(),
        ..Options::default()
    });
    let mut smtp = session(&inst);
    let gtube = message("gtube", GTUBE);
    assert_eq!(
        deliver(&mut smtp, "sender@example.test", &["rcpt@example.test"], &gtube),
        "554 5.7.1 Gtube pattern\r\n",
        "{}",
        rspamd.log_text()
    );
    inst.wait_for_log("milter-reject: END-OF-MESSAGE from unknown[127.0.0.1]: 554 5.7.1 Gtube pattern;");
    let clean = deliver(&mut smtp, "sender@example.test", &["clean@example.test"], &message("clean", "Hello."));
    assert!(clean.starts_with("250 2.0.0 Ok: queued as "), "{clean}");
    let got = inst.wait_for_delivery("clean@example.test", 1);
    let header = delivered_header(&got[0]).join("\n");
    for field in ["X-Spamd-Result: default: False", "X-Spam-Status: No, score=", "Authentication-Results: "] {
        assert!(header.contains(field), "{field} missing:\n{header}");
    }
    assert!(!header.contains("X-Spam: Yes"), "{header}");

    // A client outside example.test's SPF record, through PROXY v1.
    let port = inst.proxy_port();
    let stream = TcpStream::connect(("127.0.0.11", port)).expect("connect proxy port");
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut smtp = Smtp::over(stream);
    smtp.send_raw(format!("PROXY TCP4 192.0.2.66 127.0.0.11 40000 {port}\r\n").as_bytes()).unwrap();
    smtp.greeting = smtp.read_reply().unwrap();
    assert!(smtp.cmd("EHLO client.test").unwrap().starts_with("250"));
    let spf = deliver(&mut smtp, "sender@example.test", &["spf@example.test"], &message("spf", "Hello."));
    assert!(spf.starts_with("250 2.0.0 Ok: queued as "), "{spf}");
    let got = inst.wait_for_delivery("spf@example.test", 1);
    let header = delivered_header(&got[0]).join("\n");
    assert!(header.contains("X-Spam: Yes"), "{header}");
    assert!(header.contains("spf=fail"), "{header}");
}

/// OpenDKIM through mortal: a message signed in the test arrives with
/// `dkim=pass`, the same message with its body altered with `dkim=fail`.
#[test]
fn mortal_with_opendkim_passes_signed_mail_and_fails_altered_mail() {
    let (zone, signed) = signed_zone("Signed body.");
    let dns = TestDns::zone(zone);
    let verifier = OpenDkim::start(&dns);
    let inst = mortal_with(&milter_table(&verifier.endpoint()));
    let mut smtp = session(&inst);
    let altered = String::from_utf8(signed.clone()).unwrap().replace("Signed body.", "Altered body.").into_bytes();
    for (rcpt, msg) in [("good@example.test", &signed), ("bad@example.test", &altered)] {
        let reply = deliver(&mut smtp, "sender@example.test", &[rcpt], msg);
        assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}\n{}", verifier.log_text());
    }
    let ar = |rcpt: &str| {
        let got = inst.wait_for_delivery(rcpt, 1);
        let header = delivered_header(&got[0]);
        let at = header.iter().position(|l| l.starts_with("Authentication-Results: ")).expect("A-R");
        header[at..]
            .iter()
            .take_while(|l| l.starts_with("Authentication-Results") || l.starts_with(['\t', ' ']))
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    };
    let good = ar("good@example.test");
    assert!(
        good.starts_with(
            "Authentication-Results: mortal.test;\n\tdkim=pass (2048-bit key; unprotected) header.d=example.test"
        ),
        "{good}"
    );
    let bad = ar("bad@example.test");
    assert!(
        bad.starts_with("Authentication-Results: mortal.test;\n\tdkim=fail reason=\"signature verification failed\""),
        "{bad}"
    );
}

/// OpenDKIM, then OpenDMARC, in one milter list: OpenDMARC reads the
/// Authentication-Results OpenDKIM added (the order is kept).
#[test]
#[ignore = "needs root (OpenDMARC asks glibc's resolver: test DNS on 127.0.0.1:53, its own /etc/resolv.conf in a mount namespace)"]
fn root_mortal_with_opendkim_then_opendmarc_passes_aligned_mail() {
    let (zone, signed) = signed_zone("Signed body.");
    let dns = TestDns::zone_on_port_53(zone).expect("bind 127.0.0.1:53");
    let verifier = OpenDkim::start(&dns);
    let dmarc = OpenDmarc::start(&dns);
    let inst = mortal_with(&format!("{}{}", milter_table(&verifier.endpoint()), milter_table(&dmarc.endpoint())));
    let mut smtp = session(&inst);
    let reply = deliver(&mut smtp, "sender@example.test", &["rcpt@example.test"], &signed);
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}\n{}", dmarc.log_text());
    let got = inst.wait_for_delivery("rcpt@example.test", 1);
    let header = delivered_header(&got[0]).join("\n");
    assert!(header.contains("dkim=pass"), "{header}");
    assert!(header.contains("dmarc=pass (p=reject dis=none) header.from=example.test"), "{header}");
}
