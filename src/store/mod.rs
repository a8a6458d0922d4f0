//! The storage seam. [`LockStore`] is what the gRPC layer calls; the Redis
//! store (`redis`) is the product, the in-memory store (`memory`) is the
//! embedded default for one process. Both honour documentation/semantics.md and pass the same
//! conformance suite (`tests/conformance.rs`). Stores speak domain types
//! only: no protobuf type crosses this line.

pub mod changes;
mod instrumented;
pub mod memory;
mod open;
pub mod redis;

use std::future::Future;
use std::sync::Arc;

use crate::lock::{
    AcquireOutcome, AcquireSpec, Attachment, Grant, LockError, LockInfo, LockKey, Token,
};

/// Which release a [`LockStore::release`] is. Every kind releases only a
/// lock that `token` holds; they differ in what else must be true.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Releasing<'a> {
    /// The holder gives the lock back (Release, KeepAlive `release`).
    Holder,
    /// A KeepAlive stream ended: only if it is still the lock's latest
    /// attachment (a lock re-attached elsewhere survives).
    StreamEnd(&'a Attachment),
    /// A grant whose reply may not have reached its caller goes back: never
    /// a lease that a `request_id` replay handed out, since that replay (or
    /// the original) may have been delivered.
    GiveBack,
}

/// What a store tells the layer above about releases, so that waiting
/// Acquires on this server wake (the store does not know who waits: the
/// service owns its wait queues and hands the store this).
pub trait ReleaseListener: Send + Sync + std::fmt::Debug + 'static {
    /// `key` came free (released, expired, or a release notification from
    /// another server arrived).
    fn released(&self, key: &str);
    /// Whether anyone on this server waits for `key` (so that the store
    /// subscribes to, and keeps, only channels someone needs).
    fn has_waiters(&self, key: &str) -> bool;
}

/// Told of a grant the store learned of only after its call had already
/// failed (a reply after the store timeout): the caller decides whether
/// it is given back. Called at most once, and only for a grant.
pub trait LateGrant: FnOnce(Grant) + Send + 'static {}
impl<F: FnOnce(Grant) + Send + 'static> LateGrant for F {}

/// What a [`LockStore::force_release`] took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forced {
    /// The fencing token of the latest grant taken.
    pub fence: u64,
    /// How many holders were removed (more than one for a SHARED lock).
    pub holders: u32,
}

/// One page of [`LockStore::list`]: held locks and where the next page
/// starts (`None`: this was the last page).
#[derive(Debug, Default, Clone)]
pub struct ListPage {
    /// Held locks, each with its state (never its token).
    pub locks: Vec<(LockKey, LockInfo)>,
    /// Opaque to the caller; handed back to get the next page.
    pub next: Option<String>,
}

pub use instrumented::Instrumented;
pub use memory::MemoryStore;
pub use open::{Store, open};
pub use redis::{Names as RedisNames, RedisConfig, RedisStore, RedisTls, redact_url};

