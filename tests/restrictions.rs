//! `[smtpd.restrictions]` end to end: Postfix's restriction lists with
//! their replies and log lines, `smtpd_delay_reject` both ways, access
//! tables of each kind, the DNS-based checks against a nameserver on
//! loopback, and postmaster getting through whatever the lists say.

use mortal_tests::delivery::Dovecot;
use mortal_tests::dns::{TestDns, Zone};
use mortal_tests::netpeer::fail2ban_regex;
use mortal_tests::rbldnsd::Rbldnsd;
use mortal_tests::socketmap::SocketmapServer;
use mortal_tests::{Instance, Options, Smtp, TempDir};
use std::fs;
use std::net::Ipv4Addr;
use std::path::Path;

/// An instance with these `[smtpd.restrictions]` keys (and `smtpd`
/// keys, for resolvers).
fn start(restrictions: &str, smtpd: &str) -> Instance {
    let extra = format!("[smtpd.restrictions]\n{restrictions}\n");
    Instance::start_with(Options { extra, smtpd_extra: smtpd.to_owned(), ..Options::default() })
}

fn table(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    fs::write(&path, text).expect("write table");
    path.display().to_string()
}

/// A session up to MAIL: HELO and MAIL must be accepted (the lists are
/// evaluated at RCPT under smtpd_delay_reject).
fn mail(inst: &Instance, helo: &str, sender: &str) -> Smtp {
    let mut smtp = Smtp::connect(inst.port).expect("connect");
    let ehlo = smtp.cmd(&format!("EHLO {helo}")).unwrap();
    assert!(ehlo.starts_with("250"), "{ehlo}");
    assert_eq!(smtp.cmd(&format!("MAIL FROM:<{sender}>")).unwrap(), "250 2.1.0 Ok\r\n");
    smtp
}

fn rcpt(smtp: &mut Smtp, to: &str) -> String {
    smtp.cmd(&format!("RCPT TO:<{to}>")).unwrap()
}

/// Each building block refuses with Postfix's reply, at RCPT (delayed),
/// naming what it refuses; postmaster gets through every one of them.
#[test]
fn each_restriction_refuses_at_rcpt_with_postfix_s_reply() {
    let tables = TempDir::new("restrictions");
    let helo = table(&tables.0, "helo", "evil.example.org REJECT bad helo\n");
    let senders = table(&tables.0, "senders", "bad.example REJECT go away\nfriend@ok.example OK\n");
    let rcpts =
        table(&tables.0, "rcpts", "blocked@example.test 550 5.1.1 mailbox disabled\nodd@example.test frobnicate\n");
    let inst = start(
        &format!(
            "helo = [\"reject_invalid_helo_hostname\", \"reject_non_fqdn_helo_hostname\", \"check_helo_access texthash:{helo}\"]\n\
             sender = [\"reject_non_fqdn_sender\", \"check_sender_access texthash:{senders}\"]\n\
             recipient = [\"reject_non_fqdn_recipient\", \"check_recipient_access texthash:{rcpts}\"]\n"
        ),
        "",
    );
    let cases = [
        ("bad_name!", "a@example.org", "u@example.test", "501 5.5.2 <bad_name!>: Helo command rejected: Invalid name"),
        (
            "localhost",
            "a@example.org",
            "u@example.test",
            "504 5.5.2 <localhost>: Helo command rejected: need fully-qualified hostname",
        ),
        (
            "mx.evil.example.org",
            "a@example.org",
            "u@example.test",
            "554 5.7.1 <mx.evil.example.org>: Helo command rejected: bad helo",
        ),
        (
            "client.example.org",
            "joe@nodot",
            "u@example.test",
            "504 5.5.2 <joe@nodot>: Sender address rejected: need fully-qualified address",
        ),
        (
            "client.example.org",
            "spammer@mail.bad.example",
            "u@example.test",
            "554 5.7.1 <spammer@mail.bad.example>: Sender address rejected: go away",
        ),
        (
            "client.example.org",
            "a@example.org",
            "blocked@example.test",
            "550 5.1.1 <blocked@example.test>: Recipient address rejected: mailbox disabled",
        ),
        (
            "client.example.org",
            "a@example.org",
            "odd@example.test",
            // Postfix's reply for a table it cannot use: no subject named.
            "451 4.3.5 Server configuration error",
        ),
    ];
    for (helo, sender, to, want) in cases {
        let mut smtp = mail(&inst, helo, sender);
        assert_eq!(rcpt(&mut smtp, to), format!("{want}\r\n"), "{helo} {sender} {to}");
        // RFC 5321 4.5.1: postmaster is never refused by the lists.
        assert_eq!(rcpt(&mut smtp, "postmaster@example.test"), "250 2.1.5 Ok\r\n", "{helo} {sender}");
        inst.wait_for_log(&format!(
            "NOQUEUE: reject: RCPT from unknown[127.0.0.1]: {want}; from=<{sender}> to=<{to}> proto=ESMTP helo=<{helo}>"
        ));
    }
    inst.wait_for_log(&format!("warning: access table texthash:{rcpts}: \"frobnicate\" is not an access(5) action"));
    // OK in the sender table ends the sender list; everything else passes.
    let mut smtp = mail(&inst, "client.example.org", "friend@ok.example");
    assert_eq!(rcpt(&mut smtp, "u@example.test"), "250 2.1.5 Ok\r\n");
    assert!(smtp.cmd("DATA").unwrap().starts_with("354"));
    assert!(smtp.cmd("Subject: through\r\n\r\nhello\r\n.").unwrap().starts_with("250 2.0.0 Ok: queued as "));
    inst.wait_for_delivery("u@example.test", 1);
}

