//! daemon: the one start-up sequence every mortal daemon runs.
//!
//! A daemon's `main` is one call to [`run`] with five things of its own:
//! its [`Service`], what its sandbox must allow (`needs`, a
//! [`sandbox::Needs`] from the configuration), what it must read before
//! the sandbox takes the file system away (`prepare`: TLS keys, the CA
//! file, the recipient map), what every process makes for itself
//! (`start`: an event loop, a signal handler), and its `serve` step.
//! [`run`] performs, in this order and no other:
//!
//! 1. the sandbox self-test, when the command line asks for it
//!    ([`sandbox::selftest`], with the daemon's own `needs`);
//! 2. `--config PATH`: load and validate the configuration, install the log;
//! 3. `prepare`;
//! 4. `start`;
//! 5. adopt the inherited listener and master socket;
//! 6. enter the sandbox ([`sandbox::Needs`] applied by the sandbox module);
//! 7. `serve`.
//!
//! With `--zygote` after `--config PATH` the process becomes the pool's
//! template ([`crate::zygote`]): after step 3 it enters the sandbox
//! itself (identity, chroot, Landlock, and the seccomp filters loosened
//! by its fork and a child's first steps) and then only forks. Each child
//! does steps 4 and 5, seals its sandbox (denies itself what its zygote's
//! filters added, [`sandbox::seal_fork`]) and serves: what it reads of
//! files was read once by the zygote, and it never had the privileges
//! the sandbox takes.
//!
//! The order holds by construction: `serve` receives a [`Started`], which
//! only [`run`] makes and which carries the [`sandbox::Applied`] only the
//! sandbox's `enter` makes; the master link a daemon needs to serve at all
//! exists nowhere else. A failed step logs `fatal: ...` and returns exit
//! status 1 before READY (the master counts that as a bad start and
//! throttles the service); the binary's `main` returns it.

use crate::child::{self, Listener, MasterLink};
use crate::sandbox::{self, Applied, Needs, Service};
use mortal_proto::config::Config;
use std::fmt;
use std::process::ExitCode;

/// Why a daemon's `prepare` step failed: logged as `fatal: <reason>`.
#[derive(Debug)]
pub struct Fatal(String);

impl Fatal {
    /// `reason` is the text after `fatal: ` (for example `STARTTLS: ...`).
    pub fn new(reason: impl fmt::Display) -> Self {
        Fatal(reason.to_string())
    }
}

impl fmt::Display for Fatal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a daemon serves with: everything [`run`] set up, the sandbox
/// already entered.
#[derive(Debug)]
pub struct Started<L, P> {
    pub config: Config,
    /// The service's listener, inherited as stdin.
    pub listener: L,
    /// This process's socket to the master.
    pub link: MasterLink,
    /// What the daemon's `prepare` step returned.
    pub prepared: P,
    /// What the sandbox applied.
    pub sandbox: Applied,
}

/// Runs a daemon: self-test if asked → configuration and log → `prepare`
/// → `start` → adopt descriptors → sandbox (`needs`) → `serve`, as the
/// module documentation says (a zygote: `prepare` → sandbox → fork, and
/// the rest in each child). Returns the process's exit status.
pub fn run<L: Listener, T, P>(
    service: Service,
    needs: impl Fn(&Config) -> Needs,
    prepare: impl FnOnce(&Config) -> Result<T, Fatal>,
    start: impl FnOnce(&Config, T) -> Result<P, Fatal>,
    serve: impl FnOnce(Started<L, P>) -> ExitCode,
) -> ExitCode {
    if let Some(code) = sandbox::selftest::run_if_asked(service, &needs) {
        return code;
    }
    let (config, zygote) = match child::startup(service) {
        Ok(started) => started,
        Err(code) => return code,
    };
    let prepared = match prepare(&config) {
        Ok(prepared) => prepared,
        Err(e) => {
            tracing::error!("fatal: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !zygote {
        return run_child(service, config, prepared, start, serve, |config| {
            sandbox::enter(service, config, &needs(config))
        });
    }
    let needs = needs(&config);
    let applied = match enter_zygote(service, &config, &needs) {
        Ok(applied) => applied,
        Err(e) => {
            tracing::error!("fatal: zygote: {e}");
            return ExitCode::FAILURE;
        }
    };
    // A zygote returns from here only in each child it forks.
    if let Err(code) = crate::zygote::fork_on_request() {
        return code;
    }
    let code =
        run_child(service, config, prepared, start, serve, |_| sandbox::seal_fork(&needs, &applied).map(|()| applied));
    // A forked child shares the zygote's pages copy-on-write: the C
    // library's exit handlers and the dynamic loader's destructors would
    // write to (and so copy) pages only to throw them away. Nothing is
    // left to flush: the log is written line by line, and every daemon
    // syncs what it must before it answers.
    crate::sys::exit_now(if code == ExitCode::SUCCESS { 0 } else { 1 })
}

/// A zygote enters its children's sandbox itself, before its first fork:
/// it must be one thread then (a lock held by another thread would stay
/// held in every child), which is checked while /proc is still in sight.
fn enter_zygote(service: Service, config: &Config, needs: &Needs) -> Result<Applied, String> {
    let threads = sandbox::thread_count();
    if threads != Some(1) {
        return Err(format!("{threads:?} threads; forking needs exactly one"));
    }
    sandbox::Plan::for_zygote(config, needs)
        .and_then(|plan| plan.apply(service, config))
        .map_err(|e| format!("sandbox: {e}"))
}

/// Steps 4 to 7 of [`run`]; `sandbox` enters the sandbox (an exec'd
/// child) or seals the one inherited from the zygote (a forked one).
fn run_child<L: Listener, T, P>(
    service: Service,
    config: Config,
    prepared: T,
    start: impl FnOnce(&Config, T) -> Result<P, Fatal>,
    serve: impl FnOnce(Started<L, P>) -> ExitCode,
    sandbox: impl FnOnce(&Config) -> Result<Applied, sandbox::SandboxError>,
) -> ExitCode {
    let prepared = match start(&config, prepared) {
        Ok(prepared) => prepared,
        Err(e) => {
            tracing::error!("fatal: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (listener, link) = match child::adopt::<L>(service) {
        Ok(adopted) => adopted,
        Err(code) => return code,
    };
    let sandbox = match sandbox(&config) {
        Ok(applied) => applied,
        Err(e) => {
            tracing::error!("fatal: sandbox: {e}");
            return ExitCode::FAILURE;
        }
    };
    serve(Started { config, listener, link, prepared, sandbox })
}

/// The `start` step of a daemon whose processes make nothing of their
/// own: each serves with what `prepare` read.
pub fn keep<T>(_: &Config, prepared: T) -> Result<T, Fatal> {
    Ok(prepared)
}

/// The exit status of a pool child after its single-server loop
/// ([`child::serve`]): success when it left because it was told to or
/// served its last use (logged at debug), failure with a `fatal: master
/// link:` line when the link to the master broke.
pub fn exit_status(served: std::io::Result<child::ExitReason>) -> ExitCode {
    match served {
        Ok(reason) => {
            tracing::debug!("exit: {}", reason.as_str());
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("fatal: master link: {e}");
            ExitCode::FAILURE
        }
    }
}
