//! postscreen in front of smtpd: the pregreet test, the cache of clients
//! that passed, the time limit for a silent client, and 5,000 silent
//! connections that leave a real client its smtpd.

use mortal_tests::{Instance, Options, WAIT, wait_for_within};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const GREETING: &str = "mortal.test ESMTP mortal";

fn screened(extra: &str, process_limit: u32) -> Instance {
    Instance::start_with(Options {
        smtpd_process_limit: process_limit,
        smtpd_prefork: 1,
        smtpd_min_spare: 1,
        smtpd_max_spare: 2,
        extra: format!("\n[postscreen]\nenabled = true\n{extra}"),
        ..Options::default()
    })
}

/// A connection from `source` (any 127/8 address) to the instance.
fn connect_from(source: Ipv4Addr, port: u16) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.bind(&SocketAddr::new(IpAddr::V4(source), 0).into()).expect("bind the source address");
    socket.connect(&SocketAddr::from(([127, 0, 0, 1], port)).into()).expect("connect");
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream
}

/// Reads until `end` has arrived (or the server closes); returns all of it.
fn read_until(stream: &mut TcpStream, end: &str) -> String {
    let mut got = Vec::new();
    let mut b = [0u8; 512];
    while !String::from_utf8_lossy(&got).ends_with(end) {
        match stream.read(&mut b) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&b[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

fn closed(stream: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(stream.read(&mut b), Ok(0) | Err(_))
}

/// A client that waits gets the two-line greeting after `greet_wait`, is
/// passed to smtpd with its first command, and delivers; next time it
/// skips the wait. A client that talks first is dropped with 521; one
/// that never talks hears 421 after `command_time_limit`.
#[test]
fn patient_clients_pass_talkers_are_dropped_silent_ones_time_out() {
    let inst = screened("greet_wait = \"1s\"\ncommand_time_limit = \"2s\"\nclient_connection_limit = 2\n", 4);
    let port = inst.port;

    // Not 127.0.0.1: the harness's own check passed that address at start.
    let mut patient = connect_from(Ipv4Addr::new(127, 0, 0, 10), port);
    let started = Instant::now();
    let greeting = read_until(&mut patient, &format!("220 {GREETING}\r\n"));
    assert_eq!(greeting, format!("220-{GREETING}\r\n220 {GREETING}\r\n"));
    assert!(started.elapsed() >= Duration::from_secs(1), "the last line came before greet_wait");
    let mut smtp = mortal_tests::Smtp::over(patient);
    assert_eq!(smtp.cmd("HELO client.test").unwrap(), "250 mortal.test\r\n");
    assert_eq!(smtp.cmd("MAIL FROM:<a@example.test>").unwrap(), "250 2.1.0 Ok\r\n");
    assert_eq!(smtp.cmd("RCPT TO:<patient@example.test>").unwrap(), "250 2.1.5 Ok\r\n");
    assert!(smtp.cmd("DATA").unwrap().starts_with("354 "));
    let queued = smtp.cmd("Subject: screened\r\n\r\nhello\r\n.").unwrap();
    assert!(queued.starts_with("250 2.0.0 Ok: queued as "), "{queued}");
    assert_eq!(smtp.cmd("QUIT").unwrap(), "221 2.0.0 Bye\r\n");
    inst.wait_for_delivery("patient@example.test", 1);
    let log = inst.wait_for_log("PASS NEW [127.0.0.10]:");
    assert!(log.contains("postfix/mortal/postscreen["), "{log}");
    assert!(log.contains("postfix/mortal/smtpd[") && log.contains("connect from unknown[127.0.0.10]"), "{log}");

    // Known now: the whole greeting at once.
    let mut again = connect_from(Ipv4Addr::new(127, 0, 0, 10), port);
    assert_eq!(read_until(&mut again, "\r\n"), format!("220 {GREETING}\r\n"));
    inst.wait_for_log("PASS OLD [127.0.0.10]:");
    let mut smtp = mortal_tests::Smtp::over(again);
    assert_eq!(smtp.cmd("QUIT").unwrap(), "221 2.0.0 Bye\r\n");

    // A bot that talks before the greeting ends.
    let mut bot = connect_from(Ipv4Addr::new(127, 0, 0, 2), port);
    bot.write_all(b"EHLO bot\r\n").unwrap();
    let answer = read_until(&mut bot, "Protocol error\r\n");
    assert_eq!(answer, format!("220-{GREETING}\r\n521 5.5.1 Protocol error\r\n"));
    assert!(closed(&mut bot));
    let log = inst.wait_for_log("DISCONNECT [127.0.0.2]:");
    assert!(log.contains("PREGREET 10 after ") && log.contains("from [127.0.0.2]:"), "{log}");
    assert!(log.contains(": EHLO bot\\r\\n"), "{log}");

    // One address may hold two connections; the third is refused at once.
    let mut held: Vec<TcpStream> = (0..2).map(|_| connect_from(Ipv4Addr::new(127, 0, 0, 4), port)).collect();
    for h in &mut held {
        assert_eq!(read_until(h, "\r\n"), format!("220-{GREETING}\r\n"));
    }
    let mut third = connect_from(Ipv4Addr::new(127, 0, 0, 4), port);
    assert_eq!(read_until(&mut third, "\r\n"), "421 4.7.0 mortal.test Error: too many connections from 127.0.0.4\r\n");
    assert!(closed(&mut third));
    inst.wait_for_log("NOQUEUE: reject: CONNECT from [127.0.0.4]:");
    drop(held);

    // A client that never sends a command.
    let mut silent = connect_from(Ipv4Addr::new(127, 0, 0, 3), port);
    let all = read_until(&mut silent, "timeout exceeded\r\n");
    assert_eq!(all, format!("220-{GREETING}\r\n220 {GREETING}\r\n421 4.4.2 mortal.test Error: timeout exceeded\r\n"));
    assert!(closed(&mut silent));
    inst.wait_for_log("COMMAND TIME LIMIT from [127.0.0.3]:");
}

/// postscreen's resident memory, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("postscreen's status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("VmRSS in kB")
}

/// Bytes in the kernel's TCP socket slab (every TCP socket's `tcp_sock`),
/// where /proc/slabinfo is readable (root); for the report only.
fn tcp_slab_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/slabinfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("TCP "))?;
    let fields: Vec<u64> = line.split_whitespace().skip(1).take(3).filter_map(|v| v.parse().ok()).collect();
    // active_objs, num_objs, objsize
    Some(fields.first()? * fields.get(2)?)
}

