//! The latest attachment owns the stream-end release
//! (documentation/semantics.md, "KeepAlive"): a lock re-attached through
//! another stream (on another server, or on the same one) survives the end
//! of the stream it was attached to before, and is released at once when
//! the stream it was last renewed through ends.

mod common;
#[path = "faults/proxy.rs"]
mod proxy;

use std::time::{Duration, Instant};

use common::*;
use leasehold::pb::lock_service_client::LockServiceClient;
use tonic::transport::Channel;

on_every_store!(
    old_stream_half_close_keeps_a_lock_renewed_elsewhere,
    old_stream_cancel_keeps_a_lock_renewed_elsewhere,
    renewing_alternately_moves_ownership_each_time,
    a_lock_never_renewed_elsewhere_is_released_at_its_stream_end,
    a_partitioned_old_stream_ends_late_and_releases_nothing,
);

/// Two servers on the same locks (one server twice on the memory store,
/// whose locks live in one process), and a client of each.
async fn two_servers(
    backend: Backend,
) -> (
    TestServer,
    Option<TestServer>,
    LockServiceClient<Channel>,
    LockServiceClient<Channel>,
) {
    let a = TestServer::start(backend).await;
    let b = match backend {
        Backend::Memory => None,
        _ => Some(
            TestServer::start_on(
                backend,
                a.redis_url.clone(),
                a.prefix.clone(),
                test_config(),
            )
            .await,
        ),
    };
    let ca = a.client().await;
    let cb = match &b {
        Some(b) => b.client().await,
        None => a.client().await,
    };
    (a, b, ca, cb)
}

async fn held(c: &mut LockServiceClient<Channel>, key: &str) -> bool {
    c.describe(describe(key)).await.unwrap().into_inner().held
}

