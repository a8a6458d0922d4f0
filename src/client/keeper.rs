//! The keeper: one background task per [`Client`](super::Client) that owns
//! its one KeepAlive stream and keeps every lock of every guard alive on it.
//!
//! It renews each lock about every ttl/3, declares a lock lost when the
//! server says so or when no renewal has succeeded within the TTL (on the
//! monotonic clock, from the send time of the last renewal that succeeded),
//! and when the stream breaks it reconnects — to the next endpoint, with
//! backoff — and re-attaches every held lock with its token. It never
//! decides anything about locks it was not given, and it holds no handle
//! to the client, so dropping the last client handle ends it.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Status;

use super::backoff::Backoff;
use super::error::{self, LostReason};
use super::transport::Transport;
use crate::pb;
use crate::pb::lock_service_client::LockServiceClient;

/// What a guard sees of its lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LockState {
    /// Held until `deadline` unless renewed; `ttl` is the TTL in force.
    Held { deadline: Instant, ttl: Duration },
    /// Not held any more.
    Lost(LostReason),
}

/// Requests from clients and guards to the keeper.
pub(crate) enum Command {
    /// Keep a freshly acquired lock alive. `granted_at` is no later than
    /// the moment the server set its TTL.
    Attach {
        key: String,
        token: String,
        ttl: Duration,
        granted_at: Instant,
        state: watch::Sender<LockState>,
    },
    /// Stop renewing and release over the stream (a dropped guard, or a
    /// `release().await` whose RPC failed), retried on every new stream
    /// until the lease would have expired (at most `ttl` from now).
    Release {
        key: String,
        token: String,
        ttl: Duration,
    },
    /// Stop renewing; the caller releases it by RPC (`release().await`).
    Forget { key: String, token: String },
}

/// One lock being kept alive.
struct Entry {
    token: String,
    ttl: Duration,
    /// Send time of the last renewal that succeeded (or the grant).
    last_ok: Instant,
    next_renew: Instant,
    /// Send time of the renewal awaiting its answer.
    in_flight: Option<Instant>,
    /// One per guard sharing this lease.
    states: Vec<watch::Sender<LockState>>,
}

impl Entry {
    fn deadline(&self) -> Instant {
        self.last_ok + self.ttl
    }

    fn publish(&self) {
        let state = LockState::Held {
            deadline: self.deadline(),
            ttl: self.ttl,
        };
        for s in &self.states {
            s.send_replace(state.clone());
        }
    }

    fn lose(self, reason: LostReason) {
        for s in &self.states {
            s.send_replace(LockState::Lost(reason));
        }
    }
}

/// A release that must reach the server (sent on the next stream if the
/// current one breaks first), until the lease would have expired anyway.
struct Releasing {
    until: Instant,
    sent: bool,
}

/// What was sent on the current stream and awaits an answer, per key in
/// order (the server answers requests for one key in order).
enum Sent {
    Renew { token: String, at: Instant },
    Release { token: String },
}

struct Stream {
    endpoint: usize,
    opened: Instant,
    tx: mpsc::UnboundedSender<pb::KeepAliveRequest>,
    rx: tonic::Streaming<pb::KeepAliveResponse>,
    sent: HashMap<String, VecDeque<Sent>>,
}

type Connecting = Pin<Box<dyn Future<Output = (usize, Result<Stream, Status>)> + Send>>;

/// Re-attachment in progress after a broken stream, for the log line that
/// says when every lock is safe again.
struct Reattach {
    broken_at: Instant,
    pending: usize,
    ok: usize,
}

pub(crate) struct Keeper {
    transport: Arc<Transport>,
    commands: mpsc::UnboundedReceiver<Command>,
    locks: HashMap<String, Entry>,
    releasing: HashMap<(String, String), Releasing>,
    stream: Option<Stream>,
    connecting: Option<Connecting>,
    backoff: Backoff,
    failures: usize,
    retry_at: Option<Instant>,
    broken_at: Option<Instant>,
    reattach: Option<Reattach>,
}

// One short-lived value per turn of the loop: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Event {
    Command(Option<Command>),
    Message(Result<Option<pb::KeepAliveResponse>, Status>),
    Connected(usize, Result<Stream, Status>),
    Tick,
}

/// How long a renewal may go unanswered before the stream is presumed
/// dead (a frozen server, a black-holed network) and replaced.
fn stall_after(ttl: Duration) -> Duration {
    (ttl / 3).clamp(Duration::from_millis(500), Duration::from_secs(5))
}

