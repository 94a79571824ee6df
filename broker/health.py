"""``grpc.health.v1.Health``: Check, Watch and List, and an end to every Watch when the daemon stops.

grpcio ships a servicer, but its asyncio one has no ``List`` (it answers UNIMPLEMENTED), and its ``Watch``
streams never end: a client watching health (gRPC client-side health checking does) would hold every
stop for the whole shutdown grace. Here a stop first tells each watcher NOT_SERVING, then ends its stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeAlias

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

Status: TypeAlias = health_pb2.HealthCheckResponse.ServingStatus.ValueType
SERVICE_UNKNOWN: Status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]  # grpcio ships no stubs for it
    def __init__(self) -> None:
        self._statuses: dict[str, Status] = {}
        self._changed = asyncio.Condition()
        self._closed = False

    async def set(self, service: str, status: Status) -> None:
        async with self._changed:
            self._statuses[service] = status
            self._changed.notify_all()

    async def close(self) -> None:
        """End every Watch stream once it has sent the latest status. Set NOT_SERVING first."""
        async with self._changed:
            self._closed = True
            self._changed.notify_all()

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext[Any, Any]) -> health_pb2.HealthCheckResponse:
        status = self._statuses.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext[Any, Any]) -> None:
        # The protocol's form: an unknown service is SERVICE_UNKNOWN (not an error), and only changes
        # are sent. The write happens outside the lock, so a slow reader never holds up set().
        sent: Status | None = None
        while True:
            status = self._statuses.get(request.service, SERVICE_UNKNOWN)
            if status != sent:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                sent = status
                continue  # the status may have changed (and the daemon closed) while we wrote
            if self._closed:
                break
            async with self._changed:
                await self._changed.wait_for(self._news(request.service, sent))
        await context.abort(grpc.StatusCode.UNAVAILABLE, "broker is shutting down")

    def _news(self, service: str, sent: Status | None) -> Callable[[], bool]:
        return lambda: self._closed or self._statuses.get(service, SERVICE_UNKNOWN) != sent

    async def List(self, request: health_pb2.HealthListRequest,
                   context: grpc.aio.ServicerContext[Any, Any]) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=status) for name, status in self._statuses.items()})
