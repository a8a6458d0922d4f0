//! One feed per watched key per server, shared by every Watch stream of
//! that key: it alone subscribes to the key's changes, reads the lock when
//! a change needs it (a grant, a shared holder leaving, a holder's
//! deadline, the periodic resync) and turns what it learns into events,
//! which it hands to every stream at once. A thousand watchers of one key
//! cost one subscription and one read per change, not a thousand, and a
//! new watcher of a watched key starts from the feed's state without
//! reading the store at all.
//!
//! A stream that falls behind loses updates from the broadcast; it then
//! sends the feed's latest state (`KIND_STATE`) in their place, so nothing
//! queues without bound. Updates are numbered so that a stream never
//! sends one that its state already includes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{OnceCell, broadcast};
use tracing::Instrument;

use super::super::convert;
use super::super::core::Core;
use crate::lock::{LockError, LockInfo, LockKey};
use crate::pb;
use crate::pb::watch_event::Kind;
use crate::store::LockStore;
use crate::store::changes::{Change, ChangeKind};
use crate::task::{AbortOnDropHandle, TaskGuard};

/// Updates a stream may be behind before it gets the state instead.
const BACKLOG: usize = 16;
/// How long after a holder's deadline its lock is checked for expiry.
const EXPIRY_SLACK: Duration = Duration::from_millis(20);
/// How often a feed re-reads the lock whatever it heard: Redis pub/sub
/// delivers at most once (a reconnecting subscriber misses messages), so
/// a missed grant or release shows as a `KIND_STATE` within this long.
const RESYNC_EVERY: Duration = Duration::from_secs(10);
/// How long a grant that was already gone when it was described waits for
/// its release to be reported before it is checked for expiry.
const RELEASE_GRACE: Duration = Duration::from_millis(100);

/// What a feed hands its streams.
#[derive(Debug, Clone)]
pub(super) enum Update {
    /// Events in order; `seq` numbers the update.
    Events {
        seq: u64,
        events: Arc<[pb::WatchEvent]>,
    },
    /// The feed could not go on (the store failed): every stream ends
    /// with this error, and a new Watch starts a new feed.
    Failed(LockError),
}

/// The feeds of one server, by key. Entries are weak: a feed lives as
/// long as a stream holds its [`Subscription`].
#[derive(Debug, Default)]
pub(in crate::service) struct Feeds {
    by_key: Mutex<HashMap<String, Weak<Feed>>>,
}

/// One key's feed.
#[derive(Debug)]
pub(super) struct Feed {
    /// Started by the first watcher; the others wait for it.
    running: OnceCell<Running>,
}

#[derive(Debug)]
struct Running {
    latest: Arc<Latest>,
    _task: TaskGuard,
}

/// The lock as the feed last knew it, and the channel of its updates:
/// under one mutex, so that a stream that subscribes gets a state and
/// then exactly the updates after it (or the feed's failure).
#[derive(Debug)]
struct Latest {
    inner: Mutex<State>,
    tx: broadcast::Sender<Update>,
}

#[derive(Debug)]
struct State {
    /// The number of the last update.
    seq: u64,
    /// The lock after it, as a `KIND_STATE` event.
    state: pb::WatchEvent,
    /// Why the feed stopped, once it has.
    failed: Option<LockError>,
}

/// A stream's hold on a feed: the lock's state when it subscribed, then
/// the updates after it.
pub(super) struct Subscription {
    /// Keeps the feed running.
    _feed: Arc<Feed>,
    latest: Arc<Latest>,
    pub(super) rx: broadcast::Receiver<Update>,
    /// The number of the update the state includes.
    pub(super) seq: u64,
    /// The lock when this stream subscribed (`KIND_STATE`).
    pub(super) state: pb::WatchEvent,
}

impl Subscription {
    /// The feed's latest state, for a stream that fell behind.
    pub(super) fn latest(&self) -> (u64, pb::WatchEvent) {
        self.latest.get()
    }
}

impl Latest {
    fn get(&self) -> (u64, pb::WatchEvent) {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        (inner.seq, inner.state.clone())
    }

    fn subscribe(&self) -> Result<(u64, pb::WatchEvent, broadcast::Receiver<Update>), LockError> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match &inner.failed {
            Some(e) => Err(e.clone()),
            None => Ok((inner.seq, inner.state.clone(), self.tx.subscribe())),
        }
    }

    /// Ends every stream with `error`, and refuses new ones.
    fn fail(&self, error: LockError) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.failed = Some(error.clone());
        let _ = self.tx.send(Update::Failed(error));
    }

    /// Hands `events` to every stream; the last one's lock state becomes
    /// the feed's.
    fn publish(&self, events: Vec<pb::WatchEvent>) {
        let Some(last) = events.last() else {
            return;
        };
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.seq += 1;
        inner.state = pb::WatchEvent {
            kind: Kind::State.into(),
            state: last.state.clone(),
            fencing_token: 0,
        };
        let seq = inner.seq;
        // No receiver: the last stream is leaving, the feed with it.
        let _ = self.tx.send(Update::Events {
            seq,
            events: events.into(),
        });
    }
}