/// Without smtpd_delay_reject each list refuses at its own command.
#[test]
fn without_delay_reject_each_list_refuses_at_its_own_stage() {
    let inst = start(
        "delay_reject = false\nhelo = [\"reject_non_fqdn_helo_hostname\"]\nsender = [\"reject_non_fqdn_sender\"]\n",
        "",
    );
    let mut smtp = Smtp::connect(inst.port).expect("connect");
    assert_eq!(
        smtp.cmd("EHLO localhost").unwrap(),
        "504 5.5.2 <localhost>: Helo command rejected: need fully-qualified hostname\r\n"
    );
    inst.wait_for_log(
        "NOQUEUE: reject: EHLO from unknown[127.0.0.1]: 504 5.5.2 <localhost>: Helo command rejected: \
         need fully-qualified hostname; proto=ESMTP helo=<localhost>",
    );
    assert!(smtp.cmd("EHLO client.example.org").unwrap().starts_with("250"));
    assert_eq!(
        smtp.cmd("MAIL FROM:<joe@nodot>").unwrap(),
        "504 5.5.2 <joe@nodot>: Sender address rejected: need fully-qualified address\r\n"
    );
    assert_eq!(smtp.cmd("MAIL FROM:<joe@example.org>").unwrap(), "250 2.1.0 Ok\r\n");
}

/// A listed client is refused at RCPT (cidr table), and the first
/// restriction with an opinion decides: OK before `reject` permits.
#[test]
fn client_access_and_list_order() {
    let tables = TempDir::new("restrictions");
    let clients = table(&tables.0, "clients.cidr", "192.0.2.0/24 OK\n127.0.0.0/8 REJECT listed client\n");
    let inst = start(
        &format!(
            "client = [\"check_client_access cidr:{clients}\"]\n\
             recipient = [\"check_recipient_access inline:{{ vip@example.test = OK }}\", \"reject\"]\n"
        ),
        "",
    );
    let mut smtp = mail(&inst, "client.example.org", "a@example.org");
    assert_eq!(
        rcpt(&mut smtp, "u@example.test"),
        "554 5.7.1 <unknown[127.0.0.1]>: Client host rejected: listed client\r\n"
    );
    assert_eq!(rcpt(&mut smtp, "postmaster@example.test"), "250 2.1.5 Ok\r\n");

    let inst = start("recipient = [\"check_recipient_access inline:{ vip@example.test = OK }\", \"reject\"]\n", "");
    let mut smtp = mail(&inst, "client.example.org", "a@example.org");
    assert_eq!(rcpt(&mut smtp, "vip@example.test"), "250 2.1.5 Ok\r\n");
    assert_eq!(
        rcpt(&mut smtp, "u@example.test"),
        "554 5.7.1 <u@example.test>: Recipient address rejected: Access denied\r\n"
    );
}

