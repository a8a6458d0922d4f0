//! Every program under `examples/` runs against a real server and exits 0
//! with the output it promises.
//!
//! The examples are built by `cargo test --all-targets` (and by
//! `cargo build --examples`); `cargo test --test examples` alone does not
//! build them, so a missing or stale binary fails with how to build it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use common::*;

/// Every example, so that a new one without a test fails here.
const EXAMPLES: &[&str] = &["contending_workers", "lock_and_work", "with_lock_fallible"];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn modified(path: &Path) -> SystemTime {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The compiled example `name`, beside the `leasehold` binary; fails if it
/// is missing or older than its source or the SDK's.
fn example_binary(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_leasehold"))
        .parent()
        .expect("the binary's directory")
        .join("examples");
    let binary = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    let build =
        "build the examples with `cargo build --examples` (or run `cargo test --all-targets`)";
    assert!(binary.exists(), "{} is missing: {build}", binary.display());
    let mut sources = vec![repo().join("examples").join(format!("{name}.rs"))];
    let mut dirs = vec![repo().join("src/client")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("a directory of src/client") {
            let path = entry.expect("an entry of src/client").path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                sources.push(path);
            }
        }
    }
    let built = modified(&binary);
    for source in sources {
        assert!(
            modified(&source) <= built,
            "{} is older than {}: {build}",
            binary.display(),
            source.display()
        );
    }
    binary
}

/// Runs example `name` against `server`; returns its stdout after
/// asserting that it exited 0 within a minute.
async fn run(name: &str, server: &TestServer) -> String {
    let binary = example_binary(name);
    let child = tokio::process::Command::new(&binary)
        .env("LEASEHOLD_ENDPOINT", server.endpoint())
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{name} did not finish within 60 s"))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{name} exited with {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    stdout
}

#[test]
fn every_example_is_tested() {
    let mut found: Vec<String> = std::fs::read_dir(repo().join("examples"))
        .expect("examples/")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".rs").map(str::to_string)
        })
        .collect();
    found.sort();
    assert_eq!(found, EXAMPLES, "examples/ and this file's EXAMPLES differ");
    let manifest = std::fs::read_to_string(repo().join("Cargo.toml")).expect("Cargo.toml");
    for name in EXAMPLES {
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "Cargo.toml has no [[example]] for {name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_and_work_outlives_its_ttl_and_releases() {
    let server = TestServer::start(Backend::Memory).await;
    let out = run("lock_and_work", &server).await;
    assert!(
        out.contains("holding examples/lock-and-work with fencing token"),
        "{out}"
    );
    // Four half-TTL steps: the work ran for twice the TTL under renewals.
    assert!(out.contains("step 4 done under fencing token"), "{out}");
    assert!(out.contains("released: true"), "{out}");
    let mut client = server.client().await;
    let held = client
        .describe(describe("examples/lock-and-work"))
        .await
        .expect("describe")
        .into_inner()
        .held;
    assert!(!held, "the example released its lock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contending_workers_take_turns_on_the_memory_store() {
    contending_workers(Backend::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contending_workers_take_turns_on_redis() {
    contending_workers(Backend::Redis).await;
}

/// Three turns each, never overlapping (the example checks that), with
/// fencing tokens strictly increasing in the order of the grants.
async fn contending_workers(backend: Backend) {
    let server = TestServer::start(backend).await;
    let out = run("contending_workers", &server).await;
    for worker in ["worker-a", "worker-b"] {
        let turns: Vec<u64> = out
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("{worker} holds the lock with fencing token ")))
            .map(|t| t.parse().expect("a fencing token"))
            .collect();
        assert_eq!(turns.len(), 3, "{worker} took three turns:\n{out}");
    }
    // In the order printed (the order of grants), strictly increasing.
    let printed: Vec<u64> = out
        .lines()
        .filter_map(|l| l.split_once(" holds the lock with fencing token "))
        .map(|(_, t)| t.parse().expect("a fencing token"))
        .collect();
    assert_eq!(printed.len(), 6, "{out}");
    assert!(printed.windows(2).all(|w| w[0] < w[1]), "{out}");
    assert!(
        out.contains("6 grants, fencing tokens strictly increasing"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_lock_fallible_returns_the_work_error_and_releases() {
    let server = TestServer::start(Backend::Memory).await;
    let out = run("with_lock_fallible", &server).await;
    assert!(out.contains("under fencing token"), "{out}");
    assert!(out.contains("the work failed as expected"), "{out}");
    assert!(
        out.contains("after the failed work the lock is free: true"),
        "{out}"
    );
}
