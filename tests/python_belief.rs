//! No client believes it holds a lock longer than the server does (issue
//! 22), the Python client: after a freeze or a stall, `is_alive()` and
//! `on_lost` end no later than a rival's grant; `on_lost` may raise or call
//! `close()`; `close()` right after `attach()` releases the lock. Needs
//! python3 with grpcio and grpcio-tools (`./test.sh` installs them).

#[path = "belief/mod.rs"]
mod belief;
mod common;

use std::time::{Duration, Instant};

use belief::proxy::{Mode, Proxy};
use belief::*;
use common::python::python;
use common::*;

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
