//! Exponential backoff with full jitter (AWS Architecture Blog, "Exponential
//! Backoff And Jitter"): the n-th delay is uniform in `[0, min(cap, base·2ⁿ)]`,
//! so clients that failed together do not retry together. One type for the
//! SDK's retries and the server's fallback wake-ups of waiting Acquires.

use std::time::Duration;

/// The delays of one run of retries.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// Delays starting below `base`, never above `cap` (at least `base`).
    pub(crate) fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap: cap.max(base),
            attempt: 0,
        }
    }

    /// How many delays were handed out since the start (or the last reset).
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    pub(crate) fn attempts(&self) -> u32 {
        self.attempt
    }

    /// The largest delay the next call to [`Backoff::next_delay`] may return.
    pub(crate) fn ceiling(&self) -> Duration {
        let factor = 2u32.saturating_pow(self.attempt.min(31));
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The next delay: uniform in `[0, ceiling]`.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let micros = u64::try_from(ceiling.as_micros()).unwrap_or(u64::MAX);
        Duration::from_micros(rand::random_range(0..=micros))
    }

    /// Starts over after a success.
    #[cfg_attr(not(feature = "client"), allow(dead_code))]
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_stay_within_the_ceiling() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(100));
        let ceilings: Vec<u64> = (0..8)
            .map(|_| {
                let c = b.ceiling();
                let d = b.next_delay();
                assert!(d <= c, "{d:?} > {c:?}");
                c.as_millis() as u64
            })
            .collect();
        assert_eq!(ceilings, [10, 20, 40, 80, 100, 100, 100, 100]);
        assert_eq!(b.attempts(), 8);
        // Full jitter: not every delay is the ceiling.
        let spread: std::collections::HashSet<_> = (0..50)
            .map(|_| Backoff::new(Duration::from_millis(10), Duration::from_secs(1)).next_delay())
            .collect();
        assert!(spread.len() > 10, "delays are jittered");
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(10));
        // A cap below the base is the base.
        assert_eq!(
            Backoff::new(Duration::from_secs(1), Duration::ZERO).ceiling(),
            Duration::from_secs(1)
        );
    }
}
