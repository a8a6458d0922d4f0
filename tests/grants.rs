//! Every grant ends exactly once (documentation/semantics.md): delivered to
//! the caller(s) entitled to it, or given back; nothing that did not
//! produce a delivery releases a grant that was delivered. Each test makes
//! one cleanup path run at its worst moment — Redis frozen with calls
//! queued behind each other on a one-connection pool, a reply that cannot
//! be delivered, a handoff whose reply is lost, Redis out of memory in the
//! middle of a batch — and checks that nobody else's lease was touched and
//! nothing was left behind.

mod common;

use std::time::{Duration, Instant};

use common::*;
use leasehold::pb;
use leasehold::pb::lock_service_client::LockServiceClient;
use tonic::transport::Channel;
use tonic::{Code, Request};

/// A server on `redis` whose store calls reach Redis in the order they are
/// made: one connection, no batching, and a health ping only at start.
async fn ordered_server(redis: &RedisServer) -> TestServer {
    let config = leasehold::server::ServerConfig {
        store_timeout: Duration::from_millis(800),
        health_interval: Duration::from_secs(600),
        ..test_config()
    };
    TestServer::start_tuned(
        Backend::Redis,
        Some(redis.url()),
        unique_prefix(),
        config,
        |redis| {
            redis.pool_size = 1;
            redis.batch_max = 1;
        },
    )
    .await
}

fn with_request_id(key: &str, request_id: &str, owner: &str) -> pb::AcquireRequest {
    pb::AcquireRequest {
        key: key.into(),
        ttl_ms: 30_000,
        owner: owner.into(),
        request_id: request_id.into(),
        ..Default::default()
    }
}

async fn held(c: &mut LockServiceClient<Channel>, key: &str) -> bool {
    c.describe(describe(key)).await.unwrap().into_inner().held
}

async fn released(c: &mut LockServiceClient<Channel>, key: &str, token: &str) -> bool {
    c.release(release(key, token))
        .await
        .unwrap()
        .into_inner()
        .released
}

async fn renewed(c: &mut LockServiceClient<Channel>, key: &str, token: &str) -> bool {
    let req = pb::RenewRequest {
        key: key.into(),
        token: token.into(),
        ttl_ms: 0,
    };
    c.renew(req).await.unwrap().into_inner().renewed
}

