//! Delivery test support: next hops for mortal's agents, each reaped on
//! drop. [`Dovecot`] is a private Dovecot LMTP server in a temp dir (with
//! its authentication socket, for SMTP AUTH),
//! [`Aiosmtpd`] a Python aiosmtpd sink, [`FakeLmtp`] a scripted LMTP server
//! whose answer per recipient the test decides, and [`Guard`] kills any
//! process it holds, by pid, when dropped.

pub use crate::TempDir;
use crate::{WAIT, wait_for};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A process owned by a test: SIGTERM on drop, SIGKILL after a grace time.
#[derive(Debug)]
pub struct Guard {
    child: Child,
    what: &'static str,
}

impl Guard {
    pub fn spawn(what: &'static str, cmd: &mut Command) -> Self {
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Guard { child, what }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process, for its pipes; it is still killed on drop.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Panics if the process already exited (it failed to start).
    pub fn assert_running(&mut self, log: &str) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited: {status}\n{log}", self.what);
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Dovecot LMTP server on a Unix socket, delivering into
/// `<dir>/mail/<user>/` (Maildir), with its authentication service on
/// another ([`Dovecot::auth_socket`], mechanisms PLAIN and LOGIN). Started
/// with a generated minimal config, in the foreground under a [`Guard`].
#[derive(Debug)]
pub struct Dovecot {
    pub socket: PathBuf,
    /// The LMTP listener on loopback TCP, for [`Dovecot::start_with_users`].
    pub inet: Option<std::net::SocketAddr>,
    pub mail: PathBuf,
    pub log: PathBuf,
    auth: PathBuf,
    /// The auth service on a loopback port too ([`Dovecot::start_with_passwords`]):
    /// what a chrooted smtpd (mortal started as root) reaches.
    pub auth_inet: Option<std::net::SocketAddr>,
    _guard: Guard,
    _dir: TempDir,
}

/// Whom a [`Dovecot`] knows.
#[derive(Debug, Clone, Copy)]
enum Users<'a> {
    /// Everyone, with any password.
    All,
    /// Only these addresses, with any password.
    Only(&'a [&'a str]),
    /// Only these users, each with its password.
    WithPasswords(&'a [(&'a str, &'a str)]),
}

impl Dovecot {
    pub fn start() -> Self {
        Self::start_inner(Users::All)
    }

    /// A Dovecot that knows only `users` (full addresses; any other gets
    /// `550 5.1.1 ... User doesn't exist`), listening for LMTP on a
    /// loopback port too.
    pub fn start_with_users(users: &[&str]) -> Self {
        Self::start_inner(Users::Only(users))
    }

    /// A Dovecot that knows only `users`, (name, password) pairs, and
    /// authenticates them on [`Dovecot::auth_socket`] (passwd-file, the
    /// passwords in the `{PLAIN}` scheme); any other name or password
    /// fails.
    pub fn start_with_passwords(users: &[(&str, &str)]) -> Self {
        for (user, password) in users {
            assert!(
                !format!("{user}{password}").contains([':', '\n']),
                "passwd-file fields cannot hold ':' or a line break: {user:?}"
            );
        }
        Self::start_inner(Users::WithPasswords(users))
    }

    /// Dovecot's authentication socket (an auth-client listener: the
    /// protocol `mortal_smtpd::sasl` speaks), open to every user.
    pub fn auth_socket(&self) -> PathBuf {
        self.auth.clone()
    }

