//! `--min-replica-acks N`: a grant is answered only once N replicas
//! acknowledged it (Redis `WAIT` on the connection that granted it);
//! otherwise it is undone and the caller gets UNAVAILABLE. Against a real
//! primary and replica, and real `leasehold serve` processes.

mod common;

use std::time::{Duration, Instant};

use common::*;
use leasehold::pb;
use leasehold::pb::lock_service_client::LockServiceClient;
use tonic::Code;
use tonic::transport::Channel;

fn serve(url: &str, prefix: &str, acks: &str) -> ServerProcess {
    ServerProcess::start(&[
        "--redis-url",
        url,
        "--key-prefix",
        prefix,
        "--store-timeout",
        "3s",
        "--min-replica-acks",
        acks,
        // One connection, so that a test knows what it has written.
        "--pool-size",
        "1",
    ])
}

async fn client(server: &ServerProcess) -> LockServiceClient<Channel> {
    LockServiceClient::connect(server.endpoint())
        .await
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_wait_for_a_replica_and_are_undone_without_one() {
    let (primary, replica) = tokio::task::block_in_place(primary_and_replica);
    let prefix = unique_prefix();
    let server = tokio::task::block_in_place(|| serve(&primary.url(), &prefix, "1"));
    let mut c = client(&server).await;

    // With the replica answering: granted, and the grant is on the replica.
    let lease = lease_of(
        c.acquire(acquire("acks/a", 30_000))
            .await
            .unwrap()
            .into_inner(),
    );
    let n = names(&prefix, "acks/a");
    assert_eq!(
        tokio::task::block_in_place(|| replica.cli(&["HGET", &n.lock, "fence"])),
        lease.fencing_token.to_string(),
        "an acknowledged grant is on the replica"
    );
    assert!(
        c.release(release("acks/a", &lease.token))
            .await
            .unwrap()
            .into_inner()
            .released
    );

    // Frozen replica: WAIT gives up after half the store timeout, the
    // grant is undone, the caller gets UNAVAILABLE.
    let pid = replica.pid().expect("running");
    signal(pid, "STOP");
    let start = Instant::now();
    let status = c.acquire(acquire("acks/b", 30_000)).await.unwrap_err();
    let took = start.elapsed();
    signal(pid, "CONT");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("acknowledged by 0 of 1"),
        "{status:?}"
    );
    // WAIT's own timeout is half the 3 s store timeout.
    assert!(took >= Duration::from_millis(1_450), "took {took:?}");
    assert!(took < Duration::from_millis(4_000), "took {took:?}");
    let d = c.describe(describe("acks/b")).await.unwrap().into_inner();
    assert!(!d.held, "the unacknowledged grant was undone");

    // Thawed: granted again, fenced above everything before.
    wait_until("the replica back in sync", Duration::from_secs(30), || {
        in_sync(&primary, &replica)
    });
    let again = lease_of(
        c.acquire(acquire("acks/b", 30_000))
            .await
            .unwrap()
            .into_inner(),
    );
    assert!(again.fencing_token > lease.fencing_token);
}

