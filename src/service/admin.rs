//! `leasehold.v1.AdminService`: what an operator does when a lock seems
//! stuck. List shows held locks by key prefix, only those in the caller's
//! scopes; ForceRelease takes a lock from its holder, logged at WARN with
//! the key, the reason and the caller (never a token) and counted. Both
//! need the admin grant; without authentication the server serves this
//! service only under `--admin` (documentation/security.md).

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};

use super::recent_lists::RecentLists;
use super::{convert, log_result, rejected};
use crate::auth::Access;
use crate::lock::Limits;
use crate::pb;
use crate::store::LockStore;

/// The AdminService over any store.
pub struct AdminServiceImpl<S> {
    store: Arc<S>,
    limits: Limits,
    /// Pages for List calls that accept a slightly old one (dashboards).
    recent: RecentLists,
}

impl<S: LockStore> AdminServiceImpl<S> {
    /// The service over `store`, with the lock service's field limits.
    pub fn new(store: Arc<S>, limits: Limits) -> Self {
        Self {
            store,
            limits,
            recent: RecentLists::default(),
        }
    }
}

/// The caller's access, checked for the admin grant.
fn admin(rpc: &'static str, start: Instant, ext: &http::Extensions) -> Result<Access, Status> {
    let access = Access::of(ext).map_err(|e| rejected(rpc, start, e))?;
    access.authorize_admin().map_err(|e| {
        tracing::info!(
            rpc,
            tenant = access.tenant(),
            "admin call refused: no admin grant"
        );
        rejected(rpc, start, e)
    })?;
    Ok(access)
}

#[tonic::async_trait]
impl<S: LockStore> pb::admin_service_server::AdminService for AdminServiceImpl<S> {
    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let start = Instant::now();
        let access = admin("List", start, request.extensions())?;
        let max_age = RecentLists::max_age(request.metadata());
        let call = convert::list_request(request.into_inner(), &self.limits)
            .map_err(|e| rejected("List", start, e))?;
        let Some(prefix) = access.list_prefix(&call.prefix) else {
            // No key this caller may see starts with the prefix.
            crate::metrics::rpc("List", "listed", start.elapsed());
            return Ok(Response::new(pb::ListResponse::default()));
        };
        let store = self.store.clone();
        let (size, token) = (call.page_size, call.page_token.clone());
        let result = match max_age {
            Some(age) => {
                let query = (prefix.clone(), size, token.clone());
                self.recent
                    .get_or_read(query, age, || async move {
                        store.list(&prefix, size, token.as_deref()).await
                    })
                    .await
            }
            None => store.list(&prefix, size, token.as_deref()).await,
        };
        log_result("List", &call.prefix, start, &result, |_| "listed");
        let mut page = result?;
        // Keys outside the caller's scopes are skipped, not refused: a
        // page may come back short, and the listing goes on.
        page.locks.retain(|(key, _)| access.permits(key));
        Ok(Response::new(convert::list_response(page)))
    }

    async fn force_release(
        &self,
        request: Request<pb::ForceReleaseRequest>,
    ) -> Result<Response<pb::ForceReleaseResponse>, Status> {
        let start = Instant::now();
        let peer = request.remote_addr();
        let access = admin("ForceRelease", start, request.extensions())?;
        let (key, reason) = convert::force_release_request(request.into_inner(), &self.limits)
            .and_then(|(key, reason)| access.authorize(&key).map(|()| (key, reason)))
            .map_err(|e| rejected("ForceRelease", start, e))?;
        let result = self.store.force_release(&key).await;
        log_result("ForceRelease", key.as_str(), start, &result, |f| {
            if f.is_some() { "released" } else { "not_held" }
        });
        let forced = result?;
        let fence = forced.map(|f| f.fence);
        // The audit trail: who took which lock, and why. The token of the
        // grant taken is never known here; its fencing token is.
        tracing::warn!(
            key = key.as_str(),
            reason = reason.as_str(),
            tenant = access.tenant().unwrap_or("(no auth)"),
            peer = ?peer,
            fencing_token = fence,
            released = fence.is_some(),
            "lock force-released by an operator"
        );
        crate::metrics::force_release(fence.is_some());
        Ok(Response::new(convert::force_release_response(forced)))
    }
}
