//! The conformance suite of documentation/semantics.md, run unchanged against the memory
//! store, a single redis-server and a 3-master/3-replica Redis Cluster,
//! through a real server over gRPC.

mod common;

use std::time::Duration;

use common::*;
use leasehold::pb;
use leasehold::pb::lock_service_client::LockServiceClient;
use prost::Message;
use tonic::Code;
use tonic::transport::Channel;

on_every_store!(
    acquire_grants_a_lease,
    conflict_is_not_an_error,
    release_frees_the_lock,
    renew_extends_and_keeps_the_granted_ttl,
    describe_never_reveals_the_token,
    leases_expire,
    wrong_token_changes_nothing,
    fencing_increases_across_expiry_and_counter_loss,
    fencing_follows_a_counter_ahead_of_the_clock,
    request_id_makes_acquire_idempotent,
    validation_errors_name_the_field,
    brace_and_unicode_keys,
);

async fn acquire_grants_a_lease(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.client().await;
    let lease = lease_of(
        c.acquire(acquire("job/a", 5_000))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(lease.key, "job/a");
    assert_eq!(lease.ttl_ms, 5_000);
    assert_eq!(lease.token.len(), 32);
    assert!(lease.token.chars().all(|c| c.is_ascii_hexdigit()));
    assert!(lease.fencing_token > 0);
    // ttl_ms = 0 is the server's default TTL (30 s).
    let lease = lease_of(c.acquire(acquire("job/b", 0)).await.unwrap().into_inner());
    assert_eq!(lease.ttl_ms, 30_000);
    let d = c.describe(describe("job/b")).await.unwrap().into_inner();
    assert!(d.held && d.ttl_ms > 25_000 && d.ttl_ms <= 30_000, "{d:?}");
}

async fn conflict_is_not_an_error(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.client().await;
    lease_of(
        c.acquire(acquire("busy", 10_000))
            .await
            .unwrap()
            .into_inner(),
    );
    let second = c
        .acquire(acquire("busy", 10_000))
        .await
        .unwrap()
        .into_inner();
    assert!(!second.acquired);
    assert!(second.lease.is_none());
    assert!(
        second.retry_after_ms >= 1 && second.retry_after_ms <= 10_000,
        "retry_after_ms = {}",
        second.retry_after_ms
    );
    assert!(
        second.retry_after_ms > 5_000,
        "holder's remaining TTL, got {}",
        second.retry_after_ms
    );
}

async fn release_frees_the_lock(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.client().await;
    let lease = lease_of(c.acquire(acquire("r", 10_000)).await.unwrap().into_inner());
    assert!(
        c.release(release("r", &lease.token))
            .await
            .unwrap()
            .into_inner()
            .released
    );
    assert!(!c.describe(describe("r")).await.unwrap().into_inner().held);
    // A second release with the same token (a retry whose first reply was
    // lost) answers what happened: released. It frees nothing else.
    assert!(
        c.release(release("r", &lease.token))
            .await
            .unwrap()
            .into_inner()
            .released
    );
    let again = lease_of(c.acquire(acquire("r", 10_000)).await.unwrap().into_inner());
    assert_ne!(again.token, lease.token);
    assert!(again.fencing_token > lease.fencing_token);
    // Retried once more after someone else took the lock: still "released",
    // and the new holder keeps it.
    assert!(
        c.release(release("r", &lease.token))
            .await
            .unwrap()
            .into_inner()
            .released
    );
    let d = c.describe(describe("r")).await.unwrap().into_inner();
    assert!(d.held && d.fencing_token == again.fencing_token);
    // However many grants and releases come in between.
    assert!(
        c.release(release("r", &again.token))
            .await
            .unwrap()
            .into_inner()
            .released
    );
    for _ in 0..3 {
        let next = lease_of(c.acquire(acquire("r", 10_000)).await.unwrap().into_inner());
        assert!(
            c.release(release("r", &next.token))
                .await
                .unwrap()
                .into_inner()
                .released
        );
    }
    assert!(
        c.release(release("r", &lease.token))
            .await
            .unwrap()
            .into_inner()
            .released
    );
    // A token that never held it is refused.
    assert!(
        !c.release(release("r", "never-held"))
            .await
            .unwrap()
            .into_inner()
            .released
    );
}

async fn renew_extends_and_keeps_the_granted_ttl(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.client().await;
    let lease = lease_of(c.acquire(acquire("n", 2_000)).await.unwrap().into_inner());
    let renew = |ttl_ms| pb::RenewRequest {
        key: "n".into(),
        token: lease.token.clone(),
        ttl_ms,
    };
    let r = c.renew(renew(20_000)).await.unwrap().into_inner();
    assert!(r.renewed);
    assert_eq!(r.ttl_ms, 20_000);
    let d = c.describe(describe("n")).await.unwrap().into_inner();
    assert!(d.ttl_ms > 15_000, "renewed TTL in force: {d:?}");
    // 0 = the TTL granted, which is now the most recent one set (20 s).
    let r = c.renew(renew(0)).await.unwrap().into_inner();
    assert!(r.renewed);
    assert_eq!(r.ttl_ms, 20_000);
    // Renew with a TTL outside the bounds is rejected.
    let err = c.renew(renew(50)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("ttl_ms"), "{}", err.message());
}

async fn describe_never_reveals_the_token(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.client().await;
    let req = pb::AcquireRequest {
        key: "d".into(),
        ttl_ms: 10_000,
        owner: "host-1 pid 42".into(),
        metadata: [
            ("job".to_string(), "nightly".to_string()),
            ("ü".to_string(), "∑".to_string()),
        ]
        .into(),
        ..Default::default()
    };
    let lease = lease_of(c.acquire(req).await.unwrap().into_inner());
    let d = c.describe(describe("d")).await.unwrap().into_inner();
    assert!(d.held);
    assert_eq!(d.owner, "host-1 pid 42");
    assert_eq!(d.fencing_token, lease.fencing_token);
    assert!(d.ttl_ms > 0 && d.ttl_ms <= 10_000);
    assert_eq!(d.metadata.get("job").map(String::as_str), Some("nightly"));
    assert_eq!(d.metadata.get("ü").map(String::as_str), Some("∑"));
    let bytes = d.encode_to_vec();
    assert!(
        !bytes
            .windows(lease.token.len())
            .any(|w| w == lease.token.as_bytes()),
        "Describe must never carry the token"
    );
    let free = c.describe(describe("nobody")).await.unwrap().into_inner();
    assert_eq!(free, pb::DescribeResponse::default());
}

async fn leases_expire(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.client().await;
    let first = lease_of(c.acquire(acquire("e", 200)).await.unwrap().into_inner());
    assert!(
        !c.acquire(acquire("e", 200))
            .await
            .unwrap()
            .into_inner()
            .acquired
    );
    // Expiry is the behaviour under test: wait past the TTL, with margin.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!c.describe(describe("e")).await.unwrap().into_inner().held);
    let second = lease_of(c.acquire(acquire("e", 5_000)).await.unwrap().into_inner());
    assert!(second.fencing_token > first.fencing_token);
    // The expired holder can neither renew nor release.
    let r = c
        .renew(pb::RenewRequest {
            key: "e".into(),
            token: first.token.clone(),
            ttl_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.renewed);
    assert!(
        !c.release(release("e", &first.token))
            .await
            .unwrap()
            .into_inner()
            .released
    );
    assert!(c.describe(describe("e")).await.unwrap().into_inner().held);
}

async fn wrong_token_changes_nothing(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.client().await;
    let lease = lease_of(c.acquire(acquire("w", 10_000)).await.unwrap().into_inner());
    let before = c.describe(describe("w")).await.unwrap().into_inner();
    let wrong = "0".repeat(32);
    assert!(
        !c.release(release("w", &wrong))
            .await
            .unwrap()
            .into_inner()
            .released
    );
    let r = c
        .renew(pb::RenewRequest {
            key: "w".into(),
            token: wrong.clone(),
            ttl_ms: 60_000,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.renewed);
    assert_eq!(r.ttl_ms, 0);
    let after = c.describe(describe("w")).await.unwrap().into_inner();
    assert!(after.held);
    assert_eq!(after.fencing_token, before.fencing_token);
    assert!(
        after.ttl_ms <= before.ttl_ms,
        "a wrong-token renew must not extend the TTL"
    );
    // The holder still holds it.
    assert!(
        c.release(release("w", &lease.token))
            .await
            .unwrap()
            .into_inner()
            .released
    );
}

async fn fencing_increases_across_expiry_and_counter_loss(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.client().await;
    let mut last = 0;
    for round in 0..6 {
        let lease = lease_of(c.acquire(acquire("f", 150)).await.unwrap().into_inner());
        assert!(
            lease.fencing_token > last,
            "round {round}: {} after {last}",
            lease.fencing_token
        );
        last = lease.fencing_token;
        match round % 3 {
            0 => assert!(
                c.release(release("f", &lease.token))
                    .await
                    .unwrap()
                    .into_inner()
                    .released
            ),
            // Let it expire instead of releasing it.
            1 => tokio::time::sleep(Duration::from_millis(350)).await,
            // Release it and lose the counter key as an eviction would.
            _ => {
                assert!(
                    c.release(release("f", &lease.token))
                        .await
                        .unwrap()
                        .into_inner()
                        .released
                );
                tokio::task::block_in_place(|| server.lose_fence_counter("f"));
            }
        }
    }
}

/// Acquires `key` and releases it again; the grant's fencing token.
async fn fence_of_a_grant(c: &mut LockServiceClient<Channel>, key: &str) -> u64 {
    let lease = lease_of(c.acquire(acquire(key, 10_000)).await.unwrap().into_inner());
    let released = c.release(release(key, &lease.token)).await.unwrap();
    assert!(released.into_inner().released, "{key}");
    lease.fencing_token
}

async fn fencing_follows_a_counter_ahead_of_the_clock(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.client().await;
    let first = fence_of_a_grant(&mut c, "ahead").await;
    // About 11.6 days ahead of Redis TIME in microseconds.
    let ahead = first + 1_000_000_000_000;
    let set = tokio::task::block_in_place(|| server.set_fence_counter("ahead", ahead));
    let mut last = if set { ahead } else { first };
    for round in 0..3 {
        let fence = fence_of_a_grant(&mut c, "ahead").await;
        if set {
            assert_eq!(fence, last + 1, "round {round}: counter + 1");
        } else {
            assert!(fence > last, "round {round}");
        }
        last = fence;
    }
}

async fn request_id_makes_acquire_idempotent(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.client().await;
    let req = || pb::AcquireRequest {
        key: "idem".into(),
        ttl_ms: 10_000,
        request_id: "req-7".into(),
        ..Default::default()
    };
    let first = lease_of(c.acquire(req()).await.unwrap().into_inner());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let retry = lease_of(c.acquire(req()).await.unwrap().into_inner());
    assert_eq!(
        pb::Lease {
            valid_for_ms: 0,
            ..retry.clone()
        },
        pb::Lease {
            valid_for_ms: 0,
            ..first.clone()
        },
        "a retry returns the same lease unchanged"
    );
    // ...and says how much of it is left, not the whole TTL again.
    assert!(first.valid_for_ms >= 10_000, "{}", first.valid_for_ms);
    assert!(
        retry.valid_for_ms < 9_900,
        "a replay must not promise the whole TTL: {}",
        retry.valid_for_ms
    );
    let d = c.describe(describe("idem")).await.unwrap().into_inner();
    assert!(
        d.ttl_ms < 9_900,
        "a retry must not extend the lease: {}",
        d.ttl_ms
    );
    // Another request id is contention.
    let other = pb::AcquireRequest {
        request_id: "req-8".into(),
        ..req()
    };
    assert!(!c.acquire(other).await.unwrap().into_inner().acquired);
    // Once released, the same request id is a fresh Acquire.
    assert!(
        c.release(release("idem", &first.token))
            .await
            .unwrap()
            .into_inner()
            .released
    );
    let fresh = lease_of(c.acquire(req()).await.unwrap().into_inner());
    assert_ne!(fresh.token, first.token);
    assert!(fresh.fencing_token > first.fencing_token);
}

#[track_caller]
fn assert_invalid(result: Result<impl std::fmt::Debug, tonic::Status>, field: &str) {
    let err = result.expect_err("expected INVALID_ARGUMENT");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().starts_with(field),
        "message should name {field}: {}",
        err.message()
    );
}

async fn validation_errors_name_the_field(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.client().await;
    let base = || acquire("v", 1_000);
    for (key, why) in [
        ("", "empty"),
        ("a\nb", "C0"),
        ("a\u{7f}", "DEL"),
        ("a\u{85}", "C1"),
    ] {
        let r = c
            .acquire(pb::AcquireRequest {
                key: key.into(),
                ..base()
            })
            .await;
        assert_invalid(r, "key");
        let _ = why;
    }
    assert_invalid(
        c.acquire(pb::AcquireRequest {
            key: "k".repeat(513),
            ..base()
        })
        .await,
        "key",
    );
    assert!(
        c.acquire(pb::AcquireRequest {
            key: "k".repeat(512),
            ..base()
        })
        .await
        .is_ok()
    );
    assert_invalid(
        c.acquire(pb::AcquireRequest {
            ttl_ms: 99,
            ..base()
        })
        .await,
        "ttl_ms",
    );
    assert_invalid(
        c.acquire(pb::AcquireRequest {
            ttl_ms: 3_600_001,
            ..base()
        })
        .await,
        "ttl_ms",
    );
    let err = c
        .acquire(pb::AcquireRequest {
            ttl_ms: 99,
            ..base()
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("100") && err.message().contains("3600000"),
        "names the bounds: {}",
        err.message()
    );
    assert_invalid(
        c.acquire(pb::AcquireRequest {
            wait_ms: 300_001,
            ..base()
        })
        .await,
        "wait_ms",
    );
    assert_invalid(
        c.acquire(pb::AcquireRequest {
            owner: "o".repeat(257),
            ..base()
        })
        .await,
        "owner",
    );
    let many = (0..17).map(|i| (format!("k{i}"), String::new())).collect();
    assert_invalid(
        c.acquire(pb::AcquireRequest {
            metadata: many,
            ..base()
        })
        .await,
        "metadata",
    );
    let big = [("k".to_string(), "v".repeat(4096))].into();
    assert_invalid(
        c.acquire(pb::AcquireRequest {
            metadata: big,
            ..base()
        })
        .await,
        "metadata",
    );
    assert_invalid(
        c.acquire(pb::AcquireRequest {
            request_id: "r".repeat(129),
            ..base()
        })
        .await,
        "request_id",
    );
    assert_invalid(c.release(release("v", "")).await, "token");
    assert_invalid(c.release(release("", "x")).await, "key");
    assert_invalid(
        c.renew(pb::RenewRequest {
            key: "v".into(),
            token: String::new(),
            ttl_ms: 0,
        })
        .await,
        "token",
    );
    assert_invalid(c.describe(describe("")).await, "key");
    assert_invalid(c.describe(describe("x\u{0}")).await, "key");
    // Nothing was taken by the rejected calls.
    assert!(!c.describe(describe("v")).await.unwrap().into_inner().held);
}

async fn brace_and_unicode_keys(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.client().await;
    let keys = [
        "{",
        "}",
        "{}",
        "a{b}c",
        "}{x",
        "{a}",
        "%7Ba%7D",
        "%",
        "ünïcødé/κλειδί",
        "😀 lock",
        "a b\tc",
    ];
    let keys: Vec<&str> = keys.into_iter().filter(|k| !k.contains('\t')).collect();
    let mut leases = Vec::new();
    for key in &keys {
        let lease = lease_of(c.acquire(acquire(key, 10_000)).await.unwrap().into_inner());
        assert_eq!(lease.key, *key);
        leases.push(lease);
    }
    // Distinct keys never collide, however they escape.
    for key in &keys {
        let d = c.describe(describe(key)).await.unwrap().into_inner();
        assert!(d.held, "{key:?}");
    }
    for (key, lease) in keys.iter().zip(&leases) {
        assert!(
            c.release(release(key, &lease.token))
                .await
                .unwrap()
                .into_inner()
                .released,
            "{key:?}"
        );
        assert!(!c.describe(describe(key)).await.unwrap().into_inner().held);
    }
    if backend == Backend::Cluster {
        // Every Redis key and the channel of one lock share one hash slot.
        tokio::task::block_in_place(|| {
            for key in &keys {
                let n = server.names(key);
                let slot = |name: &str| shared_cluster().cli(&["CLUSTER", "KEYSLOT", name]);
                let lock_slot = slot(&n.lock);
                assert_eq!(slot(&n.fence), lock_slot, "{key:?}");
                assert_eq!(slot(&n.channel), lock_slot, "{key:?}");
            }
        });
    }
}
