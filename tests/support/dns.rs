//! A tiny DNS server on a loopback UDP port for the reverse-lookup tests:
//! no real DNS is ever asked. It answers PTR for 127.0.0.1 with
//! [`PTR_NAME`] and A for that name with whatever address the test chose
//! (127.0.0.1 to confirm, another to make the forward lookup disagree);
//! every other question gets an empty NOERROR answer. [`TestDns::silent`]
//! holds a port and never answers. The wire format is written by hand:
//! RFC 1035 4.1, only what these answers need.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The name the PTR record of 127.0.0.1 points to.
pub const PTR_NAME: &str = "client.example.test.";

/// The reverse name of 127.0.0.1.
const REVERSE_NAME: &str = "1.0.0.127.in-addr.arpa.";

/// How often the server thread looks at its stop flag.
const POLL: Duration = Duration::from_millis(50);

/// Longest life of a server thread, whatever the test does.
const MAX_LIFE: Duration = Duration::from_secs(120);

/// Tries at finding a port free for both UDP and TCP.
const PORT_TRIES: usize = 20;

/// Largest query read; queries are far smaller.
const MAX_QUERY: usize = 1500;

const TYPE_A: u16 = 1;
const TYPE_PTR: u16 = 12;
const CLASS_IN: u16 = 1;
const TTL: u32 = 60;

/// A running test DNS server; stops and joins its thread on drop.
#[derive(Debug)]
pub struct TestDns {
    pub port: u16,
    /// Every question seen, as (lower-case name with final dot, type).
    pub queries: Arc<Mutex<Vec<(String, u16)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Only for [`TestDns::silent`]: the socket nobody reads.
    _held: Option<UdpSocket>,
}

impl TestDns {
    /// Answers PTR 127.0.0.1 → [`PTR_NAME`] and A [`PTR_NAME`] → `a`.
    pub fn answering(a: Ipv4Addr) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind test DNS socket");
        socket.set_read_timeout(Some(POLL)).expect("set DNS read timeout");
        let port = socket.local_addr().expect("DNS local addr").port();
        let queries = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen, stopped) = (Arc::clone(&queries), Arc::clone(&stop));
        let thread = std::thread::spawn(move || serve(&socket, a, &seen, &stopped, false));
        TestDns { port, queries, stop, thread: Some(thread), _held: None }
    }

    /// Like [`TestDns::answering`] with 127.0.0.1, but every UDP answer is
    /// empty and truncated (TC), so the resolver must ask again over TCP,
    /// where the full answers are; TCP questions are recorded with the
    /// type plus `TCP` so a test can tell them apart.
    pub fn truncating() -> Self {
        let (socket, listener) = (0..PORT_TRIES)
            .find_map(|_| {
                let socket = UdpSocket::bind("127.0.0.1:0").ok()?;
                let port = socket.local_addr().ok()?.port();
                Some((socket, TcpListener::bind(("127.0.0.1", port)).ok()?))
            })
            .expect("a port free for UDP and TCP");
        socket.set_read_timeout(Some(POLL)).expect("set DNS read timeout");
        listener.set_nonblocking(true).expect("non-blocking DNS listener");
        let port = socket.local_addr().expect("DNS local addr").port();
        let queries = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen, stopped) = (Arc::clone(&queries), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            std::thread::scope(|scope| {
                scope.spawn(|| serve(&socket, Ipv4Addr::LOCALHOST, &seen, &stopped, true));
                serve_tcp(&listener, &seen, &stopped);
            });
        });
        TestDns { port, queries, stop, thread: Some(thread), _held: None }
    }

    /// A nameserver that never answers.
    pub fn silent() -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind test DNS socket");
        let port = socket.local_addr().expect("DNS local addr").port();
        TestDns { port, queries: Arc::default(), stop: Arc::default(), thread: None, _held: Some(socket) }
    }

    /// The `[smtpd]` keys that point mortal at this server.
    pub fn smtpd_keys(&self, timeout: &str) -> String {
        format!(
            "reverse_lookup = true\nreverse_lookup_timeout = \"{timeout}\"\nresolvers = [\"127.0.0.1:{}\"]\n",
            self.port
        )
    }

    /// Whether a question for `name` of `qtype` arrived.
    pub fn asked(&self, name: &str, qtype: u16) -> bool {
        self.queries.lock().expect("queries lock").iter().any(|(n, t)| n == name && *t == qtype)
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The A record type, for [`TestDns::asked`].
pub const A: u16 = TYPE_A;
/// The PTR record type, for [`TestDns::asked`].
pub const PTR: u16 = TYPE_PTR;
/// Added to the type of a question that came over TCP.
pub const TCP: u16 = 0x1000;

fn serve(socket: &UdpSocket, a: Ipv4Addr, seen: &Mutex<Vec<(String, u16)>>, stop: &AtomicBool, truncate: bool) {
    let started = Instant::now();
    let mut buf = [0u8; MAX_QUERY];
    while !stop.load(Ordering::Relaxed) && started.elapsed() < MAX_LIFE {
        let Ok((len, from)) = socket.recv_from(&mut buf) else { continue };
        let Some(mut reply) = answer(&buf[..len], a, seen, 0) else { continue };
        if truncate {
            // TC, and the answer count and record dropped.
            reply = truncated(&buf[..len], reply);
        }
        let _ = socket.send_to(&reply, from);
    }
}

/// The response to `query`, recording the question (type plus `tag`).
fn answer(query: &[u8], a: Ipv4Addr, seen: &Mutex<Vec<(String, u16)>>, tag: u16) -> Option<Vec<u8>> {
    let (name, qtype, question_end) = parse_question(query)?;
    seen.lock().expect("queries lock").push((name.clone(), qtype + tag));
    let rdata = match (qtype, name.as_str()) {
        (TYPE_PTR, REVERSE_NAME) => Some(encode_name(PTR_NAME)),
        (TYPE_A, PTR_NAME) => Some(a.octets().to_vec()),
        _ => None,
    };
    Some(response(&query[..question_end], qtype, rdata))
}

fn truncated(query: &[u8], full: Vec<u8>) -> Vec<u8> {
    let question_end = parse_question(query).map_or(full.len(), |(_, _, end)| end);
    let mut reply = full[..question_end].to_vec();
    reply[2] |= 0x02;
    reply[6..8].copy_from_slice(&[0, 0]);
    reply
}

/// DNS over TCP (RFC 1035 4.2.2): two-octet length, then the message;
/// one connection at a time, each bounded by `POLL`-sized read timeouts.
fn serve_tcp(listener: &TcpListener, seen: &Mutex<Vec<(String, u16)>>, stop: &AtomicBool) {
    let started = Instant::now();
    while !stop.load(Ordering::Relaxed) && started.elapsed() < MAX_LIFE {
        let Ok((mut conn, _)) = listener.accept() else {
            std::thread::sleep(POLL);
            continue;
        };
        let _ = conn.set_nonblocking(false);
        let _ = conn.set_read_timeout(Some(POLL * 20));
        while let Some(query) = read_tcp_message(&mut conn) {
            let Some(reply) = answer(&query, Ipv4Addr::LOCALHOST, seen, TCP) else { break };
            let len = u16::try_from(reply.len()).expect("reply length").to_be_bytes();
            if conn.write_all(&len).and_then(|()| conn.write_all(&reply)).is_err() {
                break;
            }
        }
    }
}

fn read_tcp_message(conn: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 2];
    conn.read_exact(&mut len).ok()?;
    let len = usize::from(u16::from_be_bytes(len));
    if len > MAX_QUERY {
        return None;
    }
    let mut query = vec![0; len];
    conn.read_exact(&mut query).ok()?;
    Some(query)
}

