//! The AdminService against real servers, on the memory store, one
//! redis-server and the 3-primary Redis Cluster: List pages through every
//! held lock (on the Cluster, every primary), filters by key prefix and by
//! the caller's scopes, never shows a token; ForceRelease takes a lock so
//! that its holder's KeepAlive answers `alive = false`, its Renew and
//! Release fail, its waiters are granted and the next grant is fenced
//! higher. Non-admin callers get PERMISSION_DENIED, and without an auth
//! file the service exists only under `--admin`.

mod common;

use common::admin as admin_common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use admin_common::*;
use common::*;
use leasehold::pb;
use leasehold::pb::admin_service_client::AdminServiceClient;
use tonic::Code;
use tonic::transport::Channel;

on_every_store!(
    list_pages_through_a_thousand_locks,
    list_filters_by_prefix_and_skips_free_locks,
    force_release_takes_the_lock_from_its_holder,
    force_release_takes_every_shared_holder,
    admin_requests_are_validated,
);

/// Every lock under `prefix`, a page of `page_size` at a time, and how
/// many pages that took.
async fn list_all(
    a: &mut AdminServiceClient<Channel>,
    prefix: &str,
    page_size: u32,
) -> (Vec<pb::LockInfo>, usize) {
    let mut locks = Vec::new();
    let mut token = String::new();
    for pages in 1..=10_000 {
        let page = a
            .list(list_req(prefix, page_size, &token))
            .await
            .expect("list")
            .into_inner();
        locks.extend(page.locks);
        if page.next_page_token.is_empty() {
            return (locks, pages);
        }
        token = page.next_page_token;
    }
    panic!("the listing of {prefix:?} did not end within 10 000 pages");
}

fn keys_of(locks: &[pb::LockInfo]) -> Vec<String> {
    locks.iter().map(|l| l.key.clone()).collect()
}

async fn list_pages_through_a_thousand_locks(backend: Backend) {
    let server = admin_server(backend).await;
    let mut c = server.client().await;
    let mut a = admin_client(&server).await;
    let mut expected = BTreeSet::new();
    for i in 0..1000 {
        let key = format!("many/{i:04}");
        let mut req = acquire(&key, 60_000);
        req.owner = format!("worker-{i}");
        lease_of(c.acquire(req).await.expect("acquire").into_inner());
        expected.insert(key);
    }
    let (locks, pages) = list_all(&mut a, "many/", 100).await;
    let listed: BTreeSet<String> = keys_of(&locks).into_iter().collect();
    assert_eq!(locks.len(), 1000, "every lock once, none twice");
    assert_eq!(listed, expected);
    assert!(pages >= 10, "1000 locks in pages of 100 took {pages} pages");
    for lock in &locks {
        let state = lock.state.as_ref().expect("state");
        let i: usize = lock.key["many/".len()..].parse().expect("index");
        assert!(state.held, "{lock:?}");
        assert_eq!(state.owner, format!("worker-{i}"));
        assert!(state.fencing_token > 0 && state.ttl_ms > 0 && state.ttl_ms <= 60_000);
        assert_eq!(state.holders.len(), 1);
    }
    if backend == Backend::Cluster {
        // The keys really are spread over the three primaries, so the
        // listing above covered every one of them.
        let pattern = format!("{}{{many/*}}:lock", server.prefix);
        let per_primary = tokio::task::spawn_blocking(move || {
            shared_cluster()
                .nodes
                .iter()
                .filter(|n| n.cli(&["role"]).starts_with("master"))
                .map(|n| {
                    let out = n.cli(&["scan", "0", "match", &pattern, "count", "100000"]);
                    out.lines().count().saturating_sub(1)
                })
                .collect::<Vec<usize>>()
        })
        .await
        .expect("scan primaries");
        assert_eq!(per_primary.len(), 3, "{per_primary:?}");
        assert!(per_primary.iter().all(|&n| n > 100), "{per_primary:?}");
        assert_eq!(per_primary.iter().sum::<usize>(), 1000, "{per_primary:?}");
    }
}

async fn list_filters_by_prefix_and_skips_free_locks(backend: Backend) {
    let server = admin_server(backend).await;
    let mut c = server.client().await;
    let mut a = admin_client(&server).await;
    for key in ["a/1", "a/2", "ab/1", "b/1", "a/{x}*", "a/%7B"] {
        lease_of(
            c.acquire(acquire(key, 30_000))
                .await
                .expect("acquire")
                .into_inner(),
        );
    }
    let gone = lease_of(
        c.acquire(acquire("a/gone", 30_000))
            .await
            .expect("acquire")
            .into_inner(),
    );
    assert!(
        c.release(release("a/gone", &gone.token))
            .await
            .expect("release")
            .into_inner()
            .released
    );

    let sorted = |locks: Vec<pb::LockInfo>| {
        let mut keys = keys_of(&locks);
        keys.sort();
        keys
    };
    let (locks, _) = list_all(&mut a, "a/", 2).await;
    assert_eq!(sorted(locks), ["a/%7B", "a/1", "a/2", "a/{x}*"]);
    let (locks, _) = list_all(&mut a, "a", 100).await;
    assert_eq!(sorted(locks), ["a/%7B", "a/1", "a/2", "a/{x}*", "ab/1"]);
    let (locks, _) = list_all(&mut a, "a/{", 100).await;
    assert_eq!(sorted(locks), ["a/{x}*"]);
    // Glob characters in the prefix are literal.
    let (locks, _) = list_all(&mut a, "a/*", 100).await;
    assert!(locks.is_empty(), "{locks:?}");
    let (locks, _) = list_all(&mut a, "", 100).await;
    assert_eq!(locks.len(), 6, "{:?}", keys_of(&locks));
    // The reply never carries a token: DescribeResponse has no such field,
    // and no token appears anywhere in its bytes.
    let bytes = format!("{locks:?}");
    assert!(!bytes.contains(&gone.token));
}

