//! LockService.Watch: the lock as it is now (`KIND_STATE`), then one event
//! per change until the client ends the call. Grants and releases come
//! from the store's change feed ([`crate::store::changes`]), which on Redis
//! carries what every server did; expiry, which nothing reports, is
//! checked at the holder's deadline, so it shows within a few tens of ms.
//!
//! Nothing queues without bound: the stream holds a few events, the feed
//! a few changes per key; a client that falls further behind gets the
//! lock's state now (`KIND_STATE`) in place of what it missed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tracing::Instrument;

use super::convert;
use super::core::Core;
use super::quota::Share;
use crate::auth::Access;
use crate::lock::{LockError, LockInfo, LockKey};
use crate::pb;
use crate::pb::watch_event::Kind;
use crate::store::LockStore;
use crate::store::changes::{Change, ChangeKind};

/// The response stream of Watch.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

/// Events a stream holds for a client that has not read them.
const OUTBOX: usize = 4;
/// How long after a holder's deadline its lock is checked for expiry.
const EXPIRY_SLACK: Duration = Duration::from_millis(20);
/// How often a watcher re-reads the lock whatever it heard: Redis pub/sub
/// delivers at most once (a reconnecting subscriber misses messages), so
/// a missed grant or release shows as a `KIND_STATE` within this long.
const RESYNC_EVERY: Duration = Duration::from_secs(10);
/// How long a grant that was already gone when it was described waits for
/// its release to be reported before it is checked for expiry.
const RELEASE_GRACE: Duration = Duration::from_millis(100);

