"""One load generator process: N concurrent clients, each on its own connection, for D seconds.

Prints one JSON object: requests completed, errors, wall time, latency percentiles (microseconds).
Targets: a gRPC unary call on a Unix socket (``--grpc``), or an HTTP POST (``--http``, for OpenBao).
Run by bench/load.py; not meant to be called by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import uvloop

WARMUP = 0.5


async def run(make_call: Callable[[int], Awaitable[Callable[[], Awaitable[None]]]], concurrency: int,
              duration: float) -> dict[str, object]:
    calls = [await make_call(i) for i in range(concurrency)]
    latencies: list[float] = []
    errors = 0
    completed = 0  # every call, warm-up included, to divide CPU time by
    start = time.perf_counter()
    measure_from = start + WARMUP
    stop_at = measure_from + duration

    async def client(call: Callable[[], Awaitable[None]]) -> None:
        nonlocal errors, completed
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            try:
                await call()
            except Exception:
                errors += 1
                continue
            t1 = time.perf_counter()
            completed += 1
            if t0 >= measure_from:
                latencies.append(t1 - t0)

    cpu0 = os.times()
    await asyncio.gather(*(client(c) for c in calls))
    cpu1 = os.times()
    latencies.sort()
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {"requests": len(latencies), "errors": errors, "seconds": duration,
            "rps": len(latencies) / duration, "p50_us": q[49] * 1e6, "p99_us": q[98] * 1e6,
            "completed": completed,
            "client_cpu_us": ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) / max(completed, 1) * 1e6}


def grpc_factory(target: str, rpc: str) -> Callable[[int], Awaitable[Callable[[], Awaitable[None]]]]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from broker.v1 import broker_pb2, broker_pb2_grpc

    async def make(i: int) -> Callable[[], Awaitable[None]]:
        # A local subchannel pool gives every client its own connection, as separate agents would have.
        ch = grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        if rpc == "empty":
            stub = health_pb2_grpc.HealthStub(ch)
            req = health_pb2.HealthCheckRequest()

            async def call() -> None:
                await stub.Check(req, timeout=10)
        else:
            bstub = broker_pb2_grpc.BrokerStub(ch)
            mreq = broker_pb2.MintTokenRequest(workflow="bench", tool="read_ticket", audience="crm")

            async def call() -> None:
                await bstub.MintToken(mreq, timeout=10)
        await call()  # connect before the clock starts
        return call

    return make


def http_factory(url: str, token: str, body: str) -> Callable[[int], Awaitable[Callable[[], Awaitable[None]]]]:
    import httpx

    async def make(i: int) -> Callable[[], Awaitable[None]]:
        client = httpx.AsyncClient(limits=httpx.Limits(max_connections=1), headers={"X-Vault-Token": token})
        payload = json.loads(body)

        async def call() -> None:
            r = await client.post(url, json=payload, timeout=10)
            r.raise_for_status()
        await call()
        return call

    return make


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grpc")
    ap.add_argument("--rpc", choices=["empty", "mint"], default="empty")
    ap.add_argument("--http")
    ap.add_argument("--body", default="{}")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--as-uid", type=int, help="drop to this uid (and --as-gid) before connecting")
    ap.add_argument("--as-gid", type=int)
    args = ap.parse_args()
    if args.grpc:
        factory = grpc_factory(args.grpc, args.rpc)
    else:
        # The OpenBao token is passed in the environment, never on the command line.
        factory = http_factory(args.http, os.environ["BENCH_BAO_TOKEN"], args.body)
    if args.as_uid is not None:
        # Like an agent running as its own user. Everything is imported above: the interpreter may live
        # where that user cannot read. The kernel records these credentials when we connect.
        import grpc.aio._channel  # noqa: F401

        os.setgroups([])
        os.setgid(args.as_gid if args.as_gid is not None else args.as_uid)
        os.setuid(args.as_uid)
    result = uvloop.run(run(factory, args.concurrency, args.duration))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
