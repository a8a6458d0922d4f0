//! Leasehold: a distributed lock service. Clients take, renew and give back
//! named locks over gRPC; lock state lives in Redis (or, for one process, in
//! memory); a client keeps its locks alive over one KeepAlive stream and
//! loses them the moment that stream ends.
//!
//! **Using Leasehold from Rust?** Start at [`client`], the SDK: connect,
//! take a lock, watch [`client::LockGuard::lost`], fence your writes with
//! the fencing token. Depend on the SDK alone with
//! `default-features = false, features = ["client"]`, which builds tonic,
//! prost and tokio but none of the server (no Redis client, no metrics
//! exporter, no allocator); the README's "Depending on the SDK" has the
//! line, and `examples/` has whole programs.
//!
//! ```no_run
//! use std::time::Duration;
//! use leasehold::client::Client;
//!
//! # async fn demo() -> Result<(), leasehold::client::Error> {
//! let client = Client::connect("http://127.0.0.1:50051").await?;
//! let guard = client.lock("reports/nightly").ttl(Duration::from_secs(10)).await?;
//! println!("fencing token {}", guard.fencing_token());
//! guard.release().await?;
//! # Ok(()) }
//! ```
//!
//! Crate map (features in brackets; `default` has them all):
//! - [`client`] \[client\]: the Rust SDK: failover, lock guards kept alive
//!   over one stream.
//! - [`pb`]: generated protobuf/gRPC code and the reflection descriptors.
//! - [`codec`]: the prost codec with small buffers the generated code uses.
//! - [`task`]: owned background tasks (tokio-util's `AbortOnDropHandle`).
//! - `backoff`: exponential backoff with full jitter, for the SDK's retries
//!   and the server's fallback wake-ups of waiting Acquires.
//! - `lock` \[server\]: domain types (keys, tokens, leases, limits) and `LockError`.
//! - `store` \[server\]: the `LockStore` seam, the Redis store and the memory store.
//! - `service` \[server\]: the gRPC handlers, KeepAlive sessions, server-side
//!   waiting and its queues, per-caller quotas.
//! - `server` \[server\]: assembles tonic with health, reflection, limits and shutdown.
//! - `auth` \[server\]: bearer tokens, client certificates and per-tenant key scopes.
//! - `metrics` \[server\]: Prometheus series (`--metrics-listen`).
//! - `bench` \[bench\]: the load generator and its baselines (`leasehold bench`).
//! - `cli` \[cli\]: the `leasehold` subcommands (the binary needs this feature).

#[cfg(feature = "client")]
pub mod client;

mod backoff;
pub mod codec;
pub mod pb;
pub mod task;

#[cfg(feature = "server")]
pub mod auth;
#[cfg(feature = "server")]
pub mod lock;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod service;
#[cfg(feature = "server")]
pub mod store;

#[cfg(feature = "bench")]
pub mod bench;

#[cfg(feature = "cli")]
pub mod cli;
