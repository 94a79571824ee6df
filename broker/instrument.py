"""The one gRPC server interceptor: a request id per RPC (for logs and audit lines), handler timing, and
a cap on the long-lived streams each caller uid may hold open."""

from __future__ import annotations

import contextlib
import inspect
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, Protocol

import grpc

from broker.logs import REQUEST_ID
from broker.metrics import Metrics

# Streams (key/revocation and secret watchers) hold a server slot for as long as their client likes.
# A sidecar needs one per tool plus one; this leaves room for many agents per user while no single
# local user can take every slot of the server (maximum_concurrent_rpcs) from the others.
MAX_STREAMS_PER_UID: Final = 64


class _Identified(Protocol):
    @property
    def uid(self) -> int: ...


class Peers(Protocol):
    def lookup(self, peer: str) -> _Identified | None: ...


class Instrument(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, metrics: Metrics, peers: Peers, *, max_streams_per_uid: int = MAX_STREAMS_PER_UID) -> None:
        self._m = metrics
        self._peers = peers
        self._max_streams = max_streams_per_uid
        self._streams: dict[int, int] = {}  # uid -> open streams; touched only on the event loop
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
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream), request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.stream_stream is not None:
            # Server reflection: a client may hold its bidirectional stream open as long as a key stream.
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_stream(handler.stream_stream), request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler

    def _wrap_stream(self, inner: Callable[..., Any]) -> Callable[..., Any]:
        # grpc picks the calling convention from the handler's kind: an async generator yields its
        # replies, a coroutine writes them with context.write() (grpc_health's Watch). The wrapper must
        # be of the same kind as what it wraps, or grpc calls it the wrong way and the client gets UNKNOWN.
        if inspect.isasyncgenfunction(inner):
            async def generator(request: Any, context: Any) -> AsyncIterator[Any]:
                async with self._stream_slot(context):
                    async for item in inner(request, context):
                        yield item

            return generator
        if inspect.iscoroutinefunction(inner):
            async def writer(request: Any, context: Any) -> None:
                async with self._stream_slot(context):
                    await inner(request, context)

            return writer
        raise TypeError(f"{inner!r}: a streaming handler must be an async generator or a coroutine function")

    @contextlib.asynccontextmanager
    async def _stream_slot(self, context: Any) -> AsyncIterator[None]:
        """Holds one of the caller uid's stream slots while the stream is open."""
        # Streams live as long as their subscriber: counted, not timed.
        REQUEST_ID.set(secrets.token_hex(8))
        cred = self._peers.lookup(context.peer())
        uid = cred.uid if cred is not None else None  # None: the internal socket (the daemon's uid)
        if uid is not None:
            held = self._streams.get(uid, 0)
            if held >= self._max_streams:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"at most {self._max_streams} open streams per user")
            self._streams[uid] = held + 1
        self._m.watchers.inc()
        try:
            yield
        finally:
            self._m.watchers.dec()
            if uid is not None:
                left = self._streams[uid] - 1
                if left:
                    self._streams[uid] = left
                else:
                    del self._streams[uid]
