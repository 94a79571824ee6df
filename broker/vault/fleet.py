"""The fleet-wide JWKS: every broker publishes its public keys to Vault and trusts the union.

Each instance writes one KV v2 secret, ``<kv_mount>/<jwks_path>/<instance>``, holding its JWK Set and a
``not_after`` time, and reads every sibling under the prefix. A token minted on one host therefore
verifies on any other. Private keys never leave the process: only ``VerifyKey.to_jwk()`` output is
written.

Ordering: the key ring makes its next key public one rotation before it signs, and the daemon calls
:meth:`FleetJwks.publish` after every ring change, so siblings learn a key well before its first token.
:meth:`FleetJwks.published` tells whether a given kid has reached Vault.

A broker that dies stops refreshing its entry. Its keys stay trusted until the entry's ``not_after``
(last heartbeat + the longest token lifetime + leeway), long enough for every token it minted to expire,
and are ignored after that.

Anyone who can write under the prefix can make the whole fleet accept their tokens: the Vault policy
must let each broker write only its own entry (see docs/vault.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, Final

from broker import tokens
from broker.config import VaultSettings
from broker.errors import BrokerError
from broker.tokens import VerifyKey
from broker.vault._engines import Vault
from broker.vault._errors import VaultError, VaultRequestError

log = logging.getLogger("broker.vault")

DEFAULT_REFRESH_EVERY: Final = 30.0
# Between two refreshes that a token with an unknown kid triggers.
MIN_ON_DEMAND: Final = 5.0
# A fleet larger than this is a misconfiguration or an attack on our memory; the rest are ignored.
MAX_INSTANCES: Final = 256
_INSTANCE_RE: Final = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?\Z")


def instance_name(settings: VaultSettings) -> str:
    """The configured instance name, else the host name reduced to the config's name alphabet."""
    if settings.instance:
        return settings.instance
    host = re.sub(r"[^a-z0-9._-]+", "-", socket.gethostname().lower()).strip("._-")[:64].strip("._-")
    if not _INSTANCE_RE.match(host):
        raise BrokerError("cannot derive a fleet instance name from the host name: set vault.instance")
    return host


