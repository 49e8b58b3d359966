//! The policy delegation client (Postfix `check_policy_service`): one
//! connection per configured server, kept by the process across sessions
//! and reused for `max_idle` and `max_ttl` (and `request_limit` queries),
//! one query at a time, each bounded by `timeout` from connect to the
//! empty line that ends the reply. A query that fails is tried again, up
//! to `try_limit` times `retry_delay` apart; after that, and for an action
//! mortal does not carry out, the server's `default_action` stands in for
//! its answer, and a `warning:` says why.

use super::Endpoint;
use mortal_proto::config::PolicyService;
use mortal_proto::policy::{Action, PolicyError, Query, ReplyDecoder};
use std::time::{Duration, Instant};
use tokio::time::timeout;

/// Octets read from a policy server at a time.
const READ_CHUNK: usize = 2048;

/// One policy server and its kept connection.
#[derive(Debug)]
pub struct PolicyClient {
    pub config: PolicyService,
    endpoint: Endpoint,
    conn: Option<Conn>,
}

#[derive(Debug)]
struct Conn {
    stream: super::Stream,
    opened: Instant,
    last_used: Instant,
    queries: u32,
}

/// Why one attempt failed.
type AskError = super::Fault<PolicyError>;

impl From<PolicyError> for AskError {
    fn from(e: PolicyError) -> Self {
        AskError::Protocol(e)
    }
}

impl PolicyClient {
    pub fn new(config: PolicyService) -> Self {
        let endpoint = Endpoint::new(&config.endpoint);
        Self { config, endpoint, conn: None }
    }

    /// The server's answer to `query`, or its default action when it
    /// cannot be had.
    pub async fn ask(&mut self, query: &Query) -> Action {
        let request = query.encode();
        let mut last_error = None;
        for attempt in 0..self.config.try_limit.max(1) {
            if attempt > 0 {
                tokio::time::sleep(self.config.retry_delay).await;
            }
            match timeout(self.config.timeout, self.attempt(&request)).await {
                Ok(Ok(Action::Unsupported(what))) => {
                    tracing::warn!(
                        "warning: policy server {}: unsupported action {what:?}: using default_action",
                        self.endpoint
                    );
                    return self.config.default_action.clone();
                }
                Ok(Ok(action)) => return action,
                Ok(Err(e)) => last_error = Some(e),
                Err(_) => last_error = Some(AskError::Timeout),
            }
            // Whatever state the connection is in, it is not to be trusted.
            self.conn = None;
        }
        if let Some(e) = last_error {
            tracing::warn!("warning: problem talking to server {}: {e}", self.endpoint);
        }
        self.config.default_action.clone()
    }

    async fn attempt(&mut self, request: &[u8]) -> Result<Action, AskError> {
        let now = Instant::now();
        let fresh = |c: &Conn| {
            now.duration_since(c.last_used) < self.config.max_idle
                && now.duration_since(c.opened) < self.config.max_ttl
                && (self.config.request_limit == 0 || c.queries < self.config.request_limit)
        };
        if !self.conn.as_ref().is_some_and(fresh) {
            self.conn = None;
            let stream = self.endpoint.connect().await?;
            self.conn = Some(Conn { stream, opened: now, last_used: now, queries: 0 });
        }
        let conn = self.conn.as_mut().expect("connected above");
        conn.stream.write_all(request).await?;
        let mut decoder = ReplyDecoder::new();
        let mut buf = [0; READ_CHUNK];
        let action = loop {
            let n = conn.stream.read(&mut buf).await?;
            if n == 0 {
                return Err(AskError::Eof);
            }
            if let Some(action) = decoder.feed(&buf[..n])? {
                break action;
            }
        };
        // A server that says more than one reply is out of step with us.
        if decoder.has_trailing() {
            return Err(AskError::Protocol(PolicyError::TrailingData));
        }
        conn.queries += 1;
        conn.last_used = Instant::now();
        Ok(action)
    }
}

/// Longest any policy round may take: every server's tries and pauses.
pub fn worst_case(services: &[PolicyService]) -> Duration {
    services.iter().map(|s| (s.timeout + s.retry_delay) * s.try_limit.max(1)).sum()
}
