//! The randomized fault run (issue 12): raw gRPC clients and SDK users on a
//! few keys, with random deadlines, cancels, `request_id` retries,
//! duplicated Acquires, lost replies (a TCP proxy between some clients and
//! the servers that pauses or cuts) and KeepAlive attach/close races, while
//! a nemesis stalls Redis (SIGSTOP, `DEBUG SLEEP`), cuts the servers'
//! connections to Redis (a proxy: fred resends), pauses and cuts the client
//! proxies, and SIGKILLs and SIGTERMs the Leasehold servers.
//!
//! Every client records the interval in which it believes it holds a lease
//! (a [`Belief`]): from the Acquire reply to the earliest of its Release
//! being sent, its own deadline (the first send of the `request_id` plus the
//! TTL, or send + `valid_for_ms` when the server fills it; each renewal from
//! its send time), a denial, or the cut of the connection its KeepAlive
//! stream ran over (a stream's end may release). A prober Describes every
//! key all along. [`judge`] fails the run on:
//! - two beliefs of one key that overlap, or fencing tokens that do not
//!   increase (`checker.rs`);
//! - a lease taken from its holder: a renewal or first Release answered
//!   "not held", or a Describe answered "free / someone else", while the
//!   holder's belief had not ended;
//! - a lease left behind: Describe still shows it after its holder's
//!   Release was answered `released = true`, or after its KeepAlive stream
//!   ended (half-close, or cancel of an attached lock) by more than the store
//!   timeout plus a margin, with no fault in between;
//! - a retried Release answered `released = false` for a lease the retry's
//!   reply says was still believed held (a resent release that lies).
//!
//! The seed comes from `LEASEHOLD_FAULTS_SEED` (or is random) and is printed
//! first; the run length from `LEASEHOLD_FAULTS_MINUTES` (or
//! `LEASEHOLD_FAULTS_FULL=1`: 20 minutes), else about 75 s.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use leasehold::client::Client;
use leasehold::pb;
use leasehold::pb::lock_service_client::LockServiceClient;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request};

use crate::checker::{End, History, Resource, check};
use crate::common::{RedisServer, ServerProcess, unique_prefix};
use crate::proxy::{Mode, Proxy};

/// Slack for two clocks that run at slightly different rates (Redis's
/// expiry, this process's `Instant`) and for a task noticing an event late.
const MARGIN: Duration = Duration::from_millis(50);
/// `--store-timeout` of the servers under test.
const STORE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long after a stream's end its locks must be gone (store timeout +
/// slack), when nothing else went wrong meanwhile.
const STREAM_END_BOUND: Duration = Duration::from_millis(STORE_TIMEOUT.as_millis() as u64 + 1000);

// ------------------------------------------------------------ the record

/// One client's belief that it holds one lease.
#[derive(Debug, Clone)]
pub struct Belief {
    pub client: String,
    pub key: String,
    pub fence: u64,
    /// First send of the Acquire's request id.
    pub sent: Instant,
    /// The reply that granted it.
    pub start: Instant,
    /// When the belief ended and why.
    pub end: Instant,
    pub how: End,
    pub why: String,
    /// Spans in which the lease was attached to a KeepAlive stream that
    /// ran through proxy `.0` (a cut of that proxy ends the stream, which
    /// may release the lease).
    pub via_proxy: Vec<(usize, Instant, Instant)>,
    /// How it was granted (attempts of its request id, a duplicate, a wait).
    pub granted: String,
}

/// A server's answer that a lease no longer holds its lock.
#[derive(Debug, Clone)]
struct Denial {
    client: String,
    key: String,
    fence: u64,
    what: &'static str,
    sent: Instant,
    replied: Instant,
    /// The holder's own deadline when it sent the request.
    deadline: Instant,
}

/// A lease its holder let go of, which must then be gone.
#[derive(Debug, Clone)]
struct LetGo {
    client: String,
    key: String,
    fence: u64,
    what: &'static str,
    /// From this instant on, Describe must not show the lease.
    gone_by: Instant,
    /// The stream end, for excluding faults (None: a Release answered true).
    stream_end: Option<Instant>,
}

/// One Describe answer.
#[derive(Debug, Clone)]
struct Observation {
    key: String,
    sent: Instant,
    replied: Instant,
    held: Option<u64>,
}

/// An injected fault, from start to end.
#[derive(Debug, Clone)]
struct Fault {
    start: Instant,
    end: Instant,
    what: String,
    proxy_cut: Option<usize>,
}

/// A safety violation, for the report.
#[derive(Debug, Clone)]
pub struct Violation {
    pub kind: &'static str,
    pub key: String,
    pub detail: String,
}

#[derive(Default)]
struct Counters {
    acquire_calls: AtomicU64,
    granted: AtomicU64,
    not_acquired: AtomicU64,
    deadline_exceeded: AtomicU64,
    unavailable: AtomicU64,
    other_errors: AtomicU64,
    cancelled: AtomicU64,
    request_id_retries: AtomicU64,
    duplicates: AtomicU64,
    replays_seen: AtomicU64,
    renewals: AtomicU64,
    streams: AtomicU64,
    attach_close_races: AtomicU64,
    releases: AtomicU64,
    expiries: AtomicU64,
    describes: AtomicU64,
    sdk_grants: AtomicU64,
    sdk_lost: AtomicU64,
    sdk_cancels: AtomicU64,
    /// Leases let go of that the judge checked, and skipped (a fault in the span).
    let_go_checked: AtomicU64,
    let_go_skipped: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Everything the run records.
#[derive(Default)]
struct Record {
    beliefs: Mutex<Vec<Belief>>,
    denials: Mutex<Vec<Denial>>,
    let_go: Mutex<Vec<LetGo>>,
    observations: Mutex<Vec<Observation>>,
    faults: Mutex<Vec<Fault>>,
    counters: Counters,
    resource: Resource,
}

fn push<T>(v: &Mutex<Vec<T>>, t: T) {
    v.lock().unwrap_or_else(|e| e.into_inner()).push(t);
}

fn all<T: Clone>(v: &Mutex<Vec<T>>) -> Vec<T> {
    v.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

// ------------------------------------------------------------ the clients

/// A way from a client to a server: direct, or through a proxy.
#[derive(Clone)]
struct Route {
    channel: Channel,
    proxy: Option<usize>,
}

fn lazy_channel(addr: &str) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_millis(500))
        .connect_lazy()
}

/// A lease as a raw client holds it.
struct Held {
    key: String,
    token: String,
    fence: u64,
    ttl: Duration,
    deadline: Instant,
    index: usize,
}

