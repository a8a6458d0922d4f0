//! Per-caller shares of one server (documentation/security.md, "Limits"):
//! one tenant (or, without an auth file, one connection) at its quota of
//! waiting Acquires, KeepAlive streams or attached locks gets
//! RESOURCE_EXHAUSTED naming the quota, and every other caller is served as
//! before. A credential revoked while its Acquire waits ends that wait and
//! is granted nothing. Each flood is bounded (a few dozen calls).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use leasehold::auth::{Authenticator, Policy};
use leasehold::pb;
use leasehold::pb::lock_service_client::LockServiceClient;
use leasehold::server::ServerConfig;
use leasehold::service::quota::QuotaLimits;
use tonic::transport::Channel;
use tonic::{Code, Request};

const TOKEN_A: &str = "team-a-token-1f9e8d7c6b5a";
const TOKEN_B: &str = "team-b-token-0a1b2c3d4e5f";

fn policy(with_a: bool) -> String {
    let a = format!(
        "[[tenant]]\nname = \"team-a\"\nprefixes = [\"shared/\"]\ntokens = [\"{TOKEN_A}\"]\n\n"
    );
    let b = format!(
        "[[tenant]]\nname = \"team-b\"\nprefixes = [\"shared/\"]\ntokens = [\"{TOKEN_B}\"]\n"
    );
    if with_a { a + &b } else { b }
}

fn limits(waiters: usize, streams: usize, locks: usize) -> ServerConfig {
    let mut config = test_config();
    config.limits.per_caller = QuotaLimits {
        waiters,
        streams,
        locks,
        ..QuotaLimits::default()
    };
    config
}

fn as_tenant<T>(token: &str, message: T) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

