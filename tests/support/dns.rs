//! A tiny DNS server on a loopback port: no real DNS is ever asked. The
//! wire format is written by hand: RFC 1035 4.1, only what these answers
//! need.
//!
//! [`TestDns::answering`] is the reverse-lookup server: it answers PTR for
//! 127.0.0.1 with [`PTR_NAME`] and A for that name with whatever address
//! the test chose (127.0.0.1 to confirm, another to make the forward
//! lookup disagree); every other question gets an empty NOERROR answer.
//! [`TestDns::truncating`] makes the resolver ask again over TCP, and
//! [`TestDns::silent`] holds a port and never answers.
//!
//! [`TestDns::zone`] serves a table of records ([`Zone`]: A, MX and TXT,
//! the SPF, DKIM and DMARC records of the filter tests) over UDP and TCP
//! on one port; a name with no record at all is NXDOMAIN, a name with
//! records of other types an empty NOERROR; a UDP answer over 512 octets
//! is sent truncated, so the resolver asks again over TCP.

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

/// The classic UDP message limit (RFC 1035 4.2.1): a longer answer is
/// sent truncated; the zone server does not read EDNS.
const MAX_UDP_REPLY: usize = 512;

/// One TXT character-string holds at most this many octets (RFC 1035
/// 3.3.14); a longer TXT value is split into several.
const MAX_TXT_STRING: usize = 255;

const TYPE_MX: u16 = 15;
const TYPE_TXT: u16 = 16;
const RCODE_NXDOMAIN: u8 = 3;

/// One record's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    A(Ipv4Addr),
    Mx {
        preference: u16,
        exchange: String,
    },
    /// The whole text; split into 255-octet strings on the wire.
    Txt(String),
}

impl Record {
    fn qtype(&self) -> u16 {
        match self {
            Record::A(_) => TYPE_A,
            Record::Mx { .. } => TYPE_MX,
            Record::Txt(_) => TYPE_TXT,
        }
    }

    fn rdata(&self) -> Vec<u8> {
        match self {
            Record::A(a) => a.octets().to_vec(),
            Record::Mx { preference, exchange } => {
                let mut out = preference.to_be_bytes().to_vec();
                out.extend(encode_name(exchange));
                out
            }
            Record::Txt(text) => {
                let mut out = Vec::with_capacity(text.len() + text.len() / MAX_TXT_STRING + 1);
                for chunk in text.as_bytes().chunks(MAX_TXT_STRING) {
                    out.push(u8::try_from(chunk.len()).expect("chunk of at most 255"));
                    out.extend_from_slice(chunk);
                }
                if text.is_empty() {
                    out.push(0);
                }
                out
            }
        }
    }
}

/// The records a [`TestDns::zone`] server answers from, by owner name
/// (any case, with or without the final dot).
#[derive(Debug, Clone, Default)]
pub struct Zone {
    records: Vec<(String, Record)>,
}

impl Zone {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a record; several of one name and type are all answered.
    pub fn add(&mut self, name: &str, record: Record) -> &mut Self {
        self.records.push((absolute(name), record));
        self
    }

    pub fn a(&mut self, name: &str, a: Ipv4Addr) -> &mut Self {
        self.add(name, Record::A(a))
    }

    pub fn mx(&mut self, name: &str, preference: u16, exchange: &str) -> &mut Self {
        self.add(name, Record::Mx { preference, exchange: exchange.to_owned() })
    }

    pub fn txt(&mut self, name: &str, text: &str) -> &mut Self {
        self.add(name, Record::Txt(text.to_owned()))
    }

    /// The rdata of every record of `name` and `qtype`; `None` when the
    /// name has no record at all (NXDOMAIN).
    fn lookup(&self, name: &str, qtype: u16) -> Option<Vec<Vec<u8>>> {
        let mut owned = self.records.iter().filter(|(n, _)| n == name).peekable();
        owned.peek()?;
        Some(owned.filter(|(_, r)| r.qtype() == qtype).map(|(_, r)| r.rdata()).collect())
    }
}

