//! The HTTP face of the one listener, driven by the real curl against the
//! real `leasehold serve`: the Connect protocol (every unary RPC, JSON and
//! proto, HTTP/1.1 and HTTP/2, errors with their HTTP status and Connect
//! code and details), `/healthz` and `/readyz`, gRPC-Web, CORS, auth, and
//! the connection limits over HTTP/1.1. Also the README's curl session, run
//! as written, and the rich error details of a gRPC status.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use leasehold::pb;
use prost::Message;
use serde_json::Value;
use tonic_types::StatusExt;

const README_ADDR: &str = "127.0.0.1:50051";
const TOKEN_A: &str = "team-a-token-1f9e8d7c6b5a";
const UNKNOWN: &str = "nobody-token-99887766554433";

/// What curl got: HTTP status, response headers (lowercase names), body.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The Connect error's code, after checking the status and content type.
    #[track_caller]
    fn connect_error(&self, status: u16) -> Value {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.header("content-type"), Some("application/json"));
        let error = self.json();
        assert!(error["message"].is_string(), "{error}");
        error
    }
}

/// Runs curl with `args` (a URL among them), at most 20 s.
#[track_caller]
fn curl(args: &[&str]) -> Reply {
    let dir = tempfile::tempdir().expect("tempdir");
    let headers = dir.path().join("headers");
    let body = dir.path().join("body");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "-D"])
        .arg(&headers)
        .arg("-o")
        .arg(&body)
        .args(args)
        .output()
        .expect("run curl (apt-get install curl)");
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let head = std::fs::read_to_string(&headers).expect("headers");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let body = std::fs::read(&body).unwrap_or_default();
    Reply {
        status,
        headers,
        body,
    }
}

/// POSTs `json` to a LockService method over HTTP/1.1.
#[track_caller]
fn call(server: &ServerProcess, method: &str, json: &str, extra: &[&str]) -> Reply {
    let url = format!("http://{}/leasehold.v1.LockService/{method}", server.addr);
    let mut args = vec!["-H", "content-type: application/json", "-d", json];
    args.extend_from_slice(extra);
    args.push(&url);
    curl(&args)
}

/// The detail of type `name` of a Connect error, decoded.
#[track_caller]
fn detail<T: Message + Default>(error: &Value, name: &str) -> T {
    let details = error["details"].as_array().expect("details");
    let value = details
        .iter()
        .find(|d| d["type"] == name)
        .and_then(|d| d["value"].as_str())
        .unwrap_or_else(|| panic!("no {name} in {error}"));
    let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(value.trim_end_matches('='))
        .expect("base64");
    T::decode(bytes.as_slice()).expect("detail decodes")
}

