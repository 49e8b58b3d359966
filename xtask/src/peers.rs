//! Exim and OpenSMTPD beside mortal and Postfix in `cargo xtask bench`.
//!
//! Debian's MTA packages conflict with one another (installing one removes
//! Postfix, and with it the `smtp-source` the bench drives the load with),
//! so neither is installed: `apt-get download` fetches the package and
//! `dpkg-deb -x` unpacks it under `target/bench/peers/<name>/root`, where
//! later runs find it again. Only the libraries it depends on and the host
//! lacks are installed, with `apt-get install` (library packages conflict
//! with nothing).
//!
//! Each peer runs in mount and PID namespaces of its own (`unshare`, mount
//! propagation private, so nothing it mounts is seen outside):
//!
//! - mounts: the user it must run as (`Debian-exim`, `opensmtpd` and
//!   `opensmtpq`, compiled into the binaries) exists only in a private copy
//!   of `/etc/passwd` and `/etc/group` bound over the real ones, so the host
//!   gains no user; `/etc/resolv.conf` is replaced by one that points at
//!   127.0.0.1 and, for OpenSMTPD's own resolver, looks in `/etc/hosts`
//!   only: neither server can reach the host's resolver (off the machine)
//!   even if a lookup slipped through the configs, which use literal
//!   addresses and turn every lookup off. OpenSMTPD's queue, control
//!   socket, chroot and helper paths are compiled in (`/var/spool/smtpd`,
//!   `/var/run/smtpd.sock`, `/var/lib/opensmtpd/empty`,
//!   `/usr/libexec/opensmtpd`), so private directories are bound over
//!   `/var/spool`, `/run`, `/var/lib` and `/usr/libexec` there.
//! - PID: the server is the namespace's init, so the processes it leaves
//!   behind (Exim's delivery processes outlive the reception process that
//!   forked them) are reaped by it and their CPU time stays in the tree the
//!   bench measures from `unshare`; and killing that init kills every
//!   process of the namespace, which is how a peer is stopped (a setuid
//!   exec clears the parent-death signal, so `unshare --kill-child` alone
//!   would not).
//!
//! What each does with a message, and how durably, is in [`Kind::setup`].

use crate::bench::{count_files, wait_bounded};
use crate::chaos;
use anyhow::{Context, Result, bail};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Longest an `apt-get` call may take (a download, an update, an install).
const APT_BOUND: Duration = Duration::from_secs(600);

/// Longest a local tool (`dpkg-deb`, `ldd`, `chattr`) may take.
const TOOL_BOUND: Duration = Duration::from_secs(60);

/// Longest a peer may take to greet after it was started.
const START_BOUND: Duration = Duration::from_secs(30);

/// Longest a killed peer's namespace may take to go.
const STOP_BOUND: Duration = Duration::from_secs(10);

/// The resolver config inside the namespaces: a nameserver on loopback
/// (nothing listens on port 53 there, so a query fails at once and never
/// leaves the machine), and `lookup file` for OpenSMTPD's resolver
/// (libasr), which then answers from `/etc/hosts` alone; glibc ignores
/// that keyword.
const RESOLV_CONF: &str = "nameserver 127.0.0.1\nlookup file\n";

/// The user a peer delivers (discards) as, which every Debian system has.
const DELIVERY_USER: &str = "nobody";

/// The home OpenSMTPD is told [`DELIVERY_USER`] has (nobody's own,
/// `/nonexistent`, makes it log a warning per delivery when it looks for
/// a `.forward` there): its chroot directory inside the namespace, empty.
const DELIVERY_HOME: &str = "/var/lib/opensmtpd/empty";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Exim,
    OpenSmtpd,
}

