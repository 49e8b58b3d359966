//! Helpers for the lifetime-policy tests (`tests/lifetime.rs`): an
//! instance with extra `[process.smtpd]` keys and its own log level, and
//! the master's scoreboard as `mortal status --json` prints it (the
//! master's own [`StatusDoc`]).

use super::{Instance, Options, bin_dir};
use mortal_proto::service::Service;
use mortal_proto::status::{ChildDoc, RetireReason, ServiceDoc, StatusDoc};
use std::process::{Command, Output};

/// Starts an instance like [`Instance::start_with`], with `policy` (TOML
/// lines) added to its `[process.smtpd]` table and `[log] level` set to
/// `level`.
pub fn start_with_policy(opts: Options, policy: &str, level: &str) -> Instance {
    Instance::start_edited(opts, |text| {
        assert!(text.contains("[process.smtpd]\n") && text.contains("level = \"info\"\n"), "{text}");
        text.replacen("[process.smtpd]\n", &format!("[process.smtpd]\n{policy}\n"), 1).replacen(
            "level = \"info\"\n",
            &format!("level = {level:?}\n"),
            1,
        )
    })
}

impl Instance {
    /// Runs the `mortal` CLI against this instance's configuration.
    pub fn mortal(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin_dir().join("mortal"));
        cmd.arg("--config").arg(&self.config).args(args);
        let out = cmd.output().expect("run mortal");
        assert!(out.status.code().is_some(), "mortal {args:?} died: {}", String::from_utf8_lossy(&out.stderr));
        out
    }

    /// `mortal status --json`, parsed.
    pub fn status(&self) -> StatusDoc {
        let out = self.mortal(&["status", "--json"]);
        assert!(out.status.success(), "mortal status: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("mortal status --json prints JSON")
    }
}

/// The children of `service` in a status document.
pub fn children_of_service(status: &StatusDoc, service: Service) -> Vec<&ChildDoc> {
    status.children_of(service).collect()
}

/// A service's (first) entry in a status document.
pub fn service(status: &StatusDoc, service: Service) -> &ServiceDoc {
    status.service(service, None).unwrap_or_else(|| panic!("no service {service} in {status:?}"))
}

/// Retirements of `service` for `reason` so far.
pub fn retired(status: &StatusDoc, name: Service, reason: RetireReason) -> u64 {
    *service(status, name).retired.get(&reason).unwrap_or_else(|| panic!("no {reason:?} counter in {status:?}"))
}
