//! What a caller holds: [`Lease`] (the facts of a grant), [`LockGuard`] (a
//! lease kept alive by the client's keeper, released on drop) and [`Lost`]
//! (the future that says the lock is gone).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::watch;

use super::Client;
use super::clock::BootInstant;
use super::error::{Error, LostReason};
use super::keeper::{self, Command, LockState};
use super::lock::Grant;

/// One grant of a lock, as the server reported it.
///
/// The `token` is the secret that proves ownership: anyone who has it can
/// renew or release the lock, so `Debug` redacts it. The `fencing_token`
/// is public: pass it with every write to the resource the lock protects,
/// and have the resource reject writes with a smaller one than it has seen.
#[derive(Clone, PartialEq, Eq)]
pub struct Lease {
    /// The lock's name.
    pub key: String,
    /// The secret proving ownership.
    pub token: String,
    /// Larger than that of every earlier grant of this key.
    pub fencing_token: u64,
    /// The TTL granted: the lease expires this long after its grant or last
    /// renewal unless renewed.
    pub ttl: Duration,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.key)
            .field("token", &"<redacted>")
            .field("fencing_token", &self.fencing_token)
            .field("ttl", &self.ttl)
            .finish()
    }
}

/// Who holds a lock now, as [`Client::describe`] reports it. Deliberately
/// has no token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockInfo {
    /// The holder's free-text owner.
    pub owner: String,
    /// The current grant's fencing token.
    pub fencing_token: u64,
    /// How long the lease has left unless renewed.
    pub ttl_remaining: Duration,
    /// The holder's metadata.
    pub metadata: HashMap<String, String>,
}

/// A held lock, kept alive by its [`Client`] until released or dropped.
///
/// All guards of one client are renewed over the client's single KeepAlive
/// stream, at about a third of their TTL. If that stream breaks, the client
/// reconnects (to another endpoint if needed) and re-attaches the lock
/// before its TTL runs out. Watch [`LockGuard::lost`]: a lock can be lost
/// while held (the server expired it, or no renewal got through in time),
/// and work done under a lost lock is no longer exclusive.
///
/// Dropping a guard releases the lock in the background;
/// [`LockGuard::release`] releases it and waits for the answer. So bind
/// the guard to a name for as long as the work runs: `let _ =
/// client.lock(k).await?` (the compiler's own hint for an unused
/// `#[must_use]` value) drops it on the spot and releases the lock at
/// once, while `let _guard = ...` holds it to the end of the scope.
///
/// Locks are not re-entrant. Tasks that share one [`Client`] (or clones of
/// it) exclude each other like separate clients do: a task that asks for a
/// key another guard of the same client holds waits until that guard is
/// released, and a bounded wait that runs out says so
/// ([`Error::HeldByThisClient`]) rather than blaming another client. A task
/// that waits without bound for a lock it holds itself waits forever, as
/// with any mutex.
///
/// ```no_run
/// # async fn demo() -> Result<(), leasehold::client::Error> {
/// use std::time::Duration;
/// let client = leasehold::client::Client::connect("http://127.0.0.1:50051").await?;
/// let guard = client.lock("reports/nightly").ttl(Duration::from_secs(10)).await?;
/// println!("holding {} with fencing token {}", guard.key(), guard.fencing_token());
/// tokio::select! {
///     reason = guard.lost() => eprintln!("lost the lock: {reason}"),
///     _ = tokio::time::sleep(Duration::from_secs(60)) => {}
/// }
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[must_use = "dropping a LockGuard releases the lock at once"]
pub struct LockGuard {
    client: Client,
    lease: Lease,
    request_id: String,
    state: watch::Receiver<LockState>,
    done: bool,
    /// This guard's entry in the client's held keys.
    held_id: u64,
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("lease", &self.lease)
            .field("state", &*self.state.borrow())
            .finish()
    }
}

impl LockGuard {
    /// Hands a grant to the client's keeper. Synchronous on purpose: from
    /// the moment the grant arrives there is no `.await` before the guard
    /// exists, so a cancelled caller still releases it (on drop).
    pub(crate) fn attach(client: Client, grant: Grant) -> Self {
        let Grant {
            lease,
            request_id,
            deadline,
            gone_by,
        } = grant;
        let (tx, rx) = watch::channel(LockState::Attaching {
            deadline,
            ttl: lease.ttl,
        });
        client.inner.command(Command::Attach {
            key: lease.key.clone(),
            token: lease.token.clone(),
            fencing_token: lease.fencing_token,
            ttl: lease.ttl,
            deadline,
            gone_by,
            state: tx,
        });
        let held_id = client.inner.held.insert(&lease.key, rx.clone());
        Self {
            client,
            lease,
            request_id,
            state: rx,
            done: false,
            held_id,
        }
    }

    /// Waits for the server's answer to the attach (the lock's first
    /// renewal on the KeepAlive stream).
    pub(crate) async fn attached(&self) -> Result<(), Error> {
        keeper::attached(self.state.clone())
            .await
            .map_err(|reason| Error::Lost {
                key: self.lease.key.clone(),
                reason,
            })
    }

    /// The lock's name.
    pub fn key(&self) -> &str {
        &self.lease.key
    }

