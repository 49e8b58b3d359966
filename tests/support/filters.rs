//! The real filters of issue 12, each a kill-on-drop guard running the
//! Debian daemon in the foreground on a free loopback port, with all its
//! state in a temp dir; a start waits for the port to accept (bounded) and
//! a failing test prints the daemon's log. None of them asks the real DNS:
//! the ones that look names up are pointed at a [`TestDns`] zone server.
//! When the tests run as root, each daemon runs as its package's user.
//! [`MilterConversation`] is the MTA's side of one milter conversation
//! through mortal_proto's codec, for tests that talk to a milter directly.
//!
//! A mortal instance reaches them through its configuration, e.g. in
//! `Options::extra` (milters are asked in the order listed):
//! ```text
//! [[smtpd.milter]]
//! endpoint = "inet:127.0.0.1:PORT"     # OpenDkim::endpoint(), then OpenDmarc's, Rspamd's, TestMilter's
//! [[smtpd.policy]]
//! endpoint = "inet:127.0.0.1:PORT"     # Postgrey::endpoint()
//! ```
//! mortal's sessions come from 127.0.0.1: OpenDKIM verifies them and
//! OpenDMARC checks them (neither counts 127.0.0.1 as internal here), but
//! rspamd skips SPF for them (see below).
//!
//! What each milter negotiated with mortal's default offer (everything),
//! as tests/filters.rs sees it:
//! ```text
//! test milter  actions ADDHDRS|CHGBODY|ADDRCPT|DELRCPT|CHGHDRS|QUARANTINE|CHGFROM|ADDRCPT_PAR|SETSYMLIST
//!              steps   NOUNKNOWN|SKIP
//! rspamd       actions ADDHDRS|CHGBODY|ADDRCPT|DELRCPT|CHGHDRS|QUARANTINE|CHGFROM|ADDRCPT_PAR|SETSYMLIST
//!              steps   NR_CONN|NR_HELO|NR_MAIL|NR_RCPT|NR_DATA|NR_HDR|NR_EOH|NR_BODY|NR_UNKN (answers EOM only)
//! OpenDKIM     actions ADDHDRS|CHGHDRS|SETSYMLIST
//!              steps   NOHELO|NOUNKNOWN|NODATA|SKIP|HDR_LEADSPC (header values keep their leading space)
//! OpenDMARC    actions ADDHDRS|QUARANTINE
//!              steps   NOBODY|NOUNKNOWN|NODATA|SKIP
//! ```
//! (libmilter 8.15 asks for SETSYMLIST whenever it is offered; none of
//! them sent its own macro lists.)
//!
//! # postgrey ([`Postgrey`])
//! ```text
//! postgrey --inet=127.0.0.1:PORT --dbdir=DIR/db --delay=SECONDS
//!          --hostname=mortal.test --whitelist-clients=DIR/empty
//!          --whitelist-recipients=DIR/empty --user=U --group=G -v
//! ```
//! No `--daemonize`, so it logs to standard error. `U`/`G` are `postgrey`
//! as root, else the test's own user. The first query for a (client
//! /24, sender, recipient) triplet gets `action=DEFER_IF_PERMIT 4.2.0
//! Greylisted, see http://postgrey.schweikert.ch/help/DOMAIN.html`
//! (`4.2.0 ` because the query carries `etrn_domain`, as Postfix's does),
//! retries before the delay the same, and the first after it `action=PREPEND
//! X-Greylist: delayed N seconds by postgrey-1.37 at mortal.test; DATE`.
//! postgrey counts whole seconds from the second of the first query, so
//! a retry may pass up to a second early. Starts in about 0.1 s.
//!
//! # The test milter ([`TestMilter`])
//! `/usr/bin/python3 tests/support/test_milter.py inet:PORT@127.0.0.1
//! DIR/record.jsonl`, with `TEST_MILTER_SLOW_SECONDS` for its `slow`
//! cases: pymilter; what it does is chosen by each recipient's local
//! part (the table is at the top of the script), so one process serves
//! every case. Starts in about 0.05 s.
//!
//! # rspamd ([`Rspamd`])
//! `rspamd -f -c DIR/rspamd.conf --var CONFDIR=/etc/rspamd --var
//! LOCAL_CONFDIR=DIR --var RUNDIR=DIR/run --var DBDIR=DIR/db --var
//! LOGDIR=DIR/log [-u _rspamd -g _rspamd]`, where `rspamd.conf` keeps
//! Debian's modules and scores (`$CONFDIR/common.conf`) and runs only the
//! proxy worker, in milter mode, scanning itself:
//! ```text
//! options { .include "$CONFDIR/options.inc"   # Debian's, then, replacing keys:
//!           .include(priority=10) "DIR/override.d/options.inc" }
//!     # dns { nameserver = ["127.0.0.1:DNSPORT"]; timeout = 1s; retransmits = 1; }
//!     # local_addrs = []; tempdir = "DIR/run"; control_socket = "";
//!     # hs_cache_dir = "target/tmp/rspamd-hs-cache";  (shared: 13 s start → under 1 s)
//! worker "rspamd_proxy" {
//!     bind_socket = "127.0.0.1:PORT"; milter = yes; count = 1;
//!     timeout = 120s; reject_message = "Spam message rejected";
//!     upstream "local" { default = yes; self_scan = yes; }
//! }
//! ```
//! with `local.d/milter_headers.conf` `use = ["x-spamd-result",
//! "x-spam-status", "authentication-results"]; skip_local = false;
//! skip_authenticated = false;` and the rspamd.com fuzzy rule off. No
//! Redis: the modules that want it say so in the log and stay off. Its
//! maps from maps.rspamd.com are not fetched (the test DNS does not know
//! the name): Debian's fallback copies are used. What it answers at the
//! end of the message:
//! - GTUBE: REPLYCODE `554 5.7.1 Gtube pattern` (GTUBE's own reason, not
//!   `reject_message`), no modification;
//! - a clean message: ADDHEADER `X-Spamd-Result: default: False [...]`,
//!   ADDHEADER `X-Spam-Status: No, score=...`, INSHEADER (index 1)
//!   `Authentication-Results: ...`, then ACCEPT;
//! - an SPF failure (score 7.7, action "add header"): the same headers
//!   with `X-Spam-Status: Yes, ...`, `spf=fail`, `dmarc=fail`, and
//!   CHGHEADER `X-Spam: Yes` (index 1), then ACCEPT.
//!
//! rspamd checks no SPF for a loopback client (127.0.0.1 is always local
//! to it): its A-R then says `none`. Starts in about 13 s with an empty
//! Hyperscan cache, under 1 s from it.
//!
//! # OpenDKIM ([`OpenDkim`])
//! `opendkim -f -x DIR/opendkim.conf`, DIR under `target/tmp` (OpenDKIM
//! refuses a configuration under a world-writable directory such as
//! /tmp); the verifier's configuration:
//! ```text
//! Mode                  v
//! Socket                inet:PORT@127.0.0.1
//! AuthservID            mortal.test
//! AlwaysAddARHeader     yes
//! InternalHosts         DIR/internal-hosts   (192.0.2.255 only: 127.0.0.1 is verified too)
//! ResolverConfiguration DIR/unbound.conf
//! ```
//! where `unbound.conf` (OpenDKIM is built with libunbound) is
//! ```text
//! server:
//!   do-not-query-localhost: no
//!   module-config: "iterator"
//!   local-zone: "test." nodefault     # unbound answers .test itself otherwise (RFC 6761)
//! forward-zone:
//!   name: "."
//!   forward-addr: 127.0.0.1@DNSPORT
//! ```
//! and the signer's (a second instance, [`OpenDkim::signer`], used by
//! [`OpenDkim::sign`]): `Mode s`, `Domain`, `Selector`, `KeyFile` of a
//! [`DkimKey`] made by `opendkim-genkey`, `Canonicalization
//! relaxed/relaxed`, `SignatureAlgorithm rsa-sha256`; it signs what
//! comes from 127.0.0.1 (its default `InternalHosts`). The public key is
//! served by the test DNS at `SELECTOR._domainkey.DOMAIN` ([`DkimKey::publish`]).
//! Both also get `Socket inet:PORT@127.0.0.1`, `Background no`, `Syslog
//! no`, `PidFile` and `TemporaryDirectory` in DIR, and as root `UserID
//! opendkim:opendkim`. OpenDKIM logs only to syslog: its log file stays
//! empty. The verifier answers EOM with INSHEADER (index 0)
//! `Authentication-Results: mortal.test; dkim=pass (2048-bit key;
//! unprotected) header.d=... header.s=... header.b=...` (`dkim=fail` once
//! the body changed), then ACCEPT. Starts in about 0.02 s.
//!
//! # OpenDMARC ([`OpenDmarc`])
//! `opendmarc -f -c DIR/opendmarc.conf`, with `AuthservID mortal.test`,
//! `TrustedAuthservIDs mortal.test` (it reads OpenDKIM's
//! Authentication-Results), `IgnoreHosts DIR/ignore-hosts` (not
//! 127.0.0.1), `SPFSelfValidate true`, `RejectFailures false`. It looks
//! up `_dmarc.DOMAIN` through the system resolver (glibc, port 53 only):
//! so it runs in its own mount namespace whose /etc/resolv.conf names
//! 127.0.0.1 (`unshare --mount --propagation private sh -c 'mount --bind
//! DIR/resolv.conf /etc/resolv.conf && exec opendmarc ...'`), and the
//! test DNS must be [`TestDns::zone_on_port_53`]: root only. Also
//! `Socket inet:PORT@127.0.0.1`, `Background false`, `PidFile`,
//! `FailureReports false`, `Syslog false`, `UserID opendmarc:opendmarc`.
//! It answers EOM with INSHEADER (index 0) `Authentication-Results:
//! mortal.test; spf=pass smtp.mailfrom=example.test` (its own SPF check)
//! and INSHEADER `Authentication-Results: mortal.test; dmarc=pass
//! (p=reject dis=none) header.from=example.test`, then ACCEPT. Starts in
//! about 0.02 s.

