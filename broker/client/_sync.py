"""The synchronous client: what an agent imports to get tokens just in time.

Identity is never sent: the daemon learns it from the kernel when this process connects.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Final, TypeVar

import grpc

from broker.client._cache import DEFAULT_REFRESH_FRACTION, Minted, still_usable
from broker.client._errors import retryable, translate
from broker.client._socket import resolve_socket
from broker.errors import BrokerError, Unavailable
from broker.v1 import broker_pb2 as pb
from broker.v1 import broker_pb2_grpc as pb_grpc
from broker.vault import SecretValue

DEFAULT_TIMEOUT: Final = 5.0
# Retries of a call that could not reach the daemon (or found it busy), 50 ms apart and then 200 ms:
# about one second in all before Unavailable. Short, since the daemon is local; several, since a
# connect can fail while another user floods the listen queue (see CHANNEL_OPTIONS).
DEFAULT_RETRIES: Final = 6
# A local daemon is either there or not: reconnect within 50 ms instead of gRPC's default 1 s (and
# at most every 2 s, not 120 s). A connect can fail while the daemon is up: when another local user
# keeps the listen queue full by connecting and closing in a loop, a connect finds it full about half
# the time, and with the default backoff every retry of a call came before the next connect attempt.
CHANNEL_OPTIONS: Final = (("grpc.initial_reconnect_backoff_ms", 50), ("grpc.min_reconnect_backoff_ms", 50),
                          ("grpc.max_reconnect_backoff_ms", 2000))
R = TypeVar("R")


def retry_delay(attempt: int) -> float:
    """Seconds to wait before retry number ``attempt`` (from 0)."""
    return min(0.05 * 2.0 ** attempt, 0.2)


def secret_value(msg: pb.Secret) -> SecretValue:
    return SecretValue(msg.kind, dict(msg.data), msg.version, msg.lease_id or None, msg.expires_at or None,
                       msg.renewable)


class Client:
    """Sync client. ``token()`` caches per (workflow, tool, audience) and refreshes before expiry; when
    several threads need the same token at once, one of them asks the daemon and the others wait for it."""

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
        self._channel = grpc.insecure_channel(f"unix:{self._path}", options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.BrokerStub(self._channel)
        self._cache: dict[tuple[str, str, str], tuple[Minted, float]] = {}
        self._locks: dict[tuple[str, str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()

    @property
    def socket_path(self) -> str:
        return self._path

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Callable[..., R], request: Any, *, retries: int | None = None) -> R:
        attempts = (self._retries if retries is None else retries) + 1
        for attempt in range(attempts):
            try:
                return method(request, timeout=self._timeout)
            except grpc.RpcError as exc:
                if attempt + 1 < attempts and retryable(exc):
                    time.sleep(retry_delay(attempt))
                    continue
                raise translate(exc, self._path) from None
        raise AssertionError("unreachable")

    def mint(self, workflow: str, tool: str, *, audience: str = "", ttl: int = 0) -> Minted:
        """A fresh token from the daemon (no cache)."""
        r = self._call(self._stub.MintToken, pb.MintTokenRequest(
            workflow=workflow, tool=tool, audience=audience, ttl_seconds=ttl))
        return Minted(r.token, r.jti, r.issued_at, r.expires_at)

    def token(self, tool: str, audience: str = "", *, workflow: str | None = None) -> str:
        """A valid token for ``tool``, from the cache until its refresh point, then from the daemon."""
        wf = workflow or self._workflow
        if not wf:
            raise BrokerError("no workflow: pass workflow= to Client() or token()")
        key = (wf, tool, audience)
        hit = self._fresh(key)
        if hit is not None:
            return hit
        with self._lock_for(key):
            hit = self._fresh(key)  # another thread may have refreshed while we waited
            if hit is not None:
                return hit
            old = self._cache.get(key)
            try:
                minted = self.mint(wf, tool, audience=audience)
            except Unavailable:
                # The daemon is away: a cached token that has not expired yet is still good. A refusal
                # (PermissionDenied and the like) is never answered with the old token.
                if old is not None and still_usable(old[0], self._clock()):
                    return old[0].token
                raise
            self._cache[key] = (minted, minted.refresh_at(self._fraction))
            return minted.token

    def _fresh(self, key: tuple[str, str, str]) -> str | None:
        entry = self._cache.get(key)
        if entry is not None and self._clock() < entry[1]:
            return entry[0].token
        return None

    def _lock_for(self, key: tuple[str, str, str]) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    def verify(self, token: str, tool: str, *, audience: str = "") -> dict[str, Any]:
        r = self._call(self._stub.VerifyToken, pb.VerifyTokenRequest(token=token, tool=tool, audience=audience))
        claims: dict[str, Any] = json.loads(r.claims_json)
        return claims

    def jwks(self) -> str:
        return str(self._call(self._stub.GetJWKS, pb.GetJWKSRequest()).jwks_json)

    def revoke(self, tokens: list[str]) -> int:
        """Revoke tokens this process holds (e.g. at exit). Returns how many the daemon revoked."""
        return int(self._call(self._stub.RevokeTokens, pb.RevokeTokensRequest(tokens=tokens)).revoked)

    def describe(self, workflow: str) -> list[pb.ToolDelivery]:
        r = self._call(self._stub.DescribeWorkflow, pb.DescribeWorkflowRequest(workflow=workflow))
        return list(r.tools)

    def secret(self, tool: str, *, workflow: str | None = None, refresh: bool = False) -> SecretValue:
        """The tool's upstream credential (from Vault): ``.data`` holds its fields, ``.expires_at`` its end.
        Its repr never shows the values."""
        wf = workflow or self._workflow
        if not wf:
            raise BrokerError("no workflow: pass workflow= to Client() or secret()")
        return secret_value(self._call(self._stub.GetSecret, pb.GetSecretRequest(workflow=wf, tool=tool,
                                                                                 refresh=refresh)))

    def watch_secret(self, tool: str, *, workflow: str | None = None, per_run: bool = False
                     ) -> Iterator[SecretValue]:
        """The credential now, then the full new one at every rotation. ``per_run``: a leased credential of
        this stream's own, revoked when the stream ends."""
        wf = workflow or self._workflow
        if not wf:
            raise BrokerError("no workflow: pass workflow= to Client() or watch_secret()")
        try:
            for msg in self._stub.WatchSecret(pb.GetSecretRequest(workflow=wf, tool=tool, per_run=per_run)):
                yield secret_value(msg)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise translate(exc, self._path) from None

    def reload(self) -> tuple[bool, list[str], str]:
        """Admin only: make the daemon re-read its config. (applied, problems, config sha256)."""
        r = self._call(self._stub.Reload, pb.ReloadRequest(), retries=0)
        return bool(r.applied), list(r.problems), str(r.config_sha256)

    def status(self) -> dict[str, Any]:
        """Admin only: the daemon's state (uptime, backends, keys, counters, degraded reasons)."""
        status: dict[str, Any] = json.loads(self._call(self._stub.Status, pb.StatusRequest()).status_json)
        return status

    def whoami(self) -> dict[str, Any]:
        """What the daemon sees of this process: pid, uid, gid, user, groups, exe, exe_sha256, systemd_unit,
        and the workflows it matches. Empty strings where the daemon has no value."""
        r = self._call(self._stub.WhoAmI, pb.WhoAmIRequest())
        return {"pid": r.pid, "uid": r.uid, "gid": r.gid, "user": r.user, "groups": list(r.groups), "exe": r.exe,
                "exe_sha256": r.exe_sha256, "systemd_unit": r.systemd_unit, "workflows": list(r.workflows)}

    def watch(self) -> Iterator[tuple[str, dict[str, int]]]:
        """Yield (JWKS JSON, revoked jti -> exp) now and on every change, until the stream ends."""
        try:
            for msg in self._stub.WatchJWKS(pb.GetJWKSRequest()):
                yield msg.jwks_json, {r.jti: r.expires_at for r in msg.revoked}
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise translate(exc, self._path) from None