/// `token` keeps `key` for all of `window`: Describe says held and a
/// renewal with the token succeeds, again and again. (A cleanup that
/// wrongly released it did so within milliseconds.)
async fn keeps(c: &mut LockServiceClient<Channel>, key: &str, token: &str, window: Duration) {
    let end = Instant::now() + window;
    while Instant::now() < end {
        assert!(
            held(c, key).await,
            "{key}: the lease was released behind its holder"
        );
        assert!(
            renewed(c, key, token).await,
            "{key}: the holder's token lost it"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A retry and the first attempt's cleanup: the first attempt times out while its script is
/// queued; the retry with the same request_id gets the lease; the first
/// attempt's cleanup (its dropped call, the store timeout, the late reply)
/// must not release what the retry was given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_retry_keeps_the_lease_the_first_attempt_got() {
    let redis = tokio::task::block_in_place(RedisServer::start);
    let server = ordered_server(&redis).await;
    let mut c = server.client().await;
    let req = || with_request_id("retried", "req-1", "me");

    redis.freeze();
    let base = redis.unread_bytes();
    let mut first = Request::new(req());
    first.set_timeout(Duration::from_millis(300));
    let err = c.acquire(first).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    let queued = tokio::task::block_in_place(|| redis.wait_unread_above(base));
    let retry = tokio::spawn({
        let mut c = c.clone();
        async move { c.acquire(req()).await }
    });
    tokio::task::block_in_place(|| redis.wait_unread_above(queued));
    redis.thaw();
    let lease = lease_of(retry.await.unwrap().unwrap().into_inner());

    keeps(
        &mut c,
        "retried",
        &lease.token,
        Duration::from_millis(1_500),
    )
    .await;
    assert!(
        !c.acquire(acquire("retried", 1_000))
            .await
            .unwrap()
            .into_inner()
            .acquired
    );
}

/// A replay that is not delivered: a duplicated Acquire (same request_id) replays the
/// delivered lease; the duplicate's reply cannot be delivered (the client
/// gives no flow-control window, then resets the stream). Its undelivered
/// reply must not release the original holder's lease.
async fn an_undelivered_replay_leaves_the_delivered_lease(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.client().await;
    let lease = lease_of(
        c.acquire(with_request_id("dup", "req-d", "me"))
            .await
            .unwrap()
            .into_inner(),
    );
    undelivered_acquire(server.addr, with_request_id("dup", "req-d", "me")).await;
    keeps(&mut c, "dup", &lease.token, Duration::from_millis(1_000)).await;

    // And a fresh grant whose reply is not delivered is given back.
    undelivered_acquire(server.addr, with_request_id("lost", "req-l", "me")).await;
    wait_until_async(
        "the undelivered grant given back",
        Duration::from_secs(3),
        || {
            let mut c = c.clone();
            async move { !held(&mut c, "lost").await }
        },
    )
    .await;
}

/// Case 2 for a shared holder (issue 15): an undelivered replay of one
/// holder's lease leaves that holder; an undelivered fresh shared grant is
/// given back, and only it.
async fn an_undelivered_shared_replay_leaves_the_delivered_lease(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.client().await;
    let shared = |request_id: &str| pb::AcquireRequest {
        mode: pb::LockMode::Shared.into(),
        shared_limit: 3,
        ..with_request_id("sdup", request_id, "me")
    };
    let lease = lease_of(c.acquire(shared("req-s")).await.unwrap().into_inner());
    undelivered_acquire(server.addr, shared("req-s")).await;
    keeps(&mut c, "sdup", &lease.token, Duration::from_millis(1_000)).await;

    undelivered_acquire(server.addr, shared("req-t")).await;
    wait_until_async(
        "the undelivered shared grant given back",
        Duration::from_secs(3),
        || {
            let mut c = c.clone();
            async move {
                let d = c.describe(describe("sdup")).await.unwrap().into_inner();
                d.holders.len() == 1
            }
        },
    )
    .await;
    assert!(renewed(&mut c, "sdup", &lease.token).await);
}

/// Sends an Acquire over a raw HTTP/2 connection that grants no window for
/// the reply's body, waits for the reply's headers (the handler is done),
/// then resets the stream: the reply is never delivered.
async fn undelivered_acquire(addr: std::net::SocketAddr, req: pb::AcquireRequest) {
    use prost::Message;
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut client, conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let request = http::Request::post(format!("http://{addr}/leasehold.v1.LockService/Acquire"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let (response, mut send) = client.send_request(request, false).expect("send");
    let message = req.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend((message.len() as u32).to_be_bytes());
    frame.extend(message);
    send.send_data(frame.into(), true).expect("send body");
    let response = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .expect("reply headers within 5 s")
        .expect("reply headers");
    assert_eq!(response.status(), 200);
    // Dropping every handle of an open stream resets it (RST_STREAM).
    drop((response, send, client));
    conn.abort();
}

/// A handoff at the waiter's deadline: a grant handed to a waiter just as its deadline
/// comes is delivered or given back, never dropped. Trials race the
/// holder's release against the waiter's deadline; after each, the lock is
/// either the waiter's (it was told so) or free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handoff_at_the_waiters_deadline_is_never_left_behind() {
    let server = TestServer::start(Backend::Memory).await;
    let mut c = server.client().await;
    for trial in 0..30u64 {
        let key = format!("edge-{trial}");
        let holder = lease_of(c.acquire(acquire(&key, 30_000)).await.unwrap().into_inner());
        let waiting = pb::AcquireRequest {
            owner: "waiter".into(),
            ..acquire_wait(&key, 30_000, 10_000)
        };
        // The server stops granting 40 ms before a 400 ms deadline; the
        // release lands around then.
        let waiter = tokio::spawn(acquire_with_server_deadline(
            server.addr,
            waiting,
            Duration::from_millis(400),
        ));
        tokio::time::sleep(Duration::from_millis(345 + trial % 20)).await;
        assert!(
            c.release(release(&key, &holder.token))
                .await
                .unwrap()
                .into_inner()
                .released
        );
        match waiter.await.unwrap() {
            Ok(reply) => {
                let lease = lease_of(reply);
                assert!(released(&mut c, &key, &lease.token).await);
            }
            Err((code, _)) => {
                assert_eq!(code, Code::DeadlineExceeded as i32);
                wait_until_async("nothing left behind", Duration::from_secs(2), || {
                    let mut c = c.clone();
                    let key = key.clone();
                    async move { !held(&mut c, &key).await }
                })
                .await;
            }
        }
    }
}

/// An ambiguous handoff: a handoff whose reply is lost (Redis frozen past the
/// store timeout) to a waiter that has left: when the handoff runs after
/// all, the waiter's grant is given back instead of holding the lock for
/// its whole TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ambiguous_handoff_to_a_waiter_that_left_is_given_back() {
    let redis = tokio::task::block_in_place(RedisServer::start);
    let server = ordered_server(&redis).await;
    let mut c = server.client().await;
    let holder = lease_of(
        c.acquire(acquire("handed", 30_000))
            .await
            .unwrap()
            .into_inner(),
    );
    let waiter = tokio::spawn({
        let mut c = c.clone();
        async move {
            let req = pb::AcquireRequest {
                owner: "waiter".into(),
                ..acquire_wait("handed", 30_000, 20_000)
            };
            c.acquire(req).await
        }
    });
    wait_until("the waiter to queue", Duration::from_secs(5), || {
        server.waiters.has_waiters("handed")
    });

    redis.freeze();
    let base = redis.unread_bytes();
    let releasing = tokio::spawn({
        let mut c = c.clone();
        let token = holder.token.clone();
        async move { c.release(release("handed", &token)).await }
    });
    tokio::task::block_in_place(|| redis.wait_unread_above(base));
    // The waiter's client gives up while the handoff is in flight.
    waiter.abort();
    wait_until("the waiter to leave", Duration::from_secs(5), || {
        !server.waiters.has_waiters("handed")
    });
    let err = releasing.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    redis.thaw();

    wait_until_async(
        "the lost handoff given back",
        Duration::from_secs(3),
        || {
            let mut c = c.clone();
            async move { !held(&mut c, "handed").await }
        },
    )
    .await;
    // The holder's retried Release tells the truth: it was released.
    assert!(
        c.release(release("handed", &holder.token))
            .await
            .unwrap()
            .into_inner()
            .released
    );
}

/// A batch that fails half way, and Redis errors: with Redis out of memory
/// (maxmemory, noeviction), concurrent Releases and Acquires share script
/// calls. Every Release still happens and says so; every Acquire fails on
/// its own, as RESOURCE_EXHAUSTED with a message of ours, not Redis's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_memory_fails_only_the_operations_that_need_memory() {
    let redis = tokio::task::block_in_place(RedisServer::start);
    let config = leasehold::server::ServerConfig {
        store_timeout: Duration::from_millis(2_000),
        health_interval: Duration::from_secs(600),
        ..test_config()
    };
    let server = TestServer::start_tuned(
        Backend::Redis,
        Some(redis.url()),
        unique_prefix(),
        config,
        |redis| redis.pool_size = 1,
    )
    .await;
    let c = server.client().await;
    let mut leases = Vec::new();
    for i in 0..40 {
        let key = format!("full-{i}");
        let lease = lease_of(
            c.clone()
                .acquire(acquire(&key, 60_000))
                .await
                .unwrap()
                .into_inner(),
        );
        leases.push((key, lease.token));
    }
    tokio::task::block_in_place(|| {
        redis.cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
        redis.cli(&["CONFIG", "SET", "maxmemory", "1"]);
    });
    let releases = leases.iter().map(|(key, token)| {
        let mut c = c.clone();
        async move { c.release(release(key, token)).await }
    });
    let acquires = (0..40).map(|i| {
        let mut c = c.clone();
        async move { c.acquire(acquire(&format!("new-{i}"), 60_000)).await }
    });
    let (released, acquired) = tokio::join!(
        futures_util::future::join_all(releases),
        futures_util::future::join_all(acquires)
    );
    tokio::task::block_in_place(|| redis.cli(&["CONFIG", "SET", "maxmemory", "0"]));
    for (result, (key, _)) in released.into_iter().zip(&leases) {
        let reply = result.unwrap_or_else(|e| panic!("{key}: release failed: {e:?}"));
        assert!(reply.into_inner().released, "{key}");
    }
    // Redis lets a script that has written once go on writing (so that a
    // script is never cut in half): an Acquire that shares a script call
    // with a Release may be granted. Each Acquire's answer is true on its
    // own: granted and held, or refused with our own message.
    let mut c = c.clone();
    let mut refused = 0;
    for (i, result) in acquired.into_iter().enumerate() {
        match result {
            Ok(reply) => {
                let lease = lease_of(reply.into_inner());
                assert!(held(&mut c, &format!("new-{i}")).await);
                assert!(!lease.token.is_empty());
            }
            Err(err) => {
                refused += 1;
                assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
                for redis_text in ["OOM", "maxmemory", "script", "user_script"] {
                    assert!(!err.message().contains(redis_text), "{err:?}");
                }
            }
        }
    }
    eprintln!("{refused} of 40 concurrent Acquires refused");
    // Alone, with nothing written before it in its script, an Acquire is
    // refused by Redis: RESOURCE_EXHAUSTED in our words.
    tokio::task::block_in_place(|| redis.cli(&["CONFIG", "SET", "maxmemory", "1"]));
    let err = c.acquire(acquire("alone", 60_000)).await.unwrap_err();
    tokio::task::block_in_place(|| redis.cli(&["CONFIG", "SET", "maxmemory", "0"]));
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(
        err.message(),
        "the lock store is out of memory; retry later"
    );
    for (key, _) in &leases {
        assert!(!held(&mut c, key).await, "{key}");
    }
}

/// A request_id is not a bearer credential. Only the same
/// owner (and tenant) gets the lease again; anyone else presenting the id
/// makes an ordinary Acquire.
async fn a_request_id_replays_only_to_its_owner(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.client().await;
    let first = lease_of(
        c.acquire(with_request_id("rid", "req-x", "alice"))
            .await
            .unwrap()
            .into_inner(),
    );
    let stolen = c
        .acquire(with_request_id("rid", "req-x", "mallory"))
        .await
        .unwrap()
        .into_inner();
    assert!(!stolen.acquired && stolen.lease.is_none(), "{stolen:?}");
    let again = lease_of(
        c.acquire(with_request_id("rid", "req-x", "alice"))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(again.token, first.token);
}

on_every_store!(
    an_undelivered_replay_leaves_the_delivered_lease,
    an_undelivered_shared_replay_leaves_the_delivered_lease,
    a_request_id_replays_only_to_its_owner,
    a_retried_release_after_a_handoff_says_released,
    a_retried_release_after_later_grants_says_released,
);

/// A Release retried after its reply was lost, when the key has been
/// granted and released again since (twice): still true, and it releases
/// nobody else's lease. Each release's memory is its own tombstone, not
/// the record the next grant overwrites.
async fn a_retried_release_after_later_grants_says_released(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.client().await;
    let key = "retry-after-grants";
    let first = lease_of(c.acquire(acquire(key, 30_000)).await.unwrap().into_inner());
    assert!(released(&mut c, key, &first.token).await);
    let second = lease_of(c.acquire(acquire(key, 30_000)).await.unwrap().into_inner());
    assert!(released(&mut c, key, &second.token).await);
    let third = lease_of(c.acquire(acquire(key, 30_000)).await.unwrap().into_inner());
    assert!(third.fencing_token > second.fencing_token);
    assert!(second.fencing_token > first.fencing_token);
    // Both earlier tokens' retries: true, and the third lease is untouched.
    assert!(released(&mut c, key, &first.token).await);
    assert!(released(&mut c, key, &second.token).await);
    assert!(renewed(&mut c, key, &third.token).await);
    assert!(held(&mut c, key).await);
    // A token that never held the key: false.
    assert!(!released(&mut c, key, "never-granted-token").await);
}

/// On Redis a release renames the record to the token's tombstone
/// (grant.lua): the tombstone lives no longer than the lease had left, and
/// does not keep the lease's metadata (up to 4 KiB per release of a busy
/// key); the lock key itself is gone, so the next grant writes a new record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_leaves_a_small_tombstone_for_the_ttl_left() {
    let redis = tokio::task::block_in_place(RedisServer::start);
    let server = TestServer::start_on(
        Backend::Redis,
        Some(redis.url()),
        unique_prefix(),
        test_config(),
    )
    .await;
    let mut c = server.client().await;
    let key = "tombstone-shape";
    let lease = lease_of(
        c.acquire(pb::AcquireRequest {
            metadata: [("job".to_owned(), "x".repeat(2_000))].into(),
            ..acquire(key, 20_000)
        })
        .await
        .unwrap()
        .into_inner(),
    );
    assert!(released(&mut c, key, &lease.token).await);
    // redis_cli trims its output.
    let cli = |args: &[&str]| tokio::task::block_in_place(|| redis.cli(args));
    let pattern = format!("*{{{key}}}:lock:gone:{}", lease.token);
    let tombstone = cli(&["--scan", "--pattern", &pattern]);
    assert!(
        !tombstone.is_empty() && !tombstone.contains('\n'),
        "{tombstone:?}"
    );
    let ttl: i64 = cli(&["PTTL", &tombstone]).parse().unwrap();
    assert!(ttl > 0 && ttl <= 20_000, "tombstone PTTL {ttl}");
    assert_eq!(cli(&["HEXISTS", &tombstone, "meta"]), "0");
    let lock = tombstone.trim_end_matches(&format!(":gone:{}", lease.token));
    assert_eq!(cli(&["EXISTS", lock]), "0");
    assert!(released(&mut c, key, &lease.token).await);
}

/// A Release retried after its reply was lost, when the first one handed
/// the lock to a waiter on the same server (a handoff) and another waiter
/// is queued now: it answers released, and hands nothing over again.
/// (Found by the randomized fault run: the handoff path forgot the
/// tombstone.)
async fn a_retried_release_after_a_handoff_says_released(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.client().await;
    let holder = lease_of(
        c.acquire(acquire("handoff-retry", 30_000))
            .await
            .unwrap()
            .into_inner(),
    );
    let waiters: Vec<_> = (0..2)
        .map(|_| {
            let mut c = c.clone();
            tokio::spawn(async move {
                c.acquire(acquire_wait("handoff-retry", 30_000, 20_000))
                    .await
            })
        })
        .collect();
    wait_until("both waiters to queue", Duration::from_secs(5), || {
        server.waiters.len() == 2
    });
    assert!(
        c.release(release("handoff-retry", &holder.token))
            .await
            .unwrap()
            .into_inner()
            .released
    );
    let first = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(done) = waiters.iter().position(|w| w.is_finished()) {
                return done;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("one waiter granted by the handoff");
    // The retry: true, and the second waiter still waits.
    assert!(
        c.release(release("handoff-retry", &holder.token))
            .await
            .unwrap()
            .into_inner()
            .released
    );
    assert_eq!(server.waiters.len(), 1);
    let d = c
        .describe(describe("handoff-retry"))
        .await
        .unwrap()
        .into_inner();
    assert!(d.held && d.fencing_token > holder.fencing_token);
    for (i, w) in waiters.into_iter().enumerate() {
        if i != first {
            w.abort();
        }
    }
}

/// The same, across tenants: team-b presenting team-a's request_id on a
/// shared key gets no lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_replays_only_to_its_tenant() {
    use leasehold::auth::{Authenticator, Policy};
    let policy = Policy::parse(
        r#"
[[tenant]]
name = "team-a"
prefixes = ["shared/"]
tokens = ["team-a-token-1f9e8d7c6b5a"]

[[tenant]]
name = "team-b"
prefixes = ["shared/"]
tokens = ["team-b-token-0a1b2c3d4e5f"]
"#,
    )
    .expect("policy");
    let config = leasehold::server::ServerConfig {
        auth: Some(std::sync::Arc::new(Authenticator::new(policy, false))),
        ..test_config()
    };
    let server = TestServer::start_with(Backend::Memory, config).await;
    let mut c = server.client().await;
    let as_tenant = |token: &str| {
        let mut r = Request::new(with_request_id("shared/k", "req-t", "same-owner"));
        r.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        r
    };
    let first = c
        .acquire(as_tenant("team-a-token-1f9e8d7c6b5a"))
        .await
        .unwrap();
    assert!(first.into_inner().acquired);
    let other = c
        .acquire(as_tenant("team-b-token-0a1b2c3d4e5f"))
        .await
        .unwrap()
        .into_inner();
    assert!(!other.acquired, "{other:?}");
}

/// A handoff at the waiter's deadline, made to happen on purpose: the waiter's last attempt
/// and the holder's handoff both wait in a frozen Redis, queued on the one
/// connection in that order, and Redis is thawed after the point where the
/// server stops granting (a tenth of the time left before the caller's
/// deadline, at most 100 ms) but before the deadline. Redis answers both
/// at once: the attempt finds the lock held, the handoff grants it to the
/// waiter. However the two replies are scheduled, the grant must reach the
/// waiter or be given back; the code before the fix threw it away when the
/// attempt's "held" came back after that point, and the lock stayed held by
/// nobody for the waiter's whole TTL.
///
/// Against the real binary, so that `LEASEHOLD_TEST_BINARY` can replay it
/// on an older build (4f3d909 left the grant behind in 2 and 4 of 10 rounds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handoff_that_lands_with_the_waiters_last_attempt_is_kept() {
    let redis = tokio::task::block_in_place(RedisServer::start);
    let url = redis.url();
    let server = ServerProcess::start(&[
        "--redis-url",
        &url,
        "--pool-size",
        "1",
        "--health-interval",
        "600s",
        "--store-timeout",
        "5s",
    ]);
    let addr: std::net::SocketAddr = server.addr.parse().unwrap();
    let mut c = LockServiceClient::connect(server.endpoint()).await.unwrap();
    // Which reply the server handles first is up to its scheduler; on the
    // old code a round left the grant behind about one time in four, so 20
    // rounds all passing there would be a 1-in-100 fluke.
    let (mut left_behind, mut delivered) = (0, 0);
    for round in 0..20 {
        let key = format!("last-attempt-{round}");
        let holder = lease_of(c.acquire(acquire(&key, 30_000)).await.unwrap().into_inner());
        // A first waiter subscribes the server to the key's releases, so
        // that the real waiter below does not stall on a subscription.
        let probe = c.acquire(acquire_wait(&key, 30_000, 50)).await.unwrap();
        assert!(!probe.into_inner().acquired);

        redis.freeze();
        let base = redis.unread_bytes();
        let deadline = Duration::from_millis(1_000);
        let sent = Instant::now();
        let waiter = tokio::spawn(acquire_with_server_deadline(
            addr,
            pb::AcquireRequest {
                owner: "waiter".into(),
                ..acquire_wait(&key, 30_000, 20_000)
            },
            deadline,
        ));
        let base = tokio::task::block_in_place(|| redis.wait_unread_above(base));
        let releasing = tokio::spawn({
            let mut c = c.clone();
            let token = holder.token.clone();
            let key = key.clone();
            async move { c.release(release(&key, &token)).await }
        });
        tokio::task::block_in_place(|| redis.wait_unread_above(base));
        // Past the point where the server stops granting (deadline - 100
        // ms), well before the deadline itself.
        tokio::time::sleep_until((sent + deadline - Duration::from_millis(45)).into()).await;
        redis.thaw();

        let holder_released = releasing.await.unwrap().unwrap().into_inner().released;
        assert!(
            holder_released,
            "round {round}: the holder's release happened"
        );
        match waiter.await.unwrap() {
            Ok(reply) => {
                delivered += 1;
                let lease = lease_of(reply);
                assert!(released(&mut c, &key, &lease.token).await);
            }
            Err((code, message)) => {
                assert!(
                    code == Code::DeadlineExceeded as i32 || code == Code::Cancelled as i32,
                    "round {round}: {code} {message}"
                );
                let free = async {
                    let until = Instant::now() + Duration::from_secs(3);
                    while Instant::now() < until {
                        if !held(&mut c, &key).await {
                            return true;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    false
                };
                if !free.await {
                    left_behind += 1;
                }
            }
        }
    }
    eprintln!("grants delivered to the waiter: {delivered} of 20, left behind: {left_behind}");
    assert_eq!(
        left_behind, 0,
        "rounds in which the waiter's grant was left behind, held by nobody"
    );
}
