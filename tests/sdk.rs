//! The Rust SDK against real servers: guards kept alive over one stream,
//! `lost()` on the server's word and on the monotonic clock, re-attachment
//! after a server restart and after losing one of two servers, failover,
//! request ids, waiting, and one-line errors.

mod common;

use std::time::{Duration, Instant};

use common::*;
use leasehold::client::{Client, Error, LostReason};
use leasehold::pb;
use leasehold::server::ServerConfig;
use leasehold::service::ServiceLimits;

async fn connect(endpoints: &[String]) -> Client {
    Client::builder()
        .endpoints(endpoints.to_vec())
        .retry_for(Duration::from_secs(10))
        .connect()
        .await
        .expect("connect")
}

/// Whether `lost` has completed, without waiting.
fn fired(lost: &mut leasehold::client::Lost) -> Option<LostReason> {
    futures_util::FutureExt::now_or_never(lost)
}

/// Polls Describe (through `client`) until `key`'s remaining TTL is at
/// least `min_ttl`, i.e. until a renewal reached the store; returns when.
async fn wait_renewed(client: &Client, key: &str, min_ttl: Duration, within: Duration) -> Instant {
    let end = Instant::now() + within;
    loop {
        if let Ok(Some(info)) = client.describe(key).await {
            if info.ttl_remaining >= min_ttl {
                return Instant::now();
            }
        }
        assert!(
            Instant::now() < end,
            "{key} was not renewed within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_describe_release() {
    let server = TestServer::start(Backend::Memory).await;
    let client = connect(&[server.endpoint()]).await;
    let guard = client
        .lock("sdk/a")
        .ttl(Duration::from_secs(2))
        .owner("me")
        .metadata("job", "1")
        .await
        .expect("acquired");
    assert_eq!(guard.key(), "sdk/a");
    assert!(guard.fencing_token() > 0);
    assert_eq!(guard.ttl(), Duration::from_secs(2));
    assert!(!guard.is_lost());
    assert!(
        !format!("{guard:?}").contains(guard.token()),
        "Debug redacts the token"
    );

    let info = client.describe("sdk/a").await.unwrap().expect("held");
    assert_eq!(info.owner, "me");
    assert_eq!(info.fencing_token, guard.fencing_token());
    assert_eq!(info.metadata.get("job").map(String::as_str), Some("1"));

    // Another client trying once is refused, with the holder's remaining TTL.
    let other = connect(&[server.endpoint()]).await;
    match other.lock("sdk/a").wait(Duration::ZERO).await {
        Err(Error::NotAcquired { retry_after, .. }) => {
            assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(2))
        }
        other => panic!("expected NotAcquired, got {other:?}"),
    }
    // A token that does not hold the lock releases nothing.
    assert!(!other.release("sdk/a", "not-the-token").await.unwrap());

    let fence = guard.fencing_token();
    assert!(guard.release().await.unwrap(), "released by this call");
    assert!(client.describe("sdk/a").await.unwrap().is_none());
    let again = other.lock("sdk/a").wait(Duration::ZERO).await.unwrap();
    assert!(again.fencing_token() > fence);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guards_share_one_stream_and_outlive_many_ttls() {
    // One KeepAlive stream per connection allowed: the client must keep all
    // its locks on one stream.
    let config = ServerConfig {
        limits: ServiceLimits {
            max_streams_per_connection: 1,
            ..ServiceLimits::default()
        },
        ..test_config()
    };
    let server = TestServer::start_with(Backend::Cluster, config).await;
    let client = connect(&[server.endpoint()]).await;
    let ttl = Duration::from_millis(600);
    let mut guards = Vec::new();
    for i in 0..5 {
        guards.push(
            client
                .lock(format!("share/{i}"))
                .ttl(ttl)
                .wait(Duration::ZERO)
                .await
                .unwrap(),
        );
    }
    let mut lost: Vec<_> = guards.iter().map(|g| g.lost()).collect();
    // Five TTLs: every lock is renewed (at about ttl/3) and none is lost.
    tokio::time::sleep(ttl * 5).await;
    for (guard, lost) in guards.iter().zip(&mut lost) {
        assert_eq!(fired(lost), None, "{} lost", guard.key());
        let info = client.describe(guard.key()).await.unwrap().expect("held");
        assert_eq!(info.fencing_token, guard.fencing_token());
    }
    // Dropping the guards releases them in the background.
    drop(guards);
    let probe = connect(&[server.endpoint()]).await;
    for i in 0..5 {
        let key = format!("share/{i}");
        let end = Instant::now() + Duration::from_secs(5);
        while probe.describe(key.as_str()).await.unwrap().is_some() {
            assert!(Instant::now() < end, "{key} not released after drop");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_fires_when_the_lock_expires_and_another_client_takes_it() {
    let server = TestServer::start(Backend::Cluster).await;
    let client = connect(&[server.endpoint()]).await;
    let ttl = Duration::from_secs(3);
    let guard = client.lock("lost/a").ttl(ttl).await.unwrap();
    let mut lost = guard.lost();
    assert_eq!(fired(&mut lost), None);

    force_expire(&server, "lost/a");
    let other = connect(&[server.endpoint()]).await;
    let taken = other
        .lock("lost/a")
        .ttl(Duration::from_secs(30))
        .wait(Duration::ZERO)
        .await
        .unwrap();
    assert!(taken.fencing_token() > guard.fencing_token());
    let expired_at = Instant::now();

    // The next renewal (due within ttl/3) is answered alive = false.
    let reason = tokio::time::timeout(ttl, lost).await.expect("lost() fired");
    assert_eq!(reason, LostReason::NotHeld);
    assert!(expired_at.elapsed() < ttl / 3 + Duration::from_secs(1));
    assert!(guard.is_lost());
    // Every lost() future agrees, even one made after the fact.
    assert_eq!(guard.lost().await, LostReason::NotHeld);
    // The stale guard's release must not touch the new holder's lock.
    assert!(!guard.release().await.unwrap());
    let info = other.describe("lost/a").await.unwrap().expect("held");
    assert_eq!(info.fencing_token, taken.fencing_token());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_fires_on_the_monotonic_clock_when_no_server_answers() {
    let server = tokio::task::block_in_place(|| ServerProcess::start(&[]));
    let client = Client::builder()
        .endpoints(server.endpoint())
        .retry_for(Duration::from_secs(2))
        .connect()
        .await
        .unwrap();
    let ttl = Duration::from_millis(1500);
    let guard = client.lock("clock/a").ttl(ttl).await.unwrap();
    wait_renewed(
        &client,
        "clock/a",
        Duration::from_millis(1),
        Duration::from_secs(5),
    )
    .await;
    let lost = guard.lost();
    // Freeze the server: connections stay open, nothing answers.
    server.signal("-STOP");
    let frozen_at = Instant::now();
    let reason = tokio::time::timeout(ttl * 3, lost)
        .await
        .expect("lost() fired");
    let after = frozen_at.elapsed();
    server.signal("-CONT");
    assert_eq!(reason, LostReason::Expired);
    // The last success was at most ttl/3 (plus a round trip) before the
    // freeze, and lost() fires one TTL after it.
    assert!(after >= ttl / 2, "fired too early: {after:?}");
    assert!(
        after <= ttl + Duration::from_millis(700),
        "fired too late: {after:?}"
    );
    assert!(guard.is_lost());
    eprintln!("lost() fired {after:?} after the server froze (TTL {ttl:?})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_loses_no_lock() {
    let url = cluster_url();
    let prefix = unique_prefix();
    let mut server = tokio::task::block_in_place(|| ServerProcess::on_redis(&url, &prefix));
    let client = connect(&[server.endpoint()]).await;
    let ttl = Duration::from_secs(3);
    let guard = client.lock("restart/a").ttl(ttl).await.unwrap();
    let mut lost = guard.lost();
    wait_renewed(
        &client,
        "restart/a",
        Duration::from_millis(1),
        Duration::from_secs(5),
    )
    .await;

    // Graceful shutdown: the stream ends with UNAVAILABLE, locks are kept.
    server.signal("-TERM");
    let stopped_at = Instant::now();
    let status = tokio::task::block_in_place(|| server.wait_exit(Duration::from_secs(15)));
    assert_eq!(status.code(), Some(0));
    tokio::task::block_in_place(|| server.restart());

    // A renewal after the restart sets the TTL back to (nearly) full.
    let renewed_at =
        wait_renewed(&client, "restart/a", ttl - Duration::from_millis(300), ttl).await;
    eprintln!(
        "re-attached {:?} after SIGTERM (restart included)",
        renewed_at - stopped_at
    );
    // Two more TTLs: still held, never lost.
    tokio::time::sleep(ttl * 2).await;
    assert_eq!(fired(&mut lost), None);
    let info = client.describe("restart/a").await.unwrap().expect("held");
    assert_eq!(info.fencing_token, guard.fencing_token());
    assert!(guard.release().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_one_of_two_servers_loses_no_lock() {
    let url = cluster_url();
    let prefix = unique_prefix();
    let (mut a, b) = tokio::task::block_in_place(|| {
        (
            ServerProcess::on_redis(&url, &prefix),
            ServerProcess::on_redis(&url, &prefix),
        )
    });
    let client = connect(&[a.endpoint(), b.endpoint()]).await;
    let ttl = Duration::from_secs(3);
    let guard = client.lock("two/a").ttl(ttl).await.unwrap();
    let mut lost = guard.lost();
    wait_renewed(
        &client,
        "two/a",
        Duration::from_millis(1),
        Duration::from_secs(5),
    )
    .await;

    // Crash the server holding the stream: nothing is released, nobody
    // answers; the client must move to the other server.
    tokio::task::block_in_place(|| a.kill());
    let killed_at = Instant::now();
    let observer = connect(&[b.endpoint()]).await;
    let renewed_at = wait_renewed(&observer, "two/a", ttl - Duration::from_millis(300), ttl).await;
    eprintln!(
        "re-attached on the other server {:?} after the kill",
        renewed_at - killed_at
    );
    tokio::time::sleep(ttl * 2).await;
    assert_eq!(fired(&mut lost), None);
    let info = observer.describe("two/a").await.unwrap().expect("held");
    assert_eq!(info.fencing_token, guard.fencing_token());
    assert!(guard.release().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_fails_over_and_carries_a_request_id() {
    let server = TestServer::start(Backend::Redis).await;
    let dead = format!("http://127.0.0.1:{}", free_port());
    let client = connect(&[dead, server.endpoint()]).await;
    let guard = client
        .lock("rid/a")
        .ttl(Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(guard.request_id().len(), 32);
    // A retry with the same request id (what the SDK sends after a lost
    // reply) gets the very same lease, so nothing is orphaned.
    let mut raw = server.client().await;
    let again = raw
        .acquire(pb::AcquireRequest {
            key: "rid/a".into(),
            ttl_ms: 10_000,
            request_id: guard.request_id().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let lease = lease_of(again);
    assert_eq!(lease.token, guard.token());
    assert_eq!(lease.fencing_token, guard.fencing_token());

    // The builder's own request id works the same way.
    let other = connect(&[server.endpoint()]).await;
    let first = other
        .lock("rid/b")
        .request_id("job-7")
        .wait(Duration::ZERO)
        .lease()
        .await
        .unwrap();
    let second = other
        .lock("rid/b")
        .request_id("job-7")
        .wait(Duration::ZERO)
        .lease()
        .await
        .unwrap();
    assert_eq!(first, second);
    assert!(other.release("rid/b", &first.token).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_lock_is_granted_on_release() {
    let server = TestServer::start(Backend::Redis).await;
    let holder = connect(&[server.endpoint()]).await;
    let guard = holder
        .lock("wait/a")
        .ttl(Duration::from_secs(30))
        .await
        .unwrap();
    let waiter = connect(&[server.endpoint()]).await;
    let task = tokio::spawn(async move {
        let g = waiter
            .lock("wait/a")
            .wait(Duration::from_secs(20))
            .await
            .expect("granted");
        (g, Instant::now())
    });
    let waiters = server.waiters.clone();
    tokio::task::block_in_place(|| {
        wait_until("a waiter queued", Duration::from_secs(10), || {
            !waiters.is_empty()
        })
    });
    let fence = guard.fencing_token();
    let dropped_at = Instant::now();
    drop(guard); // released in the background
    let (granted, at) = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
    assert!(granted.fencing_token() > fence);
    assert!(
        at - dropped_at < Duration::from_secs(2),
        "{:?}",
        at - dropped_at
    );

    // A bounded wait on a held lock ends with NotAcquired after the wait.
    let third = connect(&[server.endpoint()]).await;
    let start = Instant::now();
    let result = third.lock("wait/a").wait(Duration::from_millis(300)).await;
    assert!(
        matches!(result, Err(Error::NotAcquired { .. })),
        "{result:?}"
    );
    assert!(start.elapsed() >= Duration::from_millis(250));
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_lock_runs_releases_and_stops_on_loss() {
    let server = TestServer::start(Backend::Redis).await;
    let client = connect(&[server.endpoint()]).await;
    let fence = client
        .with_lock("with/a", |lease| async move { lease.fencing_token })
        .await
        .unwrap();
    assert!(fence > 0);
    assert!(
        client.describe("with/a").await.unwrap().is_none(),
        "released"
    );

    // Work that never ends is stopped when the lock is lost.
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let c = client.clone();
    let task = tokio::spawn(async move {
        c.lock("with/b")
            .ttl(Duration::from_secs(3))
            .run(|_lease| async move {
                let _ = started_tx.send(());
                std::future::pending::<()>().await
            })
            .await
    });
    started_rx.await.expect("work started");
    force_expire(&server, "with/b");
    let result = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("with_lock returned")
        .unwrap();
    match result {
        Err(Error::Lost { key, reason }) => {
            assert_eq!(key, "with/b");
            assert_eq!(reason, LostReason::NotHeld);
        }
        other => panic!("expected Lost, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_one_clear_line() {
    // Nothing listens: Unavailable within the retry budget, naming both.
    let a = format!("http://127.0.0.1:{}", free_port());
    let b = format!("127.0.0.1:{}", free_port());
    let start = Instant::now();
    let err = Client::builder()
        .endpoints([a.as_str(), b.as_str()])
        .retry_for(Duration::from_millis(700))
        .connect()
        .await
        .unwrap_err();
    let took = start.elapsed();
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_secs(5),
        "{took:?}"
    );
    let line = err.to_string();
    assert!(
        line.contains(&a) && line.contains(&format!("http://{b}")),
        "{line}"
    );
    assert!(line.to_lowercase().contains("refused"), "{line}");
    assert!(!line.contains('\n'), "{line}");

    let err = Client::connect("ftp://127.0.0.1:1").await.unwrap_err();
    assert!(matches!(err, Error::InvalidEndpoint { .. }), "{err}");

    let server = TestServer::start(Backend::Memory).await;
    let client = connect(&[server.endpoint()]).await;
    let err = client
        .lock("bad\u{7}key")
        .wait(Duration::ZERO)
        .await
        .unwrap_err();
    assert!(
        err.to_string().starts_with("invalid argument: key:"),
        "{err}"
    );
    let err = client
        .lock("k")
        .ttl(Duration::from_millis(1))
        .wait(Duration::ZERO)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    assert!(err.to_string().contains("ttl_ms"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_are_not_reentrant_and_the_error_says_so() {
    let server = TestServer::start(Backend::Redis).await;
    let client = connect(&[server.endpoint()]).await;
    let guard = client
        .lock("reentrant/a")
        .ttl(Duration::from_secs(5))
        .await
        .unwrap();

    // This client (or a clone of it) asking again: not "another client".
    for asker in [client.clone(), client.clone().clone()] {
        let err = asker
            .lock("reentrant/a")
            .wait(Duration::from_millis(200))
            .await
            .unwrap_err();
        match &err {
            Error::HeldByThisClient { key, waited } => {
                assert_eq!(key, "reentrant/a");
                assert!(*waited >= Duration::from_millis(150), "{waited:?}");
            }
            other => panic!("expected HeldByThisClient, got {other:?}"),
        }
        let line = err.to_string();
        assert!(line.contains("held by this same client"), "{line}");
        assert!(line.contains("not re-entrant"), "{line}");
        assert!(!line.contains("another client"), "{line}");
    }
    // Another client is told it is another client's.
    let other = connect(&[server.endpoint()]).await;
    let err = other
        .lock("reentrant/a")
        .wait(Duration::ZERO)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotAcquired { .. }), "{err:?}");

    // Tasks sharing one client still exclude each other: a waiting task
    // gets the lock when the holder releases it.
    let waiter = client.clone();
    let task = tokio::spawn(async move {
        waiter
            .lock("reentrant/a")
            .ttl(Duration::from_secs(3))
            .wait(Duration::from_secs(20))
            .await
    });
    let waiters = server.waiters.clone();
    tokio::task::block_in_place(|| {
        wait_until("the task queued", Duration::from_secs(10), || {
            !waiters.is_empty()
        })
    });
    let fence = guard.fencing_token();
    assert!(guard.release().await.unwrap());
    let second = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("granted within 10 s")
        .unwrap()
        .expect("granted");
    assert!(second.fencing_token() > fence);

    // A guard that knows it lost its lock does not count as holding it.
    force_expire(&server, "reentrant/a");
    let lost = tokio::time::timeout(Duration::from_secs(10), second.lost())
        .await
        .expect("lost within 10 s");
    assert_eq!(lost, LostReason::NotHeld);
    let third = other
        .lock("reentrant/a")
        .wait(Duration::ZERO)
        .await
        .unwrap();
    let err = client
        .lock("reentrant/a")
        .wait(Duration::ZERO)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotAcquired { .. }), "{err:?}");
    drop((second, third));
}

#[derive(Debug)]
enum JobError {
    Lock(Error),
    Io(std::io::Error),
}

impl From<Error> for JobError {
    fn from(e: Error) -> Self {
        Self::Lock(e)
    }
}

impl From<std::io::Error> for JobError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

/// The error type comes from this function's signature; the work needs no
/// `Ok::<_, E>` and the caller no `??`.
async fn read_under_lock(client: &Client, path: &std::path::Path) -> Result<usize, JobError> {
    client
        .try_with_lock("try/a", |_lease| async move {
            let bytes = std::fs::read(path)?;
            Ok(bytes.len())
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_with_lock_returns_one_result_and_releases_either_way() {
    let server = TestServer::start(Backend::Memory).await;
    let client = connect(&[server.endpoint()]).await;
    let len = read_under_lock(
        &client,
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("Cargo.toml")
            .as_path(),
    )
    .await
    .unwrap();
    assert!(len > 0);
    assert!(
        client.describe("try/a").await.unwrap().is_none(),
        "released"
    );

    let err = read_under_lock(&client, std::path::Path::new("/nonexistent/leasehold"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, JobError::Io(e) if e.kind() == std::io::ErrorKind::NotFound),
        "{err:?}"
    );
    assert!(
        client.describe("try/a").await.unwrap().is_none(),
        "released after the work failed"
    );

    // The SDK's own failures come through From<Error>.
    let holder = connect(&[server.endpoint()]).await;
    let _held = holder.lock("try/a").await.unwrap();
    let err = client
        .lock("try/a")
        .wait(Duration::ZERO)
        .try_run(|_lease| async move { Ok::<_, JobError>(()) })
        .await
        .unwrap_err();
    assert!(
        matches!(err, JobError::Lock(Error::NotAcquired { .. })),
        "{err:?}"
    );
}

/// `Error::Rpc`'s code can be matched through the SDK's re-export.
#[test]
fn rpc_codes_match_through_the_sdk() {
    use leasehold::client::Code;
    fn retry_later(e: &Error) -> bool {
        matches!(
            e,
            Error::Rpc {
                code: Code::Aborted | Code::FailedPrecondition,
                ..
            }
        )
    }
    let e = Error::Rpc {
        code: Code::Aborted,
        message: "m".into(),
    };
    assert!(retry_later(&e));
    assert!(!retry_later(&Error::Protocol("p".into())));
}