impl Feeds {
    /// A subscription to `key`'s feed, started if nobody watches `key` on
    /// this server yet.
    pub(super) async fn subscribe<S: LockStore>(
        &self,
        core: &Arc<Core<S>>,
        key: &LockKey,
    ) -> Result<Subscription, LockError> {
        let feed = {
            let mut by_key = self.by_key.lock().unwrap_or_else(|e| e.into_inner());
            match by_key.get(key.as_str()).and_then(Weak::upgrade) {
                Some(feed) => feed,
                None => {
                    by_key.retain(|_, feed| feed.strong_count() > 0);
                    let feed = Arc::new(Feed {
                        running: OnceCell::new(),
                    });
                    by_key.insert(key.as_str().to_owned(), Arc::downgrade(&feed));
                    feed
                }
            }
        };
        let weak = Arc::downgrade(&feed);
        let running = feed
            .running
            .get_or_try_init(|| start(core.clone(), key.clone(), weak))
            .await?;
        let latest = running.latest.clone();
        let (seq, state, rx) = latest.subscribe()?;
        Ok(Subscription {
            _feed: feed,
            latest,
            rx,
            seq,
            state,
        })
    }

    /// Forgets `feed` (it failed), so that the next Watch of `key` starts
    /// a new one.
    fn forget(&self, key: &LockKey, feed: &Weak<Feed>) {
        let mut by_key = self.by_key.lock().unwrap_or_else(|e| e.into_inner());
        if by_key.get(key.as_str()).is_some_and(|f| f.ptr_eq(feed)) {
            by_key.remove(key.as_str());
        }
    }
}

/// Subscribes to `key`'s changes, reads its state and starts the feed's
/// task, which lives as long as the feed.
async fn start<S: LockStore>(
    core: Arc<Core<S>>,
    key: LockKey,
    feed: Weak<Feed>,
) -> Result<Running, LockError> {
    // Subscribed first: nothing that happens after the read is missed.
    let changes = core.store.changes(&key).await?;
    let sent = Instant::now();
    let info = core.store.describe(&key).await?;
    let mut reader = Reader {
        core,
        key,
        believed: Believed::default(),
    };
    let first = reader.state(info, sent);
    let (tx, _) = broadcast::channel(BACKLOG);
    let latest = Arc::new(Latest {
        inner: Mutex::new(State {
            seq: 0,
            state: first,
            failed: None,
        }),
        tx,
    });
    let span = tracing::debug_span!("watch feed", key = reader.key.as_str());
    let task = {
        let latest = latest.clone();
        AbortOnDropHandle::new(tokio::spawn(
            async move {
                let error = reader.run(&latest, changes).await;
                reader.core.feeds.forget(&reader.key, &feed);
                latest.fail(error);
            }
            .instrument(span),
        ))
    };
    Ok(Running {
        latest,
        _task: task,
    })
}

/// The grants a feed believes hold the lock: each one's fencing token
/// and when its lease runs out (one when exclusive, any number when
/// shared).
#[derive(Debug, Clone, Default)]
struct Believed {
    holders: Vec<(u64, Instant)>,
    /// Held SHARED: a release may leave other holders, so it is read.
    shared: bool,
}

impl Believed {
    /// What `info`, read at `sent`, shows: each holder's lease ends no
    /// sooner than `sent` plus the TTL it had left.
    fn of(info: Option<&LockInfo>, sent: Instant) -> Self {
        let Some(info) = info else {
            return Self::default();
        };
        Self {
            holders: info
                .holders
                .iter()
                .map(|h| {
                    (
                        h.fencing_token,
                        sent + Duration::from_millis(h.ttl_ms.into()),
                    )
                })
                .collect(),
            shared: matches!(info.mode, crate::lock::Mode::Shared { .. }),
        }
    }

    fn holds(&self, fence: u64) -> bool {
        self.holders.iter().any(|(f, _)| *f == fence)
    }

    fn latest(&self) -> u64 {
        self.holders.iter().map(|(f, _)| *f).max().unwrap_or(0)
    }

    /// When the first lease runs out, if any is held.
    fn next_deadline(&self) -> Option<Instant> {
        self.holders.iter().map(|(_, at)| *at).min()
    }

    fn fences(&self) -> Vec<u64> {
        let mut fences: Vec<u64> = self.holders.iter().map(|(f, _)| *f).collect();
        fences.sort_unstable();
        fences
    }
}

