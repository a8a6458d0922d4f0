//! Hostile input against a real server: property tests over every field of
//! every RPC (arbitrary Unicode, control characters, huge strings, extreme
//! integers, big maps) and over raw, undecodable request bytes; messages
//! above the decoding limit; and floods of streams, attached locks and
//! waiters from one client, with the server's RSS measured before, during
//! and after. Every answer must be OK, INVALID_ARGUMENT or
//! RESOURCE_EXHAUSTED — never INTERNAL or UNKNOWN, never a hang — and the
//! server must stay healthy. `connections` floods the transport: streams
//! on one connection, many connections, silent and idle sockets, and
//! running out of file descriptors.

mod common;
#[path = "hostile/connections.rs"]
mod connections;
#[path = "hostile/h2raw.rs"]
mod h2raw;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use leasehold::pb;
use leasehold::pb::lock_service_client::LockServiceClient;
use leasehold::server::MAX_MESSAGE_BYTES;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use tonic::Code;
use tonic::transport::Channel;

/// Property cases per RPC: enough to cover every strategy branch many
/// times, few enough for CI.
const CASES: u32 = 128;
/// Bound on any one call: a hang fails the property.
const CALL_LIMIT: Duration = Duration::from_secs(10);

fn allowed(code: Code) -> bool {
    matches!(
        code,
        Code::Ok | Code::InvalidArgument | Code::ResourceExhausted
    )
}

/// Strings a client could send: printable, any Unicode with control
/// characters, long runs, the contract's edge cases, and one far above
/// the decoding limit.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => ".{0,40}",
        2 => "[a-z0-9/{}:%-]{1,24}",
        3 => proptest::collection::vec(any::<char>(), 0..48)
            .prop_map(|v| v.into_iter().collect::<String>()),
        1 => (any::<char>(), 0usize..3000).prop_map(|(c, n)| c.to_string().repeat(n)),
        1 => prop::sample::select(vec!["", "\0", "\u{7f}", "\u{85}", "a\nb", "{", "}", "%"])
            .prop_map(str::to_string),
        1 => Just("k".repeat(MAX_MESSAGE_BYTES + 1)),
    ]
}

fn int() -> impl Strategy<Value = u32> {
    prop_oneof![
        any::<u32>(),
        prop::sample::select(vec![
            0u32,
            1,
            99,
            100,
            3_600_000,
            3_600_001,
            300_001,
            u32::MAX
        ]),
        0u32..400_000,
    ]
}

fn metadata() -> impl Strategy<Value = HashMap<String, String>> {
    prop_oneof![
        3 => proptest::collection::hash_map(".{0,12}", ".{0,24}", 0..24),
        1 => (0usize..6000).prop_map(|n| (0..n).map(|i| (i.to_string(), "v".into())).collect()),
        1 => (".{1,8}", 0usize..70_000).prop_map(|(k, n)| HashMap::from([(k, "m".repeat(n))])),
    ]
}

fn acquire_request() -> impl Strategy<Value = pb::AcquireRequest> {
    (
        text(),
        int(),
        int(),
        text(),
        metadata(),
        text(),
        -1i32..4,
        int(),
    )
        .prop_map(
            |(key, ttl_ms, wait_ms, owner, metadata, request_id, mode, shared_limit)| {
                pb::AcquireRequest {
                    key,
                    ttl_ms,
                    wait_ms,
                    owner,
                    metadata,
                    request_id,
                    mode,
                    shared_limit,
                }
            },
        )
}

fn keepalive_request() -> impl Strategy<Value = pb::KeepAliveRequest> {
    (text(), text(), int(), any::<bool>()).prop_map(|(key, token, ttl_ms, release)| {
        pb::KeepAliveRequest {
            key,
            token,
            ttl_ms,
            release,
        }
    })
}

async fn bounded<T>(
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<Result<T, tonic::Status>, TestCaseError> {
    match tokio::time::timeout(CALL_LIMIT, call).await {
        Ok(result) => Ok(result.map(tonic::Response::into_inner)),
        Err(_) => Err(TestCaseError::fail("no answer within the call limit")),
    }
}

fn check<T: std::fmt::Debug>(
    rpc: &str,
    result: &Result<T, tonic::Status>,
) -> Result<(), TestCaseError> {
    if let Err(status) = result {
        prop_assert!(
            allowed(status.code()),
            "{rpc}: {:?}: {}",
            status.code(),
            status.message()
        );
    }
    Ok(())
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    })
}

