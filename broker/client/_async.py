"""The asyncio client: the same API as :class:`broker.client.Client`, awaitable.

Single-flight: concurrent ``token()`` calls for the same key share one in-flight request (an
``asyncio.Future``), so 100 coroutines asking at once cost one RPC.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import grpc

from broker.client._cache import DEFAULT_REFRESH_FRACTION, Minted, still_usable
from broker.client._errors import retryable, translate
from broker.client._socket import resolve_socket
from broker.client._sync import CHANNEL_OPTIONS, DEFAULT_RETRIES, DEFAULT_TIMEOUT, retry_delay, secret_value
from broker.errors import BrokerError, Unavailable
from broker.v1 import broker_pb2 as pb
from broker.v1 import broker_pb2_grpc as pb_grpc
from broker.vault import SecretValue


class _Interrupted(Exception):
    """The shared fetch of a token was cancelled: whoever waited on it fetches again."""


class AsyncClient:
    def __init__(self, socket_path: str | None = None, *, workflow: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, retries: int = DEFAULT_RETRIES,
                 refresh_fraction: float = DEFAULT_REFRESH_FRACTION,
                 clock: Callable[[], float] = time.time) -> None:
        self._path = resolve_socket(socket_path)
        self._workflow = workflow
        self._timeout = timeout
        self._retries = retries
        self._fraction = refresh_fraction
        self._clock = clock
        self._channel = grpc.aio.insecure_channel(f"unix:{self._path}", options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.BrokerStub(self._channel)
        self._cache: dict[tuple[str, str, str], tuple[Minted, float]] = {}
        self._inflight: dict[tuple[str, str, str], asyncio.Future[Minted]] = {}

    @property
    def socket_path(self) -> str:
        return self._path

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: Callable[..., Any], request: Any) -> Any:
        for attempt in range(self._retries + 1):
            try:
                return await method(request, timeout=self._timeout)
            except grpc.RpcError as exc:
                if attempt < self._retries and retryable(exc):
                    await asyncio.sleep(retry_delay(attempt))
                    continue
                raise translate(exc, self._path) from None
        raise AssertionError("unreachable")

    async def mint(self, workflow: str, tool: str, *, audience: str = "", ttl: int = 0) -> Minted:
        r = await self._call(self._stub.MintToken, pb.MintTokenRequest(
            workflow=workflow, tool=tool, audience=audience, ttl_seconds=ttl))
        return Minted(r.token, r.jti, r.issued_at, r.expires_at)

    async def token(self, tool: str, audience: str = "", *, workflow: str | None = None) -> str:
        wf = workflow or self._workflow
        if not wf:
            raise BrokerError("no workflow: pass workflow= to AsyncClient() or token()")
        key = (wf, tool, audience)
        while True:
            entry = self._cache.get(key)
            if entry is not None and self._clock() < entry[1]:
                return entry[0].token
            pending = self._inflight.get(key)
            if pending is not None:
                try:
                    return (await asyncio.shield(pending)).token
                except _Interrupted:
                    continue  # the caller fetching for everyone was cancelled: fetch again
            pending = asyncio.get_running_loop().create_future()
            self._inflight[key] = pending
            try:
                minted = await self.mint(wf, tool, audience=audience)
                self._cache[key] = (minted, minted.refresh_at(self._fraction))
                pending.set_result(minted)
            except Unavailable as exc:
                # The daemon is away: a cached token that has not expired yet is still good.
                if entry is not None and still_usable(entry[0], self._clock()):
                    pending.set_result(entry[0])
                else:
                    pending.set_exception(exc)
            except BrokerError as exc:
                pending.set_exception(exc)  # refused (policy, bad request): never the old token
            except BaseException:
                # Cancelled (or a bug): callers waiting on this fetch must not wait forever.
                pending.set_exception(_Interrupted())
                pending.add_done_callback(lambda f: f.exception())  # retrieved, even with no waiter
                raise
            finally:
                del self._inflight[key]
            return (await asyncio.shield(pending)).token

    async def verify(self, token: str, tool: str, *, audience: str = "") -> dict[str, Any]:
        r = await self._call(self._stub.VerifyToken, pb.VerifyTokenRequest(token=token, tool=tool, audience=audience))
        claims: dict[str, Any] = json.loads(r.claims_json)
        return claims

    async def jwks(self) -> str:
        return str((await self._call(self._stub.GetJWKS, pb.GetJWKSRequest())).jwks_json)

    async def revoke(self, tokens: list[str]) -> int:
        return int((await self._call(self._stub.RevokeTokens, pb.RevokeTokensRequest(tokens=tokens))).revoked)

    async def describe(self, workflow: str) -> list[pb.ToolDelivery]:
        r = await self._call(self._stub.DescribeWorkflow, pb.DescribeWorkflowRequest(workflow=workflow))
        return list(r.tools)

    async def secret(self, tool: str, *, workflow: str | None = None, refresh: bool = False) -> SecretValue:
        """The tool's upstream credential (from Vault); its repr never shows the values."""
        wf = workflow or self._workflow
        if not wf:
            raise BrokerError("no workflow: pass workflow= to AsyncClient() or secret()")
        return secret_value(await self._call(self._stub.GetSecret, pb.GetSecretRequest(
            workflow=wf, tool=tool, refresh=refresh)))

    async def watch_secret(self, tool: str, *, workflow: str | None = None, per_run: bool = False
                           ) -> AsyncGenerator[SecretValue, None]:
        """The credential now, then the full new one at every rotation. ``per_run``: a leased credential of
        this stream's own, revoked when the stream ends."""
        wf = workflow or self._workflow
        if not wf:
            raise BrokerError("no workflow: pass workflow= to AsyncClient() or watch_secret()")
        try:
            async for msg in self._stub.WatchSecret(pb.GetSecretRequest(workflow=wf, tool=tool, per_run=per_run)):
                yield secret_value(msg)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise translate(exc, self._path) from None

    async def watch(self) -> AsyncIterator[tuple[str, dict[str, int]]]:
        """Yield (JWKS JSON, revoked jti -> exp) now and on every change, until the stream ends."""
        try:
            async for msg in self._stub.WatchJWKS(pb.GetJWKSRequest()):
                yield msg.jwks_json, {r.jti: r.expires_at for r in msg.revoked}
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise translate(exc, self._path) from None
