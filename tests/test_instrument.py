"""Admission in broker.instrument, driven step by step on one event loop (no daemon, no clocks).

The daemon-level attack is in test_dos.py; these pin the bookkeeping: who waits, who is refused, and
that every slot comes back whatever way a call ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from broker.instrument import Instrument
from broker.metrics import Metrics


@dataclass(frozen=True)
class Cred:
    uid: int


class Peers:
    def lookup(self, peer: str) -> Cred | None:
        return Cred(int(peer.rsplit(":", 1)[1])) if peer.startswith("unix-abstract:") else None


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode) -> None:
        self.code = code


class Context:
    """What the wrapper uses of a grpc.aio servicer context; ``message`` is the request's arrival."""

    def __init__(self, uid: int) -> None:
        self._peer = f"unix-abstract:{uid}"
        self.message: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def peer(self) -> str:
        return self._peer

    async def read(self) -> Any:
        return await self.message

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code)


def unary(instrument: Instrument, inner: Callable[[Any, Any], Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    wrapped = instrument._wrap(grpc.unary_unary_rpc_method_handler(inner), "Test")
    assert wrapped.stream_unary is not None  # served as stream-request: it starts before the request
    call: Callable[..., Awaitable[Any]] = wrapped.stream_unary
    return call


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def test_calls_beyond_a_uids_share_wait_for_that_uids_own_slots() -> None:
    async def main() -> None:
        release = asyncio.Event()

        async def handler(request: Any, context: Any) -> str:
            await release.wait()
            return f"done {request}"

        inst = Instrument(Metrics(), Peers(), max_calls_per_uid=2)
        call = unary(inst, handler)
        first = [Context(1000), Context(1000)]
        running = [asyncio.create_task(call(None, c)) for c in first]  # uid 1000 at its share, silent
        await settle()
        waiting_ctx = Context(1000)
        waiting = asyncio.create_task(call(None, waiting_ctx))
        other_ctx = Context(2000)
        other = asyncio.create_task(call(None, other_ctx))
        other_ctx.message.set_result("b")
        waiting_ctx.message.set_result("w")  # arrived, but its uid has no slot
        await settle()
        assert not waiting.done() and not other.done()
        release.set()
        assert await other == "done b"  # another uid was never held back
        for c in first:
            c.message.set_result("a")
        assert await asyncio.gather(*running) == ["done a", "done a"]
        assert await waiting == "done w"  # it got a slot of its own uid when one ended
        assert inst._calls == {} and inst._in_flight == 0 and inst._waiting == {}

    asyncio.run(main())


def test_a_call_that_waits_too_long_is_refused_and_every_slot_comes_back() -> None:
    async def main() -> None:
        async def handler(request: Any, context: Any) -> str:
            return "ok"

        inst = Instrument(Metrics(), Peers(), max_calls_per_uid=1, queue_timeout=0)
        call = unary(inst, handler)
        holder = Context(1000)
        held = asyncio.create_task(call(None, holder))
        await settle()
        with pytest.raises(Aborted) as exc:
            await call(None, Context(1000))
        assert exc.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        holder.message.set_result("x")
        assert await held == "ok"
        assert inst._calls == {} and inst._in_flight == 0 and inst._waiting == {}

    asyncio.run(main())


def test_a_cancelled_waiter_passes_its_turn_on() -> None:
    async def main() -> None:
        async def handler(request: Any, context: Any) -> str:
            return str(request)

        inst = Instrument(Metrics(), Peers(), max_calls_per_uid=1)
        call = unary(inst, handler)
        holder, gives_up, next_ctx = Context(7), Context(7), Context(7)
        held = asyncio.create_task(call(None, holder))
        await settle()
        quitter = asyncio.create_task(call(None, gives_up))
        patient = asyncio.create_task(call(None, next_ctx))
        await settle()
        quitter.cancel()  # the client went away while waiting
        await settle()
        holder.message.set_result(1)
        next_ctx.message.set_result(2)
        assert await held == "1" and await patient == "2"
        assert quitter.cancelled()
        assert inst._calls == {} and inst._in_flight == 0 and inst._waiting == {}

    asyncio.run(main())


def test_a_request_that_never_arrives_ends_the_call_and_frees_its_slot() -> None:
    async def main() -> None:
        async def handler(request: Any, context: Any) -> str:
            raise AssertionError("the handler must not run without its request")

        inst = Instrument(Metrics(), Peers(), request_deadline=0)
        with pytest.raises(Aborted) as exc:
            await unary(inst, handler)(None, Context(1000))
        assert exc.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert inst._calls == {} and inst._in_flight == 0

    asyncio.run(main())


def test_a_uid_at_its_stream_limit_is_refused_a_stream() -> None:
    async def main() -> None:
        async def watch(request: Any, context: Any) -> Any:
            yield request
            await asyncio.Event().wait()  # a stream lives until its client leaves

        written: list[Any] = []
        inst = Instrument(Metrics(), Peers(), max_streams_per_uid=1)
        wrapped = inst._wrap(grpc.unary_stream_rpc_method_handler(watch), "Watch")
        ctx = Context(5)
        ctx.write = lambda item: written.append(item) or asyncio.sleep(0)  # type: ignore[attr-defined]
        ctx.message.set_result("jwks")
        stream = asyncio.create_task(wrapped.stream_stream(None, ctx))
        await settle()
        assert written == ["jwks"]
        second = Context(5)
        second.message.set_result("jwks")
        with pytest.raises(Aborted) as exc:
            await wrapped.stream_stream(None, second)
        assert exc.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        stream.cancel()
        await settle()
        assert inst._streams == {} and inst._calls == {} and inst._in_flight == 0

    asyncio.run(main())


def test_a_stream_handler_that_writes_itself_is_served() -> None:
    # grpc.health's Watch is a coroutine using context.write, not an async generator.
    async def main() -> None:
        async def watch(request: Any, context: Any) -> None:
            await context.write(request)

        written: list[Any] = []
        inst = Instrument(Metrics(), Peers())
        wrapped = inst._wrap(grpc.unary_stream_rpc_method_handler(watch), "Watch")
        ctx = Context(5)
        ctx.write = lambda item: written.append(item) or asyncio.sleep(0)  # type: ignore[attr-defined]
        ctx.message.set_result("SERVING")
        await wrapped.stream_stream(None, ctx)
        assert written == ["SERVING"] and inst._streams == {}

    asyncio.run(main())


class _NoPeers:
    def lookup(self, peer: str) -> None:
        return None


def test_a_synchronous_streaming_handler_is_refused_not_miswrapped() -> None:
    # grpc calls a handler by its kind; a wrapper of another kind would be called the wrong way, and the
    # stream cap silently skipped if it were passed through unwrapped. Every servicer here is async.
    def sync_stream(request: Any, context: Any) -> Iterator[bytes]:
        yield b""

    handler = grpc.unary_stream_rpc_method_handler(sync_stream)

    async def continuation(details: Any) -> Any:
        return handler

    class Details:
        method = "/x.Y/Z"

    with pytest.raises(TypeError, match="async generator or a coroutine"):
        asyncio.run(Instrument(Metrics(), _NoPeers()).intercept_service(continuation, Details()))
