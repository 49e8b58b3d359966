//! Tables an external server answers: the door to SQL, LDAP or any other
//! source. Two protocols, as Postfix speaks them:
//!
//! - socketmap (Sendmail's; socketmap_table(5)): a query is the netstring
//!   `<len>:<map name> <key>,`; the answer a netstring holding
//!   `OK <value>`, `NOTFOUND `, `TEMP <reason>`, `TIMEOUT <reason>` or
//!   `PERM <reason>`.
//! - tcp_table(5): a query is `get <key>\n`, the answer one line, `200
//!   <value>`, `500 <text>` (not found) or `400 <text>` (try later), key
//!   and value `%XX`-encoded where they hold white space, `%` or
//!   unprintable octets; at most [`MAX_TCP_LINE`] octets.
//!
//! One connection carries any number of queries, one at a time.
//!
//! [`Client`] is a blocking client with a timeout on every read and write,
//! which reconnects once when a kept connection turns out dead. Both its
//! callers serve one conversation per process at a time (an smtpd
//! session, a cleanup transaction), so a lookup holds up only the
//! conversation that asked. TEMP, TIMEOUT, an answer that does not come
//! in time and a server that cannot be reached are [`LookupError::Temporary`]:
//! the caller defers (451 4.3.0), never accepts and never rejects; PERM and
//! a garbled answer are [`LookupError::Permanent`], which the callers treat
//! as a configuration error (also a 4xx: nothing is lost while the admin
//! looks).

use crate::config::NextHop;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;
use thiserror::Error;

/// Longest tcp_table answer line, its newline included (tcp_table(5)).
pub const MAX_TCP_LINE: usize = 4096;

/// Largest answer read (Postfix `socketmap_max_reply_size`).
pub const MAX_REPLY: usize = 100_000;
/// Longest key sent: a whole address with room to spare.
pub const MAX_KEY: usize = 1024;
/// Digits in a netstring length: enough for [`MAX_REPLY`].
const MAX_LEN_DIGITS: usize = 6;
/// Longest wait for a connection, a write or an answer.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// How a socket path is reached from inside this process's sandbox (a
/// chroot shortens it); set once by the sandbox when it enters a chroot.
static REACH: std::sync::OnceLock<fn(&Path) -> PathBuf> = std::sync::OnceLock::new();

/// Tells every client how a configured socket path is reached from now
/// on (the sandbox calls this when it chroots).
pub fn set_reach(reach: fn(&Path) -> PathBuf) {
    let _ = REACH.set(reach);
}

fn reach(path: &Path) -> PathBuf {
    REACH.get().map_or_else(|| path.to_owned(), |f| f(path))
}

/// What a server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Found(String),
    NotFound,
}

/// Why a lookup has no answer.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LookupError {
    /// Try again later: TEMP, TIMEOUT, no connection, no answer in time.
    #[error("temporary lookup failure: {0}")]
    Temporary(String),
    /// PERM, or an answer that is no socketmap answer.
    #[error("lookup failure: {0}")]
    Permanent(String),
}

/// Why an answer could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("netstring length is not a number")]
    BadLength,
    #[error("answer longer than {MAX_REPLY} octets")]
    TooLong,
    #[error("netstring does not end with a comma")]
    NoComma,
    #[error("unknown status {0:?}")]
    BadStatus(String),
    #[error("answer is not UTF-8")]
    NotUtf8,
    #[error("bad %XX escape")]
    BadEscape,
}

/// `name key` as a netstring.
pub fn encode_query(name: &str, key: &str) -> Vec<u8> {
    let body = format!("{name} {key}");
    format!("{}:{body},", body.len()).into_bytes()
}

/// One decoded answer (or the failure the server reported) and the octets
/// of the buffer it took.
pub type Decoded = (Result<Answer, LookupError>, usize);

/// A protocol's answer decoder ([`decode_answer`], [`decode_tcp_answer`]).
type Decoder = fn(&[u8]) -> Result<Option<Decoded>, DecodeError>;

/// `get <key>\n`, the key %XX-encoded.
pub fn encode_tcp_query(key: &str) -> Vec<u8> {
    let mut out = b"get ".to_vec();
    for &b in key.as_bytes() {
        if b <= b' ' || b == b'%' || b >= 0x7f {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        } else {
            out.push(b);
        }
    }
    out.push(b'\n');
    out
}

