//! LockService.Watch against real servers, on the memory store, one
//! redis-server and the Redis Cluster: the first message is the lock's
//! state, then one event per grant, release, expiry and forced release,
//! including those made through a second server on the same Redis; a
//! client that does not read gets the latest state instead of a backlog;
//! watching needs the caller's scope; the watchers of one key share one
//! feed; `--max-watches` bounds the server's streams.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use leasehold::auth::{Authenticator, Policy};
use leasehold::pb;
use leasehold::pb::watch_event::Kind;
use leasehold::server::ServerConfig;
use tonic::{Code, Request};

on_every_store!(
    watch_follows_every_change_from_any_server,
    a_slow_watcher_gets_the_latest_state,
    watch_reports_each_shared_holder,
);

fn admin_config() -> ServerConfig {
    ServerConfig {
        admin: true,
        ..test_config()
    }
}

/// The server changes are made through: on Redis, a second server on the
/// same Redis and prefix; on the memory store, the watched server itself.
async fn second(server: &TestServer) -> Option<TestServer> {
    match server.backend {
        Backend::Memory => None,
        backend => Some(
            TestServer::start_on(
                backend,
                server.redis_url.clone(),
                server.prefix.clone(),
                admin_config(),
            )
            .await,
        ),
    }
}

async fn watch(server: &TestServer, key: &str) -> tonic::Streaming<pb::WatchEvent> {
    let mut c = server.client().await;
    c.watch(pb::WatchRequest { key: key.into() })
        .await
        .expect("watch")
        .into_inner()
}

async fn next(stream: &mut tonic::Streaming<pb::WatchEvent>) -> pb::WatchEvent {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a watch event within 10 s")
        .expect("no error")
        .expect("the stream goes on")
}

async fn released(
    c: &mut pb::lock_service_client::LockServiceClient<tonic::transport::Channel>,
    key: &str,
    token: &str,
) {
    let resp = c.release(release(key, token)).await.expect("release");
    assert!(resp.into_inner().released, "{key} released");
}

fn kind(event: &pb::WatchEvent) -> Kind {
    Kind::try_from(event.kind).expect("known kind")
}

async fn watch_follows_every_change_from_any_server(backend: Backend) {
    let watched = TestServer::start_with(backend, admin_config()).await;
    let other = second(&watched).await;
    let writer = other.as_ref().unwrap_or(&watched);
    let mut c = writer.client().await;

    let mut events = watch(&watched, "w").await;
    let first = next(&mut events).await;
    assert_eq!(kind(&first), Kind::State);
    assert!(!first.state.expect("state").held);
    assert_eq!(first.fencing_token, 0);

    let mut req = acquire("w", 30_000);
    req.owner = "deployer".into();
    let lease = lease_of(c.acquire(req).await.expect("acquire").into_inner());
    let e = next(&mut events).await;
    assert_eq!(kind(&e), Kind::Acquired, "{e:?}");
    assert_eq!(e.fencing_token, lease.fencing_token);
    let state = e.state.expect("state");
    assert!(state.held && state.owner == "deployer", "{state:?}");
    assert!(!format!("{state:?}").contains(&lease.token));

    released(&mut c, "w", &lease.token).await;
    let e = next(&mut events).await;
    assert_eq!(kind(&e), Kind::Released, "{e:?}");
    assert_eq!(e.fencing_token, lease.fencing_token);

    // Expiry: reported soon after the TTL, though nobody reports it.
    let ttl = 600;
    let start = Instant::now();
    let lease = lease_of(
        c.acquire(acquire("w", ttl))
            .await
            .expect("acquire")
            .into_inner(),
    );
    assert_eq!(kind(&next(&mut events).await), Kind::Acquired);
    let e = next(&mut events).await;
    let after = start.elapsed();
    assert_eq!(kind(&e), Kind::Expired, "{e:?}");
    assert_eq!(e.fencing_token, lease.fencing_token);
    assert!(!e.state.expect("state").held);
    assert!(
        after >= Duration::from_millis(u64::from(ttl) - 50)
            && after <= Duration::from_millis(u64::from(ttl) + 400),
        "expiry reported {after:?} after a {ttl} ms grant"
    );
    eprintln!("expiry of a {ttl} ms lease reported after {after:?}");

    // A forced release, made through the other server.
    let lease = lease_of(
        c.acquire(acquire("w", 30_000))
            .await
            .expect("acquire")
            .into_inner(),
    );
    assert_eq!(kind(&next(&mut events).await), Kind::Acquired);
    let mut admin = pb::admin_service_client::AdminServiceClient::connect(writer.endpoint())
        .await
        .expect("connect");
    admin
        .force_release(pb::ForceReleaseRequest {
            key: "w".into(),
            reason: "test".into(),
        })
        .await
        .expect("force release");
    let e = next(&mut events).await;
    assert_eq!(kind(&e), Kind::ForceReleased, "{e:?}");
    assert!(
        !e.state.as_ref().expect("state").held,
        "free right after: {e:?}"
    );
    assert_eq!(e.fencing_token, lease.fencing_token);

    // A renewed lock does not expire under the watcher's eyes.
    let lease = lease_of(
        c.acquire(acquire("w", 600))
            .await
            .expect("acquire")
            .into_inner(),
    );
    assert_eq!(kind(&next(&mut events).await), Kind::Acquired);
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let renewed = c
            .renew(pb::RenewRequest {
                key: "w".into(),
                token: lease.token.clone(),
                ttl_ms: 0,
            })
            .await
            .expect("renew")
            .into_inner();
        assert!(renewed.renewed);
    }
    released(&mut c, "w", &lease.token).await;
    let e = next(&mut events).await;
    assert_eq!(kind(&e), Kind::Released, "renewals are not expiries: {e:?}");
}

