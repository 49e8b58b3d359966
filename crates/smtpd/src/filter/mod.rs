//! The filters smtpd asks during the dialogue, as Postfix's smtpd does:
//! policy delegation servers ([`policy`], `check_policy_service`) and
//! Sendmail milters ([`milter`], `smtpd_milters`). [`verdict`] is what
//! they decide, in Postfix's words; [`Filters`] asks them at each stage
//! the engine stops at, policy servers first and milters after (a
//! command a policy server refused never reaches a milter, as in
//! Postfix), and keeps what they decided about the message (header
//! edits, hold, discard) until the driver hands it to cleanup as `Edit`
//! records. smtpd applies nothing itself: cleanup does, and checks the
//! result.

pub mod milter;
pub mod policy;
pub mod verdict;

use crate::engine::{Check, Facts, Subject};
use milter::{MacroFacts, Milters};
use mortal_libmaster::sandbox::visible_path;
use mortal_proto::config::{Config, NextHop};
use mortal_proto::ipc::Edit;
use mortal_proto::policy::{Query, TlsFacts};
use policy::PolicyClient;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::{TcpStream, UnixStream};
use verdict::{CheckStage, Decision, PolicyRound, Verdict};

/// Where a filter listens, as smtpd reaches it (a Unix socket path as
/// seen from inside its chroot), and as the operator wrote it, for logs.
#[derive(Debug, Clone)]
pub struct Endpoint {
    hop: NextHop,
    written: NextHop,
}

impl Endpoint {
    pub fn new(hop: &NextHop) -> Self {
        let seen = match hop {
            NextHop::Unix(p) => NextHop::Unix(visible_path(p)),
            NextHop::Inet(a) => NextHop::Inet(*a),
        };
        Self { hop: seen, written: hop.clone() }
    }

    pub async fn connect(&self) -> io::Result<Stream> {
        Ok(match &self.hop {
            NextHop::Unix(path) => Stream::Unix(UnixStream::connect(path).await?),
            NextHop::Inet(addr) => {
                let tcp = TcpStream::connect(addr).await?;
                // Small request/answer packets: no waiting for more.
                tcp.set_nodelay(true)?;
                Stream::Tcp(tcp)
            }
        })
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.written.fmt(f)
    }
}

/// Why a conversation with a filter failed: `P` is the protocol's own
/// error (`MilterError`, `PolicyError`).
#[derive(Debug, thiserror::Error)]
pub enum Fault<P: std::error::Error + 'static> {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("timeout exceeded")]
    Timeout,
    #[error("premature end of input")]
    Eof,
    #[error(transparent)]
    Protocol(P),
}

/// A connection to a filter.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// The policy servers of this process: connections outlive sessions.
pub type PolicyClients = Arc<tokio::sync::Mutex<Vec<PolicyClient>>>;

/// The policy clients for `config`, one per `[[smtpd.policy]]`.
pub fn policy_clients(config: &Config) -> PolicyClients {
    Arc::new(tokio::sync::Mutex::new(config.smtpd.policy.iter().cloned().map(PolicyClient::new).collect()))
}

/// Where the session's connection is, beyond what the engine knows.
#[derive(Debug, Clone, Copy)]
pub struct Endpoints {
    /// The client's address and port (the PROXY header's, behind one).
    pub client: SocketAddr,
    /// The address and port the client connected to.
    pub server: SocketAddr,
}

/// One session's filters.
pub struct Filters {
    config: Arc<Config>,
    policy: PolicyClients,
    milters: Milters,
    endpoints: Endpoints,
    /// What the filters decided about the current message, in order.
    edits: Vec<Edit>,
    /// The message so far, for the milters (which get it whole at its end).
    content: Vec<u8>,
    /// Octets of the current message so far.
    size: u64,
    /// Policy `instance`: the same for every query about one message.
    instance: String,
    transactions: u32,
}

impl Filters {
    pub fn new(config: Arc<Config>, policy: PolicyClients, endpoints: Endpoints) -> Self {
        let milters = Milters::new(&config);
        Self {
            config,
            policy,
            milters,
            endpoints,
            edits: Vec::new(),
            content: Vec::new(),
            size: 0,
            instance: String::new(),
            transactions: 0,
        }
    }

    /// Whether any milter is configured (only then is content kept).
    fn has_milters(&self) -> bool {
        !self.config.smtpd.milters.is_empty()
    }

    /// A transaction starts: a fresh message state and policy instance.
    pub fn transaction_started(&mut self) {
        self.edits.clear();
        self.content.clear();
        self.size = 0;
        self.transactions += 1;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        self.instance =
            format!("{:x}.{:x}.{:x}.{}", std::process::id(), now.as_secs(), now.subsec_micros(), self.transactions);
    }

    /// The transaction ended without `End` (RSET, a refusal, a lost
    /// client): the milters forget the message.
    pub async fn transaction_aborted(&mut self) {
        self.edits.clear();
        self.content.clear();
        self.milters.abort().await;
    }

    /// Content as it goes to cleanup, kept for the milters.
    pub fn content(&mut self, chunk: &[u8]) {
        self.size += chunk.len() as u64;
        if self.has_milters() {
            self.content.extend_from_slice(chunk);
        }
    }

