//! Recipient address verification (`reject_unverified_recipient`,
//! Postfix's ADDRESS_VERIFICATION_README): before taking mail for an
//! address, ask the server its route delivers to whether it would. smtpd
//! connects to that LMTP server (Dovecot) or SMTP next hop, says
//! LHLO/EHLO, `MAIL FROM:<[smtpd.verify] sender>`, `RCPT TO:<address>`,
//! and QUIT: a 2xx to RCPT is deliverable, a 5xx undeliverable (with the
//! server's words), anything else (4xx, no connection, a timeout, a
//! garbled reply) unknown, which the restriction defers.
//!
//! Answers are remembered per smtpd process: deliverable for
//! `positive_expire`, undeliverable for `negative_expire` (when
//! `negative_cache`), at most `cache_size` addresses; unknown is never
//! remembered. Postfix keeps one cache for the host in its `verify`
//! daemon; mortal's processes are short-lived by design, so each new
//! smtpd probes again the first time it meets an address.
//!
//! Routes with nothing to ask (`maildir`, `pipe`, `discard`) are not
//! probed: the recipient tables decide for them.

use crate::filter::{Endpoint, Stream};
use mortal_proto::config::{Config, NextHop, Route};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Instant;

/// Longest reply line read from the probed server.
const MAX_REPLY: usize = 4096;

/// What a probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Deliverable,
    /// The server refused RCPT: what it said, and who it was.
    Undeliverable {
        server: String,
        reply: String,
    },
    /// No answer either way: why.
    Unknown(String),
    /// The route has no server to ask.
    NotProbed,
}

/// The probes and the cache of one smtpd process.
#[derive(Debug, Default)]
pub struct Verifier {
    cache: Mutex<HashMap<String, (Probe, Instant)>>,
}

impl Verifier {
    /// Whether `address` is deliverable, from the cache or a probe.
    pub async fn verify(&self, config: &Config, address: &str) -> Probe {
        let key = address.to_lowercase();
        let now = Instant::now();
        if let Some((probe, expires)) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key)
            && *expires > now
        {
            return probe.clone();
        }
        let verify = &config.smtpd.verify;
        let domain = address.rsplit_once('@').map_or("", |(_, d)| d);
        let probe = match config.route_for(&domain.to_lowercase()) {
            Route::Lmtp(hop) => probe(&Endpoint::new(hop), true, config, address).await,
            Route::Smtp(addr) => probe(&Endpoint::new(&NextHop::Inet(*addr)), false, config, address).await,
            Route::Maildir | Route::Pipe | Route::Discard => Probe::NotProbed,
        };
        let keep = match &probe {
            Probe::Deliverable => Some(verify.positive_expire),
            Probe::Undeliverable { .. } if verify.negative_cache => Some(verify.negative_expire),
            _ => None,
        };
        if let Some(ttl) = keep {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if cache.len() >= verify.cache_size {
                cache.retain(|_, (_, expires)| *expires > now);
            }
            if cache.len() >= verify.cache_size
                && let Some(oldest) = cache.iter().min_by_key(|(_, (_, e))| *e).map(|(k, _)| k.clone())
            {
                cache.remove(&oldest);
            }
            if verify.cache_size > 0 {
                cache.insert(key, (probe.clone(), now + ttl));
            }
        }
        probe
    }
}

/// One probe conversation, bounded by `[smtpd.verify] timeout`.
async fn probe(endpoint: &Endpoint, lmtp: bool, config: &Config, address: &str) -> Probe {
    let timeout = config.smtpd.verify.timeout;
    match tokio::time::timeout(timeout, converse(endpoint, lmtp, config, address)).await {
        Ok(Ok(probe)) => probe,
        Ok(Err(why)) => {
            tracing::warn!("warning: verify {endpoint}: {why}");
            Probe::Unknown(format!("{endpoint}: {why}"))
        }
        Err(_) => {
            tracing::warn!("warning: verify {endpoint}: timeout after {timeout:?}");
            Probe::Unknown(format!("{endpoint}: timeout"))
        }
    }
}

async fn converse(endpoint: &Endpoint, lmtp: bool, config: &Config, address: &str) -> Result<Probe, String> {
    let mut stream = endpoint.connect().await.map_err(|e| format!("connect: {e}"))?;
    let mut reader = Replies::default();
    let greeting = reader.next(&mut stream).await?;
    if !greeting.starts_with('2') {
        return Ok(unknown_or_refused(endpoint, &greeting, "the greeting"));
    }
    let hostname = &config.server.hostname;
    let hello = if lmtp { format!("LHLO {hostname}") } else { format!("EHLO {hostname}") };
    let sender = &config.smtpd.verify.sender;
    let steps =
        [(hello, "LHLO"), (format!("MAIL FROM:<{sender}>"), "MAIL FROM"), (format!("RCPT TO:<{address}>"), "RCPT TO")];
    for (command, name) in steps {
        stream.write_all(format!("{command}\r\n").as_bytes()).await.map_err(|e| format!("write: {e}"))?;
        let reply = reader.next(&mut stream).await?;
        if reply.starts_with('2') {
            continue;
        }
        let found = unknown_or_refused(endpoint, &reply, name);
        let _ = stream.write_all(b"QUIT\r\n").await;
        // Only RCPT's refusal is about the address.
        return Ok(match (name, found) {
            ("RCPT TO", found) => found,
            (_, Probe::Undeliverable { reply, .. }) => {
                Probe::Unknown(format!("{endpoint} said: {reply} (in reply to {name})"))
            }
            (_, found) => found,
        });
    }
    let _ = stream.write_all(b"QUIT\r\n").await;
    Ok(Probe::Deliverable)
}

