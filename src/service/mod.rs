//! The gRPC face of Leasehold: thin handlers that validate and convert a
//! request (`convert`), call the store, and map the error. The two RPCs with
//! behaviour of their own have their own modules: waiting Acquire
//! (`waiting`) and KeepAlive streams (`keepalive`).

mod admin;
mod contention;
pub mod convert;
mod core;
mod deadline;
pub mod delivery;
mod keepalive;
pub mod queues;
pub mod quota;
pub mod recent_lists;
mod waiting;
mod watch;
pub mod wire;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use self::core::{Core, bind_request_id, give_back};
use crate::auth::Access;
use crate::lock::{AcquireOutcome, Limits, LockError};
use crate::pb;
use crate::store::{LockStore, Releasing};
use queues::WaitQueues;

pub use admin::AdminServiceImpl;

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
    /// How long a client connection may stay silent before the server may
    /// declare it dead and release what its KeepAlive streams hold (HTTP/2
    /// PING interval + timeout). Sent to clients in every KeepAlive
    /// stream's response headers as [`SILENCE_RELEASE_HEADER`].
    pub silence_release: Option<Duration>,
    /// Watch streams open at once on this server; one more is
    /// RESOURCE_EXHAUSTED. Each costs a task and a few buffered events
    /// (its key's feed is shared with the key's other watchers).
    pub max_watches: usize,
}

/// Response header of a KeepAlive stream: milliseconds of silence from the
/// client (nothing received on its connection) after which this server may
/// end the stream and release its locks. A client must stop believing it
/// holds a lock this long after *sending* the last renewal that was
/// answered alive, unless it renewed the lock through another stream
/// since.
pub const SILENCE_RELEASE_HEADER: &str = "leasehold-silence-release-ms";

/// `--max-streams-per-connection`'s default.
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: usize = 100;
/// `--max-locks-per-stream`'s default.
pub const DEFAULT_MAX_LOCKS_PER_STREAM: usize = 10_000;
/// `--max-watches`'s default.
pub const DEFAULT_MAX_WATCHES: usize = 10_000;

impl Default for ServiceLimits {
    fn default() -> Self {
        Self {
            fields: Limits::default(),
            max_streams_per_connection: DEFAULT_MAX_STREAMS_PER_CONNECTION,
            max_locks_per_stream: DEFAULT_MAX_LOCKS_PER_STREAM,
            per_caller: quota::QuotaLimits::default(),
            silence_release: None,
            max_watches: DEFAULT_MAX_WATCHES,
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
                watches: Arc::new(tokio::sync::Semaphore::new(limits.max_watches)),
                feeds: watch::Feeds::default(),
                limits,
                waiters,
                shutdown,
                streams: Mutex::new(HashMap::new()),
            }),
        }
    }
}

impl<S> LockServiceImpl<S> {
    /// A valid key the caller may use.
    fn scoped_key(&self, access: &Access, key: String) -> Result<crate::lock::LockKey, LockError> {
        let key = self.core.limits.fields.key(key)?;
        access.authorize(&key)?;
        Ok(key)
    }
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
        let caller = quota::Caller::of(&access, peer);
        self.core
            .quotas
            .admit_acquire(&caller)
            .map_err(|e| rejected("Acquire", start, e))?;
        let key = call.spec.key.clone();
        let spec = Arc::new(bind_request_id(&access, call.spec));
        let contention = contention::Outcome::start(call.wait_ms > 0);
        let (result, first) = core::FIRST_ATTEMPT
            .scope(std::cell::Cell::new(None), async {
                let result = if call.wait_ms == 0 {
                    self.core.attempt(&spec).await
                } else {
                    let wait = Duration::from_millis(call.wait_ms.into());
                    self.core
                        .acquire_waiting(&spec, wait, deadline, &access, &caller)
                        .await
                };
                (result, core::FIRST_ATTEMPT.with(|f| f.get()))
            })
            .await;
        contention.finish(&result, first == Some(true));
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
        Ok(Response::new(convert::release_response(result?)))
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
        Ok(Response::new(convert::renew_response(result?)))
    }

    type KeepAliveStream = KeepAliveStream;

    type WatchStream = watch::WatchStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let start = std::time::Instant::now();
        let peer = request.remote_addr();
        let deadline = deadline::of(request.metadata());
        let access = Access::of(request.extensions()).map_err(|e| rejected("Watch", start, e))?;
        let key = self
            .scoped_key(&access, request.into_inner().key)
            .map_err(|e| rejected("Watch", start, e))?;
        // A Watch stream holds a task and a subscription: it counts against
        // the caller's streams, like a KeepAlive stream.
        let share = self
            .core
            .quotas
            .take(&quota::Caller::of(&access, peer), quota::Kind::Streams, 1)
            .map_err(|e| rejected("Watch", start, e))?;
        let result = watch::start(self.core.clone(), key.clone(), access, share).await;
        log_result("Watch", key.as_str(), start, &result, |_| "watching");
        Ok(Response::new(watch::until(result?, deadline)))
    }

    async fn keep_alive(
        &self,
        request: Request<Streaming<pb::KeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        let stream = keepalive::start(self.core.clone(), request)?;
        let mut response = Response::new(stream);
        if let Some(silence) = self.core.limits.silence_release {
            let ms = silence.as_millis().to_string();
            if let Ok(value) = ms.parse() {
                response
                    .metadata_mut()
                    .insert(SILENCE_RELEASE_HEADER, value);
            }
        }
        Ok(response)
    }

    async fn describe(
        &self,
        request: Request<pb::DescribeRequest>,
    ) -> Result<Response<pb::DescribeResponse>, Status> {
        let start = std::time::Instant::now();
        let access =
            Access::of(request.extensions()).map_err(|e| rejected("Describe", start, e))?;
        let key = self
            .scoped_key(&access, request.into_inner().key)
            .map_err(|e| rejected("Describe", start, e))?;
        let result = self.core.store.describe(&key).await;
        log_result("Describe", key.as_str(), start, &result, |i| {
            if i.is_some() { "held" } else { "free" }
        });
        Ok(Response::new(convert::describe_response(result?)))
    }
}
