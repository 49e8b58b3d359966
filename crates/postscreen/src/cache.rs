//! The clients that passed the pregreet test, each for `greet_ttl`
//! (Postfix's postscreen cache, kept in memory: a successor starts empty,
//! and a client's next connection then waits once more).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

#[derive(Debug)]
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
        if self.limit == 0 || self.ttl.is_zero() {
            return;
        }
        let until = now + self.ttl;
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

    #[test]
    fn a_limit_or_ttl_of_zero_remembers_nobody() {
        let t0 = Instant::now();
        for mut cache in [PassCache::new(Duration::from_secs(10), 0), PassCache::new(Duration::ZERO, 10)] {
            cache.insert(ip(1), t0);
            assert!(!cache.passed(ip(1), t0));
        }
    }
}
