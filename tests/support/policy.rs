//! A scripted policy delegation server on a loopback port (Postfix's
//! SMTPD_POLICY_README protocol), for the tests of smtpd's policy client:
//! it answers each query by the recipient's local part, and records every
//! query and every connection, so a test can assert what smtpd sent and
//! whether it kept its connection.
//!
//! | local part | answer |
//! |---|---|
//! | `reject` | `action=REJECT go away` |
//! | `greylist` | `action=DEFER_IF_PERMIT 4.2.0 Greylisted, see http://postgrey.example/help` |
//! | `code` | `action=550 5.1.1 no such user here` |
//! | `prepend` | `action=PREPEND X-Policy: tagged by the test` |
//! | `hold` | `action=HOLD held by the test` |
//! | `discard` | `action=DISCARD dropped by the test` |
//! | `warn` | `action=WARN odd one` |
//! | `filter` | `action=FILTER smtp:[127.0.0.1]:10025` (not carried out) |
//! | `slow` | nothing for [`SLOW`], then `action=DUNNO` |
//! | `garbage` | `hello world` and an empty line (no `action=`) |
//! | `hangup` | the connection is closed |
//! | anything else | `action=DUNNO` |

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long `slow` waits before answering: longer than any test timeout.
pub const SLOW: Duration = Duration::from_secs(5);
/// Longest any connection is served, whatever the test does.
const MAX_LIFE: Duration = Duration::from_secs(60);

/// One query: its attributes by name.
pub type Query = BTreeMap<String, String>;

/// A running scripted server; stops its accept loop on drop.
#[derive(Debug)]
pub struct ScriptedPolicy {
    port: u16,
    queries: Arc<Mutex<Vec<Query>>>,
    connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ScriptedPolicy {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind policy server");
        let port = listener.local_addr().expect("local addr").port();
        let queries = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (q, c, s) = (Arc::clone(&queries), Arc::clone(&connections), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                c.fetch_add(1, Ordering::SeqCst);
                let q = Arc::clone(&q);
                std::thread::spawn(move || serve(stream, &q));
            }
        });
        Self { port, queries, connections, stop, thread: Some(thread) }
    }

    /// `inet:127.0.0.1:PORT`, for `[[smtpd.policy]] endpoint`.
    pub fn endpoint(&self) -> String {
        format!("inet:127.0.0.1:{}", self.port)
    }

    /// Every query so far, in order.
    pub fn queries(&self) -> Vec<Query> {
        self.queries.lock().expect("queries").clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for ScriptedPolicy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(stream: TcpStream, queries: &Mutex<Vec<Query>>) {
    let _ = stream.set_read_timeout(Some(MAX_LIFE));
    let mut writer = stream.try_clone().expect("clone stream");
    let mut reader = BufReader::new(stream);
    loop {
        let mut query = Query::new();
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let line = line.trim_end_matches('\n');
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once('=') {
                query.insert(name.to_owned(), value.to_owned());
            }
        }
        let local = query.get("recipient").and_then(|r| r.split_once('@')).map_or("", |(l, _)| l).to_owned();
        queries.lock().expect("queries").push(query);
        let answer = match local.as_str() {
            "reject" => "action=REJECT go away\n\n",
            "greylist" => "action=DEFER_IF_PERMIT 4.2.0 Greylisted, see http://postgrey.example/help\n\n",
            "code" => "action=550 5.1.1 no such user here\n\n",
            "prepend" => "action=PREPEND X-Policy: tagged by the test\n\n",
            "hold" => "action=HOLD held by the test\n\n",
            "discard" => "action=DISCARD dropped by the test\n\n",
            "warn" => "action=WARN odd one\n\n",
            "filter" => "action=FILTER smtp:[127.0.0.1]:10025\n\n",
            "garbage" => "hello world\n\n",
            "hangup" => return,
            "slow" => {
                std::thread::sleep(SLOW);
                "action=DUNNO\n\n"
            }
            _ => "action=DUNNO\n\n",
        };
        if writer.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}