async fn force_release_takes_the_lock_from_its_holder(backend: Backend) {
    let server = admin_server(backend).await;
    let mut c = server.client().await;
    let mut a = admin_client(&server).await;
    let lease = lease_of(
        c.acquire(acquire("stuck", 30_000))
            .await
            .expect("acquire")
            .into_inner(),
    );
    let mut ka = KeepAliveSession::open(&mut c).await.expect("keepalive");
    assert!(ka.renew("stuck", &lease.token, 30_000).await.alive);

    // A waiter that would otherwise wait out the 30 s TTL.
    let waiter = {
        let mut c = server.client().await;
        tokio::spawn(async move {
            let start = Instant::now();
            let resp = c.acquire(acquire_wait("stuck", 30_000, 20_000)).await;
            (resp, start.elapsed())
        })
    };
    wait_until_async("the waiter is queued", Duration::from_secs(10), || {
        let waiters = server.waiters.clone();
        async move { !waiters.is_empty() }
    })
    .await;

    let released = a
        .force_release(force("stuck", "deploy 4711 hangs on it"))
        .await
        .expect("force release")
        .into_inner()
        .released;
    assert_eq!(released, 1);

    let (resp, waited) = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter ends")
        .expect("join");
    let next = lease_of(resp.expect("waiter's acquire").into_inner());
    assert!(waited < Duration::from_secs(5), "waited {waited:?}");
    assert!(
        next.fencing_token > lease.fencing_token,
        "{} then {}",
        lease.fencing_token,
        next.fencing_token
    );

    // The old holder finds out at its next renewal, whatever the path.
    let renewed = ka.renew("stuck", &lease.token, 30_000).await;
    assert!(!renewed.alive, "{renewed:?}");
    let renew = c
        .renew(pb::RenewRequest {
            key: "stuck".into(),
            token: lease.token.clone(),
            ttl_ms: 0,
        })
        .await
        .expect("renew")
        .into_inner();
    assert!(!renew.renewed);
    assert!(
        !c.release(release("stuck", &lease.token))
            .await
            .expect("release")
            .into_inner()
            .released
    );
    let d = c
        .describe(describe("stuck"))
        .await
        .expect("describe")
        .into_inner();
    assert!(d.held && d.fencing_token == next.fencing_token, "{d:?}");

    // Nobody holds a free key: nothing removed.
    assert!(
        c.release(release("stuck", &next.token))
            .await
            .expect("release")
            .into_inner()
            .released
    );
    let released = a
        .force_release(force("stuck", "again"))
        .await
        .expect("force release")
        .into_inner()
        .released;
    assert_eq!(released, 0);
    let again = lease_of(
        c.acquire(acquire("stuck", 30_000))
            .await
            .expect("acquire")
            .into_inner(),
    );
    assert!(again.fencing_token > next.fencing_token);
}

