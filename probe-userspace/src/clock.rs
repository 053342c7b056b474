//! Clocks: the kernel timestamps everything with CLOCK_MONOTONIC (`bpf_ktime_get_ns`);
//! spans need wall-clock time.

use std::time::{Duration, SystemTime};

/// CLOCK_MONOTONIC in nanoseconds, the clock bpf_ktime_get_ns() reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CLOCK_MONOTONIC (the kernel's timestamps) → wall clock, by one offset taken once:
/// every span is shifted alike, so span durations are the measured durations exactly.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    realtime_minus_monotonic_ns: i128,
}

impl Clock {
    /// Reads both clocks a few times and keeps the closest pair.
    pub fn now() -> Self {
        let mut best = (u64::MAX, 0i128);
        for _ in 0..5 {
            let before = monotonic_ns();
            let real = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as i128);
            let after = monotonic_ns();
            let gap = after - before;
            if gap < best.0 {
                best = (gap, real - i128::from(before + gap / 2));
            }
        }
        Self {
            realtime_minus_monotonic_ns: best.1,
        }
    }

    pub fn wall(&self, monotonic_ns: u64) -> SystemTime {
        let ns = i128::from(monotonic_ns) + self.realtime_minus_monotonic_ns;
        SystemTime::UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_offset_keeps_durations_and_lands_near_now() {
        let clock = Clock::now();
        let now = monotonic_ns();
        let (a, b) = (clock.wall(now), clock.wall(now + 1_234_567));
        assert_eq!(
            b.duration_since(a).unwrap(),
            Duration::from_nanos(1_234_567)
        );
        let off = SystemTime::now().duration_since(a).unwrap();
        assert!(off < Duration::from_millis(100), "{off:?}");
    }
}
