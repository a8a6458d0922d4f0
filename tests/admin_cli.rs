//! The `leasehold list` and `leasehold force-release` subcommands against
//! a real server: the table and JSON output, the exit codes.

mod common;

use common::admin as admin_common;

use admin_common::*;
use common::*;

/// `leasehold ARGS...` against `endpoint`: exit code and stdout.
async fn cli(endpoint: String, args: &[&str]) -> (i32, String) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_leasehold"))
            .args(&args)
            .args(["--endpoint", &endpoint, "--retry-for", "2s"])
            .output()
            .expect("run leasehold");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    })
    .await
    .expect("join")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_and_force_releases() {
    let server = admin_server(Backend::Memory).await;
    let mut c = server.client().await;
    let mut leases = Vec::new();
    for (key, owner) in [
        ("cli/a", "host-1:42"),
        ("cli/b", "two words"),
        ("other", "x"),
    ] {
        let mut req = acquire(key, 60_000);
        req.owner = owner.into();
        leases.push(lease_of(
            c.acquire(req).await.expect("acquire").into_inner(),
        ));
    }
    let (code, out) = cli(server.endpoint(), &["list", "cli/", "--page-size", "1"]).await;
    assert_eq!(code, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    for column in [
        "KEY",
        "MODE",
        "HOLDERS",
        "OWNER",
        "FENCING_TOKEN",
        "TTL_LEFT",
    ] {
        assert!(lines[0].contains(column), "{out}");
    }
    assert!(
        lines[1].starts_with("cli/a ") && lines[1].contains("host-1:42"),
        "{out}"
    );
    assert!(
        lines[1].contains(&leases[0].fencing_token.to_string()),
        "{out}"
    );
    assert!(lines[2].contains("\"two words\""), "{out}");
    assert!(!out.contains(&leases[0].token), "no token in the listing");

    let (code, out) = cli(server.endpoint(), &["list", "--json"]).await;
    assert_eq!(code, 0, "{out}");
    let locks: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(locks.len(), 3, "{out}");
    assert!(
        locks
            .iter()
            .any(|l| l["key"] == "other" && l["owner"] == "x")
    );

    let (code, out) = cli(
        server.endpoint(),
        &["force-release", "cli/a", "--reason", "stuck deploy"],
    )
    .await;
    assert_eq!((code, out.trim()), (0, "key=cli/a released=1"));
    assert!(
        !c.describe(describe("cli/a"))
            .await
            .expect("describe")
            .into_inner()
            .held
    );
    let (code, out) = cli(
        server.endpoint(),
        &["force-release", "cli/a", "--reason", "again", "--json"],
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(out.trim(), r#"{"key":"cli/a","released":0}"#);
    let (code, _) = cli(
        server.endpoint(),
        &["force-release", "cli/a", "--reason", ""],
    )
    .await;
    assert_eq!(code, 64, "an empty reason is the server's INVALID_ARGUMENT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_exits_77_without_the_admin_grant() {
    let server = auth_server().await;
    let (code, _) = cli(server.endpoint(), &["list", "--auth-token", USER]).await;
    assert_eq!(code, 77);
    let (code, _) = cli(server.endpoint(), &["list", "--auth-token", OPS]).await;
    assert_eq!(code, 0);
}

/// The audit trail: one WARN line per forced release with the key, the
/// reason, the tenant and the peer; neither the lease's token nor the
/// caller's bearer token anywhere in the server's output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_release_is_logged_at_warn_without_tokens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("auth.toml");
    std::fs::write(
        &file,
        format!(
            "[[tenant]]\nname = \"ops\"\nprefixes = [\"\"]\ntokens = [\"{OPS}\"]\nadmin = true\n"
        ),
    )
    .expect("write auth file");
    let auth = file.to_string_lossy().into_owned();
    let server = tokio::task::block_in_place(|| ServerProcess::start(&["--auth-file", &auth]));
    let mut c = leasehold::pb::lock_service_client::LockServiceClient::connect(server.endpoint())
        .await
        .expect("connect");
    let lease = lease_of(
        c.acquire(req(acquire("deploy/migration", 60_000), OPS))
            .await
            .expect("acquire")
            .into_inner(),
    );
    let (code, out) = cli(
        server.endpoint(),
        &[
            "force-release",
            "deploy/migration",
            "--reason",
            "deploy 4711 wedged",
            "--auth-token",
            OPS,
        ],
    )
    .await;
    assert_eq!((code, out.trim()), (0, "key=deploy/migration released=1"));
    let line = tokio::task::block_in_place(|| {
        server
            .output
            .wait_for("force-released", std::time::Duration::from_secs(10))
    });
    for part in [
        "WARN",
        "deploy/migration",
        "deploy 4711 wedged",
        "ops",
        "peer",
        &lease.fencing_token.to_string(),
    ] {
        assert!(line.contains(part), "{part:?} missing from {line:?}");
    }
    for logged in server.output.all() {
        assert!(
            !logged.contains(&lease.token),
            "lease token logged: {logged}"
        );
        assert!(!logged.contains(OPS), "bearer token logged: {logged}");
    }
}
