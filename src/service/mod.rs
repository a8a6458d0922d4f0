//! The gRPC face of Leasehold: thin handlers that validate and convert a
//! request (`convert`), call the store, and map the error. The two RPCs with
//! behaviour of their own have their own modules: waiting Acquire
//! (`waiting`) and KeepAlive streams (`keepalive`).

pub mod convert;
mod deadline;
pub mod delivery;
mod keepalive;
pub mod quota;
mod waiting;
pub mod wire;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::auth::Access;
use crate::lock::{AcquireOutcome, AcquireSpec, Grant, Limits, LockError, LockKey, Token};
use crate::pb;
use crate::store::{LockStore, Releasing};
use crate::wait::WaitQueues;

/// What the service enforces besides per-field limits.
#[derive(Debug, Clone)]
pub struct ServiceLimits {
    /// Per-field bounds.
    pub fields: Limits,
    /// Concurrent KeepAlive streams on one client connection.
    pub max_streams_per_connection: usize,
    /// Locks attached to one KeepAlive stream.
    pub max_locks_per_stream: usize,
    /// What one tenant (or, without authentication, one connection) may
    /// hold at once: waiting Acquires, streams, attached locks.
    pub per_caller: quota::QuotaLimits,
}

impl Default for ServiceLimits {
    fn default() -> Self {
        Self {
            fields: Limits::default(),
            max_streams_per_connection: 100,
            max_locks_per_stream: 10_000,
            per_caller: quota::QuotaLimits::default(),
        }
    }
}

/// The `leasehold.v1.LockService` implementation over any store.
pub struct LockServiceImpl<S> {
    core: Arc<Core<S>>,
}

impl<S> Clone for LockServiceImpl<S> {
    fn clone(&self) -> Self {
        Self {
            core: self.core.clone(),
        }
    }
}

/// State shared by all calls of one server.
struct Core<S> {
    store: Arc<S>,
    limits: ServiceLimits,
    waiters: Arc<WaitQueues>,
    /// Cancelled when the server begins a graceful shutdown: streams end
    /// with UNAVAILABLE without releasing, waits end with UNAVAILABLE.
    shutdown: CancellationToken,
    /// Open KeepAlive streams per client connection.
    streams: Mutex<HashMap<SocketAddr, usize>>,
    /// Each caller's share of waiters, streams and attached locks.
    quotas: Arc<quota::Quotas>,
}

