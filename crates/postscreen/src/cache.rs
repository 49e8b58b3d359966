//! The clients that passed the pregreet test, each for `greet_ttl`
//! (Postfix's postscreen cache). Kept in memory while postscreen runs, and
//! written to a file when it exits ([`PassCache::save`]), which its
//! successor reads ([`PassCache::load`]): a retirement, a restart or a
//! reload does not make every known client wait for the greeting again.
//!
//! The file is text, a line per client, oldest pass first: `ADDRESS
//! EXPIRY`, the expiry in seconds since the Unix epoch. Reading it trusts
//! nothing: a line that does not parse is skipped, an expiry is never
//! taken beyond `greet_ttl` from now, and at most `cache_limit` clients
//! are kept, as when they passed.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Longest line of the cache file that is read (an IPv6 address, a space,
/// twenty digits, with room): a longer one is not a cache line.
pub const MAX_LINE: usize = 80;

#[derive(Debug, Default)]
pub struct PassCache {
    ttl: Duration,
    limit: usize,
    /// When each address's pass expires.
    expires: HashMap<IpAddr, Instant>,
    /// Insertion order, for forgetting the oldest first; an address
    /// passed again appears twice, and only its last entry counts.
    order: VecDeque<(IpAddr, Instant)>,
}

impl PassCache {
    pub fn new(ttl: Duration, limit: usize) -> Self {
        Self { ttl, limit, expires: HashMap::new(), order: VecDeque::new() }
    }

    /// Whether `addr` passed within its time to live.
    pub fn passed(&mut self, addr: IpAddr, now: Instant) -> bool {
        match self.expires.get(&addr) {
            Some(&until) if until > now => true,
            Some(_) => {
                self.expires.remove(&addr);
                false
            }
            None => false,
        }
    }

    pub fn insert(&mut self, addr: IpAddr, now: Instant) {
        self.insert_until(addr, now + self.ttl);
    }

    /// Whether this cache remembers anyone at all (`greet_ttl` and
    /// `cache_limit` both above zero).
    pub fn enabled(&self) -> bool {
        self.limit > 0 && !self.ttl.is_zero()
    }

