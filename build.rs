//! Compiles the proto with protox (pure Rust, so no `protoc` is needed on the
//! machine) and writes the descriptor set that server reflection serves.

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/leasehold/v1/lock.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("leasehold_descriptor.bin"), fds.encode_to_vec())?;
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
