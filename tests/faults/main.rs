//! Safety under faults: real SDK clients (in this process, and in client
//! processes of their own) against real `leasehold serve` processes and a
//! real Redis Cluster, while the scenarios SIGKILL a Redis primary, a
//! Leasehold server or a client, SIGSTOP a client past its TTL, and cut
//! Redis off. Every grant, release and loss goes into a history and every
//! write into a fenced resource (`faults/checker.rs`); each scenario checks
//! the history and prints its figures (run with `--nocapture` to see them).
//! One file per scenario: `failover.rs` (1, 1b), `server_killed.rs` (2),
//! `client_killed.rs` (3), `client_paused.rs` (4), `redis_cut.rs` (5),
//! `reattach.rs` (6, 6b), and one per primitive beyond the mutex:
//! `semaphore.rs`, `read_write.rs`, `election.rs`; this file holds what
//! they share.
//! `faults/random.rs` is the randomized run (seeded by
//! `LEASEHOLD_FAULTS_SEED`, length `LEASEHOLD_FAULTS_MINUTES`);
//! `faults/durability.rs` kills Redis under each persistence setting and
//! restarts every server in turn.
//!
//! CI runs short versions. The full versions (more clients, more rounds,
//! longer outages):
//!
//! ```sh
//! LEASEHOLD_FAULTS_FULL=1 cargo test --release --test faults -- --nocapture
//! ```
//!
//! The scenarios run one at a time (they share two CPUs and time bounds);
//! documentation/safety.md has the figures and what they mean.

#[path = "../common/mod.rs"]
mod common;

mod checker;
mod client_killed;
mod client_paused;
mod durability;
mod election;
mod failover;
mod proxy;
mod random;
mod read_write;
mod reattach;
mod redis_cut;
mod remote;
mod semaphore;
mod server_killed;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use checker::{End, History, Resource, Window, check, fence_order_violations, most_at_once};
use common::*;
use leasehold::client::{Client, Error, LockGuard, Lost, LostReason};
use leasehold::pb;
use leasehold::pb::lock_service_client::LockServiceClient;
use tokio_util::sync::CancellationToken;
use tonic::Code;

/// Scenarios take turns: each has its own processes and time bounds.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `LEASEHOLD_FAULTS_FULL=1`: the full versions.
fn full() -> bool {
    std::env::var("LEASEHOLD_FAULTS_FULL").is_ok_and(|v| v == "1")
}

/// The body of the client processes that scenarios 3 and 4 start
/// (`remote.rs`); without its environment variable it does nothing.
#[test]
#[ignore = "the entry point of client processes the scenarios spawn, not a test"]
fn client_process() {
    let Ok(spec) = std::env::var(remote::ENV) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    if let Err(e) = rt.block_on(remote::run_client(&spec)) {
        panic!("client process failed: {e}");
    }
}

// ---------------------------------------------------------------- helpers

/// An SDK client over `endpoints` that retries for `retry_for`.
async fn sdk(endpoints: &[String], retry_for: Duration) -> Client {
    Client::builder()
        .endpoints(endpoints.to_vec())
        .retry_for(retry_for)
        .connect()
        .await
        .expect("connect the SDK")
}

/// Both servers' endpoints, the `i`th client's first one alternating, so
/// that half the clients start on each server.
fn endpoints_alternating(i: u64, a: &ServerProcess, b: &ServerProcess) -> Vec<String> {
    let (first, second) = if i % 2 == 0 { (a, b) } else { (b, a) };
    vec![first.endpoint(), second.endpoint()]
}

