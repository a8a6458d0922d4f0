//! Prometheus metrics on `--metrics-listen`: the series operators need,
//! with low-cardinality labels (no lock keys, owners or tokens).

mod common;

use std::time::Duration;

use common::*;
use leasehold::pb;
use leasehold::pb::lock_service_client::LockServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// GET /metrics over plain HTTP/1.1; waits (bounded) for the listener.
async fn scrape(addr: &str) -> String {
    let end = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(mut s) => {
                s.write_all(
                    b"GET /metrics HTTP/1.1\r\nHost: leasehold\r\nConnection: close\r\n\r\n",
                )
                .await
                .unwrap();
                let mut body = String::new();
                s.read_to_string(&mut body).await.unwrap();
                assert!(body.starts_with("HTTP/1.1 200"), "{body}");
                return body;
            }
            Err(e) => {
                assert!(
                    std::time::Instant::now() < end,
                    "metrics listener never came up: {e}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// The value of the first series line containing every part.
fn value(metrics: &str, parts: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| parts.iter().all(|p| l.contains(p)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_cover_rpcs_streams_waiters_and_the_store() {
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let server = tokio::task::block_in_place(|| {
        ServerProcess::start(&[
            "--metrics-listen",
            &metrics_addr,
            "--health-interval",
            "100ms",
        ])
    });
    let mut c = LockServiceClient::connect(server.endpoint()).await.unwrap();
    let key = "secret-team/billing-job-7f3a";
    let lease = lease_of(c.acquire(acquire(key, 30_000)).await.unwrap().into_inner());
    assert!(
        !c.acquire(acquire(key, 30_000))
            .await
            .unwrap()
            .into_inner()
            .acquired
    );
    assert!(c.acquire(acquire("", 30_000)).await.is_err());
    c.describe(describe(key)).await.unwrap();

    let mut s = KeepAliveSession::open(&mut c).await.unwrap();
    assert!(s.renew(key, &lease.token, 0).await.alive);
    assert!(!s.renew("not-held", &"0".repeat(32), 0).await.alive);

    // A waiter, visible while it waits.
    let mut w = c.clone();
    let waiting = tokio::spawn(async move { w.acquire(acquire_wait(key, 1_000, 20_000)).await });
    let end = std::time::Instant::now() + Duration::from_secs(10);
    let during = loop {
        let m = scrape(&metrics_addr).await;
        if value(&m, &["leasehold_waiters"]) == Some(1.0) {
            break m;
        }
        assert!(
            std::time::Instant::now() < end,
            "waiter never showed up:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        value(&during, &["leasehold_keepalive_streams"]),
        Some(1.0),
        "{during}"
    );
    assert_eq!(
        value(&during, &["leasehold_attached_locks"]),
        Some(1.0),
        "{during}"
    );

    // Ending the stream releases the lock: the waiter gets it.
    s.half_close();
    assert!(s.next().await.unwrap().is_none());
    let granted = waiting.await.unwrap().unwrap().into_inner();
    assert!(granted.acquired);

    let m = scrape(&metrics_addr).await;
    let count = |rpc: &str, outcome: &str| {
        value(
            &m,
            &[
                "leasehold_requests_total{",
                &format!("rpc=\"{rpc}\""),
                &format!("outcome=\"{outcome}\""),
            ],
        )
    };
    assert!(count("Acquire", "acquired") >= Some(2.0), "{m}");
    assert_eq!(count("Acquire", "held"), Some(1.0), "{m}");
    assert_eq!(count("Acquire", "invalid_argument"), Some(1.0), "{m}");
    assert_eq!(count("Describe", "held"), Some(1.0), "{m}");
    assert_eq!(count("KeepAlive", "alive"), Some(1.0), "{m}");
    assert_eq!(count("KeepAlive", "lost"), Some(1.0), "{m}");
    assert!(
        m.contains("leasehold_request_duration_seconds_bucket{rpc=\"Acquire\""),
        "{m}"
    );
    assert_eq!(
        value(&m, &["leasehold_renewals_total{", "result=\"alive\""]),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        value(
            &m,
            &[
                "leasehold_stream_end_releases_total{",
                "result=\"released\""
            ]
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        value(&m, &["leasehold_keepalive_streams"]),
        Some(0.0),
        "{m}"
    );
    assert_eq!(value(&m, &["leasehold_attached_locks"]), Some(0.0), "{m}");
    assert_eq!(value(&m, &["leasehold_waiters"]), Some(0.0), "{m}");
    assert!(
        m.contains("leasehold_store_call_duration_seconds_bucket{store=\"memory\",op=\"acquire\""),
        "{m}"
    );
    // The stream's end handed the lock to the waiter in one store call.
    assert_eq!(
        value(
            &m,
            &[
                "leasehold_store_call_duration_seconds_count{",
                "op=\"handoff\""
            ]
        ),
        Some(1.0),
        "{m}"
    );
    // Low cardinality, and nothing secret: no key, no token in any series.
    assert!(!m.contains("billing-job"), "a lock key leaked into metrics");
    assert!(!m.contains(&lease.token));
    let series: std::collections::HashSet<&str> = m
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split('{').next())
        .collect();
    assert!(series.len() < 40, "{series:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_errors_are_counted_by_kind() {
    let mut redis = tokio::task::block_in_place(RedisServer::start);
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let url = redis.url();
    let server = tokio::task::block_in_place(|| {
        ServerProcess::start(&[
            "--redis-url",
            &url,
            "--metrics-listen",
            &metrics_addr,
            "--store-timeout",
            "500ms",
        ])
    });
    let mut c = LockServiceClient::connect(server.endpoint()).await.unwrap();
    lease_of(c.acquire(acquire("m", 30_000)).await.unwrap().into_inner());
    tokio::task::block_in_place(|| redis.kill());
    let err = c
        .acquire(pb::AcquireRequest {
            key: "m2".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    let m = scrape(&metrics_addr).await;
    assert!(
        value(
            &m,
            &[
                "leasehold_store_errors_total{",
                "store=\"redis\"",
                "kind=\"unavailable\""
            ]
        ) >= Some(1.0),
        "{m}"
    );
    assert!(
        m.contains("leasehold_store_call_duration_seconds_bucket{store=\"redis\",op=\"acquire\""),
        "{m}"
    );
    assert_eq!(
        value(
            &m,
            &[
                "leasehold_requests_total{",
                "rpc=\"Acquire\"",
                "outcome=\"unavailable\""
            ]
        ),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contention_is_counted_without_keys() {
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let server = tokio::task::block_in_place(|| {
        ServerProcess::start(&["--metrics-listen", &metrics_addr, "--admin"])
    });
    let mut c = LockServiceClient::connect(server.endpoint()).await.unwrap();
    let key = "contended/secret-key-91c2";
    // immediate, then a waiter granted at the release: after_wait.
    let lease = lease_of(
        c.acquire(acquire_wait(key, 30_000, 5_000))
            .await
            .unwrap()
            .into_inner(),
    );
    let mut w = c.clone();
    let waiter = tokio::spawn(async move { w.acquire(acquire_wait(key, 30_000, 20_000)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        c.release(release(key, &lease.token))
            .await
            .unwrap()
            .into_inner()
            .released
    );
    let second = lease_of(waiter.await.unwrap().unwrap().into_inner());
    // timed_out: the lock stays held for the whole wait.
    assert!(
        !c.acquire(acquire_wait(key, 30_000, 200))
            .await
            .unwrap()
            .into_inner()
            .acquired
    );
    // cancelled: the client gives up while the server waits.
    let mut w = c.clone();
    let gave_up = tokio::time::timeout(
        Duration::from_millis(300),
        w.acquire(acquire_wait(key, 30_000, 20_000)),
    )
    .await;
    assert!(gave_up.is_err(), "the lock is held: the call waits");
    // The server must have seen that call go (its RST_STREAM) before the
    // forced release below, which comes over another connection: had the
    // release come first, the waiting call would have been granted the lock
    // (after_wait) and given it back.
    let cancelled = ["leasehold_acquires_total", "outcome=\"cancelled\""];
    let mut metrics = String::new();
    for _ in 0..200 {
        metrics = scrape(&metrics_addr).await;
        if value(&metrics, &cancelled).is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        value(&metrics, &cancelled).is_some(),
        "the server never saw the cancelled call go: {metrics}"
    );
    // A forced release, and an open Watch.
    let mut admin = pb::admin_service_client::AdminServiceClient::connect(server.endpoint())
        .await
        .unwrap();
    let forced = admin
        .force_release(pb::ForceReleaseRequest {
            key: key.into(),
            reason: "test".into(),
        })
        .await
        .unwrap();
    assert_eq!(forced.into_inner().released, 1);
    let _watch = c.watch(pb::WatchRequest { key: key.into() }).await.unwrap();
    let _ = second;
    let metrics = scrape(&metrics_addr).await;
    for outcome in ["immediate", "after_wait", "timed_out", "cancelled"] {
        let label = format!("outcome=\"{outcome}\"");
        assert_eq!(
            value(&metrics, &["leasehold_acquires_total", &label]),
            Some(1.0),
            "{outcome}: {metrics}"
        );
        assert!(
            value(&metrics, &["leasehold_acquire_wait_seconds_count", &label]) == Some(1.0),
            "{outcome}: {metrics}"
        );
    }
    // The waiter waited the 300 ms until the release, give or take.
    let waited = value(
        &metrics,
        &[
            "leasehold_acquire_wait_seconds_sum",
            "outcome=\"after_wait\"",
        ],
    );
    assert!(
        waited.is_some_and(|s| (0.25..5.0).contains(&s)),
        "{waited:?}"
    );
    let held = value(&metrics, &["leasehold_lock_hold_seconds_sum"]);
    assert!(held.is_some_and(|s| (0.25..5.0).contains(&s)), "{held:?}");
    assert_eq!(
        value(
            &metrics,
            &["leasehold_force_releases_total", "result=\"released\""]
        ),
        Some(1.0)
    );
    assert_eq!(value(&metrics, &["leasehold_watch_streams"]), Some(1.0));
    assert!(!metrics.contains("secret-key"), "no key in any label");
}
