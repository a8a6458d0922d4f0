//! Server-side waiting (documentation/semantics.md, "Waiting"): waiters are woken by a
//! release or by the holder's expiry, end at wait_ms or at the gRPC
//! deadline, are served one at a time, and leave nothing behind when they
//! give up or are cancelled.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use leasehold::pb;
use rand::Rng;
use tonic::Code;
use tonic::transport::Channel;

on_every_store!(
    handoff_after_release,
    expiring_holder_is_handed_to_a_waiter,
    wait_ends_at_wait_ms,
    grpc_deadline_ends_the_wait,
    fifty_waiters_one_at_a_time,
    hundreds_of_cancels_leave_nothing_behind,
    max_waiters_is_resource_exhausted,
);

async fn wait_for_waiters(server: &TestServer, n: usize) {
    let waiters = server.waiters.clone();
    tokio::task::block_in_place(|| {
        wait_until(
            &format!("{n} waiters queued"),
            Duration::from_secs(10),
            || waiters.len() >= n,
        )
    });
}

async fn handoff_after_release(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.client().await;
    let first = lease_of(c.acquire(acquire("h", 30_000)).await.unwrap().into_inner());
    let mut w = server.client().await;
    let task = tokio::spawn(async move {
        let r = w
            .acquire(acquire_wait("h", 30_000, 20_000))
            .await
            .unwrap()
            .into_inner();
        (r, Instant::now())
    });
    wait_for_waiters(&server, 1).await;
    assert!(
        c.release(release("h", &first.token))
            .await
            .unwrap()
            .into_inner()
            .released
    );
    let released = Instant::now();
    let (r, at) = task.await.unwrap();
    let second = lease_of(r);
    assert!(second.fencing_token > first.fencing_token);
    let took = at.saturating_duration_since(released);
    assert!(took < Duration::from_secs(1), "handoff took {took:?}");
}

async fn expiring_holder_is_handed_to_a_waiter(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.client().await;
    let start = Instant::now();
    let first = lease_of(c.acquire(acquire("x", 400)).await.unwrap().into_inner());
    let r = c
        .acquire(acquire_wait("x", 30_000, 10_000))
        .await
        .unwrap()
        .into_inner();
    let took = start.elapsed();
    let second = lease_of(r);
    assert!(second.fencing_token > first.fencing_token);
    // Not before the 400 ms TTL, and soon after it (woken at the deadline,
    // not by a slow poll).
    assert!(
        took >= Duration::from_millis(350),
        "granted after {took:?}, before the TTL ran out"
    );
    assert!(
        took < Duration::from_millis(1_500),
        "granted {took:?} after start"
    );
}

async fn wait_ends_at_wait_ms(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.client().await;
    lease_of(c.acquire(acquire("we", 30_000)).await.unwrap().into_inner());
    let start = Instant::now();
    let r = c
        .acquire(acquire_wait("we", 1_000, 300))
        .await
        .unwrap()
        .into_inner();
    let took = start.elapsed();
    assert!(!r.acquired);
    assert!(r.retry_after_ms >= 1 && r.retry_after_ms <= 30_000);
    assert!(
        took >= Duration::from_millis(280),
        "returned after {took:?}"
    );
    assert!(took < Duration::from_secs(2), "returned after {took:?}");
    assert!(server.waiters.is_empty());
}

async fn grpc_deadline_ends_the_wait(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.client().await;
    lease_of(c.acquire(acquire("dl", 30_000)).await.unwrap().into_inner());
    let mut req = tonic::Request::new(acquire_wait("dl", 1_000, 20_000));
    req.set_timeout(Duration::from_millis(300));
    let start = Instant::now();
    let err = c.acquire(req).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(start.elapsed() < Duration::from_secs(2));
    let waiters = server.waiters.clone();
    tokio::task::block_in_place(|| {
        wait_until("the waiter to leave", Duration::from_secs(5), || {
            waiters.is_empty()
        })
    });
}

async fn fifty_waiters_one_at_a_time(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.client().await;
    let gate = lease_of(
        c.acquire(acquire("fifty", 30_000))
            .await
            .unwrap()
            .into_inner(),
    );
    let holding = Arc::new(AtomicBool::new(false));
    let grants = Arc::new(std::sync::Mutex::new(Vec::new()));
    let channel = Channel::from_shared(server.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for worker in 0..50 {
        let mut w = leasehold::pb::lock_service_client::LockServiceClient::new(channel.clone());
        let (holding, grants) = (holding.clone(), grants.clone());
        tasks.push(tokio::spawn(async move {
            let r = w
                .acquire(acquire_wait("fifty", 30_000, 60_000))
                .await
                .unwrap()
                .into_inner();
            let lease = lease_of(r);
            assert!(!holding.swap(true, Ordering::SeqCst), "two holders at once");
            grants.lock().unwrap().push((worker, lease.fencing_token));
            tokio::time::sleep(Duration::from_millis(2)).await;
            holding.store(false, Ordering::SeqCst);
            assert!(
                w.release(release("fifty", &lease.token))
                    .await
                    .unwrap()
                    .into_inner()
                    .released
            );
        }));
    }
    wait_for_waiters(&server, 50).await;
    assert!(
        c.release(release("fifty", &gate.token))
            .await
            .unwrap()
            .into_inner()
            .released
    );
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("all 50 acquire")
            .unwrap();
    }
    let grants = grants.lock().unwrap().clone();
    assert_eq!(grants.len(), 50);
    let mut workers: Vec<_> = grants.iter().map(|g| g.0).collect();
    workers.sort();
    workers.dedup();
    assert_eq!(workers.len(), 50, "every waiter acquired exactly once");
    let mut last = gate.fencing_token;
    for (_, fence) in grants {
        assert!(fence > last, "fencing tokens increase in grant order");
        last = fence;
    }
}

