//! LockService.Watch: the lock as it is now (`KIND_STATE`), then one event
//! per change until the client ends the call. All streams of one key on a
//! server share one [`feed::Feed`], which turns the store's change feed
//! ([`crate::store::changes`], on Redis what every server did) and the
//! holders' deadlines (expiry, which nothing reports, shows within a few
//! tens of ms) into events once for all of them.
//!
//! Nothing queues without bound: the stream holds a few events, the feed
//! a few updates; a client that falls further behind gets the lock's
//! state now (`KIND_STATE`) in place of what it missed.

mod feed;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tracing::Instrument;

use super::core::Core;
use super::quota::Share;
use crate::auth::Access;
use crate::lock::{LockError, LockKey};
use crate::pb;
use crate::store::LockStore;
pub(super) use feed::Feeds;
use feed::{Subscription, Update};

/// The response stream of Watch.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

/// Events a stream holds for a client that has not read them.
const OUTBOX: usize = 4;

/// Joins `key`'s feed (starting it if this server does not watch `key`
/// yet) and starts the task that feeds the stream from it. The task ends
/// when the client goes, when the server shuts down, when the feed fails,
/// or when the caller's access to the key is revoked.
pub(super) async fn start<S: LockStore>(
    core: Arc<Core<S>>,
    key: LockKey,
    access: Access,
    share: Share,
) -> Result<WatchStream, LockError> {
    let permit = core.watches.clone().try_acquire_owned().map_err(|_| {
        LockError::ResourceExhausted(format!(
            "this server has {} Watch streams open, its limit (--max-watches)",
            core.limits.max_watches
        ))
    })?;
    let subscription = core.feeds.subscribe(&core, &key).await?;
    let (tx, rx) = mpsc::channel(OUTBOX);
    let span = tracing::debug_span!("watch", key = key.as_str());
    let mut stream = Forwarder {
        key,
        access,
        tx,
        seq: subscription.seq,
    };
    if !stream.send(std::slice::from_ref(&subscription.state)).await {
        return Err(LockError::Internal("watch stream closed at once".into()));
    }
    crate::metrics::watches(1.0);
    tokio::spawn(
        async move {
            stream.run(subscription, &core).await;
            crate::metrics::watches(-1.0);
            // The caller's stream and the server's watch slot are given
            // back when the stream ends.
            drop((share, permit));
        }
        .instrument(span),
    );
    Ok(Box::pin(ReceiverStream::new(rx)))
}

/// Ends `stream` with DEADLINE_EXCEEDED at the caller's deadline: tonic
/// enforces `grpc-timeout` only until a stream's headers are sent, and a
/// client that does not cancel by itself (curl, a Connect client that
/// relies on the server) would otherwise watch forever.
pub(super) fn until(stream: WatchStream, deadline: Option<Instant>) -> WatchStream {
    match deadline {
        None => stream,
        Some(at) => Box::pin(UntilDeadline {
            inner: stream,
            at: Box::pin(tokio::time::sleep_until(at.into())),
            done: false,
        }),
    }
}

struct UntilDeadline {
    inner: WatchStream,
    at: Pin<Box<tokio::time::Sleep>>,
    done: bool,
}

impl Stream for UntilDeadline {
    type Item = Result<pb::WatchEvent, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if self.done {
            return Poll::Ready(None);
        }
        if self.at.as_mut().poll(cx).is_ready() {
            self.done = true;
            return Poll::Ready(Some(Err(Status::deadline_exceeded(
                "the call's deadline passed: the watch ends",
            ))));
        }
        let next = self.inner.as_mut().poll_next(cx);
        if let Poll::Ready(None) = next {
            self.done = true;
        }
        next
    }
}

/// Feeds one stream from its key's feed.
struct Forwarder {
    key: LockKey,
    access: Access,
    tx: mpsc::Sender<Result<pb::WatchEvent, Status>>,
    /// The number of the last update this stream has sent or skipped.
    seq: u64,
}

impl Forwarder {
    async fn run<S: LockStore>(&mut self, mut feed: Subscription, core: &Core<S>) {
        loop {
            let update = tokio::select! {
                biased;
                _ = self.tx.closed() => return,
                _ = core.shutdown.cancelled() => {
                    let _ = self.tx.send(Err(LockError::ShuttingDown.into())).await;
                    return;
                }
                update = feed.rx.recv() => update,
            };
            let delivered = match update {
                Ok(Update::Events { seq, events }) => {
                    // Already in the state this stream started from.
                    if seq <= self.seq {
                        continue;
                    }
                    self.seq = seq;
                    self.send(&events).await
                }
                Ok(Update::Failed(e)) => {
                    let _ = self.tx.send(Err(e.into())).await;
                    false
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let (seq, state) = feed.latest();
                    self.seq = seq;
                    self.send(std::slice::from_ref(&state)).await
                }
                Err(broadcast::error::RecvError::Closed) => {
                    let _ = self
                        .tx
                        .send(Err(LockError::Unavailable(
                            "the watch ended; watch again".into(),
                        )
                        .into()))
                        .await;
                    false
                }
            };
            if !delivered {
                return;
            }
        }
    }

    /// Sends `events` in order, after checking that the caller may still
    /// see the key (its token may have been revoked since); false once the
    /// stream is over.
    async fn send(&self, events: &[pb::WatchEvent]) -> bool {
        for event in events {
            let item = self.access.authorize(&self.key).map(|()| event.clone());
            let ended = item.is_err();
            if self.tx.send(item.map_err(Status::from)).await.is_err() || ended {
                return false;
            }
        }
        true
    }
}
