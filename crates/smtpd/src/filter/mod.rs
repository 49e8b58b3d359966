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
pub mod restrict;
pub mod verdict;

use crate::dnsbl::Screening;
use crate::engine::{Check, Facts, Subject};
use crate::mailhost::DomainStatus;
use milter::{MacroFacts, Milters};
use mortal_libmaster::sandbox::visible_path;
use mortal_proto::config::{Config, NextHop};
use mortal_proto::config::{DnsblAction, FilterStage};
use mortal_proto::ipc::Edit;
use mortal_proto::policy::{Query, TlsFacts};
use mortal_proto::restriction::Restriction;
use mortal_proto::smtp_status::{EnhancedStatus, ReplyCode, StatusClass};
use policy::PolicyClient;
use restrict::{ListEnd, ListRound, Restrictor};
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::{TcpStream, UnixStream};
use verdict::{CheckStage, Decision, FilterReply, PolicyRound, RefusedBy, Verdict};

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

// Async reads and writes on a filter's (or a probed server's) stream.
impl Stream {
    pub(crate) async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        use tokio::io::AsyncWriteExt;
        match self {
            Stream::Tcp(s) => s.write_all(bytes).await,
            Stream::Unix(s) => s.write_all(bytes).await,
        }
    }

    pub(crate) async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use tokio::io::AsyncReadExt;
        match self {
            Stream::Tcp(s) => s.read(buf).await,
            Stream::Unix(s) => s.read(buf).await,
        }
    }
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

/// The session's DNSBL screening: started at connect, awaited once.
enum Screen {
    Off,
    Running(tokio::task::JoinHandle<Screening>),
    Done(Option<Screening>),
}

