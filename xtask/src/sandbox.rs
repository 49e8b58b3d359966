//! `cargo xtask sandbox-check`: builds the daemons and runs each one's
//! sandbox self-test (`mortal-<service> --sandbox-selftest`) on a
//! throw-away spool, printing the tables of attempt, expected and actual
//! result. Fails if any forbidden attempt succeeded, any permitted one
//! failed, or a probe could not run.
//!
//! As root the probes drop to `nobody` (the pipe service's to `daemon`,
//! its `[delivery.pipe] user`) and smtpd chroots, exactly as under a root
//! master; as another user those two steps are skipped (the tables say
//! so) and every other layer is still proved. The config routes one
//! domain to pipe, so the queue is proved with a pipe route too, and
//! others to LMTP and SMTP next hops, which the lmtp and smtp agents must
//! reach and the queue must not. A milter, a policy server and Dovecot's
//! auth service on `inet:` endpoints prove that smtpd reaches their ports
//! and no other; postscreen, enabled, reaches none of them.

use anyhow::{Result, bail};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

/// The daemons that sandbox themselves.
const SERVICES: [&str; 8] = ["smtpd", "cleanup", "queue", "anvil", "postscreen", "pipe", "lmtp", "smtp"];
/// The next hops of the LMTP and SMTP routes: the agents must reach them
/// and the queue must not (the self-test listens there when it can).
const LMTP_HOP: &str = "127.0.0.1:10024";
const SMTP_HOP: &str = "127.0.0.1:10025";
/// A milter's and a policy server's endpoints: smtpd must reach them (and,
/// by the self-test's random-port attempt, nothing else).
const MILTER_HOP: &str = "127.0.0.1:10026";
const POLICY_HOP: &str = "127.0.0.1:10027";
/// Dovecot's auth service on TCP: smtpd must reach it, nothing else.
const AUTH_HOP: &str = "127.0.0.1:10028";
/// The pipe command's user as root: unprivileged, not the mail user, and
/// present on every Debian system (base-passwd).
const PIPE_USER: &str = "daemon";

pub fn main(root: &Path, args: &[String]) -> Result<()> {
    if !args.is_empty() {
        bail!("usage: cargo xtask sandbox-check (no arguments)");
    }
    super::run("cargo build", super::cargo().args(["build", "--workspace", "--bins"]))?;
    let dir = std::env::temp_dir().join(format!("mortal-sandbox-check-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("etc"))?;
    // The mail user must be able to pass through to the spool.
    for d in [&dir, &dir.join("etc")] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755))?;
    }
    let config = dir.join("etc/mortal.toml");
    let user = if super::is_root() { "user = \"nobody\"\n" } else { "" };
    fs::write(
        &config,
        format!(
            "[server]\nhostname = \"mortal.test\"\nspool_dir = \"../spool\"\naccepted_domains = [\"example.test\"]\n{user}\n[smtpd]\nlisten = [\"127.0.0.1:2\"]\n\n[postscreen]\nenabled = true\n\n[[smtpd.milter]]\nendpoint = \"inet:{MILTER_HOP}\"\n\n[[smtpd.policy]]\nendpoint = \"inet:{POLICY_HOP}\"\n\n[smtpd.auth]\nserver = \"inet:{AUTH_HOP}\"\n\n[delivery.routes]\n\"pipe.test\" = \"pipe\"\n\"lmtp.test\" = \"lmtp:inet:{LMTP_HOP}\"\n\"unix.test\" = \"lmtp:unix:/run/dovecot/lmtp\"\n\"relay.test\" = \"smtp:inet:{SMTP_HOP}\"\n\n[delivery.pipe]\ncommand = [\"/bin/true\"]\nuser = \"{PIPE_USER}\"\n"
        ),
    )?;
    let mut failed = Vec::new();
    for service in SERVICES {
        eprintln!("==> mortal-{service} --sandbox-selftest");
        let status = Command::new(root.join("target/debug").join(format!("mortal-{service}")))
            .arg("--sandbox-selftest")
            .arg("--config")
            .arg(&config)
            .status()?;
        println!();
        if !status.success() {
            failed.push(service);
        }
    }
    let _ = fs::remove_dir_all(&dir);
    if !failed.is_empty() {
        bail!("sandbox check failed for: {}", failed.join(", "));
    }
    eprintln!("==> sandbox check passed");
    Ok(())
}
