//! pool: the pool policy, as pure functions of a scoreboard snapshot.
//!
//! Nothing here performs I/O or reads a clock: callers pass counts and
//! instants in, and get decisions out (spawn this many, retire that many,
//! warn about the process limit, throttle a crashing service). That keeps
//! the lifetime policy, the heart of the Secure Pre-forking pattern, easy to
//! test and to reason about apart from the event loop that carries it out.
//!
//! The shape follows Apache's prefork MPM: keep at least `min_spare` idle
//! children (a child still starting counts as a spare to be), never exceed
//! `process_limit`, grow at 1, 2, 4 ... 32 children a second while short of
//! spares, and retire the idle children above `max_spare`. The crash
//! throttle follows Postfix's master: a service whose children keep dying
//! before they are ready is paused with an exponential back-off instead of
//! being respawned in a tight loop.

use mortal_proto::config::ProcessPolicy;
use mortal_proto::service::Service as ServiceKind;
use std::time::{Duration, Instant};

/// Fastest growth of a pool short of spares, in children per second
/// (Apache's `MAX_SPAWN_RATE`).
pub const MAX_SPAWN_RATE: u32 = 32;
/// Consecutive bad starts (exit before READY) that throttle a service.
pub const BAD_STARTS_BEFORE_THROTTLE: u32 = 3;
/// First throttle pause; each further throttle doubles it.
pub const THROTTLE_FIRST_DELAY: Duration = Duration::from_secs(1);
/// Longest throttle pause.
pub const THROTTLE_MAX_DELAY: Duration = Duration::from_secs(60);
/// Fewest spare children a pool keeps, whatever the configuration says:
/// the master never accepts connections itself, so a pool with no idle
/// child cannot take a client, and nothing would ever make it grow.
pub const MIN_SPARE_FLOOR: u32 = 1;

/// How many children of one service are in each scoreboard state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolView {
    /// Every process not yet reaped, whatever its state: the number the
    /// process limit caps.
    pub live: u32,
    /// Spawned, not yet READY.
    pub starting: u32,
    /// READY or finished a session, waiting for the next.
    pub idle: u32,
    /// Serving a session.
    pub busy: u32,
    /// Retiring, told to retire, or broken: alive, but no longer capacity.
    pub leaving: u32,
}

impl PoolView {
    /// Children that are, or are about to be, waiting for a client.
    pub fn spare(&self) -> u32 {
        self.starting + self.idle
    }
}

/// What the pool should do now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Plan {
    /// Children to spawn now.
    pub spawn: u32,
    /// Idle children to retire (only acted on once a second, see
    /// `event_loop`).
    pub retire: u32,
    /// Short of spares with no room left under `process_limit`: clients
    /// will queue in the listen backlog.
    pub at_limit: bool,
}

/// The policy as enforced: `min_spare` raised to [`MIN_SPARE_FLOOR`] (but
/// never above `process_limit`), and `max_spare` raised to `min_spare` so
/// the pool cannot oscillate between spawning and retiring.
pub fn effective(policy: &ProcessPolicy) -> ProcessPolicy {
    let min_spare = policy.min_spare.max(MIN_SPARE_FLOOR).min(policy.process_limit);
    ProcessPolicy { min_spare, max_spare: policy.max_spare.max(min_spare), ..*policy }
}

/// Spares missing below `min_spare`.
pub fn shortfall(policy: &ProcessPolicy, view: &PoolView) -> u32 {
    policy.min_spare.saturating_sub(view.spare())
}

/// Children that may still be spawned under `process_limit`.
pub fn room(policy: &ProcessPolicy, view: &PoolView) -> u32 {
    policy.process_limit.saturating_sub(view.live)
}

/// Idle children above `max_spare`. Starting children count as spares
/// (they will be idle in a moment) but only idle ones can be retired.
pub fn excess(policy: &ProcessPolicy, view: &PoolView) -> u32 {
    view.spare().saturating_sub(policy.max_spare).min(view.idle)
}

