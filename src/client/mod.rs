//! The Rust SDK: take named locks from Leasehold servers and keep them
//! alive without writing a keepalive loop.
//!
//! A [`Client`] talks to one or several endpoints (failing over between
//! them, retrying `UNAVAILABLE` with exponential backoff and full jitter for
//! a bounded time) and owns one background task that keeps every lock it
//! took alive over a single KeepAlive stream. [`Client::lock`] returns a
//! [`LockBuilder`]; awaiting it gives a [`LockGuard`] with the lease's key,
//! fencing token and TTL — once the server has answered the lock's attach
//! to that stream, so that from then on the end of the process releases it
//! — and [`LockGuard::lost`] says when the lock is gone: never later than
//! the server could let another client have it (see "What a client may
//! believe" in documentation/semantics.md).
//!
//! The README's example, compiled:
//!
//! ```no_run
//! use std::time::Duration;
//! use leasehold::client::{Client, Error};
//!
//! async fn nightly() -> Result<(), Error> {
//!     // Several servers over one Redis: the client fails over between them and
//!     // retries UNAVAILABLE with exponential backoff and full jitter (10 s by default).
//!     let client = Client::connect(["http://10.0.0.1:50051", "http://10.0.0.2:50051"]).await?;
//!
//!     // Run work under a lock, released at the end. If the lock is lost first,
//!     // the work is dropped at its next .await and the result is Err(Error::Lost).
//!     client
//!         .with_lock("reports/nightly", |lease| async move {
//!             write_report(lease.fencing_token).await // fence your writes
//!         })
//!         .await?;
//!
//!     // Or hold a guard: options, then await it.
//!     let guard = client
//!         .lock("db/migrations")
//!         .ttl(Duration::from_secs(15))   // default: the server's (30 s)
//!         .wait(Duration::from_secs(60))  // default: as long as it takes; ZERO tries once
//!         .owner("deploy-42")
//!         .metadata("commit", "abc123")
//!         .await?;                        // Err(Error::NotAcquired { .. }) after the wait
//!     tokio::select! {
//!         reason = guard.lost() => eprintln!("lost {}: {reason}", guard.key()),
//!         _ = migrate(guard.fencing_token()) => {}
//!     }
//!     guard.release().await?;             // Ok(false): it had been lost already
//!     Ok(())
//! }
//! # async fn write_report(_: u64) {}
//! # async fn migrate(_: u64) {}
//! ```
//!
//! Beyond the mutex: [`Client::semaphore`] takes one of N permits (a
//! SHARED lock), [`LockBuilder::shared`] a read lock, [`Client::watch`]
//! streams a lock's events ([`WatchEvent`], its state first),
//! [`Client::elect`] waits to lead and returns a [`Leadership`] (the term,
//! `lost()`, `resign()`), and [`Client::observe`] streams who leads
//! (documentation/election.md).
//!
//! Whole programs are in the repository's `examples/` (`lock_and_work`,
//! `contending_workers`, `with_lock_fallible`). To build the SDK alone,
//! depend on `leasehold` with `default-features = false, features =
//! ["client"]`; you need a Tokio runtime (e.g. tokio's `rt-multi-thread`
//! and `macros` features for `#[tokio::main]`).
//!
//! # What the compiler cannot check for you
//!
//! - **A guard must live as long as the work.** `let _ =
//!   client.lock(k).await?` drops the [`LockGuard`] at once, and dropping a
//!   guard releases the lock. Bind it: `let _guard = ...`.
//! - **Renewals need the runtime.** They run as a task on the Tokio runtime
//!   the client was connected on; a runtime blocked for longer than the TTL
//!   (a `std::thread::sleep` or a CPU-bound loop on a current-thread
//!   runtime) loses the lock. See [`LockGuard::lost`].
//! - **Locks are not re-entrant.** Guards of one client (and its clones)
//!   exclude each other: a second `lock()` of a key the client holds waits
//!   for the first guard, and a bounded wait that runs out is
//!   [`Error::HeldByThisClient`]. One task waiting without bound for a
//!   lock it holds waits forever.
//! - **A lost lock stops protecting at once**, not when your code notices:
//!   fence writes with [`LockGuard::fencing_token`].
//!
//! This module owns the client side only: it uses the generated
//! [`crate::pb`] client and nothing of the server, store or service code.

