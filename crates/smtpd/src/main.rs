//! `mortal-smtpd --config PATH`: one pre-forked SMTP server process,
//! started by `mortal-master` with the listening socket as stdin and its
//! master socket as stdout. The manual is the library's crate
//! documentation (`mortal_smtpd`).

use mortal_master::child::{self, Listener, MasterLink};
use std::net::TcpListener;
use std::sync::Arc;

fn main() {
    let config = Arc::new(child::startup("smtpd"));
    let (listener, mut link) = match (<TcpListener as Listener>::inherited(), MasterLink::inherited()) {
        (Ok(listener), Ok(link)) => (listener, link),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!("fatal: inherited descriptors: {e} (mortal-smtpd runs under mortal-master)");
            std::process::exit(1);
        }
    };
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
    let served = child::serve(&listener, &mut link, config.process.smtpd.max_use, |stream, _link| {
        runtime.block_on(mortal_smtpd::driver::session(&config, stream))
    });
    match served {
        Ok(reason) => tracing::info!("exit: {}", reason.as_str()),
        Err(e) => {
            tracing::error!("fatal: master link: {e}");
            std::process::exit(1);
        }
    }
}
