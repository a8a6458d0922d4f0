//! The gRPC floor: a bare tonic server answering Acquire and Release from
//! a HashMap, nothing else. It measures what the transport alone costs on
//! this machine, so Leasehold's numbers can be quoted as a ratio to it.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Mutex;

use tokio::net::TcpListener;
use tokio_stream::Stream;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

use crate::pb;
use crate::pb::lock_service_server::{LockService, LockServiceServer};

/// Lock table of the floor server: key -> token.
#[derive(Default)]
pub struct Floor {
    locks: Mutex<HashMap<String, String>>,
}

#[tonic::async_trait]
impl LockService for Floor {
    async fn acquire(
        &self,
        request: Request<pb::AcquireRequest>,
    ) -> Result<Response<pb::AcquireResponse>, Status> {
        let req = request.into_inner();
        let token = hex::encode(rand::random::<[u8; 16]>());
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        if locks.contains_key(&req.key) {
            return Ok(Response::new(pb::AcquireResponse {
                acquired: false,
                lease: None,
                retry_after_ms: 1,
            }));
        }
        locks.insert(req.key.clone(), token.clone());
        Ok(Response::new(pb::AcquireResponse {
            acquired: true,
            lease: Some(pb::Lease {
                key: req.key,
                token,
                fencing_token: 1,
                ttl_ms: req.ttl_ms,
                valid_for_ms: 0,
            }),
            retry_after_ms: 0,
        }))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let req = request.into_inner();
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        let released = locks.get(&req.key) == Some(&req.token);
        if released {
            locks.remove(&req.key);
        }
        Ok(Response::new(pb::ReleaseResponse { released }))
    }

    async fn renew(
        &self,
        _: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        Err(Status::unimplemented("floor server"))
    }

    type KeepAliveStream =
        Pin<Box<dyn Stream<Item = Result<pb::KeepAliveResponse, Status>> + Send>>;

    async fn keep_alive(
        &self,
        _: Request<Streaming<pb::KeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        Err(Status::unimplemented("floor server"))
    }

    async fn describe(
        &self,
        _: Request<pb::DescribeRequest>,
    ) -> Result<Response<pb::DescribeResponse>, Status> {
        Err(Status::unimplemented("floor server"))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

    async fn watch(
        &self,
        _: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("floor server"))
    }
}

/// Serves the floor on `listener` until the process is killed.
pub async fn serve(listener: TcpListener) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(LockServiceServer::new(Floor::default()))
        .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
        .await
}
