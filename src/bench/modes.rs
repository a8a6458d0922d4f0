//! The lock-mode scenarios of `leasehold bench`:
//!
//! - `semaphore`: `--workers` loops on one semaphore of `--permits`
//!   (Acquire SHARED with that limit, waiting; hold `--hold`; Release), next to
//!   the same loop on an exclusive lock on the same server, interleaved;
//!   it reports permits granted per second, the wait, and the most
//!   workers that believed at once that they held a permit (never more
//!   than `--permits`, or the run says so).
//! - `fanout`: `--watchers` Watch streams on one key while one client
//!   acquires and releases it at `--event-rate` changes per second; it
//!   reports events delivered per second, the delay from the change's
//!   request to each watcher's event, and the server's memory per watcher.
//!
//! Both run against a spawned memory-store server and a Redis-backed one.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::load::{self, Hot};
use super::stats::{Latency, ProcSample, round3};
use super::{BenchArgs, machine, pair, ratio, spawn, warmup};
use crate::pb;
use crate::pb::lock_service_client::LockServiceClient;
use crate::pb::watch_event::Kind;

/// The stores the mode scenarios compare: (name, Redis URL or none).
fn stores(redis_url: Option<&str>) -> Vec<(&'static str, Option<&str>)> {
    let mut stores = vec![("memory store", None)];
    if let Some(url) = redis_url {
        stores.push(("redis store", Some(url)));
    }
    stores
}

fn semaphore_row(
    name: &str,
    permits: u32,
    h: &Hot,
    cpu: Option<(ProcSample, ProcSample)>,
) -> Value {
    let cores =
        cpu.map(|(b, a)| round3((a.cpu - b.cpu).as_secs_f64() / h.elapsed.as_secs_f64().max(1e-9)));
    json!({
        "target": name,
        "permits": permits,
        "grants_per_s": h.rate().round(),
        "wait": h.wait.json(),
        "max_believed_holders": h.max_holders,
        "over_the_limit": permits > 0 && h.max_holders > u64::from(permits)
            || permits == 0 && h.max_holders > 1,
        "timeouts": h.timeouts,
        "errors": h.errors,
        "server_cpu_cores": cores,
    })
}

/// `bench semaphore`: a semaphore of `--permits` against an exclusive lock
/// on the same servers, loaded in alternating slices.
pub async fn semaphore(args: &BenchArgs, redis_url: Option<&str>) -> Result<Value, String> {
    let permits = args.permits.max(1);
    let mut targets: Vec<(String, Vec<Channel>, Option<u32>)> = Vec::new();
    let mut servers = Vec::new();
    if args.spawn {
        for (name, url) in stores(redis_url) {
            let server = spawn::leasehold(url, &args.server_args).await?;
            let channels = load::connect(&server.endpoint(), args.connections).await?;
            targets.push((format!("leasehold, {name}"), channels, Some(server.pid)));
            servers.push(server);
        }
    } else {
        let channels = load::connect(&args.endpoint, args.connections).await?;
        targets.push((args.endpoint.clone(), channels, args.server_pid));
    }
    let slices = args.interleave.max(1);
    let slice = args.duration / slices as u32;
    // Per target: (exclusive, semaphore), each with its CPU.
    type Total = (Hot, Option<(ProcSample, ProcSample)>);
    let mut totals: Vec<[Total; 2]> = Vec::new();
    for (_, channels, _) in &targets {
        for p in [0, permits] {
            drop(
                load::hot_grpc_permits(channels, args.workers, warmup(args.duration), p, args.hold)
                    .await,
            );
        }
        totals.push(Default::default());
    }
    for _ in 0..slices {
        for ((_, channels, pid), both) in targets.iter().zip(totals.iter_mut()) {
            for (p, (total, cpu)) in [0, permits].into_iter().zip(both.iter_mut()) {
                let before = pid.and_then(ProcSample::read);
                let part =
                    load::hot_grpc_permits(channels, args.workers, slice, p, args.hold).await;
                let after = pid.and_then(ProcSample::read);
                total.merge(&part);
                if let Some((b, a)) = pair(before, after) {
                    let (_, sa) = cpu.get_or_insert((ProcSample::default(), ProcSample::default()));
                    sa.cpu += a.cpu - b.cpu;
                }
            }
        }
    }
    for server in servers {
        server.kill().await;
    }
    let mut rows = Vec::new();
    let mut ratios = serde_json::Map::new();
    for ((name, _, _), [(excl, excl_cpu), (sem, sem_cpu)]) in targets.iter().zip(&totals) {
        rows.push(semaphore_row(
            &format!("{name}, exclusive"),
            0,
            excl,
            *excl_cpu,
        ));
        rows.push(semaphore_row(
            &format!("{name}, semaphore of {permits}"),
            permits,
            sem,
            *sem_cpu,
        ));
        ratios.insert(
            format!("{name}: semaphore grants over exclusive handoffs"),
            ratio(sem.rate(), excl.rate()),
        );
    }
    Ok(json!({
        "scenario": "semaphore",
        "workers": args.workers,
        "permits": permits,
        "hold_ms": args.hold.as_secs_f64() * 1000.0,
        "duration_s": args.duration.as_secs_f64(),
        "rows": rows,
        "ratios": ratios,
        "machine": machine(),
    }))
}