/// reject_unknown_sender_domain against a nameserver on loopback: an MX
/// or an address is enough, NXDOMAIN is 450 4.1.8 (Postfix's default
/// unknown_address_reject_code), a null MX 550 5.7.27.
#[test]
fn unknown_sender_domains_are_refused() {
    let mut zone = Zone::new();
    zone.mx("mx.example", 10, "mail.mx.example").a("mail.mx.example", Ipv4Addr::LOCALHOST);
    zone.a("a.example", Ipv4Addr::LOCALHOST);
    zone.mx("null.example", 0, ".");
    let dns = TestDns::zone(zone);
    let inst =
        start("sender = [\"reject_unknown_sender_domain\"]\n", &format!("resolvers = [\"127.0.0.1:{}\"]\n", dns.port));
    for (sender, want) in [
        ("a@mx.example", "250 2.1.5 Ok"),
        ("a@a.example", "250 2.1.5 Ok"),
        ("a@none.example", "450 4.1.8 <a@none.example>: Sender address rejected: Domain not found"),
        (
            "a@null.example",
            "550 5.7.27 <a@null.example>: Sender address rejected: Domain null.example does not accept mail (nullMX)",
        ),
    ] {
        let mut smtp = mail(&inst, "client.example.org", sender);
        assert_eq!(rcpt(&mut smtp, "u@example.test"), format!("{want}\r\n"), "{sender}");
    }
    // The null sender has no domain to look up.
    let mut smtp = mail(&inst, "client.example.org", "");
    assert_eq!(rcpt(&mut smtp, "u@example.test"), "250 2.1.5 Ok\r\n");
}

/// A nameserver that never answers: the sender is deferred (DEFER_IF_PERMIT
/// with 450 4.1.8), never rejected and never accepted, within dns_timeout.
#[test]
fn a_dns_timeout_defers_the_sender() {
    let dns = TestDns::silent();
    let inst = start(
        "sender = [\"reject_unknown_sender_domain\"]\ndns_timeout = \"1s\"\n",
        &format!("resolvers = [\"127.0.0.1:{}\"]\n", dns.port),
    );
    let mut smtp = mail(&inst, "client.example.org", "a@slow.example");
    assert_eq!(
        rcpt(&mut smtp, "u@example.test"),
        "450 4.1.8 <a@slow.example>: Sender address rejected: Domain not found\r\n"
    );
}

