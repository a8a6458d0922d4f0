//! Per-key queues of Acquire calls waiting on this server, and the wake-up
//! rule that keeps them from stampeding the store.
//!
//! A store tells the queues when a lock is given back, through the
//! [`crate::store::ReleaseListener`] they implement (the memory store
//! directly, the Redis store from its sharded subscription); the service
//! owns them and is their only other user.
//! One release wakes one waiter, the oldest that is not already trying, so
//! a release on a key with fifty waiters costs one store call, not fifty,
//! and waiters on one server are served roughly first come, first served.
//! This module knows nothing about stores or gRPC.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::Notify;

use crate::lock::{AcquireSpec, Grant, LockError};

/// All waiters of one server, by lock key.
#[derive(Debug)]
pub struct WaitQueues {
    inner: Mutex<Inner>,
    max_waiters: usize,
}

#[derive(Debug, Default)]
struct Inner {
    keys: HashMap<String, VecDeque<Entry>, foldhash::fast::RandomState>,
    total: usize,
    next_id: u64,
}

#[derive(Debug)]
struct Entry {
    id: u64,
    notify: Arc<Notify>,
    /// Woken by a release and not yet done trying: the next release goes to
    /// someone else.
    woken: bool,
    /// Set when the waiter accepts the lock straight from a release.
    seat: Option<Arc<Seat>>,
    /// A SHARED Acquire: when it gets the lock, the next waiter may fit
    /// beside it, so it passes a wake-up on (see [`Waiter::acquired`]).
    shared: bool,
}

/// What gives back the seat's grant (its token) when nobody will collect
/// it. It may run more than once (a give-back is idempotent): once when
/// the waiter leaves with a handoff in doubt, and again when that handoff's
/// late reply says it did grant, since the first may have reached Redis
/// before the grant did (a NOSCRIPT reload reorders them).
type GiveBack = Box<dyn Fn() + Send + Sync>;

/// A waiter's standing offer to take the lock straight from a release on
/// this server (a handoff): the releasing call grants the lock to this
/// waiter's request in the same store call, instead of freeing it and
/// waking the waiter to take it in a second one.
pub struct Seat {
    /// The waiter's request; a handoff grants exactly this (same token), so
    /// the waiter's own attempts and a handoff can never disagree.
    spec: Arc<AcquireSpec>,
    /// No handoff after this: past it the waiter is giving up.
    grant_until: Instant,
    /// Gives back a grant that arrives after the waiter left, or that may
    /// have been made (an ambiguous handoff) and was never collected.
    on_orphan: GiveBack,
    /// Whether the waiter may still be handed the lock (its credential
    /// not revoked meanwhile).
    allowed: Box<dyn Fn() -> bool + Send + Sync>,
    state: Mutex<SeatState>,
}

impl std::fmt::Debug for Seat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seat")
            .field("key", &self.spec.key)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct SeatState {
    phase: Phase,
    grant: Option<Grant>,
    /// A handoff to this seat failed ambiguously: it may have granted.
    maybe_granted: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Phase {
    #[default]
    Waiting,
    Acquired,
    Left,
}

impl Seat {
    /// A seat for `spec`, open until `grant_until`; `on_orphan` gives back
    /// `spec.token`'s grant when it lands after the waiter has gone (or may
    /// have landed, and the waiter leaves without it).
    pub fn new(
        spec: Arc<AcquireSpec>,
        grant_until: Instant,
        on_orphan: impl Fn() + Send + Sync + 'static,
        allowed: impl Fn() -> bool + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Self {
            spec,
            grant_until,
            on_orphan: Box::new(on_orphan),
            allowed: Box::new(allowed),
            state: Mutex::new(SeatState::default()),
        })
    }

    fn state(&self) -> MutexGuard<'_, SeatState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn orphan(&self) {
        (self.on_orphan)();
    }

    /// A grant reached this seat: hand it to the waiter, or give it back if
    /// the waiter has already left.
    fn land(&self, grant: Grant, notify: &Notify) {
        let mut state = self.state();
        match state.phase {
            Phase::Waiting => {
                state.grant = Some(grant);
                drop(state);
                notify.notify_one();
            }
            // It took the same grant itself (same token): nothing to do.
            Phase::Acquired => {}
            Phase::Left => {
                drop(state);
                self.orphan();
            }
        }
    }
}