enum Outcome {
    Granted(pb::Lease, Instant, Instant),
    NotAcquired,
    Retryable(&'static str),
    Failed,
}

/// One raw gRPC client: Acquire (deadlines, cancels, retries with its
/// request id, duplicates), hold (Renew RPCs or a KeepAlive stream), let go
/// (Release, KeepAlive release, stream end, or expiry).
struct Raw {
    name: String,
    rng: StdRng,
    routes: Vec<Route>,
    keys: Vec<String>,
    rec: Arc<Record>,
}

impl Raw {
    fn route(&mut self) -> Route {
        let i = self.rng.random_range(0..self.routes.len());
        self.routes[i].clone()
    }

    async fn run(mut self, stop: CancellationToken) {
        let mut n = 0u64;
        while !stop.is_cancelled() {
            n += 1;
            let Some(held) = self.acquire(n).await else {
                let pause = self.rng.random_range(0..150);
                tokio::time::sleep(Duration::from_millis(pause)).await;
                continue;
            };
            self.hold(held, &stop).await;
        }
    }

    /// One Acquire with retries; the lease if one was granted.
    async fn acquire(&mut self, n: u64) -> Option<Held> {
        let key = self.keys[self.rng.random_range(0..self.keys.len())].clone();
        let ttl_ms: u32 = self.rng.random_range(600..3000);
        let wait_ms: u32 = if self.rng.random_bool(0.4) {
            self.rng.random_range(50..2500)
        } else {
            0
        };
        let request_id = format!("{}-{n}", self.name);
        let mut first_send = None;
        for attempt in 0..4 {
            if attempt > 0 {
                bump(&self.rec.counters.request_id_retries);
            }
            let req = pb::AcquireRequest {
                key: key.clone(),
                ttl_ms,
                wait_ms,
                owner: self.name.clone(),
                request_id: request_id.clone(),
                ..Default::default()
            };
            let deadline =
                Duration::from_millis(self.rng.random_range(100..(wait_ms as u64 + 2500)));
            let cancel = self.rng.random_bool(0.1).then(|| {
                Duration::from_millis(self.rng.random_range(0..deadline.as_millis() as u64))
            });
            let duplicate = self.rng.random_bool(0.15);
            let dup_cancel = duplicate && self.rng.random_bool(0.5);
            let dup_cancel_after = Duration::from_millis(self.rng.random_range(0..30));
            let route = self.route();
            let dup_route = self.route();
            let sent = Instant::now();
            let first = *first_send.get_or_insert(sent);
            bump(&self.rec.counters.acquire_calls);
            let main = call_acquire(route.channel.clone(), req.clone(), deadline, cancel);
            let outcome = if duplicate {
                bump(&self.rec.counters.duplicates);
                let dup = call_acquire(
                    dup_route.channel.clone(),
                    req.clone(),
                    deadline,
                    dup_cancel.then_some(dup_cancel_after),
                );
                let (a, b) = tokio::join!(main, dup);
                self.merge_duplicates(&key, first, a, b)
            } else {
                main.await
            };
            match outcome {
                Outcome::Granted(lease, at, this_sent) => {
                    bump(&self.rec.counters.granted);
                    let ttl = Duration::from_millis(lease.ttl_ms.into());
                    let deadline = if lease.valid_for_ms > 0 {
                        this_sent + Duration::from_millis(lease.valid_for_ms.into())
                    } else {
                        first + ttl
                    };
                    let granted = format!(
                        "attempt {} of its request id{}{}",
                        attempt + 1,
                        if duplicate {
                            ", sent twice at once"
                        } else {
                            ""
                        },
                        if wait_ms > 0 {
                            format!(", wait_ms {wait_ms}")
                        } else {
                            String::new()
                        },
                    );
                    let index =
                        self.believe(&key, lease.fencing_token, first, at, deadline, granted);
                    return Some(Held {
                        key,
                        token: lease.token,
                        fence: lease.fencing_token,
                        ttl,
                        deadline,
                        index,
                    });
                }
                Outcome::NotAcquired => {
                    bump(&self.rec.counters.not_acquired);
                    return None;
                }
                Outcome::Retryable(what) => {
                    let c = &self.rec.counters;
                    bump(match what {
                        "deadline" => &c.deadline_exceeded,
                        "cancelled" => &c.cancelled,
                        _ => &c.unavailable,
                    });
                    if !self.rng.random_bool(0.75) {
                        return None;
                    }
                }
                Outcome::Failed => {
                    bump(&self.rec.counters.other_errors);
                    return None;
                }
            }
        }
        None
    }

    /// Two answers to one request id: the same lease (a replay), or two
    /// different grants (both believed: the checker sees the overlap).
    fn merge_duplicates(&mut self, key: &str, first: Instant, a: Outcome, b: Outcome) -> Outcome {
        match (a, b) {
            (Outcome::Granted(la, ta, sa), Outcome::Granted(lb, tb, sb)) => {
                if la.token == lb.token {
                    bump(&self.rec.counters.replays_seen);
                    return Outcome::Granted(la, ta.min(tb), sa.min(sb));
                }
                // Two leases for one request id: believe the second one
                // under a name of its own until its deadline.
                let ttl = Duration::from_millis(lb.ttl_ms.into());
                let name = format!("{}/dup", self.name);
                push(
                    &self.rec.beliefs,
                    Belief {
                        client: name,
                        key: key.to_string(),
                        fence: lb.fencing_token,
                        sent: first,
                        start: tb,
                        end: first + ttl,
                        how: End::Open,
                        why: "second lease of one request id, never renewed".into(),
                        via_proxy: Vec::new(),
                        granted: "the other copy of a duplicated Acquire".into(),
                    },
                );
                Outcome::Granted(la, ta, sa)
            }
            (g @ Outcome::Granted(..), _) | (_, g @ Outcome::Granted(..)) => g,
            (Outcome::NotAcquired, _) | (_, Outcome::NotAcquired) => Outcome::NotAcquired,
            (r @ Outcome::Retryable(_), _) | (_, r @ Outcome::Retryable(_)) => r,
            _ => Outcome::Failed,
        }
    }

    fn believe(
        &self,
        key: &str,
        fence: u64,
        sent: Instant,
        start: Instant,
        deadline: Instant,
        granted: String,
    ) -> usize {
        let mut beliefs = self.rec.beliefs.lock().unwrap_or_else(|e| e.into_inner());
        beliefs.push(Belief {
            client: self.name.clone(),
            key: key.into(),
            fence,
            sent,
            start,
            end: deadline,
            how: End::Open,
            why: "open".into(),
            via_proxy: Vec::new(),
            granted,
        });
        beliefs.len() - 1
    }

