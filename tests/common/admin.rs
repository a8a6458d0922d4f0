//! Servers and requests the AdminService tests share (`tests/admin.rs`,
//! `tests/admin_cli.rs`).

#![allow(dead_code)]

use std::sync::Arc;

use leasehold::auth::{Authenticator, Policy};
use leasehold::pb;
use leasehold::pb::admin_service_client::AdminServiceClient;
use leasehold::server::ServerConfig;
use tonic::Request;
use tonic::transport::Channel;

use super::{Backend, TestServer, test_config};

/// A server that serves the AdminService without authentication.
pub async fn admin_server(backend: Backend) -> TestServer {
    let config = ServerConfig {
        admin: true,
        ..test_config()
    };
    TestServer::start_with(backend, config).await
}

pub async fn admin_client(server: &TestServer) -> AdminServiceClient<Channel> {
    AdminServiceClient::connect(server.endpoint())
        .await
        .expect("connect")
}

pub fn list_req(prefix: &str, page_size: u32, page_token: &str) -> pb::ListRequest {
    pb::ListRequest {
        prefix: prefix.into(),
        page_size,
        page_token: page_token.into(),
    }
}

pub fn force(key: &str, reason: &str) -> pb::ForceReleaseRequest {
    pb::ForceReleaseRequest {
        key: key.into(),
        reason: reason.into(),
    }
}

pub const OPS: &str = "ops-admin-token-5e4d3c2b1a09";
pub const OPS_A: &str = "ops-a-admin-token-77665544";
pub const USER: &str = "team-a-user-token-1f9e8d7c6b5a";

pub async fn auth_server() -> TestServer {
    let policy = Policy::parse(&format!(
        r#"
[[tenant]]
name = "ops"
prefixes = [""]
tokens = ["{OPS}"]
admin = true

[[tenant]]
name = "ops-a"
prefixes = ["team-a/"]
tokens = ["{OPS_A}"]
admin = true

[[tenant]]
name = "team-a"
prefixes = ["team-a/"]
tokens = ["{USER}"]
"#
    ))
    .expect("policy");
    let config = ServerConfig {
        auth: Some(Arc::new(Authenticator::new(policy, false))),
        ..test_config()
    };
    TestServer::start_with(Backend::Memory, config).await
}

pub fn req<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    request
}
