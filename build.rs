//! Compiles the proto with protox (pure Rust, so no `protoc` is needed on the
//! machine), writes the descriptor set that server reflection serves, and
//! generates the canonical proto3 JSON mapping of the messages (pbjson) for
//! the Connect protocol's `application/json`.

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/leasehold/v1/lock.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let descriptors = fds.encode_to_vec();
    fs::write(out.join("leasehold_descriptor.bin"), &descriptors)?;
    // serde impls from the same descriptors: camelCase written, camelCase
    // and snake_case read, 64-bit integers as strings, unknown fields an
    // error. Fields are written even when they hold their default, so that
    // `"acquired": false` is there for a shell script to read.
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)?
        .emit_fields()
        .build(&[".leasehold.v1"])?;
    tonic_prost_build::configure()
        // Small starting buffers: see src/codec.rs.
        .codec_path("crate::codec::CompactCodec")
        // Messages that carry a lock token get a hand-written Debug in
        // src/pb.rs that redacts it, so a stray `{:?}` never leaks a token.
        .skip_debug([
            ".leasehold.v1.Lease",
            ".leasehold.v1.ReleaseRequest",
            ".leasehold.v1.RenewRequest",
            ".leasehold.v1.KeepAliveRequest",
        ])
        .compile_fds(fds)?;
    Ok(())
}
