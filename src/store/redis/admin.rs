//! What operators do (AdminService): list locks by key prefix, a `SCAN`
//! per primary, and take a lock from its holder (`scripts/force.lua`).
//! Nothing here is on the lock path.

use crate::store::Forced;
use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand};
use futures_util::future::join_all;

use super::RedisStore;
use super::call::bounded;
use super::names::{key_of_lock, lock_pattern};
use super::replies::{array, int, text, unexpected};
use crate::lock::{LockError, LockKey};
use crate::store::{ListPage, LockStore};

/// SCAN calls one page may make before it answers, possibly short: a
/// page costs Redis a bounded amount of work however sparse the matches.
const MAX_SCANS_PER_PAGE: usize = 64;

/// Where a listing stands: the index of a primary (in address order) and
/// that primary's SCAN cursor. Written `<node>.<cursor>` in page tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Position {
    node: usize,
    cursor: String,
}

impl Position {
    fn parse(token: &str) -> Result<Self, LockError> {
        let bad = || LockError::invalid("page_token", "not a page token of this server");
        let (node, cursor) = token.split_once('.').ok_or_else(bad)?;
        let node = node.parse().map_err(|_| bad())?;
        if cursor.is_empty() || !cursor.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        Ok(Self {
            node,
            cursor: cursor.to_owned(),
        })
    }

    fn token(&self) -> String {
        format!("{}.{}", self.node, self.cursor)
    }
}

impl RedisStore {
    /// Clients of every primary in address order (one on a single node or
    /// Sentinel), so that page tokens name the same node on every page.
    async fn scan_nodes(&self) -> Result<Vec<Client>, LockError> {
        let Some(mut primaries) = self.route.primaries() else {
            return Ok(vec![self.route.client(0).await?]);
        };
        if primaries.is_empty() {
            return Err(LockError::Unavailable(
                "no Redis Cluster primary known yet".into(),
            ));
        }
        primaries.sort_by_key(|(server, _)| server.to_string());
        primaries
            .into_iter()
            .map(|(server, pool)| {
                pool.map(|p| p.next_connected().clone())
                    .filter(|c| c.is_connected())
                    .ok_or_else(|| {
                        LockError::Unavailable(format!("not connected to the primary {server}"))
                    })
            })
            .collect()
    }

    /// One `SCAN` on `client`: the next cursor and the lock keys found.
    async fn scan(
        &self,
        client: &Client,
        cursor: &str,
        pattern: &str,
        count: usize,
    ) -> Result<(String, Vec<LockKey>), LockError> {
        let cmd = CustomCommand::new_static("SCAN", ClusterHash::Random, false);
        let args: Vec<Value> = vec![
            cursor.into(),
            "MATCH".into(),
            pattern.into(),
            "COUNT".into(),
            (count as i64).into(),
        ];
        let reply: Value = bounded(self.timeout, client.custom(cmd, args)).await?;
        let mut items = array(reply)?.into_iter();
        let (Some(next), Some(names)) = (items.next(), items.next()) else {
            return Err(LockError::Internal("malformed SCAN reply".into()));
        };
        let next = text(&next).ok_or_else(|| unexpected(&next))?;
        let keys = array(names)?
            .iter()
            .filter_map(text)
            .filter_map(|name| key_of_lock(&self.prefix, &name))
            .filter_map(|key| LockKey::parse(key, usize::MAX).ok())
            .collect();
        Ok((next, keys))
    }

    /// [`LockStore::list`]: SCAN the primaries one after the other, from
    /// where the page token says, then describe what was found (each
    /// describe on its own lock's node; a released record is skipped).
    pub(super) async fn list_page(
        &self,
        prefix: &str,
        size: usize,
        page: Option<&str>,
    ) -> Result<ListPage, LockError> {
        let mut at = match page {
            Some(token) => Position::parse(token)?,
            None => Position {
                node: 0,
                cursor: "0".into(),
            },
        };
        let nodes = self.scan_nodes().await?;
        if at.node >= nodes.len() {
            return Err(LockError::invalid(
                "page_token",
                "names a Redis node this cluster no longer has; start the listing again",
            ));
        }
        let pattern = lock_pattern(&self.prefix, prefix);
        let mut found = Vec::new();
        for _ in 0..MAX_SCANS_PER_PAGE {
            let Some(client) = nodes.get(at.node) else {
                break;
            };
            let count = size.saturating_sub(found.len()).max(10);
            let (next, keys) = self.scan(client, &at.cursor, &pattern, count).await?;
            found.extend(keys.into_iter().filter(|k| k.as_str().starts_with(prefix)));
            at.cursor = next;
            if at.cursor == "0" {
                at.node += 1;
            }
            if found.len() >= size {
                break;
            }
        }
        let next = (at.node < nodes.len()).then(|| at.token());
        let described = join_all(found.iter().map(|key| self.describe(key))).await;
        let mut locks = Vec::with_capacity(found.len());
        for (key, info) in found.into_iter().zip(described) {
            if let Some(info) = info? {
                locks.push((key, info));
            }
        }
        Ok(ListPage { locks, next })
    }

    /// [`LockStore::force_release`]; waiters on this server wake at once.
    pub(super) async fn force(&self, key: &LockKey) -> Result<Option<Forced>, LockError> {
        let n = self.names(key);
        let reply = self
            .eval(&self.scripts.force, vec![n.lock], vec![n.channel])
            .await?;
        // {fence, holders}, or {0, 0} when nobody held the lock.
        let parts = array(reply.clone())?;
        let (Some(fence), Some(holders)) =
            (parts.first().and_then(int), parts.get(1).and_then(int))
        else {
            return Err(unexpected(&reply));
        };
        if fence <= 0 {
            return Ok(None);
        }
        self.subscriptions.released_here(key.as_str(), -fence);
        Ok(u64::try_from(fence).ok().map(|fence| Forced {
            fence,
            holders: u32::try_from(holders).unwrap_or(1).max(1),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_refuse_garbage() {
        let p = Position {
            node: 2,
            cursor: "12345".into(),
        };
        assert_eq!(Position::parse(&p.token()).unwrap(), p);
        for bad in ["", "x", "1.", ".5", "a.5", "1.5x", "-1.5"] {
            assert_eq!(
                Position::parse(bad).unwrap_err().code(),
                tonic::Code::InvalidArgument,
                "{bad}"
            );
        }
    }
}
