//! `[postscreen]`: the screen in front of smtpd on the `[smtpd] listen`
//! addresses (Postfix postscreen(8)). One event-driven process per address
//! holds each new connection, sends the first line of a two-line greeting,
//! watches for a client that talks before it may (the pregreet test), sends
//! the rest of the greeting, and waits for the client's first command. Only
//! then is the connection passed to an smtpd child, with what the client
//! sent. Clients that connect and wait, or talk out of turn, never take an
//! smtpd process.

use super::{Resolver, raw};
use serde::Deserialize;
use std::time::Duration;

/// What postscreen does with a client that talks before the greeting ends
/// (Postfix `postscreen_greet_action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GreetAction {
    /// `521 5.5.1 Protocol error` and the connection is closed.
    Drop,
    /// Logged only; the client is passed on as if it had waited.
    Ignore,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Postscreen {
    /// Off by default: smtpd children then take connections themselves.
    pub enabled: bool,
    /// How long the first greeting line is held before the rest, during
    /// which a client must not talk (Postfix `postscreen_greet_wait`, 6 s);
    /// 0 turns the pregreet test off.
    pub greet_wait: Duration,
    pub greet_action: GreetAction,
    /// A client that passed the pregreet test skips it for this long
    /// (Postfix `postscreen_greet_ttl`, 1 day).
    pub greet_ttl: Duration,
    /// Most client addresses remembered as having passed; the oldest are
    /// forgotten first.
    pub cache_limit: usize,
    /// Longest wait for the client's first command after the greeting
    /// (Postfix `postscreen_command_time_limit`, 300 s).
    pub command_time_limit: Duration,
    /// Most connections held at once; past it a new client gets
    /// `421 4.3.2 All server ports are busy` (Postfix's words).
    pub connection_limit: u32,
    /// Most connections held for one client address (Postfix
    /// `postscreen_client_connection_count_limit`, 50); 0: no limit.
    pub client_connection_limit: u32,
}

impl Default for Postscreen {
    fn default() -> Self {
        Self {
            enabled: false,
            greet_wait: Duration::from_secs(6),
            greet_action: GreetAction::Drop,
            greet_ttl: Duration::from_secs(86_400),
            cache_limit: 100_000,
            command_time_limit: Duration::from_secs(300),
            connection_limit: 10_000,
            client_connection_limit: 50,
        }
    }
}

/// Hand-offs to smtpd in flight at once (each holds a descriptor); more
/// wait their turn within the hand-off's time.
pub const HANDOFFS_IN_FLIGHT: u32 = 256;
/// Descriptors beside the connections and hand-offs: stdio, the master
/// link, the runtime's.
pub const NOFILE_RESERVE: u64 = 64;

impl Postscreen {
    /// Descriptors postscreen may hold: every connection, the hand-offs in
    /// flight, and [`NOFILE_RESERVE`].
    pub fn nofile(&self) -> u64 {
        u64::from(self.connection_limit) + u64::from(HANDOFFS_IN_FLIGHT) + NOFILE_RESERVE
    }
}

impl Resolver<'_> {
    pub(super) fn postscreen(&mut self, raw: raw::Postscreen) -> Postscreen {
        let d = Postscreen::default();
        let p = Postscreen {
            enabled: raw.enabled.unwrap_or(d.enabled),
            greet_wait: self.duration("postscreen.greet_wait", raw.greet_wait, d.greet_wait),
            greet_action: raw.greet_action.unwrap_or(d.greet_action),
            greet_ttl: self.duration("postscreen.greet_ttl", raw.greet_ttl, d.greet_ttl),
            cache_limit: raw.cache_limit.unwrap_or(d.cache_limit),
            command_time_limit: self.duration(
                "postscreen.command_time_limit",
                raw.command_time_limit,
                d.command_time_limit,
            ),
            connection_limit: raw.connection_limit.unwrap_or(d.connection_limit),
            client_connection_limit: raw.client_connection_limit.unwrap_or(d.client_connection_limit),
        };
        let mut bad = |key: &str, message: &str| {
            self.problems.push(("postscreen".into(), key.into(), message.into()));
        };
        if p.connection_limit == 0 {
            bad("connection_limit", "must be above 0");
        }
        if p.command_time_limit.is_zero() {
            bad("command_time_limit", "must be above 0");
        }
        if p.greet_wait >= p.command_time_limit {
            bad("greet_wait", "must be shorter than command_time_limit");
        }
        p
    }
}
