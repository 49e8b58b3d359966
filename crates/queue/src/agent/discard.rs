//! The `discard` agent: a sinkhole. Every recipient counts as delivered
//! and is logged `relay=none, ... status=sent (discarded)`, like Postfix's
//! discard(8); benchmarks use it to measure receive-and-queue cost alone.

use crate::route::{RcptResult, Report};

pub fn deliver(rcpts: &[usize]) -> Report {
    Report { relay: "none".into(), results: rcpts.iter().map(|_| RcptResult::delivered("discarded")).collect() }
}
