//! `--min-replica-acks`: a grant is answered only once enough replicas
//! acknowledged it (`WAIT` on the connection that granted).

use std::time::{Duration, Instant};

use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand};

use super::args::{acquire_args, release_call};
use super::call::{LATE_REPLY_LIMIT, argv, evalsha, routed};
use super::errors::{is_redirect, map_error};
use super::names::slot_of;
use super::replies::{int, parse_acquire, parse_acquire_shared};
use super::route::Route;
use super::{RedisConfig, RedisStore};
use crate::lock::{AcquireOutcome, AcquireSpec, LockError, Mode};
use crate::store::{LateGrant, Releasing};

/// `--min-replica-acks N`: every grant is followed by `WAIT N` on the
/// connection that ran the grant script, and answered only once N replicas
/// acknowledged it; otherwise it is undone and the caller gets UNAVAILABLE.
/// These Acquires have a pool of their own, because a WAIT holds its
/// connection until the replicas answer: renewals and releases on the main
/// pool never queue behind one.
pub(super) struct ReplicaAcks {
    /// Replicas that must acknowledge a grant.
    min: u32,
    /// WAIT's own timeout: half the store timeout, so that an undo still
    /// fits in the call's budget.
    wait: Duration,
    pub(super) route: Route,
}

impl ReplicaAcks {
    /// The acks pool, connecting in the background; `None` when
    /// `min_replica_acks` is 0.
    pub(super) fn start(
        builder: &Builder,
        config: &RedisConfig,
        discovery: &Pool,
    ) -> Result<Option<Self>, String> {
        if config.min_replica_acks == 0 {
            return Ok(None);
        }
        Ok(Some(Self {
            min: config.min_replica_acks,
            wait: (config.timeout / 2).max(Duration::from_millis(1)),
            route: Route::build(
                builder,
                config.pool_size.max(1),
                config.timeout,
                discovery,
                true,
            )?,
        }))
    }
}

impl RedisStore {
    /// Acquire with `--min-replica-acks`: the grant script, then `WAIT` on
    /// the same client (so the same connection to the slot's primary),
    /// then, if too few replicas acknowledged, the release script, all
    /// within the store timeout. A result that comes after the timeout
    /// (the caller already got UNAVAILABLE) undoes a grant it made.
    pub(super) async fn acquire_acked(
        &self,
        acks: &ReplicaAcks,
        spec: &AcquireSpec,
        late: impl LateGrant,
    ) -> Result<AcquireOutcome, LockError> {
        let n = self.names(&spec.key);
        let slot = slot_of(&n.lock);
        let (client, left) = routed(&acks.route, slot, self.timeout).await?;
        // A shared Acquire has its own script, which checks no replicas:
        // the WAIT below still confirms its grant.
        let acquire = match spec.mode {
            Mode::Exclusive => self.scripts.acquire.clone(),
            Mode::Shared { .. } => self.scripts.acquire_shared.clone(),
        };
        let grant = argv(
            &acquire,
            vec![n.lock.clone(), n.fence.clone()],
            acquire_args(spec, acks.min),
        );
        let release = self.scripts.giveback.clone();
        let sent = Instant::now();
        let (min, wait, token, mode) = (acks.min, acks.wait, spec.token.clone(), spec.mode);
        let mut call = Box::pin(async move {
            let reply = evalsha(&client, &acquire, grant)
                .await
                .map_err(|e| map_error(&e))?;
            let outcome = match mode {
                Mode::Exclusive => parse_acquire(reply, sent)?,
                Mode::Shared { limit } => parse_acquire_shared(reply, sent, limit)?,
            };
            let AcquireOutcome::Acquired(lease) = &outcome else {
                return Ok(outcome);
            };
            let acked = wait_for_replicas(&client, slot, min, wait).await;
            if matches!(acked, Ok(k) if k >= i64::from(min)) {
                return Ok(outcome);
            }
            // Only a grant this call made is given back (and, by the
            // script, never one a request_id replay handed out).
            if lease.token == token {
                let (keys, args) = release_call(n, &token, Releasing::GiveBack);
                let undo = argv(&release, keys, args);
                if let Err(e) = evalsha(&client, &release, undo).await {
                    tracing::warn!(error = %e, "could not undo an unacknowledged grant; it expires with its TTL");
                }
            }
            Err(LockError::Unavailable(match acked {
                Ok(k) => format!(
                    "the grant was acknowledged by {k} of {min} replica(s) within {wait:?}; not granted"
                ),
                Err(e) => format!("could not confirm the grant with WAIT ({e}); not granted"),
            }))
        });
        match tokio::time::timeout(left, &mut call).await {
            Ok(result) => {
                if is_redirect(&result) {
                    acks.route.refresh();
                }
                result
            }
            Err(_) => {
                // A late, acknowledged grant is the caller's to give back.
                tokio::spawn(async move {
                    if let Ok(Ok(AcquireOutcome::Acquired(grant))) =
                        tokio::time::timeout(LATE_REPLY_LIMIT, call).await
                    {
                        late(grant);
                    }
                });
                Err(LockError::Unavailable(format!(
                    "no reply from Redis within {:?}",
                    self.timeout
                )))
            }
        }
    }
}

/// `WAIT min timeout` on `client`'s connection to the primary of `slot`:
/// how many replicas acknowledged every write that connection made. Sent
/// once: a resend after a reconnect would be a new connection, whose WAIT
/// knows nothing of the grant.
pub(super) async fn wait_for_replicas(
    client: &Client,
    slot: u16,
    min: u32,
    timeout: Duration,
) -> Result<i64, Error> {
    let options = Options {
        max_attempts: Some(1),
        ..Default::default()
    };
    let cmd = CustomCommand::new_static("WAIT", ClusterHash::Custom(slot), false);
    let timeout_ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
    let reply: Value = client
        .with_options(&options)
        .custom(
            cmd,
            vec![Value::from(i64::from(min)), Value::from(timeout_ms)],
        )
        .await?;
    int(&reply).ok_or_else(|| Error::new(ErrorKind::Protocol, "WAIT: not an integer"))
}
