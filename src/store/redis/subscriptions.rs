//! Release notifications for this server's waiters: one `SSUBSCRIBE` per
//! key someone here waits on (made before the waiter's first check, so no
//! release between check and wait is missed), unsubscribed once idle; a
//! listener that wakes the key's waiters; and the releases this server made
//! itself, already announced locally, so their notification is skipped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fred::clients::SubscriberClient;
use fred::prelude::*;

use super::call::bounded;
use super::names::{key_of_channel, unescape_tag};
use super::replies::int;
use crate::lock::LockError;
use crate::store::ReleaseListener;
use crate::task::{self, TaskGuard};

/// The subscriber client and what it is subscribed to.
pub(super) struct Subscriptions {
    subscriber: SubscriberClient,
    waiters: Arc<dyn ReleaseListener>,
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
                ),
            ),
        ];
        Self {
            subscriber,
            waiters,
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
    local: Arc<LocalReleases>,
) {
    let mut rx = subscriber.message_rx();
    loop {
        match rx.recv().await {
            Ok(message) => {
                if let Some(tag) = key_of_channel(&prefix, &message.channel) {
                    let key = unescape_tag(tag);
                    let fence = int(&message.value).unwrap_or(0);
                    if !local.take(&key, fence) {
                        waiters.released(&key);
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
                        && key_of_channel(&prefix, channel)
                            .is_none_or(|tag| !waiters.has_waiters(&unescape_tag(tag)))
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