#[test]
fn every_unary_rpc_over_http1_json() {
    let server = ServerProcess::start(&[]);
    let acquired = call(
        &server,
        "Acquire",
        r#"{"key":"http/a","ttl_ms":30000,"owner":"curl","metadata":{"job":"j1"}}"#,
        &[],
    );
    assert_eq!(acquired.status, 200, "{acquired:?}");
    assert_eq!(acquired.header("content-type"), Some("application/json"));
    let reply = acquired.json();
    assert_eq!(reply["acquired"], true, "{reply}");
    let lease = &reply["lease"];
    let token = lease["token"].as_str().expect("token").to_string();
    let fence = lease["fencingToken"].as_str().expect("int64 as a string");
    assert!(fence.parse::<u64>().is_ok_and(|f| f > 0), "{fence}");
    assert_eq!(lease["ttlMs"], 30000);

    // Refused: not an error, the holder's remaining TTL.
    let refused = call(&server, "Acquire", r#"{"key":"http/a","ttlMs":1000}"#, &[]).json();
    assert_eq!(refused["acquired"], false, "{refused}");
    let retry = refused["retryAfterMs"].as_u64().expect("retryAfterMs");
    assert!((1..=30_000).contains(&retry), "{refused}");

    let described = call(&server, "Describe", r#"{"key":"http/a"}"#, &[]).json();
    assert_eq!(described["held"], true, "{described}");
    assert_eq!(described["owner"], "curl");
    assert_eq!(described["fencingToken"], fence);
    assert_eq!(described["metadata"]["job"], "j1");
    assert!(described.get("token").is_none(), "never the token");

    let body = format!(r#"{{"key":"http/a","token":"{token}","ttlMs":60000}}"#);
    let renewed = call(&server, "Renew", &body, &[]).json();
    assert_eq!(
        (&renewed["renewed"], &renewed["ttlMs"]),
        (&Value::from(true), &Value::from(60000))
    );

    let body = format!(r#"{{"key":"http/a","token":"{token}"}}"#);
    assert_eq!(
        call(&server, "Release", &body, &[]).json()["released"],
        true
    );
    // A retried Release answers true (its first reply may have been lost);
    // a token that never held the lock, false.
    assert_eq!(
        call(&server, "Release", &body, &[]).json()["released"],
        true
    );
    let stranger = r#"{"key":"http/a","token":"00000000000000000000000000000000"}"#;
    assert_eq!(
        call(&server, "Release", stranger, &[]).json()["released"],
        false
    );
    let renewed = call(
        &server,
        "Renew",
        &format!(r#"{{"key":"http/a","token":"{token}"}}"#),
        &[],
    );
    assert_eq!(renewed.json()["renewed"], false);
    let described = call(&server, "Describe", r#"{"key":"http/a"}"#, &[]).json();
    assert_eq!(described["held"], false, "{described}");
    assert_eq!(described["fencingToken"], "0");
}

#[test]
fn json_over_http2_and_proto_over_both() {
    let server = ServerProcess::start(&[]);
    let h2 = call(
        &server,
        "Acquire",
        r#"{"key":"http/h2","ttlMs":30000}"#,
        &["--http2-prior-knowledge"],
    );
    assert_eq!(h2.status, 200, "{h2:?}");
    assert_eq!(h2.json()["acquired"], true);

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("req.bin");
    let request = pb::DescribeRequest {
        key: "http/h2".into(),
    };
    std::fs::write(&file, request.encode_to_vec()).expect("write");
    let data = format!("@{}", file.display());
    let url = format!("http://{}/leasehold.v1.LockService/Describe", server.addr);
    for version in ["--http1.1", "--http2-prior-knowledge"] {
        let reply = curl(&[
            version,
            "-H",
            "content-type: application/proto",
            "--data-binary",
            &data,
            &url,
        ]);
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.header("content-type"), Some("application/proto"));
        let described = pb::DescribeResponse::decode(reply.body.as_slice()).expect("proto");
        assert!(described.held, "{version}");
    }

    // Bytes that are no DescribeRequest: the same code as over gRPC.
    std::fs::write(&file, [0xff, 0xff, 0xff]).expect("write");
    let reply = curl(&[
        "-H",
        "content-type: application/proto",
        "--data-binary",
        &data,
        &url,
    ]);
    assert_eq!(reply.connect_error(400)["code"], "invalid_argument");
}

#[test]
fn refusals_have_the_connect_status_code_and_details() {
    let server = ServerProcess::start(&["--max-ttl", "1h"]);
    let bad_json = call(&server, "Acquire", r#"{"key": "a", "ttlMs": }"#, &[]);
    let error = bad_json.connect_error(400);
    assert_eq!(error["code"], "invalid_argument");
    assert!(
        error["message"]
            .as_str()
            .unwrap_or_default()
            .contains("invalid JSON"),
        "{error}"
    );

    // A common mistake: a field the server does not know is refused,
    // naming it, instead of silently granting the default TTL.
    let unknown = call(&server, "Acquire", r#"{"key": "a", "ttl": 1000}"#, &[]);
    let error = unknown.connect_error(400);
    assert_eq!(error["code"], "invalid_argument");
    let message = error["message"].as_str().unwrap_or_default();
    assert!(message.contains("unknown field `ttl`"), "{message}");
    assert!(
        message.contains("ttlMs"),
        "says what it expected: {message}"
    );

    // A wrong field value: the service's message, with BadRequest and
    // ErrorInfo details.
    let ttl = call(&server, "Acquire", r#"{"key": "a", "ttlMs": 50}"#, &[]);
    let error = ttl.connect_error(400);
    assert_eq!(error["code"], "invalid_argument");
    let message = error["message"].as_str().unwrap_or_default();
    assert!(message.starts_with("ttl_ms: "), "{message}");
    let bad: tonic_types::pb::BadRequest = detail(&error, "google.rpc.BadRequest");
    assert_eq!(bad.field_violations.len(), 1, "{bad:?}");
    assert_eq!(bad.field_violations[0].field, "ttl_ms");
    let info: tonic_types::pb::ErrorInfo = detail(&error, "google.rpc.ErrorInfo");
    assert_eq!(
        (info.reason.as_str(), info.domain.as_str()),
        ("INVALID_FIELD", "leasehold")
    );
    // And readable as is, for curl users (Connect's `debug`).
    let debug = error["details"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["type"] == "google.rpc.BadRequest"))
        .map(|d| d["debug"]["fieldViolations"][0]["field"].clone());
    assert_eq!(debug, Some(Value::from("ttl_ms")), "{error}");

    let url = format!("http://{}/leasehold.v1.LockService/Acquire", server.addr);
    let wrong_type = curl(&["-H", "content-type: text/plain", "-d", "{}", &url]);
    let error = wrong_type.connect_error(415);
    assert_eq!(error["code"], "unimplemented");
    assert_eq!(
        wrong_type.header("accept-post"),
        Some("application/json, application/proto")
    );
    let get = curl(&[&url]);
    assert_eq!(get.connect_error(405)["code"], "unimplemented");

    let keepalive = call(&server, "KeepAlive", r#"{"key": "a"}"#, &[]);
    let error = keepalive.connect_error(501);
    assert_eq!(error["code"], "unimplemented");
    assert!(
        error["message"]
            .as_str()
            .unwrap_or_default()
            .contains("Renew"),
        "says what to do instead: {error}"
    );
    let nothing = call(&server, "Steal", "{}", &[]);
    assert_eq!(nothing.connect_error(404)["code"], "unimplemented");
    let other = curl(&[&format!("http://{}/elsewhere", server.addr)]);
    assert_eq!(other.connect_error(404)["code"], "unimplemented");

    let big = format!(r#"{{"key": "{}"}}"#, "k".repeat(70_000));
    let url = format!("http://{}/leasehold.v1.LockService/Describe", server.addr);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("big.json");
    std::fs::write(&file, big).expect("write");
    let data = format!("@{}", file.display());
    let too_big = curl(&[
        "-H",
        "content-type: application/json",
        "--data-binary",
        &data,
        &url,
    ]);
    assert_eq!(too_big.connect_error(429)["code"], "resource_exhausted");
}

fn auth_file(dir: &std::path::Path) -> PathBuf {
    let file = dir.join("auth.toml");
    std::fs::write(
        &file,
        format!(
            "[[tenant]]\nname = \"team-a\"\nprefixes = [\"team-a/\"]\ntokens = [\"{TOKEN_A}\"]\n"
        ),
    )
    .expect("write auth file");
    file
}

#[test]
fn bearer_tokens_apply_to_connect_as_to_grpc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = auth_file(dir.path());
    let server = ServerProcess::start(&["--auth-file", &file.to_string_lossy()]);
    let body = r#"{"key": "team-a/x", "ttlMs": 30000}"#;

    let missing = call(&server, "Acquire", body, &[]);
    assert_eq!(missing.connect_error(401)["code"], "unauthenticated");
    let wrong = format!("authorization: Bearer {UNKNOWN}");
    let wrong = call(&server, "Acquire", body, &["-H", &wrong]);
    assert_eq!(wrong.connect_error(401)["code"], "unauthenticated");

    let right = format!("authorization: Bearer {TOKEN_A}");
    let granted = call(&server, "Acquire", body, &["-H", &right]);
    assert_eq!(granted.status, 200, "{granted:?}");
    assert_eq!(granted.json()["acquired"], true);

    let outside = call(
        &server,
        "Describe",
        r#"{"key": "team-b/x"}"#,
        &["-H", &right],
    );
    let error = outside.connect_error(403);
    assert_eq!(error["code"], "permission_denied");
    let info: tonic_types::pb::ErrorInfo = detail(&error, "google.rpc.ErrorInfo");
    assert_eq!(info.reason, "KEY_OUT_OF_SCOPE");

    // Probes need no token (no --auth-protect-health), as over gRPC.
    let ready = curl(&[&format!("http://{}/readyz", server.addr)]);
    assert_eq!(
        (ready.status, ready.body.as_slice()),
        (200, &b"SERVING\n"[..])
    );
    let no_token = server.output.all().join("\n");
    assert!(!no_token.contains(TOKEN_A) && !no_token.contains(UNKNOWN));
}

#[test]
fn readyz_follows_the_store_and_healthz_the_process() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let server = ServerProcess::start(&[
        "--redis-url",
        &url,
        "--health-interval",
        "100ms",
        "--store-timeout",
        "500ms",
    ]);
    let healthz = format!("http://{}/healthz", server.addr);
    let readyz = format!("http://{}/readyz", server.addr);
    assert_eq!(curl(&[&healthz]).status, 200);
    assert_eq!(curl(&[&readyz]).body, b"SERVING\n");

    redis.kill();
    wait_until(
        "/readyz to say NOT_SERVING",
        Duration::from_secs(20),
        || {
            let reply = curl(&[&readyz]);
            reply.status == 503 && reply.body == b"NOT_SERVING\n"
        },
    );
    assert_eq!(curl(&[&healthz]).status, 200, "the process is still up");
    let down = call(&server, "Describe", r#"{"key": "k"}"#, &[]);
    let error = down.connect_error(503);
    assert_eq!(error["code"], "unavailable");
    let retry: tonic_types::pb::RetryInfo = detail(&error, "google.rpc.RetryInfo");
    assert!(retry.retry_delay.is_some(), "{retry:?}");
    let info: tonic_types::pb::ErrorInfo = detail(&error, "google.rpc.ErrorInfo");
    assert_eq!(info.reason, "STORE_UNAVAILABLE");

    redis.restart();
    wait_until(
        "/readyz to say SERVING again",
        Duration::from_secs(20),
        || curl(&[&readyz]).status == 200,
    );
}

/// A gRPC-Web frame of `message` (flags 0) or of trailers (flags 0x80).
fn web_frames(body: &[u8]) -> (Vec<u8>, String) {
    let (mut message, mut trailers) = (Vec::new(), String::new());
    let mut rest = body;
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let frame = &rest[5..5 + len];
        if rest[0] & 0x80 != 0 {
            trailers = String::from_utf8_lossy(frame).into_owned();
        } else {
            message = frame.to_vec();
        }
        rest = &rest[5 + len..];
    }
    (message, trailers)
}

#[test]
fn grpc_web_over_http1_and_cors() {
    let server = ServerProcess::start(&["--cors-allow-origin", "https://app.example"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("req.bin");
    let request = pb::AcquireRequest {
        key: "web/a".into(),
        ttl_ms: 30_000,
        ..Default::default()
    };
    let message = request.encode_to_vec();
    let mut framed = vec![0];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    std::fs::write(&file, framed).expect("write");
    let url = format!("http://{}/leasehold.v1.LockService/Acquire", server.addr);
    let reply = curl(&[
        "--http1.1",
        "-H",
        "content-type: application/grpc-web+proto",
        "-H",
        "x-grpc-web: 1",
        "-H",
        "origin: https://app.example",
        "--data-binary",
        &format!("@{}", file.display()),
        &url,
    ]);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        reply.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    let (message, trailers) = web_frames(&reply.body);
    assert!(trailers.contains("grpc-status:0"), "{trailers:?}");
    let acquired = pb::AcquireResponse::decode(message.as_slice()).expect("reply");
    assert!(acquired.acquired);
    // The reply was delivered: the lease stays held.
    let described = call(&server, "Describe", r#"{"key": "web/a"}"#, &[]).json();
    assert_eq!(described["held"], true, "{described}");

    // A preflight from the allowed origin, and from another.
    let preflight = |origin: &str| {
        curl(&[
            "-X",
            "OPTIONS",
            "-H",
            &format!("origin: {origin}"),
            "-H",
            "access-control-request-method: POST",
            "-H",
            "access-control-request-headers: content-type,authorization",
            &url,
        ])
    };
    let allowed = preflight("https://app.example");
    assert_eq!(allowed.status, 200, "{allowed:?}");
    assert_eq!(
        allowed.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    let methods = allowed
        .header("access-control-allow-methods")
        .unwrap_or_default();
    assert!(methods.contains("POST"), "{methods}");
    let other = preflight("https://evil.example");
    assert_eq!(
        other.header("access-control-allow-origin"),
        None,
        "{other:?}"
    );
}

#[test]
fn no_cors_unless_configured() {
    let server = ServerProcess::start(&[]);
    let reply = call(
        &server,
        "Describe",
        r#"{"key": "k"}"#,
        &["-H", "origin: https://app.example"],
    );
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.header("access-control-allow-origin"),
        None,
        "{reply:?}"
    );
}

#[test]
fn connection_limits_hold_for_http1() {
    let server = ServerProcess::start(&["--max-connections", "1", "--handshake-timeout", "1s"]);
    let healthz = format!("http://{}/healthz", server.addr);

    // A silent connection is closed after the handshake timeout, HTTP/1.1
    // or not (it holds the only slot meanwhile).
    let mut silent = TcpStream::connect(&server.addr).expect("connect");
    silent
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    let start = Instant::now();
    let mut buf = [0u8; 64];
    let n = silent.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed without a reply");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    drop(silent);

    // One HTTP/1.1 keep-alive connection holds the only slot...
    let mut held = None;
    wait_until("the slot to be free", Duration::from_secs(10), || {
        let Ok(mut conn) = TcpStream::connect(&server.addr) else {
            return false;
        };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let sent = conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut reply = [0u8; 256];
        let read = conn.read(&mut reply).unwrap_or(0);
        let ok = sent.is_ok() && reply[..read].starts_with(b"HTTP/1.1 200");
        if ok {
            held = Some(conn);
        }
        ok
    });
    // ...so a second connection is closed at once...
    let refused = Command::new("curl")
        .args(["-sS", "--max-time", "5", &healthz])
        .output()
        .expect("curl");
    assert!(!refused.status.success(), "a second connection was served");
    // ...until the first goes.
    drop(held);
    wait_until(
        "a new connection to be served",
        Duration::from_secs(10),
        || {
            Command::new("curl")
                .args(["-sS", "--max-time", "5", &healthz])
                .output()
                .is_ok_and(|o| o.status.success())
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_statuses_carry_bad_request() {
    let server = tokio::task::block_in_place(|| ServerProcess::start(&[]));
    let mut client = pb::lock_service_client::LockServiceClient::connect(server.endpoint())
        .await
        .expect("connect");
    let status = client
        .acquire(pb::AcquireRequest {
            key: "k".into(),
            ttl_ms: 50,
            ..Default::default()
        })
        .await
        .expect_err("TTL below the minimum");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().starts_with("ttl_ms: "),
        "{}",
        status.message()
    );
    let details = status.get_error_details();
    let bad = details.bad_request().expect("BadRequest");
    assert_eq!(bad.field_violations[0].field, "ttl_ms");
    assert_eq!(
        details.error_info().map(|i| i.reason.as_str()),
        Some("INVALID_FIELD")
    );
}

/// The commands of the README's curl block.
fn readme_commands() -> Vec<String> {
    let readme =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("README.md"))
            .expect("README");
    let section = readme
        .split_once("### With curl")
        .expect("README has a `### With curl` section")
        .1;
    let block = section
        .split_once("```sh\n")
        .expect("a ```sh block")
        .1
        .split_once("\n```")
        .expect("the block ends")
        .0;
    let mut commands = Vec::new();
    let mut current = String::new();
    for line in block.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head.trim_end());
                current.push(' ');
            }
            None => {
                current.push_str(line);
                commands.push(std::mem::take(&mut current));
            }
        }
    }
    commands
}

/// Checks one command's output.
type Check = fn(&str);

#[test]
fn readme_curl_session_runs_as_written() {
    let server = ServerProcess::start(&[]);
    let commands = readme_commands();
    let checks: Vec<(&str, Check)> = vec![
        ("Acquire", |out| {
            let v: Value = serde_json::from_str(out).expect("JSON");
            assert_eq!(v["acquired"], true, "{v}");
            assert!(v["lease"]["fencingToken"].is_string(), "{v}");
        }),
        ("Describe", |out| {
            let v: Value = serde_json::from_str(out).expect("JSON");
            assert_eq!(
                (&v["held"], &v["owner"]),
                (&Value::from(true), &Value::from("host-1"))
            );
        }),
        ("Renew", |out| {
            let v: Value = serde_json::from_str(out).expect("JSON");
            assert_eq!(
                (&v["renewed"], &v["ttlMs"]),
                (&Value::from(true), &Value::from(60000))
            );
        }),
        ("Release", |out| {
            let v: Value = serde_json::from_str(out).expect("JSON");
            assert_eq!(v["released"], true, "{v}");
        }),
        ("Acquire", |out| {
            let v: Value = serde_json::from_str(out).expect("JSON");
            assert_eq!(v["code"], "invalid_argument", "{v}");
        }),
        ("healthz", |out| assert_eq!(out, "ok\n")),
        ("readyz", |out| assert_eq!(out, "SERVING\n")),
    ];
    assert_eq!(
        commands.len(),
        checks.len(),
        "the README's curl block and this test's checks must match one for one: {commands:#?}"
    );
    let mut token = String::new();
    for (command, (what, check)) in commands.iter().zip(&checks) {
        assert!(command.contains(what), "{command} is not the {what} step");
        let command = command
            .replace(README_ADDR, &server.addr)
            .replace("TOKEN", &token);
        let out = Command::new("bash")
            .args(["-c", &command])
            .output()
            .expect("run bash");
        assert!(
            out.status.success(),
            "{command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        eprintln!("$ {command}\n{stdout}");
        check(&stdout);
        if let Ok(v) = serde_json::from_str::<Value>(&stdout)
            && let Some(t) = v["lease"]["token"].as_str()
        {
            token = t.to_string();
        }
    }
}

#[test]
fn metrics_count_http_requests_by_protocol() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let server = ServerProcess::start(&["--metrics-listen", &metrics]);
    assert_eq!(
        call(&server, "Describe", r#"{"key": "m"}"#, &[]).status,
        200
    );
    assert_eq!(
        call(&server, "Describe", r#"{"key": "m"}"#, &[]).status,
        200
    );
    assert_eq!(
        curl(&[&format!("http://{}/healthz", server.addr)]).status,
        200
    );
    let scraped = curl(&[&format!("http://{metrics}/metrics")]);
    let text = String::from_utf8_lossy(&scraped.body);
    let value = |series: &str| {
        text.lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    assert_eq!(
        value("leasehold_http_requests_total{protocol=\"connect\"}"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        value("leasehold_http_requests_total{protocol=\"healthz\"}"),
        Some(1.0),
        "{text}"
    );
    // The calls themselves are counted per RPC, as gRPC calls are.
    assert!(
        text.lines()
            .any(|l| l.starts_with("leasehold_requests_total{")
                && l.contains("rpc=\"Describe\"")
                && l.ends_with(" 2")),
        "{text}"
    );
}

/// POSTs `body` to `url` over HTTP/2 (prior knowledge) and reads the whole
/// response: (status, body). The request body is sent after the headers,
/// so the server may answer before reading it.
fn h2_post(url: &str, content_type: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let url: http::Uri = url.parse().expect("url");
    let addr = url.authority().expect("authority").to_string();
    let body = bytes::Bytes::copy_from_slice(body);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
        tokio::spawn(conn);
        let mut client = client.ready().await.expect("ready");
        let request = http::Request::post(url)
            .header("content-type", content_type)
            .body(())
            .expect("request");
        let (response, mut send) = client.send_request(request, false).expect("send");
        // The server may have reset the upload already: that is its right.
        let _ = send.send_data(body, true);
        let response = tokio::time::timeout(Duration::from_secs(10), response)
            .await
            .expect("a response within 10 s")
            .expect("response headers");
        let status = response.status().as_u16();
        let mut stream = response.into_body();
        let mut out = Vec::new();
        while let Some(chunk) = stream.data().await {
            let chunk = chunk.expect("response body");
            let _ = stream.flow_control().release_capacity(chunk.len());
            out.extend_from_slice(&chunk);
        }
        (status, out)
    })
}

/// Connect envelopes: flags, 4-byte length, message.
fn envelopes(body: &[u8]) -> Vec<(u8, Value)> {
    let mut out = Vec::new();
    let mut rest = body;
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let message = serde_json::from_slice(&rest[5..5 + len]).expect("JSON envelope");
        out.push((rest[0], message));
        rest = &rest[5 + len..];
    }
    assert!(rest.is_empty(), "trailing bytes");
    out
}

#[test]
fn keepalive_over_connect_streaming() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = auth_file(dir.path());
    let server = ServerProcess::start(&["--auth-file", &file.to_string_lossy()]);
    let right = format!("authorization: Bearer {TOKEN_A}");
    let acquired = call(
        &server,
        "Acquire",
        r#"{"key": "team-a/ka", "ttlMs": 30000}"#,
        &["-H", &right],
    )
    .json();
    let token = acquired["lease"]["token"].as_str().expect("token");
    let mut body = Vec::new();
    for message in [
        format!(r#"{{"key": "team-a/ka", "token": "{token}", "ttlMs": 20000}}"#),
        r#"{"key": "team-a/ka", "token": "00000000000000000000000000000000"}"#.to_string(),
    ] {
        body.push(0);
        body.extend_from_slice(&(message.len() as u32).to_be_bytes());
        body.extend_from_slice(message.as_bytes());
    }
    let data = dir.path().join("stream.bin");
    std::fs::write(&data, body).expect("write");
    let url = format!("http://{}/leasehold.v1.LockService/KeepAlive", server.addr);
    let stream = |headers: &[&str]| {
        let mut args = vec![
            "--http2-prior-knowledge",
            "-H",
            "content-type: application/connect+json",
        ];
        args.extend_from_slice(headers);
        let data = format!("@{}", data.display());
        args.extend(["--data-binary", &data, &url]);
        curl(&args)
    };
    let reply = stream(&["-H", &right]);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        reply.header("content-type"),
        Some("application/connect+json")
    );
    let got = envelopes(&reply.body);
    assert_eq!(got.len(), 3, "two replies and the end: {got:?}");
    assert_eq!((got[0].0, &got[0].1["alive"]), (0, &Value::from(true)));
    assert_eq!(got[0].1["ttlMs"], 20000);
    assert_eq!(got[1].1["alive"], false, "a wrong token is alive = false");
    assert_eq!((got[2].0, &got[2].1), (2, &serde_json::json!({})));
    // The stream ended with the request body: its lock was released.
    let described = call(
        &server,
        "Describe",
        r#"{"key": "team-a/ka"}"#,
        &["-H", &right],
    );
    assert_eq!(described.json()["held"], false);

    // Refused before it begins: the end-of-stream envelope carries the error.
    // Over a raw HTTP/2 client, not curl: the server answers before it has
    // read the request, then resets the rest of the upload with NO_ERROR, as
    // RFC 9113 §8.1 allows; curl 7.88 reports such a reset as error 92 when
    // it lands mid-upload (about 1 in 300 runs here), newer curl does not.
    let (status, refused) = h2_post(
        &url,
        "application/connect+json",
        &std::fs::read(&data).unwrap(),
    );
    assert_eq!(status, 200);
    let got = envelopes(&refused);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, 2);
    assert_eq!(got[0].1["error"]["code"], "unauthenticated", "{got:?}");
}

#[test]
fn connect_over_mutual_tls_on_both_http_versions() {
    let pki = certs::Pki::new("connect");
    let server_cert = pki.server();
    let client_cert = pki.client("connect-user", &[]);
    let path = |p: &std::path::Path| p.to_string_lossy().to_string();
    let server = ServerProcess::start(&[
        "--tls-cert",
        &path(&server_cert.cert_path),
        "--tls-key",
        &path(&server_cert.key_path),
        "--tls-client-ca",
        &path(&pki.ca_path),
    ]);
    let url = format!("https://{}/leasehold.v1.LockService/Describe", server.addr);
    let ca = path(&pki.ca_path);
    let (cert, key) = (path(&client_cert.cert_path), path(&client_cert.key_path));
    for version in ["--http1.1", "--http2"] {
        let reply = curl(&[
            version,
            "--cacert",
            &ca,
            "--cert",
            &cert,
            "--key",
            &key,
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"key": "tls/a"}"#,
            &url,
        ]);
        assert_eq!(reply.status, 200, "{version}: {reply:?}");
        assert_eq!(reply.json()["held"], false);
    }
    // Without a client certificate the handshake fails, whatever the protocol.
    let refused = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--http1.1", "--cacert", &ca])
        .args(["-H", "content-type: application/json", "-d", "{}", &url])
        .output()
        .expect("curl");
    assert!(
        !refused.status.success(),
        "served without a client certificate"
    );
    // Plain HTTP on the TLS port is not served either.
    let plain = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .arg(format!("http://{}/healthz", server.addr))
        .output()
        .expect("curl");
    assert!(!plain.status.success(), "plaintext served on the TLS port");
}

#[test]
fn readyz_needs_a_token_when_health_is_protected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = auth_file(dir.path());
    let server = ServerProcess::start(&[
        "--auth-file",
        &file.to_string_lossy(),
        "--auth-protect-health",
    ]);
    let readyz = format!("http://{}/readyz", server.addr);
    let refused = curl(&[&readyz]);
    assert_eq!(refused.connect_error(401)["code"], "unauthenticated");
    let right = format!("authorization: Bearer {TOKEN_A}");
    let ready = curl(&["-H", &right, &readyz]);
    assert_eq!(
        (ready.status, ready.body.as_slice()),
        (200, &b"SERVING\n"[..])
    );
    // Liveness asks nothing of anyone.
    let healthz = curl(&[&format!("http://{}/healthz", server.addr)]);
    assert_eq!(healthz.status, 200);
}

#[test]
fn connect_timeout_ms_is_the_call_deadline() {
    let server = ServerProcess::start(&[]);
    let held = call(
        &server,
        "Acquire",
        r#"{"key": "slow", "ttlMs": 30000}"#,
        &[],
    );
    assert_eq!(held.json()["acquired"], true);
    let start = Instant::now();
    let waited = call(
        &server,
        "Acquire",
        r#"{"key": "slow", "ttlMs": 30000, "waitMs": 20000}"#,
        &["-H", "connect-timeout-ms: 500"],
    );
    let took = start.elapsed();
    assert_eq!(waited.connect_error(504)["code"], "deadline_exceeded");
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(10),
        "{took:?}"
    );
    let bad = call(
        &server,
        "Describe",
        r#"{"key": "slow"}"#,
        &["-H", "connect-timeout-ms: soon"],
    );
    assert_eq!(bad.connect_error(400)["code"], "invalid_argument");
}

/// The AdminService over Connect JSON, and Watch over Connect streaming on
/// HTTP/1.1: what a browser page (the dashboard) needs, with curl.
#[test]
fn admin_and_watch_over_connect_on_http1() {
    let server = ServerProcess::start(&["--admin"]);
    let acquired = call(
        &server,
        "Acquire",
        r#"{"key": "jobs/nightly", "ttlMs": 30000, "owner": "host-7"}"#,
        &[],
    )
    .json();
    let fence = acquired["lease"]["fencingToken"]
        .as_str()
        .expect("fence")
        .to_string();

    // List, then Watch: its first event is the lock as it is now.
    let admin = |method: &str, json: &str| {
        let url = format!("http://{}/leasehold.v1.AdminService/{method}", server.addr);
        curl(&["-H", "content-type: application/json", "-d", json, &url])
    };
    let listed = admin("List", r#"{"prefix": "jobs/"}"#).json();
    let locks = listed["locks"].as_array().expect("locks");
    assert_eq!(locks.len(), 1, "{listed}");
    assert_eq!(locks[0]["key"], "jobs/nightly");
    assert_eq!(locks[0]["state"]["owner"], "host-7");
    assert_eq!(locks[0]["state"]["fencingToken"], fence.as_str());

    let dir = tempfile::tempdir().expect("tempdir");
    let request = br#"{"key": "jobs/nightly"}"#;
    let mut body = vec![0u8];
    body.extend_from_slice(&(request.len() as u32).to_be_bytes());
    body.extend_from_slice(request);
    let data = dir.path().join("watch.bin");
    std::fs::write(&data, body).expect("write");
    let url = format!("http://{}/leasehold.v1.LockService/Watch", server.addr);
    // The stream ends at its Connect deadline; curl speaks HTTP/1.1.
    let watched = curl(&[
        "--http1.1",
        "-H",
        "content-type: application/connect+json",
        "-H",
        "connect-timeout-ms: 1500",
        "--data-binary",
        &format!("@{}", data.display()),
        &url,
    ]);
    assert_eq!(watched.status, 200, "{watched:?}");
    let got = envelopes(&watched.body);
    assert!(got.len() >= 2, "{got:?}");
    assert_eq!(got[0].0, 0);
    assert_eq!(got[0].1["kind"], "KIND_STATE", "{got:?}");
    assert_eq!(got[0].1["state"]["held"], true);
    assert_eq!(got[0].1["state"]["owner"], "host-7");
    let (flags, end) = got.last().expect("the end");
    assert_eq!(*flags, 2, "{got:?}");
    assert_eq!(end["error"]["code"], "deadline_exceeded", "{got:?}");

    // ForceRelease over Connect: one holder removed, the lock free.
    let forced = admin(
        "ForceRelease",
        r#"{"key": "jobs/nightly", "reason": "stuck deploy"}"#,
    )
    .json();
    assert_eq!(forced["released"], 1, "{forced}");
    let described = call(&server, "Describe", r#"{"key": "jobs/nightly"}"#, &[]).json();
    assert_eq!(described["held"], false);
    // An AdminService method that does not exist is a Connect 404.
    let missing = admin("Drop", "{}");
    assert_eq!(missing.status, 404, "{missing:?}");
}
