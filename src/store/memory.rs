//! The embedded in-memory store: one process, nothing durable. It is what
//! `leasehold serve` runs without `--redis-url`, and it honours the same
//! contract as Redis (TTL expiry, fencing, request ids, wake-ups).
//!
//! State is sharded over a fixed number of `std` mutexes held only for a
//! map lookup, never across an `.await`.

use crate::store::Forced;
use std::collections::HashMap;

use foldhash::fast::RandomState;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use super::changes::{Change, ChangeKind, Changes};
use super::{LateGrant, ListPage, LockStore, ReleaseListener, Releasing, monotonic_unix_micros};
use crate::lock::{
    AcquireOutcome, AcquireSpec, Attachment, Grant, HolderInfo, LockError, LockInfo, LockKey,
    Metadata, Mode, Token,
};
use crate::task::{self, TaskGuard};

const SHARDS: usize = 64;
/// How often expired leases are dropped and their waiters woken.
const SWEEP_EVERY: Duration = Duration::from_millis(250);
/// Every this many sweeps, every shard is swept whatever its leases'
/// deadlines: slots whose fencing counter needs no keeping are dropped
/// then, and released tokens whose time is up are forgotten.
const FULL_SWEEP_EVERY: u32 = 8;
/// How long a waiting EXCLUSIVE Acquire keeps later SHARED ones out after
/// its last attempt (the Redis store's `EXCLUSIVE_WAIT_MARK`).
const EXCLUSIVE_WAIT_MARK: Duration = Duration::from_millis(3000);

/// The in-memory [`LockStore`].
#[derive(Debug)]
pub struct MemoryStore {
    inner: Arc<Inner>,
    _sweeper: TaskGuard,
}

#[derive(Debug)]
struct Inner {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    waiters: Arc<dyn ReleaseListener>,
    /// Grants and releases, for watchers.
    changes: Changes,
}

/// One key's state. The fencing counter outlives the lease; the slot is
/// dropped once the monotonic clock has passed its last fencing token, since
/// from then on the clock floor alone keeps tokens increasing. The tokens it
/// released are remembered by its shard ([`Gone`]), not by the slot.
#[derive(Debug)]
struct Slot {
    fence: u64,
    /// The exclusive holder.
    lease: Option<Held>,
    /// The shared holders, oldest first (empty while `lease` is held).
    shared: Vec<Held>,
    /// The limit the first of the current shared holders set.
    limit: u32,
    /// Waiting EXCLUSIVE Acquires (their tokens) and until when each keeps
    /// new shared holders out: no writer starvation.
    exclusive_waiting: Vec<(Token, Instant)>,
}

/// The tokens released in one shard, each remembered for the TTL its lease
/// had left, so that a retried Release answers true (as Redis's tombstone
/// keys do).
///
/// Kept by the shard rather than by each key's slot: a slot kept alive by
/// its tombstones made a store cycling through many keys hold (and sweep)
/// a slot and a map per key for a TTL after each release (100 000 keys,
/// 10 s TTL under `bench cycles`). Tokens are random and unique to one
/// grant, so the map is by token, with a hash of the key so that a token
/// presented with another key is not taken for released there. Pruned of
/// expired entries once it has doubled since the last pruning (amortized
/// O(1) per release: a busy key's TTL spans many releases, 80 000 in a
/// 10 s TTL of `bench hot`) and at each full sweep.
#[derive(Debug, Default)]
struct Gone {
    tokens: HashMap<Token, (u64, Instant), RandomState>,
    /// `tokens`' length after its last pruning.
    pruned: usize,
}

/// `Gone` is never pruned below this length: small maps are cheap to keep.
const GONE_PRUNE_MIN: usize = 16;

impl Gone {
    /// Remembers that `token` was released from the key hashed `key` until
    /// `until`, pruning expired entries when the map has doubled since the
    /// last pruning.
    fn remember(&mut self, key: u64, token: Token, until: Instant, now: Instant) {
        if until <= now {
            return;
        }
        if self.tokens.len() >= (2 * self.pruned).max(GONE_PRUNE_MIN) {
            self.prune(now);
        }
        self.tokens.insert(token, (key, until));
    }

