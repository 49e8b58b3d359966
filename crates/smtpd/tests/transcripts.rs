//! Golden SMTP transcripts for the engine: `tests/transcripts/*.smtp`.
//!
//! A transcript is a script of client input and the exact output the
//! session must produce, interleaved. The runner replays the input
//! lines, renders what the session did after each, and compares the whole
//! file. Set `MORTAL_BLESS=1` to rewrite the files from the current
//! behaviour (then read the diff: blessing is a review, not a fix).
//!
//! Input and setup lines (kept verbatim):
//!
//! | line | meaning |
//! |---|---|
//! | `# ...` | comment |
//! | `%set KEY VALUE` | config before the session starts: `message_size_limit`, `recipient_limit`, `hard_error_limit`, `accepted_domains` (comma list), `banner`, `soft_error_limit`, `error_sleep`, `bare_newline`, `smtputf8`, `chunking`, `dsn`, `tls` (`on`: a certificate is configured), `policy` (comma list of stages a policy server is asked at), `milter` (`on`: a milter, which is asked at every stage) |
//! | `%verdict continue\|policy REPLY\|milter REPLY` | the filters' answer to the next `E: check` (default: continue); REPLY is `code status text`, lines joined by `\|`; `%note WORD TEXT` adds a log note to it |
//! | `%peer ADDR` | client address (default 127.0.0.1) |
//! | `%cleanup mail\|data ANSWER` | cleanup's next answer to MAIL (instead of a queue id) or to End; `fail` for a broken conversation |
//! | `%cleanup now fail` | the cleanup conversation breaks right now |
//! | `%tls ok INFO`, `%tls fail REASON` | the TLS handshake after `E: starttls` succeeded (negotiating INFO) or failed |
//! | `%set role mx\|submission\|submissions` | the listener's role (AUTH through a Dovecot at `inet:127.0.0.1:12345`, which `%set auth on` offers on `mx` too); `submissions` has TLS from the start, with [`IMPLICIT_TLS`] |
//! | `%auth challenge B64\|ok USER\|fail [REASON]\|limit N [REASON]\|blocked N\|unavailable` | the authentication server's answer to the next `E: auth-start` or `E: auth-continue` |
//! | `%early BYTES` | input that arrived before the greeting |
//! | `%timeout`, `%lost` | the driver's read timed out, the client went away |
//! | `%new` | finish this session; the next input starts another |
//! | `C: TEXT` | client sends TEXT and `<CR><LF>`, in one packet |
//! | `C\| BYTES` | client sends BYTES, no `<CR><LF>` added, in one packet |
//!
//! BYTES and TEXT take the escapes `\r`, `\n`, `\t`, `\\`, `\xHH` and
//! `\{c*N}` (the character c, N times). Output lines are `S:` (reply
//! lines), `L:` (log lines) and `E:` (driver events: `start`, `rcpt`,
//! `data`, `end`, `abort` for cleanup, `starttls`, `auth-start`,
//! `auth-continue`, `auth-cancel`, `sleep`, `close`).
//! DSN parameters, SMTPUTF8 and TLS show on `start` and `rcpt` only when
//! set.

use mortal_proto::config::{BareNewline, Config, ListenerRole};
use mortal_proto::config::{FilterStage, Milter, MilterDefaultAction, NextHop, PolicyService};
use mortal_proto::smtp_status::ReplyCode;
use mortal_smtpd::engine::{Action, Answer, AuthAnswer, Session, Subject};
use mortal_smtpd::filter::verdict::{Decision, FilterReply, Note, RefusedBy, Verdict};
use std::collections::VecDeque;
use std::fmt::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

const BASE_CONFIG: &str = r#"
[server]
hostname = "mortal.test"
accepted_domains = ["example.test", "sub.example.test"]

[smtpd]
banner = "ESMTP mortal"
message_size_limit = 10240000
recipient_limit = 1000
hard_error_limit = 20
"#;

