//! cargo xtask: the project's automation.
//!
//! - `cargo xtask start`: build (release) and run mortal in the foreground
//!   on the embedded development config (127.0.0.1:2525, Maildir under
//!   `spool/maildir`).
//! - `cargo xtask ci`: everything CI checks: installs the Debian packages
//!   the tests need (when root), then fmt, clippy `-D warnings`, build and
//!   every test, interop tests included.
//! - `cargo xtask sandbox-check`: each daemon's sandbox self-test, a table
//!   of forbidden attempts and their results (`xtask/src/sandbox.rs`).
#![forbid(unsafe_code)]

use anyhow::{Context, Result, bail};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

mod bench;
mod chaos;
mod fuzz;
mod milter_sink;
mod peers;
mod sandbox;

/// Debian packages the test suite needs: (package, what uses it).
const TEST_PACKAGES: &[(&str, &str)] = &[
    ("swaks", "swaks"),
    // swaks --tls (a Recommends of swaks, which --no-install-recommends skips).
    ("libnet-ssleay-perl", "swaks --tls"),
    ("haproxy", "haproxy"),
    ("fail2ban", "fail2ban-regex"),
    // tests/interop.rs: STARTTLS and plain clients.
    ("openssl", "openssl"),
    ("curl", "curl"),
    ("msmtp", "msmtp"),
    // tests/delivery.rs: Dovecot LMTP, an aiosmtpd relay sink, the fsync trace.
    ("dovecot-core", "dovecot"),
    ("dovecot-lmtpd", "/usr/lib/dovecot/lmtp"),
    ("python3-aiosmtpd", "aiosmtpd"),
    ("strace", "strace"),
    // xtask/src/fuzz.rs: libFuzzer is C++, compiled by the fuzz build.
    ("g++", "cargo xtask fuzz"),
    // tests/filters.rs: the real policy server and milters, run by the
    // guards of tests/support/filters.rs in a temp dir each; the test
    // milter is written with pymilter. No DNS package: the tests serve
    // their records from tests/support/dns.rs on loopback.
    ("postgrey", "postgrey"),
    ("rspamd", "rspamd"),
    ("opendkim", "opendkim"),
    ("opendkim-tools", "opendkim-genkey"),
    ("opendmarc", "opendmarc"),
    ("python3-milter", "tests/support/test_milter.py"),
    // tests/dnsbl.rs: the DNS list server, run by tests/support/rbldnsd.rs.
    ("rbldnsd", "rbldnsd"),
];

