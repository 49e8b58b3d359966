//! Test support: start a real mortal instance from the built binaries on a
//! loopback port the master takes from the kernel (port 0, read back from
//! its `listening on` log line), with a private spool, talk SMTP to it,
//! read its log and its Maildirs, and always reap every process it started.
//!
//! [`Instance`] is a guard: dropping it (also when a test panics) stops the
//! master by its pid, then kills by pid any child of that master that
//! outlived it.
#![forbid(unsafe_code)]

pub mod delivery;
pub mod dns;
pub mod filters;
pub mod lifetime;
pub mod milter;
pub mod netpeer;
pub mod pipe;
pub mod policy;
pub mod rbldnsd;
pub mod socketmap;

use mortal_proto::spool::{QueueDir, Spool};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Longest a test waits for anything (start, delivery, exit).
pub const WAIT: Duration = Duration::from_secs(20);

/// What the master's `listening on <address> (<what>)` line names for
/// an `[smtpd] listen` address.
pub const SMTPD_LISTENER: &str = "smtpd";
/// The same for an `[smtpd] proxy_listen` address.
pub const PROXY_LISTENER: &str = "smtpd, proxy_listen";
/// The label of a `[smtpd] listen` address that postscreen holds.
pub const POSTSCREEN_LISTENER: &str = "postscreen";

/// Directory holding the built binaries (`target/<profile>/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>").to_owned();
    for bin in ["mortal", "mortal-master", "mortal-smtpd", "mortal-cleanup", "mortal-queue"] {
        assert!(
            dir.join(bin).exists(),
            "{} is missing: build the binaries first (`cargo build --workspace`, as `cargo xtask ci` does)",
            dir.join(bin).display()
        );
    }
    dir
}

/// A private temp directory (the `tempfile` crate's) at `.0`, kept for a
/// look when the test fails and removed otherwise.
#[derive(Debug)]
pub struct TempDir(pub PathBuf, Option<tempfile::TempDir>);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let dir = tempfile::Builder::new().prefix(&format!("mortal-{tag}-")).tempdir().expect("create temp dir");
        TempDir(dir.path().to_owned(), Some(dir))
    }

    /// One under `base` (created if missing) instead of the system's temp
    /// dir: for daemons that refuse files under a world-writable
    /// directory such as /tmp (OpenDKIM).
    pub fn new_in(tag: &str, base: &Path) -> Self {
        fs::create_dir_all(base).expect("create temp base dir");
        let dir = tempfile::Builder::new().prefix(&format!("mortal-{tag}-")).tempdir_in(base).expect("create temp dir");
        TempDir(dir.path().to_owned(), Some(dir))
    }
}

/// `target/tmp` of the build the test runs from (cargo's
/// CARGO_TARGET_TMPDIR): a temp base that is not world-writable.
pub fn target_tmp_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent().and_then(Path::parent).and_then(Path::parent).expect("target/<profile>/deps/<test>").join("tmp")
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.1.take()
        {
            eprintln!("kept {} for inspection", dir.keep().display());
        }
    }
}

/// A loopback TCP port that refuses every connection: its socket is bound
/// but never listens, so the kernel answers a connect with a reset, and no
/// other process can take the port while this value lives.
#[derive(Debug)]
pub struct ClosedPort {
    pub port: u16,
    socket: socket2::Socket,
}

impl ClosedPort {
    pub fn new() -> Self {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
        socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).expect("bind 127.0.0.1:0");
        let port = socket.local_addr().ok().and_then(|a| a.as_socket()).expect("bound address").port();
        ClosedPort { port, socket }
    }

    /// The bound socket, for a server that is to listen on it (HAProxy's
    /// `bind fd@0`): the port passes on without a moment unbound.
    pub fn into_socket(self) -> socket2::Socket {
        self.socket
    }
}

impl Default for ClosedPort {
    fn default() -> Self {
        Self::new()
    }
}