    fn end_belief(&self, h: &Held, at: Instant, how: End, why: &str) {
        let mut beliefs = self.rec.beliefs.lock().unwrap_or_else(|e| e.into_inner());
        let b = &mut beliefs[h.index];
        b.end = at.min(h.deadline);
        b.how = if at >= h.deadline { End::Lost } else { how };
        b.why = if at >= h.deadline {
            "own deadline passed".into()
        } else {
            why.into()
        };
    }

    fn via_proxy(&self, h: &Held, proxy: usize, from: Instant, to: Instant) {
        let mut beliefs = self.rec.beliefs.lock().unwrap_or_else(|e| e.into_inner());
        beliefs[h.index].via_proxy.push((proxy, from, to));
    }

    fn deny(&self, h: &Held, what: &'static str, sent: Instant, deadline: Instant) {
        push(
            &self.rec.denials,
            Denial {
                client: self.name.clone(),
                key: h.key.clone(),
                fence: h.fence,
                what,
                sent,
                replied: Instant::now(),
                deadline,
            },
        );
    }

    /// Writes to the fenced resource while the belief lasts.
    fn write(&self, h: &Held) {
        if Instant::now() < h.deadline {
            self.rec.resource.write(&self.name, &h.key, h.fence);
        }
    }

    async fn hold(&mut self, mut h: Held, stop: &CancellationToken) {
        let hold_for =
            Duration::from_millis(self.rng.random_range(0..(h.ttl.as_millis() as u64 * 2)));
        let until = Instant::now() + hold_for;
        let use_stream = self.rng.random_bool(0.5);
        let mut stream = None;
        if use_stream {
            let route = self.route();
            stream = KaStream::open(&route).await;
            if stream.is_some() {
                bump(&self.rec.counters.streams);
            }
        }
        // The attach, or a race of the attach with the stream's end.
        if let Some(s) = stream.as_mut() {
            if self.rng.random_bool(0.2) {
                bump(&self.rec.counters.attach_close_races);
                let at = Instant::now();
                s.send(&h, false);
                let how = if self.rng.random_bool(0.5) {
                    "half-close"
                } else {
                    "cancel"
                };
                let closed = Instant::now();
                self.end_belief(&h, at, End::Released, &format!("attach then {how} at once"));
                if let Some(p) = s.route.proxy {
                    self.via_proxy(&h, p, at, closed);
                }
                if how == "half-close" {
                    s.tx = None;
                    // The attach was sent before the end: it must be released.
                    push(
                        &self.rec.let_go,
                        LetGo {
                            client: self.name.clone(),
                            key: h.key.clone(),
                            fence: h.fence,
                            what: "attach then half-close",
                            gone_by: closed + STREAM_END_BOUND,
                            stream_end: Some(closed),
                        },
                    );
                    let _ = tokio::time::timeout(Duration::from_secs(2), s.drain()).await;
                }
                return;
            }
        }
        let mut attached_since: Option<Instant> = None;
        let mut confirmed = false;
        let mut next = Instant::now();
        loop {
            self.write(&h);
            let now = Instant::now();
            if now >= until || stop.is_cancelled() {
                break;
            }
            if now >= h.deadline {
                self.end_belief(&h, h.deadline, End::Lost, "own deadline passed");
                bump(&self.rec.counters.expiries);
                if let (Some(s), Some(from)) = (stream.as_ref(), attached_since) {
                    if let Some(p) = s.route.proxy {
                        self.via_proxy(&h, p, from, h.deadline);
                    }
                }
                return;
            }
            if now >= next {
                bump(&self.rec.counters.renewals);
                let sent = Instant::now();
                let answer = match stream.as_mut() {
                    Some(s) => {
                        attached_since.get_or_insert(sent);
                        s.renew(&h, h.deadline.saturating_duration_since(sent))
                            .await
                    }
                    None => self.renew_rpc(&h).await,
                };
                match answer {
                    Some(true) => {
                        confirmed |= stream.is_some();
                        h.deadline = h.deadline.max(sent + h.ttl);
                    }
                    Some(false) => {
                        self.deny(
                            &h,
                            if stream.is_some() {
                                "KeepAlive alive=false"
                            } else {
                                "Renew renewed=false"
                            },
                            sent,
                            h.deadline,
                        );
                        self.end_belief(&h, Instant::now(), End::Lost, "renewal denied");
                        if let (Some(s), Some(from)) = (stream.as_ref(), attached_since) {
                            if let Some(p) = s.route.proxy {
                                self.via_proxy(&h, p, from, Instant::now());
                            }
                        }
                        return;
                    }
                    // The stream broke or stayed silent: dropping it ends
                    // the stream, which releases what it holds, so the
                    // belief ends here.
                    None if stream.is_some() => {
                        let at = Instant::now();
                        self.end_belief(
                            &h,
                            at,
                            End::Lost,
                            "KeepAlive stream broke or stayed silent; dropped it",
                        );
                        if let (Some(s), Some(from)) = (stream.as_ref(), attached_since) {
                            if let Some(p) = s.route.proxy {
                                self.via_proxy(&h, p, from, at);
                            }
                        }
                        return;
                    }
                    // A Renew RPC that failed: the belief goes on to its deadline.
                    None => {}
                }
                next = Instant::now() + h.ttl / 3;
            }
            let step = Duration::from_millis(self.rng.random_range(20..120));
            tokio::time::sleep(step.min(until.saturating_duration_since(Instant::now()))).await;
        }
        self.let_go(h, stream, attached_since, confirmed).await;
    }

    /// Renew RPC: Some(renewed), None on error.
    async fn renew_rpc(&mut self, h: &Held) -> Option<bool> {
        let route = self.route();
        let mut client = LockServiceClient::new(route.channel);
        let mut req = Request::new(pb::RenewRequest {
            key: h.key.clone(),
            token: h.token.clone(),
            ttl_ms: h.ttl.as_millis() as u32,
        });
        req.set_timeout(Duration::from_millis(self.rng.random_range(200..1500)));
        match tokio::time::timeout(Duration::from_secs(3), client.renew(req)).await {
            Ok(Ok(r)) => Some(r.into_inner().renewed),
            _ => None,
        }
    }