/// One atomic operation per method; each either completes within the store
/// timeout or fails with [`LockError::Unavailable`].
pub trait LockStore: Send + Sync + 'static {
    /// One attempt to take a lock (no waiting: see `service::waiting`).
    /// Idempotent for `spec.token`; a different token with the lease's
    /// `request_id` is a replay of that lease. `late` hears of a grant whose
    /// reply came after this call had failed.
    fn acquire(
        &self,
        spec: &AcquireSpec,
        late: impl LateGrant,
    ) -> impl Future<Output = Result<AcquireOutcome, LockError>> + Send;

    /// Gives the lock back if `token` holds it (and `kind` allows), and
    /// notifies waiters. `Ok(true)` also when this token's release had
    /// already happened (a retried Release whose reply was lost), as long
    /// as the store still remembers it; `Ok(false)`: the token does not
    /// hold it.
    fn release(
        &self,
        key: &LockKey,
        token: &Token,
        kind: Releasing<'_>,
    ) -> impl Future<Output = Result<bool, LockError>> + Send;

    /// Releases the lock if `token` holds it and, in the same atomic step,
    /// grants it to `next` (a waiter on this server): the handoff that
    /// saves the waiter a second store call. `(released, granted)`;
    /// `granted` is `None` when the store did not hand over (the default:
    /// it only releases, and the waiter takes the lock itself). No release
    /// notification is published for a handoff: the lock never came free.
    /// `late` hears of a handoff whose reply came after this call failed.
    fn release_and_grant(
        &self,
        key: &LockKey,
        token: &Token,
        kind: Releasing<'_>,
        next: &AcquireSpec,
        late: impl LateGrant,
    ) -> impl Future<Output = Result<(bool, Option<Grant>), LockError>> + Send {
        let _ = (next, late);
        async move { Ok((self.release(key, token, kind).await?, None)) }
    }

    /// Extends the lease if `token` holds it: `Some(ttl in force)`, or `None`
    /// when the lock is lost. `ttl_ms = None` keeps the TTL granted. With
    /// `attachment` (a KeepAlive renewal), that stream becomes the lock's
    /// latest attachment.
    fn renew(
        &self,
        key: &LockKey,
        token: &Token,
        ttl_ms: Option<u32>,
        attachment: Option<&Attachment>,
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

    /// Grants and releases of `key` from now on, made through any server
    /// on this store (for Redis, once the release channel's subscription
    /// is confirmed). Expiry is not reported: see [`changes`].
    fn changes(
        &self,
        key: &LockKey,
    ) -> impl Future<Output = Result<tokio::sync::broadcast::Receiver<changes::Change>, LockError>> + Send;

    /// Held locks whose keys start with `prefix`, about `size` at a time
    /// (a page may hold fewer, even none, and still have a next one; on
    /// Redis, a SCAN batch is never split, so it may hold a few more).
    /// `page` is the `next` of the previous page; a malformed one is
    /// INVALID_ARGUMENT. Every key held for the whole listing is returned
    /// at least once; keys taken or released meanwhile may or may not be.
    fn list(
        &self,
        prefix: &str,
        size: usize,
        page: Option<&str>,
    ) -> impl Future<Output = Result<ListPage, LockError>> + Send;

    /// Takes `key` from its holders whatever their tokens (an operator's
    /// ForceRelease): their next renewal finds the lock lost, the next
    /// grant is fenced above them, and waiters wake as after a release.
    /// `None` if nobody held the key.
    fn force_release(
        &self,
        key: &LockKey,
    ) -> impl Future<Output = Result<Option<Forced>, LockError>> + Send;

    /// A cheap round trip, for health checks.
    fn ping(&self) -> impl Future<Output = Result<(), LockError>> + Send;

    /// A short name for logs: "memory", "redis".
    fn name(&self) -> &'static str;
}

impl<S: LockStore> LockStore for Arc<S> {
    fn acquire(
        &self,
        spec: &AcquireSpec,
        late: impl LateGrant,
    ) -> impl Future<Output = Result<AcquireOutcome, LockError>> + Send {
        (**self).acquire(spec, late)
    }
    fn release(
        &self,
        key: &LockKey,
        token: &Token,
        kind: Releasing<'_>,
    ) -> impl Future<Output = Result<bool, LockError>> + Send {
        (**self).release(key, token, kind)
    }
    fn release_and_grant(
        &self,
        key: &LockKey,
        token: &Token,
        kind: Releasing<'_>,
        next: &AcquireSpec,
        late: impl LateGrant,
    ) -> impl Future<Output = Result<(bool, Option<Grant>), LockError>> + Send {
        (**self).release_and_grant(key, token, kind, next, late)
    }
    fn renew(
        &self,
        key: &LockKey,
        token: &Token,
        ttl_ms: Option<u32>,
        attachment: Option<&Attachment>,
    ) -> impl Future<Output = Result<Option<u32>, LockError>> + Send {
        (**self).renew(key, token, ttl_ms, attachment)
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
    fn changes(
        &self,
        key: &LockKey,
    ) -> impl Future<Output = Result<tokio::sync::broadcast::Receiver<changes::Change>, LockError>> + Send
    {
        (**self).changes(key)
    }
    fn list(
        &self,
        prefix: &str,
        size: usize,
        page: Option<&str>,
    ) -> impl Future<Output = Result<ListPage, LockError>> + Send {
        (**self).list(prefix, size, page)
    }
    fn force_release(
        &self,
        key: &LockKey,
    ) -> impl Future<Output = Result<Option<Forced>, LockError>> + Send {
        (**self).force_release(key)
    }
    fn ping(&self) -> impl Future<Output = Result<(), LockError>> + Send {
        (**self).ping()
    }
    fn name(&self) -> &'static str {
        (**self).name()
    }
}

/// Microseconds since the Unix epoch now, by the wall clock (the hold-time
/// metric compares it with fencing tokens, which Redis makes from its
/// clock).
pub fn unix_micros() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Microseconds since the Unix epoch that never go backwards within this
/// process: the wall clock read once at start, advanced by the monotonic
/// clock. The fencing floor of the memory store (documentation/semantics.md,
/// "Fencing tokens").
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
