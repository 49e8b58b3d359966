//! life: the lifetime policy of one child, as pure functions.
//!
//! Like `pool`, nothing here performs I/O or reads a clock: the
//! event loop passes a child's clocks ([`Life`]) and the policy in, and
//! gets back what to do now ([`Verdict`]) and when to look again
//! ([`next_due`]). The rules, per child of a pool:
//!
//! - **lifetime**: each child draws its own life at spawn ([`draw_life`]),
//!   uniformly from `[max_lifetime * (1 - jitter), max_lifetime]`, so a
//!   batch spawned together never dies together. At its end an idle child
//!   is retired; a busy one is retired too but finishes its session first
//!   (it is *overdue*).
//! - **overdue**: a child still alive `overdue_grace` after its life ended
//!   is terminated whatever it is doing, so no load can keep a child alive
//!   longer than `max_lifetime + overdue_grace` (plus `term_grace` if it
//!   ignores SIGTERM): the paper's availability/security trade-off, decided
//!   for security.
//! - **session deadline**: a session longer than `session_deadline` is
//!   stuck (a deadlock, or a compromised child stalling): SIGTERM, which
//!   lets smtpd say `421` to its client, then SIGKILL after `term_grace`.
//! - **idle**: a child idle for `max_idle` is retired, but only while its
//!   pool has more than `min_spare` idle children (decided by the caller,
//!   which sees the whole pool).

use mortal_proto::config::ProcessPolicy;
use std::time::{Duration, Instant};

/// Why a child left the pool, for the retirement counters: the reason
/// `mortal status` shows, from proto.
pub use mortal_proto::status::RetireReason as Reason;

/// A child's clocks, as the policy needs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Life {
    /// When its drawn life ends; `None`: unlimited.
    pub life_end: Option<Instant>,
    /// When its current session began; `None` between sessions.
    pub session_since: Option<Instant>,
    /// Already told to retire (or leaving by itself): a retire is not
    /// repeated.
    pub leaving: bool,
    /// SIGTERM sent at this instant; SIGKILL follows after `term_grace`.
    pub term_sent: Option<Instant>,
    /// SIGKILL already sent: nothing more to do.
    pub killed: bool,
}

/// What the policy asks for one child now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing to do.
    Keep,
    /// Send the retire order: finish the session, if any, then exit.
    Retire(Reason),
    /// SIGTERM now (SIGKILL `term_grace` later, if still there).
    Terminate(Reason),
    /// SIGKILL now: the SIGTERM grace is over.
    Kill,
}

/// The policy knobs that concern one child, from its service's policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub session_deadline: Option<Duration>,
    pub overdue_grace: Duration,
    /// SIGTERM to SIGKILL.
    pub term_grace: Duration,
}

impl Limits {
    pub fn of(policy: &ProcessPolicy) -> Limits {
        let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
        Limits {
            session_deadline: nonzero(policy.session_deadline),
            overdue_grace: policy.overdue_grace,
            term_grace: policy.term_grace,
        }
    }
}

/// A child's life, drawn at spawn from `unit`, a uniform sample of
/// `[0, 1)`: `max_lifetime * (1 - jitter * unit)`, within
/// `[max_lifetime * (1 - jitter), max_lifetime]`. `None` when lifetimes
/// are unlimited.
pub fn draw_life(policy: &ProcessPolicy, unit: f64) -> Option<Duration> {
    if policy.max_lifetime.is_zero() {
        return None;
    }
    let jitter = policy.lifetime_jitter.clamp(0.0, 1.0);
    let cut = (jitter * unit.clamp(0.0, 1.0)).clamp(0.0, 1.0);
    Some(policy.max_lifetime.mul_f64(1.0 - cut))
}

/// The policy's verdict on one child at `now`.
pub fn verdict(limits: &Limits, life: &Life, now: Instant) -> Verdict {
    if life.killed {
        return Verdict::Keep;
    }
    if let Some(sent) = life.term_sent {
        return if now >= sent + limits.term_grace { Verdict::Kill } else { Verdict::Keep };
    }
    // The hard cap first: past it, nothing the child does buys more time.
    if let Some(end) = life.life_end
        && now >= end + limits.overdue_grace
    {
        return Verdict::Terminate(Reason::Overdue);
    }
    if let (Some(since), Some(deadline)) = (life.session_since, limits.session_deadline)
        && now >= since + deadline
    {
        return Verdict::Terminate(Reason::Deadline);
    }
    match life.life_end {
        Some(end) if now >= end && !life.leaving => Verdict::Retire(Reason::Lifetime),
        _ => Verdict::Keep,
    }
}

/// The next instant at which [`verdict`] may change for this child
/// (ignoring status changes, which are events of their own).
pub fn next_due(limits: &Limits, life: &Life) -> Option<Instant> {
    if life.killed {
        return None;
    }
    if let Some(sent) = life.term_sent {
        return Some(sent + limits.term_grace);
    }
    let hard_cap = life.life_end.map(|end| end + limits.overdue_grace);
    let retire = life.life_end.filter(|_| !life.leaving);
    let deadline = life.session_since.zip(limits.session_deadline).map(|(since, d)| since + d);
    [hard_cap, retire, deadline].into_iter().flatten().min()
}