/// The oldest open seat of a key, chosen by a release for a handoff. It
/// was marked woken, so no other release picks it meanwhile.
#[derive(Debug)]
pub struct Offer {
    queues: Arc<WaitQueues>,
    key: String,
    id: u64,
    notify: Arc<Notify>,
    seat: Arc<Seat>,
}

impl Offer {
    /// The request to grant.
    pub fn spec(&self) -> &AcquireSpec {
        &self.seat.spec
    }

    /// The store granted the lock to the seat: hand it over, or give it
    /// back if the waiter has already left.
    pub fn deliver(self, grant: Grant) {
        self.seat.land(grant, &self.notify);
    }

    /// For the store: a handoff grant learned only after the release call
    /// failed (a reply after the store timeout) lands like a delivery.
    pub fn late(&self) -> impl FnOnce(Grant) + Send + 'static {
        let (seat, notify) = (self.seat.clone(), self.notify.clone());
        move |grant| seat.land(grant, &notify)
    }

    /// The lock came free but was not handed over: the waiter tries itself.
    pub fn retry(self) {
        self.notify.notify_one();
    }

    /// The handoff failed ambiguously: it may have granted the lock to the
    /// seat. The waiter tries itself with the same token (and so gets that
    /// grant, if there was one); if it leaves without the lock, or has
    /// left already, the seat's token is given back.
    pub fn ambiguous(self) {
        let mut state = self.seat.state();
        state.maybe_granted = true;
        if state.phase == Phase::Left {
            drop(state);
            self.seat.orphan();
        } else {
            drop(state);
            self.notify.notify_one();
        }
    }

    /// Nothing changed (the release did not happen): the waiter stays as it
    /// was, and the next release may pick it again.
    pub fn cancel(self) {
        self.queues.rearm(&self.key, self.id);
    }
}

impl WaitQueues {
    /// Queues for at most `max_waiters` concurrent waiters on this server.
    pub fn new(max_waiters: usize) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner::default()),
            max_waiters,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves the queues consistent
        // (every mutation is a single push/remove), so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks waiter `id` on `key` as waiting again, if it still waits: the
    /// next release may wake it.
    fn rearm(&self, key: &str, id: u64) {
        let mut inner = self.lock();
        if let Some(entry) = inner
            .keys
            .get_mut(key)
            .and_then(|q| q.iter_mut().find(|e| e.id == id))
        {
            entry.woken = false;
        }
    }

    /// Joins the queue for `key`, or fails with RESOURCE_EXHAUSTED when the
    /// server already has its maximum of waiters.
    pub fn register(self: &Arc<Self>, key: &str) -> Result<Waiter, LockError> {
        self.join(key, None)
    }

    /// Joins the queue with a seat, so that a release on this server can
    /// hand the lock over directly ([`WaitQueues::offer`]).
    pub fn register_seat(
        self: &Arc<Self>,
        key: &str,
        seat: Arc<Seat>,
    ) -> Result<Waiter, LockError> {
        self.join(key, Some(seat))
    }

    fn join(self: &Arc<Self>, key: &str, seat: Option<Arc<Seat>>) -> Result<Waiter, LockError> {
        let mut inner = self.lock();
        if inner.total >= self.max_waiters {
            return Err(LockError::ResourceExhausted(format!(
                "this server already has {} waiting Acquire calls (--max-waiters)",
                self.max_waiters
            )));
        }
        inner.total += 1;
        crate::metrics::waiters(1.0);
        inner.next_id += 1;
        let id = inner.next_id;
        let notify = Arc::new(Notify::new());
        let shared = seat
            .as_ref()
            .is_some_and(|s| s.spec.mode != crate::lock::Mode::Exclusive);
        inner
            .keys
            .entry(key.to_owned())
            .or_default()
            .push_back(Entry {
                id,
                notify: notify.clone(),
                woken: false,
                seat: seat.clone(),
                shared,
            });
        Ok(Waiter {
            queues: self.clone(),
            key: key.to_owned(),
            id,
            notify,
            seat,
        })
    }

    /// The oldest waiter of `key` that can take the lock from a release
    /// right now (open seat, not already trying, not past its cutoff).
    /// None when that waiter is SHARED: a release hands over only to an
    /// exclusive waiter; shared ones are woken and take the lock themselves
    /// (the release may free room for several, or for none while other
    /// shared holders remain).
    pub fn offer(self: &Arc<Self>, key: &str) -> Option<Offer> {
        let mut inner = self.lock();
        let now = Instant::now();
        let entry = inner.keys.get_mut(key)?.iter_mut().find(|e| {
            !e.woken
                && e.seat.as_ref().is_some_and(|s| {
                    s.grant_until > now && s.state().phase == Phase::Waiting && (s.allowed)()
                })
        })?;
        if entry.shared {
            return None;
        }
        entry.woken = true;
        Some(Offer {
            queues: self.clone(),
            key: key.to_owned(),
            id: entry.id,
            notify: entry.notify.clone(),
            seat: entry.seat.clone()?,
        })
    }

    /// A lock on `key` was released (or expired): wake the oldest waiter
    /// that is not already trying. If all are trying, leave a wake-up with
    /// the oldest, so that a release landing during its attempt is not lost.
    pub fn released(&self, key: &str) {
        let mut inner = self.lock();
        if let Some(queue) = inner.keys.get_mut(key) {
            wake_one(queue);
        }
    }

    /// Whether anyone on this server waits for `key`.
    pub fn has_waiters(&self, key: &str) -> bool {
        self.lock().keys.contains_key(key)
    }

    /// How many Acquire calls wait on this server now.
    pub fn len(&self) -> usize {
        self.lock().total
    }

    /// True when nobody waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn wake_one(queue: &mut VecDeque<Entry>) {
    match queue.iter_mut().find(|e| !e.woken) {
        Some(entry) => {
            entry.woken = true;
            entry.notify.notify_one();
        }
        None => {
            if let Some(first) = queue.front() {
                first.notify.notify_one();
            }
        }
    }
}