/// Every peer, in report order.
pub const KINDS: [Kind; 2] = [Kind::Exim, Kind::OpenSmtpd];

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Exim => "Exim",
            Kind::OpenSmtpd => "OpenSMTPD",
        }
    }

    /// The Debian package with the server; nothing else of the MTA's
    /// packages is needed with a config of our own.
    fn package(self) -> &'static str {
        match self {
            Kind::Exim => "exim4-daemon-light",
            Kind::OpenSmtpd => "opensmtpd",
        }
    }

    /// The server binary in the unpacked tree.
    fn binary(self) -> &'static str {
        match self {
            Kind::Exim => "usr/sbin/exim4",
            Kind::OpenSmtpd => "usr/sbin/smtpd",
        }
    }

    /// Directory name under `target/bench`.
    pub fn dir_name(self) -> &'static str {
        match self {
            Kind::Exim => "exim",
            Kind::OpenSmtpd => "opensmtpd",
        }
    }

    /// Users the binary looks up by a compiled-in name (Debian's build).
    fn users(self) -> &'static [&'static str] {
        match self {
            Kind::Exim => &["Debian-exim"],
            Kind::OpenSmtpd => &["opensmtpd", "opensmtpq"],
        }
    }

    /// How the peer is set up and how durable its 250 is, for the report.
    fn setup(self, synchronous_queue: bool) -> String {
        match self {
            Kind::Exim => "Exim (exim4-daemon-light, own config via -C, daemon in the foreground): fsyncs the \
                           data file, the header file and the spool directory before its 250 (three fsyncs per \
                           message); every message is delivered at once by a process forked after the 250 \
                           (Exim's default background delivery, not -odq: queue-only would leave every message \
                           in the queue for a queue runner), in receive-and-queue mode to :blackhole: (a \
                           redirect router: the queue files are removed, as Postfix's discard does), end to end \
                           by LMTP to the shared smtp-sink, one connection per message; no host lookups, no \
                           ident, no verification, no TLS, per-message logs as by default; smtp_accept_max 100 \
                           and a listen backlog of 100 (the others' process limit), no per-connection message \
                           limit"
                .to_owned(),
            Kind::OpenSmtpd => format!(
                "OpenSMTPD (opensmtpd, smtpd -d -f own config): never fsyncs a new message; {}; in \
                 receive-and-queue mode each message is delivered by `mda \"cat > /dev/null\"` (OpenSMTPD has \
                 no discard action: this is its cheapest local delivery, a helper process per message; relaying \
                 to a sink drains far slower than it receives), end to end by its lmtp action to the shared \
                 smtp-sink (also a helper process per recipient); every recipient maps to the user nobody \
                 through a catch-all virtual table; session message limit raised from 100 to 1,000,000 \
                 (burst sends ~100 per session); its listen backlog is 5, compiled in (SMTPD_BACKLOG), so when \
                 the 20 clients connect at once the connections past it are retried by the client's TCP after \
                 1 s or more: that dominates churn (a connection per message) and costs burst, big and rcpts \
                 up to a few seconds at their start",
                if synchronous_queue {
                    "its queue directory has `chattr +S` (every write and directory change synchronous, inherited \
                     by the queue's subdirectories), the closest equivalent of an fsync before 250 and an upper \
                     bound on its cost (a 100 KiB message is many synchronous writes)"
                } else {
                    "`chattr +S` on its queue directory failed on this file system, so it ran without any \
                     synchronous write: its figures are not durable ones"
                }
            ),
        }
    }
}

/// A peer's package, unpacked.
pub struct Unpacked {
    pub kind: Kind,
    root: PathBuf,
    /// The Debian package version.
    pub version: String,
}

/// Fetches and unpacks every peer. A peer that cannot be set up is left
/// out, with a line on stderr and in `notes` saying why; the bench goes
/// on with the others.
pub fn prepare_all(dir: &Path, notes: &mut Vec<String>) -> Vec<Unpacked> {
    let mut out = Vec::new();
    for kind in KINDS {
        eprintln!("==> setting up {} ({})", kind.name(), kind.package());
        match prepare(kind, &dir.join("peers").join(kind.dir_name())) {
            Ok(u) => {
                notes.push(format!("{} is Debian's {} {}", kind.name(), kind.package(), u.version));
                out.push(u);
            }
            Err(e) => {
                let line = format!("{} not measured: cannot set it up: {e:#}", kind.name());
                eprintln!("==> {line}");
                notes.push(line);
            }
        }
    }
    out
}