impl<S: LockStore> LockServiceImpl<S> {
    /// A service over `store`, whose releases wake `waiters`.
    pub fn new(
        store: Arc<S>,
        waiters: Arc<WaitQueues>,
        limits: ServiceLimits,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            core: Arc::new(Core {
                store,
                quotas: quota::Quotas::new(limits.per_caller),
                limits,
                waiters,
                shutdown,
                streams: Mutex::new(HashMap::new()),
            }),
        }
    }
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
    async fn attempt(&self, spec: &Arc<AcquireSpec>) -> Result<AcquireOutcome, LockError> {
        let (store, owned) = (self.store.clone(), spec.clone());
        let late = self.give_back_late(spec);
        let pending = Pending {
            fut: Some(Box::pin(async move { store.acquire(&owned, late).await })),
            store: self.store.clone(),
            spec: spec.clone(),
        };
        let result = pending.await;
        if matches!(result, Err(LockError::Unavailable(_))) {
            give_back(self.store.clone(), spec.key.clone(), spec.token.clone());
        }
        result
    }

    /// What the store calls when it learns of a grant to `spec` only after
    /// the call failed: give it back (its caller was told it failed).
    fn give_back_late(&self, spec: &AcquireSpec) -> impl FnOnce(Grant) + Send + 'static {
        let (store, key, token) = (self.store.clone(), spec.key.clone(), spec.token.clone());
        move |grant: Grant| {
            if grant.token == token {
                give_back(store, key, token);
            }
        }
    }

    /// Gives a lock back. If a call on this server waits for the same key,
    /// the store hands the lock straight to it in the same step (one store
    /// call instead of a release, a notification and an acquire), and the
    /// waiter is woken with its grant in hand.
    async fn release(
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
                Err(e) => tracing::warn!(key = key.as_str(), error = %e, "could not give back an undelivered grant; it expires with its TTL"),
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
fn bind_request_id(access: &Access, mut spec: AcquireSpec) -> AcquireSpec {
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

/// Counts and logs a request refused before it reached the store. The key
/// is not logged: it may be the malformed part.
fn rejected(rpc: &'static str, start: std::time::Instant, e: LockError) -> Status {
    crate::metrics::rpc(rpc, e.kind(), start.elapsed());
    tracing::debug!(rpc, outcome = e.kind(), error = %e, "rejected");
    e.into()
}

/// Logs the outcome of a call at debug, and store failures at warn.
fn log_result<T>(
    rpc: &'static str,
    key: &str,
    start: std::time::Instant,
    result: &Result<T, LockError>,
    outcome: impl FnOnce(&T) -> &'static str,
) {
    let latency = start.elapsed();
    let latency_us = latency.as_micros() as u64;
    let label = match result {
        Ok(v) => outcome(v),
        Err(e) => e.kind(),
    };
    crate::metrics::rpc(rpc, label, latency);
    match result {
        Ok(_) => tracing::debug!(rpc, key, outcome = label, latency_us),
        Err(e @ (LockError::Unavailable(_) | LockError::Internal(_))) => {
            tracing::warn!(rpc, key, error = %e, latency_us, "store error")
        }
        Err(e) => tracing::debug!(rpc, key, outcome = e.kind(), latency_us),
    }
}

type KeepAliveStream = Pin<Box<dyn Stream<Item = Result<pb::KeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl<S: LockStore> pb::lock_service_server::LockService for LockServiceImpl<S> {
    async fn acquire(
        &self,
        request: Request<pb::AcquireRequest>,
    ) -> Result<Response<pb::AcquireResponse>, Status> {
        let start = std::time::Instant::now();
        let deadline = deadline::of(request.metadata());
        let peer = request.remote_addr();
        let access = Access::of(request.extensions()).map_err(|e| rejected("Acquire", start, e))?;
        let call = convert::acquire_request(request.into_inner(), &self.core.limits.fields)
            .and_then(|call| access.authorize(&call.spec.key).map(|()| call))
            .map_err(|e| rejected("Acquire", start, e))?;
        let key = call.spec.key.clone();
        let spec = Arc::new(bind_request_id(&access, call.spec));
        let result = if call.wait_ms == 0 {
            self.core.attempt(&spec).await
        } else {
            let wait = Duration::from_millis(call.wait_ms.into());
            let caller = quota::Caller::of(&access, peer);
            self.core
                .acquire_waiting(&spec, wait, deadline, &access, &caller)
                .await
        };
        log_result("Acquire", key.as_str(), start, &result, |o| match o {
            AcquireOutcome::Acquired(_) => "acquired",
            AcquireOutcome::Held { .. } => "held",
        });
        let outcome = result?;
        // A reply that is not delivered gives its grant back; a replay's
        // reply never does (the original, or another replay, may have been
        // delivered: the lease is theirs too).
        let guard = match &outcome {
            AcquireOutcome::Acquired(grant) if grant.token == spec.token => {
                let (store, key, token) =
                    (self.core.store.clone(), key.clone(), grant.token.clone());
                Some(delivery::DeliveryGuard::new(move || {
                    give_back(store, key, token)
                }))
            }
            _ => None,
        };
        let mut response = Response::new(convert::acquire_response(&key, outcome, start));
        if let Some(guard) = guard {
            response.extensions_mut().insert(guard);
        }
        Ok(response)
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let start = std::time::Instant::now();
        let access = Access::of(request.extensions()).map_err(|e| rejected("Release", start, e))?;
        let req = request.into_inner();
        let (key, token) = convert::key_and_token(req.key, req.token, &self.core.limits.fields)
            .and_then(|(key, token)| access.authorize(&key).map(|()| (key, token)))
            .map_err(|e| rejected("Release", start, e))?;
        let result = self.core.release(&key, &token, Releasing::Holder).await;
        log_result("Release", key.as_str(), start, &result, |r| {
            if *r { "released" } else { "not_held" }
        });
        Ok(Response::new(pb::ReleaseResponse { released: result? }))
    }

    async fn renew(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        let start = std::time::Instant::now();
        let access = Access::of(request.extensions()).map_err(|e| rejected("Renew", start, e))?;
        let req = request.into_inner();
        let (key, token, ttl) =
            convert::key_and_token(req.key, req.token, &self.core.limits.fields)
                .and_then(|(k, t)| access.authorize(&k).map(|()| (k, t)))
                .and_then(|(k, t)| Ok((k, t, self.core.limits.fields.renew_ttl(req.ttl_ms)?)))
                .map_err(|e| rejected("Renew", start, e))?;
        let result = self.core.store.renew(&key, &token, ttl, None).await;
        log_result("Renew", key.as_str(), start, &result, |r| {
            if r.is_some() { "renewed" } else { "lost" }
        });
        let ttl = result?;
        Ok(Response::new(pb::RenewResponse {
            renewed: ttl.is_some(),
            ttl_ms: ttl.unwrap_or(0),
        }))
    }

    type KeepAliveStream = KeepAliveStream;

    async fn keep_alive(
        &self,
        request: Request<Streaming<pb::KeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        let stream = keepalive::start(self.core.clone(), request)?;
        Ok(Response::new(stream))
    }

    async fn describe(
        &self,
        request: Request<pb::DescribeRequest>,
    ) -> Result<Response<pb::DescribeResponse>, Status> {
        let start = std::time::Instant::now();
        let access =
            Access::of(request.extensions()).map_err(|e| rejected("Describe", start, e))?;
        let key = self
            .core
            .limits
            .fields
            .key(request.into_inner().key)
            .and_then(|key| access.authorize(&key).map(|()| key))
            .map_err(|e| rejected("Describe", start, e))?;
        let result = self.core.store.describe(&key).await;
        log_result("Describe", key.as_str(), start, &result, |i| {
            if i.is_some() { "held" } else { "free" }
        });
        Ok(Response::new(convert::describe_response(result?)))
    }
}
