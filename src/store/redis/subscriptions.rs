//! Release notifications for this server's waiters: one `SSUBSCRIBE` per
//! key someone here waits on (made before the waiter's first check, so no
//! release between check and wait is missed), unsubscribed once idle; a
//! listener that wakes the key's waiters; and the releases this server made
//! itself, already announced locally, so their notification is skipped.
//! The same channel carries grants (`g<fencing token>`, from grant.lua)
//! and forced releases (`-<fencing token>`) for watchers ([`Changes`]);
//! a grant wakes no waiter.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fred::clients::SubscriberClient;
use fred::prelude::*;

use super::call::bounded;
use super::names::{key_of_channel, unescape_tag};
use super::replies::text;
use crate::lock::LockError;
use crate::store::ReleaseListener;
use crate::store::changes::{Change, ChangeKind, Changes};
use crate::task::{self, TaskGuard};

/// The subscriber client and what it is subscribed to.
pub(super) struct Subscriptions {
    subscriber: SubscriberClient,
    waiters: Arc<dyn ReleaseListener>,
    /// Grants and releases, for watchers (from any server, over Redis).
    changes: Arc<Changes>,
    local: Arc<LocalReleases>,
    /// Release channels subscribed, with when a waiter last needed each.
    watched: Arc<Mutex<HashMap<String, Instant>>>,
    /// Serialises SSUBSCRIBE/SUNSUBSCRIBE so an unsubscribe of an idle
    /// channel cannot overtake a new waiter's subscribe.
    subscribing: Arc<tokio::sync::Mutex<()>>,
    timeout: Duration,
    _tasks: Vec<TaskGuard>,
}

impl Subscriptions {
    /// Starts the re-subscriber (fred re-subscribes after reconnects), the
    /// listener and the reaper of idle channels.
    pub(super) fn start(
        subscriber: SubscriberClient,
        prefix: &str,
        waiters: Arc<dyn ReleaseListener>,
        timeout: Duration,
    ) -> Self {
        let changes = Arc::new(Changes::default());
        let watched = Arc::new(Mutex::new(HashMap::new()));
        let local = Arc::new(LocalReleases::default());
        let subscribing = Arc::new(tokio::sync::Mutex::new(()));
        let tasks = vec![
            task::spawn("redis-resubscribe", {
                let handle = subscriber.manage_subscriptions();
                async move {
                    let _ = handle.await;
                }
            }),
            task::spawn(
                "redis-release-listener",
                listen(
                    subscriber.clone(),
                    prefix.to_owned(),
                    waiters.clone(),
                    changes.clone(),
                    local.clone(),
                ),
            ),
            task::spawn(
                "redis-subscription-reaper",
                reap(
                    subscriber.clone(),
                    prefix.to_owned(),
                    watched.clone(),
                    subscribing.clone(),
                    waiters.clone(),
                    changes.clone(),
                ),
            ),
        ];
        Self {
            subscriber,
            waiters,
            changes,
            local,
            watched,
            subscribing,
            timeout,
            _tasks: tasks,
        }
    }

    /// The subscriber client (to close it).
    pub(super) fn client(&self) -> &SubscriberClient {
        &self.subscriber
    }

    /// Makes sure releases published on `channel` reach this server;
    /// resolves once the subscription is confirmed.
    pub(super) async fn watch(&self, channel: String) -> Result<(), LockError> {
        let touch = |map: &mut HashMap<String, Instant>| {
            map.get_mut(&channel).map(|t| *t = Instant::now()).is_some()
        };
        if touch(&mut self.watched.lock().unwrap_or_else(|e| e.into_inner())) {
            return Ok(());
        }
        if !self.subscriber.is_connected() {
            return Err(LockError::Unavailable(
                "release subscriptions not connected to Redis (reconnecting)".into(),
            ));
        }
        let _serial = self.subscribing.lock().await;
        if touch(&mut self.watched.lock().unwrap_or_else(|e| e.into_inner())) {
            return Ok(());
        }
        bounded(
            self.timeout,
            Box::pin(self.subscriber.ssubscribe(channel.clone())),
        )
        .await?;
        self.watched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(channel, Instant::now());
        Ok(())
    }

    /// Grants and releases of `key` from now on, once its channel is
    /// subscribed (kept subscribed while anyone here watches it).
    pub(super) async fn changes(
        &self,
        key: &str,
        channel: String,
    ) -> Result<tokio::sync::broadcast::Receiver<Change>, LockError> {
        let rx = self.changes.subscribe(key);
        self.watch(channel).await?;
        Ok(rx)
    }

    /// This server released `key` (the grant fenced `fence`): wake a waiter
    /// here now, instead of after the notification's trip through Redis and
    /// back; that notification is then skipped.
    pub(super) fn released_here(&self, key: &str, fence: i64) {
        if self.waiters.has_waiters(key) {
            self.local.record(key, fence);
            self.waiters.released(key);
        }
    }
}

/// A release channel nobody on this server has waited on for this long is
/// unsubscribed.
pub(super) const SUBSCRIPTION_IDLE: Duration = Duration::from_secs(30);

