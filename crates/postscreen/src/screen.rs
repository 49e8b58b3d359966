//! The screen itself: one task per held connection, all on one thread.
//!
//! A connection costs its socket, a small task and no buffer while it
//! waits: the read buffer exists only once the client has sent something.

use crate::cache::PassCache;
use mortal_libmaster::child::ExitReason;
use mortal_proto::config::GreetAction;
use mortal_proto::handoff::{ACK, Handoff, MAX_INPUT};
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{oneshot, watch};
use tokio::time::{sleep_until, timeout};

/// Longest wait to write a reply to a client that does not read.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after an accept error (EMFILE), so it cannot spin the process.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// How long a retiring postscreen gives its tasks to say 421 and close.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Octets of pre-greeting talk quoted in the log.
const EXCERPT: usize = 100;

/// What the screen works with, fixed at start.
#[derive(Debug)]
pub struct Settings {
    pub hostname: String,
    pub banner: String,
    pub greet_wait: Duration,
    pub greet_action: GreetAction,
    pub command_time_limit: Duration,
    /// `[postscreen] connection_limit`, bounded by the descriptors there are.
    pub connection_limit: usize,
    pub client_connection_limit: u32,
    /// smtpd's hand-off socket, as seen inside the chroot.
    pub handoff_socket: PathBuf,
    /// How long an smtpd may take to accept a client (the smtpd pool's
    /// `overload_wait`) before the client hears that all are busy.
    pub handoff_wait: Duration,
    /// Hand-offs in flight, each with a descriptor: at most
    /// [`mortal_proto::config::HANDOFFS_IN_FLIGHT`].
    pub handoffs: tokio::sync::Semaphore,
    /// The DNS lists postscreen asks itself (`[smtpd.dnsbl] action =
    /// "drop"`).
    pub dnsbl: Option<DnsLists>,
}

#[derive(Debug)]
pub struct DnsLists {
    pub client: mortal_smtpd::dnsbl::Dnsbl,
    pub sites: Vec<mortal_proto::dnsbl::DnsblSite>,
    pub threshold: i32,
}

#[derive(Debug)]
struct Shared {
    /// Connections held.
    held: usize,
    per_client: HashMap<IpAddr, u32>,
    passed: PassCache,
}

/// One held connection's place in the counts, given back when dropped.
struct Held {
    shared: Arc<Mutex<Shared>>,
    addr: IpAddr,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        shared.held -= 1;
        if let Some(n) = shared.per_client.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                shared.per_client.remove(&self.addr);
            }
        }
    }
}

/// `[2001:db8::1]:25`, `[192.0.2.1]:25`, as Postfix's postscreen writes clients.
struct Endpoint(SocketAddr);

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}]:{}", self.0.ip().to_canonical(), self.0.port())
    }
}

/// Takes connections until the master retires this process or goes away.
pub async fn serve(
    listener: std::net::TcpListener,
    settings: Settings,
    passed: PassCache,
    stop: oneshot::Receiver<ExitReason>,
) -> io::Result<(ExitReason, PassCache)> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let settings = Arc::new(settings);
    let shared = Arc::new(Mutex::new(Shared { held: 0, per_client: HashMap::new(), passed }));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            reason = &mut stop => {
                let reason = reason.unwrap_or(ExitReason::MasterGone);
                drop(listener);
                let _ = shutdown_tx.send(true);
                let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
                while shared.lock().unwrap_or_else(PoisonError::into_inner).held > 0
                    && tokio::time::Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                // For the successor.
                let passed = std::mem::take(&mut shared.lock().unwrap_or_else(PoisonError::into_inner).passed);
                return Ok((reason, passed));
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => admit(stream, peer, &settings, &shared, &shutdown_rx),
                Err(e) => {
                    tracing::warn!("warning: accept: {e}");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            },
        }
    }
}

