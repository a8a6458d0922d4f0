//! Durability (documentation/safety.md): what survives a Redis SIGKILLed mid-load with
//! each persistence setting, and a rolling restart of every Leasehold
//! server under load.
//!
//! - `appendonly yes` + `appendfsync always`: every lease answered to a
//!   client before the kill is held after the restart, with the same token
//!   (Renew answers renewed = true) and the same fencing token; every later
//!   grant is fenced higher. Asserted.
//! - `appendfsync everysec` and no persistence: the figures of what was
//!   lost are printed; fencing tokens still increase (asserted).
//! - Rolling restart: three servers on one Redis, each SIGTERMed and
//!   restarted in turn while SDK clients hold locks with KeepAlive and
//!   workers contend for hot keys: no `lost()`, no overlap, fences increase.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use leasehold::pb;
use leasehold::pb::lock_service_client::LockServiceClient;
use tokio_util::sync::CancellationToken;
use tonic::Request;
use tonic::transport::{Channel, Endpoint};

use crate::checker::{History, Resource, check};
use crate::common::{RedisServer, ServerProcess, on_redis_args, unique_prefix};

/// How Redis persists, for one run of the kill scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Persistence {
    /// `appendonly yes`, `appendfsync always`.
    AofAlways,
    /// `appendonly yes`, `appendfsync everysec` (Redis's default for AOF).
    AofEverysec,
    /// No AOF, no RDB snapshots.
    None,
}

impl Persistence {
    fn args(self) -> &'static [&'static str] {
        match self {
            Self::AofAlways => &["--appendonly", "yes", "--appendfsync", "always"],
            Self::AofEverysec => &["--appendonly", "yes", "--appendfsync", "everysec"],
            Self::None => &[],
        }
    }
}

/// What one key's owner last did before the kill.
#[derive(Debug, Clone)]
enum Last {
    /// A grant answered; nothing sent after it.
    Held { token: String, fence: u64 },
    /// Its release was answered released = true.
    Released { fence: u64 },
    /// A call was in flight at the kill (its outcome is unknown), after a
    /// grant with this fence (0: none).
    InFlight { fence: u64 },
}

impl Last {
    /// The state's name, for a failure message (without the token).
    fn kind(&self) -> &'static str {
        match self {
            Self::Held { .. } => "held",
            Self::Released { .. } => "released",
            Self::InFlight { .. } => "a call in flight",
        }
    }
}

fn channel(addr: &str) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_millis(500))
        .connect_lazy()
}

/// One loader: its own keys, Acquire then (half the time) Release, in turn,
/// until `stop`; returns each key's last known state.
async fn loader(
    id: usize,
    addr: String,
    keys: usize,
    granted: Arc<AtomicU64>,
    stop: CancellationToken,
) -> (HashMap<String, Last>, u64) {
    let mut client = LockServiceClient::new(channel(&addr));
    let mut state: HashMap<String, Last> = HashMap::new();
    let mut grants = 0u64;
    let mut i = 0usize;
    while !stop.is_cancelled() {
        let key = format!("dur/{id}/{}", i % keys);
        i += 1;
        let fence_before = match state.get(&key) {
            Some(Last::Held { token, fence }) => {
                // Release it (every other round), so keys see many grants.
                if i % 2 == 0 {
                    continue;
                }
                let fence = *fence;
                let token = token.clone();
                state.insert(key.clone(), Last::InFlight { fence });
                let mut req = Request::new(pb::ReleaseRequest {
                    key: key.clone(),
                    token,
                });
                req.set_timeout(Duration::from_secs(2));
                match client.release(req).await {
                    Ok(r) if r.get_ref().released => {
                        state.insert(key.clone(), Last::Released { fence });
                    }
                    // Unknown outcome: stays InFlight, and the loader stops.
                    _ => break,
                }
                continue;
            }
            Some(Last::Released { fence }) => *fence,
            Some(Last::InFlight { .. }) => break,
            None => 0,
        };
        state.insert(
            key.clone(),
            Last::InFlight {
                fence: fence_before,
            },
        );
        let mut req = Request::new(pb::AcquireRequest {
            key: key.clone(),
            ttl_ms: 120_000,
            ..Default::default()
        });
        req.set_timeout(Duration::from_secs(2));
        match client.acquire(req).await {
            Ok(r) => {
                let r = r.into_inner();
                match (r.acquired, r.lease) {
                    (true, Some(lease)) => {
                        grants += 1;
                        granted.fetch_add(1, Ordering::Relaxed);
                        state.insert(
                            key.clone(),
                            Last::Held {
                                token: lease.token,
                                fence: lease.fencing_token,
                            },
                        );
                    }
                    _ => panic!("{key} is this loader's own key, yet not acquired"),
                }
            }
            Err(_) => break,
        }
    }
    (state, grants)
}

