//! A [`LockStore`] wrapper that times every store call and counts its
//! failures for the metrics (`crate::metrics`), whatever the store.

use crate::store::Forced;
use std::future::Future;
use std::time::Instant;

use super::{LateGrant, ListPage, LockStore, Releasing};
use crate::lock::{
    AcquireOutcome, AcquireSpec, Attachment, Grant, LockError, LockInfo, LockKey, Token,
};

/// Times and counts the calls of the store it wraps.
#[derive(Debug)]
pub struct Instrumented<S>(pub S);

async fn timed<T>(
    store: &'static str,
    op: &'static str,
    fut: impl Future<Output = Result<T, LockError>>,
) -> Result<T, LockError> {
    let start = Instant::now();
    let result = fut.await;
    let error = result.as_ref().err().map(LockError::kind);
    crate::metrics::store_call(store, op, start.elapsed(), error);
    result
}

impl<S: LockStore> LockStore for Instrumented<S> {
    async fn acquire(
        &self,
        spec: &AcquireSpec,
        late: impl LateGrant,
    ) -> Result<AcquireOutcome, LockError> {
        timed(self.0.name(), "acquire", self.0.acquire(spec, late)).await
    }

    async fn release(
        &self,
        key: &LockKey,
        token: &Token,
        kind: Releasing<'_>,
    ) -> Result<bool, LockError> {
        let op = match kind {
            Releasing::GiveBack => "give_back",
            _ => "release",
        };
        timed(self.0.name(), op, self.0.release(key, token, kind)).await
    }

    async fn release_and_grant(
        &self,
        key: &LockKey,
        token: &Token,
        kind: Releasing<'_>,
        next: &AcquireSpec,
        late: impl LateGrant,
    ) -> Result<(bool, Option<Grant>), LockError> {
        timed(
            self.0.name(),
            "handoff",
            self.0.release_and_grant(key, token, kind, next, late),
        )
        .await
    }

    async fn renew(
        &self,
        key: &LockKey,
        token: &Token,
        ttl_ms: Option<u32>,
        attachment: Option<&Attachment>,
    ) -> Result<Option<u32>, LockError> {
        timed(
            self.0.name(),
            "renew",
            self.0.renew(key, token, ttl_ms, attachment),
        )
        .await
    }

    async fn describe(&self, key: &LockKey) -> Result<Option<LockInfo>, LockError> {
        timed(self.0.name(), "describe", self.0.describe(key)).await
    }

    async fn watch(&self, key: &LockKey) -> Result<(), LockError> {
        timed(self.0.name(), "watch", self.0.watch(key)).await
    }

    async fn changes(
        &self,
        key: &LockKey,
    ) -> Result<tokio::sync::broadcast::Receiver<super::changes::Change>, LockError> {
        self.0.changes(key).await
    }

    async fn list(
        &self,
        prefix: &str,
        size: usize,
        page: Option<&str>,
    ) -> Result<ListPage, LockError> {
        timed(self.0.name(), "list", self.0.list(prefix, size, page)).await
    }

    async fn force_release(&self, key: &LockKey) -> Result<Option<Forced>, LockError> {
        timed(self.0.name(), "force_release", self.0.force_release(key)).await
    }

    async fn ping(&self) -> Result<(), LockError> {
        timed(self.0.name(), "ping", self.0.ping()).await
    }

    fn name(&self) -> &'static str {
        self.0.name()
    }
}
