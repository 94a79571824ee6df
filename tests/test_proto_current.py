"""Generated gRPC code is never edited by hand: regenerating from proto/ must give the same files."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
GENERATED = ["broker/v1/broker_pb2.py", "broker/v1/broker_pb2.pyi", "broker/v1/broker_pb2_grpc.py",
             "broker/_spiffe/workload_pb2.py", "broker/_spiffe/workload_pb2.pyi",
             "broker/_spiffe/workload_pb2_grpc.py"]


def test_generated_code_is_current(tmp_path: pathlib.Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), str(tmp_path)], check=True)
    for rel in GENERATED:
        assert (tmp_path / rel).read_text() == (ROOT / rel).read_text(), f"{rel} is stale: run scripts/gen_proto.py"
