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

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;
use leasehold::pb;
use leasehold::pb::lock_service_client::LockServiceClient;
use tonic::transport::Channel;

const INSTALL_HINT: &str = "the Python client tests need python3 with grpcio and grpcio-tools: \
     python3 -m pip install -r clients/python/requirements.txt (./test.sh installs them)";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Generates the stubs once per test binary, with the repository's own
/// `clients/python/generate.py`, into cargo's scratch directory for
/// integration tests (under `target/`, so nothing is left in /tmp).
fn python_stubs() -> &'static Path {
    static STUBS: OnceLock<PathBuf> = OnceLock::new();
    STUBS.get_or_init(|| {
        let probe = Command::new("python3")
            .args(["-c", "import grpc, grpc_tools"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run python3 ({e}); {INSTALL_HINT}"));
        assert!(
            probe.status.success(),
            "{INSTALL_HINT}\n{}",
            String::from_utf8_lossy(&probe.stderr)
        );
        // One directory per test process, so concurrent runs never read
        // each other's half-written files.
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("python-stubs-{}", std::process::id()));
        let out = Command::new("python3")
            .arg(repo().join("clients/python/generate.py"))
            .arg("--out")
            .arg(&dir)
            .output()
            .expect("run generate.py");
        assert!(
            out.status.success(),
            "generate.py failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(dir.join("leasehold/v1/lock_pb2_grpc.py").is_file());
        dir
    })
}

/// `python3 clients/python/example.py --address ADDR ARGS...`
fn example(addr: &str, args: &[&str]) -> (Child, Output) {
    let stubs = python_stubs();
    let mut cmd = Command::new("python3");
    cmd.current_dir(repo())
        .env("LEASEHOLD_PY_STUBS", stubs)
        .env("PYTHONUNBUFFERED", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .arg("clients/python/example.py")
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
