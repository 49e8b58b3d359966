//! A socketmap server on a loopback port (socketmap_table(5)): answers
//! each `name key` netstring from a fixed table of replies (`OK value`,
//! `TEMP reason`, ...), `NOTFOUND ` for any other key, and records the
//! queries. [`SocketmapServer::start_tcp_table`] speaks tcp_table(5)
//! instead: `get key` lines, `200 value`/`500 ...`/`400 ...` answers. Threads end when the value is dropped, and never live longer
//! than [`MAX_LIFE`].

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest life of the server, whatever the test does.
const MAX_LIFE: Duration = Duration::from_secs(120);
/// How often the accept loop looks at its stop flag.
const POLL: Duration = Duration::from_millis(20);

#[derive(Debug)]
pub struct SocketmapServer {
    pub port: u16,
    queries: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl SocketmapServer {
    /// `replies`: (`name key`, reply body) pairs.
    pub fn start(replies: &[(&str, &str)]) -> Self {
        Self::start_speaking(replies, false)
    }

    /// `replies`: (`key`, answer line without its newline) pairs; any other
    /// key gets `500 not found`.
    pub fn start_tcp_table(replies: &[(&str, &str)]) -> Self {
        Self::start_speaking(replies, true)
    }

    fn start_speaking(replies: &[(&str, &str)], tcp_table: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind socketmap server");
        listener.set_nonblocking(true).expect("non-blocking listener");
        let port = listener.local_addr().expect("local addr").port();
        let table: HashMap<String, String> = replies.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let table = Arc::new(table);
        let queries = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (q, s) = (Arc::clone(&queries), Arc::clone(&stop));
        std::thread::spawn(move || {
            let born = Instant::now();
            while !s.load(Ordering::SeqCst) && born.elapsed() < MAX_LIFE {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (table, q, s) = (Arc::clone(&table), Arc::clone(&q), Arc::clone(&s));
                        std::thread::spawn(move || {
                            if tcp_table {
                                serve_lines(stream, &table, &q, &s);
                            } else {
                                serve(stream, &table, &q, &s);
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(POLL),
                }
            }
        });
        SocketmapServer { port, queries, stop }
    }

    pub fn queries(&self) -> Vec<String> {
        self.queries.lock().unwrap().clone()
    }
}

impl Drop for SocketmapServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn serve(mut stream: TcpStream, table: &HashMap<String, String>, queries: &Mutex<Vec<String>>, stop: &AtomicBool) {
    let _ = stream.set_read_timeout(Some(POLL * 10));
    let born = Instant::now();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !stop.load(Ordering::SeqCst) && born.elapsed() < MAX_LIFE {
        // One whole netstring: `<len>:<body>,`.
        if let Some(colon) = buf.iter().position(|&b| b == b':') {
            let len: usize = std::str::from_utf8(&buf[..colon]).ok().and_then(|d| d.parse().ok()).unwrap_or(usize::MAX);
            if len != usize::MAX && buf.len() > colon + len {
                let body = String::from_utf8_lossy(&buf[colon + 1..colon + 1 + len]).into_owned();
                buf.drain(..=colon + len + 1);
                queries.lock().unwrap().push(body.clone());
                let reply = table.get(&body).cloned().unwrap_or_else(|| "NOTFOUND ".to_owned());
                if stream.write_all(format!("{}:{reply},", reply.len()).as_bytes()).is_err() {
                    return;
                }
                continue;
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

fn serve_lines(stream: TcpStream, table: &HashMap<String, String>, queries: &Mutex<Vec<String>>, stop: &AtomicBool) {
    use std::io::BufRead;
    let _ = stream.set_read_timeout(Some(POLL * 10));
    let born = Instant::now();
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = std::io::BufReader::new(stream);
    let mut line = String::new();
    while !stop.load(Ordering::SeqCst) && born.elapsed() < MAX_LIFE {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) if line.ends_with('\n') => {
                let key = line.trim_end().strip_prefix("get ").unwrap_or_default().to_owned();
                line.clear();
                queries.lock().unwrap().push(key.clone());
                let reply = table.get(&key).cloned().unwrap_or_else(|| "500 not found".to_owned());
                if writer.write_all(format!("{reply}\n").as_bytes()).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}
