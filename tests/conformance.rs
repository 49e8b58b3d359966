//! The conformance and abuse suite (issue 7): raw SMTP against a running
//! mortal, counting what arrives at the delivery sink (the Maildir).
//!
//! - SMTP smuggling (CVE-2023-51764 class): every fake end-of-data
//!   variant with a second transaction hidden behind it; the hidden
//!   transaction must never become a message.
//! - 150 parallel connections against `process_limit = 20`: each gets a
//!   220 greeting (or a clean 421 and a close) within a bound, and the
//!   server answers afterwards.
//! - 50 slowloris connections holding children while a fresh client still
//!   gets its greeting within 2 s.
//! - A 100 KB line without CRLF, NUL octets, and 8-bit bodies delivered
//!   byte for byte.

use mortal_tests::{Instance, Options, Smtp, body_of, wait_for};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// A fresh client must be greeted this fast even under slowloris.
const GREETING_BOUND: Duration = Duration::from_secs(2);

/// Longest any of the 150 parallel clients may wait for its greeting.
const FLOOD_BOUND: Duration = Duration::from_secs(30);

/// How long each flooding client keeps its session before QUIT, so that
/// more sessions want service than `process_limit` allows.
const FLOOD_HOLD: Duration = Duration::from_millis(200);

/// Sends a complete transaction and returns the reply to the content.
fn send_message(s: &mut Smtp, from: &str, to: &str, content: &[u8]) -> String {
    assert!(s.cmd(&format!("MAIL FROM:<{from}>")).unwrap().starts_with("250"));
    assert!(s.cmd(&format!("RCPT TO:<{to}>")).unwrap().starts_with("250"));
    assert!(s.cmd("DATA").unwrap().starts_with("354"));
    s.send_raw(content).unwrap();
    s.read_reply().unwrap()
}

fn ehlo(port: u16) -> Smtp {
    let mut s = Smtp::connect(port).expect("connect");
    assert!(s.greeting.starts_with("220 "), "{}", s.greeting);
    assert!(s.cmd("EHLO client.test").unwrap().starts_with("250"));
    s
}

/// The server still serves: a whole message to `control@` is delivered.
fn still_serves(mortal: &Instance, n: usize) {
    let mut s = ehlo(mortal.port);
    let reply = send_message(&mut s, "a@example.test", "control@example.test", b"Subject: control\r\n\r\nok\r\n.\r\n");
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    let _ = s.cmd("QUIT");
    mortal.wait_for_delivery("control@example.test", n);
}

/// The reply to content with a bare `<LF>` under the default
/// `bare_newline = "reject"`.
const BARE_LF: &str = "550 5.5.2 Error: bare <LF> received\r\n";
/// The reply to content with a bare `<CR>` (refused in every mode).
const BARE_CR: &str = "550 5.5.2 Error: bare <CR> received\r\n";
/// The reply that queues a message; its queue id follows.
const QUEUED: &str = "250 2.0.0 Ok: queued as ";

/// Every fake terminator of the smuggling class, each hiding a second
/// transaction for `victimN@`. RFC 5321 4.1.1.4: only `<CR><LF>.<CR><LF>`
/// ends DATA.
#[test]
fn smtp_smuggling_never_yields_a_second_message() {
    let mortal = Instance::start();
    // Each fake and the reply the test config (`bare_newline` left at
    // "reject") fixes for it: the first bare line ending refuses the
    // message. The last fake has none (NUL is content), so the whole
    // thing is one message holding the fake.
    let fakes: [(&[u8], &str); 8] = [
        (b"\n.\n", BARE_LF),
        (b"\r.\r", BARE_CR),
        (b"\n.\r\n", BARE_LF),
        // `<CR><LF>.<LF>`: the dot starts a line, the `<LF>` after it is bare.
        (b"\r\n.\n", BARE_LF),
        (b"\r\n.\r", BARE_CR),
        (b"\r.\r\n", BARE_CR),
        (b"\r\n.\r\r\n", BARE_CR),
        (b"\r\n\x00.\r\n", QUEUED),
    ];
    for (i, (fake, expected)) in fakes.iter().enumerate() {
        let mut s = ehlo(mortal.port);
        let content = [
            format!("Subject: real {i}\r\n\r\nbody").as_bytes(),
            fake,
            format!("MAIL FROM:<admin@example.test>\r\nRCPT TO:<victim{i}@example.test>\r\nDATA\r\n").as_bytes(),
            format!("Subject: forged {i}\r\n\r\nforged\r\n.\r\n").as_bytes(),
        ]
        .concat();
        let reply = send_message(&mut s, "alice@example.test", &format!("rcpt{i}@example.test"), &content);
        // One reply for the whole thing, after the real terminator.
        if *expected == QUEUED {
            assert!(reply.starts_with(QUEUED), "variant {i}: {reply}");
        } else {
            assert_eq!(reply, *expected, "variant {i}");
        }
        // The session is in sync: the next command gets its own reply.
        let noop = s.cmd("NOOP").unwrap();
        assert!(noop.starts_with("250"), "variant {i}: after the content, NOOP got {noop}");
        let _ = s.cmd("QUIT");
    }
    still_serves(&mortal, 1);
    mortal.wait_for_empty_queue();
    for (i, (_, expected)) in fakes.iter().enumerate() {
        assert!(mortal.delivered(&format!("victim{i}@example.test")).is_empty(), "variant {i}: smuggled message");
        let got = mortal.delivered(&format!("rcpt{i}@example.test"));
        if *expected == QUEUED {
            assert_eq!(got.len(), 1, "variant {i}: {} messages", got.len());
            let text = String::from_utf8_lossy(&got[0]);
            assert!(text.contains(&format!("forged {i}")), "variant {i}: accepted but cut short: {text}");
        } else {
            assert!(got.is_empty(), "variant {i}: refused, yet {} delivered", got.len());
        }
    }
}