mod admin;
mod backoff;
mod clock;
mod election;
mod error;
mod guard;
mod held;
mod keeper;
mod lock;
mod transport;
mod watch;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tonic::Request;

pub use admin::ListPage;
pub use backoff::RetryPolicy;
pub use election::{ElectBuilder, LEADER_VALUE_KEY, Leader, Leadership, Observe};
pub use error::{Error, LostReason};
pub use guard::{Lease, LockGuard, LockInfo, Lost};
pub use lock::{LockBuilder, WAIT_SLICE};
/// The gRPC status code in [`Error::Rpc`]: tonic's, re-exported so that
/// matching on it needs no `tonic` dependency of your own (nor the same
/// version of it).
pub use tonic::Code;
pub use watch::{EventKind, Holder, Watch, WatchEvent};

use crate::pb;
use crate::task::{self, TaskGuard};
use held::HeldKeys;
use keeper::{Command, Keeper};
use transport::{Secret, Settings, Transport};

/// A fresh Acquire request id: 128 random bits, hex.
pub(crate) fn new_request_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// One or several Leasehold endpoints, for [`Client::connect`].
///
/// A string may list several, comma-separated (`"h1:50051,h2:50051"`);
/// `host:port` means `http://host:port`.
pub trait IntoEndpoints {
    /// The endpoints, in the order they are tried.
    fn into_endpoints(self) -> Vec<String>;
}

fn split(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_string)
        .collect()
}

impl IntoEndpoints for &str {
    fn into_endpoints(self) -> Vec<String> {
        split(self)
    }
}

impl IntoEndpoints for String {
    fn into_endpoints(self) -> Vec<String> {
        split(&self)
    }
}

impl IntoEndpoints for &String {
    fn into_endpoints(self) -> Vec<String> {
        split(self)
    }
}

impl<S: AsRef<str>> IntoEndpoints for Vec<S> {
    fn into_endpoints(self) -> Vec<String> {
        self.iter().flat_map(|s| split(s.as_ref())).collect()
    }
}

impl<S: AsRef<str>> IntoEndpoints for &[S] {
    fn into_endpoints(self) -> Vec<String> {
        self.iter().flat_map(|s| split(s.as_ref())).collect()
    }
}

impl<S: AsRef<str>> IntoEndpoints for &Vec<S> {
    fn into_endpoints(self) -> Vec<String> {
        self.as_slice().into_endpoints()
    }
}

impl<S: AsRef<str>, const N: usize> IntoEndpoints for &[S; N] {
    fn into_endpoints(self) -> Vec<String> {
        self.as_slice().into_endpoints()
    }
}

impl<S: AsRef<str>, const N: usize> IntoEndpoints for [S; N] {
    fn into_endpoints(self) -> Vec<String> {
        self.iter().flat_map(|s| split(s.as_ref())).collect()
    }
}

/// A connection to Leasehold, cheap to clone (all clones share one set of
/// channels and one keepalive task). The keepalive task stops when the last
/// clone and the last [`LockGuard`] are dropped; the server then releases
/// whatever the task still kept alive.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoints", &self.inner.transport.uris())
            .finish()
    }
}

struct Inner {
    transport: Arc<Transport>,
    commands: mpsc::UnboundedSender<Command>,
    /// The keys live guards hold, for the error of a lock not re-entered.
    held: HeldKeys,
    _keeper: TaskGuard,
}

impl Inner {
    fn command(&self, command: Command) {
        // Fails only once the keeper is gone, i.e. while this is dropped.
        let _ = self.commands.send(command);
    }
}

/// Settings for a [`Client`]; [`Client::builder`] makes one with defaults
/// suited to a data centre: 2 s connect timeout, 5 s request timeout,
/// HTTP/2 pings every 10 s, retries for 10 s with backoff from 50 ms to 1 s.
#[derive(Debug, Clone)]
#[must_use = "a ClientBuilder does nothing until `connect` is awaited"]
pub struct ClientBuilder {
    endpoints: Vec<String>,
    settings: Settings,
}