    fn prune(&mut self, now: Instant) {
        self.tokens.retain(|_, (_, until)| *until > now);
        self.pruned = self.tokens.len();
    }

    /// Whether `token`'s release from the key hashed `key` is still
    /// remembered.
    fn released(&self, key: u64, token: &Token, now: Instant) -> bool {
        self.tokens
            .get(token)
            .is_some_and(|(k, until)| *k == key && *until > now)
    }
}

impl Slot {
    fn empty() -> Self {
        Self {
            fence: 0,
            lease: None,
            shared: Vec::new(),
            limit: 0,
            exclusive_waiting: Vec::new(),
        }
    }

    /// Frees the lease of the key hashed `key`, remembering its token in
    /// `gone` until it would have expired.
    fn free(&mut self, gone: &mut Gone, key: u64, now: Instant) {
        if let Some(held) = self.lease.take() {
            gone.remember(key, held.token, held.expires_at, now);
        }
    }

    /// Drops expired shared holders and stale exclusive-waiting marks;
    /// true if a holder expired (its waiters must hear of it).
    fn prune(&mut self, now: Instant) -> bool {
        let before = self.shared.len();
        self.shared.retain(|h| h.live(now));
        self.exclusive_waiting.retain(|(_, until)| *until > now);
        self.shared.len() < before
    }

    /// Releases the shared holder at `i`, remembering its token.
    fn free_shared(&mut self, gone: &mut Gone, key: u64, i: usize, now: Instant) {
        let held = self.shared.remove(i);
        gone.remember(key, held.token, held.expires_at, now);
    }

    /// The holder `token` names, exclusive or shared, if live.
    fn holder_mut(&mut self, token: &Token, now: Instant) -> Option<&mut Held> {
        self.lease
            .iter_mut()
            .chain(self.shared.iter_mut())
            .find(|h| h.token == *token && h.live(now))
    }
}

#[derive(Debug)]
struct Held {
    token: Token,
    fence: u64,
    owner: String,
    metadata: Metadata,
    ttl_ms: u32,
    request_id: Option<String>,
    expires_at: Instant,
    /// Handed out again to a `request_id` replay: no give-back releases it.
    replayed: bool,
    /// The KeepAlive stream that renewed it last.
    attachment: Option<Attachment>,
}

impl Held {
    fn live(&self, now: Instant) -> bool {
        self.expires_at > now
    }
    /// This lease handed out again (a resent Acquire or a `request_id`
    /// replay): unchanged, with what is left of its TTL.
    fn again(&self, now: Instant) -> Grant {
        Grant {
            token: self.token.clone(),
            fencing_token: self.fence,
            ttl_ms: self.ttl_ms,
            at: now,
            valid_ms: self.remaining_ms(now),
        }
    }
    fn remaining_ms(&self, now: Instant) -> u32 {
        let ms = self.expires_at.saturating_duration_since(now).as_millis();
        crate::lock::remaining_ms(ms.min(i64::MAX as u128) as i64)
    }
}

/// One shard of the keys, and when a lease in it runs out first.
///
/// Why the deadline: a slot outlives its lease (its fencing counter, the
/// tokens it released), so a busy store holds many slots with nothing to
/// expire; the sweeper visits a shard only once a lease in it may have run
/// out, and all of them only every [`FULL_SWEEP_EVERY`] sweeps.
#[derive(Debug, Default)]
struct Shard {
    map: HashMap<String, Slot, RandomState>,
    /// No lease in this shard runs out before this (`None`: none held).
    /// Lowered by every grant and renewal; recomputed by each sweep.
    due: Option<Instant>,
    /// The tokens its keys released.
    gone: Gone,
}

