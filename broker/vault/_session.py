"""The broker's own identity in Vault: log in, keep the token alive, log in again when it dies.

Two auth methods (``[vault.auth]``): ``approle`` reads role_id and secret_id from files, and the
secret_id file may instead hold a response-wrapping token, unwrapped once (a wrapping token works only
once, so a second unwrap failing means someone else unwrapped it first); ``token`` reads a token from a
file, for development. The token is renewed at two thirds of its TTL; when renewal fails, when the token
has reached its max TTL, or when Vault says it is no longer valid, the session logs in again.

The token never leaves this object: it is not logged, not put in an exception, not given to hvac's
client (each request carries it in a header), and ``repr`` does not show it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from broker.config import VaultSettings
from broker.vault._backoff import Backoff
from broker.vault._engines import MAX_SECONDS
from broker.vault._errors import VaultAuthError, VaultError, VaultRequestError, VaultUnavailable
from broker.vault._transport import DEFAULT_TIMEOUT, VaultTransport

log = logging.getLogger("broker.vault")

# How often a healthy session asks Vault "is my token still valid?": bounds how long a token revoked
# behind the broker's back, or a Vault outage, goes unnoticed when no other request happens.
DEFAULT_CHECK_EVERY: Final = 30.0
# OpenBao and Vault lock a login out for 15 minutes after 5 refused attempts within 15 minutes ("user
# lockout", on by default for AppRole). Every consumer's request logs in when there is no token, so a 1 s
# KV poll alone would lock the broker out seconds after one refusal (seen on a Raft cluster: a standby
# that had not yet replicated a new role refused it). After a refusal, at most one login per this many
# seconds: four in any 15 minutes.
LOGIN_REFUSED_PAUSE: Final = 240.0
MAX_CREDENTIAL_FILE_BYTES: Final = 4096
# Vault generates secret IDs as UUIDs; anything else in the secret_id file is taken as a wrapping token.
_UUID_RE: Final = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")


def _read_credential(path: str, what: str) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CREDENTIAL_FILE_BYTES + 1)
    except OSError as exc:
        raise VaultAuthError(f"cannot read the {what} file {path}: {exc.strerror}") from None
    text = raw.decode("utf-8", "replace").strip()
    if not text or len(raw) > MAX_CREDENTIAL_FILE_BYTES or any(c.isspace() for c in text):
        raise VaultAuthError(f"the {what} file {path} does not hold a single {what}")
    return text


def _field(body: Mapping[str, Any], section: str, key: str) -> Any:
    part = body.get(section)
    if not isinstance(part, dict) or key not in part:
        raise VaultUnavailable(f"Vault's answer lacks {section}.{key}")
    return part[key]


def _flag(body: Mapping[str, Any], section: str, key: str) -> bool:
    """An optional boolean of Vault's answer; absent means false, as Vault's API documents. The root token
    of an initialised server is one such case: its lookup has no ``renewable`` at all."""
    part = body.get(section)
    if not isinstance(part, dict):
        raise VaultUnavailable(f"Vault's answer lacks {section}")
    value = part.get(key, False)
    if not isinstance(value, bool):
        raise VaultUnavailable(f"Vault's answer has a malformed {section}.{key}")
    return value


def _duration(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < MAX_SECONDS:
        raise VaultUnavailable("Vault's answer has a malformed TTL")
    return value


class VaultSession:
    """A logged-in connection to Vault, shared by the fleet JWKS and the secret manager.

    Call :meth:`start` on the daemon's event loop; it logs in (failure only logs: the broker serves
    without Vault) and starts the keep-alive task. :meth:`request` is what consumers use.
    """

    def __init__(self, settings: VaultSettings, *, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None, timeout: float = DEFAULT_TIMEOUT,
                 check_every: float = DEFAULT_CHECK_EVERY, login_refused_pause: float = LOGIN_REFUSED_PAUSE,
                 observe: Callable[[str, float, bool], None] | None = None) -> None:
        self._settings = settings
        # Called after every request with (HTTP method, seconds, succeeded): the daemon's metrics.
        self._observe = observe
        self._clock = clock
        self._transport = VaultTransport(settings.nodes, ca_file=settings.ca_file, timeout=timeout)
        self._backoff = Backoff(rng or random.SystemRandom())
        self._check_every = check_every
        self._login_refused_pause = login_refused_pause
        self._refused: tuple[float, VaultAuthError] | None = None  # (no login before, the refusal)
        self._token: str | None = None
        self._requested_ttl = 0
        self._renew_at = math.inf
        self._relogin_at = math.inf
        self._unwrapped: tuple[str, str] | None = None  # (wrapping token, secret_id), memory only
        self._login_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._degraded: str | None = None
        self._accessor: str | None = None
        self.logins = 0
        # Bumps when the session's token is replaced by a different one. Leases and child tokens die with
        # the token that created them, so the secret manager re-issues those made under an older one.
        self.generation = 0

    def __repr__(self) -> str:
        return f"VaultSession(address={self._transport.address!r}, logged_in={self.logged_in})"

    @property
    def logged_in(self) -> bool:
        return self._token is not None

    @property
    def degraded(self) -> str | None:
        """Why Vault is unusable right now, or None when the last exchange with it worked."""
        return self._degraded

    async def start(self) -> None:
        try:
            await self._ensure_token()
        except VaultError as exc:
            log.warning("vault login failed, will retry: %s", exc)
        self._task = asyncio.create_task(self._keepalive(), name="vault-session")

    async def close(self) -> None:
        """Stop renewing; revoke our own token if we logged in for it (never an operator's token file)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        token, self._token = self._token, None
        if token is not None and self._settings.auth.method == "approle":
            with contextlib.suppress(VaultError):
                await self._transport.send("POST", "auth/token/revoke-self", token=token)
        await asyncio.get_running_loop().run_in_executor(None, self._transport.close)

    async def request(self, method: str, path: str, data: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """One authenticated request. A token that Vault no longer accepts triggers one re-login + retry."""
        token = await self._ensure_token()
        try:
            return await self._send(method, path, data, token)
        except VaultRequestError as exc:
            # Vault says 403 both for a dead token and for a policy denial; only the first is ours to fix.
            if exc.status != 403 or await self._token_alive(token):
                raise
        log.warning("vault token no longer valid; logging in again")
        self._forget(token)
        return await self._send(method, path, data, await self._ensure_token())

    async def send_with(self, token: str, method: str, path: str,
                        data: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A request made with another token (e.g. renewing a child token by itself)."""
        return await self._send(method, path, data, token)

    async def _send(self, method: str, path: str, data: Mapping[str, Any] | None, token: str | None
                    ) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            body = await self._transport.send(method, path, data, token=token)
        except VaultUnavailable as exc:
            self._mark_degraded(str(exc))
            self._observed(method, started, ok=False)
            raise
        except VaultError:
            self._observed(method, started, ok=False)
            raise
        self._mark_healthy()
        self._observed(method, started, ok=True)
        return body

    def _observed(self, method: str, started: float, *, ok: bool) -> None:
        if self._observe is not None:
            self._observe(method, time.perf_counter() - started, ok)

    def _mark_degraded(self, reason: str) -> None:
        if self._degraded != reason:
            log.warning("vault degraded: %s", reason)
        self._degraded = reason

    def _mark_healthy(self) -> None:
        if self._degraded is not None:
            log.info("vault reachable again")
        self._degraded = None

    async def _ensure_token(self) -> str:
        if self._token is not None:
            return self._token
        async with self._login_lock:
            if self._refused is not None and self._clock() < self._refused[0]:
                raise VaultAuthError(f"{self._refused[1]} (next login attempt in "
                                     f"{self._refused[0] - self._clock():.0f}s)")
            if self._token is None:
                await self._login()
            assert self._token is not None  # _login either sets it or raises
            return self._token

    def _forget(self, token: str) -> None:
        if self._token == token:
            self._token = None

    async def _token_alive(self, token: str) -> bool:
        try:
            await self._send("GET", "auth/token/lookup-self", None, token)
        except VaultRequestError as exc:
            return exc.status != 403
        return True

    async def _login(self) -> None:
        try:
            if self._settings.auth.method == "approle":
                token, accessor, ttl, renewable = await self._approle_login()
            else:
                token, accessor, ttl, renewable = await self._token_file_login()
        except VaultRequestError as exc:
            failure = VaultAuthError(f"vault login refused: {exc}")
            self._refused = (self._clock() + self._login_refused_pause, failure)
            self._mark_degraded(str(failure))
            raise failure from None
        except VaultAuthError as exc:
            self._mark_degraded(str(exc))
            raise
        self._token = token
        self._refused = None
        self.logins += 1
        if accessor != self._accessor:
            self._accessor = accessor
            self.generation += 1
        self._schedule(ttl, renewable, requested=ttl, fresh=True)
        log.info("vault login ok method=%s ttl=%ds renewable=%s", self._settings.auth.method, ttl, renewable)

    async def _approle_login(self) -> tuple[str, str, int, bool]:
        auth = self._settings.auth
        assert auth.role_id_file is not None and auth.secret_id_file is not None  # checked by config
        role_id = _read_credential(auth.role_id_file, "role_id")
        secret_id = await self._secret_id(_read_credential(auth.secret_id_file, "secret_id"))
        body = await self._send("POST", "auth/approle/login", {"role_id": role_id, "secret_id": secret_id}, None)
        token = _field(body, "auth", "client_token")
        if not isinstance(token, str) or not token:
            raise VaultUnavailable("Vault's login answer has no token")
        return (token, str(_field(body, "auth", "accessor")), _duration(_field(body, "auth", "lease_duration")),
                _flag(body, "auth", "renewable"))

    async def _secret_id(self, content: str) -> str:
        if _UUID_RE.match(content):
            return content
        if self._unwrapped is not None and self._unwrapped[0] == content:
            return self._unwrapped[1]
        try:
            body = await self._send("POST", "sys/wrapping/unwrap", None, content)
        except VaultRequestError:
            # A wrapping token can be unwrapped once. If it no longer works, whoever unwrapped it
            # holds our secret_id: say so, instead of a generic login failure.
            raise VaultAuthError("the secret_id file holds a wrapping token that Vault does not accept: it "
                                 "expired or was already unwrapped (possibly intercepted); issue a new one"
                                 ) from None
        secret_id = _field(body, "data", "secret_id")
        if not isinstance(secret_id, str) or not secret_id:
            raise VaultAuthError("the unwrapped response holds no secret_id")
        self._unwrapped = (content, secret_id)
        return secret_id

    async def _token_file_login(self) -> tuple[str, str, int, bool]:
        assert self._settings.auth.token_file is not None  # checked by config
        token = _read_credential(self._settings.auth.token_file, "token")
        try:
            body = await self._send("GET", "auth/token/lookup-self", None, token)
        except VaultRequestError as exc:
            raise VaultAuthError(f"the token in {self._settings.auth.token_file} is not valid: {exc}") from None
        return (token, str(_field(body, "data", "accessor")), _duration(_field(body, "data", "ttl")),
                _flag(body, "data", "renewable"))

    def _schedule(self, ttl: int, renewable: bool, *, requested: int, fresh: bool) -> None:
        now = self._clock()
        if fresh:
            self._requested_ttl = requested
        if ttl == 0:  # a token without expiry (a root token in development)
            self._renew_at = self._relogin_at = math.inf
        elif renewable and ttl >= self._requested_ttl:
            self._renew_at, self._relogin_at = now + ttl * 2 / 3, math.inf
        else:
            # Not renewable, or renewal was capped by the max TTL: the token will die; replace it early.
            self._renew_at, self._relogin_at = math.inf, now + ttl * 2 / 3

    async def _renew(self, token: str) -> None:
        try:
            body = await self._send("POST", "auth/token/renew-self", {"increment": f"{self._requested_ttl}s"}, token)
        except VaultRequestError as exc:
            log.warning("vault token renewal refused (%s); logging in again", exc)
            self._forget(token)
            return
        auth = body.get("auth")
        ttl = _duration(auth.get("lease_duration") if isinstance(auth, dict) else None)
        self._schedule(ttl, True, requested=self._requested_ttl, fresh=False)
        log.info("vault token renewed ttl=%ds", ttl)

    async def _keepalive(self) -> None:
        while True:
            try:
                await self._maintain()
                self._backoff.reset()
                now = self._clock()
                delay = min(self._check_every, max(0.0, min(self._renew_at, self._relogin_at) - now))
            except VaultError as exc:
                delay = self._backoff.next()
                log.warning("vault session: %s; retrying in %.1fs", exc, delay)
            except Exception:
                # Keep the session alive through surprises; the broker must not lose Vault for good.
                delay = self._backoff.next()
                log.exception("vault session: unexpected error; retrying in %.1fs", delay)
            await asyncio.sleep(delay)

    async def _maintain(self) -> None:
        now = self._clock()
        token = self._token
        if token is not None and now >= self._relogin_at:
            self._forget(token)
        elif token is not None and now >= self._renew_at:
            await self._renew(token)
        elif token is not None and not await self._token_alive(token):
            log.warning("vault token was revoked or expired; logging in again")
            self._forget(token)
        await self._ensure_token()
