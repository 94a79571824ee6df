"""The one gRPC server interceptor: a request id per RPC (for logs and audit lines) and handler timing."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from broker.logs import REQUEST_ID
from broker.metrics import Metrics


class Instrument(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics
        # Wrapped handlers by method: built once, not per call. Only registered methods get here
        # (an unknown method has no handler), so the dict is bounded by the services we serve.
        self._wrapped: dict[str, Any] = {}

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        wrapped = self._wrapped.get(details.method)
        if wrapped is None:
            handler = await continuation(details)
            if handler is None:
                return handler
            wrapped = self._wrapped[details.method] = self._wrap(handler, details.method.rsplit("/", 1)[-1])
        return wrapped

    def _wrap(self, handler: Any, method: str) -> Any:
        if handler.unary_unary is not None:
            inner = handler.unary_unary
            hist = self._m.rpc_seconds.labels(method)

            async def unary(request: Any, context: Any) -> Any:
                REQUEST_ID.set(secrets.token_hex(8))
                t0 = time.perf_counter()
                try:
                    return await inner(request, context)
                finally:
                    hist.observe(time.perf_counter() - t0)

            return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=handler.request_deserializer,
                                                       response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            stream_inner = handler.unary_stream
            watchers = self._m.watchers

            async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                # Streams live as long as their subscriber: counted, not timed.
                REQUEST_ID.set(secrets.token_hex(8))
                watchers.inc()
                try:
                    async for item in stream_inner(request, context):
                        yield item
                finally:
                    watchers.dec()

            return grpc.unary_stream_rpc_method_handler(stream, request_deserializer=handler.request_deserializer,
                                                        response_serializer=handler.response_serializer)
        return handler
