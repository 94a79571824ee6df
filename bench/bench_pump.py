"""Cost of the front-door pump: direct Unix socket vs through the native pump vs through the pure pump.

Run from the repository root::

    .venv/bin/python bench/bench_pump.py            # add --quick for a smoke run

Three processes, so the pump's host shares no GIL with the workload: an echo/sink server, a client
(one per run), and this process, which hosts nothing but the front-door accept and the pump. Reported,
side by side with ratios to the direct path:

* ping-pong: round-trip latency of 200-byte request/response pairs on one connection (the shape of a
  gRPC unary call), as p50/p90/p99 over every round trip of every repeat, plus the CPU the pump's
  process spent per round trip;
* grpc: the same on a real gRPC unary call (the standard health Check, grpcio client and server), which
  is what the pump carries in production and so the figure to hold against the overhead budget;
* bulk: one-way throughput of 64 KiB writes, median (min-max) over the repeats, plus pump CPU per GiB.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import socket
import statistics
import sys
import tempfile
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from time import perf_counter_ns

from broker import _pump

try:
    from broker._pump_native import NativePump
except ImportError:
    NativePump = None  # type: ignore[assignment,misc]

MESSAGE = 200
CHUNK = 65536


# --- server process ------------------------------------------------------------------------------


def _echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(CHUNK):
            conn.sendall(data)


def _sink(conn: socket.socket) -> None:
    buf = bytearray(CHUNK)
    total = 0
    with conn:
        while n := conn.recv_into(buf):
            total += n
        conn.sendall(str(total).encode())


def _serve(path: str, handler: Callable[[socket.socket], None]) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handler, args=(conn,), daemon=True).start()


def server_main(echo_path: str, sink_path: str, grpc_path: str, ready: Connection) -> None:
    # Imported here: only the server and gRPC client processes need gRPC.
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.add_insecure_port(f"unix:{grpc_path}")
    server.start()
    threading.Thread(target=_serve, args=(sink_path, _sink), daemon=True).start()
    ready.send(True)
    _serve(echo_path, _echo)


# --- client process ------------------------------------------------------------------------------


def client_pingpong(path: str, rounds: int, out: Connection) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    msg = os.urandom(MESSAGE)
    buf = bytearray(MESSAGE)
    view = memoryview(buf)
    samples = []
    for _ in range(rounds):
        t0 = perf_counter_ns()
        sock.sendall(msg)
        got = 0
        while got < MESSAGE:
            got += sock.recv_into(view[got:])
        samples.append(perf_counter_ns() - t0)
    assert buf == msg
    sock.close()
    out.send(samples)


def client_grpc(path: str, rounds: int, out: Connection) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"unix:{path}") as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        request = health_pb2.HealthCheckRequest()
        check(request)  # connects; not timed
        samples = []
        for _ in range(rounds):
            t0 = perf_counter_ns()
            check(request)
            samples.append(perf_counter_ns() - t0)
    out.send(samples)


def client_bulk(path: str, total: int, out: Connection) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    chunk = os.urandom(CHUNK)
    t0 = perf_counter_ns()
    for _ in range(total // CHUNK):
        sock.sendall(chunk)
    sock.shutdown(socket.SHUT_WR)
    reply = int(sock.recv(64))
    elapsed = perf_counter_ns() - t0
    assert reply == total, (reply, total)
    sock.close()
    out.send(elapsed)


# --- host: front door + pump ---------------------------------------------------------------------


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Host:
    def __init__(self, tmp: Path, upstream: dict[str, str]) -> None:
        self.tmp = tmp
        self.upstream = upstream
        self.ctx = mp.get_context("spawn")

    def run(self, backend: str, kind: str, client: Callable[..., None], arg: int) -> tuple[object, float]:
        """One client run; returns (the client's result, CPU seconds this process spent meanwhile)."""
        target = self.upstream[kind]
        pump: _pump.Pump | None = None
        front: socket.socket | None = None
        if backend != "direct":
            pump = NativePump(lambda *_: None) if backend == "native" else _pump.PurePump(lambda *_: None)
            pump.start()
            path = str(self.tmp / f"front-{backend}-{kind}.sock")
            front = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            front.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # as the front door's listener
            front.bind(path)
            front.listen(8)
            target = path
        ours, theirs = self.ctx.Pipe()
        proc = self.ctx.Process(target=client, args=(target, arg, theirs))
        proc.start()
        cpu0 = _cpu()
        if pump is not None and front is not None:
            accepted, _ = front.accept()
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(self.upstream[kind])
            assert proc.pid is not None  # started above
            pump.add(1, accepted.detach(), upstream.detach(), proc.pid)
        result = ours.recv()
        cpu = _cpu() - cpu0
        proc.join()
        if pump is not None and front is not None:
            pump.stop()
            front.close()
            os.unlink(target)
        return result, cpu


def _pct(samples: list[int], q: float) -> float:
    return sorted(samples)[min(len(samples) - 1, int(q * len(samples)))] / 1000.0


def _latency_table(title: str, lat: dict[str, list[int]], cpu: dict[str, float], count: int) -> None:
    base50 = _pct(lat["direct"], 0.5)
    print()
    print(title)
    print("| path | p50 us | p90 us | p99 us | p50 vs direct | added p50 us | pump-process CPU us/round trip |")
    print("|---|---|---|---|---|---|---|")
    for b, samples in lat.items():
        p50, p90, p99 = (_pct(samples, q) for q in (0.5, 0.9, 0.99))
        cpu_us = cpu[b] / count * 1e6
        print(f"| {b} | {p50:.1f} | {p90:.1f} | {p99:.1f} | {p50 / base50:.2f}x | {p50 - base50:+.1f} | {cpu_us:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    args = parser.parse_args()
    rounds, rpc_rounds, repeats, bulk_bytes = (2000, 500, 2, 16 << 20) if args.quick else (20000, 4000, 5, 256 << 20)
    backends = ["direct", "native", "pure"] if NativePump is not None else ["direct", "pure"]

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        upstream = {kind: str(tmp / f"{kind}.sock") for kind in ("echo", "sink", "grpc")}
        ctx = mp.get_context("spawn")
        ready_r, ready_w = ctx.Pipe()
        server = ctx.Process(
            target=server_main, args=(upstream["echo"], upstream["sink"], upstream["grpc"], ready_w), daemon=True
        )
        server.start()
        ready_r.recv()
        host = Host(tmp, upstream)

        lat: dict[str, list[int]] = {b: [] for b in backends}
        lat_cpu: dict[str, float] = dict.fromkeys(backends, 0.0)
        rpc: dict[str, list[int]] = {b: [] for b in backends}
        rpc_cpu: dict[str, float] = dict.fromkeys(backends, 0.0)
        bulk: dict[str, list[float]] = {b: [] for b in backends}
        bulk_cpu: dict[str, float] = dict.fromkeys(backends, 0.0)
        # Interleave backends within each repeat so that drift in machine load hits all of them alike.
        for _ in range(repeats):
            for b in backends:
                samples, cpu = host.run(b, "echo", client_pingpong, rounds)
                assert isinstance(samples, list)
                lat[b].extend(samples)
                lat_cpu[b] += cpu
                samples, cpu = host.run(b, "grpc", client_grpc, rpc_rounds)
                assert isinstance(samples, list)
                rpc[b].extend(samples)
                rpc_cpu[b] += cpu
                elapsed, cpu = host.run(b, "sink", client_bulk, bulk_bytes)
                assert isinstance(elapsed, int)
                bulk[b].append(bulk_bytes / (1 << 20) / (elapsed / 1e9))
                bulk_cpu[b] += cpu
        server.terminate()

    base_bulk = statistics.median(bulk["direct"])
    print(
        f"pump backend loaded by make_pump(): {_pump.BACKEND}; Python {sys.version.split()[0]}; "
        f"{os.cpu_count()} CPUs; {repeats} repeats"
    )
    _latency_table(
        f"ping-pong, {MESSAGE} B request + {MESSAGE} B response, {rounds} round trips x {repeats}",
        lat,
        lat_cpu,
        rounds * repeats,
    )
    _latency_table(
        f"gRPC unary health Check (grpcio sync client and server), {rpc_rounds} calls x {repeats}",
        rpc,
        rpc_cpu,
        rpc_rounds * repeats,
    )
    print()
    print(f"bulk, one direction, {bulk_bytes >> 20} MiB in {CHUNK // 1024} KiB writes x {repeats}")
    print("| path | MiB/s median | min-max | vs direct | pump-process CPU s/GiB |")
    print("|---|---|---|---|---|")
    for b in backends:
        med = statistics.median(bulk[b])
        cpu_gib = bulk_cpu[b] / (bulk_bytes * repeats / (1 << 30))
        print(f"| {b} | {med:.0f} | {min(bulk[b]):.0f}-{max(bulk[b]):.0f} | {med / base_bulk:.2f}x | {cpu_gib:.2f} |")


if __name__ == "__main__":
    main()