fn shared(key: &str, ttl_ms: u32) -> pb::AcquireRequest {
    pb::AcquireRequest {
        mode: pb::LockMode::Shared.into(),
        ..acquire(key, ttl_ms)
    }
}

/// Holders of a SHARED lock come and go one by one: a reader joining
/// others is an ACQUIRED of its own (the others are not released), one
/// reader's expiry is an EXPIRED soon after its TTL while a longer-lived
/// reader stays, and the last one's release leaves the lock free.
async fn watch_reports_each_shared_holder(backend: Backend) {
    let watched = TestServer::start_with(backend, admin_config()).await;
    let other = second(&watched).await;
    let writer = other.as_ref().unwrap_or(&watched);
    let mut c = writer.client().await;
    let mut events = watch(&watched, "r").await;
    assert_eq!(kind(&next(&mut events).await), Kind::State);

    let long = lease_of(c.acquire(shared("r", 30_000)).await.unwrap().into_inner());
    let e = next(&mut events).await;
    assert_eq!(
        (kind(&e), e.fencing_token),
        (Kind::Acquired, long.fencing_token),
        "{e:?}"
    );

    let ttl = 700;
    let start = Instant::now();
    let short = lease_of(c.acquire(shared("r", ttl)).await.unwrap().into_inner());
    let e = next(&mut events).await;
    assert_eq!(
        (kind(&e), e.fencing_token),
        (Kind::Acquired, short.fencing_token),
        "a second reader joins, nobody left: {e:?}"
    );
    assert_eq!(e.state.expect("state").holders.len(), 2);

    let e = next(&mut events).await;
    let after = start.elapsed();
    assert_eq!(
        (kind(&e), e.fencing_token),
        (Kind::Expired, short.fencing_token),
        "{e:?}"
    );
    let state = e.state.expect("state");
    assert!(state.held && state.holders.len() == 1, "{state:?}");
    assert_eq!(state.holders[0].fencing_token, long.fencing_token);
    assert!(
        after <= Duration::from_millis(u64::from(ttl) + 1_000),
        "one reader's expiry reported {after:?} after its {ttl} ms grant"
    );

    released(&mut c, "r", &long.token).await;
    let e = next(&mut events).await;
    assert_eq!(
        (kind(&e), e.fencing_token),
        (Kind::Released, long.fencing_token),
        "{e:?}"
    );
    assert!(!e.state.expect("state").held);
}