    async fn let_go(
        &mut self,
        h: Held,
        stream: Option<KaStream>,
        attached_since: Option<Instant>,
        confirmed: bool,
    ) {
        let choice = self.rng.random_range(0..10);
        let at = Instant::now();
        let span = stream
            .as_ref()
            .and_then(|s| s.route.proxy)
            .zip(attached_since);
        let proxy_span = |this: &Self, to: Instant| {
            if let Some((p, from)) = span {
                this.via_proxy(&h, p, from, to);
            }
        };
        if at >= h.deadline {
            self.end_belief(&h, h.deadline, End::Lost, "own deadline passed");
            proxy_span(self, h.deadline);
            bump(&self.rec.counters.expiries);
            return;
        }
        match (choice, stream) {
            // Stop renewing: the lease ends with its TTL.
            (0, stream) => {
                self.end_belief(&h, h.deadline, End::Lost, "left to expire");
                proxy_span(self, h.deadline);
                bump(&self.rec.counters.expiries);
                if let Some(mut s) = stream {
                    // Detach by release would be a release; keep the
                    // stream open until the deadline instead.
                    let wait = h.deadline.saturating_duration_since(Instant::now());
                    let _ = tokio::time::timeout(wait, s.drain()).await;
                }
            }
            // End the stream: half-close, or cancel it.
            (1..=3, Some(mut s)) => {
                let half = choice != 3;
                self.end_belief(
                    &h,
                    at,
                    End::Released,
                    if half {
                        "stream half-closed"
                    } else {
                        "stream cancelled"
                    },
                );
                proxy_span(self, at);
                bump(&self.rec.counters.releases);
                if half || confirmed {
                    push(
                        &self.rec.let_go,
                        LetGo {
                            client: self.name.clone(),
                            key: h.key.clone(),
                            fence: h.fence,
                            what: if half {
                                "stream half-closed"
                            } else {
                                "stream cancelled"
                            },
                            gone_by: at + STREAM_END_BOUND,
                            stream_end: Some(at),
                        },
                    );
                }
                if half {
                    s.tx = None;
                    let _ = tokio::time::timeout(Duration::from_secs(2), s.drain()).await;
                }
            }
            // Release over the stream.
            (4..=5, Some(mut s)) => {
                self.end_belief(&h, at, End::Released, "KeepAlive release=true");
                bump(&self.rec.counters.releases);
                s.send(&h, true);
                let r = tokio::time::timeout(Duration::from_millis(1500), s.rx.message()).await;
                proxy_span(self, Instant::now());
                if let Ok(Ok(Some(_))) = r {
                    push(
                        &self.rec.let_go,
                        LetGo {
                            client: self.name.clone(),
                            key: h.key.clone(),
                            fence: h.fence,
                            what: "KeepAlive release answered",
                            gone_by: Instant::now(),
                            stream_end: None,
                        },
                    );
                }
                // Then the stream ends (half-close).
                s.tx = None;
                let _ = tokio::time::timeout(Duration::from_secs(2), s.drain()).await;
            }
            // Release RPC, retried with the same token after an error.
            (_, stream) => {
                self.end_belief(&h, at, End::Released, "Release RPC");
                bump(&self.rec.counters.releases);
                for attempt in 0..3 {
                    let route = self.route();
                    let mut client = LockServiceClient::new(route.channel);
                    let mut req = Request::new(pb::ReleaseRequest {
                        key: h.key.clone(),
                        token: h.token.clone(),
                    });
                    req.set_timeout(Duration::from_millis(self.rng.random_range(150..1500)));
                    let sent = Instant::now();
                    match tokio::time::timeout(Duration::from_secs(3), client.release(req)).await {
                        Ok(Ok(r)) => {
                            if r.into_inner().released {
                                push(
                                    &self.rec.let_go,
                                    LetGo {
                                        client: self.name.clone(),
                                        key: h.key.clone(),
                                        fence: h.fence,
                                        what: "Release answered released=true",
                                        gone_by: Instant::now(),
                                        stream_end: None,
                                    },
                                );
                            } else {
                                self.deny(
                                    &h,
                                    if attempt == 0 {
                                        "Release released=false"
                                    } else {
                                        "retried Release released=false"
                                    },
                                    sent,
                                    h.deadline,
                                );
                            }
                            break;
                        }
                        _ => continue,
                    }
                }
                proxy_span(self, Instant::now());
                // Any stream it was attached to ends now too.
                drop(stream);
            }
        }
    }
}

/// A raw KeepAlive stream.
struct KaStream {
    route: Route,
    tx: Option<mpsc::Sender<pb::KeepAliveRequest>>,
    rx: tonic::Streaming<pb::KeepAliveResponse>,
}

impl KaStream {
    async fn open(route: &Route) -> Option<Self> {
        let (tx, rx) = mpsc::channel(16);
        let mut client = LockServiceClient::new(route.channel.clone());
        let call = client.keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx));
        match tokio::time::timeout(Duration::from_millis(1500), call).await {
            Ok(Ok(r)) => Some(Self {
                route: route.clone(),
                tx: Some(tx),
                rx: r.into_inner(),
            }),
            _ => None,
        }
    }

    fn send(&mut self, h: &Held, release: bool) {
        if let Some(tx) = &self.tx {
            let _ = tx.try_send(pb::KeepAliveRequest {
                key: h.key.clone(),
                token: h.token.clone(),
                ttl_ms: h.ttl.as_millis() as u32,
                release,
            });
        }
    }

    /// One renewal: Some(alive), None if the stream broke or stayed silent.
    async fn renew(&mut self, h: &Held, within: Duration) -> Option<bool> {
        self.send(h, false);
        let within = within.clamp(Duration::from_millis(100), Duration::from_millis(1500));
        match tokio::time::timeout(within, self.rx.message()).await {
            Ok(Ok(Some(r))) => Some(r.alive),
            _ => None,
        }
    }

    async fn drain(&mut self) {
        while let Ok(Some(_)) = self.rx.message().await {}
    }
}

/// One Acquire call with a deadline (grpc-timeout), maybe cancelled.
async fn call_acquire(
    channel: Channel,
    req: pb::AcquireRequest,
    deadline: Duration,
    cancel: Option<Duration>,
) -> Outcome {
    let mut client = LockServiceClient::new(channel);
    let mut request = Request::new(req);
    request.set_timeout(deadline);
    let sent = Instant::now();
    let call = client.acquire(request);
    let bound = cancel.unwrap_or(deadline + Duration::from_secs(2));
    match tokio::time::timeout(bound, call).await {
        Err(_) if cancel.is_some() => Outcome::Retryable("cancelled"),
        Err(_) => Outcome::Retryable("deadline"),
        Ok(Ok(r)) => {
            let r = r.into_inner();
            match (r.acquired, r.lease) {
                (true, Some(lease)) => Outcome::Granted(lease, Instant::now(), sent),
                (true, None) => Outcome::Failed,
                (false, _) => Outcome::NotAcquired,
            }
        }
        Ok(Err(s)) => match s.code() {
            Code::DeadlineExceeded => Outcome::Retryable("deadline"),
            Code::Unavailable | Code::Unknown | Code::Cancelled => {
                Outcome::Retryable("unavailable")
            }
            _ => Outcome::Failed,
        },
    }
}

