//! KeepAlive: one bidirectional stream per client keeps all its locks alive.
//!
//! Each request renews (or releases) one lock and attaches it to the stream;
//! each gets exactly one response. Requests for different keys run
//! concurrently; requests for the same key run in arrival order. When the
//! client ends the stream (half-close, cancel, reset, or a connection that
//! HTTP/2 keepalive pings declared dead), every lock still attached is
//! released with the token it was attached with. When the *server* ends it
//! (graceful shutdown, or the store failing), nothing is released: the
//! locks live until their TTL so the client can re-attach elsewhere.
//!
//! With authentication on, every request's key is checked against the
//! caller's scope; a key outside it ends the stream with PERMISSION_DENIED
//! (UNAUTHENTICATED if the caller's credential was revoked meanwhile), and
//! nothing is released, as for any end the server decides. A message the
//! server cannot decode ends the stream with INVALID_ARGUMENT (or
//! RESOURCE_EXHAUSTED above the size limit) after releasing what is
//! attached, as if the client had ended it. A stream reads no further
//! while `MAX_PENDING_OPS` of its requests are unanswered, so a client
//! flooding it meets HTTP/2 flow control, not a growing queue.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Status, Streaming};

use super::quota::{Caller, Kind, Share};
use super::{Core, KeepAliveStream};
use crate::auth::Access;
use crate::lock::{Attachment, LockError, LockKey, Token};
use crate::pb;
use crate::store::{LockStore, Releasing};

/// Responses buffered per stream before the session waits for the client.
/// (tokio allocates channel slots 32 at a time; each slot is kept small by
/// boxing the rare error status, since 10 000 idle streams each hold one.)
const RESPONSE_BUFFER: usize = 32;
/// Requests of one stream started or queued but not answered yet; past
/// this the session stops reading until some finish.
const MAX_PENDING_OPS: usize = 1024;

/// Opens a KeepAlive session, or refuses it when the connection already has
/// its maximum of streams.
pub(super) fn start<S: LockStore>(
    core: Arc<Core<S>>,
    request: Request<Streaming<pb::KeepAliveRequest>>,
) -> Result<KeepAliveStream, Status> {
    let access = Access::of(request.extensions())?;
    let caller = Caller::of(&access, request.remote_addr());
    let stream_share = core.quotas.take(&caller, Kind::Streams, 1)?;
    let locks = core.quotas.take(&caller, Kind::Locks, 0)?;
    let slot = StreamSlot::take(core.clone(), request.remote_addr())?;
    let inbound = request.into_inner();
    let (tx, rx) = mpsc::channel(RESPONSE_BUFFER);
    let session = Session {
        core,
        access,
        attachment: Arc::new(Attachment::generate()),
        _stream_share: stream_share,
        locks,
        tx,
        attached: HashMap::new(),
        queued: HashMap::new(),
        pending: 0,
        _slot: slot,
    };
    // No span around the session: it is polled on every renewal, and even
    // a disabled span costs on that path (the profile showed it). Its log
    // lines carry rpc = "KeepAlive" instead.
    tokio::spawn(session.run(inbound));
    Ok(Box::pin(
        ReceiverStream::new(rx).map(|item| item.map_err(|status| *status)),
    ))
}

/// Counts this stream against its connection's limit while it lives.
struct StreamSlot<S: LockStore> {
    core: Arc<Core<S>>,
    peer: Option<SocketAddr>,
}

impl<S: LockStore> StreamSlot<S> {
    fn take(core: Arc<Core<S>>, peer: Option<SocketAddr>) -> Result<Self, Status> {
        if let Some(addr) = peer {
            let mut streams = core.streams.lock().unwrap_or_else(|e| e.into_inner());
            let n = streams.entry(addr).or_insert(0);
            if *n >= core.limits.max_streams_per_connection {
                return Err(LockError::ResourceExhausted(format!(
                    "this connection already has {} KeepAlive streams (--max-streams-per-connection)",
                    core.limits.max_streams_per_connection
                ))
                .into());
            }
            *n += 1;
        }
        crate::metrics::streams(1.0);
        Ok(Self { core, peer })
    }
}

impl<S: LockStore> Drop for StreamSlot<S> {
    fn drop(&mut self) {
        crate::metrics::streams(-1.0);
        let Some(addr) = self.peer else { return };
        let mut streams = self.core.streams.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = streams.get_mut(&addr) {
            *n -= 1;
            if *n == 0 {
                streams.remove(&addr);
            }
        }
    }
}

/// One validated request.
struct Op {
    key: LockKey,
    token: Token,
    ttl_ms: Option<u32>,
    release: bool,
}

/// What a finished store call reports back to the session.
struct Done {
    op: Op,
    result: Result<Option<u32>, LockError>,
}

