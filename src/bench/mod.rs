//! `leasehold bench`: the load generator. It measures Leasehold side by side
//! with two baselines in the same run — a bare tonic server answering the
//! same RPCs from a HashMap (the gRPC floor) and fred talking straight to
//! Redis — and reports ratios, because absolute numbers on a shared machine
//! mean little. See documentation/benchmarks.md.

mod dashboard;
mod etcd;
mod floor;
mod load;
mod modes;
mod protocols;
mod spawn;
mod stats;

use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use serde_json::{Value, json};

use load::{Cycles, Hot, KeepAlive};
use spawn::Spawned;
use stats::{Latency, ProcSample, round3};

pub use floor::serve as serve_floor;

/// Which measurement to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Acquire (wait 0) + Release over many keys.
    Cycles,
    /// Many workers on one key with server-side waiting.
    Hot,
    /// Streams keeping locks alive at TTL/3.
    Keepalive,
    /// A holder SIGKILLed while a waiter waits.
    Crash,
    /// One holder releases, one waiter waits: release reply to grant.
    Handoff,
    /// Only the baselines: the gRPC floor and direct Redis.
    Baseline,
    /// Acquire + Release cycles over gRPC and over Connect with JSON, on
    /// one server (memory store with --spawn), with server CPU per call.
    Protocols,
    /// Many workers on one semaphore of --permits, next to the same loop
    /// on an exclusive lock.
    Semaphore,
    /// --watchers Watch streams of one key changing --event-rate times a
    /// second: events delivered, their delay, server memory per watcher.
    Fanout,
    /// Acquire + Release cycles with no dashboard page open, with --pages
    /// lock pages (a Watch each) and with --pages pages that also call
    /// List every 500 ms, interleaved.
    Dashboard,
    /// cycles, hot, keepalive and crash, one after the other.
    All,
}

/// Which store spawned servers use for keepalive and crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreChoice {
    /// A redis-server (spawned, or --redis-url).
    Redis,
    /// The embedded memory store.
    Memory,
}

/// Flags of `leasehold bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// The scenario.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Start redis-server (unless --redis-url), Leasehold servers and the
    /// floor on free loopback ports, and compare them in one run.
    #[arg(long)]
    pub spawn: bool,
    /// Server to load when not spawning.
    #[arg(
        long,
        env = "LEASEHOLD_ENDPOINT",
        default_value = "http://127.0.0.1:50051"
    )]
    pub endpoint: String,
    /// Redis for spawned servers and for the direct-Redis baseline.
    #[arg(long, env = "LEASEHOLD_BENCH_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Concurrent workers (cycles, hot).
    #[arg(long, default_value_t = 64)]
    pub workers: usize,
    /// Distinct keys (cycles).
    #[arg(long, default_value_t = 100_000)]
    pub keys: u64,
    /// How long each measurement runs (after a warm-up of a fifth of it, at most 2 s).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// HTTP/2 connections the workers share (cycles, hot).
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    /// KeepAlive streams (keepalive).
    #[arg(long, default_value_t = 1_000)]
    pub streams: usize,
    /// Locks per stream (keepalive).
    #[arg(long, default_value_t = 1)]
    pub locks_per_stream: usize,
    /// Streams per HTTP/2 connection (keepalive).
    #[arg(long, default_value_t = 100)]
    pub streams_per_connection: usize,
    /// Lock TTL (keepalive); renewals go out at a third of it.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// Permits of the semaphore (semaphore).
    #[arg(long, default_value_t = 8)]
    pub permits: u32,
    /// How long each worker holds its permit before releasing it
    /// (semaphore).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub hold: Duration,
    /// Watch streams of the watched key (fanout).
    #[arg(long, default_value_t = 1_000)]
    pub watchers: usize,
    /// Changes of the watched key per second, grants and releases (fanout).
    #[arg(long, default_value_t = 100.0)]
    pub event_rate: f64,
    /// Rounds (crash, handoff).
    #[arg(long, default_value_t = 100)]
    pub rounds: usize,
    /// With --spawn, `cycles` and `hot` load each target in this many
    /// alternating slices of --duration, so drift on a shared machine
    /// weighs on every target alike.
    #[arg(long, default_value_t = 5)]
    pub interleave: usize,
    /// Open dashboard pages (dashboard): each holds a Watch on a held key
    /// and calls List every 500 ms, on its own connection.
    #[arg(long, default_value_t = 100)]
    pub pages: usize,
    /// Store of spawned servers for keepalive, crash and dashboard.
    #[arg(long, value_enum, default_value_t = StoreChoice::Redis)]
    pub store: StoreChoice,
    /// Server process to read CPU and RSS from when not spawning.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Extra flags for spawned Leasehold servers (repeatable, e.g.
    /// `--server-arg=--pool-size=8`).
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    pub server_args: Vec<String>,
    /// One JSON line per scenario instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Replicas to start for the spawned redis-server (with --spawn and no
    /// --redis-url), in sync before the measurements.
    #[arg(long, default_value_t = 0)]
    pub replicas: usize,
    /// With --spawn, `cycles` also measures a Redis-backed server with
    /// `--min-replica-acks N`, next to the one without (needs replicas:
    /// --replicas, or a --redis-url primary that has them).
    #[arg(long, default_value_t = 0)]
    pub min_replica_acks: u32,
}