/// The decision for one pool, given `allowance` spawns left this second.
pub fn plan(policy: &ProcessPolicy, view: &PoolView, allowance: u32) -> Plan {
    let short = shortfall(policy, view);
    let room = room(policy, view);
    Plan { spawn: short.min(room).min(allowance), retire: excess(policy, view), at_limit: short > 0 && room == 0 }
}

/// A single-process service (queue): one process at a time, ever, because
/// two queue managers would fight over the spool. A retiring process is
/// replaced only after it has exited.
pub fn single_needs_spawn(view: &PoolView) -> bool {
    view.live == 0
}

/// Apache's idle spawn rate: while short of spares the pool may grow by
/// 1, 2, 4 ... [`MAX_SPAWN_RATE`] children a second; the rate falls back to
/// one as soon as the pool is no longer short.
///
/// The ramp is there because a pool's demand is its clients': a flood of
/// connections to smtpd must not fork the host up to `process_limit` in
/// one go. A delivery agent's only client is the queue manager, which
/// never runs more deliveries than `[queue] delivery_concurrency`, so its
/// demand is already bounded by a trusted process; ramping it would only
/// leave a burst's deliveries waiting for agents for seconds (the pool
/// needs 1+2+4+8 seconds to grow from 2 to 20). Those pools spawn at
/// [`MAX_SPAWN_RATE`] from the start ([`SpawnRate::for_service`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpawnRate {
    rate: u32,
    left: u32,
    /// The rate while not short of spares: 1 for a ramping pool,
    /// [`MAX_SPAWN_RATE`] for one whose demand is bounded by the queue.
    floor: u32,
}

impl Default for SpawnRate {
    fn default() -> Self {
        Self { rate: 1, left: 1, floor: 1 }
    }
}

impl SpawnRate {
    /// The rate rule of `service`'s pool: a delivery agent (whose client is
    /// the queue manager) does not ramp, every other pool does.
    pub fn for_service(service: ServiceKind) -> Self {
        if service.is_delivery_agent() {
            Self { rate: MAX_SPAWN_RATE, left: MAX_SPAWN_RATE, floor: MAX_SPAWN_RATE }
        } else {
            Self::default()
        }
    }

    /// Starts a new second. `short` says whether the pool is short of
    /// spares now, before this second's spawns: still short after the last
    /// second's spawns means demand outgrows the rate, so it doubles.
    pub fn second_elapsed(&mut self, short: bool) {
        self.rate = if short { (self.rate * 2).clamp(self.floor, MAX_SPAWN_RATE) } else { self.floor };
        self.left = self.rate;
    }

    /// Spawns still allowed this second.
    pub fn allowance(&self) -> u32 {
        self.left
    }

    /// Records `n` spawns (at most the allowance).
    pub fn spend(&mut self, n: u32) {
        self.left = self.left.saturating_sub(n);
    }

    /// Allows `n` more spawns this second: a child leaving (its last
    /// session, or retired for a reload) is replaced at once, because
    /// replacing capacity is not growth and must not wait for the rate.
    pub fn grant(&mut self, n: u32) {
        self.left = self.left.saturating_add(n);
    }

    /// The current rate, for diagnostics and tests.
    pub fn rate(&self) -> u32 {
        self.rate
    }
}

/// Postfix-style crash throttle for one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttle {
    bad_in_row: u32,
    next_delay: Duration,
    until: Option<Instant>,
}

impl Default for Throttle {
    fn default() -> Self {
        Self { bad_in_row: 0, next_delay: THROTTLE_FIRST_DELAY, until: None }
    }
}

impl Throttle {
    /// A child exited before it ever reported READY (or could not be
    /// spawned at all). Returns the pause when this starts a throttle.
    /// While a pause runs, further bad starts (the rest of a batch that was
    /// already spawned) do not extend it. Once the pause is over, the count
    /// is not reset, so the next bad start throttles again at once, for
    /// twice as long: only a good start proves the service healthy.
    pub fn bad_start(&mut self, now: Instant) -> Option<Duration> {
        self.bad_in_row = self.bad_in_row.saturating_add(1);
        if self.bad_in_row < BAD_STARTS_BEFORE_THROTTLE || self.is_throttled(now) {
            return None;
        }
        let delay = self.next_delay;
        self.until = Some(now + delay);
        self.next_delay = (delay * 2).min(THROTTLE_MAX_DELAY);
        Some(delay)
    }