#[derive(Debug)]
enum FloodOutcome {
    Greeted,
    Refused421,
}

/// One flooding client: reads the greeting within [`FLOOD_BOUND`].
fn flood_client(port: u16) -> Result<FloodOutcome, String> {
    let start = Instant::now();
    let stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(FLOOD_BOUND)).unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).map_err(|e| format!("no greeting after {:?}: {e}", start.elapsed()))?;
    if line.starts_with("421 ") {
        // A clean 421 is followed by the server closing the connection.
        let mut rest = Vec::new();
        let _ = reader.read_to_end(&mut rest);
        return Ok(FloodOutcome::Refused421);
    }
    if !line.starts_with("220 ") {
        return Err(format!("greeting {line:?}"));
    }
    std::thread::sleep(FLOOD_HOLD);
    reader.get_mut().write_all(b"QUIT\r\n").map_err(|e| format!("QUIT: {e}"))?;
    line.clear();
    reader.read_line(&mut line).map_err(|e| format!("QUIT reply: {e}"))?;
    if !line.starts_with("221 ") {
        return Err(format!("QUIT reply {line:?}"));
    }
    Ok(FloodOutcome::Greeted)
}

#[test]
fn parallel_connections_get_greeting_or_clean_421() {
    let mortal = Instance::start_with(Options {
        smtpd_process_limit: 20,
        smtpd_prefork: 5,
        smtpd_min_spare: 2,
        smtpd_max_spare: 20,
        ..Options::default()
    });
    let port = mortal.port;
    let clients: Vec<_> = (0..150).map(|_| std::thread::spawn(move || flood_client(port))).collect();
    // The pool never grows past process_limit while the flood lasts.
    let mut most = 0;
    while clients.iter().any(|c| !c.is_finished()) {
        most = most.max(smtpd_children(&mortal));
        std::thread::sleep(Duration::from_millis(20));
    }
    let outcomes: Vec<Result<FloodOutcome, String>> =
        clients.into_iter().map(|c| c.join().expect("client thread")).collect();
    let failures: Vec<&String> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert!(failures.is_empty(), "{} of 150 clients failed: {failures:?}\n{}", failures.len(), mortal.log_text());
    let greeted = outcomes.iter().filter(|o| matches!(o, Ok(FloodOutcome::Greeted))).count();
    assert!(greeted > 0, "nobody was served");
    assert!(most <= 20, "process_limit 20 exceeded: {most} smtpd children");
    still_serves(&mortal, 1);
}

/// smtpd children of the master right now.
fn smtpd_children(mortal: &Instance) -> usize {
    mortal.children_running("mortal-smtpd").len()
}

/// A client that sends one octet of `EHLO` every so often and never
/// finishes a line: it holds a child for as long as the timeout allows.
fn slowloris(port: u16, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Result<(), String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(FLOOD_BOUND)).unwrap();
    let mut greeting = [0u8; 4];
    stream.read_exact(&mut greeting).map_err(|e| format!("greeting: {e}"))?;
    let mut i = 0usize;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) && i < 200 {
        let _ = stream.write_all(&[b"EHLO slow.test"[i % 14]]);
        i += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

#[test]
fn slowloris_does_not_starve_a_fresh_client() {
    let mortal = Instance::start_with(Options {
        smtpd_process_limit: 80,
        smtpd_prefork: 5,
        smtpd_min_spare: 5,
        smtpd_max_spare: 20,
        ..Options::default()
    });
    let port = mortal.port;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loris: Vec<_> = (0..50)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || slowloris(port, stop))
        })
        .collect();
    // Let the 50 connections take their children and the pool refill.
    let busy = wait_for("50 busy smtpd children", || (smtpd_children(&mortal) >= 50).then_some(()));
    assert!(busy.is_some(), "smtpd children: {}", smtpd_children(&mortal));
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        let start = Instant::now();
        let mut s = Smtp::connect(port).expect("fresh client connects");
        let took = start.elapsed();
        worst = worst.max(took);
        assert!(s.greeting.starts_with("220 "), "{}", s.greeting);
        assert!(s.cmd("QUIT").unwrap().starts_with("221"));
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in loris {
        l.join().expect("slowloris thread").expect("slowloris client was greeted");
    }
    assert!(worst <= GREETING_BOUND, "fresh client waited {worst:?} for its greeting under slowloris");
}

