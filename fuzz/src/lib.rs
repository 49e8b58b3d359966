//! Entry points of the fuzz targets that exercise smtpd's engine.
//!
//! The proto decoders keep their entry points in `mortal_proto::fuzz`; the
//! engine's live here because the smtpd crate exposes its engine but no
//! fuzz module. The corpus replay test (`tests/fuzz_corpus.rs`) includes
//! this file by path, so a committed corpus file runs through exactly the
//! code the fuzzer ran.
//!
//! Each function takes arbitrary bytes, must never panic, and asserts the
//! invariants a hostile client must not be able to break.
#![forbid(unsafe_code)]

use mortal_proto::config::Config;
use mortal_proto::smtp_status::{EnhancedStatus, ReplyCode, StatusClass};
use mortal_proto::tls::TlsSummary;
use mortal_smtpd::engine::command;
use mortal_smtpd::engine::data::{DataReceiver, MAX_TEXT_LINE};
use mortal_smtpd::engine::line::{Line, LineReader, MAX_COMMAND_LINE};
use mortal_smtpd::engine::{Action, Answer, AuthAnswer, Session};
use mortal_smtpd::filter::verdict::{Decision, FilterReply, RefusedBy, Verdict};
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// Size limit for the DATA decoder target: small, so the fuzzer reaches
/// the `TooBig` path with short inputs.
const DATA_LIMIT: u64 = 4096;

/// Most actions one fuzz input may cause before the session target calls
/// it a livelock (each input octet yields at most a few).
const MAX_ACTIONS_PER_OCTET: usize = 8;

/// The text of the fake cleanup's final answer; only cleanup can make
/// smtpd say it.
const QUEUED: &str = "Ok: queued as 0000000000000000A001";

/// Splits the input into command lines and parses each one, as smtpd's
/// command phase does. No line may exceed [`MAX_COMMAND_LINE`], and the
/// reader must consume everything it is given once a line is complete.
pub fn smtp_command(data: &[u8]) {
    let mut reader = LineReader::default();
    let mut rest = data;
    while !rest.is_empty() {
        let (line, used) = reader.next(rest);
        assert!(used <= rest.len(), "line reader used more than it was given");
        if let Some(Line::Text(text)) = &line {
            assert!(text.len() + 2 <= MAX_COMMAND_LINE, "overlong line passed as text");
            assert!(!text.contains(&b'\n') && !text.contains(&b'\r'), "line ending inside a command line");
            if let Some(cmd) = std::str::from_utf8(text).ok().and_then(|s| command::parse(s).ok()) {
                // The name and the group rule must be defined for every command.
                let _ = (cmd.name(), cmd.ends_group());
            }
        }
        if used == 0 {
            break;
        }
        rest = &rest[used..];
    }
}

