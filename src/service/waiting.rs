//! Acquire with `wait_ms > 0`: the call waits in the server, woken by
//! (1) a release notification for the key (one waiter per release, see
//! `queues`), (2) the holder's TTL deadline, for locks that expire
//! instead of being released, or (3) a capped exponential backoff with full
//! jitter, the fallback for a lost notification. It ends at `wait_ms` with
//! `acquired = false`, or at the caller's gRPC deadline with
//! DEADLINE_EXCEEDED, whichever comes first.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backoff::Backoff;

use super::Core;
use super::queues::Seat;
use super::quota::{Caller, Kind};
use crate::auth::Access;
use crate::lock::{AcquireOutcome, AcquireSpec, LockError, Mode};
use crate::store::LockStore;

/// First fallback retry, before jitter.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Longest fallback retry interval, before jitter.
const BACKOFF_CAP: Duration = Duration::from_secs(2);
/// Only the first few waiters of a key on this server also wake at the
/// holder's TTL deadline; the rest would only stampede the store at expiry.
const TTL_WATCHERS: usize = 2;
/// A waiting Acquire stops trying this long before the caller's deadline
/// (a tenth of the time left, within these bounds), so that a grant has
/// time to reach the caller even on a loaded machine.
const DEADLINE_MARGIN_MIN: Duration = Duration::from_millis(20);
const DEADLINE_MARGIN_MAX: Duration = Duration::from_millis(100);
/// However long an attempt in flight takes, the call answers this long
/// before the caller's deadline.
const HARD_DEADLINE_MARGIN: Duration = Duration::from_millis(2);

/// Withdraws a waiting EXCLUSIVE Acquire's mark when it leaves without the
/// lock, whichever way it leaves (a drop guard: the call may be cancelled
/// at any `.await`).
struct Withdraw<S: LockStore> {
    store: Arc<S>,
    spec: Arc<AcquireSpec>,
    armed: bool,
}

impl<S: LockStore> Drop for Withdraw<S> {
    fn drop(&mut self) {
        if self.armed {
            let (key, token) = (self.spec.key.clone(), self.spec.token.clone());
            super::give_back(self.store.clone(), key, token);
        }
    }
}

impl<S: LockStore> Core<S> {
    pub(super) async fn acquire_waiting(
        &self,
        spec: &Arc<AcquireSpec>,
        wait: Duration,
        deadline: Option<Instant>,
        access: &Access,
        caller: &Caller,
    ) -> Result<AcquireOutcome, LockError> {
        // An EXCLUSIVE waiter that leaves without the lock (answered not
        // acquired, failed, or cancelled) withdraws the mark its attempts
        // left on the key, so that readers it held back need not wait for
        // the mark to lapse. The give-back that withdraws it also gives back
        // a grant to its token that may land after it left, as every such
        // path does.
        let mut withdraw = Withdraw {
            store: self.store.clone(),
            spec: spec.clone(),
            armed: spec.mode == Mode::Exclusive,
        };
        let result = self.wait_within(spec, wait, deadline, access, caller).await;
        if matches!(result, Ok(AcquireOutcome::Acquired(_))) {
            withdraw.armed = false;
        }
        result
    }

    async fn wait_within(
        &self,
        spec: &Arc<AcquireSpec>,
        wait: Duration,
        deadline: Option<Instant>,
        access: &Access,
        caller: &Caller,
    ) -> Result<AcquireOutcome, LockError> {
        let waiting = self.wait_for(spec, wait, deadline, access, caller);
        let Some(deadline) = deadline else {
            return waiting.await;
        };
        // Whatever is in flight, answer DEADLINE_EXCEEDED ourselves just
        // before the caller's deadline (tonic would otherwise cut the call
        // off with CANCELLED). An attempt cut off here finishes in the
        // background and its grant, if any, is released (`Core::attempt`).
        let hard_end = deadline
            .checked_sub(HARD_DEADLINE_MARGIN)
            .unwrap_or(deadline);
        match tokio::time::timeout_at(hard_end.into(), waiting).await {
            Ok(result) => result,
            Err(_) => Err(LockError::DeadlineExceeded(
                "the lock was still held at the call's deadline".into(),
            )),
        }
    }

