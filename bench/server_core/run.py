"""What a gRPC server core costs per call: grpcio's Python servers next to a native (C++) one, same client.

    .venv/bin/python bench/server_core/run.py [--duration 4] [--concurrency 1,8,32]

Builds native_server.cc against Debian's gRPC C++ library and OpenSSL (as root, installs the Debian
packages it needs when they are missing), then serves the same empty call (grpc.health.v1 Check) from
each server shape in turn and drives it with the load tool's generator (bench/_loadgen.py: grpc.aio
clients on uvloop, one connection each):

* ``native``       grpc's C++ callback API: a server core with no Python on the request path;
* ``aio-uvloop``   grpc.aio on uvloop, the broker's server shape without its services and interceptor;
* ``aio-asyncio``  grpc.aio on the default event loop;
* ``sync``         grpcio's thread-pool server (16 threads);

and ``native-mint``: broker.v1 MintToken answered by the native server (claims, ES256 with OpenSSL, one
audit write; no attestation or policy), after checking that a token it mints verifies with the
broker's token engine. Prints req/s, p50/p99 latency and CPU per request of the server and of the
client, and each rate against ``aio-uvloop``. It answers how much of a call's cost is the server core,
which bounds every handler behind it (bench/RESULTS.md, daemon section).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from load import loadgen  # noqa: E402  (bench/load.py, found through the path set above)

ROOT = os.path.dirname(os.path.dirname(HERE))
DEBIAN_PACKAGES = ("g++", "pkg-config", "protobuf-compiler", "protobuf-compiler-grpc", "libgrpc++-dev",
                   "libprotobuf-dev", "libssl-dev")
LIBRARIES = ("grpc++", "protobuf", "libcrypto")
# (row name, server shape, RPC the clients call)
WORKLOADS = (("native", "native", "empty"), ("native-mint", "native", "mint"), ("aio-uvloop", "aio-uvloop", "empty"),
             ("aio-asyncio", "aio-asyncio", "empty"), ("sync", "sync", "empty"))


def _toolchain_ready() -> bool:
    if not (shutil.which("g++") and shutil.which("protoc") and shutil.which("grpc_cpp_plugin")):
        return False
    return subprocess.run(["pkg-config", "--exists", *LIBRARIES], check=False).returncode == 0


def ensure_toolchain() -> None:
    if _toolchain_ready():
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        sys.exit(f"need the Debian packages {' '.join(DEBIAN_PACKAGES)} (run as root to install them)")
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *DEBIAN_PACKAGES], check=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, stdout=subprocess.DEVNULL)
    if not _toolchain_ready():
        sys.exit("the gRPC C++ toolchain is still incomplete after installing it")


def build_native(out: str) -> str:
    plugin = shutil.which("grpc_cpp_plugin")
    proto = os.path.join(ROOT, "proto")
    subprocess.run(["protoc", f"-I{HERE}", f"-I{proto}", f"--cpp_out={out}", f"--grpc_out={out}",
                    f"--plugin=protoc-gen-grpc={plugin}", os.path.join(HERE, "health.proto"),
                    os.path.join(proto, "broker", "v1", "broker.proto")], check=True)
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", *LIBRARIES], check=True,
                           capture_output=True, text=True).stdout.split()
    binary = os.path.join(out, "native_server")
    sources = [os.path.join(out, name) for name in ("health.pb.cc", "health.grpc.pb.cc", "broker/v1/broker.pb.cc",
                                                    "broker/v1/broker.grpc.pb.cc")]
    subprocess.run(["g++", "-O2", "-std=c++17", f"-I{out}", os.path.join(HERE, "native_server.cc"), *sources,
                    "-o", binary, *flags], check=True)
    return binary


def start(shape: str, binary: str, d: str) -> tuple[subprocess.Popen[str], str, str]:
    """Start one server; returns it, its socket path and (native only) its public key in hex."""
    path = os.path.join(d, f"{shape}.sock")
    argv = ([binary, path, os.path.join(d, "audit.jsonl")] if shape == "native"
            else [sys.executable, os.path.join(HERE, "py_server.py"), shape, path])
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    word, _, key = proc.stdout.readline().strip().partition(" ")
    if word != "ready":
        proc.kill()
        raise RuntimeError(f"{shape} server did not start")
    return proc, path, key


def check_native_mint(path: str, public_key_hex: str) -> None:
    """One token from the native server must verify with the broker's own engine: the mint is real."""
    import time

    import grpc
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    from broker import tokens
    from broker.v1 import broker_pb2, broker_pb2_grpc

    with grpc.insecure_channel(f"unix:{path}") as channel:
        reply = broker_pb2_grpc.BrokerStub(channel).MintToken(
            broker_pb2.MintTokenRequest(workflow="bench", tool="read_ticket", audience="crm"), timeout=10)
    public = load_der_public_key(bytes.fromhex(public_key_hex))
    assert isinstance(public, ec.EllipticCurvePublicKey)
    key = tokens.VerifyKey(tokens.ES256, "k1", public=public)
    claims = tokens.verify(reply.token.encode(), {"k1": key}, tokens.Expect("example.org", "crm", "read_ticket"),
                           int(time.time()))
    assert claims.wf == "bench" and claims.jti == reply.jti


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--concurrency", default="1,8,32")
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    ensure_toolchain()
    rows: list[tuple[str, int, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="brk-core-") as d:
        binary = build_native(d)
        for name, shape, rpc in WORKLOADS:
            proc, path, key = start(shape, binary, d)
            try:
                if rpc == "mint":
                    check_native_mint(path, key)
                for c in levels:
                    r = loadgen(["--grpc", f"unix:{path}", "--rpc", rpc], c, args.duration,
                                server_pid=proc.pid, python_server=False)
                    rows.append((name, c, r))
                    print(f"{name:<12} c={c:<3} {r['rps']:7.0f}/s  p50 {r['p50_us']:6.0f} us  server "
                          f"{r['server_cpu_us']:4.0f} us/req  client {r['client_cpu_us']:4.0f} us/req  "
                          f"errors {r['errors']}", flush=True)
            finally:
                proc.kill()
                proc.wait()
    print()
    print(markdown(rows))
    return 0


def markdown(rows: list[tuple[str, int, dict[str, float]]]) -> str:
    base = {c: r["rps"] for shape, c, r in rows if shape == "aio-uvloop"}
    out = ["| server | clients | req/s | vs aio-uvloop | p50 us | p99 us | errors | server CPU us/req | "
           "client CPU us/req |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, c, r in rows:
        out.append(f"| {name} | {c} | {r['rps']:.0f} | {r['rps'] / base[c]:.2f}x | {r['p50_us']:.0f} | "
                   f"{r['p99_us']:.0f} | {r['errors']} | {r['server_cpu_us']:.0f} | {r['client_cpu_us']:.0f} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
