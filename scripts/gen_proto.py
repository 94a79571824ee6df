"""Regenerate the Python gRPC code under broker/ from proto/. Run after editing a .proto file.

Usage: python scripts/gen_proto.py [OUTPUT_ROOT]   (default: the repository root)

tests/test_proto_current.py regenerates into a temporary directory and fails if the checked-in files
differ, so generated code is never edited by hand.
"""

from __future__ import annotations

import pathlib
import sys

import grpc_tools
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ["broker/v1/broker.proto", "broker/_spiffe/workload.proto"]


def generate(out: pathlib.Path) -> None:
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    for proto in PROTOS:
        (out / proto).parent.mkdir(parents=True, exist_ok=True)
        rc = protoc.main([
            "protoc", f"-I{ROOT / 'proto'}", f"-I{include}",
            f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", proto,
        ])
        if rc != 0:
            raise SystemExit(f"protoc failed on {proto}")


if __name__ == "__main__":
    generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