/// The unpacked package of `kind` under `dir`: as left by an earlier run,
/// or downloaded and unpacked now (with the libraries it needs).
fn prepare(kind: Kind, dir: &Path) -> Result<Unpacked> {
    if !crate::is_root() {
        bail!("needs root (apt-get, mount namespaces)");
    }
    let dir = std::path::absolute(dir)?;
    let (root, debs, log) = (dir.join("root"), dir.join("debs"), dir.join("apt.log"));
    let stamp = dir.join("version");
    if let (Ok(version), true) = (fs::read_to_string(&stamp), root.join(kind.binary()).exists()) {
        check_libraries(kind, &root)?;
        return Ok(Unpacked { kind, root, version: version.trim().to_owned() });
    }
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&debs)?;
    let download = || {
        bounded(
            &format!("apt-get download {}", kind.package()),
            Command::new("apt-get").args(["download", "-qq", kind.package()]).current_dir(&debs),
            APT_BOUND,
            &log,
        )
    };
    // A fresh container may have no package lists yet.
    if download().is_err() {
        bounded("apt-get update", Command::new("apt-get").args(["update", "-qq"]), APT_BOUND, &log)?;
        download()?;
    }
    let deb = fs::read_dir(&debs)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("apt-get download {} left no .deb in {}", kind.package(), debs.display()))?;
    let field = |name: &str| -> Result<String> {
        Ok(bounded(
            &format!("dpkg-deb -f {name}"),
            Command::new("dpkg-deb").arg("-f").arg(&deb).arg(name),
            TOOL_BOUND,
            &log,
        )?
        .trim()
        .to_owned())
    };
    let version = field("Version")?;
    install_libraries(&field("Depends")?, &log)?;
    bounded("dpkg-deb -x", Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root), TOOL_BOUND, &log)?;
    check_libraries(kind, &root)?;
    fs::write(&stamp, &version)?;
    Ok(Unpacked { kind, root, version })
}

/// Installs the library packages named in `depends` (a Debian Depends
/// field) that the host lacks. Other dependencies (the MTA's other
/// packages, debconf, adduser) are not needed by the binary and may
/// conflict, so they are left alone.
fn install_libraries(depends: &str, log: &Path) -> Result<()> {
    let installed = |pkg: &str| {
        Command::new("dpkg-query")
            .args(["-W", "-f=${db:Status-Status}", pkg])
            .output()
            .is_ok_and(|o| o.status.success() && o.stdout == b"installed")
    };
    let mut missing = Vec::new();
    for group in depends.split(',') {
        let alternatives: Vec<&str> = group
            .split('|')
            .filter_map(|a| a.split_whitespace().next())
            .map(|a| a.split(':').next().unwrap_or(a))
            .collect();
        if let Some(first) = alternatives.first().filter(|a| a.starts_with("lib"))
            && !alternatives.iter().any(|a| installed(a))
        {
            missing.push(first.to_string());
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let install = || {
        bounded(
            &format!("apt-get install {}", missing.join(" ")),
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
            APT_BOUND,
            log,
        )
    };
    if install().is_err() {
        bounded("apt-get update", Command::new("apt-get").args(["update", "-qq"]), APT_BOUND, log)?;
        install()?;
    }
    Ok(())
}

/// Fails, naming them, if the binary still lacks shared libraries.
fn check_libraries(kind: Kind, root: &Path) -> Result<()> {
    let binary = root.join(kind.binary());
    let out = bounded("ldd", Command::new("ldd").arg(&binary), TOOL_BOUND, &root.with_file_name("apt.log"))?;
    let missing: Vec<&str> = out.lines().filter(|l| l.contains("not found")).map(str::trim).collect();
    if !missing.is_empty() {
        bail!("{} lacks libraries: {}", binary.display(), missing.join("; "));
    }
    Ok(())
}

/// Runs `cmd` for at most `bound`, its stderr appended to `log`; returns
/// its stdout (small: a field, an ldd listing), or fails with the log's
/// tail.
fn bounded(what: &str, cmd: &mut Command, bound: Duration, log: &Path) -> Result<String> {
    let err = fs::OpenOptions::new().create(true).append(true).open(log)?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(err)
        .spawn()
        .with_context(|| format!("cannot run {what}"))?;
    let status = wait_bounded(&mut child, bound).with_context(|| what.to_owned())?;
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = std::io::Read::read_to_string(&mut stdout, &mut out);
    }
    if !status.success() {
        bail!("{what} failed ({status}): {}", tail(log));
    }
    Ok(out)
}

/// The last lines of a log file, for an error message.
fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    let lines: Vec<&str> = lines.into_iter().rev().collect();
    format!("{} (from {})", lines.join(" | "), path.display())
}

