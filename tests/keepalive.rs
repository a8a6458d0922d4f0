//! KeepAlive streams (documentation/semantics.md, "KeepAlive streams"): renewals keep locks, lost locks are
//! reported and detached, and every way a client can end its stream
//! releases its locks and wakes waiters; a server shutdown does not.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use leasehold::pb;
use leasehold::pb::lock_service_client::LockServiceClient;
use tonic::Code;
use tonic::transport::Channel;

on_every_store!(
    keepalive_across_ten_ttls_then_lost,
    half_close_releases_and_wakes_a_waiter,
    cancel_releases_and_wakes_a_waiter,
    dropped_connection_releases_and_wakes_a_waiter,
    killed_client_process_releases_within_a_second,
    frozen_client_is_detected_by_http2_pings,
    release_over_the_stream,
    invalid_requests_answer_alive_false_and_the_stream_goes_on,
    server_shutdown_keeps_attached_locks,
    stream_limits_are_resource_exhausted,
);

async fn keepalive_across_ten_ttls_then_lost(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.client().await;
    let lease = lease_of(c.acquire(acquire("ka", 300)).await.unwrap().into_inner());
    let mut s = KeepAliveSession::open(&mut c).await.unwrap();
    // Ten TTLs of renewals every 100 ms: the lock never lapses.
    let end = Instant::now() + Duration::from_millis(3_000);
    while Instant::now() < end {
        let r = s.renew("ka", &lease.token, 0).await;
        assert_eq!((r.key.as_str(), r.alive, r.ttl_ms), ("ka", true, 300));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let d = c.describe(describe("ka")).await.unwrap().into_inner();
    assert!(d.held);
    assert_eq!(d.fencing_token, lease.fencing_token);
    // A renewal may change the TTL in force.
    let r = s.renew("ka", &lease.token, 400).await;
    assert_eq!((r.alive, r.ttl_ms), (true, 400));
    // Stop renewing: the lock expires and someone else takes it.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let other = lease_of(c.acquire(acquire("ka", 10_000)).await.unwrap().into_inner());
    assert!(other.fencing_token > lease.fencing_token);
    let r = s.renew("ka", &lease.token, 0).await;
    assert!(!r.alive, "a renewal of a lost lock answers alive = false");
    assert_eq!(r.ttl_ms, 0);
    // Detached: ending the stream must not release the new holder's lock.
    s.half_close();
    assert!(s.next().await.unwrap().is_none());
    let d = c.describe(describe("ka")).await.unwrap().into_inner();
    assert!(d.held);
    assert_eq!(d.fencing_token, other.fencing_token);
}

/// Holds `key` on a KeepAlive stream, with a waiter queued behind it.
async fn hold_with_waiter(
    server: &TestServer,
    holder: &mut LockServiceClient<Channel>,
    key: &str,
) -> (
    KeepAliveSession,
    pb::Lease,
    tokio::task::JoinHandle<(pb::AcquireResponse, Instant)>,
) {
    let lease = lease_of(
        holder
            .acquire(acquire(key, 30_000))
            .await
            .unwrap()
            .into_inner(),
    );
    let mut s = KeepAliveSession::open(holder).await.unwrap();
    assert!(s.renew(key, &lease.token, 0).await.alive);
    let mut waiter = server.client().await;
    let req = acquire_wait(key, 30_000, 20_000);
    let task = tokio::spawn(async move {
        let r = waiter.acquire(req).await.unwrap().into_inner();
        (r, Instant::now())
    });
    wait_for_waiter(server).await;
    (s, lease, task)
}

/// Waits until the server has a waiter queued (its wait queues are real
/// server state, read directly from the in-process server).
async fn wait_for_waiter(server: &TestServer) {
    let waiters = server.waiters.clone();
    tokio::task::block_in_place(|| {
        wait_until(
            "a waiter queued on the server",
            Duration::from_secs(10),
            || !waiters.is_empty(),
        )
    });
}

#[track_caller]
fn assert_handed_over(result: (pb::AcquireResponse, Instant), ended: Instant, old: &pb::Lease) {
    let (resp, at) = result;
    let lease = lease_of(resp);
    assert!(lease.fencing_token > old.fencing_token);
    let took = at.saturating_duration_since(ended);
    assert!(
        took < Duration::from_secs(1),
        "the waiter got the lock {took:?} after the stream ended"
    );
}

async fn half_close_releases_and_wakes_a_waiter(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.client().await;
    let (mut s, lease, waiter) = hold_with_waiter(&server, &mut c, "hc").await;
    let ended = Instant::now();
    s.half_close();
    assert!(
        s.next().await.unwrap().is_none(),
        "the server ends its side after releasing"
    );
    assert_handed_over(waiter.await.unwrap(), ended, &lease);
}

async fn cancel_releases_and_wakes_a_waiter(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.client().await;
    let (s, lease, waiter) = hold_with_waiter(&server, &mut c, "cancel").await;
    let ended = Instant::now();
    // Dropping the call cancels it (RST_STREAM); the connection stays up.
    drop(s);
    assert_handed_over(waiter.await.unwrap(), ended, &lease);
    assert!(
        c.describe(describe("cancel")).await.is_ok(),
        "same connection still usable"
    );
}

async fn dropped_connection_releases_and_wakes_a_waiter(backend: Backend) {
    let server = TestServer::start(backend).await;
    let channel = Channel::from_shared(server.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = LockServiceClient::new(channel);
    let (s, lease, waiter) = hold_with_waiter(&server, &mut c, "conn").await;
    let ended = Instant::now();
    drop(s);
    drop(c); // the last handle on the channel: the TCP connection closes
    assert_handed_over(waiter.await.unwrap(), ended, &lease);
}

/// Starts this test binary again as a lock-holding client process.
fn holder_process(server: &TestServer, key: &str) -> (std::process::Child, Output) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "holder_process_main",
        "--ignored",
        "--nocapture",
        "--test-threads",
        "1",
    ])
    .env(
        "LEASEHOLD_TEST_HOLDER",
        format!("{}|{key}", server.endpoint()),
    );
    let mut child = spawn_tied(cmd);
    let output = Output::capture(&mut child);
    output.wait_for("HOLDING", Duration::from_secs(20));
    (child, output)
}