impl Keeper {
    pub(crate) fn new(
        transport: Arc<Transport>,
        commands: mpsc::UnboundedReceiver<Command>,
    ) -> Self {
        let backoff = Backoff::new(&transport.settings.retry);
        Self {
            transport,
            commands,
            locks: HashMap::new(),
            releasing: HashMap::new(),
            stream: None,
            connecting: None,
            backoff,
            failures: 0,
            retry_at: None,
            broken_at: None,
            reattach: None,
        }
    }

    /// Runs until every handle to the client is gone.
    pub(crate) async fn run(mut self) {
        loop {
            let now = Instant::now();
            self.expire(now);
            if self.stream.is_some() {
                if let Some(stalled) = self.stalled(now) {
                    self.broken(format!(
                        "a renewal got no answer within {}",
                        humantime::format_duration(stalled)
                    ));
                }
            }
            if self.stream.is_some() {
                self.send_due(now);
            } else if self.connecting.is_none()
                && self.has_work()
                && self.retry_at.is_none_or(|t| t <= now)
            {
                self.connect();
            }
            let wake = tokio::time::Instant::from_std(self.next_wake(now));
            let event = tokio::select! {
                command = self.commands.recv() => Event::Command(command),
                message = next_message(&mut self.stream) => Event::Message(message),
                (i, result) = connected(&mut self.connecting) => Event::Connected(i, result),
                _ = tokio::time::sleep_until(wake) => Event::Tick,
            };
            match event {
                Event::Command(None) => return,
                Event::Command(Some(command)) => self.command(command),
                Event::Message(Ok(Some(response))) => self.response(response),
                Event::Message(Ok(None)) => self.broken("the server ended the stream".into()),
                Event::Message(Err(status)) => self.broken(error::cause(&status)),
                Event::Connected(i, result) => {
                    self.connecting = None;
                    self.connected(i, result);
                }
                Event::Tick => {}
            }
        }
    }

    fn has_work(&self) -> bool {
        !self.locks.is_empty() || !self.releasing.is_empty()
    }

    fn command(&mut self, command: Command) {
        let now = Instant::now();
        match command {
            Command::Attach {
                key,
                token,
                ttl,
                granted_at,
                state,
            } => {
                if let Some(entry) = self.locks.get_mut(&key) {
                    if entry.token == token {
                        // A second guard on the same lease (a request id
                        // reused while held): they share it.
                        entry.states.push(state);
                        entry.publish();
                        return;
                    }
                    // The server granted a new token, so the old one is gone.
                    if let Some(old) = self.locks.remove(&key) {
                        old.lose(LostReason::NotHeld);
                    }
                }
                let entry = Entry {
                    token,
                    ttl,
                    last_ok: granted_at,
                    // Attach at once, so the lock is released if this
                    // process dies, and renew from a known send time.
                    next_renew: now,
                    in_flight: None,
                    states: vec![state],
                };
                entry.publish();
                self.locks.insert(key, entry);
            }
            Command::Release { key, token, ttl } => {
                let mut until = now + ttl;
                if let Some(entry) = self.take(&key, &token) {
                    until = until.max(entry.deadline());
                    entry.lose(LostReason::Released);
                }
                self.releasing
                    .insert((key, token), Releasing { until, sent: false });
            }
            Command::Forget { key, token } => {
                if let Some(entry) = self.take(&key, &token) {
                    entry.lose(LostReason::Released);
                }
            }
        }
    }

    /// Removes the entry of `key` if `token` holds it.
    fn take(&mut self, key: &str, token: &str) -> Option<Entry> {
        match self.locks.get(key) {
            Some(entry) if entry.token == token => self.locks.remove(key),
            _ => None,
        }
    }

    /// Declares lost every lock whose TTL ran out without a successful
    /// renewal, and asks the server to release it in case a late renewal
    /// did reach it.
    fn expire(&mut self, now: Instant) {
        let expired: Vec<String> = self
            .locks
            .iter()
            .filter(|(_, e)| now >= e.deadline())
            .map(|(k, _)| k.clone())
            .collect();
        for key in expired {
            if let Some(entry) = self.locks.remove(&key) {
                // Reported through `lost()`; a library does not shout.
                tracing::debug!(
                    key = key.as_str(),
                    ttl = %humantime::format_duration(entry.ttl),
                    "lock lost: no renewal succeeded within its TTL"
                );
                let until = now + entry.ttl;
                let token = entry.token.clone();
                entry.lose(LostReason::Expired);
                self.releasing
                    .insert((key, token), Releasing { until, sent: false });
            }
        }
        self.releasing.retain(|_, r| r.until > now);
    }

    /// The longest-unanswered renewal, if it has waited too long.
    fn stalled(&self, now: Instant) -> Option<Duration> {
        self.locks.values().find_map(|e| {
            let at = e.in_flight?;
            let limit = stall_after(e.ttl);
            (now.saturating_duration_since(at) >= limit).then_some(limit)
        })
    }

