//! `redis-sentinel://`: Leasehold finds the primary through Sentinel, and
//! after Sentinel fails the primary over to its replica, finds the new one
//! by itself — locks replicated before the failover are still held there.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::*;
use leasehold::pb::lock_service_client::LockServiceClient;
use tonic::Code;

/// A `redis-server --sentinel` watching one primary as `mymaster`, with a
/// short down-after time so that a failover happens within seconds.
struct Sentinel {
    port: u16,
    child: Child,
    dir: PathBuf,
}

impl Sentinel {
    fn start(primary_port: u16) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("leasehold-sentinel-")
            .tempdir()
            .expect("tempdir")
            .keep();
        let port = free_port();
        // Sentinel rewrites its own config file, so it gets one of its own.
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\nlogfile \"\"\n\
                 sentinel monitor mymaster 127.0.0.1 {primary_port} 1\n\
                 sentinel down-after-milliseconds mymaster 1000\n\
                 sentinel failover-timeout mymaster 5000\n"
            ),
        )
        .expect("write sentinel.conf");
        let mut cmd = Command::new("redis-server");
        cmd.arg(&conf).arg("--sentinel").current_dir(&dir);
        let child = spawn_tied(cmd);
        let sentinel = Self { port, child, dir };
        wait_until(
            "Sentinel to watch the primary",
            Duration::from_secs(20),
            || sentinel.primary_port() == Some(primary_port),
        );
        sentinel
    }

    /// The primary's port as Sentinel knows it now.
    fn primary_port(&self) -> Option<u16> {
        let out = redis_cli(
            self.port,
            &["SENTINEL", "get-master-addr-by-name", "mymaster"],
        );
        out.lines().nth(1).and_then(|p| p.trim().parse().ok())
    }

    fn url(&self) -> String {
        format!(
            "redis-sentinel://127.0.0.1:{}?sentinelServiceName=mymaster",
            self.port
        )
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_through_sentinel_and_across_its_failover() {
    let (mut primary, replica) = tokio::task::block_in_place(primary_and_replica);
    let sentinel = tokio::task::block_in_place(|| Sentinel::start(primary.port));
    let server = ServerProcess::start(&[
        "--redis-url",
        &sentinel.url(),
        "--health-interval",
        "100ms",
        "--store-timeout",
        "1s",
    ]);
    let mut c = LockServiceClient::connect(server.endpoint())
        .await
        .expect("connect");

    let held = lease_of(
        c.acquire(acquire("sentinel/a", 60_000))
            .await
            .unwrap()
            .into_inner(),
    );
    let lock = "leasehold:{sentinel/a}:lock";
    assert_eq!(
        primary.cli(&["EXISTS", lock]),
        "1",
        "granted on the primary"
    );
    tokio::task::block_in_place(|| {
        wait_until(
            "the grant to reach the replica",
            Duration::from_secs(10),
            || replica.cli(&["EXISTS", lock]) == "1",
        )
    });

    // The primary dies; Sentinel promotes the replica.
    tokio::task::block_in_place(|| primary.kill());
    let killed = Instant::now();
    tokio::task::block_in_place(|| {
        wait_until(
            "Sentinel to promote the replica",
            Duration::from_secs(60),
            || sentinel.primary_port() == Some(replica.port),
        )
    });
    let promoted = killed.elapsed();

    // Leasehold follows by itself: no restart, no new URL. UNAVAILABLE is
    // the only error allowed while it reconnects.
    let end = Instant::now() + Duration::from_secs(30);
    let second = loop {
        match c.acquire(acquire("sentinel/b", 60_000)).await {
            Ok(resp) => break lease_of(resp.into_inner()),
            Err(e) => assert_eq!(e.code(), Code::Unavailable, "{e:?}"),
        }
        assert!(Instant::now() < end, "no grant within 30 s of the failover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "primary killed: Sentinel promoted the replica after {promoted:?}, \
         first grant through Leasehold after {:?}",
        killed.elapsed()
    );
    assert_eq!(
        replica.cli(&["EXISTS", "leasehold:{sentinel/b}:lock"]),
        "1",
        "granted on the promoted replica"
    );

    // The lease granted before the failover survived it and is still ours.
    let d = c
        .describe(describe("sentinel/a"))
        .await
        .unwrap()
        .into_inner();
    assert!(d.held);
    assert_eq!(d.fencing_token, held.fencing_token);
    let r = c
        .release(release("sentinel/a", &held.token))
        .await
        .unwrap()
        .into_inner();
    assert!(r.released);
    let again = lease_of(
        c.acquire(acquire("sentinel/a", 1_000))
            .await
            .unwrap()
            .into_inner(),
    );
    assert!(again.fencing_token > held.fencing_token);
    assert!(second.fencing_token > 0);
}
