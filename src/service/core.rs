//! The state one server's calls share ([`Core`]), one store attempt that
//! cannot leave an orphan lease behind, the give-back every cleanup path
//! ends in, and the release that hands a lock straight to a waiter here.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::ServiceLimits;
use super::queues::WaitQueues;
use super::quota;
use crate::auth::Access;
use crate::lock::{AcquireOutcome, AcquireSpec, Grant, LockError, LockKey, Token};
use crate::store::{LockStore, Releasing};

tokio::task_local! {
    /// Set around an Acquire call: whether its first store attempt granted
    /// the lock (`None` until it was made), so that the call's outcome
    /// (immediate, or after a wait) is counted without the wait loop
    /// having to report it.
    pub(super) static FIRST_ATTEMPT: std::cell::Cell<Option<bool>>;
}

/// State shared by all calls of one server.
pub(super) struct Core<S> {
    pub(super) store: Arc<S>,
    pub(super) limits: ServiceLimits,
    pub(super) waiters: Arc<WaitQueues>,
    /// Cancelled when the server begins a graceful shutdown: streams end
    /// with UNAVAILABLE without releasing, waits end with UNAVAILABLE.
    pub(super) shutdown: CancellationToken,
    /// Open KeepAlive streams per client connection.
    pub(super) streams: Mutex<HashMap<SocketAddr, usize>>,
    /// Each caller's share of waiters, streams and attached locks.
    pub(super) quotas: Arc<quota::Quotas>,
    /// Watch streams this server may still open (`--max-watches`).
    pub(super) watches: Arc<tokio::sync::Semaphore>,
    /// One feed per watched key, shared by its Watch streams.
    pub(super) feeds: super::watch::Feeds,
}

impl<S: LockStore> Core<S> {
    /// One store attempt that cannot leave an orphan lease behind.
    ///
    /// The store call runs as an owned future. If this call is dropped
    /// while it is in flight (the client cancelled), the future is finished
    /// in the background and a grant it produced is given back: only after
    /// the grant, so the give-back can never overtake it. If the store
    /// fails ambiguously (UNAVAILABLE after the script may have run), or
    /// its reply comes after the store timeout, the token is given back
    /// too. Every path ends in [`Core::give_back`], which never releases a
    /// lease that a `request_id` replay handed out.
    pub(super) async fn attempt(
        &self,
        spec: &Arc<AcquireSpec>,
    ) -> Result<AcquireOutcome, LockError> {
        let (store, owned) = (self.store.clone(), spec.clone());
        let late = self.give_back_late(spec);
        let pending = Pending {
            fut: Some(Box::pin(async move { store.acquire(&owned, late).await })),
            store: self.store.clone(),
            spec: spec.clone(),
        };
        let result = pending.await;
        let _ = FIRST_ATTEMPT.try_with(|first| {
            if first.get().is_none() {
                first.set(Some(matches!(result, Ok(AcquireOutcome::Acquired(_)))));
            }
        });
        if matches!(result, Err(LockError::Unavailable(_))) {
            give_back(self.store.clone(), spec.key.clone(), spec.token.clone());
        }
        result
    }

    /// What the store calls when it learns of a grant to `spec` only after
    /// the call failed: give it back (its caller was told it failed).
    /// It holds the shared spec, not copies of its key and token: every
    /// Acquire builds this, and almost none ever runs it.
    pub(super) fn give_back_late(
        &self,
        spec: &Arc<AcquireSpec>,
    ) -> impl FnOnce(Grant) + Send + 'static {
        let (store, spec) = (self.store.clone(), spec.clone());
        move |grant: Grant| {
            if grant.token == spec.token {
                give_back(store, spec.key.clone(), spec.token.clone());
            }
        }
    }

    /// Gives a lock back. If a call on this server waits for the same key,
    /// the store hands the lock straight to it in the same step (one store
    /// call instead of a release, a notification and an acquire), and the
    /// waiter is woken with its grant in hand.
    pub(super) async fn release(
        &self,
        key: &LockKey,
        token: &Token,
        kind: Releasing<'_>,
    ) -> Result<bool, LockError> {
        let Some(offer) = self.waiters.offer(key.as_str()) else {
            return self.store.release(key, token, kind).await;
        };
        let late = offer.late();
        match self
            .store
            .release_and_grant(key, token, kind, offer.spec(), late)
            .await
        {
            Ok((true, Some(grant))) => {
                offer.deliver(grant);
                Ok(true)
            }
            Ok((true, None)) => {
                offer.retry();
                Ok(true)
            }
            Ok((false, _)) => {
                offer.cancel();
                Ok(false)
            }
            Err(e) => {
                // Maybe handed over, maybe not: the waiter tries itself,
                // with the same token, so it gets the grant if there was
                // one; if it leaves first, its token is given back.
                offer.ambiguous();
                Err(e)
            }
        }
    }
}

