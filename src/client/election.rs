//! Semaphores and leader election, as thin layers over what a lock already
//! is: [`Client::semaphore`] is a SHARED lock with a limit, [`Client::elect`]
//! a waiting exclusive Acquire kept alive by the client's KeepAlive stream
//! (its fencing token the term), and [`Client::observe`] a Watch of the
//! same key that reports who leads. No RPC of their own (see
//! documentation/election.md).

use std::collections::HashMap;
use std::fmt;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio_stream::Stream;

use super::guard::{LockGuard, Lost};
use super::lock::LockBuilder;
use super::watch::{Holder, Watch};
use super::{Client, Error};

/// The metadata key under which [`ElectBuilder::value`] stores a leader's
/// value, so that followers ([`Client::observe`], `leasehold describe`,
/// `leasehold watch`) read it from the lock's holder.
pub const LEADER_VALUE_KEY: &str = "value";

/// A future of the next [`Watch`], for [`Observe`].
type Opening = Pin<Box<dyn Future<Output = Result<Watch, Error>> + Send>>;

impl Client {
    /// A semaphore of `permits`: at most that many holders of `key` at
    /// once, each one a SHARED grant with its own token and fencing token,
    /// kept alive and released like any lock — a holder whose process dies
    /// gives its permit back when its KeepAlive stream ends, not after its
    /// TTL. The same as `client.lock(key).shared(permits)`; every holder
    /// must ask for the same number of permits while any holds one (or the
    /// Acquire fails with `FAILED_PRECONDITION`), and one [`Client`] holds
    /// at most one permit of a key (see [`LockBuilder::shared`]).
    ///
    /// ```no_run
    /// # async fn demo(client: leasehold::client::Client) -> Result<(), leasehold::client::Error> {
    /// let permit = client.semaphore("encoders", 4).await?; // waits for a free permit
    /// // ... one of at most four encoders ...
    /// permit.release().await?;
    /// # Ok(()) }
    /// ```
    pub fn semaphore(&self, key: impl Into<String>, permits: u32) -> LockBuilder {
        self.lock(key).shared(permits)
    }

    /// Runs for leadership of `key`; await the [`ElectBuilder`] for a
    /// [`Leadership`], which comes once this client is the leader.
    ///
    /// Candidates wait in the server (FIFO on one server), not by polling.
    /// The leader stays leader while its client's KeepAlive stream lives;
    /// when its process dies or its stream breaks, the server frees the
    /// key at once and the next candidate is granted with a larger fencing
    /// token, the new term.
    ///
    /// ```no_run
    /// # async fn demo(client: leasehold::client::Client) -> Result<(), leasehold::client::Error> {
    /// let leadership = client
    ///     .elect("scheduler/leader")
    ///     .value("http://10.0.0.5:8080")
    ///     .await?;
    /// tokio::select! {
    ///     reason = leadership.lost() => eprintln!("no longer leader: {reason}"),
    ///     _ = lead(leadership.term()) => {}
    /// }
    /// leadership.resign().await?;
    /// # Ok(()) }
    /// # async fn lead(_term: u64) {}
    /// ```
    pub fn elect(&self, key: impl Into<String>) -> ElectBuilder {
        ElectBuilder {
            lock: self.lock(key),
            value: None,
        }
    }

    /// Who leads `key`, as it changes: the leader now (`None`: nobody),
    /// then one item per change of leader, each new one with its term.
    /// Consecutive items always differ; a leader that goes and comes back
    /// under a new term is a new item.
    ///
    /// Built on [`Client::watch`], and unlike it, it watches again on its
    /// own when a stream that had worked breaks (a server shutting down, a
    /// connection lost; at once, or after a quarter second if that stream
    /// lasted less than a second, so that it never spins): the new stream's first state says who leads then,
    /// so a change missed meanwhile still shows, possibly without the
    /// leaders in between. It ends with an `Err` when a watch cannot be
    /// opened within the client's retry window, or fails before its first
    /// event.
    ///
    /// ```no_run
    /// # async fn demo(client: leasehold::client::Client) -> Result<(), leasehold::client::Error> {
    /// use tokio_stream::StreamExt;
    /// let mut leaders = client.observe("scheduler/leader");
    /// while let Some(leader) = leaders.next().await {
    ///     match leader? {
    ///         Some(l) => println!("term {}: {} ({:?})", l.term, l.owner, l.value),
    ///         None => println!("no leader"),
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn observe(&self, key: impl Into<String>) -> Observe {
        let key = key.into();
        Observe {
            opening: Some(open(self.clone(), key.clone(), Duration::ZERO)),
            client: self.clone(),
            key,
            watch: None,
            opened: std::time::Instant::now(),
            delivered: false,
            last: None,
        }
    }
}

