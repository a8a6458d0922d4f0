//! The load loops of `leasehold bench`: each drives one scenario for a
//! fixed time (or round count) and returns raw counts and histograms.
//! Every loop is bounded in time; errors are counted, never retried hot.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fred::clients::Pool;
use fred::prelude::*;
use fred::types::scripts::Script;
use fred::types::{Expiration, SetOptions};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

use super::stats::Latency;
use crate::pb;
use crate::pb::lock_service_client::LockServiceClient;

/// A tiny xorshift generator: the workers need cheap, `Send` randomness,
/// not cryptographic quality.
pub struct FastRng(u64);

impl FastRng {
    /// Seeded from the OS RNG.
    pub fn new() -> Self {
        Self(rand::random::<u64>() | 1)
    }
    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// Uniform in `0..n` (n > 0), slightly biased, fine for load.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

impl Default for FastRng {
    fn default() -> Self {
        Self::new()
    }
}

/// Opens `n` HTTP/2 connections to `endpoint`; workers share them.
pub async fn connect(endpoint: &str, n: usize) -> Result<Vec<Channel>, String> {
    let mut channels = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let channel = Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| format!("endpoint {endpoint}: {e}"))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| format!("cannot connect to {endpoint}: {e}"))?;
        channels.push(channel);
    }
    Ok(channels)
}

/// Result of the `cycles` loop.
#[derive(Clone, Default)]
pub struct Cycles {
    /// Acquire + Release pairs completed.
    pub cycles: u64,
    /// Acquires answered "held" (another worker had the key).
    pub contended: u64,
    /// Calls that failed.
    pub errors: u64,
    /// Wall time of the loop.
    pub elapsed: Duration,
    /// Acquire latency.
    pub acquire: Latency,
    /// Release latency.
    pub release: Latency,
}

