//! How the envelope's values travel as record fields on the two socket
//! protocols between mortal's processes ([`crate::ipc`], smtpd → cleanup;
//! [`crate::delivery`], queue → delivery agents): one mapping, so the two
//! can never disagree. The queue file keeps its own
//! ([`crate::queue_file`]): a protocol change must never reach the disk.

use crate::envelope::{BodyType, DsnRet, Notify};

pub(crate) fn body_to_wire(b: BodyType) -> u8 {
    match b {
        BodyType::SevenBit => 7,
        BodyType::EightBitMime => 8,
        BodyType::BinaryMime => 9,
    }
}

pub(crate) fn body_from_wire(b: u8) -> Option<BodyType> {
    match b {
        7 => Some(BodyType::SevenBit),
        8 => Some(BodyType::EightBitMime),
        9 => Some(BodyType::BinaryMime),
        _ => None,
    }
}

/// NOTIFY as bits: 1 NEVER, 2 SUCCESS, 4 FAILURE, 8 DELAY.
pub(crate) fn notify_to_wire(n: Notify) -> u8 {
    u8::from(n.never) | u8::from(n.success) << 1 | u8::from(n.failure) << 2 | u8::from(n.delay) << 3
}

/// `None` for unknown bits, or NEVER combined with anything else.
pub(crate) fn notify_from_wire(b: u8) -> Option<Notify> {
    let n = Notify { never: b & 1 != 0, success: b & 2 != 0, failure: b & 4 != 0, delay: b & 8 != 0 };
    (b < 16 && n.is_valid()).then_some(n)
}

/// RET: 0 none, 1 FULL, 2 HDRS.
pub(crate) fn ret_to_wire(r: Option<DsnRet>) -> u8 {
    match r {
        None => 0,
        Some(DsnRet::Full) => 1,
        Some(DsnRet::Headers) => 2,
    }
}

/// `Err(())` for a value that is none of [`ret_to_wire`]'s.
pub(crate) fn ret_from_wire(b: u8) -> Result<Option<DsnRet>, ()> {
    match b {
        0 => Ok(None),
        1 => Ok(Some(DsnRet::Full)),
        2 => Ok(Some(DsnRet::Headers)),
        _ => Err(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_strangers_are_refused() {
        for b in [BodyType::SevenBit, BodyType::EightBitMime, BodyType::BinaryMime] {
            assert_eq!(body_from_wire(body_to_wire(b)), Some(b));
        }
        for r in [None, Some(DsnRet::Full), Some(DsnRet::Headers)] {
            assert_eq!(ret_from_wire(ret_to_wire(r)), Ok(r));
        }
        for bits in 0..16u8 {
            if let Some(n) = notify_from_wire(bits) {
                assert_eq!(notify_to_wire(n), bits);
            }
        }
        assert_eq!((body_from_wire(6), ret_from_wire(3), notify_from_wire(16)), (None, Err(()), None));
        assert_eq!(notify_from_wire(1 | 2), None, "NEVER with SUCCESS");
    }
}
