"""The same empty call served by grpcio's Python servers, with nothing else in the process.

    python py_server.py aio-uvloop|aio-asyncio|sync SOCKET_PATH      # prints "ready" once listening

Run by bench/server_core/run.py next to the native server; the broker's own server is grpc.aio on
uvloop with more services and an interceptor (bench/load.py measures that one).
"""

from __future__ import annotations

import asyncio
import sys
from concurrent import futures

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2_grpc

SYNC_THREADS = 16


async def serve_aio(path: str) -> None:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def serve_sync(path: str) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(SYNC_THREADS))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.add_insecure_port(f"unix:{path}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def main() -> int:
    shape, path = sys.argv[1], sys.argv[2]
    if shape == "aio-uvloop":
        uvloop.run(serve_aio(path))
    elif shape == "aio-asyncio":
        asyncio.run(serve_aio(path))
    elif shape == "sync":
        serve_sync(path)
    else:
        print(f"unknown shape {shape!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
