//! Per-command counters for Postfix's `disconnect from ...` line, which
//! pflogsumm and monitoring scripts read: `ehlo=1 mail=1 rcpt=0/1 quit=1
//! commands=3/4` (successes, and `/attempts` where some failed).

use super::command::Verb;
use std::fmt::Write;

#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// (succeeded, attempted), indexed by `Verb as usize`.
    counts: [(u32, u32); Verb::ALL.len()],
}

impl Stats {
    pub fn count(&mut self, verb: Verb, ok: bool) {
        let (good, total) = &mut self.counts[verb as usize];
        *good += u32::from(ok);
        *total += 1;
    }

    /// `ehlo=1 mail=1 rcpt=0/1 commands=2/3`, commands in table order;
    /// `commands=0` when the client sent nothing.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let (mut good, mut total) = (0, 0);
        for verb in Verb::ALL {
            let (g, t) = self.counts[verb as usize];
            if t > 0 {
                let _ = write!(out, "{}={} ", verb.name().to_ascii_lowercase(), fraction(g, t));
            }
            (good, total) = (good + g, total + t);
        }
        let _ = write!(out, "commands={}", fraction(good, total));
        out
    }
}

fn fraction(good: u32, total: u32) -> String {
    if good == total { good.to_string() } else { format!("{good}/{total}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postfix_shape() {
        let mut s = Stats::default();
        assert_eq!(s.summary(), "commands=0");
        s.count(Verb::Quit, true);
        s.count(Verb::Ehlo, true);
        s.count(Verb::Rcpt, false);
        s.count(Verb::Unknown, false);
        s.count(Verb::Rcpt, true);
        assert_eq!(s.summary(), "ehlo=1 rcpt=1/2 quit=1 unknown=0/1 commands=3/5");
    }
}