fn main() -> Result<()> {
    let task = std::env::args().nth(1).unwrap_or_default();
    let rest: Vec<String> = std::env::args().skip(2).collect();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match task.as_str() {
        "ci" => ci(),
        "start" => start(&root),
        "fuzz" => fuzz::main(&root, &rest),
        "chaos" => chaos::main(&root, &rest),
        "bench" => bench::main(&root, &rest),
        "sandbox-check" => sandbox::main(&root, &rest),
        _ => {
            eprintln!(
                "usage: cargo xtask <task>\n\n  start   build and run mortal on etc/mortal.toml (foreground)\n  ci      install test tools, fmt, clippy, build, all tests, a short chaos run, every fuzz target briefly\n  bench   [--quick] [--baseline REV] [--no-peers]: mortal vs a private Postfix, Exim and OpenSMTPD, side by side (release build; installs postfix, unpacks exim4-daemon-light and opensmtpd); REV: also a build of that git revision, in the same rounds\n  chaos   [--quick] [--messages N] [--clients N] [--spawn exec|fork] [--debug]: kill -9 under load, count losses (release build)\n  fuzz    [--time N] [--target T] [--asan] [--ci]: build the libFuzzer targets (no sanitizer unless --asan) and run each N s; --ci: 10 s each on a copy of the corpora, as `ci` does; `fuzz seed` rewrites the seed corpora\n  sandbox-check   prove each daemon's sandbox from inside (drops to nobody when root)"
            );
            std::process::exit(2);
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_owned()
}

fn run(what: &str, cmd: &mut Command) -> Result<()> {
    eprintln!("==> {what}");
    let status = cmd.status().with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    // `cargo run` described xtask's own package in these; passed on, they
    // make build scripts that watch them (ring's) rerun, so a plain `cargo
    // build` and a build from here would keep rebuilding each other's
    // dependencies. The user's own CARGO_* settings stay.
    const SET_BY_CARGO_RUN: &[&str] =
        &["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_CRATE_NAME", "CARGO_BIN_NAME", "CARGO_PRIMARY_PACKAGE"];
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(|k| SET_BY_CARGO_RUN.iter().any(|p| k.starts_with(p))) {
            cmd.env_remove(key);
        }
    }
    cmd
}

fn ci() -> Result<()> {
    report_free_disk(&workspace_root());
    install_test_packages()?;
    run("cargo fmt --check", cargo().args(["fmt", "--all", "--", "--check"]))?;
    run("cargo clippy", cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    run("cargo build", cargo().args(["build", "--workspace", "--bins"]))?;
    run("cargo test", cargo().args(["test", "--workspace"]))?;
    // Tests that need another uid are `#[ignore]`d with the reason and
    // named `root_*`; as root (CI) they run here, so they are never passed
    // over in silence.
    if nix::unistd::geteuid().is_root() {
        run("cargo test (root_ tests)", cargo().args(["test", "--workspace", "--", "--ignored", "root_"]))?;
    } else {
        eprintln!("==> root_ tests not run: they need root (cargo test -- --ignored root_ as root)");
    }
    // A short kill -9 run on the debug build just made: seconds of load,
    // and any acknowledged message lost fails CI.
    chaos::main(&workspace_root(), &["--quick".into(), "--debug".into()])?;
    // The same with smtpd and cleanup forked from their zygotes, which
    // the kills hit too.
    chaos::main(&workspace_root(), &["--quick".into(), "--debug".into(), "--spawn".into(), "fork".into()])?;
    // `cargo test` replayed the committed fuzz corpora; now every target
    // fuzzes for a few seconds on a copy of them, and a crash fails CI
    // with its reproducer.
    fuzz::ci(&workspace_root())?;
    eprintln!("==> ci passed");
    Ok(())
}

/// Says how much disk the build has: a clean build with its tests, fuzz
/// targets and chaos run takes several GiB, and a linker that runs out of
/// space dies of SIGBUS with no word about the disk.
fn report_free_disk(root: &Path) {
    const WANTED_GIB: u64 = 12;
    match nix::sys::statvfs::statvfs(root) {
        Ok(st) => {
            let free = st.blocks_available() * st.fragment_size() / (1 << 30);
            eprintln!("==> {free} GiB free on the disk of {}", root.display());
            if free < WANTED_GIB {
                eprintln!("warning: less than {WANTED_GIB} GiB free; the build may fail for want of disk");
            }
        }
        Err(e) => eprintln!("warning: cannot read the free space of {}: {e}", root.display()),
    }
}

/// Installs missing test tools with apt when running as root (CI); as
/// another user, says what to install instead of failing later.
fn install_test_packages() -> Result<()> {
    let missing: Vec<&str> =
        TEST_PACKAGES.iter().filter(|(pkg, _)| !debian_package_installed(pkg)).map(|(pkg, _)| *pkg).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "tests need these Debian packages: {} (run as root, or: sudo apt-get install -y {})",
            missing.join(" "),
            missing.join(" ")
        );
    }
    run("apt-get update", Command::new("apt-get").args(["update", "-qq"]))?;
    // Debian starts a package's daemon on install (postgrey, rspamd,
    // opendkim, opendmarc, dovecot bind their system ports): the tests run
    // their own, so none may start.
    let _no_services = NoServiceStarts::install()?;
    run(
        &format!("apt-get install {}", missing.join(" ")),
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Where invoke-rc.d asks whether a service may start (policy-rc.d(8)).
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

/// While it lives, `/usr/sbin/policy-rc.d` answers 101 ("action not
/// allowed"), so `apt-get install` starts no service; on drop the file is
/// put back as it was (a container image's own) or removed.
struct NoServiceStarts {
    previous: Option<Vec<u8>>,
}

impl NoServiceStarts {
    fn install() -> Result<Self> {
        let previous = std::fs::read(POLICY_RC_D).ok();
        std::fs::write(
            POLICY_RC_D,
            "#!/bin/sh\n# cargo xtask ci: no service starts during its apt-get install\nexit 101\n",
        )
        .with_context(|| format!("cannot write {POLICY_RC_D}"))?;
        std::fs::set_permissions(POLICY_RC_D, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        Ok(NoServiceStarts { previous })
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        let restored = match &self.previous {
            Some(content) => std::fs::write(POLICY_RC_D, content),
            None => std::fs::remove_file(POLICY_RC_D),
        };
        if let Err(e) = restored {
            eprintln!("warning: cannot restore {POLICY_RC_D}: {e}");
        }
    }
}

/// Asks dpkg rather than looking for a command: some test packages are
/// libraries (libnet-ssleay-perl) and some install no command on PATH.
fn debian_package_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", pkg])
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout == b"installed")
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

fn start(root: &Path) -> Result<()> {
    run("cargo build --release", cargo().args(["build", "--release", "--workspace", "--bins"]))?;
    let config = root.join("etc/mortal.toml");
    eprintln!("==> mortal start --foreground --config {} (Ctrl-C stops)", config.display());
    let err = Command::new(root.join("target/release/mortal"))
        .args(["start", "--foreground", "--config"])
        .arg(&config)
        .exec();
    bail!("cannot run target/release/mortal: {err}")
}