use crate::delivery::Guard;
use crate::dns::{TestDns, Zone};
use crate::{TempDir, children_of, process_exists, target_tmp_dir, wait_for_within};
use mortal_proto::milter::{
    Agreement, ClientAddress, Command, Connect, Decoder, EnvelopeArgs, HeaderName, HeaderValue, MacroName,
    MilterAddress, Modification, Offer, ProtocolSteps, Reply, Stage, negotiate,
};
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

/// Longest start of a filter daemon: rspamd compiles its rules and
/// regular expressions first (about 13 s on an idle 2-core machine when
/// its Hyperscan cache is empty, under 1 s from the cache).
pub const START_LIMIT: Duration = Duration::from_secs(90);

/// Longest wait for one milter reply in the test conversations.
pub const REPLY_LIMIT: Duration = Duration::from_secs(30);

/// The authserv-id OpenDKIM and OpenDMARC write and trust.
pub const AUTHSERV_ID: &str = "mortal.test";

/// The host name postgrey puts in its X-Greylist header.
pub const POSTGREY_HOSTNAME: &str = "mortal.test";

/// The path of a test support file, from the package's directory.
fn support_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("support").join(name)
}

/// A loopback port nobody listens on right now: the kernel's choice for
/// a socket bound and closed again. The daemon binds it a moment later.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// The `inet:` endpoint mortal's `[[smtpd.milter]]` and `[[smtpd.policy]]`
/// take for a loopback port.
pub fn inet_endpoint(port: u16) -> String {
    format!("inet:127.0.0.1:{port}")
}

