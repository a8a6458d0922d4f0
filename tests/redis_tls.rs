//! Redis over TLS with an ACL user: a redis-server this test starts with a
//! TLS port, a CA and a client-certificate requirement made by rcgen, and
//! only one user (the default user off). The right credentials serve
//! locks; a wrong password or a missing client certificate leaves the
//! server NOT_SERVING with calls UNAVAILABLE and a log line that says why,
//! and no log line ever holds a password.

mod common;

use std::process::Command;
use std::time::Duration;

use certs::{Pki, REDIS_PASSWORD, rediss_url, tls_acl_redis};
use common::*;
use leasehold::pb::lock_service_client::LockServiceClient;
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;

fn path(p: &std::path::Path) -> String {
    p.to_string_lossy().to_string()
}

async fn health_status(endpoint: String) -> String {
    let channel = tonic::transport::Channel::from_shared(endpoint)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let status = HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: leasehold::pb::SERVICE_NAME.into(),
        })
        .await
        .expect("health answers")
        .into_inner();
    status.status().as_str_name().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_an_acl_user_and_a_client_certificate() {
    let pki = Pki::new("redis");
    let (_redis, tls_port) = tokio::task::block_in_place(|| tls_acl_redis(&pki, true));
    let client_cert = pki.client("leasehold-server", &[]);
    let tls_args = |url: String, with_cert: bool| {
        let mut args = vec![
            "--redis-url".to_string(),
            url,
            "--redis-tls-ca".into(),
            path(&pki.ca_path),
            "--key-prefix".into(),
            certs::acl_prefix(),
            "--health-interval".into(),
            "100ms".into(),
            "--store-timeout".into(),
            "1s".into(),
        ];
        if with_cert {
            args.extend([
                "--redis-tls-cert".to_string(),
                path(&client_cert.cert_path),
                "--redis-tls-key".into(),
                path(&client_cert.key_path),
            ]);
        }
        args
    };

    // The right user, password, CA and client certificate: locks work.
    let args = tls_args(rediss_url(tls_port, REDIS_PASSWORD), true);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let good = tokio::task::block_in_place(|| ServerProcess::start(&args));
    tokio::task::block_in_place(|| {
        good.output
            .wait_for("store reachable: SERVING", Duration::from_secs(20))
    });
    let mut c = LockServiceClient::connect(good.endpoint()).await.unwrap();
    let lease = lease_of(
        c.acquire(acquire("redis-tls/a", 30_000))
            .await
            .expect("acquire over rediss")
            .into_inner(),
    );
    assert!(
        c.describe(describe("redis-tls/a"))
            .await
            .unwrap()
            .into_inner()
            .held
    );
    assert!(
        c.release(release("redis-tls/a", &lease.token))
            .await
            .unwrap()
            .into_inner()
            .released
    );

    // A wrong password: NOT_SERVING, UNAVAILABLE, and a log that says
    // authentication failed without printing either password.
    let wrong = "wrong-pw-31415926535897";
    let args = tls_args(rediss_url(tls_port, wrong), true);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let bad = tokio::task::block_in_place(|| ServerProcess::start_unready(&args));
    let line =
        tokio::task::block_in_place(|| bad.output.wait_for("WRONGPASS", Duration::from_secs(20)));
    assert!(line.contains("WARN"), "{line}");
    assert_eq!(health_status(bad.endpoint()).await, "NOT_SERVING");
    let mut c = LockServiceClient::connect(bad.endpoint()).await.unwrap();
    let status = c
        .acquire(acquire("redis-tls/b", 30_000))
        .await
        .expect_err("no store");
    assert_eq!(status.code(), Code::Unavailable);

    // No client certificate: the TLS handshake is refused; NOT_SERVING.
    let args = tls_args(rediss_url(tls_port, REDIS_PASSWORD), false);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let no_cert = tokio::task::block_in_place(|| ServerProcess::start_unready(&args));
    tokio::task::block_in_place(|| {
        no_cert
            .output
            .wait_for("Redis not reachable", Duration::from_secs(20))
    });
    assert_eq!(health_status(no_cert.endpoint()).await, "NOT_SERVING");

    for server in [&good, &bad, &no_cert] {
        for l in server.output.all() {
            assert!(
                !l.contains(REDIS_PASSWORD) && !l.contains(wrong),
                "password in log: {l}"
            );
        }
    }
}

#[test]
fn redis_tls_flags_need_a_tls_url() {
    let pki = Pki::new("flags");
    let out = Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(["--redis-url", "redis://user:hunter2-secret@127.0.0.1:1"])
        .arg("--redis-tls-ca")
        .arg(&pki.ca_path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rediss://"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}