impl crate::store::ReleaseListener for WaitQueues {
    fn released(&self, key: &str) {
        WaitQueues::released(self, key);
    }
    fn has_waiters(&self, key: &str) -> bool {
        WaitQueues::has_waiters(self, key)
    }
}

/// One waiting Acquire's place in its key's queue. Dropping it (the call
/// ended, or the client cancelled) leaves the queue; if it had been woken
/// and had not acted on it, the wake-up passes to the next waiter.
#[derive(Debug)]
pub struct Waiter {
    queues: Arc<WaitQueues>,
    key: String,
    id: u64,
    notify: Arc<Notify>,
    seat: Option<Arc<Seat>>,
}

impl Waiter {
    /// Resolves when a release of this key reaches this waiter.
    pub async fn woken(&self) {
        self.notify.notified().await;
    }

    /// Done trying after a wake-up and going back to wait: the next release
    /// may wake this waiter again.
    pub fn rearm(&self) {
        self.queues.rearm(&self.key, self.id);
    }

    /// This waiter's place in its queue, 0 for the oldest.
    pub fn position(&self) -> usize {
        let inner = self.queues.lock();
        inner
            .keys
            .get(&self.key)
            .and_then(|q| q.iter().position(|e| e.id == self.id))
            .unwrap_or(0)
    }

    /// A grant handed over by a release, if one arrived.
    pub fn take_grant(&self) -> Option<Grant> {
        self.seat.as_ref()?.state().grant.take()
    }

