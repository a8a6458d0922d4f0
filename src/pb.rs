//! Generated protobuf and gRPC code for `leasehold.v1`, and the descriptor
//! set served by reflection. Nothing else lives here: conversions to domain
//! types are in `service::convert`.

#![allow(missing_docs, clippy::all)]

use std::fmt;

tonic::include_proto!("leasehold.v1");

/// The encoded `FileDescriptorSet` of our proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/leasehold_descriptor.bin"));

/// Fully qualified name of the lock service, as health checks know it.
pub const SERVICE_NAME: &str = "leasehold.v1.LockService";

// Messages carrying a lock token: Debug by hand, token redacted.

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.key)
            .field("token", &"<redacted>")
            .field("fencing_token", &self.fencing_token)
            .field("ttl_ms", &self.ttl_ms)
            .finish()
    }
}

impl fmt::Debug for ReleaseRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReleaseRequest")
            .field("key", &self.key)
            .field("token", &"<redacted>")
            .finish()
    }
}

impl fmt::Debug for RenewRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RenewRequest")
            .field("key", &self.key)
            .field("token", &"<redacted>")
            .field("ttl_ms", &self.ttl_ms)
            .finish()
    }
}

impl fmt::Debug for KeepAliveRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeepAliveRequest")
            .field("key", &self.key)
            .field("token", &"<redacted>")
            .field("ttl_ms", &self.ttl_ms)
            .field("release", &self.release)
            .finish()
    }
}
