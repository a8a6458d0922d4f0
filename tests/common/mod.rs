//! Shared test harness: real `redis-server` processes (a single node and a
//! 3-master/3-replica cluster) on free loopback ports, and real Leasehold
//! servers on 127.0.0.1:0, talked to over gRPC.
//!
//! Child processes are started through `setpriv --pdeathsig KILL` from one
//! long-lived thread, so they die with the test process even if it is
//! killed; every wait is bounded and waits on a real signal (a log line, a
//! `CLUSTER INFO` state, a health status).

#![allow(dead_code)]

pub mod admin;
pub mod certs;
pub mod process;
pub mod python;

#[allow(unused_imports)]
pub use process::{Launch, Ready, ServerProcess, signal, wait_exit};

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use leasehold::pb;
use leasehold::pb::lock_service_client::LockServiceClient;
use leasehold::server::{self, ServerConfig};
use leasehold::service::queues::WaitQueues;
use leasehold::store::{RedisConfig, RedisNames};
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;

/// Generates one `#[tokio::test]` per case and store: `memory::case`,
/// `redis::case` and `cluster::case` each call `case(Backend::...)`, so a
/// suite runs unchanged on the memory store, one redis-server and the
/// Redis Cluster.
#[macro_export]
macro_rules! on_every_store {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $case() { super::$case(super::Backend::Memory).await } )*
        }
        mod redis {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $case() { super::$case(super::Backend::Redis).await } )*
        }
        mod cluster {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $case() { super::$case(super::Backend::Cluster).await } )*
        }
    };
}