/// Flags of the hidden `bench-floor` subcommand.
#[derive(Debug, Clone, Args)]
pub struct FloorArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: std::net::SocketAddr,
}

/// Flags of the hidden `bench-crash-holder` subcommand.
#[derive(Debug, Clone, Args)]
pub struct CrashHolderArgs {
    /// Server to hold the lock on.
    #[arg(long)]
    pub endpoint: String,
    /// Lock to hold.
    #[arg(long)]
    pub key: String,
}

/// Runs the floor server until killed.
pub async fn run_floor(args: FloorArgs) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(%addr, "listening (gRPC floor)");
    serve_floor(listener).await.map_err(|e| e.to_string())
}

/// Takes a lock, keeps it alive on a stream, prints HOLDING, and waits to
/// be killed (at most five minutes).
pub async fn run_crash_holder(args: CrashHolderArgs) -> Result<(), String> {
    use crate::pb;
    let mut client =
        crate::pb::lock_service_client::LockServiceClient::connect(args.endpoint.clone())
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", args.endpoint))?;
    let req = pb::AcquireRequest {
        key: args.key.clone(),
        ttl_ms: 30_000,
        wait_ms: 30_000,
        ..Default::default()
    };
    let lease = client
        .acquire(req)
        .await
        .map_err(|e| e.message().to_string())?
        .into_inner()
        .lease
        .ok_or("not acquired")?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut stream = client
        .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|e| e.message().to_string())?
        .into_inner();
    tx.send(pb::KeepAliveRequest {
        key: args.key,
        token: lease.token,
        ttl_ms: 0,
        release: false,
    })
    .await
    .map_err(|e| e.to_string())?;
    match stream.message().await {
        Ok(Some(r)) if r.alive => println!("HOLDING {}", lease.fencing_token),
        other => return Err(format!("could not attach: {other:?}")),
    }
    tokio::time::sleep(Duration::from_secs(300)).await;
    Ok(())
}

/// Runs `leasehold bench`.
pub async fn run(args: BenchArgs) -> Result<(), String> {
    let scenarios = match args.scenario {
        Scenario::All => vec![
            Scenario::Cycles,
            Scenario::Hot,
            Scenario::Keepalive,
            Scenario::Crash,
        ],
        s => vec![s],
    };
    // One redis-server for the whole run, when spawning without a URL.
    let needs_redis = args.spawn || matches!(args.scenario, Scenario::Baseline);
    let spawned_redis = if needs_redis && args.redis_url.is_none() {
        Some(spawn::redis_server().await?)
    } else {
        None
    };
    let mut replicas = Vec::new();
    if let Some(primary) = &spawned_redis {
        for _ in 0..args.replicas {
            replicas.push(spawn::redis_replica(&primary.addr).await?);
        }
    }
    let redis_url = args.redis_url.clone().or_else(|| {
        spawned_redis
            .as_ref()
            .map(|r| format!("redis://{}", r.addr))
    });
    for scenario in scenarios {
        let report = match scenario {
            Scenario::Cycles => {
                let redis_pid = spawned_redis.as_ref().map(|r| r.pid);
                cycles(&args, redis_url.as_deref(), redis_pid).await?
            }
            Scenario::Hot => hot(&args, redis_url.as_deref()).await?,
            Scenario::Keepalive => keepalive(&args, redis_url.as_deref()).await?,
            Scenario::Crash => crash(&args, redis_url.as_deref()).await?,
            Scenario::Handoff => handoff(&args, redis_url.as_deref()).await?,
            Scenario::Baseline => baseline(&args, redis_url.as_deref()).await?,
            Scenario::Protocols => protocols::protocols(&args).await?,
            Scenario::Semaphore => modes::semaphore(&args, redis_url.as_deref()).await?,
            Scenario::Fanout => modes::fanout(&args, redis_url.as_deref()).await?,
            Scenario::Dashboard => dashboard::dashboard(&args, redis_url.as_deref()).await?,
            Scenario::All => unreachable!("expanded above"),
        };
        if args.json {
            println!("{report}");
        } else {
            print_report(&report);
        }
    }
    for replica in replicas {
        replica.kill().await;
    }
    if let Some(redis) = spawned_redis {
        redis.kill().await;
    }
    Ok(())
}

fn warmup(d: Duration) -> Duration {
    (d / 5).min(Duration::from_secs(2))
}

fn machine() -> Value {
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "os": std::env::consts::OS,
    })
}

/// Measures the cycles loop against one server, with its CPU if known.
async fn cycles_against(
    args: &BenchArgs,
    endpoint: &str,
    pid: Option<u32>,
) -> Result<(Cycles, Option<ProcSample>, Option<ProcSample>), String> {
    let channels = load::connect(endpoint, args.connections).await?;
    load::cycles_grpc(&channels, args.workers, args.keys, warmup(args.duration)).await;
    let before = pid.and_then(ProcSample::read);
    let result = load::cycles_grpc(&channels, args.workers, args.keys, args.duration).await;
    let after = pid.and_then(ProcSample::read);
    Ok((result, before, after))
}