    async fn wait_for(
        &self,
        spec: &Arc<AcquireSpec>,
        wait: Duration,
        deadline: Option<Instant>,
        access: &Access,
        caller: &Caller,
    ) -> Result<AcquireOutcome, LockError> {
        let now = Instant::now();
        let wait_end = now + wait;
        // Stop granting a little before the caller's deadline, so that a
        // grant still has time to reach a caller who is about to give up:
        // a reply that arrives after the deadline is thrown away by the
        // client, and the server could not tell.
        let (end, by_deadline) = match deadline {
            Some(d) => {
                let margin = (d.saturating_duration_since(now) / 10)
                    .clamp(DEADLINE_MARGIN_MIN, DEADLINE_MARGIN_MAX);
                let d = d.checked_sub(margin).unwrap_or(now);
                if d < wait_end {
                    (d, true)
                } else {
                    (wait_end, false)
                }
            }
            None => (wait_end, false),
        };
        let past_deadline =
            || LockError::DeadlineExceeded("the lock was still held at the call's deadline".into());
        // Join the queue and subscribe *before* the first check, so a
        // release between the check and the wait cannot be missed.
        // The seat lets a release on this server hand the lock over in its
        // own store call; a grant that lands after we left is given back.
        let seat = {
            let (store, key, token) = (self.store.clone(), spec.key.clone(), spec.token.clone());
            // A caller whose credential was revoked meanwhile is handed
            // nothing.
            let (still, key_now) = (access.clone(), spec.key.clone());
            Seat::new(
                spec.clone(),
                end,
                move || super::give_back(store.clone(), key.clone(), token.clone()),
                move || still.authorize(&key_now).is_ok(),
            )
        };
        // The caller's share of waiters, then the server's: when either is
        // used up, the call still tries once (a free lock is granted), and
        // only a held lock is refused with RESOURCE_EXHAUSTED.
        let queued = self
            .quotas
            .take(caller, Kind::Waiters, 1)
            .and_then(|share| Ok((share, self.waiters.register_seat(spec.key.as_str(), seat)?)));
        let (_share, waiter) = match queued {
            Ok(queued) => queued,
            Err(full) => {
                return match self.attempt(spec).await? {
                    AcquireOutcome::Acquired(grant) => Ok(AcquireOutcome::Acquired(grant)),
                    AcquireOutcome::Held { .. } => Err(full),
                };
            }
        };
        if let Err(e) = self.store.watch(&spec.key).await {
            // Not fatal: without release notifications (the subscriber is
            // reconnecting, say, while one cluster primary fails over) the
            // waiter still wakes at the holder's TTL and on its retries.
            tracing::debug!(
                rpc = "Acquire",
                key = spec.key.as_str(),
                error = %e,
                "release notifications unavailable; waiting on retries"
            );
        }
        let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_CAP);
        // Others already wait here for this key, so it is held: queue
        // behind them instead of trying first. It saves a store call per
        // handoff and keeps newcomers from overtaking the queue. (Only when
        // there is time to wait; a waiter always tries before giving up.)
        let mut skip_attempt =
            waiter.position() > 0 && end.saturating_duration_since(Instant::now()) > BACKOFF_BASE;
        loop {
            if let Some(grant) = waiter.take_grant() {
                waiter.acquired();
                return Ok(AcquireOutcome::Acquired(grant));
            }
            if by_deadline && Instant::now() >= end {
                // Dropping the waiter gives back a grant that lands now.
                return Err(past_deadline());
            }
            // Re-checked before every try: a credential revoked while the
            // call waits (an auth file reloaded on SIGHUP) ends the wait.
            access.authorize(&spec.key)?;
            let retry_after_ms = if std::mem::take(&mut skip_attempt) {
                None
            } else {
                match self.attempt(spec).await? {
                    AcquireOutcome::Acquired(grant) => {
                        waiter.acquired();
                        return Ok(AcquireOutcome::Acquired(grant));
                    }
                    AcquireOutcome::Held { retry_after_ms } => Some(retry_after_ms),
                }
            };
            waiter.rearm();
            if backoff.attempts() == 0 {
                tracing::debug!(
                    rpc = "Acquire",
                    key = spec.key.as_str(),
                    "waiting for the holder"
                );
            }
            let now = Instant::now();
            if let Some(retry_after_ms) = retry_after_ms.filter(|_| now >= end) {
                // A grant handed over meanwhile is this call's to deliver,
                // even at the deadline: the reply still has the margin to
                // reach the caller, and if it does not, its delivery guard
                // gives the grant back. (Dropping it here would leave the
                // lock held by nobody until its TTL.)
                if let Some(grant) = waiter.take_grant() {
                    waiter.acquired();
                    return Ok(AcquireOutcome::Acquired(grant));
                }
                return if by_deadline {
                    Err(past_deadline())
                } else {
                    Ok(AcquireOutcome::Held { retry_after_ms })
                };
            }
            let mut wake_at = now + backoff.next_delay();
            if let Some(retry_after_ms) =
                retry_after_ms.filter(|_| waiter.position() < TTL_WATCHERS)
            {
                let expiry = now + Duration::from_millis(u64::from(retry_after_ms) + 1);
                wake_at = wake_at.min(expiry);
            }
            tokio::select! {
                _ = waiter.woken() => {}
                _ = tokio::time::sleep_until(wake_at.min(end).into()) => {}
                _ = self.shutdown.cancelled() => return Err(LockError::ShuttingDown),
            }
        }
    }
}