/// Whether the tests run as root: then every daemon runs as its
/// package's user.
fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The (user, group) names the test runs as.
fn own_user_group() -> (String, String) {
    let user = nix::unistd::User::from_uid(nix::unistd::getuid()).ok().flatten().map(|u| u.name).expect("own user");
    let group = nix::unistd::Group::from_gid(nix::unistd::getgid()).ok().flatten().map(|g| g.name).expect("own group");
    (user, group)
}

/// Gives `path` (recursively) to the package user `user` when root, so
/// the daemon can write its state there after dropping privileges.
fn give_to(path: &Path, user: &str) {
    if !is_root() {
        return;
    }
    let u = nix::unistd::User::from_name(user).ok().flatten().unwrap_or_else(|| panic!("no user {user}"));
    let status = Process::new("chown").arg("-R").arg(format!("{}:{}", u.uid, u.gid)).arg(path).status().expect("chown");
    assert!(status.success(), "chown {user} {}", path.display());
}

/// A running daemon: its process, temp dir and log; prints the log when
/// the test fails.
#[derive(Debug)]
struct Daemon {
    what: &'static str,
    log: PathBuf,
    /// Killed outright on drop instead of the guard's SIGTERM: libmilter
    /// takes seconds to notice a SIGTERM, and these keep no state a
    /// test needs.
    kill_on_drop: bool,
    guard: Guard,
    dir: TempDir,
}

impl Daemon {
    /// Starts `cmd` in `dir` with standard output and error to
    /// `dir/NAME.log`, then waits (at most [`START_LIMIT`]) until
    /// 127.0.0.1:`port` accepts.
    fn start(what: &'static str, dir: TempDir, port: u16, cmd: &mut Process) -> Self {
        let log = dir.0.join(format!("{what}.log"));
        let file = fs::File::create(&log).expect("create daemon log");
        let started = Instant::now();
        let guard = Guard::spawn(
            what,
            cmd.current_dir(&dir.0).stdin(Stdio::null()).stdout(file.try_clone().expect("dup log")).stderr(file),
        );
        let mut daemon = Daemon { what, log, kill_on_drop: false, guard, dir };
        let up = wait_for_within(&format!("{what} on 127.0.0.1:{port}"), START_LIMIT, || {
            daemon.guard.assert_running(&daemon.log_text());
            TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
        });
        assert!(
            up.is_some(),
            "{what} did not accept on 127.0.0.1:{port} within {START_LIMIT:?}\n{}",
            daemon.log_text()
        );
        eprintln!("{what} accepting on 127.0.0.1:{port} after {:?}", started.elapsed());
        daemon
    }