fn cycles_row(name: &str, c: &Cycles, cpu: Option<(ProcSample, ProcSample)>) -> Value {
    let rpcs = (c.cycles * 2 + c.contended) as f64;
    let cpu_us = cpu.map(|(b, a)| round3((a.cpu - b.cpu).as_secs_f64() * 1e6 / rpcs.max(1.0)));
    json!({
        "target": name,
        "cycles_per_s": c.rate().round(),
        "acquire": c.acquire.json(),
        "release": c.release.json(),
        "contended": c.contended,
        "errors": c.errors,
        "server_cpu_us_per_rpc": cpu_us,
    })
}

/// Throughput of the `--min-replica-acks` row, when there is one (it sits
/// right after the plain Redis row).
fn acked_server_rate(
    totals: &[(Cycles, Option<(ProcSample, ProcSample)>)],
    acks: u32,
) -> Option<f64> {
    (acks > 0).then(|| totals[3].0.rate())
}

/// What `cycles` and `hot` load: a gRPC server (its connections and
/// process id), fred straight to Redis, or etcd's lock API.
enum Target {
    Grpc(Vec<tonic::transport::Channel>, u32),
    DirectRedis,
    Etcd(Vec<tonic::transport::Channel>, u32),
}

impl Target {
    fn pid(&self) -> Option<u32> {
        match self {
            Target::Grpc(_, pid) | Target::Etcd(_, pid) => Some(*pid),
            Target::DirectRedis => None,
        }
    }

    /// The cycles loop on this target.
    async fn cycles(
        &self,
        pool: &fred::clients::Pool,
        workers: usize,
        keys: u64,
        d: Duration,
    ) -> Cycles {
        match self {
            Target::Grpc(channels, _) => load::cycles_grpc(channels, workers, keys, d).await,
            Target::DirectRedis => load::cycles_redis(pool, workers, keys, d).await,
            Target::Etcd(channels, _) => etcd::cycles(channels, workers, keys, d).await,
        }
    }

    /// The hot loop on this target.
    async fn hot(&self, pool: &fred::clients::Pool, workers: usize, d: Duration) -> Hot {
        match self {
            Target::Grpc(channels, _) => load::hot_grpc(channels, workers, d).await,
            Target::DirectRedis => load::hot_redis(pool, workers, d).await,
            Target::Etcd(channels, _) => etcd::hot(channels, workers, d).await,
        }
    }

    /// Acquire p50 of one worker alone, in ms: the serial limit of a hot
    /// key on this target is one over it.
    async fn one_worker_p50_ms(&self, pool: &fred::clients::Pool, keys: u64, d: Duration) -> f64 {
        self.cycles(pool, 1, keys, d).await.acquire.ms(0.5)
    }
}

/// etcd on loopback when `--spawn` and an `etcd` binary is on PATH.
async fn spawn_etcd(args: &BenchArgs) -> Result<Option<(Spawned, Target)>, String> {
    if !args.spawn || !etcd::available() {
        return Ok(None);
    }
    let server = etcd::spawn().await?;
    let channels = load::connect(&server.endpoint(), args.connections).await?;
    let target = Target::Etcd(channels, server.pid);
    Ok(Some((server, target)))
}

fn pair(b: Option<ProcSample>, a: Option<ProcSample>) -> Option<(ProcSample, ProcSample)> {
    Some((b?, a?))
}

fn ratio(a: f64, b: f64) -> Value {
    if b > 0.0 {
        json!(round3(a / b))
    } else {
        Value::Null
    }
}

/// CPU that a target's slices cost outside its own server: the load
/// generator (this process; for direct Redis, the fred client itself) and
/// redis-server (when this run spawned it). With the server's own, it is
/// all the CPU a cycle costs, which on a machine that all three share sets
/// the throughput.
#[derive(Debug, Clone, Copy, Default)]
struct SideCpu {
    load: Duration,
    redis: Option<Duration>,
}

impl SideCpu {
    fn sample(redis_pid: Option<u32>) -> (Option<ProcSample>, Option<ProcSample>) {
        (
            ProcSample::read(std::process::id()),
            redis_pid.and_then(ProcSample::read),
        )
    }

    fn add(
        &mut self,
        before: (Option<ProcSample>, Option<ProcSample>),
        after: (Option<ProcSample>, Option<ProcSample>),
    ) {
        if let Some((b, a)) = pair(before.0, after.0) {
            self.load += a.cpu - b.cpu;
        }
        if let Some((b, a)) = pair(before.1, after.1) {
            *self.redis.get_or_insert_default() += a.cpu - b.cpu;
        }
    }

    /// Microseconds per cycle of the load generator and of Redis.
    fn per_cycle(&self, c: &Cycles) -> (f64, Option<f64>) {
        (
            Self::us_per_cycle(self.load, c),
            self.redis.map(|r| Self::us_per_cycle(r, c)),
        )
    }

