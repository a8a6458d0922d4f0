//! Recent List pages, for callers that accept an answer a little old: a
//! List call with the `leasehold-list-max-age-ms` header (at most 1 s) may
//! be answered from a page the store gave for the same query that long ago,
//! its TTLs counted down by its age. The web dashboard polls List every
//! 500 ms from every open page; without this, each poll would read the
//! whole prefix from the store (on Redis, SCANs through the keyspace, free
//! locks' fencing counters included), and a hundred open pages cost the
//! lock path most of its throughput (documentation/benchmarks.md).
//!
//! Pages are kept per store query (prefix after scope narrowing, page size,
//! page token), before the caller's scope filter, so sharing one between
//! callers shows none of them anything it would not see. A call without
//! the header is never answered from here. This module owns only the kept
//! pages; it must not call the store.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::lock::LockError;
use crate::store::ListPage;

/// The request header (gRPC metadata) that asks for a page at most this
/// many milliseconds old.
pub const MAX_AGE_HEADER: &str = "leasehold-list-max-age-ms";

/// The oldest page ever served, whatever the header says.
pub const MAX_AGE_LIMIT: Duration = Duration::from_secs(1);

/// Queries kept at once: a few dashboards' prefixes. Pages hold up to 1000
/// locks with their metadata, so the memory is bounded here.
const MAX_QUERIES: usize = 16;

/// One store query: narrowed prefix, page size, page token.
pub type Query = (String, usize, Option<String>);

/// One read of the store for a query: under way while the cell is empty
/// (callers join it rather than start their own), then its page and the
/// moment the read began.
#[derive(Default)]
struct Read {
    cell: tokio::sync::OnceCell<(Instant, Arc<ListPage>)>,
}

impl Read {
    /// Under way, or done at most `max_age` ago.
    fn fresh(&self, max_age: Duration) -> bool {
        self.cell
            .get()
            .is_none_or(|(at, _)| at.elapsed() <= max_age)
    }
}

/// The pages kept; see the module docs.
#[derive(Default)]
pub struct RecentLists {
    reads: Mutex<HashMap<Query, Arc<Read>>>,
}

impl RecentLists {
    /// The max age a request asks for with [`MAX_AGE_HEADER`], if any.
    pub fn max_age(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
        let ms: u64 = metadata.get(MAX_AGE_HEADER)?.to_str().ok()?.parse().ok()?;
        Some(Duration::from_millis(ms).min(MAX_AGE_LIMIT)).filter(|d| !d.is_zero())
    }

    /// The page for `query`: one read at most `max_age` old, or the read
    /// already under way, or else a new one made with `read`. Errors are
    /// never kept: the next caller reads again. A page comes back with its
    /// TTLs aged since its read began.
    pub async fn get_or_read<F, Fut>(
        &self,
        query: Query,
        max_age: Duration,
        read: F,
    ) -> Result<ListPage, LockError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<ListPage, LockError>>,
    {
        let shared = {
            let mut reads = self.reads.lock().unwrap_or_else(|e| e.into_inner());
            match reads.get(&query) {
                Some(r) if r.fresh(max_age) => Some(r.clone()),
                _ => {
                    reads.retain(|_, r| r.fresh(MAX_AGE_LIMIT));
                    (reads.len() < MAX_QUERIES).then(|| {
                        let r = Arc::new(Read::default());
                        reads.insert(query, r.clone());
                        r
                    })
                }
            }
        };
        // Past the cap: this caller reads for itself, nothing kept.
        let Some(shared) = shared else {
            return read().await;
        };
        let (at, page) = shared
            .cell
            .get_or_try_init(|| async {
                let at = Instant::now();
                read().await.map(|page| (at, Arc::new(page)))
            })
            .await?;
        Ok(aged(page, at.elapsed()))
    }
}

/// `page` as it stands `age` later: every TTL shorter by `age`, holders
/// whose TTL ran out dropped, and locks left with none.
fn aged(page: &ListPage, age: Duration) -> ListPage {
    let age_ms = u32::try_from(age.as_millis()).unwrap_or(u32::MAX);
    let locks = page
        .locks
        .iter()
        .filter_map(|(key, info)| {
            let mut info = info.clone();
            info.holders.retain(|h| h.ttl_ms > age_ms);
            for h in &mut info.holders {
                h.ttl_ms -= age_ms;
            }
            (!info.holders.is_empty()).then(|| (key.clone(), info))
        })
        .collect();
    ListPage {
        locks,
        next: page.next.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock::{HolderInfo, LockInfo, LockKey, Mode};

    fn page(ttls: &[u32]) -> ListPage {
        let locks = ttls
            .iter()
            .enumerate()
            .map(|(i, ttl)| {
                let key = LockKey::parse(format!("k{i}"), 512).expect("key");
                let info = LockInfo {
                    mode: Mode::Exclusive,
                    holders: vec![HolderInfo {
                        owner: "o".into(),
                        fencing_token: 1,
                        ttl_ms: *ttl,
                        metadata: Default::default(),
                    }],
                };
                (key, info)
            })
            .collect();
        ListPage { locks, next: None }
    }

    #[tokio::test]
    async fn ages_shares_and_expires() {
        let aged = aged(&page(&[50, 1000]), Duration::from_millis(100));
        assert_eq!(aged.locks.len(), 1, "the 50 ms lock is gone by now");
        assert_eq!(aged.locks[0].1.holders[0].ttl_ms, 900);

        let recent = RecentLists::default();
        let query: Query = ("".into(), 1000, None);
        let reads = std::sync::atomic::AtomicUsize::new(0);
        let read = |ttl| {
            reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move { Ok(page(&[ttl])) }
        };
        let first = recent
            .get_or_read(query.clone(), MAX_AGE_LIMIT, || read(5000))
            .await
            .expect("read");
        let again = recent
            .get_or_read(query.clone(), MAX_AGE_LIMIT, || read(7000))
            .await
            .expect("kept");
        assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(again.locks[0].1.holders[0].ttl_ms <= first.locks[0].1.holders[0].ttl_ms);
        // Another query reads; an error is not kept.
        let other: Query = ("x".into(), 1000, None);
        let failed = recent
            .get_or_read(other.clone(), MAX_AGE_LIMIT, || async {
                Err(LockError::Internal("down".into()))
            })
            .await;
        assert!(failed.is_err());
        let ok = recent
            .get_or_read(other, MAX_AGE_LIMIT, || read(3000))
            .await
            .expect("read again");
        assert_eq!(ok.locks[0].1.holders[0].ttl_ms, 3000);
        assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), 2);
        // Bounded: past the cap nothing more is kept.
        for i in 0..2 * MAX_QUERIES {
            let q: Query = (format!("p{i}"), 1, None);
            recent
                .get_or_read(q, MAX_AGE_LIMIT, || async { Ok(page(&[])) })
                .await
                .expect("read");
        }
        assert!(recent.reads.lock().expect("lock").len() <= MAX_QUERIES);
    }

    #[test]
    fn header_is_bounded() {
        let mut md = tonic::metadata::MetadataMap::new();
        assert_eq!(RecentLists::max_age(&md), None);
        md.insert(MAX_AGE_HEADER, "200".parse().expect("ascii"));
        assert_eq!(RecentLists::max_age(&md), Some(Duration::from_millis(200)));
        md.insert(MAX_AGE_HEADER, "999999".parse().expect("ascii"));
        assert_eq!(RecentLists::max_age(&md), Some(MAX_AGE_LIMIT));
        md.insert(MAX_AGE_HEADER, "0".parse().expect("ascii"));
        assert_eq!(RecentLists::max_age(&md), None);
    }
}
