//! The socketmap lookup protocol (Sendmail's, as Postfix's
//! socketmap_table(5) speaks it): the door to SQL, LDAP or any other
//! source an external server answers for. A query is the netstring
//! `<len>:<map name> <key>,`; the answer a netstring holding `OK <value>`,
//! `NOTFOUND `, `TEMP <reason>`, `TIMEOUT <reason>` or `PERM <reason>`.
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
}

/// `name key` as a netstring.
pub fn encode_query(name: &str, key: &str) -> Vec<u8> {
    let body = format!("{name} {key}");
    format!("{}:{body},", body.len()).into_bytes()
}

/// One decoded answer (or the failure the server reported) and the octets
/// of the buffer it took.
pub type Decoded = (Result<Answer, LookupError>, usize);

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
    pub spec: SocketmapSpec,
    timeout: Duration,
    conn: Mutex<Option<Conn>>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client").field("spec", &self.spec).field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

impl Client {
    /// No connection yet: the first lookup makes it.
    pub fn new(spec: SocketmapSpec, timeout: Duration) -> Client {
        Client { spec, timeout, conn: Mutex::new(None) }
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
                LookupError::Temporary(format!("{}: {e}", self.spec))
            }
            AskError::Decode(e) => {
                *slot = None;
                LookupError::Permanent(format!("{}: {e}", self.spec))
            }
            AskError::Answer(e) => e,
        }
    }

    fn ask(&self, slot: &mut Option<Conn>, key: &str) -> Result<Answer, AskError> {
        if slot.is_none() {
            *slot = Some(Conn::connect(&self.spec.endpoint, self.timeout).map_err(AskError::Io)?);
        }
        let conn = slot.as_mut().expect("connected above");
        conn.write_all(&encode_query(&self.spec.name, key)).map_err(AskError::Io)?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some((answer, used)) = decode_answer(&buf).map_err(AskError::Decode)? {
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
