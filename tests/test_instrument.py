"""The interceptor on its own: what it does with handlers it cannot wrap faithfully."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from broker.instrument import Instrument
from broker.metrics import Metrics


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
