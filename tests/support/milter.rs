//! A scripted milter on a loopback port, written with mortal's own codec
//! (`mortal_proto::milter`), for what a real milter will not do on
//! demand: hang, stall, send garbage, hang up, keep a message alive with
//! SMFIR_PROGRESS. It negotiates every action and every event (it answers
//! each), records what it was sent, and decides by the first recipient's
//! local part of the message (the table below); the live milters (pymilter,
//! rspamd, OpenDKIM) are in `support::filters`.
//!
//! | local part | what it does |
//! |---|---|
//! | `reject` | SMFIR_REJECT to that RCPT |
//! | `tempfail` | SMFIR_TEMPFAIL to that RCPT |
//! | `custom` | SMFIR_REPLYCODE `550 5.7.1` on two lines to that RCPT |
//! | `shutdown` | SMFIR_SHUTDOWN to that RCPT |
//! | `hangup` | closes the connection instead of answering that RCPT |
//! | `eomreject` | SMFIR_REJECT at the end of the message |
//! | `garbage` | octets that are no packet at the end of the message |
//! | `slow` | nothing at the end of the message for [`SLOW`] |
//! | `progress` | SMFIR_PROGRESS every 300 ms for [`PROGRESS_FOR`], then CONTINUE |
//! | `discard` | SMFIR_DISCARD at the end of the message |
//! | `quarantine` | SMFIR_QUARANTINE `held by the test`, then CONTINUE |
//! | `edits` | adds `X-Scripted: yes` and inserts `X-First: 1` at 0, then CONTINUE |
//! | anything else | CONTINUE to everything |

use mortal_proto::milter::{
    Actions, Command, CustomReply, Decoder, HeaderName, HeaderValue, MilterOptions, Modification, Reply,
};
use mortal_proto::smtp_status::{EnhancedStatus, ReplyCode, StatusClass};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long `slow` keeps quiet: longer than any content timeout a test sets.
pub const SLOW: Duration = Duration::from_secs(5);
/// How long `progress` keeps the message alive.
pub const PROGRESS_FOR: Duration = Duration::from_millis(1500);
const PROGRESS_EVERY: Duration = Duration::from_millis(300);
/// Longest any connection is served.
const MAX_LIFE: Duration = Duration::from_secs(60);

