//! Shares of one server per caller: how many waiting Acquires, KeepAlive
//! streams and attached locks one tenant (with `--auth-file`) or one client
//! connection (without) may hold at once, and how many Acquire calls it may
//! make a second, so that no caller can use up the server-wide limits (or
//! fill Redis with lock names) and lock everyone else out. A share is taken
//! with [`Quotas::take`] and given back when the returned [`Share`] is
//! dropped; the rate is a token bucket per caller ([`Quotas::admit_acquire`]).
//! A tenant's `[tenant.quotas]` in the auth file overrides the defaults.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use std::time::Instant;

use crate::auth::{Access, TenantQuotas};
use crate::lock::LockError;

/// Rate buckets kept before the full ones are dropped.
const MAX_BUCKETS: usize = 10_000;

/// Default waiting Acquires per tenant or connection: a tenth of the
/// server-wide default (`--max-waiters`).
pub const DEFAULT_MAX_WAITERS_PER_CALLER: usize = 1_000;
/// Default KeepAlive streams per tenant (a connection has its own limit,
/// `--max-streams-per-connection`).
pub const DEFAULT_MAX_STREAMS_PER_CALLER: usize = 1_000;
/// Default locks attached to KeepAlive streams per tenant or connection.
pub const DEFAULT_MAX_LOCKS_PER_CALLER: usize = 100_000;
/// Default Acquire calls a second per tenant or connection (a burst of a
/// second's worth is allowed): about what one server can serve, so it only
/// stops a runaway caller from creating lock names without end.
pub const DEFAULT_MAX_ACQUIRES_PER_SECOND_PER_CALLER: u32 = 10_000;

/// What one caller may hold at once on one server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaLimits {
    /// Waiting Acquires (`--max-waiters-per-caller`).
    pub waiters: usize,
    /// KeepAlive streams (`--max-streams-per-caller`).
    pub streams: usize,
    /// Locks attached to its KeepAlive streams (`--max-locks-per-caller`).
    pub locks: usize,
    /// Acquire calls a second (`--max-acquires-per-second-per-caller`).
    pub acquires_per_second: u32,
}

impl Default for QuotaLimits {
    fn default() -> Self {
        Self {
            waiters: DEFAULT_MAX_WAITERS_PER_CALLER,
            streams: DEFAULT_MAX_STREAMS_PER_CALLER,
            locks: DEFAULT_MAX_LOCKS_PER_CALLER,
            acquires_per_second: DEFAULT_MAX_ACQUIRES_PER_SECOND_PER_CALLER,
        }
    }
}

impl QuotaLimits {
    /// These limits with a tenant's own quotas from the auth file.
    pub fn with(self, own: TenantQuotas) -> Self {
        Self {
            waiters: own.waiters.unwrap_or(self.waiters),
            streams: own.streams.unwrap_or(self.streams),
            locks: own.locks.unwrap_or(self.locks),
            acquires_per_second: own.acquires_per_second.unwrap_or(self.acquires_per_second),
        }
    }
}

/// Who a share is counted against, and its limits.
#[derive(Debug, Clone)]
pub struct Caller {
    id: CallerId,
    /// The tenant's own quotas from the auth file, if any.
    own: TenantQuotas,
}

/// Who a share is counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum CallerId {
    /// An authenticated tenant.
    Tenant(String),
    /// Without authentication: one client connection.
    Peer(SocketAddr),
    /// Without authentication and without a known peer address (an
    /// in-process transport): everyone such counts together.
    Unknown,
}

impl Caller {
    /// The caller of a request: its tenant, or else its connection.
    pub fn of(access: &Access, peer: Option<SocketAddr>) -> Self {
        let id = match (access.tenant(), peer) {
            (Some(tenant), _) => CallerId::Tenant(tenant.to_owned()),
            (None, Some(peer)) => CallerId::Peer(peer),
            (None, None) => CallerId::Unknown,
        };
        Self {
            id,
            own: access.quotas(),
        }
    }

    fn describe(&self) -> String {
        match &self.id {
            CallerId::Tenant(t) => format!("tenant {t:?}"),
            CallerId::Peer(_) | CallerId::Unknown => "this connection".into(),
        }
    }
}

/// The kinds of things a share counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Waiting Acquires.
    Waiters,
    /// KeepAlive and Watch streams.
    Streams,
    /// Locks attached to KeepAlive streams.
    Locks,
}

impl Kind {
    fn index(self) -> usize {
        self as usize
    }

    fn what(self) -> (&'static str, &'static str) {
        match self {
            Kind::Waiters => ("waiting Acquire calls", "--max-waiters-per-caller"),
            Kind::Streams => ("KeepAlive and Watch streams", "--max-streams-per-caller"),
            Kind::Locks => ("locks kept alive", "--max-locks-per-caller"),
        }
    }
}

/// A token bucket: `tokens` left at `at`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Every caller's use of this server.
#[derive(Debug)]
pub struct Quotas {
    limits: QuotaLimits,
    used: Mutex<HashMap<CallerId, [usize; 3], foldhash::fast::RandomState>>,
    rates: Mutex<HashMap<CallerId, Bucket, foldhash::fast::RandomState>>,
}