/// What a `submissions` session negotiated before its greeting.
const IMPLICIT_TLS: &str = "TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384 (256/256 bits)";

/// What the fake cleanup does at the next step of each kind.
#[derive(Default)]
struct FakeCleanup {
    mail: VecDeque<Option<Answer>>,
    data: VecDeque<Option<Answer>>,
    queued: u32,
}

struct Runner {
    config: Config,
    peer: IpAddr,
    session: Option<Session>,
    cleanup: FakeCleanup,
    /// The filters' scripted verdicts, in order.
    verdicts: VecDeque<Verdict>,
    /// Notes for the next scripted verdict.
    notes: Vec<Note>,
    /// The listener's role.
    role: ListenerRole,
    /// The authentication server's scripted answers, in order.
    auth: VecDeque<AuthAnswer>,
    out: String,
}

impl Runner {
    fn new() -> Self {
        Runner {
            config: Config::parse(BASE_CONFIG, Path::new("/transcripts/mortal.toml")).expect("base config"),
            peer: "127.0.0.1".parse().expect("literal"),
            session: None,
            cleanup: FakeCleanup::default(),
            verdicts: VecDeque::new(),
            notes: Vec::new(),
            role: ListenerRole::Mx,
            auth: VecDeque::new(),
            out: String::new(),
        }
    }

    fn line(&mut self, line: &str) {
        // Input needs a session; starting it first puts the greeting above
        // the first input line, where a reader expects it.
        let acts = ["C: ", "C| ", "%early", "%timeout", "%lost", "%cleanup now", "%tls"];
        if acts.iter().any(|p| line.starts_with(p)) {
            self.session();
        }
        let _ = writeln!(self.out, "{line}");
        if line.starts_with('#') || line.trim().is_empty() {
            return;
        }
        if let Some(rest) = line.strip_prefix('%') {
            return self.directive(rest);
        }
        let (input, crlf) = match (line.strip_prefix("C: "), line.strip_prefix("C| ")) {
            (Some(text), _) => (text, true),
            (_, Some(bytes)) => (bytes, false),
            _ => panic!("unknown transcript line {line:?}"),
        };
        let mut bytes = unescape(input);
        if crlf {
            bytes.extend_from_slice(b"\r\n");
        }
        self.session().feed(&bytes);
        self.render();
    }