/// Decodes one tcp_table answer line from the start of `buf`: `Ok(None)`
/// when its newline has not come yet.
pub fn decode_tcp_answer(buf: &[u8]) -> Result<Option<Decoded>, DecodeError> {
    let Some(end) = buf.iter().take(MAX_TCP_LINE).position(|&b| b == b'\n') else {
        return if buf.len() >= MAX_TCP_LINE { Err(DecodeError::TooLong) } else { Ok(None) };
    };
    let line = buf[..end].strip_suffix(b"\r").unwrap_or(&buf[..end]);
    let (code, text) = match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &b""[..]),
    };
    let text = std::str::from_utf8(&percent_decode(text)?).map_err(|_| DecodeError::NotUtf8)?.to_owned();
    let answer = match code {
        b"200" => Ok(Answer::Found(text)),
        b"500" => Ok(Answer::NotFound),
        b"400" => Err(LookupError::Temporary(format!("400 {text}").trim_end().to_owned())),
        other => return Err(DecodeError::BadStatus(String::from_utf8_lossy(other).chars().take(32).collect())),
    };
    Ok(Some((answer, end + 1)))
}

fn percent_decode(text: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        if text[i] == b'%' {
            let hex = text.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            let byte = hex.and_then(|h| u8::from_str_radix(h, 16).ok()).ok_or(DecodeError::BadEscape)?;
            out.push(byte);
            i += 3;
        } else {
            out.push(text[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// Decodes one answer from the start of `buf`: `Ok(None)` when more bytes
/// are needed, else the answer and the octets it took.
pub fn decode_answer(buf: &[u8]) -> Result<Option<Decoded>, DecodeError> {
    let Some(colon) = buf.iter().take(MAX_LEN_DIGITS + 1).position(|&b| b == b':') else {
        if buf.len() > MAX_LEN_DIGITS || !buf.iter().all(u8::is_ascii_digit) {
            return Err(DecodeError::BadLength);
        }
        return Ok(None);
    };
    let digits = &buf[..colon];
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(DecodeError::BadLength);
    }
    let len: usize = std::str::from_utf8(digits).ok().and_then(|d| d.parse().ok()).ok_or(DecodeError::BadLength)?;
    if len > MAX_REPLY {
        return Err(DecodeError::TooLong);
    }
    let end = colon + 1 + len;
    if buf.len() <= end {
        return Ok(None);
    }
    if buf[end] != b',' {
        return Err(DecodeError::NoComma);
    }
    let body = std::str::from_utf8(&buf[colon + 1..end]).map_err(|_| DecodeError::NotUtf8)?;
    let (status, rest) = body.split_once(' ').unwrap_or((body, ""));
    let answer = match status {
        "OK" => Ok(Answer::Found(rest.to_owned())),
        "NOTFOUND" => Ok(Answer::NotFound),
        "TEMP" | "TIMEOUT" => Err(LookupError::Temporary(format!("{status} {rest}").trim_end().to_owned())),
        "PERM" => Err(LookupError::Permanent(format!("PERM {rest}").trim_end().to_owned())),
        other => return Err(DecodeError::BadStatus(other.chars().take(32).collect())),
    };
    Ok(Some((answer, end + 1)))
}

/// `socketmap:unix:/path:name` or `socketmap:inet:host:port:name`, as
/// configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketmapSpec {
    pub endpoint: NextHop,
    pub name: String,
}

impl SocketmapSpec {
    /// The part after `socketmap:`.
    pub fn parse(rest: &str) -> Result<SocketmapSpec, String> {
        let (endpoint, name) = rest.rsplit_once(':').ok_or_else(|| {
            format!("socketmap:{rest}: expected socketmap:unix:/path:name or socketmap:inet:IP:PORT:name")
        })?;
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b)) {
            return Err(format!("socketmap:{rest}: {name:?} is not a map name (letters, digits, _ - .)"));
        }
        let endpoint: NextHop = endpoint.parse().map_err(|e| format!("socketmap:{rest}: {e}"))?;
        Ok(SocketmapSpec { endpoint, name: name.to_owned() })
    }
}

impl fmt::Display for SocketmapSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "socketmap:{}:{}", self.endpoint, self.name)
    }
}

enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    fn connect(endpoint: &NextHop, timeout: Duration) -> io::Result<Conn> {
        let conn = match endpoint {
            NextHop::Inet(addr) => {
                // A blocking connect bounded by the send timeout (Linux
                // honours SO_SNDTIMEO in connect): no poll, which smtpd's
                // seccomp list does not have.
                let domain = socket2::Domain::for_address(*addr);
                let socket = socket2::Socket::new(domain, socket2::Type::STREAM.cloexec(), None)?;
                socket.set_write_timeout(Some(timeout))?;
                socket.connect(&(*addr).into()).map_err(|e| {
                    // What a blocking connect returns when SO_SNDTIMEO ran out.
                    if e.raw_os_error() == Some(nix::errno::Errno::EINPROGRESS as i32) {
                        io::Error::new(io::ErrorKind::TimedOut, "connect timed out")
                    } else {
                        e
                    }
                })?;
                let tcp: TcpStream = socket.into();
                tcp.set_nodelay(true)?;
                Conn::Tcp(tcp)
            }
            NextHop::Unix(path) => Conn::Unix(UnixStream::connect(reach(path))?),
        };
        match &conn {
            Conn::Tcp(s) => {
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
            }
            Conn::Unix(s) => {
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
            }
        }
        Ok(conn)
    }

    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.write_all(bytes),
            Conn::Unix(s) => s.write_all(bytes),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