/// Turns a key's changes into events.
struct Reader<S> {
    core: Arc<Core<S>>,
    key: LockKey,
    believed: Believed,
}

impl<S: LockStore> Reader<S> {
    /// Publishes events until the store fails; returns the failure. (The
    /// task is aborted when its last stream goes.)
    async fn run(
        &mut self,
        latest: &Latest,
        mut changes: broadcast::Receiver<Change>,
    ) -> LockError {
        let mut resync =
            tokio::time::interval_at((Instant::now() + RESYNC_EVERY).into(), RESYNC_EVERY);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = self.believed.next_deadline().map(|at| at + EXPIRY_SLACK);
            let expiry = async move {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            let events = tokio::select! {
                biased;
                _ = self.core.shutdown.cancelled() => return LockError::ShuttingDown,
                change = changes.recv() => self.on_change(change).await,
                _ = expiry => self.reread(None).await,
                _ = resync.tick() => self.on_resync().await,
            };
            match events {
                Ok(events) => latest.publish(events),
                Err(e) => return e,
            }
        }
    }

    async fn describe(&self) -> Result<(Option<LockInfo>, Instant), LockError> {
        let sent = Instant::now();
        Ok((self.core.store.describe(&self.key).await?, sent))
    }

    /// A `KIND_STATE` event for `info` (read at `sent`), which the feed
    /// believes from now on.
    fn state(&mut self, info: Option<LockInfo>, sent: Instant) -> pb::WatchEvent {
        self.believed = Believed::of(info.as_ref(), sent);
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
                if self.believed.holds(fence)
                    || (!self.believed.shared && self.believed.latest() >= fence)
                {
                    return Ok(vec![]); // Already seen in a state read.
                }
                self.reread(Some((fence, Kind::Acquired))).await
            }
            ChangeKind::Released | ChangeKind::ForceReleased => {
                let kind = if change.kind == ChangeKind::Released {
                    Kind::Released
                } else {
                    Kind::ForceReleased
                };
                if !self.believed.shared
                    && self.believed.holders.first().map(|h| h.0) == Some(fence)
                {
                    // Right after an exclusive holder's release the lock
                    // is free: no read needed. A grant that follows comes
                    // as its own event.
                    self.believed = Believed::default();
                    return Ok(vec![convert::watch_event(kind, fence, None)]);
                }
                if !self.believed.shared {
                    return Ok(vec![]); // Not the grant this feed knows of.
                }
                // One of several holders left (or, forced, all of them):
                // the lock as it is after it.
                self.reread(Some((fence, kind))).await
            }
        }
    }

    /// Reads the lock and reports how its holders changed since the feed
    /// last looked: a holder gone is `told`'s kind if it is the grant the
    /// change was about (every holder, for a forced release), else
    /// EXPIRED past its deadline and RELEASED before it (a release whose
    /// message was lost); a new holder is ACQUIRED. A grant that `told`
    /// announced but that is gone again already is believed for a short
    /// grace, for its release message to come.
    async fn reread(
        &mut self,
        told: Option<(u64, Kind)>,
    ) -> Result<Vec<pb::WatchEvent>, LockError> {
        let (info, sent) = self.describe().await?;
        let now = Instant::now();
        let old = std::mem::replace(&mut self.believed, Believed::of(info.as_ref(), sent));
        let mut events = Vec::new();
        for (fence, deadline) in &old.holders {
            if self.believed.holds(*fence) {
                continue;
            }
            let kind = match told {
                Some((f, kind)) if f == *fence || kind == Kind::ForceReleased => kind,
                _ if now >= *deadline => Kind::Expired,
                _ => Kind::Released,
            };
            events.push(convert::watch_event(kind, *fence, info.clone()));
        }
        for fence in self.believed.fences() {
            if !old.holds(fence) {
                events.push(convert::watch_event(Kind::Acquired, fence, info.clone()));
            }
        }
        if let Some((fence, Kind::Acquired)) = told
            && !self.believed.holds(fence)
            && !old.holds(fence)
        {
            // Gone again already: its release is on its way.
            events.push(convert::watch_event(Kind::Acquired, fence, info.clone()));
            self.believed.holders.push((fence, sent + RELEASE_GRACE));
        }
        Ok(events)
    }

    /// The periodic re-read: a `KIND_STATE` only if the holders are not
    /// those this feed believes (a change it never heard of).
    async fn on_resync(&mut self) -> Result<Vec<pb::WatchEvent>, LockError> {
        let (info, sent) = self.describe().await?;
        if Believed::of(info.as_ref(), sent).fences() == self.believed.fences() {
            return Ok(vec![]);
        }
        Ok(vec![self.state(info, sent)])
    }
}