/// An SDK user: takes locks (sometimes cancelling the take), holds them
/// with the SDK's KeepAlive, writes while `lost()` has not fired, then
/// releases or drops the guard.
async fn sdk_user(
    name: String,
    client: Client,
    keys: Vec<String>,
    seed: u64,
    rec: Arc<Record>,
    stop: CancellationToken,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    while !stop.is_cancelled() {
        let key = keys[rng.random_range(0..keys.len())].clone();
        let ttl = Duration::from_millis(rng.random_range(900..3000));
        let wait = Duration::from_millis(rng.random_range(0..2000));
        let cancel = rng
            .random_bool(0.1)
            .then(|| Duration::from_millis(rng.random_range(0..400)));
        let sent = Instant::now();
        let take = client
            .lock(key.as_str())
            .ttl(ttl)
            .wait(wait)
            .owner(name.as_str());
        let taken = match cancel {
            Some(c) => match tokio::time::timeout(c, take).await {
                Ok(r) => r,
                Err(_) => {
                    bump(&rec.counters.sdk_cancels);
                    continue;
                }
            },
            None => tokio::select! {
                r = take => r,
                _ = stop.cancelled() => break,
            },
        };
        let Ok(guard) = taken else {
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..100))).await;
            continue;
        };
        bump(&rec.counters.sdk_grants);
        let start = Instant::now();
        let fence = guard.fencing_token();
        let index = {
            let mut b = rec.beliefs.lock().unwrap_or_else(|e| e.into_inner());
            b.push(Belief {
                client: name.clone(),
                key: key.clone(),
                fence,
                sent,
                start,
                end: start,
                how: End::Open,
                why: "open".into(),
                via_proxy: Vec::new(),
                granted: format!("SDK lock(), wait {wait:?}, TTL {ttl:?}"),
            });
            b.len() - 1
        };
        let hold = Duration::from_millis(rng.random_range(0..(ttl.as_millis() as u64 * 2)));
        let until = Instant::now() + hold;
        let mut lost = guard.lost();
        let mut why = None;
        while Instant::now() < until && !stop.is_cancelled() {
            rec.resource.write(&name, &key, fence);
            tokio::select! {
                reason = &mut lost => { why = Some(reason); break }
                _ = tokio::time::sleep(Duration::from_millis(rng.random_range(20..150))) => {}
            }
        }
        let at = Instant::now();
        {
            let mut b = rec.beliefs.lock().unwrap_or_else(|e| e.into_inner());
            let b = &mut b[index];
            b.end = at;
            match why {
                Some(reason) => {
                    b.how = End::Lost;
                    b.why = format!("SDK lost(): {reason}");
                }
                None => {
                    b.how = End::Released;
                    b.why = "SDK release".into();
                }
            }
        }
        if why.is_some() {
            bump(&rec.counters.sdk_lost);
            continue;
        }
        if rng.random_bool(0.5) {
            if let Ok(Ok(true)) =
                tokio::time::timeout(Duration::from_secs(5), guard.release()).await
            {
                push(
                    &rec.let_go,
                    LetGo {
                        client: name.clone(),
                        key: key.clone(),
                        fence,
                        what: "SDK release() answered true",
                        gone_by: Instant::now(),
                        stream_end: None,
                    },
                );
            }
        } else {
            // The keeper releases it over its stream: gone within the bound
            // unless a fault got in the way.
            drop(guard);
            let at = Instant::now();
            push(
                &rec.let_go,
                LetGo {
                    client: name.clone(),
                    key: key.clone(),
                    fence,
                    what: "SDK guard dropped",
                    gone_by: at + STREAM_END_BOUND,
                    stream_end: Some(at),
                },
            );
        }
    }
}

/// Describes every key in turn until `stop`.
async fn prober(
    channels: Vec<Channel>,
    keys: Vec<String>,
    rec: Arc<Record>,
    stop: CancellationToken,
) {
    let mut i = 0usize;
    while !stop.is_cancelled() {
        let key = keys[i % keys.len()].clone();
        let mut client = LockServiceClient::new(channels[i % channels.len()].clone());
        i += 1;
        let mut req = Request::new(pb::DescribeRequest { key: key.clone() });
        req.set_timeout(Duration::from_millis(500));
        let sent = Instant::now();
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(1), client.describe(req)).await
        {
            let r = r.into_inner();
            bump(&rec.counters.describes);
            push(
                &rec.observations,
                Observation {
                    key,
                    sent,
                    replied: Instant::now(),
                    held: r.held.then_some(r.fencing_token),
                },
            );
        }
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
}

// ------------------------------------------------------------ the nemesis

/// The processes the nemesis hurts.
struct Targets {
    redis: RedisServer,
    /// The proxy every server reaches Redis through.
    redis_link: Proxy,
    servers: Vec<ServerProcess>,
    proxies: Vec<Proxy>,
}

fn kill_signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status();
}

/// Waits until a (re)started server says its store answers.
fn wait_serving(server: &ServerProcess) {
    server
        .output
        .wait_for("store reachable: SERVING", Duration::from_secs(20));
}