    /// `cpu` spread over the cycles of `c`, in microseconds.
    fn us_per_cycle(cpu: Duration, c: &Cycles) -> f64 {
        round3(cpu.as_secs_f64() * 1e6 / (c.cycles as f64).max(1.0))
    }
}

async fn cycles(
    args: &BenchArgs,
    redis_url: Option<&str>,
    redis_pid: Option<u32>,
) -> Result<Value, String> {
    let mut rows = Vec::new();
    if !args.spawn {
        let (c, b, a) = cycles_against(args, &args.endpoint, args.server_pid).await?;
        rows.push(cycles_row(&args.endpoint, &c, pair(b, a)));
        return Ok(
            json!({"scenario": "cycles", "workers": args.workers, "keys": args.keys, "duration_s": args.duration.as_secs_f64(), "rows": rows, "machine": machine()}),
        );
    }
    // Every target runs at once and is loaded in turn, in `--interleave`
    // slices each, so that a machine whose speed drifts during the run
    // (shared hosts do) weighs on all of them alike.
    let url = redis_url.ok_or("cycles --spawn needs Redis")?;
    let floor = spawn::floor().await?;
    let mem = spawn::leasehold(None, &args.server_args).await?;
    let red = spawn::leasehold(Some(url), &args.server_args).await?;
    let acked_server = if args.min_replica_acks > 0 {
        let mut server_args = args.server_args.clone();
        server_args.push(format!("--min-replica-acks={}", args.min_replica_acks));
        Some(spawn::leasehold(Some(url), &server_args).await?)
    } else {
        None
    };
    let pool = load::redis_pool(url, args.connections).await?;
    let mut targets: Vec<(String, Target)> = Vec::new();
    targets.push((
        "grpc floor (tonic + HashMap)".into(),
        Target::Grpc(
            load::connect(&floor.endpoint(), args.connections).await?,
            floor.pid,
        ),
    ));
    targets.push((
        "leasehold, memory store".into(),
        Target::Grpc(
            load::connect(&mem.endpoint(), args.connections).await?,
            mem.pid,
        ),
    ));
    targets.push((
        "leasehold, redis store".into(),
        Target::Grpc(
            load::connect(&red.endpoint(), args.connections).await?,
            red.pid,
        ),
    ));
    if let Some(s) = &acked_server {
        targets.push((
            format!(
                "leasehold, redis store, --min-replica-acks {}",
                args.min_replica_acks
            ),
            Target::Grpc(load::connect(&s.endpoint(), args.connections).await?, s.pid),
        ));
    }
    let direct = targets.len();
    targets.push((
        "direct redis (fred, SET NX PX + CAS delete)".into(),
        Target::DirectRedis,
    ));
    let etcd_server = match spawn_etcd(args).await? {
        Some((server, target)) => {
            targets.push(("etcd (Lock + Unlock, a lease per worker)".into(), target));
            Some(server)
        }
        None => None,
    };
    let slices = args.interleave.max(1);
    let slice = args.duration / slices as u32;
    let mut totals: Vec<(Cycles, Option<(ProcSample, ProcSample)>)> = Vec::new();
    let mut side = vec![SideCpu::default(); targets.len()];
    let mut alone = Vec::new();
    for (_, target) in &targets {
        // Warm-up: connections, scripts, allocator; then one worker alone.
        drop(
            target
                .cycles(&pool, args.workers, args.keys, warmup(args.duration))
                .await,
        );
        alone.push(
            target
                .one_worker_p50_ms(&pool, args.keys, warmup(args.duration))
                .await,
        );
        totals.push((Cycles::default(), None));
    }
    for _ in 0..slices {
        for (((_, target), (total, cpu)), side) in
            targets.iter().zip(totals.iter_mut()).zip(side.iter_mut())
        {
            let pid = target.pid();
            let before = pid.and_then(ProcSample::read);
            let side_before = SideCpu::sample(redis_pid);
            let part = target.cycles(&pool, args.workers, args.keys, slice).await;
            side.add(side_before, SideCpu::sample(redis_pid));
            let after = pid.and_then(ProcSample::read);
            total.merge(&part);
            total.elapsed += part.elapsed;
            if let Some((b, a)) = pair(before, after) {
                let (sb, sa) = cpu.get_or_insert((ProcSample::default(), ProcSample::default()));
                sa.cpu += a.cpu - b.cpu;
                sb.rss = b.rss.max(sb.rss);
                sa.rss = a.rss.max(sa.rss);
            }
        }
    }
    for s in [floor, mem, red]
        .into_iter()
        .chain(acked_server)
        .chain(etcd_server)
    {
        s.kill().await;
    }
    load::close(pool).await;
    // All the CPU of one cycle: the server's, the load generator's and
    // Redis's (for the rows that use it).
    let mut all_cpu = Vec::new();
    for ((((name, _), (total, cpu)), p50), side) in
        targets.iter().zip(&totals).zip(&alone).zip(&side)
    {
        let mut row = cycles_row(name, total, *cpu);
        row["one_worker_acquire_p50_ms"] = json!(round3(*p50));
        let (load, redis) = side.per_cycle(total);
        row["load_cpu_us_per_cycle"] = json!(load);
        row["redis_cpu_us_per_cycle"] = json!(redis);
        let server = cpu.map(|(b, a)| SideCpu::us_per_cycle(a.cpu - b.cpu, total));
        all_cpu.push(server.map(|s| s + load + redis.unwrap_or(0.0)));
        rows.push(row);
    }
    let f = totals[0].0.clone();
    let floor_cpu = totals[0].1;
    let m = totals[1].0.clone();
    let r = totals[2].0.clone();
    let redis_cpu = totals[2].1;
    let acked = acked_server_rate(&totals, args.min_replica_acks);
    let d = totals[direct].0.clone();
    let e = (targets.len() > direct + 1).then(|| totals[direct + 1].0.clone());

    let cpu_per_rpc = |c: &Cycles, s: Option<(ProcSample, ProcSample)>| {
        s.map(|(b, a)| {
            (a.cpu - b.cpu).as_secs_f64() / ((c.cycles * 2 + c.contended) as f64).max(1.0)
        })
        .unwrap_or(0.0)
    };
    Ok(json!({
        "scenario": "cycles",
        "workers": args.workers, "keys": args.keys, "duration_s": args.duration.as_secs_f64(),
        "rows": rows,
        "ratios": {
            "memory_over_floor": ratio(m.rate(), f.rate()),
            "redis_over_memory": ratio(r.rate(), m.rate()),
            "redis_over_floor": ratio(r.rate(), f.rate()),
            "redis_over_direct_redis": ratio(r.rate(), d.rate()),
            "redis_over_etcd": e.as_ref().map(|e| ratio(r.rate(), e.rate())),
            "redis_cpu_per_rpc_over_floor": ratio(cpu_per_rpc(&r, redis_cpu), cpu_per_rpc(&f, floor_cpu)),
            // What Redis ÷ memory would be if the CPU of a whole cycle (server,
            // load generator, Redis) alone set the throughput, as on a
            // machine that all three share: the memory cycle's CPU over the
            // Redis cycle's.
            "redis_over_memory_by_cpu": match (all_cpu[1], all_cpu[2]) {
                (Some(mem), Some(red)) => ratio(mem, red),
                _ => Value::Null,
            },
            "replica_acks_over_redis": acked.map(|k| ratio(k, r.rate())),
        },
        "machine": machine(),
    }))
}

