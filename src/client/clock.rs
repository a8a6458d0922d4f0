//! The clock lease deadlines are kept on: CLOCK_BOOTTIME, which goes on
//! counting while the host is suspended. `Instant` (CLOCK_MONOTONIC on
//! Linux) stops during a suspend, so a deadline kept on it would pass late
//! after a resume, while the server's TTL (Redis `PEXPIRE`) ran on.

use std::time::Duration;

/// A point on the boot clock (time since boot, suspend included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct BootInstant(Duration);

/// The longest a timer sleeps on tokio's (monotonic) clock before looking
/// at the boot clock again: after a resume, a passed deadline is seen
/// within this long.
pub(crate) const RECHECK: Duration = Duration::from_millis(250);

impl BootInstant {
    /// Now.
    pub(crate) fn now() -> Self {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        let id = rustix::time::ClockId::Boottime;
        // Elsewhere the monotonic clock is the best there is.
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        let id = rustix::time::ClockId::Monotonic;
        let t = rustix::time::clock_gettime(id);
        let secs = u64::try_from(t.tv_sec).unwrap_or(0);
        let nanos = u32::try_from(t.tv_nsec).unwrap_or(0);
        Self(Duration::new(secs, nanos))
    }

    /// How long from `earlier` to `self`; zero if `earlier` is later.
    pub(crate) fn saturating_duration_since(self, earlier: Self) -> Duration {
        self.0.saturating_sub(earlier.0)
    }

    /// How long from now until `self`; zero once it passed.
    pub(crate) fn remaining(self) -> Duration {
        self.saturating_duration_since(Self::now())
    }

    /// How long since `self`.
    /// `self` minus `d`, no earlier than boot.
    pub(crate) fn saturating_sub(self, d: Duration) -> Self {
        Self(self.0.saturating_sub(d))
    }

    /// A tokio instant for a timer that ends at `self` or after [`RECHECK`],
    /// whichever is first.
    pub(crate) fn wake_at(self) -> tokio::time::Instant {
        tokio::time::Instant::now() + self.remaining().min(RECHECK)
    }
}

impl std::ops::Add<Duration> for BootInstant {
    type Output = Self;

    fn add(self, d: Duration) -> Self {
        Self(self.0.saturating_add(d))
    }
}

/// Sleeps until `deadline` passes on the boot clock.
pub(crate) async fn sleep_until(deadline: BootInstant) {
    // Bounded: each turn sleeps at most RECHECK and the deadline is fixed.
    while BootInstant::now() < deadline {
        tokio::time::sleep_until(deadline.wake_at()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_clock_moves_forward_with_the_monotonic_one() {
        let a = BootInstant::now();
        let start = std::time::Instant::now();
        std::thread::sleep(Duration::from_millis(20));
        let b = BootInstant::now();
        let elapsed = b.saturating_duration_since(a);
        assert!(elapsed >= Duration::from_millis(20), "{elapsed:?}");
        assert!(elapsed <= start.elapsed() + Duration::from_millis(5));
        assert_eq!(a.saturating_duration_since(b), Duration::ZERO);
        assert!((a + Duration::from_secs(1)) > b);
    }
}
