//! Running the `[delivery.pipe] command` for one recipient: what Postfix's
//! pipe(8) does after it read a request.
//!
//! The argv template comes from this service's own configuration, never
//! from the request, and never goes to a shell: `${sender}`,
//! `${recipient}`, `${queue_id}` and `${original_recipient}` are expanded
//! inside single arguments, so no address can add an argument or a shell
//! construct. The command runs with the message on stdin (LF line ends, as
//! Unix tools expect), an empty environment but `PATH`, in `/`, in a
//! process group of its own, as this process's user (the pipe user, never
//! root: the sandbox dropped root before the first request).
//!
//! The exit status follows sysexits(3): 0 delivered; 75 (EX_TEMPFAIL) or
//! death by a signal defers; any other status bounces, with the command's
//! output (stdout and stderr, at most [`OUTPUT_LIMIT`] octets) in the DSN.
//! A command still running after `timeout` is killed with its whole
//! process group and the delivery deferred.

use mortal_proto::config::Config;
use mortal_proto::delivery::{RcptResult, Recipient, Request, Status};
use mortal_proto::envelope::BodyType;
use mortal_proto::smtp_status::{EnhancedStatus, StatusClass};
use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

/// `4.3.0`: other or undefined mail system status (the command failed
/// for a reason a retry may fix).
const SYSTEM_ERROR: EnhancedStatus = EnhancedStatus::new(StatusClass::Persistent, 3, 0);
/// `4.3.5`: system incorrectly configured.
const MISCONFIGURED: EnhancedStatus = EnhancedStatus::new(StatusClass::Persistent, 3, 5);

/// Octets of command output kept for the log and the DSN.
pub const OUTPUT_LIMIT: usize = 512;
/// The command's whole environment.
const SAFE_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// sysexits(3) EX_TEMPFAIL.
const EX_TEMPFAIL: i32 = 75;
/// Longest pause between checks for the command's exit.
const POLL_MAX: Duration = Duration::from_millis(20);
/// How long output is awaited after the command exited (a background
/// grandchild may hold the pipe open).
const OUTPUT_GRACE: Duration = Duration::from_millis(200);

/// The process group of the command running now; 0 when none is.
static RUNNING: AtomicU32 = AtomicU32::new(0);

/// Kills the running command's process group, if there is one; returns
/// its id. For a pipe process about to die of SIGTERM (the master's
/// session deadline or overdue grace): its command must not outlive it.
pub fn kill_running() -> Option<u32> {
    let group = RUNNING.swap(0, Ordering::SeqCst);
    (group != 0).then(|| {
        kill_group(group);
        group
    })
}

/// Expands the argv template for one recipient.
pub fn expand(template: &[String], request: &Request, rcpt: &Recipient) -> Vec<String> {
    template
        .iter()
        .map(|arg| {
            arg.replace("${sender}", &request.envelope.sender)
                .replace("${recipient}", &rcpt.address)
                .replace("${queue_id}", request.envelope.queue_id.as_str())
                .replace("${original_recipient}", rcpt.original())
        })
        .collect()
}

/// The message as the command reads it: CRLF line ends become LF, as Unix
/// tools expect, except in a `BODY=BINARYMIME` message, whose octets are
/// data and reach the command unchanged.
pub fn stdin_of(request: &Request) -> Arc<Vec<u8>> {
    let binary = request.envelope.body == BodyType::BinaryMime;
    Arc::new(if binary { request.content.clone() } else { to_lf(&request.content) })
}