fn hot_row(name: &str, h: &Hot, cpu: Option<(ProcSample, ProcSample)>) -> Value {
    let cores =
        cpu.map(|(b, a)| round3((a.cpu - b.cpu).as_secs_f64() / h.elapsed.as_secs_f64().max(1e-9)));
    json!({
        "target": name,
        "handoffs_per_s": h.rate().round(),
        "wait": h.wait.json(),
        "fairness_max_over_min": if h.fairness().is_finite() { json!(round3(h.fairness())) } else { Value::Null },
        "grant_gaps_over_1ms": h.stalls.count,
        "grant_gaps_over_1ms_total_ms": round3(h.stalls.total.as_secs_f64() * 1e3),
        "longest_grant_gap_ms": round3(h.stalls.longest.as_secs_f64() * 1e3),
        "timeouts": h.timeouts,
        "errors": h.errors,
        "server_cpu_cores": cores,
    })
}

async fn hot_against(
    args: &BenchArgs,
    endpoint: &str,
    pid: Option<u32>,
) -> Result<(Hot, Option<(ProcSample, ProcSample)>), String> {
    let channels = load::connect(endpoint, args.connections).await?;
    load::hot_grpc(&channels, args.workers, warmup(args.duration)).await;
    let before = pid.and_then(ProcSample::read);
    let h = load::hot_grpc(&channels, args.workers, args.duration).await;
    let after = pid.and_then(ProcSample::read);
    Ok((h, pair(before, after)))
}

