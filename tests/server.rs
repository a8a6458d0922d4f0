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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_default_serves_and_sigterm_is_graceful() {
    let mut server = tokio::task::block_in_place(|| ServerProcess::start(&[]));
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
    let mut server = tokio::task::block_in_place(|| ServerProcess::launch(json_logs(), &[]));
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
    assert!(err.contains("--min-ttl 10s is above --max-ttl 1s"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // An unknown Redis scheme is refused at start, listing the valid ones,
    // without the password.
    let out = Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .args(["serve", "--listen", "127.0.0.1:0", "--redis-url"])
        .arg("http://leasehold:pw-0d9f8e7c@localhost:6379")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown scheme") && err.contains("redis://, rediss://, redis-cluster://"),
        "{err}"
    );
    assert!(!err.contains("pw-0d9f8e7c"), "{err}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_leasehold_takes_serve_flags() {
    // `leasehold --listen ...` is `leasehold serve --listen ...`.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_leasehold"));
    cmd.env("LEASEHOLD_LOG", "info")
        .args(["--listen", "127.0.0.1:0", "--log-format", "text"]);
    let mut child = spawn_tied(cmd);
    let output = Output::capture(&mut child);
    tokio::task::block_in_place(|| output.wait_for("listening", Duration::from_secs(20)));
    let _ = child.kill();
    let _ = child.wait();
    // A serve flag with a bad value says so; an unknown flag stays unknown.
    let out = Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .args(["--max-ttl", "banana"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--max-ttl"));
    let out = Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .arg("--no-such-flag")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--no-such-flag"));
}

/// A JSON value that refuses duplicate keys in any object, at any depth
/// (serde_json's own `Value` keeps the last one silently).
struct Strict;

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Strict;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_str<E>(self, _: &str) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_unit<E>(self) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
        while seq.next_element::<Strict>()?.is_some() {}
        Ok(Strict)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
        let mut keys = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !keys.insert(key.clone()) {
                return Err(serde::de::Error::custom(format!("duplicate key {key:?}")));
            }
            map.next_value::<Strict>()?;
        }
        Ok(Strict)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_json_log_line_is_strict_json() {
    // Debug for Leasehold's own modules: every span and event it has.
    let launch = Launch {
        log: "info,leasehold=debug".into(),
        ..json_logs()
    };
    let mut server = tokio::task::block_in_place(|| {
        ServerProcess::launch(launch, &["--health-interval", "100ms"])
    });
    let addr = server.addr.clone();
    let mut c = LockServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let lease = lease_of(
        c.acquire(acquire("j/1", 30_000))
            .await
            .unwrap()
            .into_inner(),
    );
    let mut waiter = c.clone();
    let waiting =
        tokio::spawn(async move { waiter.acquire(acquire_wait("j/1", 30_000, 10_000)).await });
    tokio::task::block_in_place(|| {
        server
            .output
            .wait_for("waiting for the holder", Duration::from_secs(10))
    });
    c.release(release("j/1", &lease.token)).await.unwrap();
    waiting.await.unwrap().unwrap();
    let _ = c.acquire(acquire("", 30_000)).await;
    server.signal("TERM");
    tokio::task::block_in_place(|| server.wait_exit(Duration::from_secs(15)));
    let lines = server.output.all();
    assert!(lines.len() >= 5, "{lines:?}");
    for line in &lines {
        serde_json::from_str::<Strict>(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    }
    assert!(
        lines.iter().any(|l| l.contains("\"span\"")),
        "spans are logged"
    );
}

/// A server that logs JSON.
fn json_logs() -> Launch {
    Launch {
        format: "json",
        ..Launch::default()
    }
}

/// Runs `leasehold ARGS`; returns its exit code, stderr and how long it took.
fn cli(args: &[&str]) -> (Option<i32>, String, Duration) {
    let started = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .env_remove("LEASEHOLD_ENDPOINT")
        .env_remove("LEASEHOLD_TLS_CA")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
        started.elapsed(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_mismatch_and_missing_files_are_configuration_errors_at_once() {
    let pki = certs::Pki::new("mismatch");
    let leaf = pki.server();
    let ca = pki.ca_path.to_str().unwrap();
    let (plain, tls) = tokio::task::block_in_place(|| {
        let plain = ServerProcess::start(&[]);
        let tls = ServerProcess::start(&[
            "--tls-cert",
            leaf.cert_path.to_str().unwrap(),
            "--tls-key",
            leaf.key_path.to_str().unwrap(),
        ]);
        (plain, tls)
    });
    tokio::task::block_in_place(|| {
        // https:// to a plaintext server: not an outage, a configuration
        // error found at once, with the fix.
        let https = format!("https://{}", plain.addr);
        let (code, err, took) = cli(&[
            "describe",
            "k",
            "--endpoint",
            &https,
            "--tls-ca",
            ca,
            "--retry-for",
            "30s",
        ]);
        assert_eq!(code, Some(78), "{err}");
        assert!(
            err.contains("plaintext") && err.contains(&format!("http://{}", plain.addr)),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            took < Duration::from_secs(10),
            "took {took:?} of --retry-for 30s"
        );

        // http:// to a TLS server.
        let http = format!("http://{}", tls.addr);
        let (code, err, took) = cli(&["describe", "k", "--endpoint", &http, "--retry-for", "30s"]);
        assert_eq!(code, Some(78), "{err}");
        assert!(
            err.contains("speaks TLS") && err.contains(&format!("https://{}", tls.addr)),
            "{err}"
        );
        assert!(took < Duration::from_secs(10), "took {took:?}");

        // The right scheme works.
        let https = format!("https://{}", tls.addr);
        let (code, err, _) = cli(&["describe", "k", "--endpoint", &https, "--tls-ca", ca]);
        assert_eq!(code, Some(0), "{err}");

        // A --tls-ca that does not exist: a local configuration error.
        let (code, err, _) = cli(&[
            "describe",
            "k",
            "--endpoint",
            &https,
            "--tls-ca",
            "/nonexistent/ca.pem",
        ]);
        assert_eq!(code, Some(78), "{err}");
        assert!(err.contains("--tls-ca /nonexistent/ca.pem"), "{err}");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_address_is_logged_before_connecting_without_its_password() {
    // Nothing listens on this port: the server starts NOT_SERVING and
    // retries; its log says where it is trying.
    let port = free_port();
    let url = format!("redis://leasehold:pw-5e4d3c2b1a@127.0.0.1:{port}");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_leasehold"));
    cmd.env("LEASEHOLD_LOG", "info")
        .env("LEASEHOLD_REDIS_URL", &url)
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "text"]);
    let mut child = spawn_tied(cmd);
    let output = Output::capture(&mut child);
    let line = tokio::task::block_in_place(|| {
        output.wait_for("connecting to Redis", Duration::from_secs(20))
    });
    assert!(
        line.contains(&format!("redis://leasehold:***@127.0.0.1:{port}")),
        "{line}"
    );
    // The warning that it is not reachable names it too.
    let warning = tokio::task::block_in_place(|| {
        output.wait_for("Redis not reachable", Duration::from_secs(20))
    });
    assert!(
        warning.contains("WARN") && warning.contains(&format!("127.0.0.1:{port}")),
        "{warning}"
    );
    tokio::task::block_in_place(|| output.wait_for("listening", Duration::from_secs(20)));
    let _ = child.kill();
    let _ = child.wait();
    for l in output.all() {
        assert!(!l.contains("pw-5e4d3c2b1a"), "{l}");
    }
}

/// A server on a Redis Cluster stops without a word from fred: it closes
/// its connections (a pool per primary, the subscriber) before its runtime
/// stops. It used to leave that to the runtime's teardown, and fred warned
/// "Fatal error sending QUIT command" once per client (13 lines).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_on_the_cluster_stops_without_warnings() {
    let url = cluster_url();
    let prefix = unique_prefix();
    let mut server =
        tokio::task::block_in_place(|| ServerProcess::start(&on_redis_args(&url, &prefix)));
    // Keys on every primary, so that every pool was made.
    let mut c = LockServiceClient::connect(server.endpoint()).await.unwrap();
    for i in 0..30 {
        let key = format!("quiet/{i}");
        let lease = lease_of(c.acquire(acquire(&key, 30_000)).await.unwrap().into_inner());
        c.release(release(&key, &lease.token)).await.unwrap();
    }
    drop(c);
    server.signal("TERM");
    let status = tokio::task::block_in_place(|| server.wait_exit(Duration::from_secs(15)));
    assert!(status.success(), "{status:?}");
    tokio::task::block_in_place(|| server.output.wait_closed(Duration::from_secs(5)));
    let lines = server.output.all();
    assert!(lines.iter().any(|l| l.contains("stopped")), "{lines:?}");
    let noisy: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .filter(|l| !l.contains("store health check failed"))
        .collect();
    assert!(noisy.is_empty(), "{noisy:?}");
}