/// Runs the command once for `rcpt`, feeding it `input` ([`stdin_of`]).
pub fn run(config: &Config, request: &Request, rcpt: &Recipient, input: &Arc<Vec<u8>>) -> RcptResult {
    let pipe = &config.delivery.pipe;
    let argv = expand(&pipe.command, request, rcpt);
    let Some(program) = argv.first() else {
        return RcptResult::new(Status::Deferred, MISCONFIGURED, "pipe: no [delivery.pipe] command configured");
    };
    // The sandbox dropped root before the first request; should that ever
    // not hold, no command runs.
    if nix::unistd::geteuid().is_root() {
        return RcptResult::new(Status::Deferred, MISCONFIGURED, "pipe: refusing to run the command as root");
    }
    let mut cmd = Command::new(program);
    cmd.args(&argv[1..]).env_clear().env("PATH", SAFE_PATH).current_dir("/").stdin(Stdio::piped());
    // Its own process group, so a timeout kills what it started too.
    cmd.process_group(0);
    let (mut reader, writer) = match std::io::pipe() {
        Ok(p) => p,
        Err(e) => return RcptResult::new(Status::Deferred, SYSTEM_ERROR, format!("pipe: {e}")),
    };
    match writer.try_clone() {
        Ok(w2) => cmd.stdout(w2).stderr(writer),
        Err(e) => return RcptResult::new(Status::Deferred, SYSTEM_ERROR, format!("pipe: {e}")),
    };
    let started = Instant::now();
    let spawned = cmd.spawn();
    // Our copies of the output pipe's write end must close, or the reader
    // would never see the end of the output.
    drop(cmd);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            return RcptResult::new(Status::Deferred, SYSTEM_ERROR, format!("pipe: cannot run {program}: {e}"));
        }
    };
    RUNNING.store(child.id(), Ordering::SeqCst);
    if let Some(mut stdin) = child.stdin.take() {
        let input = Arc::clone(input);
        // A command may exit without reading everything: that is its
        // choice, told by its exit status, so a broken pipe is ignored.
        std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
    }
    let (tx, output) = mpsc::channel();
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 4096];
        // Read to the end so the command never blocks on a full pipe;
        // keep only the first OUTPUT_LIMIT octets.
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            let room = OUTPUT_LIMIT.saturating_sub(kept.len());
            kept.extend_from_slice(&buf[..n.min(room)]);
        }
        let _ = tx.send(kept);
    });
    let deadline = started + pipe.timeout;
    let mut pause = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => {
                kill_group(child.id());
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(POLL_MAX);
            }
            Err(e) => {
                return RcptResult::new(Status::Deferred, SYSTEM_ERROR, format!("pipe: wait for {program}: {e}"));
            }
        }
    };
    RUNNING.store(0, Ordering::SeqCst);
    let out = output.recv_timeout(OUTPUT_GRACE).unwrap_or_default();
    judge(status, program, &printable(&out))
}

/// SIGKILL to the command's process group (its pid is the group's id).
fn kill_group(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
}

/// The result for an exit `status` (`None`: killed at the time limit).
fn judge(status: Option<std::process::ExitStatus>, program: &str, out: &str) -> RcptResult {
    let with_output = |text: String| if out.is_empty() { text } else { format!("{text}. Command output: {out}") };
    match status {
        None => RcptResult::new(
            Status::Deferred,
            SYSTEM_ERROR,
            with_output(format!("Command time limit exceeded: \"{program}\"")),
        ),
        Some(s) if s.success() => RcptResult::delivered("delivered via pipe service"),
        Some(s) if s.code() == Some(EX_TEMPFAIL) => {
            RcptResult::new(Status::Deferred, SYSTEM_ERROR, with_output("temporary failure".into()))
        }
        Some(s) => match s.code() {
            Some(code) => RcptResult {
                diagnostic: Some(format!(
                    "x-unix; {}",
                    if out.is_empty() { format!("exit status {code}") } else { out.to_owned() }
                )),
                ..RcptResult::new(
                    Status::Bounced,
                    sysexits_dsn(code),
                    with_output(format!("Command died with status {code}: \"{program}\"")),
                )
            },
            None => RcptResult::new(
                Status::Deferred,
                SYSTEM_ERROR,
                with_output(format!("Command died with signal {}: \"{program}\"", s.signal().unwrap_or(0))),
            ),
        },
    }
}

