//! The server's own accept loop and the limits it puts on each connection,
//! in front of tonic (which would accept without bound, spin on `accept`
//! errors, and keep a silent socket forever):
//!
//! - a cap on open connections (a semaphore; one over it is closed at once);
//! - backoff when `accept` fails (EMFILE: out of descriptors), instead of
//!   retrying in a tight loop;
//! - a handshake deadline: a connection must begin its first call (so
//!   finish its TLS handshake and HTTP/2 preface) soon after it is accepted;
//! - an idle deadline: a connection with no call open for that long is
//!   closed. A long call (a Health Watch, a KeepAlive stream) is open, so
//!   the connection that carries it is never idle.
//!
//! Calls are counted by [`super::calls::ActivityLayer`], which finds its
//! connection in the [`Registry`] by the peer address tonic puts in each
//! request; the deadlines are enforced
//! inside the socket's `poll_read`, which hyper (and rustls, during the
//! handshake) always has pending. This module knows connections and calls,
//! never what a call does.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Streams (calls) one HTTP/2 connection may have open at once, whatever
/// they are: RPCs, Health Watch, reflection. Sent in SETTINGS; a stream
/// over it is refused with REFUSED_STREAM, which clients retry.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 256;
/// Health Watch and reflection streams open at once on the server. They
/// need no credentials (unless `--auth-protect-health`) and last as long as
/// the client likes; probes and tools need a handful.
pub const DEFAULT_MAX_PROBE_STREAMS: usize = 1024;
/// Connections open at once, when the descriptor limit allows it.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Descriptors kept for everything but client connections (Redis pool and
/// subscribers, the metrics listener, files), when the default connection
/// cap is derived from the descriptor limit.
pub const RESERVED_DESCRIPTORS: u64 = 32;
/// How soon after it is accepted a connection must begin its first call.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may have no call open before it is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Streams the server itself may reset on one connection (refused,
/// malformed) before it ends the connection with GOAWAY. tonic's default
/// turns hyper's protection off (RUSTSEC-2024-0003).
pub const MAX_LOCAL_RESET_STREAMS: usize = 1024;
/// First wait after a failed `accept`; it doubles up to [`ACCEPT_BACKOFF_MAX`].
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest wait between two `accept` attempts after failures.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one warning per this period for refused connections and
/// failing `accept`, so that a flood cannot flood the log.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Limits on connections, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Streams per connection, sent in HTTP/2 SETTINGS.
    pub max_concurrent_streams: u32,
    /// Open connections; `None`: [`DEFAULT_MAX_CONNECTIONS`], lowered to fit
    /// the process's descriptor limit.
    pub max_connections: Option<usize>,
    /// From accept to the first call.
    pub handshake_timeout: Duration,
    /// With no call open.
    pub idle_timeout: Duration,
    /// Health Watch and reflection streams on the whole server.
    pub max_probe_streams: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            max_connections: None,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_probe_streams: DEFAULT_MAX_PROBE_STREAMS,
        }
    }
}

impl ConnectionLimits {
    /// The connection cap in force: the configured one, or the default
    /// lowered to the soft descriptor limit minus [`RESERVED_DESCRIPTORS`],
    /// so that the cap, not EMFILE, is what a flood meets first.
    pub fn max_connections(&self) -> usize {
        if let Some(max) = self.max_connections {
            return max.max(1);
        }
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
        match limit {
            Some(n) => usize::try_from(n.saturating_sub(RESERVED_DESCRIPTORS))
                .unwrap_or(usize::MAX)
                .clamp(1, DEFAULT_MAX_CONNECTIONS),
            None => DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// What the deadlines of one connection depend on: whether a call has
/// begun, how many are open, and since when none is.
#[derive(Debug)]
pub(super) struct Activity {
    accepted_at: Instant,
    started: AtomicBool,
    open_calls: AtomicUsize,
    quiet_since: Mutex<Instant>,
}

impl Activity {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            accepted_at: now,
            started: AtomicBool::new(false),
            open_calls: AtomicUsize::new(0),
            quiet_since: Mutex::new(now),
        }
    }

    /// When the connection is due to close, seen from now.
    fn deadline(&self, limits: &Timeouts) -> Instant {
        if !self.started.load(Ordering::Acquire) {
            return self.accepted_at + limits.handshake;
        }
        if self.open_calls.load(Ordering::Acquire) > 0 {
            return Instant::now() + limits.idle;
        }
        let since = *self.quiet_since.lock().unwrap_or_else(|e| e.into_inner());
        since + limits.idle
    }
}

/// A call in progress on a connection; the connection is not idle while
/// one lives.
pub(super) struct CallGuard(Arc<Activity>);

impl CallGuard {
    pub(super) fn new(activity: Arc<Activity>) -> Self {
        activity.open_calls.fetch_add(1, Ordering::AcqRel);
        activity.started.store(true, Ordering::Release);
        Self(activity)
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if self.0.open_calls.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.quiet_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        }
    }
}

