//! No client believes it holds a lock longer than the server does (issue
//! 22), `leasehold lock`: CMD appends wall-clock timestamps to a file, a
//! rival waits for the same lock, and after a freeze, a stall, a late
//! grant or Ctrl-Z of the CLI, CMD's last write must come before the
//! rival's grant.

#[path = "belief/mod.rs"]
mod belief;
mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use belief::proxy::{Mode, Proxy};
use belief::*;
use common::*;

fn cli_lock(endpoint: &str, key: &str, file: &Path, flags: &[&str]) -> std::process::Child {
    let script = format!(
        "while true; do date +%s%N >> '{}'; sleep 0.02; done",
        file.display()
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_leasehold"));
    cmd.args(["lock", key, "--endpoint", endpoint])
        .args(flags)
        .args(["--", "sh", "-c", &script])
        .env_remove("LEASEHOLD_ENDPOINT")
        .env("LEASEHOLD_LOG", "warn");
    spawn_tied(cmd)
}

fn stamps(file: &Path) -> Vec<u128> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn wait_exit(child: &mut std::process::Child, within: Duration) -> i32 {
    let mut code = None;
    wait_until("leasehold lock to exit", within, || {
        code = child
            .try_wait()
            .expect("try_wait")
            .map(|s| s.code().unwrap_or(-1));
        code.is_some()
    });
    code.expect("exited")
}

/// Asserts CMD wrote nothing at or after `granted`; returns the margin.
fn cmd_ended_before(file: &Path, granted: SystemTime) -> f64 {
    let last = stamps(file).into_iter().max().expect("CMD ran");
    let g = nanos(granted);
    let margin = (g as f64 - last as f64) / 1e6;
    assert!(
        last < g,
        "CMD wrote {:.1} ms after the rival's grant",
        -margin
    );
    margin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_frozen_connection_stops_cmd_before_the_rival_is_granted() {
    let server = TestServer::start(Backend::Memory).await;
    let proxy = Proxy::start(server.addr).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("stamps");
    let mut cli = cli_lock(
        &proxy.endpoint(),
        "belief/cli-freeze",
        &file,
        &[
            "--ttl", "3s", "--grace", "500ms", "--margin", "500ms", "--wait", "0s",
        ],
    );
    tokio::task::block_in_place(|| {
        wait_until("CMD to start", Duration::from_secs(20), || {
            !stamps(&file).is_empty()
        })
    });
    let rival = rival(server.endpoint(), "belief/cli-freeze").await;
    waiting(&server, 1).await;
    proxy.set(Mode::Pause);
    let (_, granted) = tokio::time::timeout(Duration::from_secs(10), rival)
        .await
        .expect("the rival is granted")
        .unwrap();
    let code = tokio::task::block_in_place(|| wait_exit(&mut cli, Duration::from_secs(10)));
    assert_eq!(code, 76);
    let margin = cmd_ended_before(&file, granted);
    println!("cli freeze: CMD's last write {margin:.1} ms before the rival's grant");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_delayed_replies_stop_cmd_before_the_rival_is_granted() {
    let server = TestServer::start(Backend::Memory).await;
    let proxy = Proxy::start(server.addr).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("stamps");
    let mut cli = cli_lock(
        &proxy.endpoint(),
        "belief/cli-stall",
        &file,
        &[
            "--ttl", "3s", "--grace", "500ms", "--margin", "500ms", "--wait", "0s",
        ],
    );
    tokio::task::block_in_place(|| {
        wait_until("CMD to start", Duration::from_secs(20), || {
            !stamps(&file).is_empty()
        })
    });
    let rival = rival(server.endpoint(), "belief/cli-stall").await;
    waiting(&server, 1).await;
    proxy.delay(Duration::from_millis(600), Duration::from_millis(600));
    let (_, granted) = tokio::time::timeout(Duration::from_secs(15), rival)
        .await
        .expect("the rival is granted")
        .unwrap();
    let code = tokio::task::block_in_place(|| wait_exit(&mut cli, Duration::from_secs(10)));
    assert_eq!(code, 76);
    let margin = cmd_ended_before(&file, granted);
    println!("cli stall: CMD's last write {margin:.1} ms before the rival's grant");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_ctrl_z_stops_cmd_and_a_late_resume_kills_it() {
    let server = TestServer::start(Backend::Memory).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("stamps");
    let mut cli = cli_lock(
        &server.endpoint(),
        "belief/cli-tstp",
        &file,
        &[
            "--ttl", "2s", "--grace", "500ms", "--margin", "300ms", "--wait", "0s",
        ],
    );
    tokio::task::block_in_place(|| {
        wait_until("CMD to start", Duration::from_secs(20), || {
            !stamps(&file).is_empty()
        })
    });
    let rival = rival(server.endpoint(), "belief/cli-tstp").await;
    waiting(&server, 1).await;
    signal(cli.id(), "-TSTP");
    let (_, granted) = tokio::time::timeout(Duration::from_secs(10), rival)
        .await
        .expect("the rival is granted once the stopped CLI's lease expires")
        .unwrap();
    signal(cli.id(), "-CONT");
    let code = tokio::task::block_in_place(|| wait_exit(&mut cli, Duration::from_secs(10)));
    assert_eq!(code, 76);
    let margin = cmd_ended_before(&file, granted);
    println!("cli SIGTSTP: CMD's last write {margin:.1} ms before the rival's grant");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_waiting_acquire_with_a_late_reply_never_overlaps() {
    let server = TestServer::start(Backend::Memory).await;
    let holder = connect(server.endpoint()).await;
    let held = holder
        .lock("belief/cli-late")
        .ttl(Duration::from_secs(30))
        .wait(Duration::ZERO)
        .lease()
        .await
        .expect("held");
    let proxy = Proxy::start(server.addr).await;
    proxy.delay(Duration::ZERO, Duration::from_millis(1500));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("stamps");
    let mut cli = cli_lock(
        &proxy.endpoint(),
        "belief/cli-late",
        &file,
        &["--ttl", "1s"],
    );
    waiting(&server, 1).await;
    let rival = rival(server.endpoint(), "belief/cli-late").await;
    waiting(&server, 2).await;
    assert!(holder.release("belief/cli-late", held.token).await.unwrap());
    let (_, granted) = tokio::time::timeout(Duration::from_secs(10), rival)
        .await
        .expect("the rival is granted")
        .unwrap();
    let code = tokio::task::block_in_place(|| wait_exit(&mut cli, Duration::from_secs(20)));
    assert_eq!(code, 76);
    if stamps(&file).is_empty() {
        println!("cli late reply: CMD never started");
    } else {
        let margin = cmd_ended_before(&file, granted);
        println!("cli late reply: CMD's last write {margin:.1} ms before the rival's grant");
    }
}
