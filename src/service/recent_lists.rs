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
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// The pages kept; see the module docs.
#[derive(Default)]
pub struct RecentLists {
    pages: Mutex<HashMap<Query, (Instant, Arc<ListPage>)>>,
}

impl RecentLists {
    /// The max age a request asks for with [`MAX_AGE_HEADER`], if any.
    pub fn max_age(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
        let ms: u64 = metadata.get(MAX_AGE_HEADER)?.to_str().ok()?.parse().ok()?;
        Some(Duration::from_millis(ms).min(MAX_AGE_LIMIT)).filter(|d| !d.is_zero())
    }

    /// A page for `query` at most `max_age` old, its TTLs aged.
    pub fn get(&self, query: &Query, max_age: Duration) -> Option<ListPage> {
        let (at, page) = {
            let pages = self.pages.lock().unwrap_or_else(|e| e.into_inner());
            let (at, page) = pages.get(query)?;
            (*at, page.clone())
        };
        let age = at.elapsed();
        (age <= max_age).then(|| aged(&page, age))
    }

    /// Keeps `page` as the answer to `query` from now on.
    pub fn put(&self, query: Query, page: &ListPage) {
        let page = Arc::new(page.clone());
        let mut pages = self.pages.lock().unwrap_or_else(|e| e.into_inner());
        pages.retain(|_, (at, _)| at.elapsed() <= MAX_AGE_LIMIT);
        if pages.len() < MAX_QUERIES || pages.contains_key(&query) {
            pages.insert(query, (Instant::now(), page));
        }
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

    #[test]
    fn ages_and_expires() {
        let aged = aged(&page(&[50, 1000]), Duration::from_millis(100));
        assert_eq!(aged.locks.len(), 1, "the 50 ms lock is gone by now");
        assert_eq!(aged.locks[0].1.holders[0].ttl_ms, 900);

        let recent = RecentLists::default();
        let query: Query = ("".into(), 1000, None);
        assert!(recent.get(&query, MAX_AGE_LIMIT).is_none());
        recent.put(query.clone(), &page(&[5000]));
        let got = recent.get(&query, MAX_AGE_LIMIT).expect("kept");
        assert!(got.locks[0].1.holders[0].ttl_ms <= 5000);
        assert!(
            recent
                .get(&("x".into(), 1000, None), MAX_AGE_LIMIT)
                .is_none()
        );
        // Bounded: a query past the cap is not kept.
        for i in 0..MAX_QUERIES {
            recent.put((format!("p{i}"), 1, None), &page(&[]));
        }
        assert!(recent.pages.lock().expect("lock").len() <= MAX_QUERIES);
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