/// `n` waiting Acquires of `key` by `token`, each until it is dropped.
async fn fill_waiters(
    c: &LockServiceClient<Channel>,
    server: &TestServer,
    token: &'static str,
    key: &'static str,
    n: usize,
) -> Vec<tokio::task::JoinHandle<()>> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let mut c = c.clone();
            tokio::spawn(async move {
                let _ = c
                    .acquire(as_tenant(token, acquire_wait(key, 5_000, 60_000)))
                    .await;
            })
        })
        .collect();
    wait_until("the waiters to queue", Duration::from_secs(10), || {
        server.waiters.len() >= n
    });
    tasks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenant_at_its_waiter_quota_leaves_others_served() {
    let mut config = limits(20, 100, 1_000);
    config.auth = Some(Arc::new(Authenticator::new(
        Policy::parse(&policy(true)).unwrap(),
        false,
    )));
    let server = TestServer::start_with(Backend::Memory, config).await;
    let mut c = server.client().await;
    let held = c
        .acquire(as_tenant(TOKEN_A, acquire("shared/busy", 60_000)))
        .await
        .unwrap()
        .into_inner();
    assert!(held.acquired);
    let tasks = fill_waiters(&c, &server, TOKEN_A, "shared/busy", 20).await;

    // team-a is at its quota: one more waiting Acquire of a held lock is
    // refused, naming the quota...
    let err = c
        .acquire(as_tenant(
            TOKEN_A,
            acquire_wait("shared/busy", 5_000, 10_000),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().contains("--max-waiters-per-caller 20"),
        "{err:?}"
    );
    assert!(err.message().contains("team-a"), "{err:?}");
    // ...but a free lock is still granted to it at once.
    let free = c
        .acquire(as_tenant(
            TOKEN_A,
            acquire_wait("shared/free-a", 5_000, 10_000),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(free.acquired);

    // team-b is not affected: a free key is granted, a held one waits.
    let granted = c
        .acquire(as_tenant(
            TOKEN_B,
            acquire_wait("shared/free-b", 5_000, 10_000),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(granted.acquired);
    let mut waiting = Request::new(acquire_wait("shared/busy", 5_000, 300));
    waiting.metadata_mut().insert(
        "authorization",
        format!("Bearer {TOKEN_B}").parse().unwrap(),
    );
    let reply = c.acquire(waiting).await.unwrap().into_inner();
    assert!(!reply.acquired, "it waited and timed out as a waiter does");
    for task in tasks {
        task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_auth_the_quotas_are_per_connection() {
    let server = TestServer::start_with(Backend::Memory, limits(5, 2, 3)).await;
    let mut one = server.client().await;
    let other = server.client().await;
    let lease = lease_of(
        one.acquire(acquire("conn", 60_000))
            .await
            .unwrap()
            .into_inner(),
    );
    let tasks = fill_waiters(&one, &server, "unused", "conn", 5).await;
    let err = one
        .acquire(acquire_wait("conn", 5_000, 10_000))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("this connection"), "{err:?}");
    // Another connection may still wait.
    let reply = other
        .clone()
        .acquire(acquire_wait("conn", 5_000, 200))
        .await
        .unwrap()
        .into_inner();
    assert!(!reply.acquired);
    for task in tasks {
        task.abort();
    }

    // Streams: two per connection; a third is refused.
    let mut s1 = KeepAliveSession::open(&mut one).await.unwrap();
    let _s2 = KeepAliveSession::open(&mut one).await.unwrap();
    let err = match KeepAliveSession::open(&mut one).await {
        Ok(mut s3) => s3.next().await.unwrap_err(),
        Err(e) => e,
    };
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("--max-streams-per-caller 2"),
        "{err:?}"
    );

    // Locks: three per connection over all its streams; the fourth ends
    // the stream that asked, releasing nothing.
    let mut tokens = vec![("conn".to_string(), lease.token.clone())];
    for key in ["l1", "l2", "l3"] {
        let l = lease_of(
            one.acquire(acquire(key, 60_000))
                .await
                .unwrap()
                .into_inner(),
        );
        tokens.push((key.to_string(), l.token));
    }
    for (key, token) in &tokens[..3] {
        assert!(s1.renew(key, token, 0).await.alive);
    }
    s1.push(&tokens[3].0, &tokens[3].1, 0, false).await;
    let err = s1.next().await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("--max-locks-per-caller 3"),
        "{err:?}"
    );
    let mut d = other.clone();
    for (key, _) in &tokens {
        assert!(d.describe(describe(key)).await.unwrap().into_inner().held);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_credential_ends_its_wait_and_is_granted_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("auth.toml");
    std::fs::write(&file, policy(true)).unwrap();
    let auth = Arc::new(Authenticator::from_file(&file, false).unwrap());
    let mut config = test_config();
    config.auth = Some(auth.clone());
    let server = TestServer::start_with(Backend::Memory, config).await;
    let mut c = server.client().await;
    let holder = lease_of(
        c.acquire(as_tenant(TOKEN_B, acquire("shared/revoked", 60_000)))
            .await
            .unwrap()
            .into_inner(),
    );
    let waiter = tokio::spawn({
        let mut c = c.clone();
        async move {
            c.acquire(as_tenant(
                TOKEN_A,
                pb::AcquireRequest {
                    owner: "team-a".into(),
                    ..acquire_wait("shared/revoked", 60_000, 30_000)
                },
            ))
            .await
        }
    });
    wait_until("the waiter to queue", Duration::from_secs(5), || {
        server.waiters.has_waiters("shared/revoked")
    });
    // team-a's token is removed (the SIGHUP reload), then the lock is
    // released: nothing may be handed to the revoked waiter.
    std::fs::write(&file, policy(false)).unwrap();
    auth.reload().unwrap();
    let released = c
        .release(as_tenant(TOKEN_B, release("shared/revoked", &holder.token)))
        .await
        .unwrap()
        .into_inner();
    assert!(released.released);
    let ended = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the revoked wait ends within its next retry")
        .unwrap();
    let err = ended.expect_err("a revoked caller is granted nothing");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let d = c
        .describe(as_tenant(TOKEN_B, describe("shared/revoked")))
        .await
        .unwrap()
        .into_inner();
    assert!(!d.held, "held by {:?}", d.owner);
}

/// `[tenant.quotas]` in the auth file: a tenant's own waiter quota and
/// Acquire rate, instead of the server's defaults; other tenants keep the
/// defaults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_own_quotas_come_from_the_auth_file() {
    let text = format!(
        "[[tenant]]\nname = \"team-a\"\nprefixes = [\"shared/\"]\ntokens = [\"{TOKEN_A}\"]\n\
         [tenant.quotas]\nwaiters = 3\nacquires_per_second = 20\n\n{}",
        policy(false)
    );
    let mut config = limits(100, 100, 1_000);
    config.auth = Some(Arc::new(Authenticator::new(
        Policy::parse(&text).unwrap(),
        false,
    )));
    let server = TestServer::start_with(Backend::Memory, config).await;
    let mut c = server.client().await;
    let held = c
        .acquire(as_tenant(TOKEN_B, acquire("shared/own", 60_000)))
        .await
        .unwrap()
        .into_inner();
    assert!(held.acquired);
    let tasks = fill_waiters(&c, &server, TOKEN_A, "shared/own", 3).await;
    let err = c
        .acquire(as_tenant(
            TOKEN_A,
            acquire_wait("shared/own", 5_000, 10_000),
        ))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("--max-waiters-per-caller 3"),
        "{err:?}"
    );
    for task in tasks {
        task.abort();
    }

    // 40 Acquires at once against a rate of 20 a second: at most the burst
    // (20, plus what refills meanwhile) get through, the rest are refused
    // naming the quota; team-b is not slowed.
    let calls = (0..40).map(|i| {
        let mut c = c.clone();
        async move {
            c.acquire(as_tenant(
                TOKEN_A,
                acquire(&format!("shared/rate-{i}"), 1_000),
            ))
            .await
        }
    });
    let results = futures_util::future::join_all(calls).await;
    let refused: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        (10..=25).contains(&refused.len()),
        "{} of 40 refused",
        refused.len()
    );
    for err in refused {
        assert_eq!(err.code(), Code::ResourceExhausted);
        assert!(
            err.message()
                .contains("--max-acquires-per-second-per-caller 20"),
            "{err:?}"
        );
    }
    for i in 0..40 {
        let reply = c
            .acquire(as_tenant(TOKEN_B, acquire(&format!("shared/b-{i}"), 1_000)))
            .await
            .unwrap()
            .into_inner();
        assert!(reply.acquired);
    }
}
