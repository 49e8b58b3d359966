//! Queue ids: unique across restarts, sortable by arrival.
//!
//! An id is 20 upper-case hex digits: 9 for the arrival second, 5 for the
//! microsecond and 6 for the pid of the cleanup process that made it. Two
//! cleanup processes never share a pid at the same instant, and one process
//! makes ids one at a time (it also creates the file with `O_EXCL`), so ids
//! never collide; fixed width makes string order equal arrival order. The
//! upper-case hex shape also matches what Postfix log parsers expect of a
//! queue id (`[0-9A-F]+`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Characters in a queue id.
pub const QUEUE_ID_LEN: usize = 20;

/// Makes the queue id for a message arriving at `now` in process `pid`.
pub fn make(now: SystemTime, pid: u32) -> String {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    format!("{:09X}{:05X}{:06X}", since.as_secs() & 0xF_FFFF_FFFF, since.subsec_micros(), pid & 0xFF_FFFF)
}

/// Whether `s` has the shape of a queue id. Everything that builds a path
/// from an id checks this first, so an id can never name another file.
pub fn is_valid(s: &str) -> bool {
    s.len() == QUEUE_ID_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'A'..=b'F'))
}

/// The arrival time encoded in an id.
pub fn arrival(id: &str) -> Option<SystemTime> {
    if !is_valid(id) {
        return None;
    }
    let secs = u64::from_str_radix(&id[..9], 16).ok()?;
    let micros = u64::from_str_radix(&id[9..14], 16).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_order_and_arrival() {
        let t1 = UNIX_EPOCH + Duration::new(1_800_000_000, 5_000);
        let t2 = t1 + Duration::from_micros(1);
        let (a, b) = (make(t1, 4_000_000), make(t2, 1));
        assert!(is_valid(&a) && is_valid(&b));
        assert!(a < b, "{a} sorts before {b}");
        assert_eq!(arrival(&a), Some(t1));
        assert!(!is_valid("../../etc/passwd"));
        assert!(!is_valid(&a.to_lowercase()));
    }
}
