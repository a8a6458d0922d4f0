//! Authentication and per-tenant key scopes against real servers: every
//! RPC (KeepAlive included, per message) answers UNAUTHENTICATED without a
//! known token and PERMISSION_DENIED outside the tenant's prefixes; health
//! and reflection stay open unless protected; the SDK and the CLI send
//! their token; the auth file reloads on SIGHUP and a bad one is refused.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use leasehold::auth::{Authenticator, Policy};
use leasehold::client::{Client, Error};
use leasehold::pb;
use leasehold::server::ServerConfig;
use tonic::transport::Channel;
use tonic::{Code, Request};
use tonic_health::pb::health_client::HealthClient;

const TOKEN_A: &str = "team-a-token-1f9e8d7c6b5a";
const TOKEN_B: &str = "team-b-token-0a1b2c3d4e5f";
const UNKNOWN: &str = "nobody-token-99887766554433";

/// team-a by its plain token; team-b by the SHA-256 of its token.
fn policy_text() -> String {
    format!(
        r#"
[[tenant]]
name = "team-a"
prefixes = ["team-a/"]
tokens = ["{TOKEN_A}"]

[[tenant]]
name = "team-b"
prefixes = ["team-b/", "shared/"]
tokens = ["sha256:{}"]
"#,
        hex::encode(leasehold::auth::hash_token(TOKEN_B))
    )
}

async fn server(protect_health: bool) -> TestServer {
    let policy = Policy::parse(&policy_text()).expect("policy");
    let config = ServerConfig {
        auth: Some(Arc::new(Authenticator::new(policy, protect_health))),
        ..test_config()
    };
    TestServer::start_with(Backend::Memory, config).await
}

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

fn code<T>(result: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// Opens a KeepAlive stream with `token`; the stream or the status.
async fn keepalive(
    c: &mut pb::lock_service_client::LockServiceClient<Channel>,
    token: Option<&str>,
) -> Result<
    (
        tokio::sync::mpsc::Sender<pb::KeepAliveRequest>,
        tonic::Streaming<pb::KeepAliveResponse>,
    ),
    tonic::Status,
> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let stream = c
        .keep_alive(req(tokio_stream::wrappers::ReceiverStream::new(rx), token))
        .await?;
    Ok((tx, stream.into_inner()))
}

fn ka(key: &str, token: &str) -> pb::KeepAliveRequest {
    pb::KeepAliveRequest {
        key: key.into(),
        token: token.into(),
        ..Default::default()
    }
}

