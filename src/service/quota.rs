//! Shares of one server per caller: how many waiting Acquires, KeepAlive
//! streams and attached locks one tenant (with `--auth-file`) or one client
//! connection (without) may hold at once, so that no caller can use up the
//! server-wide limits and lock everyone else out. A share is taken with
//! [`Quotas::take`] and given back when the returned [`Share`] is dropped.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::auth::Access;
use crate::lock::LockError;

/// Default waiting Acquires per tenant or connection: a tenth of the
/// server-wide default (`--max-waiters`).
pub const DEFAULT_MAX_WAITERS_PER_CALLER: usize = 1_000;
/// Default KeepAlive streams per tenant (a connection has its own limit,
/// `--max-streams-per-connection`).
pub const DEFAULT_MAX_STREAMS_PER_CALLER: usize = 1_000;
/// Default locks attached to KeepAlive streams per tenant or connection.
pub const DEFAULT_MAX_LOCKS_PER_CALLER: usize = 100_000;

/// What one caller may hold at once on one server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaLimits {
    /// Waiting Acquires (`--max-waiters-per-caller`).
    pub waiters: usize,
    /// KeepAlive streams (`--max-streams-per-caller`).
    pub streams: usize,
    /// Locks attached to its KeepAlive streams (`--max-locks-per-caller`).
    pub locks: usize,
}

impl Default for QuotaLimits {
    fn default() -> Self {
        Self {
            waiters: DEFAULT_MAX_WAITERS_PER_CALLER,
            streams: DEFAULT_MAX_STREAMS_PER_CALLER,
            locks: DEFAULT_MAX_LOCKS_PER_CALLER,
        }
    }
}

/// Who a share is counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Caller {
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
        match (access.tenant(), peer) {
            (Some(tenant), _) => Caller::Tenant(tenant.to_owned()),
            (None, Some(peer)) => Caller::Peer(peer),
            (None, None) => Caller::Unknown,
        }
    }

    fn describe(&self) -> String {
        match self {
            Caller::Tenant(t) => format!("tenant {t:?}"),
            Caller::Peer(_) | Caller::Unknown => "this connection".into(),
        }
    }
}

/// The kinds of things a share counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Waiting Acquires.
    Waiters,
    /// KeepAlive streams.
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
            Kind::Streams => ("KeepAlive streams", "--max-streams-per-caller"),
            Kind::Locks => ("locks kept alive", "--max-locks-per-caller"),
        }
    }
}

/// Every caller's use of this server.
#[derive(Debug)]
pub struct Quotas {
    limits: QuotaLimits,
    used: Mutex<HashMap<Caller, [usize; 3]>>,
}

impl Quotas {
    /// Counts against `limits`.
    pub fn new(limits: QuotaLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            used: Mutex::new(HashMap::new()),
        })
    }

    fn limit(&self, kind: Kind) -> usize {
        match kind {
            Kind::Waiters => self.limits.waiters,
            Kind::Streams => self.limits.streams,
            Kind::Locks => self.limits.locks,
        }
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
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        let counts = used.entry(caller.clone()).or_insert([0; 3]);
        let now = counts[kind.index()];
        let next = now.saturating_add(add).saturating_sub(sub);
        if add > 0 && next > self.limit(kind) {
            let (what, flag) = kind.what();
            let empty = counts.iter().all(|c| *c == 0);
            if empty {
                used.remove(caller);
            }
            return Err(LockError::ResourceExhausted(format!(
                "{} already holds {now} {what} on this server, its quota ({flag} {})",
                caller.describe(),
                self.limit(kind)
            )));
        }
        counts[kind.index()] = next;
        if counts.iter().all(|c| *c == 0) {
            used.remove(caller);
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
        });
        let a = Caller::Tenant("a".into());
        let b = Caller::Tenant("b".into());
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
    }
}
