//! The `lmtp` agent (RFC 2033): hand-off to a mailbox server such as
//! Dovecot over a Unix socket or TCP.
//!
//! LHLO, pipelined MAIL/RCPT/DATA, and one reply per accepted recipient
//! after the content, so each recipient is delivered, deferred or bounced
//! on its own. Sessions are reused across messages for
//! `[delivery] connection_reuse_time`. LMTP is final delivery: DSN
//! parameters are not passed on, and a NOTIFY=SUCCESS recipient gets a
//! `delivered` DSN from us.

use crate::Agent;
use crate::client::{self, Dialect, Hop, Session};
use mortal_proto::config::{NextHop, Route};
use mortal_proto::delivery::{Report, Request};

pub fn deliver(agent: &Agent, hop: &NextHop, key: &Route, request: &Request) -> Report {
    client::deliver(&agent.cache, key, request, Hop::Final, || {
        Session::connect(hop, Dialect::Lmtp, &agent.config.server.hostname, agent.timeouts())
    })
}