impl Shard {
    /// A lease in this shard runs out at `at`.
    fn due_by(&mut self, at: Instant) {
        self.due = Some(earliest(self.due, at));
    }
}

/// The earlier of `due` (if any) and `at`.
fn earliest(due: Option<Instant>, at: Instant) -> Instant {
    due.map_or(at, |d| d.min(at))
}

impl std::ops::Deref for Shard {
    type Target = HashMap<String, Slot, RandomState>;
    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl std::ops::DerefMut for Shard {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.map
    }
}

impl MemoryStore {
    /// A new empty store that wakes `waiters` on release and expiry. Must be
    /// called inside a tokio runtime (it starts its expiry sweeper).
    pub fn new(waiters: Arc<dyn ReleaseListener>) -> Self {
        let inner = Arc::new(Inner {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: RandomState::default(),
            waiters,
            changes: Changes::default(),
        });
        let weak = Arc::downgrade(&inner);
        let sweeper = task::spawn("memory-sweeper", sweep(weak));
        Self {
            inner,
            _sweeper: sweeper,
        }
    }
}

impl Inner {
    /// Tells watchers of `key` (after the shard's lock is let go).
    fn changed(&self, key: &str, kind: ChangeKind, fencing_token: u64) {
        self.changes.publish(
            key,
            Change {
                kind,
                fencing_token,
            },
        );
    }

    fn shard(&self, key: &str) -> MutexGuard<'_, Shard> {
        self.locate(key).0
    }

    /// `key`'s shard, and the key's hash (which [`Gone`] keeps).
    fn locate(&self, key: &str) -> (MutexGuard<'_, Shard>, u64) {
        let (i, hash) = self.index(key);
        // Every critical section leaves the map consistent, so a poisoned
        // lock (a panic elsewhere) is still safe to use.
        (
            self.shards[i].lock().unwrap_or_else(|e| e.into_inner()),
            hash,
        )
    }

    /// The index of `key`'s shard, and the key's hash.
    fn index(&self, key: &str) -> (usize, u64) {
        let hash = self.hasher.hash_one(key);
        ((hash as usize) % SHARDS, hash)
    }
}

async fn sweep(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sweeps: u32 = 0;
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let now = Instant::now();
        let now_us = monotonic_unix_micros();
        let full = sweeps % FULL_SWEEP_EVERY == 0;
        sweeps = sweeps.wrapping_add(1);
        let mut expired = Vec::new();
        for shard in inner.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            if !full && shard.due.is_none_or(|due| due > now) {
                continue;
            }
            let mut due: Option<Instant> = None;
            shard.map.retain(|key, slot| {
                let lease_expired = slot.lease.as_ref().is_some_and(|h| !h.live(now));
                if lease_expired {
                    slot.lease = None;
                }
                if slot.prune(now) || lease_expired {
                    expired.push(key.clone());
                }
                for held in slot.lease.iter().chain(slot.shared.iter()) {
                    due = Some(earliest(due, held.expires_at));
                }
                slot.lease.is_some()
                    || !slot.shared.is_empty()
                    || !slot.exclusive_waiting.is_empty()
                    || slot.fence >= now_us
            });
            shard.due = due;
            if full {
                shard.gone.prune(now);
            }
        }
        crate::metrics::expiries(expired.len() as u64);
        for key in expired {
            inner.waiters.released(&key);
        }
    }
}

/// Gives `slot` to `spec` (as its exclusive holder or one more shared
/// holder), with a fencing token above every earlier one.
fn grant(slot: &mut Slot, spec: &AcquireSpec, now: Instant) -> Grant {
    let fence = (slot.fence + 1).max(monotonic_unix_micros());
    slot.fence = fence;
    let expires_at = now + Duration::from_millis(spec.ttl_ms.into());
    slot.exclusive_waiting.retain(|(t, _)| *t != spec.token);
    let held = Held {
        token: spec.token.clone(),
        fence,
        owner: spec.owner.clone(),
        metadata: spec.metadata.clone(),
        ttl_ms: spec.ttl_ms,
        request_id: spec.request_id.clone(),
        expires_at,
        replayed: false,
        attachment: None,
    };
    match spec.mode {
        Mode::Exclusive => slot.lease = Some(held),
        Mode::Shared { limit } => {
            if slot.shared.is_empty() {
                slot.limit = limit;
            }
            slot.shared.push(held);
        }
    }
    Grant::fresh(spec.token.clone(), fence, spec.ttl_ms, now)
}