/// Decodes the input as DATA content twice, whole and split at an input-
/// derived point; both must agree (the decoder's result never depends on
/// packet boundaries), output never exceeds the limit, and no content
/// line is longer than RFC 5321 allows unless an error was recorded.
pub fn smtp_data(data: &[u8]) {
    let mut whole = DataReceiver::new(DATA_LIMIT);
    let mut out = Vec::new();
    let progress = whole.receive(data, &mut out);
    assert!(progress.consumed <= data.len());
    assert!(out.len() as u64 <= DATA_LIMIT, "content beyond the size limit");
    if progress.finished {
        assert!(data[..progress.consumed].ends_with(b"\r\n.\r\n") || data[..progress.consumed] == *b".\r\n");
    }
    if whole.error().is_none() {
        // Clean content is CRLF lines of at most 998 octets.
        for line in out.split(|&b| b == b'\n') {
            assert!(line.len() < MAX_TEXT_LINE, "line too long without an error");
        }
        assert!(!out.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'), "bare LF in clean content");
    }

    let cut = data.first().map_or(0, |&b| usize::from(b) % (data.len() + 1));
    let mut split = DataReceiver::new(DATA_LIMIT);
    let mut out2 = Vec::new();
    let first = split.receive(&data[..cut], &mut out2);
    let (consumed, finished) = if first.finished {
        (first.consumed, true)
    } else {
        let second = split.receive(&data[cut..], &mut out2);
        (cut + second.consumed, second.finished)
    };
    assert_eq!((consumed, finished), (progress.consumed, progress.finished), "split changes where DATA ends");
    assert_eq!(out2, out, "split changes the content");
    assert_eq!(split.error(), whole.error(), "split changes the verdict");
}

/// Runs a whole SMTP session on the input, as the driver would with a
/// cleanup that accepts everything and a milter that refuses every
/// fourth stage it is asked about (every ninth with 421): every reply is
/// complete CRLF lines with a 3-digit code, a 250 after DATA only follows
/// cleanup's answer, and the session ends in bounded work.
pub fn smtp_session(data: &[u8]) {
    let config = session_config();
    let mut session = Session::new(config, Default::default(), "127.0.0.1".parse().expect("literal address"));
    let budget = MAX_ACTIONS_PER_OCTET * (data.len() + 16);
    let mut actions = 0usize;
    let mut answers = 0u32;
    let mut queued_replies = 0u32;
    let mut checks = 0u32;
    // The first octet picks the packet size, so the fuzzer explores splits.
    let chunk = data.first().map_or(1, |&b| usize::from(b % 64) + 1);
    let mut pieces = data.chunks(chunk);
    loop {
        while let Some(action) = session.next_action() {
            actions += 1;
            assert!(actions <= budget, "session does unbounded work");
            match action {
                Action::Reply(text) => {
                    assert!(text.ends_with("\r\n"), "reply not CRLF-terminated: {text:?}");
                    for line in text.split_terminator("\r\n") {
                        queued_replies += u32::from(line.strip_prefix("250 2.0.0 ") == Some(QUEUED));
                        assert!(
                            line.len() >= 3 && line.as_bytes()[..3].iter().all(u8::is_ascii_digit),
                            "reply line without a code: {line:?}"
                        );
                    }
                }
                Action::StartTransaction { .. } => session.transaction_opened("0000000000000000A001".parse().unwrap()),
                Action::EndOfData => {
                    answers += 1;
                    let (code, status) = (ReplyCode::of(250), EnhancedStatus::undefined(StatusClass::Success));
                    session.cleanup_answer(Answer { code, status, text: QUEUED.into() });
                }
                // The handshake is the driver's; the engine only needs to
                // hear that it succeeded, so the session starts over.
                Action::StartTls => session.tls_established(TlsSummary::new(0x0304, "TLS13_AES_128_GCM_SHA256")),
                Action::Check(_) => {
                    checks += 1;
                    session.check_done(fuzz_verdict(checks));
                }
                // Dovecot's answers rotate: another round, a login, a
                // failure, a failure past the limit, no server.
                Action::AuthStart { .. } | Action::AuthContinue(_) => {
                    checks += 1;
                    session.auth_answer(fuzz_auth_answer(checks));
                }
                Action::AuthCancel => {}
                Action::Close => return,
                Action::Log(_)
                | Action::Recipient(_)
                | Action::Data(_)
                | Action::AbortTransaction
                | Action::Sleep(_) => {}
            }
        }
        assert!(queued_replies <= answers, "a queued reply without cleanup's answer");
        if session.is_closed() {
            return;
        }
        match pieces.next() {
            Some(piece) => session.feed(piece),
            None => {
                session.connection_lost();
                // Drain what losing the connection produced, then stop.
                while session.next_action().is_some() {}
                return;
            }
        }
    }
}

/// The scripted filter's verdict on its `n`th question.
fn fuzz_verdict(n: u32) -> Verdict {
    let reply = |code: u16, class: StatusClass, detail: u16| FilterReply {
        code: ReplyCode::of(code),
        status: EnhancedStatus::new(class, 7, detail),
        lines: vec!["refused".into(), "by the fuzz milter".into()],
    };
    let decision = match n {
        n if n % 9 == 0 => Decision::Refuse { reply: reply(421, StatusClass::Persistent, 0), by: RefusedBy::Milter },
        n if n % 4 == 0 => Decision::Refuse { reply: reply(550, StatusClass::Permanent, 1), by: RefusedBy::Milter },
        _ => Decision::Continue,
    };
    Verdict { decision, notes: Vec::new() }
}

/// Parsed once: parsing TOML on every input would dominate the run.
fn fuzz_auth_answer(n: u32) -> AuthAnswer {
    match n % 6 {
        0 => AuthAnswer::Challenge("VXNlcm5hbWU6".into()),
        1 => AuthAnswer::Success { username: "alice".into() },
        2 => AuthAnswer::Failure { reason: Some("Authentication failed".into()), over_limit: None },
        3 => AuthAnswer::Failure { reason: None, over_limit: Some(10) },
        4 => AuthAnswer::Blocked(11),
        _ => AuthAnswer::Unavailable,
    }
}

fn session_config() -> Arc<Config> {
    static CONFIG: OnceLock<Arc<Config>> = OnceLock::new();
    CONFIG.get_or_init(parse_session_config).clone()
}

fn parse_session_config() -> Arc<Config> {
    const TEXT: &str = r#"
[server]
hostname = "mortal.test"
accepted_domains = ["example.test"]
[smtpd]
listen = ["127.0.0.1:2525"]
message_size_limit = 4096
recipient_limit = 10
hard_error_limit = 20
tls_cert_file = "/fuzz/cert.pem"
tls_key_file = "/fuzz/key.pem"
[smtpd.auth]
server = "inet:127.0.0.1:12345"
mx = true
[[smtpd.milter]]
endpoint = "inet:127.0.0.1:11332"
"#;
    Arc::new(Config::parse(TEXT, Path::new("/fuzz/mortal.toml")).expect("fuzz session config is valid"))
}

/// Decodes the input as the chunks of one BDAT transaction, whole and
/// split at an input-derived point, in text mode (with `normalize` taken
/// from the first octet): both splits must agree, since a chunk boundary
/// may fall anywhere, even inside a `<CR><LF>`; clean output is CRLF lines
/// of at most 998 octets with no bare line ending.
pub fn smtp_bdat(data: &[u8]) {
    use mortal_smtpd::engine::bdat::{ChunkDecoder, ChunkPolicy};
    let policy = ChunkPolicy::Text { normalize: data.first().is_some_and(|b| b & 1 == 1) };
    let mut whole = ChunkDecoder::new(policy);
    let mut out = Vec::new();
    whole.decode(data, &mut out);
    let error = whole.finish();

    let cut = data.get(1).map_or(0, |&b| usize::from(b) % (data.len() + 1));
    let mut split = ChunkDecoder::new(policy);
    let mut out2 = Vec::new();
    split.decode(&data[..cut], &mut out2);
    split.decode(&data[cut..], &mut out2);
    assert_eq!(split.finish(), error, "chunk boundary changed the verdict");
    if error.is_none() {
        assert_eq!(out, out2, "chunk boundary changed the content");
        for line in out.split(|&b| b == b'\n') {
            assert!(line.len() < MAX_TEXT_LINE, "line too long without an error");
        }
        assert!(!out.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'), "bare LF in clean content");
        assert!(!out.windows(2).any(|w| w[0] == b'\r' && w[1] != b'\n'), "bare CR in clean content");
    }
}

/// Parses the input as a PROXY header. A header found must say how many
/// octets it used (at least one, no more than given), and parsing exactly
/// those octets must give the same header: the parser never depends on
/// bytes after the header, which belong to the SMTP session.
pub fn proxy_header(data: &[u8]) {
    use mortal_smtpd::proxy;
    if let Ok(Some((header, used))) = proxy::parse(data) {
        assert!(used > 0 && used <= data.len(), "header length {used} of {} octets", data.len());
        assert_eq!(proxy::parse(&data[..used]), Ok(Some((header, used))), "header depends on what follows it");
    }
}
