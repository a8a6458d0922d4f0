//! Watching a lock: [`Client::watch`] opens the server's Watch stream and
//! hands back its events as a [`Watch`] (a `Stream` of [`WatchEvent`]).
//!
//! The policy on a broken stream is the simplest one that never lies: the
//! stream yields one `Err` and ends, and the caller watches again. A new
//! watch starts with the lock's state now ([`EventKind::State`]), so
//! nothing a caller decides on is stale; what it may miss is the events in
//! between. [`Client::observe`](super::Client::observe) does the watching
//! again for its callers.

use std::collections::HashMap;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio_stream::Stream;
use tonic::Request;

use super::Client;
use super::error::{self, Error};
use crate::pb;
use crate::pb::lock_service_client::LockServiceClient;

/// What a [`WatchEvent`] says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EventKind {
    /// The lock as it is now: always the first event, and again whenever the
    /// server had to skip events (a watcher that fell behind, a periodic
    /// re-read). Its fencing token is 0.
    State,
    /// A grant: a new holder (exclusive) or one more (shared).
    Acquired,
    /// A holder released it, or its KeepAlive stream ended.
    Released,
    /// A holder's TTL ran out without a renewal.
    Expired,
    /// An operator took it (AdminService ForceRelease).
    ForceReleased,
}

impl EventKind {
    /// The name printed by `leasehold watch` (`STATE`, `ACQUIRED`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::State => "STATE",
            Self::Acquired => "ACQUIRED",
            Self::Released => "RELEASED",
            Self::Expired => "EXPIRED",
            Self::ForceReleased => "FORCE_RELEASED",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One holder of a lock, as a [`WatchEvent`] reports it (never a token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The holder's free-text owner.
    pub owner: String,
    /// Its grant's fencing token.
    pub fencing_token: u64,
    /// How long its lease had left unless renewed, when the server looked.
    pub ttl_remaining: Duration,
    /// Its metadata.
    pub metadata: HashMap<String, String>,
}

/// One event of a [`Watch`]: what happened and the lock after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    /// What happened.
    pub kind: EventKind,
    /// The fencing token of the grant the event is about (0 for
    /// [`EventKind::State`]).
    pub fencing_token: u64,
    /// Whether the lock is held SHARED after the event (`holders` may then
    /// be several).
    pub shared: bool,
    /// The holders after the event, oldest first; empty when free.
    pub holders: Vec<Holder>,
}

impl WatchEvent {
    /// The exclusive holder after the event, if the lock is held
    /// exclusively: for an election, the leader.
    pub fn exclusive_holder(&self) -> Option<&Holder> {
        if self.shared {
            None
        } else {
            self.holders.first()
        }
    }
}

impl TryFrom<pb::WatchEvent> for WatchEvent {
    type Error = Error;

    fn try_from(event: pb::WatchEvent) -> Result<Self, Error> {
        use pb::watch_event::Kind;
        let kind = match Kind::try_from(event.kind) {
            Ok(Kind::State) => EventKind::State,
            Ok(Kind::Acquired) => EventKind::Acquired,
            Ok(Kind::Released) => EventKind::Released,
            Ok(Kind::Expired) => EventKind::Expired,
            Ok(Kind::ForceReleased) => EventKind::ForceReleased,
            Ok(Kind::Unspecified) | Err(_) => {
                return Err(Error::Protocol(format!(
                    "a watch event of unknown kind {}",
                    event.kind
                )));
            }
        };
        let state = event.state.unwrap_or_default();
        let shared = state.mode == i32::from(pb::LockMode::Shared);
        let mut holders: Vec<Holder> = state
            .holders
            .into_iter()
            .map(|h| Holder {
                owner: h.owner,
                fencing_token: h.fencing_token,
                ttl_remaining: Duration::from_millis(h.ttl_ms.into()),
                metadata: h.metadata,
            })
            .collect();
        // A server older than the holder list describes its one exclusive
        // holder in the flat fields only.
        if holders.is_empty() && state.held && !shared {
            holders.push(Holder {
                owner: state.owner,
                fencing_token: state.fencing_token,
                ttl_remaining: Duration::from_millis(state.ttl_ms.into()),
                metadata: state.metadata,
            });
        }
        Ok(Self {
            kind,
            fencing_token: event.fencing_token,
            shared,
            holders,
        })
    }
}

/// The events of one lock, from [`Client::watch`]: a `Stream` of
/// `Result<WatchEvent, Error>`, the first item the lock's state
/// ([`EventKind::State`]).
///
/// It runs until dropped, unless the server or the connection ends it: then
/// its last item is an `Err` (`UNAVAILABLE` when the server shuts down, or
/// a broken connection; the key's access revoked; a protocol error), and
/// the caller watches again, on any server — the new stream starts with
/// the state again. A stream the server closes without an error just ends.
pub struct Watch {
    inner: Option<tonic::Streaming<pb::WatchEvent>>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("open", &self.inner.is_some())
            .finish()
    }
}

impl Stream for Watch {
    type Item = Result<WatchEvent, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let item = match Pin::new(inner).poll_next(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => None,
            Poll::Ready(Some(Ok(event))) => Some(WatchEvent::try_from(event)),
            Poll::Ready(Some(Err(status))) => Some(Err(Error::from_status(&status))),
        };
        // After an error (or the end) the stream is over.
        if !matches!(item, Some(Ok(_))) {
            self.inner = None;
        }
        Poll::Ready(item)
    }
}

impl Client {
    /// Watches the lock `key`: the state now, then one event per change
    /// (grants, releases, expiries and forced releases made through any
    /// server on the same store). Returns once a server has opened the
    /// stream, retrying `UNAVAILABLE` across endpoints like any call; a
    /// refusal (no access to the key, `--max-watches` reached) is the error.
    ///
    /// A watcher that reads too slowly is sent the latest state
    /// ([`EventKind::State`]) instead of a backlog. The stream never
    /// reconnects by itself: see [`Watch`].
    ///
    /// ```no_run
    /// # async fn demo(client: leasehold::client::Client) -> Result<(), leasehold::client::Error> {
    /// use tokio_stream::StreamExt;
    /// let mut events = client.watch("scheduler/leader").await?;
    /// while let Some(event) = events.next().await {
    ///     let event = event?; // Err: the stream is over; watch again
    ///     println!("{} holders: {}", event.kind, event.holders.len());
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn watch(&self, key: impl Into<String>) -> Result<Watch, Error> {
        let transport = &self.inner.transport;
        let request = pb::WatchRequest { key: key.into() };
        // Only the opening is bounded; the stream itself lasts as long as
        // the caller reads it (no grpc-timeout, which would end it).
        let open_within = transport.settings.connect_timeout + transport.settings.request_timeout;
        let mut retries = transport.retries();
        loop {
            let (i, channel) = transport.pick();
            let mut client = LockServiceClient::new(channel);
            let call = client.watch(Request::new(request.clone()));
            let status = match tokio::time::timeout(open_within, call).await {
                Ok(Ok(response)) => {
                    return Ok(Watch {
                        inner: Some(response.into_inner()),
                    });
                }
                Ok(Err(status)) => status,
                Err(_) => tonic::Status::unavailable(format!(
                    "no answer within {}",
                    humantime::format_duration(open_within)
                )),
            };
            if error::retryable(&status) {
                retries.failed(i, &status).await?;
            } else {
                return Err(Error::from_status(&status));
            }
        }
    }
}