async fn hot(args: &BenchArgs, redis_url: Option<&str>) -> Result<Value, String> {
    let mut rows = Vec::new();
    if !args.spawn {
        let (h, cpu) = hot_against(args, &args.endpoint, args.server_pid).await?;
        rows.push(hot_row(&args.endpoint, &h, cpu));
        return Ok(
            json!({"scenario": "hot", "workers": args.workers, "duration_s": args.duration.as_secs_f64(), "rows": rows, "machine": machine()}),
        );
    }
    // Interleaved like `cycles`: all targets up, loaded in turn.
    let url = redis_url.ok_or("hot --spawn needs Redis")?;
    let mem = spawn::leasehold(None, &args.server_args).await?;
    let red = spawn::leasehold(Some(url), &args.server_args).await?;
    let pool = load::redis_pool(url, args.connections).await?;
    let mut targets = vec![
        (
            "leasehold, memory store",
            Target::Grpc(
                load::connect(&mem.endpoint(), args.connections).await?,
                mem.pid,
            ),
        ),
        (
            "leasehold, redis store",
            Target::Grpc(
                load::connect(&red.endpoint(), args.connections).await?,
                red.pid,
            ),
        ),
        ("direct redis, polling with backoff", Target::DirectRedis),
    ];
    let etcd_server = match spawn_etcd(args).await? {
        Some((server, target)) => {
            targets.push(("etcd (Lock + Unlock, a lease per worker)", target));
            Some(server)
        }
        None => None,
    };
    let slices = args.interleave.max(1);
    let slice = args.duration / slices as u32;
    let mut totals: Vec<(Hot, Option<(ProcSample, ProcSample)>)> = Vec::new();
    let mut alone = Vec::new();
    for (_, target) in &targets {
        drop(target.hot(&pool, args.workers, warmup(args.duration)).await);
        alone.push(
            target
                .one_worker_p50_ms(&pool, args.keys, warmup(args.duration))
                .await,
        );
        totals.push((Hot::default(), None));
    }
    for _ in 0..slices {
        for ((_, target), (total, cpu)) in targets.iter().zip(totals.iter_mut()) {
            let pid = target.pid();
            let before = pid.and_then(ProcSample::read);
            let part = target.hot(&pool, args.workers, slice).await;
            let after = pid.and_then(ProcSample::read);
            total.merge(&part);
            if let Some((b, a)) = pair(before, after) {
                let (_, sa) = cpu.get_or_insert((ProcSample::default(), ProcSample::default()));
                sa.cpu += a.cpu - b.cpu;
            }
        }
    }
    for s in [mem, red].into_iter().chain(etcd_server) {
        s.kill().await;
    }
    load::close(pool).await;
    for (((name, _), (total, cpu)), p50) in targets.iter().zip(&totals).zip(&alone) {
        let mut row = hot_row(name, total, *cpu);
        // A hot key is a serial chain: at best one handoff per
        // one-worker Acquire.
        let serial = if *p50 > 0.0 { 1000.0 / p50 } else { 0.0 };
        row["one_worker_acquire_p50_ms"] = json!(round3(*p50));
        row["serial_limit_per_s"] = json!(serial.round());
        row["of_serial_limit"] = ratio(total.rate(), serial);
        // Fair queueing: a waiter waits for the others once, give or take.
        row["fair_wait_p99_bound_ms"] = if total.rate() > 0.0 {
            json!(round3(1.5 * args.workers as f64 * 1000.0 / total.rate()))
        } else {
            Value::Null
        };
        rows.push(row);
    }
    let (m, r, d) = (&totals[0].0, &totals[1].0, &totals[2].0);
    let e = totals.get(3).map(|t| &t.0);
    Ok(json!({
        "scenario": "hot", "workers": args.workers, "duration_s": args.duration.as_secs_f64(),
        "rows": rows,
        "ratios": {
            "redis_over_memory": ratio(r.rate(), m.rate()),
            "redis_over_direct_redis_polling": ratio(r.rate(), d.rate()),
            "memory_over_etcd": e.map(|e| ratio(m.rate(), e.rate())),
            "redis_over_etcd": e.map(|e| ratio(r.rate(), e.rate())),
        },
        "machine": machine(),
    }))
}

/// The server to load: spawned on `--store` (with `--server-arg`s and
/// `extra` flags) with `--spawn`, else `--endpoint` and `--server-pid`.
async fn server_for(
    args: &BenchArgs,
    redis_url: Option<&str>,
    extra: &[&str],
) -> Result<(Option<Spawned>, String, Option<u32>), String> {
    if !args.spawn {
        return Ok((None, args.endpoint.clone(), args.server_pid));
    }
    let url = match args.store {
        StoreChoice::Redis => Some(redis_url.ok_or("needs Redis")?),
        StoreChoice::Memory => None,
    };
    let mut server_args = args.server_args.clone();
    server_args.extend(extra.iter().map(|s| s.to_string()));
    let s = spawn::leasehold(url, &server_args).await?;
    let (endpoint, pid) = (s.endpoint(), s.pid);
    Ok((Some(s), endpoint, Some(pid)))
}

async fn keepalive(args: &BenchArgs, redis_url: Option<&str>) -> Result<Value, String> {
    let (server, endpoint, pid) = server_for(args, redis_url, &[]).await?;
    let ttl_ms = u32::try_from(args.ttl.as_millis()).map_err(|_| "--ttl too large")?;
    let idle = pid.and_then(ProcSample::read);
    let setup_start = Instant::now();
    let setup = load::keepalive_setup(
        &endpoint,
        args.streams,
        args.locks_per_stream,
        ttl_ms,
        args.streams_per_connection,
    )
    .await?;
    let setup_s = setup_start.elapsed().as_secs_f64();
    let setup_errors = setup.errors;
    let before = pid.and_then(ProcSample::read);
    let run = tokio::spawn(load::keepalive_run(setup, args.duration));
    // RSS at its peak: sampled through the steady state.
    let mut peak_rss = before.map(|s| s.rss).unwrap_or(0);
    let sample_end = Instant::now() + args.duration;
    while Instant::now() < sample_end {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Some(s) = pid.and_then(ProcSample::read) {
            peak_rss = peak_rss.max(s.rss);
        }
    }
    let after = pid.and_then(ProcSample::read);
    let k: KeepAlive = run.await.map_err(|e| e.to_string())?;
    if let Some(s) = server {
        s.kill().await;
    }
    let cores = pair(before, after)
        .map(|(b, a)| round3((a.cpu - b.cpu).as_secs_f64() / args.duration.as_secs_f64()));
    Ok(json!({
        "scenario": "keepalive",
        "streams": args.streams, "locks_per_stream": args.locks_per_stream, "ttl_ms": ttl_ms,
        "duration_s": args.duration.as_secs_f64(),
        "locks": k.locks, "setup_s": round3(setup_s), "setup_errors": setup_errors,
        "renewals_per_s": k.rate().round(),
        "renew": k.renew.json(),
        "lost_locks": k.lost,
        "errors": k.errors,
        "server_rss_idle_mib": idle.map(|s| round3(s.rss as f64 / 1048576.0)),
        "server_rss_peak_mib": pid.map(|_| round3(peak_rss as f64 / 1048576.0)),
        "server_cpu_cores": cores,
        "store": format!("{:?}", args.store).to_lowercase(),
        "machine": machine(),
    }))
}

