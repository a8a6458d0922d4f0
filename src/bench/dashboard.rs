//! The `dashboard` scenario: what do open dashboard pages cost the lock
//! path? It runs the `cycles` loop (Acquire + Release over gRPC) against
//! one server in rotating slices: with no page open, with `--pages` lock
//! pages open, and with `--pages` pages that also poll the list; and reports
//! the cycles/s of each and their ratios to the first.
//!
//! A lock page does what `ui/app.js` does on a lock's page: one Watch on a
//! held key over Connect streaming with JSON (`application/connect+json`).
//! A list-polling page adds `AdminService/List` with JSON (one page of up
//! to 1000 locks, the empty prefix: the whole list, at most 200 ms old) every
//! 500 ms, as the list view does. Each page has its own HTTP/2 connection (tonic's
//! channel; a browser would use HTTP/1.1, which the server frames no more
//! cheaply). Pages are opened before a slice is measured (every Watch has
//! answered its STATE) and closed after it, so a slice measures pages that
//! are open, not pages opening.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tonic::transport::Channel;
use tower::{Service, ServiceExt};

use super::load::{self, Cycles};
use super::stats::{Latency, ProcSample};
use super::{BenchArgs, cycles_row, machine, ratio, warmup};

/// How often a page re-reads the list, as `ui/app.js` does.
const POLL: Duration = Duration::from_millis(500);

/// What the pages saw while open.
#[derive(Default)]
struct PageStats {
    lists: Latency,
    list_errors: u64,
    events: u64,
    watch_errors: u64,
}

/// Counters the page tasks share while they run.
#[derive(Default)]
struct Shared {
    events: AtomicU64,
    watch_errors: AtomicU64,
    list_errors: AtomicU64,
    /// Short sections only (one record), never across an await.
    lists: Mutex<Latency>,
}
fn request(
    path: &str,
    content_type: &'static str,
    body: Bytes,
) -> http::Request<tonic::body::Body> {
    let mut req = http::Request::new(tonic::body::Body::new(http_body_util::Full::new(body)));
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = http::Uri::try_from(path).unwrap_or_default();
    req.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    req
}

/// One `AdminService/List` over Connect with JSON; errors are counted.
async fn list(channel: &mut Channel) -> Result<(), String> {
    let body = json!({"prefix": "", "pageSize": 1000}).to_string();
    let mut req = request(
        "/leasehold.v1.AdminService/List",
        "application/json",
        Bytes::from(body),
    );
    // As the page asks: a page up to 200 ms old will do.
    req.headers_mut().insert(
        crate::service::recent_lists::MAX_AGE_HEADER,
        http::HeaderValue::from_static("200"),
    );
    // Parsed as the page parses it.
    super::protocols::send_json(channel, req).await.map(drop)
}

/// Opens a Watch on `key` over Connect streaming with JSON; returns once its
/// first event (STATE) arrived, with the task that reads the rest.
async fn watch(
    channel: &mut Channel,
    key: &str,
    shared: Arc<Shared>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let message = json!({"key": key}).to_string();
    let mut envelope = BytesMut::with_capacity(5 + message.len());
    envelope.extend_from_slice(&[0]);
    envelope.extend_from_slice(&u32::try_from(message.len()).unwrap_or(0).to_be_bytes());
    envelope.extend_from_slice(message.as_bytes());
    let req = request(
        "/leasehold.v1.LockService/Watch",
        "application/connect+json",
        envelope.freeze(),
    );
    let ready = channel.ready().await.map_err(|e| e.to_string())?;
    let response = ready.call(req).await.map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("Watch answered HTTP {}", response.status()));
    }
    let mut body = response.into_body();
    let mut buf = BytesMut::new();
    let mut first = false;
    while !first {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                }
                first = messages(&mut buf, &shared) > 0;
            }
            Some(Err(e)) => return Err(format!("Watch: {e}")),
            None => return Err("the Watch ended before its STATE".into()),
        }
    }
    Ok(tokio::spawn(async move {
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        buf.extend_from_slice(&data);
                        messages(&mut buf, &shared);
                    }
                }
                Err(_) => break,
            }
        }
        // A stream that ends while its page is open is an error: pages end
        // by being aborted.
        shared.watch_errors.fetch_add(1, Ordering::Relaxed);
    }))
}