/// Whether `kind` allows releasing `held` (which `token` holds).
fn may_release(held: &Held, kind: Releasing<'_>) -> bool {
    match kind {
        Releasing::Holder => true,
        Releasing::StreamEnd(att) => held.attachment.as_ref() == Some(att),
        Releasing::GiveBack => !held.replayed,
    }
}

/// The outcome of a release on one slot.
enum Freed {
    /// Released now (waiters must hear of it): the grant's fencing token.
    Now(u64),
    /// This token's release had happened already.
    Before,
    /// The token's lease had expired (and is swept now): not released.
    Expired,
    /// The token does not hold the lock, or `kind` forbade it.
    No,
}

/// Releases `token`'s hold on `slot`, the key hashed `key`, remembering
/// the token in `gone`.
fn free_slot(
    slot: &mut Slot,
    gone: &mut Gone,
    key: u64,
    token: &Token,
    kind: Releasing<'_>,
    now: Instant,
) -> Freed {
    match slot.lease.as_ref() {
        Some(h) if h.token == *token => {
            if !h.live(now) {
                // Expired but not swept yet: lost, but freed all the same,
                // and waiters hear of it.
                slot.free(gone, key, now);
                return Freed::Expired;
            }
            if !may_release(h, kind) {
                return Freed::No;
            }
            let fence = h.fence;
            slot.free(gone, key, now);
            Freed::Now(fence)
        }
        _ => match slot.shared.iter().position(|h| h.token == *token) {
            Some(i) if !slot.shared[i].live(now) => {
                slot.prune(now);
                Freed::Expired
            }
            Some(i) if !may_release(&slot.shared[i], kind) => Freed::No,
            Some(i) => {
                let fence = slot.shared[i].fence;
                slot.free_shared(gone, key, i, now);
                Freed::Now(fence)
            }
            None if gone.released(key, token, now) => Freed::Before,
            None => Freed::No,
        },
    }
}

/// The state of a slot's live holders (exclusive or shared), without
/// their tokens.
fn info_of(slot: &Slot, now: Instant) -> Option<LockInfo> {
    let info = |h: &Held| HolderInfo {
        owner: h.owner.clone(),
        fencing_token: h.fence,
        ttl_ms: h.remaining_ms(now),
        metadata: h.metadata.clone(),
    };
    if let Some(held) = slot.lease.as_ref().filter(|h| h.live(now)) {
        return Some(LockInfo {
            mode: Mode::Exclusive,
            holders: vec![info(held)],
        });
    }
    let holders: Vec<HolderInfo> = slot
        .shared
        .iter()
        .filter(|h| h.live(now))
        .map(info)
        .collect();
    if holders.is_empty() {
        return None;
    }
    Some(LockInfo {
        mode: Mode::Shared { limit: slot.limit },
        holders,
    })
}

/// The last key of the previous page, from its page token.
fn parse_page(page: &str) -> Result<String, LockError> {
    hex::decode(page)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(|| LockError::invalid("page_token", "not a page token of this server"))
}