impl ClientBuilder {
    /// Adds endpoints (see [`IntoEndpoints`]); tried in order, the next one
    /// whenever the current one fails.
    pub fn endpoints(mut self, endpoints: impl IntoEndpoints) -> Self {
        self.endpoints.extend(endpoints.into_endpoints());
        self
    }

    /// Bound on establishing one TCP + HTTP/2 connection.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.settings.connect_timeout = timeout;
        self
    }

    /// Bound on one unary call (a waiting Acquire gets its wait on top).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.settings.request_timeout = timeout;
        self
    }

    /// How often to PING an idle connection, and how long to wait for the
    /// answer before declaring it dead, so that a dead server is noticed
    /// even while no call is in flight.
    pub fn http2_keepalive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.settings.http2_keepalive_interval = interval;
        self.settings.http2_keepalive_timeout = timeout;
        self
    }

    /// Retry timing for `UNAVAILABLE` and broken connections.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.settings.retry = policy;
        self
    }

    /// Shorthand: retry for this long before giving up with
    /// [`Error::Unavailable`].
    pub fn retry_for(mut self, duration: Duration) -> Self {
        self.settings.retry.retry_for = duration;
        self
    }

    /// Trusts these CA certificates (PEM) for `https://` endpoints instead
    /// of the system's. Once any TLS setting is given, every endpoint must
    /// be `https://`: the client never falls back to plaintext.
    pub fn tls_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.settings.tls.ca_pem = Some(pem.into());
        self
    }

    /// Presents this client certificate and key (PEM) to servers that
    /// require mutual TLS.
    pub fn tls_identity_pem(mut self, cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Self {
        self.settings.tls.identity_pem = Some((cert.into(), key.into()));
        self
    }

    /// Verifies the server's certificate against this name instead of the
    /// endpoint's host (for servers reached by IP address).
    pub fn tls_domain(mut self, name: impl Into<String>) -> Self {
        self.settings.tls.domain = Some(name.into());
        self
    }

    /// Sends `authorization: Bearer <token>` with every call. The token is
    /// never printed (not by `Debug` either); over `http://` it crosses the
    /// network in the clear, so use it with `https://`.
    pub fn bearer_token(mut self, token: impl Into<String>) -> Self {
        self.settings.token = Some(Secret(token.into()));
        self
    }

    /// Checks the endpoints, waits until one of them answers as a serving
    /// Leasehold server (retrying within the retry policy), and starts the
    /// keepalive task. Must be called inside a Tokio runtime.
    pub async fn connect(self) -> Result<Client, Error> {
        let endpoints = self
            .endpoints
            .iter()
            .map(|e| transport::normalize(e))
            .collect::<Result<Vec<_>, _>>()?;
        let transport = Arc::new(Transport::new(endpoints, self.settings)?);
        probe(&transport).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let keeper = task::spawn(
            "leasehold-keepalive",
            Keeper::new(transport.clone(), rx).run(),
        );
        Ok(Client {
            inner: Arc::new(Inner {
                transport,
                commands: tx,
                held: HeldKeys::default(),
                _keeper: keeper,
            }),
        })
    }
}

/// Waits until an endpoint answers the health check as SERVING (or has no
/// health service, which an older or proxied server may lack).
async fn probe(transport: &Transport) -> Result<(), Error> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let mut retries = transport.retries();
    let timeout = transport.settings.connect_timeout + transport.settings.request_timeout;
    loop {
        let (i, channel) = transport.pick();
        let mut health = HealthClient::new(channel);
        let mut request = Request::new(tonic_health::pb::HealthCheckRequest {
            service: pb::SERVICE_NAME.to_string(),
        });
        request.set_timeout(timeout);
        let status = match tokio::time::timeout(timeout, health.check(request)).await {
            Ok(Ok(response)) if response.get_ref().status() == ServingStatus::Serving => {
                return Ok(());
            }
            Ok(Ok(_)) => {
                retries
                    .failed_because(
                        i,
                        format!(
                            "{} is NOT_SERVING (its store is unreachable, or it is shutting down)",
                            transport.uri(i)
                        ),
                    )
                    .await?;
                continue;
            }
            Ok(Err(status)) => status,
            Err(_) => tonic::Status::unavailable(format!(
                "no answer within {}",
                humantime::format_duration(timeout)
            )),
        };
        match status.code() {
            tonic::Code::Unimplemented | tonic::Code::NotFound => return Ok(()),
            _ if error::retryable(&status) => retries.failed(i, &status).await?,
            _ => return Err(Error::from_status(&status)),
        }
    }
}

