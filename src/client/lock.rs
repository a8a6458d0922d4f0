//! Taking a lock: [`LockBuilder`] and its Acquire loop (server-side waiting
//! in bounded slices, retries with one request id, failover).

use std::collections::HashMap;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::time::{Duration, Instant};

use super::clock::BootInstant;

use tonic::Request;

use super::error::{self, Error};
use super::guard::{Lease, LockGuard};
use super::{Client, new_request_id};
use crate::pb;
use crate::pb::lock_service_client::LockServiceClient;

/// The longest server-side wait one Acquire call asks for. Longer waits are
/// several calls in a row, so they never exceed the server's `--max-wait`
/// (5 minutes by default) and a dead connection is noticed within a slice.
pub const WAIT_SLICE: Duration = Duration::from_secs(60);

/// Options for taking one lock; made by [`Client::lock`]. Await it (or
/// call [`LockBuilder::acquire`]) for a [`LockGuard`].
///
/// By default it waits as long as it takes for the lock (set
/// [`LockBuilder::wait`] to bound that; `Duration::ZERO` tries once), asks
/// for the server's default TTL, and generates a request id, which every
/// retry of the Acquire carries so that a lost reply is answered with the
/// same lease instead of leaving it orphaned.
///
/// ```no_run
/// # async fn demo(client: leasehold::client::Client) -> Result<(), leasehold::client::Error> {
/// use std::time::Duration;
/// let guard = client
///     .lock("db/migrations")
///     .ttl(Duration::from_secs(15))
///     .wait(Duration::from_secs(30))
///     .owner("deploy-42")
///     .metadata("commit", "abc123")
///     .await?;
/// # drop(guard); Ok(()) }
/// ```
#[must_use = "a LockBuilder does nothing until awaited"]
#[derive(Debug, Clone)]
pub struct LockBuilder {
    client: Client,
    key: String,
    ttl: Option<Duration>,
    wait: Option<Duration>,
    owner: String,
    metadata: HashMap<String, String>,
    request_id: Option<String>,
    /// `Some(limit)` for a shared hold.
    shared: Option<u32>,
}

fn ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

impl LockBuilder {
    pub(crate) fn new(client: Client, key: String) -> Self {
        Self {
            client,
            key,
            ttl: None,
            wait: None,
            owner: String::new(),
            metadata: HashMap::new(),
            request_id: None,
            shared: None,
        }
    }