class FleetJwks:
    """This instance's keys plus every live sibling's. All methods run on the daemon's event loop."""

    def __init__(self, vault: Vault, settings: VaultSettings, *, max_token_ttl: int,
                 clock: Callable[[], float] = time.time, refresh_every: float = DEFAULT_REFRESH_EVERY,
                 on_change: Callable[[], Awaitable[None]] | None = None) -> None:
        self.instance = instance_name(settings)
        self._vault = vault
        self._mount = settings.kv_mount
        self._prefix = settings.jwks_path
        self._clock = clock
        self._refresh_every = refresh_every
        # Siblings must keep trusting our entry through a missed heartbeat or two, and until every
        # token we may have signed just before the last one has expired.
        self._keep_for = max_token_ttl + tokens.MAX_LEEWAY + 3 * refresh_every
        self._on_change = on_change
        self._local: dict[str, VerifyKey] = {}
        # Keys this instance published before a restart (their private halves died with that process):
        # still published and trusted until that entry's not_after, so its tokens keep verifying.
        self._inherited: tuple[int, dict[str, VerifyKey]] | None = None
        self._adopted = False
        self._last_on_demand = -math.inf
        self._published: frozenset[str] = frozenset()
        # instance -> (not_after, its keys): an entry is dropped at its not_after even while Vault
        # cannot be read, so a dead sibling's keys never outlive the promise it made.
        self._siblings: dict[str, tuple[int, dict[str, VerifyKey]]] = {}
        self._union: Mapping[str, VerifyKey] = MappingProxyType({})
        self._task: asyncio.Task[None] | None = None
        self.version = 0

    def keys(self) -> Mapping[str, VerifyKey]:
        """The union of our keys and the siblings' (by kid). Never waits on Vault."""
        return self._union

    def jwks_json(self) -> str:
        """The union as an RFC 7517 JWK Set."""
        return json.dumps(tokens.jwks_document(self._union.values()), separators=(",", ":"))

    def published(self, kid: str) -> bool:
        """Whether ``kid`` was in the last set this instance successfully wrote to Vault."""
        return kid in self._published

    async def adopt_previous(self) -> None:
        """Before the first write after a start: keep the keys our previous run published (until its
        entry's not_after), or a restart would invalidate every token that run minted. Raises VaultError."""
        try:
            await self._vault.request("GET", f"{self._mount}/data/{self._prefix}/{self.instance}")
        except VaultRequestError as exc:
            if exc.status != 404:
                raise
            self._adopted = True  # a first start: nothing to keep
            return
        entry = await self._read_sibling(self.instance)
        self._adopted = True
        if entry is not None:
            self._inherited = entry
            log.info("fleet jwks: keeping %d key(s) of this instance's previous run until %d",
                     len(entry[1]), entry[0])

    async def publish(self, keys: Iterable[VerifyKey]) -> None:
        """Make ``keys`` our public set: in the local union at once, then in Vault. Raises VaultError;
        the background task retries a failed write at each refresh."""
        self._local = {k.kid: k for k in keys if k.public is not None}
        await self._changed_if(self._rebuild())
        await self._write()

    def _own(self) -> dict[str, VerifyKey]:
        """What we publish: our keys, plus the previous run's while they may still verify tokens."""
        if self._inherited is not None and self._inherited[0] < self._clock():
            self._inherited = None
        inherited = self._inherited[1] if self._inherited is not None else {}
        return {**inherited, **self._local}

    async def refresh(self) -> None:
        """Re-read every sibling's entry. Raises VaultError if the prefix cannot be listed."""
        try:
            listing = await self._vault.request("LIST", f"{self._mount}/metadata/{self._prefix}")
        except VaultRequestError as exc:
            if exc.status != 404:  # 404: nobody has published yet
                raise
            listing = {}
        names = listing.get("data", {}).get("keys", []) if isinstance(listing.get("data"), dict) else []
        siblings: dict[str, tuple[int, dict[str, VerifyKey]]] = {}
        for name in names[:MAX_INSTANCES] if isinstance(names, list) else []:
            if not isinstance(name, str) or name == self.instance or not _INSTANCE_RE.match(name):
                continue  # ourselves, a sub-folder, or a name no broker would use
            entry = await self._read_sibling(name)
            if entry is not None:
                siblings[name] = entry
        self._siblings = siblings
        await self._changed_if(self._rebuild())

    async def refresh_soon(self) -> bool:
        """Re-read the siblings now, unless that was done less than ``MIN_ON_DEMAND`` seconds ago (tokens
        with made-up kids must not turn into a flood of Vault requests). True if the key set changed."""
        now = self._clock()
        if now - self._last_on_demand < MIN_ON_DEMAND:
            return False
        self._last_on_demand = now
        version = self.version
        try:
            await self.refresh()
        except VaultError as exc:
            log.warning("fleet jwks: on-demand refresh failed: %s", exc)
            return False
        return self.version != version

    def start(self) -> None:
        """Start the heartbeat: republish our set and re-read the siblings every ``refresh_every``."""
        self._task = asyncio.create_task(self._run(), name="vault-fleet-jwks")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _write(self) -> None:
        if not self._adopted:
            await self.adopt_previous()  # never overwrite the previous run's keys unseen
            await self._changed_if(self._rebuild())
        local = self._own()
        document: dict[str, Any] = tokens.jwks_document(local.values())
        document["not_after"] = int(self._clock() + self._keep_for)
        await self._vault.request("POST", f"{self._mount}/data/{self._prefix}/{self.instance}", {"data": document})
        self._published = frozenset(local)

    async def _read_sibling(self, name: str) -> tuple[int, dict[str, VerifyKey]] | None:
        try:
            body = await self._vault.request("GET", f"{self._mount}/data/{self._prefix}/{name}")
        except VaultRequestError as exc:
            log.warning("fleet jwks: cannot read instance %s: %s", name, exc)
            return None
        data = body.get("data")
        entry = data.get("data") if isinstance(data, dict) else None
        if not isinstance(entry, dict):
            return None  # deleted
        not_after = entry.get("not_after")
        if not isinstance(not_after, int) or isinstance(not_after, bool) or not_after < self._clock():
            return None  # that broker stopped refreshing long enough ago that all its tokens have expired
        try:
            keys = tokens.keys_from_jwks({"keys": entry.get("keys")})
        except BrokerError as exc:
            # One broken entry must not take the fleet's other keys down with it.
            log.warning("fleet jwks: ignoring instance %s: %s", name, exc)
            return None
        return (not_after, keys) if keys else None

    def _expire(self) -> bool:
        """Drop siblings past their not_after (also while Vault cannot be read). True if any went."""
        now = self._clock()
        live = {name: entry for name, entry in self._siblings.items() if entry[0] >= now}
        if len(live) == len(self._siblings):
            return False
        self._siblings = live
        return True

    def _rebuild(self) -> bool:
        union: dict[str, VerifyKey] = {}
        owner: dict[str, str] = {}
        conflicts: set[str] = set()
        for name, (_, keys) in sorted(self._siblings.items()):
            for kid, key in keys.items():
                if kid in union and _jwk(union[kid]) != _jwk(key):
                    # Two instances claim one kid with different keys: one of them is broken or lying.
                    # Trust neither for it, rather than whichever was listed last.
                    log.warning("fleet jwks: instances %s and %s publish different keys as kid %s; "
                                "ignoring that kid", owner[kid], name, kid)
                    conflicts.add(kid)
                union.setdefault(kid, key)
                owner.setdefault(kid, name)
        for kid in conflicts:
            union.pop(kid, None)
        union.update(self._own())  # our own keys always win: nobody can shadow a kid we sign with
        # Compared by key material, not just by kid: a kid that changes its key is a change.
        if {k: _jwk(v) for k, v in union.items()} == {k: _jwk(v) for k, v in self._union.items()}:
            return False
        self._union = MappingProxyType(union)
        self.version += 1
        return True

    async def _changed_if(self, changed: bool) -> None:
        if changed and self._on_change is not None:
            await self._on_change()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_every)
            # The write doubles as our heartbeat: it moves not_after forward. Each step on its own: losing
            # write access must not also stop us from learning the siblings' keys.
            for step in (self._write, self.refresh):
                try:
                    await step()
                except VaultError as exc:
                    log.warning("fleet jwks %s failed (serving the keys already known): %s",
                                step.__name__.strip("_"), exc)
                except Exception:
                    log.exception("fleet jwks %s: unexpected error (serving the keys already known)",
                                  step.__name__.strip("_"))
            if self._expire() or (self._inherited is not None and self._inherited[0] < self._clock()):
                await self._changed_if(self._rebuild())


def _jwk(key: VerifyKey) -> str:
    return json.dumps(key.to_jwk(), sort_keys=True)
