//! The Python client (`clients/python/`, stubs generated from the proto by
//! grpcio-tools) against the real `leasehold serve` binary on a real Redis:
//! the example takes a lock, keeps it alive over its KeepAlive stream past
//! the TTL, and gives it back by ending the stream; SIGTERM and SIGKILL of
//! the Python process release it too; and its stream re-attaches the lock
//! when the server it talks to is restarted (SIGTERM) or killed (SIGKILL).
//!
//! Needs `python3` with grpcio and grpcio-tools (`./test.sh` installs them);
//! without them these tests fail and say what to install.

mod common;

use std::process::Child;
use std::time::{Duration, Instant};

use common::python::{python, python_command};
use common::*;
use leasehold::pb;
use leasehold::pb::lock_service_client::LockServiceClient;
use tonic::transport::Channel;

/// `python3 clients/python/example.py --address ADDR ARGS...`
fn example(addr: &str, args: &[&str]) -> (Child, Output) {
    let mut cmd = python_command();
    cmd.arg("clients/python/example.py")
        .args(["--address", addr, "--owner", "py-test"])
        .args(args);
    let mut child = spawn_tied(cmd);
    let output = Output::capture(&mut child);
    (child, output)
}

/// The fencing token from a `HOLDING key=K fencing_token=N` line.
#[track_caller]
fn fencing_of(line: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("fencing_token="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no fencing_token in {line:?}"))
}

async fn client(endpoint: String) -> LockServiceClient<Channel> {
    LockServiceClient::connect(endpoint).await.expect("connect")
}

async fn describe_key(c: &mut LockServiceClient<Channel>, key: &str) -> pb::DescribeResponse {
    c.describe(describe(key))
        .await
        .expect("describe")
        .into_inner()
}

/// Waits (blocking) for an output line of the Python example.
fn line(output: &Output, needle: &str) -> String {
    tokio::task::block_in_place(|| output.wait_for(needle, Duration::from_secs(30)))
}

fn redis_server(prefix: &str) -> ServerProcess {
    let url = shared_redis().url();
    ServerProcess::start(&["--redis-url", &url, "--key-prefix", prefix])
}

/// Polls Describe for `span`: the lock must stay held by `fence` throughout.
/// On failure, prints what the Python example said.
async fn held_throughout(
    c: &mut LockServiceClient<Channel>,
    key: &str,
    fence: u64,
    span: Duration,
    python: &Output,
) {
    let end = Instant::now() + span;
    let mut checks = 0;
    while Instant::now() < end {
        let d = describe_key(c, key).await;
        assert!(
            d.held,
            "{key} lapsed after {checks} checks: {d:?}\n{:#?}",
            python.all()
        );
        assert_eq!(d.fencing_token, fence, "{key} changed hands: {d:?}");
        checks += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(checks >= 5, "only {checks} Describe calls in {span:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_keeps_the_lock_past_its_ttl_then_ending_the_stream_releases_it() {
    let server = tokio::task::block_in_place(|| redis_server(&unique_prefix()));
    let mut c = client(server.endpoint()).await;
    let key = "py/nightly";
    let (mut py, out) = example(
        &server.addr,
        &["--key", key, "--ttl-ms", "2000", "--work-seconds", "5"],
    );
    let fence = fencing_of(&line(&out, "HOLDING"));
    let d = describe_key(&mut c, key).await;
    assert!(d.held && d.owner == "py-test", "{d:?}");
    assert_eq!(d.fencing_token, fence);
    assert_eq!(
        d.metadata.get("client").map(String::as_str),
        Some("python-example")
    );
    assert!(d.ttl_ms <= 2000, "{d:?}");
    // Over twice the TTL, still held: the stream renews it (every TTL/3, so
    // a renewal may come 1.3 s late before the lock lapses).
    held_throughout(&mut c, key, fence, Duration::from_millis(4_200), &out).await;

    line(&out, "RELEASED");
    let status = tokio::task::block_in_place(|| wait_exit(&mut py, Duration::from_secs(15)));
    assert_eq!(status.code(), Some(0), "{:?}", out.all());
    // The example returns only after the server ended its stream, which the
    // server does after releasing the attached lock.
    let d = describe_key(&mut c, key).await;
    assert!(!d.held, "released when the stream ended: {d:?}");
    let again = lease_of(c.acquire(acquire(key, 1_000)).await.unwrap().into_inner());
    assert!(again.fencing_token > fence);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_the_work_and_the_stream_end_releases_the_lock() {
    let server = tokio::task::block_in_place(|| redis_server(&unique_prefix()));
    let mut c = client(server.endpoint()).await;
    let key = "py/sigterm";
    // A 60 s TTL: a release within seconds can only be the stream end.
    let (mut py, out) = example(
        &server.addr,
        &["--key", key, "--ttl-ms", "60000", "--work-seconds", "600"],
    );
    let fence = fencing_of(&line(&out, "HOLDING"));
    line(&out, "WORKING step=1");
    assert_eq!(describe_key(&mut c, key).await.fencing_token, fence);

    // A waiter queued behind the example gets the lock once it is released.
    let mut waiter = c.clone();
    let waiting = tokio::spawn(async move {
        waiter
            .acquire(acquire_wait("py/sigterm", 30_000, 20_000))
            .await
    });
    signal(py.id(), "TERM");
    line(&out, "RELEASED");
    let status = tokio::task::block_in_place(|| wait_exit(&mut py, Duration::from_secs(15)));
    assert_eq!(status.code(), Some(0), "{:?}", out.all());
    let got = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the waiter is woken well before the 60 s TTL: {:#?}\n{:#?}",
                out.all(),
                server.output.all()
            )
        })
        .unwrap()
        .unwrap()
        .into_inner();
    let lease = lease_of(got);
    assert!(lease.fencing_token > fence);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_python_process_releases_the_lock() {
    let server = tokio::task::block_in_place(|| redis_server(&unique_prefix()));
    let mut c = client(server.endpoint()).await;
    let key = "py/killed";
    let (mut py, out) = example(
        &server.addr,
        &["--key", key, "--ttl-ms", "60000", "--work-seconds", "600"],
    );
    let fence = fencing_of(&line(&out, "HOLDING"));
    line(&out, "WORKING step=1");
    assert_eq!(describe_key(&mut c, key).await.fencing_token, fence);

    py.kill().expect("SIGKILL python");
    let _ = py.wait();
    // The kernel closes its socket; the server sees the stream end and
    // releases at once, long before the 60 s TTL.
    let released = Instant::now();
    let end = released + Duration::from_secs(10);
    loop {
        if !describe_key(&mut c, key).await.held {
            break;
        }
        assert!(
            Instant::now() < end,
            "still held 10 s after SIGKILL: {:#?}",
            server.output.all()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        out.find("RELEASED").is_none(),
        "SIGKILL leaves no time to release"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_lock_is_reported_not_taken() {
    let server = tokio::task::block_in_place(|| redis_server(&unique_prefix()));
    let mut c = client(server.endpoint()).await;
    let key = "py/busy";
    let held = lease_of(c.acquire(acquire(key, 30_000)).await.unwrap().into_inner());
    let (mut py, out) = example(&server.addr, &["--key", key, "--wait-ms", "200"]);
    line(&out, "BUSY");
    let status = tokio::task::block_in_place(|| wait_exit(&mut py, Duration::from_secs(15)));
    assert_eq!(status.code(), Some(3), "{:?}", out.all());
    assert_eq!(
        describe_key(&mut c, key).await.fencing_token,
        held.fencing_token
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_reattaches_after_a_graceful_server_restart() {
    // An upgrade: the server is stopped with SIGTERM (its streams end with
    // UNAVAILABLE, locks kept) and a new one starts on the same address and
    // Redis; the client re-attaches within the TTL and keeps the lock.
    reattaches_after_server_stop("TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_reattaches_after_the_server_is_killed() {
    // A crash: nobody releases the lock, the client's connection breaks,
    // and it re-attaches on the replacement the same way.
    reattaches_after_server_stop("KILL").await;
}

async fn reattaches_after_server_stop(sig: &str) {
    let prefix = unique_prefix();
    let url = tokio::task::block_in_place(|| shared_redis().url());
    let args = ["--redis-url", url.as_str(), "--key-prefix", prefix.as_str()];
    let mut old = tokio::task::block_in_place(|| ServerProcess::start(&args));
    let addr = old.addr.clone();
    let key = "py/upgrade";
    let (mut py, out) = example(
        &addr,
        &["--key", key, "--ttl-ms", "8000", "--work-seconds", "600"],
    );
    let fence = fencing_of(&line(&out, "HOLDING"));
    line(&out, "WORKING step=1");

    let stopped = Instant::now();
    old.signal(sig);
    let status = tokio::task::block_in_place(|| old.wait_exit(Duration::from_secs(15)));
    if sig == "TERM" {
        assert_eq!(status.code(), Some(0), "graceful exit");
    }
    drop(old);
    let new = tokio::task::block_in_place(|| ServerProcess::start_on(&addr, &args));
    let mut c = client(new.endpoint()).await;
    // Until 2 s past a TTL after the old server went away, the lock stays
    // the example's: its new stream renews it. (The TTL leaves the client
    // over 5 s to re-attach, for a loaded machine.)
    let until = stopped + Duration::from_millis(10_000);
    held_throughout(
        &mut c,
        key,
        fence,
        until.saturating_duration_since(Instant::now()),
        &out,
    )
    .await;
    assert!(
        out.find("re-attaching").is_some(),
        "the client saw its stream end: {:?}",
        out.all()
    );

    signal(py.id(), "TERM");
    line(&out, "RELEASED");
    let status = tokio::task::block_in_place(|| wait_exit(&mut py, Duration::from_secs(15)));
    assert_eq!(status.code(), Some(0), "{:?}", out.all());
    assert!(!describe_key(&mut c, key).await.held);
}

const PY_MODES: &str = r#"
import sys
import grpc
from leasehold_client import LeaseholdClient, lock_pb2
addr, key, wkey = sys.argv[1], sys.argv[2], sys.argv[3]
client = LeaseholdClient(addr)
a = client.semaphore(key, 2, ttl_ms=30000, owner="py-a")
b = client.semaphore(key, 2, ttl_ms=30000, owner="py-b")
c = client.semaphore(key, 2, ttl_ms=30000)
print("PERMITS", a is not None, b is not None, c is None, a.shared, b.fencing_token > a.fencing_token)
try:
    client.semaphore(key, 3)
    print("MISMATCH none")
except grpc.RpcError as e:
    print("MISMATCH", e.code().name)
ka = client.keepalive()
ka2 = client.keepalive()
assert ka.attach(a)
try:
    ka.attach(b)
    print("SECOND PERMIT attached")
except ValueError:
    print("SECOND PERMIT refused")
assert ka2.attach(b)
watch = client.watch(wkey, timeout=30)
events = iter(watch)
first = next(events)
print("EVENT", lock_pb2.WatchEvent.Kind.Name(first.kind), first.state.held)
print("WATCHING")
for ev in events:
    print("EVENT", lock_pb2.WatchEvent.Kind.Name(ev.kind), ev.fencing_token, ev.state.held, ev.state.owner or "-")
    if ev.kind == lock_pb2.WatchEvent.KIND_RELEASED:
        break
watch.cancel()
print("CANCELLED", list(events))
ka.close()
print("HOLDERS", len(client.describe(key).holders))
ka2.close()
print("HOLDERS", len(client.describe(key).holders))
"#;

/// The Python client's lock modes and Watch: a semaphore of two permits
/// grants two and refuses a third and a different limit; one stream keeps
/// one permit of a key (a second is refused, not silently swapped); each
/// stream's end gives back its own permit; a watch sees STATE, then a Rust
/// client's grant and release with its fencing token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_semaphore_permits_and_watch_events() {
    let server = tokio::task::block_in_place(|| redis_server(&unique_prefix()));
    let mut c = client(server.endpoint()).await;
    let (key, wkey) = ("py/permits", "py/watched");
    let (mut py, lines) = python(PY_MODES, &[&server.addr, key, wkey]);
    let next = || {
        tokio::task::block_in_place(|| lines.recv_timeout(Duration::from_secs(20)))
            .expect("the script goes on")
    };
    assert_eq!(next(), "PERMITS True True True True True");
    assert_eq!(next(), "MISMATCH FAILED_PRECONDITION");
    assert_eq!(next(), "SECOND PERMIT refused");
    let d = describe_key(&mut c, key).await;
    assert_eq!(d.holders.len(), 2, "{d:?}");
    assert_eq!(d.shared_limit, 2);

    assert_eq!(next(), "EVENT KIND_STATE False");
    assert_eq!(next(), "WATCHING");
    let mut req = acquire(wkey, 30_000);
    req.owner = "rust".into();
    let lease = lease_of(c.acquire(req).await.unwrap().into_inner());
    let fence = lease.fencing_token;
    assert_eq!(next(), format!("EVENT KIND_ACQUIRED {fence} True rust"));
    let released = c
        .release(release(wkey, &lease.token))
        .await
        .unwrap()
        .into_inner();
    assert!(released.released);
    assert_eq!(next(), format!("EVENT KIND_RELEASED {fence} False -"));
    assert_eq!(next(), "CANCELLED []");
    assert_eq!(next(), "HOLDERS 1");
    assert_eq!(next(), "HOLDERS 0");
    let status = tokio::task::block_in_place(|| wait_exit(&mut py, Duration::from_secs(15)));
    assert_eq!(status.code(), Some(0));
}