    /// The TTL to ask for (the server bounds it; outside its bounds is
    /// [`Error::InvalidArgument`]). Without it, the server's default. The
    /// lock is renewed at about a third of it.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// How long to wait for a held lock before giving up with
    /// [`Error::NotAcquired`]; `Duration::ZERO` tries once. The wait happens
    /// in the server, woken by the holder's release or expiry.
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }

    /// Waits as long as it takes (the default).
    pub fn wait_forever(mut self) -> Self {
        self.wait = None;
        self
    }

    /// Free text shown by Describe: who holds the lock (a host, a pid, a
    /// job id).
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = owner.into();
        self
    }

    /// Adds one small key/value pair shown by Describe.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// The request id of the Acquire, instead of a generated one. An
    /// Acquire with the id of the lease that holds the lock returns that
    /// lease; use one to resume a lock across a retry you control. Two
    /// guards of one client on the same lease share it: releasing either
    /// releases it.
    pub fn request_id(mut self, id: impl Into<String>) -> Self {
        self.request_id = Some(id.into());
        self
    }

    /// Takes the lock SHARED instead of exclusive: up to `limit` holders at
    /// once (0 = no limit), never beside an exclusive holder. A semaphore of
    /// N permits is `.shared(N)` on every holder; a read/write lock is
    /// `.shared(0)` for readers and the default (exclusive) for writers,
    /// and a waiting writer keeps later readers out. Every holder of a key
    /// must ask for the same limit while any holds it, or the Acquire fails
    /// with `FAILED_PRECONDITION` ([`Error::Rpc`]).
    ///
    /// One [`Client`] keeps one lease per key alive: to hold two permits
    /// of one semaphore in one process, use two clients.
    pub fn shared(mut self, limit: u32) -> Self {
        self.shared = Some(limit);
        self
    }

    /// Takes the lock and keeps it alive until the guard is released or
    /// dropped.
    ///
    /// Returns once the server has answered the lock's first renewal on
    /// the client's KeepAlive stream (the attach): from then on, the end
    /// of this process releases the lock at once. If that answer says the
    /// lease is gone (a grant that arrived after its TTL), or none comes
    /// before the lease's deadline, the result is [`Error::Lost`].
    ///
    /// Keep the guard in a named binding: `let _ = client.lock(k).await?`
    /// drops it at once, and dropping a guard releases the lock.
    ///
    /// While no server answers, each call is retried on every endpoint for
    /// the client's retry window ([`ClientBuilder::retry_for`], 10 s by
    /// default) before [`Error::Unavailable`]; the window starts again
    /// whenever a server answers. To bound the whole call, wrap it in
    /// `tokio::time::timeout`: dropping it at any `.await` leaves nothing
    /// held (a grant that arrives meanwhile is released).
    ///
    /// [`ClientBuilder::retry_for`]: super::ClientBuilder::retry_for
    pub async fn acquire(self) -> Result<LockGuard, Error> {
        let client = self.client.clone();
        let grant = self.grant().await?;
        // Cancel-safe: dropped while waiting, the guard releases the lock.
        let guard = LockGuard::attach(client, grant);
        guard.attached().await?;
        Ok(guard)
    }

    /// Takes the lock *without* keeping it alive: the lease expires after
    /// its TTL unless renewed ([`Client::renew`]) or released
    /// ([`Client::release`]). For scripts and for processes that hand the
    /// token to another; everything else wants [`LockBuilder::acquire`].
    pub async fn lease(self) -> Result<Lease, Error> {
        self.grant().await.map(|grant| grant.lease)
    }

    /// Takes the lock, runs `work` with the lease, and releases the lock
    /// when it finishes. If the lock is lost first, `work` is dropped at its
    /// next `.await` and the result is [`Error::Lost`]: write your work so
    /// that stopping there is safe, and fence your writes with
    /// [`Lease::fencing_token`].
    ///
    /// ```no_run
    /// # async fn demo(client: leasehold::client::Client) -> Result<(), leasehold::client::Error> {
    /// let rows = client
    ///     .lock("reports/nightly")
    ///     .run(|lease| async move {
    ///         // ... write with lease.fencing_token ...
    ///         42
    ///     })
    ///     .await?;
    /// # let _ = rows; Ok(()) }
    /// ```
    pub async fn run<F, Fut, T>(self, work: F) -> Result<T, Error>
    where
        F: FnOnce(Lease) -> Fut,
        Fut: Future<Output = T>,
    {
        let guard = self.acquire().await?;
        let lost = guard.lost();
        let work = work(guard.lease().clone());
        tokio::select! {
            biased;
            reason = lost => Err(Error::Lost { key: guard.key().to_string(), reason }),
            output = work => {
                let key = guard.key().to_string();
                match guard.release().await {
                    Ok(true) => {}
                    Ok(false) => tracing::warn!(key, "the lock was already lost when the work finished"),
                    Err(e) => tracing::warn!(key, error = %e, "could not release; the client keeps trying until the lease expires"),
                }
                Ok(output)
            }
        }
    }

    /// Like [`LockBuilder::run`], for work that returns a `Result`: one
    /// `Result` with your error type, which carries the SDK's failures
    /// through `From<Error>`. The lock is released whether the work
    /// succeeded or failed. See [`Client::try_with_lock`].
    pub async fn try_run<F, Fut, T, E>(self, work: F) -> Result<T, E>
    where
        F: FnOnce(Lease) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: From<Error>,
    {
        self.run(work).await?
    }

    /// The Acquire loop: server-side waits of at most [`WAIT_SLICE`] until
    /// the lock is granted or the wait is over; UNAVAILABLE and broken
    /// connections retried across endpoints with the same request id.
    async fn grant(self) -> Result<Grant, Error> {
        let transport = &self.client.inner.transport;
        let request_id = self.request_id.clone().unwrap_or_else(new_request_id);
        let start = Instant::now();
        // Any grant this request id gets happens after its first send.
        let first_sent = BootInstant::now();
        let mut waited = false;
        let wait_end = self.wait.map(|w| start + w);
        let mut retries = transport.retries();
        loop {
            let now = Instant::now();
            let slice = match wait_end {
                Some(end) => end.saturating_duration_since(now).min(WAIT_SLICE),
                None => WAIT_SLICE,
            };
            let wait_ms = ms(slice);
            let request = pb::AcquireRequest {
                key: self.key.clone(),
                ttl_ms: self.ttl.map(ms).unwrap_or(0),
                wait_ms,
                owner: self.owner.clone(),
                metadata: self.metadata.clone(),
                request_id: request_id.clone(),
                mode: match self.shared {
                    Some(_) => pb::LockMode::Shared.into(),
                    None => pb::LockMode::Unspecified.into(),
                },
                shared_limit: self.shared.unwrap_or(0),
            };
            let timeout =
                Duration::from_millis(wait_ms.into()) + transport.settings.request_timeout;
            let mut request = Request::new(request);
            request.set_timeout(timeout);
            let (i, channel) = transport.pick();
            let mut client = LockServiceClient::new(channel);
            let sent_at = Instant::now();
            let sent_boot = BootInstant::now();
            waited |= wait_ms > 0;
            let result = tokio::time::timeout(timeout, client.acquire(request)).await;
            let status = match result {
                Ok(Ok(response)) => {
                    retries.succeeded();
                    let response = response.into_inner();
                    if response.acquired {
                        let replied = BootInstant::now();
                        let valid_for = response.lease.as_ref().map_or(0, |l| l.valid_for_ms);
                        let lease = lease_of(&self.key, response.lease)?;
                        let deadline = if valid_for > 0 {
                            // The server says how long from our send time.
                            Some(sent_boot + Duration::from_millis(valid_for.into()))
                        } else if !waited && self.request_id.is_none() {
                            // A server without valid_for_ms, no wait, our own
                            // request id: granted after the first send.
                            Some(first_sent + lease.ttl)
                        } else {
                            // Granted at some unknown point of a wait, or a
                            // replay of an older lease: not trusted until a
                            // renewal answers.
                            None
                        };
                        return Ok(Grant {
                            gone_by: replied + lease.ttl,
                            lease,
                            request_id,
                            deadline,
                        });
                    }
                    let over = wait_end.is_some_and(|end| Instant::now() >= end) || wait_ms == 0;
                    if over {
                        if self.client.inner.held.holds(&self.key) {
                            return Err(Error::HeldByThisClient {
                                key: self.key.clone(),
                                waited: Duration::from_millis(start.elapsed().as_millis() as u64),
                            });
                        }
                        return Err(Error::NotAcquired {
                            key: self.key.clone(),
                            waited: Duration::from_millis(start.elapsed().as_millis() as u64),
                            retry_after: Duration::from_millis(response.retry_after_ms.into()),
                        });
                    }
                    // A slice ended (or the server gave up early): go on,
                    // pausing if it answered much sooner than asked.
                    if sent_at.elapsed() < slice / 2 {
                        let pause = Duration::from_millis(response.retry_after_ms.into())
                            .min(Duration::from_millis(500));
                        tokio::time::sleep(pause).await;
                    }
                    continue;
                }
                Ok(Err(status)) => status,
                Err(_) => tonic::Status::unavailable(format!(
                    "no answer within {}",
                    humantime::format_duration(timeout)
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

/// A grant, with what the client may believe of its validity.
pub(crate) struct Grant {
    pub(crate) lease: Lease,
    pub(crate) request_id: String,
    /// Until when the lease is sure to be valid, if known.
    pub(crate) deadline: Option<BootInstant>,
    /// When it is surely gone unless renewed (the reply's arrival + TTL).
    pub(crate) gone_by: BootInstant,
}

/// Checks a granted lease: the fields a guard relies on must be there.
fn lease_of(key: &str, lease: Option<pb::Lease>) -> Result<Lease, Error> {
    let lease = lease.ok_or_else(|| Error::Protocol("acquired = true without a lease".into()))?;
    if lease.token.is_empty() {
        return Err(Error::Protocol("a lease with an empty token".into()));
    }
    if lease.ttl_ms == 0 {
        return Err(Error::Protocol("a lease with a TTL of 0".into()));
    }
    Ok(Lease {
        // The server echoes the key; keep ours so the guard matches it.
        key: key.to_string(),
        token: lease.token,
        fencing_token: lease.fencing_token,
        ttl: Duration::from_millis(lease.ttl_ms.into()),
    })
}

impl IntoFuture for LockBuilder {
    type Output = Result<LockGuard, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.acquire())
    }
}