const IDLE_BOTS: usize = 5000;
/// Connections per source address, under the default per-client limit (50).
const BOTS_PER_ADDRESS: usize = 25;
/// Target: memory held per idle connection by postscreen.
const MAX_KIB_PER_IDLE_CONNECTION: u64 = 16;

/// 5,000 connections from 200 addresses that connect, read the greeting
/// and say nothing hold no smtpd: a fresh client is then answered by an
/// smtpd within 2 s of its greeting, with 4 smtpd processes at most.
#[test]
fn five_thousand_silent_connections_leave_a_real_client_its_smtpd() {
    let inst = screened("greet_wait = \"1s\"\n", 4);
    let port = inst.port;
    let postscreen = wait_for_within("postscreen's pid", WAIT, || inst.children_running("mortal-postscreen").pop())
        .expect("a postscreen process");
    let (rss_before, slab_before) = (rss_kib(postscreen), tcp_slab_bytes());
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut bots = Vec::with_capacity(IDLE_BOTS);
    for i in 0..IDLE_BOTS {
        assert!(Instant::now() < deadline, "only {i} connections within 120 s");
        let host = i / BOTS_PER_ADDRESS;
        let source = Ipv4Addr::new(127, 1, (host / 250) as u8, (host % 250 + 1) as u8);
        bots.push(connect_from(source, port));
    }
    // Every bot has its whole greeting: each is now held waiting for a
    // first command that never comes.
    inst.wait_for_log_count("PASS NEW [127.1.", IDLE_BOTS);
    let rss_after = rss_kib(postscreen);
    let per_connection = rss_after.saturating_sub(rss_before) * 1024 / IDLE_BOTS as u64;
    println!(
        "{IDLE_BOTS} idle connections: postscreen RSS {rss_before} -> {rss_after} KiB ({per_connection} bytes each)"
    );
    if let (Some(before), Some(after)) = (slab_before, tcp_slab_bytes()) {
        // Two sockets per loopback connection: the bot's and postscreen's.
        println!(
            "kernel TCP socket slab: up {} KiB, {} bytes per socket",
            after.saturating_sub(before) / 1024,
            after.saturating_sub(before) / (2 * IDLE_BOTS as u64)
        );
    }
    assert!(
        per_connection <= MAX_KIB_PER_IDLE_CONNECTION * 1024,
        "postscreen holds {per_connection} bytes per idle connection, more than {MAX_KIB_PER_IDLE_CONNECTION} KiB"
    );

    let mut fresh = connect_from(Ipv4Addr::new(127, 0, 0, 10), port);
    let greeting = read_until(&mut fresh, &format!("220 {GREETING}\r\n"));
    assert_eq!(greeting, format!("220-{GREETING}\r\n220 {GREETING}\r\n"));
    let greeted = Instant::now();
    let mut smtp = mortal_tests::Smtp::over(fresh);
    assert_eq!(smtp.cmd("HELO fresh.test").unwrap(), "250 mortal.test\r\n");
    let answered = greeted.elapsed();
    println!("fresh client answered by smtpd {answered:?} after its greeting");
    assert!(answered <= Duration::from_secs(2), "the fresh client waited {answered:?} for smtpd");
    assert_eq!(smtp.cmd("QUIT").unwrap(), "221 2.0.0 Bye\r\n");
    let smtpds = inst.children_running("mortal-smtpd").len();
    assert!(smtpds <= 4, "{smtpds} smtpd processes for one real client");
    assert!(!inst.log_text().contains("has reached its process limit"), "the smtpd pool filled up");
    drop(bots);
}

