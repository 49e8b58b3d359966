//! mortal-proto: the vocabulary every mortal process shares.
//!
//! # Summary
//! Typed configuration (`etc/mortal.toml`), the envelope model and the
//! framed records that carry it across process boundaries (smtpd →
//! cleanup, child → master), the on-disk queue file format, SMTP status
//! codes (reply codes, RFC 3463 enhanced codes, DSN actions), queue ids,
//! the spool layout, RFC 5321 address syntax, the services the master runs
//! ([`service`]), the `mortal status` document ([`status::StatusDoc`]), the
//! calendar forms of dates ([`date`]), and the rules both sides of a check
//! must agree on: relaying ([`relay`]), xtext ([`xtext`]) and how a TLS
//! session is described ([`tls`]); and the protocols of the filters mail
//! hosts run: Postfix's policy delegation ([`policy`]) and the Sendmail milter
//! protocol ([`milter`]); Dovecot's authentication protocol, which SMTP
//! AUTH is relayed over ([`dovecot_auth`]); and DNS block and allow list sites as
//! postscreen weighs them ([`dnsbl`]). Like Postfix's
//! `global/mail_proto.h`, it is the one place both sides of every
//! conversation agree on.
//!
//! # Security
//! Two modules perform I/O, and only these: [`spool`] creates the queue
//! directories and makes the durable write (temporary file, rename,
//! `fsync`), because that procedure is part of the spool's contract between
//! cleanup, the queue manager and the operator's commands and must have one
//! definition; [`config`]'s `Config::load` reads the configuration file
//! (and asks the effective uid, which decides which rules apply).
//! Everything else parses and encodes in memory. Every decoder is strict
//! and bounded: it rejects unknown record types, oversized records and
//! records out of order, so a compromised peer can only make a
//! conversation fail, never make its reader allocate without bound or act
//! on a half-valid stream. Every decoder is a fuzz target (`fuzz/`); their
//! entry points, [`fuzz`], exist only with the `fuzz` feature, which
//! `fuzz/` and the corpus replay test turn on and no daemon does.
//!
//! # Standards
//! RFC 5321 section 4.1.2 (address syntax) and 4.2 (reply codes), RFC 6531
//! (UTF-8 addresses), RFC 3461 section 4 (xtext), RFC 3463 (enhanced status
//! codes), RFC 3464 (DSN actions).
//!
//! # Configuration
//! See [`config`]: one typed struct per section, unknown keys rejected,
//! errors naming file, line, column and key.
//!
//! # Diagnostics
//! Decoders return typed errors naming the record and the rule broken.
#![forbid(unsafe_code)]

pub mod address;
pub mod anvil;
pub mod config;
pub mod date;
pub mod delivery;
pub mod dnsbl;
pub mod dovecot_auth;
pub mod dsn;
pub mod envelope;
#[cfg(feature = "fuzz")]
pub mod fuzz;
pub mod handoff;
pub mod header;
pub mod ipc;
pub mod milter;
pub mod policy;
pub mod queue_file;
pub mod queue_id;
pub mod record;
pub mod relay;
pub mod restriction;
pub mod service;
pub mod smtp_status;
pub mod socketmap;
pub mod spool;
pub mod status;
pub mod table;
pub mod tls;
mod wire;
pub mod xtext;