    /// The secret token of this lease (for a process that must hand it to
    /// another; never log it).
    pub fn token(&self) -> &str {
        &self.lease.token
    }

    /// The fencing token of this grant: send it with every write to the
    /// protected resource so that it can refuse a stale holder.
    pub fn fencing_token(&self) -> u64 {
        self.lease.fencing_token
    }

    /// The TTL in force: the lock is lost if no renewal succeeds for this
    /// long.
    pub fn ttl(&self) -> Duration {
        match &*self.state.borrow() {
            LockState::Held { ttl, .. } | LockState::Attaching { ttl, .. } => *ttl,
            LockState::Lost(_) => self.lease.ttl,
        }
    }

    /// The lease as granted.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// The request id the Acquire carried (generated unless the builder set
    /// one): an Acquire retried with it returns this same lease.
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// Whether the lock is known to be lost now (the server said so, or its
    /// deadline passed without a successful renewal).
    pub fn is_lost(&self) -> bool {
        known_lost(&self.state.borrow())
    }

    /// How long the lock is sure to stay valid from now unless renewed
    /// (zero once lost): the server may expire it at the end of this, not
    /// before. Work that must finish under the lock should fit in it, or
    /// watch [`LockGuard::lost`].
    pub fn valid_for(&self) -> Duration {
        match &*self.state.borrow() {
            LockState::Held { deadline, .. }
            | LockState::Attaching {
                deadline: Some(deadline),
                ..
            } => deadline.remaining(),
            _ => Duration::ZERO,
        }
    }

    /// A future that completes when the lock is lost: a renewal answered
    /// that the lease no longer holds it, or its deadline passed — the TTL
    /// from the send time of the last renewal answered alive, measured on
    /// the boot clock (which counts a host suspend), so it fires even when
    /// no server can be reached, and never after the server's own expiry.
    /// It fires at once if the client gave up on a stalled stream the
    /// lock was still attached to. Call it as often as needed; each future
    /// is independent and `'static`.
    ///
    /// Renewals run as a task on the Tokio runtime the client was connected
    /// on, so they need that runtime free to run them. A runtime blocked
    /// for longer than the TTL loses the lock: on a current-thread runtime
    /// (`#[tokio::main(flavor = "current_thread")]`, `#[tokio::test]`) one
    /// `std::thread::sleep` or CPU-bound loop is enough (seen: a 3 s
    /// `thread::sleep` under a 2 s TTL). Put blocking work on
    /// `tokio::task::spawn_blocking` or a multi-thread runtime, and keep
    /// `lost()` in a `select!` with the work.
    pub fn lost(&self) -> Lost {
        Lost(Box::pin(keeper::lost(self.state.clone())))
    }

    /// Releases the lock and waits for the server's answer: `Ok(true)` if
    /// this call released it, `Ok(false)` if it had already been lost (so
    /// the work done under it may not have been exclusive to the end).
    ///
    /// A guard that already knows its lock is lost answers `Ok(false)` at
    /// once, without a call.
    pub async fn release(mut self) -> Result<bool, Error> {
        self.done = true;
        self.client.inner.held.remove(&self.lease.key, self.held_id);
        let lost = self.is_lost();
        self.client.inner.command(Command::Forget {
            key: self.lease.key.clone(),
            token: self.lease.token.clone(),
        });
        if lost {
            // Just in case a late renewal kept it: released in the background.
            self.client.inner.command(Command::Release {
                key: self.lease.key.clone(),
                token: self.lease.token.clone(),
                ttl: self.lease.ttl,
            });
            return Ok(false);
        }
        let result = self
            .client
            .release(self.lease.key.clone(), self.lease.token.clone())
            .await;
        if result.is_err() {
            // Could not reach a server: the keeper keeps trying over the
            // stream until the lease would have expired anyway.
            self.client.inner.command(Command::Release {
                key: self.lease.key.clone(),
                token: self.lease.token.clone(),
                ttl: self.lease.ttl,
            });
        }
        result
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.client.inner.held.remove(&self.lease.key, self.held_id);
        // A lost lock has nothing left to release (an expired one was
        // already released by the keeper, just in case).
        let lost = matches!(&*self.state.borrow(), LockState::Lost(_));
        if !self.done && !lost {
            self.client.inner.command(Command::Release {
                key: self.lease.key.clone(),
                token: self.lease.token.clone(),
                ttl: self.ttl(),
            });
        }
    }
}

/// Whether a guard in `state` knows its lock is lost now: the keeper said
/// so, or its deadline passed without a successful renewal.
pub(crate) fn known_lost(state: &LockState) -> bool {
    match state {
        LockState::Held { deadline, .. } => BootInstant::now() >= *deadline,
        LockState::Attaching { deadline, .. } => deadline.is_some_and(|d| BootInstant::now() >= d),
        LockState::Lost(_) => true,
    }
}

/// Completes with the reason when a [`LockGuard`]'s lock is lost (see
/// [`LockGuard::lost`]). Owns what it needs, so it can be moved into a task
/// or a `select!` while the guard stays put.
pub struct Lost(Pin<Box<dyn Future<Output = LostReason> + Send>>);

impl Future for Lost {
    type Output = LostReason;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<LostReason> {
        self.0.as_mut().poll(cx)
    }
}

impl fmt::Debug for Lost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Lost")
    }
}