/// Something that must finish within `within`, checked every few ms.
#[track_caller]
pub fn wait_until(what: &str, within: Duration, mut ready: impl FnMut() -> bool) {
    let end = Instant::now() + within;
    while !ready() {
        assert!(
            Instant::now() < end,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The async twin of [`wait_until`]: `ready` is polled every 20 ms.
pub async fn wait_until_async<F, Fut>(what: &str, within: Duration, mut ready: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + within;
    while !ready().await {
        assert!(
            Instant::now() < end,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

type SpawnJob = (Command, std_mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` so that it is SIGKILLed when this test process dies.
pub fn spawn_tied(cmd: Command) -> Child {
    static KEEPER: OnceLock<Mutex<std_mpsc::Sender<SpawnJob>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = std_mpsc::channel::<SpawnJob>();
        // PR_SET_PDEATHSIG fires when the *thread* that forked the child
        // exits, so all children are forked by this thread, which lives as
        // long as the process.
        std::thread::Builder::new()
            .name("child-keeper".into())
            .spawn(move || {
                for (cmd, reply) in rx {
                    let mut cmd = cmd;
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawn keeper thread");
        Mutex::new(tx)
    });
    let program = cmd.get_program().to_owned();
    let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
    let mut tied = Command::new("setpriv");
    tied.arg("--pdeathsig")
        .arg("KILL")
        .arg("--")
        .arg(program)
        .args(args);
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => tied.env(k, v),
            None => tied.env_remove(k),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        tied.current_dir(dir);
    }
    tied.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (tx, rx) = std_mpsc::channel();
    keeper
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((tied, tx))
        .expect("keeper alive");
    rx.recv().expect("keeper replied").expect("spawn child")
}

/// Reads a child's output in the background; lets a test wait for a line.
pub struct Output {
    lines: Arc<Mutex<Vec<String>>>,
    /// Readers (stdout, stderr) that reached the end of their pipe.
    closed: Arc<std::sync::atomic::AtomicUsize>,
    readers: usize,
}

impl Output {
    pub fn capture(child: &mut Child) -> Self {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let out = child.stdout.take();
        let err = child.stderr.take();
        let mut readers = 0;
        for reader in [
            out.map(|o| Box::new(o) as Box<dyn std::io::Read + Send>),
            err.map(|e| Box::new(e) as _),
        ]
        .into_iter()
        .flatten()
        {
            readers += 1;
            let (lines, closed) = (lines.clone(), closed.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(reader).lines().map_while(Result::ok) {
                    lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                }
                closed.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            });
        }
        Self {
            lines,
            closed,
            readers,
        }
    }

    /// Waits until the child closed its output (it exited): every line it
    /// wrote is in [`Output::all`] then.
    #[track_caller]
    pub fn wait_closed(&self, within: Duration) {
        wait_until("the process's output to close", within, || {
            self.closed.load(std::sync::atomic::Ordering::Acquire) == self.readers
        });
    }

    /// Waits until a line containing `needle` appeared; returns it.
    #[track_caller]
    pub fn wait_for(&self, needle: &str, within: Duration) -> String {
        let mut found = None;
        wait_until(
            &format!("output line containing {needle:?}"),
            within,
            || {
                found = self.find(needle);
                found.is_some()
            },
        );
        found.unwrap_or_default()
    }

    pub fn find(&self, needle: &str) -> Option<String> {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|l| l.contains(needle))
            .cloned()
    }

    pub fn all(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// One `redis-server` on a free port, stopped on drop.
pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    extra: Vec<String>,
    child: Option<Child>,
    pub output: Option<Output>,
}

/// A directory for one redis-server, named after this test process.
/// The shared servers live in statics, which are never dropped, so their
/// directories outlive the process (5 542 had piled up in /tmp on the
/// development machine); the first call in each process removes those
/// whose process is gone.
fn redis_dir() -> PathBuf {
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(remove_dirs_of_dead_processes);
    tempfile::Builder::new()
        .prefix(&format!("leasehold-redis-{}-", std::process::id()))
        .tempdir()
        .expect("tempdir")
        .keep()
}

/// Removes `leasehold-redis-<pid>-*` directories whose process has exited.
fn remove_dirs_of_dead_processes() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("leasehold-redis-"))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

impl RedisServer {
    /// Starts a plain, non-persistent redis-server.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts one with extra `--flag value` arguments.
    pub fn start_with(extra: &[&str]) -> Self {
        let dir = redis_dir();
        let mut server = Self {
            port: 0,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
            output: None,
        };
        for _ in 0..5 {
            server.port = free_port();
            if server.launch() {
                return server;
            }
        }
        panic!("could not start redis-server on a free port");
    }

    fn launch(&mut self) -> bool {
        let mut cmd = Command::new("redis-server");
        cmd.current_dir(&self.dir)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--logfile", ""])
            .args(&self.extra);
        let mut child = spawn_tied(cmd);
        let output = Output::capture(&mut child);
        let end = Instant::now() + Duration::from_secs(15);
        while Instant::now() < end {
            if output.find("Ready to accept connections").is_some() {
                self.child = Some(child);
                self.output = Some(output);
                return true;
            }
            if let Ok(Some(_)) = child.try_wait() {
                return false; // e.g. the port was taken meanwhile
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        false
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// SIGKILLs the server (no persistence: its data is gone).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        assert!(
            self.launch(),
            "redis-server did not restart on port {}",
            self.port
        );
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Runs `redis-cli` against this server and returns its trimmed stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.port, args)
    }

    /// SIGSTOPs it: commands sent meanwhile wait, unread, in its sockets.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// SIGCONTs it: it runs what waited, in the order each connection sent it.
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        signal(self.pid().expect("running"), sig);
    }

    /// Bytes sent to this server that it has not read yet (the receive
    /// queues of its sockets, from /proc/net/tcp): while it is frozen, this
    /// grows with every command sent to it, a signal that a call reached it.
    pub fn unread_bytes(&self) -> u64 {
        let port = format!(":{:04X}", self.port);
        ["/proc/net/tcp", "/proc/net/tcp6"]
            .iter()
            .filter_map(|f| std::fs::read_to_string(f).ok())
            .flat_map(|text| {
                text.lines()
                    .skip(1)
                    .filter_map(|line| {
                        let fields: Vec<&str> = line.split_whitespace().collect();
                        let local = fields.get(1)?;
                        if !local.ends_with(&port) {
                            return None;
                        }
                        let rx = fields.get(4)?.split(':').nth(1)?;
                        u64::from_str_radix(rx, 16).ok()
                    })
                    .collect::<Vec<_>>()
            })
            .sum()
    }

    /// Waits until more than `than` bytes wait unread at this (frozen)
    /// server, and returns how many.
    #[track_caller]
    pub fn wait_unread_above(&self, than: u64) -> u64 {
        let mut now = 0;
        wait_until(
            "a command to reach the frozen Redis",
            Duration::from_secs(5),
            || {
                now = self.unread_bytes();
                now > than
            },
        );
        now
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `redis-cli -p port -c args...`, trimmed stdout.
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-c"])
        .args(args)
        .output()
        .expect("run redis-cli");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A primary and one replica, in sync.
pub fn primary_and_replica() -> (RedisServer, RedisServer) {
    let primary = RedisServer::start();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary.port.to_string()]);
    wait_until("the replica in sync", Duration::from_secs(30), || {
        in_sync(&primary, &replica)
    });
    (primary, replica)
}

/// Both sides agree: the replica's link is up, and the primary counts it
/// online (what the acquire script checks), which can come a moment later.
pub fn in_sync(primary: &RedisServer, replica: &RedisServer) -> bool {
    replica
        .cli(&["INFO", "replication"])
        .contains("master_link_status:up")
        && primary
            .cli(&["INFO", "replication"])
            .contains("state=online")
}

/// A 3-master / 3-replica Redis Cluster on free ports.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> Self {
        Self::start_with_node_timeout(2000)
    }

    /// A cluster of its own, with `cluster-node-timeout` (ms): how long a
    /// silent primary takes to be failed over. For tests that kill nodes.
    pub fn start_with_node_timeout(node_timeout_ms: u32) -> Self {
        let timeout = node_timeout_ms.to_string();
        let nodes: Vec<RedisServer> = (0..6)
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    &timeout,
                    // Replicas sync at once instead of 5 s after they attach.
                    "--repl-diskless-sync-delay",
                    "0",
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes.iter().map(|n| n.addr()).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("All 16384 slots covered"),
            "cluster create failed: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = Self { nodes };
        cluster.wait_healthy();
        cluster
    }

    /// Every node reports `cluster_state:ok` and knows all six nodes.
    pub fn wait_healthy(&self) {
        wait_until(
            "cluster_state:ok on every node",
            Duration::from_secs(30),
            || {
                self.nodes.iter().all(|n| {
                    let info = n.cli(&["cluster", "info"]);
                    info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:6")
                })
            },
        );
    }

    pub fn url(&self) -> String {
        let rest: Vec<String> = self.nodes[1..]
            .iter()
            .map(|n| format!("node={}", n.addr()))
            .collect();
        format!(
            "redis-cluster://{}?{}",
            self.nodes[0].addr(),
            rest.join("&")
        )
    }

    pub fn cli(&self, args: &[&str]) -> String {
        self.nodes[0].cli(args)
    }
}

/// Which store a test server runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Memory,
    Redis,
    Cluster,
}

/// One single-node Redis shared by every test of a test binary.
pub fn shared_redis() -> &'static RedisServer {
    static REDIS: OnceLock<RedisServer> = OnceLock::new();
    REDIS.get_or_init(RedisServer::start)
}

/// One Redis Cluster shared by every test of a test binary.
pub fn shared_cluster() -> &'static RedisCluster {
    static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
    CLUSTER.get_or_init(RedisCluster::start)
}

/// A unique key prefix, so tests sharing a Redis never see each other.
pub fn unique_prefix() -> String {
    format!("t{}:", rand_suffix())
}

pub fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        Instant::now().elapsed().as_nanos() ^ (std::ptr::addr_of!(N) as u128)
    )
}

/// A Leasehold server running inside the test's runtime.
pub struct TestServer {
    pub addr: SocketAddr,
    pub backend: Backend,
    pub prefix: String,
    pub redis_url: Option<String>,
    pub waiters: Arc<WaitQueues>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

pub fn test_config() -> ServerConfig {
    ServerConfig {
        health_interval: Duration::from_millis(100),
        store_timeout: Duration::from_millis(1000),
        shutdown_grace: Duration::from_secs(5),
        ..ServerConfig::default()
    }
}

impl TestServer {
    pub async fn start(backend: Backend) -> Self {
        Self::start_with(backend, test_config()).await
    }

    pub async fn start_with(backend: Backend, config: ServerConfig) -> Self {
        let redis_url = match backend {
            Backend::Memory => None,
            Backend::Redis => Some(
                tokio::task::spawn_blocking(|| shared_redis().url())
                    .await
                    .expect("redis"),
            ),
            Backend::Cluster => Some(
                tokio::task::spawn_blocking(|| shared_cluster().url())
                    .await
                    .expect("cluster"),
            ),
        };
        Self::start_on(backend, redis_url, unique_prefix(), config).await
    }

    /// A server on a given Redis URL and key prefix (a second server on the
    /// same locks, or a server on a Redis the test controls).
    pub async fn start_on(
        backend: Backend,
        redis_url: Option<String>,
        prefix: String,
        config: ServerConfig,
    ) -> Self {
        Self::start_tuned(backend, redis_url, prefix, config, |_| {}).await
    }

    /// Like [`TestServer::start_on`], with the Redis store's settings
    /// changed by `tune` (a one-connection pool, say, so that the order of
    /// store calls is the order they were made).
    pub async fn start_tuned(
        backend: Backend,
        redis_url: Option<String>,
        prefix: String,
        config: ServerConfig,
        tune: impl FnOnce(&mut RedisConfig),
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let waiters = WaitQueues::new(config.max_waiters);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stop_rx.await;
        };
        let redis = redis_url.as_ref().map(|url| {
            let mut redis = RedisConfig {
                url: url.clone(),
                prefix: prefix.clone(),
                pool_size: 2,
                timeout: config.store_timeout,
                ..RedisConfig::default()
            };
            tune(&mut redis);
            redis
        });
        let store = Arc::new(
            leasehold::store::open(redis.as_ref(), waiters.clone())
                .await
                .expect("store"),
        );
        let w = waiters.clone();
        let task = tokio::spawn(async move {
            server::run(store, w, config, listener, shutdown)
                .await
                .expect("server");
        });
        let server = Self {
            addr,
            backend,
            prefix,
            redis_url,
            waiters,
            stop: Some(stop_tx),
            task: Some(task),
        };
        if backend != Backend::Memory {
            server.wait_health("SERVING", Duration::from_secs(20)).await;
        }
        server
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> LockServiceClient<Channel> {
        LockServiceClient::connect(self.endpoint())
            .await
            .expect("connect")
    }

    pub async fn health(&self) -> HealthClient<Channel> {
        let channel = Channel::from_shared(self.endpoint())
            .expect("endpoint")
            .connect()
            .await
            .expect("connect health");
        HealthClient::new(channel)
    }

    /// Waits (on the Health Watch stream) until the lock service reports
    /// `status` ("SERVING" / "NOT_SERVING").
    pub async fn wait_health(&self, status: &str, within: Duration) {
        let mut health = self.health().await;
        let watch = async {
            let mut stream = health
                .watch(tonic_health::pb::HealthCheckRequest {
                    service: pb::SERVICE_NAME.to_string(),
                })
                .await
                .expect("health watch")
                .into_inner();
            while let Some(Ok(msg)) = tokio_stream::StreamExt::next(&mut stream).await {
                if msg.status().as_str_name() == status {
                    return;
                }
            }
            panic!("health stream ended before {status}");
        };
        tokio::time::timeout(within, watch)
            .await
            .unwrap_or_else(|_| panic!("health did not become {status} within {within:?}"));
    }

    /// Graceful shutdown; waits for the server task to end.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("server stopped in time")
                .expect("server task");
        }
    }

    /// The Redis names of a lock under this server's prefix.
    pub fn names(&self, key: &str) -> RedisNames {
        RedisNames::of(
            &self.prefix,
            &leasehold::lock::LockKey::parse(key, 4096).expect("key"),
        )
    }

    /// Deletes the lock's fencing counter from Redis (no-op for memory,
    /// which has no counter key to lose).
    /// Sets the fencing counter of `key` (as a clock stepped back, or many
    /// grants within one microsecond, would leave it: ahead of Redis TIME);
    /// false on the memory store, which has no counter to set.
    pub fn set_fence_counter(&self, key: &str, value: u64) -> bool {
        let names = self.names(key);
        let value = value.to_string();
        let args = ["SET", names.fence.as_str(), value.as_str(), "PX", "600000"];
        match self.backend {
            Backend::Memory => false,
            Backend::Redis => shared_redis().cli(&args) == "OK",
            Backend::Cluster => shared_cluster().cli(&args) == "OK",
        }
    }

    pub fn lose_fence_counter(&self, key: &str) {
        let names = self.names(key);
        match self.backend {
            Backend::Memory => {}
            Backend::Redis => {
                assert_eq!(shared_redis().cli(&["DEL", &names.fence]), "1");
            }
            Backend::Cluster => {
                assert_eq!(shared_cluster().cli(&["DEL", &names.fence]), "1");
            }
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Shorthand requests.
pub fn acquire(key: &str, ttl_ms: u32) -> pb::AcquireRequest {
    pb::AcquireRequest {
        key: key.into(),
        ttl_ms,
        ..Default::default()
    }
}

pub fn release(key: &str, token: &str) -> pb::ReleaseRequest {
    pb::ReleaseRequest {
        key: key.into(),
        token: token.into(),
    }
}

pub fn describe(key: &str) -> pb::DescribeRequest {
    pb::DescribeRequest { key: key.into() }
}

/// Acquires and unwraps the lease, failing the test if not acquired.
#[track_caller]
pub fn lease_of(resp: pb::AcquireResponse) -> pb::Lease {
    assert!(resp.acquired, "expected acquired, got {resp:?}");
    resp.lease.expect("lease set when acquired")
}

/// A client's KeepAlive stream, driven request by request.
pub struct KeepAliveSession {
    tx: Option<tokio::sync::mpsc::Sender<pb::KeepAliveRequest>>,
    pub rx: tonic::Streaming<pb::KeepAliveResponse>,
}

impl KeepAliveSession {
    pub async fn open(c: &mut LockServiceClient<Channel>) -> Result<Self, tonic::Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let response = c
            .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?;
        Ok(Self {
            tx: Some(tx),
            rx: response.into_inner(),
        })
    }

    /// Sends one request without waiting for its answer.
    pub async fn push(&mut self, key: &str, token: &str, ttl_ms: u32, release: bool) {
        let req = pb::KeepAliveRequest {
            key: key.into(),
            token: token.into(),
            ttl_ms,
            release,
        };
        self.tx
            .as_ref()
            .expect("open")
            .send(req)
            .await
            .expect("stream open");
    }

    /// The next response, or the status that ended the stream.
    pub async fn next(&mut self) -> Result<Option<pb::KeepAliveResponse>, tonic::Status> {
        tokio::time::timeout(Duration::from_secs(10), self.rx.message())
            .await
            .expect("a KeepAlive response within 10 s")
    }

    /// Renews (attaches) one lock and returns the answer.
    pub async fn renew(&mut self, key: &str, token: &str, ttl_ms: u32) -> pb::KeepAliveResponse {
        self.push(key, token, ttl_ms, false).await;
        self.next().await.expect("no error").expect("a response")
    }

    /// Half-closes: the client's side of the stream ends.
    pub fn half_close(&mut self) {
        self.tx = None;
    }
}

/// Acquire with server-side waiting.
pub fn acquire_wait(key: &str, ttl_ms: u32, wait_ms: u32) -> pb::AcquireRequest {
    pb::AcquireRequest {
        key: key.into(),
        ttl_ms,
        wait_ms,
        ..Default::default()
    }
}

/// `serve` flags for a server on Redis (`url`, `prefix`) that tests kill,
/// freeze or restart: a short health interval, so NOT_SERVING and SERVING
/// show quickly, and a bounded shutdown grace.
pub fn on_redis_args<'a>(url: &'a str, prefix: &'a str) -> Vec<&'a str> {
    vec![
        "--redis-url",
        url,
        "--key-prefix",
        prefix,
        "--health-interval",
        "100ms",
        "--shutdown-grace",
        "5s",
    ]
}

/// The Redis URL of the shared cluster (starting it if needed).
pub fn cluster_url() -> String {
    tokio::task::block_in_place(|| shared_cluster().url())
}

/// Deletes a lock's record from the store a server runs on, so that the
/// lock is gone as if it had expired.
pub fn force_expire(server: &TestServer, key: &str) {
    force_expire_on(server.backend, &server.prefix, key);
}

/// [`force_expire`] for servers on `backend` under `prefix`.
pub fn force_expire_on(backend: Backend, prefix: &str, key: &str) {
    let names = RedisNames::of(
        prefix,
        &leasehold::lock::LockKey::parse(key, 4096).expect("key"),
    );
    let deleted = tokio::task::block_in_place(|| match backend {
        Backend::Memory => panic!("the memory store cannot be reached from outside"),
        Backend::Redis => shared_redis().cli(&["DEL", &names.lock]),
        Backend::Cluster => shared_cluster().cli(&["DEL", &names.lock]),
    });
    assert_eq!(deleted, "1", "the lock record existed");
}

/// Acquire over a bare HTTP/2 stream, with `grpc-timeout` sent to the
/// server but not enforced here (tonic's client enforces any deadline it
/// sends, racing the server's reply). Returns the reply, or the status
/// code and message the server ended the call with.
pub async fn acquire_with_server_deadline(
    addr: SocketAddr,
    req: pb::AcquireRequest,
    deadline: Duration,
) -> Result<pb::AcquireResponse, (i32, String)> {
    use prost::Message;
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(conn);
    let request = http::Request::post(format!("http://{addr}/leasehold.v1.LockService/Acquire"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", format!("{}m", deadline.as_millis()))
        .body(())
        .expect("request");
    let (response, mut send) = client.send_request(request, false).expect("send request");
    let message = req.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend((message.len() as u32).to_be_bytes());
    frame.extend(message);
    send.send_data(frame.into(), true).expect("send body");
    let response = response.await.expect("response headers");
    let status_of = |headers: &http::HeaderMap| {
        let code = headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let message = headers
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        code.map(|c| (c, message))
    };
    // A trailers-only reply carries the status in its headers.
    if let Some((code, message)) = status_of(response.headers()).filter(|(c, _)| *c != 0) {
        return Err((code, message));
    }
    let mut body = response.into_body();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("body");
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.expect("trailers").unwrap_or_default();
    match status_of(&trailers) {
        Some((0, _)) | None if data.len() >= 5 => {
            Ok(pb::AcquireResponse::decode(&data[5..]).expect("decode reply"))
        }
        Some((code, message)) => Err((code, message)),
        None => Err((-1, "no status".into())),
    }
}
