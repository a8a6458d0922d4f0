//! Safety under faults: real SDK clients (in this process, and in client
//! processes of their own) against real `leasehold serve` processes and a
//! real Redis Cluster, while the scenarios SIGKILL a Redis primary, a
//! Leasehold server or a client, SIGSTOP a client past its TTL, and cut
//! Redis off. Every grant, release and loss goes into a history and every
//! write into a fenced resource (`faults/checker.rs`); each scenario checks
//! the history and prints its figures (run with `--nocapture` to see them).
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

mod common;

#[path = "common/binary.rs"]
mod binary;
#[path = "faults/checker.rs"]
mod checker;
#[path = "faults/durability.rs"]
mod durability;
#[path = "faults/proxy.rs"]
mod proxy;
#[path = "faults/random.rs"]
mod random;
#[path = "faults/reattach.rs"]
mod reattach;
#[path = "faults/remote.rs"]
mod remote;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use binary::{Binary, signal};
use checker::{End, History, Resource, check};
use common::*;
use leasehold::client::{Client, Error, LostReason};
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
fn serve(url: &str, prefix: &str, extra: &[&str]) -> Binary {
    let mut args = on_redis_args(url, prefix);
    args.extend_from_slice(extra);
    tokio::task::block_in_place(|| Binary::start(&args))
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

/// Waits until every replica's link to its primary is up: a replica that
/// never synced cannot be promoted.
async fn wait_replicated(cluster: &RedisCluster) {
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
    until("every replica in sync", Duration::from_secs(30), || {
        tokio::task::block_in_place(|| {
            ports.iter().all(|p| {
                let info = redis_cli(*p, &["INFO", "replication"]);
                info.contains("role:master") || info.contains("master_link_status:up")
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

// ----------------------------------------- scenario 1: a primary SIGKILLed

/// Figures of one scenario 1 round.
#[derive(Debug, Default)]
struct FailoverFigures {
    acks: u32,
    kills: usize,
    failover: Vec<Duration>,
    hot_gap: Vec<Duration>,
    cold_gap: Vec<Duration>,
    cold_grants_during: Vec<usize>,
    grants: usize,
    overlaps: usize,
    max_overlap: Duration,
    stale_rejected: usize,
    errors: usize,
    report: String,
}

struct FailoverParams {
    hot_keys: usize,
    hot_workers: usize,
    cold_workers: usize,
    grants_between: usize,
    kills: usize,
}

/// Clients lock hot keys (all on one primary) and cold keys (on the other
/// primaries) through two servers while the hot keys' primary is
/// SIGKILLed, a replica promoted, and the old primary restarted as a
/// replica; `kills` times.
async fn failover_round(
    cluster: &mut RedisCluster,
    acks: u32,
    p: &FailoverParams,
) -> FailoverFigures {
    let prefix = unique_prefix();
    let url = cluster.url();
    let acks_flag = acks.to_string();
    let extra = ["--store-timeout", "1s", "--min-replica-acks", &acks_flag];
    let servers = [serve(&url, &prefix, &extra), serve(&url, &prefix, &extra)];
    let endpoints: Vec<String> = servers.iter().map(Binary::endpoint).collect();
    let any = cluster.nodes[0].port;

    let hot_master =
        tokio::task::block_in_place(|| owner_of(any, slot_of(&prefix, "hot/0"))).expect("an owner");
    let hot_slots: Vec<(u16, u16)> = tokio::task::block_in_place(|| {
        cluster_nodes(any)
            .into_iter()
            .find(|n| n.port == hot_master)
            .map(|n| n.slots)
            .unwrap_or_default()
    });
    let on_hot = |s: u16| hot_slots.iter().any(|(a, b)| (*a..=*b).contains(&s));
    let hot = keys_where(&prefix, "hot", p.hot_keys, on_hot);
    let cold = keys_where(&prefix, "cold", 2, |s| !on_hot(s));
    let hot_slot = slot_of(&prefix, &hot[0]);

    let history = Arc::new(History::new());
    let resource = Arc::new(Resource::new());
    let mut crew = Crew::new();
    let load = |keys: &[String]| Load {
        keys: keys.to_vec(),
        ttl: Duration::from_secs(2),
        hold: Duration::from_millis(20),
        writes: 2,
        wait: Duration::from_secs(5),
    };
    for i in 0..p.hot_workers + p.cold_workers {
        let mut eps = endpoints.clone();
        eps.rotate_left(i % 2);
        let (name, keys) = if i < p.hot_workers {
            (format!("hot-{i}"), &hot)
        } else {
            (format!("cold-{i}"), &cold)
        };
        crew.add(name, &eps, load(keys), &history, &resource).await;
    }

    let mut figures = FailoverFigures {
        acks,
        kills: p.kills,
        ..FailoverFigures::default()
    };
    let mut since = history.started;
    for round in 0..p.kills {
        until(
            "hot grants before the kill",
            Duration::from_secs(60),
            || grants_after(&history, &hot, since).len() >= p.grants_between,
        )
        .await;
        let master = tokio::task::block_in_place(|| {
            let live = cluster
                .nodes
                .iter()
                .map(|n| n.port)
                .find(|p| redis_cli(*p, &["PING"]) == "PONG")
                .expect("a live node");
            owner_of(live, hot_slot)
        })
        .expect("the hot slot has an owner");
        let i = index_of(cluster, master);
        let killed_at = history.fault(format!(
            "round {round}: SIGKILL primary 127.0.0.1:{master} (owns the hot keys)"
        ));
        tokio::task::block_in_place(|| cluster.nodes[i].kill());
        // A waiting Acquire on a lock of a healthy primary, on a channel
        // no one subscribed yet, while the subscriber client reconnects:
        // granted (regression: it failed with UNAVAILABLE until the
        // failover was over).
        let fresh = keys_where(&prefix, &format!("fresh/{round}"), 1, |s| !on_hot(s));
        let mut raw = LockServiceClient::connect(endpoints[0].clone())
            .await
            .expect("connect");
        let fresh_grant = raw
            .acquire(acquire_wait(&fresh[0], 1_000, 5_000))
            .await
            .map(|r| r.into_inner().acquired);
        let fresh_at = Instant::now();
        let (new_master, promoted_at) = wait_promoted(cluster, master, hot_slot).await;
        assert_eq!(
            fresh_grant.map_err(|s| s.to_string()),
            Ok(true),
            "a waiting Acquire on a healthy primary during the failover"
        );
        assert!(
            fresh_at < promoted_at,
            "the waiting Acquire was held up by the failover"
        );
        let rejoined_at = rejoin(cluster, i).await;
        history.fault(format!(
            "round {round}: 127.0.0.1:{master} restarted, replica of 127.0.0.1:{new_master}"
        ));
        let resumed = until(
            "a hot grant after the rejoin",
            Duration::from_secs(60),
            || !grants_after(&history, &hot, rejoined_at.max(promoted_at)).is_empty(),
        )
        .await;
        let hot_outage = largest_gap(&history, &hot, killed_at, resumed);
        figures.failover.push(promoted_at - killed_at);
        figures.hot_gap.push(hot_outage);
        figures
            .cold_gap
            .push(largest_gap(&history, &cold, killed_at, promoted_at));
        figures.cold_grants_during.push(
            grants_after(&history, &cold, killed_at)
                .into_iter()
                .filter(|t| *t <= promoted_at)
                .count(),
        );
        eprintln!(
            "scenario 1 (--min-replica-acks {acks}) round {round}: failover {} (kill → replica promoted, cluster ok), old primary replicating again after {}, hot keys without a grant for {}, cold keys granted {} times while failing over",
            secs(promoted_at - killed_at),
            secs(rejoined_at - killed_at),
            secs(hot_outage),
            figures.cold_grants_during.last().copied().unwrap_or(0),
        );
        since = rejoined_at;
    }
    until(
        "hot grants after the last rejoin",
        Duration::from_secs(60),
        || grants_after(&history, &hot, since).len() >= p.grants_between,
    )
    .await;
    let errors = crew.stop().await;
    drop(servers);
    let report = check(&history, &resource, Instant::now());
    eprintln!("scenario 1 (--min-replica-acks {acks}): {report}");
    for o in &report.overlaps {
        eprintln!("  overlap {o:?}");
    }
    for (at, e) in errors.iter().take(5) {
        eprintln!(
            "  error {:.2} s in: {e}",
            (*at - history.started).as_secs_f64()
        );
    }
    report.assert_fencing_holds();
    figures.grants = report.grants;
    figures.overlaps = report.overlaps.len();
    figures.max_overlap = report.max_overlap();
    figures.stale_rejected = report.stale_rejected;
    figures.errors = errors.len();
    figures.report = report.to_string();
    figures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_1_cluster_primary_killed() {
    let _serial = SERIAL.lock().await;
    let p = if full() {
        FailoverParams {
            hot_keys: 4,
            hot_workers: 8,
            cold_workers: 4,
            grants_between: 200,
            kills: 3,
        }
    } else {
        FailoverParams {
            hot_keys: 2,
            hot_workers: 4,
            cold_workers: 2,
            grants_between: 20,
            kills: 1,
        }
    };
    let mut cluster = tokio::task::block_in_place(|| RedisCluster::start_with_node_timeout(1000));
    wait_replicated(&cluster).await;
    let mut all = Vec::new();
    for acks in [0, 1] {
        all.push(failover_round(&mut cluster, acks, &p).await);
    }
    for f in &all {
        eprintln!(
            "scenario 1 summary, --min-replica-acks {}: {} kill(s); failover {:?}; hot keys without a grant for {:?}; cold-key grants while failing over {:?} (largest gap {:?}); grants {}; overlaps {} (max {:?}); stale writes rejected {}; client errors {}",
            f.acks,
            f.kills,
            f.failover.iter().map(|d| secs(*d)).collect::<Vec<_>>(),
            f.hot_gap.iter().map(|d| secs(*d)).collect::<Vec<_>>(),
            f.cold_grants_during,
            f.cold_gap.iter().map(|d| secs(*d)).collect::<Vec<_>>(),
            f.grants,
            f.overlaps,
            f.max_overlap,
            f.stale_rejected,
            f.errors,
        );
        // Clients kept taking locks through every failover, and locks on
        // the other primaries never stopped (regression: fred's cluster
        // client used to stall every slot until the promotion).
        assert_eq!(f.hot_gap.len(), f.kills);
        assert!(
            f.cold_grants_during.iter().all(|n| *n > 0),
            "locks on healthy primaries stalled during a failover: {:?}",
            f.cold_grants_during
        );
        assert_eq!(f.errors, 0, "SDK calls failed past their retries");
    }
}

/// Acquire, retried while the server answers UNAVAILABLE (it may not have
/// found a just-promoted primary yet), for at most 20 s.
async fn retry_unavailable(
    raw: &mut LockServiceClient<tonic::transport::Channel>,
    req: pb::AcquireRequest,
) -> pb::AcquireResponse {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        match raw.acquire(req.clone()).await {
            Ok(r) => return r.into_inner(),
            Err(s) if s.code() == Code::Unavailable && Instant::now() < end => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(s) => panic!("acquire failed: {s:?}"),
        }
    }
}

/// Fills the replication stream of the primary on `port` with `mib` MiB
/// written to keys in the slot of `tag`, so that what follows waits
/// behind it in the primary's memory while its replica is frozen.
async fn flood(port: u16, tag: &str, mib: usize) {
    use fred::prelude::*;
    let config = Config::from_url(&format!("redis://127.0.0.1:{port}")).expect("url");
    let client = Builder::from_config(config).build().expect("fred client");
    client.init().await.expect("connect to the primary");
    let value = "x".repeat(1 << 20);
    for i in 0..mib {
        let _: () = client
            .set(
                format!("flood{{{tag}}}:{i}"),
                value.as_str(),
                None,
                None,
                false,
            )
            .await
            .expect("SET");
    }
    let _ = client.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_1b_failover_loses_an_unreplicated_grant() {
    let _serial = SERIAL.lock().await;
    let mut cluster = tokio::task::block_in_place(|| RedisCluster::start_with_node_timeout(1000));
    wait_replicated(&cluster).await;
    let prefix = unique_prefix();
    let url = cluster.url();
    let plain = serve(&url, &prefix, &[]);
    let acked = serve(&url, &prefix, &["--min-replica-acks", "1"]);
    let key = "lost/a";
    let slot = slot_of(&prefix, key);
    let any = cluster.nodes[0].port;
    let history = Arc::new(History::new());
    let resource = Arc::new(Resource::new());
    let ttl = Duration::from_secs(30);

    // --min-replica-acks 0: the replica is frozen while the primary grants.
    let m_port = tokio::task::block_in_place(|| owner_of(any, slot)).expect("owner");
    let m = index_of(&cluster, m_port);
    let r = *tokio::task::block_in_place(|| replicas_of(&cluster, m_port))
        .first()
        .expect("a replica");
    let r_pid = cluster.nodes[r].pid().expect("running");
    signal(r_pid, "STOP");
    flood(m_port, key, 16).await;
    let a = sdk(&[plain.endpoint()], Duration::from_secs(20)).await;
    let sent = Instant::now();
    let a_guard = a
        .lock(key)
        .ttl(ttl)
        .wait(Duration::ZERO)
        .owner("a")
        .await
        .expect("granted by the primary");
    let fa = a_guard.fencing_token();
    history.grant("a", key, fa, sent, Instant::now());
    assert!(resource.write("a", key, fa));
    // When a learns that it lost the lock ends its validity window.
    let a_lost = {
        let lost = a_guard.lost();
        tokio::spawn(async move {
            let reason = lost.await;
            (reason, Instant::now())
        })
    };
    let killed_at = history.fault(format!("SIGKILL primary 127.0.0.1:{m_port}"));
    tokio::task::block_in_place(|| cluster.nodes[m].kill());
    signal(r_pid, "CONT");
    let (promoted, promoted_at) = wait_promoted(&cluster, m_port, slot).await;
    assert_eq!(promoted, cluster.nodes[r].port);
    // The promoted replica has neither the lock nor its fencing counter.
    let names = leasehold::store::RedisNames::of(
        &prefix,
        &leasehold::lock::LockKey::parse(key, 512).expect("key"),
    );
    let on_replica = tokio::task::block_in_place(|| {
        (
            redis_cli(promoted, &["EXISTS", &names.lock]),
            redis_cli(promoted, &["EXISTS", &names.fence]),
        )
    });
    assert_eq!(
        on_replica,
        ("0".to_string(), "0".to_string()),
        "the grant reached the replica: nothing was lost"
    );

    // So b gets the lock while a's 30 s lease should still run.
    let b = sdk(&[plain.endpoint()], Duration::from_secs(20)).await;
    let sent = Instant::now();
    let b_guard = b
        .lock(key)
        .ttl(ttl)
        .wait(Duration::from_secs(20))
        .owner("b")
        .await
        .expect("b is granted the lock a's grant was lost from");
    let fb = b_guard.fencing_token();
    history.grant("b", key, fb, sent, Instant::now());
    assert!(
        fb > fa,
        "the TIME floor keeps fencing tokens increasing across the lost counter: {fa} then {fb}"
    );
    assert!(resource.write("b", key, fb));
    // a's write, late: the fenced resource rejects it.
    assert!(
        !resource.write("a", key, fa),
        "a stale holder's write got through"
    );
    let (reason, learned_at) = tokio::time::timeout(ttl, a_lost)
        .await
        .expect("a learns it lost the lock")
        .expect("task");
    history.end("a", key, fa, learned_at, End::Lost);
    assert_eq!(reason, LostReason::NotHeld);
    history.end("b", key, fb, Instant::now(), End::Released);
    assert!(b_guard.release().await.expect("release"));
    let report = check(&history, &resource, Instant::now());
    let b_at = history
        .grants_of(key)
        .last()
        .map(|w| w.start)
        .expect("b's grant");
    let learned = if learned_at >= b_at {
        format!("{} after b's grant", secs(learned_at - b_at))
    } else {
        format!("{} before b's grant", secs(b_at - learned_at))
    };
    eprintln!(
        "scenario 1b (--min-replica-acks 0): failover {}; b granted {} after the kill, while a's 30 s lease had {} to run; a learned of its loss {learned}; {report}",
        secs(promoted_at - killed_at),
        secs(b_at - killed_at),
        secs(ttl.saturating_sub(b_at - history.grants_of(key)[0].start)),
    );
    report.assert_fencing_holds();
    // Whether a learned of its loss before b's grant is a race (a's
    // keepalive re-attaches on the promoted replica about when b asks).
    assert!(report.overlaps.len() <= 1, "{:?}", report.overlaps);
    assert_eq!(report.stale_rejected, 1);
    let overlap = report.max_overlap();

    // --min-replica-acks 1: the same freeze; the grant is not answered.
    rejoin(&mut cluster, m).await;
    let (r_port, m_pid) = (
        cluster.nodes[r].port,
        cluster.nodes[m].pid().expect("running"),
    );
    signal(m_pid, "STOP");
    let mut raw = LockServiceClient::connect(acked.endpoint())
        .await
        .expect("connect");
    let start = Instant::now();
    let refused = raw.acquire(acquire(key, 30_000)).await;
    let took = start.elapsed();
    let status = refused.expect_err("not answered without a replica's acknowledgement");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("acknowledged by 0 of 1"),
        "{status:?}"
    );
    // WAIT gives up after half the store timeout (2 s); then the undo.
    assert!(took < Duration::from_millis(2_500), "took {took:?}");
    let d = raw
        .describe(describe(key))
        .await
        .expect("describe")
        .into_inner();
    assert!(!d.held, "the unacknowledged grant was undone");
    history.fault(format!("SIGKILL primary 127.0.0.1:{r_port}"));
    tokio::task::block_in_place(|| cluster.nodes[r].kill());
    signal(m_pid, "CONT");
    wait_promoted(&cluster, r_port, slot).await;
    // The new primary has no replica: refused at once, nothing granted.
    let start = Instant::now();
    let status = loop {
        // fred may need a moment to route to the new primary.
        match raw.acquire(acquire(key, 30_000)).await {
            Err(s) if s.message().contains("replica(s) online") => break s,
            Err(s)
                if s.code() == Code::Unavailable && start.elapsed() < Duration::from_secs(20) =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => panic!("expected a refusal for want of replicas, got {other:?}"),
        }
    };
    assert_eq!(status.code(), Code::Unavailable);
    let quick = Instant::now();
    let again = raw
        .acquire(acquire(key, 30_000))
        .await
        .expect_err("refused");
    assert!(again.message().contains("replica(s) online"), "{again:?}");
    assert!(quick.elapsed() < Duration::from_millis(500));
    // Without the flag the same primary grants (availability over safety).
    let mut raw_plain = LockServiceClient::connect(plain.endpoint())
        .await
        .expect("connect");
    let lease = lease_of(retry_unavailable(&mut raw_plain, acquire(key, 30_000)).await);
    assert!(lease.fencing_token > fb);
    assert!(
        raw_plain
            .release(release(key, &lease.token))
            .await
            .expect("release")
            .into_inner()
            .released
    );
    // A replica again: acknowledged grants.
    rejoin(&mut cluster, r).await;
    let c = sdk(&[acked.endpoint()], Duration::from_secs(20)).await;
    let c_guard = c
        .lock(key)
        .ttl(ttl)
        .wait(Duration::ZERO)
        .await
        .expect("granted with a replica's acknowledgement");
    assert!(c_guard.fencing_token() > lease.fencing_token);
    assert!(c_guard.release().await.expect("release"));
    eprintln!(
        "scenario 1b: with --min-replica-acks 0 the unreplicated grant was lost (validity windows overlapped for {}); with --min-replica-acks 1 the same grant was refused (UNAVAILABLE after {}) and nobody held the lock in the meantime",
        secs(overlap),
        secs(took)
    );
}

// ------------------------------------- scenario 2: a Leasehold server killed

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_2_leasehold_server_killed() {
    let _serial = SERIAL.lock().await;
    let (holders, workers, kills, grants_between) = if full() {
        (8, 8, 4, 200)
    } else {
        (3, 4, 1, 20)
    };
    let url = cluster_url();
    let prefix = unique_prefix();
    let mut servers = [serve(&url, &prefix, &[]), serve(&url, &prefix, &[])];
    let endpoints: Vec<String> = servers.iter().map(Binary::endpoint).collect();
    let history = Arc::new(History::new());
    let resource = Arc::new(Resource::new());
    let ttl = Duration::from_secs(2);

    // Long holders: two locks each, kept alive across every kill.
    let mut held = Vec::new();
    for h in 0..holders {
        let client = sdk(&endpoints, Duration::from_secs(20)).await;
        for j in 0..2 {
            let key = format!("held/{h}/{j}");
            let sent = Instant::now();
            let guard = client
                .lock(key.as_str())
                .ttl(ttl)
                .wait(Duration::ZERO)
                .await
                .expect("held");
            history.grant(
                &format!("holder-{h}"),
                &key,
                guard.fencing_token(),
                sent,
                Instant::now(),
            );
            let lost = guard.lost();
            held.push((format!("holder-{h}"), key, guard, lost));
        }
        // The guards keep the client's keepalive task running.
        drop(client);
    }
    let hot: Vec<String> = (0..2).map(|i| format!("hot/{i}")).collect();
    let mut crew = Crew::new();
    for i in 0..workers {
        let mut eps = endpoints.clone();
        eps.rotate_left(i % 2);
        let load = Load {
            keys: hot.clone(),
            ttl,
            hold: Duration::from_millis(20),
            writes: 2,
            wait: Duration::from_secs(5),
        };
        crew.add(format!("worker-{i}"), &eps, load, &history, &resource)
            .await;
    }
    let mut since = history.started;
    let mut reattach = Vec::new();
    let mut gaps = Vec::new();
    for round in 0..kills {
        until("grants before the kill", Duration::from_secs(60), || {
            grants_after(&history, &hot, since).len() >= grants_between
        })
        .await;
        let victim = round % 2;
        let addr = servers[victim].addr.clone();
        let killed_at = history.fault(format!("round {round}: SIGKILL leasehold serve {addr}"));
        servers[victim].signal("KILL");
        let _ = tokio::task::block_in_place(|| servers[victim].wait_exit(Duration::from_secs(10)));
        // Every held lock is renewed through the other server before its
        // TTL runs out: its remaining TTL, read after the kill, jumps up.
        let observer = sdk(&[servers[1 - victim].endpoint()], Duration::from_secs(20)).await;
        let mut previous: HashMap<String, Duration> = HashMap::new();
        let mut renewed: HashMap<String, Instant> = HashMap::new();
        let end = Instant::now() + ttl;
        while renewed.len() < held.len() {
            for (_, key, _, _) in &held {
                if renewed.contains_key(key) {
                    continue;
                }
                if let Ok(Some(info)) = observer.describe(key.as_str()).await {
                    let now = info.ttl_remaining;
                    match previous.insert(key.clone(), now) {
                        Some(before) if now > before + Duration::from_millis(50) => {
                            renewed.insert(key.clone(), Instant::now());
                        }
                        _ => {}
                    }
                }
            }
            assert!(
                Instant::now() < end,
                "held locks not renewed within a TTL of the kill: {renewed:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let last = renewed.values().max().copied().unwrap_or(killed_at);
        reattach.push(last - killed_at);
        until("grants after the kill", Duration::from_secs(60), || {
            grants_after(&history, &hot, killed_at).len() >= grants_between
        })
        .await;
        gaps.push(
            grants_after(&history, &hot, killed_at)
                .first()
                .map(|t| *t - killed_at)
                .unwrap_or_default(),
        );
        // The dead server comes back on the same address.
        servers[victim] = tokio::task::block_in_place(|| {
            Binary::start_on(
                &addr,
                &[
                    "--redis-url",
                    &url,
                    "--key-prefix",
                    &prefix,
                    "--health-interval",
                    "100ms",
                ],
            )
        });
        since = Instant::now();
    }
    // Two more TTLs on the surviving servers: nothing was lost.
    tokio::time::sleep(ttl * 2).await;
    let errors = crew.stop().await;
    let probe = sdk(&endpoints, Duration::from_secs(20)).await;
    for (name, key, guard, lost) in held.iter_mut() {
        assert_eq!(
            futures_util::FutureExt::now_or_never(lost),
            None,
            "{name} lost {key}"
        );
        let info = probe
            .describe(key.as_str())
            .await
            .expect("describe")
            .expect("still held");
        assert_eq!(info.fencing_token, guard.fencing_token());
    }
    for (name, key, guard, _) in held.drain(..) {
        history.end(
            &name,
            &key,
            guard.fencing_token(),
            Instant::now(),
            End::Released,
        );
        assert!(guard.release().await.expect("release"), "{key}");
    }
    let report = check(&history, &resource, Instant::now());
    eprintln!(
        "scenario 2: {kills} server kill(s); held locks re-attached through the other server within {:?} of the kill; first worker grant after the kill {:?}; {report}",
        reattach.iter().map(|d| secs(*d)).collect::<Vec<_>>(),
        gaps.iter().map(|d| secs(*d)).collect::<Vec<_>>(),
    );
    report.assert_fencing_holds();
    assert!(report.overlaps.is_empty(), "{:?}", report.overlaps);
    assert_eq!(report.lost, 0, "a worker lost a lock");
    assert!(errors.is_empty(), "{errors:?}");
}

// --------------------------------------- scenario 3: a client SIGKILLed

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_3_client_process_killed() {
    let _serial = SERIAL.lock().await;
    let rounds = if full() { 20 } else { 2 };
    let url = cluster_url();
    let prefix = unique_prefix();
    let server = serve(&url, &prefix, &[]);
    let history = Arc::new(History::new());
    let resource = Arc::new(Resource::new());
    let mut hub = remote::Hub::start(history.clone(), resource.clone()).await;
    let mut latencies = Vec::new();
    for round in 0..rounds {
        let keys: Vec<String> = (0..3).map(|i| format!("crash/{round}/{i}")).collect();
        let spec = remote::Spec {
            name: format!("holder-{round}"),
            role: "hold".into(),
            hub: hub.addr,
            endpoints: vec![server.endpoint()],
            keys: keys.clone(),
            ttl: Duration::from_secs(30),
        };
        let (mut child, output) = spec.spawn();
        let mut holder = hub.next(Duration::from_secs(30)).await;
        holder.expect("HOLDING", Duration::from_secs(30)).await;
        let holder_fences: HashMap<String, u64> = history
            .windows()
            .into_iter()
            .filter(|w| w.client == holder.name)
            .map(|w| (w.key, w.fence))
            .collect();
        // One waiter per lock, each queued in the server before the kill.
        let mut waiting = Vec::new();
        for key in &keys {
            let client = sdk(&[server.endpoint()], Duration::from_secs(10)).await;
            let key = key.clone();
            waiting.push(tokio::spawn(async move {
                let sent = Instant::now();
                let guard = client
                    .lock(key.as_str())
                    .ttl(Duration::from_secs(5))
                    .wait(Duration::from_secs(20))
                    .await;
                (key, sent, Instant::now(), guard, client)
            }));
        }
        let queued = |key: &str| {
            server
                .output
                .all()
                .iter()
                .filter(|l| l.contains("waiting for the holder") && l.contains(key))
                .count()
        };
        until("every waiter queued", Duration::from_secs(10), || {
            keys.iter().all(|k| queued(k) >= 1)
        })
        .await;
        let killed_at = history.fault(format!("round {round}: SIGKILL client process"));
        let _ = child.kill();
        let _ = child.wait();
        history.end_all(&holder.name, killed_at, End::Killed);
        for task in waiting {
            let (key, sent, at, guard, _client) =
                tokio::time::timeout(Duration::from_secs(20), task)
                    .await
                    .expect("waiter finished")
                    .expect("waiter task");
            let guard = guard.expect("the waiter got the dead client's lock");
            history.grant("waiter", &key, guard.fencing_token(), sent, at);
            assert!(guard.fencing_token() > holder_fences[&key]);
            let latency = at - killed_at;
            assert!(
                latency < Duration::from_secs(1),
                "{key} reached its waiter {latency:?} after the kill\n{}",
                output.all().join("\n")
            );
            latencies.push(latency);
            history.end(
                "waiter",
                &key,
                guard.fencing_token(),
                Instant::now(),
                End::Released,
            );
            assert!(guard.release().await.expect("release"));
        }
    }
    let report = check(&history, &resource, Instant::now());
    latencies.sort();
    eprintln!(
        "scenario 3: {rounds} client process(es) SIGKILLed holding 3 locks each; kill → waiter granted: max {:?}, median {:?}; {report}",
        latencies.last().copied().unwrap_or_default(),
        latencies
            .get(latencies.len() / 2)
            .copied()
            .unwrap_or_default(),
    );
    report.assert_fencing_holds();
    assert!(report.overlaps.is_empty(), "{:?}", report.overlaps);
}

// ------------------------------- scenario 4: a client frozen past its TTL

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_4_client_paused_past_its_ttl() {
    let _serial = SERIAL.lock().await;
    let rounds = if full() { 10 } else { 1 };
    let url = cluster_url();
    let prefix = unique_prefix();
    let server = serve(&url, &prefix, &[]);
    let history = Arc::new(History::new());
    let resource = Arc::new(Resource::new());
    let mut hub = remote::Hub::start(history.clone(), resource.clone()).await;
    let ttl = Duration::from_secs(1);
    let mut learned = Vec::new();
    for round in 0..rounds {
        let key = format!("paused/{round}");
        let spec = remote::Spec {
            name: format!("paused-{round}"),
            role: "pause".into(),
            hub: hub.addr,
            endpoints: vec![server.endpoint()],
            keys: vec![key.clone()],
            ttl,
        };
        let (child, output) = spec.spawn();
        let mut a = hub.next(Duration::from_secs(30)).await;
        let (_, grant) = a.expect("GRANT", Duration::from_secs(30)).await;
        let fa: u64 = grant
            .split_whitespace()
            .nth(2)
            .and_then(|f| f.parse().ok())
            .expect("fence");
        a.expect("READY", Duration::from_secs(30)).await;
        let pid = child.id();
        let stopped_at = history.fault(format!("round {round}: SIGSTOP client process"));
        signal(pid, "STOP");

        // b waits for the lock, and gets it once a's lease expires.
        let b = sdk(&[server.endpoint()], Duration::from_secs(10)).await;
        let sent = Instant::now();
        let b_guard = b
            .lock(key.as_str())
            .ttl(Duration::from_secs(10))
            .wait(Duration::from_secs(10))
            .owner("b")
            .await
            .expect("b gets the lock after a's TTL");
        let b_at = Instant::now();
        let fb = b_guard.fencing_token();
        history.grant("b", &key, fb, sent, b_at);
        assert!(fb > fa);
        assert!(b_at - stopped_at < ttl + Duration::from_secs(2));
        assert!(resource.write("b", &key, fb));
        // The pause goes on a while after b took over (the fault's length,
        // not a wait for anything).
        tokio::time::sleep(Duration::from_millis(500)).await;

        history.fault(format!("round {round}: SIGCONT client process"));
        signal(pid, "CONT");
        let cont_at = Instant::now();
        a.send("GO");
        // Its write, already on its way when it froze, carries its old token.
        let (_, late) = a.expect("LATE", Duration::from_secs(10)).await;
        assert_eq!(late, "LATE STALE", "the stale write was rejected");
        let (lost_at, lost) = a.expect("LOST", Duration::from_secs(15)).await;
        assert!(
            lost.ends_with("NotHeld") || lost.ends_with("Expired"),
            "{lost}"
        );
        learned.push(lost_at - cont_at);
        let (_, released) = a.expect("RELEASED", Duration::from_secs(15)).await;
        assert!(
            released.ends_with("false"),
            "a stale release must not free b's lock: {released}\n{}",
            output.all().join("\n")
        );
        let info = b
            .describe(key.as_str())
            .await
            .expect("describe")
            .expect("b still holds it");
        assert_eq!(info.fencing_token, fb);
        history.end("b", &key, fb, Instant::now(), End::Released);
        assert!(b_guard.release().await.expect("release"));
        drop(child);
    }
    let report = check(&history, &resource, Instant::now());
    eprintln!(
        "scenario 4: {rounds} client(s) frozen past a {ttl:?} TTL; after SIGCONT lost() fired within {:?}; {report}",
        learned,
    );
    report.assert_fencing_holds();
    assert_eq!(report.stale_rejected, rounds, "one stale write per round");
    // Each frozen client believed it held the lock while b held it.
    assert_eq!(report.overlaps.len(), rounds);
}

// -------------------------------------------- scenario 5: Redis cut off

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_5_redis_unreachable() {
    let _serial = SERIAL.lock().await;
    let outage = if full() {
        Duration::from_secs(10)
    } else {
        Duration::from_secs(3)
    };
    let redis = tokio::task::block_in_place(RedisServer::start);
    let upstream = redis.addr().parse().expect("addr");
    let proxy = proxy::Proxy::start(upstream).await;
    let prefix = unique_prefix();
    let server = serve(
        &proxy.url(),
        &prefix,
        &["--store-timeout", "800ms", "--pool-size", "2"],
    );
    let history = Arc::new(History::new());
    let resource = Arc::new(Resource::new());
    let health = HealthLog::watch(&server.endpoint()).await;
    let holder = sdk(&[server.endpoint()], Duration::from_secs(30)).await;
    let mut raw = LockServiceClient::connect(server.endpoint())
        .await
        .expect("connect");
    let mut crew = Crew::new();
    crew.add(
        "worker".into(),
        &[server.endpoint()],
        Load {
            keys: vec!["outage/cycle".into()],
            ttl: Duration::from_secs(5),
            hold: Duration::from_millis(20),
            writes: 2,
            wait: Duration::from_secs(5),
        },
        &history,
        &resource,
    )
    .await;
    for (round, mode) in [proxy::Mode::Cut, proxy::Mode::Pause]
        .into_iter()
        .enumerate()
    {
        let key = format!("outage/held/{round}");
        let sent = Instant::now();
        let guard = holder
            .lock(key.as_str())
            .ttl(outage * 3)
            .wait(Duration::ZERO)
            .await
            .expect("held before the outage");
        history.grant("holder", &key, guard.fencing_token(), sent, Instant::now());
        let mut lost = guard.lost();
        until("worker grants", Duration::from_secs(20), || {
            grants_after(&history, &["outage/cycle".to_string()], sent).len() >= 5
        })
        .await;

        let cut_at = history.fault(format!("{mode:?}: Redis unreachable for {outage:?}"));
        proxy.set(mode);
        // Calls fail with UNAVAILABLE within the store timeout (800 ms),
        // never hang; probed every 100 ms through the outage.
        let mut latencies = Vec::new();
        let mut probes = 0;
        while cut_at.elapsed() < outage {
            let start = Instant::now();
            let result = raw
                .acquire(acquire(&format!("outage/probe/{round}/{probes}"), 5_000))
                .await;
            let took = start.elapsed();
            probes += 1;
            match result {
                Err(s) if s.code() == Code::Unavailable => {}
                // The first probe may still get through before the cut bites.
                Ok(_) if probes == 1 && took < Duration::from_millis(100) => continue,
                other => panic!("expected UNAVAILABLE during the outage, got {other:?}"),
            }
            assert!(took < Duration::from_millis(1_500), "took {took:?}");
            latencies.push(took);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let not_serving = health
            .reached("NOT_SERVING", cut_at, Duration::from_secs(5))
            .await;
        let restored_at = history.fault(format!("{mode:?}: Redis reachable again"));
        proxy.set(proxy::Mode::Pass);
        let serving = health
            .reached("SERVING", restored_at, Duration::from_secs(20))
            .await;
        // Recovered without a restart: a fresh grant, fenced above the last.
        let lease = lease_of(
            raw.acquire(acquire(&format!("outage/after/{round}"), 5_000))
                .await
                .expect("acquire after recovery")
                .into_inner(),
        );
        assert!(lease.fencing_token > guard.fencing_token());
        // The lock held through the outage is still held (Redis kept it).
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match holder.describe(key.as_str()).await {
                    Ok(Some(info)) if info.fencing_token == guard.fencing_token() => break,
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        })
        .await
        .expect("the held lock survived the outage");
        assert_eq!(futures_util::FutureExt::now_or_never(&mut lost), None);
        history.end(
            "holder",
            &key,
            guard.fencing_token(),
            Instant::now(),
            End::Released,
        );
        assert!(guard.release().await.expect("release"));
        let first_worker_grant = until(
            "a worker grant after recovery",
            Duration::from_secs(20),
            || !grants_after(&history, &["outage/cycle".to_string()], restored_at).is_empty(),
        )
        .await;
        latencies.sort();
        let line = format!(
            "{mode:?} for {outage:?}: {} calls, all UNAVAILABLE, median {:?}, slowest {:?}; NOT_SERVING {} after the cut; SERVING {} after Redis came back; worker granted again {} after",
            latencies.len(),
            latencies[latencies.len() / 2],
            latencies[latencies.len() - 1],
            secs(not_serving - cut_at),
            secs(serving - restored_at),
            secs(first_worker_grant - restored_at),
        );
        eprintln!("scenario 5: {line}");
    }
    let _errors = crew.stop().await;
    let report = check(&history, &resource, Instant::now());
    eprintln!("scenario 5: {report}");
    report.assert_fencing_holds();
    assert!(report.overlaps.is_empty(), "{:?}", report.overlaps);
    drop(redis);
}
