//! No client believes it holds a lock longer than the server does (issue
//! 22): a TCP proxy between client and server delays or freezes traffic, a
//! rival client waits for the same lock and records when it is granted,
//! and the client's belief — the SDK's `lost()`, the CLI's command running,
//! the Python client's `is_alive()` — must end no later than that grant.
//! Also: a process that exits right after `lock()` returns leaves its lock
//! free (the attach was answered first), and `release()` of a guard that
//! knows it is lost answers at once.
//!
//! The rival's grant instant is when its Acquire reply arrived over a
//! direct loopback connection (the grant is at most that, minus well under
//! a millisecond). Margins (rival's grant − end of belief) are printed.

mod common;
#[path = "belief/proxy.rs"]
mod proxy;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use leasehold::client::{Client, Error};
use proxy::{Mode, Proxy};
use tokio::task::JoinHandle;

async fn connect(endpoint: String) -> Client {
    Client::builder()
        .endpoints(endpoint)
        .retry_for(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect")
}

/// Waits (forever, bounded by the caller) for `key` over a direct
/// connection; returns when its Acquire reply came, on both clocks.
async fn rival(endpoint: String, key: &str) -> JoinHandle<(Instant, SystemTime)> {
    let client = connect(endpoint).await;
    let key = key.to_string();
    tokio::spawn(async move {
        let lease = client
            .lock(key)
            .ttl(Duration::from_secs(30))
            .lease()
            .await
            .expect("the rival is granted");
        assert!(lease.fencing_token > 0);
        (Instant::now(), SystemTime::now())
    })
}

/// Waits until `n` Acquires wait on the server (a real signal, polled).
async fn waiting(server: &TestServer, n: usize) {
    let end = Instant::now() + Duration::from_secs(10);
    while server.waiters.len() < n {
        assert!(Instant::now() < end, "{n} waiters never showed up");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The gap from `a` to `b` in ms, negative if `b` is earlier.
fn gap(a: Instant, b: Instant) -> f64 {
    if b >= a { ms(b - a) } else { -ms(a - b) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_frozen_connection_lost_fires_before_the_rival_is_granted() {
    let server = TestServer::start(Backend::Memory).await;
    let proxy = Proxy::start(server.addr).await;
    let client = connect(proxy.endpoint()).await;
    let guard = client
        .lock("belief/freeze")
        .ttl(Duration::from_secs(1))
        .wait(Duration::ZERO)
        .await
        .expect("acquired");
    let lost = guard.lost();
    let rival = rival(server.endpoint(), "belief/freeze").await;
    waiting(&server, 1).await;
    proxy.set(Mode::Pause);
    let reason = tokio::time::timeout(Duration::from_secs(5), lost)
        .await
        .expect("lost() fires");
    let lost_at = Instant::now();
    let (granted, _) = tokio::time::timeout(Duration::from_secs(5), rival)
        .await
        .expect("the rival is granted once the lease expires")
        .unwrap();
    let margin = gap(lost_at, granted);
    println!("freeze: lost ({reason}) {margin:.1} ms before the rival's grant");
    assert!(
        lost_at <= granted,
        "believed {:.1} ms past the rival's grant",
        -margin
    );
    assert!(guard.is_lost());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_delayed_replies_stall_the_stream_but_never_overlap() {
    let server = TestServer::start(Backend::Memory).await;
    let proxy = Proxy::start(server.addr).await;
    let client = connect(proxy.endpoint()).await;
    let guard = client
        .lock("belief/stall")
        .ttl(Duration::from_secs(3))
        .wait(Duration::ZERO)
        .await
        .expect("acquired");
    let lost = guard.lost();
    let rival = rival(server.endpoint(), "belief/stall").await;
    waiting(&server, 1).await;
    // Round trips of 1.2 s against a stall limit of TTL/3 = 1 s.
    proxy.delay(Duration::from_millis(600), Duration::from_millis(600));
    let reason = tokio::time::timeout(Duration::from_secs(15), lost)
        .await
        .expect("lost() fires: renewals cannot keep up");
    let lost_at = Instant::now();
    let (granted, _) = tokio::time::timeout(Duration::from_secs(15), rival)
        .await
        .expect("the rival is granted")
        .unwrap();
    let margin = gap(lost_at, granted);
    println!("stall: lost ({reason}) {margin:.1} ms before the rival's grant");
    assert!(
        lost_at <= granted,
        "believed {:.1} ms past the rival's grant",
        -margin
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_waiting_acquire_with_a_late_reply_is_not_believed() {
    let server = TestServer::start(Backend::Memory).await;
    let holder = connect(server.endpoint()).await;
    let held = holder
        .lock("belief/late")
        .ttl(Duration::from_secs(30))
        .wait(Duration::ZERO)
        .lease()
        .await
        .expect("held");
    let proxy = Proxy::start(server.addr).await;
    let client = connect(proxy.endpoint()).await;
    // Granted 1 s TTL after a wait; the reply takes 1.5 s to come back.
    proxy.delay(Duration::ZERO, Duration::from_millis(1500));
    let waiter = tokio::spawn(async move {
        let result = client.lock("belief/late").ttl(Duration::from_secs(1)).await;
        let returned = Instant::now();
        match result {
            Ok(guard) => {
                guard.lost().await;
                (Some(returned), Instant::now())
            }
            Err(e) => {
                assert!(matches!(e, Error::Lost { .. }), "{e}");
                (None, returned)
            }
        }
    });
    waiting(&server, 1).await;
    let rival = rival(server.endpoint(), "belief/late").await;
    waiting(&server, 2).await;
    assert!(holder.release("belief/late", held.token).await.unwrap());
    let (granted, _) = tokio::time::timeout(Duration::from_secs(10), rival)
        .await
        .expect("the rival is granted when the late grant expires")
        .unwrap();
    let (believed_from, until) = tokio::time::timeout(Duration::from_secs(15), waiter)
        .await
        .expect("lock() ends")
        .unwrap();
    match believed_from {
        None => println!("late reply: never believed (lock() said Lost)"),
        Some(from) => {
            let margin = gap(until, granted);
            println!(
                "late reply: believed from {:.1} ms, lost {margin:.1} ms before the rival's grant",
                gap(granted, from)
            );
            assert!(
                until <= granted,
                "believed {:.1} ms past the rival's grant",
                -margin
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_of_a_lost_guard_answers_at_once() {
    let mut server = TestServer::start(Backend::Memory).await;
    let client = connect(server.endpoint()).await;
    let guard = client
        .lock("belief/release")
        .ttl(Duration::from_secs(1))
        .wait(Duration::ZERO)
        .await
        .expect("acquired");
    server.stop().await;
    tokio::time::timeout(Duration::from_secs(5), guard.lost())
        .await
        .expect("lost() fires with no server");
    let start = Instant::now();
    let released = guard.release().await;
    let took = start.elapsed();
    assert_eq!(released, Ok(false));
    assert!(took < Duration::from_millis(100), "{took:?}");
}

/// The child half of `process_exiting_right_after_lock_releases_it`: runs
/// only with BELIEF_CHILD_MODE set.
#[test]
fn child_process_holder() {
    let Ok(mode) = std::env::var("BELIEF_CHILD_MODE") else {
        return;
    };
    let endpoint = std::env::var("BELIEF_ENDPOINT").expect("endpoint");
    let key = std::env::var("BELIEF_KEY").expect("key");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let client = Client::connect(endpoint).await.expect("connect");
        let guard = match client
            .lock(key)
            .ttl(Duration::from_secs(30))
            .wait(Duration::ZERO)
            .await
        {
            Ok(g) => g,
            Err(_) => std::process::exit(3),
        };
        // No .await from here on.
        match mode.as_str() {
            "drop" => drop(guard),
            "forget" => std::mem::forget(guard),
            _ => {}
        }
        std::process::exit(0);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_exiting_right_after_lock_releases_it() {
    let server = TestServer::start(Backend::Memory).await;
    let observer = connect(server.endpoint()).await;
    let exe = std::env::current_exe().expect("test binary");
    // The store timeout of the test servers is 1 s; the TTL is 30 s.
    let within = Duration::from_secs(2);
    let mut slowest = Duration::ZERO;
    for mode in ["drop", "forget", "exit"] {
        for run in 0..20 {
            let key = format!("belief/exit/{mode}/{run}");
            let status = tokio::task::block_in_place(|| {
                Command::new(&exe)
                    .args(["child_process_holder", "--exact", "--nocapture"])
                    .env("BELIEF_CHILD_MODE", mode)
                    .env("BELIEF_ENDPOINT", server.endpoint())
                    .env("BELIEF_KEY", &key)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .expect("run the child")
            });
            assert!(status.success(), "{mode} run {run}: child {status}");
            let exited = Instant::now();
            loop {
                if observer.describe(&key).await.unwrap().is_none() {
                    break;
                }
                assert!(
                    exited.elapsed() < within,
                    "{mode} run {run}: still held {within:?} after the process exited"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            slowest = slowest.max(exited.elapsed());
        }
    }
    println!(
        "exit right after lock(): free at most {:.1} ms after the process exited (60 runs)",
        ms(slowest)
    );
}

/// lock() latency with and without waiting for the attach, interleaved:
/// `cargo test --test client_belief attach_latency -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn attach_latency() {
    let server = ServerProcess::start(&[]);
    let client = connect(server.endpoint()).await;
    let (mut bare, mut attached) = (Vec::new(), Vec::new());
    for i in 0..2000 {
        let key = format!("latency/{i}");
        if i % 2 == 0 {
            let start = Instant::now();
            let lease = client
                .lock(&key)
                .wait(Duration::ZERO)
                .lease()
                .await
                .unwrap();
            bare.push(start.elapsed());
            client.release(&key, lease.token).await.unwrap();
        } else {
            let start = Instant::now();
            let guard = client.lock(&key).wait(Duration::ZERO).await.unwrap();
            attached.push(start.elapsed());
            guard.release().await.unwrap();
        }
    }
    for v in [&mut bare, &mut attached] {
        v.sort();
    }
    let p = |v: &Vec<Duration>, q: f64| ms(v[((v.len() - 1) as f64 * q) as usize]);
    println!(
        "Acquire only: p50 {:.3} ms p99 {:.3} ms; Acquire + attach answered: p50 {:.3} ms p99 {:.3} ms",
        p(&bare, 0.5),
        p(&bare, 0.99),
        p(&attached, 0.5),
        p(&attached, 0.99)
    );
}

// ---- the CLI ----

/// `leasehold lock` running `CMD`, which appends a wall-clock timestamp
/// (ns) to `file` every 20 ms.
fn cli_lock(endpoint: &str, key: &str, file: &Path, flags: &[&str]) -> std::process::Child {
    let script = format!(
        "while true; do date +%s%N >> '{}'; sleep 0.02; done",
        file.display()
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_leasehold"));
    cmd.args(["lock", key, "--endpoint", endpoint])
        .args(flags)
        .args(["--", "sh", "-c", &script])
        .env_remove("LEASEHOLD_ENDPOINT")
        .env("LEASEHOLD_LOG", "warn");
    spawn_tied(cmd)
}

fn stamps(file: &Path) -> Vec<u128> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn nanos(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).expect("after 1970").as_nanos()
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {sig} {pid}");
}

fn wait_exit(child: &mut std::process::Child, within: Duration) -> i32 {
    let mut code = None;
    wait_until("leasehold lock to exit", within, || {
        code = child
            .try_wait()
            .expect("try_wait")
            .map(|s| s.code().unwrap_or(-1));
        code.is_some()
    });
    code.expect("exited")
}

/// Asserts CMD wrote nothing at or after `granted`; returns the margin.
fn cmd_ended_before(file: &Path, granted: SystemTime) -> f64 {
    let last = stamps(file).into_iter().max().expect("CMD ran");
    let g = nanos(granted);
    let margin = (g as f64 - last as f64) / 1e6;
    assert!(
        last < g,
        "CMD wrote {:.1} ms after the rival's grant",
        -margin
    );
    margin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_frozen_connection_stops_cmd_before_the_rival_is_granted() {
    let server = TestServer::start(Backend::Memory).await;
    let proxy = Proxy::start(server.addr).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("stamps");
    let mut cli = cli_lock(
        &proxy.endpoint(),
        "belief/cli-freeze",
        &file,
        &[
            "--ttl", "3s", "--grace", "500ms", "--margin", "500ms", "--wait", "0s",
        ],
    );
    tokio::task::block_in_place(|| {
        wait_until("CMD to start", Duration::from_secs(20), || {
            !stamps(&file).is_empty()
        })
    });
    let rival = rival(server.endpoint(), "belief/cli-freeze").await;
    waiting(&server, 1).await;
    proxy.set(Mode::Pause);
    let (_, granted) = tokio::time::timeout(Duration::from_secs(10), rival)
        .await
        .expect("the rival is granted")
        .unwrap();
    let code = tokio::task::block_in_place(|| wait_exit(&mut cli, Duration::from_secs(10)));
    assert_eq!(code, 76);
    let margin = cmd_ended_before(&file, granted);
    println!("cli freeze: CMD's last write {margin:.1} ms before the rival's grant");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_delayed_replies_stop_cmd_before_the_rival_is_granted() {
    let server = TestServer::start(Backend::Memory).await;
    let proxy = Proxy::start(server.addr).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("stamps");
    let mut cli = cli_lock(
        &proxy.endpoint(),
        "belief/cli-stall",
        &file,
        &[
            "--ttl", "3s", "--grace", "500ms", "--margin", "500ms", "--wait", "0s",
        ],
    );
    tokio::task::block_in_place(|| {
        wait_until("CMD to start", Duration::from_secs(20), || {
            !stamps(&file).is_empty()
        })
    });
    let rival = rival(server.endpoint(), "belief/cli-stall").await;
    waiting(&server, 1).await;
    proxy.delay(Duration::from_millis(600), Duration::from_millis(600));
    let (_, granted) = tokio::time::timeout(Duration::from_secs(15), rival)
        .await
        .expect("the rival is granted")
        .unwrap();
    let code = tokio::task::block_in_place(|| wait_exit(&mut cli, Duration::from_secs(10)));
    assert_eq!(code, 76);
    let margin = cmd_ended_before(&file, granted);
    println!("cli stall: CMD's last write {margin:.1} ms before the rival's grant");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_ctrl_z_stops_cmd_and_a_late_resume_kills_it() {
    let server = TestServer::start(Backend::Memory).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("stamps");
    let mut cli = cli_lock(
        &server.endpoint(),
        "belief/cli-tstp",
        &file,
        &[
            "--ttl", "2s", "--grace", "500ms", "--margin", "300ms", "--wait", "0s",
        ],
    );
    tokio::task::block_in_place(|| {
        wait_until("CMD to start", Duration::from_secs(20), || {
            !stamps(&file).is_empty()
        })
    });
    let rival = rival(server.endpoint(), "belief/cli-tstp").await;
    waiting(&server, 1).await;
    signal(cli.id(), "-TSTP");
    let (_, granted) = tokio::time::timeout(Duration::from_secs(10), rival)
        .await
        .expect("the rival is granted once the stopped CLI's lease expires")
        .unwrap();
    signal(cli.id(), "-CONT");
    let code = tokio::task::block_in_place(|| wait_exit(&mut cli, Duration::from_secs(10)));
    assert_eq!(code, 76);
    let margin = cmd_ended_before(&file, granted);
    println!("cli SIGTSTP: CMD's last write {margin:.1} ms before the rival's grant");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_waiting_acquire_with_a_late_reply_never_overlaps() {
    let server = TestServer::start(Backend::Memory).await;
    let holder = connect(server.endpoint()).await;
    let held = holder
        .lock("belief/cli-late")
        .ttl(Duration::from_secs(30))
        .wait(Duration::ZERO)
        .lease()
        .await
        .expect("held");
    let proxy = Proxy::start(server.addr).await;
    proxy.delay(Duration::ZERO, Duration::from_millis(1500));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("stamps");
    let mut cli = cli_lock(
        &proxy.endpoint(),
        "belief/cli-late",
        &file,
        &["--ttl", "1s"],
    );
    waiting(&server, 1).await;
    let rival = rival(server.endpoint(), "belief/cli-late").await;
    waiting(&server, 2).await;
    assert!(holder.release("belief/cli-late", held.token).await.unwrap());
    let (_, granted) = tokio::time::timeout(Duration::from_secs(10), rival)
        .await
        .expect("the rival is granted")
        .unwrap();
    let code = tokio::task::block_in_place(|| wait_exit(&mut cli, Duration::from_secs(20)));
    assert_eq!(code, 76);
    if stamps(&file).is_empty() {
        println!("cli late reply: CMD never started");
    } else {
        let margin = cmd_ended_before(&file, granted);
        println!("cli late reply: CMD's last write {margin:.1} ms before the rival's grant");
    }
}

// ---- the Python client ----

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The stubs, generated once per test binary into cargo's scratch dir.
fn python_stubs() -> &'static Path {
    static STUBS: OnceLock<PathBuf> = OnceLock::new();
    STUBS.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("belief-python-stubs-{}", std::process::id()));
        let out = Command::new("python3")
            .arg(repo().join("clients/python/generate.py"))
            .arg("--out")
            .arg(&dir)
            .output()
            .expect("run generate.py (python3 with grpcio-tools)");
        assert!(
            out.status.success(),
            "generate.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
}

/// Runs a Python snippet with the client importable; stdout lines arrive
/// on the returned channel.
fn python(code: &str, args: &[&str]) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut cmd = Command::new("python3");
    cmd.current_dir(repo())
        .env("LEASEHOLD_PY_STUBS", python_stubs())
        .env("PYTHONPATH", repo().join("clients/python"))
        .env("PYTHONUNBUFFERED", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .args(["-c", code])
        .args(args)
        .stdout(Stdio::piped());
    let mut child = spawn_tied(cmd);
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

const PY_WATCH: &str = r#"
import logging, sys, threading, time
from leasehold_client import LeaseholdClient
logging.basicConfig(level=logging.DEBUG if len(sys.argv) > 4 else logging.ERROR, format="%(created).3f %(threadName)s %(message)s", stream=sys.stdout)
client = LeaseholdClient(sys.argv[1])
lease = client.acquire(sys.argv[2], ttl_ms=int(sys.argv[3]))
called = threading.Event()
out = threading.Lock()
def say(what):
    with out:  # one line at a time from two threads
        sys.stdout.write(f"{what} {time.time_ns()}\n")
        sys.stdout.flush()
def on_lost(key):
    say("ONLOST")
    called.set()
ka = client.keepalive(on_lost=on_lost)
assert ka.attach(lease)
while ka.is_alive(lease.key):
    say("ALIVE")
    time.sleep(0.01)
say("DEAD")
called.wait(5)
"#;

/// The Python watcher through a proxy that `fault` disturbs once it holds
/// the lock; returns (margin of is_alive, margin of on_lost) in ms.
async fn python_belief(key: &str, ttl_ms: &str, fault: impl FnOnce(&Proxy)) -> (f64, f64) {
    let server = TestServer::start(Backend::Memory).await;
    let proxy = Proxy::start(server.addr).await;
    let debug = std::env::var("BELIEF_PY_DEBUG").is_ok();
    let mut args = vec![proxy.addr.to_string(), key.to_string(), ttl_ms.to_string()];
    if debug {
        args.push("debug".into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (mut child, lines) = python(PY_WATCH, &args);
    tokio::task::block_in_place(|| {
        loop {
            let line = lines
                .recv_timeout(Duration::from_secs(20))
                .expect("the Python client holds the lock");
            if line.starts_with("ALIVE") {
                break;
            }
        }
    });
    let rival = rival(server.endpoint(), key).await;
    waiting(&server, 1).await;
    fault(&proxy);
    let (_, granted) = tokio::time::timeout(Duration::from_secs(15), rival)
        .await
        .expect("the rival is granted")
        .unwrap();
    if debug {
        eprintln!("{:.3} rival granted", nanos(granted) as f64 / 1e9);
    }
    let mut last_alive = 0u128;
    let mut on_lost = None;
    tokio::task::block_in_place(|| {
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            let Ok(line) = lines.recv_timeout(Duration::from_secs(1)) else {
                continue;
            };
            let mut words = line.split_whitespace();
            let what = words.next().unwrap_or_default().to_string();
            let at: u128 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
            match what.as_str() {
                "ALIVE" => last_alive = last_alive.max(at),
                "ONLOST" => on_lost = Some(at),
                "DEAD" if on_lost.is_some() => break,
                _ if debug => eprintln!("{line}"),
                _ => {}
            }
            if on_lost.is_some() && line.starts_with("DEAD") {
                break;
            }
        }
    });
    let _ = child.kill();
    let _ = child.wait();
    let g = nanos(granted);
    let margin = (g as f64 - last_alive as f64) / 1e6;
    assert!(
        last_alive < g,
        "is_alive() true {:.1} ms after the rival's grant",
        -margin
    );
    let on_lost = on_lost.expect("on_lost was called");
    let lost_margin = (g as f64 - on_lost as f64) / 1e6;
    assert!(
        on_lost < g,
        "on_lost came {:.1} ms after the rival's grant",
        -lost_margin
    );
    (margin, lost_margin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_frozen_connection_is_alive_ends_before_the_rival_is_granted() {
    let (alive, lost) = python_belief("belief/py", "1000", |p| p.set(Mode::Pause)).await;
    println!(
        "python freeze: is_alive() last true {alive:.1} ms, on_lost {lost:.1} ms before the rival's grant"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_delayed_replies_stall_the_stream_but_never_overlap() {
    let (alive, lost) = python_belief("belief/py-stall", "3000", |p| {
        p.delay(Duration::from_millis(600), Duration::from_millis(600))
    })
    .await;
    println!(
        "python stall: is_alive() last true {alive:.1} ms, on_lost {lost:.1} ms before the rival's grant"
    );
}

const PY_CALLBACKS: &str = r#"
import sys, threading, time
from leasehold_client import LeaseholdClient
client = LeaseholdClient(sys.argv[1])
a = client.acquire(sys.argv[2] + "/a", ttl_ms=600)
b = client.acquire(sys.argv[2] + "/b", ttl_ms=600)
done = threading.Event()
calls = []
def on_lost(key):
    calls.append(key)
    if len(calls) == 1:
        raise RuntimeError("a callback that raises")
    start = time.monotonic()
    ka.close(timeout=5)
    print("CLOSED_IN_CALLBACK", round(time.monotonic() - start, 3), flush=True)
    done.set()
ka = client.keepalive(on_lost=on_lost)
assert ka.attach(a) and ka.attach(b)
# Taken away behind the client's back: the next renewal says alive = false.
assert client.release(a)
while ka.is_alive(a.key):
    time.sleep(0.01)
assert client.release(b)
print("REPORTED", done.wait(5), calls, flush=True)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_on_lost_may_raise_and_may_close() {
    let server = TestServer::start(Backend::Memory).await;
    let (mut child, lines) = python(PY_CALLBACKS, &[&server.addr.to_string(), "belief/py-cb"]);
    let mut got = Vec::new();
    tokio::task::block_in_place(|| {
        while let Ok(line) = lines.recv_timeout(Duration::from_secs(15)) {
            got.push(line);
        }
    });
    let _ = tokio::task::block_in_place(|| child.wait());
    let closed = got
        .iter()
        .find_map(|l| l.strip_prefix("CLOSED_IN_CALLBACK "))
        .unwrap_or_else(|| panic!("close() in on_lost did not return: {got:?}"));
    let secs: f64 = closed.parse().expect("seconds");
    assert!(secs < 1.0, "close() inside on_lost took {secs} s");
    assert!(
        got.iter().any(|l| l.starts_with("REPORTED True")),
        "the second loss was reported after the first callback raised: {got:?}"
    );
}

const PY_CLOSE: &str = r#"
import sys
from leasehold_client import LeaseholdClient
client = LeaseholdClient(sys.argv[1])
ka = client.keepalive(on_lost=lambda key: (_ for _ in ()).throw(RuntimeError("boom")))
lease = client.acquire(sys.argv[2], ttl_ms=30000)
assert ka.attach(lease)
print("CLOSED", ka.close(), ka.is_alive(lease.key), flush=True)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_close_right_after_attach_releases() {
    let server = TestServer::start(Backend::Memory).await;
    let observer = connect(server.endpoint()).await;
    for run in 0..5 {
        let key = format!("belief/py-close/{run}");
        let (mut child, lines) = python(PY_CLOSE, &[&server.addr.to_string(), &key]);
        let line = tokio::task::block_in_place(|| lines.recv_timeout(Duration::from_secs(20)))
            .expect("the script reports");
        assert_eq!(line, "CLOSED True False");
        let _ = tokio::task::block_in_place(|| child.wait());
        assert!(
            observer.describe(&key).await.unwrap().is_none(),
            "run {run}: still held after close() returned True"
        );
    }
}

/// Whether the server follows "the latest attachment owns the stream-end
/// release" (issue 21): a lock re-attached on stream B survives stream A's
/// end. The SDK's move off a stalled stream relies on it.
async fn server_follows_latest_attachment(server: &TestServer) -> bool {
    let mut c = server.client().await;
    let lease = lease_of(
        c.acquire(acquire("belief/probe", 5000))
            .await
            .expect("acquire")
            .into_inner(),
    );
    let mut a = KeepAliveSession::open(&mut c).await.expect("stream A");
    assert!(a.renew("belief/probe", &lease.token, 0).await.alive);
    let mut b = KeepAliveSession::open(&mut c).await.expect("stream B");
    assert!(b.renew("belief/probe", &lease.token, 0).await.alive);
    a.half_close();
    while let Ok(Some(_)) = a.next().await {}
    let held = c
        .describe(describe("belief/probe"))
        .await
        .expect("describe")
        .into_inner()
        .held;
    b.half_close();
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_moves_locks_off_a_stalled_stream_before_leaving_it() {
    let server = TestServer::start(Backend::Memory).await;
    if !server_follows_latest_attachment(&server).await {
        println!(
            "skipped: this server releases a lock at the end of any stream it was attached to (issue 21 not in)"
        );
        return;
    }
    let proxy = Proxy::start(server.addr).await;
    let client = connect(proxy.endpoint()).await;
    let guard = client
        .lock("belief/move")
        .ttl(Duration::from_secs(3))
        .wait(Duration::ZERO)
        .await
        .expect("acquired");
    let lost = guard.lost();
    let rival = rival(server.endpoint(), "belief/move").await;
    waiting(&server, 1).await;
    // One renewal takes 1.2 s to arrive (stall limit: 1 s), then the
    // network is fine again: the lock moves to a new stream.
    proxy.delay(Duration::from_millis(1200), Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.delay(Duration::ZERO, Duration::ZERO);
    let lost_or_granted = tokio::select! {
        reason = lost => format!("lost: {reason}"),
        _ = tokio::time::sleep(Duration::from_secs(6)) => String::new(),
    };
    let lost_at = Instant::now();
    if lost_or_granted.is_empty() {
        // Held throughout (two TTLs after the stall): nobody else got it.
        assert!(
            !rival.is_finished(),
            "the rival was granted while the client held the lock"
        );
        assert!(guard.release().await.unwrap(), "still held, released by us");
        tokio::time::timeout(Duration::from_secs(5), rival)
            .await
            .expect("the rival is granted after the release")
            .unwrap();
        println!("move: the lock moved off the stalled stream and was kept");
    } else {
        let (granted, _) = tokio::time::timeout(Duration::from_secs(10), rival)
            .await
            .expect("the rival is granted")
            .unwrap();
        assert!(
            lost_at <= granted,
            "{lost_or_granted}: believed past the rival's grant"
        );
        println!(
            "move: {lost_or_granted}, {:.1} ms before the rival's grant",
            gap(lost_at, granted)
        );
    }
}
