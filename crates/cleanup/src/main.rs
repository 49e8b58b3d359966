//! mortal-cleanup: the last check before a message is spooled, and the
//! durable write that makes a 250 mean something.
//!
//! # Summary
//! Pre-forked by the master; each child takes one smtpd connection at a time
//! on the private `cleanup` socket and runs one message transaction over the
//! `cleanup` IPC protocol (`mortal_proto::ipc`). It re-validates the
//! envelope, fixes up the header section (adds `Received:`, and
//! `Message-ID:`/`Date:` when missing; strips `Bcc:`), writes the message
//! to a temporary file, renames the complete file to `incoming/<id>`,
//! `fsync`s the file and then the directory, and only then answers 250
//! (rename before sync: one journal commit instead of two; see
//! ARCHITECTURE.md, "Differences from DESIGN.md"). Then it wakes the queue
//! manager.
//!
//! smtpd's filters (milters, policy servers) decide about the message;
//! smtpd relays their decisions as `Edit` records after the content, and
//! cleanup applies them before the commit (module `edit`): header fields
//! added, inserted, changed, deleted or prepended, the body replaced,
//! recipients added and deleted, the sender changed. A changed message is
//! written once more, into a second temporary file that alone is
//! committed; a held one is committed into `hold/` instead of
//! `incoming/`; a discarded one is dropped and still answered 250.
//!
//! # Security
//! cleanup trusts nothing smtpd says: every record's type, size, field and
//! order is checked by the strict decoder, address syntax is re-parsed,
//! recipients outside `accepted_domains` are refused unless the client is
//! in `trusted_networks` (smtpd's relay rule, `mortal_proto::relay`,
//! applied again: a compromised smtpd cannot make this host an open
//! relay), and `message_size_limit`, `recipient_limit`,
//! `header_size_limit` and `hopcount_limit` are enforced here again. A
//! violation ends the transaction with a logged reason and leaves no file
//! behind. The filters' edits are trusted as the administrator trusts the
//! filters (a milter may add a recipient outside `accepted_domains`, as
//! in Postfix), but not their syntax or size: addresses are parsed again,
//! and the edited message must still fit `header_size_limit`,
//! `message_size_limit` and `recipient_limit`; `edit_limit` bounds the
//! edits. cleanup never reads the network and never writes
//! outside `incoming/` and `hold/`: after opening the spool and before its first
//! connection it enters its sandbox (its `needs`, applied by
//! `mortal_libmaster::daemon::run`), so the
//! kernel enforces that too: as root it drops to `[server] user`; always
//! no_new_privs, no core dumps, bounded descriptors, Landlock access to
//! `incoming/` and `hold/` and nothing else, no TCP, no signals beyond itself, and a
//! seccomp deny-list that also forbids execve.
//!
//! # Standards
//! RFC 5322 (header fields), RFC 5321 section 4.4 (`Received:` trace
//! fields), RFC 3848 (`with` protocol names).
//!
//! # Configuration
//! `[cleanup]` `ipc_timeout`, `header_size_limit`, `hopcount_limit`,
//! `edit_limit`, `header_checks`, `body_checks`, `body_checks_size_limit`,
//! `checks_time_limit` (Postfix's header_checks(5), `checks`);
//! `[smtpd]` `message_size_limit`, `recipient_limit`; `[server]`
//! `hostname`, `accepted_domains`, `spool_dir`; `[process.cleanup]` the
//! lifetime policy.
//!
//! # Diagnostics
//! `<id>: message-id=<...>` for every message spooled; `<id>: hold:
//! <reason>` for one committed into `hold/`; `<id>: discard: <reason>`
//! (or `all recipients deleted by filters`) for one dropped; `warning:
//! <id>: ...` naming the rule for every refused transaction, with `<id>:
//! reject: ...` for a refused message; header and body checks in
//! Postfix's shape: `<id>: reject: header Subject: ... from
//! unknown[addr]; from=<s> to=<r> proto=ESMTP helo=<h>: 5.7.1 text` (also
//! `body`, and `warning:`, `info:`, `replace:`, `hold:`, `discard:`); a 451 4.3.0 to smtpd (and so to the
//! client) whenever the spool cannot be written.
#![forbid(unsafe_code)]

mod checks;
mod edit;
mod header;
mod session;
mod spool;

use mortal_libmaster::child;
use mortal_libmaster::daemon::{self, Fatal, Started};
use mortal_libmaster::sandbox::{Landlock, Needs, RunAs, Seccomp, Service};
use mortal_proto::config::Config;
use mortal_proto::spool::QueueDir;
use mortal_proto::table::Aliases;
use std::os::unix::net::UnixListener;
use std::process::ExitCode;

/// Descriptors a cleanup may hold: as smtpd, plus the spool directory,
/// the queue file and the queue wake-up.
const CLEANUP_NOFILE: u64 = 64;

/// cleanup's sandbox: the mail user, write access to `spool/incoming`
/// and `spool/hold` (a filter's HOLD) only, no TCP but to the ports of
/// `inet:` socketmap tables it looks up, and the deny-list without
/// running a program.
fn needs(config: &Config) -> Needs {
    let spool = config.spool();
    Needs {
        run_as: RunAs::MailUser,
        chroot_private: false,
        nofile: CLEANUP_NOFILE,
        landlock: Landlock::Rules {
            read_write: vec![spool.dir(QueueDir::Incoming), spool.dir(QueueDir::Hold)],
            // Only the ports of socketmap tables on inet:, if any.
            tcp_connect: config.cleanup_table_ports(),
        },
        seccomp: Seccomp::DenyList { may_exec: false, may_fork: true },
    }
}

fn main() -> ExitCode {
    daemon::run(Service::Cleanup, needs, open_spool, daemon::keep, serve)
}

/// What cleanup reads before the sandbox: the spool directories it writes,
/// and the virtual alias tables (read once per process, so `mortal reload`,
/// which replaces every process, reloads them).
struct Prepared {
    spool: spool::Spool,
    aliases: Aliases,
    checks: checks::ContentChecks,
}

fn open_spool(config: &Config) -> Result<Prepared, Fatal> {
    let spool = spool::Spool::open(config).map_err(|e| {
        Fatal::new(format_args!("open spool {}: {e}", config.spool().dir(QueueDir::Incoming).display()))
    })?;
    let aliases = Aliases::load(config).map_err(|e| Fatal::new(format_args!("virtual_alias_maps: {e}")))?;
    let checks =
        checks::ContentChecks::load(config).map_err(|e| Fatal::new(format_args!("header_checks/body_checks: {e}")))?;
    Ok(Prepared { spool, aliases, checks })
}

/// From here on: the mail user, and write access to incoming/ and hold/
/// only.
fn serve(started: Started<UnixListener, Prepared>) -> ExitCode {
    let Started { config, listener, mut link, prepared: Prepared { spool, aliases, checks }, .. } = started;
    let ctx = session::Context::new(&config, &spool, &aliases, &checks);
    daemon::exit_status(child::serve(&listener, &mut link, config.process.cleanup.max_use, |stream, _| {
        session::serve(stream, &ctx)
    }))
}