type InFlight = FuturesUnordered<Pin<Box<dyn std::future::Future<Output = Done> + Send>>>;

struct Session<S: LockStore> {
    core: Arc<Core<S>>,
    /// Whose stream this is: every key is checked against it.
    access: Access,
    /// This stream's id: each renewal records it as the lock's latest
    /// attachment, and the release at the stream's end applies only to
    /// locks whose latest attachment it still is.
    attachment: Arc<Attachment>,
    /// This stream, counted against its caller's quota of streams.
    _stream_share: Share,
    /// The locks this stream tracks (attached or queued), counted against
    /// its caller's quota of attached locks.
    locks: Share,
    tx: mpsc::Sender<Result<pb::KeepAliveResponse, Box<Status>>>,
    /// Locks this stream keeps alive, with the token each was attached with.
    attached: HashMap<LockKey, Token>,
    /// Keys with a store call in flight, and the requests queued behind it.
    queued: HashMap<LockKey, VecDeque<Op>>,
    /// Requests started or queued and not answered yet.
    pending: usize,
    _slot: StreamSlot<S>,
}

/// Why the session loop stopped.
enum End {
    /// The client ended the stream: release what is attached, then end it
    /// with this status if the client's input could not be decoded.
    Client(Option<Status>),
    /// The server ended it with this status: release nothing.
    Server(Status),
}

