"""Offline verification for tool servers: keys and revocations kept fresh from the daemon's stream.

A tool server checks every request's token locally (no RPC per request) with :mod:`broker.tokens`;
this class keeps its key set and revocation list current by following ``WatchJWKS`` on a background
thread, reconnecting with backoff when the daemon restarts.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Final

from broker import tokens
from broker.client._sync import Client
from broker.errors import BrokerError, InvalidToken

log = logging.getLogger(__name__)
MAX_BACKOFF: Final = 10.0
# How long verification goes on with the last keys and revocations once the stream is lost. Long enough
# for a daemon restart; past it, a revocation or key retirement could have been missed, so every token
# is refused until the stream is back.
DEFAULT_MAX_STALE: Final = 300.0


class TokenVerifier:
    """Verify broker tokens offline. Start it (or use it as a context manager) before ``verify``."""

    def __init__(self, socket_path: str | None, trust_domain: str, *, clock: Callable[[], float] = time.time,
                 max_stale: float = DEFAULT_MAX_STALE) -> None:
        self._client = Client(socket_path, retries=0)
        self._trust_domain = trust_domain
        self._clock = clock
        self._max_stale = max_stale
        self._lost_at: float | None = None  # when the stream broke; None while it is up
        self._verifier = tokens.Verifier({})
        self._ready = threading.Event()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="broker-verifier", daemon=True)
        self.updates = 0  # how many stream messages were applied (for health and tests)

    def __enter__(self) -> TokenVerifier:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, timeout: float = 10.0) -> None:
        """Begin following the daemon; block until the first key set arrived."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise BrokerError(f"no keys from the broker daemon within {timeout}s")

    def close(self) -> None:
        self._closing.set()
        self._client.close()  # ends the stream the thread is blocked on
        if self._thread.is_alive():
            self._thread.join(5)

    def verify(self, token: str | bytes, *, tool: str, audience: str = "") -> tokens.Claims:
        """The token's claims, or :class:`broker.errors.InvalidToken` (expired, revoked, wrong tool, ...)."""
        now = self._clock()
        lost_at = self._lost_at
        if lost_at is not None and now - lost_at > self._max_stale:
            raise InvalidToken(f"the broker's key stream has been lost for {now - lost_at:.0f}s")
        expect = tokens.Expect(self._trust_domain, audience or tool, tool)
        return self._verifier.verify(token, expect, int(now))

    def _apply(self, jwks: str, revoked: dict[str, int]) -> None:
        self._verifier.set_keys(tokens.keys_from_jwks(jwks))
        for jti, exp in revoked.items():
            self._verifier.revoke(jti, exp)
        self._lost_at = None  # every message is the full state: nothing was missed
        self.updates += 1
        self._ready.set()

    def _follow(self) -> None:
        backoff = 0.1
        while not self._closing.is_set():
            try:
                for jwks, revoked in self._client.watch():
                    self._apply(jwks, revoked)
                    backoff = 0.1
            except Exception as exc:  # whatever broke it, keep trying: a dead thread would verify forever
                if self._closing.is_set():
                    return
                log.warning("verifier: lost the broker's key stream (%s); retrying", exc)
            if self._lost_at is None:
                self._lost_at = self._clock()
            # Jitter spreads the reconnects of many tool servers after a daemon restart.
            with contextlib.suppress(Exception):
                self._closing.wait(backoff * random.uniform(0.5, 1.5))  # noqa: S311 - not a secret
            backoff = min(backoff * 2, MAX_BACKOFF)