/// One session's filters.
pub struct Filters {
    config: Arc<Config>,
    policy: PolicyClients,
    restrictor: Arc<Restrictor>,
    /// Mail domains looked up this session (`reject_unknown_*_domain`).
    domains: HashMap<String, DomainStatus>,
    screen: Screen,
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
    pub fn new(config: Arc<Config>, policy: PolicyClients, restrictor: Arc<Restrictor>, endpoints: Endpoints) -> Self {
        let milters = Milters::new(&config);
        Self {
            config,
            policy,
            restrictor,
            domains: HashMap::new(),
            screen: Screen::Off,
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

    /// Screens the client against `[smtpd.dnsbl]`, then evaluates the
    /// restriction lists that fall at this stage, asks the policy servers
    /// (where a list says `check_policy_service`, or after the stage's own
    /// list unless it permitted), then the milters, about `check`.
    pub async fn check(&mut self, check: &Check, facts: &Facts<'_>) -> Verdict {
        let mut notes = Vec::new();
        // RFC 5321 4.5.1: mail to postmaster is always taken, whatever the
        // DNS lists and restrictions say about the client.
        let postmaster = matches!(&check.subject, Subject::Rcpt { address, .. } if self.postmaster(address));
        let allowlisted = match postmaster {
            true => false,
            false => match self.screen(check.stage, facts).await {
                Ok(allowlisted) => allowlisted,
                Err(decision) => return Verdict { decision, notes },
            },
        };
        if let Some(stage) = check.stage.policy().filter(|_| !postmaster) {
            let restrictions = &self.config.smtpd.restrictions;
            let lists: Vec<FilterStage> = FilterStage::ALL
                .into_iter()
                .filter(|s| restrictions.evaluated_at(*s) == stage && !restrictions.list(*s).is_empty())
                .filter(|s| !(allowlisted && *s == FilterStage::Connect))
                .collect();
            let mut own_permitted = false;
            for list in lists {
                match self.run_list(list, check, facts, &mut notes).await {
                    ListEnd::Refused(decision) => return Verdict { decision, notes },
                    ListEnd::Permitted if list == stage => own_permitted = true,
                    ListEnd::Permitted | ListEnd::Finished => {}
                }
            }
            let named = self.config.smtpd.restrictions.list(stage).contains(&Restriction::CheckPolicyService);
            if !named && !own_permitted && self.config.smtpd.policy.iter().any(|p| p.stages.contains(&stage)) {
                let (decision, policy_notes) = self.ask_policy(check, facts, stage).await;
                notes.extend(policy_notes);
                if decision != Decision::Continue {
                    return Verdict { decision, notes };
                }
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

    /// `postmaster@` an accepted domain.
    fn postmaster(&self, address: &str) -> bool {
        address.rsplit_once('@').is_some_and(|(local, domain)| {
            local.eq_ignore_ascii_case("postmaster")
                && self.config.server.accepted_domains.iter().any(|d| d.eq_ignore_ascii_case(domain))
        })
    }

    /// Evaluates the restriction list of `list` (a stage) at this check.
    async fn run_list(
        &mut self,
        list: FilterStage,
        check: &Check,
        facts: &Facts<'_>,
        notes: &mut Vec<verdict::Note>,
    ) -> ListEnd {
        let config = Arc::clone(&self.config);
        let restrictor = Arc::clone(&self.restrictor);
        let restrictions = config.smtpd.restrictions.list(list);
        let recipient = match &check.subject {
            Subject::Rcpt { address, .. } => Some(address.as_str()),
            _ => None,
        };
        let subject = restrict::Subject { facts, recipient };
        let mut cache = std::mem::take(&mut self.domains);
        let mut round = ListRound::new(&restrictor, &config, &subject, list, &mut cache);
        let mut from = 0;
        let end = loop {
            match round.run(restrictions, from).await {
                Ok(ListEnd::Finished) => {
                    let (decision, round_notes, edits) = round.round.finish();
                    notes.extend(round_notes);
                    self.edits.extend(edits);
                    break match decision {
                        Decision::Continue => ListEnd::Finished,
                        refused => ListEnd::Refused(refused),
                    };
                }
                Ok(end) => {
                    let (round_notes, edits) = round.round.into_parts();
                    notes.extend(round_notes);
                    self.edits.extend(edits);
                    break end;
                }
                Err(at) => {
                    let (decision, policy_notes) = self.ask_policy(check, facts, list).await;
                    notes.extend(policy_notes);
                    if decision != Decision::Continue {
                        let (round_notes, edits) = round.round.into_parts();
                        notes.extend(round_notes);
                        self.edits.extend(edits);
                        break ListEnd::Refused(decision);
                    }
                    from = at + 1;
                }
            }
        };
        self.domains = cache;
        end
    }

    /// postscreen asked the DNS lists already (it does with `action =
    /// "drop"`, and refused the listed clients itself): its score stands,
    /// for the allowlist, and no list is asked again.
    pub fn screened_by_postscreen(&mut self, score: i32) {
        self.screen = Screen::Done(Some(Screening { score, ..Screening::default() }));
    }

    /// `[smtpd.dnsbl]`: started at CONNECT, decided there (`drop`) or at
    /// each RCPT (`enforce`, `ignore`). `Ok(true)`: the client is
    /// allowlisted.
    async fn screen(&mut self, stage: CheckStage, facts: &Facts<'_>) -> Result<bool, Decision> {
        let dnsbl = &self.config.smtpd.dnsbl;
        if !dnsbl.enabled() {
            return Ok(false);
        }
        if stage == CheckStage::Connect
            && let (Screen::Off, Some(client)) = (&self.screen, self.restrictor.dnsbl())
        {
            let (client, sites, addr) = (Arc::clone(client), dnsbl.sites.clone(), facts.addr);
            self.screen = Screen::Running(tokio::spawn(async move { client.screen(&sites, addr).await }));
        }
        let decide_now = match dnsbl.action {
            DnsblAction::Drop => stage == CheckStage::Connect,
            DnsblAction::Enforce | DnsblAction::Ignore => stage == CheckStage::Rcpt,
        };
        let allowlist_checked = matches!(stage, CheckStage::Rcpt) || decide_now;
        if !allowlist_checked {
            return Ok(false);
        }
        if let Screen::Running(handle) = &mut self.screen {
            let screening = handle.await.ok();
            let port = self.endpoints.client.port();
            if let Some(s) = screening.as_ref().filter(|s| s.score != 0) {
                tracing::info!("DNSBL rank {} for [{}]:{port}", s.score, facts.addr);
            }
            self.screen = Screen::Done(screening);
        }
        let Screen::Done(Some(screening)) = &self.screen else { return Ok(false) };
        let dnsbl = &self.config.smtpd.dnsbl;
        if dnsbl.allowlist_threshold < 0 && screening.score <= dnsbl.allowlist_threshold {
            return Ok(true);
        }
        if !decide_now || screening.score < dnsbl.threshold || dnsbl.action == DnsblAction::Ignore {
            return Ok(false);
        }
        let site = screening.blocked_by().unwrap_or("a DNS block list");
        let (code, status) = match dnsbl.action {
            DnsblAction::Drop => (521, EnhancedStatus::new(StatusClass::Permanent, 7, 1)),
            _ => (550, EnhancedStatus::new(StatusClass::Permanent, 7, 1)),
        };
        let text = format!("Service unavailable; client [{}] blocked using {site}", facts.addr);
        Err(Decision::Refuse { reply: FilterReply::new(ReplyCode::of(code), status, text), by: RefusedBy::Policy })
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
