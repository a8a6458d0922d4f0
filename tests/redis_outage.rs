//! Redis going away under a running server: calls fail fast with
//! UNAVAILABLE, health goes NOT_SERVING, and everything recovers by itself
//! when Redis is back, without restarting Leasehold.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tonic::Code;

fn outage_config() -> leasehold::server::ServerConfig {
    let mut config = test_config();
    config.store_timeout = Duration::from_millis(800);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted() {
    let mut redis = tokio::task::block_in_place(RedisServer::start);
    let server = TestServer::start_on(
        Backend::Redis,
        Some(redis.url()),
        unique_prefix(),
        outage_config(),
    )
    .await;
    let mut c = server.client().await;
    let before = lease_of(c.acquire(acquire("o", 60_000)).await.unwrap().into_inner());

    tokio::task::block_in_place(|| redis.kill());
    for _ in 0..3 {
        let start = Instant::now();
        let err = c.acquire(acquire("o2", 1_000)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        // Within the store timeout (800 ms), with margin for a loaded box.
        assert!(
            start.elapsed() < Duration::from_millis(2_000),
            "took {:?}",
            start.elapsed()
        );
    }
    let err = c.describe(describe("o")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    server
        .wait_health("NOT_SERVING", Duration::from_secs(10))
        .await;

    // Back, empty (no persistence): the lock and its counter are gone.
    tokio::task::block_in_place(|| redis.restart());
    server.wait_health("SERVING", Duration::from_secs(20)).await;
    let after = lease_of(c.acquire(acquire("o", 1_000)).await.unwrap().into_inner());
    assert!(
        after.fencing_token > before.fencing_token,
        "fencing must survive a Redis restart without persistence: {} then {}",
        before.fencing_token,
        after.fencing_token
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_redis_is_unavailable_not_a_hang() {
    let redis = tokio::task::block_in_place(RedisServer::start);
    let server = TestServer::start_on(
        Backend::Redis,
        Some(redis.url()),
        unique_prefix(),
        outage_config(),
    )
    .await;
    let mut c = server.client().await;
    lease_of(
        c.acquire(acquire("frozen", 5_000))
            .await
            .unwrap()
            .into_inner(),
    );
    redis.freeze();
    let start = Instant::now();
    let err = c.acquire(acquire("frozen2", 1_000)).await.unwrap_err();
    let took = start.elapsed();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(took < Duration::from_millis(2_500), "took {took:?}");
    server
        .wait_health("NOT_SERVING", Duration::from_secs(10))
        .await;
    redis.thaw();
    server.wait_health("SERVING", Duration::from_secs(20)).await;
    let d = c.describe(describe("frozen")).await.unwrap().into_inner();
    assert!(d.held);
}

/// A grant that races with the client's cancel is released: the Acquire
/// is in flight (Redis frozen) when the client gives up, and lands after.
async fn cancelled_in_flight_acquire(resume_after: Duration) {
    let redis = tokio::task::block_in_place(RedisServer::start);
    let server = TestServer::start_on(
        Backend::Redis,
        Some(redis.url()),
        unique_prefix(),
        outage_config(),
    )
    .await;
    let mut c = server.client().await;
    redis.freeze();
    let call = c.acquire(acquire("inflight", 60_000));
    let cancelled = tokio::time::timeout(Duration::from_millis(200), call).await;
    assert!(
        cancelled.is_err(),
        "the Acquire cannot finish while Redis is frozen"
    );
    tokio::time::sleep(resume_after).await;
    redis.thaw();
    // The Acquire now runs and grants; the server must give it back, so
    // another client gets the lock. (The lock may look free for a moment
    // before the abandoned grant lands: the give-back sent at the store
    // timeout can reach Redis first, on another pool connection; the one
    // sent when the late reply arrives is what frees it then.)
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(reply) = c.acquire(acquire("inflight", 1_000)).await {
            if reply.get_ref().acquired {
                break;
            }
        }
        assert!(
            Instant::now() < end,
            "the cancelled Acquire's grant was left behind"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_landing_after_a_cancel_is_released() {
    // Redis resumes within the store timeout: the abandoned call finishes
    // in the background.
    cancelled_in_flight_acquire(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_landing_after_the_store_timeout_is_released() {
    // Redis resumes after the store timeout (800 ms): the late reply is
    // still awaited and undone.
    cancelled_in_flight_acquire(Duration::from_millis(1_500)).await;
}
