//! Where the session stops to ask its filters (policy servers and
//! milters, `crate::filter`), and how it carries on with their verdict.
//!
//! At each stage some filter wants ([`Plan`]), the session emits
//! [`Action::Check`] and suspends, input waiting in its buffer, until the
//! driver calls [`Session::check_done`]. Then the command finishes as it
//! would have (the greeting, the 250, the 354), or gets the filter's reply
//! instead, logged in Postfix's shape: `reject:` for a policy server,
//! `milter-reject:` for a milter. A refusal at CONNECT that is not a 421
//! lets the greeting through and answers every MAIL with it, so the client
//! hears why; a 421 anywhere ends the session after the reply.

use super::command::{Param, Verb};
use super::reply::{self, Reply};
use super::{Action, Phase, Session};
use crate::filter::verdict::{CheckStage, Decision, FilterReply, Verdict};
use mortal_proto::config::{Config, FilterStage};
use mortal_proto::envelope::RecipientInfo;
use mortal_proto::queue_id::QueueId;
use mortal_proto::tls::TlsSummary;
use std::net::IpAddr;

/// The stages at which this session's filters want to be asked.
#[derive(Debug, Clone, Copy, Default)]
pub struct Plan {
    stages: [bool; 7],
}

impl Plan {
    /// From the configuration: every policy server's stages, where each
    /// restriction list is evaluated, CONNECT and RCPT for DNSBL
    /// screening; every stage when any milter is configured (milters see
    /// the whole dialogue).
    pub fn of(config: &Config) -> Plan {
        let mut plan = Plan::default();
        let all = [
            CheckStage::Connect,
            CheckStage::Helo,
            CheckStage::Mail,
            CheckStage::Rcpt,
            CheckStage::Data,
            CheckStage::EndOfMessage,
            CheckStage::Unknown,
        ];
        for stage in all {
            let policy = stage.policy().is_some_and(|s| config.smtpd.policy.iter().any(|p| p.stages.contains(&s)));
            let restrictions = &config.smtpd.restrictions;
            let lists = stage.policy().is_some_and(|s| {
                FilterStage::ALL
                    .into_iter()
                    .any(|l| !restrictions.list(l).is_empty() && restrictions.evaluated_at(l) == s)
            });
            let dnsbl = config.smtpd.dnsbl.enabled() && matches!(stage, CheckStage::Connect | CheckStage::Rcpt);
            // The driver counts a login's recipients at RCPT.
            let auth = &config.smtpd.auth;
            let logins = stage == CheckStage::Rcpt && auth.server.is_some() && auth.user_recipient_rate_limit > 0;
            plan.stages[stage as usize] = policy || lists || dnsbl || logins || !config.smtpd.milters.is_empty();
        }
        plan
    }

    pub fn wants(&self, stage: CheckStage) -> bool {
        self.stages[stage as usize]
    }
}

/// What a check asks about, beyond the session's [`Facts`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    None,
    /// The HELO/EHLO argument.
    Helo(String),
    /// MAIL's ESMTP parameters, `KEYWORD=value` as sent.
    Mail {
        params: Vec<String>,
    },
    /// The recipient (without brackets) and RCPT's parameters.
    Rcpt {
        address: String,
        params: Vec<String>,
    },
    /// The unknown command line, as sent.
    Unknown(String),
}

/// One stop: [`Action::Check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub stage: CheckStage,
    pub subject: Subject,
}

/// What the session knows that a filter may be told.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    pub addr: IpAddr,
    /// `unknown` or the forward-confirmed name.
    pub name: &'a str,
    pub helo: Option<&'a str>,
    pub esmtp: bool,
    /// The `with` protocol (`ESMTPS`...).
    pub protocol: &'static str,
    pub tls: Option<&'a TlsSummary>,
    /// The sender without brackets, once MAIL was accepted.
    pub sender: Option<&'a str>,
    pub queue_id: Option<QueueId>,
    /// Recipients accepted so far.
    pub recipients: u32,
    /// MAIL's SIZE, 0 when not given.
    pub size: u64,
    /// Who the client logged in as with AUTH.
    pub login: Option<&'a mortal_proto::envelope::SaslLogin>,
}

/// What a check suspended, to finish with the verdict.
#[derive(Debug)]
pub(super) enum Pending {
    Connect,
    Helo {
        verb: Verb,
        name: String,
    },
    /// The transaction is open; MAIL waits for its reply.
    Mail,
    Rcpt {
        rcpt: RecipientInfo,
        path: String,
    },
    Data,
    Bdat {
        size: u64,
        last: bool,
    },
    EndOfMessage {
        verb: Verb,
    },
    Unknown,
}

impl Pending {
    /// The command the check is part of, for the session's counters.
    pub(super) fn verb(&self) -> Verb {
        match self {
            Pending::Connect | Pending::Unknown => Verb::Unknown,
            Pending::Helo { verb, .. } | Pending::EndOfMessage { verb } => *verb,
            Pending::Mail => Verb::Mail,
            Pending::Rcpt { .. } => Verb::Rcpt,
            Pending::Data => Verb::Data,
            Pending::Bdat { .. } => Verb::Bdat,
        }
    }
}

