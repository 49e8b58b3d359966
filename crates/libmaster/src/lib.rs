//! mortal-libmaster: the library every daemon links to be supervised, like
//! Postfix's `libmaster`.
//!
//! # Summary
//! What runs inside a child: [`daemon::run`] is every daemon's start-up
//! sequence (self-test if asked, configuration and log, the daemon's own
//! preparation, inherited descriptors, sandbox, serve, in that order and
//! no other); [`child`] is the single-server skeleton (wait for one
//! connection on the inherited listener, serve it, report to the master,
//! obey the lifetime policy), [`log`] installs the log format shared by
//! every process, and [`sandbox`] drops privileges and applies the kernel
//! sandbox each daemon states in its own crate ([`sandbox::Needs`]).
//!
//! Nothing here ends the process: a bad start logs `fatal: ...` and
//! [`daemon::run`] returns exit status 1 before READY, which the binary's
//! `main` returns and the master counts as a bad start and throttles.
//!
//! # Security
//! A child's only channel to the master is its own socket, carrying
//! fixed-size [`mortal_proto::status`] records. Inherited descriptors
//! arrive as stdin (the listener) and stdout (the master socket), which
//! std adopts safely, and privileges are dropped and sandboxes entered
//! through the safe wrappers of `nix`, `landlock` and `seccompiler`
//! ([`sandbox`]). The one `unsafe` block of mortal is in [`sys`]: the
//! zygote's fork whose child becomes the master's ([`zygote`]).
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
#![deny(unsafe_code)]

pub mod child;
pub mod daemon;
pub mod handoff;
pub mod log;
pub mod sandbox;
pub mod sys;
pub mod zygote;
