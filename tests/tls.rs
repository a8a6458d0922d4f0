//! TLS on the gRPC port, with certificates made at test time: the SDK and
//! the CLI over `https://`, mutual TLS refusing clients without a
//! certificate from the right CA, the per-connection stream limit still
//! keyed on the peer address over TLS, and client-certificate subjects
//! mapped to tenant scopes.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use certs::{Leaf, Pki};
use common::*;
use leasehold::auth::{Authenticator, Policy};
use leasehold::client::{Client, Error};
use leasehold::pb::lock_service_client::LockServiceClient;
use leasehold::server::{ServerConfig, ServerTls};
use leasehold::service::ServiceLimits;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

fn tls_config(pki: &Pki, mutual: bool) -> ServerConfig {
    let server = pki.server();
    ServerConfig {
        tls: Some(ServerTls {
            cert_pem: server.cert_pem.into_bytes(),
            key_pem: server.key_pem.into_bytes(),
            client_ca_pem: mutual.then(|| pki.ca_pem.clone().into_bytes()),
        }),
        ..test_config()
    }
}

/// A TLS channel to `addr` trusting `ca`, presenting `identity` if given.
async fn tls_channel(
    addr: std::net::SocketAddr,
    ca: &str,
    identity: Option<&Leaf>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    if let Some(leaf) = identity {
        tls = tls.identity(Identity::from_pem(&leaf.cert_pem, &leaf.key_pem));
    }
    Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// One Acquire over `channel`: the status code it ended with.
async fn acquire_code(channel: Channel, key: &str) -> Code {
    let mut c = LockServiceClient::new(channel);
    let call = c.acquire(acquire(key, 30_000));
    match tokio::time::timeout(Duration::from_secs(10), call).await {
        Ok(Ok(_)) => Code::Ok,
        Ok(Err(status)) => status.code(),
        Err(_) => panic!("no answer within 10 s"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_over_tls_and_plaintext_or_unknown_ca_refused() {
    let pki = Pki::new("tls");
    let server = TestServer::start_with(Backend::Memory, tls_config(&pki, false)).await;
    let https = format!("https://{}", server.addr);

    let client = Client::builder()
        .endpoints(https.clone())
        .tls_ca_pem(pki.ca_pem.clone())
        .connect()
        .await
        .expect("SDK connects over TLS");
    let guard = client.lock("tls/a").await.expect("lock over TLS");
    let info = client.describe("tls/a").await.unwrap().expect("held");
    assert_eq!(info.fencing_token, guard.fencing_token());
    assert!(guard.release().await.unwrap());

    // The name checked is the endpoint's host (an IP SAN here), or the
    // one given: a name the certificate does not carry is refused.
    let wrong_name = Client::builder()
        .endpoints(https.clone())
        .tls_ca_pem(pki.ca_pem.clone())
        .tls_domain("not-in-the-certificate.example")
        .retry_for(Duration::from_millis(300))
        .connect()
        .await;
    assert!(
        matches!(wrong_name, Err(Error::Unavailable { .. })),
        "{wrong_name:?}"
    );

    // A client that trusts another CA cannot connect.
    let other = Pki::new("other");
    let untrusted = Client::builder()
        .endpoints(https.clone())
        .tls_ca_pem(other.ca_pem.clone())
        .retry_for(Duration::from_millis(300))
        .connect()
        .await;
    match untrusted {
        Err(Error::Unavailable { cause, .. }) => {
            assert!(!cause.is_empty())
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }

    // Plaintext HTTP/2 to the TLS port gets nowhere.
    let plain = LockServiceClient::connect(server.endpoint()).await;
    if let Ok(mut c) = plain {
        let call = c.acquire(acquire("tls/plain", 30_000));
        let result = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("plaintext call ends");
        assert!(result.is_err(), "plaintext must not be served");
    }

    // TLS settings with an http:// endpoint: refused, never downgraded.
    let downgrade = Client::builder()
        .endpoints(server.endpoint())
        .tls_ca_pem(pki.ca_pem.clone())
        .connect()
        .await;
    assert!(
        matches!(&downgrade, Err(Error::InvalidEndpoint { reason, .. }) if reason.contains("https://")),
        "{downgrade:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_a_certificate_from_the_ca_and_keeps_the_stream_limit() {
    let pki = Pki::new("mtls");
    let config = ServerConfig {
        limits: ServiceLimits {
            max_streams_per_connection: 2,
            ..ServiceLimits::default()
        },
        ..tls_config(&pki, true)
    };
    let server = TestServer::start_with(Backend::Memory, config).await;

    // No client certificate: the handshake (or the first call) fails.
    match tls_channel(server.addr, &pki.ca_pem, None).await {
        Err(_) => {}
        Ok(channel) => assert_ne!(acquire_code(channel, "m/none").await, Code::Ok),
    }
    // A certificate from another CA: refused too.
    let other = Pki::new("rogue");
    let rogue = other.client("rogue", &[]);
    match tls_channel(server.addr, &pki.ca_pem, Some(&rogue)).await {
        Err(_) => {}
        Ok(channel) => assert_ne!(acquire_code(channel, "m/rogue").await, Code::Ok),
    }

    // A certificate from the CA: served.
    let worker = pki.client("worker", &[]);
    let channel = tls_channel(server.addr, &pki.ca_pem, Some(&worker))
        .await
        .expect("mutual TLS connects");
    assert_eq!(acquire_code(channel.clone(), "m/ok").await, Code::Ok);

    // The per-connection KeepAlive limit still knows the peer over TLS.
    let mut c = LockServiceClient::new(channel.clone());
    let _s1 = KeepAliveSession::open(&mut c).await.expect("stream 1");
    let _s2 = KeepAliveSession::open(&mut c).await.expect("stream 2");
    let third = KeepAliveSession::open(&mut c).await;
    assert_eq!(
        third.err().map(|s| s.code()),
        Some(Code::ResourceExhausted),
        "the third stream on one TLS connection must hit the limit"
    );

    // The SDK with a client certificate.
    let client = Client::builder()
        .endpoints(format!("https://{}", server.addr))
        .tls_ca_pem(pki.ca_pem.clone())
        .tls_identity_pem(worker.cert_pem.clone(), worker.key_pem.clone())
        .connect()
        .await
        .expect("SDK over mutual TLS");
    let guard = client.lock("m/sdk").await.expect("lock");
    assert!(guard.release().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_subjects_map_to_tenant_scopes() {
    let pki = Pki::new("scopes");
    let policy = Policy::parse(
        r#"
[[tenant]]
name = "team-a"
prefixes = ["team-a/"]
tokens = ["team-a-token-5b0e1c9d7f"]

[[tenant]]
name = "team-b"
prefixes = ["team-b/"]
certificate_names = ["team-b-worker", "batch.team-b.internal"]
"#,
    )
    .expect("policy");
    let config = ServerConfig {
        auth: Some(Arc::new(Authenticator::new(policy, false))),
        ..tls_config(&pki, true)
    };
    let server = TestServer::start_with(Backend::Memory, config).await;

    // By subject CN.
    let by_cn = pki.client("team-b-worker", &[]);
    let channel = tls_channel(server.addr, &pki.ca_pem, Some(&by_cn))
        .await
        .expect("connect");
    assert_eq!(acquire_code(channel.clone(), "team-b/1").await, Code::Ok);
    assert_eq!(
        acquire_code(channel, "team-a/1").await,
        Code::PermissionDenied
    );

    // By a DNS name in the subject alternative names.
    let by_san = pki.client("some-host", &["batch.team-b.internal"]);
    let channel = tls_channel(server.addr, &pki.ca_pem, Some(&by_san))
        .await
        .expect("connect");
    assert_eq!(acquire_code(channel, "team-b/2").await, Code::Ok);

    // A valid certificate that maps to no tenant, and no token.
    let stranger = pki.client("stranger", &[]);
    let channel = tls_channel(server.addr, &pki.ca_pem, Some(&stranger))
        .await
        .expect("connect");
    assert_eq!(
        acquire_code(channel, "team-b/3").await,
        Code::Unauthenticated
    );

    // A bearer token decides over the certificate it comes with.
    let client = Client::builder()
        .endpoints(format!("https://{}", server.addr))
        .tls_ca_pem(pki.ca_pem.clone())
        .tls_identity_pem(by_cn.cert_pem.clone(), by_cn.key_pem.clone())
        .bearer_token("team-a-token-5b0e1c9d7f")
        .connect()
        .await
        .expect("connect");
    let guard = client.lock("team-a/1").await.expect("team-a's token");
    assert!(guard.release().await.unwrap());
    let denied = client
        .lock("team-b/4")
        .wait(Duration::ZERO)
        .await
        .expect_err("team-a's token may not lock team-b/");
    assert!(matches!(denied, Error::PermissionDenied(_)), "{denied:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_and_cli_over_mutual_tls() {
    let pki = Pki::new("cli");
    let server_cert = pki.server();
    let client_cert = pki.client("cli-user", &[]);
    let path = |p: &std::path::Path| p.to_string_lossy().to_string();
    let server = tokio::task::block_in_place(|| {
        ServerProcess::start(&[
            "--tls-cert",
            &path(&server_cert.cert_path),
            "--tls-key",
            &path(&server_cert.key_path),
            "--tls-client-ca",
            &path(&pki.ca_path),
        ])
    });
    let https = format!("https://{}", server.addr);
    let cli = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_leasehold"))
            .env_remove("LEASEHOLD_ENDPOINT")
            .args(["acquire", "cli/tls", "--ttl", "30s", "--retry-for", "1s"])
            .args(["--endpoint", &https, "--tls-ca", &path(&pki.ca_path)])
            .args(extra)
            .output()
            .expect("run leasehold acquire");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, stdout, stderr) = tokio::task::block_in_place(|| {
        cli(&[
            "--tls-client-cert",
            &path(&client_cert.cert_path),
            "--tls-client-key",
            &path(&client_cert.key_path),
        ])
    });
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("acquired=true"), "{stdout}");

    // Without a client certificate the server is out of reach: exit 69.
    let (code, stdout, stderr) = tokio::task::block_in_place(|| cli(&[]));
    assert_eq!(code, Some(69), "{stdout}{stderr}");
    assert!(stderr.contains("unavailable"), "{stderr}");
}

#[test]
fn bad_tls_files_refuse_to_start() {
    let pki = Pki::new("bad");
    let leaf = pki.server();
    let garbage = pki.path("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .args(["serve", "--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(&garbage)
        .arg("--tls-key")
        .arg(&leaf.key_path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tls-cert"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .args(["serve", "--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(&leaf.cert_path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "--tls-cert needs --tls-key");
}