/// Settings a test may change; everything else is the test default.
#[derive(Debug, Clone)]
pub struct Options {
    pub smtpd_process_limit: u32,
    pub smtpd_prefork: u32,
    pub smtpd_min_spare: u32,
    pub smtpd_max_spare: u32,
    pub smtpd_max_use: u32,
    /// Extra TOML appended to the generated config.
    pub extra: String,
    /// Extra keys for the generated `[server]` section (TOML forbids a
    /// second `[server]` table in `extra`).
    pub server_extra: String,
    /// Extra keys for the generated `[smtpd]` section.
    pub smtpd_extra: String,
    /// Environment variables for the master (and so every daemon), on
    /// top of the test's own: `TZ` for the log's local time.
    pub env: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            smtpd_process_limit: 10,
            smtpd_prefork: 2,
            smtpd_min_spare: 1,
            smtpd_max_spare: 4,
            smtpd_max_use: 100,
            extra: String::new(),
            server_extra: String::new(),
            smtpd_extra: String::new(),
            env: Vec::new(),
        }
    }
}

/// A running mortal: master and children, a temp spool, a log file.
#[derive(Debug)]
pub struct Instance {
    pub dir: PathBuf,
    pub config: PathBuf,
    /// The port of the first `[smtpd] listen` address, as the master bound it.
    pub port: u16,
    pub log: PathBuf,
    master: Option<Child>,
    /// Removed after `drop` stopped the master (kept if the test failed).
    _dir: TempDir,
    /// Directories the instance reads from while it runs (certificates a
    /// child started later loads again), removed with it.
    kept: Vec<TempDir>,
}

impl Instance {
    pub fn start() -> Self {
        Self::start_with(Options::default())
    }

    pub fn start_with(opts: Options) -> Self {
        Self::start_edited(opts, |text| text)
    }

    /// Starts an instance whose generated config text is first passed
    /// through `edit`: for keys inside tables that `Options` already
    /// writes, which TOML forbids adding again through `Options::extra`.
    pub fn start_edited(opts: Options, edit: impl FnOnce(String) -> String) -> Self {
        let bins = bin_dir();
        let temp = TempDir::new("e2e");
        let dir = temp.0.clone();
        // tempfile makes it 0700; the mail user must pass through to the spool.
        fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod test dir");
        fs::create_dir_all(dir.join("etc")).expect("create test dir");
        let config = dir.join("etc/mortal.toml");
        fs::write(&config, edit(config_text(&opts))).expect("write config");
        let log = dir.join("mortal.log");
        let log_file = fs::File::create(&log).expect("create log");
        let master = Command::new(bins.join("mortal-master"))
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup log"))
            .stderr(log_file)
            .spawn()
            .expect("spawn mortal-master");
        let mut inst = Instance { dir, config, port: 0, log, master: Some(master), _dir: temp, kept: Vec::new() };
        // `listen` is smtpd's, or postscreen's in front of it.
        let first = wait_for("listening on ... (smtpd or postscreen)", || {
            inst.assert_master_running();
            [SMTPD_LISTENER, POSTSCREEN_LISTENER].iter().find_map(|what| inst.listeners(what).first().copied())
        });
        inst.port = first.unwrap_or_else(|| panic!("no listener logged within {WAIT:?}\n{}", inst.log_text())).port();
        inst.wait_until_serving();
        inst
    }

    /// Keeps `dir` for as long as the instance runs: every child the
    /// master starts later reads its files again (TLS certificates).
    pub fn keep(&mut self, dir: TempDir) {
        self.kept.push(dir);
    }

    /// The addresses the master bound for `what` ([`SMTPD_LISTENER`],
    /// [`PROXY_LISTENER`]), in configuration order, as its `listening on`
    /// log lines name them.
    pub fn listeners(&self, what: &str) -> Vec<SocketAddr> {
        let named = format!("({what})");
        self.log_text()
            .lines()
            .filter_map(|l| {
                // Up to the end of the message: in JSON the line goes on.
                let (addr, rest) = l.split_once("listening on ")?.1.split_once(' ')?;
                rest.starts_with(&named).then(|| addr.parse().ok())?
            })
            .collect()
    }