    fn directive(&mut self, d: &str) {
        let (word, arg) = d.split_once(' ').unwrap_or((d, ""));
        match word {
            "set" => self.set(arg),
            "peer" => self.peer = arg.parse().expect("%peer address"),
            "cleanup" => {
                let (step, answer) = arg.split_once(' ').expect("%cleanup STEP ANSWER");
                let answer = (answer != "fail").then(|| parse_answer(answer));
                match step {
                    "mail" => self.cleanup.mail.push_back(answer),
                    "data" => self.cleanup.data.push_back(answer),
                    "now" => {
                        self.session().cleanup_failed();
                        self.render();
                    }
                    other => panic!("unknown %cleanup step {other}"),
                }
            }
            "early" => {
                self.session().early_input(&unescape(arg));
                self.render();
            }
            "timeout" => {
                self.session().timed_out();
                self.render();
            }
            "lost" => {
                self.session().connection_lost();
                self.render();
            }
            "new" => self.finish(),
            "tls" => {
                let (outcome, text) = arg.split_once(' ').expect("%tls ok|fail TEXT");
                match outcome {
                    "ok" => self.session().tls_established(text.parse().expect("%tls ok TLSvX with cipher ...")),
                    "fail" => self.session().tls_failed(text),
                    other => panic!("unknown %tls outcome {other}"),
                }
                self.render();
            }
            "note" => {
                let (word, text) = arg.split_once(' ').expect("%note WORD TEXT");
                let word: &'static str = match word {
                    "warn" => "warn",
                    "info" => "info",
                    "hold" => "hold",
                    "discard" => "discard",
                    "milter-hold" => "milter-hold",
                    "milter-discard" => "milter-discard",
                    other => panic!("unknown %note word {other}"),
                };
                self.notes.push(Note { word, text: text.to_owned() });
            }
            "verdict" => {
                let (who, reply) = arg.split_once(' ').unwrap_or((arg, ""));
                let decision = match who {
                    "continue" => Decision::Continue,
                    "policy" => Decision::Refuse { reply: parse_filter_reply(reply), by: RefusedBy::Policy },
                    "milter" => Decision::Refuse { reply: parse_filter_reply(reply), by: RefusedBy::Milter },
                    other => panic!("unknown %verdict {other}"),
                };
                self.verdicts.push_back(Verdict { decision, notes: std::mem::take(&mut self.notes) });
            }
            "auth" => {
                let (kind, rest) = arg.split_once(' ').unwrap_or((arg, ""));
                let reason = |r: &str| (!r.is_empty()).then(|| String::from_utf8_lossy(&unescape(r)).into_owned());
                self.auth.push_back(match kind {
                    "challenge" => AuthAnswer::Challenge(rest.to_owned()),
                    "ok" => AuthAnswer::Success { username: rest.to_owned() },
                    "fail" => AuthAnswer::Failure { reason: reason(rest), over_limit: None },
                    "limit" => {
                        let (count, r) = rest.split_once(' ').unwrap_or((rest, ""));
                        AuthAnswer::Failure { reason: reason(r), over_limit: Some(count.parse().expect("count")) }
                    }
                    "unavailable" => AuthAnswer::Unavailable,
                    "blocked" => AuthAnswer::Blocked(rest.parse().expect("count")),
                    other => panic!("unknown %auth answer {other}"),
                });
            }
            other => panic!("unknown directive %{other}"),
        }
    }

    /// The scripted answer to an AUTH step.
    fn answer_auth(&mut self) {
        let answer = self.auth.pop_front().expect("a %auth answer for this AUTH step");
        self.session.as_mut().expect("session").auth_answer(answer);
    }

    fn set(&mut self, arg: &str) {
        assert!(self.session.is_none(), "%set must come before the session starts");
        let (key, value) = arg.split_once(' ').unwrap_or((arg, ""));
        let smtpd = &mut self.config.smtpd;
        match key {
            "message_size_limit" => smtpd.message_size_limit = value.parse().expect("number"),
            "recipient_limit" => smtpd.recipient_limit = value.parse().expect("number"),
            "hard_error_limit" => smtpd.hard_error_limit = value.parse().expect("number"),
            "banner" => smtpd.banner = value.to_owned(),
            "soft_error_limit" => smtpd.soft_error_limit = value.parse().expect("number"),
            "error_sleep" => smtpd.error_sleep = Duration::from_millis(value.parse().expect("milliseconds")),
            "bare_newline" => {
                smtpd.bare_newline = match value {
                    "reject" => BareNewline::Reject,
                    "normalize" => BareNewline::Normalize,
                    other => panic!("bare_newline {other}"),
                }
            }
            "smtputf8" => smtpd.smtputf8 = value == "on",
            "chunking" => smtpd.chunking = value == "on",
            "dsn" => smtpd.dsn = value == "on",
            "tls" => {
                // The engine only needs to know that STARTTLS is offered;
                // the files are the driver's, and are never read here.
                let on = value == "on";
                smtpd.tls_cert_file = on.then(|| PathBuf::from("/transcripts/cert.pem"));
                smtpd.tls_key_file = on.then(|| PathBuf::from("/transcripts/key.pem"));
            }
            "role" => {
                self.role = match value {
                    "mx" => ListenerRole::Mx,
                    "submission" => ListenerRole::Submission,
                    "submissions" => ListenerRole::Submissions,
                    other => panic!("unknown role {other}"),
                };
                smtpd.auth.server = Some(NextHop::Inet("127.0.0.1:12345".parse().expect("literal")));
                smtpd.tls_cert_file = Some(PathBuf::from("/transcripts/cert.pem"));
                smtpd.tls_key_file = Some(PathBuf::from("/transcripts/key.pem"));
            }
            "auth" => {
                smtpd.auth.server = Some(NextHop::Inet("127.0.0.1:12345".parse().expect("literal")));
                smtpd.auth.mx = value == "on";
            }
            "accepted_domains" => {
                self.config.server.accepted_domains =
                    value.split(',').filter(|d| !d.is_empty()).map(str::to_owned).collect();
            }
            "policy" => {
                let mut service = PolicyService::new(NextHop::Inet("127.0.0.1:10023".parse().expect("literal")));
                service.stages = value
                    .split(',')
                    .map(|s| match s {
                        "connect" => FilterStage::Connect,
                        "helo" => FilterStage::Helo,
                        "mail" => FilterStage::Mail,
                        "rcpt" => FilterStage::Rcpt,
                        "data" => FilterStage::Data,
                        "end_of_message" => FilterStage::EndOfMessage,
                        other => panic!("unknown stage {other}"),
                    })
                    .collect();
                smtpd.policy.push(service);
            }
            "milter" => smtpd.milters.push(Milter {
                endpoint: NextHop::Inet("127.0.0.1:11332".parse().expect("literal")),
                connect_timeout: Duration::from_secs(30),
                command_timeout: Duration::from_secs(30),
                content_timeout: Duration::from_secs(300),
                default_action: MilterDefaultAction::Tempfail,
                protocol: 6,
            }),
            other => panic!("unknown %set key {other}"),
        }
    }

    /// The running session; starting one renders its greeting.
    fn session(&mut self) -> &mut Session {
        if self.session.is_none() {
            let tls = (self.role == ListenerRole::Submissions).then(|| IMPLICIT_TLS.parse().expect("summary"));
            let mut config = self.config.clone();
            config.smtpd = config.smtpd.for_role(self.role);
            let config = Arc::new(config);
            self.session = Some(Session::on_listener(config, Arc::default(), self.peer, "unknown", self.role, tls));
            self.render();
        }
        self.session.as_mut().expect("just started")
    }

    /// Renders every action, answering the cleanup steps as scripted.
    fn render(&mut self) {
        while let Some(action) = self.session.as_mut().and_then(Session::next_action) {
            match action {
                Action::Reply(text) => {
                    assert!(text.ends_with("\r\n"), "reply without CRLF: {text:?}");
                    for l in text.trim_end_matches("\r\n").split("\r\n") {
                        let _ = writeln!(self.out, "S: {l}");
                    }
                }
                Action::Log(l) => {
                    let _ = writeln!(self.out, "L: {l}");
                }
                Action::StartTransaction { client, sender } => {
                    let _ = write!(
                        self.out,
                        "E: start client={}[{}] helo=<{}> proto={} from=<{}> body={:?} smtputf8={}",
                        client.name,
                        client.addr,
                        client.helo,
                        client.protocol,
                        sender.address,
                        sender.body,
                        sender.smtputf8
                    );
                    if let Some(ret) = sender.ret {
                        let _ = write!(self.out, " ret={ret:?}");
                    }
                    if !sender.envid.is_empty() {
                        let _ = write!(self.out, " envid=<{}>", sender.envid);
                    }
                    if !client.tls.is_empty() {
                        let _ = write!(self.out, " tls=<{}>", client.tls);
                    }
                    if let Some(login) = &client.auth {
                        let _ = write!(self.out, " auth=<{}:{}>", login.method, login.username);
                    }
                    let _ = writeln!(self.out);
                    self.answer_mail();
                }
                Action::Recipient(rcpt) => {
                    let _ = write!(self.out, "E: rcpt <{}>", rcpt.address);
                    if !rcpt.notify.is_default() {
                        let n = rcpt.notify;
                        let flags =
                            [(n.never, "NEVER"), (n.success, "SUCCESS"), (n.failure, "FAILURE"), (n.delay, "DELAY")];
                        let names: Vec<&str> = flags.iter().filter(|(on, _)| *on).map(|(_, name)| *name).collect();
                        let _ = write!(self.out, " notify={}", names.join(","));
                    }
                    if !rcpt.orcpt.is_empty() {
                        let _ = write!(self.out, " orcpt=<{}>", rcpt.orcpt);
                    }
                    let _ = writeln!(self.out);
                }
                Action::StartTls => {
                    let _ = writeln!(self.out, "E: starttls");
                }
                Action::AuthStart { mechanism, initial } => {
                    let initial = initial.map_or("none".to_owned(), |d| format!("<{}>", d.as_str()));
                    let _ = writeln!(self.out, "E: auth-start {mechanism} initial={initial}");
                    self.answer_auth();
                }
                Action::AuthContinue(response) => {
                    let _ = writeln!(self.out, "E: auth-continue <{}>", response.as_str());
                    self.answer_auth();
                }
                Action::AuthCancel => {
                    let _ = writeln!(self.out, "E: auth-cancel");
                }
                Action::Sleep(pause) => {
                    let _ = writeln!(self.out, "E: sleep {}ms", pause.as_millis());
                }
                Action::Data(chunk) => {
                    let _ = writeln!(self.out, "E: data \"{}\"", escape(&chunk));
                }
                Action::EndOfData => {
                    let _ = writeln!(self.out, "E: end");
                    self.answer_data();
                }
                Action::AbortTransaction => {
                    let _ = writeln!(self.out, "E: abort");
                }
                Action::Close => {
                    let _ = writeln!(self.out, "E: close");
                }
                Action::Check(check) => {
                    let subject = match &check.subject {
                        Subject::None => String::new(),
                        Subject::Helo(name) => format!(" helo=<{name}>"),
                        Subject::Mail { params } => format!(" params={params:?}"),
                        Subject::Rcpt { address, params } => format!(" to=<{address}> params={params:?}"),
                        Subject::Unknown(line) => format!(" line=\"{}\"", escape(line.as_bytes())),
                    };
                    let _ = writeln!(self.out, "E: check {:?}{subject}", check.stage);
                    let verdict = self.verdicts.pop_front().unwrap_or_else(Verdict::proceed);
                    self.session.as_mut().expect("session").check_done(verdict);
                }
            }
        }
    }

    fn answer_mail(&mut self) {
        let session = self.session.as_mut().expect("session");
        match self.cleanup.mail.pop_front() {
            None => {
                self.cleanup.queued += 1;
                session.transaction_opened(format!("{:020X}", 0xA000 + self.cleanup.queued).parse().unwrap());
            }
            Some(Some(answer)) => session.cleanup_answer(answer),
            Some(None) => session.cleanup_failed(),
        }
    }

    fn answer_data(&mut self) {
        let session = self.session.as_mut().expect("session");
        match self.cleanup.data.pop_front() {
            None => {
                let id = format!("{:020X}", 0xA000 + self.cleanup.queued);
                session.cleanup_answer(Answer {
                    code: ReplyCode::of(250),
                    status: "2.0.0".parse().expect("status"),
                    text: format!("Ok: queued as {id}"),
                });
            }
            Some(Some(answer)) => session.cleanup_answer(answer),
            Some(None) => session.cleanup_failed(),
        }
    }

    fn finish(&mut self) {
        if let Some(session) = self.session.take() {
            let _ = writeln!(self.out, "L: {}", session.finish());
        }
    }
}