/// One running peer in its namespaces; dropping it kills them.
pub struct Peer {
    pub kind: Kind,
    pub port: u16,
    /// What was set up, and how durable its 250 is, for the report.
    pub setup: String,
    /// Directories whose files are the peer's queue.
    queue: Vec<PathBuf>,
    log: PathBuf,
    /// `unshare`: its child is the namespace's init, the server.
    unshare: Option<Child>,
}

impl Peer {
    /// Starts `unpacked` with a fresh instance directory `dir`, listening
    /// on a free loopback port; delivery discards, or given a port, goes
    /// by LMTP to that sink. Returns once the server greets.
    pub fn start(unpacked: &Unpacked, dir: &Path, lmtp: Option<u16>) -> Result<Peer> {
        let kind = unpacked.kind;
        let dir = std::path::absolute(dir)?;
        let _ = fs::remove_dir_all(&dir);
        let ns = dir.join("ns");
        fs::create_dir_all(&ns)?;
        let port = chaos::free_port()?;
        let users = private_users(kind.users(), &ns)?;
        let delivery_ids = user_ids(&fs::read_to_string("/etc/passwd")?, DELIVERY_USER)
            .with_context(|| format!("no user {DELIVERY_USER} in /etc/passwd"))?;
        fs::write(ns.join("resolv.conf"), RESOLV_CONF)?;
        // Bound in this order: resolv.conf before /run, in case the host's
        // is a link into /run (then the private /run hides it, and the
        // resolver's default is loopback too).
        let mut binds: Vec<(PathBuf, &str)> = vec![
            (ns.join("passwd"), "/etc/passwd"),
            (ns.join("group"), "/etc/group"),
            (ns.join("resolv.conf"), "/etc/resolv.conf"),
        ];
        let binary = unpacked.root.join(kind.binary());
        let (exec, queue, setup): (Vec<String>, Vec<PathBuf>, String) = match kind {
            Kind::Exim => {
                let (spool, logs) = (dir.join("spool"), dir.join("log"));
                let (uid, gid) = users[0];
                for d in [&spool, &logs] {
                    fs::create_dir_all(d)?;
                    std::os::unix::fs::chown(d, Some(uid), Some(gid))?;
                }
                let config = dir.join("exim.conf");
                fs::write(&config, exim_config(&binary, &spool, &logs, port, lmtp))?;
                let exec = vec![path_str(&binary)?, "-C".into(), path_str(&config)?, "-bdf".into()];
                (exec, vec![spool.join("input")], kind.setup(true))
            }
            Kind::OpenSmtpd => {
                let (spool, run, lib) = (ns.join("spool"), ns.join("run"), ns.join("lib"));
                let queue = spool.join("smtpd");
                fs::create_dir_all(&queue)?;
                fs::create_dir_all(&run)?;
                fs::create_dir_all(lib.join("opensmtpd/empty"))?;
                // smtpd refuses a queue root that is not root's and 0711.
                fs::set_permissions(&queue, std::os::unix::fs::PermissionsExt::from_mode(0o711))?;
                let synchronous = bounded(
                    "chattr +S",
                    Command::new("chattr").arg("+S").arg(&queue),
                    TOOL_BOUND,
                    &dir.join("chattr.log"),
                )
                .is_ok();
                let config = dir.join("smtpd.conf");
                fs::write(&config, opensmtpd_config(port, lmtp, delivery_ids))?;
                binds.extend([
                    (run, "/run"),
                    (spool, "/var/spool"),
                    (lib, "/var/lib"),
                    (unpacked.root.join("usr/libexec"), "/usr/libexec"),
                ]);
                let exec = vec![path_str(&binary)?, "-d".into(), "-f".into(), path_str(&config)?];
                (exec, vec![queue.join("incoming"), queue.join("queue")], kind.setup(synchronous))
            }
        };
        let mut script =
            String::from("# cargo xtask bench: private mounts, then the server as this PID namespace's init\n");
        for (from, to) in &binds {
            script.push_str(&format!("mount --bind {} {to}\n", quote(&path_str(from)?)));
        }
        script.push_str("exec");
        for arg in &exec {
            script.push(' ');
            script.push_str(&quote(arg));
        }
        script.push('\n');
        let script_path = dir.join("namespace.sh");
        fs::write(&script_path, script)?;
        let log = dir.join("server.log");
        let out = fs::File::create(&log)?;
        let unshare = Command::new("unshare")
            .args(["--mount", "--pid", "--fork", "--kill-child", "--", "sh", "-e"])
            .arg(&script_path)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("cannot run unshare (util-linux)")?;
        // From here on the guard owns the process: any failure below kills it.
        let mut peer = Peer { kind, port, setup, queue, log, unshare: Some(unshare) };
        peer.wait_greeting()?;
        Ok(peer)
    }