async fn crash(args: &BenchArgs, redis_url: Option<&str>) -> Result<Value, String> {
    let (server, endpoint, _) = server_for(args, redis_url, &[]).await?;
    let mut client = crate::pb::lock_service_client::LockServiceClient::connect(endpoint.clone())
        .await
        .map_err(|e| format!("cannot connect to {endpoint}: {e}"))?;
    let key = format!("crash/{}", load::FastRng::new().next_u64());
    let mut latency = Latency::default();
    let mut failures = 0u64;
    for _ in 0..args.rounds {
        let holder = spawn::crash_holder(&endpoint, &key).await?;
        let mut waiter = client.clone();
        let req = crate::pb::AcquireRequest {
            key: key.clone(),
            ttl_ms: 30_000,
            wait_ms: 10_000,
            ..Default::default()
        };
        let waiting = tokio::spawn(async move {
            let r = waiter.acquire(req).await;
            (r, Instant::now())
        });
        // Let the waiter reach the server and queue before the crash.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let killed = Instant::now();
        holder.kill().await;
        let (result, at) = waiting.await.map_err(|e| e.to_string())?;
        match result.ok().and_then(|r| r.into_inner().lease) {
            Some(lease) => {
                latency.record(at.saturating_duration_since(killed));
                let _ = client
                    .release(crate::pb::ReleaseRequest {
                        key: key.clone(),
                        token: lease.token,
                    })
                    .await;
            }
            None => failures += 1,
        }
    }
    if let Some(s) = server {
        s.kill().await;
    }
    Ok(json!({
        "scenario": "crash", "rounds": args.rounds,
        "kill_to_grant": latency.json(),
        "failures": failures,
        "store": format!("{:?}", args.store).to_lowercase(),
        "machine": machine(),
    }))
}

/// Rounds of: A holds, B waits in Acquire, A releases; the time from A's
/// Release reply to B's grant is the handoff latency.
async fn handoff_rounds(endpoint: &str, rounds: usize) -> Result<(Latency, u64), String> {
    let channels = load::connect(endpoint, 2).await?;
    let mut a = crate::pb::lock_service_client::LockServiceClient::new(channels[0].clone());
    let b = crate::pb::lock_service_client::LockServiceClient::new(channels[1].clone());
    let key = format!("handoff/{}", load::FastRng::new().next_u64());
    let req = |wait_ms| crate::pb::AcquireRequest {
        key: key.clone(),
        ttl_ms: 30_000,
        wait_ms,
        ..Default::default()
    };
    let mut latency = Latency::default();
    let mut failures = 0;
    for _ in 0..rounds {
        let Some(lease) = a
            .acquire(req(10_000))
            .await
            .ok()
            .and_then(|r| r.into_inner().lease)
        else {
            failures += 1;
            continue;
        };
        let mut waiter = b.clone();
        let wait_req = req(10_000);
        let waiting = tokio::spawn(async move {
            let r = waiter.acquire(wait_req).await;
            (r, Instant::now())
        });
        // Let the waiter reach the server and queue.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let released = a
            .release(crate::pb::ReleaseRequest {
                key: key.clone(),
                token: lease.token,
            })
            .await;
        let released_at = Instant::now();
        let (result, granted_at) = waiting.await.map_err(|e| e.to_string())?;
        match (released, result.ok().and_then(|r| r.into_inner().lease)) {
            (Ok(_), Some(lease)) => {
                latency.record(granted_at.saturating_duration_since(released_at));
                let mut b2 = b.clone();
                let _ = b2
                    .release(crate::pb::ReleaseRequest {
                        key: key.clone(),
                        token: lease.token,
                    })
                    .await;
            }
            _ => failures += 1,
        }
    }
    Ok((latency, failures))
}

