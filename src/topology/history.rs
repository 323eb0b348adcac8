//! When the primary's WAL reached which position, as the monitor saw it: the record a replica's
//! time lag is measured against when its own figures cannot tell (a replica that stopped
//! receiving, say from an old primary that is gone, has replayed everything it received and its
//! last replay timestamp says nothing about what it misses).
//!
//! A replica at replay position `r` has not replayed the WAL the primary had written by the
//! first sample past `r`, so its lag is at least the time since that sample. Dropping samples
//! can only make the answer smaller, so the bounded record stays a lower bound: recent samples
//! are kept one by one, older ones thinned out, so that both a short lag and one of hours show.

use crate::router::Lsn;
use std::collections::VecDeque;
use std::time::Instant;

/// At most this many samples; then the older half is thinned to every other sample.
const CAPACITY: usize = 64;

#[derive(Debug, Default)]
pub struct LsnHistory {
    /// Oldest first; positions strictly increase.
    samples: VecDeque<(Instant, Lsn)>,
}

impl LsnHistory {
    /// Records that the primary had written up to `lsn` by `at`. A position that did not move
    /// adds nothing (the earlier time is the better bound); one that went back means another
    /// history (a restored or different server), so the old samples are dropped.
    pub fn push(&mut self, at: Instant, lsn: Lsn) {
        match self.samples.back() {
            Some(&(_, last)) if lsn == last => return,
            Some(&(_, last)) if lsn < last => self.samples.clear(),
            _ => {}
        }
        if self.samples.len() == CAPACITY {
            self.thin_older_half();
        }
        self.samples.push_back((at, lsn));
    }

    pub fn clear(&mut self) {
        self.samples.clear();
    }

    /// Since when WAL past `replayed` has existed on the primary, if it has.
    pub fn behind_since(&self, replayed: Lsn) -> Option<Instant> {
        // Positions increase, so the first sample past `replayed` is the oldest such one.
        let i = self.samples.partition_point(|&(_, l)| l <= replayed);
        self.samples.get(i).map(|&(t, _)| t)
    }

    /// Keeps the oldest sample and every other one of the older half, so the span covered
    /// never shrinks while the recent samples keep full resolution.
    fn thin_older_half(&mut self) {
        let half = self.samples.len() / 2;
        let mut i = 0;
        self.samples.retain(|_| {
            let keep = i >= half || i % 2 == 0;
            i += 1;
            keep
        });
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.samples.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_replica_is_behind_since_the_first_sample_past_its_position() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut h = LsnHistory::default();
        h.push(at(0), Lsn(100));
        h.push(at(1), Lsn(100)); // no movement: the earlier time stays
        h.push(at(2), Lsn(200));
        h.push(at(3), Lsn(300));
        assert_eq!(h.behind_since(Lsn(50)), Some(at(0)));
        assert_eq!(h.behind_since(Lsn(100)), Some(at(2)));
        assert_eq!(h.behind_since(Lsn(250)), Some(at(3)));
        assert_eq!(h.behind_since(Lsn(300)), None);
        assert_eq!(h.behind_since(Lsn(900)), None);
        // Going back is another history.
        h.push(at(4), Lsn(10));
        assert_eq!(h.behind_since(Lsn(50)), None);
        assert_eq!(h.behind_since(Lsn(5)), Some(at(4)));
        h.clear();
        assert_eq!(h.behind_since(Lsn(0)), None);
    }

    #[test]
    fn the_record_is_bounded_keeps_its_oldest_sample_and_stays_a_lower_bound() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut h = LsnHistory::default();
        for s in 0..10_000u64 {
            h.push(at(s), Lsn(s + 1));
            assert!(h.len() <= CAPACITY);
        }
        // The first sample survives: a replica stuck from the start shows the whole span.
        assert_eq!(h.behind_since(Lsn(0)), Some(at(0)));
        // Recent samples keep full resolution.
        assert_eq!(h.behind_since(Lsn(9_990)), Some(at(9_990)));
        // Older ones are thinned, but never answer earlier than the truth.
        for r in [10u64, 1_000, 5_000, 9_000] {
            let since = h.behind_since(Lsn(r)).unwrap();
            assert!(since >= at(r), "r={r}");
        }
    }
}