async fn next(
    rx: &mut tonic::Streaming<pb::KeepAliveResponse>,
) -> Result<Option<pb::KeepAliveResponse>, tonic::Status> {
    tokio::time::timeout(Duration::from_secs(10), rx.message())
        .await
        .expect("a KeepAlive answer within 10 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_checks_the_token_and_the_scope() {
    let server = server(false).await;
    let mut c = server.client().await;
    let lease = lease_of(
        c.acquire(req(acquire("team-a/job", 30_000), Some(TOKEN_A)))
            .await
            .expect("team-a locks its own key")
            .into_inner(),
    );

    for token in [None, Some(UNKNOWN), Some("")] {
        assert_eq!(
            code(c.acquire(req(acquire("team-a/x", 30_000), token)).await),
            Code::Unauthenticated,
            "Acquire with {token:?}"
        );
        assert_eq!(
            code(
                c.release(req(release("team-a/job", &lease.token), token))
                    .await
            ),
            Code::Unauthenticated
        );
        let renew = pb::RenewRequest {
            key: "team-a/job".into(),
            token: lease.token.clone(),
            ttl_ms: 0,
        };
        assert_eq!(
            code(c.renew(req(renew, token)).await),
            Code::Unauthenticated
        );
        assert_eq!(
            code(c.describe(req(describe("team-a/job"), token)).await),
            Code::Unauthenticated
        );
        assert_eq!(
            keepalive(&mut c, token).await.err().map(|s| s.code()),
            Some(Code::Unauthenticated),
            "KeepAlive with {token:?}"
        );
    }
    // A malformed header is no token at all.
    let mut basic = Request::new(describe("team-a/job"));
    basic
        .metadata_mut()
        .insert("authorization", "Basic dXNlcjpwYXNz".parse().unwrap());
    assert_eq!(code(c.describe(basic).await), Code::Unauthenticated);

    // team-b (known by its hash) may not touch team-a's keys, whatever the RPC.
    let b = Some(TOKEN_B);
    assert_eq!(
        code(c.acquire(req(acquire("team-a/x", 30_000), b)).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(c.release(req(release("team-a/job", &lease.token), b)).await),
        Code::PermissionDenied
    );
    let renew = pb::RenewRequest {
        key: "team-a/job".into(),
        token: lease.token.clone(),
        ttl_ms: 0,
    };
    assert_eq!(code(c.renew(req(renew, b)).await), Code::PermissionDenied);
    let denied = c
        .describe(req(describe("team-a/job"), b))
        .await
        .expect_err("denied");
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(denied.message().contains("team-b"), "{}", denied.message());
    // ...but may use both of its own prefixes.
    for key in ["team-b/1", "shared/1"] {
        assert_eq!(
            code(c.acquire(req(acquire(key, 30_000), b)).await),
            Code::Ok,
            "{key}"
        );
    }

    // KeepAlive: each message is checked. team-a attaches its lock, then
    // asks for a team-b key: the stream ends PERMISSION_DENIED and its
    // lock is not released (the server ended the stream).
    let (tx, mut rx) = keepalive(&mut c, Some(TOKEN_A)).await.expect("open");
    tx.send(ka("team-a/job", &lease.token)).await.unwrap();
    let answer = next(&mut rx).await.expect("ok").expect("answer");
    assert!(answer.alive);
    tx.send(ka("team-b/1", "0123456789abcdef0123456789abcdef"))
        .await
        .unwrap();
    let end = next(&mut rx).await.expect_err("stream ended");
    assert_eq!(end.code(), Code::PermissionDenied);
    let held = c
        .describe(req(describe("team-a/job"), Some(TOKEN_A)))
        .await
        .unwrap()
        .into_inner();
    assert!(
        held.held,
        "the refused stream's lock must still be held until its TTL"
    );

    // The owner releases it.
    let released = c
        .release(req(release("team-a/job", &lease.token), Some(TOKEN_A)))
        .await
        .unwrap()
        .into_inner();
    assert!(released.released);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_stay_open_unless_protected() {
    use tonic_health::pb::HealthCheckRequest;
    let open = server(false).await;
    open.wait_health("SERVING", Duration::from_secs(10)).await;
    let channel = Channel::from_shared(open.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    let status = health
        .check(HealthCheckRequest {
            service: pb::SERVICE_NAME.into(),
        })
        .await
        .expect("health is open")
        .into_inner();
    assert_eq!(status.status().as_str_name(), "SERVING");
    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(channel);
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let mut replies = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection is open")
        .into_inner();
    assert!(replies.message().await.expect("reply").is_some());

    let protected = server(true).await;
    let channel = Channel::from_shared(protected.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let check = || HealthCheckRequest {
        service: String::new(),
    };
    assert_eq!(
        code(health.check(req(check(), None)).await),
        Code::Unauthenticated
    );
    assert_eq!(
        code(health.check(req(check(), Some(TOKEN_B))).await),
        Code::Ok
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_sends_its_bearer_token() {
    let server = server(false).await;
    let client = Client::builder()
        .endpoints(server.endpoint())
        .bearer_token(TOKEN_A)
        .connect()
        .await
        .expect("connect");
    let guard = client.lock("team-a/sdk").await.expect("own key");
    assert!(!format!("{client:?}").contains(TOKEN_A));
    let denied = client
        .lock("team-b/sdk")
        .wait(Duration::ZERO)
        .await
        .expect_err("other tenant's key");
    assert!(matches!(denied, Error::PermissionDenied(_)), "{denied:?}");
    assert!(guard.release().await.unwrap());

    // Health is open, so a client without a token connects, and is then
    // refused at its first lock.
    let anonymous = Client::connect(server.endpoint()).await.expect("connect");
    let refused = anonymous
        .describe("team-a/sdk")
        .await
        .expect_err("no token");
    assert!(matches!(refused, Error::Unauthenticated(_)), "{refused:?}");
}

fn write(path: &std::path::Path, text: &str) {
    // Write then rename, as an operator's tooling should: a reload never
    // sees half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write auth file");
    std::fs::rename(&tmp, path).expect("rename auth file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_auth_file_and_a_bad_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("auth.toml");
    write(&file, &policy_text());
    let server = tokio::task::block_in_place(|| {
        ServerProcess::start(&["--auth-file", &file.to_string_lossy()])
    });
    let mut c = pb::lock_service_client::LockServiceClient::connect(server.endpoint())
        .await
        .unwrap();
    let lease = lease_of(
        c.acquire(req(acquire("team-a/r", 30_000), Some(TOKEN_A)))
            .await
            .expect("team-a")
            .into_inner(),
    );
    let (tx, mut rx) = keepalive(&mut c, Some(TOKEN_A)).await.expect("open");
    tx.send(ka("team-a/r", &lease.token)).await.unwrap();
    assert!(next(&mut rx).await.unwrap().unwrap().alive);

    // team-a's token is revoked; a new tenant appears.
    write(
        &file,
        r#"
[[tenant]]
name = "team-c"
prefixes = ["team-c/"]
tokens = ["team-c-token-77aa88bb99cc"]
"#,
    );
    server.signal("HUP");
    tokio::task::block_in_place(|| {
        server
            .output
            .wait_for("auth file reloaded", Duration::from_secs(10))
    });
    assert_eq!(
        code(c.describe(req(describe("team-a/r"), Some(TOKEN_A))).await),
        Code::Unauthenticated
    );
    assert_eq!(
        code(
            c.acquire(req(
                acquire("team-c/1", 30_000),
                Some("team-c-token-77aa88bb99cc")
            ))
            .await
        ),
        Code::Ok
    );
    // The stream opened with the revoked token ends at its next message.
    tx.send(ka("team-a/r", &lease.token)).await.unwrap();
    let end = next(&mut rx).await.expect_err("revoked");
    assert_eq!(end.code(), Code::Unauthenticated);

    // A file that does not parse is refused; team-c keeps working.
    write(&file, "[[tenant]]\nname = \"broken\"\nprefixes = [");
    server.signal("HUP");
    let line = tokio::task::block_in_place(|| {
        server
            .output
            .wait_for("auth file not reloaded", Duration::from_secs(10))
    });
    assert!(line.contains("ERROR"), "{line}");
    assert_eq!(
        code(
            c.describe(req(describe("team-c/1"), Some("team-c-token-77aa88bb99cc")))
                .await
        ),
        Code::Ok
    );
    // No token ever reached the log.
    for l in server.output.all() {
        for secret in [TOKEN_A, TOKEN_B, "team-c-token-77aa88bb99cc", &lease.token] {
            assert!(!l.contains(secret), "secret in log line: {l}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sends_its_token_and_exits_77_when_denied() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("auth.toml");
    write(&file, &policy_text());
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN_B}\n")).unwrap();
    let server = tokio::task::block_in_place(|| {
        ServerProcess::start(&["--auth-file", &file.to_string_lossy()])
    });
    let run = |key: &str, env_token: Option<&str>, file: Option<&std::path::Path>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_leasehold"));
        cmd.env_remove("LEASEHOLD_AUTH_TOKEN")
            .env_remove("LEASEHOLD_AUTH_TOKEN_FILE")
            .args(["describe", key, "--endpoint", &server.endpoint()]);
        if let Some(t) = env_token {
            cmd.env("LEASEHOLD_AUTH_TOKEN", t);
        }
        if let Some(f) = file {
            cmd.arg("--auth-token-file").arg(f);
        }
        let out = cmd.output().expect("run leasehold describe");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    tokio::task::block_in_place(|| {
        let (code, out) = run("team-a/cli", Some(TOKEN_A), None);
        assert_eq!(code, Some(0), "{out}");
        let (code, out) = run("team-b/cli", Some(TOKEN_A), None);
        assert_eq!(code, Some(77), "{out}");
        assert!(out.contains("permission denied"), "{out}");
        let (code, out) = run("team-b/cli", None, Some(&token_file));
        assert_eq!(code, Some(0), "{out}");
        let (code, out) = run("team-a/cli", None, None);
        assert_eq!(code, Some(77), "{out}");
        assert!(out.contains("not authenticated"), "{out}");
        assert!(!out.contains(TOKEN_A) && !out.contains(TOKEN_B), "{out}");
    });
}

#[test]
fn a_bad_auth_file_refuses_to_start_without_echoing_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("auth.toml");
    std::fs::write(
        &file,
        "[[tenant]]\nname = \"a\"\nprefixes = [\"a/\"]\ntokens = \"a-plain-secret-0123456789\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .args(["serve", "--listen", "127.0.0.1:0", "--auth-file"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("auth file") && err.contains("line 4"), "{err}");
    assert!(!err.contains("a-plain-secret"), "{err}");
}

/// Starts `leasehold serve` with `text` as its auth file, expecting it to
/// refuse; returns what it printed.
fn refused_at_start(text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("auth.toml");
    std::fs::write(&file, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .args(["serve", "--listen", "127.0.0.1:0", "--auth-file"])
        .arg(&file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{text}: {err}");
    err
}

/// A token as an operator should make one: `openssl rand -base64 24`.
const RANDOM_TOKEN: &str = "qf2quuz0di0NfDzH1ErsylblKXFTSKrq";
/// Its SHA-256, upper case, behind an upper-case prefix.
const RANDOM_DIGEST_UPPER: &str =
    "SHA256:61C6F99C4A38D867CF4869E74A1D9A8DB6C87272185F5C184D6299F954356DC1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digest_entries_in_any_case_authenticate_the_token_not_the_digest() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("auth.toml");
    write(
        &file,
        &format!(
            "[[tenant]]\nname = \"team-r\"\nprefixes = [\"team-r/\"]\ntokens = [\"{RANDOM_DIGEST_UPPER}\"]\n"
        ),
    );
    let server = tokio::task::block_in_place(|| {
        ServerProcess::start(&["--auth-file", &file.to_string_lossy()])
    });
    let mut c = pb::lock_service_client::LockServiceClient::connect(server.endpoint())
        .await
        .unwrap();
    assert_eq!(
        code(
            c.describe(req(describe("team-r/1"), Some(RANDOM_TOKEN)))
                .await
        ),
        Code::Ok
    );
    // The digest string itself is not a token.
    assert_eq!(
        code(
            c.describe(req(describe("team-r/1"), Some(RANDOM_DIGEST_UPPER)))
                .await
        ),
        Code::Unauthenticated
    );

    // A reload whose parser error would quote a token with backticks (a
    // token written as a key) is refused, and the log does not echo it.
    let secret = "SuperSecretToken0123456789";
    write(
        &file,
        &format!("[[tenant]]\nname = \"team-r\"\nprefixes = [\"team-r/\"]\n{secret} = 1\n"),
    );
    server.signal("HUP");
    let line = tokio::task::block_in_place(|| {
        server
            .output
            .wait_for("auth file not reloaded", Duration::from_secs(10))
    });
    assert!(
        line.contains("unknown field") && line.contains("line 4"),
        "{line}"
    );
    for l in server.output.all() {
        assert!(
            !l.contains("SuperSecret") && !l.contains(RANDOM_TOKEN),
            "{l}"
        );
    }
    assert_eq!(
        code(
            c.describe(req(describe("team-r/1"), Some(RANDOM_TOKEN)))
                .await
        ),
        Code::Ok,
        "the previous file stays in force"
    );
}

#[test]
fn weak_or_misleading_token_entries_refuse_to_start() {
    let tenant = "[[tenant]]\nname = \"a\"\nprefixes = [\"a/\"]\n";
    // The digests earlier documentation showed: of "secret" and "password".
    for digest in [
        "sha256:2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b",
        "sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8",
    ] {
        let err = refused_at_start(&format!("{tenant}tokens = [\"{digest}\"]\n"));
        assert!(err.contains("anyone would guess"), "{err}");
    }
    // A plain token that is a digest, or looks like one of another kind.
    let hex64 = "61c6f99c4a38d867cf4869e74a1d9a8db6c87272185f5c184d6299f954356dc1";
    for (token, expected) in [
        (hex64.to_string(), "64 hex digits"),
        (format!("sha-256:{hex64}"), "another kind"),
        ("short-token".to_string(), "shorter than 16 bytes"),
    ] {
        let err = refused_at_start(&format!("{tenant}tokens = [\"{token}\"]\n"));
        assert!(err.contains(expected), "{token}: {err}");
        assert!(!err.contains(&token), "{err}");
    }
    // Parser errors, whatever quoting the value had.
    let secret = "SuperSecretToken0123456789";
    for text in [
        format!("{tenant}{secret} = 1\n"),
        format!("{tenant}tokens = '{secret}'\n"),
        format!("{tenant}tokens = [{secret}]\n"),
    ] {
        let err = refused_at_start(&text);
        assert!(err.contains("line 4"), "{err}");
        assert!(!err.contains("SuperSecret"), "{err}");
    }
}