/// Opens a watch of `key`, after `pause`.
fn open(client: Client, key: String, pause: Duration) -> Opening {
    Box::pin(async move {
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        client.watch(key).await
    })
}

/// How long a watch must have lasted to be watched again at once; one that
/// ended sooner (a server ending streams as fast as it opens them) is
/// watched again after [`REWATCH_PAUSE`], so a follower never spins.
const QUICK_END: Duration = Duration::from_secs(1);
/// See [`QUICK_END`].
const REWATCH_PAUSE: Duration = Duration::from_millis(250);

/// Options for running for leadership; made by [`Client::elect`]. Await it
/// (or call [`ElectBuilder::campaign`]) for a [`Leadership`].
#[must_use = "an ElectBuilder does nothing until awaited"]
#[derive(Debug, Clone)]
pub struct ElectBuilder {
    lock: LockBuilder,
    value: Option<String>,
}

impl ElectBuilder {
    /// What followers should know of this leader (its address, say): stored
    /// in the lock's metadata under [`LEADER_VALUE_KEY`], reported by
    /// [`Client::observe`] as [`Leader::value`].
    pub fn value(mut self, value: impl Into<String>) -> Self {
        let value = value.into();
        self.lock = self.lock.metadata(LEADER_VALUE_KEY, value.clone());
        self.value = Some(value);
        self
    }

    /// Who this candidate is, as Describe and [`Leader::owner`] show it.
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.lock = self.lock.owner(owner);
        self
    }

    /// One more metadata pair for followers.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.lock = self.lock.metadata(key, value);
        self
    }

    /// The leader's TTL: how long after its last renewal that got through a
    /// leader that went silent (paused, partitioned) stops being leader, and
    /// the server may elect another. A leader whose process ends is
    /// replaced at once, whatever the TTL. Default: the server's.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.lock = self.lock.ttl(ttl);
        self
    }

    /// How long to wait for leadership before giving up with
    /// [`Error::NotAcquired`]; by default, as long as it takes.
    pub fn wait(mut self, wait: Duration) -> Self {
        self.lock = self.lock.wait(wait);
        self
    }

    /// Waits until this client is the leader (server-side waiting) and
    /// keeps it leader until the [`Leadership`] is resigned or dropped, or
    /// leadership is lost ([`Leadership::lost`]). Cancel-safe like
    /// [`LockBuilder::acquire`]: dropped while waiting, it leaves nothing
    /// held.
    pub async fn campaign(self) -> Result<Leadership, Error> {
        let guard = self.lock.acquire().await?;
        Ok(Leadership {
            guard,
            value: self.value,
        })
    }
}

impl IntoFuture for ElectBuilder {
    type Output = Result<Leadership, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.campaign())
    }
}

/// Leadership of a key, held until resigned or dropped (dropping resigns in
/// the background), or lost.
///
/// A leader must stop acting as one when [`Leadership::lost`] fires, and
/// stamp its [`Leadership::term`] on whatever it writes, so that a deposed
/// leader that has not noticed yet (paused, partitioned) is refused by the
/// resource it writes to.
#[must_use = "dropping a Leadership resigns at once"]
pub struct Leadership {
    guard: LockGuard,
    value: Option<String>,
}

impl fmt::Debug for Leadership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leadership")
            .field("key", &self.guard.key())
            .field("term", &self.term())
            .field("value", &self.value)
            .finish()
    }
}

impl Leadership {
    /// The election's key.
    pub fn key(&self) -> &str {
        self.guard.key()
    }

