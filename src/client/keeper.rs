//! The keeper: one background task per [`Client`](super::Client) that owns
//! its KeepAlive stream and keeps every lock of every guard alive on it.
//!
//! It renews each lock about every ttl/3 and declares a lock lost when the
//! server says so or when its deadline passes: the grant's own deadline
//! (`Lease.valid_for_ms` from the Acquire's send time), pushed to
//! (send time of a renewal answered alive) + TTL by each renewal, all on the
//! boot clock ([`BootInstant`]), which counts a host suspend.
//!
//! When the stream breaks it reconnects — to the next endpoint, with
//! backoff — and re-attaches every held lock with its token. When a renewal
//! goes unanswered too long (a stall), it does not drop that stream at
//! once: the server releases whatever is attached to a stream that ends,
//! so it first re-attaches every lock through a new stream (the server
//! moves the stream-end release to a lock's latest attachment) and drops
//! the stalled one only when none of its locks still depends on it. A lock
//! still on a stream the keeper gives up on is lost at that instant.
//!
//! It never decides anything about locks it was not given, and it holds no
//! handle to the client, so dropping the last client handle ends it.

mod renewals;
mod streams;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Status;

use super::backoff::Backoff;
use super::clock::{self, BootInstant};
use super::error::{self, LostReason};
use super::transport::Transport;
use crate::pb;
use crate::pb::lock_service_client::LockServiceClient;

/// What a guard sees of its lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LockState {
    /// Granted, and the attach to the KeepAlive stream not answered yet.
    /// `deadline`: when the lease is sure to be valid until, if known
    /// (unknown after a waiting Acquire answered by a server that does not
    /// send `valid_for_ms`: not trusted before the first renewal).
    Attaching {
        deadline: Option<BootInstant>,
        ttl: Duration,
    },
    /// Held until `deadline` unless renewed; `ttl` is the TTL in force.
    Held {
        deadline: BootInstant,
        ttl: Duration,
    },
    /// Not held any more.
    Lost(LostReason),
}

/// Requests from clients and guards to the keeper.
pub(crate) enum Command {
    /// Keep a freshly acquired lock alive.
    Attach {
        key: String,
        token: String,
        /// For the log line when the lock is lost.
        fencing_token: u64,
        ttl: Duration,
        /// Until when the grant is sure to be valid, if known.
        deadline: Option<BootInstant>,
        /// When the grant is surely gone if no renewal answered alive
        /// (its reply's arrival + TTL).
        gone_by: BootInstant,
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
    fencing_token: u64,
    ttl: Duration,
    /// Valid until then unless renewed (when `known`); else the instant it
    /// is surely gone unless a renewal answers alive first.
    deadline: BootInstant,
    known: bool,
    /// A renewal was answered alive (the attach is done).
    attached: bool,
    next_renew: BootInstant,
    /// Send time of the renewal awaiting its answer on the active stream.
    in_flight: Option<BootInstant>,
    /// A renewal sent on the draining stream awaits its answer.
    old_pending: bool,
    /// Does not depend on the draining stream any more: a renewal sent on
    /// the active stream after the draining one's last answer came back
    /// alive (so the active stream is its latest attachment).
    moved: bool,
    /// One per guard sharing this lease.
    states: Vec<watch::Sender<LockState>>,
    /// The server of the stream that renewed it last may end that stream
    /// (and release it) once the connection has been silent for its
    /// `leasehold-silence-release-ms`: belief ends before that, counted
    /// from the send time of the last renewal answered alive.
    silence_bound: Option<BootInstant>,
}

impl Entry {
    /// When the client stops believing it holds the lock.
    fn until(&self) -> BootInstant {
        let lease = believed_until(self.deadline, self.ttl);
        self.silence_bound.map_or(lease, |bound| lease.min(bound))
    }

    fn state(&self) -> LockState {
        if self.attached {
            LockState::Held {
                deadline: self.until(),
                ttl: self.ttl,
            }
        } else {
            LockState::Attaching {
                deadline: self.known.then_some(self.until()),
                ttl: self.ttl,
            }
        }
    }

