//! Lock modes (documentation/semantics.md, "Modes"): semaphores and
//! read/write locks, on the memory store, one redis-server and the Redis
//! Cluster, through a real server over gRPC. Where two servers matter (a
//! writer waiting on one, readers arriving at the other), the Redis
//! backends run two servers on the same locks.

mod common;

use std::time::{Duration, Instant};

use common::*;
use leasehold::pb;
use tonic::Code;
use tonic::transport::Channel;

use leasehold::pb::lock_service_client::LockServiceClient;

on_every_store!(
    semaphore_of_n,
    readers_coexist_and_a_waiting_writer_goes_first,
    a_writer_that_gives_up_lets_readers_in_at_once,
    a_writer_is_not_starved_by_overlapping_readers,
    limit_mismatch_is_failed_precondition,
    fencing_increases_across_shared_grants,
    release_and_renew_work_per_holder,
    request_id_replays_a_shared_grant,
    shared_holders_expire_one_by_one,
    sdk_takes_shared_locks,
);

fn shared(key: &str, ttl_ms: u32, limit: u32, wait_ms: u32) -> pb::AcquireRequest {
    pb::AcquireRequest {
        key: key.into(),
        ttl_ms,
        wait_ms,
        mode: pb::LockMode::Shared.into(),
        shared_limit: limit,
        ..Default::default()
    }
}

type Client = LockServiceClient<Channel>;

/// An Acquire that must be granted.
async fn take(c: &mut Client, req: pb::AcquireRequest) -> pb::Lease {
    lease_of(attempt(c, req).await)
}

/// One Acquire's reply.
async fn attempt(c: &mut Client, req: pb::AcquireRequest) -> pb::AcquireResponse {
    c.acquire(req).await.expect("Acquire").into_inner()
}

/// Whether a Release released.
async fn freed(c: &mut Client, key: &str, token: &str) -> bool {
    c.release(release(key, token))
        .await
        .expect("Release")
        .into_inner()
        .released
}

/// Describe.
async fn state(c: &mut Client, key: &str) -> pb::DescribeResponse {
    c.describe(describe(key))
        .await
        .expect("Describe")
        .into_inner()
}

/// A second server on the same locks (Redis backends), or the same one
/// (memory: its state lives in one process).
async fn other_server(first: &TestServer) -> Option<TestServer> {
    match first.backend {
        Backend::Memory => None,
        backend => Some(
            TestServer::start_on(
                backend,
                first.redis_url.clone(),
                first.prefix.clone(),
                test_config(),
            )
            .await,
        ),
    }
}

async fn client_of(first: &TestServer, other: &Option<TestServer>) -> Client {
    match other {
        Some(s) => s.client().await,
        None => first.client().await,
    }
}

async fn semaphore_of_n(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.client().await;
    let mut permits = Vec::new();
    for _ in 0..3 {
        let r = attempt(&mut c, shared("sem", 30_000, 3, 0)).await;
        permits.push(lease_of(r));
    }
    let mut tokens: Vec<_> = permits.iter().map(|l| l.token.clone()).collect();
    tokens.dedup();
    assert_eq!(tokens.len(), 3, "every permit has its own token");
    let d = state(&mut c, "sem").await;
    assert!(d.held, "{d:?}");
    assert_eq!(d.mode, pb::LockMode::Shared as i32);
    assert_eq!(d.shared_limit, 3);
    assert_eq!(d.holders.len(), 3, "{d:?}");
    assert!(
        d.owner.is_empty() && d.fencing_token == 0,
        "fields 2..5 are exclusive-only"
    );
    let fences: Vec<u64> = d.holders.iter().map(|h| h.fencing_token).collect();
    assert_eq!(
        fences,
        permits.iter().map(|l| l.fencing_token).collect::<Vec<_>>()
    );

    // The fourth waits; an exclusive Acquire does too.
    let full = attempt(&mut c, shared("sem", 30_000, 3, 0)).await;
    assert!(!full.acquired && full.retry_after_ms >= 1, "{full:?}");
    assert!(!attempt(&mut c, acquire("sem", 1_000)).await.acquired);

    // One permit attached to a KeepAlive stream; the stream's end frees it
    // at once (not at its 30 s TTL) and the waiter gets it.
    let mut session = KeepAliveSession::open(&mut c).await.unwrap();
    assert!(session.renew("sem", &permits[1].token, 30_000).await.alive);
    let mut waiter_client = server.client().await;
    let waiting = tokio::spawn(async move {
        let started = Instant::now();
        let r = waiter_client
            .acquire(shared("sem", 30_000, 3, 20_000))
            .await
            .map(|r| r.into_inner());
        (r, started.elapsed())
    });
    wait_until("the fourth permit waits", Duration::from_secs(10), || {
        server.waiters.len() == 1
    });
    session.half_close();
    let (r, waited) = waiting.await.unwrap();
    let fourth = lease_of(r.unwrap());
    assert!(waited < Duration::from_secs(10), "waited {waited:?}");
    assert!(fourth.fencing_token > permits[2].fencing_token);
    let d = state(&mut c, "sem").await;
    assert_eq!(d.holders.len(), 3, "{d:?}");
    // The stream's end released only its own permit.
    for lease in [&permits[0], &permits[2], &fourth] {
        assert!(freed(&mut c, "sem", &lease.token).await);
    }
    assert!(!state(&mut c, "sem").await.held);
}