/// `name` in lower case with its final dot, as questions are recorded.
fn absolute(name: &str) -> String {
    format!("{}.", name.trim_end_matches('.').to_ascii_lowercase())
}

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
                serve_tcp(&listener, &Answers::Reverse(Ipv4Addr::LOCALHOST), &seen, &stopped);
            });
        });
        TestDns { port, queries, stop, thread: Some(thread), _held: None }
    }

    /// Serves `zone` over UDP and TCP on one loopback port.
    pub fn zone(zone: Zone) -> Self {
        let (socket, listener) = (0..PORT_TRIES)
            .find_map(|_| {
                let socket = UdpSocket::bind("127.0.0.1:0").ok()?;
                let port = socket.local_addr().ok()?.port();
                Some((socket, TcpListener::bind(("127.0.0.1", port)).ok()?))
            })
            .expect("a port free for UDP and TCP");
        Self::zone_on(socket, listener, zone)
    }

    /// Serves `zone` on 127.0.0.1:53, where a resolver that knows no
    /// other port (glibc's, through /etc/resolv.conf) finds it. Binding
    /// port 53 needs root: the error says why when it fails.
    /// Tests of one binary run in parallel and only one can hold the
    /// port: a bind that finds it taken is tried again until it is free
    /// (for up to `crate::WAIT`), and the last error is returned.
    pub fn zone_on_port_53(zone: Zone) -> std::io::Result<Self> {
        let mut last = None;
        let bound = crate::wait_for("127.0.0.1:53 to be free", || {
            match UdpSocket::bind("127.0.0.1:53").and_then(|u| Ok((u, TcpListener::bind("127.0.0.1:53")?))) {
                Ok(pair) => Some(pair),
                Err(e) => {
                    last = Some(e);
                    None
                }
            }
        });
        match bound {
            Some((socket, listener)) => Ok(Self::zone_on(socket, listener, zone)),
            None => Err(last.unwrap_or_else(|| std::io::ErrorKind::AddrInUse.into())),
        }
    }

    fn zone_on(socket: UdpSocket, listener: TcpListener, zone: Zone) -> Self {
        socket.set_read_timeout(Some(POLL)).expect("set DNS read timeout");
        listener.set_nonblocking(true).expect("non-blocking DNS listener");
        let port = socket.local_addr().expect("DNS local addr").port();
        let queries = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen, stopped) = (Arc::clone(&queries), Arc::clone(&stop));
        let answers = Answers::Zone(zone);
        let thread = std::thread::spawn(move || {
            std::thread::scope(|scope| {
                scope.spawn(|| serve_zone_udp(&socket, &answers, &seen, &stopped));
                serve_tcp(&listener, &answers, &seen, &stopped);
            });
        });
        TestDns { port, queries, stop, thread: Some(thread), _held: None }
    }

    /// The questions asked so far, in order.
    pub fn query_log(&self) -> Vec<(String, u16)> {
        self.queries.lock().expect("queries lock").clone()
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
/// The MX record type, for [`TestDns::asked`].
pub const MX: u16 = TYPE_MX;
/// The TXT record type, for [`TestDns::asked`].
pub const TXT: u16 = TYPE_TXT;
/// Added to the type of a question that came over TCP.
pub const TCP: u16 = 0x1000;

/// What a server answers from.
#[derive(Debug)]
enum Answers {
    /// PTR of 127.0.0.1 and A of [`PTR_NAME`] → the address.
    Reverse(Ipv4Addr),
    Zone(Zone),
}

impl Answers {
    fn respond(&self, query: &[u8], seen: &Mutex<Vec<(String, u16)>>, tag: u16) -> Option<Vec<u8>> {
        match self {
            Answers::Reverse(a) => answer(query, *a, seen, tag),
            Answers::Zone(zone) => {
                let (name, qtype, question_end) = parse_question(query)?;
                seen.lock().expect("queries lock").push((name.clone(), qtype + tag));
                let question = &query[..question_end];
                Some(match zone.lookup(&name, qtype) {
                    Some(rdatas) => response_with(question, qtype, &rdatas, 0),
                    None => response_with(question, qtype, &[], RCODE_NXDOMAIN),
                })
            }
        }
    }
}

fn serve_zone_udp(socket: &UdpSocket, answers: &Answers, seen: &Mutex<Vec<(String, u16)>>, stop: &AtomicBool) {
    let started = Instant::now();
    let mut buf = [0u8; MAX_QUERY];
    while !stop.load(Ordering::Relaxed) && started.elapsed() < MAX_LIFE {
        let Ok((len, from)) = socket.recv_from(&mut buf) else { continue };
        let Some(mut reply) = answers.respond(&buf[..len], seen, 0) else { continue };
        if reply.len() > MAX_UDP_REPLY {
            reply = truncated(&buf[..len], reply);
        }
        let _ = socket.send_to(&reply, from);
    }
}

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
/// each connection on its own thread (a resolver may hold one open while
/// it opens another), bounded by `POLL`-sized read timeouts.
fn serve_tcp(listener: &TcpListener, answers: &Answers, seen: &Mutex<Vec<(String, u16)>>, stop: &AtomicBool) {
    let started = Instant::now();
    std::thread::scope(|scope| {
        while !stop.load(Ordering::Relaxed) && started.elapsed() < MAX_LIFE {
            let Ok((mut conn, _)) = listener.accept() else {
                std::thread::sleep(POLL);
                continue;
            };
            scope.spawn(move || {
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(POLL * 20));
                while let Some(query) = read_tcp_message(&mut conn) {
                    let Some(reply) = answers.respond(&query, seen, TCP) else { break };
                    let len = u16::try_from(reply.len()).expect("reply length").to_be_bytes();
                    if conn.write_all(&len).and_then(|()| conn.write_all(&reply)).is_err() {
                        break;
                    }
                }
            });
        }
    });
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
    // The root (a null MX's exchange) is the empty name: one zero octet.
    for label in name.trim_end_matches('.').split('.').filter(|l| !l.is_empty()) {
        out.push(u8::try_from(label.len()).expect("label length"));
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

/// The response to `question` (header and question section of the query):
/// one answer record with `rdata`, or none.
fn response(question: &[u8], qtype: u16, rdata: Option<Vec<u8>>) -> Vec<u8> {
    response_with(question, qtype, rdata.as_slice(), 0)
}

/// The response to `question` with one answer record per `rdatas` entry
/// and `rcode`.
fn response_with(question: &[u8], qtype: u16, rdatas: &[Vec<u8>], rcode: u8) -> Vec<u8> {
    let mut out = question.to_vec();
    // QR, the query's opcode and RD, RA; the rcode.
    out[2] = 0x80 | (question[2] & 0x79);
    out[3] = 0x80 | rcode;
    let ancount = u16::try_from(rdatas.len()).expect("answer count");
    out[6..8].copy_from_slice(&ancount.to_be_bytes());
    out[8..12].copy_from_slice(&[0, 0, 0, 0]);
    for rdata in rdatas {
        // The owner is the question's name, by pointer.
        out.extend_from_slice(&[0xc0, 12]);
        out.extend_from_slice(&qtype.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&TTL.to_be_bytes());
        out.extend_from_slice(&u16::try_from(rdata.len()).expect("rdata length").to_be_bytes());
        out.extend_from_slice(rdata);
    }
    out
}