    fn publish(&self) {
        let state = self.state();
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
    until: BootInstant,
    /// The stream it was sent on.
    sent: Option<u64>,
}

/// What was sent on a stream and awaits an answer, per key in order (the
/// server answers requests for one key in order).
enum Sent {
    Renew {
        token: String,
        at: BootInstant,
        /// Sent while no renewal of this lock was pending on the draining
        /// stream: an alive answer makes this stream its latest attachment.
        clean: bool,
    },
    Release {
        token: String,
    },
}

struct Stream {
    id: u64,
    endpoint: usize,
    opened: BootInstant,
    tx: mpsc::UnboundedSender<pb::KeepAliveRequest>,
    rx: tonic::Streaming<pb::KeepAliveResponse>,
    sent: HashMap<String, VecDeque<Sent>>,
    /// The server's `leasehold-silence-release-ms`, if it sent one.
    silence: Option<Duration>,
}

type Connecting = Pin<Box<dyn Future<Output = (usize, Result<Stream, Status>)> + Send>>;

/// Re-attachment in progress after a broken stream, for the log line that
/// says when every lock is safe again.
struct Reattach {
    broken_at: BootInstant,
    pending: usize,
    ok: usize,
}

pub(crate) struct Keeper {
    transport: Arc<Transport>,
    commands: mpsc::UnboundedReceiver<Command>,
    locks: HashMap<String, Entry>,
    releasing: HashMap<(String, String), Releasing>,
    /// The stream renewals go to.
    stream: Option<Stream>,
    /// A stalled stream kept open (and read) until every lock on it has
    /// moved to `stream`: ending it would release them.
    draining: Option<Stream>,
    connecting: Option<Connecting>,
    next_id: u64,
    backoff: Backoff,
    failures: usize,
    retry_at: Option<BootInstant>,
    broken_at: Option<BootInstant>,
    reattach: Option<Reattach>,
}

// One short-lived value per turn of the loop: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Event {
    Command(Option<Command>),
    Message(Result<Option<pb::KeepAliveResponse>, Status>),
    Old(Result<Option<pb::KeepAliveResponse>, Status>),
    Connected(usize, Result<Stream, Status>),
    Tick,
}

/// KeepAlive response header: how long the server lets a client connection
/// stay silent before it may end its streams and release their locks (the
/// server's HTTP/2 PING interval + timeout).
pub(crate) const SILENCE_RELEASE_HEADER: &str = "leasehold-silence-release-ms";

/// How long before a lease's deadline the client stops believing it holds
/// the lock (at most a tenth of the TTL): room for a late timer and a busy
/// runtime between the deadline and the instant `lost()` is seen.
pub(crate) const LOST_MARGIN: Duration = Duration::from_millis(50);

/// The instant belief ends for a lease valid until `deadline`.
fn believed_until(deadline: BootInstant, ttl: Duration) -> BootInstant {
    deadline.saturating_sub(LOST_MARGIN.min(ttl / 10))
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
        let backoff = transport.settings.retry.backoff();
        Self {
            transport,
            commands,
            locks: HashMap::new(),
            releasing: HashMap::new(),
            stream: None,
            draining: None,
            connecting: None,
            next_id: 0,
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
            let now = BootInstant::now();
            self.expire(now);
            if self.stream.is_some() {
                if let Some(stalled) = self.stalled(now) {
                    self.stall(format!(
                        "a renewal got no answer within {}",
                        humantime::format_duration(stalled)
                    ));
                }
            }
            self.finish_drain();
            if self.stream.is_some() {
                self.send_due(now);
            } else if self.connecting.is_none()
                && self.has_work()
                && self.retry_at.is_none_or(|t| t <= now)
            {
                self.connect();
            }
            let wake = self.next_wake(now);
            let event = tokio::select! {
                command = self.commands.recv() => Event::Command(command),
                message = next_message(&mut self.stream) => Event::Message(message),
                message = next_message(&mut self.draining) => Event::Old(message),
                (i, result) = connected(&mut self.connecting) => Event::Connected(i, result),
                _ = tokio::time::sleep_until(wake) => Event::Tick,
            };
            match event {
                Event::Command(None) => return,
                Event::Command(Some(command)) => self.command(command),
                Event::Message(Ok(Some(response))) => self.response(response, false),
                Event::Message(Ok(None)) => self.broken("the server ended the stream".into()),
                Event::Message(Err(status)) => self.broken(error::cause(&status)),
                Event::Old(Ok(Some(response))) => self.response(response, true),
                Event::Old(Ok(None)) => self.abandon_draining("the server ended it"),
                Event::Old(Err(status)) => self.abandon_draining(&error::cause(&status)),
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
        let now = BootInstant::now();
        match command {
            Command::Attach {
                key,
                token,
                fencing_token,
                ttl,
                deadline,
                gone_by,
                state,
            } => {
                // A release of this very lease still queued (a guard dropped
                // while no stream was up) would undo this attach: cancel it.
                // One already sent is answered first; the renewal after it
                // then says the lease is gone.
                let queued = (key.clone(), token.clone());
                if self
                    .releasing
                    .get(&queued)
                    .is_some_and(|r| r.sent.is_none())
                {
                    self.releasing.remove(&queued);
                }
                if let Some(entry) = self.locks.get_mut(&key) {
                    if entry.token == token {
                        // A second guard on the same lease (a request id
                        // reused while held): they share it.
                        if let Some(d) = deadline {
                            entry.deadline = if entry.known {
                                entry.deadline.max(d)
                            } else {
                                d
                            };
                            entry.known = true;
                        }
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
                    fencing_token,
                    ttl,
                    deadline: deadline.unwrap_or(gone_by),
                    known: deadline.is_some(),
                    attached: false,
                    // Attach at once, so the lock is released if this
                    // process dies, and renew from a known send time.
                    next_renew: now,
                    in_flight: None,
                    old_pending: false,
                    // Never sent on the draining stream.
                    moved: true,
                    states: vec![state],
                    silence_bound: None,
                };
                entry.publish();
                self.locks.insert(key, entry);
            }
            Command::Release { key, token, ttl } => {
                let mut until = now + ttl;
                if let Some(entry) = self.take(&key, &token) {
                    until = until.max(entry.deadline);
                    entry.lose(LostReason::Released);
                }
                self.releasing
                    .insert((key, token), Releasing { until, sent: None });
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

    /// Declares lost every lock whose deadline passed without a successful
    /// renewal, and asks the server to release it in case a late renewal
    /// did reach it.
    fn expire(&mut self, now: BootInstant) {
        let expired: Vec<String> = self
            .locks
            .iter()
            .filter(|(_, e)| now >= e.until())
            .map(|(k, _)| k.clone())
            .collect();
        for key in expired {
            if let Some(entry) = self.locks.remove(&key) {
                tracing::warn!(
                    key = key.as_str(),
                    fencing_token = entry.fencing_token,
                    ttl = %humantime::format_duration(entry.ttl),
                    "lock lost: no renewal succeeded before its deadline"
                );
                self.lose_and_release(key, entry, LostReason::Expired, now);
            }
        }
        self.releasing.retain(|_, r| r.until > now);
    }

    fn lose_and_release(&mut self, key: String, entry: Entry, why: LostReason, now: BootInstant) {
        let until = now + entry.ttl;
        let token = entry.token.clone();
        entry.lose(why);
        self.releasing
            .insert((key, token), Releasing { until, sent: None });
    }

    /// The longest-unanswered renewal, if it has waited too long.
    fn stalled(&self, now: BootInstant) -> Option<Duration> {
        self.locks.values().find_map(|e| {
            let at = e.in_flight?;
            let limit = stall_after(e.ttl);
            (now.saturating_duration_since(at) >= limit).then_some(limit)
        })
    }

    /// When the loop must next look at the time (on the boot clock, looked
    /// at again at least every second while locks are held).
    fn next_wake(&self, now: BootInstant) -> tokio::time::Instant {
        let mut wake = now + Duration::from_secs(3600);
        let draining = self.draining.is_some();
        for entry in self.locks.values() {
            wake = wake.min(entry.until());
            if self.stream.is_some() {
                match entry.in_flight {
                    Some(at) => wake = wake.min(at + stall_after(entry.ttl)),
                    None if draining && !entry.moved && !entry.old_pending => wake = now,
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
        let mut sleep = wake.saturating_duration_since(now);
        if !self.locks.is_empty() {
            sleep = sleep.min(Duration::from_secs(1));
        }
        tokio::time::Instant::now() + sleep
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

/// Waits until the attach is answered: the lock is held (`Ok`) or lost.
pub(crate) async fn attached(mut state: watch::Receiver<LockState>) -> Result<(), LostReason> {
    loop {
        let current = state.borrow_and_update().clone();
        match current {
            LockState::Held { .. } => return Ok(()),
            LockState::Lost(reason) => return Err(reason),
            LockState::Attaching { .. } => {
                // The keeper expires it by its deadline at the latest.
                if state.changed().await.is_err() {
                    return Err(LostReason::ClientClosed);
                }
            }
        }
    }
}

/// A future that completes when `state` says the lock is lost, or when its
/// deadline passes on the boot clock, whichever comes first: it does not
/// depend on the keeper task running in time.
pub(crate) async fn lost(mut state: watch::Receiver<LockState>) -> LostReason {
    loop {
        let current = state.borrow_and_update().clone();
        let deadline = match current {
            LockState::Lost(reason) => return reason,
            LockState::Held { deadline, .. } => Some(deadline),
            LockState::Attaching { deadline, .. } => deadline,
        };
        let sleep = async {
            match deadline {
                Some(d) => clock::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = state.changed() => {
                if changed.is_err() {
                    return match &*state.borrow() {
                        LockState::Lost(reason) => *reason,
                        _ => LostReason::ClientClosed,
                    };
                }
            }
            _ = sleep => return LostReason::Expired,
        }
    }
}

#[cfg(test)]
mod tests;