impl Quotas {
    /// Counts against `limits`.
    pub fn new(limits: QuotaLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            used: Mutex::new(HashMap::default()),
            rates: Mutex::new(HashMap::default()),
        })
    }

    fn limit(&self, caller: &Caller, kind: Kind) -> usize {
        let limits = self.limits.with(caller.own);
        match kind {
            Kind::Waiters => limits.waiters,
            Kind::Streams => limits.streams,
            Kind::Locks => limits.locks,
        }
    }

    /// Counts one Acquire call against `caller`'s rate, or
    /// RESOURCE_EXHAUSTED naming the quota when it is past it.
    pub fn admit_acquire(&self, caller: &Caller) -> Result<(), LockError> {
        let rate = f64::from(self.limits.with(caller.own).acquires_per_second);
        let now = Instant::now();
        let mut rates = self.rates.lock().unwrap_or_else(|e| e.into_inner());
        if rates.len() > MAX_BUCKETS {
            // Buckets that have filled up again carry no information.
            rates.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < rate);
        }
        let bucket = rates.entry(caller.id.clone()).or_insert(Bucket {
            tokens: rate,
            at: now,
        });
        let tokens = (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * rate).min(rate);
        if tokens < 1.0 {
            return Err(LockError::ResourceExhausted(format!(
                "{} makes more than {rate} Acquire calls a second on this server, its quota (--max-acquires-per-second-per-caller {rate}); retry shortly",
                caller.describe()
            )));
        }
        *bucket = Bucket {
            tokens: tokens - 1.0,
            at: now,
        };
        Ok(())
    }

    /// Takes `n` of `kind` for `caller`, or RESOURCE_EXHAUSTED naming the
    /// quota when the caller would go past it.
    pub fn take(
        self: &Arc<Self>,
        caller: &Caller,
        kind: Kind,
        n: usize,
    ) -> Result<Share, LockError> {
        let mut share = Share {
            quotas: self.clone(),
            caller: caller.clone(),
            kind,
            n: 0,
        };
        share.grow(n)?;
        Ok(share)
    }

    fn adjust(&self, caller: &Caller, kind: Kind, add: usize, sub: usize) -> Result<(), LockError> {
        let limit = self.limit(caller, kind);
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        let counts = used.entry(caller.id.clone()).or_insert([0; 3]);
        let now = counts[kind.index()];
        let next = now.saturating_add(add).saturating_sub(sub);
        if add > 0 && next > limit {
            let (what, flag) = kind.what();
            let empty = counts.iter().all(|c| *c == 0);
            if empty {
                used.remove(&caller.id);
            }
            return Err(LockError::ResourceExhausted(format!(
                "{} already holds {now} {what} on this server, its quota ({flag} {limit})",
                caller.describe(),
            )));
        }
        counts[kind.index()] = next;
        if counts.iter().all(|c| *c == 0) {
            used.remove(&caller.id);
        }
        Ok(())
    }
}

/// Part of a caller's quota, given back on drop.
#[derive(Debug)]
pub struct Share {
    quotas: Arc<Quotas>,
    caller: Caller,
    kind: Kind,
    n: usize,
}

impl Share {
    /// Takes `n` more, or fails (taking nothing) past the quota.
    pub fn grow(&mut self, n: usize) -> Result<(), LockError> {
        self.quotas.adjust(&self.caller, self.kind, n, 0)?;
        self.n += n;
        Ok(())
    }

    /// How many this share holds.
    pub fn count(&self) -> usize {
        self.n
    }

    /// Gives `n` back.
    pub fn shrink(&mut self, n: usize) {
        let n = n.min(self.n);
        let _ = self.quotas.adjust(&self.caller, self.kind, 0, n);
        self.n -= n;
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.shrink(self.n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_are_counted_apart_and_shares_come_back() {
        let q = Quotas::new(QuotaLimits {
            waiters: 2,
            streams: 1,
            locks: 3,
            acquires_per_second: 5,
        });
        let tenant = |name: &str| Caller {
            id: CallerId::Tenant(name.into()),
            own: TenantQuotas::default(),
        };
        let (a, b) = (tenant("a"), tenant("b"));
        let one = q.take(&a, Kind::Waiters, 1).unwrap();
        let _two = q.take(&a, Kind::Waiters, 1).unwrap();
        let err = q.take(&a, Kind::Waiters, 1).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(
            err.to_string().contains("--max-waiters-per-caller 2"),
            "{err}"
        );
        assert!(err.to_string().contains("\"a\""), "{err}");
        // Another tenant is not affected.
        let _b = q.take(&b, Kind::Waiters, 2).unwrap();
        drop(one);
        let _again = q.take(&a, Kind::Waiters, 1).unwrap();
        // Growing a share past the quota takes nothing.
        let mut locks = q.take(&a, Kind::Locks, 2).unwrap();
        assert!(locks.grow(2).is_err());
        locks.grow(1).unwrap();
        locks.shrink(3);
        locks.grow(3).unwrap();
        drop(locks);
        drop((_two, _b, _again));
        assert!(q.used.lock().unwrap().is_empty());
        // A tenant's own quota overrides the default.
        let big = Caller {
            id: CallerId::Tenant("big".into()),
            own: TenantQuotas {
                waiters: Some(3),
                ..Default::default()
            },
        };
        let _three = q.take(&big, Kind::Waiters, 3).unwrap();
        assert!(q.take(&big, Kind::Waiters, 1).is_err());
    }

    #[test]
    fn acquire_rate_is_a_bucket_per_caller() {
        let q = Quotas::new(QuotaLimits {
            acquires_per_second: 5,
            ..QuotaLimits::default()
        });
        let a = Caller {
            id: CallerId::Tenant("a".into()),
            own: TenantQuotas::default(),
        };
        let b = Caller {
            id: CallerId::Tenant("b".into()),
            own: TenantQuotas::default(),
        };
        for _ in 0..5 {
            q.admit_acquire(&a).unwrap();
        }
        let err = q.admit_acquire(&a).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(
            err.to_string()
                .contains("--max-acquires-per-second-per-caller 5"),
            "{err}"
        );
        q.admit_acquire(&b).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(250));
        q.admit_acquire(&a).unwrap();
    }
}