/// Whether an idle child has waited long enough to be retired for
/// `max_idle` (the caller checks that its pool keeps `min_spare`).
pub fn idle_expired(policy: &ProcessPolicy, idle_since: Instant, now: Instant) -> bool {
    !policy.max_idle.is_zero() && now >= idle_since + policy.max_idle
}

/// When an idle child will have waited `max_idle`.
pub fn idle_due(policy: &ProcessPolicy, idle_since: Instant) -> Option<Instant> {
    (!policy.max_idle.is_zero()).then(|| idle_since + policy.max_idle)
}

/// A small pseudo-random generator (SplitMix64) for lifetime draws. Not
/// for secrets: it only has to spread deaths, and a child cannot observe
/// or influence it.
#[derive(Debug, Clone)]
pub struct Jitter(u64);

impl Jitter {
    pub fn new(seed: u64) -> Jitter {
        Jitter(seed)
    }

    /// Seeded from the wall clock and the master's pid.
    pub fn from_entropy() -> Jitter {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        Jitter::new(nanos ^ (u64::from(std::process::id()) << 32))
    }

    /// A uniform sample of `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // The top 53 bits make an exact double in [0, 1).
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_lifetime: u64, jitter: f64) -> ProcessPolicy {
        ProcessPolicy {
            max_lifetime: Duration::from_secs(max_lifetime),
            lifetime_jitter: jitter,
            overdue_grace: Duration::from_secs(5),
            session_deadline: Duration::from_secs(20),
            term_grace: Duration::from_secs(3),
            ..ProcessPolicy::default()
        }
    }

    #[test]
    fn lives_are_drawn_within_the_jitter_window() {
        let p = policy(100, 0.2);
        assert_eq!(draw_life(&p, 0.0), Some(Duration::from_secs(100)));
        assert_eq!(draw_life(&p, 0.5), Some(Duration::from_secs(90)));
        let mut rng = Jitter::new(42);
        let lives: Vec<Duration> = (0..1000).map(|_| draw_life(&p, rng.unit()).unwrap()).collect();
        assert!(lives.iter().all(|l| *l > Duration::from_secs(80) && *l <= Duration::from_secs(100)));
        // Spread over the window, not bunched: every 2 s bucket is hit.
        for bucket in 0..10u64 {
            let lo = Duration::from_secs(80 + 2 * bucket);
            assert!(lives.iter().any(|l| *l >= lo && *l < lo + Duration::from_secs(2)), "bucket {bucket}");
        }
        assert_eq!(draw_life(&policy(0, 0.2), 0.3), None);
        assert_eq!(draw_life(&policy(10, 0.0), 0.9), Some(Duration::from_secs(10)));
    }

    #[test]
    fn jitter_samples_are_uniform_units() {
        let mut rng = Jitter::new(7);
        let samples: Vec<f64> = (0..10_000).map(|_| rng.unit()).collect();
        assert!(samples.iter().all(|u| (0.0..1.0).contains(u)));
        let mean = samples.iter().sum::<f64>() / samples.len() as f64;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
        assert_ne!(Jitter::new(1).unit(), Jitter::new(2).unit());
    }

    #[test]
    fn idle_child_is_retired_at_its_life_end() {
        let t0 = Instant::now();
        let limits = Limits::of(&policy(10, 0.0));
        let life = Life { life_end: Some(t0 + Duration::from_secs(10)), ..Life::default() };
        assert_eq!(verdict(&limits, &life, t0), Verdict::Keep);
        assert_eq!(next_due(&limits, &life), Some(t0 + Duration::from_secs(10)));
        assert_eq!(verdict(&limits, &life, t0 + Duration::from_secs(10)), Verdict::Retire(Reason::Lifetime));
        // Told once; then only the hard cap remains.
        let told = Life { leaving: true, ..life };
        assert_eq!(verdict(&limits, &told, t0 + Duration::from_secs(11)), Verdict::Keep);
        assert_eq!(next_due(&limits, &told), Some(t0 + Duration::from_secs(15)));
    }

    #[test]
    fn busy_child_past_its_life_is_overdue_then_terminated() {
        let t0 = Instant::now();
        let limits = Limits::of(&policy(10, 0.0));
        let busy = Life {
            life_end: Some(t0 + Duration::from_secs(10)),
            session_since: Some(t0 + Duration::from_secs(9)),
            ..Life::default()
        };
        // Retired at its life end, but it may finish its session ...
        assert_eq!(verdict(&limits, &busy, t0 + Duration::from_secs(10)), Verdict::Retire(Reason::Lifetime));
        let overdue = Life { leaving: true, ..busy };
        assert_eq!(verdict(&limits, &overdue, t0 + Duration::from_secs(14)), Verdict::Keep);
        // ... for overdue_grace, not a moment longer.
        assert_eq!(verdict(&limits, &overdue, t0 + Duration::from_secs(15)), Verdict::Terminate(Reason::Overdue));
        let termed = Life { term_sent: Some(t0 + Duration::from_secs(15)), ..overdue };
        assert_eq!(verdict(&limits, &termed, t0 + Duration::from_secs(16)), Verdict::Keep);
        let grace = limits.term_grace;
        assert_eq!(next_due(&limits, &termed), Some(t0 + Duration::from_secs(15) + grace));
        assert_eq!(
            verdict(&limits, &termed, t0 + Duration::from_secs(15) + grace - Duration::from_millis(1)),
            Verdict::Keep
        );
        assert_eq!(verdict(&limits, &termed, t0 + Duration::from_secs(15) + grace), Verdict::Kill);
        let killed = Life { killed: true, ..termed };
        assert_eq!(verdict(&limits, &killed, t0 + Duration::from_secs(99)), Verdict::Keep);
        assert_eq!(next_due(&limits, &killed), None);
    }

    #[test]
    fn the_hard_cap_holds_whatever_the_child_says() {
        // A child that never reports idle again, or that ignores its retire
        // order while idle, is terminated at life_end + overdue_grace.
        let t0 = Instant::now();
        let limits = Limits::of(&policy(10, 0.0));
        for session_since in [None, Some(t0)] {
            let life =
                Life { life_end: Some(t0 + Duration::from_secs(10)), session_since, leaving: true, ..Life::default() };
            assert_eq!(verdict(&limits, &life, t0 + Duration::from_secs(15)), Verdict::Terminate(Reason::Overdue));
        }
    }

    #[test]
    fn a_stuck_session_is_terminated_at_the_deadline() {
        let t0 = Instant::now();
        let limits = Limits::of(&policy(0, 0.0));
        let life = Life { session_since: Some(t0), ..Life::default() };
        assert_eq!(next_due(&limits, &life), Some(t0 + Duration::from_secs(20)));
        assert_eq!(verdict(&limits, &life, t0 + Duration::from_secs(19)), Verdict::Keep);
        assert_eq!(verdict(&limits, &life, t0 + Duration::from_secs(20)), Verdict::Terminate(Reason::Deadline));
        // Between sessions there is no deadline; "0s" disables it.
        assert_eq!(next_due(&limits, &Life::default()), None);
        let off = Limits { session_deadline: None, ..limits };
        assert_eq!(verdict(&off, &life, t0 + Duration::from_secs(999)), Verdict::Keep);
    }

    #[test]
    fn the_policy_keys_are_validated_with_their_line() {
        use mortal_proto::config::Config;
        let text = "[process.smtpd]\nlifetime_jitter = 1.0\nmax_lifetime = \"10ms\"\n\n[process.cleanup]\n\
                    max_lifetime = \"1h\"\noverdue_grace = \"0s\"\noverload_wait = \"5s\"\n";
        let errors: Vec<String> =
            Config::parse(text, std::path::Path::new("m.toml")).unwrap_err().iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            [
                "m.toml:2:1: process.smtpd.lifetime_jitter: must be at least 0 and below 1",
                "m.toml:3:1: process.smtpd.max_lifetime: must be 0s (unlimited), or with lifetime_jitter give lives of \
                 at least 1s",
                "m.toml:7:1: process.cleanup.overdue_grace: must be above 0: a busy child past its life needs time to finish",
                "m.toml:8:1: process.cleanup.overload_wait: applies to smtpd only (cleanup's clients wait)",
            ]
        );
        // 4 s with jitter 0.8 can draw 0.8 s.
        let short = "[process.smtpd]\nmax_lifetime = \"4s\"\nlifetime_jitter = 0.8\n";
        assert!(Config::parse(short, std::path::Path::new("m.toml")).is_err());
        let ok = "[process.smtpd]\nmax_lifetime = \"0s\"\noverdue_grace = \"0s\"\noverload_wait = \"0s\"\n";
        let config = Config::parse(ok, std::path::Path::new("m.toml")).unwrap();
        assert_eq!(draw_life(&config.process.smtpd, 0.5), None);
        assert_eq!(config.process.smtpd.overload_wait, Duration::ZERO);
        let defaults = Config::parse("", std::path::Path::new("m.toml")).unwrap();
        assert_eq!(defaults.process.smtpd.overload_wait, mortal_proto::config::DEFAULT_OVERLOAD_WAIT);
    }

    #[test]
    fn idle_expiry_follows_max_idle() {
        let t0 = Instant::now();
        let mut p = policy(0, 0.0);
        p.max_idle = Duration::from_secs(3);
        assert!(!idle_expired(&p, t0, t0 + Duration::from_secs(2)));
        assert!(idle_expired(&p, t0, t0 + Duration::from_secs(3)));
        assert_eq!(idle_due(&p, t0), Some(t0 + Duration::from_secs(3)));
        p.max_idle = Duration::ZERO;
        assert!(!idle_expired(&p, t0, t0 + Duration::from_secs(3600)));
        assert_eq!(idle_due(&p, t0), None);
    }
}
