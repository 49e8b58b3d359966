//! The `pipe` agent: hand the message to a command, like Postfix's pipe(8).
//!
//! The `[delivery.pipe] command` template is an argv, never given to a
//! shell: `${sender}`, `${recipient}`, `${queue_id}` and
//! `${original_recipient}` are expanded inside single arguments, so no
//! address can add an argument or a shell construct. The command runs
//! once per recipient with the message on stdin (LF line ends, as Unix
//! tools expect), an empty environment but `PATH`, in `/`, and as the
//! configured `user` when mortal runs as root: it never runs as root.
//!
//! The exit status follows sysexits(3): 0 delivered; 75 (EX_TEMPFAIL) or
//! death by a signal defers; any other status bounces, with the command's
//! output (stdout and stderr, at most [`OUTPUT_LIMIT`] octets) in the
//! DSN. A command still running after `timeout` is killed and the
//! delivery deferred.

use crate::queue_route::{RcptResult, Report, Status};
use mortal_proto::config::Config;
use mortal_proto::queue_file::{QueueFile, QueuedRecipient};
use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

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

pub fn deliver(config: &Config, qf: &QueueFile, rcpts: &[usize]) -> Report {
    let results = rcpts.iter().map(|&i| run(config, qf, &qf.recipients[i])).collect();
    Report { relay: "pipe".into(), results }
}

/// Expands the argv template for one recipient.
pub fn expand(template: &[String], qf: &QueueFile, rcpt: &QueuedRecipient) -> Vec<String> {
    let original = rcpt.orcpt.split_once(';').map_or(rcpt.address.as_str(), |(_, a)| a);
    template
        .iter()
        .map(|arg| {
            arg.replace("${sender}", &qf.sender.address)
                .replace("${recipient}", &rcpt.address)
                .replace("${queue_id}", &qf.id)
                .replace("${original_recipient}", original)
        })
        .collect()
}

/// Says once, at start, when `[delivery.pipe] user` cannot take effect: a
/// queue manager that already dropped root (the production case) can only
/// run the command as itself. A setting that silently does nothing would
/// mislead the operator about who runs the command.
pub fn warn_if_user_ignored(config: &Config) {
    let Some(wanted) = config.delivery.pipe.user.as_deref() else { return };
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        return;
    }
    let me = nix::unistd::User::from_uid(uid).ok().flatten().map_or_else(|| uid.to_string(), |u| u.name);
    if me != wanted {
        tracing::warn!(
            "warning: [delivery.pipe] user \"{wanted}\" does not take effect: the queue manager runs as \"{me}\" \
             (it gives up root at start), so pipe commands run as \"{me}\"; set [delivery.pipe] user = [server] user"
        );
    }
}

fn run(config: &Config, qf: &QueueFile, rcpt: &QueuedRecipient) -> RcptResult {
    let pipe = &config.delivery.pipe;
    let argv = expand(&pipe.command, qf, rcpt);
    let Some(program) = argv.first() else {
        return RcptResult::new(Status::Deferred, "4.3.5", "pipe: no [delivery.pipe] command configured");
    };
    let mut cmd = Command::new(program);
    cmd.args(&argv[1..]).env_clear().env("PATH", SAFE_PATH).current_dir("/").stdin(Stdio::piped());
    if nix::unistd::geteuid().is_root() {
        let Some(name) = pipe.user.as_deref() else {
            return RcptResult::new(
                Status::Deferred,
                "4.3.5",
                "pipe: refusing to run the command as root: set [delivery.pipe] user",
            );
        };
        match nix::unistd::User::from_name(name) {
            Ok(Some(u)) if !u.uid.is_root() => {
                // std drops supplementary groups when it changes the uid as root.
                cmd.uid(u.uid.as_raw()).gid(u.gid.as_raw());
            }
            Ok(Some(_)) => return RcptResult::new(Status::Deferred, "4.3.5", "pipe: user must not be root"),
            Ok(None) | Err(_) => {
                return RcptResult::new(Status::Deferred, "4.3.5", format!("pipe: unknown user {name:?}"));
            }
        }
    }
    let (mut reader, writer) = match std::io::pipe() {
        Ok(p) => p,
        Err(e) => return RcptResult::new(Status::Deferred, "4.3.0", format!("pipe: {e}")),
    };
    match writer.try_clone() {
        Ok(w2) => cmd.stdout(w2).stderr(writer),
        Err(e) => return RcptResult::new(Status::Deferred, "4.3.0", format!("pipe: {e}")),
    };
    let started = Instant::now();
    let spawned = cmd.spawn();
    // Our copies of the output pipe's write end must close, or the reader
    // would never see the end of the output.
    drop(cmd);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return RcptResult::new(Status::Deferred, "4.3.0", format!("pipe: cannot run {program}: {e}")),
    };
    let input = to_lf(&qf.content);
    if let Some(mut stdin) = child.stdin.take() {
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
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(POLL_MAX);
            }
            Err(e) => return RcptResult::new(Status::Deferred, "4.3.0", format!("pipe: wait for {program}: {e}")),
        }
    };
    let out = output.recv_timeout(OUTPUT_GRACE).unwrap_or_default();
    let out = printable(&out);
    let with_output = |text: String| if out.is_empty() { text } else { format!("{text}. Command output: {out}") };
    match status {
        None => RcptResult::new(
            Status::Deferred,
            "4.3.0",
            with_output(format!("Command time limit exceeded: \"{program}\"")),
        ),
        Some(s) if s.success() => RcptResult::delivered("delivered via pipe service"),
        Some(s) if s.code() == Some(EX_TEMPFAIL) => {
            RcptResult::new(Status::Deferred, "4.3.0", with_output("temporary failure".into()))
        }
        Some(s) => match s.code() {
            Some(code) => RcptResult {
                diagnostic: Some(format!(
                    "x-unix; {}",
                    if out.is_empty() { format!("exit status {code}") } else { out.clone() }
                )),
                ..RcptResult::new(
                    Status::Bounced,
                    sysexits_dsn(code),
                    with_output(format!("Command died with status {code}: \"{program}\"")),
                )
            },
            None => RcptResult::new(
                Status::Deferred,
                "4.3.0",
                with_output(format!("Command died with signal {}: \"{program}\"", s.signal().unwrap_or(0))),
            ),
        },
    }
}

/// RFC 3463 code for a permanent sysexits(3) status, as Postfix maps them.
fn sysexits_dsn(code: i32) -> &'static str {
    match code {
        64 => "5.3.0", // EX_USAGE
        65 => "5.6.0", // EX_DATAERR
        67 => "5.1.1", // EX_NOUSER
        68 => "5.1.2", // EX_NOHOST
        77 => "5.7.0", // EX_NOPERM
        _ => "5.3.0",
    }
}

/// Output text for logs and DSNs: control characters become spaces.
fn printable(out: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(out).chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    text.trim().to_owned()
}

fn to_lf(content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len());
    let mut i = 0;
    while i < content.len() {
        if content[i] == b'\r' && content.get(i + 1) == Some(&b'\n') {
            i += 1;
            continue;
        }
        out.push(content[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lf_conversion_keeps_lone_cr() {
        assert_eq!(to_lf(b"a\r\nb\rc\r\n"), b"a\nb\rc\n");
    }

    #[test]
    fn output_is_made_printable() {
        assert_eq!(printable(b"bad\nthing\x1b[0m\n"), "bad thing [0m");
    }
}