impl Session {
    /// What the filters may be told now.
    pub fn facts(&self) -> Facts<'_> {
        let txn = self.txn.as_ref();
        Facts {
            addr: self.addr,
            name: &self.name,
            helo: self.helo.as_ref().map(|h| h.name.as_str()),
            esmtp: self.helo.as_ref().is_some_and(|h| h.esmtp),
            protocol: self.protocol_for(txn.is_some_and(|t| t.smtputf8)),
            tls: self.tls.as_ref(),
            sender: txn.map(|t| t.sender.as_str()),
            queue_id: txn.map(|t| t.queue_id),
            recipients: txn.map_or(0, |t| t.recipients),
            size: txn.map_or(0, |t| t.declared_size),
            login: self.login.as_ref(),
        }
    }

    /// Suspends for a check when the filters want this stage; false (and
    /// nothing done) when they do not.
    pub(super) fn ask(&mut self, stage: CheckStage, subject: Subject, pending: Pending) -> bool {
        if !self.plan.wants(stage) {
            return false;
        }

        self.actions.push_back(Action::Check(Check { stage, subject }));
        self.phase = Phase::Checking(pending);
        true
    }

    /// The filters answered the outstanding [`Action::Check`].
    ///
    /// # Panics
    /// If no check is outstanding (a driver bug).
    pub fn check_done(&mut self, verdict: Verdict) {
        let Phase::Checking(pending) = std::mem::replace(&mut self.phase, Phase::Command) else {
            panic!("check_done without an outstanding Check");
        };
        let (stage_name, path) = match &pending {
            Pending::Connect => ("CONNECT", None),
            Pending::Helo { verb, .. } => (verb.name(), None),
            Pending::Mail => ("MAIL", None),
            Pending::Rcpt { path, .. } => ("RCPT", Some(path.clone())),
            Pending::Data => ("DATA", None),
            Pending::Bdat { .. } => ("BDAT", None),
            Pending::EndOfMessage { .. } => ("END-OF-MESSAGE", None),
            Pending::Unknown => ("UNKNOWN", None),
        };
        for note in &verdict.notes {
            self.log_event(note.word, stage_name, &note.text, path.as_deref());
        }
        let refusal = match verdict.decision {
            Decision::Continue => None,
            Decision::Refuse { reply, by } => {
                self.log_event(by.log_word(), stage_name, &reply.log_text(), path.as_deref());
                Some(reply)
            }
        };
        match pending {
            Pending::Connect => self.connect_checked(refusal),
            Pending::Helo { verb, name } => match refusal {
                None => self.greet(name, verb == Verb::Ehlo),
                Some(r) => {
                    self.helo = None;
                    self.refused(verb, &r);
                }
            },
            Pending::Mail => match refusal {
                None => self.succeed(Verb::Mail, &reply::MAIL_OK),
                Some(r) => {
                    self.abort_transaction();
                    self.refused(Verb::Mail, &r);
                }
            },
            Pending::Rcpt { rcpt, .. } => match refusal {
                None => self.accept_recipient(rcpt),
                Some(r) => self.refused(Verb::Rcpt, &r),
            },
            Pending::Data => match refusal {
                None => self.start_data(),
                Some(r) => self.refused(Verb::Data, &r),
            },
            Pending::Bdat { size, last } => match refusal {
                // A 421 ends the session: the chunk is never read.
                Some(r) if r.closes() => self.refused(Verb::Bdat, &r),
                other => self.start_chunk(size, last, other.map(|r| one_line(&r)), true),
            },
            Pending::EndOfMessage { verb } => match refusal {
                None => self.hand_over(verb),
                Some(r) => {
                    self.abort_transaction();
                    self.refused(verb, &r);
                }
            },
            Pending::Unknown => match refusal {
                None => self.fail(Verb::Unknown, &reply::UNKNOWN_COMMAND),
                Some(r) => self.refused(Verb::Unknown, &r),
            },
        }
        self.process();
    }

    /// After the CONNECT check: the greeting, or a 421 and the end, or
    /// the greeting and the refusal remembered for every MAIL.
    fn connect_checked(&mut self, refusal: Option<FilterReply>) {
        match refusal {
            Some(r) if r.closes() => {
                self.write_filter_reply(&r);
                self.close();
            }
            other => {
                self.connect_refusal = other;
                if !self.greeted {
                    let greeting = reply::greeting(&self.config.server.hostname, &self.config.smtpd.banner);
                    self.reply(&greeting);
                }
            }
        }
    }

    /// A command refused by a filter: counted, answered with the filter's
    /// reply, closer to the error limit; a 421 ends the session.
    pub(super) fn refused(&mut self, verb: Verb, r: &FilterReply) {
        self.stats.count(verb, false);
        self.write_filter_reply(r);
        if r.closes() {
            return self.close();
        }
        self.count_error();
    }

    fn write_filter_reply(&mut self, r: &FilterReply) {
        self.tarpit();
        self.actions.push_back(Action::Reply(r.wire()));
    }
}

/// A filter's reply as one line (a refused BDAT chunk is answered once,
/// with one line).
fn one_line(r: &FilterReply) -> Reply {
    Reply { code: r.code, status: Some(r.status), text: std::borrow::Cow::Owned(r.lines.join(" ")) }
}

/// `KEYWORD=value` strings of ESMTP parameters, as a milter gets them.
pub(super) fn param_strings(params: &[Param<'_>]) -> Vec<String> {
    params
        .iter()
        .map(|p| match p.value {
            Some(v) => format!("{}={v}", p.keyword),
            None => p.keyword.to_owned(),
        })
        .collect()
}
