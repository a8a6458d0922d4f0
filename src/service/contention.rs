//! How Acquire calls fare against each other, for the contention metrics
//! (documentation/metrics.md): each call's outcome, and how long a
//! waiting call waited. No key in any label: the numbers say that clients
//! wait and for how long; `leasehold list` says on which locks.

use std::time::Instant;

use crate::lock::{AcquireOutcome, LockError};

/// One Acquire call being counted; dropped before [`Outcome::finish`]
/// (the client went away while it waited), it counts as cancelled.
pub(super) struct Outcome {
    start: Instant,
    waiting: bool,
    done: bool,
}

impl Outcome {
    /// An Acquire that arrived now; `waiting`: it asked to wait.
    pub(super) fn start(waiting: bool) -> Self {
        Self {
            start: Instant::now(),
            waiting,
            done: false,
        }
    }

    /// Counts how the call ended. `first_attempt_granted`: its first
    /// store attempt took the lock (nothing was waited for).
    pub(super) fn finish(
        mut self,
        result: &Result<AcquireOutcome, LockError>,
        first_attempt_granted: bool,
    ) {
        self.done = true;
        let outcome = match result {
            Ok(AcquireOutcome::Acquired(_)) if first_attempt_granted => "immediate",
            Ok(AcquireOutcome::Acquired(_)) => "after_wait",
            Ok(AcquireOutcome::Held { .. }) if self.waiting => "timed_out",
            Ok(AcquireOutcome::Held { .. }) => "held",
            Err(LockError::DeadlineExceeded(_)) => "timed_out",
            // Refused or failed: not a matter of contention.
            Err(_) => return,
        };
        crate::metrics::acquire_outcome(outcome, self.waiting, self.start.elapsed());
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        if !self.done && self.waiting {
            crate::metrics::acquire_outcome("cancelled", true, self.start.elapsed());
        }
    }
}
