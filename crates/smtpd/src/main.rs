//! `mortal-smtpd --config PATH`: one pre-forked SMTP server process,
//! started by `mortal-master` with the listening socket as stdin and its
//! master socket as stdout. The manual is the library's crate
//! documentation (`mortal_smtpd`).
#![forbid(unsafe_code)]

use mortal_libmaster::child;
use mortal_libmaster::sandbox::{self, Service};
use mortal_smtpd::driver::{self, Server, SessionEnd};
use mortal_smtpd::relay::RelayPolicy;
use std::net::TcpListener;
use std::sync::Arc;
use tracing::Instrument;

fn main() {
    sandbox::selftest::run_if_asked(Service::Smtpd);
    let config = Arc::new(child::startup(Service::Smtpd));
    // Read the certificate and key now, before the first session and before
    // any privilege drop or sandbox takes the file system away. A child that
    // cannot is a bad start, which the master throttles.
    let tls = match mortal_smtpd::tls::TlsServer::from_config(&config.smtpd) {
        Ok(tls) => tls,
        Err(e) => {
            tracing::error!("fatal: STARTTLS: {e}");
            std::process::exit(1);
        }
    };
    // The recipient map too: read once per process, so `mortal reload`,
    // which replaces every process, reloads it. Serving without it would
    // accept mail for users who do not exist.
    let relay = match RelayPolicy::load(&config) {
        Ok(relay) => relay,
        Err(e) => {
            let path = config.server.recipient_map.as_deref().unwrap_or(std::path::Path::new(""));
            tracing::error!("fatal: recipient_map {}: {e}", path.display());
            std::process::exit(1);
        }
    };
    let (listener, mut link) = child::adopt::<TcpListener>(Service::Smtpd);
    // One current-thread runtime for the life of the process, reused by
    // every session: a session is a single task, and an idle child should
    // cost as little memory as possible.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("fatal: create event loop: {e}");
            std::process::exit(1);
        }
    };
    // SIGTERM in a session ends it with 421; the handler must be in place
    // before seccomp forbids installing it.
    let term = match driver::install_term_handler(&runtime) {
        Ok(term) => term,
        Err(e) => {
            tracing::error!("fatal: SIGTERM handler: {e}");
            std::process::exit(1);
        }
    };
    // The reverse-lookup resolver reads /etc/resolv.conf (when no
    // `resolvers` are configured) now, before the sandbox takes it away;
    // built in the runtime whose tasks will carry its queries.
    let resolver = {
        let _in_runtime = runtime.enter();
        match mortal_smtpd::dns::ReverseResolver::from_config(&config.smtpd) {
            Ok(resolver) => resolver,
            Err(e) => {
                tracing::error!("fatal: reverse_lookup: {e}");
                std::process::exit(1);
            }
        }
    };
    // Everything smtpd reads from disk is loaded above; from here on it has
    // no file system, no identity but the mail user's and few syscalls.
    sandbox::enter_or_exit(Service::Smtpd, &config);
    let max_use = config.process.smtpd.max_use;
    let server = Server { config, relay: Arc::new(relay), tls, resolver, term: Some(term) };
    let served = child::serve(&listener, &mut link, max_use, |stream, _link| {
        // The JSON log's `client` for every line of the session.
        if runtime.block_on(driver::session(&server, stream).instrument(mortal_libmaster::log::session_span()))
            == SessionEnd::Terminated
        {
            // The session already told the client 421; the master wanted
            // this process gone, and it goes now, not after the next one.
            tracing::info!("exit: terminated by signal 15 during a session");
            std::process::exit(0);
        }
    });
    match served {
        Ok(reason) => tracing::info!("exit: {}", reason.as_str()),
        Err(e) => {
            tracing::error!("fatal: master link: {e}");
            std::process::exit(1);
        }
    }
}