    /// What the filters decided about the message, for cleanup, in order;
    /// the message state is reset for the next one.
    pub fn take_edits(&mut self) -> Vec<Edit> {
        self.content.clear();
        std::mem::take(&mut self.edits)
    }

    /// The session ends: milters get QUIT.
    pub async fn quit(&mut self) {
        self.milters.quit().await;
    }

    /// Asks the policy servers, then the milters, about `check`.
    pub async fn check(&mut self, check: &Check, facts: &Facts<'_>) -> Verdict {
        let mut notes = Vec::new();
        if let Some(stage) = check.stage.policy()
            && self.config.smtpd.policy.iter().any(|p| p.stages.contains(&stage))
        {
            let (decision, policy_notes) = self.ask_policy(check, facts, stage).await;
            notes.extend(policy_notes);
            if decision != Decision::Continue {
                return Verdict { decision, notes };
            }
        }
        if self.has_milters() {
            let macros = self.macro_facts(facts, &check.subject);
            let outcome = match check.stage {
                CheckStage::EndOfMessage => {
                    let content = std::mem::take(&mut self.content);
                    self.milters.end_of_message(&macros, &content).await
                }
                _ => self.milters.event(check, &macros).await,
            };
            notes.extend(outcome.notes);
            self.edits.extend(outcome.edits);
            return Verdict { decision: outcome.decision, notes };
        }
        Verdict { decision: Decision::Continue, notes }
    }

    async fn ask_policy(
        &mut self,
        check: &Check,
        facts: &Facts<'_>,
        stage: mortal_proto::config::FilterStage,
    ) -> (Decision, Vec<verdict::Note>) {
        let name = match (&check.subject, check.stage) {
            (Subject::Rcpt { address, .. }, _) => address.clone(),
            (Subject::Helo(name), _) => name.clone(),
            (_, CheckStage::Connect) => format!("{}[{}]", facts.name, facts.addr),
            (_, CheckStage::Mail) => facts.sender.unwrap_or_default().to_owned(),
            (_, CheckStage::Data) => "DATA".to_owned(),
            (_, CheckStage::EndOfMessage) => "END-OF-MESSAGE".to_owned(),
            _ => String::new(),
        };
        let mut query = self.query(check, facts, stage);
        let mut round = PolicyRound::new(check.stage, name);
        let mut clients = self.policy.lock().await;
        for client in clients.iter_mut().filter(|c| c.config.stages.contains(&stage)) {
            query.policy_context.clone_from(&client.config.context);
            let action = client.ask(&query).await;
            if let Some(decision) = round.take(&action) {
                let (notes, edits) = round.into_parts();
                self.edits.extend(edits);
                return (decision, notes);
            }
        }
        let (decision, notes, edits) = round.finish();
        self.edits.extend(edits);
        (decision, notes)
    }

    fn query(&self, check: &Check, facts: &Facts<'_>, stage: mortal_proto::config::FilterStage) -> Query {
        let recipient = match &check.subject {
            Subject::Rcpt { address, .. } => address.clone(),
            _ => String::new(),
        };
        let at_data = matches!(check.stage, CheckStage::Data | CheckStage::EndOfMessage);
        let size = match check.stage {
            CheckStage::EndOfMessage => self.content_size(),
            _ => facts.size,
        };
        Query {
            stage: stage.protocol_state(facts.esmtp),
            protocol_name: if facts.esmtp { "ESMTP" } else { "SMTP" }.to_owned(),
            helo_name: facts.helo.unwrap_or_default().to_owned(),
            queue_id: facts.queue_id,
            sender: facts.sender.unwrap_or_default().to_owned(),
            recipient,
            recipient_count: if at_data { facts.recipients } else { 0 },
            client_address: facts.addr,
            client_port: self.endpoints.client.port(),
            client_name: facts.name.to_owned(),
            reverse_client_name: facts.name.to_owned(),
            instance: self.instance.clone(),
            size,
            etrn_domain: String::new(),
            stress: false,
            sasl: Default::default(),
            tls: facts.tls.map(|t| TlsFacts {
                protocol: t.version().to_string(),
                cipher: t.cipher().to_owned(),
                keysize: t.bits(),
                ..Default::default()
            }),
            server_address: self.endpoints.server.ip(),
            server_port: self.endpoints.server.port(),
            policy_context: String::new(),
        }
    }

    /// The message size at its end.
    fn content_size(&self) -> u64 {
        self.size
    }

    fn macro_facts(&self, facts: &Facts<'_>, subject: &Subject) -> MacroFacts {
        MacroFacts {
            hostname: self.config.server.hostname.clone(),
            client: self.endpoints.client,
            client_name: facts.name.to_owned(),
            server: self.endpoints.server,
            helo: facts.helo.map(str::to_owned),
            tls: facts.tls.cloned(),
            queue_id: facts.queue_id,
            sender: facts.sender.map(str::to_owned),
            recipient: match subject {
                Subject::Rcpt { address, .. } => Some(address.clone()),
                _ => None,
            },
        }
    }
}
