//! Batching on a single Redis node (`--redis-batch`, src/store/redis/batch.rs):
//! concurrent Acquire, Renew and Release calls that queue behind each other
//! share script calls, and each still gets exactly the answer it would get
//! alone — two Acquires of one key in one batch grant it once, wrong tokens
//! change nothing. `--redis-batch 1` sends every call alone.

mod common;

use std::collections::{HashMap, HashSet};

use common::*;
use futures_util::future::join_all;
use leasehold::pb;
use leasehold::pb::lock_service_client::LockServiceClient;
use tonic::transport::Channel;

const KEYS: usize = 100;

/// `EVALSHA` calls Redis has run so far.
fn evalsha_calls(redis: &RedisServer) -> u64 {
    let stats = redis.cli(&["INFO", "commandstats"]);
    stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Bursts of concurrent calls over four connections: two Acquires per key,
/// then a Renew and a wrong-token Release per key, then the real
/// Releases. Checks every answer; returns how many calls it made.
async fn bursts(endpoint: &str) -> u64 {
    let mut clients = Vec::new();
    for _ in 0..4 {
        let channel = Channel::from_shared(endpoint.to_string())
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        clients.push(LockServiceClient::new(channel));
    }
    let client = |i: usize| clients[i % clients.len()].clone();
    let key = |i: usize| format!("batch/{}", i % KEYS);

    let acquires = join_all((0..2 * KEYS).map(|i| {
        let mut c = client(i);
        async move {
            let resp = c.acquire(acquire(&key(i), 60_000)).await;
            (key(i), resp.expect("acquire answered").into_inner())
        }
    }))
    .await;
    let mut held: HashMap<String, pb::Lease> = HashMap::new();
    for (key, resp) in acquires {
        if resp.acquired {
            let lease = lease_of(resp);
            assert!(
                held.insert(key.clone(), lease).is_none(),
                "{key} granted twice"
            );
        } else {
            assert!(resp.lease.is_none());
            assert!(resp.retry_after_ms >= 1, "{resp:?}");
        }
    }
    assert_eq!(held.len(), KEYS, "every key granted exactly once");
    let fences: HashSet<u64> = held.values().map(|l| l.fencing_token).collect();
    assert_eq!(fences.len(), KEYS);
    assert!(!fences.contains(&0));

    let leases: Vec<pb::Lease> = held.into_values().collect();
    let renewed = join_all(leases.iter().enumerate().map(|(i, lease)| {
        let mut c = client(i);
        let req = pb::RenewRequest {
            key: lease.key.clone(),
            token: lease.token.clone(),
            ttl_ms: 30_000,
        };
        async move { c.renew(req).await.expect("renew answered").into_inner() }
    }));
    let wrong = join_all(leases.iter().enumerate().map(|(i, lease)| {
        let mut c = client(i + 1);
        let req = release(&lease.key, "not-the-token");
        async move { c.release(req).await.expect("release answered").into_inner() }
    }));
    let (renewed, wrong) = tokio::join!(renewed, wrong);
    for r in &renewed {
        assert!(r.renewed, "{r:?}");
        assert_eq!(r.ttl_ms, 30_000);
    }
    assert!(wrong.iter().all(|r| !r.released), "a wrong token released");

    let released = join_all(leases.iter().enumerate().map(|(i, lease)| {
        let mut c = client(i);
        let req = release(&lease.key, &lease.token);
        async move { c.release(req).await.expect("release answered").into_inner() }
    }))
    .await;
    assert!(released.iter().all(|r| r.released));
    let mut c = client(0);
    for i in 0..KEYS {
        let d = c.describe(describe(&key(i))).await.expect("describe");
        assert!(!d.into_inner().held, "{} still held", key(i));
    }
    (2 * KEYS + 3 * KEYS) as u64
}

/// Runs [`bursts`] against a server with `--redis-batch batch` on a Redis
/// of its own: (calls made, script calls Redis ran for them).
async fn script_calls_with(batch: &str) -> (u64, u64) {
    let redis = tokio::task::block_in_place(RedisServer::start);
    let server = ServerProcess::start(&[
        "--redis-url",
        &redis.url(),
        "--pool-size",
        "2",
        "--redis-batch",
        batch,
    ]);
    let before = evalsha_calls(&redis);
    let calls = bursts(&server.endpoint()).await;
    (calls, evalsha_calls(&redis) - before)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_calls_share_script_calls_and_keep_their_own_answers() {
    let (calls, scripts) = script_calls_with("64").await;
    assert!(
        scripts < calls,
        "{calls} concurrent calls ran as {scripts} script calls: nothing was batched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_of_one_sends_every_call_alone() {
    let (calls, scripts) = script_calls_with("1").await;
    // Describe runs a script too; NOSCRIPT retries add a few more.
    assert!(
        scripts >= calls,
        "{calls} calls ran as only {scripts} script calls with --redis-batch 1"
    );
}
