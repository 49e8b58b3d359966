//! An accept-everything milter for the bench's milter rows: it answers
//! every event with CONTINUE, as a filter that has nothing to say does,
//! so that both servers pay the protocol's cost and nothing else. A
//! thread per connection, on a free loopback port, written with mortal's
//! own codec (`mortal_proto::milter`); stopped on drop.

use anyhow::{Context, Result};
use mortal_proto::milter::{Command, Decoder, MilterOptions, Reply};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// Longest a connection is served (the bench's runs are far shorter).
const MAX_LIFE: Duration = Duration::from_secs(600);

pub struct MilterSink {
    pub port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MilterSink {
    pub fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").context("bind the bench milter")?;
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    return;
                }
                if let Ok(stream) = stream {
                    std::thread::spawn(move || serve(stream));
                }
            }
        });
        Ok(Self { port, stop, thread: Some(thread) })
    }
}

impl Drop for MilterSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(mut stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(MAX_LIFE));
    let _ = stream.set_nodelay(true);
    let mut decoder = Decoder::new();
    let mut buf = vec![0u8; 65536];
    let mut out = Vec::new();
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        decoder.feed(&buf[..n]);
        loop {
            match decoder.next_command() {
                Ok(Some(Command::OptNeg(offer))) => {
                    // No actions, every event, every reply: the full cost.
                    MilterOptions { version: offer.version.min(6), actions: 0, steps: 0, macro_lists: Vec::new() }
                        .encode(&mut out);
                }
                Ok(Some(Command::Macro { .. } | Command::Abort)) => {}
                Ok(Some(Command::Quit | Command::QuitNewConnection)) | Err(_) => return,
                Ok(Some(_)) => Reply::Continue.encode(&mut out),
                Ok(None) => break,
            }
        }
        if !out.is_empty() {
            if stream.write_all(&out).is_err() {
                return;
            }
            out.clear();
        }
    }
}