/// The question's name (lower case, final dot), type, and where the
/// question section ends.
fn parse_question(query: &[u8]) -> Option<(String, u16, usize)> {
    if query.len() < 12 || u16::from_be_bytes([query[4], query[5]]) != 1 {
        return None;
    }
    let mut pos = 12;
    let mut name = String::new();
    loop {
        let len = usize::from(*query.get(pos)?);
        pos += 1;
        if len == 0 {
            break;
        }
        // Questions never use compression pointers.
        if len > 63 {
            return None;
        }
        name.push_str(&String::from_utf8_lossy(query.get(pos..pos + len)?).to_ascii_lowercase());
        name.push('.');
        pos += len;
    }
    let qtype = u16::from_be_bytes([*query.get(pos)?, *query.get(pos + 1)?]);
    Some((name, qtype, pos + 4))
}

fn encode_name(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name.trim_end_matches('.').split('.') {
        out.push(u8::try_from(label.len()).expect("label length"));
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

/// The response to `question` (header and question section of the query):
/// one answer record with `rdata`, or none.
fn response(question: &[u8], qtype: u16, rdata: Option<Vec<u8>>) -> Vec<u8> {
    let mut out = question.to_vec();
    // QR, the query's opcode and RD, RA; NOERROR.
    out[2] = 0x80 | (question[2] & 0x79);
    out[3] = 0x80;
    let ancount: u16 = rdata.is_some().into();
    out[6..8].copy_from_slice(&ancount.to_be_bytes());
    out[8..12].copy_from_slice(&[0, 0, 0, 0]);
    if let Some(rdata) = rdata {
        // The owner is the question's name, by pointer.
        out.extend_from_slice(&[0xc0, 12]);
        out.extend_from_slice(&qtype.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&TTL.to_be_bytes());
        out.extend_from_slice(&u16::try_from(rdata.len()).expect("rdata length").to_be_bytes());
        out.extend_from_slice(&rdata);
    }
    out
}
