//! A real DNS list server for the DNSBL tests: Debian's rbldnsd (the
//! daemon most DNSBLs run) on a free loopback UDP port, serving ip4set
//! zones written into a temp dir. [`Rbldnsd`] is a guard: it starts the
//! daemon, waits (bounded) until it answers a query, and kills and reaps
//! it by its pid on drop (or [`Rbldnsd::stop`]).
//!
//! ```text
//! rbldnsd -n -c 0 -b 127.0.0.1/PORT [-u rbldns -r DIR] -w DIR|/ zen.example:ip4set:zen.example ...
//! ```
//! `-n`: no daemon, so the pid we hold is the server's. `-c 0`: no check
//! for changed zone files, since they are written once before the start.
//! No `-f` (serve from a forked child while reloading): nothing reloads,
//! and a second process would escape the pid-based guard. rbldnsd
//! refuses to run as root: as root it gets `-u rbldns` (the package's
//! user) and a chroot into DIR (`-r DIR -w /`); otherwise it runs as the
//! test's user in DIR. It logs to standard output, kept in DIR/rbldnsd.log
//! and printed when a test fails.
//!
//! An entry is an ip4set line (rbldnsd(8)): `127.0.0.2` is listed with
//! the default answer 127.0.0.2 and no TXT; `127.0.0.3 :127.0.0.4:listed
//! for test` answers A 127.0.0.4 and that TXT (a `$` in it stands for the
//! address asked about). Answers carry TTL 2100 s (rbldnsd's default);
//! NXDOMAIN carries no SOA (no `$SOA` line). rbldnsd answers UDP only.
//! Starts in about 0.01 s.

use crate::{TempDir, wait_for_within};
use std::fs;
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Longest wait for rbldnsd to answer its first query.
pub const START_LIMIT: Duration = Duration::from_secs(20);

/// How long one readiness probe waits for its reply.
const PROBE: Duration = Duration::from_millis(200);

/// Starts tried on another port when the one picked was taken meanwhile.
const PORT_TRIES: usize = 10;

/// The user rbldnsd runs as when the tests run as root (Debian's package
/// creates it).
const USER: &str = "rbldns";

/// A running rbldnsd.
#[derive(Debug)]
pub struct Rbldnsd {
    pub port: u16,
    child: Option<Child>,
    log: PathBuf,
    dir: TempDir,
}

impl Rbldnsd {
    /// Serves each `(zone, entries)` as an ip4set zone, e.g.
    /// `("zen.example", &["127.0.0.2", "127.0.0.3 :127.0.0.4:listed for test"])`.
    ///
    /// # Panics
    /// If rbldnsd is missing, refuses the zones, or does not answer within
    /// [`START_LIMIT`].
    pub fn start(zones: &[(&str, &[&str])]) -> Self {
        assert!(!zones.is_empty(), "rbldnsd needs a zone");
        let dir = TempDir::new("rbldnsd");
        // rbldnsd reads the files as its own user, inside the chroot.
        fs::set_permissions(&dir.0, fs::Permissions::from_mode(0o755)).expect("chmod rbldnsd dir");
        for (zone, entries) in zones {
            assert!(
                !zone.is_empty() && zone.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'),
                "zone name {zone:?}"
            );
            let file = dir.0.join(zone);
            fs::write(&file, entries.iter().map(|e| format!("{e}\n")).collect::<String>()).expect("write zone");
            fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).expect("chmod zone");
        }
        let log = dir.0.join("rbldnsd.log");
        let mut server = Rbldnsd { port: 0, child: None, log, dir };
        for _ in 0..PORT_TRIES {
            server.port = free_udp_port();
            server.spawn(zones);
            match server.wait_until_answering(zones[0].0) {
                Ok(()) => return server,
                Err(log) if log.contains("in use") => server.stop(),
                Err(log) => panic!("rbldnsd did not answer on 127.0.0.1:{} within {START_LIMIT:?}\n{log}", server.port),
            }
        }
        panic!("rbldnsd found no free port in {PORT_TRIES} tries\n{}", server.log_text());
    }

    fn spawn(&mut self, zones: &[(&str, &[&str])]) {
        let file = fs::File::create(&self.log).expect("create rbldnsd log");
        let mut cmd = Command::new("rbldnsd");
        cmd.arg("-n").arg("-c").arg("0").arg("-b").arg(format!("127.0.0.1/{}", self.port));
        if nix::unistd::geteuid().is_root() {
            cmd.arg("-u").arg(USER).arg("-r").arg(&self.dir.0).arg("-w").arg("/");
        } else {
            cmd.arg("-w").arg(&self.dir.0);
        }
        for (zone, _) in zones {
            cmd.arg(format!("{zone}:ip4set:{zone}"));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup rbldnsd log"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start rbldnsd ({e}): apt-get install rbldnsd"));
        self.child = Some(child);
    }

    /// Probes until rbldnsd answers a query about `zone` (any answer:
    /// the positive event that it serves); `Err(log)` if it exited or
    /// did not answer in time.
    fn wait_until_answering(&mut self, zone: &str) -> Result<(), String> {
        let started = Instant::now();
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind probe socket");
        socket.connect(self.addr()).expect("connect probe socket");
        socket.set_read_timeout(Some(PROBE)).expect("probe timeout");
        let query = a_query(0x4d52, &format!("1.0.0.127.{zone}"));
        let answered = wait_for_within("rbldnsd to answer", START_LIMIT, || {
            if self.exited() {
                return Some(false);
            }
            let _ = socket.send(&query);
            let mut reply = [0u8; 512];
            match socket.recv(&mut reply) {
                Ok(len) if len >= 2 && reply[..2] == query[..2] => Some(true),
                _ => None,
            }
        });
        if answered == Some(true) {
            eprintln!("rbldnsd answering on 127.0.0.1:{} after {:?}", self.port, started.elapsed());
            Ok(())
        } else {
            Err(self.log_text())
        }
    }

    fn exited(&mut self) -> bool {
        self.child.as_mut().is_none_or(|child| !matches!(child.try_wait(), Ok(None)))
    }

    /// `127.0.0.1:PORT`, the nameserver address to ask.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Kills rbldnsd by its pid and reaps it: when this returns, nothing
    /// answers on the port any more.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Our own child, not yet reaped: the pid is still rbldnsd's.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Rbldnsd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("rbldnsd log:\n{}", self.log_text());
        }
        self.stop();
    }
}

/// A loopback UDP port nobody uses right now: the kernel's choice for a
/// socket bound and closed again. rbldnsd binds it a moment later; a
/// start that finds it taken is tried again on another.
fn free_udp_port() -> u16 {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    socket.local_addr().expect("local addr").port()
}

/// A DNS query (RFC 1035 4.1) for the A record of `name`, no recursion.
fn a_query(id: u16, name: &str) -> Vec<u8> {
    let mut query = id.to_be_bytes().to_vec();
    // Flags 0, one question, no other records.
    query.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        query.push(u8::try_from(label.len()).expect("label length"));
        query.extend_from_slice(label.as_bytes());
    }
    // The root, type A, class IN.
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    query
}