async fn readers_coexist_and_a_waiting_writer_goes_first(backend: Backend) {
    let server = TestServer::start(backend).await;
    let other = other_server(&server).await;
    let mut a = server.client().await;
    let mut b = client_of(&server, &other).await;
    let r1 = take(&mut a, shared("rw", 30_000, 0, 0)).await;
    let r2 = take(&mut b, shared("rw", 30_000, 0, 0)).await;
    // A writer that only tries does not hold readers back.
    assert!(!attempt(&mut a, acquire("rw", 30_000)).await.acquired);
    let r3 = take(&mut b, shared("rw", 30_000, 0, 0)).await;
    assert!(freed(&mut b, "rw", &r3.token).await);

    // A writer that waits, on server A, keeps readers that come later out,
    // on any server: readers get in only until its first attempt.
    let mut wc = server.client().await;
    let writer = tokio::spawn(async move {
        wc.acquire(acquire_wait("rw", 30_000, 20_000))
            .await
            .map(|r| r.into_inner())
    });
    wait_until_async(
        "a reader refused behind the waiting writer",
        Duration::from_secs(10),
        || {
            let mut b = b.clone();
            async move {
                let r = attempt(&mut b, shared("rw", 30_000, 0, 0)).await;
                match r.lease {
                    Some(early) => !freed(&mut b, "rw", &early.token).await,
                    None => true,
                }
            }
        },
    )
    .await;
    // A reader that waits, on server B, queues behind the writer.
    let mut rc = client_of(&server, &other).await;
    let reader = tokio::spawn(async move {
        rc.acquire(shared("rw", 30_000, 0, 20_000))
            .await
            .map(|r| r.into_inner())
    });
    let queued = || server.waiters.len() + other.as_ref().map_or(0, |o| o.waiters.len()) == 2;
    wait_until(
        "the writer and the reader wait",
        Duration::from_secs(10),
        queued,
    );
    assert!(freed(&mut a, "rw", &r1.token).await);
    assert!(freed(&mut b, "rw", &r2.token).await);
    let w = lease_of(writer.await.unwrap().unwrap());
    let d = state(&mut a, "rw").await;
    assert_eq!(d.mode, pb::LockMode::Exclusive as i32, "{d:?}");
    assert_eq!(d.holders.len(), 1);
    assert!(
        !reader.is_finished(),
        "a reader was granted beside the writer"
    );
    assert!(w.fencing_token > r2.fencing_token);
    assert!(freed(&mut a, "rw", &w.token).await);
    let r = lease_of(reader.await.unwrap().unwrap());
    assert!(r.fencing_token > w.fencing_token);
}

async fn a_writer_that_gives_up_lets_readers_in_at_once(backend: Backend) {
    let server = TestServer::start(backend).await;
    let other = other_server(&server).await;
    let mut a = server.client().await;
    let b = client_of(&server, &other).await;
    let r1 = take(&mut a, shared("gu", 30_000, 0, 0)).await;
    // The writer waits 300 ms for the reader, in vain: it marked the key.
    let writer = attempt(&mut a, acquire_wait("gu", 30_000, 300)).await;
    assert!(!writer.acquired, "{writer:?}");
    // Its mark would lapse 3 s after its last attempt; leaving withdrew it.
    let left = Instant::now();
    wait_until_async("a reader gets in", Duration::from_secs(2), || {
        let mut b = b.clone();
        async move { attempt(&mut b, shared("gu", 30_000, 0, 0)).await.acquired }
    })
    .await;
    assert!(left.elapsed() < Duration::from_secs(2));
    assert!(freed(&mut a, "gu", &r1.token).await);
}