#[test]
fn arbitrary_fields_get_contract_codes_and_the_server_stays_healthy() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (server, client) = rt.block_on(async {
        let server = TestServer::start(Backend::Memory).await;
        let client = server.client().await;
        (server, client)
    });

    runner()
        .run(&acquire_request(), |req| {
            rt.block_on(async {
                let mut c = client.clone();
                let key = req.key.clone();
                let result = bounded(c.acquire(req)).await?;
                check("Acquire", &result)?;
                // Nothing stays held, so a later waiting Acquire never waits.
                if let Ok(pb::AcquireResponse {
                    lease: Some(lease), ..
                }) = &result
                {
                    let released = bounded(c.release(release(&key, &lease.token))).await?;
                    let ok = matches!(released, Ok(pb::ReleaseResponse { released: true }));
                    prop_assert!(ok, "the grant was released: {:?}", released);
                }
                Ok(())
            })
        })
        .unwrap();

    runner()
        .run(&(text(), text(), int()), |(key, token, ttl_ms)| {
            rt.block_on(async {
                let mut c = client.clone();
                let released = bounded(c.release(pb::ReleaseRequest {
                    key: key.clone(),
                    token: token.clone(),
                }))
                .await?;
                check("Release", &released)?;
                let wrongly = matches!(released, Ok(pb::ReleaseResponse { released: true }));
                prop_assert!(!wrongly, "a random token released something");
                let renewed = bounded(c.renew(pb::RenewRequest {
                    key: key.clone(),
                    token,
                    ttl_ms,
                }))
                .await?;
                check("Renew", &renewed)?;
                let wrongly = matches!(renewed, Ok(pb::RenewResponse { renewed: true, .. }));
                prop_assert!(!wrongly, "a random token renewed something");
                let described = bounded(c.describe(pb::DescribeRequest { key })).await?;
                check("Describe", &described)?;
                Ok(())
            })
        })
        .unwrap();

    runner()
        .run(
            &proptest::collection::vec(keepalive_request(), 0..8),
            |requests| {
                rt.block_on(async {
                    let mut c = client.clone();
                    let sent = requests.len();
                    let stream = bounded(c.keep_alive(tokio_stream::iter(requests))).await?;
                    let mut stream = match stream {
                        Ok(stream) => stream,
                        Err(status) => {
                            prop_assert!(allowed(status.code()), "{status:?}");
                            return Ok(());
                        }
                    };
                    let mut answers = 0;
                    loop {
                        let next = tokio::time::timeout(CALL_LIMIT, stream.message())
                            .await
                            .map_err(|_| TestCaseError::fail("KeepAlive hung"))?;
                        match next {
                            Ok(Some(answer)) => {
                                prop_assert!(!answer.alive, "nothing can be alive: {answer:?}");
                                answers += 1;
                            }
                            // Every request was answered, then the stream ended.
                            Ok(None) => {
                                prop_assert_eq!(answers, sent);
                                break;
                            }
                            Err(status) => {
                                prop_assert!(allowed(status.code()), "{status:?}");
                                break;
                            }
                        }
                    }
                    Ok(())
                })
            },
        )
        .unwrap();

    rt.block_on(async {
        server.wait_health("SERVING", Duration::from_secs(10)).await;
        let mut c = client.clone();
        let lease = lease_of(
            c.acquire(acquire("after/props", 5_000))
                .await
                .unwrap()
                .into_inner(),
        );
        assert!(
            c.release(release("after/props", &lease.token))
                .await
                .unwrap()
                .into_inner()
                .released
        );
    });
}

/// Sends `frame` (a gRPC length-prefixed message, or garbage) to `path`
/// over a bare HTTP/2 stream and returns the grpc-status.
async fn raw_call(addr: SocketAddr, path: &str, frame: Vec<u8>) -> i32 {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(conn);
    let request = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let (response, mut send) = client.send_request(request, false).expect("send request");
    send.send_data(frame.into(), true).expect("send body");
    let response = response.await.expect("response headers");
    let code = |h: &http::HeaderMap| {
        h.get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i32>().ok())
    };
    if let Some(c) = code(response.headers()) {
        return c;
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("body");
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await.expect("trailers").unwrap_or_default();
    code(&trailers).unwrap_or(-1)
}

