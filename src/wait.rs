//! Per-key queues of Acquire calls waiting on this server, and the wake-up
//! rule that keeps them from stampeding the store.
//!
//! A store tells [`WaitQueues::released`] when a lock is given back (the
//! memory store directly, the Redis store from its sharded subscription).
//! One release wakes one waiter, the oldest that is not already trying, so
//! a release on a key with fifty waiters costs one store call, not fifty,
//! and waiters on one server are served roughly first come, first served.
//! This module knows nothing about stores or gRPC.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::lock::LockError;

/// All waiters of one server, by lock key.
#[derive(Debug)]
pub struct WaitQueues {
    inner: Mutex<Inner>,
    max_waiters: usize,
}

#[derive(Debug, Default)]
struct Inner {
    keys: HashMap<String, VecDeque<Entry>>,
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

    /// Joins the queue for `key`, or fails with RESOURCE_EXHAUSTED when the
    /// server already has its maximum of waiters.
    pub fn register(self: &Arc<Self>, key: &str) -> Result<Waiter, LockError> {
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
        inner
            .keys
            .entry(key.to_owned())
            .or_default()
            .push_back(Entry {
                id,
                notify: notify.clone(),
                woken: false,
            });
        Ok(Waiter {
            queues: self.clone(),
            key: key.to_owned(),
            id,
            notify,
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

/// One waiting Acquire's place in its key's queue. Dropping it (the call
/// ended, or the client cancelled) leaves the queue; if it had been woken
/// and had not acted on it, the wake-up passes to the next waiter.
#[derive(Debug)]
pub struct Waiter {
    queues: Arc<WaitQueues>,
    key: String,
    id: u64,
    notify: Arc<Notify>,
}

impl Waiter {
    /// Resolves when a release of this key reaches this waiter.
    pub async fn woken(&self) {
        self.notify.notified().await;
    }

    /// Done trying after a wake-up and going back to wait: the next release
    /// may wake this waiter again.
    pub fn rearm(&self) {
        let mut inner = self.queues.lock();
        if let Some(entry) = inner
            .keys
            .get_mut(&self.key)
            .and_then(|q| q.iter_mut().find(|e| e.id == self.id))
        {
            entry.woken = false;
        }
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

    /// The wait ended with the lock taken: leave without passing a wake-up on.
    pub fn acquired(self) {
        self.rearm();
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
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

    #[test]
    fn limit_is_enforced() {
        let q = WaitQueues::new(1);
        let _a = q.register("k").unwrap();
        let err = q.register("j").unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    }
}