/// postscreen is mortal too: at the end of its life it tells the clients
/// it holds `421 4.3.2 ... Service shutting down`, and its successor
/// greets the next ones.
#[test]
fn a_retiring_postscreen_says_421_and_its_successor_serves() {
    let inst =
        screened("greet_wait = \"0s\"\n\n[process.postscreen]\nmax_lifetime = \"3s\"\nlifetime_jitter = 0.5\n", 4);
    let first = wait_for_within("postscreen's pid", WAIT, || inst.children_running("mortal-postscreen").pop())
        .expect("a postscreen process");
    let mut held = connect_from(Ipv4Addr::new(127, 0, 0, 20), inst.port);
    let all = read_until(&mut held, "shutting down\r\n");
    assert_eq!(all, format!("220 {GREETING}\r\n421 4.3.2 mortal.test Service shutting down\r\n"));
    assert!(closed(&mut held));
    inst.wait_for_log(&format!("postscreen[{first}]: exit: retired by master"));
    let mut next = connect_from(Ipv4Addr::new(127, 0, 0, 21), inst.port);
    assert_eq!(read_until(&mut next, "\r\n"), format!("220 {GREETING}\r\n"));
    let mut smtp = mortal_tests::Smtp::over(next);
    assert_eq!(smtp.cmd("HELO next.test").unwrap(), "250 mortal.test\r\n");
    let successor = inst.children_running("mortal-postscreen");
    assert!(!successor.is_empty() && !successor.contains(&first), "{successor:?} after {first}");
}

/// A client that passed keeps its pass across a retirement: the retiring
/// postscreen leaves its cache in a file, its successor reads it and
/// greets that client at once (`PASS OLD`), while a new one still waits.
#[test]
fn a_successor_remembers_who_passed() {
    let inst =
        screened("greet_wait = \"1s\"\n\n[process.postscreen]\nmax_lifetime = \"4s\"\nlifetime_jitter = 0.0\n", 4);
    let first = wait_for_within("postscreen's pid", WAIT, || inst.children_running("mortal-postscreen").pop())
        .expect("a postscreen process");
    let mut patient = connect_from(Ipv4Addr::new(127, 0, 0, 30), inst.port);
    let greeting = read_until(&mut patient, &format!("220 {GREETING}\r\n"));
    assert_eq!(greeting, format!("220-{GREETING}\r\n220 {GREETING}\r\n"));
    let mut smtp = mortal_tests::Smtp::over(patient);
    assert_eq!(smtp.cmd("QUIT").unwrap(), "221 2.0.0 Bye\r\n");
    inst.wait_for_log(&format!("postscreen[{first}]: PASS NEW [127.0.0.30]:"));
    inst.wait_for_log(&format!("postscreen[{first}]: exit: retired by master"));
    let cache = inst.spool().join("run/private/postscreen").join(format!("cache-127.0.0.1:{}", inst.port));
    let text = std::fs::read_to_string(&cache).unwrap_or_else(|e| panic!("{}: {e}", cache.display()));
    // (127.0.0.1 is in it too: the harness's start-up check passed it.)
    assert!(text.lines().any(|l| l.starts_with("127.0.0.30 ")), "{text}");

    // The successor: the whole greeting at once for the known client.
    let mut again = connect_from(Ipv4Addr::new(127, 0, 0, 30), inst.port);
    assert_eq!(read_until(&mut again, "\r\n"), format!("220 {GREETING}\r\n"));
    let log = inst.wait_for_log("PASS OLD [127.0.0.30]:");
    let successor = inst.children_running("mortal-postscreen");
    assert!(!successor.contains(&first), "{successor:?}");
    assert!(!log.contains(&format!("postscreen[{first}]: PASS OLD")), "{log}");
    let mut smtp = mortal_tests::Smtp::over(again);
    assert_eq!(smtp.cmd("QUIT").unwrap(), "221 2.0.0 Bye\r\n");
    // A client it never saw still waits.
    let mut stranger = connect_from(Ipv4Addr::new(127, 0, 0, 31), inst.port);
    assert_eq!(read_until(&mut stranger, "\r\n"), format!("220-{GREETING}\r\n"));
}

