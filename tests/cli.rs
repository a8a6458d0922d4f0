//! The `leasehold` command line as scripts use it: `leasehold lock` runs
//! commands under a lock (mutual exclusion across many processes on a Redis
//! Cluster, surviving the loss of a server, stopping the command when the
//! lock is lost), `acquire | renew | describe | release` with their
//! text and JSON output and documented exit codes, `watch` printing a
//! lock's events and `elect` running a command on one leader at a time.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use leasehold::client::Client;

/// A running `leasehold` client process, stdout and stderr kept apart.
struct Cli {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

fn read_lines(stream: impl std::io::Read + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
    });
    lines
}

impl Cli {
    fn spawn(args: &[&str], envs: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_leasehold"));
        cmd.args(args).env_remove("LEASEHOLD_ENDPOINT");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = spawn_tied(cmd);
        let stdout = read_lines(child.stdout.take().expect("stdout"));
        let stderr = read_lines(child.stderr.take().expect("stderr"));
        Self {
            child,
            stdout,
            stderr,
        }
    }

    fn stdout(&self) -> Vec<String> {
        self.stdout
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn stderr(&self) -> Vec<String> {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    #[track_caller]
    fn wait_stdout(&self, needle: &str, within: Duration) {
        wait_until(&format!("stdout line {needle:?}"), within, || {
            self.stdout().iter().any(|l| l.contains(needle))
        });
    }

    #[track_caller]
    fn wait_stderr(&self, needle: &str, within: Duration) -> String {
        let mut found = None;
        wait_until(&format!("stderr line {needle:?}"), within, || {
            found = self.stderr().into_iter().find(|l| l.contains(needle));
            found.is_some()
        });
        found.unwrap_or_default()
    }

    /// Waits for the exit code (bounded); the output is read to its end.
    #[track_caller]
    fn wait(&mut self, within: Duration) -> i32 {
        let mut status = None;
        wait_until("the leasehold process to exit", within, || {
            status = self.child.try_wait().expect("try_wait");
            status.is_some()
        });
        // The readers finish when the pipes close; give them a bounded moment.
        let end = Instant::now() + Duration::from_secs(2);
        while Instant::now() < end && std::sync::Arc::strong_count(&self.stdout) > 1 {
            std::thread::sleep(Duration::from_millis(5));
        }
        let status = status.expect("exited");
        status
            .code()
            .unwrap_or_else(|| panic!("killed by a signal: {status:?}"))
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    fn signal(&self, sig: &str) {
        signal(self.child.id(), sig);
    }
}

/// Runs a client command to completion: (exit code, stdout, stderr).
fn run(args: &[&str]) -> (i32, Vec<String>, Vec<String>) {
    let mut cli = Cli::spawn(args, &[]);
    let code = cli.wait(Duration::from_secs(30));
    (code, cli.stdout(), cli.stderr())
}

/// The `name=value` field of a text output line.
fn field<'a>(line: &'a str, name: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name} in {line:?}"))
}

/// Checks a file of `start TOKEN NANOS` / `end TOKEN NANOS` lines: the
/// intervals come in pairs, never overlap, and tokens strictly increase.
#[track_caller]
fn assert_exclusive(file: &Path, expected: usize) {
    let text = std::fs::read_to_string(file).expect("read the file");
    let lines: Vec<(String, u64, u128)> = text
        .lines()
        .map(|l| {
            let parts: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(parts.len(), 3, "malformed line {l:?}");
            (
                parts[0].to_string(),
                parts[1].parse().expect("fencing token"),
                parts[2].parse().expect("nanoseconds"),
            )
        })
        .collect();
    assert_eq!(lines.len(), expected * 2, "{text}");
    let mut last_end = 0u128;
    let mut last_token = 0u64;
    for pair in lines.chunks(2) {
        let (start, end) = (&pair[0], &pair[1]);
        assert_eq!(start.0, "start", "{text}");
        assert_eq!(end.0, "end", "interleaved holders:\n{text}");
        assert_eq!(start.1, end.1, "interleaved holders:\n{text}");
        assert!(start.1 > last_token, "tokens must increase:\n{text}");
        assert!(start.2 >= last_end, "overlapping intervals:\n{text}");
        assert!(end.2 >= start.2, "{text}");
        last_token = start.1;
        last_end = end.2;
    }
}

const CRITICAL_SECTION: &str = r#"echo "start $LEASEHOLD_FENCING_TOKEN $(date +%s%N)" >> "$OUT"; sleep 0.05; echo "end $LEASEHOLD_FENCING_TOKEN $(date +%s%N)" >> "$OUT""#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_then_eight_lock_processes_never_overlap() {
    let url = cluster_url();
    let prefix = unique_prefix();
    let (a, b) = tokio::task::block_in_place(|| {
        (
            ServerProcess::on_redis(&url, &prefix),
            ServerProcess::on_redis(&url, &prefix),
        )
    });
    let dir = tempfile::tempdir().unwrap();
    for (round, n) in [2usize, 8].into_iter().enumerate() {
        let out = dir.path().join(format!("round-{round}.log"));
        let out_str = out.to_str().unwrap().to_string();
        let mut procs: Vec<Cli> = (0..n)
            .map(|i| {
                // Half the processes go to each server first.
                let (first, second) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
                Cli::spawn(
                    &[
                        "lock",
                        "cli/mutex",
                        "--ttl",
                        "5s",
                        "--wait",
                        "60s",
                        "--endpoint",
                        &first.endpoint(),
                        "--endpoint",
                        &second.endpoint(),
                        "--",
                        "sh",
                        "-c",
                        CRITICAL_SECTION,
                    ],
                    &[("OUT", &out_str)],
                )
            })
            .collect();
        for p in &mut procs {
            let code = tokio::task::block_in_place(|| p.wait(Duration::from_secs(60)));
            assert_eq!(code, 0, "stderr: {:?}", p.stderr());
        }
        assert_exclusive(&out, n);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_of_two_servers_does_not_stop_the_command() {
    let url = cluster_url();
    let prefix = unique_prefix();
    let (mut a, b) = tokio::task::block_in_place(|| {
        (
            ServerProcess::on_redis(&url, &prefix),
            ServerProcess::on_redis(&url, &prefix),
        )
    });
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let script = r#"echo started; i=0; while [ ! -e "$GO" ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done; echo finished"#;
    let mut cli = Cli::spawn(
        &[
            "lock",
            "cli/failover",
            "--ttl",
            "10s",
            "--endpoint",
            &a.endpoint(),
            "--endpoint",
            &b.endpoint(),
            "--",
            "sh",
            "-c",
            script,
        ],
        &[("GO", go.to_str().unwrap())],
    );
    tokio::task::block_in_place(|| cli.wait_stdout("started", Duration::from_secs(20)));
    let observer = Client::connect(b.endpoint()).await.unwrap();
    let before = observer
        .describe("cli/failover")
        .await
        .unwrap()
        .expect("held");

    // The CLI's stream is on the first endpoint: crash that server.
    tokio::task::block_in_place(|| a.kill());
    let killed_at = Instant::now();
    let line = tokio::task::block_in_place(|| {
        cli.wait_stderr("re-attached locks", Duration::from_secs(10))
    });
    eprintln!(
        "re-attach seen {:?} after the kill: {line}",
        killed_at.elapsed()
    );
    assert!(
        line.contains(&b.addr),
        "re-attached on the other server: {line}"
    );

    // A second after the kill, a remaining TTL near 10 s can only come from
    // a renewal that went through the surviving server.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let end = Instant::now() + Duration::from_secs(8);
    loop {
        let info = observer
            .describe("cli/failover")
            .await
            .unwrap()
            .expect("held");
        assert_eq!(info.fencing_token, before.fencing_token);
        if info.ttl_remaining >= Duration::from_millis(9_500) {
            break;
        }
        assert!(Instant::now() < end, "not renewed after the kill: {info:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(cli.running(), "the command keeps running");

    std::fs::write(&go, b"").unwrap();
    let code = tokio::task::block_in_place(|| cli.wait(Duration::from_secs(20)));
    assert_eq!(code, 0, "stderr: {:?}", cli.stderr());
    assert!(cli.stdout().iter().any(|l| l == "finished"));
    assert!(
        observer.describe("cli/failover").await.unwrap().is_none(),
        "released on exit"
    );
}

/// A `leasehold lock` on a cluster-backed server whose command reports
/// SIGTERM (or ignores it), then a forced expiry and another holder.
async fn lose_lock_while_running(script: &str, grace: &str) -> (Cli, Instant, TestServer) {
    let server = TestServer::start(Backend::Cluster).await;
    let cli = Cli::spawn(
        &[
            "lock",
            "cli/lost",
            "--ttl",
            "2s",
            "--grace",
            grace,
            // Grace + margin must fit in half the TTL (or grace is shortened).
            "--margin",
            "0s",
            "--endpoint",
            &server.endpoint(),
            "--",
            "sh",
            "-c",
            script,
        ],
        &[],
    );
    tokio::task::block_in_place(|| cli.wait_stdout("started", Duration::from_secs(20)));
    force_expire(&server, "cli/lost");
    let other = Client::connect(server.endpoint()).await.unwrap();
    let taken = other
        .lock("cli/lost")
        .wait(Duration::ZERO)
        .lease()
        .await
        .expect("another client takes the expired lock");
    assert!(taken.fencing_token > 0);
    (cli, Instant::now(), server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_lock_stops_the_command_with_sigterm() {
    let script = r#"trap 'echo got-term; exit 3' TERM; echo started; i=0; while [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done; echo not-stopped"#;
    let (mut cli, taken_at, _server) = lose_lock_while_running(script, "1s").await;
    let code = tokio::task::block_in_place(|| cli.wait(Duration::from_secs(10)));
    let took = taken_at.elapsed();
    assert_eq!(code, 76, "stderr: {:?}", cli.stderr());
    // The next renewal (within ttl/3) finds the lock gone.
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(
        cli.stdout().iter().any(|l| l == "got-term"),
        "{:?}",
        cli.stdout()
    );
    assert!(!cli.stdout().iter().any(|l| l == "not-stopped"));
    let errors: Vec<_> = cli
        .stderr()
        .into_iter()
        .filter(|l| l.starts_with("leasehold lock:"))
        .collect();
    assert_eq!(errors.len(), 1, "{:?}", cli.stderr());
    assert!(
        errors[0].contains("lost the lock \"cli/lost\""),
        "{}",
        errors[0]
    );
    assert!(errors[0].contains("SIGTERM"), "{}", errors[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_ignoring_sigterm_is_killed_after_the_grace_period() {
    let script = r#"trap '' TERM; echo started; i=0; while [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done; echo not-stopped"#;
    let (mut cli, taken_at, _server) = lose_lock_while_running(script, "1s").await;
    tokio::task::block_in_place(|| cli.wait_stderr("lost the lock", Duration::from_secs(5)));
    let noticed = taken_at.elapsed();
    let code = tokio::task::block_in_place(|| cli.wait(Duration::from_secs(10)));
    let took = taken_at.elapsed();
    assert_eq!(code, 76);
    assert!(
        // SIGKILL comes --grace (1 s) after the SIGTERM, which the test
        // noticed a little after it was sent.
        took >= noticed + Duration::from_millis(700),
        "{took:?} vs {noticed:?}"
    );
    assert!(took < noticed + Duration::from_secs(5), "{took:?}");
    assert!(!cli.stdout().iter().any(|l| l == "not-stopped"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_gets_the_lock_in_its_environment_and_its_status_is_ours() {
    let server = TestServer::start(Backend::Memory).await;
    let endpoint = server.endpoint();
    let (code, out, err) = tokio::task::block_in_place(|| {
        run(&[
            "lock",
            "cli/env",
            "--endpoint",
            &endpoint,
            "--",
            "sh",
            "-c",
            r#"echo "key=$LEASEHOLD_KEY fence=$LEASEHOLD_FENCING_TOKEN"; exit 7"#,
        ])
    });
    assert_eq!(code, 7, "{err:?}");
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(field(&out[0], "key"), "cli/env");
    assert!(field(&out[0], "fence").parse::<u64>().unwrap() > 0);
    assert!(err.is_empty(), "{err:?}");
    let client = Client::connect(endpoint.as_str()).await.unwrap();
    assert!(
        client.describe("cli/env").await.unwrap().is_none(),
        "released"
    );

    // A signal to `leasehold lock` goes to the command; its status is ours.
    let mut cli = Cli::spawn(
        &[
            "lock",
            "cli/env",
            "--endpoint",
            &endpoint,
            "--",
            "sh",
            "-c",
            r#"trap 'echo got-int; exit 5' INT; echo started; i=0; while [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done"#,
        ],
        &[],
    );
    tokio::task::block_in_place(|| cli.wait_stdout("started", Duration::from_secs(20)));
    cli.signal("-INT");
    let code = tokio::task::block_in_place(|| cli.wait(Duration::from_secs(10)));
    assert_eq!(code, 5);
    assert!(cli.stdout().iter().any(|l| l == "got-int"));
    assert!(
        client.describe("cli/env").await.unwrap().is_none(),
        "released"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_and_one_line_errors() {
    let server = TestServer::start(Backend::Memory).await;
    let endpoint = server.endpoint();
    let client = Client::connect(endpoint.as_str()).await.unwrap();
    let holder = client
        .lock("cli/held")
        .ttl(Duration::from_secs(30))
        .await
        .unwrap();

    // Not acquired within --wait: 75, and the command never ran.
    let start = Instant::now();
    let (code, out, err) = tokio::task::block_in_place(|| {
        run(&[
            "lock",
            "cli/held",
            "--wait",
            "300ms",
            "--endpoint",
            &endpoint,
            "--",
            "echo",
            "ran",
        ])
    });
    assert_eq!(code, 75, "{err:?}");
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(
        err[0].starts_with(
            "leasehold lock: lock \"cli/held\" is held by another client: not acquired within"
        ),
        "{}",
        err[0]
    );

    // No server: 69 within --retry-for.
    let dead = format!("127.0.0.1:{}", free_port());
    let (code, _, err) = tokio::task::block_in_place(|| {
        run(&[
            "lock",
            "x",
            "--endpoint",
            &dead,
            "--retry-for",
            "500ms",
            "--",
            "true",
        ])
    });
    assert_eq!(code, 69);
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(
        err[0].contains("unavailable") && err[0].contains(&dead),
        "{}",
        err[0]
    );
    // The same through LEASEHOLD_ENDPOINT, comma-separated.
    let mut cli = Cli::spawn(
        &["describe", "x", "--retry-for", "300ms"],
        &[("LEASEHOLD_ENDPOINT", &format!("{dead},{dead}"))],
    );
    assert_eq!(
        tokio::task::block_in_place(|| cli.wait(Duration::from_secs(10))),
        69
    );
    assert_eq!(cli.stderr().len(), 1, "{:?}", cli.stderr());

    // An invalid key: 64, naming the field.
    let (code, _, err) = tokio::task::block_in_place(|| {
        run(&["lock", "bad\tkey", "--endpoint", &endpoint, "--", "true"])
    });
    assert_eq!(code, 64);
    assert_eq!(
        err,
        ["leasehold lock: invalid argument: key: contains the control character U+0009"]
    );
    let (code, _, err) = tokio::task::block_in_place(|| {
        run(&["acquire", "k", "--ttl", "10ms", "--endpoint", &endpoint])
    });
    assert_eq!(code, 64);
    assert!(err.len() == 1 && err[0].contains("ttl_ms"), "{err:?}");

    // A command that does not exist: 127, and the lock is given back.
    let (code, _, err) = tokio::task::block_in_place(|| {
        run(&[
            "lock",
            "cli/nocmd",
            "--endpoint",
            &endpoint,
            "--",
            "/nonexistent/cmd",
        ])
    });
    assert_eq!(code, 127);
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(client.describe("cli/nocmd").await.unwrap().is_none());

    // No command at all: a usage error.
    let (code, _, _) = tokio::task::block_in_place(|| run(&["lock", "k", "--endpoint", &endpoint]));
    assert_eq!(code, 2);
    // The command without `--`: a usage error that says where it goes.
    let (code, _, err) = tokio::task::block_in_place(|| run(&["lock", "k", "echo", "hi"]));
    assert_eq!(code, 2);
    assert!(
        err.iter()
            .any(|l| l.contains("tip: put the command after `--`")),
        "{err:?}"
    );
    // `--ttl 0` and a negative TTL are refused, not taken for the default
    // or for a command after `--`.
    for (ttl, says) in [
        ("0", "must be more than 0"),
        ("-5s", "cannot be negative (did you mean 5s?)"),
    ] {
        let (code, _, err) =
            tokio::task::block_in_place(|| run(&["lock", "k", "--ttl", ttl, "--", "true"]));
        assert_eq!(code, 2, "{ttl}: {err:?}");
        assert!(err.iter().any(|l| l.contains(says)), "{ttl}: {err:?}");
    }
    drop(holder);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_acquire_renew_describe_release() {
    let server = TestServer::start(Backend::Redis).await;
    let endpoint = server.endpoint();
    let e = ["--endpoint", endpoint.as_str()];
    let cli = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend_from_slice(&e);
        tokio::task::block_in_place(|| run(&all))
    };

    let (code, out, err) = cli(&[
        "acquire",
        "cli/s",
        "--ttl",
        "10s",
        "--owner",
        "batch 7",
        "--metadata",
        "job=nightly",
    ]);
    assert_eq!(code, 0, "{err:?}");
    assert_eq!(out.len(), 1);
    let token = field(&out[0], "token").to_string();
    let fence: u64 = field(&out[0], "fencing_token").parse().unwrap();
    assert_eq!(field(&out[0], "key"), "cli/s");
    assert_eq!(field(&out[0], "ttl_ms"), "10000");

    // Held: 75, and a JSON object saying so.
    let (code, out, err) = cli(&["acquire", "cli/s", "--json"]);
    assert_eq!(code, 75);
    assert_eq!(err.len(), 1, "{err:?}");
    let v: serde_json::Value = serde_json::from_str(&out[0]).unwrap();
    assert_eq!(v["acquired"], false);
    assert!(v["retry_after_ms"].as_u64().unwrap() > 0);

    let (code, out, _) = cli(&["describe", "cli/s"]);
    assert_eq!(code, 0);
    assert_eq!(field(&out[0], "held"), "true");
    assert!(out[0].contains("owner=\"batch 7\""), "{}", out[0]);
    assert_eq!(field(&out[0], "fencing_token"), fence.to_string());
    assert_eq!(field(&out[0], "metadata.job"), "nightly");
    assert!(!out[0].contains(&token), "describe never shows the token");

    let (code, out, _) = cli(&["renew", "cli/s", &token, "--ttl", "20s", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out[0]).unwrap();
    assert_eq!(
        (v["renewed"].clone(), v["ttl_ms"].clone()),
        (true.into(), 20_000.into())
    );

    // The token can come on stdin, out of the process list.
    let mut release = Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .args(["release", "cli/s", "-", "--endpoint", &endpoint])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    writeln!(release.stdin.take().unwrap(), "{token}").unwrap();
    let output = release.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "key=cli/s released=true"
    );

    // Released: a retried release says so again (a release whose reply
    // was lost is retried safely); renew says it is gone with 76;
    // describe says held=false.
    let (code, out, _) = cli(&["release", "cli/s", &token]);
    assert_eq!((code, out[0].as_str()), (0, "key=cli/s released=true"));
    let (code, out, err) = cli(&["release", "cli/s", "0123456789abcdef0123456789abcdef"]);
    assert_eq!((code, out[0].as_str()), (76, "key=cli/s released=false"));
    assert_eq!(err.len(), 1);
    let (code, _, _) = cli(&["renew", "cli/s", &token]);
    assert_eq!(code, 76);
    let (code, out, _) = cli(&["describe", "cli/s", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out[0]).unwrap();
    assert_eq!(v["held"], false);

    // --request-id: a retried acquire prints the same lease.
    let (_, first, _) = cli(&["acquire", "cli/r", "--request-id", "run-1", "--json"]);
    let (code, second, _) = cli(&["acquire", "cli/r", "--request-id", "run-1", "--json"]);
    assert_eq!(code, 0);
    assert_eq!(first, second);
}

/// `leasehold lock --shared --limit 2`: a semaphore of two permits. Five commands
/// started at once never run more than two at a time, and two do run side
/// by side; every one of them runs and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_shared_runs_at_most_limit_commands_at_once() {
    let server = tokio::task::block_in_place(|| ServerProcess::start(&[]));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("permits.log");
    let out_str = out.to_str().unwrap().to_string();
    let section =
        r#"echo "start $(date +%s%N)" >> "$OUT"; sleep 0.3; echo "end $(date +%s%N)" >> "$OUT""#;
    let mut procs: Vec<Cli> = (0..5)
        .map(|_| {
            Cli::spawn(
                &[
                    "lock",
                    "cli/permits",
                    "--shared",
                    "--limit",
                    "2",
                    "--ttl",
                    "5s",
                    "--endpoint",
                    &server.endpoint(),
                    "--",
                    "sh",
                    "-c",
                    section,
                ],
                &[("OUT", &out_str)],
            )
        })
        .collect();
    for p in &mut procs {
        let code = tokio::task::block_in_place(|| p.wait(Duration::from_secs(60)));
        assert_eq!(code, 0, "stderr: {:?}", p.stderr());
    }
    let text = std::fs::read_to_string(&out).expect("the log");
    let mut events: Vec<(u128, i32)> = text
        .lines()
        .map(|l| {
            let (what, at) = l.split_once(' ').expect("two fields");
            let at: u128 = at.parse().expect("nanoseconds");
            (at, if what == "start" { 1 } else { -1 })
        })
        .collect();
    assert_eq!(events.len(), 10, "{text}");
    // Ends before starts at the same instant: a permit passed on is not an
    // overlap.
    events.sort_by_key(|&(at, delta)| (at, delta));
    let (mut running, mut most) = (0, 0);
    for (_, delta) in events {
        running += delta;
        most = most.max(running);
    }
    assert_eq!(
        most, 2,
        "at most two at once, and two did run together:\n{text}"
    );
}

/// `leasehold watch --json`: the lock's state first, then one JSON object
/// per event from other clients (a grant with its fencing token and owner,
/// its release), until SIGINT (exit 130).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_json_prints_the_state_then_each_event() {
    let server = tokio::task::block_in_place(|| ServerProcess::start(&[]));
    let endpoint = server.endpoint();
    let mut watch = Cli::spawn(
        &["watch", "cli/watched", "--json", "--endpoint", &endpoint],
        &[],
    );
    tokio::task::block_in_place(|| watch.wait_stdout("\"STATE\"", Duration::from_secs(20)));
    let (code, out, err) = tokio::task::block_in_place(|| {
        run(&[
            "acquire",
            "cli/watched",
            "--ttl",
            "10s",
            "--owner",
            "someone",
            "--endpoint",
            &endpoint,
        ])
    });
    assert_eq!(code, 0, "{err:?}");
    let fence: u64 = field(&out[0], "fencing_token").parse().expect("fence");
    let token = field(&out[0], "token").to_string();
    tokio::task::block_in_place(|| watch.wait_stdout("\"ACQUIRED\"", Duration::from_secs(10)));
    let (code, _, err) = tokio::task::block_in_place(|| {
        run(&["release", "cli/watched", &token, "--endpoint", &endpoint])
    });
    assert_eq!(code, 0, "{err:?}");
    tokio::task::block_in_place(|| watch.wait_stdout("\"RELEASED\"", Duration::from_secs(10)));
    let lines: Vec<serde_json::Value> = watch
        .stdout()
        .iter()
        .map(|l| serde_json::from_str(l).expect("one JSON object a line"))
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[0]["event"], "STATE");
    assert_eq!(lines[0]["held"], false);
    assert_eq!(lines[1]["event"], "ACQUIRED");
    assert_eq!(lines[1]["fencing_token"], fence);
    assert_eq!(lines[1]["mode"], "exclusive");
    assert_eq!(lines[1]["holders"][0]["owner"], "someone");
    assert_eq!(lines[1]["holders"][0]["fencing_token"], fence);
    assert_eq!(lines[2]["event"], "RELEASED");
    assert_eq!(lines[2]["fencing_token"], fence);
    assert_eq!(lines[2]["held"], false);
    watch.signal("INT");
    assert_eq!(
        tokio::task::block_in_place(|| watch.wait(Duration::from_secs(10))),
        130
    );
}

/// Two `leasehold elect` processes: only one runs CMD; when the leader's
/// host dies (its CMD frozen, the elect process SIGKILLed, then the CMD
/// killed, so the two never run at once), the other runs CMD well within
/// the 10 s TTL, with a higher term in LEASEHOLD_FENCING_TOKEN. SIGTERM to
/// the new leader reaches its CMD, whose status is the exit code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_elect_processes_one_runs_and_the_other_takes_over_on_sigkill() {
    let server = tokio::task::block_in_place(|| ServerProcess::start(&[]));
    let endpoint = server.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("leaders.log");
    let out_str = out.to_str().unwrap().to_string();
    let cmd = r#"echo "$LEASEHOLD_FENCING_TOKEN $$" >> "$OUT"; exec sleep 30"#;
    let elect = |value: &str| {
        Cli::spawn(
            &[
                "elect",
                "cli/leader",
                "--value",
                value,
                "--ttl",
                "10s",
                "--endpoint",
                &endpoint,
                "--",
                "sh",
                "-c",
                cmd,
            ],
            &[("OUT", &out_str)],
        )
    };
    let mut a = elect("a");
    let mut b = elect("b");
    let leaders = || -> Vec<(u64, u32)> {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let (fence, pid) = l.split_once(' ').expect("two fields");
                (fence.parse().expect("fence"), pid.parse().expect("pid"))
            })
            .collect()
    };
    tokio::task::block_in_place(|| {
        wait_until("a leader's command", Duration::from_secs(20), || {
            !leaders().is_empty()
        })
    });
    // The other keeps waiting: one command at a time.
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(700) {
        assert_eq!(leaders().len(), 1, "two leaders");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (term, cmd_pid) = leaders()[0];
    let leader_is_a = a.stderr().iter().any(|l| l.contains("leader of"));
    let (leader, follower) = if leader_is_a {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    assert!(
        leader
            .stderr()
            .iter()
            .any(|l| l.contains(&format!("term {term}"))),
        "{:?}",
        leader.stderr()
    );
    signal(cmd_pid, "STOP");
    leader.signal("KILL");
    let killed = Instant::now();
    signal(cmd_pid, "KILL");
    tokio::task::block_in_place(|| {
        wait_until("the other leader's command", Duration::from_secs(9), || {
            leaders().len() == 2
        })
    });
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(3), "failover took {took:?}");
    let (next_term, _) = leaders()[1];
    assert!(next_term > term, "term {next_term} after {term}");
    assert!(!leader.running(), "the SIGKILLed elect process is gone");
    follower.signal("TERM");
    let code = tokio::task::block_in_place(|| follower.wait(Duration::from_secs(10)));
    assert_eq!(
        code,
        128 + 15,
        "the command's status: {:?}",
        follower.stderr()
    );
}

/// Whether process `pid` has ended (gone, or a zombie nobody reaped yet).
fn ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

/// `leasehold lock` SIGKILLed outright runs no handler, and the server
/// gives the lock away as its stream ends: its watchdog SIGKILLs CMD's
/// whole process group at once (here the shell and the sleep it started),
/// instead of leaving them running beside the next holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_lock_takes_its_command_group_with_it() {
    let server = tokio::task::block_in_place(|| ServerProcess::start(&[]));
    let lock = Cli::spawn(
        &[
            "lock",
            "cli/orphan",
            "--ttl",
            "10s",
            "--endpoint",
            &server.endpoint(),
            "--",
            "sh",
            "-c",
            r#"sleep 600 & echo "PIDS $$ $!"; wait"#,
        ],
        &[],
    );
    tokio::task::block_in_place(|| lock.wait_stdout("PIDS", Duration::from_secs(20)));
    let line = lock
        .stdout()
        .into_iter()
        .find(|l| l.starts_with("PIDS"))
        .expect("the PIDS line");
    let pids: Vec<u32> = line
        .split_whitespace()
        .skip(1)
        .map(|p| p.parse().expect("a pid"))
        .collect();
    assert_eq!(pids.len(), 2, "{line}");
    assert!(pids.iter().all(|&p| !ended(p)), "running before the kill");
    lock.signal("KILL");
    let killed = Instant::now();
    tokio::task::block_in_place(|| {
        wait_until(
            "the command and its child to be killed",
            Duration::from_secs(5),
            || pids.iter().all(|&p| ended(p)),
        )
    });
    eprintln!(
        "the command's group ended {:?} after the SIGKILL",
        killed.elapsed()
    );
}