/// A shared Acquire on `slot` (the key hashed `key`, whose shard's released
/// tokens are `gone`): waits for a live exclusive holder, a full set of
/// shared holders, or a waiting exclusive Acquire.
fn acquire_shared(
    slot: &mut Slot,
    gone: &mut Gone,
    key: u64,
    spec: &AcquireSpec,
    limit: u32,
    now: Instant,
) -> Result<AcquireOutcome, LockError> {
    if let Some(held) = slot.lease.as_ref().filter(|h| h.live(now)) {
        return Ok(AcquireOutcome::Held {
            retry_after_ms: held.remaining_ms(now),
        });
    }
    slot.prune(now);
    if let Some(held) = slot.shared.iter_mut().find(|h| {
        h.token == spec.token || (spec.request_id.is_some() && h.request_id == spec.request_id)
    }) {
        held.replayed |= held.token != spec.token;
        return Ok(AcquireOutcome::Acquired(held.again(now)));
    }
    if !slot.shared.is_empty() {
        if slot.limit != limit {
            return Err(LockError::limit_mismatch(slot.limit, limit));
        }
        if limit > 0 && slot.shared.len() >= limit as usize {
            let soonest = slot.shared.iter().map(|h| h.remaining_ms(now)).min();
            return Ok(AcquireOutcome::Held {
                retry_after_ms: soonest.unwrap_or(1),
            });
        }
    }
    if let Some(until) = slot.exclusive_waiting.iter().map(|(_, u)| *u).max() {
        let ms = until.saturating_duration_since(now).as_millis();
        return Ok(AcquireOutcome::Held {
            retry_after_ms: crate::lock::remaining_ms(ms.min(i64::MAX as u128) as i64),
        });
    }
    slot.free(gone, key, now);
    Ok(AcquireOutcome::Acquired(grant(slot, spec, now)))
}

impl LockStore for MemoryStore {
    async fn acquire(
        &self,
        spec: &AcquireSpec,
        _late: impl LateGrant,
    ) -> Result<AcquireOutcome, LockError> {
        let now = Instant::now();
        let (mut map, hash) = self.inner.locate(spec.key.as_str());
        let shard = &mut *map;
        let slot = shard
            .map
            .entry(spec.key.as_str().to_owned())
            .or_insert_with(Slot::empty);
        if let Mode::Shared { limit } = spec.mode {
            let outcome = acquire_shared(slot, &mut shard.gone, hash, spec, limit, now)?;
            if matches!(outcome, AcquireOutcome::Acquired(_)) {
                map.due_by(now + Duration::from_millis(spec.ttl_ms.into()));
            }
            drop(map);
            if let AcquireOutcome::Acquired(granted) = &outcome {
                // A replay tells again what watchers already heard; they
                // skip it.
                self.inner.changed(
                    spec.key.as_str(),
                    ChangeKind::Acquired,
                    granted.fencing_token,
                );
            }
            return Ok(outcome);
        }
        slot.prune(now);
        let holding = if let Some(held) = slot.lease.as_mut().filter(|h| h.live(now)) {
            let same = held.token == spec.token;
            let replay = !same && spec.request_id.is_some() && held.request_id == spec.request_id;
            if same || replay {
                held.replayed |= replay;
                return Ok(AcquireOutcome::Acquired(held.again(now)));
            }
            Some(held.remaining_ms(now))
        } else {
            slot.shared.iter().map(|h| h.remaining_ms(now)).max()
        };
        if let Some(retry_after_ms) = holding {
            if spec.waiting {
                // Later shared Acquires queue behind this one.
                let mark = (spec.token.clone(), now + EXCLUSIVE_WAIT_MARK);
                slot.exclusive_waiting.retain(|(t, _)| *t != spec.token);
                slot.exclusive_waiting.push(mark);
            }
            return Ok(AcquireOutcome::Held { retry_after_ms });
        }
        // An expired lease counts as released at its expiry.
        slot.free(&mut shard.gone, hash, now);
        let granted = grant(slot, spec, now);
        map.due_by(now + Duration::from_millis(spec.ttl_ms.into()));
        drop(map);
        self.inner.changed(
            spec.key.as_str(),
            ChangeKind::Acquired,
            granted.fencing_token,
        );
        Ok(AcquireOutcome::Acquired(granted))
    }

