"""The one gRPC server interceptor: a request id per RPC (for logs and audit lines), handler timing, and
admission: the calls and long-lived streams each caller uid may hold, and a deadline for the request.

grpc.aio runs a unary-request handler only once its request message has arrived, so a call that never
sends one holds a server slot that no handler ever sees (issue 12: an ungranted user held them all).
Every unary-request method is therefore served as a stream-request method, which is the same on the
wire (a gRPC request is a stream of messages; unary means one): the wrapper starts with the call,
counts it against its uid before anything else, and reads the one request message itself under a
deadline. The servicers keep their unary signatures.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, NoReturn, Protocol

import grpc

from broker.logs import REQUEST_ID
from broker.metrics import Metrics

# Streams (key/revocation and secret watchers) hold a server slot for as long as their client likes.
# A sidecar needs one per tool plus one; this leaves room for many agents per user while no single
# local user can take every slot from the others.
MAX_STREAMS_PER_UID: Final = 64
# Calls in flight per uid, streams included: a uid's own share, whatever it does with its connections.
MAX_CALLS_PER_UID: Final = 128
# Calls in flight in total. Checked after the uid's own limit, and a uid's limit is a small part of it,
# so one uid cannot take the pool from the others.
MAX_CALLS: Final = 4096
# How long a call beyond its uid's limit waits for a turn before it is refused.
QUEUE_TIMEOUT: Final = 10.0
# A local client sends its request right after the headers (one write); a call whose message has not
# arrived by then is stalling on purpose, and is ended so that it frees its slot.
REQUEST_DEADLINE: Final = 2.0


class _Identified(Protocol):
    @property
    def uid(self) -> int: ...


class Peers(Protocol):
    def lookup(self, peer: str) -> _Identified | None: ...


class Instrument(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, metrics: Metrics, peers: Peers, *, max_streams_per_uid: int = MAX_STREAMS_PER_UID,
                 max_calls_per_uid: int = MAX_CALLS_PER_UID, max_calls: int = MAX_CALLS,
                 request_deadline: float = REQUEST_DEADLINE, queue_timeout: float = QUEUE_TIMEOUT) -> None:
        self._m = metrics
        self._peers = peers
        self._max_streams = max_streams_per_uid
        self._max_calls_per_uid = max_calls_per_uid
        self._max_calls = max_calls
        self._deadline = request_deadline
        self._queue_timeout = queue_timeout
        # Touched only on the event loop. uid -> calls (or streams) in flight.
        self._calls: dict[int, int] = {}
        self._streams: dict[int, int] = {}
        self._in_flight = 0
        self._waiting: dict[int, collections.deque[asyncio.Future[None]]] = {}  # uid -> calls waiting, in order
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

    # --- admission ------------------------------------------------------------------------------------

    async def _admit(self, context: Any, stream: bool) -> int | None:
        """Count a call (and a stream) against its uid and the total, or end it with RESOURCE_EXHAUSTED.

        A call beyond its uid's limit waits, in order, for one of that uid's calls to end, up to
        QUEUE_TIMEOUT; refusing it at once would only have the client send it again at once, and that
        churn would cost the event loop what every other uid's calls need.
        """
        cred = self._peers.lookup(context.peer())
        if cred is None:
            return None  # the internal socket: only the daemon's own uid can reach it
        uid = cred.uid
        # The uid's own limits first: a uid at its share is held back before it can touch the global pool.
        if stream and self._streams.get(uid, 0) >= self._max_streams:
            await _refuse(context, f"at most {self._max_streams} open streams per user")
        if self._calls.get(uid, 0) >= self._max_calls_per_uid:
            await self._wait_turn(uid, context)  # the slot of an ended call, handed over as it is
            if stream and self._streams.get(uid, 0) >= self._max_streams:  # filled while we waited
                self._release(uid, stream=False)
                await _refuse(context, f"at most {self._max_streams} open streams per user")
        else:
            if self._in_flight >= self._max_calls:
                await _refuse(context, "the broker is at its limit of calls in flight")
            self._calls[uid] = self._calls.get(uid, 0) + 1
            self._in_flight += 1
        if stream:
            self._streams[uid] = self._streams.get(uid, 0) + 1
        return uid

    async def _wait_turn(self, uid: int, context: Any) -> None:
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._waiting.setdefault(uid, collections.deque())
        queue.append(turn)
        try:
            async with asyncio.timeout(self._queue_timeout):
                await turn
        except TimeoutError:
            self._leave_queue(uid, turn)
            await _refuse(context, f"at most {self._max_calls_per_uid} calls in flight per user")
        except BaseException:  # cancelled: the client gave up
            self._leave_queue(uid, turn)
            raise

    def _leave_queue(self, uid: int, turn: asyncio.Future[None]) -> None:
        if turn.done() and not turn.cancelled():
            self._release(uid, stream=False)  # a slot handed to us meanwhile goes on, or is freed
            return
        turn.cancel()
        # Not removed from the middle of the queue (linear, and thousands may time out together):
        # _release skips cancelled turns. Only the ones at the head go now, so an idle uid leaves nothing.
        queue = self._waiting.get(uid)
        if queue is not None:
            while queue and queue[0].done():
                queue.popleft()
            if not queue:
                del self._waiting[uid]

    def _release(self, uid: int | None, stream: bool) -> None:
        if uid is None:
            return
        if stream:
            _decrement(self._streams, uid)
        queue = self._waiting.get(uid)
        while queue:
            turn = queue.popleft()
            if not turn.done():
                turn.set_result(None)  # the slot passes to the longest waiter: counts unchanged
                if not queue:
                    del self._waiting[uid]
                return
        self._waiting.pop(uid, None)
        self._in_flight -= 1
        _decrement(self._calls, uid)

    async def _request(self, context: Any) -> Any:
        """The call's one request message, read under the deadline."""
        try:
            async with asyncio.timeout(self._deadline):
                request = await context.read()
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the request message did not arrive in time")
        if request is grpc.aio.EOF:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call carried no request message")
        return request

    # --- wrapping -------------------------------------------------------------------------------------

    def _wrap(self, handler: Any, method: str) -> Any:
        des, ser = handler.request_deserializer, handler.response_serializer
        if handler.unary_unary is not None:
            inner = handler.unary_unary
            hist = self._m.rpc_seconds.labels(method)

            async def unary(requests: AsyncIterator[Any], context: Any) -> Any:
                REQUEST_ID.set(secrets.token_hex(8))
                uid = await self._admit(context, stream=False)
                try:
                    request = await self._request(context)
                    t0 = time.perf_counter()  # the handler's time, not the client's upload
                    try:
                        return await inner(request, context)
                    finally:
                        hist.observe(time.perf_counter() - t0)
                finally:
                    self._release(uid, stream=False)

            return grpc.stream_unary_rpc_method_handler(unary, request_deserializer=des, response_serializer=ser)
        watchers = self._m.watchers
        if handler.unary_stream is not None:
            stream_inner = _streaming(handler.unary_stream)

            async def stream(requests: AsyncIterator[Any], context: Any) -> None:
                # Streams live as long as their subscriber: counted, not timed.
                REQUEST_ID.set(secrets.token_hex(8))
                uid = await self._admit(context, stream=True)
                try:
                    request = await self._request(context)
                    watchers.inc()
                    try:
                        await _respond(stream_inner, request, context)
                    finally:
                        watchers.dec()
                finally:
                    self._release(uid, stream=True)

            return grpc.stream_stream_rpc_method_handler(stream, request_deserializer=des, response_serializer=ser)
        # Request-streaming methods (server reflection): counted as streams; their handler reads itself.
        outer = handler.stream_unary or _streaming(handler.stream_stream)
        make = (grpc.stream_stream_rpc_method_handler if handler.stream_stream is not None
                else grpc.stream_unary_rpc_method_handler)

        async def bidi(requests: AsyncIterator[Any], context: Any) -> Any:
            REQUEST_ID.set(secrets.token_hex(8))
            uid = await self._admit(context, stream=True)
            watchers.inc()
            try:
                if handler.stream_unary is not None:
                    return await outer(requests, context)
                await _respond(outer, requests, context)
                return None
            finally:
                watchers.dec()
                self._release(uid, stream=True)

        return make(bidi, request_deserializer=des, response_serializer=ser)


def _streaming(handler: Any) -> Any:
    """``handler`` if grpc.aio can serve it as a response stream; a synchronous one would be driven the
    wrong way by the async wrapper (the client would get UNKNOWN), so it is refused at registration."""
    if not (inspect.isasyncgenfunction(handler) or inspect.iscoroutinefunction(handler)):
        raise TypeError(f"{handler!r}: a streaming handler must be an async generator or a coroutine function")
    return handler


async def _respond(handler: Any, request: Any, context: Any) -> None:
    """Run a response-streaming handler of either grpc.aio style: an async generator, or a coroutine
    that writes with ``context.write`` (grpc.health's Watch)."""
    if inspect.isasyncgenfunction(handler):
        async for item in handler(request, context):
            await context.write(item)
    else:
        await handler(request, context)


async def _refuse(context: Any, why: str) -> NoReturn:
    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, why)
    raise AssertionError("unreachable: abort raises")


def _decrement(counts: dict[int, int], uid: int) -> None:
    left = counts[uid] - 1
    if left:
        counts[uid] = left
    else:
        del counts[uid]
