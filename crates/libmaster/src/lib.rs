//! mortal-master: the supervisor (binary `mortal-master`) and the library
//! every daemon links to be supervised, like Postfix's `libmaster`.
//!
//! # Summary
//! The library half is what runs inside a child: [`child`] is the
//! single-server skeleton (wait for one connection on the inherited
//! listener, serve it, report to the master, obey the lifetime policy),
//! [`log`] installs the log format shared by every process, and
//! [`sandbox`] drops privileges and applies each daemon's kernel sandbox.
//!
//! Only its start-up entries end the process ([`child::startup`],
//! [`child::adopt`], [`sandbox::enter_or_exit`] and the self-test mode
//! [`sandbox::selftest::run_if_asked`]): a bad start exits with status 1
//! before READY, which the master counts as a bad start and throttles.
//! Everything else returns its outcome to the daemon's `main`.
//!
//! # Security
//! A child's only channel to the master is its own socket, carrying
//! fixed-size [`mortal_proto::status`] records. The library holds no
//! unsafe code: inherited descriptors arrive as stdin (the listener) and
//! stdout (the master socket), which std adopts safely, and privileges are
//! dropped and sandboxes entered through the safe wrappers of `nix`,
//! `landlock` and `seccompiler` ([`sandbox`]).
//!
//! # Standards
//! None on the wire; the log shapes follow Postfix's syslog conventions.
//!
//! # Configuration
//! `[process.<service>]` (lifetime policy) and `[log]` in `mortal.toml`.
//!
//! # Diagnostics
//! Every exit of a child is logged with its reason (max_use, retired by
//! the master, master gone).
#![forbid(unsafe_code)]

pub mod child;
pub mod log;
pub mod sandbox;
