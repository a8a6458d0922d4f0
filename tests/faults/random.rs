//! The randomized fault run (documentation/safety.md): raw gRPC clients and SDK users on a
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

#[path = "random_clients.rs"]
mod clients;
#[path = "random_record.rs"]
mod record;

use clients::*;
use record::*;

// ------------------------------------------------------------ the nemesis

/// The processes the nemesis hurts.
struct Targets {
    redis: RedisServer,
    /// The proxy every server reaches Redis through.
    redis_link: Proxy,
    servers: Vec<ServerProcess>,
    proxies: Vec<Proxy>,
}

/// A signal to a server that may have exited already (a nemesis step
/// racing a crash): unlike [`signal`], a failure is not an error.
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