async fn nemesis(mut t: Targets, seed: u64, rec: Arc<Record>, stop: CancellationToken) -> Targets {
    let mut rng = StdRng::seed_from_u64(seed);
    while !stop.is_cancelled() {
        let gap = Duration::from_millis(rng.random_range(300..2000));
        tokio::select! {
            _ = tokio::time::sleep(gap) => {}
            _ = stop.cancelled() => break,
        }
        let start = Instant::now();
        let mut proxy_cut = None;
        let what = match rng.random_range(0..100) {
            0..=29 => {
                let d = Duration::from_millis(rng.random_range(200..2500));
                let pid = t.redis.pid().expect("redis running");
                kill_signal(pid, "-STOP");
                tokio::time::sleep(d).await;
                kill_signal(pid, "-CONT");
                format!("SIGSTOP redis {d:?}")
            }
            30..=44 => {
                let secs = rng.random_range(2..20) as f64 / 10.0;
                let port = t.redis.port;
                let _ = tokio::task::spawn_blocking(move || {
                    crate::common::redis_cli(port, &["DEBUG", "SLEEP", &secs.to_string()])
                })
                .await;
                format!("DEBUG SLEEP {secs}")
            }
            45..=57 => {
                let p = rng.random_range(0..t.proxies.len());
                let d = Duration::from_millis(rng.random_range(200..2000));
                t.proxies[p].set(Mode::Pause);
                tokio::time::sleep(d).await;
                t.proxies[p].set(Mode::Pass);
                format!("pause proxy {p} {d:?}")
            }
            58..=69 => {
                let p = rng.random_range(0..t.proxies.len());
                let d = Duration::from_millis(rng.random_range(50..1000));
                proxy_cut = Some(p);
                t.proxies[p].set(Mode::Cut);
                tokio::time::sleep(d).await;
                t.proxies[p].set(Mode::Pass);
                format!("cut proxy {p} {d:?}")
            }
            70..=79 => {
                // Between the servers and Redis: fred resends what was in
                // flight on the dropped connection.
                let d = Duration::from_millis(rng.random_range(50..800));
                t.redis_link.set(Mode::Cut);
                tokio::time::sleep(d).await;
                t.redis_link.set(Mode::Pass);
                format!("cut redis link {d:?}")
            }
            80..=89 => {
                let s = rng.random_range(0..t.servers.len());
                let d = Duration::from_millis(rng.random_range(50..1000));
                let server = &mut t.servers[s];
                tokio::task::block_in_place(|| server.kill());
                tokio::time::sleep(d).await;
                tokio::task::block_in_place(|| {
                    server.restart();
                    wait_serving(server);
                });
                format!("SIGKILL server {s}, down {d:?}")
            }
            _ => {
                let s = rng.random_range(0..t.servers.len());
                let server = &mut t.servers[s];
                server.signal("-TERM");
                tokio::task::block_in_place(|| {
                    server.wait_exit(Duration::from_secs(15));
                    server.restart();
                    wait_serving(server);
                });
                format!("SIGTERM server {s}, restarted")
            }
        };
        let end = Instant::now();
        push(
            &rec.faults,
            Fault {
                start,
                end,
                what,
                proxy_cut,
            },
        );
    }
    t
}

// ------------------------------------------------------------ the judge

/// The belief's end, moved earlier to the first cut of a proxy its
/// KeepAlive stream ran through (the stream's end may have released it).
fn effective_end(b: &Belief, faults: &[Fault]) -> (Instant, String) {
    let mut end = (b.end, b.why.clone());
    for (p, from, to) in &b.via_proxy {
        for f in faults {
            if f.proxy_cut == Some(*p) && f.start >= *from && f.start < *to && f.start < end.0 {
                end = (f.start, format!("connection cut ({})", f.what));
            }
        }
    }
    end
}

fn t(base: Instant, at: Instant) -> String {
    format!("{:.3}s", at.saturating_duration_since(base).as_secs_f64())
}

/// Judges the record: every violation, described.
fn judge(rec: &Record, base: Instant, now: Instant) -> (Vec<Violation>, crate::checker::Report) {
    let faults = all(&rec.faults);
    let beliefs: Vec<Belief> = all(&rec.beliefs)
        .into_iter()
        .map(|mut b| {
            let (end, why) = effective_end(&b, &faults);
            b.end = end.min(now);
            b.why = why;
            b
        })
        .collect();
    let mut violations = Vec::new();

    // Overlaps and fencing, by the shared checker.
    let history = History::new();
    for (i, b) in beliefs.iter().enumerate() {
        // A grant whose reply came after the client's own deadline was
        // never believed: it claims nothing, not even its place in the
        // order of fencing tokens.
        if b.end <= b.start {
            continue;
        }
        // One window per belief, named so each is its own.
        let client = format!("{}#{i}", b.client);
        history.grant(&client, &b.key, b.fence, b.sent, b.start);
        history.end(&client, &b.key, b.fence, b.end.max(b.start), b.how);
    }
    let report = check(&history, &rec.resource, now);
    let describe = |client: &str| -> String {
        let i: usize = client
            .rsplit('#')
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        describe_belief(base, &beliefs[i])
    };
    for o in &report.overlaps {
        violations.push(Violation {
            kind: "overlap",
            key: o.key.clone(),
            detail: format!(
                "{} and {} overlap for {:?}",
                describe(&o.first.0),
                describe(&o.second.0),
                o.duration
            ),
        });
    }
    for f in &report.fence_regressions {
        // "key: later#i got F after earlier#j got G": name both beliefs.
        let named: Vec<String> = f
            .split_whitespace()
            .filter(|w| w.contains('#'))
            .map(&describe)
            .collect();
        violations.push(Violation {
            kind: "fencing token did not increase",
            key: f.split(':').next().unwrap_or_default().to_string(),
            detail: format!("{f}: {}", named.join(" after ")),
        });
    }
    let find = |client: &str, key: &str, fence: u64| {
        beliefs
            .iter()
            .find(|b| b.client == client && b.key == key && b.fence == fence)
    };

    // Denials while the holder still believed.
    for d in all(&rec.denials) {
        let Some(b) = find(&d.client, &d.key, d.fence) else {
            continue;
        };
        let cut_end = effective_end(
            &Belief {
                end: d.replied,
                ..b.clone()
            },
            &faults,
        )
        .0;
        let retried = d.what.starts_with("retried");
        let before_own_end = d.replied + MARGIN < d.deadline && cut_end >= d.replied;
        if before_own_end {
            violations.push(Violation {
                kind: if retried {
                    "retried release lied"
                } else if d.what.starts_with("Release") {
                    // Taken before, or a release that lies about itself.
                    "release answered not held while held"
                } else {
                    "taken from holder"
                },
                key: d.key.clone(),
                detail: format!(
                    "{} fence {} (first sent {}, {}, granted {}): a request sent at {} was answered {} at {}, {:?} before the holder's own deadline {}",
                    d.client,
                    d.fence,
                    t(base, b.sent),
                    b.granted,
                    t(base, b.start),
                    t(base, d.sent),
                    d.what,
                    t(base, d.replied),
                    d.deadline - d.replied,
                    t(base, d.deadline),
                ),
            });
        }
    }

    // Describe while a holder believed: it must show the holder's lease.
    let observations = all(&rec.observations);
    let mut by_key: HashMap<&str, Vec<&Observation>> = HashMap::new();
    for o in &observations {
        by_key.entry(o.key.as_str()).or_default().push(o);
    }
    for b in &beliefs {
        let wrong: Vec<&&Observation> = by_key
            .get(b.key.as_str())
            .map(|v| {
                v.iter()
                    .filter(|o| {
                        o.sent >= b.start && o.replied + MARGIN <= b.end && o.held != Some(b.fence)
                    })
                    .collect()
            })
            .unwrap_or_default();
        if let Some(first) = wrong.first() {
            violations.push(Violation {
                kind: "taken from holder",
                key: b.key.clone(),
                detail: format!(
                    "{}; Describe at {} answered {} ({} such answers before the belief ended)",
                    describe_belief(base, b),
                    t(base, first.replied),
                    match first.held {
                        Some(f) => format!("held by fence {f}"),
                        None => "free".into(),
                    },
                    wrong.len()
                ),
            });
        }
    }

    // Leases let go of must be gone.
    for g in all(&rec.let_go) {
        if let Some(end) = g.stream_end {
            let faulty = faults
                .iter()
                .any(|f| f.start <= g.gone_by && f.end + STREAM_END_BOUND >= end);
            if faulty {
                bump(&rec.counters.let_go_skipped);
                continue;
            }
        }
        bump(&rec.counters.let_go_checked);
        let late: Vec<&&Observation> = by_key
            .get(g.key.as_str())
            .map(|v| {
                v.iter()
                    .filter(|o| o.sent > g.gone_by && o.held == Some(g.fence))
                    .collect()
            })
            .unwrap_or_default();
        if let Some(first) = late.first() {
            violations.push(Violation {
                kind: "left behind",
                key: g.key.clone(),
                detail: format!(
                    "{} fence {}: {}; must be gone by {}, Describe at {} still shows it ({} such answers)",
                    g.client,
                    g.fence,
                    g.what,
                    t(base, g.gone_by),
                    t(base, first.replied),
                    late.len()
                ),
            });
        }
    }

    // Fencing tokens as Describe saw them, in order, per key.
    for (key, obs) in &by_key {
        let mut top = 0u64;
        for o in obs {
            if let Some(f) = o.held {
                if f < top {
                    violations.push(Violation {
                        kind: "fencing token did not increase",
                        key: key.to_string(),
                        detail: format!(
                            "Describe at {} shows fence {f} after {top}",
                            t(base, o.replied)
                        ),
                    });
                }
                top = top.max(f);
            }
        }
    }
    (violations, report)
}