/// `code status text[|text...]`.
fn parse_filter_reply(s: &str) -> FilterReply {
    let mut parts = s.splitn(3, ' ');
    let code = parts.next().and_then(|c| c.parse().ok()).expect("reply code");
    let status = parts.next().and_then(|s| s.parse().ok()).expect("reply status");
    let lines = parts.next().unwrap_or_default().split('|').map(str::to_owned).collect();
    FilterReply { code, status, lines }
}

fn parse_answer(s: &str) -> Answer {
    let mut parts = s.splitn(3, ' ');
    let code = parts.next().and_then(|c| c.parse().ok()).expect("answer code");
    let status = parts.next().and_then(|s| s.parse().ok()).expect("answer status");
    let text = parts.next().unwrap_or_default().to_owned();
    Answer { code, status, text }
}

fn unescape(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.extend_from_slice(&rest.as_bytes()[..i]);
        let esc = &rest[i + 1..];
        let used = match esc.as_bytes().first() {
            Some(&c @ (b'r' | b'n' | b't' | b'\\')) => {
                out.push(match c {
                    b'r' => b'\r',
                    b'n' => b'\n',
                    b't' => b'\t',
                    _ => b'\\',
                });
                1
            }
            Some(b'x') => {
                out.push(u8::from_str_radix(&esc[1..3], 16).expect("\\xHH"));
                3
            }
            Some(b'{') => {
                let end = esc.find('}').expect("\\{c*N}");
                let (c, n) = esc[1..end].split_once('*').expect("\\{c*N}");
                out.extend(c.as_bytes().repeat(n.parse().expect("count")));
                end + 1
            }
            other => panic!("bad escape {other:?} in {s:?}"),
        };
        rest = &esc[used..];
    }
    out.extend_from_slice(rest.as_bytes());
    out
}

