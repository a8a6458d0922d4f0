//! etcd as a baseline for `leasehold bench cycles` and `hot`: the system a
//! user would otherwise pick for locks. Its lock API (`v3lockpb.Lock`:
//! Lock blocks until the named lock is free and returns an ownership key,
//! Unlock deletes it; each worker's locks hang on one lease of its own,
//! as etcd's `concurrency` package does) is called over gRPC with the
//! handful of messages it needs, written here with prost's derive: the
//! `etcd-client` crate compiles etcd's protos with `protoc` at build time,
//! which Leasehold's build does not need anywhere else. Field numbers are
//! etcd's (`api/v3lock/v3lockpb/v3lock.proto`, `api/etcdserverpb/rpc.proto`);
//! fields not listed are skipped on decode.

use std::time::{Duration, Instant};

use http::uri::PathAndQuery;
use tonic::transport::Channel;

use super::load::{self, Cycles, FastRng, Hot, HotPart};
use super::spawn::{self, Spawned};

#[derive(Clone, PartialEq, prost::Message)]
struct LeaseGrantRequest {
    #[prost(int64, tag = "1")]
    ttl: i64,
    #[prost(int64, tag = "2")]
    id: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LeaseGrantResponse {
    #[prost(int64, tag = "2")]
    id: i64,
    #[prost(string, tag = "4")]
    error: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LockRequest {
    #[prost(bytes = "vec", tag = "1")]
    name: Vec<u8>,
    #[prost(int64, tag = "2")]
    lease: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LockResponse {
    #[prost(bytes = "vec", tag = "2")]
    key: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct UnlockRequest {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct UnlockResponse {}

/// Lease TTL of each worker's locks (seconds): longer than any run.
const LEASE_TTL_S: i64 = 600;

/// One worker's connection to etcd and its lease.
struct Etcd {
    grpc: tonic::client::Grpc<Channel>,
    lease: i64,
}

impl Etcd {
    async fn call<Req, Resp>(&mut self, path: &'static str, req: Req) -> Result<Resp, String>
    where
        Req: prost::Message + Send + 'static,
        Resp: prost::Message + Default + Send + 'static,
    {
        self.grpc.ready().await.map_err(|e| e.to_string())?;
        let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
        let reply = self
            .grpc
            .unary(
                tonic::Request::new(req),
                PathAndQuery::from_static(path),
                codec,
            )
            .await
            .map_err(|s| format!("{path}: {}", s.message()))?;
        Ok(reply.into_inner())
    }

    /// A client with a fresh lease.
    async fn new(channel: Channel) -> Result<Self, String> {
        let mut etcd = Self {
            grpc: tonic::client::Grpc::new(channel),
            lease: 0,
        };
        let granted: LeaseGrantResponse = etcd
            .call(
                "/etcdserverpb.Lease/LeaseGrant",
                LeaseGrantRequest {
                    ttl: LEASE_TTL_S,
                    id: 0,
                },
            )
            .await?;
        if !granted.error.is_empty() || granted.id == 0 {
            return Err(format!("etcd lease grant: {:?}", granted.error));
        }
        etcd.lease = granted.id;
        Ok(etcd)
    }

    /// Waits for `name` and holds it; the ownership key.
    async fn lock(&mut self, name: &str) -> Result<Vec<u8>, String> {
        let reply: LockResponse = self
            .call(
                "/v3lockpb.Lock/Lock",
                LockRequest {
                    name: name.as_bytes().to_vec(),
                    lease: self.lease,
                },
            )
            .await?;
        Ok(reply.key)
    }

    async fn unlock(&mut self, key: Vec<u8>) -> Result<(), String> {
        let _: UnlockResponse = self
            .call("/v3lockpb.Lock/Unlock", UnlockRequest { key })
            .await?;
        Ok(())
    }
}

/// Whether an `etcd` binary is on PATH.
pub fn available() -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join("etcd").is_file()))
}

/// A single-member etcd on free loopback ports, its data in a fresh
/// directory under the system temp dir (removed when it is killed).
pub async fn spawn() -> Result<Spawned, String> {
    let client = spawn::free_port()?;
    let peer = spawn::free_port()?;
    let dir = std::env::temp_dir().join(format!(
        "leasehold-bench-etcd-{}-{client}",
        std::process::id()
    ));
    let client_url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let mut cmd = tokio::process::Command::new("etcd");
    cmd.arg("--name")
        .arg("bench")
        .arg("--data-dir")
        .arg(&dir)
        .args(["--listen-client-urls", &client_url])
        .args(["--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("bench={peer_url}")])
        .args(["--log-level", "info"]);
    let mut spawned = spawn::process(cmd, &["ready to serve client requests"], "etcd").await?;
    spawned.addr = format!("127.0.0.1:{client}");
    spawned.cleanup = Some(dir);
    Ok(spawned)
}

/// `workers` loops of Lock + Unlock over `keys` random names: etcd's
/// counterpart of [`super::load::cycles_grpc`]. (Lock waits instead of
/// answering "held", so a taken name costs a wait, not a retry.)
pub async fn cycles(channels: &[Channel], workers: usize, keys: u64, duration: Duration) -> Cycles {
    let start = Instant::now();
    let end = start + duration;
    let mut tasks = Vec::new();
    for i in 0..workers {
        let channel = channels[i % channels.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Cycles::default();
            let Ok(mut etcd) = Etcd::new(channel).await else {
                out.errors += 1;
                return out;
            };
            let mut rng = FastRng::new();
            while Instant::now() < end {
                let name = format!("bench/{}", rng.below(keys));
                let t0 = Instant::now();
                let Ok(key) = etcd.lock(&name).await else {
                    out.errors += 1;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                };
                out.acquire.record(t0.elapsed());
                let t1 = Instant::now();
                match etcd.unlock(key).await {
                    Ok(()) => {
                        out.release.record(t1.elapsed());
                        out.cycles += 1;
                    }
                    Err(_) => out.errors += 1,
                }
            }
            out
        }));
    }
    load::collect_cycles(tasks, start).await
}

/// `workers` loops of Lock + Unlock on one name: etcd's hot key.
pub async fn hot(channels: &[Channel], workers: usize, duration: Duration) -> Hot {
    let start = Instant::now();
    let end = start + duration;
    let name = format!("hot/{}", FastRng::new().next_u64());
    let mut tasks = Vec::new();
    for i in 0..workers {
        let channel = channels[i % channels.len()].clone();
        let name = name.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = HotPart::default();
            let Ok(mut etcd) = Etcd::new(channel).await else {
                out.errors += 1;
                return out;
            };
            while Instant::now() < end {
                let t0 = Instant::now();
                // A Lock still waiting at the end of the run is cut off
                // rather than let it run past the slice.
                let Ok(locked) = tokio::time::timeout_at(
                    (end + Duration::from_secs(10)).into(),
                    etcd.lock(&name),
                )
                .await
                else {
                    out.timeouts += 1;
                    break;
                };
                let Ok(key) = locked else {
                    out.errors += 1;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                };
                out.wait.record(t0.elapsed());
                out.granted_at.push(start.elapsed());
                out.handoffs += 1;
                if etcd.unlock(key).await.is_err() {
                    out.errors += 1;
                }
            }
            out
        }));
    }
    load::collect_hot(tasks, start).await
}