/// Holds the connection, or turns it away at once when postscreen holds
/// all it may, or all one client may have.
fn admit(
    stream: TcpStream,
    peer: SocketAddr,
    settings: &Arc<Settings>,
    shared: &Arc<Mutex<Shared>>,
    shutdown: &watch::Receiver<bool>,
) {
    let addr = peer.ip().to_canonical();
    let local = stream.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    tracing::info!("CONNECT from {} to {}", Endpoint(peer), Endpoint(local));
    let refusal = {
        let mut s = shared.lock().unwrap_or_else(PoisonError::into_inner);
        let for_client = s.per_client.get(&addr).copied().unwrap_or(0);
        if s.held >= settings.connection_limit {
            Some(("all server ports busy", "421 4.3.2 All server ports are busy\r\n".to_owned()))
        } else if settings.client_connection_limit != 0 && for_client >= settings.client_connection_limit {
            Some((
                "too many connections",
                format!("421 4.7.0 {} Error: too many connections from {addr}\r\n", settings.hostname),
            ))
        } else {
            s.held += 1;
            *s.per_client.entry(addr).or_insert(0) += 1;
            None
        }
    };
    if let Some((why, reply)) = refusal {
        tracing::info!("NOQUEUE: reject: CONNECT from {}: {why}", Endpoint(peer));
        // A fresh socket's buffer takes the line; if not, the client
        // learns from the close.
        let _ = stream.try_write(reply.as_bytes());
        return;
    }
    let held = Held { shared: Arc::clone(shared), addr };
    let (settings, shared, shutdown) = (Arc::clone(settings), Arc::clone(shared), shutdown.clone());
    tokio::spawn(async move {
        screen(stream, peer, &settings, &shared, shutdown).await;
        drop(held);
    });
}

/// What came of waiting on the client.
enum Heard {
    Input(Vec<u8>),
    Closed,
    TimedOut,
    ShuttingDown,
}

/// Waits up to `limit` for the client to send something, and reads what
/// it sent (at most [`MAX_INPUT`] octets).
async fn listen(stream: &TcpStream, limit: Duration, shutdown: &mut watch::Receiver<bool>) -> Heard {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        tokio::select! {
            ready = stream.readable() => {
                if ready.is_err() {
                    return Heard::Closed;
                }
                let mut buf = vec![0; MAX_INPUT];
                match stream.try_read(&mut buf) {
                    Ok(0) => return Heard::Closed,
                    Ok(n) => {
                        buf.truncate(n);
                        return Heard::Input(buf);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Heard::Closed,
                }
            }
            () = sleep_until(deadline) => return Heard::TimedOut,
            _ = shutdown.changed() => return Heard::ShuttingDown,
        }
    }
}

async fn say(stream: &mut TcpStream, text: &str) -> bool {
    matches!(timeout(SEND_TIMEOUT, stream.write_all(text.as_bytes())).await, Ok(Ok(())))
}

