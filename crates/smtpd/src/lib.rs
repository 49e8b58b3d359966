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
//! The listener's address gives the child its role
//! (`mortal_proto::config::ListenerRole`): port 25 (`listen`,
//! `proxy_listen`), submission (`submission_listen`, 587: STARTTLS, then
//! AUTH, before MAIL) or submissions (`submissions_listen`, 465: TLS
//! before the greeting). AUTH ([`engine::auth`]) relays the client's SASL
//! exchange to Dovecot's auth service ([`sasl`]), as Postfix's
//! `smtpd_sasl_type = dovecot` does.
//!
//! # Security
//! The client is hostile. smtpd never opens a file under the spool, looks
//! client names up in the DNS only with `reverse_lookup` ([`dns`]; off by
//! default, when every client is `unknown[addr]`), and then believes a
//! name only when forward-confirmed and a valid host name, and waits no
//! longer than `reverse_lookup_timeout`. It is never an open relay: a recipient whose domain is not in
//! `accepted_domains` gets `554 5.7.1 Relay access denied` unless the
//! client is in `trusted_networks` (cleanup checks again). A PROXY header
//! is believed only from `proxy_trusted` peers, and only on
//! `proxy_listen` listeners. Every buffer has a named bound: command lines
//! ([`engine::MAX_COMMAND_LINE`]), text lines ([`engine::MAX_TEXT_LINE`]),
//! message size (`message_size_limit`, enforced while reading), recipients,
//! errors and idle time. DATA ends only at `<CR><LF>.<CR><LF>`; a bare
//! `<CR>` or `<LF>` anywhere in the content makes the whole message
//! rejected after the real terminator, so no variant of SMTP smuggling
//! (CVE-2023-51764 class) can end a message early or start a second one.
//! With `bare_newline = normalize` a bare `<LF>` in DATA is taken as a
//! line end, and still never ends the message. Trusted networks are not
//! exempt. Command lines with a bare `<CR>` or `<LF>` are refused, not
//! executed. Clients that talk before the greeting or pipeline without
//! permission are disconnected (`smtpd_forbid_unauth_pipelining`), which
//! is also what happens to plaintext pipelined behind STARTTLS
//! (CVE-2011-0411 class): it never reaches the TLS session. A client past
//! `soft_error_limit` errors waits `error_sleep` before each reply, and
//! content slower than `min_data_rate` ends the session with 421, so a
//! slowloris cannot hold a child. The TLS certificate and key are read
//! once at process start ([`tls`]). AUTH is offered only under TLS and
//! only PLAIN and LOGIN; the client's SASL data goes to Dovecot and is
//! never logged, decoded or kept; failures count in anvil, and a client
//! past `[smtpd.auth] failure_limit` gets 421 without Dovecot being asked.
//! A login lets the client relay (cleanup accepts that only where AUTH is
//! configured).
//!
//! Then, before the first connection, the sandbox smtpd states (`needs`
//! in its `main`, entered by `mortal_libmaster::daemon::run`) takes
//! everything else away: as root it chroots into the private socket
//! directory and drops to `[server] user` for good; always it sets
//! no_new_privs, turns core dumps off, bounds its descriptors, holds no
//! Landlock right to any file or TCP port and cannot signal or trace
//! anything outside itself, and runs under a seccomp allow-list that kills
//! it on any other system call (no open, execve, fork, ptrace, or socket
//! other than `AF_UNIX`). Its only ways out are the client's socket and
//! the cleanup and anvil sockets. `mortal-smtpd --sandbox-selftest` proves it.
//! Only with `reverse_lookup` is it widened for the lookups: `socket` for
//! `AF_INET`/`AF_INET6` and `bind` (the resolver's random UDP source port)
//! join the seccomp list, and Landlock allows TCP connects to the
//! nameservers' ports (the fallback for truncated answers) and no other.
//! Dovecot's auth service on `inet:` adds its port and TCP sockets the
//! same way; on `unix:` it must lie in the chroot (`<run_dir>/private`).
//!
//! # Standards
//! RFC 5321 (SMTP), RFC 1870 (SIZE), RFC 2920 (PIPELINING), RFC 6152
//! (8BITMIME), RFC 2034 and RFC 3463 (enhanced status codes), RFC 3207
//! (STARTTLS; TLS 1.2 and 1.3 with rustls), RFC 6531 (SMTPUTF8: UTF-8
//! addresses only with MAIL's SMTPUTF8 parameter, `553 5.6.7` otherwise),
//! RFC 3030 (CHUNKING/BDAT and BINARYMIME), RFC 3461 (DSN parameters RET,
//! ENVID, NOTIFY, ORCPT, carried to cleanup), RFC 3848 (`with` protocol
//! names `ESMTPS`, `ESMTPSA`, `UTF8SMTP`, `UTF8SMTPS`...), RFC 4954 (AUTH),
//! RFC 4616 (PLAIN), RFC 6409 (submission), RFC 8314 (implicit TLS on
//! 465).
//!
//! # Configuration
//! `[server]` `hostname`, `accepted_domains`, `run_dir` (the cleanup
//! socket lives in `<run_dir>/private/cleanup`); `[smtpd]` `banner`,
//! `message_size_limit`, `recipient_limit`, `timeout` (per read, per write
//! and per wait for cleanup), `hard_error_limit`, `soft_error_limit`,
//! `error_sleep`, `min_data_rate`, `data_rate_window`, `bare_newline`,
//! `smtputf8`, `chunking`, `dsn`, `tls_cert_file`, `tls_key_file`,
//! `tls_security`, `tls_handshake_timeout`; `[process.smtpd]` the
//! lifetime policy (`max_use` is applied here); `[log]`.
//! Relay control ([`relay`]): `[server] trusted_networks`, `recipient_map`.
//! PROXY protocol ([`peer`], [`proxy`]): `[smtpd] proxy_listen`,
//! `proxy_trusted`, `proxy_timeout`. Per-client limits, counted by the
//! `mortal-anvil` service over `<run_dir>/private/anvil`
//! ([`anvil_client`]): `[smtpd] client_connection_count_limit`,
//! `client_connection_rate_limit`, `client_message_rate_limit`,
//! `client_limit_exceptions`; `[anvil] rate_time_unit`. Client names
//! ([`dns`]): `[smtpd] reverse_lookup` (default off), `reverse_lookup_timeout`
//! (default 2s), `resolvers` (literal `IP:port` nameservers; empty: those
//! of /etc/resolv.conf, read at process start, before the sandbox).
//! Restriction lists ([`filter::restrict`]): `[smtpd.restrictions]`
//! `client`, `helo`, `sender`, `recipient`, `data`, `end_of_data`,
//! `delay_reject` (default on: the first three are evaluated at RCPT),
//! `unknown_address_reject_code`, `dns_timeout`; their tables are loaded
//! at process start. DNS lists ([`dnsbl`]): `[smtpd.dnsbl]` `sites`,
//! `threshold`, `allowlist_threshold`, `action`, `timeout`, asking the
//! `resolvers`. Submission and AUTH: `[smtpd] submission_listen`,
//! `submissions_listen`; `[smtpd.auth]` `server`, `timeout`, `mx`,
//! `authenticated_header`, `failure_limit`, `user_message_rate_limit`,
//! `user_recipient_rate_limit`, `response_limit`, `sender_login_maps`; `[smtpd.submission.restrictions]` (the
//! submission listeners' lists). See docs/submission.md.
//!
//! # Diagnostics
//! Postfix's log shapes, so fail2ban and pflogsumm work unchanged (with
//! `reverse_lookup`, a confirmed name replaces `unknown` in all of them,
//! except the connect-time limit refusals, which are decided before any
//! lookup): `connect from unknown[addr]`, `<id>: client=unknown[addr]`,
//! `NOQUEUE: reject: RCPT from unknown[addr]: 554 5.7.1 <x@y>: Relay access
//! denied; from=<a@b> to=<x@y> proto=ESMTP helo=<h>`, `improper command
//! pipelining after <CMD> from ...`, `too many errors after <CMD> from ...`,
//! `timeout after <CMD> from ...`, `lost connection after <CMD> from ...`,
//! `Anonymous TLS connection established from unknown[addr]: TLSv1.3 with
//! cipher TLS13_AES_256_GCM_SHA384 (256/256 bits)`, `SSL_accept error from
//! unknown[addr]: <reason>`, `data rate <n> octets/s below min_data_rate
//! <m> after DATA from ...`
//! and `disconnect from unknown[addr] ehlo=1 mail=1 rcpt=0/1 ...
//! commands=2/3`. Trouble with cleanup is logged as a `warning:` and the
//! client gets `451 4.3.0 Error: queue file write error`, never a 250.
//! Limits: `warning: Connection concurrency limit exceeded: <n> from
//! unknown[addr] for service smtp` (also `Connection rate limit` and
//! `Message delivery request rate limit`); PROXY trouble:
//! `warning: haproxy read from unknown[addr]: <reason>`; an unreachable
//! anvil: `warning: anvil <socket>: <reason>: no client limits for <addr>`;
//! a PTR name that does not confirm: `warning: hostname <name> does not
//! resolve to address <addr>`; a resolver that cannot be set up at start:
//! `fatal: reverse_lookup: <reason>`. Restrictions and DNS lists:
//! `NOQUEUE: reject: RCPT from unknown[addr]: 504 5.5.2 <h>: Helo command
//! rejected: need fully-qualified hostname; from=<a@b> to=<x@y>
//! proto=ESMTP helo=<h>` and the like for every restriction,
//! `DNSBL rank 3 for [addr]:port`, `550 5.7.1 Service unavailable; client
//! [addr] blocked using zen.example` in the reject line, `warning: access
//! table <table>: <why>` (the client gets `451 4.3.5 Server configuration
//! error`), `warning: dnsbl <site>: lookup of <name>: <reason>`. AUTH:
//! `<id>: client=unknown[addr], sasl_method=PLAIN, sasl_username=<login>`,
//! `warning: unknown[addr]: SASL PLAIN authentication failed: <reason>`
//! (fail2ban's postfix-sasl filter), `warning: AUTH failure limit
//! exceeded: <n> from unknown[addr] for service submission`, `warning:
//! User message rate limit exceeded: <n> from unknown[addr]
//! sasl_username=<login> for service submission` (and `User recipient
//! rate limit`), `warning:
//! SASL authentication server <server>: <reason>` (the client gets `454
//! 4.7.0 Temporary authentication failure`).
#![forbid(unsafe_code)]

pub mod anvil_client;
pub mod dns;
pub mod dnsbl;
pub mod driver;
pub mod engine;
pub mod filter;
pub mod listener;
pub mod mailhost;
pub mod peer;
pub mod proxy;
pub mod relay;
pub mod sasl;
pub mod tls;
pub mod verify;
