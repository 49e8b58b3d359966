//! `cargo xtask chaos`: kill -9 under load, and count that nothing
//! acknowledged was lost.
//!
//! Runs the release build of mortal with short lives (`max_use = 5`)
//! delivering over LMTP to a sink this task implements (it records each
//! Message-ID and checks each body), drives a bounded load of messages with
//! unique Message-IDs from parallel clients, and meanwhile SIGKILLs random
//! mortal processes: smtpd, cleanup, queue, lmtp agent children and the
//! master itself,
//! which it then restarts as systemd would (`Restart=always`,
//! `KillMode=control-group`: what is left of the old instance is killed
//! first). When the load is done it waits, bounded, for the queue to drain
//! and prints: acknowledged (250), delivered, LOST (must be 0), duplicated,
//! rejected / tempfailed and connection failures as the clients saw them,
//! and the kills by kind. Exit status is non-zero on any loss or any
//! delivered body that differs from what was sent.
//!
//! Only loopback is used. Every process started is reaped by pid, also on
//! error (guards), and every wait is bounded.

use anyhow::{Context, Result, bail};
use mortal_proto::spool::QueueDir;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Messages and clients of a full run, and of `--quick`.
const FULL_MESSAGES: u64 = 5000;
const QUICK_MESSAGES: u64 = 500;
const CLIENTS: usize = 20;

/// Attempts a client makes for one message before giving up on it, as a
/// sending MTA retries a temporary failure.
const MAX_ATTEMPTS: u32 = 8;

/// Longest the load phase may run (then the clients stop where they are).
const LOAD_BOUND: Duration = Duration::from_secs(600);

/// Longest wait for the queue to drain after the load.
const DRAIN_BOUND: Duration = Duration::from_secs(120);

/// Longest wait for a freshly started master to greet.
const START_BOUND: Duration = Duration::from_secs(20);

/// Time between kills is drawn from this range (ms).
const KILL_INTERVAL_MS: (u64, u64) = (100, 700);

/// Per-read timeout of the load clients and of the LMTP sink.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Domain the load is addressed to; the sink's recipient.
pub const DOMAIN: &str = "example.test";

/// A small xorshift generator: the chaos needs variety, not quality.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn seeded(seed: u64) -> Self {
        Rng(seed | 1)
    }

    pub fn from_time() -> Self {
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
        Rng::seeded(nanos ^ u64::from(std::process::id()) << 32)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in `lo..hi` (hi exclusive).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo).max(1)
    }
}