    /// Waits for a 220 on the port, failing early if the namespace exited.
    fn wait_greeting(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_BOUND;
        while Instant::now() < deadline {
            if let Some(status) = self.unshare.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.unshare = None;
                bail!("{} exited during start-up ({status}): {}", self.kind.name(), tail(&self.log));
            }
            if greets(self.port) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("{} did not greet on port {} within {START_BOUND:?}: {}", self.kind.name(), self.port, tail(&self.log))
    }

    /// The process whose tree holds every process of the peer (`unshare`).
    pub fn root_pid(&self) -> Option<u32> {
        self.unshare.as_ref().map(Child::id)
    }

    /// Files in the peer's queue: messages received and not yet delivered.
    pub fn queue_len(&self) -> usize {
        self.queue.iter().map(|q| count_files(q)).sum()
    }

    /// SIGKILLs the namespace's init, which takes every process of the
    /// namespace with it, then reaps `unshare` (bounded; killed if it
    /// lingers).
    pub fn stop(&mut self) {
        let Some(mut unshare) = self.unshare.take() else { return };
        if let Some(init) = child_of(unshare.id()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(init as i32), nix::sys::signal::Signal::SIGKILL);
        }
        if let Err(e) = wait_bounded(&mut unshare, STOP_BOUND) {
            eprintln!("warning: {} did not stop: {e:#}", self.kind.name());
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether a server on `port` answers with a 220 greeting.
fn greets(port: u16) -> bool {
    let Ok(stream) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    if stream.set_read_timeout(Some(Duration::from_secs(2))).is_err() {
        return false;
    }
    let mut line = String::new();
    let ok = BufReader::new(&stream).read_line(&mut line).is_ok() && line.starts_with("220");
    let _ = (&stream).write_all(b"QUIT\r\n");
    ok
}

/// A child of `pid`, from /proc (`unshare --fork` has exactly one).
fn child_of(pid: u32) -> Option<u32> {
    fs::read_dir("/proc").ok()?.flatten().filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok()).find(|p| {
        fs::read_to_string(format!("/proc/{p}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse::<u32>().ok())
            == Some(pid)
    })
}

/// The uid and gid of `name` in `passwd` (the text of an /etc/passwd).
fn user_ids(passwd: &str, name: &str) -> Option<(u32, u32)> {
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&name)).then(|| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?))).flatten()
    })
}