    /// The first address bound for `what`, waiting for the master to log it.
    pub fn wait_for_listener(&mut self, what: &str) -> SocketAddr {
        let found = wait_for(&format!("listening on ... ({what})"), || {
            self.assert_master_running();
            self.listeners(what).first().copied()
        });
        found.unwrap_or_else(|| {
            panic!(
                "no \"listening on ... ({what})\" within {WAIT:?} ([log] level must be info or more verbose)\n{}",
                self.log_text()
            )
        })
    }

    /// The port of the first `[smtpd] proxy_listen` address.
    pub fn proxy_port(&mut self) -> u16 {
        self.wait_for_listener(PROXY_LISTENER).port()
    }

    fn assert_master_running(&mut self) {
        if let Some(Ok(Some(status))) = self.master.as_mut().map(Child::try_wait) {
            panic!("mortal-master exited during start-up: {status}\n{}", self.log_text());
        }
    }

    fn wait_until_serving(&mut self) {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            self.assert_master_running();
            // Serving means every service is up, not only the first smtpd:
            // tests that look for a queue or cleanup pid must find one.
            // A greeting of any kind is an answer (a DNSBL `drop` test's
            // smtpd greets with 521 and hangs up, so QUIT may go unheard).
            if self.services_running() && Smtp::connect(self.port).map(|mut s| s.cmd("QUIT")).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("mortal did not answer on port {} within {WAIT:?}\n{}", self.port, self.log_text());
    }

    /// Whether the master has a cleanup, a queue and an anvil child.
    fn services_running(&self) -> bool {
        ["mortal-cleanup", "mortal-queue", "mortal-anvil"].iter().all(|p| !self.children_running(p).is_empty())
    }