async fn a_slow_watcher_gets_the_latest_state(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.client().await;
    // A client whose HTTP/2 window holds a handful of events: what it does
    // not read stays in the server, which must not queue it without bound.
    let channel = tonic::transport::Endpoint::from_shared(server.endpoint())
        .expect("endpoint")
        .initial_stream_window_size(Some(512))
        .connect()
        .await
        .expect("connect");
    let mut events = pb::lock_service_client::LockServiceClient::new(channel)
        .watch(pb::WatchRequest { key: "slow".into() })
        .await
        .expect("watch")
        .into_inner();
    assert_eq!(kind(&next(&mut events).await), Kind::State);
    // 200 changes while the watcher reads nothing.
    let mut last = None;
    for _ in 0..100 {
        let lease = lease_of(
            c.acquire(acquire("slow", 30_000))
                .await
                .expect("acquire")
                .into_inner(),
        );
        assert!(
            c.release(release("slow", &lease.token))
                .await
                .expect("release")
                .into_inner()
                .released
        );
        last = Some(lease);
    }
    let last = last.expect("a lease");
    let held = lease_of(
        c.acquire(acquire("slow", 30_000))
            .await
            .expect("acquire")
            .into_inner(),
    );
    // Reading now: fewer events than changes, a state among them, and the
    // last one says who holds the lock now.
    let mut seen = Vec::new();
    let mut state_seen = false;
    for _ in 0..300 {
        let e = next(&mut events).await;
        state_seen |= kind(&e) == Kind::State;
        let done = kind(&e) == Kind::Acquired && e.fencing_token == held.fencing_token
            || kind(&e) == Kind::State
                && e.state
                    .as_ref()
                    .is_some_and(|s| s.fencing_token == held.fencing_token);
        seen.push(e);
        if done {
            break;
        }
    }
    let end = seen.last().expect("events");
    assert!(
        end.state
            .as_ref()
            .is_some_and(|s| s.held && s.fencing_token == held.fencing_token),
        "{end:?}"
    );
    assert!(last.fencing_token < held.fencing_token);
    assert!(state_seen, "a lagging watcher is sent the state");
    assert!(seen.len() < 201, "{} events for 201 changes", seen.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watching_needs_the_callers_scope() {
    let token = "team-a-watch-token-0123456789";
    let policy = Policy::parse(&format!(
        "[[tenant]]\nname = \"team-a\"\nprefixes = [\"team-a/\"]\ntokens = [\"{token}\"]"
    ))
    .expect("policy");
    let config = ServerConfig {
        auth: Some(Arc::new(Authenticator::new(policy, false))),
        ..test_config()
    };
    let server = TestServer::start_with(Backend::Memory, config).await;
    let mut c = server.client().await;
    let req = |key: &str| {
        let mut r = Request::new(pb::WatchRequest { key: key.into() });
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("ascii"),
        );
        r
    };
    let status = c.watch(req("team-b/x")).await.expect_err("out of scope");
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = c
        .watch(pb::WatchRequest {
            key: "team-a/x".into(),
        })
        .await
        .expect_err("no token");
    assert_eq!(status.code(), Code::Unauthenticated);
    let mut events = c
        .watch(req("team-a/x"))
        .await
        .expect("in scope")
        .into_inner();
    assert_eq!(kind(&next(&mut events).await), Kind::State);
    let status = c.watch(req("")).await.expect_err("empty key");
    assert_eq!(status.code(), Code::InvalidArgument);
}

/// Redis pub/sub delivers at most once: a change whose message never
/// arrives (here, a record changed behind Leasehold's back) still reaches
/// the watcher, as a state, within the resync period (10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missed_change_shows_as_a_state_within_the_resync_period() {
    let server = TestServer::start(Backend::Redis).await;
    let mut c = server.client().await;
    let mut events = watch(&server, "quiet").await;
    assert_eq!(kind(&next(&mut events).await), Kind::State);
    let lease = lease_of(
        c.acquire(acquire("quiet", 60_000))
            .await
            .expect("acquire")
            .into_inner(),
    );
    assert_eq!(kind(&next(&mut events).await), Kind::Acquired);
    // Released without a message: what a lost message looks like.
    let lock = server.names("quiet").lock;
    tokio::task::spawn_blocking(move || shared_redis().cli(&["hdel", &lock, "fence", "token"]))
        .await
        .expect("redis-cli");
    let start = Instant::now();
    let e = tokio::time::timeout(Duration::from_secs(15), events.message())
        .await
        .expect("a state within 15 s")
        .expect("no error")
        .expect("the stream goes on");
    assert_eq!(kind(&e), Kind::State, "{e:?}");
    assert!(!e.state.expect("state").held);
    assert!(
        start.elapsed() <= Duration::from_secs(11),
        "{:?}",
        start.elapsed()
    );
    let _ = lease;
}

/// A Watch stream counts against the caller's streams
/// (`--max-streams-per-caller`) while it is open, and only then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_count_against_the_callers_streams() {
    let mut config = test_config();
    config.limits.per_caller = leasehold::service::quota::QuotaLimits {
        streams: 1,
        ..Default::default()
    };
    let server = TestServer::start_with(Backend::Memory, config).await;
    // Without an auth file the caller is the connection: one for both.
    let mut c = server.client().await;
    let mut first = c
        .watch(pb::WatchRequest { key: "q".into() })
        .await
        .expect("watch")
        .into_inner();
    assert_eq!(kind(&next(&mut first).await), Kind::State);
    let status = c
        .watch(pb::WatchRequest { key: "q".into() })
        .await
        .expect_err("over the caller's streams");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("--max-streams-per-caller"),
        "{status:?}"
    );
    // The first one ends: its share comes back.
    drop(first);
    watch_once_a_slot_frees(&mut c, "q").await;
}

