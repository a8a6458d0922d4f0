//! Leasehold: a distributed lock service. Clients take, renew and give back
//! named locks over gRPC; lock state lives in Redis (or, for one process, in
//! memory); a client keeps its locks alive over one KeepAlive stream and
//! loses them the moment that stream ends.
//!
//! Crate map:
//! - [`auth`]: bearer tokens, client certificates and per-tenant key scopes.
//! - [`pb`]: generated protobuf/gRPC code and the reflection descriptors.
//! - [`codec`]: the prost codec with small buffers the generated code uses.
//! - [`lock`]: domain types (keys, tokens, leases, limits) and [`lock::LockError`].
//! - [`store`]: the [`store::LockStore`] seam, the Redis store and the memory store.
//! - [`service`]: the gRPC handlers, KeepAlive sessions, server-side waiting
//!   and its queues, per-caller quotas.
//! - [`server`]: assembles tonic with health, reflection, limits and shutdown.
//! - [`client`]: the Rust SDK: failover, lock guards kept alive over one stream.
//! - [`cli`]: the `leasehold` subcommands.
//! - [`bench`]: the load generator and its baselines (`leasehold bench`).
//! - [`task`]: owned background tasks.
//! - [`metrics`]: Prometheus series (`--metrics-listen`).

pub mod auth;
pub mod bench;
pub mod cli;
pub mod client;
pub mod codec;
pub mod lock;
pub mod metrics;
pub mod pb;
pub mod server;
pub mod service;
pub mod store;
pub mod task;