/// What one watcher saw: (kind, fencing token, when).
type Seen = Vec<(Kind, u64, Instant)>;

/// One watcher: opens its stream, reads the first `KIND_STATE`, says so
/// on `ready`, then records every event until `stop`. Returns the events
/// and how many `KIND_STATE`s came after the first (it fell behind).
async fn watcher(
    channel: Channel,
    key: String,
    ready: Arc<tokio::sync::Semaphore>,
    stop: CancellationToken,
) -> Result<(Seen, u64), String> {
    let mut client = LockServiceClient::new(channel);
    let mut stream = client
        .watch(pb::WatchRequest { key })
        .await
        .map_err(|e| format!("watch: {}", e.message()))?
        .into_inner();
    match stream.message().await {
        Ok(Some(_)) => ready.add_permits(1),
        Ok(None) => return Err("the watch ended at once".into()),
        Err(e) => return Err(format!("watch: {}", e.message())),
    }
    let mut seen = Vec::new();
    let mut states = 0u64;
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => break,
            next = stream.message() => match next {
                Ok(Some(event)) => event,
                Ok(None) => break,
                Err(e) => return Err(format!("watch ended: {}", e.message())),
            },
        };
        let kind = Kind::try_from(event.kind).unwrap_or(Kind::Unspecified);
        if kind == Kind::State {
            states += 1;
        }
        seen.push((kind, event.fencing_token, Instant::now()));
    }
    Ok((seen, states))
}