    /// The term: the grant's fencing token, larger than every earlier
    /// leader's of this key, even across a store failover.
    pub fn term(&self) -> u64 {
        self.guard.fencing_token()
    }

    /// The value this leader was elected with ([`ElectBuilder::value`]).
    pub fn value(&self) -> Option<&str> {
        self.value.as_deref()
    }

    /// Completes when leadership is lost: the server said the lease is gone
    /// (forced away, expired), or no renewal got through for a TTL (counted
    /// from the send of the last renewal answered, so it fires no later than
    /// the server could elect another). See [`LockGuard::lost`].
    pub fn lost(&self) -> Lost {
        self.guard.lost()
    }

    /// Whether leadership is known to be lost now.
    pub fn is_lost(&self) -> bool {
        self.guard.is_lost()
    }

    /// How long this client is sure to stay leader from now unless renewed.
    pub fn valid_for(&self) -> Duration {
        self.guard.valid_for()
    }

    /// Steps down: the next candidate is elected at once. `Ok(false)`:
    /// leadership had been lost already.
    pub async fn resign(self) -> Result<bool, Error> {
        self.guard.release().await
    }

    /// The lock guard underneath, for code written for locks (it resigns
    /// when released or dropped).
    pub fn into_lock_guard(self) -> LockGuard {
        self.guard
    }
}

/// A leader as [`Client::observe`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    /// Its owner (who it is).
    pub owner: String,
    /// The value it was elected with ([`ElectBuilder::value`]), if any.
    pub value: Option<String>,
    /// Its term (fencing token).
    pub term: u64,
    /// All of its metadata.
    pub metadata: HashMap<String, String>,
}

impl From<&Holder> for Leader {
    fn from(h: &Holder) -> Self {
        Self {
            owner: h.owner.clone(),
            value: h.metadata.get(LEADER_VALUE_KEY).cloned(),
            term: h.fencing_token,
            metadata: h.metadata.clone(),
        }
    }
}

/// Who leads a key, as it changes: a `Stream` of `Result<Option<Leader>,
/// Error>` from [`Client::observe`].
pub struct Observe {
    client: Client,
    key: String,
    opening: Option<Opening>,
    watch: Option<Watch>,
    /// When the current watch was opened.
    opened: std::time::Instant,
    /// Whether the current watch gave at least one event.
    delivered: bool,
    /// The last item yielded (`None` before the first).
    last: Option<Option<Leader>>,
}

impl fmt::Debug for Observe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Observe")
            .field("key", &self.key)
            .field("last", &self.last)
            .finish()
    }
}

impl Stream for Observe {
    type Item = Result<Option<Leader>, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(opening) = this.opening.as_mut() {
                match opening.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(watch)) => {
                        this.opening = None;
                        this.watch = Some(watch);
                        this.opened = std::time::Instant::now();
                        this.delivered = false;
                    }
                    Poll::Ready(Err(e)) => {
                        this.opening = None;
                        return Poll::Ready(Some(Err(e)));
                    }
                }
            }
            let Some(watch) = this.watch.as_mut() else {
                // Over: an error was yielded.
                return Poll::Ready(None);
            };
            match Pin::new(watch).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(event))) => {
                    this.delivered = true;
                    let leader = event.exclusive_holder().map(Leader::from);
                    let changed = match &this.last {
                        None => true,
                        Some(last) => {
                            last.as_ref().map(|l| (l.term, &l.owner))
                                != leader.as_ref().map(|l| (l.term, &l.owner))
                        }
                    };
                    if changed {
                        this.last = Some(leader.clone());
                        return Poll::Ready(Some(Ok(leader)));
                    }
                }
                Poll::Ready(end) => {
                    this.watch = None;
                    if this.delivered {
                        // A stream that worked ended: watch again.
                        let pause = if this.opened.elapsed() < QUICK_END {
                            REWATCH_PAUSE
                        } else {
                            Duration::ZERO
                        };
                        this.opening = Some(open(this.client.clone(), this.key.clone(), pause));
                    } else if let Some(Err(e)) = end {
                        return Poll::Ready(Some(Err(e)));
                    } else {
                        return Poll::Ready(None);
                    }
                }
            }
        }
    }
}