/// smtpd children forked from a zygote (`spawn = "fork"`, one session
/// each) behind postscreen: each takes its client through the hand-off
/// socket it inherited from the zygote, and the mail is delivered.
#[test]
fn forked_smtpd_children_take_clients_from_postscreen() {
    let opts = Options {
        smtpd_process_limit: 4,
        smtpd_prefork: 1,
        smtpd_min_spare: 1,
        smtpd_max_spare: 2,
        smtpd_max_use: 1,
        extra: "\n[postscreen]\nenabled = true\ngreet_wait = \"0s\"\n".into(),
        ..Options::default()
    };
    let inst = Instance::start_edited(opts, |text| {
        text.replacen("[process.smtpd]\n", "[process.smtpd]\nspawn = \"fork\"\n", 1)
    });
    for i in 0..3u8 {
        let mut client = connect_from(Ipv4Addr::new(127, 0, 0, 40 + i), inst.port);
        assert_eq!(read_until(&mut client, "\r\n"), format!("220 {GREETING}\r\n"));
        let mut smtp = mortal_tests::Smtp::over(client);
        let reply = smtp.mail("a@example.test", "forked@example.test", &format!("message {i}"));
        assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
        assert_eq!(smtp.cmd("QUIT").unwrap(), "221 2.0.0 Bye\r\n");
    }
    inst.wait_for_delivery("forked@example.test", 3);
    let smtpds = inst.logged_pids("smtpd");
    assert!(smtpds.len() >= 3, "one smtpd per session: {smtpds:?}");
    // The spare smtpd waiting now is a fork of the zygote (its command
    // line, and a filter the zygote does not have), not an exec fallback.
    let forked = |pid: &u32| {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        cmdline.split(|&b| b == 0).any(|a| a == b"--zygote") && status.contains("Seccomp:\t2")
    };
    let spare = wait_for_within("a forked spare smtpd", WAIT, || {
        inst.children_running("mortal-smtpd").into_iter().find(|pid| forked(pid))
    });
    assert!(spare.is_some(), "{:?}\n{}", inst.children_running("mortal-smtpd"), inst.log_text());
}

/// With `[smtpd.dnsbl] action = "drop"` postscreen asks the lists itself
/// (rbldnsd on loopback here) while the pregreet test runs: a listed
/// client hears 521 before it may talk and never reaches smtpd; an
/// allowlisted one is passed on with its score, and smtpd does not ask
/// the lists again.
#[test]
fn postscreen_drops_listed_clients_and_passes_the_score_on() {
    let lists = mortal_tests::rbldnsd::Rbldnsd::start(&[
        ("zen.example", &["127.0.0.2"]),
        ("wl.example", &["127.0.0.4 :127.0.9.2:allowlisted"]),
    ]);
    let inst = Instance::start_with(Options {
        smtpd_prefork: 1,
        smtpd_min_spare: 1,
        smtpd_max_spare: 2,
        smtpd_extra: format!("resolvers = [\"127.0.0.1:{}\"]\n", lists.port),
        extra: "\n[postscreen]\nenabled = true\ngreet_wait = \"1s\"\n\n[smtpd.dnsbl]\n\
                sites = [\"zen.example\", \"wl.example*-1\"]\naction = \"drop\"\n"
            .into(),
        ..Options::default()
    });
    let mut listed = connect_from(Ipv4Addr::new(127, 0, 0, 2), inst.port);
    let all = read_until(&mut listed, "zen.example\r\n");
    assert_eq!(
        all,
        format!("220-{GREETING}\r\n521 5.7.1 Service unavailable; client [127.0.0.2] blocked using zen.example\r\n")
    );
    assert!(closed(&mut listed));
    let log = inst.wait_for_log("DISCONNECT [127.0.0.2]:");
    assert!(log.contains("postscreen[") && log.contains("DNSBL rank 1 for [127.0.0.2]:"), "{log}");
    assert!(!log.contains("connect from unknown[127.0.0.2]"), "a listed client reached smtpd:\n{log}");

    let mut allowed = connect_from(Ipv4Addr::new(127, 0, 0, 4), inst.port);
    read_until(&mut allowed, &format!("220 {GREETING}\r\n"));
    let mut smtp = mortal_tests::Smtp::over(allowed);
    assert_eq!(smtp.cmd("HELO allowed.test").unwrap(), "250 mortal.test\r\n");
    assert_eq!(smtp.cmd("QUIT").unwrap(), "221 2.0.0 Bye\r\n");
    let log = inst.wait_for_log("disconnect from unknown[127.0.0.4]");
    let ranks: Vec<&str> = log.lines().filter(|l| l.contains("DNSBL rank -1 for [127.0.0.4]:")).collect();
    assert_eq!(ranks.len(), 1, "{ranks:?}");
    assert!(ranks[0].contains("postscreen["), "{ranks:?}");
}
