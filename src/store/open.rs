//! One way to build a store from configuration, so that the wiring (which
//! store, which listener its releases reach) exists once: `leasehold serve`
//! and the tests both go through [`open`].

use crate::store::Forced;
use std::sync::Arc;

use super::{
    LateGrant, ListPage, LockStore, MemoryStore, RedisConfig, RedisStore, ReleaseListener,
    Releasing,
};
use crate::lock::{
    AcquireOutcome, AcquireSpec, Attachment, Grant, LockError, LockInfo, LockKey, Token,
};

/// Either store, chosen at start-up.
// One per process, behind an Arc: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Store {
    /// The embedded in-memory store (no `--redis-url`).
    Memory(MemoryStore),
    /// Redis: single node, Sentinel or Cluster.
    Redis(RedisStore),
}

/// The Redis store for `redis`, or the memory store without it; releases
/// reach `listener` (the service's wait queues). Must be called inside a
/// tokio runtime.
pub async fn open(
    redis: Option<&RedisConfig>,
    listener: Arc<dyn ReleaseListener>,
) -> Result<Store, String> {
    Ok(match redis {
        None => Store::Memory(MemoryStore::new(listener)),
        Some(config) => Store::Redis(RedisStore::connect(config, listener).await?),
    })
}

impl Store {
    /// Closes the store's connections, waiting until they are closed (at
    /// most the store timeout). Nothing to do for the memory store.
    pub async fn close(&self) {
        if let Store::Redis(s) = self {
            s.close().await;
        }
    }
}

/// Calls `$call` on whichever store `$self` is.
macro_rules! either {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            Store::Memory($s) => $call,
            Store::Redis($s) => $call,
        }
    };
}

impl LockStore for Store {
    async fn acquire(
        &self,
        spec: &AcquireSpec,
        late: impl LateGrant,
    ) -> Result<AcquireOutcome, LockError> {
        either!(self, s => s.acquire(spec, late).await)
    }

    async fn release(
        &self,
        key: &LockKey,
        token: &Token,
        kind: Releasing<'_>,
    ) -> Result<bool, LockError> {
        either!(self, s => s.release(key, token, kind).await)
    }

    async fn release_and_grant(
        &self,
        key: &LockKey,
        token: &Token,
        kind: Releasing<'_>,
        next: &AcquireSpec,
        late: impl LateGrant,
    ) -> Result<(bool, Option<Grant>), LockError> {
        either!(self, s => s.release_and_grant(key, token, kind, next, late).await)
    }

    async fn renew(
        &self,
        key: &LockKey,
        token: &Token,
        ttl_ms: Option<u32>,
        attachment: Option<&Attachment>,
    ) -> Result<Option<u32>, LockError> {
        either!(self, s => s.renew(key, token, ttl_ms, attachment).await)
    }

    async fn describe(&self, key: &LockKey) -> Result<Option<LockInfo>, LockError> {
        either!(self, s => s.describe(key).await)
    }

    async fn watch(&self, key: &LockKey) -> Result<(), LockError> {
        either!(self, s => s.watch(key).await)
    }

    async fn changes(
        &self,
        key: &LockKey,
    ) -> Result<tokio::sync::broadcast::Receiver<super::changes::Change>, LockError> {
        either!(self, s => s.changes(key).await)
    }

    async fn list(
        &self,
        prefix: &str,
        size: usize,
        page: Option<&str>,
    ) -> Result<ListPage, LockError> {
        either!(self, s => s.list(prefix, size, page).await)
    }

    async fn force_release(&self, key: &LockKey) -> Result<Option<Forced>, LockError> {
        either!(self, s => s.force_release(key).await)
    }

    async fn ping(&self) -> Result<(), LockError> {
        either!(self, s => s.ping().await)
    }

    fn name(&self) -> &'static str {
        either!(self, s => s.name())
    }
}
