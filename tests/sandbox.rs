//! Issue 3, privilege separation and sandbox: each daemon's self-test
//! (`--sandbox-selftest`) proves from inside a real sandboxed process that
//! reading /etc/passwd, writing the spool from smtpd, signalling or
//! tracing another process, execve and a forbidden system call all fail,
//! and that what each daemon needs (cleanup's socket from smtpd's chroot,
//! incoming/ for cleanup, the spool for queue) still works. As root the
//! probes also drop to `nobody` and smtpd chroots; unprivileged, those
//! two steps are skipped (the self-test says so) and the rest still runs.

use mortal_tests::{WAIT, bin_dir, mail_user_line};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Instant;

/// A temp directory with a config whose spool is inside it; removed on
/// drop (kept when the test fails, for the post-mortem).
struct Site {
    dir: PathBuf,
    config: PathBuf,
}

impl Site {
    fn new(name: &str, delivery: &str) -> Site {
        let dir = std::env::temp_dir().join(format!("mortal-sandbox-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("etc")).unwrap();
        // The mail user must be able to pass through to the spool.
        for d in [&dir, &dir.join("etc")] {
            fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
        }
        let config = dir.join("etc/mortal.toml");
        fs::write(
            &config,
            format!(
                "[server]\nhostname = \"mortal.test\"\nspool_dir = \"../spool\"\naccepted_domains = [\"example.test\"]\n{}\n\n[smtpd]\nlisten = [\"127.0.0.1:2\"]\n{delivery}",
                mail_user_line("")
            ),
        )
        .unwrap();
        Site { dir, config }
    }

    fn selftest(&self, service: &str) -> (Output, String) {
        let started = Instant::now();
        let out = Command::new(bin_dir().join(format!("mortal-{service}")))
            .arg("--sandbox-selftest")
            .arg("--config")
            .arg(&self.config)
            .output()
            .expect("run the self-test");
        assert!(started.elapsed() < WAIT, "the self-test of {service} took {:?}", started.elapsed());
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        println!("{text}{}", String::from_utf8_lossy(&out.stderr));
        (out, text)
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// The result column of the row for `attempt` (after the expected one).
fn row<'a>(table: &'a str, attempt: &str) -> &'a str {
    let line = table.lines().find(|l| l.starts_with(attempt)).unwrap_or_else(|| panic!("no row {attempt:?}\n{table}"));
    let rest = line[attempt.len()..].trim_start();
    let expected = rest.split_whitespace().next().unwrap_or_default();
    assert!(expected == "allowed" || expected == "denied", "{line}");
    rest[expected.len()..].trim()
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn every_daemon_proves_its_sandbox() {
    let site = Site::new("all", "");
    if !is_root() {
        println!("not root: the privilege drop and smtpd's chroot are not exercised (they need root)");
    }
    for service in ["smtpd", "cleanup", "queue", "anvil"] {
        let (out, table) = site.selftest(service);
        assert!(out.status.success(), "{service}: an attempt went the wrong way\n{table}");
        assert!(table.contains(&format!("{service}: ")) && table.contains(" 0 wrong"), "{table}");
        assert!(!table.contains("WRONG"), "{table}");
        for denied in [
            "open /etc/passwd for reading",
            "create a file in /tmp",
            "signal another process (the parent)",
            "ptrace another process (the parent)",
            "execve /bin/true",
            "forbidden syscall: unshare(CLONE_NEWUSER)",
        ] {
            assert!(row(&table, denied).starts_with("denied"), "{service}: {denied}\n{table}");
        }
        let applied = row(&table, "enter the sandbox");
        if is_root() {
            assert!(applied.contains("user=nobody"), "{applied}");
        }
        // A kernel without Landlock would show NotEnforced here; this one
        // (and CI's) has it.
        assert!(applied.contains("landlock=FullyEnforced"), "{applied}");
    }
    let (_, smtpd) = site.selftest("smtpd");
    assert!(row(&smtpd, "create a file in spool/incoming").starts_with("denied"), "{smtpd}");
    assert!(row(&smtpd, "connect to the cleanup socket").starts_with("allowed"), "{smtpd}");
    assert!(row(&smtpd, "TCP connect to 127.0.0.1").starts_with("denied"), "{smtpd}");
    if is_root() {
        assert!(row(&smtpd, "enter the sandbox").contains("chroot=/"), "{smtpd}");
    }
    let (_, cleanup) = site.selftest("cleanup");
    assert!(row(&cleanup, "create a file in spool/incoming").starts_with("allowed"), "{cleanup}");
    assert!(row(&cleanup, "create a file in spool/deferred").starts_with("denied"), "{cleanup}");
    let (_, queue) = site.selftest("queue");
    assert!(row(&queue, "create a file in spool/deferred").starts_with("allowed"), "{queue}");
    // Nothing a probe created is left behind.
    for q in ["incoming", "deferred"] {
        let left: Vec<_> = fs::read_dir(site.dir.join("spool").join(q)).unwrap().flatten().collect();
        assert!(left.is_empty(), "{q}: {left:?}");
    }
}

/// The self-test must be able to fail: with a pipe route the queue keeps
/// no Landlock file rules (the command's needs are the operator's), so
/// reading /etc/passwd succeeds, and the self-test must say so and exit 1.
#[test]
fn selftest_reports_a_restriction_that_does_not_hold() {
    let site = Site::new("pipe", "\n[delivery]\ntransport = \"pipe\"\n[delivery.pipe]\ncommand = [\"/bin/true\"]\n");
    let (out, table) = site.selftest("queue");
    assert_eq!(out.status.code(), Some(1), "{table}");
    assert!(row(&table, "open /etc/passwd for reading").starts_with("allowed"), "{table}");
    assert!(row(&table, "open /etc/passwd for reading").ends_with("<-- WRONG"), "{table}");
    // The other layers still hold.
    assert!(row(&table, "ptrace another process (the parent)").starts_with("denied"), "{table}");
    assert!(row(&table, "forbidden syscall: unshare(CLONE_NEWUSER)").starts_with("denied"), "{table}");
}

/// The hidden modes take exactly their arguments: anything else is a
/// usage error, never a half-started daemon.
#[test]
fn selftest_flags_are_strict() {
    let bin = bin_dir().join("mortal-smtpd");
    let out = Command::new(&bin).arg("--sandbox-selftest").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = Command::new(&bin).args(["--sandbox-probe", "no-such-attempt", "1", "--config", "/x"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage"), "{out:?}");
}

/// Started as root, the master refuses to run without its mail user
/// rather than run the daemons as root.
#[test]
fn root_master_refuses_a_missing_mail_user() {
    if !is_root() {
        println!("skipped: needs root (an unprivileged master changes no user)");
        return;
    }
    let site = Site::new("nouser", "");
    let text = fs::read_to_string(&site.config).unwrap().replace("user = \"nobody\"", "user = \"no-such-mortal-user\"");
    fs::write(&site.config, text).unwrap();
    let started = Instant::now();
    let out = Command::new(bin_dir().join("mortal-master")).arg("--config").arg(&site.config).output().unwrap();
    assert!(started.elapsed() < WAIT);
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains("fatal: user \"no-such-mortal-user\" does not exist"), "{log}");
    // It stopped before making anything.
    assert!(!site.dir.join("spool").exists(), "{log}");
}