type AttemptFuture = Pin<Box<dyn Future<Output = Result<AcquireOutcome, LockError>> + Send>>;

/// An in-flight store Acquire that finishes in the background if dropped.
struct Pending<S: LockStore> {
    fut: Option<AttemptFuture>,
    store: Arc<S>,
    spec: Arc<AcquireSpec>,
}

impl<S: LockStore> Future for Pending<S> {
    type Output = Result<AcquireOutcome, LockError>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let Some(fut) = self.fut.as_mut() else {
            return std::task::Poll::Ready(Err(LockError::Internal(
                "attempt polled after completion".into(),
            )));
        };
        let result = std::task::ready!(fut.as_mut().poll(cx));
        self.fut = None;
        std::task::Poll::Ready(result)
    }
}

impl<S: LockStore> Drop for Pending<S> {
    fn drop(&mut self) {
        let Some(fut) = self.fut.take() else { return };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (store, spec) = (self.store.clone(), self.spec.clone());
        rt.spawn(
            async move {
                // Bounded: past this the lease's own TTL is the cleanup.
                let outcome = tokio::time::timeout(ABANDONED_ATTEMPT_LIMIT, fut).await;
                let granted = matches!(
                    &outcome,
                    Ok(Ok(AcquireOutcome::Acquired(grant))) if grant.token == spec.token
                );
                let ambiguous = matches!(&outcome, Ok(Err(LockError::Unavailable(_))));
                if granted || ambiguous {
                    give_back(store, spec.key.clone(), spec.token.clone());
                }
            }
            .instrument(tracing::debug_span!("abandoned-acquire")),
        );
    }
}

/// How long an Acquire whose caller went away may still finish in the
/// background (to release what it granted).
const ABANDONED_ATTEMPT_LIMIT: Duration = Duration::from_secs(60);

/// Gives back, in the background, a grant its client may never have seen:
/// the one undo of every path (dropped call, store timeout, late reply,
/// undelivered reply, handoff to a waiter that left). The store releases
/// only if `token` still holds the lock and no `request_id` replay handed
/// it out (documentation/semantics.md, "Every grant ends exactly once").
pub(crate) fn give_back<S: LockStore>(store: Arc<S>, key: LockKey, token: Token) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    rt.spawn(
        async move {
            match store.release(&key, &token, Releasing::GiveBack).await {
                Ok(true) => tracing::debug!(key = key.as_str(), "gave back a grant its client never received"),
                Ok(false) => {}
                // The store is down: the Acquire this undoes most likely never
                // reached it either (the outage is reported by health), and if
                // it did, its TTL frees it.
                Err(e @ LockError::Unavailable(_)) => tracing::debug!(key = key.as_str(), error = %e, "could not give back a grant that may have been made; if it was, it expires with its TTL"),
                Err(e) => tracing::warn!(key = key.as_str(), error = %e, "could not give back a grant that may have been made; if it was, it expires with its TTL"),
            }
        }
        .instrument(tracing::debug_span!("give-back")),
    );
}

/// Binds a `request_id` to its caller: the store sees a digest of the
/// tenant, the owner and the id, so a replay returns a lease only to the
/// same tenant and owner that asked for it; anyone else presenting the same
/// id makes an ordinary Acquire (the id is no bearer credential). The
/// digest also keeps the client's id text out of Redis.
pub(super) fn bind_request_id(access: &Access, mut spec: AcquireSpec) -> AcquireSpec {
    if let Some(id) = spec.request_id.take() {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [access.tenant().unwrap_or(""), &spec.owner, &id] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part.as_bytes());
        }
        spec.request_id = Some(hex::encode(&ctx.finish().as_ref()[..16]));
    }
    spec
}
