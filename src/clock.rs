//! The clock of the per-transaction path: a reading is a `Mono`, nanoseconds on
//! CLOCK_MONOTONIC (the clock std's and tokio's `Instant` read on Linux) in one integer.
//! A transaction reads the clock and takes differences several times (waits, query and
//! transaction times, a pooled server's age and idleness); on an `Instant`, which keeps
//! seconds and nanoseconds apart and checks both, each difference cost about 40
//! instructions, here one subtraction. Timers still take an `Instant`: `Mono::instant`.

use std::sync::LazyLock;
use std::time::Duration;
use tokio::time::Instant;

const NANOS_PER_SEC: u64 = 1_000_000_000;

/// A reading of the monotonic clock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mono(u64);

/// One `Instant` and the `Mono` read right after it: how readings become timers.
static ANCHOR: LazyLock<(Instant, Mono)> = LazyLock::new(|| (Instant::now(), Mono::now()));

impl Mono {
    #[inline]
    pub fn now() -> Mono {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid place to write; CLOCK_MONOTONIC exists on every Linux, so
        // the call cannot fail (a failure would leave `ts` at zero: readings stay ordered)
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        Mono(ts.tv_sec as u64 * NANOS_PER_SEC + ts.tv_nsec as u64)
    }

    /// Time from `earlier` to this reading; zero if `earlier` is later.
    #[inline]
    pub fn since(self, earlier: Mono) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    /// Time since this reading.
    pub fn elapsed(self) -> Duration {
        Mono::now().since(self)
    }

    /// Whether `d` or more has passed from `earlier` to this reading: one comparison, the
    /// duration taken apart only when it is long.
    #[inline]
    pub fn at_least(self, earlier: Mono, d: Duration) -> bool {
        self.0.saturating_sub(earlier.0) as u128 >= d.as_nanos()
    }

    /// Microseconds from `earlier` to this reading; zero if `earlier` is later.
    #[inline]
    pub fn micros_since(self, earlier: Mono) -> u64 {
        self.0.saturating_sub(earlier.0) / 1_000
    }

    /// The reading `us` microseconds after this one.
    pub fn add_micros(self, us: u64) -> Mono {
        Mono(self.0.saturating_add(us.saturating_mul(1_000)))
    }

    /// This reading as an `Instant`, for a timer.
    pub fn instant(self) -> Instant {
        let (at, mono) = *ANCHOR;
        if self >= mono {
            at + self.since(mono)
        } else {
            at.checked_sub(mono.since(self)).unwrap_or(at)
        }
    }
}

/// The reading `d` later (saturating).
impl std::ops::Add<Duration> for Mono {
    type Output = Mono;

    fn add(self, d: Duration) -> Mono {
        Mono(
            self.0
                .saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_become_instants_in_order() {
        let m0 = Mono::now();
        let i = Instant::now();
        let m1 = Mono::now();
        assert!(m0 <= m1);
        // the anchor's Mono is read after its Instant, so a converted reading is never
        // later than the moment it was read
        assert!(m0.instant() <= i);
        // conversion keeps differences exactly
        assert_eq!(m1.instant() - m0.instant(), m1.since(m0));
        let before = Mono(ANCHOR.1 .0 - 3_000);
        assert_eq!(ANCHOR.0 - before.instant(), Duration::from_micros(3));
    }

    #[test]
    fn differences_saturate_and_compare() {
        let a = Mono(5 * NANOS_PER_SEC);
        let b = a + Duration::from_millis(1500);
        assert_eq!(b.since(a), Duration::from_millis(1500));
        assert_eq!(a.since(b), Duration::ZERO);
        assert_eq!(b.micros_since(a), 1_500_000);
        assert_eq!(a.micros_since(b), 0);
        assert!(b.at_least(a, Duration::from_millis(1500)));
        assert!(!b.at_least(a, Duration::from_millis(1501)));
        assert!(!a.at_least(b, Duration::from_nanos(1)));
        assert!(a.at_least(b, Duration::ZERO));
        assert!(!b.at_least(a, Duration::MAX));
        assert_eq!(a + Duration::MAX, Mono(u64::MAX));
        assert_eq!(a.add_micros(2), Mono(5 * NANOS_PER_SEC + 2_000));
    }
}
