//! The `leasehold` binary end to end: flags, the in-memory default, health,
//! reflection-free gRPC calls, JSON logs, and graceful shutdown on SIGTERM.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use leasehold::pb;
use leasehold::pb::lock_service_client::LockServiceClient;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;

struct Binary {
    child: std::process::Child,
    output: Output,
    addr: String,
}

impl Binary {
    fn start(args: &[&str]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_leasehold"));
        cmd.env("LEASEHOLD_LOG", "info,leasehold::service=debug");
        cmd.args(["serve", "--listen", "127.0.0.1:0"]).args(args);
        let mut child = spawn_tied(cmd);
        let output = Output::capture(&mut child);
        let line = output.wait_for("listening", Duration::from_secs(20));
        let addr = line
            .split_whitespace()
            .find_map(|w| {
                w.strip_prefix("addr=")
                    .or_else(|| w.strip_prefix("\"addr\":"))
            })
            .map(|a| a.trim_matches(|c| c == '"' || c == ',').to_string())
            .or_else(|| {
                // JSON: ..."addr":"127.0.0.1:1234"...
                line.split("\"addr\":\"")
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| panic!("no addr in {line:?}"));
        Self {
            child,
            output,
            addr,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok);
    }

    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let mut status = None;
        wait_until("the server process to exit", within, || {
            status = self.child.try_wait().expect("try_wait");
            status.is_some()
        });
        status.expect("exited")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_default_serves_and_sigterm_is_graceful() {
    let mut server = tokio::task::block_in_place(|| Binary::start(&["--log-format", "text"]));
    let warnings: Vec<_> = server
        .output
        .all()
        .into_iter()
        .filter(|l| l.contains("in-memory store") && l.contains("not durable"))
        .collect();
    assert_eq!(
        warnings.len(),
        1,
        "exactly one in-memory warning: {warnings:?}"
    );

    let mut c = LockServiceClient::connect(server.endpoint()).await.unwrap();
    let lease = lease_of(
        c.acquire(acquire("bin", 30_000))
            .await
            .unwrap()
            .into_inner(),
    );
    assert!(lease.fencing_token > 0);

    let channel = tonic::transport::Channel::from_shared(server.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let mut watch = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: pb::SERVICE_NAME.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut serving = false;
    while let Some(Ok(m)) = watch.next().await {
        if m.status().as_str_name() == "SERVING" {
            serving = true;
            break;
        }
    }
    assert!(serving);

    // A waiting Acquire in flight when SIGTERM arrives ends with UNAVAILABLE.
    let mut waiter = c.clone();
    let waiting = tokio::spawn(async move {
        waiter
            .acquire(pb::AcquireRequest {
                key: "bin".into(),
                wait_ms: 60_000,
                ..Default::default()
            })
            .await
    });
    tokio::task::block_in_place(|| {
        server
            .output
            .wait_for("waiting for the holder", Duration::from_secs(10))
    });
    server.signal("-TERM");
    let mut saw_not_serving = false;
    while let Some(Ok(m)) = watch.next().await {
        if m.status().as_str_name() == "NOT_SERVING" {
            saw_not_serving = true;
            break;
        }
    }
    assert!(saw_not_serving, "health must go NOT_SERVING on SIGTERM");
    let result = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(result.unwrap_err().code(), Code::Unavailable);
    let status = tokio::task::block_in_place(|| server.wait_exit(Duration::from_secs(15)));
    assert_eq!(status.code(), Some(0), "graceful exit");
    assert!(
        server.output.find("took too long").is_none(),
        "shutdown must not need the grace timeout: {:?}",
        server.output.all()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_and_sigint() {
    let mut server = tokio::task::block_in_place(|| Binary::start(&["--log-format", "json"]));
    let line = server.output.find("listening").expect("listening line");
    assert!(
        line.trim_start().starts_with('{') && line.contains("\"level\":\"INFO\""),
        "{line}"
    );
    let mut c = LockServiceClient::connect(server.endpoint()).await.unwrap();
    let lease = lease_of(c.acquire(acquire("j", 30_000)).await.unwrap().into_inner());
    server.signal("-INT");
    assert_eq!(
        tokio::task::block_in_place(|| server.wait_exit(Duration::from_secs(15))).code(),
        Some(0)
    );
    // No log line carries the token.
    assert!(
        server
            .output
            .all()
            .iter()
            .all(|l| !l.contains(&lease.token))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_flags_are_one_clear_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--min-ttl",
            "10s",
            "--max-ttl",
            "1s",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("min TTL"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--redis-url",
            "redis://x",
            "--key-prefix",
            "a{b",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("key prefix"));
}