fn describe_belief(base: Instant, b: &Belief) -> String {
    format!(
        "{} fence {} (first sent {}, {}) believed [{} .. {}] ({})",
        b.client,
        b.fence,
        t(base, b.sent),
        b.granted,
        t(base, b.start),
        t(base, b.end),
        b.why
    )
}

// ------------------------------------------------------------ the run

/// The run's seed: `LEASEHOLD_FAULTS_SEED`, or a random one.
fn seed() -> u64 {
    std::env::var("LEASEHOLD_FAULTS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

/// How long the load runs: `LEASEHOLD_FAULTS_MINUTES`, or 20 minutes with
/// `LEASEHOLD_FAULTS_FULL=1`, else 75 s.
fn duration() -> Duration {
    if let Some(m) = std::env::var("LEASEHOLD_FAULTS_MINUTES")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
    {
        return Duration::from_secs_f64(m * 60.0);
    }
    if crate::full() {
        Duration::from_secs(20 * 60)
    } else {
        Duration::from_secs(75)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_fault_run() {
    let _serial = crate::SERIAL.lock().await;
    let seed = seed();
    let length = duration();
    eprintln!("randomized fault run: LEASEHOLD_FAULTS_SEED={seed}, load for {length:?}");
    let redis = tokio::task::block_in_place(|| {
        RedisServer::start_with(&["--enable-debug-command", "local"])
    });
    let prefix = unique_prefix();
    let redis_addr: SocketAddr = redis.addr().parse().expect("redis addr");
    let redis_link = Proxy::start(redis_addr).await;
    let url = redis_link.url();
    let store_timeout = format!("{}ms", STORE_TIMEOUT.as_millis());
    let args = [
        "--redis-url",
        &url,
        "--key-prefix",
        &prefix,
        "--pool-size",
        "1",
        "--health-interval",
        "1h",
        "--store-timeout",
        &store_timeout,
        "--shutdown-grace",
        "2s",
    ];
    let servers: Vec<ServerProcess> = tokio::task::block_in_place(|| {
        (0..2)
            .map(|_| {
                let s = ServerProcess::start(&args);
                wait_serving(&s);
                s
            })
            .collect()
    });
    let mut proxies = Vec::new();
    for s in &servers {
        let addr: SocketAddr = s.addr.parse().expect("server addr");
        proxies.push(Proxy::start(addr).await);
    }
    let keys: Vec<String> = (0..3).map(|i| format!("rand/{i}")).collect();
    let rec = Arc::new(Record::default());
    let stop = CancellationToken::new();
    let base = Instant::now();

    let mut routes = Vec::new();
    for (i, s) in servers.iter().enumerate() {
        routes.push((s.addr.clone(), None));
        routes.push((proxies[i].addr.to_string(), Some(i)));
    }
    let mut tasks = Vec::new();
    for c in 0..8u64 {
        let raw = Raw {
            name: format!("raw{c}"),
            rng: StdRng::seed_from_u64(seed.wrapping_add(c * 7919)),
            routes: routes
                .iter()
                .map(|(addr, proxy)| Route {
                    channel: lazy_channel(addr),
                    proxy: *proxy,
                })
                .collect(),
            keys: keys.clone(),
            rec: rec.clone(),
        };
        tasks.push(tokio::spawn(raw.run(stop.clone())));
    }
    let endpoints: Vec<String> = servers.iter().map(|s| s.endpoint()).collect();
    for c in 0..3u64 {
        let client = Client::builder()
            .endpoints(endpoints.clone())
            .retry_for(Duration::from_secs(5))
            .connect()
            .await
            .expect("SDK client");
        tasks.push(tokio::spawn(sdk_user(
            format!("sdk{c}"),
            client,
            keys.clone(),
            seed.wrapping_add(1_000_003 * (c + 1)),
            rec.clone(),
            stop.clone(),
        )));
    }
    let probe_channels: Vec<Channel> = servers.iter().map(|s| lazy_channel(&s.addr)).collect();
    let probe = tokio::spawn(prober(
        probe_channels,
        keys.clone(),
        rec.clone(),
        stop.clone(),
    ));
    let nemesis = tokio::spawn(nemesis(
        Targets {
            redis,
            redis_link,
            servers,
            proxies,
        },
        seed ^ 0x5eed,
        rec.clone(),
        stop.clone(),
    ));

    tokio::time::sleep(length).await;
    stop.cancel();
    // Bounded: every client step is bounded by its own timeouts.
    let targets = tokio::time::timeout(Duration::from_secs(60), nemesis)
        .await
        .expect("nemesis stopped")
        .expect("nemesis");
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
    }
    // Keep probing a little past the last stream end.
    tokio::time::sleep(STREAM_END_BOUND + MARGIN).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), probe).await;
    let now = Instant::now();
    drop(targets);

    let (violations, report) = judge(&rec, base, now);
    let c = &rec.counters;
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let faults = all(&rec.faults);
    let mut kinds: HashMap<String, usize> = HashMap::new();
    for f in &faults {
        let kind = f.what.split(' ').take(2).collect::<Vec<_>>().join(" ");
        *kinds.entry(kind).or_default() += 1;
    }
    eprintln!(
        "randomized fault run, seed {seed}, {:.0} s: acquire calls {} (granted {}, not acquired {}, deadline {}, unavailable {}, cancelled {}, other {}), request_id retries {}, duplicates {} (same lease twice {}), renewals {}, KeepAlive streams {} (attach/close races {}), lets go {} + expiries {}, SDK grants {} (lost {}, cancelled takes {}), Describes {}, leases let go checked gone {} (skipped {}: a fault in the span); faults {} {:?}; {report}",
        now.duration_since(base).as_secs_f64(),
        n(&c.acquire_calls),
        n(&c.granted),
        n(&c.not_acquired),
        n(&c.deadline_exceeded),
        n(&c.unavailable),
        n(&c.cancelled),
        n(&c.other_errors),
        n(&c.request_id_retries),
        n(&c.duplicates),
        n(&c.replays_seen),
        n(&c.renewals),
        n(&c.streams),
        n(&c.attach_close_races),
        n(&c.releases),
        n(&c.expiries),
        n(&c.sdk_grants),
        n(&c.sdk_lost),
        n(&c.sdk_cancels),
        n(&c.describes),
        n(&c.let_go_checked),
        n(&c.let_go_skipped),
        faults.len(),
        kinds,
    );
    let mut by_kind: HashMap<&str, usize> = HashMap::new();
    for v in &violations {
        *by_kind.entry(v.kind).or_default() += 1;
        eprintln!("VIOLATION [{}] key {}: {}", v.kind, v.key, v.detail);
    }
    if !violations.is_empty() {
        for f in &faults {
            eprintln!(
                "  fault [{} .. {}] {}",
                t(base, f.start),
                t(base, f.end),
                f.what
            );
        }
    }
    assert!(
        violations.is_empty(),
        "{} violation(s) {by_kind:?} with LEASEHOLD_FAULTS_SEED={seed} (see VIOLATION lines above)",
        violations.len()
    );
    assert!(
        n(&c.granted) > 0 && n(&c.sdk_grants) > 0,
        "the run granted nothing"
    );
}

// ------------------------------------------------------------ the judge, tested

#[cfg(test)]
mod judge_tests {
    use super::*;

    fn ms(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    fn belief(client: &str, fence: u64, base: Instant, from: u64, to: u64, how: End) -> Belief {
        Belief {
            client: client.into(),
            key: "k".into(),
            fence,
            sent: ms(base, from.saturating_sub(5)),
            start: ms(base, from),
            end: ms(base, to),
            how,
            why: "test".into(),
            via_proxy: Vec::new(),
            granted: "test".into(),
        }
    }

    fn observe(rec: &Record, base: Instant, at: u64, held: Option<u64>) {
        push(
            &rec.observations,
            Observation {
                key: "k".into(),
                sent: ms(base, at),
                replied: ms(base, at + 1),
                held,
            },
        );
    }

    fn kinds(v: &[Violation]) -> Vec<&'static str> {
        let mut k: Vec<_> = v.iter().map(|v| v.kind).collect();
        k.sort();
        k
    }

    #[test]
    fn a_clean_history_has_no_violation() {
        let base = Instant::now();
        let rec = Record::default();
        push(&rec.beliefs, belief("a", 10, base, 0, 500, End::Released));
        push(&rec.beliefs, belief("b", 20, base, 600, 900, End::Released));
        observe(&rec, base, 100, Some(10));
        observe(&rec, base, 550, None);
        observe(&rec, base, 700, Some(20));
        observe(&rec, base, 1000, None);
        push(
            &rec.let_go,
            LetGo {
                client: "a".into(),
                key: "k".into(),
                fence: 10,
                what: "Release answered released=true",
                gone_by: ms(base, 510),
                stream_end: None,
            },
        );
        let (v, _) = judge(&rec, base, ms(base, 2000));
        assert!(v.is_empty(), "{v:?}");
    }

    #[test]
    fn catches_each_kind() {
        let base = Instant::now();
        let rec = Record::default();
        // a believes until 1000; b is granted at 400 with a larger fence.
        push(&rec.beliefs, belief("a", 10, base, 0, 1000, End::Released));
        push(&rec.beliefs, belief("b", 20, base, 400, 600, End::Released));
        // Describe saw b's lease during a's belief.
        observe(&rec, base, 450, Some(20));
        // a's renewal was denied at 700, before its own deadline 1000.
        push(
            &rec.denials,
            Denial {
                client: "a".into(),
                key: "k".into(),
                fence: 10,
                what: "Renew renewed=false",
                sent: ms(base, 699),
                replied: ms(base, 700),
                deadline: ms(base, 1000),
            },
        );
        // b released at 600 (answered), yet Describe shows it at 800.
        push(
            &rec.let_go,
            LetGo {
                client: "b".into(),
                key: "k".into(),
                fence: 20,
                what: "Release answered released=true",
                gone_by: ms(base, 601),
                stream_end: None,
            },
        );
        observe(&rec, base, 800, Some(20));
        // A later Describe goes back to an older fence.
        observe(&rec, base, 900, Some(15));
        let (v, _) = judge(&rec, base, ms(base, 2000));
        assert_eq!(
            kinds(&v),
            [
                "fencing token did not increase",
                "left behind",
                "overlap",
                "taken from holder",
                "taken from holder",
            ],
            "{v:?}"
        );
    }

    #[test]
    fn a_cut_stream_ends_the_belief() {
        let base = Instant::now();
        let rec = Record::default();
        // a's stream ran through proxy 0 from 0 to 1000; the proxy was cut at
        // 300 (the stream's end may release); b was granted at 400.
        let mut a = belief("a", 10, base, 0, 1000, End::Released);
        a.via_proxy.push((0, ms(base, 0), ms(base, 1000)));
        push(&rec.beliefs, a);
        push(&rec.beliefs, belief("b", 20, base, 400, 600, End::Released));
        push(
            &rec.faults,
            Fault {
                start: ms(base, 300),
                end: ms(base, 350),
                what: "cut proxy 0".into(),
                proxy_cut: Some(0),
            },
        );
        push(
            &rec.denials,
            Denial {
                client: "a".into(),
                key: "k".into(),
                fence: 10,
                what: "Renew renewed=false",
                sent: ms(base, 699),
                replied: ms(base, 700),
                deadline: ms(base, 1000),
            },
        );
        observe(&rec, base, 450, Some(20));
        let (v, _) = judge(&rec, base, ms(base, 2000));
        assert!(v.is_empty(), "{v:?}");
    }
}