/// Shards of the [`Registry`].
const SHARDS: usize = 16;

/// The open connections, by peer address (unique among open TCP
/// connections to one listener), and the probe streams open on them all.
#[derive(Debug)]
pub struct Registry {
    /// Sharded by peer port, so that calls on different connections rarely
    /// wait for the same lock (every call looks its connection up).
    shards: [Mutex<HashMap<SocketAddr, Arc<Activity>, foldhash::fast::RandomState>>; SHARDS],
    probe_streams: AtomicUsize,
    pub(super) max_probe_streams: usize,
}

/// A Health Watch or reflection stream counted against the server-wide
/// limit until it ends.
pub(super) struct ProbeGuard(Arc<Registry>);

impl Drop for ProbeGuard {
    fn drop(&mut self) {
        self.0.probe_streams.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Registry {
    /// An empty registry for a server with these limits.
    pub fn new(limits: &ConnectionLimits) -> Self {
        Self {
            shards: std::array::from_fn(|_| Mutex::default()),
            probe_streams: AtomicUsize::new(0),
            max_probe_streams: limits.max_probe_streams,
        }
    }

    /// Counts one more probe stream, unless the server has as many as it
    /// allows.
    pub(super) fn open_probe_stream(self: &Arc<Self>) -> Option<ProbeGuard> {
        let opened = self
            .probe_streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_probe_streams).then_some(n + 1)
            });
        opened.ok().map(|_| ProbeGuard(self.clone()))
    }

    fn shard(
        &self,
        peer: &SocketAddr,
    ) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Arc<Activity>, foldhash::fast::RandomState>>
    {
        self.shards[usize::from(peer.port()) % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn insert(&self, peer: SocketAddr, activity: Arc<Activity>) {
        self.shard(&peer).insert(peer, activity);
    }

    fn remove(&self, peer: SocketAddr, activity: &Arc<Activity>) {
        let mut map = self.shard(&peer);
        if map.get(&peer).is_some_and(|a| Arc::ptr_eq(a, activity)) {
            map.remove(&peer);
        }
    }

    pub(super) fn get(&self, peer: &SocketAddr) -> Option<Arc<Activity>> {
        self.shard(peer).get(peer).cloned()
    }
}

#[derive(Debug, Clone, Copy)]
struct Timeouts {
    handshake: Duration,
    idle: Duration,
}

/// An accepted connection: the socket, its slot under the connection cap,
/// and its deadline.
pub struct Conn {
    socket: TcpStream,
    peer: Option<SocketAddr>,
    activity: Arc<Activity>,
    registry: Arc<Registry>,
    timeouts: Timeouts,
    deadline: Pin<Box<Sleep>>,
    /// The waker the deadline's timer holds, once polled since its last
    /// reset: while the same task reads and the timer has not fired, a read
    /// need not poll the timer again (about 600 instructions per call).
    armed: Option<std::task::Waker>,
    expired: bool,
    _slot: OwnedSemaphorePermit,
}

impl Conn {
    /// `Err` once the connection's deadline passed with nothing to extend it.
    fn check_deadline(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        loop {
            if self.expired {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connection closed: no call begun or open within the timeout",
                ));
            }
            let armed = self.armed.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
            if armed && !self.deadline.is_elapsed() {
                return Ok(());
            }
            // A Sleep polled when the task's coop budget is spent answers
            // Pending without registering its timer (it only asks to be
            // polled again). Armed then, the next read would skip it, and a
            // silent connection would never time out: one of 300 silent TLS
            // handshakes, all polled by one task, once stayed open.
            let registers = tokio::task::coop::has_budget_remaining();
            if self.deadline.as_mut().poll(cx).is_pending() {
                self.armed = registers.then(|| cx.waker().clone());
                return Ok(());
            }
            self.armed = None;
            let next = self.activity.deadline(&self.timeouts);
            if next <= Instant::now() {
                self.expired = true;
                let started = self.activity.started.load(Ordering::Acquire);
                tracing::debug!(
                    peer = ?self.peer,
                    reason = if started { "idle" } else { "handshake" },
                    "closing connection"
                );
            } else {
                self.deadline.as_mut().reset(next);
            }
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(peer) = self.peer {
            self.registry.remove(peer, &self.activity);
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Err(e) = self.check_deadline(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.socket).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.socket).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.socket).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.socket.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.socket).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.socket).poll_shutdown(cx)
    }
}

