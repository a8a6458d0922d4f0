//! The `protocols` scenario: Acquire + Release cycles over gRPC and over the
//! Connect protocol with JSON, against one server, in alternating slices,
//! with the server's CPU per call for each. The Connect client is a plain
//! HTTP/2 client (tonic's channel carries any HTTP/2 request) that sends
//! and parses JSON, as a Connect client or curl would.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tonic::transport::Channel;
use tower::{Service, ServiceExt};

use super::load::{self, Cycles, FastRng};
use super::stats::ProcSample;
use super::{BenchArgs, cycles_row, machine, pair, ratio, spawn, warmup};

/// One Connect JSON unary call; the reply's JSON, or why not.
async fn call(channel: &mut Channel, method: &str, body: Value) -> Result<Value, String> {
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri(format!("/leasehold.v1.LockService/{method}"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(tonic::body::Body::new(http_body_util::Full::new(
            Bytes::from(body.to_string()),
        )))
        .map_err(|e| e.to_string())?;
    send_json(channel, request).await
}

/// Sends one Connect unary `request` (tonic's channel carries any HTTP/2
/// request) and parses its reply as JSON; a non-2xx status is an error.
pub(super) async fn send_json(
    channel: &mut Channel,
    request: http::Request<tonic::body::Body>,
) -> Result<Value, String> {
    let ready = channel.ready().await.map_err(|e| e.to_string())?;
    let response = ready.call(request).await.map_err(|e| e.to_string())?;
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if !status.is_success() {
        return Err(format!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&bytes)
        ));
    }
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}

/// The cycles loop of [`load::cycles_grpc`], over Connect with JSON.
pub async fn cycles_connect_json(
    channels: &[Channel],
    workers: usize,
    keys: u64,
    duration: Duration,
) -> Cycles {
    let start = Instant::now();
    let end = start + duration;
    let mut tasks = Vec::new();
    for i in 0..workers {
        let mut channel = channels[i % channels.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Cycles::default();
            let mut rng = FastRng::new();
            while Instant::now() < end {
                let key = format!("bench/{}", rng.below(keys));
                let t0 = Instant::now();
                let acquired = call(
                    &mut channel,
                    "Acquire",
                    json!({"key": key, "ttlMs": 10_000}),
                )
                .await;
                let token = match acquired {
                    Ok(reply) => {
                        out.acquire.record(t0.elapsed());
                        match reply["lease"]["token"].as_str() {
                            Some(token) => token.to_string(),
                            None => {
                                out.contended += 1;
                                continue;
                            }
                        }
                    }
                    Err(_) => {
                        out.errors += 1;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        continue;
                    }
                };
                let t1 = Instant::now();
                match call(&mut channel, "Release", json!({"key": key, "token": token})).await {
                    Ok(_) => {
                        out.release.record(t1.elapsed());
                        out.cycles += 1;
                    }
                    Err(_) => out.errors += 1,
                }
            }
            out
        }));
    }
    load::collect_cycles(tasks, start).await
}

/// gRPC and Connect JSON cycles against one server (spawned with the memory
/// store, or `--endpoint` with `--server-pid`), interleaved in
/// `--interleave` slices so drift weighs on both alike.
pub async fn protocols(args: &BenchArgs) -> Result<Value, String> {
    let spawned = if args.spawn {
        Some(spawn::leasehold(None, &args.server_args).await?)
    } else {
        None
    };
    let (endpoint, pid) = match &spawned {
        Some(s) => (s.endpoint(), Some(s.pid)),
        None => (args.endpoint.clone(), args.server_pid),
    };
    let channels = load::connect(&endpoint, args.connections).await?;
    let warm = warmup(args.duration);
    drop(load::cycles_grpc(&channels, args.workers, args.keys, warm).await);
    drop(cycles_connect_json(&channels, args.workers, args.keys, warm).await);
    let slices = args.interleave.max(1);
    let slice = args.duration / slices as u32;
    let mut totals = [(Cycles::default(), None), (Cycles::default(), None)];
    for _ in 0..slices {
        for (i, (total, cpu)) in totals.iter_mut().enumerate() {
            let before = pid.and_then(ProcSample::read);
            let part = if i == 0 {
                load::cycles_grpc(&channels, args.workers, args.keys, slice).await
            } else {
                cycles_connect_json(&channels, args.workers, args.keys, slice).await
            };
            let after = pid.and_then(ProcSample::read);
            total.merge(&part);
            total.elapsed += part.elapsed;
            if let Some((b, a)) = pair(before, after) {
                let (sb, sa): &mut (ProcSample, ProcSample) =
                    cpu.get_or_insert((ProcSample::default(), ProcSample::default()));
                sa.cpu += a.cpu - b.cpu;
                sb.rss = b.rss.max(sb.rss);
                sa.rss = a.rss.max(sa.rss);
            }
        }
    }
    if let Some(s) = spawned {
        s.kill().await;
    }
    let per_rpc = |c: &Cycles, s: &Option<(ProcSample, ProcSample)>| {
        s.map(|(b, a)| {
            (a.cpu - b.cpu).as_secs_f64() / ((c.cycles * 2 + c.contended) as f64).max(1.0)
        })
        .unwrap_or(0.0)
    };
    let [(grpc, grpc_cpu), (connect, connect_cpu)] = &totals;
    Ok(json!({
        "scenario": "protocols",
        "workers": args.workers, "keys": args.keys, "duration_s": args.duration.as_secs_f64(),
        "rows": [
            cycles_row("gRPC (HTTP/2, protobuf)", grpc, *grpc_cpu),
            cycles_row("Connect (HTTP/2, JSON)", connect, *connect_cpu),
        ],
        "ratios": {
            "connect_cpu_per_rpc_over_grpc": ratio(per_rpc(connect, connect_cpu), per_rpc(grpc, grpc_cpu)),
            "connect_rate_over_grpc": ratio(connect.rate(), grpc.rate()),
        },
        "machine": machine(),
    }))
}