impl Client {
    /// Connects with the default settings (see [`ClientBuilder`]).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), leasehold::client::Error> {
    /// let one = leasehold::client::Client::connect("http://127.0.0.1:50051").await?;
    /// let two = leasehold::client::Client::connect(["10.0.0.1:50051", "10.0.0.2:50051"]).await?;
    /// # let _ = (one, two); Ok(()) }
    /// ```
    pub async fn connect(endpoints: impl IntoEndpoints) -> Result<Self, Error> {
        Self::builder().endpoints(endpoints).connect().await
    }

    /// A builder for non-default timeouts and retries.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), leasehold::client::Error> {
    /// use std::time::Duration;
    /// let client = leasehold::client::Client::builder()
    ///     .endpoints("127.0.0.1:50051")
    ///     .retry_for(Duration::from_secs(30))
    ///     .connect()
    ///     .await?;
    /// # let _ = client; Ok(()) }
    /// ```
    pub fn builder() -> ClientBuilder {
        ClientBuilder {
            endpoints: Vec::new(),
            settings: Settings::default(),
        }
    }

    /// Starts taking the lock `key`; see [`LockBuilder`] for the options.
    pub fn lock(&self, key: impl Into<String>) -> LockBuilder {
        LockBuilder::new(self.clone(), key.into())
    }

    /// Runs `work` under the lock `key` (waiting for it as long as it
    /// takes) and releases it afterwards: `client.lock(key).run(work)`.
    /// If the lock is lost first, `work` is dropped and the result is
    /// [`Error::Lost`].
    ///
    /// ```no_run
    /// # async fn demo(client: leasehold::client::Client) -> Result<(), leasehold::client::Error> {
    /// let token = client
    ///     .with_lock("jobs/cleanup", |lease| async move { lease.fencing_token })
    ///     .await?;
    /// # let _ = token; Ok(()) }
    /// ```
    ///
    /// For work that can fail, [`Client::try_with_lock`] gives one
    /// `Result` with your error type. Here the work's own `Result` comes
    /// back inside the SDK's, so its error type must be spelled out where
    /// nothing else fixes it, and the caller unwraps twice:
    ///
    /// ```no_run
    /// # async fn demo(client: leasehold::client::Client) -> Result<(), Box<dyn std::error::Error>> {
    /// let bytes = client
    ///     .with_lock("jobs/cleanup", |_lease| async move {
    ///         let bytes = std::fs::read("/tmp/input")?.len();
    ///         Ok::<_, std::io::Error>(bytes)
    ///     })
    ///     .await??;
    /// # let _ = bytes; Ok(()) }
    /// ```
    pub async fn with_lock<F, Fut, T>(&self, key: impl Into<String>, work: F) -> Result<T, Error>
    where
        F: FnOnce(Lease) -> Fut,
        Fut: Future<Output = T>,
    {
        self.lock(key).run(work).await
    }