/// Writes `ns/passwd` and `ns/group`: the host's, plus each of `names`
/// the host lacks, as a system user and group of the same free id (no
/// login, no home). Returns each name's uid and gid.
fn private_users(names: &[&str], ns: &Path) -> Result<Vec<(u32, u32)>> {
    let mut passwd = fs::read_to_string("/etc/passwd")?;
    let mut group = fs::read_to_string("/etc/group")?;
    let ids = |text: &str| -> Vec<u32> { text.lines().filter_map(|l| l.split(':').nth(2)?.parse().ok()).collect() };
    let mut out = Vec::new();
    for name in names {
        if let Some(ids) = user_ids(&passwd, name) {
            out.push(ids);
            continue;
        }
        let (taken_uids, taken_gids) = (ids(&passwd), ids(&group));
        // The system range, from the top, where adduser --system would not
        // look first.
        let id = (100..1000u32)
            .rev()
            .find(|i| !taken_uids.contains(i) && !taken_gids.contains(i))
            .context("no free system uid and gid")?;
        if !passwd.ends_with('\n') {
            passwd.push('\n');
        }
        if !group.ends_with('\n') {
            group.push('\n');
        }
        passwd.push_str(&format!("{name}:x:{id}:{id}:cargo xtask bench:/nonexistent:/usr/sbin/nologin\n"));
        group.push_str(&format!("{name}:x:{id}:\n"));
        out.push((id, id));
    }
    fs::write(ns.join("passwd"), passwd)?;
    fs::write(ns.join("group"), group)?;
    Ok(out)
}

/// Exim's config: the bench's domain accepted from anyone on loopback,
/// nothing looked up, each message delivered right after its 250 (to
/// :blackhole:, or by LMTP to the sink).
fn exim_config(binary: &Path, spool: &Path, logs: &Path, port: u16, lmtp: Option<u16>) -> String {
    let domain = chaos::DOMAIN;
    let (router, transport) = match lmtp {
        None => ("  driver = redirect\n  data = :blackhole:\n".to_owned(), String::new()),
        // `self = send` and `allow_localhost`: the sink is on an address of
        // this host, which Exim otherwise takes for a routing loop.
        Some(sink) => (
            "  driver = manualroute\n  route_list = * 127.0.0.1\n  transport = lmtp_sink\n  self = send\n".to_owned(),
            format!(
                "lmtp_sink:\n  driver = smtp\n  protocol = lmtp\n  port = {sink}\n  allow_localhost\n  \
                 hosts_avoid_tls = *\n"
            ),
        ),
    };
    format!(
        "# cargo xtask bench: Exim beside mortal and Postfix.\n\
         keep_environment =\n\
         primary_hostname = exim.bench.test\n\
         exim_path = {binary}\n\
         spool_directory = {spool}\n\
         log_file_path = {logs}/%slog\n\
         pid_file_path = {logs}/exim.pid\n\
         local_interfaces = 127.0.0.1\n\
         daemon_smtp_ports = {port}\n\
         domainlist local_domains = {domain}\n\
         # No reverse lookups, no ident, no TLS: literal addresses only.\n\
         host_lookup =\n\
         rfc1413_hosts =\n\
         tls_advertise_hosts =\n\
         # The others' process limit, and no per-connection limits: burst\n\
         # sends about 100 messages a session, and past\n\
         # smtp_accept_queue_per_connection Exim would only queue them, for a\n\
         # queue runner this instance does not have.\n\
         smtp_accept_max = 100\n\
         smtp_connect_backlog = 100\n\
         smtp_accept_max_per_connection = 0\n\
         smtp_accept_queue_per_connection = 0\n\
         recipients_max = 1000\n\
         # Delivery runs as the Exim user: then the reception process forks it\n\
         # rather than re-executing Exim to regain root, which -C (a config\n\
         # that is not Exim's own) would refuse anyway.\n\
         deliver_drop_privilege = true\n\
         acl_smtp_rcpt = acl_check_rcpt\n\
         \n\
         begin acl\n\
         acl_check_rcpt:\n  accept domains = +local_domains\n  deny message = relay not permitted\n\
         \n\
         begin routers\n\
         bench:\n  domains = +local_domains\n{router}\
         \n\
         begin transports\n\
         {transport}",
        binary = binary.display(),
        spool = spool.display(),
        logs = logs.display(),
    )
}