/// A socketmap table's client: one kept connection per process.
pub struct Client {
    endpoint: NextHop,
    /// The socketmap map name; `None`: a tcp_table server.
    map: Option<String>,
    /// The table as configured, for messages.
    written: String,
    timeout: Duration,
    conn: Mutex<Option<Conn>>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client").field("table", &self.written).field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

impl Client {
    /// No connection yet: the first lookup makes it.
    pub fn new(spec: SocketmapSpec, timeout: Duration) -> Client {
        let written = spec.to_string();
        Client { endpoint: spec.endpoint, map: Some(spec.name), written, timeout, conn: Mutex::new(None) }
    }

    /// A tcp_table(5) client of the server at `addr`.
    pub fn tcp(addr: std::net::SocketAddr, timeout: Duration) -> Client {
        let written = format!("tcp:{addr}");
        Client { endpoint: NextHop::Inet(addr), map: None, written, timeout, conn: Mutex::new(None) }
    }

    /// Looks `key` up: the value, `None`, or why there is no answer.
    pub fn lookup(&self, key: &str) -> Result<Option<String>, LookupError> {
        if key.len() > MAX_KEY || key.contains(['\0', '\r', '\n']) {
            return Ok(None);
        }
        let mut slot = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        // A kept connection may have been closed by the server while
        // idle: one more try on a fresh one.
        let fresh = slot.is_none();
        match self.ask(&mut slot, key) {
            Err(AskError::Io(_)) if !fresh => {
                *slot = None;
                self.ask(&mut slot, key).map_err(|e| self.fail(&mut slot, e))
            }
            other => other.map_err(|e| self.fail(&mut slot, e)),
        }
        .map(|answer| match answer {
            Answer::Found(v) => Some(v),
            Answer::NotFound => None,
        })
    }

    fn fail(&self, slot: &mut Option<Conn>, e: AskError) -> LookupError {
        match e {
            AskError::Io(e) => {
                *slot = None;
                LookupError::Temporary(format!("{}: {e}", self.written))
            }
            AskError::Decode(e) => {
                *slot = None;
                LookupError::Permanent(format!("{}: {e}", self.written))
            }
            AskError::Answer(e) => e,
        }
    }