/// A running scripted milter; stops its accept loop on drop.
#[derive(Debug)]
pub struct ScriptedMilter {
    port: u16,
    /// Every command received, by name (`SMFIC_RCPT`...), with its
    /// details, in order: one list per connection, in the order accepted.
    seen: Arc<Mutex<Vec<Vec<String>>>>,
    connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ScriptedMilter {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind milter");
        let port = listener.local_addr().expect("local addr").port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, c, st) = (Arc::clone(&seen), Arc::clone(&connections), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                c.fetch_add(1, Ordering::SeqCst);
                let s = Arc::clone(&s);
                let index = {
                    let mut all = s.lock().expect("seen");
                    all.push(Vec::new());
                    all.len() - 1
                };
                std::thread::spawn(move || serve(stream, &s, index));
            }
        });
        Self { port, seen, connections, stop, thread: Some(thread) }
    }

    /// `inet:127.0.0.1:PORT`, for `[[smtpd.milter]] endpoint`.
    pub fn endpoint(&self) -> String {
        format!("inet:127.0.0.1:{}", self.port)
    }

    /// What it was sent so far, one list per connection.
    pub fn seen(&self) -> Vec<Vec<String>> {
        self.seen.lock().expect("seen").clone()
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for ScriptedMilter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn send(stream: &mut TcpStream, replies: &[Reply]) -> bool {
    let mut out = Vec::new();
    for r in replies {
        r.encode(&mut out);
    }
    stream.write_all(&out).is_ok()
}

fn serve(mut stream: TcpStream, all: &Mutex<Vec<Vec<String>>>, index: usize) {
    let record = |what: String| all.lock().expect("seen")[index].push(what);
    let _ = stream.set_read_timeout(Some(MAX_LIFE));
    let mut decoder = Decoder::new();
    let mut buf = [0u8; 65536];
    // The behaviour of the current message: the first recipient's local part.
    let mut mode = String::new();
    let mut negotiated = false;
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        decoder.feed(&buf[..n]);
        loop {
            let command = match decoder.next_command() {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    record(format!("bad command: {e}"));
                    return;
                }
            };
            record(describe(&command));
            let replies: Vec<Reply> = match command {
                Command::OptNeg(offer) => {
                    negotiated = true;
                    let options = MilterOptions {
                        version: offer.version.min(6),
                        actions: (Actions::ALL.difference(Actions::SETSYMLIST)).bits() & offer.actions.bits(),
                        steps: 0,
                        macro_lists: Vec::new(),
                    };
                    let mut out = Vec::new();
                    options.encode(&mut out);
                    if stream.write_all(&out).is_err() {
                        return;
                    }
                    continue;
                }
                _ if !negotiated => return,
                Command::Macro { .. } => continue,
                Command::Abort => {
                    mode.clear();
                    continue;
                }
                Command::Quit | Command::QuitNewConnection => return,
                Command::Rcpt(args) => {
                    let local =
                        args.address.as_str().trim_matches(['<', '>']).split('@').next().unwrap_or("").to_owned();
                    match local.as_str() {
                        "reject" => vec![Reply::Reject],
                        "tempfail" => vec![Reply::Tempfail],
                        "shutdown" => vec![Reply::Shutdown],
                        "custom" => {
                            let status = EnhancedStatus::new(StatusClass::Permanent, 7, 1);
                            let lines = vec!["first line".to_owned(), "second line".to_owned()];
                            let custom = CustomReply::new(ReplyCode::of(550), Some(status), lines).expect("valid");
                            vec![Reply::ReplyCode(custom)]
                        }
                        "hangup" => return,
                        _ => {
                            if mode.is_empty() {
                                mode = local;
                            }
                            vec![Reply::Continue]
                        }
                    }
                }
                Command::EndOfMessage => {
                    let m = std::mem::take(&mut mode);
                    match m.as_str() {
                        "eomreject" => vec![Reply::Reject],
                        "discard" => vec![Reply::Discard],
                        "quarantine" => vec![Reply::Quarantine("held by the test".into()), Reply::Continue],
                        "edits" => vec![
                            Reply::Modify(Modification::AddHeader {
                                name: HeaderName::new("X-Scripted").expect("name"),
                                value: HeaderValue::new(b"yes").expect("value"),
                            }),
                            Reply::Modify(Modification::InsertHeader {
                                index: 0,
                                name: HeaderName::new("X-First").expect("name"),
                                value: HeaderValue::new(b"1").expect("value"),
                            }),
                            Reply::Continue,
                        ],
                        "garbage" => {
                            let _ = stream.write_all(b"\x00\x00\x00\x00garbage");
                            return;
                        }
                        "slow" => {
                            std::thread::sleep(SLOW);
                            vec![Reply::Continue]
                        }
                        "progress" => {
                            let until = Instant::now() + PROGRESS_FOR;
                            while Instant::now() < until {
                                if !send(&mut stream, &[Reply::Progress]) {
                                    return;
                                }
                                std::thread::sleep(PROGRESS_EVERY);
                            }
                            vec![Reply::Continue]
                        }
                        _ => vec![Reply::Continue],
                    }
                }
                _ => vec![Reply::Continue],
            };
            if !send(&mut stream, &replies) {
                return;
            }
        }
    }
}

/// A command as the tests match it.
fn describe(command: &Command) -> String {
    match command {
        Command::Connect(c) => format!("CONNECT {} {:?}", c.hostname, c.address),
        Command::Helo(name) => format!("HELO {name}"),
        Command::Mail(a) => format!("MAIL {} {}", a.address, a.params.join(" ")),
        Command::Rcpt(a) => format!("RCPT {} {}", a.address, a.params.join(" ")),
        Command::Header { name, value } => format!("HEADER {name}: {}", String::from_utf8_lossy(value.as_bytes())),
        Command::Body(chunk) => format!("BODY {}", String::from_utf8_lossy(chunk)),
        Command::Macro { stage, macros } => {
            let pairs: Vec<String> = macros.iter().map(|(n, v)| format!("{}={v}", n.as_str())).collect();
            format!("MACRO {stage:?} {}", pairs.join(" "))
        }
        Command::Unknown(line) => format!("UNKNOWN {line}"),
        other => other.name().to_owned(),
    }
}