/// Subscribes to `key`'s changes, reads its state, and starts the task
/// that feeds the stream. The task ends when the client goes, when the
/// server shuts down, or when the caller's access to the key is revoked.
pub(super) async fn start<S: LockStore>(
    core: Arc<Core<S>>,
    key: LockKey,
    access: Access,
    share: Share,
) -> Result<WatchStream, LockError> {
    // Subscribed first: nothing that happens after the read is missed.
    let changes = core.store.changes(&key).await?;
    let sent = Instant::now();
    let info = core.store.describe(&key).await?;
    let (tx, rx) = mpsc::channel(OUTBOX);
    let span = tracing::debug_span!("watch", key = key.as_str());
    let mut watcher = Watcher {
        core,
        key,
        access,
        tx,
        holder: None,
    };
    let first = watcher.state(info, sent);
    if !watcher.send(vec![first]).await {
        return Err(LockError::Internal("watch stream closed at once".into()));
    }
    crate::metrics::watches(1.0);
    tokio::spawn(
        async move {
            watcher.run(changes).await;
            crate::metrics::watches(-1.0);
            // The caller's stream is given back when the stream ends.
            drop(share);
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

/// The grant a watcher believes holds the lock, and when it runs out.
#[derive(Debug, Clone, Copy)]
struct Holder {
    /// The latest grant's fencing token (of any holder, when shared).
    fence: u64,
    /// When the last holder's lease runs out.
    deadline: Instant,
    /// Held SHARED: a release may leave other holders, so it is read.
    shared: bool,
}

struct Watcher<S> {
    core: Arc<Core<S>>,
    key: LockKey,
    access: Access,
    tx: mpsc::Sender<Result<pb::WatchEvent, Status>>,
    holder: Option<Holder>,
}

impl<S: LockStore> Watcher<S> {
    async fn run(&mut self, mut changes: broadcast::Receiver<Change>) {
        let mut resync =
            tokio::time::interval_at((Instant::now() + RESYNC_EVERY).into(), RESYNC_EVERY);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = self.holder.map(|h| h.deadline + EXPIRY_SLACK);
            let expiry = async move {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            let events = tokio::select! {
                biased;
                _ = self.tx.closed() => return,
                _ = self.core.shutdown.cancelled() => {
                    let _ = self.tx.send(Err(LockError::ShuttingDown.into())).await;
                    return;
                }
                change = changes.recv() => self.on_change(change).await,
                _ = expiry => self.on_deadline().await,
                _ = resync.tick() => self.on_resync().await,
            };
            let delivered = match events {
                Ok(events) => self.send(events).await,
                Err(e) => {
                    let _ = self.tx.send(Err(e.into())).await;
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
    async fn send(&self, events: Vec<pb::WatchEvent>) -> bool {
        for event in events {
            let item = self.access.authorize(&self.key).map(|()| event);
            let ended = item.is_err();
            if self.tx.send(item.map_err(Status::from)).await.is_err() || ended {
                return false;
            }
        }
        true
    }

    async fn describe(&self) -> Result<(Option<LockInfo>, Instant), LockError> {
        let sent = Instant::now();
        Ok((self.core.store.describe(&self.key).await?, sent))
    }

    /// A `KIND_STATE` event for `info` (read at `sent`), which the watcher
    /// believes from now on.
    fn state(&mut self, info: Option<LockInfo>, sent: Instant) -> pb::WatchEvent {
        self.holder = info.as_ref().map(|i| holder_of(i, sent));
        convert::watch_event(Kind::State, 0, info)
    }

    async fn on_change(
        &mut self,
        change: Result<Change, broadcast::error::RecvError>,
    ) -> Result<Vec<pb::WatchEvent>, LockError> {
        let change = match change {
            Ok(change) => change,
            Err(broadcast::error::RecvError::Lagged(_)) => {
                let (info, sent) = self.describe().await?;
                return Ok(vec![self.state(info, sent)]);
            }
            Err(broadcast::error::RecvError::Closed) => {
                return Err(LockError::Unavailable(
                    "the store stopped reporting changes; watch again".into(),
                ));
            }
        };
        let fence = change.fencing_token;
        match change.kind {
            ChangeKind::Acquired => {
                if self.holder.is_some_and(|h| h.fence >= fence) {
                    return Ok(vec![]); // Already seen in a state read.
                }
                let (info, sent) = self.describe().await?;
                let mut events = Vec::with_capacity(2);
                // A handoff publishes no release: the grant before this
                // one ended here, by release or, past its deadline, expiry.
                if let Some(old) = self.holder.take() {
                    let kind = if Instant::now() >= old.deadline {
                        Kind::Expired
                    } else {
                        Kind::Released
                    };
                    events.push(convert::watch_event(kind, old.fence, info.clone()));
                }
                self.holder = Some(match &info {
                    Some(i) if i.latest_fence() == fence => holder_of(i, sent),
                    // Gone again already: its release is on its way.
                    _ => Holder {
                        fence,
                        deadline: sent + RELEASE_GRACE,
                        shared: false,
                    },
                });
                events.push(convert::watch_event(Kind::Acquired, fence, info));
                Ok(events)
            }
            ChangeKind::Released | ChangeKind::ForceReleased => {
                let kind = if change.kind == ChangeKind::Released {
                    Kind::Released
                } else {
                    Kind::ForceReleased
                };
                let Some(holder) = self.holder else {
                    return Ok(vec![]);
                };
                if holder.shared {
                    // One of several holders may have left: the lock as
                    // it is after it.
                    let (info, sent) = self.describe().await?;
                    self.holder = info.as_ref().map(|i| holder_of(i, sent));
                    return Ok(vec![convert::watch_event(kind, fence, info)]);
                }
                if holder.fence != fence {
                    return Ok(vec![]);
                }
                // Right after an exclusive holder's release the lock is
                // free: no read needed. A grant that follows comes as its
                // own event.
                self.holder = None;
                Ok(vec![convert::watch_event(kind, fence, None)])
            }
        }
    }

    /// The holder's deadline passed: renewed, expired, or replaced.
    async fn on_deadline(&mut self) -> Result<Vec<pb::WatchEvent>, LockError> {
        let Some(old) = self.holder else {
            return Ok(vec![]);
        };
        let (info, sent) = self.describe().await?;
        self.holder = info.as_ref().map(|i| holder_of(i, sent));
        Ok(match &info {
            Some(i) if i.latest_fence() == old.fence => vec![],
            Some(i) => {
                let fence = i.latest_fence();
                vec![
                    convert::watch_event(Kind::Expired, old.fence, info.clone()),
                    convert::watch_event(Kind::Acquired, fence, info),
                ]
            }
            None => vec![convert::watch_event(Kind::Expired, old.fence, info)],
        })
    }
}

impl<S: LockStore> Watcher<S> {
    /// The periodic re-read: a `KIND_STATE` only if the lock is not what
    /// this watcher believes (a change it never heard of).
    async fn on_resync(&mut self) -> Result<Vec<pb::WatchEvent>, LockError> {
        let (info, sent) = self.describe().await?;
        let believed = self.holder.map(|h| h.fence);
        if info.as_ref().map(LockInfo::latest_fence) == believed {
            return Ok(vec![]);
        }
        Ok(vec![self.state(info, sent)])
    }
}

/// The holder `info` describes, read at `sent`: its lease ends no sooner
/// than `sent` plus the TTL it had left.
fn holder_of(info: &LockInfo, sent: Instant) -> Holder {
    let ttl_ms = info.holders.iter().map(|h| h.ttl_ms).max().unwrap_or(0);
    Holder {
        fence: info.latest_fence(),
        deadline: sent + Duration::from_millis(ttl_ms.into()),
        shared: matches!(info.mode, crate::lock::Mode::Shared { .. }),
    }
}
