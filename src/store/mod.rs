//! The storage seam. [`LockStore`] is what the gRPC layer calls; the Redis
//! store (`redis`) is the product, the in-memory store (`memory`) is the
//! embedded default for one process. Both honour DESIGN §2 and pass the same
//! conformance suite (`tests/conformance.rs`). Stores speak domain types
//! only: no protobuf type crosses this line.

mod instrumented;
pub mod memory;
pub mod redis;

use std::future::Future;
use std::sync::Arc;

use crate::lock::{AcquireOutcome, AcquireSpec, Grant, LockError, LockInfo, LockKey, Token};

pub use instrumented::Instrumented;
pub use memory::MemoryStore;
pub use redis::{Names as RedisNames, RedisConfig, RedisStore, RedisTls, redact_url};

/// One atomic operation per method; each either completes within the store
/// timeout or fails with [`LockError::Unavailable`].
pub trait LockStore: Send + Sync + 'static {
    /// One attempt to take a lock (no waiting: see `service::wait`).
    fn acquire(
        &self,
        spec: &AcquireSpec,
    ) -> impl Future<Output = Result<AcquireOutcome, LockError>> + Send;

    /// Gives the lock back if `token` holds it, and notifies waiters.
    /// `Ok(false)`: the token does not hold it (anymore).
    fn release(
        &self,
        key: &LockKey,
        token: &Token,
    ) -> impl Future<Output = Result<bool, LockError>> + Send;

    /// Releases the lock if `token` holds it and, in the same atomic step,
    /// grants it to `next` (a waiter on this server): the handoff that
    /// saves the waiter a second store call. `(released, granted)`;
    /// `granted` is `None` when the store did not hand over (the default:
    /// it only releases, and the waiter takes the lock itself). No release
    /// notification is published for a handoff: the lock never came free.
    fn release_and_grant(
        &self,
        key: &LockKey,
        token: &Token,
        next: &AcquireSpec,
    ) -> impl Future<Output = Result<(bool, Option<Grant>), LockError>> + Send {
        let _ = next;
        async move { Ok((self.release(key, token).await?, None)) }
    }

    /// Extends the lease if `token` holds it: `Some(ttl in force)`, or `None`
    /// when the lock is lost. `ttl_ms = None` keeps the TTL granted.
    fn renew(
        &self,
        key: &LockKey,
        token: &Token,
        ttl_ms: Option<u32>,
    ) -> impl Future<Output = Result<Option<u32>, LockError>> + Send;

    /// Who holds `key` now, without the token.
    fn describe(
        &self,
        key: &LockKey,
    ) -> impl Future<Output = Result<Option<LockInfo>, LockError>> + Send;

    /// Makes sure that releases of `key` reach this server's wait queues;
    /// resolves once they will (for Redis: once the sharded subscription is
    /// confirmed), so a waiter that re-checks afterwards misses nothing.
    fn watch(&self, key: &LockKey) -> impl Future<Output = Result<(), LockError>> + Send;

    /// A cheap round trip, for health checks.
    fn ping(&self) -> impl Future<Output = Result<(), LockError>> + Send;

    /// A short name for logs: "memory", "redis".
    fn name(&self) -> &'static str;
}

impl<S: LockStore> LockStore for Arc<S> {
    fn acquire(
        &self,
        spec: &AcquireSpec,
    ) -> impl Future<Output = Result<AcquireOutcome, LockError>> + Send {
        (**self).acquire(spec)
    }
    fn release(
        &self,
        key: &LockKey,
        token: &Token,
    ) -> impl Future<Output = Result<bool, LockError>> + Send {
        (**self).release(key, token)
    }
    fn release_and_grant(
        &self,
        key: &LockKey,
        token: &Token,
        next: &AcquireSpec,
    ) -> impl Future<Output = Result<(bool, Option<Grant>), LockError>> + Send {
        (**self).release_and_grant(key, token, next)
    }
    fn renew(
        &self,
        key: &LockKey,
        token: &Token,
        ttl_ms: Option<u32>,
    ) -> impl Future<Output = Result<Option<u32>, LockError>> + Send {
        (**self).renew(key, token, ttl_ms)
    }
    fn describe(
        &self,
        key: &LockKey,
    ) -> impl Future<Output = Result<Option<LockInfo>, LockError>> + Send {
        (**self).describe(key)
    }
    fn watch(&self, key: &LockKey) -> impl Future<Output = Result<(), LockError>> + Send {
        (**self).watch(key)
    }
    fn ping(&self) -> impl Future<Output = Result<(), LockError>> + Send {
        (**self).ping()
    }
    fn name(&self) -> &'static str {
        (**self).name()
    }
}

/// Microseconds since the Unix epoch that never go backwards within this
/// process: the wall clock read once at start, advanced by the monotonic
/// clock. The fencing floor of the memory store (DESIGN §2).
pub(crate) fn monotonic_unix_micros() -> u64 {
    use std::sync::OnceLock;
    use std::time::{Instant, SystemTime, UNIX_EPOCH};
    static BASE: OnceLock<(Instant, u64)> = OnceLock::new();
    let (start, base_us) = BASE.get_or_init(|| {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        (Instant::now(), wall)
    });
    base_us + start.elapsed().as_micros() as u64
}