impl Connected for Conn {
    // The same as a bare TcpStream's, so that what reads the peer address
    // (auth logs, the per-connection stream count) is unchanged.
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.socket.connect_info()
    }
}

/// Logs at most once per [`WARN_EVERY`], saying how many were skipped.
struct Throttled {
    last: Option<Instant>,
    skipped: u64,
}

impl Throttled {
    fn new() -> Self {
        Self {
            last: None,
            skipped: 0,
        }
    }

    /// Whether to log now; if so, how many were not logged since.
    fn ready(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.last.is_some_and(|t| now < t + WARN_EVERY) {
            self.skipped += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.skipped))
    }
}

/// Accepts connections from `listener` for tonic, within `limits`; the
/// returned stream never yields an error (failures are logged and waited
/// out) and ends only when dropped.
pub fn incoming(
    listener: TcpListener,
    limits: &ConnectionLimits,
    registry: Arc<Registry>,
) -> impl Stream<Item = Result<Conn, io::Error>> + Send + 'static {
    let state = Accepting::new(listener, limits, registry);
    futures_util::stream::unfold(state, |mut state| async move {
        let conn = state.next().await;
        Some((Ok(conn), state))
    })
}

/// [`incoming`], over TLS: each accepted connection's handshake runs
/// beside the others (one slow client holds up no one) and within the
/// connection's handshake deadline, which `Conn` enforces on its reads. A
/// connection whose handshake fails is dropped. The TLS configuration
/// decides the protocols offered (ALPN), so HTTP/1.1 clients are served
/// too.
pub fn incoming_tls(
    listener: TcpListener,
    limits: &ConnectionLimits,
    registry: Arc<Registry>,
    tls: Arc<rustls::ServerConfig>,
) -> impl Stream<Item = Result<tokio_rustls::server::TlsStream<Conn>, io::Error>> + Send + 'static {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let state = (
        Accepting::new(listener, limits, registry),
        futures_util::stream::FuturesUnordered::new(),
    );
    futures_util::stream::unfold(state, move |(mut accepting, mut handshakes)| {
        let acceptor = acceptor.clone();
        async move {
            use futures_util::StreamExt;
            loop {
                tokio::select! {
                    conn = accepting.next() => handshakes.push(acceptor.accept(conn)),
                    Some(done) = handshakes.next(), if !handshakes.is_empty() => match done {
                        Ok(tls) => return Some((Ok(tls), (accepting, handshakes))),
                        Err(e) => tracing::debug!(error = %e, "TLS handshake failed"),
                    },
                }
            }
        }
    })
}

struct Accepting {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    max: usize,
    registry: Arc<Registry>,
    timeouts: Timeouts,
    backoff: Duration,
    refused: Throttled,
    failing: Throttled,
}

impl Accepting {
    fn new(listener: TcpListener, limits: &ConnectionLimits, registry: Arc<Registry>) -> Self {
        let max = limits.max_connections();
        Self {
            listener,
            slots: Arc::new(Semaphore::new(max)),
            max,
            registry,
            timeouts: Timeouts {
                handshake: limits.handshake_timeout,
                idle: limits.idle_timeout,
            },
            backoff: ACCEPT_BACKOFF_MIN,
            refused: Throttled::new(),
            failing: Throttled::new(),
        }
    }