async fn hundreds_of_cancels_leave_nothing_behind(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.client().await;
    let holder = lease_of(
        c.acquire(acquire("storm", 30_000))
            .await
            .unwrap()
            .into_inner(),
    );
    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(
            Channel::from_shared(server.endpoint())
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
    }
    let client = |i: usize| {
        leasehold::pb::lock_service_client::LockServiceClient::new(channels[i % 4].clone())
    };
    let jitter = |lo: u64, hi: u64| rand::rng().random_range(lo..hi);

    // Phase 1: 150 waiters cancel (drop the call) at random moments while
    // the lock is held. Nothing may remain: no queued waiter, no grant.
    let mut tasks = Vec::new();
    for i in 0..150 {
        let mut w = client(i);
        let (start_after, give_up) = (jitter(0, 50), jitter(1, 100));
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(start_after)).await;
            let call = w.acquire(acquire_wait("storm", 30_000, 10_000));
            tokio::time::timeout(Duration::from_millis(give_up), call)
                .await
                .is_err()
        }));
    }
    let mut cancelled = 0;
    for t in tasks {
        cancelled += usize::from(t.await.unwrap());
    }
    assert!(
        cancelled > 100,
        "most calls were cancelled while waiting ({cancelled})"
    );
    let waiters = server.waiters.clone();
    tokio::task::block_in_place(|| {
        wait_until(
            "every cancelled waiter to leave",
            Duration::from_secs(10),
            || waiters.is_empty(),
        )
    });
    let d = c.describe(describe("storm")).await.unwrap().into_inner();
    assert_eq!(
        d.fencing_token, holder.fencing_token,
        "no grant happened while held"
    );

    // Phase 2: 150 waiters whose deadlines (5..150 ms) race with grants:
    // the holder releases after 60 ms, and each grant goes to a waiter that
    // is about to give up. The deadline travels as `grpc-timeout`, and the
    // client keeps listening a while longer, so every reply the server sends
    // is seen: each waiter must end with the lock (and give it back) or with
    // DEADLINE_EXCEEDED, and nothing may be left held.
    let mut tasks = Vec::new();
    for i in 0..150 {
        let mut w = client(i);
        let addr = server.addr;
        let (start_after, give_up) = (jitter(0, 100), jitter(5, 150));
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(start_after)).await;
            let req = acquire_wait("storm", 30_000, 10_000);
            let call = acquire_with_server_deadline(addr, req, Duration::from_millis(give_up));
            let bounded = tokio::time::timeout(Duration::from_millis(give_up + 5_000), call);
            match bounded.await.expect("the server answers by the deadline") {
                Ok(r) if r.acquired => {
                    let lease = r.lease.unwrap();
                    assert!(
                        w.release(release("storm", &lease.token))
                            .await
                            .unwrap()
                            .into_inner()
                            .released
                    );
                    1
                }
                Ok(r) => panic!("a waiter with a deadline ends by it, not by wait_ms: {r:?}"),
                Err((code, message)) => {
                    // The server answers DEADLINE_EXCEEDED a little before
                    // the deadline; on a starved machine tonic's own timer
                    // may fire first and answer CANCELLED ("Timeout
                    // expired"). Either way nothing may be left behind.
                    assert!(
                        code == Code::DeadlineExceeded as i32
                            || (code == Code::Cancelled as i32 && message.contains("Timeout")),
                        "{code} {message}"
                    );
                    0
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert!(
        c.release(release("storm", &holder.token))
            .await
            .unwrap()
            .into_inner()
            .released
    );
    let mut delivered = 0;
    for t in tasks {
        delivered += t.await.unwrap();
    }
    tokio::task::block_in_place(|| {
        wait_until("every waiter to leave", Duration::from_secs(10), || {
            waiters.is_empty()
        })
    });
    // Grants undone in the background: the lock must be free again well
    // within the 30 s TTL a leaked grant would hold it for.
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let d = c.describe(describe("storm")).await.unwrap().into_inner();
        if !d.held {
            break;
        }
        assert!(Instant::now() < end, "a grant was left behind: {d:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // How many waiters got the lock depends on how loaded the machine is;
    // what must hold either way is that nothing was left behind.
    eprintln!("{delivered} of 150 deadline-bound waiters got the lock ({backend:?})");
    let last = lease_of(
        c.acquire(acquire("storm", 1_000))
            .await
            .unwrap()
            .into_inner(),
    );
    assert!(last.fencing_token > holder.fencing_token);
}

async fn max_waiters_is_resource_exhausted(backend: Backend) {
    let mut config = test_config();
    config.max_waiters = 3;
    let server = TestServer::start_with(backend, config).await;
    let mut c = server.client().await;
    lease_of(c.acquire(acquire("mw", 30_000)).await.unwrap().into_inner());
    let channel = Channel::from_shared(server.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let mut w = leasehold::pb::lock_service_client::LockServiceClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            w.acquire(acquire_wait("mw", 1_000, 3_000)).await
        }));
    }
    wait_for_waiters(&server, 3).await;
    let err = c
        .acquire(acquire_wait("mw", 1_000, 3_000))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // A try-once Acquire is not a waiter and is still served.
    assert!(
        !c.acquire(acquire("mw", 1_000))
            .await
            .unwrap()
            .into_inner()
            .acquired
    );
    for t in tasks {
        let r: pb::AcquireResponse = t.await.unwrap().unwrap().into_inner();
        assert!(!r.acquired);
    }
}