impl<S: LockStore> Session<S> {
    async fn run(mut self, mut inbound: Streaming<pb::KeepAliveRequest>) {
        let mut inflight: InFlight = FuturesUnordered::new();
        let shutdown = self.core.shutdown.clone();
        let mut inbound_open = true;
        let mut undecodable = None;
        let end = loop {
            if !inbound_open && inflight.is_empty() {
                break End::Client(undecodable.take());
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    break End::Server(LockError::ShuttingDown.into());
                }
                Some(done) = inflight.next(), if !inflight.is_empty() => {
                    if let Err(status) = self.finish(done, &mut inflight).await {
                        break End::Server(status);
                    }
                }
                message = inbound.message(), if inbound_open && self.pending < MAX_PENDING_OPS => match message {
                    Ok(Some(req)) => {
                        if let Err(status) = self.accept(req, &mut inflight).await {
                            break End::Server(status);
                        }
                    }
                    // Half-close: answer what is in flight, then release.
                    Ok(None) => inbound_open = false,
                    // Cancel, reset, a dead connection, or a message that
                    // does not decode.
                    Err(status) => {
                        inbound_open = false;
                        if shutdown.is_cancelled() {
                            break End::Server(LockError::ShuttingDown.into());
                        }
                        undecodable = super::wire::contract_code(&status)
                            .map(|code| Status::new(code, status.message()));
                    }
                },
            }
        };
        crate::metrics::attached(-(self.attached.len() as f64));
        match end {
            End::Client(status) => {
                self.release_all().await;
                if let Some(status) = status {
                    let _ = self.tx.send(Err(Box::new(status))).await;
                }
            }
            End::Server(status) => {
                tracing::debug!(attached = self.attached.len(), code = ?status.code(), "stream ended by the server; locks kept until their TTL");
                let _ = self.tx.send(Err(Box::new(status))).await;
            }
        }
    }

    /// Validates one request and starts it, or queues it behind a call in
    /// flight for the same key. Invalid requests are answered `alive = false`
    /// and change nothing.
    async fn accept(
        &mut self,
        req: pb::KeepAliveRequest,
        inflight: &mut InFlight,
    ) -> Result<(), Status> {
        let limits = &self.core.limits.fields;
        let parsed = limits
            .key(req.key.clone())
            .and_then(|key| Ok((key, Token::parse(req.token)?)))
            .and_then(|(key, token)| {
                let ttl_ms = if req.release {
                    None
                } else {
                    limits.renew_ttl(req.ttl_ms)?
                };
                Ok(Op {
                    key,
                    token,
                    ttl_ms,
                    release: req.release,
                })
            });
        let op = match parsed {
            Ok(op) => op,
            Err(e) => {
                tracing::debug!(rpc = "KeepAlive", error = %e, "invalid request answered alive=false");
                return self.respond(req.key, None).await;
            }
        };
        if let Err(e) = self.access.authorize(&op.key) {
            tracing::debug!(rpc = "KeepAlive", key = op.key.as_str(), error = %e, attached = self.attached.len(), "key outside the caller's scope: ending the stream, releasing nothing");
            return Err(e.into());
        }
        if !op.release && !self.attached.contains_key(&op.key) && !self.queued.contains_key(&op.key)
        {
            let tracked = self.attached.len()
                + self
                    .queued
                    .keys()
                    .filter(|k| !self.attached.contains_key(*k))
                    .count();
            if tracked >= self.core.limits.max_locks_per_stream {
                return Err(LockError::ResourceExhausted(format!(
                    "this stream already keeps {tracked} locks alive (--max-locks-per-stream)"
                ))
                .into());
            }
            if self.locks.count() <= tracked {
                self.locks.grow(1)?;
            }
        }
        self.pending += 1;
        match self.queued.get_mut(&op.key) {
            Some(queue) => queue.push_back(op),
            None => {
                self.queued.insert(op.key.clone(), VecDeque::new());
                inflight.push(self.call(op));
            }
        }
        Ok(())
    }

    /// The store call for one op.
    fn call(&self, op: Op) -> Pin<Box<dyn std::future::Future<Output = Done> + Send>> {
        let (core, attachment) = (self.core.clone(), self.attachment.clone());
        async move {
            let start = Instant::now();
            let result = if op.release {
                core.release(&op.key, &op.token, Releasing::Holder)
                    .await
                    .map(|_| None)
            } else {
                core.store
                    .renew(&op.key, &op.token, op.ttl_ms, Some(&attachment))
                    .await
            };
            let outcome = match &result {
                Ok(Some(_)) => "alive",
                Ok(None) if op.release => "released",
                Ok(None) => "lost",
                Err(e) => e.kind(),
            };
            let latency = start.elapsed();
            crate::metrics::rpc("KeepAlive", outcome, latency);
            if !op.release && result.is_ok() {
                crate::metrics::renewal(outcome == "alive");
            }
            tracing::debug!(
                rpc = "KeepAlive",
                key = op.key.as_str(),
                outcome,
                latency_us = latency.as_micros() as u64
            );
            Done { op, result }
        }
        .boxed()
    }

    /// Applies a finished call, answers it, and starts the next one queued
    /// for the same key.
    async fn finish(&mut self, done: Done, inflight: &mut InFlight) -> Result<(), Status> {
        let Done { op, result } = done;
        self.pending = self.pending.saturating_sub(1);
        let ttl = match result {
            Ok(ttl) => ttl,
            Err(e) => {
                tracing::warn!(rpc = "KeepAlive", key = op.key.as_str(), error = %e, "store error; ending the stream without releasing");
                return Err(e.into());
            }
        };
        match ttl {
            Some(_) => {
                if self.attached.insert(op.key.clone(), op.token).is_none() {
                    crate::metrics::attached(1.0);
                }
            }
            None => {
                if self.attached.get(&op.key) == Some(&op.token) {
                    self.attached.remove(&op.key);
                    crate::metrics::attached(-1.0);
                }
            }
        }
        if let Some(queue) = self.queued.get_mut(&op.key) {
            match queue.pop_front() {
                Some(next) => inflight.push(self.call(next)),
                None => {
                    self.queued.remove(&op.key);
                }
            }
        }
        let tracked = self.attached.len()
            + self
                .queued
                .keys()
                .filter(|k| !self.attached.contains_key(*k))
                .count();
        self.locks
            .shrink(self.locks.count().saturating_sub(tracked));
        self.respond(op.key.into_string(), ttl).await
    }

    async fn respond(&self, key: String, ttl: Option<u32>) -> Result<(), Status> {
        let response = super::convert::keepalive_response(key, ttl);
        // A client that went away can no longer read; its locks are still
        // released when its inbound side ends.
        let _ = self.tx.send(Ok(response)).await;
        Ok(())
    }

    /// The client is gone: release every attached lock its token still
    /// holds, concurrently; waiters hear of each release from the store.
    async fn release_all(&mut self) {
        if self.attached.is_empty() {
            return;
        }
        let locks: Vec<(LockKey, Token)> = self.attached.drain().collect();
        let (core, attachment) = (&self.core, &*self.attachment);
        let results = futures_util::future::join_all(locks.iter().map(|(key, token)| {
            async move {
                // Only locks this stream is still the latest attachment of:
                // one the client re-attached elsewhere stays with it.
                let kind = Releasing::StreamEnd(attachment);
                match core.release(key, token, kind).await {
                    // One retry covers a blip; after that the TTL frees it.
                    Err(LockError::Unavailable(_)) => core.release(key, token, kind).await,
                    other => other,
                }
            }
        }))
        .await;
        let mut released = 0;
        for ((key, _), result) in locks.iter().zip(results) {
            match result {
                Ok(true) => {
                    released += 1;
                    crate::metrics::stream_end_release("released");
                }
                Ok(false) => crate::metrics::stream_end_release("not_held"),
                Err(e) => {
                    crate::metrics::stream_end_release("error");
                    tracing::warn!(key = key.as_str(), error = %e, "could not release on stream end; the lock expires with its TTL")
                }
            }
        }
        tracing::debug!(
            attached = locks.len(),
            released,
            "stream ended by the client; locks released"
        );
    }
}