    fn insert_until(&mut self, addr: IpAddr, until: Instant) {
        if !self.enabled() {
            return;
        }
        self.expires.insert(addr, until);
        self.order.push_back((addr, until));
        // Forget the oldest while over the limit, and compact the order
        // list when stale entries (addresses passed again) pile up.
        while self.expires.len() > self.limit || self.order.len() > 2 * self.limit.max(1) {
            let Some((old, old_until)) = self.order.pop_front() else { break };
            if self.expires.get(&old) == Some(&old_until) {
                self.expires.remove(&old);
            }
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.expires.len()
    }

    /// The cache file's text: every pass still valid at `now` (the wall
    /// clock reads `wall` then), oldest first.
    pub fn save(&self, now: Instant, wall: SystemTime) -> String {
        let mut text = String::new();
        for (addr, until) in &self.order {
            // An address passed again appears twice: only its last pass.
            if self.expires.get(addr) != Some(until) || *until <= now {
                continue;
            }
            let expiry = wall + (*until - now);
            let secs = expiry.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
            text.push_str(&format!("{addr} {secs}\n"));
        }
        text
    }

    /// Adds the passes of a cache file's `text` that are still valid at
    /// `now` (the wall clock reads `wall` then); returns how many were
    /// taken and how many lines were not cache lines.
    pub fn load(&mut self, text: &str, now: Instant, wall: SystemTime) -> (usize, usize) {
        let (mut taken, mut bad) = (0, 0);
        for line in text.lines() {
            let parsed = (line.len() <= MAX_LINE)
                .then(|| line.split_once(' '))
                .flatten()
                .and_then(|(addr, secs)| Some((addr.parse::<IpAddr>().ok()?, secs.parse::<u64>().ok()?)));
            let Some((addr, secs)) = parsed else {
                bad += 1;
                continue;
            };
            let expiry = UNIX_EPOCH + Duration::from_secs(secs);
            let Ok(left) = expiry.duration_since(wall) else { continue };
            if left.is_zero() {
                continue;
            }
            self.insert_until(addr, now + left.min(self.ttl));
            taken += 1;
        }
        (taken, bad)
    }

    /// The most of a cache file worth reading: `cache_limit` lines.
    pub fn max_file_len(&self) -> u64 {
        (self.limit as u64).saturating_mul(MAX_LINE as u64 + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn a_pass_lasts_its_ttl_and_the_oldest_are_forgotten_first() {
        let t0 = Instant::now();
        let mut cache = PassCache::new(Duration::from_secs(10), 2);
        assert!(!cache.passed(ip(1), t0));
        cache.insert(ip(1), t0);
        assert!(cache.passed(ip(1), t0 + Duration::from_secs(9)));
        assert!(!cache.passed(ip(1), t0 + Duration::from_secs(10)));
        cache.insert(ip(1), t0);
        cache.insert(ip(2), t0);
        cache.insert(ip(1), t0 + Duration::from_secs(1));
        cache.insert(ip(3), t0 + Duration::from_secs(2));
        // 2 is the oldest pass: 1 passed again after it.
        assert_eq!(cache.len(), 2);
        assert!(!cache.passed(ip(2), t0 + Duration::from_secs(3)));
        assert!(cache.passed(ip(1), t0 + Duration::from_secs(3)));
        assert!(cache.passed(ip(3), t0 + Duration::from_secs(3)));
        // The order list stays bounded when one client passes again and again.
        for i in 0..100 {
            cache.insert(ip(1), t0 + Duration::from_millis(i));
        }
        assert!(cache.order.len() <= 4);
        assert!(cache.passed(ip(1), t0 + Duration::from_secs(5)));
    }

    /// What one postscreen saves its successor reads back: the passes
    /// still valid, their remaining time, the newest when the limit is
    /// smaller; no line it cannot parse, no expiry beyond `greet_ttl`.
    #[test]
    fn the_file_carries_the_passes_to_a_successor() {
        let (t0, wall) = (Instant::now(), SystemTime::now());
        let mut cache = PassCache::new(Duration::from_secs(100), 10);
        cache.insert(ip(1), t0);
        cache.insert(ip(2), t0 + Duration::from_secs(50));
        cache.insert(ip(1), t0 + Duration::from_secs(60));
        let text = cache.save(t0 + Duration::from_secs(60), wall + Duration::from_secs(60));
        let secs = |d: u64| (wall + Duration::from_secs(d)).duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(text, format!("192.0.2.2 {}\n192.0.2.1 {}\n", secs(150), secs(160)));

        // Read by a successor started at t1, 140 s after t0 by the wall clock.
        let (t1, wall1) = (Instant::now(), wall + Duration::from_secs(140));
        let mut next = PassCache::new(Duration::from_secs(100), 10);
        let forged = format!("192.0.2.9 {}\nnot a line\n192.0.2.8\n::1 x\n{} 1\n", secs(1_000_000), "9".repeat(90));
        assert_eq!(next.load(&format!("{text}{forged}"), t1, wall1), (3, 4));
        // 2 has 10 s left, 1 has 20 s; the forged one gets greet_ttl.
        assert!(next.passed(ip(2), t1 + Duration::from_secs(9)));
        assert!(!next.passed(ip(2), t1 + Duration::from_secs(10)));
        assert!(next.passed(ip(1), t1 + Duration::from_secs(19)));
        assert!(!next.passed(ip(1), t1 + Duration::from_secs(20)));
        assert!(next.passed(ip(9), t1 + Duration::from_secs(99)));
        assert!(!next.passed(ip(9), t1 + Duration::from_secs(100)));

        // A smaller limit keeps the newest passes of the file.
        let mut small = PassCache::new(Duration::from_secs(100), 1);
        small.load(&text, t1, wall + Duration::from_secs(60));
        assert_eq!(small.len(), 1);
        assert!(small.passed(ip(1), t1));
    }

    #[test]
    fn a_limit_or_ttl_of_zero_remembers_nobody() {
        let t0 = Instant::now();
        for mut cache in [PassCache::new(Duration::from_secs(10), 0), PassCache::new(Duration::ZERO, 10)] {
            cache.insert(ip(1), t0);
            assert!(!cache.passed(ip(1), t0));
        }
    }
}
