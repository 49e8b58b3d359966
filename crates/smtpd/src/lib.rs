//! mortal-smtpd: the ESMTP server, Postfix `smtpd(8)` in shape.
//!
//! # Summary
//! One pre-forked child serves one SMTP session at a time on the listener
//! it inherited from the master. [`engine`] is the protocol itself: a
//! sans-IO state machine that takes client bytes and returns replies and
//! events, so every rule below is tested without a socket. [`driver`] owns
//! the socket, the timers and the conversation with cleanup: it streams each
//! message's envelope and content to a cleanup process over the private
//! `cleanup` socket (`mortal_proto::ipc`) and relays cleanup's answer. The
//! client hears `250 2.0.0 Ok: queued as <id>` only after cleanup answered
//! 250, which it does only once the queue file is on stable storage.
//!
//! # Security
//! The client is hostile. smtpd never opens a file under the spool, never
//! looks a name up in the DNS (every client is `unknown[addr]`), and is
//! never an open relay: a recipient whose domain is not in
//! `accepted_domains` gets `554 5.7.1 Relay access denied` (cleanup checks
//! again). Every buffer has a named bound: command lines
//! ([`engine::MAX_COMMAND_LINE`]), text lines ([`engine::MAX_TEXT_LINE`]),
//! message size (`message_size_limit`, enforced while reading), recipients,
//! errors and idle time. DATA ends only at `<CR><LF>.<CR><LF>`; a bare
//! `<CR>` or `<LF>` anywhere in the content makes the whole message
//! rejected after the real terminator, so no variant of SMTP smuggling
//! (CVE-2023-51764 class) can end a message early or start a second one.
//! Command lines with a bare `<CR>` or `<LF>` are refused, not executed.
//! Clients that talk before the greeting or pipeline without permission
//! are disconnected (`smtpd_forbid_unauth_pipelining`).
//!
//! # Standards
//! RFC 5321 (SMTP), RFC 1870 (SIZE), RFC 2920 (PIPELINING), RFC 6152
//! (8BITMIME), RFC 2034 and RFC 3463 (enhanced status codes), RFC 6531
//! (SMTPUTF8: not offered yet; UTF-8 addresses are refused with
//! `553 5.6.7`, as the RFC requires of a server that did not offer it).
//!
//! # Configuration
//! `[server]` `hostname`, `accepted_domains`, `run_dir` (the cleanup
//! socket lives in `<run_dir>/private/cleanup`); `[smtpd]` `banner`,
//! `message_size_limit`, `recipient_limit`, `timeout` (per read, per write
//! and per wait for cleanup), `hard_error_limit`; `[process.smtpd]` the
//! lifetime policy (`max_use` is applied here); `[log]`.
//!
//! # Diagnostics
//! Postfix's log shapes, so fail2ban and pflogsumm work unchanged:
//! `connect from unknown[addr]`, `<id>: client=unknown[addr]`,
//! `NOQUEUE: reject: RCPT from unknown[addr]: 554 5.7.1 <x@y>: Relay access
//! denied; from=<a@b> to=<x@y> proto=ESMTP helo=<h>`, `improper command
//! pipelining after <CMD> from ...`, `too many errors after <CMD> from ...`,
//! `timeout after <CMD> from ...`, `lost connection after <CMD> from ...`
//! and `disconnect from unknown[addr] ehlo=1 mail=1 rcpt=0/1 ...
//! commands=2/3`. Trouble with cleanup is logged as a `warning:` and the
//! client gets `451 4.3.0 Error: queue file write error`, never a 250.
#![forbid(unsafe_code)]

pub mod anvil;
pub mod anvil_client;
pub mod driver;
pub mod engine;
pub mod tls;
pub mod peer;
pub mod proxy;
pub mod relay;