    async fn release_and_grant(
        &self,
        key: &LockKey,
        token: &Token,
        kind: Releasing<'_>,
        next: &AcquireSpec,
        _late: impl LateGrant,
    ) -> Result<(bool, Option<Grant>), LockError> {
        let now = Instant::now();
        if next.key != *key || next.mode != Mode::Exclusive {
            return Ok((self.release(key, token, kind).await?, None));
        }
        let handed = {
            let (mut map, hash) = self.inner.locate(key.as_str());
            let shard = &mut *map;
            let handed = shard
                .map
                .get_mut(key.as_str())
                .filter(|slot| {
                    slot.lease
                        .as_ref()
                        .is_some_and(|h| h.token == *token && h.live(now) && may_release(h, kind))
                })
                .map(|slot| {
                    crate::metrics::released_after(slot.fence);
                    slot.free(&mut shard.gone, hash, now);
                    grant(slot, next, now)
                });
            if handed.is_some() {
                map.due_by(now + Duration::from_millis(next.ttl_ms.into()));
            }
            handed
        };
        match handed {
            Some(granted) => {
                self.inner
                    .changed(key.as_str(), ChangeKind::Acquired, granted.fencing_token);
                Ok((true, Some(granted)))
            }
            None => Ok((self.release(key, token, kind).await?, None)),
        }
    }

    async fn release(
        &self,
        key: &LockKey,
        token: &Token,
        kind: Releasing<'_>,
    ) -> Result<bool, LockError> {
        let now = Instant::now();
        let freed = {
            let (mut map, hash) = self.inner.locate(key.as_str());
            let shard = &mut *map;
            match shard.map.get_mut(key.as_str()) {
                Some(slot) => {
                    if kind == Releasing::GiveBack {
                        // A waiting exclusive Acquire that left withdraws
                        // its mark.
                        slot.exclusive_waiting.retain(|(t, _)| t != token);
                    }
                    free_slot(slot, &mut shard.gone, hash, token, kind, now)
                }
                // The slot may be gone (swept) while its released tokens
                // are still remembered.
                None if shard.gone.released(hash, token, now) => Freed::Before,
                None => Freed::No,
            }
        };
        match freed {
            Freed::Now(fence) => {
                crate::metrics::released_after(fence);
                self.inner
                    .changed(key.as_str(), ChangeKind::Released, fence);
                self.inner.waiters.released(key.as_str());
                Ok(true)
            }
            Freed::Expired => {
                self.inner.waiters.released(key.as_str());
                Ok(false)
            }
            // Released before: a retried release; a give-back gave nothing.
            Freed::Before => Ok(kind != Releasing::GiveBack),
            Freed::No => Ok(false),
        }
    }

    async fn renew(
        &self,
        key: &LockKey,
        token: &Token,
        ttl_ms: Option<u32>,
        attachment: Option<&Attachment>,
    ) -> Result<Option<u32>, LockError> {
        let now = Instant::now();
        let mut map = self.inner.shard(key.as_str());
        let Some(held) = map
            .get_mut(key.as_str())
            .and_then(|slot| slot.holder_mut(token, now))
        else {
            return Ok(None);
        };
        if let Some(ttl) = ttl_ms {
            held.ttl_ms = ttl;
        }
        if let Some(att) = attachment {
            if held.attachment.as_ref() != Some(att) {
                held.attachment = Some(att.clone());
            }
        }
        held.expires_at = now + Duration::from_millis(held.ttl_ms.into());
        let (expires_at, ttl_ms) = (held.expires_at, held.ttl_ms);
        // A renewal to a shorter TTL may bring the deadline closer.
        map.due_by(expires_at);
        Ok(Some(ttl_ms))
    }

    async fn describe(&self, key: &LockKey) -> Result<Option<LockInfo>, LockError> {
        let now = Instant::now();
        let map = self.inner.shard(key.as_str());
        Ok(map.get(key.as_str()).and_then(|slot| info_of(slot, now)))
    }

