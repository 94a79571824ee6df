"""Signing keys over time: the current key, the next one (published before use), and retiring ones.

Rotation path: key source -> key ring -> JWKS -> clients. The ring never reads the clock itself; the
daemon calls :meth:`KeyRing.tick` with ``now``. Private keys stay in memory; only public JWKs leave.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

from broker import tokens
from broker.tokens import SigningKey, VerifyKey


class KeySource(Protocol):
    """Where fresh signing keys come from. The embedded default generates them in memory."""

    def new_key(self, alg: str) -> SigningKey: ...


class MemoryKeySource:
    """Keys generated in this process and never written anywhere."""

    def new_key(self, alg: str) -> SigningKey:
        return tokens.generate(alg)


@dataclass(frozen=True, slots=True)
class _Retiring:
    key: VerifyKey
    retire_at: float


@dataclass(slots=True)
class _Slot:
    """The signing key of one algorithm now, and the one that follows it."""

    current: SigningKey
    next: SigningKey


class KeyRing:
    """Current + next + retiring keys. ``version`` increases whenever the published JWKS changes.

    With ``svid_alg`` other than ``alg`` the ring holds a second pair, rotated together with the first:
    JWT-SVIDs must use an algorithm the SPIFFE spec allows, whatever tool tokens use.
    """

    def __init__(self, source: KeySource, alg: str, rotate_every: int, max_token_ttl: int, now: float,
                 *, leeway: int = tokens.DEFAULT_LEEWAY, svid_alg: str | None = None) -> None:
        self._source = source
        self._alg = alg
        self._svid_alg = svid_alg or alg
        self._rotate_every = rotate_every
        # A retired key must outlive every token it signed, plus the verifiers' clock leeway.
        self._keep_after_rotation = max_token_ttl + leeway
        # The next key is published before it signs anything, so verifiers that cache the JWKS
        # already know it when the first token it signs reaches them.
        self._slots = {a: _Slot(source.new_key(a), source.new_key(a)) for a in dict.fromkeys((alg, self._svid_alg))}
        self._retiring: list[_Retiring] = []
        self._rotated_at = now
        self.version = 0
        self._publish()

    @property
    def current(self) -> SigningKey:
        """The key that signs tool tokens now."""
        return self._slots[self._alg].current

    @property
    def svid_current(self) -> SigningKey:
        """The key that signs JWT-SVIDs now (``current`` unless ``svid_alg`` differs)."""
        return self._slots[self._svid_alg].current

    @property
    def verify_keys(self) -> Mapping[str, VerifyKey]:
        return self._verify_keys

    @property
    def jwks_json(self) -> str:
        return self._jwks_json

    async def learn_keys(self) -> bool:
        """A lone broker knows every key it trusts: there is nothing to look up."""
        return False

    @property
    def rotated_at(self) -> float:
        return self._rotated_at

    def key_ages(self, now: float) -> dict[str, float]:
        return {slot.current.kid: now - self._rotated_at for slot in self._slots.values()}

    def tick(self, now: float) -> bool:
        """Rotate when due and drop keys whose tokens have all expired. True if the JWKS changed."""
        changed = False
        if now - self._rotated_at >= self._rotate_every:
            for alg, slot in self._slots.items():
                self._retiring.append(_Retiring(slot.current.verify_key, now + self._keep_after_rotation))
                slot.current, slot.next = slot.next, self._source.new_key(alg)
            self._rotated_at = now
            changed = True
        kept = [r for r in self._retiring if r.retire_at > now]
        if len(kept) != len(self._retiring):
            self._retiring = kept
            changed = True
        if changed:
            self._publish()
        return changed

    def next_due(self, now: float) -> float:
        """Seconds until :meth:`tick` has something to do."""
        due = [self._rotated_at + self._rotate_every] + [r.retire_at for r in self._retiring]
        return max(0.0, min(due) - now)

    def _publish(self) -> None:
        keys = [k.verify_key for slot in self._slots.values() for k in (slot.next, slot.current)]
        keys += [r.key for r in self._retiring]
        self._verify_keys = MappingProxyType({k.kid: k for k in keys})
        self._jwks_json = json.dumps(tokens.jwks_document(keys), separators=(",", ":"))
        self.version += 1