/// Watches `key` as soon as a refused Watch is allowed again: the server
/// sees a stream end a moment after the client drops it. Checks that the
/// new stream starts with the state.
async fn watch_once_a_slot_frees(
    c: &mut pb::lock_service_client::LockServiceClient<tonic::transport::Channel>,
    key: &str,
) {
    let mut again = None;
    let end = Instant::now() + Duration::from_secs(10);
    while again.is_none() && Instant::now() < end {
        again = c.watch(pb::WatchRequest { key: key.into() }).await.ok();
        if again.is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut again = again.expect("a stream within 10 s").into_inner();
    assert_eq!(kind(&next(&mut again).await), Kind::State);
}

/// Commands a redis-server has processed so far (the INFO call itself
/// included).
fn commands_processed(redis: &RedisServer) -> u64 {
    redis
        .cli(&["INFO", "stats"])
        .lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("total_commands_processed in INFO stats")
}

/// Fifty watchers of one key on one server share its feed: a grant and a
/// release reach every one of them for a handful of Redis commands (one
/// read of the lock for the grant), not one read per watcher, and a new
/// watcher of a watched key starts from the feed's state without a read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_of_one_key_share_one_feed() {
    const WATCHERS: usize = 50;
    let redis = tokio::task::block_in_place(RedisServer::start);
    let config = ServerConfig {
        // No health PING among the commands counted.
        health_interval: Duration::from_secs(600),
        ..admin_config()
    };
    let server =
        TestServer::start_on(Backend::Redis, Some(redis.url()), unique_prefix(), config).await;
    let key = "feed/shared";
    let mut streams = Vec::new();
    for _ in 0..WATCHERS {
        let mut stream = watch(&server, key).await;
        assert_eq!(kind(&next(&mut stream).await), Kind::State);
        streams.push(stream);
    }
    let mut c = server.client().await;
    // Scripts loaded (NOSCRIPT, SCRIPT LOAD) before the count starts.
    let warm = lease_of(
        c.acquire(acquire("feed/warm", 30_000))
            .await
            .unwrap()
            .into_inner(),
    );
    released(&mut c, "feed/warm", &warm.token).await;
    let before = tokio::task::block_in_place(|| commands_processed(&redis));
    let lease = lease_of(c.acquire(acquire(key, 30_000)).await.unwrap().into_inner());
    for stream in &mut streams {
        let event = next(stream).await;
        assert_eq!(kind(&event), Kind::Acquired, "{event:?}");
        assert_eq!(event.fencing_token, lease.fencing_token);
    }
    let mut late = watch(&server, key).await;
    let state = next(&mut late).await;
    assert_eq!(kind(&state), Kind::State);
    assert_eq!(
        state.state.as_ref().map(|s| s.fencing_token),
        Some(lease.fencing_token)
    );
    released(&mut c, key, &lease.token).await;
    streams.push(late);
    for stream in &mut streams {
        assert_eq!(kind(&next(stream).await), Kind::Released);
    }
    let used = tokio::task::block_in_place(|| commands_processed(&redis)) - before;
    println!("{used} Redis commands for {WATCHERS} watchers");
    // Acquire, one read of the lock, Release, the two INFO calls and the
    // commands the scripts run inside (Redis counts those too); one read
    // per watcher would be 50 more.
    assert!(
        used < 25,
        "{used} Redis commands for one grant and release seen by {WATCHERS} watchers: {}",
        redis.cli(&["INFO", "commandstats"])
    );
}

/// `--max-watches` bounds the Watch streams of the whole server, whoever
/// opens them: one more is RESOURCE_EXHAUSTED naming the flag, and a
/// stream's end frees its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_beyond_max_watches_are_refused() {
    let mut config = test_config();
    config.limits.max_watches = 2;
    let server = TestServer::start_with(Backend::Memory, config).await;
    // Two connections: the per-caller quota is not what refuses.
    let mut first = watch(&server, "w/1").await;
    let mut second = watch(&server, "w/2").await;
    assert_eq!(kind(&next(&mut first).await), Kind::State);
    assert_eq!(kind(&next(&mut second).await), Kind::State);
    let mut c = server.client().await;
    let status = c
        .watch(pb::WatchRequest { key: "w/3".into() })
        .await
        .expect_err("over --max-watches");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("--max-watches"), "{status:?}");
    drop(first);
    watch_once_a_slot_frees(&mut c, "w/3").await;
}