    /// The wait ended with the lock taken: leave without passing a
    /// wake-up on, unless this was a SHARED Acquire and the next waiter is
    /// one too: it may fit beside this one (readers after a writer, a
    /// semaphore with permits left), and tries at once. It passes the
    /// wake-up on in turn when it gets the lock, so a release wakes as
    /// many shared waiters as can now be granted, one store call each,
    /// and no more.
    pub fn acquired(self) {
        if let Some(seat) = &self.seat {
            seat.state().phase = Phase::Acquired;
        }
        self.rearm();
        let mut inner = self.queues.lock();
        let Some(queue) = inner.keys.get_mut(&self.key) else {
            return;
        };
        let mut after = queue.iter_mut().skip_while(|e| e.id != self.id);
        let me = after.next().is_some_and(|e| e.shared);
        if let Some(next) = after.find(|e| !e.woken).filter(|e| me && e.shared) {
            next.woken = true;
            next.notify.notify_one();
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if let Some(seat) = &self.seat {
            let mut state = seat.state();
            if state.phase == Phase::Waiting {
                state.phase = Phase::Left;
                let uncollected = state.grant.take().is_some() || state.maybe_granted;
                drop(state);
                if uncollected {
                    seat.orphan();
                }
            }
        }
        let mut inner = self.queues.lock();
        inner.total = inner.total.saturating_sub(1);
        crate::metrics::waiters(-1.0);
        let Some(queue) = inner.keys.get_mut(&self.key) else {
            return;
        };
        let mut pass_on = false;
        if let Some(i) = queue.iter().position(|e| e.id == self.id) {
            pass_on = queue.remove(i).is_some_and(|e| e.woken);
        }
        if queue.is_empty() {
            inner.keys.remove(&self.key);
        } else if pass_on {
            wake_one(queue);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn is_woken(w: &Waiter) -> bool {
        tokio::time::timeout(Duration::from_millis(20), w.woken())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn one_release_wakes_one_waiter_in_order() {
        let q = WaitQueues::new(10);
        let a = q.register("k").unwrap();
        let b = q.register("k").unwrap();
        q.released("k");
        assert!(is_woken(&a).await);
        assert!(!is_woken(&b).await);
        // a gives up without taking the lock: b inherits the wake-up.
        drop(a);
        assert!(is_woken(&b).await);
        b.acquired();
        assert!(q.is_empty());
        assert!(!q.has_waiters("k"));
    }

    #[tokio::test]
    async fn release_during_attempt_is_not_lost() {
        let q = WaitQueues::new(10);
        let a = q.register("k").unwrap();
        q.released("k");
        assert!(is_woken(&a).await);
        // a is trying; another release lands before it re-arms.
        q.released("k");
        a.rearm();
        assert!(is_woken(&a).await);
    }

    fn seat(counter: &Arc<std::sync::atomic::AtomicUsize>) -> Arc<Seat> {
        let spec = AcquireSpec {
            key: crate::lock::LockKey::parse("k", 512).unwrap(),
            token: crate::lock::Token::generate(),
            ttl_ms: 1000,
            owner: String::new(),
            metadata: Default::default(),
            request_id: None,
            mode: crate::lock::Mode::Exclusive,
            waiting: true,
        };
        let counter = counter.clone();
        Seat::new(
            Arc::new(spec),
            Instant::now() + Duration::from_secs(60),
            move || {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            },
            || true,
        )
    }

    fn grant(spec: &AcquireSpec) -> Grant {
        Grant::fresh(spec.token.clone(), 7, 1000, Instant::now())
    }

    #[tokio::test]
    async fn handoff_reaches_the_oldest_waiter() {
        let orphans = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let q = WaitQueues::new(10);
        let a = q.register_seat("k", seat(&orphans)).unwrap();
        let b = q.register_seat("k", seat(&orphans)).unwrap();
        let offer = q.offer("k").expect("a seat is open");
        let g = grant(offer.spec());
        // The next release must not pick the same waiter.
        let second = q.offer("k").expect("b's seat");
        second.cancel();
        offer.deliver(g.clone());
        assert!(is_woken(&a).await);
        assert_eq!(a.take_grant(), Some(g));
        a.acquired();
        assert!(!is_woken(&b).await);
        drop(b);
        assert_eq!(orphans.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_grant_for_a_waiter_that_left_is_given_back() {
        let orphans = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let q = WaitQueues::new(10);
        // Delivered after the waiter left.
        let a = q.register_seat("k", seat(&orphans)).unwrap();
        let offer = q.offer("k").unwrap();
        let g = grant(offer.spec());
        drop(a);
        offer.deliver(g);
        assert_eq!(orphans.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Delivered, then the waiter left without taking it.
        let b = q.register_seat("k", seat(&orphans)).unwrap();
        let offer = q.offer("k").unwrap();
        let g = grant(offer.spec());
        offer.deliver(g);
        drop(b);
        assert_eq!(orphans.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert!(q.offer("k").is_none());
    }

    #[test]
    fn limit_is_enforced() {
        let q = WaitQueues::new(1);
        let _a = q.register("k").unwrap();
        let err = q.register("j").unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    }
}