    async fn changes(&self, key: &LockKey) -> Result<broadcast::Receiver<Change>, LockError> {
        Ok(self.inner.changes.subscribe(key.as_str()))
    }

    async fn list(
        &self,
        prefix: &str,
        size: usize,
        page: Option<&str>,
    ) -> Result<ListPage, LockError> {
        // Pages are in key order, each after the last key of the one
        // before: stable whatever changes in between.
        let after = page.map(parse_page).transpose()?;
        let now = Instant::now();
        let mut locks = Vec::new();
        for shard in self.inner.shards.iter() {
            let map = shard.lock().unwrap_or_else(|e| e.into_inner());
            for (key, slot) in map.iter() {
                if !key.starts_with(prefix) || after.as_ref().is_some_and(|a| key <= a) {
                    continue;
                }
                if let Some(info) = info_of(slot, now) {
                    locks.push((key.clone(), info));
                }
            }
        }
        locks.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let more = locks.len() > size;
        locks.truncate(size);
        let next = more
            .then(|| locks.last().map(|(k, _)| hex::encode(k)))
            .flatten();
        let locks = locks
            .into_iter()
            .filter_map(|(k, info)| LockKey::parse(k, usize::MAX).ok().map(|k| (k, info)))
            .collect();
        Ok(ListPage { locks, next })
    }

    async fn force_release(&self, key: &LockKey) -> Result<Option<Forced>, LockError> {
        let now = Instant::now();
        // Not into `gone`: the holder's own Release then answers false.
        let taken = {
            let mut map = self.inner.shard(key.as_str());
            map.get_mut(key.as_str()).and_then(|slot| {
                if let Some(held) = slot.lease.take() {
                    return Some((u32::from(held.live(now)), slot.fence));
                }
                // Shared holders: every one of them is taken.
                let shared = std::mem::take(&mut slot.shared);
                let live = shared.iter().filter(|h| h.live(now)).count();
                (!shared.is_empty())
                    .then_some((u32::try_from(live).unwrap_or(u32::MAX), slot.fence))
            })
        };
        // An expired lease not swept yet is taken too: its waiters wake now.
        if let Some((live, fence)) = taken {
            if live > 0 {
                self.inner
                    .changed(key.as_str(), ChangeKind::ForceReleased, fence);
            }
            self.inner.waiters.released(key.as_str());
        }
        Ok(taken
            .filter(|(live, _)| *live > 0)
            .map(|(holders, fence)| Forced { fence, holders }))
    }

    async fn watch(&self, _key: &LockKey) -> Result<(), LockError> {
        // Releases are delivered in-process; nothing to subscribe to.
        Ok(())
    }

