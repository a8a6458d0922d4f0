//! What happened to a lock, for LockService.Watch: each store tells the
//! [`Changes`] hub it owns of grants and releases (the Redis store as its
//! release channel reports them, from any server), and each watched key's
//! feed (one per key per server, shared by its Watch streams) subscribes
//! to that key. Expiry is not told: nothing reports it on Redis, so the
//! feed checks the lock at each holder's deadline instead.
//!
//! The hub never blocks a store call: a key nobody watches costs one
//! atomic load, and a feed that falls behind loses the oldest changes
//! (its receiver reports how many) and reads the lock again instead.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::broadcast;

/// Changes kept per key for a watcher that has not read them yet; one
/// that falls further behind re-reads the lock instead.
const BACKLOG: usize = 16;

/// One change of one lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    /// What happened.
    pub kind: ChangeKind,
    /// The fencing token of the grant it happened to.
    pub fencing_token: u64,
}

/// What happened to a lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// Granted (Acquire, or handed over from a release).
    Acquired,
    /// Released by its holder, or at the end of its holder's stream.
    Released,
    /// Taken from its holder by an operator (ForceRelease).
    ForceReleased,
}

/// The watched keys of one store, and a channel per key.
#[derive(Debug, Default)]
pub struct Changes {
    senders: Mutex<HashMap<String, broadcast::Sender<Change>>>,
    /// Keys in `senders`: zero is the common case, checked without the lock.
    watched: AtomicUsize,
}

impl Changes {
    /// Changes of `key` from now on.
    pub fn subscribe(&self, key: &str) -> broadcast::Receiver<Change> {
        let mut senders = self.senders.lock().unwrap_or_else(|e| e.into_inner());
        // Forget keys whose watchers have all gone.
        senders.retain(|_, tx| tx.receiver_count() > 0);
        let rx = match senders.get(key) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = broadcast::channel(BACKLOG);
                senders.insert(key.to_owned(), tx);
                rx
            }
        };
        self.watched.store(senders.len(), Ordering::Relaxed);
        rx
    }

    /// Tells the watchers of `key`, if any.
    pub fn publish(&self, key: &str, change: Change) {
        if self.watched.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut senders = self.senders.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = senders.get(key)
            && tx.send(change).is_err()
        {
            senders.remove(key);
            self.watched.store(senders.len(), Ordering::Relaxed);
        }
    }

    /// Whether anyone watches `key` (so that its channel stays subscribed).
    pub fn is_watched(&self, key: &str) -> bool {
        self.watched.load(Ordering::Relaxed) > 0
            && self
                .senders
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(key)
                .is_some_and(|tx| tx.receiver_count() > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(fencing_token: u64) -> Change {
        Change {
            kind: ChangeKind::Acquired,
            fencing_token,
        }
    }

    #[test]
    fn watchers_hear_their_key_and_lag_instead_of_queueing() {
        let hub = Changes::default();
        hub.publish("k", change(1));
        let mut rx = hub.subscribe("k");
        assert!(hub.is_watched("k") && !hub.is_watched("other"));
        hub.publish("other", change(2));
        hub.publish("k", change(3));
        assert_eq!(rx.try_recv().unwrap(), change(3));
        assert!(rx.try_recv().is_err());
        for i in 0..(BACKLOG as u64 + 5) {
            hub.publish("k", change(i));
        }
        assert!(matches!(
            rx.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(5))
        ));
        drop(rx);
        hub.publish("k", change(9));
        assert!(!hub.is_watched("k"));
    }
}