/// reject_unauth_pipelining carries over from a Postfix list, and is in
/// force anyway: a client never offered PIPELINING (HELO) that sends
/// commands ahead gets smtpd's own refusal before any list is asked.
#[test]
fn unauthorized_pipelining_is_refused() {
    let inst = start("delay_reject = false\nsender = [\"reject_unauth_pipelining\"]\n", "");
    let mut smtp = Smtp::connect(inst.port).expect("connect");
    assert!(smtp.cmd("HELO client.example.org").unwrap().starts_with("250"));
    smtp.send_raw(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<u@example.test>\r\n").unwrap();
    assert_eq!(smtp.read_reply().unwrap(), "554 5.5.0 Error: SMTP protocol synchronization\r\n");
    // With EHLO, pipelining was offered and is fine.
    let mut smtp = Smtp::connect(inst.port).expect("connect");
    assert!(smtp.cmd("EHLO client.example.org").unwrap().starts_with("250"));
    smtp.send_raw(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<u@example.test>\r\n").unwrap();
    assert_eq!(smtp.read_reply().unwrap(), "250 2.1.0 Ok\r\n");
    assert_eq!(smtp.read_reply().unwrap(), "250 2.1.5 Ok\r\n");
}

/// reject_unauth_destination refuses relaying, even for a trusted
/// client, unless permit_mynetworks came first (as in Postfix's
/// smtpd_relay_restrictions).
#[test]
fn reject_unauth_destination_refuses_relaying() {
    let server = "trusted_networks = [\"127.0.0.0/8\"]\n".to_owned();
    let extra = "[smtpd.restrictions]\nrecipient = [\"reject_unauth_destination\"]\n".to_owned();
    let inst = Instance::start_with(Options { extra, server_extra: server.clone(), ..Options::default() });
    let mut smtp = mail(&inst, "client.example.org", "a@example.org");
    assert_eq!(rcpt(&mut smtp, "u@example.test"), "250 2.1.5 Ok\r\n");
    assert_eq!(rcpt(&mut smtp, "x@elsewhere.example"), "554 5.7.1 <x@elsewhere.example>: Relay access denied\r\n");
    let extra = "[smtpd.restrictions]\nrecipient = [\"permit_mynetworks\", \"reject_unauth_destination\"]\n".to_owned();
    let inst = Instance::start_with(Options { extra, server_extra: server, ..Options::default() });
    let mut smtp = mail(&inst, "client.example.org", "a@example.org");
    assert_eq!(rcpt(&mut smtp, "x@elsewhere.example"), "250 2.1.5 Ok\r\n");
}

/// An instance screening clients against DNS lists served by rbldnsd on
/// loopback; `dnsbl` is the `[smtpd.dnsbl]` body.
fn screened(lists: &Rbldnsd, dnsbl: &str, restrictions: &str) -> Instance {
    let extra = format!("[smtpd.dnsbl]\n{dnsbl}\n[smtpd.restrictions]\n{restrictions}\n");
    let smtpd_extra = format!("resolvers = [\"127.0.0.1:{}\"]\n", lists.port);
    Instance::start_with(Options { extra, smtpd_extra, ..Options::default() })
}

fn dns_lists() -> Rbldnsd {
    Rbldnsd::start(&[
        ("zen.example", &["127.0.0.1"]),
        ("wl.example", &["127.0.0.1 :127.0.9.2:allowlisted"]),
        ("other.example", &["192.0.2.1"]),
    ])
}

/// A listed client is refused at every RCPT with postscreen's reply and
/// log line (what fail2ban's postfix filter matches), after `DNSBL rank`;
/// postmaster still gets through.
#[test]
fn a_listed_client_is_refused_at_rcpt() {
    let lists = dns_lists();
    let inst = screened(&lists, "sites = [\"zen.example*3\", \"other.example*3\"]\nthreshold = 3\n", "");
    let mut smtp = mail(&inst, "client.example.org", "a@example.org");
    let want = "550 5.7.1 Service unavailable; client [127.0.0.1] blocked using zen.example";
    assert_eq!(rcpt(&mut smtp, "u@example.test"), format!("{want}\r\n"));
    assert_eq!(rcpt(&mut smtp, "postmaster@example.test"), "250 2.1.5 Ok\r\n");
    inst.wait_for_log("DNSBL rank 3 for [127.0.0.1]:");
    let log = inst.wait_for_log(&format!(
        "NOQUEUE: reject: RCPT from unknown[127.0.0.1]: {want}; from=<a@example.org> to=<u@example.test> \
         proto=ESMTP helo=<client.example.org>"
    ));
    // fail2ban's stock postfix filter bans on exactly that line.
    let rejects: Vec<&str> = log.lines().filter(|l| l.contains(": reject: RCPT from ")).collect();
    let (matched, report) = fail2ban_regex(&inst.log, "/etc/fail2ban/filter.d/postfix.conf");
    assert_eq!(matched, rejects, "fail2ban-regex must match the DNSBL reject:\n{report}");
}

/// Below the threshold, or listed nowhere: served.
#[test]
fn an_unlisted_client_is_served() {
    let lists = dns_lists();
    let inst = screened(&lists, "sites = [\"other.example*3\", \"zen.example*2\"]\nthreshold = 3\n", "");
    let mut smtp = mail(&inst, "client.example.org", "a@example.org");
    assert_eq!(rcpt(&mut smtp, "u@example.test"), "250 2.1.5 Ok\r\n");
    inst.wait_for_log("DNSBL rank 2 for [127.0.0.1]:");
}

/// An allow list's negative weight offsets a listing, and a score at or
/// below allowlist_threshold skips the client restrictions.
#[test]
fn an_allowlisted_client_skips_the_client_restrictions() {
    let lists = dns_lists();
    let inst = screened(
        &lists,
        "sites = [\"zen.example*3\", \"wl.example*-5\"]\nthreshold = 3\nallowlist_threshold = -1\n",
        "client = [\"reject\"]\n",
    );
    let mut smtp = mail(&inst, "client.example.org", "a@example.org");
    assert_eq!(rcpt(&mut smtp, "u@example.test"), "250 2.1.5 Ok\r\n");
    inst.wait_for_log("DNSBL rank -2 for [127.0.0.1]:");
}

/// `action = "drop"` decides before the greeting: 521, and the end.
#[test]
fn drop_refuses_before_the_greeting() {
    let lists = dns_lists();
    let inst = screened(&lists, "sites = [\"zen.example\"]\naction = \"drop\"\n", "");
    let mut smtp = Smtp::connect(inst.port).expect("connect");
    assert_eq!(smtp.greeting, "521 5.7.1 Service unavailable; client [127.0.0.1] blocked using zen.example\r\n");
    assert!(smtp.closed());
}

/// reject_rbl_client in a list: smtpd's own reply shape.
#[test]
fn reject_rbl_client_refuses_with_smtpd_s_reply() {
    let lists = dns_lists();
    let smtpd_extra = format!("resolvers = [\"127.0.0.1:{}\"]\n", lists.port);
    let extra =
        "[smtpd.restrictions]\nclient = [\"permit_dnswl_client other.example\", \"reject_rbl_client zen.example\"]\n"
            .to_owned();
    let inst = Instance::start_with(Options { extra, smtpd_extra, ..Options::default() });
    let mut smtp = mail(&inst, "client.example.org", "a@example.org");
    assert_eq!(
        rcpt(&mut smtp, "u@example.test"),
        "554 5.7.1 Service unavailable; Client host [127.0.0.1] blocked using zen.example\r\n"
    );
}

/// A nameserver that never answers: the client is not listed (and
/// served) once the timeout passed; the lookup failure is logged.
#[test]
fn a_silent_dns_list_does_not_block() {
    let dns = TestDns::silent();
    let extra = "[smtpd.dnsbl]\nsites = [\"zen.example\"]\ntimeout = \"1s\"\n".to_owned();
    let smtpd_extra = format!("resolvers = [\"127.0.0.1:{}\"]\n", dns.port);
    let inst = Instance::start_with(Options { extra, smtpd_extra, ..Options::default() });
    let mut smtp = mail(&inst, "client.example.org", "a@example.org");
    assert_eq!(rcpt(&mut smtp, "u@example.test"), "250 2.1.5 Ok\r\n");
    inst.wait_for_log("warning: dnsbl zen.example: lookup of 1.0.0.127.zen.example");
}

/// reject_unverified_recipient against the real Dovecot: a user Dovecot
/// does not know is refused during the dialogue with Dovecot's own words,
/// a known one is accepted and delivered, postmaster gets through.
#[test]
fn unknown_dovecot_users_are_refused_at_rcpt() {
    let dovecot = Dovecot::start_with_users(&["alice@example.test"]);
    let inet = dovecot.inet.expect("dovecot's inet listener");
    let extra = format!(
        "[delivery]\ntransport = \"lmtp:inet:{inet}\"\n[smtpd.restrictions]\nrecipient = [\"reject_unverified_recipient\"]\n"
    );
    let inst = Instance::start_with(Options { extra, ..Options::default() });
    let mut smtp = mail(&inst, "client.example.org", "a@example.org");
    let want = format!(
        "550 5.1.1 <bob@example.test>: Recipient address rejected: undeliverable address: host inet:{inet} said: \
         550 5.1.1 <bob@example.test> User doesn't exist: bob@example.test (in reply to RCPT TO command)"
    );
    assert_eq!(rcpt(&mut smtp, "bob@example.test"), format!("{want}\r\n"));
    // Remembered: the same answer again.
    assert_eq!(rcpt(&mut smtp, "bob@example.test"), format!("{want}\r\n"));
    assert_eq!(rcpt(&mut smtp, "alice@example.test"), "250 2.1.5 Ok\r\n");
    assert_eq!(rcpt(&mut smtp, "postmaster@example.test"), "250 2.1.5 Ok\r\n");
    inst.wait_for_log(&format!(
        "NOQUEUE: reject: RCPT from unknown[127.0.0.1]: {want}; from=<a@example.org> to=<bob@example.test> \
         proto=ESMTP helo=<client.example.org>"
    ));
    assert!(smtp.cmd("DATA").unwrap().starts_with("354"));
    assert!(smtp.cmd("Subject: verified\r\n\r\nhello\r\n.").unwrap().starts_with("250 2.0.0 Ok: queued as "));
    dovecot.wait_for_delivery("alice@example.test", 1);
}

/// A server that cannot be reached: the recipient is deferred, never
/// refused and never accepted.
#[test]
fn an_unreachable_verification_target_defers() {
    let closed = mortal_tests::ClosedPort::new();
    let extra = format!(
        "[delivery]\ntransport = \"lmtp:inet:127.0.0.1:{}\"\n[smtpd.restrictions]\nrecipient = [\"reject_unverified_recipient\"]\n",
        closed.port
    );
    let inst = Instance::start_with(Options { extra, ..Options::default() });
    let mut smtp = mail(&inst, "client.example.org", "a@example.org");
    assert_eq!(
        rcpt(&mut smtp, "bob@example.test"),
        format!(
            "450 4.1.1 <bob@example.test>: Recipient address rejected: unverified address: \
             inet:127.0.0.1:{}: connect: Connection refused (os error 111)\r\n",
            closed.port
        )
    );
}

/// socketmap tables: a recipient table and an access table asked by
/// smtpd, a virtual alias table asked by cleanup, all from one server on
/// loopback; a TEMP answer or a server that is down defers with
/// `451 4.3.0`, never a rejection and never an accept.
#[test]
fn socketmap_tables_answer_and_defer() {
    let server = SocketmapServer::start(&[
        ("users alice@example.test", "OK ok"),
        ("users alias@example.test", "OK ok"),
        ("users busy@example.test", "TEMP database busy"),
        ("virtual alias@example.test", "OK alice@example.test"),
        ("access spammer@bad.example", "OK REJECT no thanks"),
    ]);
    let port = server.port;
    let server_extra = format!(
        "recipient_maps = [\"socketmap:inet:127.0.0.1:{port}:users\"]\n\
         virtual_alias_maps = [\"socketmap:inet:127.0.0.1:{port}:virtual\"]\n"
    );
    let extra =
        format!("[smtpd.restrictions]\nsender = [\"check_sender_access socketmap:inet:127.0.0.1:{port}:access\"]\n");
    let inst = Instance::start_with(Options { extra, server_extra, ..Options::default() });
    let mut smtp = mail(&inst, "client.example.org", "a@example.org");
    assert_eq!(rcpt(&mut smtp, "alice@example.test"), "250 2.1.5 Ok\r\n");
    assert_eq!(rcpt(&mut smtp, "alias@example.test"), "250 2.1.5 Ok\r\n");
    assert_eq!(
        rcpt(&mut smtp, "bob@example.test"),
        "550 5.1.1 <bob@example.test>: Recipient address rejected: User unknown in local recipient table\r\n"
    );
    assert_eq!(rcpt(&mut smtp, "busy@example.test"), "451 4.3.0 <busy@example.test>: Temporary lookup failure\r\n");
    assert!(smtp.cmd("DATA").unwrap().starts_with("354"));
    assert!(smtp.cmd("Subject: socketmap\r\n\r\nhello\r\n.").unwrap().starts_with("250 2.0.0 Ok: queued as "));
    // cleanup expanded alias@ through the server: alice gets two copies'
    // worth of recipients, deduplicated into one.
    inst.wait_for_delivery("alice@example.test", 1);
    assert!(server.queries().contains(&"virtual alias@example.test".to_owned()), "{:?}", server.queries());
    let mut smtp = mail(&inst, "client.example.org", "spammer@bad.example");
    assert_eq!(
        rcpt(&mut smtp, "alice@example.test"),
        "554 5.7.1 <spammer@bad.example>: Sender address rejected: no thanks\r\n"
    );
    inst.wait_for_log("warning: recipient lookup of <busy@example.test>: temporary lookup failure: TEMP database busy");
}

/// tcp_table(5): the same through Postfix's simpler line protocol, with
/// %XX-encoded keys and values.
#[test]
fn tcp_tables_answer_and_defer() {
    let server = SocketmapServer::start_tcp_table(&[
        ("alice@example.test", "200 ok"),
        ("busy@example.test", "400 database busy"),
        ("spammer@bad.example", "200 REJECT%20no%20thanks"),
    ]);
    let port = server.port;
    let server_extra = format!("recipient_maps = [\"tcp:127.0.0.1:{port}\"]\n");
    let extra = format!("[smtpd.restrictions]\nsender = [\"check_sender_access tcp:127.0.0.1:{port}\"]\n");
    let inst = Instance::start_with(Options { extra, server_extra, ..Options::default() });
    let mut smtp = mail(&inst, "client.example.org", "a@example.org");
    assert_eq!(rcpt(&mut smtp, "alice@example.test"), "250 2.1.5 Ok\r\n");
    assert_eq!(
        rcpt(&mut smtp, "bob@example.test"),
        "550 5.1.1 <bob@example.test>: Recipient address rejected: User unknown in local recipient table\r\n"
    );
    assert_eq!(rcpt(&mut smtp, "busy@example.test"), "451 4.3.0 <busy@example.test>: Temporary lookup failure\r\n");
    let mut smtp = mail(&inst, "client.example.org", "spammer@bad.example");
    assert_eq!(
        rcpt(&mut smtp, "alice@example.test"),
        "554 5.7.1 <spammer@bad.example>: Sender address rejected: no thanks\r\n"
    );
}

/// A socketmap server that takes the connection and never answers: 451
/// 4.3.0 once `[server] table_timeout` has passed.
#[test]
fn a_silent_socketmap_server_defers_after_table_timeout() {
    // Bound and listening, never accepting: connect and write succeed.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let server_extra =
        format!("recipient_maps = [\"socketmap:inet:127.0.0.1:{port}:users\"]\ntable_timeout = \"1s\"\n");
    let inst = Instance::start_with(Options { server_extra, ..Options::default() });
    let mut smtp = mail(&inst, "client.example.org", "a@example.org");
    let started = std::time::Instant::now();
    assert_eq!(rcpt(&mut smtp, "alice@example.test"), "451 4.3.0 <alice@example.test>: Temporary lookup failure\r\n");
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "{:?}", started.elapsed());
}

/// A socketmap server that is not there: 451 4.3.0.
#[test]
fn a_missing_socketmap_server_defers() {
    let closed = mortal_tests::ClosedPort::new();
    let server_extra = format!("recipient_maps = [\"socketmap:inet:127.0.0.1:{}:users\"]\n", closed.port);
    let inst = Instance::start_with(Options { server_extra, ..Options::default() });
    let mut smtp = mail(&inst, "client.example.org", "a@example.org");
    assert_eq!(rcpt(&mut smtp, "alice@example.test"), "451 4.3.0 <alice@example.test>: Temporary lookup failure\r\n");
    assert_eq!(rcpt(&mut smtp, "postmaster@example.test"), "250 2.1.5 Ok\r\n");
}
