//! The README's command-line examples, run as written by bash against a
//! real server: the token block of the quick start, the scripts session
//! (each `$ ` line's output compared with the README's, field by field) and
//! both `leasehold lock` lines. The README's commands use the default
//! endpoint; here `LEASEHOLD_ENDPOINT` points them at the test's server,
//! and the example hosts of `--endpoint` are replaced by its address (tests
//! only talk to loopback).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn readme() -> String {
    std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md")
}

/// The first ```sh block after the line containing `marker`.
fn block_after(readme: &str, marker: &str) -> String {
    let at = readme
        .find(marker)
        .unwrap_or_else(|| panic!("README has no {marker:?}"));
    let rest = &readme[at..];
    let start = rest.find("```sh\n").expect("a sh block") + "```sh\n".len();
    let end = rest[start..].find("```").expect("the block's end");
    rest[start..start + end].to_string()
}

/// A directory to run in, with `leasehold` (this build) and a `migrate`
/// stub first on `PATH`, and the README's `./nightly.sh`; both stubs write
/// down how they were run.
struct Shell {
    dir: tempfile::TempDir,
    endpoint: String,
}

impl Shell {
    fn new(endpoint: String) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_leasehold"), bin.join("leasehold")).unwrap();
        let stub = |path: &Path, name: &str| {
            let script = format!(
                "#!/bin/sh\necho \"$*|$LEASEHOLD_KEY|$LEASEHOLD_FENCING_TOKEN\" > \"$PWD/ran-{name}\"\n"
            );
            std::fs::write(path, script).unwrap();
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        stub(&bin.join("migrate"), "migrate");
        stub(&dir.path().join("nightly.sh"), "nightly");
        Self { dir, endpoint }
    }

    /// Runs `script` with `bash -euo pipefail`; (exit code, stdout, stderr).
    fn run(&self, script: &str, envs: &[(&str, &str)]) -> (i32, String, String) {
        let path = format!(
            "{}:{}",
            self.dir.path().join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut cmd = Command::new("bash");
        cmd.args(["-euo", "pipefail", "-c", script])
            .current_dir(self.dir.path())
            .env("PATH", path)
            .env("LEASEHOLD_ENDPOINT", &self.endpoint)
            .env("LEASEHOLD_LOG", "warn");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run bash");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// What the stub `name` was run with: "ARGS|KEY|FENCING_TOKEN".
    fn ran(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("ran-{name}")))
            .unwrap_or_else(|_| panic!("{name} did not run"))
            .trim()
            .to_string()
    }
}

/// The `name=value` fields of a text line, or the members of a JSON line,
/// in order.
fn fields(line: &str) -> Vec<(String, String)> {
    if line.starts_with('{') {
        let value: serde_json::Value = serde_json::from_str(line).expect("JSON line");
        let object = value.as_object().expect("a JSON object");
        return object
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string().trim_matches('"').to_string()))
            .collect();
    }
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The README shows an output of its own run; tokens, fencing tokens and
/// owners differ run to run, and a Describe's TTL is what is left.
fn same_shape(expected: &str, actual: &str) -> bool {
    let (e, a) = (fields(expected), fields(actual));
    e.len() == a.len()
        && e.iter().zip(&a).all(|((ek, ev), (ak, av))| {
            ek == ak
                && match ek.as_str() {
                    "token" | "fencing_token" | "owner" => !av.is_empty(),
                    // What is left of the session's 60 s.
                    "ttl_ms" if expected.contains("held=") => av
                        .parse::<u64>()
                        .is_ok_and(|left| left > 0 && left <= 60_000),
                    _ => ev == av,
                }
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_token_block_runs_as_written() {
    let server = tokio::task::block_in_place(|| ServerProcess::start(&[]));
    let shell = Shell::new(server.endpoint());
    let block = block_after(
        &readme(),
        "From a shell script, take the token from `--json`",
    );
    let (code, out, err) = tokio::task::block_in_place(|| shell.run(&block, &[]));
    assert_eq!(code, 0, "{block}\nstdout: {out}\nstderr: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].contains("renewed=true"), "{out}");
    assert!(lines[1].contains("released=true"), "{out}");
    let (_, out, _) = shell.run("leasehold describe reports/nightly", &[]);
    assert!(out.contains("held=false"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_scripts_session_prints_what_the_readme_shows() {
    let server = tokio::task::block_in_place(|| ServerProcess::start(&[]));
    let shell = Shell::new(server.endpoint());
    let block = block_after(&readme(), "For scripts, one call each");
    // Each `$ ` line and the output the README shows under it.
    let mut steps: Vec<(String, Vec<String>)> = Vec::new();
    for line in block.lines() {
        match line.strip_prefix("$ ") {
            Some(command) => steps.push((command.to_string(), Vec::new())),
            None => steps
                .last_mut()
                .expect("a command first")
                .1
                .push(line.into()),
        }
    }
    assert!(steps.len() >= 4, "{block}");
    // TOKEN comes from the acquire, as the token block above does it.
    let mut token = String::new();
    for (command, expected) in &steps {
        let (code, out, err) =
            tokio::task::block_in_place(|| shell.run(command, &[("TOKEN", &token)]));
        assert_eq!(code, 0, "{command}\nstderr: {err}");
        let actual: Vec<&str> = out.lines().collect();
        assert_eq!(actual.len(), expected.len(), "{command}\n{out}");
        for (e, a) in expected.iter().zip(&actual) {
            assert!(same_shape(e, a), "{command}\nREADME: {e}\nran:    {a}");
        }
        if let Some((_, t)) = fields(&out).into_iter().find(|(k, _)| k == "token") {
            token = t;
        }
    }
    assert!(!token.is_empty(), "the session's acquire printed a token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_lock_lines_run_their_commands_under_the_lock() {
    let server = tokio::task::block_in_place(|| ServerProcess::start(&[]));
    let shell = Shell::new(server.endpoint());
    let block = block_after(&readme(), "`leasehold lock` runs a command under a lock");
    let script = block
        .replace("http://10.0.0.1:50051", &server.endpoint())
        .replace("http://10.0.0.2:50051", &server.endpoint());
    assert_ne!(script, block, "the README's lock lines name example hosts");
    let (code, out, err) = tokio::task::block_in_place(|| shell.run(&script, &[]));
    assert_eq!(code, 0, "{script}\nstdout: {out}\nstderr: {err}");
    let nightly = shell.ran("nightly");
    assert!(nightly.starts_with("--full|reports/nightly|"), "{nightly}");
    let migrate = shell.ran("migrate");
    let (args, fence) = migrate.split_once('|').expect("ARGS|KEY|FENCE");
    assert!(args.starts_with("--fence "), "{migrate}");
    let fence_arg = args.trim_start_matches("--fence ");
    assert!(fence_arg.parse::<u64>().is_ok_and(|f| f > 0), "{migrate}");
    assert_eq!(fence, format!("db/migrations|{fence_arg}"), "{migrate}");
    // Both locks were released when their commands exited.
    let mut c = leasehold::pb::lock_service_client::LockServiceClient::connect(server.endpoint())
        .await
        .unwrap();
    for key in ["reports/nightly", "db/migrations"] {
        assert!(
            !c.describe(describe(key)).await.unwrap().into_inner().held,
            "{key}"
        );
    }
}