    /// A child reported READY: the service works, forget its past.
    pub fn good_start(&mut self) {
        *self = Self::default();
    }

    /// Whether spawning is paused at `now`.
    pub fn is_throttled(&self, now: Instant) -> bool {
        self.until.is_some_and(|until| now < until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(process_limit: u32, min_spare: u32, max_spare: u32) -> ProcessPolicy {
        ProcessPolicy { process_limit, prefork: 2, min_spare, max_spare, max_use: 100, ..ProcessPolicy::default() }
    }

    fn view(starting: u32, idle: u32, busy: u32, leaving: u32) -> PoolView {
        PoolView { live: starting + idle + busy + leaving, starting, idle, busy, leaving }
    }

    #[test]
    fn starting_children_count_as_spares() {
        let p = policy(20, 3, 5);
        assert_eq!(shortfall(&p, &view(0, 1, 4, 0)), 2);
        assert_eq!(shortfall(&p, &view(2, 1, 4, 0)), 0);
        assert_eq!(plan(&p, &view(2, 1, 4, 0), 8).spawn, 0);
    }

    #[test]
    fn leaving_children_are_not_capacity_but_are_processes() {
        // Two idle children just reported RETIRING: they no longer count
        // as spares, so replacements are due ...
        let p = policy(20, 2, 5);
        assert_eq!(plan(&p, &view(0, 0, 3, 2), 8).spawn, 2);
        // ... but they still count against the hard process limit.
        let p = policy(5, 2, 5);
        let decided = plan(&p, &view(0, 0, 3, 2), 8);
        assert_eq!(decided.spawn, 0);
        assert!(decided.at_limit);
    }

    #[test]
    fn spawns_are_capped_by_allowance_and_process_limit() {
        let p = policy(10, 8, 10);
        assert_eq!(plan(&p, &view(0, 0, 4, 0), 2).spawn, 2);
        assert_eq!(plan(&p, &view(0, 0, 4, 0), 32).spawn, 6);
        assert_eq!(plan(&p, &view(0, 0, 9, 0), 32).spawn, 1);
    }

    #[test]
    fn process_limit_is_reported_only_when_short() {
        let p = policy(4, 1, 2);
        assert!(plan(&p, &view(0, 0, 4, 0), 1).at_limit);
        assert!(!plan(&p, &view(0, 1, 3, 0), 1).at_limit);
        assert!(!plan(&p, &view(0, 0, 3, 0), 1).at_limit);
    }

    #[test]
    fn idle_children_above_max_spare_are_retired() {
        let p = policy(20, 1, 3);
        assert_eq!(plan(&p, &view(0, 5, 0, 0), 1).retire, 2);
        assert_eq!(plan(&p, &view(0, 3, 9, 0), 1).retire, 0);
        // Starting children count towards max_spare, but cannot be retired
        // before they are idle.
        assert_eq!(excess(&p, &view(4, 1, 0, 0)), 1);
        assert_eq!(excess(&p, &view(6, 0, 0, 0)), 0);
    }

    #[test]
    fn effective_policy_never_starves_or_oscillates() {
        let e = effective(&policy(10, 0, 0));
        assert_eq!((e.min_spare, e.max_spare), (1, 1));
        // A pool with min_spare idle must not then retire one of them.
        assert_eq!(plan(&e, &view(0, 1, 0, 0), 1), Plan::default());
        let e = effective(&policy(10, 4, 6));
        assert_eq!((e.min_spare, e.max_spare), (4, 6));
    }

    #[test]
    fn spawn_rate_doubles_while_short_up_to_32() {
        let mut r = SpawnRate::default();
        assert_eq!(r.allowance(), 1);
        let mut seen = vec![r.allowance()];
        for _ in 0..7 {
            r.second_elapsed(true);
            seen.push(r.allowance());
        }
        assert_eq!(seen, [1, 2, 4, 8, 16, 32, 32, 32]);
        r.second_elapsed(false);
        assert_eq!((r.rate(), r.allowance()), (1, 1));
    }

    /// Issue 11: the agents' only client is the queue manager, bounded by
    /// `delivery_concurrency`; a burst must not wait 1+2+4+8 seconds for
    /// the pool to grow. smtpd and cleanup still ramp.
    #[test]
    fn agent_pools_spawn_at_the_full_rate_from_the_start() {
        for service in [ServiceKind::Lmtp, ServiceKind::Smtp, ServiceKind::Pipe] {
            let mut r = SpawnRate::for_service(service);
            assert_eq!((r.rate(), r.allowance()), (MAX_SPAWN_RATE, MAX_SPAWN_RATE), "{service}");
            r.spend(MAX_SPAWN_RATE);
            r.second_elapsed(false);
            assert_eq!((r.rate(), r.allowance()), (MAX_SPAWN_RATE, MAX_SPAWN_RATE), "{service}");
            r.second_elapsed(true);
            assert_eq!(r.rate(), MAX_SPAWN_RATE, "{service}");
        }
        for service in [ServiceKind::Smtpd, ServiceKind::Cleanup] {
            let mut r = SpawnRate::for_service(service);
            assert_eq!((r.rate(), r.allowance()), (1, 1), "{service}");
            r.second_elapsed(true);
            assert_eq!(r.rate(), 2, "{service}");
        }
    }

    #[test]
    fn spawn_rate_budget_is_spent_and_granted() {
        let mut r = SpawnRate::default();
        r.spend(1);
        assert_eq!(r.allowance(), 0);
        r.spend(1);
        assert_eq!(r.allowance(), 0);
        r.grant(2);
        assert_eq!(r.allowance(), 2);
        // A new second resets the budget to the rate; grants do not carry.
        r.second_elapsed(false);
        assert_eq!(r.allowance(), 1);
    }

    #[test]
    fn a_growing_pool_fills_its_shortfall_at_1_2_4() {
        // min_spare 7, every child busy: 1 spawn at once, then 2, then 4.
        let p = policy(50, 7, 10);
        let mut v = view(0, 0, 10, 0);
        let mut r = SpawnRate::default();
        let mut per_second = Vec::new();
        for second in 0..4 {
            if second > 0 {
                r.second_elapsed(shortfall(&p, &v) > 0);
            }
            let n = plan(&p, &v, r.allowance()).spawn;
            r.spend(n);
            v.starting += n;
            v.live += n;
            per_second.push(n);
        }
        assert_eq!(per_second, [1, 2, 4, 0]);
    }

    #[test]
    fn single_process_service_waits_for_the_old_one_to_exit() {
        assert!(single_needs_spawn(&view(0, 0, 0, 0)));
        assert!(!single_needs_spawn(&view(0, 0, 0, 1)));
        assert!(!single_needs_spawn(&view(1, 0, 0, 0)));
    }

    #[test]
    fn three_bad_starts_throttle_with_doubling_delay() {
        let t0 = Instant::now();
        let mut t = Throttle::default();
        assert_eq!(t.bad_start(t0), None);
        assert_eq!(t.bad_start(t0), None);
        assert_eq!(t.bad_start(t0), Some(Duration::from_secs(1)));
        assert!(t.is_throttled(t0));
        // More failures of the same batch do not extend the pause.
        assert_eq!(t.bad_start(t0 + Duration::from_millis(500)), None);
        let t1 = t0 + Duration::from_secs(1);
        assert!(!t.is_throttled(t1));
        // The service still has not worked: the next failure pauses again.
        assert_eq!(t.bad_start(t1), Some(Duration::from_secs(2)));
        assert_eq!(t.bad_start(t1 + Duration::from_secs(2)), Some(Duration::from_secs(4)));
    }

    #[test]
    fn throttle_delay_is_capped_and_reset_by_a_good_start() {
        let mut now = Instant::now();
        let mut t = Throttle::default();
        let mut last = None;
        for _ in 0..20 {
            if let Some(d) = t.bad_start(now) {
                last = Some(d);
                now += d;
            }
        }
        assert_eq!(last, Some(THROTTLE_MAX_DELAY));
        t.good_start();
        assert_eq!(t, Throttle::default());
        assert_eq!(t.bad_start(now), None);
    }
}