/// A 5xx refusal, or a reason to try later.
fn unknown_or_refused(endpoint: &Endpoint, reply: &str, name: &str) -> Probe {
    if reply.starts_with('5') {
        Probe::Undeliverable { server: endpoint.to_string(), reply: reply.to_owned() }
    } else {
        Probe::Unknown(format!("{endpoint} said: {reply} (in reply to {name})"))
    }
}

/// SMTP replies read from the stream: the last line of each, without its
/// line end; bounded per line.
#[derive(Default)]
struct Replies {
    buf: Vec<u8>,
}

impl Replies {
    async fn next(&mut self, stream: &mut Stream) -> Result<String, String> {
        let mut text = String::new();
        loop {
            let line = self.line(stream).await?;
            let bytes = line.as_bytes();
            if bytes.len() < 3 || !bytes[..3].iter().all(u8::is_ascii_digit) {
                return Err(format!("garbled reply {line:?}"));
            }
            if !text.is_empty() {
                text.push(' ');
            }
            text.push_str(line.get(4..).unwrap_or_default());
            if bytes.get(3) != Some(&b'-') {
                return Ok(format!("{} {}", &line[..3], text).trim_end().to_owned());
            }
            if text.len() > MAX_REPLY {
                return Err("reply too long".into());
            }
        }
    }

    async fn line(&mut self, stream: &mut Stream) -> Result<String, String> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                let text = String::from_utf8_lossy(&line);
                return Ok(text.trim_end_matches(['\r', '\n']).chars().filter(|c| !c.is_control()).collect());
            }
            if self.buf.len() > MAX_REPLY {
                return Err("reply line too long".into());
            }
            let mut chunk = [0u8; 1024];
            let n = stream.read(&mut chunk).await.map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("connection closed".into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// The TCP ports probes may connect to: the `inet` routes'.
pub fn probe_ports(config: &Config) -> Vec<u16> {
    config
        .routes()
        .filter_map(|r| match r {
            Route::Lmtp(NextHop::Inet(addr)) | Route::Smtp(addr) => Some(SocketAddr::port(addr)),
            _ => None,
        })
        .collect()
}

/// Whether any list probes recipients.
pub fn enabled(config: &Config) -> bool {
    config.smtpd.restrictions.all().any(|r| *r == mortal_proto::restriction::Restriction::RejectUnverifiedRecipient)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    /// An LMTP server on loopback that knows `known` and counts its
    /// connections.
    async fn lmtp(known: &'static str) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&count);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                seen.fetch_add(1, Ordering::SeqCst);
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                write.write_all(b"220 lmtp ready\r\n").await.unwrap();
                while let Ok(Some(line)) = lines.next_line().await {
                    let reply = match line.split_whitespace().next().unwrap_or_default() {
                        "LHLO" => "250-lmtp\r\n250 PIPELINING\r\n".to_owned(),
                        "RCPT" if line.contains(known) => "250 2.1.5 OK\r\n".to_owned(),
                        "RCPT" => format!("550 5.1.1 {} User doesn't exist\r\n", &line[8..]),
                        "QUIT" => break,
                        _ => "250 2.1.0 OK\r\n".to_owned(),
                    };
                    write.write_all(reply.as_bytes()).await.unwrap();
                }
            }
        });
        (addr, count)
    }

    fn config(addr: SocketAddr, extra: &str) -> Config {
        let text = format!("[delivery]\ntransport = \"lmtp:inet:{addr}\"\n[smtpd.verify]\n{extra}\n");
        Config::parse(&text, std::path::Path::new("/etc/mortal/mortal.toml")).unwrap()
    }

    #[tokio::test]
    async fn probes_once_and_remembers_both_answers() {
        let (addr, connections) = lmtp("alice@").await;
        let config = config(addr, "");
        let verifier = Verifier::default();
        for _ in 0..2 {
            assert_eq!(verifier.verify(&config, "alice@example.test").await, Probe::Deliverable);
            assert_eq!(
                verifier.verify(&config, "bob@example.test").await,
                Probe::Undeliverable {
                    server: format!("inet:{addr}"),
                    reply: "550 5.1.1 <bob@example.test> User doesn't exist".into()
                }
            );
        }
        assert_eq!(connections.load(Ordering::SeqCst), 2, "one probe per address");
    }

    #[tokio::test]
    async fn without_the_negative_cache_refusals_are_asked_again() {
        let (addr, connections) = lmtp("alice@").await;
        let config = config(addr, "negative_cache = false");
        let verifier = Verifier::default();
        for _ in 0..3 {
            assert!(matches!(verifier.verify(&config, "bob@example.test").await, Probe::Undeliverable { .. }));
        }
        assert_eq!(connections.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_full_cache_forgets_the_oldest() {
        let (addr, connections) = lmtp("@example.test").await;
        let config = config(addr, "cache_size = 2");
        let verifier = Verifier::default();
        for user in ["a", "b", "c", "c", "a"] {
            assert_eq!(verifier.verify(&config, &format!("{user}@example.test")).await, Probe::Deliverable);
        }
        // a, b, c probed; c remembered; a forgotten for c and probed again.
        assert_eq!(connections.load(Ordering::SeqCst), 4);
    }
}