    fn start_inner(users: Users<'_>) -> Self {
        let dir = TempDir::new("dovecot");
        let d = &dir.0;
        for sub in ["run", "state", "mail"] {
            fs::create_dir_all(d.join(sub)).expect("dovecot dirs");
        }
        let socket = d.join("lmtp");
        let auth = d.join("auth");
        let log = d.join("dovecot.log");
        let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
        // As root, Dovecot drops to its own `dovecot`/`dovenull` users (the
        // package creates them) and mail is written as `nobody`, which
        // needs a world-writable mail root; as anyone else, every Dovecot
        // process runs as that user.
        let (mail_uid, mail_gid, run_as) = if uid.is_root() {
            fs::set_permissions(d.join("mail"), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
            fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
            (65534, 65534, String::new())
        } else {
            let name = nix::unistd::User::from_uid(uid).ok().flatten().map(|u| u.name).expect("own user name");
            let group = nix::unistd::Group::from_gid(gid).ok().flatten().map(|g| g.name).expect("own group name");
            (
                uid.as_raw(),
                gid.as_raw(),
                format!(
                    "default_login_user = {name}\ndefault_internal_user = {name}\ndefault_internal_group = {group}\n"
                ),
            )
        };
        // The userdb: everyone, or only the listed users (passwd-file);
        // the passdb: any password, or the listed ones (the same file).
        let passwd_file = |entries: Vec<(&str, String)>| {
            let file = d.join("users");
            let lines: String = entries
                .iter()
                .map(|(u, password)| format!("{u}:{password}:{mail_uid}:{mail_gid}::{}/mail/{u}::\n", d.display()))
                .collect();
            fs::write(&file, lines).expect("write dovecot users");
            format!("driver = passwd-file\n  args = {}", file.display())
        };
        let any_password = "driver = static\n  args = nopassword=yes".to_owned();
        let (userdb, passdb) = match users {
            Users::All => (
                format!(
                    "driver = static\n  args = uid={mail_uid} gid={mail_gid} home={}/mail/%u allow_all_users=yes",
                    d.display()
                ),
                any_password,
            ),
            Users::Only(users) => (passwd_file(users.iter().map(|u| (*u, String::new())).collect()), any_password),
            Users::WithPasswords(users) => {
                let db = passwd_file(users.iter().map(|(u, p)| (*u, format!("{{PLAIN}}{p}"))).collect());
                (db.clone(), db)
            }
        };
        let inet = matches!(users, Users::Only(_)).then(|| {
            let port = crate::ClosedPort::new().port;
            std::net::SocketAddr::from(([127, 0, 0, 1], port))
        });
        let inet_listener = match inet {
            Some(addr) => {
                format!("  inet_listener lmtp {{\n    address = 127.0.0.1\n    port = {}\n  }}\n", addr.port())
            }
            None => String::new(),
        };
        let auth_inet = matches!(users, Users::WithPasswords(_)).then(|| {
            let port = crate::ClosedPort::new().port;
            std::net::SocketAddr::from(([127, 0, 0, 1], port))
        });
        let auth_inet_listener = match auth_inet {
            Some(addr) => {
                format!("  inet_listener auth-client {{\n    address = 127.0.0.1\n    port = {}\n  }}\n", addr.port())
            }
            None => String::new(),
        };
        // The auth listener is an auth-client socket, the one Postfix's
        // smtpd_sasl_path names. Dovecot 2.3 leaves disable_plaintext_auth
        // to its own login processes: its auth service takes PLAIN from a
        // client like smtpd, which sends `secured` under TLS all the same.
        let conf = d.join("dovecot.conf");
        fs::write(
            &conf,
            format!(
                r#"protocols = lmtp
base_dir = {d}/run
state_dir = {d}/state
log_path = {log}
ssl = no
listen = 127.0.0.1
{run_as}mail_location = maildir:{d}/mail/%u
auth_mechanisms = plain login
userdb {{
  {userdb}
}}
passdb {{
  {passdb}
}}
service lmtp {{
  unix_listener {socket} {{
    mode = 0666
  }}
{inet_listener}}}
service auth {{
  unix_listener {auth} {{
    mode = 0666
  }}
{auth_inet_listener}}}
service anvil {{
  chroot =
}}
"#,
                d = d.display(),
                log = log.display(),
                socket = socket.display(),
                auth = auth.display(),
            ),
        )
        .expect("write dovecot.conf");
        let mut guard = Guard::spawn(
            "dovecot",
            Command::new("dovecot")
                .arg("-F")
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stderr(fs::File::create(d.join("stderr")).expect("dovecot stderr file")),
        );
        let up = wait_for("dovecot LMTP and auth sockets", || (socket.exists() && auth.exists()).then_some(()));
        let out = fs::read_to_string(d.join("stderr")).unwrap_or_default();
        guard.assert_running(&out);
        assert!(up.is_some(), "dovecot did not create {} and {}: {out}", socket.display(), auth.display());
        if let Some(addr) = inet {
            let listening = wait_for("dovecot LMTP on inet", || std::net::TcpStream::connect(addr).ok());
            assert!(
                listening.is_some(),
                "dovecot does not listen on {addr}: {}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        if let Some(addr) = auth_inet {
            let listening = wait_for("dovecot auth port", || std::net::TcpStream::connect(addr).ok());
            assert!(listening.is_some(), "dovecot does not listen for auth on {addr}");
        }
        Dovecot { socket, inet, mail: d.join("mail"), log, auth, auth_inet, _guard: guard, _dir: dir }
    }

    /// Files Dovecot delivered to `user`'s INBOX (new/ and cur/).
    pub fn delivered(&self, user: &str) -> Vec<String> {
        let mut out = Vec::new();
        for sub in ["new", "cur"] {
            if let Ok(dir) = fs::read_dir(self.mail.join(user).join(sub)) {
                for e in dir.flatten() {
                    out.push(fs::read_to_string(e.path()).unwrap_or_default());
                }
            }
        }
        out
    }

    pub fn wait_for_delivery(&self, user: &str, count: usize) -> Vec<String> {
        wait_for(&format!("{count} message(s) for {user} in dovecot"), || {
            let got = self.delivered(user);
            (got.len() >= count).then_some(got)
        })
        .unwrap_or_else(|| panic!("dovecot: {user} did not get {count} message(s)\n{}", self.log_text()))
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// An aiosmtpd sink on 127.0.0.1:`port` (a port it takes from the kernel
/// and reports, so nothing can take it between choosing and binding) that appends every message it
/// receives, with its envelope, to `<dir>/received`. With `tls`, a
/// (cert, key) PEM pair, it offers STARTTLS.
#[derive(Debug)]
pub struct Aiosmtpd {
    pub port: u16,
    pub received: PathBuf,
    _guard: Guard,
    _dir: TempDir,
}

impl Aiosmtpd {
    pub fn start(tls: Option<(&Path, &Path)>) -> Self {
        let dir = TempDir::new("aiosmtpd");
        let received = dir.0.join("received");
        let tls_setup = match tls {
            Some((cert, key)) => format!(
                "ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)\nctx.load_cert_chain({:?}, {:?})\nkw = dict(tls_context=ctx, require_starttls=False)\n",
                cert.display().to_string(),
                key.display().to_string()
            ),
            None => "kw = {}\n".into(),
        };
        let script = format!(
            r#"
import asyncio, socket, ssl, sys, time
from aiosmtpd.controller import Controller
class Sink:
    async def handle_DATA(self, server, session, envelope):
        with open({received:?}, "ab") as f:
            tls = "tls" if session.ssl else "plain"
            f.write(("FROM %s TO %s %s\n" % (envelope.mail_from, ",".join(envelope.rcpt_tos), tls)).encode())
            f.write(envelope.original_content or envelope.content)
            f.write(b"\n.END\n")
        return "250 2.0.0 Ok: stored"
{tls_setup}
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
sock.listen(64)
class Bound(Controller):
    def _create_server(self):
        return self.loop.create_server(self._factory_invoker, sock=sock, ssl=self.ssl_context)
c = Bound(Sink(), hostname="127.0.0.1", port=sock.getsockname()[1], **kw)
c.start()
print("ready", sock.getsockname()[1], flush=True)
try:
    sys.stdin.read()
finally:
    c.stop()
"#,
            received = received.display().to_string(),
        );
        let mut guard = Guard::spawn(
            "aiosmtpd",
            // Debian's python3-aiosmtpd is installed for the system interpreter.
            Command::new("/usr/bin/python3")
                .arg("-c")
                .arg(script)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(fs::File::create(dir.0.join("stderr")).expect("aiosmtpd stderr file")),
        );
        // Controller.start returns once the sink answers; then it prints.
        let mut ready = String::new();
        let stdout = guard.child.stdout.take().expect("aiosmtpd stdout is piped");
        let _ = BufReader::new(stdout).read_line(&mut ready);
        let stderr = || fs::read_to_string(dir.0.join("stderr")).unwrap_or_default();
        let port = ready
            .strip_prefix("ready ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("aiosmtpd did not start: {ready:?}\n{}", stderr()));
        guard.assert_running(&stderr());
        Aiosmtpd { port, received, _guard: guard, _dir: dir }
    }

    pub fn received_text(&self) -> String {
        fs::read_to_string(&self.received).unwrap_or_default()
    }
}

/// What a [`FakeLmtp`] got in one transaction, and what it answered.
#[derive(Debug, Clone)]
pub struct Transaction {
    pub from: String,
    /// Each recipient with the reply it got after the content.
    pub replies: Vec<(String, String)>,
    pub data: String,
}

/// Decides the reply line after DATA for a recipient, given how many
/// transactions the server has seen before (0 for the first).
pub type Policy = Arc<dyn Fn(&str, usize) -> String + Send + Sync>;

/// A scripted LMTP server on 127.0.0.1. A reply of `"STALL"` makes it hold
/// the connection without answering until the server is dropped.
pub struct FakeLmtp {
    pub addr: SocketAddr,
    pub transactions: Arc<Mutex<Vec<Transaction>>>,
    /// Connections accepted so far.
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for FakeLmtp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeLmtp").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl FakeLmtp {
    pub fn start(policy: Policy) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake LMTP");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local addr");
        let transactions = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (t, s, a) = (transactions.clone(), stop.clone(), accepted.clone());
        let thread = std::thread::spawn(move || {
            let mut sessions = Vec::new();
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        a.fetch_add(1, Ordering::SeqCst);
                        let (t, s, p) = (t.clone(), s.clone(), policy.clone());
                        sessions.push(std::thread::spawn(move || {
                            let _ = serve(conn, &t, &s, &p);
                        }));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            for h in sessions {
                let _ = h.join();
            }
        });
        FakeLmtp { addr, transactions, accepted, stop, thread: Some(thread) }
    }

    /// Connections accepted so far (each LMTP session is one).
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Completed transactions so far.
    pub fn transactions(&self) -> Vec<Transaction> {
        self.transactions.lock().map(|t| t.clone()).unwrap_or_default()
    }

    /// How many 2xx end-of-data replies `rcpt` got.
    pub fn deliveries(&self, rcpt: &str) -> usize {
        self.transactions()
            .iter()
            .flat_map(|t| t.replies.clone())
            .filter(|(r, a)| r == rcpt && a.starts_with('2'))
            .count()
    }
}

impl Drop for FakeLmtp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(conn: TcpStream, log: &Mutex<Vec<Transaction>>, stop: &AtomicBool, policy: &Policy) -> std::io::Result<()> {
    // Short reads so the session notices `stop`; bounded overall by WAIT.
    conn.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut out = conn.try_clone()?;
    let mut reader = BufReader::new(conn);
    let started = Instant::now();
    let mut line = String::new();
    let mut read_line = |line: &mut String| -> std::io::Result<bool> {
        line.clear();
        loop {
            if stop.load(Ordering::Relaxed) || started.elapsed() > WAIT * 3 {
                return Ok(false);
            }
            match reader.read_line(line) {
                Ok(0) => return Ok(false),
                Ok(_) if line.ends_with('\n') => return Ok(true),
                Ok(_) => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => return Err(e),
            }
        }
    };
    out.write_all(b"220 fake.test LMTP ready\r\n")?;
    let (mut from, mut rcpts) = (String::new(), Vec::new());
    while read_line(&mut line)? {
        let cmd = line.trim_end().to_owned();
        let upper = cmd.to_ascii_uppercase();
        if upper.starts_with("LHLO") {
            out.write_all(b"250-fake.test\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n")?;
        } else if upper.starts_with("MAIL FROM:") {
            from = cmd[10..].to_owned();
            rcpts.clear();
            out.write_all(b"250 2.1.0 Ok\r\n")?;
        } else if upper.starts_with("RCPT TO:") {
            rcpts.push(cmd[8..].trim_start_matches('<').split('>').next().unwrap_or_default().to_owned());
            out.write_all(b"250 2.1.5 Ok\r\n")?;
        } else if upper == "DATA" {
            out.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")?;
            let mut data = String::new();
            while read_line(&mut line)? {
                if line == ".\r\n" {
                    break;
                }
                data.push_str(&line);
            }
            let seen = log.lock().map(|l| l.len()).unwrap_or(0);
            let mut replies = Vec::new();
            for r in &rcpts {
                let reply = policy(r, seen);
                if reply == "STALL" {
                    while !stop.load(Ordering::Relaxed) && started.elapsed() < WAIT * 3 {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    return Ok(());
                }
                out.write_all(format!("{reply}\r\n").as_bytes())?;
                replies.push((r.clone(), reply));
            }
            if let Ok(mut l) = log.lock() {
                l.push(Transaction { from: from.clone(), replies, data });
            }
        } else if upper == "RSET" || upper == "NOOP" {
            out.write_all(b"250 2.0.0 Ok\r\n")?;
        } else if upper == "QUIT" {
            out.write_all(b"221 2.0.0 Bye\r\n")?;
            return Ok(());
        } else {
            out.write_all(b"502 5.5.2 Error: command not recognized\r\n")?;
        }
    }
    Ok(())
}

/// Starts mortal like [`crate::Instance::start_with`], with `domains` as
/// the accepted domains and `queue_extra` added to the `[queue]` section
/// (TOML allows neither a second `[queue]` table nor a repeated key in
/// `Options::extra`).
pub fn start_mortal(opts: crate::Options, domains: &[&str], queue_extra: &str) -> crate::Instance {
    let list: Vec<String> = domains.iter().map(|d| format!("{d:?}")).collect();
    crate::Instance::start_edited(opts, |text| {
        text.replacen(
            r#"accepted_domains = ["example.test", "localhost"]"#,
            &format!("accepted_domains = [{}]", list.join(", ")),
            1,
        )
        .replacen("[queue]\n", &format!("[queue]\n{queue_extra}\n"), 1)
    })
}

/// Pid of the running queue manager (the master's `mortal-queue` child).
pub fn queue_pid(mortal: &crate::Instance) -> Option<u32> {
    mortal.children_running("mortal-queue").first().copied()
}

/// Pids of the running cleanup processes.
pub fn cleanup_pids(mortal: &crate::Instance) -> Vec<u32> {
    mortal.children_running("mortal-cleanup")
}

/// Sends one message with Python's smtplib; panics unless all recipients
/// were accepted.
pub fn send(port: u16, from: &str, to: &[&str], message: &str) {
    crate::python(&format!(
        r#"
import smtplib
with smtplib.SMTP("127.0.0.1", {port}) as s:
    refused = s.sendmail({from:?}, {to:?}, {message:?}.encode("utf-8"))
    assert refused == {{}}, refused
"#
    ));
}