/// One client: the pregreet test unless it passed lately, the greeting,
/// its first command, and the hand-off to smtpd.
async fn screen(
    mut stream: TcpStream,
    peer: SocketAddr,
    settings: &Settings,
    shared: &Mutex<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let client = Endpoint(peer);
    let addr = peer.ip().to_canonical();
    // The lists are asked while the pregreet test runs; the answer is
    // awaited only after it (bounded by `[smtpd.dnsbl] timeout`).
    let lookup = settings.dnsbl.as_ref().map(|lists| {
        let (dns, sites) = (lists.client.clone(), lists.sites.clone());
        tokio::spawn(async move { dns.screen(&sites, addr).await })
    });
    let greeting = format!("{} {}", settings.hostname, settings.banner);
    let known = shared.lock().unwrap_or_else(PoisonError::into_inner).passed.passed(addr, Instant::now());
    let mut input = None;
    if known {
        tracing::info!("PASS OLD {client}");
    } else if !settings.greet_wait.is_zero() {
        // The first line of a two-line greeting: an honest client waits
        // for the last one; a bot that talks now gives itself away.
        if !say(&mut stream, &format!("220-{greeting}\r\n")).await {
            return;
        }
        let started = Instant::now();
        match listen(&stream, settings.greet_wait, &mut shutdown).await {
            Heard::TimedOut => {
                tracing::info!("PASS NEW {client}");
                shared.lock().unwrap_or_else(PoisonError::into_inner).passed.insert(addr, Instant::now());
            }
            Heard::Input(early) => {
                tracing::info!(
                    "PREGREET {} after {:.2} from {client}: {}",
                    early.len(),
                    started.elapsed().as_secs_f64(),
                    excerpt(&early)
                );
                match settings.greet_action {
                    GreetAction::Drop => {
                        say(&mut stream, "521 5.5.1 Protocol error\r\n").await;
                        tracing::info!("DISCONNECT {client}");
                        return;
                    }
                    GreetAction::Ignore => input = Some(early),
                }
            }
            Heard::Closed => {
                tracing::info!(
                    "HANGUP after {:.2} from {client} in tests before SMTP handshake",
                    started.elapsed().as_secs_f64()
                );
                return;
            }
            Heard::ShuttingDown => {
                say(&mut stream, &format!("421 4.3.2 {} Service shutting down\r\n", settings.hostname)).await;
                return;
            }
        }
    }
    let mut dnsbl_score = None;
    if let (Some(lookup), Some(lists)) = (lookup, &settings.dnsbl) {
        let screening = lookup.await.unwrap_or_default();
        if screening.score != 0 {
            tracing::info!("DNSBL rank {} for {client}", screening.score);
        }
        if screening.score >= lists.threshold {
            let site = screening.blocked_by().unwrap_or("a DNS block list");
            say(&mut stream, &format!("521 5.7.1 Service unavailable; client [{addr}] blocked using {site}\r\n")).await;
            tracing::info!("DISCONNECT {client}");
            return;
        }
        dnsbl_score = Some(screening.score);
    }
    if !say(&mut stream, &format!("220 {greeting}\r\n")).await {
        return;
    }
    let input = match input {
        Some(input) => input,
        None => match listen(&stream, settings.command_time_limit, &mut shutdown).await {
            Heard::Input(input) => input,
            Heard::Closed => {
                tracing::info!("DISCONNECT {client}");
                return;
            }
            Heard::TimedOut => {
                tracing::info!("COMMAND TIME LIMIT from {client} after CONNECT");
                say(&mut stream, &format!("421 4.4.2 {} Error: timeout exceeded\r\n", settings.hostname)).await;
                return;
            }
            Heard::ShuttingDown => {
                say(&mut stream, &format!("421 4.3.2 {} Service shutting down\r\n", settings.hostname)).await;
                return;
            }
        },
    };
    if let Err(e) = hand_off(&stream, Handoff { greeted: true, dnsbl_score, input }, settings).await {
        tracing::warn!("warning: hand-off of {client} to smtpd: {e}");
        say(&mut stream, "421 4.3.2 All server ports are busy\r\n").await;
    }
}

/// Passes the client to an idle smtpd and waits for it to say it holds
/// the socket; the smtpd pool's `overload_wait` bounds the wait.
async fn hand_off(client: &TcpStream, handoff: Handoff, settings: &Settings) -> io::Result<()> {
    let waited = timeout(settings.handoff_wait, async {
        let _turn = settings.handoffs.acquire().await.map_err(io::Error::other)?;
        let mut link = UnixStream::connect(&settings.handoff_socket).await?;
        link.writable().await?;
        link.try_io(Interest::WRITABLE, || mortal_libmaster::handoff::send(&link, client.as_fd(), &handoff))?;
        let ack = link.read_u8().await?;
        if ack != ACK {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("smtpd answered {ack:#04x}")));
        }
        Ok(())
    })
    .await;
    match waited {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no smtpd took it within {:?} (all busy)", settings.handoff_wait),
        )),
    }
}

/// What the client sent, quoted for the log as Postfix does: `\r`, `\n`
/// and other control octets escaped, cut to [`EXCERPT`] octets.
fn excerpt(input: &[u8]) -> String {
    let mut out = String::new();
    for &b in input.iter().take(EXCERPT) {
        match b {
            b'\r' => out.push_str("\\r"),
            b'\n' => out.push_str("\\n"),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    if input.len() > EXCERPT {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn talk_is_quoted_with_controls_escaped_and_cut() {
        assert_eq!(excerpt(b"EHLO bot\r\n"), "EHLO bot\\r\\n");
        assert_eq!(excerpt(b"\x00\xff\\"), "\\x00\\xff\\\\");
        let long = vec![b'a'; EXCERPT + 1];
        assert_eq!(excerpt(&long), format!("{}...", "a".repeat(EXCERPT)));
    }

    #[test]
    fn clients_are_written_as_postscreen_writes_them() {
        assert_eq!(Endpoint("192.0.2.1:25".parse().unwrap()).to_string(), "[192.0.2.1]:25");
        assert_eq!(Endpoint("[2001:db8::1]:25".parse().unwrap()).to_string(), "[2001:db8::1]:25");
        assert_eq!(Endpoint("[::ffff:192.0.2.1]:25".parse().unwrap()).to_string(), "[192.0.2.1]:25");
    }
}