#[test]
fn hundred_kilobyte_line_is_refused_cleanly() {
    let mortal = Instance::start();
    let mut s = ehlo(mortal.port);
    s.send_raw(&vec![b'A'; 100 * 1024]).unwrap();
    s.send_raw(b"\r\n").unwrap();
    // smtpd discards an overlong command line as it arrives and answers
    // its end; the session goes on.
    assert_eq!(s.read_reply().unwrap(), "500 5.5.2 Error: line too long\r\n", "100 KB command line");
    assert_eq!(s.cmd("NOOP").unwrap(), "250 2.0.0 Ok\r\n", "after the long line");
    // The same line inside a message refuses the message, never delivers
    // it cut or split.
    let mut s = ehlo(mortal.port);
    let content = [b"Subject: long\r\n\r\n".to_vec(), vec![b'B'; 100 * 1024], b"\r\n.\r\n".to_vec()].concat();
    let reply = send_message(&mut s, "a@example.test", "long@example.test", &content);
    assert_eq!(reply, "550 5.5.2 Error: text line too long\r\n", "100 KB text line");
    let _ = s.cmd("QUIT");
    still_serves(&mortal, 1);
    mortal.wait_for_empty_queue();
    assert!(mortal.delivered("long@example.test").is_empty());
}

#[test]
fn nul_octets_never_break_the_session() {
    let mortal = Instance::start();
    let mut s = ehlo(mortal.port);
    // The verb is `NOOP<NUL>`, which names no command.
    s.send_raw(b"NOOP\x00\r\n").unwrap();
    assert_eq!(s.read_reply().unwrap(), "500 5.5.2 Error: command not recognized\r\n", "NOOP with NUL");
    s.send_raw(b"MAIL FROM:<a\x00b@example.test>\r\n").unwrap();
    let reply = s.read_reply().unwrap();
    assert_eq!(reply, "501 5.1.7 Bad sender address syntax\r\n", "a NUL inside an address must be refused");
    // In content a NUL is an octet like any other: kept as sent.
    let content = b"Subject: nul\r\n\r\nbefore\x00after\r\n.\r\n";
    let reply = send_message(&mut s, "a@example.test", "nul@example.test", content);
    assert!(reply.starts_with(QUEUED), "{reply}");
    assert_eq!(s.cmd("NOOP").unwrap(), "250 2.0.0 Ok\r\n");
    let _ = s.cmd("QUIT");
    let got = mortal.wait_for_delivery("nul@example.test", 1);
    assert_eq!(body_of(&got[0]), b"before\x00after\n", "a NUL accepted must be kept as sent");
    still_serves(&mortal, 1);
}

#[test]
fn eight_bit_body_is_delivered_byte_for_byte() {
    let mortal = Instance::start();
    // Every octet but CR and LF, in lines of 64; dots lead some lines.
    let octets: Vec<u8> = (0..=255u8).filter(|b| *b != b'\r' && *b != b'\n').collect();
    let mut body = Vec::new();
    for (n, line) in octets.chunks(64).cycle().take(40).enumerate() {
        if n % 7 == 0 {
            body.push(b'.');
        }
        body.extend_from_slice(line);
        body.push(b'\n');
    }
    let mut wire = b"Subject: 8bit\r\nContent-Transfer-Encoding: 8bit\r\n\r\n".to_vec();
    for line in body.split_inclusive(|&b| b == b'\n') {
        let text = &line[..line.len() - 1];
        if text.first() == Some(&b'.') {
            wire.push(b'.');
        }
        wire.extend_from_slice(text);
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b".\r\n");
    let mut s = ehlo(mortal.port);
    assert!(s.cmd("MAIL FROM:<a@example.test> BODY=8BITMIME").unwrap().starts_with("250"));
    assert!(s.cmd("RCPT TO:<eight@example.test>").unwrap().starts_with("250"));
    assert!(s.cmd("DATA").unwrap().starts_with("354"));
    s.send_raw(&wire).unwrap();
    let reply = s.read_reply().unwrap();
    assert!(reply.starts_with("250 2.0.0 "), "{reply}");
    let _ = s.cmd("QUIT");
    let got = mortal.wait_for_delivery("eight@example.test", 1);
    assert_eq!(body_of(&got[0]), &body[..], "8-bit body changed on the way");
}