/// RFC 3463 code for a permanent sysexits(3) status, as Postfix maps them.
fn sysexits_dsn(code: i32) -> EnhancedStatus {
    let (subject, detail) = match code {
        64 => (3, 0), // EX_USAGE
        65 => (6, 0), // EX_DATAERR
        67 => (1, 1), // EX_NOUSER
        68 => (1, 2), // EX_NOHOST
        77 => (7, 0), // EX_NOPERM
        _ => (3, 0),
    };
    EnhancedStatus::new(StatusClass::Permanent, subject, detail)
}

/// Output text for logs and DSNs: control characters become spaces.
fn printable(out: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(out).chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    text.trim().to_owned()
}

fn to_lf(content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len());
    mortal_proto::queue_file::crlf_to_lf(content, &mut out);
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;

    /// A request to the pipe agent with no recipients and no content.
    pub(crate) fn request(sender: &str) -> Request {
        Request {
            envelope: mortal_proto::delivery::Envelope {
                queue_id: "0000000010000100000A".parse().unwrap(),
                route: mortal_proto::config::Route::Pipe,
                sender: sender.into(),
                body: BodyType::SevenBit,
                smtputf8: false,
                ret: None,
                envid: String::new(),
            },
            recipients: Vec::new(),
            content: Vec::new(),
        }
    }

    #[test]
    fn lf_conversion_keeps_lone_cr() {
        assert_eq!(to_lf(b"a\r\nb\rc\r\n"), b"a\nb\rc\n");
    }

    #[test]
    fn binary_content_reaches_the_command_unchanged() {
        let mut request = request("");
        request.content = b"a\r\n\x00\r\n".to_vec();
        request.envelope.body = BodyType::EightBitMime;
        assert_eq!(*stdin_of(&request), b"a\n\x00\n");
        request.envelope.body = BodyType::BinaryMime;
        assert_eq!(*stdin_of(&request), b"a\r\n\x00\r\n");
    }

    #[test]
    fn output_is_made_printable() {
        assert_eq!(printable(b"bad\nthing\x1b[0m\n"), "bad thing [0m");
    }

    #[test]
    fn expansion_stays_inside_one_argument() {
        let request = request("a@example.test");
        let rcpt = Recipient {
            address: "\"x y\"@pipe.test".into(),
            notify: Default::default(),
            orcpt: "rfc822;X@pipe.test".into(),
        };
        let template: Vec<String> =
            ["/bin/p", "-f", "${sender}", "--to=${recipient}", "${original_recipient}", "${queue_id}"]
                .map(String::from)
                .into();
        assert_eq!(
            expand(&template, &request, &rcpt),
            ["/bin/p", "-f", "a@example.test", "--to=\"x y\"@pipe.test", "X@pipe.test", "0000000010000100000A"]
        );
    }

    /// sysexits(3): 0 delivers, 75 and signals defer, the rest bounce with
    /// the output as the DSN's diagnostic.
    #[test]
    fn exit_status_table() {
        let code = |c: i32| Some(ExitStatus::from_raw(c << 8));
        let cases: [(Option<ExitStatus>, &str, Status, &str); 6] = [
            (code(0), "", Status::Sent, "2.0.0"),
            (code(75), "locked", Status::Deferred, "4.3.0"),
            (code(67), "no such user", Status::Bounced, "5.1.1"),
            (code(1), "", Status::Bounced, "5.3.0"),
            (Some(ExitStatus::from_raw(9)), "", Status::Deferred, "4.3.0"),
            (None, "", Status::Deferred, "4.3.0"),
        ];
        for (status, out, want, dsn) in cases {
            let r = judge(status, "/bin/p", out);
            assert_eq!((r.status, r.dsn.to_string().as_str()), (want, dsn), "{status:?}: {r:?}");
        }
        let r = judge(code(67), "/bin/p", "no such user");
        assert_eq!(r.diagnostic.as_deref(), Some("x-unix; no such user"));
        assert_eq!(r.text, "Command died with status 67: \"/bin/p\". Command output: no such user");
        assert_eq!(judge(code(1), "/bin/p", "").diagnostic.as_deref(), Some("x-unix; exit status 1"));
    }
}