/// Readers on two servers (one on the memory store) take turns so that the
/// lock is never free of readers; a writer that waits is granted within
/// one reader TTL all the same, and no reader is granted beside it.
async fn a_writer_is_not_starved_by_overlapping_readers(backend: Backend) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    const READER_TTL: Duration = Duration::from_millis(2_000);
    let server = TestServer::start(backend).await;
    let other = other_server(&server).await;
    let stop = Arc::new(AtomicBool::new(false));
    let granted = Arc::new(AtomicU32::new(0));
    let mut readers = Vec::new();
    for (i, mut c) in [server.client().await, client_of(&server, &other).await]
        .into_iter()
        .enumerate()
    {
        let (stop, granted) = (stop.clone(), granted.clone());
        readers.push(tokio::spawn(async move {
            // Staggered, so that one reader always holds.
            tokio::time::sleep(Duration::from_millis(150 * i as u64)).await;
            let end = Instant::now() + Duration::from_secs(20);
            while !stop.load(Ordering::SeqCst) && Instant::now() < end {
                let r = attempt(
                    &mut c,
                    shared("starve", READER_TTL.as_millis() as u32, 0, 0),
                )
                .await;
                match r.lease {
                    Some(lease) => {
                        granted.fetch_add(1, Ordering::SeqCst);
                        // The reader's work.
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        freed(&mut c, "starve", &lease.token).await;
                    }
                    None => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        }));
    }
    let probe = granted.clone();
    wait_until("readers take turns", Duration::from_secs(10), || {
        probe.load(Ordering::SeqCst) >= 3
    });
    let mut w = server.client().await;
    let asked = Instant::now();
    let writer = take(&mut w, acquire_wait("starve", 5_000, 15_000)).await;
    let waited = asked.elapsed();
    let d = state(&mut w, "starve").await;
    stop.store(true, Ordering::SeqCst);
    assert!(
        waited < READER_TTL,
        "the writer waited {waited:?}, more than one reader TTL"
    );
    assert_eq!(d.mode, pb::LockMode::Exclusive as i32, "{d:?}");
    assert_eq!(d.holders.len(), 1, "a reader beside the writer: {d:?}");
    assert!(freed(&mut w, "starve", &writer.token).await);
    for r in readers {
        r.await.unwrap();
    }
}

async fn limit_mismatch_is_failed_precondition(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.client().await;
    let first = take(&mut c, shared("lim", 30_000, 2, 0)).await;
    let err = c.acquire(shared("lim", 30_000, 3, 0)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains('2') && err.message().contains('3'),
        "names both limits: {}",
        err.message()
    );
    // shared_limit means nothing to an exclusive Acquire.
    let mut bad = acquire("lim", 1_000);
    bad.shared_limit = 2;
    assert_eq!(
        c.acquire(bad).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    // Once the holders are gone, the next first holder sets the limit.
    assert!(freed(&mut c, "lim", &first.token).await);
    take(&mut c, shared("lim", 30_000, 3, 0)).await;
    let d = state(&mut c, "lim").await;
    assert_eq!(d.shared_limit, 3);
}

async fn fencing_increases_across_shared_grants(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.client().await;
    let mut last = 0;
    let mut held = Vec::new();
    for _ in 0..4 {
        let l = take(&mut c, shared("f", 30_000, 0, 0)).await;
        assert!(l.fencing_token > last);
        last = l.fencing_token;
        held.push(l);
    }
    for l in &held {
        assert!(freed(&mut c, "f", &l.token).await);
    }
    let x = take(&mut c, acquire("f", 30_000)).await;
    assert!(x.fencing_token > last);
    assert!(!attempt(&mut c, shared("f", 30_000, 0, 0)).await.acquired);
    assert!(freed(&mut c, "f", &x.token).await);
    let s = take(&mut c, shared("f", 30_000, 0, 0)).await;
    assert!(s.fencing_token > x.fencing_token);
}

async fn release_and_renew_work_per_holder(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.client().await;
    let a = take(&mut c, shared("p", 5_000, 0, 0)).await;
    let b = take(&mut c, shared("p", 5_000, 0, 0)).await;
    let renewed = c
        .renew(pb::RenewRequest {
            key: "p".into(),
            token: a.token.clone(),
            ttl_ms: 20_000,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(renewed.renewed && renewed.ttl_ms == 20_000, "{renewed:?}");
    let d = state(&mut c, "p").await;
    let ttls: Vec<u32> = d.holders.iter().map(|h| h.ttl_ms).collect();
    assert!(ttls[0] > 15_000 && ttls[1] <= 5_000, "{ttls:?}");
    // A KeepAlive renewal of one holder.
    let mut session = KeepAliveSession::open(&mut c).await.unwrap();
    assert!(session.renew("p", &b.token, 10_000).await.alive);
    assert!(
        !session
            .renew("p", "0123456789abcdef0123456789abcdef", 10_000)
            .await
            .alive
    );
    // Releases are per holder, and idempotent.
    assert!(freed(&mut c, "p", &a.token).await);
    assert!(freed(&mut c, "p", &a.token).await);
    let gone = c
        .renew(pb::RenewRequest {
            key: "p".into(),
            token: a.token.clone(),
            ttl_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!gone.renewed);
    let d = state(&mut c, "p").await;
    assert_eq!(d.holders.len(), 1, "{d:?}");
    assert_eq!(d.holders[0].fencing_token, b.fencing_token);
    assert!(!freed(&mut c, "p", "0123456789abcdef0123456789abcdef").await);
    // The stream's end releases b, the last holder: the key is free.
    session.half_close();
    let mut probe = server.client().await;
    wait_until_async(
        "the stream's end frees the key",
        Duration::from_secs(5),
        || {
            let mut probe = probe.clone();
            async move { !state(&mut probe, "p").await.held }
        },
    )
    .await;
    take(&mut probe, acquire("p", 1_000)).await;
}

async fn request_id_replays_a_shared_grant(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.client().await;
    let mut req = shared("rid", 30_000, 2, 0);
    req.request_id = "req-1".into();
    let first = take(&mut c, req.clone()).await;
    let again = take(&mut c, req.clone()).await;
    assert_eq!(again.token, first.token);
    assert_eq!(again.fencing_token, first.fencing_token);
    let d = state(&mut c, "rid").await;
    assert_eq!(d.holders.len(), 1, "a replay is no second holder: {d:?}");
    // Another request id is another holder; the limit of 2 is then reached,
    // but a replay still answers.
    let mut other = req.clone();
    other.request_id = "req-2".into();
    let second = take(&mut c, other).await;
    assert_ne!(second.token, first.token);
    assert_eq!(take(&mut c, req.clone()).await.token, first.token);
    // Released, the id is a fresh Acquire.
    assert!(freed(&mut c, "rid", &first.token).await);
    let fresh = take(&mut c, req).await;
    assert_ne!(fresh.token, first.token);
    assert!(fresh.fencing_token > second.fencing_token);
}

async fn shared_holders_expire_one_by_one(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.client().await;
    let short = take(&mut c, shared("x", 300, 2, 0)).await;
    let long = take(&mut c, shared("x", 30_000, 2, 0)).await;
    let mut probe = c.clone();
    wait_until_async("the short holder expires", Duration::from_secs(5), || {
        let mut probe = probe.clone();
        async move { state(&mut probe, "x").await.holders.len() == 1 }
    })
    .await;
    assert!(!freed(&mut probe, "x", &short.token).await);
    // Its permit is free again.
    let third = take(&mut probe, shared("x", 300, 2, 0)).await;
    assert!(third.fencing_token > long.fencing_token);
    assert!(freed(&mut probe, "x", &long.token).await);
    wait_until_async("every holder gone", Duration::from_secs(5), || {
        let mut probe = probe.clone();
        async move { !state(&mut probe, "x").await.held }
    })
    .await;
    take(&mut c, acquire("x", 1_000)).await;
}

async fn sdk_takes_shared_locks(backend: Backend) {
    use leasehold::client::Client;
    let server = TestServer::start(backend).await;
    let connect = || async {
        Client::builder()
            .endpoints(vec![server.endpoint()])
            .retry_for(Duration::from_secs(10))
            .connect()
            .await
            .expect("connect")
    };
    let (one, two, three) = (connect().await, connect().await, connect().await);
    let a = one.lock("sdk/sem").shared(2).await.unwrap();
    let b = two.lock("sdk/sem").shared(2).await.unwrap();
    assert!(b.fencing_token() > a.fencing_token());
    let full = three.lock("sdk/sem").shared(2).wait(Duration::ZERO).await;
    assert!(full.is_err(), "a third permit of two");
    let waiting = tokio::spawn(async move {
        three
            .lock("sdk/sem")
            .shared(2)
            .wait(Duration::from_secs(20))
            .await
            .map(|g| g.fencing_token())
    });
    wait_until("the SDK waits", Duration::from_secs(10), || {
        server.waiters.len() == 1
    });
    drop(one);
    drop(a);
    let third = waiting.await.unwrap().unwrap();
    assert!(third > b.fencing_token());
    assert!(b.release().await.unwrap());
}