    /// Pids of the master's children running `program` (`mortal-smtpd`...)
    /// right now, from /proc.
    pub fn children_running(&self, program: &str) -> Vec<u32> {
        self.children()
            .into_iter()
            .filter(|pid| {
                fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe.file_name().is_some_and(|n| n == program))
            })
            .collect()
    }

    pub fn master_pid(&self) -> u32 {
        self.master.as_ref().expect("master running").id()
    }

    pub fn spool(&self) -> PathBuf {
        self.dir.join("spool")
    }

    pub fn maildir(&self, recipient: &str) -> PathBuf {
        self.spool().join("maildir").join(recipient).join("new")
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Pids that logged as `<syslog tag>/<service>[pid]:`.
    pub fn logged_pids(&self, service: &str) -> BTreeSet<u32> {
        self.pid_lines(service).into_iter().map(|(pid, _)| pid).collect()
    }

    /// The pids of `service` that served a session (logged `connect from`).
    pub fn session_pids(&self, service: &str) -> BTreeSet<u32> {
        self.pid_lines(service)
            .into_iter()
            .filter(|(_, rest)| rest.starts_with(": connect from "))
            .map(|(pid, _)| pid)
            .collect()
    }

    /// Each log line of `service`: its pid and the text after `]`.
    fn pid_lines(&self, service: &str) -> Vec<(u32, String)> {
        let tag = format!("/{service}[");
        self.log_text()
            .lines()
            .filter_map(|l| {
                let start = l.find(&tag)? + tag.len();
                let (pid, rest) = l[start..].split_once(']')?;
                Some((pid.parse().ok()?, rest.to_owned()))
            })
            .collect()
    }

    /// Waits until the log holds `needle`, returning the whole log.
    pub fn wait_for_log(&self, needle: &str) -> String {
        wait_for(&format!("log line containing {needle:?}"), || {
            let text = self.log_text();
            text.contains(needle).then_some(text)
        })
        .unwrap_or_else(|| panic!("no {needle:?} in log:\n{}", self.log_text()))
    }

    /// Waits until the log holds `needle` at least `count` times (the
    /// start-up probe's session logs lines a test's own session may
    /// repeat), returning the whole log.
    pub fn wait_for_log_count(&self, needle: &str, count: usize) -> String {
        wait_for(&format!("{count} log lines containing {needle:?}"), || {
            let text = self.log_text();
            (text.matches(needle).count() >= count).then_some(text)
        })
        .unwrap_or_else(|| panic!("fewer than {count} {needle:?} in log:\n{}", self.log_text()))
    }

    /// Messages delivered to a recipient's Maildir, oldest name first.
    pub fn delivered(&self, recipient: &str) -> Vec<Vec<u8>> {
        let mut names: Vec<PathBuf> =
            fs::read_dir(self.maildir(recipient)).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
        names.sort();
        names.iter().map(|p| fs::read(p).expect("read maildir file")).collect()
    }

    /// Waits until `recipient` has `count` messages; returns them.
    pub fn wait_for_delivery(&self, recipient: &str, count: usize) -> Vec<Vec<u8>> {
        wait_for(&format!("{count} message(s) for {recipient}"), || {
            let got = self.delivered(recipient);
            (got.len() >= count).then_some(got)
        })
        .unwrap_or_else(|| panic!("{recipient} did not get {count} message(s)\n{}", self.log_text()))
    }

    /// Files in a queue directory (`incoming`, `active`, `deferred`...).
    /// The spool's layout, for paths of queue directories and files.
    pub fn spool_layout(&self) -> Spool {
        Spool::new(self.spool())
    }

    pub fn queue_files(&self, queue: QueueDir) -> Vec<String> {
        fs::read_dir(self.spool_layout().dir(queue))
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default()
    }

    pub fn wait_for_empty_queue(&self) {
        let empty = wait_for("empty queue", || {
            [QueueDir::Incoming, QueueDir::Active, QueueDir::Deferred]
                .into_iter()
                .all(|q| self.queue_files(q).is_empty())
                .then_some(())
        });
        assert!(empty.is_some(), "queue not empty\n{}", self.log_text());
    }

    /// Pids of the master's children right now (from /proc).
    pub fn children(&self) -> BTreeSet<u32> {
        let Some(master) = self.master.as_ref() else { return BTreeSet::new() };
        children_of(master.id())
    }

    /// SIGTERM to the master, then waits for it (bounded); returns whether
    /// it exited by itself within `limit`.
    pub fn stop(&mut self, limit: Duration) -> bool {
        let Some(mut master) = self.master.take() else { return true };
        let _ = kill(Pid::from_raw(master.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = master.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = master.kill();
        let _ = master.wait();
        false
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let children = self.children();
        self.stop(Duration::from_secs(10));
        // Children notice the master's end by themselves; any that did not
        // within the grace time are killed, by pid, here.
        let deadline = Instant::now() + Duration::from_secs(5);
        for pid in children {
            while process_exists(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            // Only a process still running one of our binaries is ours: a
            // pid reused by something else is left alone.
            let ours = fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe.starts_with(bin_dir()));
            if process_exists(pid) && ours {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
    }
}

fn config_text(o: &Options) -> String {
    format!(
        r#"[server]
hostname = "mortal.test"
spool_dir = "../spool"
accepted_domains = ["example.test", "localhost"]
{}
{}

[log]
format = "postfix"
level = "info"

[smtpd]
listen = ["127.0.0.1:0"]
timeout = "30s"
{}

[queue]
scan_interval = "1s"
minimal_backoff = "1s"
maximal_backoff = "2s"

[process.smtpd]
process_limit = {}
prefork = {}
min_spare = {}
max_spare = {}
max_use = {}

[process.cleanup]
process_limit = 10
prefork = 1
min_spare = 1
max_spare = 4
max_use = 100
{}
"#,
        o.server_extra,
        mail_user_line(&o.server_extra),
        o.smtpd_extra,
        o.smtpd_process_limit,
        o.smtpd_prefork,
        o.smtpd_min_spare,
        o.smtpd_max_spare,
        o.smtpd_max_use,
        o.extra
    )
}

/// Tests run as root in CI, where the daemons drop to `[server] user`;
/// its default (`mortal`) does not exist there, `nobody` always does.
/// Unprivileged runs change no identity and need no line.
pub fn mail_user_line(server_extra: &str) -> &'static str {
    let set = server_extra.lines().any(|l| l.split('=').next().is_some_and(|k| k.trim() == "user"));
    if nix::unistd::geteuid().is_root() && !set { "user = \"nobody\"" } else { "" }
}

/// Polls `f` every 20 ms until it yields a value or [`WAIT`] passes.
pub fn wait_for<T>(what: &str, f: impl FnMut() -> Option<T>) -> Option<T> {
    wait_for_within(what, WAIT, f)
}

/// [`wait_for`] with another bound, for what is known to take longer
/// (a filter daemon's start).
pub fn wait_for_within<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            eprintln!("gave up waiting for {what}");
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn process_exists(pid: u32) -> bool {
    // A zombie still has a /proc entry but is no longer running.
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.split_whitespace().nth(1)?.parse().ok()
}

pub fn children_of(parent: u32) -> BTreeSet<u32> {
    fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|&pid| parent_of(pid) == Some(parent) && process_exists(pid))
                .collect()
        })
        .unwrap_or_default()
}

