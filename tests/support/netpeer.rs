//! Helpers for the PROXY protocol and per-client limit tests: SMTP
//! clients bound to a chosen loopback source address, raw PROXY headers,
//! an HAProxy instance with a kill-on-drop guard, and fail2ban-regex.

use crate::WAIT;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A TCP connection to `127.0.0.1:port` from the loopback address `src`
/// (any of 127.0.0.0/8 works without configuration on Linux).
pub fn connect_from(src: Ipv4Addr, port: u16) -> std::io::Result<TcpStream> {
    connect_to(src, SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
}

/// A TCP connection to `dst` from the loopback address `src`.
pub fn connect_to(src: Ipv4Addr, dst: SocketAddrV4) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddrV4::new(src, 0).into())?;
    socket.connect(&dst.into())?;
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(WAIT))?;
    Ok(stream)
}

/// A PROXY v1 header for a TCP4 client.
pub fn proxy_v1(src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
    format!("PROXY TCP4 {} {} {} {}\r\n", src.ip(), dst.ip(), src.port(), dst.port()).into_bytes()
}

/// A PROXY v2 header: `command` 0 (LOCAL) or 1 (PROXY), TCP over IPv4.
pub fn proxy_v2(command: u8, src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
    let mut out = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    out.push(0x20 | command);
    out.push(0x11);
    out.extend_from_slice(&12u16.to_be_bytes());
    out.extend_from_slice(&src.ip().octets());
    out.extend_from_slice(&dst.ip().octets());
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    out
}

/// A running HAProxy in TCP mode; dropping it kills it by pid.
#[derive(Debug)]
pub struct Haproxy {
    child: Option<Child>,
    pub port: u16,
    pub log: PathBuf,
}

impl Haproxy {
    /// Starts HAProxy listening on a loopback port the kernel chose (the
    /// bound socket is its stdin, `bind fd@0`) and forwarding to
    /// `backend` with `send_proxy` (`send-proxy` or
    /// `send-proxy-v2`).
    pub fn start(dir: &Path, backend: SocketAddrV4, send_proxy: &str) -> Haproxy {
        let reserved = crate::ClosedPort::new();
        let port = reserved.port;
        let config = dir.join(format!("haproxy-{port}.cfg"));
        let log = dir.join(format!("haproxy-{port}.log"));
        let text = format!(
            "global\n    maxconn 64\n\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n\n\
             frontend smtp_in\n    bind fd@0\n    default_backend mortal\n\n\
             backend mortal\n    server s1 {backend} {send_proxy}\n"
        );
        std::fs::write(&config, text).expect("write haproxy config");
        let out = std::fs::File::create(&log).expect("haproxy log");
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(reserved.into_socket())))
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .spawn()
            .expect("haproxy is required for this test (Debian package haproxy)");
        let mut guard = Haproxy { child: Some(child), port, log };
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(Ok(Some(status))) = guard.child.as_mut().map(Child::try_wait) {
                panic!("haproxy exited: {status}\n{}", std::fs::read_to_string(&guard.log).unwrap_or_default());
            }
            assert!(Instant::now() < deadline, "haproxy did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        guard
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }
}

/// Runs `fail2ban-regex --print-all-matched <log> <filter>`; returns the
/// log lines the filter matched, and its whole report.
pub fn fail2ban_regex(log: &Path, filter: &str) -> (Vec<String>, String) {
    let out = Command::new("fail2ban-regex")
        .arg("--print-all-matched")
        .arg(log)
        .arg(filter)
        .output()
        .expect("fail2ban-regex is required for this test (Debian package fail2ban)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "fail2ban-regex failed:\n{text}");
    // "Failregex: 3 total" counts the matches; the listing must agree.
    let total: usize = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Failregex: ")?.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no Failregex total in fail2ban-regex output:\n{text}"));
    let matched: Vec<String> = text
        .lines()
        .skip_while(|l| !l.starts_with("|- Matched line(s):"))
        .skip(1)
        .take_while(|l| !l.starts_with('`'))
        .map(|l| l.trim_start_matches('|').trim().to_owned())
        .collect();
    assert_eq!(matched.len(), total, "matched lines vs Failregex total:\n{text}");
    (matched, text)
}
