"""The composition root: wires config, keys, audit, the gRPC servicers and the front door, then runs.

Nothing else in the package constructs these parts; tests start the real daemon as a process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from typing import Final

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from broker import _pump, tokens
from broker._spiffe import workload_pb2, workload_pb2_grpc
from broker.audit import AuditLog
from broker.config import Config
from broker.frontdoor import FrontDoor, bind_public
from broker.keyring import KeyRing, KeySource, MemoryKeySource
from broker.service import BrokerService, Runtime, WorkloadAPI
from broker.v1 import broker_pb2, broker_pb2_grpc

log = logging.getLogger("broker")

# Requests are a few hundred bytes; anything near this limit is garbage or an attack.
MAX_REQUEST_BYTES: Final = 64 * 1024
SHUTDOWN_GRACE: Final = 5.0
SERVER_OPTIONS: Final = [
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
    ("grpc.max_send_message_length", 4 * 1024 * 1024),
    ("grpc.max_metadata_size", 16 * 1024),
    ("grpc.max_concurrent_streams", 256),
]
SERVICE_NAMES: Final = (
    broker_pb2.DESCRIPTOR.services_by_name["Broker"].full_name,
    workload_pb2.DESCRIPTOR.services_by_name["SpiffeWorkloadAPI"].full_name,
)


class Daemon:
    def __init__(self, config: Config, *, key_source: KeySource | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._clock = clock
        b = config.broker
        max_ttl = max([b.token_ttl] + [t.ttl for wf in config.workflows.values() for t in wf.tools.values()])
        self.ring = KeyRing(key_source or MemoryKeySource(), b.algorithm, b.rotate_every, max_ttl, clock())
        self.audit = AuditLog(b.audit_log, clock)
        self._stop = asyncio.Event()
        self._internal_dir = ""
        self._frontdoor: FrontDoor | None = None

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        b = self.config.broker
        # The gRPC server listens only inside a private 0700 directory: no one but us (and root)
        # can reach it, so every request it sees came through the front door.
        self._internal_dir = tempfile.mkdtemp(prefix=".broker-internal-", dir=os.path.dirname(b.socket) or None)
        internal = os.path.join(self._internal_dir, "grpc.sock")
        server = grpc.aio.server(options=SERVER_OPTIONS, maximum_concurrent_rpcs=4096)
        listener = bind_public(b.socket)
        frontdoor = self._frontdoor = FrontDoor(listener, internal, b.max_connections)
        rt = Runtime(self.config, self.ring, self.audit, frontdoor, self._clock)
        health_servicer = health.aio.HealthServicer()
        broker_pb2_grpc.add_BrokerServicer_to_server(BrokerService(rt), server)
        workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(WorkloadAPI(rt), server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), server)
        server.add_insecure_port(f"unix:{internal}")
        await server.start()
        frontdoor.start()
        for name in ("", *SERVICE_NAMES):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("ready socket=%s trust_domain=%s workflows=%d algorithm=%s kid=%s token_backend=%s "
                 "pump_backend=%s", b.socket, b.trust_domain, len(self.config.workflows), b.algorithm,
                 self.ring.current.kid, tokens.BACKEND, _pump.BACKEND)
        rotation = asyncio.create_task(self._rotate(rt))
        try:
            await self._stop.wait()
        finally:
            log.info("stopping")
            for name in ("", *SERVICE_NAMES):
                await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
            rotation.cancel()
            # Order matters: refuse new connections, let in-flight calls finish through the relay,
            # then drop the relayed connections.
            frontdoor.stop_accepting()
            await server.stop(SHUTDOWN_GRACE)
            await asyncio.get_running_loop().run_in_executor(None, frontdoor.close)
            self.audit.close()
            with contextlib.suppress(OSError):
                os.unlink(b.socket)
            shutil.rmtree(self._internal_dir, ignore_errors=True)
            log.info("stopped")

    async def _rotate(self, rt: Runtime) -> None:
        while True:
            await asyncio.sleep(min(self.ring.next_due(self._clock()), 60.0) + 0.05)
            if self.ring.tick(self._clock()):
                log.info("keys changed: current kid=%s jwks_version=%d", self.ring.current.kid, self.ring.version)
                await rt.keys_changed()


def _raise_fd_limit(max_connections: int) -> None:
    # Each relayed connection holds three fds (client, upstream, pidfd) plus gRPC's own.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, max_connections * 3 + 256)
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def serve(config: Config) -> None:
    """Run the daemon in the foreground until SIGINT or SIGTERM."""
    _raise_fd_limit(config.broker.max_connections)
    async def main() -> None:
        daemon = Daemon(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, daemon.request_stop)
        await daemon.run()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
