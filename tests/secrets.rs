//! No secret reaches the logs, even at trace level: the real binary, with
//! every target at `trace` (ours, tonic, h2, hyper, rustls, fred), in text
//! and in JSON, on a TLS Redis with an ACL password and with bearer-token
//! authentication, runs a full session — acquire, KeepAlive, renew,
//! describe, release, the SDK, unknown and missing tokens, keys outside
//! the scope — and then its whole output is searched for every lock token,
//! every bearer token (good and bad) and the Redis password.

mod common;

use std::time::Duration;

use certs::{Pki, REDIS_PASSWORD, rediss_url, tls_acl_redis};
use common::*;
use leasehold::client::Client;
use leasehold::pb;
use leasehold::pb::lock_service_client::LockServiceClient;
use tonic::{Code, Request};

const TOKEN_A: &str = "team-a-bearer-8c41f0e2d9b7a615";
const UNKNOWN: &str = "unknown-bearer-5d2e9f8a7b6c4130";

fn req<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("ascii"),
        );
    }
    request
}

/// `leasehold serve` with every log target at trace, in `format`.
fn start(format: &'static str, args: &[String]) -> ServerProcess {
    let launch = Launch {
        log: "trace".into(),
        format,
        ..Launch::default()
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ServerProcess::launch(launch, &args)
}

/// Everything a client does in a day, good and bad; returns the lock
/// tokens it saw.
async fn session(endpoint: String) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut c = LockServiceClient::connect(endpoint.clone()).await.unwrap();
    let lease = lease_of(
        c.acquire(req(acquire("team-a/job", 30_000), Some(TOKEN_A)))
            .await
            .expect("acquire")
            .into_inner(),
    );
    tokens.push(lease.token.clone());

    // KeepAlive: attach, renew, then a key outside the scope ends it.
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut stream = c
        .keep_alive(req(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            Some(TOKEN_A),
        ))
        .await
        .expect("open")
        .into_inner();
    for ttl_ms in [0, 20_000] {
        tx.send(pb::KeepAliveRequest {
            key: "team-a/job".into(),
            token: lease.token.clone(),
            ttl_ms,
            release: false,
        })
        .await
        .unwrap();
        assert!(stream.message().await.unwrap().unwrap().alive);
    }
    tx.send(pb::KeepAliveRequest {
        key: "team-b/job".into(),
        token: lease.token.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        stream.message().await.expect_err("out of scope").code(),
        Code::PermissionDenied
    );

    let renew = pb::RenewRequest {
        key: "team-a/job".into(),
        token: lease.token.clone(),
        ttl_ms: 15_000,
    };
    assert!(
        c.renew(req(renew, Some(TOKEN_A)))
            .await
            .unwrap()
            .into_inner()
            .renewed
    );
    assert!(
        c.describe(req(describe("team-a/job"), Some(TOKEN_A)))
            .await
            .unwrap()
            .into_inner()
            .held
    );
    // A wrong token for the lock, then the right one.
    let wrong_lock_token = "0f".repeat(16);
    tokens.push(wrong_lock_token.clone());
    assert!(
        !c.release(req(release("team-a/job", &wrong_lock_token), Some(TOKEN_A)))
            .await
            .unwrap()
            .into_inner()
            .released
    );
    assert!(
        c.release(req(release("team-a/job", &lease.token), Some(TOKEN_A)))
            .await
            .unwrap()
            .into_inner()
            .released
    );

    // Authentication failures.
    for (token, key, code) in [
        (Some(UNKNOWN), "team-a/x", Code::Unauthenticated),
        (None, "team-a/x", Code::Unauthenticated),
        (Some(TOKEN_A), "team-b/x", Code::PermissionDenied),
    ] {
        let status = c
            .acquire(req(acquire(key, 30_000), token))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), code);
    }
    let mut basic = Request::new(describe("team-a/x"));
    basic
        .metadata_mut()
        .insert("authorization", format!("Basic {UNKNOWN}").parse().unwrap());
    assert_eq!(
        c.describe(basic).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    // The SDK: a guard kept alive over its stream, then released.
    let client = Client::builder()
        .endpoints(endpoint)
        .bearer_token(TOKEN_A)
        .connect()
        .await
        .expect("sdk");
    let guard = client
        .lock("team-a/sdk")
        .ttl(Duration::from_millis(900))
        .await
        .expect("lock");
    // Long enough for a few renewals over the stream.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(guard.release().await.unwrap());
    let lease = client.lock("team-a/lease").lease().await.expect("lease");
    tokens.push(lease.token.clone());
    assert!(client.release("team-a/lease", &lease.token).await.unwrap());
    tokens
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_logs_at_trace_level() {
    let pki = Pki::new("secrets");
    let (_redis, tls_port) = tokio::task::block_in_place(|| tls_acl_redis(&pki, false));
    let auth_file = pki.path("auth.toml");
    std::fs::write(
        &auth_file,
        format!(
            "[[tenant]]\nname = \"team-a\"\nprefixes = [\"team-a/\"]\ntokens = [\"{TOKEN_A}\"]\n"
        ),
    )
    .unwrap();
    for format in ["text", "json"] {
        let args = vec![
            "--redis-url".to_string(),
            rediss_url(tls_port, REDIS_PASSWORD),
            "--redis-tls-ca".into(),
            pki.ca_path.to_string_lossy().to_string(),
            "--key-prefix".into(),
            certs::acl_prefix(),
            "--auth-file".into(),
            auth_file.to_string_lossy().to_string(),
            "--health-interval".into(),
            "100ms".into(),
        ];
        let mut server = tokio::task::block_in_place(|| start(format, &args));
        let lock_tokens = session(server.endpoint()).await;
        server.signal("TERM");
        tokio::task::block_in_place(|| server.wait_exit(Duration::from_secs(20)));
        let lines = server.output.all();
        // The log really was at trace, transport included.
        let trace = if format == "json" {
            "\"level\":\"TRACE\""
        } else {
            "TRACE"
        };
        let traces = lines.iter().filter(|l| l.contains(trace)).count();
        assert!(traces > 100, "{format}: only {traces} trace lines");
        assert!(
            lines.iter().any(|l| l.contains("h2")),
            "{format}: no h2 trace"
        );
        // The lines searched hold what the session did (keys are not secret).
        assert!(
            lines.iter().any(|l| l.contains("team-a/job")),
            "{format}: the session's own log lines are missing"
        );
        let mut secrets: Vec<&str> = vec![TOKEN_A, UNKNOWN, REDIS_PASSWORD];
        secrets.extend(lock_tokens.iter().map(String::as_str));
        for line in &lines {
            for secret in &secrets {
                assert!(
                    !line.contains(secret),
                    "{format}: a secret is in this log line: {line}"
                );
            }
        }
        eprintln!(
            "{format}: {} log lines ({traces} at trace) searched for {} secrets",
            lines.len(),
            secrets.len()
        );
    }
}
