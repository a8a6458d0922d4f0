//! How the SDK retries: a [`RetryPolicy`] and the backoff it makes
//! ([`crate::backoff`]).

use std::time::Duration;

pub(crate) use crate::backoff::Backoff;

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

impl RetryPolicy {
    /// The delays of one run of failures under this policy.
    pub(crate) fn backoff(&self) -> Backoff {
        Backoff::new(self.base, self.cap)
    }
}
