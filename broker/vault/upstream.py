"""Upstream secrets per (workflow, tool): fetched from Vault on first use, kept fresh, pushed on rotation.

(Named ``upstream`` rather than ``secrets`` so that it can never be mistaken for the standard library's
``secrets`` module.)

Lifecycle of one entry: the first :meth:`SecretManager.get` issues the credential; from then on the
manager's background task keeps it current:

- kv: re-read every ``min(kv_refresh, max_staleness / 2)`` and on :meth:`SecretManager.refresh`; a new
  version (or new content) is a rotation. Served for ``max_staleness`` after the last successful read.
- database, token: the lease is renewed at 2/3 of its TTL; when Vault grants less than asked (the max
  TTL is near), a new credential is issued at 2/3 of what is left. Served until the lease ends.
- pki: a new certificate at 2/3 of the current one's lifetime. Served until its notAfter; its serial
  number is kept like a lease, so the certificate is revoked where a lease would be.

When Vault fails, the cached value keeps being served until the limits above, retries back off with
jitter, and :attr:`SecretManager.degraded` says what is wrong; past the limit, :meth:`get` raises
:class:`SecretUnavailable`. Replaced leases are kept in the books until they expire, and every lease
still alive is revoked in Vault by :meth:`revoke_workflow` and :meth:`close`; a revocation that fails
is retried, never forgotten, until the credential expires; one that Vault's policy refuses (403) is
retried too and reported in :attr:`SecretManager.degraded`, since the operator can grant the capability.

Threading: every method runs on the daemon's event loop and the state is touched only there. Vault
requests go through the session, whose transport runs hvac on its own thread; the loop awaits those
results, so no lock and no ``call_soon_threadsafe`` is needed, and no RPC waits on hvac directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Final

from broker.config import SecretSpec, Workflow
from broker.vault import _engines
from broker.vault._backoff import Backoff
from broker.vault._engines import Lease, Vault
from broker.vault._errors import (
    NoSecretConfigured,
    SecretUnavailable,
    VaultAuthError,
    VaultError,
    VaultRequestError,
    VaultUnavailable,
)
from broker.vault._value import SecretValue

log = logging.getLogger("broker.vault")

RENEW_AT: Final = 2 / 3
# How long a caller may wait for Vault when nothing usable is cached. Past this the call fails with
# SecretUnavailable, while the fetch itself runs on and fills the cache for the next call.
DEFAULT_REQUEST_TIMEOUT: Final = 5.0
# The scheduler wakes at least this often even with nothing due: it notices a replaced session token
# (whose leases must be re-issued) within this time, and a changed clock cannot stall it.
MAX_IDLE: Final = 1.0
# Backoff for one entry's retries stays well below typical lease and staleness windows.
RETRY_CAP: Final = 15.0
# A credential with less life than this left on arrival is refused (clock skew, a broken answer).
MIN_LIFETIME: Final = 1.0


class _Watcher:
    """One subscriber: holds only the newest value, because every message carries the full state."""

    def __init__(self) -> None:
        self._value: SecretValue | None = None
        self._error: SecretUnavailable | None = None
        self._ready = asyncio.Event()

    def push(self, value: SecretValue) -> None:
        self._value = value
        self._ready.set()

    def fail(self, error: SecretUnavailable) -> None:
        self._error = error
        self._ready.set()

    async def next(self) -> SecretValue:
        await self._ready.wait()
        self._ready.clear()
        if self._error is not None:
            raise self._error
        assert self._value is not None  # the event is only set by push or fail
        return self._value


@dataclass(eq=False)
class _Entry:
    workflow: str
    tool: str
    spec: SecretSpec
    backoff: Backoff
    value: SecretValue | None = None
    lease: Lease | None = None
    confirmed_at: float = -math.inf  # when Vault last vouched for a kv value
    next_at: float = math.inf
    reissue_at: float = math.inf
    issued: int = 0
    error: VaultError | None = None
    active: bool = False
    retired: list[Lease] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    watchers: set[_Watcher] = field(default_factory=set)
    # Bumped by every drop: a Vault request that started before it must not store what it got.
    epoch: int = 0

    @property
    def name(self) -> str:
        return f"{self.workflow}/{self.tool}"


class SecretManager:
    """The upstream secrets of every tool that declares ``secret = {...}``. See the module docstring."""

    def __init__(self, vault: Vault, workflows: Mapping[str, Workflow], *, kv_refresh: int, max_staleness: int,
                 clock: Callable[[], float] = time.time, rng: random.Random | None = None,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT) -> None:
        self._vault = vault
        self._clock = clock
        self._max_staleness = max_staleness
        # Re-read KV at least twice per staleness window, so one failed read never makes it stale.
        self._kv_poll = min(float(kv_refresh), max_staleness / 2)
        self._request_timeout = request_timeout
        rng = self._rng = rng or random.SystemRandom()
        self._entries = {
            (wf.name, tool.name): _Entry(wf.name, tool.name, tool.secret, Backoff(rng, cap=RETRY_CAP))
            for wf in workflows.values() for tool in wf.tools.values() if tool.secret is not None
        }
        self._unrevoked: list[tuple[str, Lease]] = []
        self._revoke_backoff = Backoff(rng, cap=RETRY_CAP)
        self._revoke_at = -math.inf
        # Revocations that Vault's policy refused (403) at the last attempt: kept and retried, since an
        # operator can grant the capability, and reported as degraded so that they do not go unseen.
        self._refused: list[str] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- the daemon's side ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the maintenance task on the running loop."""
        self._task = asyncio.create_task(self._run(), name="vault-secrets")

    async def close(self) -> None:
        """Stop maintenance, end every watch stream, and revoke in Vault every lease still held."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for entry in self._entries.values():
            await self._drop(entry, SecretUnavailable(f"secret for {entry.name} unavailable: broker shutting down",
                                                      "shutdown"))
        await self._retry_revocations()
        for name, lease in self._unrevoked:
            # Lease ids identify, they do not authorise: logging them lets an operator revoke by hand.
            log.error("vault lease not revoked at shutdown secret=%s lease=%s expires_at=%d",
                      name, lease.describe(), lease.expires_at)

    async def revoke_workflow(self, workflow: str, tool: str | None = None) -> None:
        """Revoke every lease held for ``workflow`` (or only its ``tool``, runs included) and end its
        watch streams; a later get issues anew."""
        for entry in list(self._entries.values()):
            if entry.workflow == workflow and (tool is None or entry.tool.partition("@")[0] == tool):
                await self._drop(entry, SecretUnavailable(f"secret for {entry.name} unavailable: workflow revoked",
                                                          "workflow revoked"))
        await self._retry_revocations()

    @property
    def leases(self) -> int:
        """Leases (child tokens and certificates included) held right now, for the metrics."""
        return sum(1 for e in self._entries.values() if e.lease is not None)

    @property
    def degraded(self) -> str | None:
        """A summary of the secrets Vault currently fails to serve, refresh or revoke, or None."""
        reasons = []
        failing = [e for e in self._entries.values() if e.active and e.error is not None]
        if failing:
            reasons.append(f"{len(failing)} secret(s) failing to refresh, e.g. {failing[0].name}: {failing[0].error}")
        if self._refused:
            reasons.append(f"{len(self._refused)} revocation(s) refused by Vault's policy, retried until they expire, "
                           f"e.g. {self._refused[0]}")
        return "; ".join(reasons) or None

    # -- the request side -------------------------------------------------------------------------

    async def get(self, workflow: str, tool: str) -> SecretValue:
        """The current credential; fetched now if nothing servable is cached. Raises SecretUnavailable."""
        entry = self._entry(workflow, tool)
        value = self._servable(entry)
        if value is not None:
            return value
        return await self._fetch(entry)

    async def refresh(self, workflow: str, tool: str) -> SecretValue:
        """Like :meth:`get`, but a KV secret is re-read from Vault first (a rotation if it changed)."""
        entry = self._entry(workflow, tool)
        if entry.spec.kind != "kv":
            return await self.get(workflow, tool)
        return await self._fetch(entry)

    async def watch(self, workflow: str, tool: str) -> AsyncGenerator[SecretValue, None]:
        """The current credential, then the full new one at every rotation, until the workflow is revoked
        or the broker stops (then SecretUnavailable is raised). Close the iterator to unsubscribe."""
        async for value in self._follow(self._entry(workflow, tool)):
            yield value

    async def watch_run(self, workflow: str, tool: str, run: str) -> AsyncGenerator[SecretValue, None]:
        """Like :meth:`watch`, for one run (a ``broker exec`` session): a leased kind gets a credential of its
        own, renewed and rotated like any other, and revoked in Vault as soon as the iterator closes, so
        what a run was issued ends with the run. KV secrets carry no lease and are shared as with watch."""
        shared = self._entry(workflow, tool)
        if shared.spec.kind == "kv":
            async for value in self._follow(shared):
                yield value
            return
        key = (workflow, f"{tool}@{run}")
        entry = _Entry(workflow, key[1], shared.spec, Backoff(self._rng, cap=RETRY_CAP))
        self._entries[key] = entry
        try:
            async for value in self._follow(entry):
                yield value
        finally:
            # Shielded: the stream is usually closing because it was cancelled, and the revocation must
            # still happen (the entry leaves the books only once its leases are queued for revocation).
            await asyncio.shield(self._end_run(key, entry))

    async def _follow(self, entry: _Entry) -> AsyncIterator[SecretValue]:
        watcher = _Watcher()
        entry.watchers.add(watcher)
        try:
            last = self._servable(entry) or await self._fetch(entry)
            yield last
            while True:
                value = await watcher.next()
                if value is not last:
                    last = value
                    yield value
        finally:
            entry.watchers.discard(watcher)

    async def _end_run(self, key: tuple[str, str], entry: _Entry) -> None:
        await self._drop(entry, SecretUnavailable(f"secret for {entry.name} unavailable: run ended", "run ended"))
        self._entries.pop(key, None)
        await self._retry_revocations()

    def _entry(self, workflow: str, tool: str) -> _Entry:
        entry = self._entries.get((workflow, tool))
        if entry is None:
            raise NoSecretConfigured(f"tool {tool!r} of workflow {workflow!r} has no upstream secret")
        return entry

    def _servable(self, entry: _Entry) -> SecretValue | None:
        value = entry.value
        if value is None:
            return None
        if entry.spec.kind == "kv":
            until = entry.confirmed_at + self._max_staleness
        elif (entry.lease is not None and entry.lease.dies_with_session
              and entry.lease.generation != self._vault.generation):
            return None  # made under a token that has since been replaced: revoked with it, or soon
        else:
            until = entry.lease.expires_at if entry.lease is not None else value.expires_at or math.inf
        return value if self._clock() < until else None

    async def _fetch(self, entry: _Entry) -> SecretValue:
        idle = entry.task is None or entry.task.done()
        # Vault failed moments ago and a retry is scheduled: answer from what we have instead of piling
        # requests onto a Vault that is down (and making the caller wait for its timeout again).
        if entry.error is None or not idle or self._clock() >= entry.next_at:
            if not entry.active:
                entry.active = True
                self._wake.set()
            entry.next_at = min(entry.next_at, self._clock())
            with contextlib.suppress(TimeoutError):
                # Shielded: a caller giving up must not cancel a request that may be creating a lease.
                await asyncio.wait_for(asyncio.shield(self._step_task(entry)), self._request_timeout)
        value = self._servable(entry)
        if value is not None:
            return value
        raise self._unavailable(entry)

    def _unavailable(self, entry: _Entry) -> SecretUnavailable:
        error = entry.error
        if isinstance(error, VaultRequestError) and error.status == 404:
            why = "it was not found in Vault"
        elif isinstance(error, VaultRequestError) and error.status == 403:
            why = "Vault denied the broker access to it"
        elif error is None:
            why = "Vault did not answer in time"
        elif isinstance(error, VaultAuthError):
            why = "the broker cannot log in to Vault"
        elif entry.value is not None:
            why = "Vault cannot be reached and the cached value has expired"
        else:
            why = "Vault cannot be reached"
        return SecretUnavailable(f"secret for {entry.name} unavailable: {why}", str(error or "timeout"))

    # -- maintenance ------------------------------------------------------------------------------

    def _step_task(self, entry: _Entry) -> asyncio.Task[None]:
        # One Vault operation per entry at a time: a caller and the scheduler share the same step.
        if entry.task is None or entry.task.done():
            entry.task = asyncio.create_task(self._step(entry), name=f"vault-secret-{entry.name}")
        return entry.task

    async def _run(self) -> None:
        while True:
            for entry in list(self._entries.values()):
                now = self._clock()
                lease = entry.lease
                if (lease is not None and lease.dies_with_session and lease.generation != self._vault.generation
                        and entry.reissue_at > now):
                    # Our token was replaced: this lease dies with the old one, so replace it now (once;
                    # if that fails, the entry's backoff paces the retries).
                    entry.reissue_at = entry.next_at = now
                if entry.active and entry.next_at <= self._clock():
                    # Shielded: stopping this loop (shutdown) must not cancel a request that may be
                    # creating a lease; close() waits for it and revokes what it made.
                    await asyncio.shield(self._step_task(entry))
            if self._unrevoked and self._clock() >= self._revoke_at:
                await self._retry_revocations()
                if self._unrevoked:
                    self._revoke_at = self._clock() + self._revoke_backoff.next()
                else:
                    self._revoke_backoff.reset()
            now = self._clock()
            for entry in self._entries.values():
                entry.retired = [lease for lease in entry.retired if lease.expires_at > now]
            due = min((e.next_at for e in self._entries.values() if e.active), default=math.inf)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(MAX_IDLE, max(0.01, due - now)))

    async def _step(self, entry: _Entry) -> None:
        try:
            lease = entry.lease
            now = self._clock()
            if (entry.value is None or lease is None or not lease.renewable or now >= entry.reissue_at
                    or self._servable(entry) is None):
                await self._issue(entry)
            else:
                try:
                    await self._renew(entry, lease)
                except VaultRequestError as exc:
                    # The lease is gone (revoked in Vault, or its parent token died): issue a new one.
                    log.warning("vault lease renewal refused secret=%s: %s; issuing a new one", entry.name, exc)
                    await self._issue(entry)
        except VaultError as exc:
            self._failed(entry, exc)
            return
        except Exception as exc:
            # A bug or a surprise from a library must not end maintenance of every other secret.
            log.exception("vault secret=%s: unexpected error", entry.name)
            self._failed(entry, VaultError(f"internal error: {type(exc).__name__}"))
            return
        if entry.error is not None:
            log.info("vault secret=%s recovered", entry.name)
        entry.error = None
        entry.backoff.reset()

    def _failed(self, entry: _Entry, error: VaultError) -> None:
        entry.error = error
        delay = entry.backoff.next()
        entry.next_at = self._clock() + delay
        log.warning("vault secret=%s: %s; retrying in %.1fs", entry.name, error, delay)

    async def _issue(self, entry: _Entry) -> None:
        epoch = entry.epoch
        issued = await _engines.issue(self._vault, entry.spec, label=f"broker-{entry.workflow}-{entry.tool}",
                                      version=entry.issued + 1, now=self._clock())
        if entry.epoch != epoch:
            # Dropped while Vault answered (run ended, workflow removed, shutdown): nobody may get this
            # credential, and what it holds in Vault is given back.
            if issued.lease is not None:
                self._unrevoked.append((entry.name, issued.lease))
                self._wake.set()
            return
        now = self._clock()
        old, new = entry.value, issued.value
        if new.expires_at is not None and new.expires_at - now < MIN_LIFETIME:
            # Already (nearly) over when it arrives: Vault's clock is ahead of ours, or its answer is
            # wrong. Serving it is pointless and re-issuing at once would hammer Vault in a loop: give
            # it back and retry with backoff, reported as degraded.
            if issued.lease is not None:
                self._unrevoked.append((entry.name, issued.lease))
            raise VaultUnavailable(f"Vault issued a credential that ends in {new.expires_at - now:.0f}s "
                                   "(clocks out of step?)")
        if entry.spec.kind == "kv":
            entry.confirmed_at, entry.next_at = now, now + self._kv_poll
            if old is not None and old.version == new.version and old.data == new.data:
                return
        else:
            if entry.lease is not None:
                # The replaced credential stays valid until it expires; keep it in the books for revocation.
                entry.retired.append(entry.lease)
            entry.lease = issued.lease and dataclasses.replace(issued.lease, generation=self._vault.generation)
            if issued.lease is not None and issued.lease.renewable:
                entry.reissue_at, entry.next_at = math.inf, now + issued.lease.ttl * RENEW_AT
            else:
                end = new.expires_at if new.expires_at is not None else now
                entry.reissue_at = entry.next_at = now + max(0.0, end - now) * RENEW_AT
        entry.issued += 1
        entry.value = new
        log.info("vault secret=%s issued kind=%s version=%d", entry.name, new.kind, new.version)
        for watcher in entry.watchers:
            watcher.push(new)

    async def _renew(self, entry: _Entry, lease: Lease) -> None:
        now, epoch = self._clock(), entry.epoch
        renewed = await _engines.renew(self._vault, lease, now)
        if entry.epoch != epoch:
            return  # dropped meanwhile: the lease is already queued for revocation
        granted = renewed.expires_at - now
        entry.lease = renewed
        assert entry.value is not None  # renewal only happens for a held credential
        # Same credential, new end: not a rotation, so watchers are not woken.
        entry.value = dataclasses.replace(entry.value, expires_at=renewed.expires_at)
        entry.next_at = now + granted * RENEW_AT
        if granted < lease.ttl:
            # Vault capped the renewal: the max TTL is near, so replace the credential before it ends.
            entry.reissue_at = entry.next_at
        log.info("vault secret=%s renewed ttl=%ds", entry.name, int(granted))

    async def _drop(self, entry: _Entry, reason: SecretUnavailable) -> None:
        if entry.task is not None and not entry.task.done():
            # Let an in-flight issue finish, so that a lease it creates is in the books before revoking.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(entry.task), self._request_timeout)
        entry.epoch += 1
        leases = ([entry.lease] if entry.lease is not None else []) + entry.retired
        self._unrevoked.extend((entry.name, lease) for lease in leases)
        entry.value, entry.lease, entry.retired, entry.error = None, None, [], None
        entry.active, entry.next_at, entry.reissue_at = False, math.inf, math.inf
        entry.confirmed_at = -math.inf
        for watcher in entry.watchers:
            watcher.fail(reason)

    async def _retry_revocations(self) -> None:
        pending, self._unrevoked = self._unrevoked, []
        refused: list[str] = []
        now = self._clock()
        for i, (name, lease) in enumerate(pending):
            if lease.expires_at <= now:
                continue  # Vault has already ended it
            try:
                declined = await _engines.revoke(self._vault, lease)
            except asyncio.CancelledError:
                # Shutdown mid-way: this lease and the untried ones stay in the books (revoking one
                # twice is harmless; forgetting one is not).
                self._unrevoked.extend(pending[i:])
                raise
            except VaultRequestError as exc:
                if exc.status == HTTPStatus.FORBIDDEN:
                    # Our policy lacks the revoke capability (a setup mistake an operator can fix while
                    # we run): dropping it would leave the credential alive for its whole TTL.
                    log.warning("vault revocation refused by policy secret=%s kind=%s: %s; will retry",
                                name, lease.kind, exc)
                    refused.append(f"{name} ({lease.kind}): {exc}")
                    self._unrevoked.append((name, lease))
                else:
                    # Any other 4xx: the lease or token no longer exists; nothing to retry.
                    log.warning("vault revocation refused secret=%s: %s", name, exc)
            except VaultError as exc:
                log.warning("vault revocation failed secret=%s: %s; will retry", name, exc)
                self._unrevoked.append((name, lease))
            else:
                if declined:
                    log.info("vault declined to revoke secret=%s kind=%s: %s", name, lease.kind, declined)
                else:
                    log.info("vault lease revoked secret=%s kind=%s", name, lease.kind)
        self._refused = refused