/// Not a test: the body of the client process used by the SIGKILL and
/// SIGSTOP tests. It takes a lock with a 10 s TTL, attaches it to a
/// KeepAlive stream, prints HOLDING and renews every second for at most a
/// minute.
#[tokio::test]
#[ignore = "helper process started by other tests"]
async fn holder_process_main() {
    let Ok(spec) = std::env::var("LEASEHOLD_TEST_HOLDER") else {
        return;
    };
    let (endpoint, key) = spec.split_once('|').expect("endpoint|key");
    let mut c = LockServiceClient::connect(endpoint.to_string())
        .await
        .unwrap();
    let lease = lease_of(c.acquire(acquire(key, 10_000)).await.unwrap().into_inner());
    let mut s = KeepAliveSession::open(&mut c).await.unwrap();
    assert!(s.renew(key, &lease.token, 0).await.alive);
    println!("HOLDING {}", lease.fencing_token);
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        assert!(s.renew(key, &lease.token, 0).await.alive);
    }
}

async fn killed_client_process_releases_within_a_second(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (mut child, _out) = tokio::task::block_in_place(|| holder_process(&server, "sigkill"));
    let mut waiter = server.client().await;
    let task = tokio::spawn(async move {
        let r = waiter
            .acquire(acquire_wait("sigkill", 30_000, 20_000))
            .await
            .unwrap()
            .into_inner();
        (r, Instant::now())
    });
    wait_for_waiter(&server).await;
    let killed = Instant::now();
    signal(child.id(), "-KILL");
    let _ = child.wait();
    let (resp, at) = task.await.unwrap();
    assert!(resp.acquired, "{resp:?}");
    let took = at.saturating_duration_since(killed);
    assert!(
        took < Duration::from_secs(1),
        "waiter got the lock {took:?} after SIGKILL"
    );
}

async fn frozen_client_is_detected_by_http2_pings(backend: Backend) {
    let mut config = test_config();
    config.keepalive_interval = Duration::from_millis(300);
    config.keepalive_timeout = Duration::from_millis(300);
    let server = TestServer::start_with(backend, config).await;
    let (mut child, _out) = tokio::task::block_in_place(|| holder_process(&server, "sigstop"));
    let mut waiter = server.client().await;
    let task = tokio::spawn(async move {
        let r = waiter
            .acquire(acquire_wait("sigstop", 30_000, 20_000))
            .await
            .unwrap()
            .into_inner();
        (r, Instant::now())
    });
    wait_for_waiter(&server).await;
    let frozen = Instant::now();
    signal(child.id(), "-STOP");
    let (resp, at) = task.await.unwrap();
    signal(child.id(), "-KILL");
    let _ = child.wait();
    assert!(resp.acquired, "{resp:?}");
    // Detected after at most interval + timeout (600 ms), long before the
    // holder's 10 s TTL (renewed every second) could run out; generous
    // margin for a busy box.
    let took = at.saturating_duration_since(frozen);
    assert!(
        took < Duration::from_secs(5),
        "frozen client detected after {took:?}"
    );
}