/// Takes every whole envelope off `buf`, parsing each as JSON like the
/// page; counts events, and an error end as an error. Returns the events.
fn messages(buf: &mut BytesMut, shared: &Shared) -> u64 {
    let mut n = 0;
    while buf.len() >= 5 {
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if buf.len() < 5 + len {
            break;
        }
        let flags = buf[0];
        buf.advance(5);
        let message = buf.split_to(len);
        let parsed: Result<Value, _> = serde_json::from_slice(&message);
        if flags & 2 != 0 || parsed.is_err() {
            shared.watch_errors.fetch_add(1, Ordering::Relaxed);
        } else {
            n += 1;
        }
    }
    shared.events.fetch_add(n, Ordering::Relaxed);
    n
}

/// Open pages: each watches its key and polls List until closed.
struct Pages {
    tasks: JoinSet<()>,
    shared: Arc<Shared>,
}

impl Pages {
    /// Opens one page per key, each on its own connection, and returns
    /// once every Watch has delivered its STATE.
    async fn open(channels: &[Channel], keys: &[String], poll_list: bool) -> Result<Self, String> {
        let shared = Arc::new(Shared::default());
        let mut tasks = JoinSet::new();
        for (i, key) in keys.iter().enumerate() {
            let mut channel = channels[i % channels.len()].clone();
            let watcher = watch(&mut channel, key, shared.clone()).await?;
            let shared = shared.clone();
            // The pages' polls spread over the interval, as tabs opened at
            // different moments would be.
            let offset = POLL * (i as u32) / (keys.len().max(1) as u32);
            tasks.spawn(async move {
                let _watch = AbortOnDrop(watcher);
                if !poll_list {
                    return std::future::pending().await;
                }
                let start = tokio::time::Instant::now() + offset;
                let mut tick = tokio::time::interval_at(start, POLL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let t0 = Instant::now();
                    match list(&mut channel).await {
                        Ok(()) => shared
                            .lists
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .record(t0.elapsed()),
                        Err(_) => {
                            shared.list_errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
        Ok(Self { tasks, shared })
    }

    /// Closes every page (its Watch goes with it) and adds up what they saw.
    fn close(mut self, stats: &mut PageStats) {
        self.tasks.abort_all();
        stats.events += self.shared.events.load(Ordering::Relaxed);
        stats.watch_errors += self.shared.watch_errors.load(Ordering::Relaxed);
        stats.list_errors += self.shared.list_errors.load(Ordering::Relaxed);
        stats
            .lists
            .merge(&self.shared.lists.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// Aborts a task when dropped (the page's Watch goes with the page).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Cycles/s without and with `--pages` open pages, on one server (spawned
/// with `--admin` on `--store` with `--spawn`, else `--endpoint`, which must
/// serve the AdminService), in `--interleave` alternating slices.
pub async fn dashboard(args: &BenchArgs, redis_url: Option<&str>) -> Result<Value, String> {
    let (spawned, endpoint, pid) = super::server_for(args, redis_url, &["--admin"]).await?;
    let channels = load::connect(&endpoint, args.connections).await?;
    // The keys the pages watch, held for the whole run.
    let page_channels = load::connect(&endpoint, args.pages).await?;
    let mut holder = crate::pb::lock_service_client::LockServiceClient::new(channels[0].clone());
    let run = load::FastRng::new().next_u64();
    let mut keys = Vec::with_capacity(args.pages);
    let mut tokens = Vec::with_capacity(args.pages);
    for i in 0..args.pages {
        let key = format!("dashboard/{run:x}/page-{i}");
        let reply = holder
            .acquire(crate::pb::AcquireRequest {
                key: key.clone(),
                ttl_ms: 3_600_000,
                owner: format!("bench-holder-{i}"),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("acquire {key}: {}", e.message()))?
            .into_inner();
        if !reply.acquired {
            return Err(format!("{key} is held by someone else"));
        }
        tokens.push(reply.lease.map(|l| l.token).unwrap_or_default());
        keys.push(key);
    }
    // Every page must work before anything is measured.
    Pages::open(&page_channels, &keys[..1], true)
        .await?
        .close(&mut PageStats::default());
    let probe = list(&mut page_channels[0].clone()).await;
    probe.map_err(|e| format!("List failed (does the server serve the AdminService?): {e}"))?;

    let warm = warmup(args.duration);
    drop(load::cycles_grpc(&channels, args.workers, args.keys, warm).await);
    let slices = args.interleave.max(1);
    let slice = args.duration / slices as u32;
    // Per kind of load: the cycles, the server's CPU, what the pages saw
    // and the longest it took to open them all.
    let mut totals: [(Cycles, Duration, PageStats, f64); 3] = Default::default();
    for i in 0..slices {
        // The three in turn, each slice starting one further, so none
        // always runs first or last.
        for k in 0..3 {
            let kind = (i + k) % 3;
            let (total, cpu, stats, open_s) = &mut totals[kind];
            let pages = match kind {
                0 => None,
                _ => {
                    let t0 = Instant::now();
                    let pages = Pages::open(&page_channels, &keys, kind == 2).await?;
                    *open_s = open_s.max(t0.elapsed().as_secs_f64());
                    Some(pages)
                }
            };
            let before = pid.and_then(ProcSample::read);
            let part = load::cycles_grpc(&channels, args.workers, args.keys, slice).await;
            let after = pid.and_then(ProcSample::read);
            if let Some(pages) = pages {
                pages.close(stats);
            }
            total.merge(&part);
            total.elapsed += part.elapsed;
            if let (Some(b), Some(a)) = (before, after) {
                *cpu += a.cpu - b.cpu;
            }
        }
    }
    for (key, token) in keys.iter().zip(tokens) {
        let _ = holder
            .release(crate::pb::ReleaseRequest {
                key: key.clone(),
                token,
            })
            .await;
    }
    if let Some(s) = spawned {
        s.kill().await;
    }
    let cpu_per_rpc = |c: &Cycles, cpu: Duration| {
        pid.is_some()
            .then(|| cpu.as_secs_f64() / ((c.cycles * 2 + c.contended) as f64).max(1.0))
    };
    let names = [
        "cycles, no dashboard page open".to_string(),
        format!("cycles, {} lock pages open (Watch)", args.pages),
        format!("cycles, {} pages open (Watch + List/500 ms)", args.pages),
    ];
    let mut rows = Vec::new();
    for (name, (c, cpu, stats, open_s)) in names.iter().zip(&totals) {
        let mut row = cycles_row(name, c, None);
        row["server_cpu_us_per_rpc"] =
            json!(cpu_per_rpc(c, *cpu).map(|s| super::stats::round3(s * 1e6)));
        if !name.contains("no dashboard") {
            let seconds = c.elapsed.as_secs_f64().max(1e-9);
            row["pages_seen"] = json!({
                "list_calls_per_s": (stats.lists.count() as f64 / seconds).round(),
                "list": stats.lists.json(),
                "list_errors": stats.list_errors,
                "watch_events": stats.events,
                "watch_errors": stats.watch_errors,
                "open_all_pages_s": super::stats::round3(*open_s),
            });
        }
        rows.push(row);
    }
    let rate = |i: usize| totals[i].0.rate();
    let cpu = |i: usize| cpu_per_rpc(&totals[i].0, totals[i].1);
    let cpu_ratio = |i: usize| match (cpu(i), cpu(0)) {
        (Some(a), Some(b)) => ratio(a, b),
        _ => Value::Null,
    };
    Ok(json!({
        "scenario": "dashboard",
        "pages": args.pages, "workers": args.workers, "keys": args.keys,
        "duration_s": args.duration.as_secs_f64(), "interleave": slices,
        "store": if args.spawn { format!("{:?}", args.store).to_lowercase() } else { args.endpoint.clone() },
        "rows": rows,
        "ratios": {
            "watch_pages_over_none": ratio(rate(1), rate(0)),
            "watch_list_pages_over_none": ratio(rate(2), rate(0)),
            "cpu_per_rpc_watch_pages_over_none": cpu_ratio(1),
            "cpu_per_rpc_watch_list_pages_over_none": cpu_ratio(2),
        },
        "machine": machine(),
    }))
}