/// Content shown on one line: long runs are summarised as `\{c*N}`.
fn escape(bytes: &[u8]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let run = bytes[i..].iter().take_while(|&&c| c == b).count();
        if run >= 16 && b.is_ascii_graphic() && b != b'\\' {
            let _ = write!(out, "\\{{{}*{run}}}", char::from(b));
            i += run;
            continue;
        }
        match b {
            b'\r' => out.push_str("\\r"),
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            b'\\' => out.push_str("\\\\"),
            b'"' => out.push_str("\\x22"),
            b' '..=b'~' => out.push(char::from(b)),
            _ => {
                let _ = write!(out, "\\x{b:02X}");
            }
        }
        i += 1;
    }
    out
}

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/transcripts")
}

fn run(name: &str) {
    let path = dir().join(format!("{name}.smtp"));
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut runner = Runner::new();
    for line in expected.lines() {
        if ["S: ", "L: ", "E: "].iter().any(|p| line.starts_with(p)) {
            continue;
        }
        runner.line(line);
    }
    runner.finish();
    if std::env::var_os("MORTAL_BLESS").is_some() {
        std::fs::write(&path, &runner.out).expect("bless transcript");
        return;
    }
    if runner.out != expected {
        let first = runner.out.lines().zip(expected.lines()).position(|(a, b)| a != b);
        panic!(
            "{name}.smtp differs (first at line {}):\n--- got ---\n{}\n--- expected ---\n{expected}",
            first.map_or(0, |i| i + 1),
            runner.out
        );
    }
}

macro_rules! transcripts {
    ($($name:ident),* $(,)?) => {
        $(#[test] fn $name() { run(stringify!($name)); })*

        /// Every file in the directory is run by one of the tests above.
        #[test]
        fn every_transcript_is_listed() {
            let listed = [$(stringify!($name)),*];
            for entry in std::fs::read_dir(dir()).expect("transcripts directory") {
                let path = entry.expect("entry").path();
                let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_owned();
                assert!(listed.contains(&stem.as_str()), "{} is not in transcripts!", path.display());
            }
        }
    };
}

transcripts!(
    esmtp_transaction,
    helo_session,
    commands,
    sequence_errors,
    mail_from,
    rcpt_to,
    relay_denied,
    recipient_limit,
    message_size,
    dot_stuffing,
    smtp_smuggling,
    long_lines,
    bare_line_endings,
    pipelining,
    unauthorized_pipelining,
    error_limit,
    cleanup_failures,
    timeouts_and_lost_connections,
    reset,
    starttls,
    bdat,
    smtputf8,
    dsn,
    bare_newline_normalize,
    error_tarpit,
    filters,
    filters_connect,
    submission,
    submissions,
    auth_mx,
);