    fn ask(&self, slot: &mut Option<Conn>, key: &str) -> Result<Answer, AskError> {
        if slot.is_none() {
            *slot = Some(Conn::connect(&self.endpoint, self.timeout).map_err(AskError::Io)?);
        }
        let conn = slot.as_mut().expect("connected above");
        let (query, decode): (Vec<u8>, Decoder) = match &self.map {
            Some(name) => (encode_query(name, key), decode_answer),
            None => (encode_tcp_query(key), decode_tcp_answer),
        };
        conn.write_all(&query).map_err(AskError::Io)?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some((answer, used)) = decode(&buf).map_err(AskError::Decode)? {
                if used != buf.len() {
                    return Err(AskError::Decode(DecodeError::NoComma));
                }
                return answer.map_err(AskError::Answer);
            }
            let n = conn.read(&mut chunk).map_err(AskError::Io)?;
            if n == 0 {
                return Err(AskError::Io(io::ErrorKind::UnexpectedEof.into()));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }
}

enum AskError {
    Io(io::Error),
    Decode(DecodeError),
    Answer(LookupError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;

    #[test]
    fn queries_are_netstrings() {
        assert_eq!(encode_query("virtual", "a@example.test"), b"22:virtual a@example.test,");
    }

    #[test]
    fn answers_decode_and_need_their_whole_netstring() {
        assert_eq!(decode_answer(b"7:OK b@x.,rest"), Ok(Some((Ok(Answer::Found("b@x.".into())), 10))));
        assert_eq!(decode_answer(b"9:NOTFOUND ,"), Ok(Some((Ok(Answer::NotFound), 12))));
        assert_eq!(
            decode_answer(b"12:TEMP db down,"),
            Ok(Some((Err(LookupError::Temporary("TEMP db down".into())), 16)))
        );
        assert!(matches!(decode_answer(b"7:TIMEOUT,"), Ok(Some((Err(LookupError::Temporary(_)), _)))));
        assert!(matches!(decode_answer(b"4:PERM,"), Ok(Some((Err(LookupError::Permanent(_)), _)))));
        for partial in [&b""[..], b"1", b"12:", b"12:TEMP db dow", b"12:TEMP db down"] {
            assert_eq!(decode_answer(partial), Ok(None), "{partial:?}");
        }
        assert_eq!(decode_answer(b"x:"), Err(DecodeError::BadLength));
        assert_eq!(decode_answer(b"1234567"), Err(DecodeError::BadLength));
        assert_eq!(decode_answer(b"999999:"), Err(DecodeError::TooLong));
        assert_eq!(decode_answer(b"2:OK;"), Err(DecodeError::NoComma));
        assert_eq!(decode_answer(b"5:MAYBE,"), Err(DecodeError::BadStatus("MAYBE".into())));
    }

    #[test]
    fn tcp_table_queries_and_answers() {
        assert_eq!(encode_tcp_query("a b%c@x"), b"get a%20b%25c@x\n");
        assert_eq!(decode_tcp_answer(b"200 b%40x.test\n"), Ok(Some((Ok(Answer::Found("b@x.test".into())), 15))));
        assert_eq!(decode_tcp_answer(b"500 no such key\r\n"), Ok(Some((Ok(Answer::NotFound), 17))));
        assert!(matches!(decode_tcp_answer(b"400 busy\n"), Ok(Some((Err(LookupError::Temporary(_)), 9)))));
        assert_eq!(decode_tcp_answer(b"200 partial"), Ok(None));
        assert_eq!(decode_tcp_answer(b"200 %4\n"), Err(DecodeError::BadEscape));
        assert_eq!(decode_tcp_answer(b"300 what\n"), Err(DecodeError::BadStatus("300".into())));
        assert_eq!(decode_tcp_answer(&[b'x'; MAX_TCP_LINE]), Err(DecodeError::TooLong));
    }

    #[test]
    fn specs_parse_and_print() {
        for text in ["unix:/run/mortal/private/sockmap:virtual", "inet:127.0.0.1:8780:users"] {
            let spec = SocketmapSpec::parse(text).unwrap();
            assert_eq!(spec.to_string(), format!("socketmap:{text}"));
        }
        // Without a name the port reads as the name, and the rest is no endpoint.
        assert!(SocketmapSpec::parse("inet:127.0.0.1:8780").is_err());
        assert!(SocketmapSpec::parse("unix:/run/s:bad name").unwrap_err().contains("not a map name"));
        assert!(SocketmapSpec::parse("tcp:host:1:x").is_err());
    }

    /// A server answering from a script, one line per query.
    fn server(answers: &'static [&'static str], close_after: usize) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut next = 0;
            for stream in listener.incoming().take(4) {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                for _ in 0..close_after {
                    let mut query = Vec::new();
                    if reader.read_until(b',', &mut query).unwrap_or(0) == 0 || next >= answers.len() {
                        break;
                    }
                    let body = answers[next];
                    next += 1;
                    let _ = stream.write_all(format!("{}:{body},", body.len()).as_bytes());
                }
            }
        });
        addr
    }

    #[test]
    fn a_client_keeps_its_connection_and_reconnects_once() {
        let addr = server(&["OK one", "NOTFOUND ", "TEMP busy", "OK again"], 2);
        let spec = SocketmapSpec { endpoint: NextHop::Inet(addr), name: "m".into() };
        let client = Client::new(spec, Duration::from_secs(5));
        assert_eq!(client.lookup("a"), Ok(Some("one".into())));
        assert_eq!(client.lookup("b"), Ok(None));
        // The server closed after two: the client reconnects by itself.
        assert_eq!(client.lookup("c"), Err(LookupError::Temporary("TEMP busy".into())));
        assert_eq!(client.lookup("d"), Ok(Some("again".into())));
    }

    #[test]
    fn a_silent_server_is_temporary_within_the_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepts, reads, never answers; lives as long as the test.
        let hold = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
        let spec = SocketmapSpec { endpoint: NextHop::Inet(addr), name: "m".into() };
        let client = Client::new(spec, Duration::from_millis(300));
        let started = std::time::Instant::now();
        assert!(matches!(client.lookup("a"), Err(LookupError::Temporary(_))));
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        drop(hold.join());
    }

    #[test]
    fn nobody_listening_is_temporary() {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let spec = SocketmapSpec { endpoint: NextHop::Inet(([127, 0, 0, 1], port).into()), name: "m".into() };
        let client = Client::new(spec, Duration::from_secs(1));
        assert!(matches!(client.lookup("a"), Err(LookupError::Temporary(_))));
    }
}
