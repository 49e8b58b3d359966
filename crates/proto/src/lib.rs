//! mortal-proto: the vocabulary every mortal process shares.
//!
//! # Summary
//! Typed configuration (`etc/mortal.toml`), the framed records that cross
//! process boundaries (smtpd → cleanup, child → master), the on-disk queue
//! file format, queue ids and RFC 5321 address syntax. Like Postfix's
//! `global/mail_proto.h`, it is the one place both sides of every
//! conversation agree on.
//!
//! # Security
//! This crate performs no I/O. Every decoder is strict and bounded: it
//! rejects unknown record types, oversized records and records out of
//! order, so a compromised peer can only make a conversation fail, never
//! make its reader allocate without bound or act on a half-valid stream.
//! Every decoder is a fuzz target (`fuzz/`); their entry points,
//! [`fuzz`], exist only with the `fuzz` feature, which `fuzz/` and the
//! corpus replay test turn on and no daemon does.
//!
//! # Standards
//! RFC 5321 section 4.1.2 (address syntax), RFC 6531 (UTF-8 addresses).
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
#[cfg(feature = "fuzz")]
pub mod fuzz;
pub mod ipc;
pub mod pipe;
pub mod queue_file;
pub mod queue_id;
pub mod record;
pub mod status;