/// Delivers release notifications to this server's waiters.
pub(super) async fn listen(
    subscriber: SubscriberClient,
    prefix: String,
    waiters: Arc<dyn ReleaseListener>,
    changes: Arc<Changes>,
    local: Arc<LocalReleases>,
) {
    let mut rx = subscriber.message_rx();
    loop {
        match rx.recv().await {
            Ok(message) => {
                if let Some(tag) = key_of_channel(&prefix, &message.channel) {
                    let key = unescape_tag(tag);
                    let payload = text(&message.value).unwrap_or_default();
                    let notice = Notice::parse(&payload);
                    if let Some(change) = notice.change() {
                        changes.publish(&key, change);
                    }
                    // A grant frees nothing; any release (or a message this
                    // server cannot read) wakes a waiter, unless it is one
                    // this server already announced.
                    match notice {
                        Notice::Granted(_) => {}
                        Notice::Released(fence) if local.take(&key, fence) => {}
                        _ => waiters.released(&key),
                    }
                }
            }
            // Missed messages are covered by the waiters' backoff retries.
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(
                    missed = n,
                    "release notifications dropped; waiters fall back to retries"
                );
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// A message on a lock's channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Notice {
    /// `g<fence>`: granted.
    Granted(u64),
    /// `<fence>`: released; `-<fence>`: force-released. As the release
    /// scripts publish it, so that [`LocalReleases`] matches either.
    Released(i64),
    /// Anything else (a newer server's message): treated as a release.
    Unknown,
}

impl Notice {
    fn parse(payload: &str) -> Self {
        if let Some(fence) = payload.strip_prefix('g') {
            return fence.parse().map_or(Self::Unknown, Self::Granted);
        }
        payload.parse().map_or(Self::Unknown, Self::Released)
    }

    /// What a watcher hears of it.
    fn change(self) -> Option<Change> {
        let (kind, fencing_token) = match self {
            Self::Granted(f) => (ChangeKind::Acquired, f),
            Self::Released(f) if f > 0 => (ChangeKind::Released, f.unsigned_abs()),
            Self::Released(f) if f < 0 => (ChangeKind::ForceReleased, f.unsigned_abs()),
            _ => return None,
        };
        Some(Change {
            kind,
            fencing_token,
        })
    }
}

/// Releases this server made and already announced to its own waiters,
/// keyed by lock and fencing token, so the same release arriving again over
/// pub/sub does not wake a second waiter. Entries are consumed by that
/// message, or dropped after [`LOCAL_RELEASE_MEMORY`] if it never comes.
#[derive(Debug, Default)]
pub(super) struct LocalReleases(Mutex<HashMap<(String, i64), Instant>>);

/// How long a local release waits for its own notification.
pub(super) const LOCAL_RELEASE_MEMORY: Duration = Duration::from_secs(10);

impl LocalReleases {
    fn record(&self, key: &str, fence: i64) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() > 10_000 {
            let now = Instant::now();
            map.retain(|_, at| now.duration_since(*at) < LOCAL_RELEASE_MEMORY);
        }
        map.insert((key.to_owned(), fence), Instant::now());
    }

    /// Whether this notification is one we already delivered locally.
    fn take(&self, key: &str, fence: i64) -> bool {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.is_empty() {
            return false;
        }
        map.remove(&(key.to_owned(), fence)).is_some()
    }
}

/// Unsubscribes release channels nobody here waits on any more.
pub(super) async fn reap(
    subscriber: SubscriberClient,
    prefix: String,
    watched: Arc<Mutex<HashMap<String, Instant>>>,
    subscribing: Arc<tokio::sync::Mutex<()>>,
    waiters: Arc<dyn ReleaseListener>,
    changes: Arc<Changes>,
) {
    let mut tick = tokio::time::interval(SUBSCRIPTION_IDLE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let _serial = subscribing.lock().await;
        let idle: Vec<String> = {
            let mut map = watched.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let idle: Vec<String> = map
                .iter()
                .filter(|(channel, last)| {
                    now.duration_since(**last) > SUBSCRIPTION_IDLE
                        && key_of_channel(&prefix, channel).is_none_or(|tag| {
                            let key = unescape_tag(tag);
                            !waiters.has_waiters(&key) && !changes.is_watched(&key)
                        })
                })
                .map(|(c, _)| c.clone())
                .collect();
            for c in &idle {
                map.remove(c);
            }
            idle
        };
        for channel in idle {
            if let Err(e) = subscriber.sunsubscribe(channel).await {
                tracing::debug!(error = %e, "SUNSUBSCRIBE failed; the channel stays subscribed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_tell_grants_from_releases() {
        assert_eq!(Notice::parse("g42"), Notice::Granted(42));
        assert_eq!(Notice::parse("42"), Notice::Released(42));
        assert_eq!(Notice::parse("-42"), Notice::Released(-42));
        assert_eq!(Notice::parse("gx"), Notice::Unknown);
        assert_eq!(Notice::parse(""), Notice::Unknown);
        let forced = Notice::parse("-42").change().unwrap();
        assert_eq!(forced.kind, ChangeKind::ForceReleased);
        assert_eq!(forced.fencing_token, 42);
        assert_eq!(
            Notice::parse("g7").change().unwrap().kind,
            ChangeKind::Acquired
        );
        assert_eq!(
            Notice::parse("7").change().unwrap().kind,
            ChangeKind::Released
        );
        assert_eq!(Notice::Unknown.change(), None);
    }
}