    /// Sends every renewal that is due and every release not yet sent.
    fn send_due(&mut self, now: Instant) {
        let Some(stream) = self.stream.as_mut() else {
            return;
        };
        if stream.tx.is_closed() {
            // The call is over (its end is on its way on the response
            // side); do not spin on a stream that takes nothing.
            self.broken("the stream closed".into());
            return;
        }
        for (key, entry) in &mut self.locks {
            if entry.in_flight.is_none() && entry.next_renew <= now {
                let request = pb::KeepAliveRequest {
                    key: key.clone(),
                    token: entry.token.clone(),
                    ttl_ms: 0,
                    release: false,
                };
                if stream.tx.send(request).is_ok() {
                    entry.in_flight = Some(now);
                    stream
                        .sent
                        .entry(key.clone())
                        .or_default()
                        .push_back(Sent::Renew {
                            token: entry.token.clone(),
                            at: now,
                        });
                }
            }
        }
        for ((key, token), releasing) in &mut self.releasing {
            if !releasing.sent {
                let request = pb::KeepAliveRequest {
                    key: key.clone(),
                    token: token.clone(),
                    ttl_ms: 0,
                    release: true,
                };
                if stream.tx.send(request).is_ok() {
                    releasing.sent = true;
                    stream
                        .sent
                        .entry(key.clone())
                        .or_default()
                        .push_back(Sent::Release {
                            token: token.clone(),
                        });
                }
            }
        }
    }

    /// Applies one answer from the server.
    fn response(&mut self, response: pb::KeepAliveResponse) {
        let now = Instant::now();
        let Some(stream) = self.stream.as_mut() else {
            return;
        };
        let key = response.key;
        let Some(queue) = stream.sent.get_mut(&key) else {
            tracing::debug!(
                key = key.as_str(),
                "KeepAlive answer for nothing sent; ignored"
            );
            return;
        };
        let sent = queue.pop_front();
        if queue.is_empty() {
            stream.sent.remove(&key);
        }
        match sent {
            None => {}
            Some(Sent::Release { token }) => {
                self.releasing.remove(&(key, token));
            }
            Some(Sent::Renew { token, at }) => {
                let Some(entry) = self.locks.get_mut(&key) else {
                    return;
                };
                if entry.token != token {
                    return;
                }
                entry.in_flight = None;
                if let Some(r) = self.reattach.as_mut() {
                    r.pending = r.pending.saturating_sub(1);
                }
                if now >= entry.deadline() {
                    // Too late: lost() may already have fired on the clock,
                    // and a lost lock never comes back.
                    return;
                }
                if response.alive {
                    entry.last_ok = entry.last_ok.max(at);
                    if response.ttl_ms > 0 {
                        entry.ttl = Duration::from_millis(response.ttl_ms.into());
                    }
                    entry.next_renew = entry.last_ok + entry.ttl / 3;
                    entry.publish();
                    if let Some(r) = self.reattach.as_mut() {
                        r.ok += 1;
                    }
                } else if let Some(entry) = self.locks.remove(&key) {
                    tracing::debug!(
                        key = key.as_str(),
                        "lock lost: the server says this lease no longer holds it"
                    );
                    entry.lose(LostReason::NotHeld);
                }
                if let Some(r) = &self.reattach {
                    if r.pending == 0 {
                        let endpoint = self
                            .stream
                            .as_ref()
                            .map(|s| self.transport.uri(s.endpoint))
                            .unwrap_or_default();
                        tracing::info!(
                            endpoint,
                            reattached = r.ok,
                            after_ms = now.duration_since(r.broken_at).as_millis() as u64,
                            "re-attached locks after the KeepAlive stream broke"
                        );
                        self.reattach = None;
                    }
                }
            }
        }
    }

    /// The stream broke: forget what was in flight on it and reconnect,
    /// starting with the next endpoint.
    fn broken(&mut self, cause: String) {
        let Some(stream) = self.stream.take() else {
            return;
        };
        let now = Instant::now();
        self.transport.failed(stream.endpoint);
        for entry in self.locks.values_mut() {
            entry.in_flight = None;
        }
        for releasing in self.releasing.values_mut() {
            releasing.sent = false;
        }
        self.broken_at = Some(now);
        self.reattach = None;
        if now.duration_since(stream.opened) < Duration::from_secs(1) {
            // Streams that break as soon as they open (a server whose store
            // is down) are retried with backoff, not in a tight loop.
            self.failures += 1;
            self.retry_at = Some(now + self.backoff.next_delay());
        } else {
            self.failures = 0;
            self.backoff.reset();
            self.retry_at = None;
        }
        if self.has_work() {
            tracing::info!(
                endpoint = self.transport.uri(stream.endpoint),
                %cause,
                locks = self.locks.len(),
                "KeepAlive stream broke; reconnecting to re-attach locks"
            );
        } else {
            tracing::debug!(endpoint = self.transport.uri(stream.endpoint), %cause, "idle KeepAlive stream ended");
        }
    }