/// A minimal SMTP client for driving the server precisely.
#[derive(Debug)]
pub struct Smtp {
    reader: BufReader<TcpStream>,
    pub greeting: String,
}

impl Smtp {
    pub fn connect(port: u16) -> std::io::Result<Self> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(WAIT))?;
        let mut s = Smtp::over(stream);
        s.greeting = s.read_reply()?;
        Ok(s)
    }

    /// A client on an already connected stream, greeting not yet read
    /// (PROXY tests send a header first).
    pub fn over(stream: TcpStream) -> Self {
        Smtp { reader: BufReader::new(stream), greeting: String::new() }
    }

    /// Sends one message (EHLO, MAIL, RCPT, DATA); returns the final reply.
    pub fn mail(&mut self, from: &str, to: &str, body: &str) -> String {
        let steps = ["EHLO client.test".to_owned(), format!("MAIL FROM:<{from}>"), format!("RCPT TO:<{to}>")];
        for step in steps {
            let reply = self.cmd(&step).expect("reply");
            assert!(reply.starts_with('2'), "{step} -> {reply}");
        }
        let reply = self.cmd("DATA").expect("reply to DATA");
        assert!(reply.starts_with("354"), "DATA -> {reply}");
        self.cmd(&format!("Subject: test\r\n\r\n{body}\r\n.")).expect("reply after content")
    }

    /// Reads one (possibly multi-line) reply.
    pub fn read_reply(&mut self) -> std::io::Result<String> {
        let mut reply = String::new();
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, format!("EOF after {reply:?}")));
            }
            let last = line.as_bytes().get(3) != Some(&b'-');
            reply.push_str(&line);
            if last {
                return Ok(reply);
            }
        }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.reader.get_mut().write_all(bytes)
    }

    pub fn cmd(&mut self, line: &str) -> std::io::Result<String> {
        self.send_raw(format!("{line}\r\n").as_bytes())?;
        self.read_reply()
    }

    /// Whether the server closed the connection (EOF or reset) within `WAIT`.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.reader.read(&mut b), Ok(0) | Err(_))
    }
}

/// Runs `python3 -c script`, panicking with its output on failure.
pub fn python(script: &str) -> String {
    let out = Command::new("python3").arg("-c").arg(script).output().expect("python3 is required for tests");
    assert!(
        out.status.success(),
        "python3 failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The part of a delivered Maildir file after the header section.
pub fn body_of(message: &[u8]) -> &[u8] {
    match message.windows(2).position(|w| w == b"\n\n") {
        Some(i) => &message[i + 2..],
        None => &[],
    }
}