#[test]
fn undecodable_bytes_are_invalid_argument() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = rt.block_on(TestServer::start(Backend::Memory));
    let paths = prop::sample::select(vec![
        "/leasehold.v1.LockService/Acquire",
        "/leasehold.v1.LockService/Release",
        "/leasehold.v1.LockService/Renew",
        "/leasehold.v1.LockService/Describe",
    ]);
    // A frame: compressed flag, a declared length that may lie, and bytes.
    let frames = (
        prop::sample::select(vec![0u8, 1, 7]),
        proptest::collection::vec(any::<u8>(), 0..256),
        prop_oneof![Just(None), any::<u16>().prop_map(Some)],
    )
        .prop_map(|(flag, body, declared)| {
            let len = declared.map_or(body.len() as u32, u32::from);
            let mut frame = vec![flag];
            frame.extend(len.to_be_bytes());
            frame.extend(body);
            frame
        });
    let codes = std::sync::Mutex::new(HashMap::new());
    runner()
        .run(&(paths, frames), |(path, frame)| {
            let code = rt.block_on(async {
                tokio::time::timeout(CALL_LIMIT, raw_call(server.addr, path, frame)).await
            });
            let code = code.map_err(|_| TestCaseError::fail("raw call hung"))?;
            // OK (bytes that happen to decode), INVALID_ARGUMENT, RESOURCE_EXHAUSTED.
            prop_assert!([0, 3, 8].contains(&code), "{path}: grpc-status {code}");
            *codes.lock().unwrap().entry(code).or_insert(0) += 1;
            Ok(())
        })
        .unwrap();
    let codes = codes.into_inner().unwrap();
    assert!(
        codes.get(&3).copied().unwrap_or(0) > 0,
        "some garbage must have been refused: {codes:?}"
    );
    // Garbage that is certainly not protobuf: a truncated varint field.
    let code = rt.block_on(raw_call(
        server.addr,
        "/leasehold.v1.LockService/Describe",
        vec![0, 0, 0, 0, 2, 0x0a, 0xff],
    ));
    assert_eq!(code, 3, "undecodable bytes are INVALID_ARGUMENT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_over_the_limit_are_resource_exhausted() {
    let server = TestServer::start(Backend::Memory).await;
    let mut c = server.client().await;
    let huge = "h".repeat(MAX_MESSAGE_BYTES + 1);

    let status = c
        .acquire(acquire(&huge, 30_000))
        .await
        .expect_err("too big");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let status = c.describe(describe(&huge)).await.expect_err("too big");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");

    // On a KeepAlive stream: the stream ends RESOURCE_EXHAUSTED, and the
    // locks it kept alive are released (the client broke its own stream).
    let lease = lease_of(
        c.acquire(acquire("big/held", 30_000))
            .await
            .unwrap()
            .into_inner(),
    );
    let mut session = KeepAliveSession::open(&mut c).await.expect("open");
    assert!(session.renew("big/held", &lease.token, 0).await.alive);
    session.push(&huge, &lease.token, 0, false).await;
    let end = session.next().await.expect_err("stream ends");
    assert_eq!(end.code(), Code::ResourceExhausted, "{end:?}");
    wait_until_async(
        "the stream's lock to be released",
        Duration::from_secs(10),
        || {
            let mut c = c.clone();
            async move {
                !c.describe(describe("big/held"))
                    .await
                    .unwrap()
                    .into_inner()
                    .held
            }
        },
    )
    .await;
}