impl Cycles {
    /// Completed cycles per second.
    pub fn rate(&self) -> f64 {
        self.cycles as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Adds another measurement of the same target (interleaved slices).
    pub fn merge(&mut self, other: &Cycles) {
        self.cycles += other.cycles;
        self.contended += other.contended;
        self.errors += other.errors;
        self.acquire.merge(&other.acquire);
        self.release.merge(&other.release);
    }
}

/// `workers` loops of Acquire (wait 0) + Release over `keys` random keys.
pub async fn cycles_grpc(
    channels: &[Channel],
    workers: usize,
    keys: u64,
    duration: Duration,
) -> Cycles {
    let start = Instant::now();
    let end = start + duration;
    let mut tasks = Vec::new();
    for i in 0..workers {
        let mut client = LockServiceClient::new(channels[i % channels.len()].clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Cycles::default();
            let mut rng = FastRng::new();
            while Instant::now() < end {
                let key = format!("bench/{}", rng.below(keys));
                let t0 = Instant::now();
                let req = pb::AcquireRequest {
                    key: key.clone(),
                    ttl_ms: 10_000,
                    ..Default::default()
                };
                match client.acquire(req).await {
                    Ok(r) => {
                        out.acquire.record(t0.elapsed());
                        let Some(lease) = r.into_inner().lease else {
                            out.contended += 1;
                            continue;
                        };
                        let t1 = Instant::now();
                        match client
                            .release(pb::ReleaseRequest {
                                key,
                                token: lease.token,
                            })
                            .await
                        {
                            Ok(_) => {
                                out.release.record(t1.elapsed());
                                out.cycles += 1;
                            }
                            Err(_) => out.errors += 1,
                        }
                    }
                    Err(_) => {
                        out.errors += 1;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
            out
        }));
    }
    collect_cycles(tasks, start).await
}

/// Sums the workers' counts of one cycles loop that began at `start`.
pub async fn collect_cycles(tasks: Vec<tokio::task::JoinHandle<Cycles>>, start: Instant) -> Cycles {
    let mut total = Cycles::default();
    for t in tasks {
        if let Ok(part) = t.await {
            total.merge(&part);
        }
    }
    total.elapsed = start.elapsed();
    total
}

/// The compare-and-delete of the direct-Redis baseline.
const DELETE_IF_OWNER: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

/// Connects a fred pool for the direct-Redis baseline.
pub async fn redis_pool(url: &str, size: usize) -> Result<Pool, String> {
    let config = Config::from_url(url).map_err(|e| format!("redis url: {e}"))?;
    let pool = Builder::from_config(config)
        .with_performance_config(|p| p.default_command_timeout = Duration::from_secs(5))
        .build_pool(size.max(1))
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(Duration::from_secs(10), pool.init())
        .await
        .map_err(|_| "redis connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(pool)
}

/// Closes a pool from [`redis_pool`] before bench stops the Redis it
/// spawned, so fred does not warn about connections that Redis closed.
pub async fn close(pool: Pool) {
    let _ = tokio::time::timeout(Duration::from_secs(2), pool.quit()).await;
}

async fn redis_try(pool: &Pool, key: &str, token: &str, ttl_ms: i64) -> Result<bool, Error> {
    let r: Option<String> = pool
        .set(
            key,
            token,
            Some(Expiration::PX(ttl_ms)),
            Some(SetOptions::NX),
            false,
        )
        .await?;
    Ok(r.is_some())
}

async fn redis_release(pool: &Pool, script: &Script, key: &str, token: &str) -> Result<i64, Error> {
    script
        .evalsha_with_reload(pool.next(), vec![key.to_string()], vec![token.to_string()])
        .await
}

/// The same loop as [`cycles_grpc`], with fred straight to Redis:
/// `SET NX PX` + a compare-and-delete script.
pub async fn cycles_redis(pool: &Pool, workers: usize, keys: u64, duration: Duration) -> Cycles {
    let start = Instant::now();
    let end = start + duration;
    let script = Script::from_lua(DELETE_IF_OWNER);
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (pool, script) = (pool.clone(), script.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Cycles::default();
            let mut rng = FastRng::new();
            while Instant::now() < end {
                let key = format!("direct-bench/{}", rng.below(keys));
                let token = format!("{:016x}{:016x}", rng.next_u64(), rng.next_u64());
                let t0 = Instant::now();
                match redis_try(&pool, &key, &token, 10_000).await {
                    Ok(true) => {
                        out.acquire.record(t0.elapsed());
                        let t1 = Instant::now();
                        match redis_release(&pool, &script, &key, &token).await {
                            Ok(_) => {
                                out.release.record(t1.elapsed());
                                out.cycles += 1;
                            }
                            Err(_) => out.errors += 1,
                        }
                    }
                    Ok(false) => {
                        out.acquire.record(t0.elapsed());
                        out.contended += 1;
                    }
                    Err(_) => {
                        out.errors += 1;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
            out
        }));
    }
    collect_cycles(tasks, start).await
}

/// Result of the `hot` loop.
#[derive(Clone, Default)]
pub struct Hot {
    /// Acquisitions (each one a handoff from the previous holder).
    pub handoffs: u64,
    /// Waits that ended without the lock.
    pub timeouts: u64,
    /// Calls that failed.
    pub errors: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Time from asking to holding.
    pub wait: Latency,
    /// Acquisitions per worker, for fairness.
    pub per_worker: Vec<u64>,
    /// The most workers that believed at once that they held the lock (a
    /// permit, when shared): from the Acquire reply to sending Release.
    pub max_holders: u64,
    /// Gaps of over a millisecond between one grant and the next, as seen
    /// by the workers: a stall of the chain delays every queued waiter at
    /// once, so a few of them make the wait p99.
    pub stalls: Stalls,
}

/// Long gaps between consecutive grants of a hot loop.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stalls {
    /// Gaps over [`Stalls::OVER`].
    pub count: u64,
    /// Their sum.
    pub total: Duration,
    /// The longest gap of all.
    pub longest: Duration,
}

impl Stalls {
    /// What counts as a stall: ten handoffs or so on this machine.
    pub const OVER: Duration = Duration::from_millis(1);

    /// The gaps between `grants` (times since the loop began), in any order.
    fn of(mut grants: Vec<Duration>) -> Self {
        grants.sort_unstable();
        let mut s = Self::default();
        for pair in grants.windows(2) {
            let gap = pair[1] - pair[0];
            s.longest = s.longest.max(gap);
            if gap > Self::OVER {
                s.count += 1;
                s.total += gap;
            }
        }
        s
    }

    fn merge(&mut self, other: &Stalls) {
        self.count += other.count;
        self.total += other.total;
        self.longest = self.longest.max(other.longest);
    }
}

impl Hot {
    /// Adds another slice of the same target; workers are matched by index.
    pub fn merge(&mut self, other: &Hot) {
        self.handoffs += other.handoffs;
        self.timeouts += other.timeouts;
        self.errors += other.errors;
        self.elapsed += other.elapsed;
        self.wait.merge(&other.wait);
        self.max_holders = self.max_holders.max(other.max_holders);
        self.stalls.merge(&other.stalls);
        if self.per_worker.len() < other.per_worker.len() {
            self.per_worker.resize(other.per_worker.len(), 0);
        }
        for (total, n) in self.per_worker.iter_mut().zip(&other.per_worker) {
            *total += n;
        }
    }

    /// Handoffs per second.
    pub fn rate(&self) -> f64 {
        self.handoffs as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    /// Max / min acquisitions per worker (1.0 is perfectly fair).
    pub fn fairness(&self) -> f64 {
        let max = self.per_worker.iter().copied().max().unwrap_or(0);
        let min = self.per_worker.iter().copied().min().unwrap_or(0);
        if min == 0 {
            f64::INFINITY
        } else {
            max as f64 / min as f64
        }
    }
}

/// One worker's counts in a hot loop.
#[derive(Default)]
pub struct HotPart {
    pub handoffs: u64,
    pub timeouts: u64,
    pub errors: u64,
    pub wait: Latency,
    /// When each grant came, since the loop began (empty where not kept).
    pub granted_at: Vec<Duration>,
}

/// Sums the workers' counts of one hot loop that began at `start`.
pub async fn collect_hot(tasks: Vec<tokio::task::JoinHandle<HotPart>>, start: Instant) -> Hot {
    let mut total = Hot::default();
    let mut grants = Vec::new();
    for t in tasks {
        if let Ok(mut p) = t.await {
            grants.append(&mut p.granted_at);
            total.handoffs += p.handoffs;
            total.timeouts += p.timeouts;
            total.errors += p.errors;
            total.wait.merge(&p.wait);
            total.per_worker.push(p.handoffs);
        }
    }
    total.elapsed = start.elapsed();
    total.stalls = Stalls::of(grants);
    total
}

/// `workers` loops on one key with server-side waiting: Acquire
/// (wait up to 10 s), Release at once, again.
pub async fn hot_grpc(channels: &[Channel], workers: usize, duration: Duration) -> Hot {
    hot_grpc_permits(channels, workers, duration, 0, Duration::ZERO).await
}

/// The hot loop on a semaphore of `permits` (SHARED with that limit), or
/// on an exclusive lock when `permits` is 0, each grant held for `hold`.
/// Counts how many workers believe at once that they hold a permit, which
/// must never exceed it.
pub async fn hot_grpc_permits(
    channels: &[Channel],
    workers: usize,
    duration: Duration,
    permits: u32,
    hold: Duration,
) -> Hot {
    let start = Instant::now();
    let end = start + duration;
    let key = format!("hot/{}", FastRng::new().next_u64());
    let (mode, shared_limit) = if permits > 0 {
        (pb::LockMode::Shared, permits)
    } else {
        (pb::LockMode::Unspecified, 0)
    };
    let holding = Arc::new(AtomicU64::new(0));
    let most = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..workers {
        let mut client = LockServiceClient::new(channels[i % channels.len()].clone());
        let key = key.clone();
        let (holding, most) = (holding.clone(), most.clone());
        tasks.push(tokio::spawn(async move {
            let mut p = HotPart::default();
            while Instant::now() < end {
                let t0 = Instant::now();
                let req = pb::AcquireRequest {
                    key: key.clone(),
                    ttl_ms: 10_000,
                    wait_ms: 10_000,
                    mode: mode.into(),
                    shared_limit,
                    ..Default::default()
                };
                match client.acquire(req).await {
                    Ok(r) => match r.into_inner().lease {
                        Some(lease) => {
                            p.wait.record(t0.elapsed());
                            p.granted_at.push(start.elapsed());
                            p.handoffs += 1;
                            let now = holding.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            if !hold.is_zero() {
                                tokio::time::sleep(hold).await;
                            }
                            holding.fetch_sub(1, Ordering::SeqCst);
                            if client
                                .release(pb::ReleaseRequest {
                                    key: key.clone(),
                                    token: lease.token,
                                })
                                .await
                                .is_err()
                            {
                                p.errors += 1;
                            }
                        }
                        None => p.timeouts += 1,
                    },
                    Err(_) => {
                        p.errors += 1;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
            p
        }));
    }
    let mut hot = collect_hot(tasks, start).await;
    hot.max_holders = most.load(Ordering::SeqCst);
    hot
}

/// The hot loop with fred straight to Redis, polling with exponential
/// backoff and full jitter (1 ms doubling to 32 ms), as client-side
/// Redis locks do.
pub async fn hot_redis(pool: &Pool, workers: usize, duration: Duration) -> Hot {
    let start = Instant::now();
    let end = start + duration;
    let key = format!("direct-hot/{}", FastRng::new().next_u64());
    let script = Script::from_lua(DELETE_IF_OWNER);
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (pool, script, key) = (pool.clone(), script.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let mut p = HotPart::default();
            let mut rng = FastRng::new();
            while Instant::now() < end {
                let t0 = Instant::now();
                let token = format!("{:016x}", rng.next_u64());
                let mut attempt = 0u32;
                let give_up = t0 + Duration::from_secs(10);
                loop {
                    match redis_try(&pool, &key, &token, 10_000).await {
                        Ok(true) => {
                            p.wait.record(t0.elapsed());
                            p.granted_at.push(start.elapsed());
                            p.handoffs += 1;
                            if redis_release(&pool, &script, &key, &token).await.is_err() {
                                p.errors += 1;
                            }
                            break;
                        }
                        Ok(false) if Instant::now() < give_up => {
                            let ceiling = (1u64 << attempt.min(5)) * 1000;
                            attempt += 1;
                            tokio::time::sleep(Duration::from_micros(rng.below(ceiling) + 1)).await;
                        }
                        Ok(false) => {
                            p.timeouts += 1;
                            break;
                        }
                        Err(_) => {
                            p.errors += 1;
                            tokio::time::sleep(Duration::from_millis(1)).await;
                            break;
                        }
                    }
                }
            }
            p
        }));
    }
    collect_hot(tasks, start).await
}

/// Result of the `keepalive` loop.
#[derive(Clone, Default)]
pub struct KeepAlive {
    /// Locks set up and kept alive.
    pub locks: u64,
    /// Renewals answered alive.
    pub renewals: u64,
    /// Renewals answered alive = false: locks lost.
    pub lost: u64,
    /// Streams or calls that failed.
    pub errors: u64,
    /// Wall time of the steady state.
    pub elapsed: Duration,
    /// Time from sending a renewal to its answer.
    pub renew: Latency,
}

impl KeepAlive {
    /// Renewals per second.
    pub fn rate(&self) -> f64 {
        self.renewals as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// One stream's client and the (key, token) pairs it keeps alive.
type StreamLocks = (LockServiceClient<Channel>, Vec<(String, String)>);

/// Locks and streams set up, ready to run.
pub struct KeepAliveSetup {
    streams: Vec<StreamLocks>,
    ttl_ms: u32,
    /// Locks acquired.
    pub locks: u64,
    /// Acquires that failed during setup.
    pub errors: u64,
}

/// Acquires `streams × locks_per_stream` locks, spread over connections
/// of at most `streams_per_connection` streams each.
pub async fn keepalive_setup(
    endpoint: &str,
    streams: usize,
    locks_per_stream: usize,
    ttl_ms: u32,
    streams_per_connection: usize,
) -> Result<KeepAliveSetup, String> {
    let connections = streams.div_ceil(streams_per_connection.max(1));
    let channels = connect(endpoint, connections).await?;
    let run = FastRng::new().next_u64();
    let errors = Arc::new(AtomicU64::new(0));
    // Acquire concurrently, 256 at a time.
    let (tx, mut rx) = mpsc::channel(256);
    let mut setup = Vec::with_capacity(streams);
    let producer = {
        let channels = channels.clone();
        let errors = errors.clone();
        tokio::spawn(async move {
            let sem = Arc::new(tokio::sync::Semaphore::new(256));
            for s in 0..streams {
                let client = LockServiceClient::new(channels[s % channels.len()].clone());
                let Ok(permit) = sem.clone().acquire_owned().await else {
                    break;
                };
                let (tx, errors) = (tx.clone(), errors.clone());
                tokio::spawn(async move {
                    let mut c = client.clone();
                    let mut held = Vec::with_capacity(locks_per_stream);
                    for l in 0..locks_per_stream {
                        let key = format!("ka/{run:x}/{s}/{l}");
                        let req = pb::AcquireRequest {
                            key: key.clone(),
                            ttl_ms,
                            ..Default::default()
                        };
                        match c.acquire(req).await.map(|r| r.into_inner().lease) {
                            Ok(Some(lease)) => held.push((key, lease.token)),
                            _ => {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    let _ = tx.send((client, held)).await;
                    drop(permit);
                });
            }
        })
    };
    while setup.len() < streams {
        match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
            Ok(Some(item)) => setup.push(item),
            _ => break,
        }
    }
    let _ = producer.await;
    let locks = setup.iter().map(|(_, h)| h.len() as u64).sum();
    Ok(KeepAliveSetup {
        streams: setup,
        ttl_ms,
        locks,
        errors: errors.load(Ordering::Relaxed),
    })
}

/// Keeps every set-up lock alive over its stream for `duration`, renewing
/// each at TTL/3 (staggered), then ends the streams (releasing the locks).
pub async fn keepalive_run(setup: KeepAliveSetup, duration: Duration) -> KeepAlive {
    let start = Instant::now();
    let end = start + duration;
    let period = Duration::from_millis(u64::from(setup.ttl_ms / 3).max(1));
    let locks = setup.locks;
    let mut tasks = Vec::new();
    for (mut client, held) in setup.streams {
        tasks.push(tokio::spawn(async move {
            let mut out = KeepAlive::default();
            let (tx, rx) = mpsc::channel::<pb::KeepAliveRequest>(held.len().max(1) * 2);
            let stream = match client.keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx)).await {
                Ok(s) => s.into_inner(),
                Err(_) => {
                    out.errors += 1;
                    return out;
                }
            };
            let mut stream = stream;
            let mut rng = FastRng::new();
            let first = Duration::from_millis(rng.below(period.as_millis() as u64));
            let mut tick = tokio::time::interval_at((Instant::now() + first).into(), period);
            let mut sent: std::collections::HashMap<String, Instant> = std::collections::HashMap::new();
            let deadline = tokio::time::sleep_until(end.into());
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    _ = &mut deadline => break,
                    _ = tick.tick() => {
                        for (key, token) in &held {
                            sent.insert(key.clone(), Instant::now());
                            let req = pb::KeepAliveRequest { key: key.clone(), token: token.clone(), ttl_ms: 0, release: false };
                            if tx.send(req).await.is_err() {
                                out.errors += 1;
                            }
                        }
                    }
                    msg = stream.message() => match msg {
                        Ok(Some(r)) => {
                            if let Some(t0) = sent.remove(&r.key) {
                                out.renew.record(t0.elapsed());
                            }
                            if r.alive { out.renewals += 1 } else { out.lost += 1 }
                        }
                        _ => {
                            out.errors += 1;
                            break;
                        }
                    },
                }
            }
            drop(tx);
            // Drain: the server releases everything when it sees the end.
            let _ = tokio::time::timeout(Duration::from_secs(5), async { while let Ok(Some(_)) = stream.message().await {} }).await;
            out
        }));
    }
    let mut total = KeepAlive {
        locks,
        ..Default::default()
    };
    for t in tasks {
        if let Ok(p) = t.await {
            total.renewals += p.renewals;
            total.lost += p.lost;
            total.errors += p.errors;
            total.renew.merge(&p.renew);
        }
    }
    total.elapsed = duration.min(start.elapsed());
    total
}

#[cfg(test)]
mod stall_tests {
    use super::*;

    #[test]
    fn stalls_are_the_gaps_over_a_millisecond_in_any_order() {
        let us = Duration::from_micros;
        let s = Stalls::of(vec![us(3_000), us(0), us(5_000), us(500), us(3_200)]);
        assert_eq!(s.count, 2, "{s:?}");
        assert_eq!(s.total, us(2_500) + us(1_800), "{s:?}");
        assert_eq!(s.longest, us(2_500), "{s:?}");
        assert_eq!(Stalls::of(Vec::new()).count, 0);
    }
}