/// The undo of an unacknowledged grant that expired while WAIT waited:
/// the give-back finds nothing to give back and says so, instead of failing
/// (it was sent without the token's tombstone key, and the script's
/// already-released check then failed on the missing key, logged as "could
/// not undo an unacknowledged grant").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undoing_a_grant_that_expired_meanwhile_is_not_an_error() {
    let (primary, replica) = tokio::task::block_in_place(primary_and_replica);
    let prefix = unique_prefix();
    let server = tokio::task::block_in_place(|| serve(&primary.url(), &prefix, "1"));
    let mut c = client(&server).await;
    let pid = replica.pid().expect("running");
    signal(pid, "STOP");
    // WAIT gives up after 1.5 s; the 300 ms lease is gone by then.
    let status = c.acquire(acquire("acks/short", 300)).await.unwrap_err();
    signal(pid, "CONT");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // The call's own WARN comes after its undo's.
    server
        .output
        .wait_for("store error", Duration::from_secs(10));
    let failed: Vec<String> = server
        .output
        .all()
        .into_iter()
        .filter(|l| l.contains("could not undo"))
        .collect();
    assert!(failed.is_empty(), "{failed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_enough_replicas_nothing_is_granted_at_once() {
    let primary = tokio::task::block_in_place(RedisServer::start);
    let prefix = unique_prefix();
    let server = tokio::task::block_in_place(|| serve(&primary.url(), &prefix, "1"));
    let mut c = client(&server).await;
    let start = Instant::now();
    let status = c.acquire(acquire("acks/none", 30_000)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("replica(s) online"), "{status:?}");
    // Refused by the script itself, without waiting in WAIT.
    assert!(
        start.elapsed() < Duration::from_millis(400),
        "{:?}",
        start.elapsed()
    );
    let n = names(&prefix, "acks/none");
    assert_eq!(
        tokio::task::block_in_place(|| primary.cli(&["EXISTS", &n.lock, &n.fence])),
        "0",
        "nothing was written"
    );
    // Renew, Release and Describe do not wait for replicas.
    let d = c
        .describe(describe("acks/none"))
        .await
        .unwrap()
        .into_inner();
    assert!(!d.held);
}

/// A lease returned again by request id (a retry after a lost reply) is
/// answered only once a replica has it, like a fresh grant, though another
/// connection wrote it: WAIT counts its own connection's writes, so the
/// script rewrites the lease's token on that path. (Redis 7.0 also covers
/// it because a read-only EVALSHA advances the connection's WAIT offset;
/// the rewrite does not depend on that.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_returned_by_request_id_is_acknowledged_too() {
    let (primary, replica) = tokio::task::block_in_place(primary_and_replica);
    let prefix = unique_prefix();
    let (plain, acked) = tokio::task::block_in_place(|| {
        (
            serve(&primary.url(), &prefix, "0"),
            serve(&primary.url(), &prefix, "1"),
        )
    });
    let req = pb::AcquireRequest {
        key: "acks/rid".into(),
        ttl_ms: 30_000,
        request_id: "job-1".into(),
        ..Default::default()
    };
    // The acked server's connection has loaded the scripts and written
    // before (so the retry below brings no write of its own but the
    // script's).
    let mut a = client(&acked).await;
    let warm = lease_of(
        a.acquire(acquire("acks/warm", 30_000))
            .await
            .unwrap()
            .into_inner(),
    );
    assert!(
        a.release(release("acks/warm", &warm.token))
            .await
            .unwrap()
            .into_inner()
            .released
    );
    // A server without the flag grants while the replica is frozen: the
    // lease is on the primary only (as after a server crash between a
    // grant and its WAIT).
    let pid = replica.pid().expect("running");
    signal(pid, "STOP");
    let mut p = client(&plain).await;
    let lease = lease_of(p.acquire(req.clone()).await.unwrap().into_inner());
    // The retry with the same request id, on the server with the flag,
    // must not be answered until a replica has the lease.
    let status = a.acquire(req.clone()).await.unwrap_err();
    signal(pid, "CONT");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("acknowledged by 0 of 1"),
        "{status:?}"
    );
    // Not undone: it was not this call's grant, and its client may retry.
    let d = a.describe(describe("acks/rid")).await.unwrap().into_inner();
    assert!(d.held);
    assert_eq!(d.fencing_token, lease.fencing_token);
    // Once the replica has caught up, the retry gets the very same lease.
    wait_until("the replica back in sync", Duration::from_secs(30), || {
        in_sync(&primary, &replica)
    });
    let again = lease_of(a.acquire(req).await.unwrap().into_inner());
    assert_eq!(again.token, lease.token);
    assert_eq!(again.fencing_token, lease.fencing_token);
}

/// The Redis names of a lock, for looking at Redis directly.
fn names(prefix: &str, key: &str) -> leasehold::store::RedisNames {
    leasehold::store::RedisNames::of(
        prefix,
        &leasehold::lock::LockKey::parse(key, 512).expect("key"),
    )
}
