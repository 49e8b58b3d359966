//! service: which mortal daemon a process is.
//!
//! One enum names every service the master runs. The master decides by it
//! which binary to start and whether it runs a pool or a single process;
//! a daemon states it once at start-up (`mortal_libmaster::daemon::run`),
//! with its own sandbox needs, and the log writes its
//! [`Service::name`] in the program tag (`postfix/mortal/smtpd`) and in
//! the JSON `service` field. `mortal status --json` names services the
//! same way.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use thiserror::Error;

/// A mortal daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Service {
    /// The SMTP server: a pool on each `[smtpd]` listener.
    Smtpd,
    /// The last check before the spool and the durable write: a pool.
    Cleanup,
    /// The queue manager: exactly one process, restarted when it exits.
    Queue,
    /// The per-client counter smtpd asks: one process, like the queue.
    Anvil,
    /// The screen in front of smtpd on each `[smtpd] listen` address when
    /// `[postscreen] enabled`: one event-driven process holds connections
    /// cheaply until they have shown they speak SMTP, then passes them to
    /// an smtpd child. Present only when enabled.
    Postscreen,
    /// The pipe delivery agent the queue hands pipe-routed mail to: a
    /// pool, one delivery request per connection, running the configured
    /// command. Present only when a route uses pipe.
    Pipe,
    /// The LMTP delivery agent: talks to `lmtp:` next hops for the queue
    /// manager. Present only when a route uses LMTP.
    Lmtp,
    /// The SMTP delivery agent: relays to `smtp:` next hops.
    Smtp,
}

/// How many processes the master runs for a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Exactly one, restarted when it exits.
    Single,
    /// Pre-forked children under `[process.<service>]`'s pool policy.
    Pool,
}

/// Which mortal process writes a log line: the master itself, or a
/// service it runs. The log tag is `<syslog_name>/<name>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Process {
    Master,
    Service(Service),
}

impl Process {
    pub fn name(self) -> &'static str {
        match self {
            Process::Master => "master",
            Process::Service(service) => service.name(),
        }
    }
}

impl From<Service> for Process {
    fn from(service: Service) -> Self {
        Process::Service(service)
    }
}

/// A service name that is none of [`Service::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown service {0:?}")]
pub struct UnknownService(pub String);

impl Service {
    /// Every service, in the order the master starts them.
    pub const ALL: [Service; 8] = [
        Service::Smtpd,
        Service::Cleanup,
        Service::Queue,
        Service::Anvil,
        Service::Postscreen,
        Service::Pipe,
        Service::Lmtp,
        Service::Smtp,
    ];

    /// The name in logs, `mortal status` and `[process.<name>]`.
    pub fn name(self) -> &'static str {
        match self {
            Service::Smtpd => "smtpd",
            Service::Cleanup => "cleanup",
            Service::Queue => "queue",
            Service::Anvil => "anvil",
            Service::Postscreen => "postscreen",
            Service::Pipe => "pipe",
            Service::Lmtp => "lmtp",
            Service::Smtp => "smtp",
        }
    }

    /// The binary, found next to the master's own.
    pub fn program(self) -> &'static str {
        match self {
            Service::Smtpd => "mortal-smtpd",
            Service::Cleanup => "mortal-cleanup",
            Service::Queue => "mortal-queue",
            Service::Anvil => "mortal-anvil",
            Service::Postscreen => "mortal-postscreen",
            Service::Pipe => "mortal-pipe",
            Service::Lmtp => "mortal-lmtp",
            Service::Smtp => "mortal-smtp",
        }
    }

    /// Whether the queue manager hands deliveries to this service: the
    /// services some [`crate::config::Route::agent`] names. Their only
    /// client is the queue manager.
    pub fn is_delivery_agent(self) -> bool {
        match self {
            Service::Pipe | Service::Lmtp | Service::Smtp => true,
            Service::Smtpd | Service::Cleanup | Service::Queue | Service::Anvil | Service::Postscreen => false,
        }
    }

    pub fn shape(self) -> Shape {
        match self {
            Service::Smtpd | Service::Cleanup | Service::Pipe | Service::Lmtp | Service::Smtp => Shape::Pool,
            Service::Queue | Service::Anvil | Service::Postscreen => Shape::Single,
        }
    }
}

impl Service {
    /// Whether `route` is one this delivery agent carries
    /// ([`crate::config::Route::agent`]).
    pub fn carries(self, route: &crate::config::Route) -> bool {
        route.agent() == Some(self)
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Service {
    type Err = UnknownService;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Service::ALL.into_iter().find(|service| service.name() == s).ok_or_else(|| UnknownService(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_text_and_serde() {
        for service in Service::ALL {
            assert_eq!(service.name().parse::<Service>(), Ok(service));
            assert_eq!(service.to_string(), service.name());
            assert_eq!(service.program(), format!("mortal-{}", service.name()));
            let json = serde_json::to_string(&service).unwrap();
            assert_eq!(json, format!("\"{}\"", service.name()));
            assert_eq!(serde_json::from_str::<Service>(&json).unwrap(), service);
        }
        assert_eq!("SMTPD".parse::<Service>(), Err(UnknownService("SMTPD".into())));
        assert_eq!("master".parse::<Service>(), Err(UnknownService("master".into())));
        assert_eq!(Process::Master.name(), "master");
        assert_eq!(Process::from(Service::Anvil).name(), "anvil");
    }

    #[test]
    fn every_route_agent_is_a_delivery_agent_and_carries_its_route() {
        use crate::config::{NextHop, Route};
        let routes = [
            Route::Maildir,
            Route::Discard,
            Route::Pipe,
            Route::Lmtp(NextHop::Unix("/l".into())),
            Route::Lmtp(NextHop::Inet("127.0.0.1:24".parse().unwrap())),
            Route::Smtp("127.0.0.1:25".parse().unwrap()),
        ];
        let agents: Vec<_> = routes.iter().map(Route::agent).collect();
        assert_eq!(
            agents,
            [None, None, Some(Service::Pipe), Some(Service::Lmtp), Some(Service::Lmtp), Some(Service::Smtp)]
        );
        for route in &routes {
            for service in Service::ALL {
                assert_eq!(service.carries(route), route.agent() == Some(service), "{service} {route:?}");
            }
            if let Some(agent) = route.agent() {
                assert!(agent.is_delivery_agent() && agent.shape() == Shape::Pool, "{agent}");
            }
        }
        let agents: Vec<_> = Service::ALL.into_iter().filter(|s| s.is_delivery_agent()).collect();
        assert_eq!(agents, [Service::Pipe, Service::Lmtp, Service::Smtp]);
    }

    #[test]
    fn only_the_queue_anvil_and_postscreen_are_single() {
        let single: Vec<_> = Service::ALL.into_iter().filter(|s| s.shape() == Shape::Single).collect();
        assert_eq!(single, [Service::Queue, Service::Anvil, Service::Postscreen]);
    }
}