/// Acquires and releases `key` at `rate` changes per second until `end`;
/// returns when each change was requested, by (kind, fencing token).
async fn driver(
    channel: Channel,
    key: String,
    rate: f64,
    end: Instant,
) -> Result<HashMap<(Kind, u64), Instant>, String> {
    let mut client = LockServiceClient::new(channel);
    let period = Duration::from_secs_f64(1.0 / rate.max(0.1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut asked = HashMap::new();
    while Instant::now() < end {
        tick.tick().await;
        let sent = Instant::now();
        let reply = client
            .acquire(pb::AcquireRequest {
                key: key.clone(),
                ttl_ms: 10_000,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("acquire: {}", e.message()))?
            .into_inner();
        let Some(lease) = reply.lease else {
            return Err("the driven key was held by someone else".into());
        };
        asked.insert((Kind::Acquired, lease.fencing_token), sent);
        tick.tick().await;
        let sent = Instant::now();
        client
            .release(pb::ReleaseRequest {
                key: key.clone(),
                token: lease.token,
            })
            .await
            .map_err(|e| format!("release: {}", e.message()))?;
        asked.insert((Kind::Released, lease.fencing_token), sent);
    }
    Ok(asked)
}

/// `bench fanout`: `--watchers` Watch streams of one key on one server
/// while it changes `--event-rate` times a second.
pub async fn fanout(args: &BenchArgs, redis_url: Option<&str>) -> Result<Value, String> {
    let mut targets = Vec::new();
    if args.spawn {
        for (name, url) in stores(redis_url) {
            // Room for the watchers on one connection's worth of streams.
            let mut server_args = args.server_args.clone();
            server_args.push(format!("--max-watches={}", args.watchers.max(1)));
            targets.push((format!("leasehold, {name}"), url, server_args));
        }
    } else {
        targets.push((args.endpoint.clone(), None, Vec::new()));
    }
    let mut rows = Vec::new();
    for (name, url, server_args) in targets {
        let server = if args.spawn {
            Some(spawn::leasehold(url, &server_args).await?)
        } else {
            None
        };
        let endpoint = server
            .as_ref()
            .map(|s| s.endpoint())
            .unwrap_or_else(|| args.endpoint.clone());
        let pid = server.as_ref().map(|s| s.pid).or(args.server_pid);
        let row = fanout_once(args, &name, &endpoint, pid).await;
        if let Some(server) = server {
            server.kill().await;
        }
        rows.push(row?);
    }
    Ok(json!({
        "scenario": "fanout",
        "watchers": args.watchers,
        "event_rate": args.event_rate,
        "duration_s": args.duration.as_secs_f64(),
        "rows": rows,
        "machine": machine(),
    }))
}

async fn fanout_once(
    args: &BenchArgs,
    name: &str,
    endpoint: &str,
    pid: Option<u32>,
) -> Result<Value, String> {
    let key = format!("fanout/{}", load::FastRng::new().next_u64());
    // At most 100 streams per connection, like a fleet of clients.
    let connections = args.connections.max(args.watchers.div_ceil(100));
    let channels = load::connect(endpoint, connections).await?;
    let driver_channel = load::connect(endpoint, 1).await?.remove(0);
    let idle = pid.and_then(ProcSample::read);
    let ready = Arc::new(tokio::sync::Semaphore::new(0));
    let stop = CancellationToken::new();
    let mut tasks = Vec::with_capacity(args.watchers);
    for i in 0..args.watchers {
        let channel = channels[i % channels.len()].clone();
        let (key, ready, stop) = (key.clone(), ready.clone(), stop.clone());
        tasks.push(tokio::spawn(watcher(channel, key, ready, stop)));
    }
    // Every watcher has its first event before the drive starts, so the
    // memory reading and the events count all of them.
    let all = u32::try_from(args.watchers).unwrap_or(u32::MAX);
    let started = tokio::time::timeout(Duration::from_secs(60), ready.acquire_many(all)).await;
    if !matches!(started, Ok(Ok(_))) {
        stop.cancel();
        return Err(format!(
            "{name}: the watchers did not all start within 60 s"
        ));
    }
    let watching = pid.and_then(ProcSample::read);
    let began = Instant::now();
    let asked = driver(driver_channel, key, args.event_rate, began + args.duration).await;
    let drove = began.elapsed();
    // The last events are on their way: a moment to arrive, bounded.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = pid.and_then(ProcSample::read);
    stop.cancel();
    let asked = asked?;
    let mut delay = Latency::default();
    let (mut events, mut lagged, mut failed) = (0u64, 0u64, 0u64);
    for task in tasks {
        match task.await {
            Ok(Ok((seen, states))) => {
                lagged += states;
                for (kind, fence, at) in seen {
                    if let Some(sent) = asked.get(&(kind, fence)) {
                        events += 1;
                        delay.record(at.saturating_duration_since(*sent));
                    }
                }
            }
            _ => failed += 1,
        }
    }
    let expected = asked.len() as u64 * args.watchers as u64;
    let rss_per_watcher = match (idle, watching) {
        (Some(i), Some(w)) => json!(round3(
            w.rss.saturating_sub(i.rss) as f64 / 1024.0 / args.watchers.max(1) as f64
        )),
        _ => Value::Null,
    };
    let cores = pair(watching, after)
        .map(|(b, a)| round3((a.cpu - b.cpu).as_secs_f64() / drove.as_secs_f64().max(1e-9)));
    Ok(json!({
        "target": name,
        "changes": asked.len(),
        "events_delivered": events,
        "events_expected": expected,
        "events_per_s": (events as f64 / drove.as_secs_f64().max(1e-9)).round(),
        "event_delay": delay.json(),
        "states_after_falling_behind": lagged,
        "watchers_failed": failed,
        "server_rss_mb": after.map(|a| round3(a.rss as f64 / 1048576.0)),
        "server_rss_kb_per_watcher": rss_per_watcher,
        "server_cpu_cores": cores,
    }))
}

/// Prints a `semaphore` or `fanout` report as a table.
pub fn print(report: &Value) {
    let ms = |v: &Value| format!("{:.3}", v.as_f64().unwrap_or(0.0));
    for row in report["rows"].as_array().into_iter().flatten() {
        let target = row["target"].as_str().unwrap_or("");
        if row.get("grants_per_s").is_some() {
            println!(
                "{target:<46} {:>9} grants/s  wait p50/p99 {}/{} ms  most holders {}{}  timeouts {} errors {}",
                row["grants_per_s"],
                ms(&row["wait"]["p50_ms"]),
                ms(&row["wait"]["p99_ms"]),
                row["max_believed_holders"],
                if row["over_the_limit"].as_bool() == Some(true) {
                    "  OVER THE LIMIT"
                } else {
                    ""
                },
                row["timeouts"],
                row["errors"],
            );
        } else {
            println!(
                "{target:<30} {:>9} events/s ({} of {})  delay p50/p99/p99.9 {}/{}/{} ms  behind {}  rss {} MB ({} KB/watcher)  cpu {} cores",
                row["events_per_s"],
                row["events_delivered"],
                row["events_expected"],
                ms(&row["event_delay"]["p50_ms"]),
                ms(&row["event_delay"]["p99_ms"]),
                ms(&row["event_delay"]["p999_ms"]),
                row["states_after_falling_behind"],
                row["server_rss_mb"],
                row["server_rss_kb_per_watcher"],
                row["server_cpu_cores"],
            );
        }
    }
    if let Some(ratios) = report["ratios"].as_object() {
        for (k, v) in ratios {
            println!("  {k:<56} {v}");
        }
    }
}
