#!/usr/bin/env python3
"""Generates the Python gRPC stubs for Leasehold from proto/leasehold/v1/lock.proto.

The stubs are not committed: they are generated from the proto, the one source
of truth, with grpcio-tools (no protoc needed on the machine):

    python3 clients/python/generate.py                # into clients/python/generated/
    python3 clients/python/generate.py --out DIR      # anywhere else

Output: DIR/leasehold/v1/lock_pb2.py, lock_pb2.pyi and lock_pb2_grpc.py,
imported as `from leasehold.v1 import lock_pb2, lock_pb2_grpc` with DIR on
sys.path (leasehold_client.py looks in clients/python/generated/, or in
$LEASEHOLD_PY_STUBS).
"""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.normpath(os.path.join(HERE, "..", "..", "proto"))
PROTO = "leasehold/v1/lock.proto"


def generate(out_dir: str) -> None:
    """Runs grpcio-tools' bundled protoc; raises SystemExit on failure."""
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError:
        sys.exit(
            "error: grpcio-tools is not installed; run: "
            "python3 -m pip install -r clients/python/requirements.txt"
        )
    os.makedirs(out_dir, exist_ok=True)
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            os.path.join(PROTO_ROOT, PROTO),
        ]
    )
    if code != 0:
        sys.exit(f"error: protoc failed with exit code {code}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        default=os.path.join(HERE, "generated"),
        help="directory to write the stubs into (default: clients/python/generated)",
    )
    args = parser.parse_args()
    generate(args.out)
    print(f"generated {PROTO} stubs in {args.out}")


if __name__ == "__main__":
    main()