/// Polls `ready` every 20 ms for at most `within`.
async fn until(what: &str, within: Duration, mut ready: impl FnMut() -> bool) -> Instant {
    let end = Instant::now() + within;
    loop {
        if ready() {
            return Instant::now();
        }
        assert!(
            Instant::now() < end,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// What a worker does in a loop: take a key, write to the resource while
/// holding it, release it.
#[derive(Clone)]
struct Load {
    keys: Vec<String>,
    ttl: Duration,
    hold: Duration,
    writes: u32,
    wait: Duration,
}

/// What went wrong for one worker.
#[derive(Debug, Default)]
struct WorkerStats {
    errors: Vec<(Instant, String)>,
    not_acquired: u64,
    lost_on_attach: u64,
}

/// One SDK client taking, using and giving back locks until `stop`.
async fn worker(
    name: String,
    client: Client,
    load: Load,
    history: Arc<History>,
    resource: Arc<Resource>,
    stop: CancellationToken,
) -> WorkerStats {
    let mut stats = WorkerStats::default();
    let mut i = name.bytes().map(usize::from).sum::<usize>();
    while !stop.is_cancelled() {
        let key = load.keys[i % load.keys.len()].clone();
        i += 1;
        let sent = Instant::now();
        let taken = tokio::select! {
            r = client.lock(key.as_str()).ttl(load.ttl).wait(load.wait).owner(name.as_str()) => r,
            _ = stop.cancelled() => break,
        };
        let guard = match taken {
            Ok(guard) => guard,
            Err(Error::NotAcquired { .. }) => {
                stats.not_acquired += 1;
                continue;
            }
            // Granted, then lost before lock() returned (its attach stalled
            // past the client's bound on a loaded machine): the client never
            // believed it held the lock, which is the safe outcome.
            Err(Error::Lost { .. }) => {
                stats.lost_on_attach += 1;
                continue;
            }
            Err(e) => {
                stats.errors.push((Instant::now(), e.to_string()));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let fence = guard.fencing_token();
        history.grant(&name, &key, fence, sent, Instant::now());
        let mut lost = guard.lost();
        let mut was_lost = false;
        let step = load.hold / load.writes.max(1);
        for _ in 0..load.writes {
            resource.write(&name, &key, fence);
            tokio::select! {
                _ = &mut lost => { was_lost = true; break }
                _ = tokio::time::sleep(step) => {}
            }
        }
        if was_lost || guard.is_lost() {
            history.end(&name, &key, fence, Instant::now(), End::Lost);
        } else {
            history.end(&name, &key, fence, Instant::now(), End::Released);
            if let Err(e) = guard.release().await {
                stats.errors.push((Instant::now(), format!("release: {e}")));
            }
        }
    }
    stats
}

/// How a [`mode_worker`] takes its lock, and for how long.
#[derive(Clone, Debug)]
struct ModeLoad {
    key: String,
    /// `Some(limit)`: SHARED (a permit, a reader); `None`: exclusive.
    shared: Option<u32>,
    ttl: Duration,
    wait: Duration,
    /// Each hold lasts between these (milliseconds), drawn from the seed.
    hold_ms: (u64, u64),
    /// The pause between a release and the next Acquire, likewise.
    pause_ms: (u64, u64),
}

/// What a [`mode_worker`] saw: its grants and how long each took to come.
#[derive(Debug, Default)]
struct ModeStats {
    waits: Vec<Duration>,
    errors: Vec<String>,
}

/// Waits (bounded) for stopped [`mode_worker`]s; every one must have seen
/// no error. Their waits for a grant, shortest first.
async fn mode_waits(tasks: Vec<tokio::task::JoinHandle<ModeStats>>) -> Vec<Duration> {
    let mut waits = Vec::new();
    for task in tasks {
        let stats = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("worker stopped in time")
            .expect("worker task");
        assert!(stats.errors.is_empty(), "{:?}", stats.errors);
        waits.extend(stats.waits);
    }
    waits.sort();
    waits
}

/// One SDK client taking `load.key` SHARED or exclusive in a loop until
/// `stop`, holding it for a seeded random time; its belief (from the
/// grant's return to just before the release call, or to `lost()`) goes
/// into `history`.
async fn mode_worker(
    name: String,
    client: Client,
    load: ModeLoad,
    seed: u64,
    history: Arc<History>,
    stop: CancellationToken,
) -> ModeStats {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut stats = ModeStats::default();
    while !stop.is_cancelled() {
        let sent = Instant::now();
        let mut builder = client
            .lock(load.key.as_str())
            .ttl(load.ttl)
            .wait(load.wait)
            .owner(name.as_str());
        if let Some(limit) = load.shared {
            builder = builder.shared(limit);
        }
        let taken = tokio::select! {
            r = builder => r,
            _ = stop.cancelled() => break,
        };
        let guard = match taken {
            Ok(guard) => guard,
            Err(e) => {
                stats.errors.push(e.to_string());
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let at = Instant::now();
        stats.waits.push(at - sent);
        let fence = guard.fencing_token();
        history.grant(&name, &load.key, fence, sent, at);
        let hold = Duration::from_millis(rng.random_range(load.hold_ms.0..=load.hold_ms.1));
        let lost = tokio::select! {
            _ = guard.lost() => true,
            _ = tokio::time::sleep(hold) => guard.is_lost(),
        };
        if lost {
            history.end(&name, &load.key, fence, Instant::now(), End::Lost);
        } else {
            history.end(&name, &load.key, fence, Instant::now(), End::Released);
            if let Err(e) = guard.release().await {
                stats.errors.push(format!("release: {e}"));
            }
        }
        let pause = Duration::from_millis(rng.random_range(load.pause_ms.0..=load.pause_ms.1));
        tokio::time::sleep(pause).await;
    }
    stats
}

/// The holders of `key` a server describes now, by owner.
async fn holders_of(endpoint: &str, key: &str) -> Vec<String> {
    let mut c = LockServiceClient::connect(endpoint.to_string())
        .await
        .expect("connect for Describe");
    c.describe(pb::DescribeRequest { key: key.into() })
        .await
        .expect("describe")
        .into_inner()
        .holders
        .into_iter()
        .map(|h| h.owner)
        .collect()
}

/// The seed of the scenarios that draw random holds:
/// `LEASEHOLD_FAULTS_SEED`, or a fixed one so that CI runs are repeatable.
fn mode_seed() -> u64 {
    std::env::var("LEASEHOLD_FAULTS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15)
}

/// Workers running in the background.
struct Crew {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<WorkerStats>>,
}

impl Crew {
    fn new() -> Self {
        Self {
            stop: CancellationToken::new(),
            tasks: Vec::new(),
        }
    }

    async fn add(
        &mut self,
        name: String,
        endpoints: &[String],
        load: Load,
        history: &Arc<History>,
        resource: &Arc<Resource>,
    ) {
        let client = sdk(endpoints, Duration::from_secs(20)).await;
        self.tasks.push(tokio::spawn(worker(
            name,
            client,
            load,
            history.clone(),
            resource.clone(),
            self.stop.clone(),
        )));
    }

    /// Stops every worker (bounded) and returns their errors.
    async fn stop(self) -> Vec<(Instant, String)> {
        self.stop.cancel();
        let mut errors = Vec::new();
        for task in self.tasks {
            let stats = tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("worker stopped in time")
                .expect("worker task");
            errors.extend(stats.errors);
        }
        errors
    }
}

/// Grants of `keys` whose holders got them after `after`.
fn grants_after(history: &History, keys: &[String], after: Instant) -> Vec<Instant> {
    let mut at: Vec<Instant> = history
        .windows()
        .into_iter()
        .filter(|w| keys.contains(&w.key) && w.start > after)
        .map(|w| w.start)
        .collect();
    at.sort();
    at
}

/// The largest gap between consecutive grants of `keys` within
/// [`from`, `to`] (the ends count as grants).
fn largest_gap(history: &History, keys: &[String], from: Instant, to: Instant) -> Duration {
    let mut times: Vec<Instant> = grants_after(history, keys, from)
        .into_iter()
        .filter(|t| *t <= to)
        .collect();
    times.insert(0, from);
    times.push(to);
    times
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
}

/// The lock service's health as a Watch stream reports it, with when each
/// status arrived.
struct HealthLog {
    log: Arc<Mutex<Vec<(Instant, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl HealthLog {
    async fn watch(endpoint: &str) -> Self {
        let channel = tonic::transport::Channel::from_shared(endpoint.to_string())
            .expect("endpoint")
            .connect()
            .await
            .expect("connect health");
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let mut stream = health
            .watch(tonic_health::pb::HealthCheckRequest {
                service: pb::SERVICE_NAME.to_string(),
            })
            .await
            .expect("health watch")
            .into_inner();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let task = tokio::spawn(async move {
            while let Ok(Some(msg)) = stream.message().await {
                sink.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((Instant::now(), msg.status().as_str_name().to_string()));
            }
        });
        Self { log, task }
    }

    /// When `status` was first reported after `after` (waiting at most `within`).
    async fn reached(&self, status: &str, after: Instant, within: Duration) -> Instant {
        let mut found = None;
        until(&format!("health {status}"), within, || {
            found = self
                .log
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .find(|(t, s)| *t >= after && s == status)
                .map(|(t, _)| *t);
            found.is_some()
        })
        .await;
        found.expect("found")
    }
}

impl Drop for HealthLog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `leasehold serve` on `url` under `prefix` with a short health interval,
/// plus `extra` flags; ready once SERVING.
fn serve(url: &str, prefix: &str, extra: &[&str]) -> ServerProcess {
    let mut args = on_redis_args(url, prefix);
    args.extend_from_slice(extra);
    tokio::task::block_in_place(|| ServerProcess::start(&args))
}

/// What the client-process scenarios (3 and 4) start from: a server on
/// the shared cluster, a history, a fenced resource, and the hub the client
/// processes report to.
struct RemoteRig {
    server: ServerProcess,
    history: Arc<History>,
    resource: Arc<Resource>,
    hub: remote::Hub,
}

async fn remote_rig() -> RemoteRig {
    let url = cluster_url();
    let prefix = unique_prefix();
    let server = serve(&url, &prefix, &[]);
    let history = Arc::new(History::new());
    let resource = Arc::new(Resource::new());
    let hub = remote::Hub::start(history.clone(), resource.clone()).await;
    RemoteRig {
        server,
        history,
        resource,
        hub,
    }
}

/// A lock a holder keeps through a scenario: (holder, key, guard, lost).
type Held = (String, String, LockGuard, Lost);

/// Takes `key` for `holder` (trying once) and records the grant.
async fn hold(
    client: &Client,
    history: &History,
    holder: &str,
    key: String,
    ttl: Duration,
) -> Held {
    let sent = Instant::now();
    let guard = client
        .lock(key.as_str())
        .ttl(ttl)
        .wait(Duration::ZERO)
        .await
        .expect("held");
    history.grant(holder, &key, guard.fencing_token(), sent, Instant::now());
    let lost = guard.lost();
    (holder.to_string(), key, guard, lost)
}

/// Releases a held lock, records it, and checks that it was still held.
async fn give_back(history: &History, holder: &str, key: &str, guard: LockGuard) {
    history.end(
        holder,
        key,
        guard.fencing_token(),
        Instant::now(),
        End::Released,
    );
    assert!(guard.release().await.expect("release"), "{key}");
}

// ------------------------------------------------------ cluster topology

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
struct Node {
    id: String,
    port: u16,
    master: bool,
    failed: bool,
    master_id: String,
    slots: Vec<(u16, u16)>,
}

/// The cluster as the node on `port` sees it.
fn cluster_nodes(port: u16) -> Vec<Node> {
    redis_cli(port, &["CLUSTER", "NODES"])
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let addr = f.get(1)?.split('@').next()?;
            let port = addr.rsplit(':').next()?.parse().ok()?;
            let flags = f.get(2)?;
            let slots = f
                .iter()
                .skip(8)
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|a| (a, a)),
                })
                .collect();
            Some(Node {
                id: f[0].to_string(),
                port,
                master: flags.contains("master"),
                failed: flags.contains("fail"),
                master_id: f.get(3)?.to_string(),
                slots,
            })
        })
        .collect()
}

/// The hash slot of a lock's Redis keys.
fn slot_of(prefix: &str, key: &str) -> u16 {
    let names = leasehold::store::RedisNames::of(
        prefix,
        &leasehold::lock::LockKey::parse(key, 512).expect("key"),
    );
    fred::util::redis_keyslot(names.lock.as_bytes())
}

/// The port of the healthy primary serving `slot`, seen from `port`.
fn owner_of(port: u16, slot: u16) -> Option<u16> {
    cluster_nodes(port)
        .into_iter()
        .find(|n| n.master && !n.failed && n.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
        .map(|n| n.port)
}

/// The index in `cluster.nodes` of the node listening on `port`.
fn index_of(cluster: &RedisCluster, port: u16) -> usize {
    cluster
        .nodes
        .iter()
        .position(|n| n.port == port)
        .expect("a node of this cluster")
}

/// The replicas of the primary on `port`, as indices.
fn replicas_of(cluster: &RedisCluster, port: u16) -> Vec<usize> {
    let nodes = cluster_nodes(port);
    let Some(id) = nodes.iter().find(|n| n.port == port).map(|n| n.id.clone()) else {
        return Vec::new();
    };
    nodes
        .iter()
        .filter(|n| !n.master && n.master_id == id)
        .map(|n| index_of(cluster, n.port))
        .collect()
}

/// Waits until a node other than `dead` serves `slot` and every live node
/// says `cluster_state:ok`; returns the new owner's port and when.
async fn wait_promoted(cluster: &RedisCluster, dead: u16, slot: u16) -> (u16, Instant) {
    let live: Vec<u16> = cluster
        .nodes
        .iter()
        .map(|n| n.port)
        .filter(|p| *p != dead)
        .collect();
    let mut owner = None;
    let at = until(
        "a replica promoted and the cluster ok",
        Duration::from_secs(30),
        || {
            owner = tokio::task::block_in_place(|| {
                let o = owner_of(live[0], slot).filter(|p| *p != dead)?;
                live.iter()
                    .all(|p| redis_cli(*p, &["CLUSTER", "INFO"]).contains("cluster_state:ok"))
                    .then_some(o)
            });
            owner.is_some()
        },
    )
    .await;
    (owner.expect("promoted"), at)
}

/// Waits until every replica's link to its primary is up (a replica that
/// never synced cannot be promoted) and every primary lists a replica in
/// its CLUSTER NODES.
async fn wait_replicated(cluster: &RedisCluster) {
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
    until("every replica in sync", Duration::from_secs(30), || {
        tokio::task::block_in_place(|| {
            ports.iter().all(|p| {
                let info = redis_cli(*p, &["INFO", "replication"]);
                if info.contains("role:master") {
                    // The primary's CLUSTER NODES, where `replicas_of` looks,
                    // learns of its replica by gossip, which can lag the
                    // replication link (CI once found none there).
                    !replicas_of(cluster, *p).is_empty()
                } else {
                    info.contains("master_link_status:up")
                }
            })
        })
    })
    .await;
}

/// Restarts the (killed) node `i`; it rejoins as a replica. Returns when
/// its replication link is up.
async fn rejoin(cluster: &mut RedisCluster, i: usize) -> Instant {
    tokio::task::block_in_place(|| cluster.nodes[i].restart());
    let port = cluster.nodes[i].port;
    until(
        "the restarted node replicating",
        Duration::from_secs(30),
        || {
            let info = tokio::task::block_in_place(|| redis_cli(port, &["INFO", "replication"]));
            info.contains("role:slave") && info.contains("master_link_status:up")
        },
    )
    .await
}

/// `n` lock keys (`base/0`, `base/1`, ...) whose slots `want` accepts.
fn keys_where(prefix: &str, base: &str, n: usize, want: impl Fn(u16) -> bool) -> Vec<String> {
    let keys: Vec<String> = (0..10_000)
        .map(|i| format!("{base}/{i}"))
        .filter(|k| want(slot_of(prefix, k)))
        .take(n)
        .collect();
    assert_eq!(keys.len(), n, "found too few keys for {base}");
    keys
}