async fn wait_until_async<F, Fut>(what: &str, within: Duration, mut ready: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + within;
    while !ready().await {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The resident set size of a process, in KiB, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

const MAX_STREAMS: usize = 16;
const MAX_LOCKS: usize = 64;
const MAX_WAITERS: usize = 256;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_hit_the_limits_not_the_memory() {
    let server = tokio::task::block_in_place(|| {
        ServerProcess::start(&[
            "--max-streams-per-connection",
            &MAX_STREAMS.to_string(),
            "--max-locks-per-stream",
            &MAX_LOCKS.to_string(),
            "--max-waiters",
            &MAX_WAITERS.to_string(),
        ])
    });
    let pid = server.pid();
    let endpoint = server.endpoint();
    let channel = Channel::from_shared(endpoint.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = LockServiceClient::new(channel.clone());
    // Warm up: the first calls allocate the runtime's and the store's
    // steady-state buffers.
    for i in 0..200 {
        let key = format!("warm/{i}");
        let lease = lease_of(c.acquire(acquire(&key, 30_000)).await.unwrap().into_inner());
        c.release(release(&key, &lease.token)).await.unwrap();
    }
    let before = rss_kib(pid);

    // 1. Streams: 20x the per-connection limit on one connection.
    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..MAX_STREAMS * 20 {
        match KeepAliveSession::open(&mut c).await {
            Ok(s) => open.push(s),
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                refused += 1;
            }
        }
    }
    assert_eq!(open.len(), MAX_STREAMS);
    assert_eq!(refused, MAX_STREAMS * 19);

    // 2. Attached locks: one more than the per-stream limit.
    let mut leases = Vec::new();
    for i in 0..=MAX_LOCKS {
        let key = format!("flood/{i}");
        leases.push((
            key.clone(),
            lease_of(c.acquire(acquire(&key, 30_000)).await.unwrap().into_inner()),
        ));
    }
    let session = &mut open[0];
    for (key, lease) in &leases[..MAX_LOCKS] {
        assert!(session.renew(key, &lease.token, 0).await.alive);
    }
    let (key, lease) = &leases[MAX_LOCKS];
    session.push(key, &lease.token, 0, false).await;
    let end = session.next().await.expect_err("over the lock limit");
    assert_eq!(end.code(), Code::ResourceExhausted);

    // 3. Messages: 20 000 requests as fast as they can be written on one
    // stream, answered in order while the server reads at its own pace.
    let flood_key = "k".repeat(500);
    let other = Channel::from_shared(endpoint.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::KeepAliveRequest>(64);
    let mut flood = LockServiceClient::new(other)
        .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("flood stream")
        .into_inner();
    let writer = tokio::spawn(async move {
        for _ in 0..20_000 {
            let req = pb::KeepAliveRequest {
                key: flood_key.clone(),
                token: "f".repeat(32),
                ..Default::default()
            };
            if tx.send(req).await.is_err() {
                break;
            }
        }
    });
    let mut answers = 0;
    while let Some(answer) = tokio::time::timeout(Duration::from_secs(60), flood.message())
        .await
        .expect("flood answers keep coming")
        .expect("flood stream healthy")
    {
        assert!(!answer.alive);
        answers += 1;
    }
    writer.await.unwrap();
    assert_eq!(answers, 20_000);

    // 4. Waiters: a held key and 1.5x the waiter limit, over 4 connections
    // (HTTP/2 caps concurrent streams per connection).
    let held = lease_of(
        c.acquire(acquire("flood/held", 60_000))
            .await
            .unwrap()
            .into_inner(),
    );
    let mut waiting = tokio::task::JoinSet::new();
    let per_conn = MAX_WAITERS * 3 / 2 / 4;
    for _ in 0..4 {
        let ch = Channel::from_shared(endpoint.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        for _ in 0..per_conn {
            let mut w = LockServiceClient::new(ch.clone());
            waiting.spawn(async move {
                w.acquire(acquire_wait("flood/held", 30_000, 30_000))
                    .await
                    .map(|_| ())
            });
        }
    }
    let mut exhausted = 0;
    while exhausted < per_conn * 4 - MAX_WAITERS {
        let done = tokio::time::timeout(Duration::from_secs(20), waiting.join_next())
            .await
            .expect("refusals come at once")
            .expect("tasks left")
            .unwrap();
        let status = done.expect_err("a waiter cannot get the held lock");
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        exhausted += 1;
    }
    let during = rss_kib(pid);

    // Everything ends: waiters cancelled, streams closed, locks released.
    waiting.abort_all();
    while waiting.join_next().await.is_some() {}
    drop(open);
    c.release(release("flood/held", &held.token)).await.unwrap();
    for (key, lease) in &leases {
        c.release(release(key, &lease.token)).await.unwrap();
    }
    // The server is still well: a fresh lock works.
    let lease = lease_of(
        c.acquire(acquire("flood/after", 5_000))
            .await
            .unwrap()
            .into_inner(),
    );
    assert!(
        c.release(release("flood/after", &lease.token))
            .await
            .unwrap()
            .into_inner()
            .released
    );
    let after = rss_kib(pid);

    eprintln!(
        "server RSS: before floods {before} KiB, during {during} KiB (+{} KiB), after {after} KiB",
        during.saturating_sub(before)
    );
    // Generous: the point is "bounded", not a number (the figures are in
    // documentation/security.md).
    assert!(
        during < before + 64 * 1024,
        "RSS grew from {before} KiB to {during} KiB under the floods"
    );
    assert!(
        after < before + 64 * 1024,
        "RSS {after} KiB after the floods"
    );
}