    /// Starts opening a stream on the current endpoint.
    fn connect(&mut self) {
        let (i, channel) = self.transport.pick();
        let limit =
            self.transport.settings.connect_timeout + self.transport.settings.request_timeout;
        self.connecting = Some(Box::pin(async move {
            let (tx, rx) = mpsc::unbounded_channel();
            let mut client = LockServiceClient::new(channel);
            let call = client.keep_alive(UnboundedReceiverStream::new(rx));
            let result = match tokio::time::timeout(limit, call).await {
                Ok(Ok(response)) => Ok(Stream {
                    endpoint: i,
                    opened: Instant::now(),
                    tx,
                    rx: response.into_inner(),
                    sent: HashMap::new(),
                }),
                Ok(Err(status)) => Err(status),
                Err(_) => Err(Status::unavailable(format!(
                    "no answer within {}",
                    humantime::format_duration(limit)
                ))),
            };
            (i, result)
        }));
    }

    fn connected(&mut self, i: usize, result: Result<Stream, Status>) {
        let now = Instant::now();
        match result {
            Ok(stream) => {
                tracing::debug!(endpoint = self.transport.uri(i), "KeepAlive stream open");
                // Backoff is reset only once the stream has proved healthy
                // (see `broken`).
                self.stream = Some(stream);
                self.retry_at = None;
                // Re-attach everything at once, with the same tokens.
                for entry in self.locks.values_mut() {
                    entry.next_renew = now;
                    entry.in_flight = None;
                }
                if let Some(broken_at) = self.broken_at.take() {
                    if !self.locks.is_empty() {
                        self.reattach = Some(Reattach {
                            broken_at,
                            pending: self.locks.len(),
                            ok: 0,
                        });
                    }
                }
            }
            Err(status) => {
                self.transport.failed(i);
                self.failures += 1;
                let delay = if self.failures % self.transport.len() == 0 {
                    self.backoff.next_delay()
                } else {
                    Duration::ZERO
                };
                tracing::debug!(endpoint = self.transport.uri(i), cause = %error::cause(&status), ?delay, "could not open a KeepAlive stream");
                self.retry_at = Some(now + delay);
            }
        }
    }

    /// When the loop must next look at the time.
    fn next_wake(&self, now: Instant) -> Instant {
        let mut wake = now + Duration::from_secs(3600);
        for entry in self.locks.values() {
            wake = wake.min(entry.deadline());
            if self.stream.is_some() {
                match entry.in_flight {
                    Some(at) => wake = wake.min(at + stall_after(entry.ttl)),
                    None => wake = wake.min(entry.next_renew),
                }
            }
        }
        for releasing in self.releasing.values() {
            wake = wake.min(releasing.until);
        }
        if self.stream.is_none() && self.connecting.is_none() && self.has_work() {
            if let Some(t) = self.retry_at {
                wake = wake.min(t);
            }
        }
        wake.max(now)
    }
}

async fn next_message(
    stream: &mut Option<Stream>,
) -> Result<Option<pb::KeepAliveResponse>, Status> {
    match stream {
        Some(s) => s.rx.message().await,
        None => std::future::pending().await,
    }
}

async fn connected(connecting: &mut Option<Connecting>) -> (usize, Result<Stream, Status>) {
    match connecting {
        Some(fut) => fut.await,
        None => std::future::pending().await,
    }
}

/// A future that completes when `state` says the lock is lost, or when its
/// deadline passes on the monotonic clock, whichever comes first: it does
/// not depend on the keeper task running in time.
pub(crate) async fn lost(mut state: watch::Receiver<LockState>) -> LostReason {
    loop {
        let current = state.borrow_and_update().clone();
        match current {
            LockState::Lost(reason) => return reason,
            LockState::Held { deadline, .. } => {
                let deadline = tokio::time::Instant::from_std(deadline);
                tokio::select! {
                    changed = state.changed() => {
                        if changed.is_err() {
                            return match &*state.borrow() {
                                LockState::Lost(reason) => *reason,
                                LockState::Held { .. } => LostReason::ClientClosed,
                            };
                        }
                    }
                    _ = tokio::time::sleep_until(deadline) => return LostReason::Expired,
                }
            }
        }
    }
}