/// The body of message `n`, as CRLF lines: deterministic, so the sink can
/// check every delivered body against what was sent. Some lines start
/// with a dot (transparency) and some carry 8-bit text.
pub fn body_for(n: u64) -> Vec<u8> {
    let mut rng = Rng::seeded(n.wrapping_mul(0x9e37_79b9_7f4a_7c15) + 1);
    let lines = rng.range(3, 40);
    let mut out = Vec::new();
    for i in 0..lines {
        if rng.range(0, 8) == 0 {
            out.push(b'.');
        }
        let len = rng.range(0, 120);
        for _ in 0..len {
            out.push(b"abcdefghijklmnopqrstuvwxyz0123456789 .-"[rng.range(0, 39) as usize]);
        }
        if i % 11 == 5 {
            out.extend_from_slice("grüße".as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The whole message `n` as the client sends it (before dot-stuffing).
pub fn message_for(n: u64, run: &str) -> Vec<u8> {
    let mut m = format!(
        "Message-ID: <{run}-{n}@chaos.test>\r\nFrom: <load@chaos.test>\r\nTo: <sink@{DOMAIN}>\r\nSubject: chaos {n}\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    )
    .into_bytes();
    m.extend(body_for(n));
    m
}

/// RFC 5321 4.5.2 transparency and the end-of-data line.
pub fn dot_stuff(content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 16);
    for line in content.split_inclusive(|&b| b == b'\n') {
        if line.first() == Some(&b'.') {
            out.push(b'.');
        }
        out.extend_from_slice(line);
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// A free TCP port on 127.0.0.1.
/// `[server] user` for a run as root: the daemons must drop to an
/// unprivileged user, and `nobody` exists everywhere.
pub fn user_line() -> &'static str {
    if super::is_root() { "user = \"nobody\"" } else { "" }
}

/// A free port for a server that cannot take port 0 and say which port
/// it got (Postfix, smtp-sink; mortal logging at `warn`, which hides the
/// `listening on` line): there is a moment between this and its bind.
/// chaos starts mortal on port 0 ([`Mortal::start`]).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The first smtpd address a master's log says it bound: `listening on
/// 127.0.0.1:41234 (smtpd)`.
fn smtpd_listener(log: &str) -> Option<std::net::SocketAddr> {
    log.lines().find_map(|l| l.split_once("listening on ")?.1.strip_suffix(" (smtpd)")?.parse().ok())
}

/// Builds the release binaries; returns their directory.
pub fn build_release(root: &Path) -> Result<PathBuf> {
    super::run("cargo build --release", super::cargo().args(["build", "--release", "--workspace", "--bins"]))?;
    Ok(root.join("target/release"))
}

/// The first candidate config that `mortal_proto` accepts: lets this task
/// use keys (lifetimes, routes) as soon as they exist, and say what it
/// fell back to when they do not.
pub fn first_valid_config(path: &Path, candidates: &[(String, &'static str)]) -> Result<(String, &'static str)> {
    let mut errors = Vec::new();
    for (text, what) in candidates {
        match mortal_proto::config::Config::parse(text, path) {
            Ok(_) => return Ok((text.clone(), what)),
            Err(e) => {
                errors.push(format!("{what}: {}", e.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")))
            }
        }
    }
    bail!("no candidate config is valid:\n{}", errors.join("\n"))
}

/// A mortal master started from the release build, with its instance
/// directory; dropping it stops the master and kills, by pid, anything of
/// this instance that is left.
#[derive(Debug)]
pub struct Mortal {
    pub bins: PathBuf,
    pub config: PathBuf,
    /// The smtpd port: 0 until the first master said which port the
    /// kernel gave it.
    pub port: u16,
    pub log: PathBuf,
    master: Option<Child>,
}

impl Mortal {
    /// Starts mortal on `config_text`, which listens on `port`. With port
    /// 0 (`listen = ["127.0.0.1:0"]`, and `[log] level` at info) the
    /// master takes a port from the kernel and logs it (`listening on
    /// 127.0.0.1:41234 (smtpd)`), so no other process can take it between
    /// choosing and binding; the config file is then pinned to that port,
    /// so that a restarted master binds it again, as a real restart would.
    pub fn start(bins: &Path, dir: &Path, config_text: &str, port: u16) -> Result<Self> {
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir.join("etc"))?;
        let config = std::path::absolute(dir.join("etc/mortal.toml"))?;
        fs::write(&config, config_text)?;
        let mut m = Mortal { bins: bins.to_owned(), config, port, log: dir.join("mortal.log"), master: None };
        m.spawn_master()?;
        Ok(m)
    }

    /// The smtpd port the master logged in `log` past `from`, if it has.
    fn logged_port(&self, from: u64) -> Result<Option<u16>> {
        let text = fs::read(&self.log)?;
        let fresh = String::from_utf8_lossy(text.get(from as usize..).unwrap_or_default()).into_owned();
        let Some(bound) = smtpd_listener(&fresh) else { return Ok(None) };
        let zero = format!("\"{}:0\"", bound.ip());
        let text = fs::read_to_string(&self.config)?;
        if !text.contains(&zero) {
            bail!("{} has no listen address {zero} to pin to {bound}", self.config.display());
        }
        fs::write(&self.config, text.replacen(&zero, &format!("\"{bound}\""), 1))?;
        Ok(Some(bound.port()))
    }

    /// Starts the master (appending to the log) and waits for a greeting.
    pub fn spawn_master(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let log_start = log.metadata()?.len();
        let child = Command::new(self.bins.join("mortal-master"))
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn mortal-master")?;
        self.master = Some(child);
        let deadline = Instant::now() + START_BOUND;
        while Instant::now() < deadline {
            if let Some(status) = self.master.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("mortal-master exited during start-up ({status}); see {}", self.log.display());
            }
            if self.port == 0 {
                match self.logged_port(log_start)? {
                    Some(port) => self.port = port,
                    None => {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                }
            }
            if let Ok(s) = TcpStream::connect(("127.0.0.1", self.port)) {
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                let mut line = String::new();
                if BufReader::new(&s).read_line(&mut line).is_ok() && line.starts_with("220") {
                    let _ = (&s).write_all(b"QUIT\r\n");
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("mortal did not greet on port {} within {START_BOUND:?}; see {}", self.port, self.log.display())
    }

    pub fn master_pid(&self) -> Option<u32> {
        self.master.as_ref().map(Child::id)
    }

    /// Whether the master we started has exited (reaping it if so).
    pub fn master_exited(&mut self) -> bool {
        match self.master.as_mut() {
            Some(c) => c.try_wait().ok().flatten().is_some(),
            None => true,
        }
    }

    /// Every running process of this instance but the master: processes
    /// started with `--config <our config>` (children keep it across the
    /// master's death), with their program name.
    pub fn processes(&self) -> Vec<(u32, String)> {
        let master = self.master_pid();
        let needle = self.config.as_os_str().as_encoded_bytes().to_vec();
        let mut out = Vec::new();
        for pid in proc_pids() {
            if Some(pid) == master || !running(pid) {
                continue;
            }
            let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else { continue };
            let mut args = cmdline.split(|&b| b == 0);
            let prog = args.next().map(|p| String::from_utf8_lossy(p).into_owned()).unwrap_or_default();
            if !args.any(|a| a == needle.as_slice()) || !prog.starts_with(self.bins.to_string_lossy().as_ref()) {
                continue;
            }
            let name = Path::new(&prog).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            out.push((pid, name));
        }
        out
    }

    /// SIGKILLs the master and, as systemd's control-group kill would,
    /// everything left of this instance; then starts a new master.
    pub fn kill_and_restart_master(&mut self) -> Result<()> {
        if let Some(mut m) = self.master.take() {
            let _ = m.kill();
            let _ = m.wait();
        }
        self.kill_leftovers();
        self.spawn_master()
    }

    fn kill_leftovers(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = self.processes();
            if left.is_empty() || Instant::now() > deadline {
                break;
            }
            for (pid, _) in left {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM to the master, bounded wait, then kills what is left.
    pub fn stop(&mut self) {
        if let Some(mut m) = self.master.take() {
            let _ = kill(Pid::from_raw(m.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline && m.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = m.kill();
            let _ = m.wait();
        }
        self.kill_leftovers();
    }

    /// Files in a queue directory of the instance.
    pub fn queue_len(&self, spool: &Path) -> usize {
        let spool = mortal_proto::spool::Spool::new(spool);
        [QueueDir::Incoming, QueueDir::Active, QueueDir::Deferred]
            .into_iter()
            .map(|q| fs::read_dir(spool.dir(q)).map(|d| d.count()).unwrap_or(0))
            .sum()
    }
}

impl Drop for Mortal {
    fn drop(&mut self) {
        self.stop();
    }
}

fn proc_pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|d| d.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

/// Running (not a zombie).
fn running(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// What the LMTP sink saw of one Message-ID.
#[derive(Debug, Default, Clone)]
pub struct Received {
    pub count: u32,
    pub bad_body: u32,
}

/// A small threaded LMTP server (RFC 2033): answers every recipient with
/// 250 and records each Message-ID and whether the body is the one
/// `body_for` gives for it.
#[derive(Debug)]
pub struct LmtpSink {
    pub port: u16,
    pub seen: Arc<Mutex<HashMap<u64, Received>>>,
    pub other: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl LmtpSink {
    pub fn start(run: &str) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        listener.set_nonblocking(true)?;
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let other = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, o, st, run) = (seen.clone(), other.clone(), stop.clone(), run.to_owned());
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (s, o, run) = (s.clone(), o.clone(), run.clone());
                        std::thread::spawn(move || {
                            let _ = lmtp_session(conn, &s, &o, &run);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(LmtpSink { port, seen, other, stop })
    }

    pub fn delivered(&self) -> HashMap<u64, Received> {
        self.seen.lock().expect("sink lock").clone()
    }
}

impl Drop for LmtpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn lmtp_session(conn: TcpStream, seen: &Mutex<HashMap<u64, Received>>, other: &AtomicU64, run: &str) -> Result<()> {
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut w = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    w.write_all(b"220 sink.test LMTP ready\r\n")?;
    let mut rcpts = 0usize;
    let mut line = Vec::new();
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        let cmd = String::from_utf8_lossy(&line).trim_end().to_ascii_uppercase();
        let reply: &[u8] = if cmd.starts_with("LHLO") {
            b"250-sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"
        } else if cmd.starts_with("MAIL") {
            rcpts = 0;
            b"250 2.1.0 Ok\r\n"
        } else if cmd.starts_with("RCPT") {
            rcpts += 1;
            b"250 2.1.5 Ok\r\n"
        } else if cmd == "DATA" {
            w.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")?;
            let content = read_data(&mut r)?;
            record(&content, seen, other, run);
            // RFC 2033 4.2: one reply per accepted recipient.
            for _ in 0..rcpts.max(1) {
                w.write_all(b"250 2.0.0 Ok: delivered\r\n")?;
            }
            continue;
        } else if cmd == "RSET" || cmd == "NOOP" {
            b"250 2.0.0 Ok\r\n"
        } else if cmd == "QUIT" {
            w.write_all(b"221 2.0.0 Bye\r\n")?;
            let _ = w.shutdown(Shutdown::Both);
            return Ok(());
        } else {
            b"500 5.5.2 Error: command not recognized\r\n"
        };
        w.write_all(reply)?;
    }
}

/// Reads dot-stuffed content up to `.<CR><LF>`, unstuffed.
fn read_data(r: &mut impl BufRead) -> Result<Vec<u8>> {
    let mut content = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line)? == 0 {
            bail!("connection closed inside DATA");
        }
        if line == b".\r\n" {
            return Ok(content);
        }
        let text = if line.first() == Some(&b'.') { &line[1..] } else { &line[..] };
        content.extend_from_slice(text);
    }
}

fn record(content: &[u8], seen: &Mutex<HashMap<u64, Received>>, other: &AtomicU64, run: &str) {
    let split = content.windows(4).position(|w| w == b"\r\n\r\n");
    let (header, body) = match split {
        Some(i) => (&content[..i + 2], &content[i + 4..]),
        None => (content, &[][..]),
    };
    match message_number(header, run) {
        Some(n) => {
            let mut seen = seen.lock().expect("sink lock");
            let e = seen.entry(n).or_default();
            e.count += 1;
            if body != body_for(n).as_slice() {
                e.bad_body += 1;
            }
        }
        None => {
            other.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// `n` from a `Message-ID: <run-n@chaos.test>` header line.
fn message_number(header: &[u8], run: &str) -> Option<u64> {
    let text = String::from_utf8_lossy(header);
    let prefix = format!("<{run}-");
    text.split("\r\n")
        .find(|l| l.to_ascii_lowercase().starts_with("message-id:"))
        .and_then(|l| l.split_once(&prefix))
        .and_then(|(_, rest)| rest.split('@').next()?.parse().ok())
}

/// How one message fared at the client.
#[derive(Debug, Default)]
struct ClientStats {
    acked: Vec<u64>,
    rejected: u64,
    tempfailed: u64,
    conn_failures: u64,
    given_up: u64,
}

/// One load client: sends messages numbered from `next` until `total`,
/// 1–5 per connection, retrying failures up to [`MAX_ATTEMPTS`].
fn client(port: u16, next: &AtomicU64, total: u64, run: &str, deadline: Instant, seed: u64) -> ClientStats {
    let mut stats = ClientStats::default();
    let mut rng = Rng::seeded(seed);
    let mut pending: Option<(u64, u32)> = None;
    while Instant::now() < deadline {
        let (n, attempt) = match pending.take() {
            Some(p) => p,
            None => {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    break;
                }
                (n, 0)
            }
        };
        let per_conn = rng.range(1, 6);
        let mut conn = match SmtpConn::open(port) {
            Ok(c) => c,
            Err(_) => {
                stats.conn_failures += 1;
                retry(&mut pending, &mut stats, n, attempt);
                std::thread::sleep(Duration::from_millis(rng.range(50, 300)));
                continue;
            }
        };
        let mut current = Some((n, attempt));
        for i in 0..per_conn {
            let (n, attempt) = match current.take() {
                Some(c) => c,
                None => {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= total || Instant::now() > deadline {
                        break;
                    }
                    (n, 0)
                }
            };
            match conn.send(n, run) {
                Ok(250) => stats.acked.push(n),
                Ok(code) if code >= 500 => stats.rejected += 1,
                Ok(_) => {
                    stats.tempfailed += 1;
                    retry(&mut pending, &mut stats, n, attempt);
                    break;
                }
                Err(_) => {
                    stats.conn_failures += 1;
                    retry(&mut pending, &mut stats, n, attempt);
                    break;
                }
            }
            let _ = i;
        }
        conn.quit();
    }
    stats
}

fn retry(pending: &mut Option<(u64, u32)>, stats: &mut ClientStats, n: u64, attempt: u32) {
    if attempt + 1 < MAX_ATTEMPTS {
        *pending = Some((n, attempt + 1));
    } else {
        stats.given_up += 1;
    }
}

/// A minimal SMTP client for the load.
struct SmtpConn {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl SmtpConn {
    fn open(port: u16) -> Result<Self> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        let mut c = SmtpConn { w: s.try_clone()?, r: BufReader::new(s) };
        let code = c.reply()?;
        if code != 220 {
            bail!("greeting {code}");
        }
        c.w.write_all(b"EHLO chaos.test\r\n")?;
        if c.reply()? != 250 {
            bail!("EHLO refused");
        }
        Ok(c)
    }

    fn reply(&mut self) -> Result<u16> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.r.read_line(&mut line)? == 0 {
                bail!("connection closed");
            }
            if line.as_bytes().get(3) != Some(&b'-') {
                return line.get(..3).and_then(|c| c.parse().ok()).context("reply without a code");
            }
        }
    }

    /// Sends message `n`; returns the final reply code.
    fn send(&mut self, n: u64, run: &str) -> Result<u16> {
        for cmd in ["MAIL FROM:<load@chaos.test> BODY=8BITMIME".to_owned(), format!("RCPT TO:<sink@{DOMAIN}>")] {
            self.w.write_all(format!("{cmd}\r\n").as_bytes())?;
            let code = self.reply()?;
            if code != 250 {
                self.w.write_all(b"RSET\r\n")?;
                self.reply()?;
                return Ok(code);
            }
        }
        self.w.write_all(b"DATA\r\n")?;
        let code = self.reply()?;
        if code != 354 {
            return Ok(code);
        }
        self.w.write_all(&dot_stuff(&message_for(n, run)))?;
        self.reply()
    }

    fn quit(mut self) {
        let _ = self.w.write_all(b"QUIT\r\n");
        let _ = self.reply();
    }
}

/// Kill counts by program.
#[derive(Debug, Default)]
struct Kills(BTreeMap<&'static str, u64>);

impl Kills {
    fn add(&mut self, kind: &'static str) {
        *self.0.entry(kind).or_default() += 1;
    }
}

pub fn main(root: &Path, args: &[String]) -> Result<()> {
    let mut total = FULL_MESSAGES;
    let mut clients = CLIENTS;
    let mut debug = false;
    let mut fork = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => total = QUICK_MESSAGES,
            "--messages" => total = it.next().context("--messages N")?.parse()?,
            "--clients" => clients = it.next().context("--clients N")?.parse()?,
            "--debug" => debug = true,
            "--spawn" => {
                fork = match it.next().map(String::as_str) {
                    Some("fork") => true,
                    Some("exec") => false,
                    other => bail!("--spawn needs exec or fork, not {other:?}"),
                }
            }
            other => {
                bail!("unknown chaos option {other:?} (--quick, --messages N, --clients N, --spawn exec|fork, --debug)")
            }
        }
    }
    // `--debug` uses the debug build `cargo xtask ci` has just made,
    // instead of a release build of its own.
    let bins = if debug {
        super::run("cargo build", super::cargo().args(["build", "--workspace", "--bins"]))?;
        root.join("target/debug")
    } else {
        build_release(root)?
    };
    let summary = run(root, &bins, total, clients, fork)?;
    println!("{summary}");
    Ok(())
}

/// `fork`: smtpd and cleanup are forked from their zygotes
/// (`spawn = "fork"`), which the kills hit too.
fn run(root: &Path, bins: &Path, total: u64, clients: usize, fork: bool) -> Result<String> {
    let dir = root.join("target/chaos");
    let run_id = format!("chaos{}", Rng::from_time().next() % 1_000_000);
    let sink = LmtpSink::start(&run_id)?;
    let config_path = std::path::absolute(dir.join("etc/mortal.toml"))?;
    let candidates = chaos_configs(sink.port, fork);
    let (config_text, variant) = first_valid_config(&config_path, &candidates)?;
    let spawn = if fork { ", spawn = fork" } else { "" };
    eprintln!("==> chaos: {total} messages, {clients} clients, config: {variant}{spawn}");
    let via_lmtp = variant.contains("LMTP");
    let mortal = Mortal::start(bins, &dir, &config_text, 0)?;
    let port = mortal.port;
    let mortal = Arc::new(Mutex::new(mortal));
    let spool = dir.join("spool");

    let next = Arc::new(AtomicU64::new(0));
    let load_done = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + LOAD_BOUND;
    let started = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|i| {
            let (next, run_id) = (next.clone(), run_id.clone());
            std::thread::spawn(move || client(port, &next, total, &run_id, deadline, 7919 * (i as u64 + 1)))
        })
        .collect();

    // The killer runs on this thread until the clients are done.
    let mut kills = Kills::default();
    let mut restarts = 0u64;
    let mut rng = Rng::from_time();
    let killer_done = {
        let load_done = load_done.clone();
        let mortal = mortal.clone();
        std::thread::spawn(move || -> Result<(Kills, u64)> {
            while !load_done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(rng.range(KILL_INTERVAL_MS.0, KILL_INTERVAL_MS.1)));
                let mut m = mortal.lock().expect("mortal lock");
                if m.master_exited() {
                    restarts += 1;
                    m.kill_and_restart_master()?;
                    continue;
                }
                let roll = rng.range(0, 100);
                // With an LMTP route the delivery agents die too: a
                // delivery cut off in an agent must be deferred, never lost.
                let want = match roll {
                    0..40 => "mortal-smtpd",
                    40..65 => "mortal-cleanup",
                    65..80 => "mortal-queue",
                    80..92 if via_lmtp => "mortal-lmtp",
                    80..92 => "mortal-queue",
                    _ => "mortal-master",
                };
                if want == "mortal-master" {
                    kills.add("master");
                    restarts += 1;
                    m.kill_and_restart_master()?;
                    continue;
                }
                let procs: Vec<u32> = m.processes().into_iter().filter(|(_, n)| n == want).map(|(p, _)| p).collect();
                if procs.is_empty() {
                    continue;
                }
                let victim = procs[rng.range(0, procs.len() as u64) as usize];
                if kill(Pid::from_raw(victim as i32), Signal::SIGKILL).is_ok() {
                    kills.add(want.trim_start_matches("mortal-"));
                }
            }
            Ok((kills, restarts))
        })
    };
    let mut stats = ClientStats::default();
    for w in workers {
        let s = w.join().expect("client thread");
        stats.acked.extend(s.acked);
        stats.rejected += s.rejected;
        stats.tempfailed += s.tempfailed;
        stats.conn_failures += s.conn_failures;
        stats.given_up += s.given_up;
    }
    let load_time = started.elapsed();
    load_done.store(true, Ordering::Relaxed);
    let (kills, restarts) = killer_done.join().expect("killer thread")?;

    // Drain: a last restart if the master is down, then wait until every
    // acknowledged message arrived or the queue is empty and stays so.
    {
        let mut m = mortal.lock().expect("mortal lock");
        if m.master_exited() {
            m.kill_and_restart_master()?;
        }
    }
    let drain_start = Instant::now();
    let maildir = spool.join("maildir").join(format!("sink@{DOMAIN}"));
    let delivered_now = |sink: &LmtpSink| {
        if via_lmtp { sink.delivered() } else { maildir_delivered(&maildir, &run_id) }
    };
    let mut empty_since: Option<Instant> = None;
    loop {
        let got = delivered_now(&sink);
        if stats.acked.iter().all(|n| got.contains_key(n)) && mortal.lock().expect("lock").queue_len(&spool) == 0 {
            break;
        }
        let queue_empty = mortal.lock().expect("lock").queue_len(&spool) == 0;
        empty_since = if queue_empty { empty_since.or(Some(Instant::now())) } else { None };
        if empty_since.is_some_and(|t| t.elapsed() > Duration::from_secs(5)) || drain_start.elapsed() > DRAIN_BOUND {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let drain_time = drain_start.elapsed();
    let left_in_queue = mortal.lock().expect("lock").queue_len(&spool);
    mortal.lock().expect("lock").stop();
    let got = delivered_now(&sink);

    let lost: Vec<u64> = stats.acked.iter().copied().filter(|n| !got.contains_key(n)).collect();
    let duplicated: u64 = got.values().map(|r| u64::from(r.count.saturating_sub(1))).sum();
    let mismatched: u64 = got.values().map(|r| u64::from(r.bad_body)).sum();
    let unacked_delivered = got.keys().filter(|n| !stats.acked.contains(n)).count();
    let mut out = String::new();
    let _ = writeln!(out, "chaos summary ({variant}{spawn})");
    let _ = writeln!(out, "  messages offered      {total} by {clients} clients in {:.1} s", load_time.as_secs_f64());
    let _ = writeln!(out, "  acknowledged (250)    {}", stats.acked.len());
    let _ = writeln!(out, "  delivered (unique)    {}", got.len());
    let _ = writeln!(out, "  LOST                  {}", lost.len());
    let _ = writeln!(out, "  duplicated            {duplicated}");
    let _ = writeln!(out, "  body mismatches       {mismatched}");
    let _ = writeln!(out, "  delivered, not acked  {unacked_delivered} (connection lost before the 250)");
    let _ = writeln!(out, "  foreign at the sink   {} (no Message-ID of this run)", sink.other.load(Ordering::Relaxed));
    let _ = writeln!(out, "  rejected (5xx)        {}", stats.rejected);
    let _ = writeln!(out, "  tempfailed (4xx)      {} (retried)", stats.tempfailed);
    let _ = writeln!(out, "  connection failures   {} (retried)", stats.conn_failures);
    let _ = writeln!(out, "  given up after {MAX_ATTEMPTS} tries {}", stats.given_up);
    let kill_list: Vec<String> = kills.0.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let _ = writeln!(out, "  SIGKILLs              {} ({})", kills.0.values().sum::<u64>(), kill_list.join(", "));
    let _ = writeln!(out, "  master restarts       {restarts}");
    let _ = writeln!(
        out,
        "  drain time            {:.1} s, {left_in_queue} file(s) left in the queue",
        drain_time.as_secs_f64()
    );
    fs::write(dir.join("summary.txt"), &out)?;
    if !lost.is_empty() || mismatched > 0 {
        eprintln!("{out}");
        let shown: Vec<String> = lost.iter().take(20).map(u64::to_string).collect();
        bail!(
            "chaos: {} acknowledged message(s) lost (e.g. {}), {mismatched} body mismatch(es); log in {}",
            lost.len(),
            shown.join(", "),
            dir.join("mortal.log").display()
        );
    }
    Ok(out)
}

/// Configs to try, best first: LMTP delivery with lifetimes, LMTP with
/// `max_use` only, then the Maildir fallback; `fork`: smtpd and cleanup
/// with `spawn = "fork"`.
fn chaos_configs(sink_port: u16, fork: bool) -> Vec<(String, &'static str)> {
    let user = user_line();
    let spawn = if fork { "spawn = \"fork\"\n" } else { "" };
    let base = |transport: &str, lifetimes: &str| {
        format!(
            r#"[server]
hostname = "mortal.test"
spool_dir = "../spool"
accepted_domains = ["{DOMAIN}"]
{user}

[log]
format = "postfix"
level = "info"

[smtpd]
listen = ["127.0.0.1:0"]
timeout = "30s"

[queue]
scan_interval = "1s"
minimal_backoff = "1s"
maximal_backoff = "2s"

[delivery]
transport = "{transport}"

[process.smtpd]
process_limit = 40
prefork = 5
min_spare = 2
max_spare = 10
max_use = 5
{lifetimes}{spawn}
[process.cleanup]
process_limit = 20
prefork = 2
min_spare = 1
max_spare = 6
max_use = 5
{lifetimes}{spawn}"#
        )
    };
    let lmtp = format!("lmtp:inet:127.0.0.1:{sink_port}");
    let lifetimes = "max_lifetime = \"4s\"\nlifetime_jitter = 0.5\n";
    vec![
        (base(&lmtp, lifetimes), "LMTP sink, max_use 5, lifetime 2-4 s"),
        (base(&lmtp, ""), "LMTP sink, max_use 5"),
        (base("maildir", lifetimes), "Maildir (no LMTP route yet), max_use 5, lifetime 2-4 s"),
        (base("maildir", ""), "Maildir (no LMTP route yet), max_use 5"),
    ]
}

/// The Maildir fallback: what arrived in `new/` and `cur/`, checked the
/// same way (Maildir lines end in LF).
fn maildir_delivered(dir: &Path, run: &str) -> HashMap<u64, Received> {
    let mut out: HashMap<u64, Received> = HashMap::new();
    for sub in ["new", "cur"] {
        let Ok(entries) = fs::read_dir(dir.join(sub)) else { continue };
        for e in entries.flatten() {
            let Ok(bytes) = fs::read(e.path()) else { continue };
            let Some(i) = bytes.windows(2).position(|w| w == b"\n\n") else { continue };
            let header = String::from_utf8_lossy(&bytes[..i]).replace('\n', "\r\n");
            let Some(n) = message_number(header.as_bytes(), run) else { continue };
            let expected: Vec<u8> = String::from_utf8_lossy(&body_for(n)).replace("\r\n", "\n").into_bytes();
            let r = out.entry(n).or_default();
            r.count += 1;
            if bytes[i + 2..] != expected[..] {
                r.bad_body += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_smtpd_port_is_read_from_the_masters_line() {
        let log = "Dec  3 09:55:23 mortal.test postfix/mortal/master[1668]: listening on 127.0.0.1:42225 (smtpd, proxy_listen)\n\
                   Dec  3 09:55:23 mortal.test postfix/mortal/master[1668]: listening on 127.0.0.1:42226 (smtpd)\n";
        assert_eq!(smtpd_listener(log), Some("127.0.0.1:42226".parse().unwrap()));
        assert_eq!(smtpd_listener("daemon started\n"), None);
    }

    #[test]
    fn message_number_reads_our_message_id_only() {
        let h = b"Received: x\r\nMessage-ID: <run7-42@chaos.test>\r\n";
        assert_eq!(message_number(h, "run7"), Some(42));
        assert_eq!(message_number(h, "run8"), None);
    }

    #[test]
    fn dot_stuffing_round_trips_through_the_sink_reader() {
        let m = message_for(3, "r");
        let wire = dot_stuff(&m);
        let back = read_data(&mut BufReader::new(&wire[..])).unwrap();
        assert_eq!(back, m);
    }
}