async fn handoff(args: &BenchArgs, redis_url: Option<&str>) -> Result<Value, String> {
    let mut rows = Vec::new();
    if !args.spawn {
        let (l, f) = handoff_rounds(&args.endpoint, args.rounds).await?;
        rows.push(json!({"target": args.endpoint, "release_to_grant": l.json(), "failures": f}));
    } else {
        let mut targets: Vec<(&str, Option<&str>)> = vec![("leasehold, memory store", None)];
        if let Some(url) = redis_url {
            targets.push(("leasehold, redis store", Some(url)));
        }
        for (name, url) in targets {
            let server = spawn::leasehold(url, &args.server_args).await?;
            let (l, f) = handoff_rounds(&server.endpoint(), args.rounds).await?;
            server.kill().await;
            rows.push(json!({"target": name, "release_to_grant": l.json(), "failures": f}));
        }
    }
    Ok(json!({"scenario": "handoff", "rounds": args.rounds, "rows": rows, "machine": machine()}))
}

async fn baseline(args: &BenchArgs, redis_url: Option<&str>) -> Result<Value, String> {
    let floor = spawn::floor().await?;
    let (f, b, a) = cycles_against(args, &floor.endpoint(), Some(floor.pid)).await?;
    floor.kill().await;
    let url = redis_url.ok_or("baseline needs Redis")?;
    let pool = load::redis_pool(url, args.connections).await?;
    let d = load::cycles_redis(&pool, args.workers, args.keys, args.duration).await;
    let h = load::hot_redis(&pool, args.workers, args.duration).await;
    load::close(pool).await;
    Ok(json!({
        "scenario": "baseline",
        "rows": [
            cycles_row("grpc floor (tonic + HashMap)", &f, pair(b, a)),
            cycles_row("direct redis (fred, SET NX PX + CAS delete)", &d, None),
            hot_row("direct redis, polling with backoff", &h, None),
        ],
        "machine": machine(),
    }))
}

fn print_report(report: &Value) {
    let scenario = report["scenario"].as_str().unwrap_or("?");
    println!("== {scenario} ==");
    let ms = |v: &Value| format!("{:.3}", v.as_f64().unwrap_or(0.0));
    // A figure that was not measured (no process to read, say) prints as
    // "n/a", not as JSON's null.
    let fig = |v: &Value| match v {
        Value::Null => "n/a".to_string(),
        v => v.to_string(),
    };
    match scenario {
        "cycles" | "baseline" | "hot" | "protocols" | "dashboard" => {
            for row in report["rows"].as_array().into_iter().flatten() {
                if row.get("cycles_per_s").is_some() {
                    println!(
                        "{:<46} {:>9} cycles/s  acquire p50/p99/p99.9 {}/{}/{} ms  release p50/p99 {}/{} ms  cpu {} µs/rpc  errors {}  1 worker: acquire p50 {} ms",
                        row["target"].as_str().unwrap_or(""),
                        row["cycles_per_s"],
                        ms(&row["acquire"]["p50_ms"]),
                        ms(&row["acquire"]["p99_ms"]),
                        ms(&row["acquire"]["p999_ms"]),
                        ms(&row["release"]["p50_ms"]),
                        ms(&row["release"]["p99_ms"]),
                        fig(&row["server_cpu_us_per_rpc"]),
                        row["errors"],
                        fig(&row["one_worker_acquire_p50_ms"]),
                    );
                } else {
                    println!(
                        "{:<46} {:>9} handoffs/s  wait p50/p99 {}/{} ms (fair p99 bound {} ms)  fairness {}  grant gaps over 1 ms {} (longest {} ms)  cpu {} cores  timeouts {} errors {}  1 worker: acquire p50 {} ms, serial limit {}/s, reached {}",
                        row["target"].as_str().unwrap_or(""),
                        row["handoffs_per_s"],
                        ms(&row["wait"]["p50_ms"]),
                        ms(&row["wait"]["p99_ms"]),
                        fig(&row["fair_wait_p99_bound_ms"]),
                        fig(&row["fairness_max_over_min"]),
                        fig(&row["grant_gaps_over_1ms"]),
                        fig(&row["longest_grant_gap_ms"]),
                        fig(&row["server_cpu_cores"]),
                        row["timeouts"],
                        row["errors"],
                        fig(&row["one_worker_acquire_p50_ms"]),
                        fig(&row["serial_limit_per_s"]),
                        fig(&row["of_serial_limit"]),
                    );
                }
            }
            for row in report["rows"].as_array().into_iter().flatten() {
                if let Some(load) = row.get("load_cpu_us_per_cycle") {
                    println!(
                        "  cpu per cycle beside {}: load generator {} µs, Redis {} µs",
                        row["target"].as_str().unwrap_or(""),
                        fig(load),
                        fig(&row["redis_cpu_us_per_cycle"]),
                    );
                }
            }
            for row in report["rows"].as_array().into_iter().flatten() {
                if let Some(seen) = row.get("pages_seen") {
                    println!(
                        "  pages beside {}: {seen}",
                        row["target"].as_str().unwrap_or("")
                    );
                }
            }
            if let Some(ratios) = report["ratios"].as_object() {
                for (k, v) in ratios {
                    println!("  {k:<36} {v}");
                }
            }
        }
        "semaphore" | "fanout" => modes::print(report),
        _ => {
            if let Some(obj) = report.as_object() {
                for (k, v) in obj {
                    if k != "scenario" {
                        println!("  {k:<24} {v}");
                    }
                }
            }
        }
    }
}
