//! daemon: the one start-up sequence every mortal daemon runs.
//!
//! A daemon's `main` is one call to [`run`] with four things of its own:
//! its [`Service`], what its sandbox must allow (`needs`, a
//! [`sandbox::Needs`] from the configuration), what it must read before
//! the sandbox takes the file system away (`prepare`: TLS keys, the CA
//! file, the recipient map, an event loop), and its `serve` step. [`run`]
//! performs, in this order and no other:
//!
//! 1. the sandbox self-test, when the command line asks for it
//!    ([`sandbox::selftest`], with the daemon's own `needs`);
//! 2. `--config PATH`: load and validate the configuration, install the log;
//!    with `--zygote` after it, become the pool's template: work out the
//!    sandbox (the user, the Landlock ruleset, the compiled seccomp
//!    filters) once, install a deny-list filter that allows its fork in
//!    itself (cleanup's), then fork a child on each request of the master
//!    ([`crate::zygote`]); the steps below then run in each child, which
//!    applies that plan in step 5 (inheriting the filter when installed);
//! 3. `prepare`;
//! 4. adopt the inherited listener and master socket;
//! 5. enter the sandbox ([`sandbox::Needs`] applied by the sandbox module);
//! 6. `serve`.
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
/// → adopt descriptors → sandbox (`needs`) → `serve`, as the module
/// documentation says. Returns the process's exit status.
pub fn run<L: Listener, P>(
    service: Service,
    needs: impl Fn(&Config) -> Needs,
    prepare: impl FnOnce(&Config) -> Result<P, Fatal>,
    serve: impl FnOnce(Started<L, P>) -> ExitCode,
) -> ExitCode {
    if let Some(code) = sandbox::selftest::run_if_asked(service, &needs) {
        return code;
    }
    let (config, plan) = match child::startup(service) {
        Ok((config, false)) => (config, None),
        Ok((config, true)) => {
            // The sandbox's user lookup, Landlock ruleset and compiled
            // filters, once for every child to come.
            let plan = sandbox::Plan::new(&config, &needs(&config), true).and_then(|mut plan| {
                // A deny-list filter is installed here once and inherited.
                plan.install_seccomp_early()?;
                Ok(plan)
            });
            let plan = match plan {
                Ok(plan) => plan,
                Err(e) => {
                    tracing::error!("fatal: sandbox: {e}");
                    return ExitCode::FAILURE;
                }
            };
            // A zygote returns from here only in each child it forks,
            // which then goes on as an exec'd child would.
            if let Err(code) = crate::zygote::fork_on_request() {
                return code;
            }
            (config, Some(plan))
        }
        Err(code) => return code,
    };
    let forked = plan.is_some();
    let code = run_child(service, config, needs, plan, prepare, serve);
    if forked {
        // A forked child shares the zygote's pages copy-on-write: the C
        // library's exit handlers and the dynamic loader's destructors
        // would write to (and so copy) pages only to throw them away.
        // Nothing is left to flush: the log is written line by line, and
        // every daemon syncs what it must before it answers.
        crate::sys::exit_now(if code == ExitCode::SUCCESS { 0 } else { 1 });
    }
    code
}

/// Steps 3 to 6 of [`run`]; a forked child applies its zygote's `plan`
/// of the sandbox, an exec'd one makes its own.
fn run_child<L: Listener, P>(
    service: Service,
    config: Config,
    needs: impl Fn(&Config) -> Needs,
    plan: Option<sandbox::Plan>,
    prepare: impl FnOnce(&Config) -> Result<P, Fatal>,
    serve: impl FnOnce(Started<L, P>) -> ExitCode,
) -> ExitCode {
    let prepared = match prepare(&config) {
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
    let entered = match plan {
        Some(plan) => plan.apply(service, &config),
        None => sandbox::enter(service, &config, &needs(&config)),
    };
    let sandbox = match entered {
        Ok(applied) => applied,
        Err(e) => {
            tracing::error!("fatal: sandbox: {e}");
            return ExitCode::FAILURE;
        }
    };
    serve(Started { config, listener, link, prepared, sandbox })
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