    /// The next connection within the cap. Cancel-safe: nothing is lost
    /// when the future is dropped at an `.await`.
    async fn next(&mut self) -> Conn {
        loop {
            let (socket, peer) = match self.listener.accept().await {
                Ok(accepted) => {
                    self.backoff = ACCEPT_BACKOFF_MIN;
                    accepted
                }
                Err(e) if transient(&e) => continue,
                Err(e) => {
                    if let Some(skipped) = self.failing.ready() {
                        tracing::warn!(
                            error = %e,
                            retry_in = ?self.backoff,
                            failures_not_logged = skipped,
                            "accept failed; waiting before the next attempt (out of file descriptors? see --max-connections)"
                        );
                    }
                    tokio::time::sleep(self.backoff).await;
                    self.backoff = (self.backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            };
            let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                if let Some(skipped) = self.refused.ready() {
                    tracing::warn!(
                        max_connections = self.max,
                        refused_not_logged = skipped,
                        "connection limit reached: closing new connections at once"
                    );
                }
                drop(socket);
                continue;
            };
            let _ = socket.set_nodelay(true);
            let activity = Arc::new(Activity::new());
            self.registry.insert(peer, activity.clone());
            let deadline = Box::pin(tokio::time::sleep_until(
                activity.accepted_at + self.timeouts.handshake,
            ));
            return Conn {
                socket,
                peer: Some(peer),
                activity,
                registry: self.registry.clone(),
                timeouts: self.timeouts,
                deadline,
                armed: None,
                expired: false,
                _slot: slot,
            };
        }
    }
}

/// Errors of one connection that went away before it was accepted: retry
/// at once. Anything else (EMFILE, ENFILE, ENOBUFS, ENOMEM) is about the
/// server, and waits.
fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_cap_fits_the_descriptor_limit() {
        let limits = ConnectionLimits::default();
        let max = limits.max_connections();
        assert!((1..=DEFAULT_MAX_CONNECTIONS).contains(&max));
        if let Some(n) = rustix::process::getrlimit(rustix::process::Resource::Nofile).current {
            assert!(max as u64 <= n.max(RESERVED_DESCRIPTORS + 1));
        }
        let set = ConnectionLimits {
            max_connections: Some(50_000),
            ..limits
        };
        assert_eq!(set.max_connections(), 50_000);
    }

    /// A read that first polls the deadline with the task's coop budget
    /// spent must still time out: the timer was not registered then.
    #[tokio::test]
    async fn a_deadline_first_polled_without_budget_still_fires() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = ConnectionLimits {
            handshake_timeout: Duration::from_millis(100),
            ..ConnectionLimits::default()
        };
        let registry = Arc::new(Registry::new(&limits));
        let mut accepting = Accepting::new(listener, &limits, registry);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut conn = accepting.next().await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u8>();
        for _ in 0..1_000 {
            tx.send(0).unwrap();
        }
        let mut buf = [0u8; 16];
        // Spend the budget, then read: Pending, the deadline polled without it.
        std::future::poll_fn(|cx| {
            while rx.poll_recv(cx).is_ready() {}
            assert!(!tokio::task::coop::has_budget_remaining());
            let mut read = ReadBuf::new(&mut buf);
            assert!(Pin::new(&mut conn).poll_read(cx, &mut read).is_pending());
            Poll::Ready(())
        })
        .await;
        let read = tokio::time::timeout(Duration::from_secs(5), async {
            use tokio::io::AsyncReadExt;
            conn.read(&mut buf).await
        })
        .await
        .expect("the handshake deadline closed the silent connection");
        assert_eq!(read.unwrap_err().kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn deadlines_follow_the_calls() {
        let t = Timeouts {
            handshake: Duration::from_secs(1),
            idle: Duration::from_secs(500),
        };
        let a = Arc::new(Activity::new());
        assert_eq!(a.deadline(&t), a.accepted_at + t.handshake);
        let call = CallGuard::new(a.clone());
        let open = Instant::now();
        assert!(
            a.deadline(&t) >= open + t.idle,
            "pushed back while a call is open"
        );
        drop(call);
        let closed = Instant::now();
        let deadline = a.deadline(&t);
        assert!(deadline >= open + t.idle && deadline <= closed + t.idle);
        assert_eq!(a.deadline(&t), deadline, "fixed once no call is open");
    }
}