async fn admin_requests_are_validated(backend: Backend) {
    let server = admin_server(backend).await;
    let mut a = admin_client(&server).await;
    let cases: Vec<(pb::ForceReleaseRequest, &str)> = vec![
        (force("", "why"), "key"),
        (force("k", ""), "reason"),
        (force("k", "   "), "reason"),
        (force("k", &"x".repeat(513)), "reason"),
        (force("k", "two\nlines"), "reason"),
        (force(&"k".repeat(513), "why"), "key"),
    ];
    for (req, field) in cases {
        let status = a.force_release(req.clone()).await.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{req:?}: {status:?}");
        assert!(status.message().contains(field), "{req:?}: {status:?}");
    }
    let lists = vec![
        (list_req(&"p".repeat(513), 0, ""), "prefix"),
        (list_req("p", 1001, ""), "page_size"),
        (list_req("p", 10, "not-a-token"), "page_token"),
        (list_req("p", 10, &"9".repeat(200)), "page_token"),
        (list_req("a\u{7}", 10, ""), "prefix"),
    ];
    for (req, field) in lists {
        let status = a.list(req.clone()).await.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{req:?}: {status:?}");
        assert!(status.message().contains(field), "{req:?}: {status:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_admins_list_and_force_release_and_only_in_scope() {
    let server = auth_server().await;
    let mut c = server.client().await;
    let mut a = admin_client(&server).await;
    for key in ["team-a/1", "team-b/1"] {
        let resp = c
            .acquire(req(acquire(key, 30_000), OPS))
            .await
            .expect("acquire");
        lease_of(resp.into_inner());
    }

    for token in [USER] {
        let status = a
            .list(req(list_req("", 0, ""), token))
            .await
            .expect_err("denied");
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains("admin"), "{status:?}");
        let status = a
            .force_release(req(force("team-a/1", "mine"), token))
            .await
            .expect_err("denied");
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    }
    let status = a.list(list_req("", 0, "")).await.expect_err("no token");
    assert_eq!(status.code(), Code::Unauthenticated);

    let all = a
        .list(req(list_req("", 0, ""), OPS))
        .await
        .expect("list")
        .into_inner();
    let mut keys = keys_of(&all.locks);
    keys.sort();
    assert_eq!(keys, ["team-a/1", "team-b/1"]);
    // An admin scoped to team-a/ never sees another tenant's keys.
    let scoped = a
        .list(req(list_req("", 0, ""), OPS_A))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(keys_of(&scoped.locks), ["team-a/1"]);
    // Narrowed to its prefix, or nothing to scan at all.
    for (prefix, expected) in [("team", vec!["team-a/1"]), ("team-b/", vec![])] {
        let page = a
            .list(req(list_req(prefix, 0, ""), OPS_A))
            .await
            .expect("list");
        assert_eq!(keys_of(&page.into_inner().locks), expected, "{prefix}");
    }
    let status = a
        .force_release(req(force("team-b/1", "not mine"), OPS_A))
        .await
        .expect_err("out of scope");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        c.describe(req(describe("team-b/1"), OPS))
            .await
            .expect("describe")
            .into_inner()
            .held
    );
    let released = a
        .force_release(req(force("team-a/1", "stuck deploy"), OPS_A))
        .await
        .expect("force release")
        .into_inner()
        .released;
    assert_eq!(released, 1);
    assert!(
        !c.describe(req(describe("team-a/1"), OPS))
            .await
            .expect("describe")
            .into_inner()
            .held
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_auth_the_admin_service_needs_the_admin_flag() {
    let server = TestServer::start(Backend::Memory).await;
    let mut a = admin_client(&server).await;
    let status = a.list(list_req("", 0, "")).await.expect_err("not served");
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    let status = a
        .force_release(force("k", "why"))
        .await
        .expect_err("not served");
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
}

/// A lock held SHARED (a semaphore's permits) is taken from every holder:
/// none of them can renew or release it afterwards, and an exclusive
/// Acquire gets it at once with a higher fencing token. (A forced release
/// that removed only the record's exclusive fields would leave the shared
/// holders renewing beside a new exclusive holder.)
async fn force_release_takes_every_shared_holder(backend: Backend) {
    let server = admin_server(backend).await;
    let mut c = server.client().await;
    let mut a = admin_client(&server).await;
    let shared = |owner: &str| pb::AcquireRequest {
        key: "permits".into(),
        ttl_ms: 30_000,
        owner: owner.into(),
        mode: pb::LockMode::Shared.into(),
        shared_limit: 2,
        ..Default::default()
    };
    let mut leases = Vec::new();
    for owner in ["one", "two"] {
        let reply = c
            .acquire(shared(owner))
            .await
            .expect("acquire")
            .into_inner();
        assert!(reply.acquired, "{owner}");
        leases.push(lease_of(reply));
    }
    let released = a
        .force_release(force("permits", "semaphore stuck"))
        .await
        .expect("force release")
        .into_inner()
        .released;
    assert_eq!(released, 2, "both holders removed");
    assert!(
        !c.describe(describe("permits"))
            .await
            .expect("describe")
            .into_inner()
            .held
    );
    let mut exclusive = c
        .acquire(acquire("permits", 30_000))
        .await
        .expect("acquire")
        .into_inner();
    assert!(
        exclusive.acquired,
        "the lock is free for an exclusive holder"
    );
    let writer = exclusive.lease.take().expect("lease");
    for lease in &leases {
        let renew = pb::RenewRequest {
            key: "permits".into(),
            token: lease.token.clone(),
            ttl_ms: 0,
        };
        let renewed = c.renew(renew).await.expect("renew").into_inner().renewed;
        assert!(!renewed, "a forced shared holder cannot renew");
        let released = c
            .release(release("permits", &lease.token))
            .await
            .expect("release")
            .into_inner()
            .released;
        assert!(!released, "a forced shared holder cannot release");
        assert!(writer.fencing_token > lease.fencing_token);
    }
    let state = c
        .describe(describe("permits"))
        .await
        .expect("describe")
        .into_inner();
    assert!(
        state.held && state.fencing_token == writer.fencing_token,
        "{state:?}"
    );
    // The forced holders left nothing behind: after the writer, the
    // semaphore's two permits are free again.
    assert!(
        c.release(release("permits", &writer.token))
            .await
            .expect("release")
            .into_inner()
            .released
    );
    for owner in ["three", "four"] {
        let reply = c
            .acquire(shared(owner))
            .await
            .expect("acquire")
            .into_inner();
        assert!(reply.acquired, "{owner}: {reply:?}");
    }
}