    /// Runs fallible `work` under the lock `key` and releases it
    /// afterwards, whether the work succeeded or failed:
    /// `client.lock(key).try_run(work)`. Your error type `E` carries the
    /// SDK's failures too (taking the lock, [`Error::Lost`]), so it needs
    /// `From<Error>`, as `anyhow::Error`, `Box<dyn std::error::Error>` and
    /// an enum with a `#[from] leasehold::client::Error` variant have.
    ///
    /// `E` is inferred from where the result goes, e.g. the enclosing
    /// function's return type, so the work's `?` needs no annotation:
    ///
    /// ```no_run
    /// use leasehold::client::Client;
    ///
    /// #[derive(Debug, thiserror::Error)]
    /// enum JobError {
    ///     #[error(transparent)]
    ///     Lock(#[from] leasehold::client::Error),
    ///     #[error(transparent)]
    ///     Io(#[from] std::io::Error),
    /// }
    ///
    /// async fn cleanup(client: &Client) -> Result<usize, JobError> {
    ///     client
    ///         .try_with_lock("jobs/cleanup", |_lease| async move {
    ///             let bytes = std::fs::read("/tmp/input")?.len();
    ///             Ok(bytes)
    ///         })
    ///         .await
    /// }
    /// ```
    pub async fn try_with_lock<F, Fut, T, E>(&self, key: impl Into<String>, work: F) -> Result<T, E>
    where
        F: FnOnce(Lease) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: From<Error>,
    {
        self.lock(key).try_run(work).await
    }

    /// Releases a lease by its token (for leases taken with
    /// [`LockBuilder::lease`], or handed over by another process).
    /// `Ok(false)`: the token no longer holds the lock.
    pub async fn release(
        &self,
        key: impl Into<String>,
        token: impl Into<String>,
    ) -> Result<bool, Error> {
        let request = pb::ReleaseRequest {
            key: key.into(),
            token: token.into(),
        };
        self.inner
            .transport
            .unary(|mut c, timeout| {
                let mut request = Request::new(request.clone());
                request.set_timeout(timeout);
                async move { c.release(request).await.map(|r| r.into_inner().released) }
            })
            .await
    }

    /// Renews a lease by its token, to `ttl` or (with `None`) the TTL
    /// granted. `Ok(Some(ttl))`: renewed, with the TTL now in force;
    /// `Ok(None)`: the token no longer holds the lock.
    pub async fn renew(
        &self,
        key: impl Into<String>,
        token: impl Into<String>,
        ttl: Option<Duration>,
    ) -> Result<Option<Duration>, Error> {
        let request = pb::RenewRequest {
            key: key.into(),
            token: token.into(),
            ttl_ms: ttl.map_or(0, |t| u32::try_from(t.as_millis()).unwrap_or(u32::MAX)),
        };
        self.inner
            .transport
            .unary(|mut c, timeout| {
                let mut request = Request::new(request.clone());
                request.set_timeout(timeout);
                async move {
                    c.renew(request).await.map(|r| {
                        let r = r.into_inner();
                        r.renewed.then(|| Duration::from_millis(r.ttl_ms.into()))
                    })
                }
            })
            .await
    }

    /// Who holds `key` now; `None` when nobody does.
    pub async fn describe(&self, key: impl Into<String>) -> Result<Option<LockInfo>, Error> {
        let request = pb::DescribeRequest { key: key.into() };
        self.inner
            .transport
            .unary(|mut c, timeout| {
                let mut request = Request::new(request.clone());
                request.set_timeout(timeout);
                async move {
                    c.describe(request)
                        .await
                        .map(|r| admin::info_of(r.into_inner()))
                }
            })
            .await
    }

    /// The endpoints, in the order they are tried.
    pub fn endpoints(&self) -> Vec<String> {
        let t = &self.inner.transport;
        (0..t.len()).map(|i| t.uri(i).to_string()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::IntoEndpoints;

    #[test]
    fn endpoints_come_in_many_shapes() {
        let two = vec!["http://a:1".to_string(), "http://b:2".to_string()];
        assert_eq!("http://a:1,http://b:2".into_endpoints(), two);
        assert_eq!(" http://a:1 , http://b:2 ,".into_endpoints(), two);
        assert_eq!((&two).into_endpoints(), two);
        assert_eq!(two.as_slice().into_endpoints(), two);
        assert_eq!(["http://a:1", "http://b:2"].into_endpoints(), two);
        assert_eq!((&["http://a:1", "http://b:2"]).into_endpoints(), two);
        assert_eq!(vec!["http://a:1,http://b:2"].into_endpoints(), two);
    }
}