    async fn ping(&self) -> Result<(), LockError> {
        Ok(())
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records when each key was reported free.
    #[derive(Debug, Default)]
    struct Freed(Mutex<Vec<(String, Instant)>>);

    impl ReleaseListener for Freed {
        fn released(&self, key: &str) {
            let mut freed = self.0.lock().unwrap_or_else(|e| e.into_inner());
            freed.push((key.to_owned(), Instant::now()));
        }
        fn has_waiters(&self, _key: &str) -> bool {
            true
        }
    }

    fn spec(key: &str, ttl_ms: u32) -> AcquireSpec {
        AcquireSpec {
            key: LockKey::parse(key, 512).expect("a valid key"),
            token: Token::generate(),
            ttl_ms,
            owner: String::new(),
            metadata: Metadata::default(),
            request_id: None,
            mode: Mode::Exclusive,
            waiting: false,
        }
    }

    /// Waits (bounded) until `key` is reported free; when.
    async fn freed_at(freed: &Freed, key: &str) -> Instant {
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            let at = freed
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, at)| *at);
            if let Some(at) = at {
                return at;
            }
            assert!(Instant::now() < end, "{key} never reported free");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The sweeper visits a shard only once a lease in it may have run
    /// out, so it must know each lease's deadline: an expiry is reported
    /// within a sweep or two of the TTL (not at the next sweep of every
    /// shard, up to 2 s later), also after a renewal brought it closer.
    #[tokio::test]
    async fn expiries_are_reported_within_a_sweep_of_the_deadline() {
        let freed = Arc::new(Freed::default());
        let store = MemoryStore::new(freed.clone());
        // Past the first sweep, which sweeps every shard.
        tokio::time::sleep(SWEEP_EVERY).await;

        let start = Instant::now();
        let granted = store.acquire(&spec("short", 300), |_| {}).await;
        assert!(matches!(granted, Ok(AcquireOutcome::Acquired(_))));
        let after = freed_at(&freed, "short").await - start;
        assert!(
            after >= Duration::from_millis(300) && after < Duration::from_millis(1_000),
            "a 300 ms lease reported free after {after:?}"
        );

        let long = spec("shortened", 60_000);
        let start = Instant::now();
        assert!(matches!(
            store.acquire(&long, |_| {}).await,
            Ok(AcquireOutcome::Acquired(_))
        ));
        let renewed = store.renew(&long.key, &long.token, Some(300), None).await;
        assert_eq!(renewed, Ok(Some(300)));
        let after = freed_at(&freed, "shortened").await - start;
        assert!(
            after >= Duration::from_millis(300) && after < Duration::from_millis(1_000),
            "a lease renewed to 300 ms reported free after {after:?}"
        );
    }

    /// A busy key's released tokens: each is remembered until its lease
    /// would have expired, and the map does not grow with releases whose
    /// time has passed (it is pruned as it doubles, not at every release).
    #[test]
    fn released_tokens_are_remembered_and_pruned() {
        let start = Instant::now();
        let mut gone = Gone::default();
        let long = Token::generate();
        gone.remember(7, long.clone(), start + Duration::from_secs(3_600), start);
        for i in 0..10_000u64 {
            let now = start + Duration::from_millis(i);
            gone.remember(7, Token::generate(), now + Duration::from_micros(500), now);
            assert!(
                gone.tokens.len() <= 2 * GONE_PRUNE_MIN,
                "{} at {i}",
                gone.tokens.len()
            );
        }
        let now = start + Duration::from_secs(10);
        assert!(gone.released(7, &long, now));
        assert!(!gone.released(7, &Token::generate(), now));
        // Remembered for its key only.
        assert!(!gone.released(8, &long, now));
        // Gone once its time is up, whether or not pruned yet.
        assert!(!gone.released(7, &long, start + Duration::from_secs(3_601)));
    }

    /// A released token outlives its key's slot: once the sweeper has
    /// dropped the slot (nothing held, fencing counter behind the clock),
    /// a retried Release still answers true, and the token presented with
    /// another key in the same shard still answers false.
    #[tokio::test]
    async fn a_retried_release_after_the_slot_is_swept_says_released() {
        let store = MemoryStore::new(Arc::new(Freed::default()));
        let first = spec("swept", 60_000);
        assert!(matches!(
            store.acquire(&first, |_| {}).await,
            Ok(AcquireOutcome::Acquired(_))
        ));
        let release = |key: LockKey| {
            let (store, token) = (&store, first.token.clone());
            async move { store.release(&key, &token, Releasing::Holder).await }
        };
        assert_eq!(release(first.key.clone()).await, Ok(true));
        // What the sweeper does to a slot with nothing left to keep.
        let removed = store.inner.shard("swept").map.remove("swept");
        assert!(removed.is_some(), "the slot was there to drop");
        assert_eq!(release(first.key.clone()).await, Ok(true));
        let shard_of = |k: &str| store.inner.index(k).0;
        let other = (0..10_000)
            .map(|i| format!("other-{i}"))
            .find(|k| shard_of(k) == shard_of("swept"))
            .expect("a key in the same shard");
        let other = LockKey::parse(other, 512).expect("a valid key");
        assert_eq!(release(other).await, Ok(false));
    }
}
