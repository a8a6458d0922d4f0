//! The AdminService from the SDK: list locks by key prefix, and take a
//! lock from its holder. Both need a server that serves the AdminService
//! (an auth file with an `admin = true` tenant, or `--admin`) and answer
//! PERMISSION_DENIED to anyone else.

use std::time::Duration;

use tonic::Request;

use super::guard::LockInfo;
use super::{Client, Error};
use crate::pb;
use crate::pb::admin_service_client::AdminServiceClient;

/// One page of [`Client::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPage {
    /// Held locks: each key and who holds it (never a token).
    pub locks: Vec<(String, LockInfo)>,
    /// Hand back to [`Client::list`] for the next page; `None` after the
    /// last one. A page may be short, even empty, and still have a next.
    pub next_page_token: Option<String>,
}

impl Client {
    /// Held locks whose key starts with `prefix`, about `page_size` a page
    /// (0: the server's default, 100), from `page_token` (`None`: the
    /// first page). Only keys in the caller's scopes are shown.
    pub async fn list(
        &self,
        prefix: &str,
        page_size: u32,
        page_token: Option<&str>,
    ) -> Result<ListPage, Error> {
        let request = pb::ListRequest {
            prefix: prefix.to_owned(),
            page_size,
            page_token: page_token.unwrap_or_default().to_owned(),
        };
        self.inner
            .transport
            .unary_on(AdminServiceClient::new, |mut c, timeout| {
                let mut request = Request::new(request.clone());
                request.set_timeout(timeout);
                async move { c.list(request).await.map(|r| page_of(r.into_inner())) }
            })
            .await
    }

    /// Takes `key` from its holder now, whatever its token; `reason` is
    /// logged by the server with the caller's name. How many holders were
    /// removed (0: nobody held it).
    pub async fn force_release(&self, key: &str, reason: &str) -> Result<u32, Error> {
        let request = pb::ForceReleaseRequest {
            key: key.to_owned(),
            reason: reason.to_owned(),
        };
        self.inner
            .transport
            .unary_on(AdminServiceClient::new, |mut c, timeout| {
                let mut request = Request::new(request.clone());
                request.set_timeout(timeout);
                async move {
                    c.force_release(request)
                        .await
                        .map(|r| r.into_inner().released)
                }
            })
            .await
    }
}

fn page_of(reply: pb::ListResponse) -> ListPage {
    ListPage {
        locks: reply
            .locks
            .into_iter()
            .filter_map(|lock| Some((lock.key, info_of(lock.state?)?)))
            .collect(),
        next_page_token: (!reply.next_page_token.is_empty()).then_some(reply.next_page_token),
    }
}

/// Who holds a lock, from a DescribeResponse (`None`: free).
pub(super) fn info_of(r: pb::DescribeResponse) -> Option<LockInfo> {
    r.held.then(|| LockInfo {
        owner: r.owner,
        fencing_token: r.fencing_token,
        ttl_remaining: Duration::from_millis(r.ttl_ms.into()),
        metadata: r.metadata,
    })
}