/// OpenSMTPD's config: the bench's domain accepted on loopback, every
/// recipient mapped to [`DELIVERY_USER`] (local delivery needs a user;
/// `ids`: its uid and gid), delivered by a discarding MDA or by LMTP to
/// the sink.
fn opensmtpd_config(port: u16, lmtp: Option<u16>, (uid, gid): (u32, u32)) -> String {
    let domain = chaos::DOMAIN;
    let action = match lmtp {
        None => "mda \"cat > /dev/null\"".to_owned(),
        Some(sink) => format!("lmtp \"127.0.0.1:{sink}\" rcpt-to"),
    };
    format!(
        "# cargo xtask bench: OpenSMTPD beside mortal and Postfix.\n\
         # Burst sends about 100 messages a session, the default limit.\n\
         smtp limit max-mails 1000000\n\
         table recipients {{ \"@\" = \"{DELIVERY_USER}\" }}\n\
         table users {{ \"{DELIVERY_USER}\" = \"{uid}:{gid}:{DELIVERY_HOME}\" }}\n\
         listen on 127.0.0.1 port {port} hostname opensmtpd.bench.test\n\
         action \"deliver\" {action} virtual <recipients> userbase <users>\n\
         match from any for domain \"{domain}\" action \"deliver\"\n"
    )
}

fn path_str(path: &Path) -> Result<String> {
    path.to_str().map(str::to_owned).with_context(|| format!("{} is not UTF-8", path.display()))
}

/// `s` quoted for sh.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting_survives_quotes() {
        assert_eq!(quote("/a b/c"), "'/a b/c'");
        assert_eq!(quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn private_users_get_a_free_id_and_keep_the_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let ids = private_users(&["root", "xtask-bench-test-user"], dir.path()).unwrap();
        assert_eq!(ids[0], (0, 0));
        let passwd = fs::read_to_string(dir.path().join("passwd")).unwrap();
        let host = fs::read_to_string("/etc/passwd").unwrap();
        assert!(passwd.starts_with(host.trim_end()));
        assert!(passwd.contains(&format!("xtask-bench-test-user:x:{}:{}:", ids[1].0, ids[1].1)));
        assert!(!host.lines().any(|l| l.split(':').nth(2) == Some(&ids[1].0.to_string())));
    }

    #[test]
    fn configs_use_literal_addresses_only() {
        let exim = exim_config(Path::new("/x/exim4"), Path::new("/s"), Path::new("/l"), 2525, Some(2600));
        assert!(exim.contains("host_lookup =\n") && exim.contains("rfc1413_hosts =\n"));
        assert!(exim.contains("route_list = * 127.0.0.1\n") && exim.contains("port = 2600\n"));
        let smtpd = opensmtpd_config(2525, None, (65534, 65534));
        assert!(smtpd.contains("listen on 127.0.0.1 port 2525 "));
        assert!(smtpd.contains("mda \"cat > /dev/null\""));
    }
}