async fn release_over_the_stream(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.client().await;
    let a = lease_of(
        c.acquire(acquire("rel-a", 30_000))
            .await
            .unwrap()
            .into_inner(),
    );
    let b = lease_of(
        c.acquire(acquire("rel-b", 30_000))
            .await
            .unwrap()
            .into_inner(),
    );
    let mut s = KeepAliveSession::open(&mut c).await.unwrap();
    assert!(s.renew("rel-a", &a.token, 0).await.alive);
    assert!(s.renew("rel-b", &b.token, 0).await.alive);
    s.push("rel-a", &a.token, 0, true).await;
    let r = s.next().await.unwrap().unwrap();
    assert_eq!((r.key.as_str(), r.alive), ("rel-a", false));
    assert!(
        !c.describe(describe("rel-a"))
            .await
            .unwrap()
            .into_inner()
            .held
    );
    // Someone else takes rel-a; ending the stream releases only rel-b.
    let a2 = lease_of(
        c.acquire(acquire("rel-a", 30_000))
            .await
            .unwrap()
            .into_inner(),
    );
    s.half_close();
    assert!(s.next().await.unwrap().is_none());
    let d = c.describe(describe("rel-a")).await.unwrap().into_inner();
    assert!(d.held && d.fencing_token == a2.fencing_token);
    assert!(
        !c.describe(describe("rel-b"))
            .await
            .unwrap()
            .into_inner()
            .held
    );
}

async fn invalid_requests_answer_alive_false_and_the_stream_goes_on(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.client().await;
    let lease = lease_of(
        c.acquire(acquire("inv", 30_000))
            .await
            .unwrap()
            .into_inner(),
    );
    let mut s = KeepAliveSession::open(&mut c).await.unwrap();
    for (key, token, ttl) in [
        ("", "t", 0),
        ("inv", "", 0),
        ("bad\u{1}", "t", 0),
        ("inv", &lease.token, 5),
    ] {
        s.push(key, token, ttl, false).await;
        let r = s.next().await.unwrap().unwrap();
        assert_eq!(r.key, key);
        assert!(!r.alive, "{key:?}/{ttl}");
    }
    // The invalid requests changed nothing; the stream still works.
    let d = c.describe(describe("inv")).await.unwrap().into_inner();
    assert!(d.held && d.ttl_ms <= 30_000);
    assert!(s.renew("inv", &lease.token, 0).await.alive);
    // A wrong (non-empty) token is just "not yours".
    assert!(!s.renew("inv", &"f".repeat(32), 0).await.alive);
    assert!(c.describe(describe("inv")).await.unwrap().into_inner().held);
}

async fn server_shutdown_keeps_attached_locks(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    let mut c = server.client().await;
    let lease = lease_of(c.acquire(acquire("sd", 30_000)).await.unwrap().into_inner());
    let mut s = KeepAliveSession::open(&mut c).await.unwrap();
    assert!(s.renew("sd", &lease.token, 0).await.alive);
    let second = if backend == Backend::Memory {
        None
    } else {
        Some(
            TestServer::start_on(
                backend,
                server.redis_url.clone(),
                server.prefix.clone(),
                test_config(),
            )
            .await,
        )
    };
    server.stop().await;
    let err = s.next().await.expect_err("the stream ends with a status");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let Some(second) = second else { return };
    // The lock outlived the server's shutdown, and another server keeps it.
    let mut c2 = second.client().await;
    let d = c2.describe(describe("sd")).await.unwrap().into_inner();
    assert!(d.held);
    assert_eq!(d.fencing_token, lease.fencing_token);
    let mut s2 = KeepAliveSession::open(&mut c2).await.unwrap();
    let r = s2.renew("sd", &lease.token, 0).await;
    assert!(r.alive && r.ttl_ms == 30_000);
    s2.half_close();
    assert!(s2.next().await.unwrap().is_none());
    assert!(!c2.describe(describe("sd")).await.unwrap().into_inner().held);
}

async fn stream_limits_are_resource_exhausted(backend: Backend) {
    let mut config = test_config();
    config.limits.max_streams_per_connection = 2;
    config.limits.max_locks_per_stream = 2;
    let server = TestServer::start_with(backend, config).await;
    let mut c = server.client().await;
    let mut leases = Vec::new();
    for i in 0..3 {
        leases.push(lease_of(
            c.acquire(acquire(&format!("lim{i}"), 30_000))
                .await
                .unwrap()
                .into_inner(),
        ));
    }
    let mut s1 = KeepAliveSession::open(&mut c).await.unwrap();
    let _s2 = KeepAliveSession::open(&mut c).await.unwrap();
    let third = KeepAliveSession::open(&mut c).await;
    assert_eq!(third.err().map(|e| e.code()), Some(Code::ResourceExhausted));
    // Another connection has its own allowance.
    let mut other = LockServiceClient::new(
        Channel::from_shared(server.endpoint())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    assert!(KeepAliveSession::open(&mut other).await.is_ok());
    // Two locks per stream; the third ends the stream, releasing nothing.
    assert!(s1.renew("lim0", &leases[0].token, 0).await.alive);
    assert!(s1.renew("lim1", &leases[1].token, 0).await.alive);
    s1.push("lim2", &leases[2].token, 0, false).await;
    let err = s1.next().await.expect_err("limit ends the stream");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    for i in 0..3 {
        assert!(
            c.describe(describe(&format!("lim{i}")))
                .await
                .unwrap()
                .into_inner()
                .held
        );
    }
}
