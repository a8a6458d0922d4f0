//! The keys this client's live guards hold, so that a lock that could not
//! be taken can say when its holder is this same client (locks are not
//! re-entrant) instead of blaming another client.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;

use super::keeper::LockState;

/// The live guards of one key, by id: several when guards share a lease
/// through one request id.
type Guards = Vec<(u64, watch::Receiver<LockState>)>;

/// Live guards by key.
#[derive(Default)]
pub(crate) struct HeldKeys {
    next: AtomicU64,
    keys: Mutex<HashMap<String, Guards>>,
}

impl HeldKeys {
    /// Registers a guard of `key`; the id is for [`HeldKeys::remove`].
    pub(crate) fn insert(&self, key: &str, state: watch::Receiver<LockState>) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.entry(key.to_string()).or_default().push((id, state));
        id
    }

    /// Forgets a guard (released or dropped); removing twice is harmless.
    pub(crate) fn remove(&self, key: &str, id: u64) {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(guards) = keys.get_mut(key) {
            guards.retain(|(g, _)| *g != id);
            if guards.is_empty() {
                keys.remove(key);
            }
        }
    }

    /// Whether a live guard of this client holds `key` and does not know
    /// it lost it.
    pub(crate) fn holds(&self, key: &str) -> bool {
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.get(key).is_some_and(|guards| {
            guards
                .iter()
                .any(|(_, state)| !super::guard::known_lost(&state.borrow()))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::client::LostReason;
    use crate::client::clock::BootInstant;

    #[test]
    fn a_key_is_held_while_a_guard_that_has_not_lost_it_lives() {
        let held = HeldKeys::default();
        let alive = LockState::Held {
            deadline: BootInstant::now() + Duration::from_secs(60),
            ttl: Duration::from_secs(60),
        };
        let (a, a_rx) = watch::channel(alive.clone());
        let (_b, b_rx) = watch::channel(alive);
        let first = held.insert("k", a_rx);
        let second = held.insert("k", b_rx);
        assert!(held.holds("k") && !held.holds("other"));
        held.remove("k", second);
        held.remove("k", second);
        assert!(held.holds("k"), "the first guard still holds it");
        a.send_replace(LockState::Lost(LostReason::NotHeld));
        assert!(!held.holds("k"), "a guard that knows it lost the lock");
        held.remove("k", first);
        assert!(!held.holds("k"));
    }
}