/// Retries `describe` until the server answers (Redis is back).
async fn describe_until_up(
    client: &mut LockServiceClient<Channel>,
    key: &str,
    within: Duration,
) -> pb::DescribeResponse {
    let end = Instant::now() + within;
    loop {
        let mut req = Request::new(pb::DescribeRequest { key: key.into() });
        req.set_timeout(Duration::from_secs(1));
        match client.describe(req).await {
            Ok(r) => return r.into_inner(),
            Err(e) => assert!(
                Instant::now() < end,
                "no answer within {within:?} of the restart: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Figures of one kill run.
#[derive(Debug, Default)]
struct KillFigures {
    grants: u64,
    held_at_kill: usize,
    held_after: usize,
    token_renewed: usize,
    released_at_kill: usize,
    released_still_free: usize,
    in_flight: usize,
    restart: Duration,
    refenced: usize,
    fence_regressions: Vec<String>,
}

/// Loads a Leasehold server on a Redis with `persistence`, SIGKILLs Redis
/// mid-load, restarts it from its own directory, and checks every lease.
async fn redis_killed_mid_load(persistence: Persistence) -> KillFigures {
    let (loaders, keys) = if crate::full() { (8, 50) } else { (4, 25) };
    let mut redis = tokio::task::block_in_place(|| RedisServer::start_with(persistence.args()));
    let prefix = unique_prefix();
    let url = redis.url();
    let server = tokio::task::block_in_place(|| {
        let s = ServerProcess::start(&on_redis_args(&url, &prefix));
        s.output
            .wait_for("store reachable: SERVING", Duration::from_secs(20));
        s
    });
    let stop = CancellationToken::new();
    let granted = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..loaders)
        .map(|id| {
            tokio::spawn(loader(
                id,
                server.addr.clone(),
                keys,
                granted.clone(),
                stop.clone(),
            ))
        })
        .collect();
    // Mid-load: once every key was granted about three times (bounded).
    let mut client = LockServiceClient::new(channel(&server.addr));
    let target = 3 * (loaders * keys) as u64;
    let end = Instant::now() + Duration::from_secs(60);
    while granted.load(Ordering::Relaxed) < target {
        assert!(Instant::now() < end, "the load did not get going");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::task::block_in_place(|| redis.kill());
    stop.cancel();
    let mut figures = KillFigures::default();
    let mut state = HashMap::new();
    for t in tasks {
        let (s, g) = tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .expect("loader stopped")
            .expect("loader");
        state.extend(s);
        figures.grants += g;
    }
    let restarted = Instant::now();
    tokio::task::block_in_place(|| redis.restart());
    let first = state.keys().next().cloned().unwrap_or_default();
    describe_until_up(&mut client, &first, Duration::from_secs(20)).await;
    figures.restart = restarted.elapsed();

    for (key, last) in &state {
        let now = describe_until_up(&mut client, key, Duration::from_secs(5)).await;
        let fence = match last {
            Last::Held { token, fence } => {
                figures.held_at_kill += 1;
                if now.held && now.fencing_token == *fence {
                    figures.held_after += 1;
                }
                let mut req = Request::new(pb::RenewRequest {
                    key: key.clone(),
                    token: token.clone(),
                    ttl_ms: 0,
                });
                req.set_timeout(Duration::from_secs(2));
                if let Ok(r) = client.renew(req).await {
                    if r.get_ref().renewed {
                        figures.token_renewed += 1;
                        // Give it back, for the later grant.
                        let mut req = Request::new(pb::ReleaseRequest {
                            key: key.clone(),
                            token: token.clone(),
                        });
                        req.set_timeout(Duration::from_secs(2));
                        match client.release(req).await {
                            Ok(r) if r.get_ref().released => {}
                            other => figures.fence_regressions.push(format!(
                                "{key}: its release after the restart answered {:?}",
                                other.map(|r| r.into_inner().released)
                            )),
                        }
                    }
                }
                *fence
            }
            Last::Released { fence } => {
                figures.released_at_kill += 1;
                if !now.held || now.fencing_token > *fence {
                    figures.released_still_free += 1;
                }
                *fence
            }
            Last::InFlight { fence } => {
                figures.in_flight += 1;
                (*fence).max(now.fencing_token)
            }
        };
        // A later grant: forced free (a lost holder's lease may still be
        // there under `InFlight`), then acquired again.
        if matches!(last, Last::InFlight { .. }) || persistence != Persistence::AofAlways {
            let names = leasehold::store::RedisNames::of(
                &prefix,
                &leasehold::lock::LockKey::parse(key, 4096).expect("key"),
            );
            tokio::task::block_in_place(|| redis.cli(&["DEL", &names.lock]));
        }
        // It waits: an Acquire that was in flight at the kill may have been
        // resent by the server's Redis client once Redis came back (fred
        // resends once after a dropped connection) and land after the DEL;
        // its caller is gone, so the server gives that grant back as soon as
        // the late reply arrives (the late-reply undo), and this Acquire gets
        // the lock then. Without the wait it would race that undo.
        let mut req = Request::new(pb::AcquireRequest {
            key: key.clone(),
            ttl_ms: 10_000,
            wait_ms: 5_000,
            ..Default::default()
        });
        req.set_timeout(Duration::from_secs(7));
        let r = client
            .acquire(req)
            .await
            .expect("acquire after restart")
            .into_inner();
        match r.lease.filter(|_| r.acquired) {
            Some(lease) if lease.fencing_token > fence => figures.refenced += 1,
            Some(lease) => figures.fence_regressions.push(format!(
                "{key}: {} after {fence} before the kill",
                lease.fencing_token
            )),
            None => figures.fence_regressions.push(format!(
                "{key}: not acquired within 5 s after it was freed (before the kill: {})",
                last.kind()
            )),
        }
    }
    drop(server);
    figures
}

fn report(persistence: Persistence, f: &KillFigures) {
    eprintln!(
        "durability, Redis SIGKILLed mid-load, {persistence:?}: {} grants answered; at the kill {} leases held, {} released, {} calls in flight; after the restart ({:.2} s to the first answer) {} of {} held with the same fencing token, {} of {} renewed by their token, {} of {} released stayed free; {} of {} later grants fenced higher",
        f.grants,
        f.held_at_kill,
        f.released_at_kill,
        f.in_flight,
        f.restart.as_secs_f64(),
        f.held_after,
        f.held_at_kill,
        f.token_renewed,
        f.held_at_kill,
        f.released_still_free,
        f.released_at_kill,
        f.refenced,
        f.held_at_kill + f.released_at_kill + f.in_flight,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durability_aof_always_keeps_every_answered_lease() {
    let _serial = crate::SERIAL.lock().await;
    let f = redis_killed_mid_load(Persistence::AofAlways).await;
    report(Persistence::AofAlways, &f);
    assert!(f.held_at_kill > 0, "no lease was held at the kill");
    assert_eq!(
        f.held_after, f.held_at_kill,
        "leases lost across the restart"
    );
    assert_eq!(
        f.token_renewed, f.held_at_kill,
        "tokens that no longer renew"
    );
    assert_eq!(
        f.released_still_free, f.released_at_kill,
        "released locks came back"
    );
    assert!(f.fence_regressions.is_empty(), "{:?}", f.fence_regressions);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durability_aof_everysec_figures() {
    let _serial = crate::SERIAL.lock().await;
    let f = redis_killed_mid_load(Persistence::AofEverysec).await;
    report(Persistence::AofEverysec, &f);
    assert!(f.fence_regressions.is_empty(), "{:?}", f.fence_regressions);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durability_no_persistence_figures() {
    let _serial = crate::SERIAL.lock().await;
    let f = redis_killed_mid_load(Persistence::None).await;
    report(Persistence::None, &f);
    assert_eq!(
        f.held_after, 0,
        "nothing survives a restart without persistence"
    );
    assert!(f.fence_regressions.is_empty(), "{:?}", f.fence_regressions);
}

// ------------------------------------------------------ rolling restart

/// The SDK's own log lines (this process), for its re-attach figures.
static SDK_LOG: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

struct SdkLog;

impl std::io::Write for SdkLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        SDK_LOG
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captures the SDK's info lines (once per test process).
fn capture_sdk_log() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("leasehold::client=info")
        .with_ansi(false)
        .with_writer(|| SdkLog)
        .try_init();
}

/// The SDK's "re-attached" lines logged since byte `from`: (locks, ms).
fn reattached_since(from: usize) -> Vec<(u64, u64)> {
    let log = SDK_LOG.lock().unwrap_or_else(|e| e.into_inner());
    let text = String::from_utf8_lossy(&log[from.min(log.len())..]).to_string();
    let field = |line: &str, name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse::<u64>().ok())
    };
    text.lines()
        .filter(|l| l.contains("re-attached locks after the KeepAlive stream broke"))
        .filter_map(|l| Some((field(l, "reattached=")?, field(l, "after_ms=")?)))
        .collect()
}

fn sdk_log_len() -> usize {
    SDK_LOG.lock().unwrap_or_else(|e| e.into_inner()).len()
}

/// Polls Describe until every key's remaining TTL jumped up (it was renewed)
/// after `since`; returns when the last one was.
async fn all_renewed(
    client: &mut LockServiceClient<Channel>,
    keys: &[String],
    within: Duration,
) -> Duration {
    let since = Instant::now();
    let mut previous: HashMap<&str, u32> = HashMap::new();
    let mut renewed: HashMap<&str, Duration> = HashMap::new();
    while renewed.len() < keys.len() {
        for key in keys {
            if renewed.contains_key(key.as_str()) {
                continue;
            }
            let mut req = Request::new(pb::DescribeRequest { key: key.clone() });
            req.set_timeout(Duration::from_secs(1));
            if let Ok(r) = client.describe(req).await {
                let r = r.into_inner();
                assert!(r.held, "{key} is free during the rolling restart");
                if let Some(before) = previous.insert(key, r.ttl_ms) {
                    if r.ttl_ms > before + 50 {
                        renewed.insert(key, since.elapsed());
                    }
                }
            }
        }
        assert!(
            since.elapsed() < within,
            "locks not renewed within {within:?}: {} of {}",
            renewed.len(),
            keys.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    renewed.values().max().copied().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durability_rolling_restart_loses_no_lock() {
    let _serial = crate::SERIAL.lock().await;
    capture_sdk_log();
    let (holders, per_holder, workers, rounds) = if crate::full() {
        (8, 10, 8, 3)
    } else {
        (4, 5, 4, 1)
    };
    let redis = tokio::task::block_in_place(RedisServer::start);
    let prefix = unique_prefix();
    let url = redis.url();
    let args = on_redis_args(&url, &prefix);
    let mut servers: Vec<ServerProcess> = tokio::task::block_in_place(|| {
        (0..3)
            .map(|_| {
                let s = ServerProcess::start(&args);
                s.output
                    .wait_for("store reachable: SERVING", Duration::from_secs(20));
                s
            })
            .collect()
    });
    let endpoints: Vec<String> = servers.iter().map(|s| s.endpoint()).collect();
    let history = Arc::new(History::new());
    let resource = Arc::new(Resource::new());
    let ttl = Duration::from_secs(6);

    // Holders: SDK clients, each on its own first endpoint, holding locks
    // with KeepAlive through every restart.
    let mut held = Vec::new();
    for h in 0..holders {
        let mut eps = endpoints.clone();
        eps.rotate_left(h % 3);
        let client = crate::sdk(&eps, Duration::from_secs(20)).await;
        for j in 0..per_holder {
            let key = format!("roll/{h}/{j}");
            held.push(crate::hold(&client, &history, &format!("holder-{h}"), key, ttl).await);
        }
    }
    let held_keys: Vec<String> = held.iter().map(|(_, k, _, _)| k.clone()).collect();
    let hot: Vec<String> = (0..2).map(|i| format!("roll-hot/{i}")).collect();
    let mut crew = crate::Crew::new();
    for i in 0..workers {
        let mut eps = endpoints.clone();
        eps.rotate_left(i % 3);
        let load = crate::Load {
            keys: hot.clone(),
            ttl: Duration::from_secs(2),
            hold: Duration::from_millis(20),
            writes: 2,
            wait: Duration::from_secs(5),
        };
        crew.add(format!("worker-{i}"), &eps, load, &history, &resource)
            .await;
    }

    let mut rows = Vec::new();
    for round in 0..rounds {
        for i in 0..servers.len() {
            // Ask through a server that stays up.
            let mut observer =
                LockServiceClient::new(channel(&servers[(i + 1) % servers.len()].addr));
            let grants_before = crate::grants_after(&history, &hot, history.started).len();
            let log_from = sdk_log_len();
            let term = history.fault(format!("round {round}: SIGTERM server {i}"));
            servers[i].signal("-TERM");
            tokio::task::block_in_place(|| servers[i].wait_exit(Duration::from_secs(15)));
            let exited = term.elapsed();
            let renewed = all_renewed(&mut observer, &held_keys, ttl).await;
            let started = Instant::now();
            tokio::task::block_in_place(|| {
                servers[i].restart();
                servers[i]
                    .output
                    .wait_for("store reachable: SERVING", Duration::from_secs(20));
            });
            let serving = started.elapsed();
            let grants = crate::grants_after(&history, &hot, history.started).len() - grants_before;
            let reattached = reattached_since(log_from);
            rows.push(format!(
                "server {i}: SIGTERM to exit {:.2} s, {} SDK client(s) (holders and workers) re-attached {} locks within {} ms of their stream's end (max), every held lock renewed {:.2} s after the SIGTERM, restart to SERVING {:.2} s, {grants} hot grants meanwhile",
                exited.as_secs_f64(),
                reattached.len(),
                reattached.iter().map(|r| r.0).sum::<u64>(),
                reattached.iter().map(|r| r.1).max().unwrap_or_default(),
                renewed.as_secs_f64(),
                serving.as_secs_f64(),
            ));
        }
    }
    // Two more TTLs on the restarted servers: nothing was lost.
    tokio::time::sleep(ttl * 2).await;
    let errors = crew.stop().await;
    let mut observer = LockServiceClient::new(channel(&servers[0].addr));
    let mut lost = Vec::new();
    for (name, key, guard, fired) in held.iter_mut() {
        if let Some(reason) = futures_util::FutureExt::now_or_never(fired) {
            lost.push(format!("{name} {key}: {reason}"));
        }
        let mut req = Request::new(pb::DescribeRequest { key: key.clone() });
        req.set_timeout(Duration::from_secs(2));
        let now = observer.describe(req).await.expect("describe").into_inner();
        assert!(
            now.held && now.fencing_token == guard.fencing_token(),
            "{key} changed hands: {now:?}"
        );
    }
    for (name, key, guard, _) in held.drain(..) {
        crate::give_back(&history, &name, &key, guard).await;
    }
    let report = check(&history, &resource, Instant::now());
    eprintln!(
        "rolling restart: {} locks held by {holders} SDK clients (TTL {:?}) and {workers} workers on {} hot keys; {}; worker errors {}; {report}",
        held_keys.len(),
        ttl,
        hot.len(),
        rows.join("; "),
        errors.len(),
    );
    assert!(lost.is_empty(), "lost() fired: {lost:?}");
    report.assert_fencing_holds();
    assert!(report.overlaps.is_empty(), "{:?}", report.overlaps);
    assert_eq!(report.lost, 0, "a worker lost a lock");
}