/// The lock stays held for all of `window` (the old rule released it
/// within milliseconds of the old stream's end).
async fn stays_held(c: &mut LockServiceClient<Channel>, key: &str, window: Duration) {
    let end = Instant::now() + window;
    while Instant::now() < end {
        assert!(
            held(c, key).await,
            "{key} was released by the old stream's end"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn old_stream_half_close_keeps_a_lock_renewed_elsewhere(backend: Backend) {
    let (_a, _b, mut ca, mut cb) = two_servers(backend).await;
    let lease = lease_of(
        ca.acquire(acquire("moved", 10_000))
            .await
            .unwrap()
            .into_inner(),
    );
    let mut sa = KeepAliveSession::open(&mut ca).await.unwrap();
    assert!(sa.renew("moved", &lease.token, 0).await.alive);
    let mut sb = KeepAliveSession::open(&mut cb).await.unwrap();
    assert!(sb.renew("moved", &lease.token, 0).await.alive);

    // A's stream ends; its response stream ends only after the server's
    // stream-end release has run.
    sa.half_close();
    assert!(sa.next().await.unwrap().is_none());
    assert!(held(&mut ca, "moved").await);
    assert!(
        !ca.acquire(acquire("moved", 1_000))
            .await
            .unwrap()
            .into_inner()
            .acquired
    );
    assert!(sb.renew("moved", &lease.token, 0).await.alive);

    // B's stream is the latest attachment: its end releases at once.
    sb.half_close();
    assert!(sb.next().await.unwrap().is_none());
    assert!(!held(&mut cb, "moved").await);
}

async fn old_stream_cancel_keeps_a_lock_renewed_elsewhere(backend: Backend) {
    let (_a, _b, mut ca, mut cb) = two_servers(backend).await;
    let lease = lease_of(
        ca.acquire(acquire("cancelled", 10_000))
            .await
            .unwrap()
            .into_inner(),
    );
    let mut sa = KeepAliveSession::open(&mut ca).await.unwrap();
    assert!(sa.renew("cancelled", &lease.token, 0).await.alive);
    let mut sb = KeepAliveSession::open(&mut cb).await.unwrap();
    assert!(sb.renew("cancelled", &lease.token, 0).await.alive);
    drop(sa);
    stays_held(&mut cb, "cancelled", Duration::from_millis(1_000)).await;
    assert!(sb.renew("cancelled", &lease.token, 0).await.alive);
    drop(sb);
    wait_until_async(
        "release at the end of the latest stream",
        Duration::from_secs(2),
        || {
            let mut c = cb.clone();
            async move { !held(&mut c, "cancelled").await }
        },
    )
    .await;
}

async fn renewing_alternately_moves_ownership_each_time(backend: Backend) {
    let (_a, _b, mut ca, mut cb) = two_servers(backend).await;
    let lease = lease_of(
        ca.acquire(acquire("alt", 10_000))
            .await
            .unwrap()
            .into_inner(),
    );
    let mut sa = KeepAliveSession::open(&mut ca).await.unwrap();
    let mut sb = KeepAliveSession::open(&mut cb).await.unwrap();
    assert!(sa.renew("alt", &lease.token, 0).await.alive);
    assert!(sb.renew("alt", &lease.token, 0).await.alive);
    // Back to A: B is no longer the owner of the release.
    assert!(sa.renew("alt", &lease.token, 0).await.alive);
    sb.half_close();
    assert!(sb.next().await.unwrap().is_none());
    assert!(held(&mut ca, "alt").await);
    // A, the latest, releases at its end.
    sa.half_close();
    assert!(sa.next().await.unwrap().is_none());
    assert!(!held(&mut ca, "alt").await);
}

async fn a_lock_never_renewed_elsewhere_is_released_at_its_stream_end(backend: Backend) {
    let (_a, _b, mut ca, mut cb) = two_servers(backend).await;
    let one = lease_of(
        ca.acquire(acquire("one", 10_000))
            .await
            .unwrap()
            .into_inner(),
    );
    let two = lease_of(
        ca.acquire(acquire("two", 10_000))
            .await
            .unwrap()
            .into_inner(),
    );
    let mut sa = KeepAliveSession::open(&mut ca).await.unwrap();
    assert!(sa.renew("one", &one.token, 0).await.alive);
    assert!(sa.renew("two", &two.token, 0).await.alive);
    // Only "two" moves to B.
    let mut sb = KeepAliveSession::open(&mut cb).await.unwrap();
    assert!(sb.renew("two", &two.token, 0).await.alive);
    sa.half_close();
    assert!(sa.next().await.unwrap().is_none());
    assert!(!held(&mut ca, "one").await, "A's own lock is released");
    assert!(held(&mut ca, "two").await, "the lock B renewed stays");
}

/// The case the rule exists for: the client's connection to A is cut off
/// (a partition: A hears nothing, so it learns of the dead connection only
/// when its HTTP/2 PINGs go unanswered), the client re-attaches on B and a
/// rival waits on B. When A finally ends the old stream, the lock stays
/// with the client; the rival gets it only when the client's latest stream
/// ends.
async fn a_partitioned_old_stream_ends_late_and_releases_nothing(backend: Backend) {
    let config = || leasehold::server::ServerConfig {
        keepalive_interval: Duration::from_millis(300),
        keepalive_timeout: Duration::from_millis(300),
        ..test_config()
    };
    let a = TestServer::start_with(backend, config()).await;
    let b = match backend {
        Backend::Memory => None,
        _ => Some(
            TestServer::start_on(backend, a.redis_url.clone(), a.prefix.clone(), config()).await,
        ),
    };
    let b_ref = b.as_ref().unwrap_or(&a);
    let proxy = proxy::Proxy::start(a.addr).await;
    let mut via_proxy = LockServiceClient::connect(format!("http://{}", proxy.addr))
        .await
        .unwrap();
    let mut cb = b_ref.client().await;
    let lease = lease_of(
        via_proxy
            .acquire(acquire("cut", 10_000))
            .await
            .unwrap()
            .into_inner(),
    );
    let mut sa = KeepAliveSession::open(&mut via_proxy).await.unwrap();
    assert!(sa.renew("cut", &lease.token, 0).await.alive);

    proxy.set(proxy::Mode::Pause);
    let mut sb = KeepAliveSession::open(&mut cb).await.unwrap();
    assert!(sb.renew("cut", &lease.token, 0).await.alive);
    let rival = tokio::spawn({
        let mut c = cb.clone();
        async move { c.acquire(acquire_wait("cut", 10_000, 8_000)).await }
    });
    // Well past A's PING interval + timeout (0.6 s): A has ended the old
    // stream meanwhile. The client keeps renewing through B, and the lock
    // stays its own.
    let end = Instant::now() + Duration::from_millis(2_500);
    while Instant::now() < end {
        assert!(sb.renew("cut", &lease.token, 0).await.alive);
        assert!(
            !rival.is_finished(),
            "the rival was granted while the client held the lock"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sb.half_close();
    assert!(sb.next().await.unwrap().is_none());
    let granted = tokio::time::timeout(Duration::from_secs(3), rival)
        .await
        .expect("the rival is granted at the end of the latest stream")
        .unwrap()
        .unwrap()
        .into_inner();
    assert!(granted.acquired);
    drop(sa);
}
