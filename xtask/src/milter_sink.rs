//! An accept-everything milter for the bench's milter rows, so that both
//! servers pay the protocol's cost and nothing else: it asks for every
//! event and says CONTINUE, either only at the end of the message (the
//! steps rspamd negotiates: every `NR_*`) or to every event (the full
//! cost). A thread per connection, on a free loopback port, written with
//! mortal's own codec (`mortal_proto::milter`); stopped on drop.

use anyhow::{Context, Result};
use mortal_proto::milter::{Command, Decoder, MilterOptions, ProtocolSteps, Reply};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// Longest a connection is served (the bench's runs are far shorter).
const MAX_LIFE: Duration = Duration::from_secs(600);

/// Which events the sink answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replies {
    /// The end of the message only, as rspamd negotiates.
    EndOfMessage,
    Every,
}

impl Replies {
    fn steps(self) -> u32 {
        match self {
            Replies::Every => 0,
            Replies::EndOfMessage => [
                ProtocolSteps::NR_CONN,
                ProtocolSteps::NR_HELO,
                ProtocolSteps::NR_MAIL,
                ProtocolSteps::NR_RCPT,
                ProtocolSteps::NR_DATA,
                ProtocolSteps::NR_UNKN,
                ProtocolSteps::NR_EOH,
                ProtocolSteps::NR_BODY,
                ProtocolSteps::NR_HDR,
            ]
            .into_iter()
            .fold(0, |all, s| all | s.bits()),
        }
    }
}

pub struct MilterSink {
    pub port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MilterSink {
    pub fn start(replies: Replies) -> Result<Self> {
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
                    std::thread::spawn(move || serve(stream, replies));
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

fn serve(mut stream: TcpStream, replies: Replies) {
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
        // Acknowledge at once (Linux re-arms delayed ACKs after each
        // read): an MTA that writes unanswered events without TCP_NODELAY
        // (Postfix) would otherwise wait for the delayed ACK between two
        // of them, and the bench would measure that stall, not the MTA.
        let _ = socket2::SockRef::from(&stream).set_tcp_quickack(true);
        decoder.feed(&buf[..n]);
        loop {
            match decoder.next_command() {
                Ok(Some(Command::OptNeg(offer))) => {
                    // No actions, every event.
                    let steps = replies.steps() & offer.steps.bits();
                    MilterOptions { version: offer.version.min(6), actions: 0, steps, macro_lists: Vec::new() }
                        .encode(&mut out);
                }
                Ok(Some(Command::Macro { .. } | Command::Abort)) => {}
                Ok(Some(Command::Quit | Command::QuitNewConnection)) | Err(_) => return,
                Ok(Some(Command::EndOfMessage)) => Reply::Continue.encode(&mut out),
                Ok(Some(_)) if replies == Replies::Every => Reply::Continue.encode(&mut out),
                Ok(Some(_)) => {}
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
