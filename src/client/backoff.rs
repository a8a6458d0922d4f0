//! Exponential backoff with full jitter (AWS Architecture Blog, "Exponential
//! Backoff And Jitter"): the n-th delay is uniform in `[0, min(cap, base·2ⁿ)]`,
//! so clients that failed together do not retry together.

use std::time::Duration;

/// Retry timing for calls that failed with `UNAVAILABLE` or a broken
/// connection. The client retries until `retry_for` has passed since the
/// first of a run of failures; it tries every endpoint once before sleeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The first delay's upper bound.
    pub base: Duration,
    /// No delay is longer than this.
    pub cap: Duration,
    /// How long a run of failures may last before the call gives up.
    pub retry_for: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(50),
            cap: Duration::from_secs(1),
            retry_for: Duration::from_secs(10),
        }
    }
}

/// The delays of one run of failures.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(policy: &RetryPolicy) -> Self {
        Self {
            base: policy.base,
            cap: policy.cap.max(policy.base),
            attempt: 0,
        }
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
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_stay_within_the_ceiling() {
        let policy = RetryPolicy {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(100),
            retry_for: Duration::from_secs(1),
        };
        let mut b = Backoff::new(&policy);
        let ceilings: Vec<u64> = (0..8)
            .map(|_| {
                let c = b.ceiling();
                let d = b.next_delay();
                assert!(d <= c, "{d:?} > {c:?}");
                c.as_millis() as u64
            })
            .collect();
        assert_eq!(ceilings, [10, 20, 40, 80, 100, 100, 100, 100]);
        // Full jitter: not every delay is the ceiling.
        let spread: std::collections::HashSet<_> = (0..50)
            .map(|_| {
                let mut b = Backoff::new(&policy);
                b.next_delay()
            })
            .collect();
        assert!(spread.len() > 10, "delays are jittered");
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(10));
    }
}
