//! Where a script runs. On one node (or Sentinel's primary): a fred pool.
//! On a Redis Cluster: a pool per primary, picked by the key's hash slot
//! from the routing table fred's cluster client keeps; that cluster client
//! discovers the topology and runs no scripts.
//!
//! Why not fred's cluster client for everything: it reconnects
//! all-or-nothing. When one primary dies, its reconnect needs every
//! primary that `CLUSTER SLOTS` still lists, so until a replica is
//! promoted every command on every slot waits or fails. With a pool per
//! primary, only the dead primary's slots fail (at once, UNAVAILABLE) and
//! every other lock keeps working (`tests/faults.rs`, scenario 1).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fred::clients::Pool;
use fred::prelude::*;

use crate::lock::LockError;

/// The clients scripts run on.
pub(super) enum Route {
    /// One node, or Sentinel's primary.
    Pool(Pool),
    /// A Redis Cluster: a pool per primary.
    Shards(Box<Shards>),
}

/// A pool per cluster primary, made on first use.
pub(super) struct Shards {
    /// Settings of every pool (connection, performance, reconnect, TLS,
    /// credentials); only the server differs.
    template: Builder,
    size: usize,
    /// How long a call may wait for a new primary's pool to connect.
    timeout: Duration,
    /// fred's cluster pool: the routing table.
    discovery: Pool,
    /// Each primary's pool, and when it was made.
    pools: Mutex<HashMap<Server, (Pool, Instant)>>,
}

impl Route {
    /// The route for `builder`'s config: shards over `discovery` on a
    /// cluster; otherwise `discovery` itself, or a pool of its own if
    /// `own` (a pool whose connections must not be shared).
    pub(super) fn build(
        builder: &Builder,
        size: usize,
        timeout: Duration,
        discovery: &Pool,
        own: bool,
    ) -> Result<Self, String> {
        let clustered = builder
            .get_config()
            .is_some_and(|c| c.server.is_clustered());
        if clustered {
            return Ok(Self::Shards(Box::new(Shards {
                template: builder.clone(),
                size,
                timeout,
                discovery: discovery.clone(),
                pools: Mutex::new(HashMap::new()),
            })));
        }
        if !own {
            return Ok(Self::Pool(discovery.clone()));
        }
        let pool = builder
            .build_pool(size)
            .map_err(|e| format!("redis pool: {}", e.details()))?;
        let _task = pool.connect();
        Ok(Self::Pool(pool))
    }

    /// A client with a live connection to the primary that owns `slot`.
    /// While that connection is down: UNAVAILABLE at once, except that the
    /// pool of a primary just found (a promoted replica) is waited for,
    /// within the store timeout.
    pub(super) async fn client(&self, slot: u16) -> Result<Client, LockError> {
        let pool = match self {
            Self::Pool(pool) => pool.clone(),
            Self::Shards(shards) => {
                let state = shards.discovery.next_connected().cached_cluster_state();
                let server = state
                    .as_ref()
                    .and_then(|s| s.get_server(slot))
                    .ok_or_else(|| {
                        LockError::Unavailable(format!(
                            "no Redis Cluster primary known for slot {slot} yet"
                        ))
                    })?;
                let (pool, made) = shards.pool(server)?;
                let left = shards.timeout.saturating_sub(made.elapsed());
                if !left.is_zero() && !pool.next_connected().is_connected() {
                    let _ = tokio::time::timeout(left, pool.wait_for_connect()).await;
                }
                pool
            }
        };
        let client = pool.next_connected();
        if client.is_connected() {
            Ok(client.clone())
        } else {
            Err(LockError::Unavailable(
                "not connected to Redis (reconnecting)".into(),
            ))
        }
    }

    /// After a `MOVED` or `ASK`: the routing table is stale (a failover or
    /// resharding fred's cluster client has not seen), so refresh it in
    /// the background.
    pub(super) fn refresh(&self) {
        if let Self::Shards(shards) = self {
            let client = shards.discovery.next().clone();
            tokio::spawn(async move {
                if let Err(e) = client.sync_cluster().await {
                    tracing::debug!(error = %e, "could not refresh the cluster routing table");
                }
            });
        }
    }

    /// Every primary and its pool (None: none could be made), for health
    /// checks. Pools of nodes that are no longer primaries are closed.
    pub(super) fn primaries(&self) -> Option<Vec<(Server, Option<Pool>)>> {
        let Self::Shards(shards) = self else {
            return None;
        };
        let primaries = shards
            .discovery
            .next_connected()
            .cached_cluster_state()
            .map(|s| s.unique_primary_nodes())
            .unwrap_or_default();
        shards.prune(&primaries);
        Some(
            primaries
                .into_iter()
                .map(|server| {
                    let pool = shards.pool(&server).ok().map(|(p, _)| p);
                    (server, pool)
                })
                .collect(),
        )
    }

    /// Every pool this route made, to close them.
    pub(super) fn own_pools(&self) -> Vec<Pool> {
        match self {
            Self::Pool(pool) => vec![pool.clone()],
            Self::Shards(shards) => shards
                .pools
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .map(|(pool, _)| pool.clone())
                .collect(),
        }
    }
}

impl Shards {
    /// The pool of `server`, made (and connecting) on first use.
    fn pool(&self, server: &Server) -> Result<(Pool, Instant), LockError> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((pool, made)) = pools.get(server) {
            return Ok((pool.clone(), *made));
        }
        let mut builder = self.template.clone();
        let mut config = builder.get_config().cloned().unwrap_or_default();
        config.server = ServerConfig::Centralized {
            server: server.clone(),
        };
        builder.set_config(config);
        let pool = builder
            .build_pool(self.size)
            .map_err(|e| LockError::Unavailable(format!("redis pool for {server}: {e}")))?;
        let _task = pool.connect();
        let made = Instant::now();
        pools.insert(server.clone(), (pool.clone(), made));
        Ok((pool, made))
    }

    /// Closes the pools of nodes not in `primaries` (demoted or gone).
    fn prune(&self, primaries: &[Server]) {
        if primaries.is_empty() {
            return;
        }
        let stale: Vec<Pool> = {
            let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
            let gone: Vec<Server> = pools
                .keys()
                .filter(|s| !primaries.contains(s))
                .cloned()
                .collect();
            gone.iter()
                .filter_map(|s| pools.remove(s))
                .map(|(pool, _)| pool)
                .collect()
        };
        for pool in stale {
            tokio::spawn(async move {
                let _ = pool.quit().await;
            });
        }
    }
}