    fn log_text(&self) -> String {
        let mut text = String::new();
        for file in [self.log.clone(), self.dir.0.join("log/rspamd.log")] {
            if let Ok(t) = fs::read_to_string(&file) {
                text.push_str(&format!("--- {} ---\n{t}", file.display()));
            }
        }
        text
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{} log:\n{}", self.what, self.log_text());
        }
        if self.kill_on_drop {
            // Our own child, not yet reaped: the pid is still ours.
            let pid = nix::unistd::Pid::from_raw(self.guard.pid() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// postgrey on a loopback port, greylisting for the delay given.
#[derive(Debug)]
pub struct Postgrey {
    pub port: u16,
    daemon: Daemon,
}

impl Postgrey {
    /// # Panics
    /// If `delay` is not whole seconds (postgrey's `--delay` unit).
    pub fn start(delay: Duration) -> Self {
        assert_eq!(delay.subsec_nanos(), 0, "postgrey's delay is whole seconds");
        let dir = TempDir::new("postgrey");
        let d = dir.0.clone();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).expect("chmod postgrey dir");
        fs::create_dir_all(d.join("db")).expect("postgrey db dir");
        // Empty whitelists: Debian's list names no test host, but a test
        // must not depend on that.
        fs::write(d.join("empty"), "").expect("empty whitelist");
        let (user, group) = if is_root() { ("postgrey".to_owned(), "postgrey".to_owned()) } else { own_user_group() };
        give_to(&d.join("db"), &user);
        let port = free_port();
        let daemon = Daemon::start(
            "postgrey",
            dir,
            port,
            Process::new("postgrey")
                .arg(format!("--inet=127.0.0.1:{port}"))
                .arg(format!("--dbdir={}", d.join("db").display()))
                .arg(format!("--delay={}", delay.as_secs()))
                .arg(format!("--hostname={POSTGREY_HOSTNAME}"))
                .arg(format!("--whitelist-clients={}", d.join("empty").display()))
                .arg(format!("--whitelist-recipients={}", d.join("empty").display()))
                .arg(format!("--user={user}"))
                .arg(format!("--group={group}"))
                .arg("-v"),
        );
        Postgrey { port, daemon }
    }

    /// `inet:127.0.0.1:PORT`, for `[[smtpd.policy]] endpoint`.
    pub fn endpoint(&self) -> String {
        inet_endpoint(self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn log_text(&self) -> String {
        self.daemon.log_text()
    }
}

/// The pymilter test milter (tests/support/test_milter.py).
#[derive(Debug)]
pub struct TestMilter {
    pub port: u16,
    /// Where the `headers` case writes what the milter saw (JSON lines).
    pub record: PathBuf,
    daemon: Daemon,
}

impl TestMilter {
    /// The `slow` cases sleep a minute: longer than any test's timeout.
    pub fn start() -> Self {
        Self::start_slow(Duration::from_secs(60))
    }

    /// A test milter whose `slow` and `sloweom` cases sleep `slow`.
    pub fn start_slow(slow: Duration) -> Self {
        let dir = TempDir::new("test-milter");
        let record = dir.0.join("record.jsonl");
        let port = free_port();
        // Debian's python3, where python3-milter is: the first `python3`
        // on PATH may be another.
        let mut daemon = Daemon::start(
            "test_milter",
            dir,
            port,
            Process::new("/usr/bin/python3")
                .arg("-u")
                .arg(support_file("test_milter.py"))
                .arg(format!("inet:{port}@127.0.0.1"))
                .arg(&record)
                .env("TEST_MILTER_SLOW_SECONDS", slow.as_secs_f64().to_string()),
        );
        daemon.kill_on_drop = true;
        TestMilter { port, record, daemon }
    }

    /// `inet:127.0.0.1:PORT`, for `[[smtpd.milter]] endpoint`.
    pub fn endpoint(&self) -> String {
        inet_endpoint(self.port)
    }

    /// Every event the `headers` case recorded so far, in order.
    pub fn records(&self) -> Vec<serde_json::Value> {
        fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("record line is JSON"))
            .collect()
    }

    /// Waits until an `event` was recorded; returns all records.
    pub fn wait_for_record(&self, event: &str) -> Vec<serde_json::Value> {
        wait_for_within(&format!("test milter record {event:?}"), REPLY_LIMIT, || {
            let records = self.records();
            records.iter().any(|r| r["event"] == event).then_some(records)
        })
        .unwrap_or_else(|| panic!("test milter recorded no {event:?}: {:?}\n{}", self.records(), self.log_text()))
    }

    pub fn log_text(&self) -> String {
        self.daemon.log_text()
    }
}

/// The message rspamd (and every spam filter) must reject (GTUBE).
pub const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";

/// The directory under `target/tmp` where every test's rspamd keeps its
/// compiled Hyperscan databases.
pub const RSPAMD_HS_CACHE: &str = "rspamd-hs-cache";

/// rspamd in milter mode (the proxy worker scanning itself).
#[derive(Debug)]
pub struct Rspamd {
    pub port: u16,
    daemon: Daemon,
}

impl Rspamd {
    pub fn start(dns: &TestDns) -> Self {
        let dir = TempDir::new("rspamd");
        let d = dir.0.clone();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).expect("chmod rspamd dir");
        for sub in ["run", "db", "log", "local.d"] {
            fs::create_dir_all(d.join(sub)).expect("rspamd dirs");
        }
        let port = free_port();
        fs::write(
            d.join("rspamd.conf"),
            format!(
                r#".include "$CONFDIR/common.conf"
options {{
    pidfile = "$RUNDIR/rspamd.pid";
    .include "$CONFDIR/options.inc"
    .include(priority=10) "$LOCAL_CONFDIR/override.d/options.inc"
}}
logging {{
    type = "file";
    filename = "$LOGDIR/rspamd.log";
    level = "info";
}}
worker "rspamd_proxy" {{
    bind_socket = "127.0.0.1:{port}";
    milter = yes;
    timeout = 120s;
    count = 1;
    reject_message = "Spam message rejected";
    upstream "local" {{
        default = yes;
        self_scan = yes;
    }}
}}
"#,
            ),
        )
        .expect("write rspamd.conf");
        // rspamd spends seconds compiling its regular expressions and the
        // 9600 TLD suffixes into Hyperscan databases; kept in one cache for
        // every test (and run) of this build, a start takes under a second
        // once one rspamd has filled it. rspamd checks each file's hash.
        let hs_cache = target_tmp_dir().join(RSPAMD_HS_CACHE);
        fs::create_dir_all(&hs_cache).expect("rspamd hyperscan cache dir");
        if is_root() {
            give_to(&hs_cache, "_rspamd");
        }
        // Options that replace Debian's (a higher priority replaces a key
        // whole): the test DNS only, no control socket, temp files here,
        // the shared Hyperscan cache.
        fs::create_dir_all(d.join("override.d")).expect("rspamd override.d");
        fs::write(
            d.join("override.d/options.inc"),
            format!(
                "dns {{\n    nameserver = [\"127.0.0.1:{dns}\"];\n    timeout = 1s;\n    retransmits = 1;\n}}\n\
                 local_addrs = [];\ntempdir = \"{d}/run\";\ncontrol_socket = \"\";\nhs_cache_dir = \"{cache}\";\n",
                dns = dns.port,
                d = d.display(),
                cache = hs_cache.display()
            ),
        )
        .expect("write rspamd override.d/options.inc");
        fs::write(
            d.join("local.d/milter_headers.conf"),
            "use = [\"x-spamd-result\", \"x-spam-status\", \"authentication-results\"];\n\
             skip_local = false;\nskip_authenticated = false;\n",
        )
        .expect("write milter_headers.conf");
        // The only module that would talk to a server outside: rspamd.com's
        // fuzzy storage.
        fs::write(d.join("local.d/fuzzy_check.conf"), "rule \"rspamd.com\" { enabled = false; }\n")
            .expect("write fuzzy_check.conf");
        let mut cmd = Process::new("rspamd");
        cmd.arg("-f").arg("-c").arg(d.join("rspamd.conf"));
        for (var, value) in [
            ("CONFDIR", PathBuf::from("/etc/rspamd")),
            ("LOCAL_CONFDIR", d.clone()),
            ("RUNDIR", d.join("run")),
            ("DBDIR", d.join("db")),
            ("LOGDIR", d.join("log")),
        ] {
            cmd.arg("--var").arg(format!("{var}={}", value.display()));
        }
        if is_root() {
            give_to(&d, "_rspamd");
            cmd.args(["-u", "_rspamd", "-g", "_rspamd"]);
        }
        let daemon = Daemon::start("rspamd", dir, port, &mut cmd);
        Rspamd { port, daemon }
    }

    /// `inet:127.0.0.1:PORT`, for `[[smtpd.milter]] endpoint`.
    pub fn endpoint(&self) -> String {
        inet_endpoint(self.port)
    }

    pub fn log_text(&self) -> String {
        self.daemon.log_text()
    }
}

impl Drop for Rspamd {
    fn drop(&mut self) {
        // The main process's workers: any that outlive its end (it was
        // killed before it could stop them) are killed here, by pid.
        let workers = children_of(self.daemon.guard.pid());
        let main = nix::unistd::Pid::from_raw(self.daemon.guard.pid() as i32);
        let _ = nix::sys::signal::kill(main, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        for pid in workers {
            while process_exists(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let ours = fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| e.ends_with("rspamd"));
            if process_exists(pid) && ours {
                let _ =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

/// A DKIM key pair made by `opendkim-genkey` in a temp dir.
#[derive(Debug)]
pub struct DkimKey {
    pub domain: String,
    pub selector: String,
    pub private: PathBuf,
    /// The TXT record's text (`v=DKIM1; h=sha256; k=rsa; p=...`).
    pub record: String,
    dir: TempDir,
}

impl DkimKey {
    pub fn generate(domain: &str, selector: &str) -> Self {
        let dir = TempDir::new("dkim-key");
        fs::set_permissions(&dir.0, fs::Permissions::from_mode(0o755)).expect("chmod key dir");
        let out = Process::new("opendkim-genkey")
            .args(["-b", "2048", "-h", "sha256", "-D"])
            .arg(&dir.0)
            .args(["-d", domain, "-s", selector])
            .output()
            .expect("run opendkim-genkey");
        assert!(out.status.success(), "opendkim-genkey: {}", String::from_utf8_lossy(&out.stderr));
        let zone_line = fs::read_to_string(dir.0.join(format!("{selector}.txt"))).expect("read genkey's TXT");
        // `sel._domainkey IN TXT ( "v=DKIM1; ..." "p=..." )  ; comment`:
        // the quoted strings, joined.
        let inside = zone_line.split_once('(').and_then(|(_, r)| r.split_once(')')).map(|(i, _)| i).expect("( ... )");
        let record: String = inside.split('"').skip(1).step_by(2).collect();
        DkimKey {
            domain: domain.to_owned(),
            selector: selector.to_owned(),
            private: dir.0.join(format!("{selector}.private")),
            record,
            dir,
        }
    }

    /// The name the public key is looked up at.
    pub fn record_name(&self) -> String {
        format!("{}._domainkey.{}", self.selector, self.domain)
    }

    /// Adds the public key's TXT record to `zone`.
    pub fn publish(&self, zone: &mut Zone) {
        zone.txt(&self.record_name(), &self.record);
    }

    pub fn dir(&self) -> &Path {
        &self.dir.0
    }
}

/// OpenDKIM: a verifier ([`OpenDkim::start`]) or a signer
/// ([`OpenDkim::signer`]).
#[derive(Debug)]
pub struct OpenDkim {
    pub port: u16,
    daemon: Daemon,
}

impl OpenDkim {
    /// A verifier (`Mode v`) asking `dns` for keys, adding
    /// `Authentication-Results: mortal.test; dkim=...`.
    pub fn start(dns: &TestDns) -> Self {
        let dir = TempDir::new_in("opendkim", &target_tmp_dir());
        let d = dir.0.clone();
        fs::write(
            d.join("unbound.conf"),
            format!(
                "server:\n  do-not-query-localhost: no\n  module-config: \"iterator\"\n  local-zone: \"test.\" nodefault\n\
                 forward-zone:\n  name: \".\"\n  forward-addr: 127.0.0.1@{}\n",
                dns.port
            ),
        )
        .expect("write unbound.conf");
        // Not 127.0.0.1: mortal's sessions come from there, and OpenDKIM
        // does not verify mail from its internal hosts.
        fs::write(d.join("internal-hosts"), "192.0.2.255\n").expect("write internal-hosts");
        let port = free_port();
        let conf = format!(
            "Mode v\nAuthservID {AUTHSERV_ID}\nAlwaysAddARHeader yes\nInternalHosts {d}/internal-hosts\n\
             ResolverConfiguration {d}/unbound.conf\nLogWhy yes\n",
            d = d.display()
        );
        Self::run(dir, port, &conf)
    }

    /// A signer (`Mode s`) for `key`'s domain, signing what comes from
    /// 127.0.0.1.
    pub fn signer(key: &DkimKey) -> Self {
        let dir = TempDir::new_in("opendkim-signer", &target_tmp_dir());
        // OpenDKIM reads the key as its user and wants it private to it.
        let key_file = dir.0.join("key.private");
        fs::copy(&key.private, &key_file).expect("copy key");
        if is_root() {
            give_to(&key_file, "opendkim");
        }
        let port = free_port();
        let conf = format!(
            "Mode s\nDomain {}\nSelector {}\nKeyFile {}\nCanonicalization relaxed/relaxed\n\
             SignatureAlgorithm rsa-sha256\nLogWhy yes\n",
            key.domain,
            key.selector,
            key_file.display()
        );
        Self::run(dir, port, &conf)
    }

    fn run(dir: TempDir, port: u16, conf: &str) -> Self {
        let d = dir.0.clone();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).expect("chmod opendkim dir");
        let user = if is_root() { "UserID opendkim:opendkim\n" } else { "" };
        fs::write(
            d.join("opendkim.conf"),
            format!(
                "{conf}Socket inet:{port}@127.0.0.1\nBackground no\nSyslog no\nPidFile {d}/opendkim.pid\n\
                 TemporaryDirectory {d}\n{user}",
                d = d.display()
            ),
        )
        .expect("write opendkim.conf");
        if is_root() {
            give_to(&d, "opendkim");
        }
        let mut daemon = Daemon::start(
            "opendkim",
            dir,
            port,
            Process::new("opendkim").arg("-f").arg("-x").arg(d.join("opendkim.conf")),
        );
        daemon.kill_on_drop = true;
        OpenDkim { port, daemon }
    }

    /// `inet:127.0.0.1:PORT`, for `[[smtpd.milter]] endpoint`.
    pub fn endpoint(&self) -> String {
        inet_endpoint(self.port)
    }

    /// Signs `message` (CRLF lines) through this signer: its
    /// DKIM-Signature header, then the message.
    pub fn sign(&self, from: &str, to: &str, message: &[u8]) -> Vec<u8> {
        let mut milter = MilterConversation::open(self.port, Offer::default());
        let client = "127.0.0.1:40000".parse().expect("address");
        let outcome = milter.message(client, from, &[to], message);
        assert!(matches!(outcome.reply, Reply::Continue | Reply::Accept), "signer: {outcome:?}\n{}", self.log_text());
        let signature = outcome
            .modifications()
            .into_iter()
            .find_map(|m| match m {
                Modification::InsertHeader { name, value, .. } | Modification::AddHeader { name, value }
                    if name.as_str().eq_ignore_ascii_case("DKIM-Signature") =>
                {
                    Some(value)
                }
                _ => None,
            })
            .unwrap_or_else(|| panic!("signer added no DKIM-Signature: {outcome:?}\n{}", self.log_text()));
        // OpenDKIM asks for HDR_LEADSPC: its value brings its own space.
        let mut signed = b"DKIM-Signature:".to_vec();
        if !signature.as_bytes().starts_with(b" ") && !signature.as_bytes().starts_with(b"\t") {
            signed.push(b' ');
        }
        signed.extend(crlf(signature.as_bytes()));
        signed.extend_from_slice(b"\r\n");
        signed.extend_from_slice(message);
        signed
    }

    pub fn log_text(&self) -> String {
        self.daemon.log_text()
    }
}

/// `text` with every line break as CRLF (milters fold with LF).
fn crlf(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + 8);
    for (i, &b) in text.iter().enumerate() {
        if b == b'\n' && (i == 0 || text[i - 1] != b'\r') {
            out.push(b'\r');
        }
        out.push(b);
    }
    out
}

/// OpenDMARC, reading OpenDKIM's Authentication-Results.
#[derive(Debug)]
pub struct OpenDmarc {
    pub port: u16,
    daemon: Daemon,
}

impl OpenDmarc {
    /// # Panics
    /// Unless `dns` serves on port 53 ([`TestDns::zone_on_port_53`], root
    /// only): OpenDMARC asks the system resolver, which knows no other
    /// port; and unless root, to give it its own /etc/resolv.conf.
    pub fn start(dns: &TestDns) -> Self {
        assert_eq!(dns.port, 53, "OpenDMARC needs the test DNS on 127.0.0.1:53 (TestDns::zone_on_port_53, as root)");
        assert!(is_root(), "OpenDMARC needs root: a mount namespace for its own /etc/resolv.conf");
        let dir = TempDir::new("opendmarc");
        let d = dir.0.clone();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).expect("chmod opendmarc dir");
        fs::write(d.join("resolv.conf"), "nameserver 127.0.0.1\noptions attempts:1 timeout:2\n")
            .expect("write resolv.conf");
        fs::write(d.join("ignore-hosts"), "192.0.2.255\n").expect("write ignore-hosts");
        let port = free_port();
        fs::write(
            d.join("opendmarc.conf"),
            format!(
                "AuthservID {AUTHSERV_ID}\nTrustedAuthservIDs {AUTHSERV_ID}\nSocket inet:{port}@127.0.0.1\n\
                 Background false\nPidFile {d}/opendmarc.pid\nIgnoreHosts {d}/ignore-hosts\n\
                 SPFSelfValidate true\nRejectFailures false\nFailureReports false\nSyslog false\n\
                 UserID opendmarc:opendmarc\n",
                d = d.display()
            ),
        )
        .expect("write opendmarc.conf");
        give_to(&d, "opendmarc");
        // unshare execs the shell, the shell execs opendmarc: one pid,
        // the guard's, throughout.
        let script = format!(
            "mount --bind {d}/resolv.conf /etc/resolv.conf && exec opendmarc -f -c {d}/opendmarc.conf",
            d = d.display()
        );
        let mut daemon = Daemon::start(
            "opendmarc",
            dir,
            port,
            Process::new("unshare").args(["--mount", "--propagation", "private", "sh", "-c", &script]),
        );
        daemon.kill_on_drop = true;
        OpenDmarc { port, daemon }
    }

    /// `inet:127.0.0.1:PORT`, for `[[smtpd.milter]] endpoint`.
    pub fn endpoint(&self) -> String {
        inet_endpoint(self.port)
    }

    pub fn log_text(&self) -> String {
        self.daemon.log_text()
    }
}

/// The end of one message's milter conversation: the stage it ended at,
/// the final reply there, and what came before it at that stage
/// (modifications, QUARANTINE, PROGRESS at the end of the message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub stage: Stage,
    pub reply: Reply,
    pub effects: Vec<Reply>,
}

impl Outcome {
    pub fn modifications(&self) -> Vec<Modification> {
        self.effects
            .iter()
            .filter_map(|r| match r {
                Reply::Modify(m) => Some(m.clone()),
                _ => None,
            })
            .collect()
    }
}

/// The MTA's side of a milter conversation over TCP, through
/// mortal_proto's codec: what the lead's client does, in a test's terms.
#[derive(Debug)]
pub struct MilterConversation {
    stream: TcpStream,
    decoder: Decoder,
    pub agreement: Agreement,
    /// The macros sent before each stage's command (`i`, `j` and the
    /// addresses by default); a test may change them.
    pub macros: Vec<(Stage, Vec<(MacroName, String)>)>,
}

impl MilterConversation {
    /// Connects, offers `offer`, and negotiates.
    pub fn open(port: u16, offer: Offer) -> Self {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to milter");
        stream.set_read_timeout(Some(REPLY_LIMIT)).expect("read timeout");
        let mut conv =
            MilterConversation { stream, decoder: Decoder::new(), agreement: dummy_agreement(), macros: Vec::new() };
        conv.write(&Command::OptNeg(offer));
        let answer = conv.read(|d| d.next_options());
        conv.agreement = negotiate(&offer, &answer).unwrap_or_else(|e| panic!("negotiate {answer:?}: {e}"));
        eprintln!(
            "milter 127.0.0.1:{port}: version {}, actions {:?}, steps {:?}, macros {:?}",
            conv.agreement.version, conv.agreement.actions, conv.agreement.steps, answer.macro_lists
        );
        let m = |n: &str| MacroName::new(n).expect("macro name");
        conv.macros = vec![
            (Stage::Connect, vec![(m("j"), "mortal.test".into()), (m("{daemon_name}"), "mortal".into())]),
            (Stage::Mail, vec![(m("i"), "4TESTQUEUEID".into())]),
            (Stage::Rcpt, vec![(m("i"), "4TESTQUEUEID".into())]),
            (Stage::Data, vec![(m("i"), "4TESTQUEUEID".into())]),
            (Stage::EndOfHeaders, vec![(m("i"), "4TESTQUEUEID".into())]),
            (Stage::EndOfMessage, vec![(m("i"), "4TESTQUEUEID".into())]),
        ];
        conv
    }

    fn write(&mut self, command: &Command) {
        let mut out = Vec::new();
        command.encode(&mut out).unwrap_or_else(|e| panic!("encode {command:?}: {e}"));
        self.stream.write_all(&out).unwrap_or_else(|e| panic!("send {}: {e}", command.name()));
    }

    fn read<T>(
        &mut self,
        mut next: impl FnMut(&mut Decoder) -> Result<Option<T>, mortal_proto::milter::MilterError>,
    ) -> T {
        let mut buf = [0u8; 8192];
        loop {
            if let Some(v) = next(&mut self.decoder).unwrap_or_else(|e| panic!("milter sent garbage: {e}")) {
                return v;
            }
            let n = match self.stream.read(&mut buf) {
                Ok(n) => n,
                // A signal meant for another test's thread.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => panic!("read from milter: {e}"),
            };
            assert!(n > 0, "milter closed the connection");
            self.decoder.feed(&buf[..n]);
        }
    }

    fn send_macros(&mut self, stage: Stage) {
        let macros = self.macros.iter().find(|(s, _)| *s == stage).map(|(_, m)| m.clone());
        if let Some(macros) = macros.filter(|m| !m.is_empty()) {
            self.write(&Command::Macro { stage, macros });
        }
    }

    /// Sends the event of `stage` (its macros first) and, if the filter
    /// answers that stage, reads up to its final reply: `None` when
    /// nothing was sent or no reply is due.
    pub fn send(&mut self, stage: Stage, command: &Command) -> Option<Outcome> {
        self.send_macros(stage);
        if stage != Stage::EndOfMessage && !self.agreement.sends(stage) {
            return None;
        }
        self.write(command);
        if stage != Stage::EndOfMessage && !self.agreement.expects_reply(stage) {
            return None;
        }
        let mut effects = Vec::new();
        loop {
            let reply = self.read(|d| d.next_reply());
            self.agreement.permits(&reply).unwrap_or_else(|e| panic!("{e}: {reply:?}"));
            match reply {
                Reply::Modify(_) | Reply::Quarantine(_) | Reply::Progress => effects.push(reply),
                _ => return Some(Outcome { stage, reply, effects }),
            }
        }
    }

    /// One message from `client`: CONNECT, HELO, MAIL, each RCPT, DATA,
    /// the headers of `message` (CRLF lines), EOH, its body, EOM; stops at
    /// the first reply that is not CONTINUE (a rejected RCPT too). A
    /// conversation carries one message.
    pub fn message(&mut self, client: SocketAddrV4, from: &str, to: &[&str], message: &[u8]) -> Outcome {
        let address = |a: &str| MilterAddress::new(&format!("<{a}>")).expect("milter address");
        let connect =
            Command::Connect(Connect { hostname: "client.example.test".into(), address: ClientAddress::Inet(client) });
        let mut steps = vec![
            (Stage::Connect, connect),
            (Stage::Helo, Command::Helo("client.example.test".into())),
            (Stage::Mail, Command::Mail(EnvelopeArgs { address: address(from), params: Vec::new() })),
        ];
        for rcpt in to {
            steps.push((Stage::Rcpt, Command::Rcpt(EnvelopeArgs { address: address(rcpt), params: Vec::new() })));
        }
        steps.push((Stage::Data, Command::Data));
        let leading_space = self.agreement.steps.contains(ProtocolSteps::HDR_LEADSPC);
        let (headers, body) = split_message(message, leading_space);
        for (name, value) in headers {
            steps.push((Stage::Header, Command::Header { name, value }));
        }
        steps.push((Stage::EndOfHeaders, Command::EndOfHeaders));
        for (stage, command) in steps {
            if let Some(outcome) = self.send(stage, &command)
                && outcome.reply != Reply::Continue
            {
                return outcome;
            }
        }
        for chunk in Command::body_chunks(body) {
            match self.send(Stage::Body, &chunk) {
                Some(o) if o.reply == Reply::Skip => break,
                Some(o) if o.reply != Reply::Continue => return o,
                _ => {}
            }
        }
        self.send(Stage::EndOfMessage, &Command::EndOfMessage).expect("a reply to end of message")
    }

    /// Ends the conversation.
    pub fn quit(mut self) {
        self.write(&Command::Quit);
    }
}

/// Stands in until the negotiation's own agreement replaces it.
fn dummy_agreement() -> Agreement {
    let answer = mortal_proto::milter::MilterOptions { version: 6, actions: 0, steps: 0, macro_lists: Vec::new() };
    negotiate(&Offer::default(), &answer).expect("the empty answer is agreeable")
}

/// The header fields (into name and value as a milter gets them: the
/// value without the space after the colon unless `leading_space`, as
/// HDR_LEADSPC asks, folds kept) and the body of a CRLF message.
pub fn split_message(message: &[u8], leading_space: bool) -> (Vec<(HeaderName, HeaderValue)>, &[u8]) {
    let end = message.windows(4).position(|w| w == b"\r\n\r\n").map_or(message.len(), |i| i + 2);
    let body = message.get(end + 2..).unwrap_or(&[]);
    let mut fields: Vec<Vec<u8>> = Vec::new();
    for line in message[..end].split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        match (line[0], fields.last_mut()) {
            (b' ' | b'\t', Some(field)) => {
                field.extend_from_slice(b"\r\n");
                field.extend_from_slice(line);
            }
            _ => fields.push(line.to_vec()),
        }
    }
    let headers = fields
        .iter()
        .map(|f| {
            let colon = f.iter().position(|&b| b == b':').expect("header field with a colon");
            let name = HeaderName::new(std::str::from_utf8(&f[..colon]).expect("ASCII name")).expect("field name");
            let raw = &f[colon + 1..];
            let value = if leading_space { raw } else { raw.strip_prefix(b" ").unwrap_or(raw) };
            (name, HeaderValue::new(value).expect("header value"))
        })
        .collect();
    (headers, body)
}
