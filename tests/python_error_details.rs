//! Rich error details as a Python gRPC client reads them: grpcio calls the
//! real `leasehold serve` with a TTL below the minimum, and
//! `grpc_status.rpc_status.from_call` decodes `google.rpc.BadRequest` and
//! `ErrorInfo` from the status (`grpc-status-details-bin`).
//!
//! Needs python3 with grpcio and grpcio-status (`./test.sh` installs them).

mod common;

use std::process::Command;

use common::ServerProcess;
use leasehold::pb;
use prost::Message;

/// Calls Acquire with the request bytes in argv[2] (hex) on argv[1], and
/// prints what the status details say, one `name value` per line.
const SCRIPT: &str = r#"
import sys
import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

channel = grpc.insecure_channel(sys.argv[1])
acquire = channel.unary_unary("/leasehold.v1.LockService/Acquire")
try:
    acquire(bytes.fromhex(sys.argv[2]), timeout=10)
    print("no error")
except grpc.RpcError as call:
    print("code", call.code().name)
    print("message", call.details())
    status = rpc_status.from_call(call)
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            for v in bad.field_violations:
                print("violation", v.field, "|", v.description)
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            print("reason", info.reason, info.domain)
"#;

#[test]
fn python_decodes_bad_request_from_a_grpc_status() {
    let probe = Command::new("python3")
        .args(["-c", "import grpc, grpc_status"])
        .output()
        .expect("run python3");
    assert!(
        probe.status.success(),
        "needs python3 with grpcio and grpcio-status: \
         python3 -m pip install grpcio-status (./test.sh installs it)\n{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let server = ServerProcess::start(&[]);
    let request = pb::AcquireRequest {
        key: "py/details".into(),
        ttl_ms: 50,
        ..Default::default()
    };
    let out = Command::new("timeout")
        .args(["30", "python3", "-c", SCRIPT, &server.addr])
        .arg(hex::encode(request.encode_to_vec()))
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines.contains(&"code INVALID_ARGUMENT"), "{stdout}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("message ttl_ms: 50 is outside the server's bounds")),
        "the message is unchanged: {stdout}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("violation ttl_ms | 50 is outside")),
        "{stdout}"
    );
    assert!(
        lines.contains(&"reason INVALID_FIELD leasehold"),
        "{stdout}"
    );
}
