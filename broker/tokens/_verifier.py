"""A long-lived verifier: a key set, a cache of verified tokens, and the revoked jtis.

The functions in ``broker.tokens`` are stateless; this is the object a daemon or a tool server keeps to
verify the same tokens many times cheaply, and to take keys and tokens back out of service.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping

from broker.errors import InvalidToken
from broker.tokens._backend import ENGINE
from broker.tokens._claims import MAX_LEEWAY, Claims, Expect
from broker.tokens._engine import Engine, VerifiedCacheLike
from broker.tokens._keys import VerifyKey

DEFAULT_CACHE_ENTRIES = 4096


class Verifier:
    """Verify tokens against a key set, answering repeated tokens from a bounded cache.

    ``verify`` is safe to call from several threads. A cache hit costs a SHA-256 of the token, a dict
    lookup and the claim checks, all inside one call of the cache; a miss is a full
    :func:`broker.tokens.verify`.
    """

    def __init__(self, keys: Mapping[str, VerifyKey] | Iterable[VerifyKey], *,
                 cache_entries: int = DEFAULT_CACHE_ENTRIES, engine: Engine | None = None) -> None:
        self._engine = ENGINE if engine is None else engine
        # Its own cache, never shared: an entry vouches for a token under this verifier's keys only.
        self._cache = self._engine.VerifiedCache(cache_entries)
        self._keys: dict[str, VerifyKey] = _by_kid(keys)
        self._revoked: dict[str, int] = {}
        self._next_prune: int | None = None
        # Guards the rare writers (key changes, revocations, pruning); readers take one reference.
        self._lock = threading.Lock()
        self._miss = self._verify_miss  # bound once, not on every call

    @property
    def keys(self) -> Mapping[str, VerifyKey]:
        return self._keys

    @property
    def cache(self) -> VerifiedCacheLike:
        return self._cache

    def verify(self, token: bytes | str, expect: Expect, now: int) -> Claims:
        """Return the token's claims or raise :class:`InvalidToken` (reason inside)."""
        # One call into the cache: a hit never comes back up to Python.
        return self._cache.verify(token, expect, now, self._miss)

    def _verify_miss(self, token: bytes | str, expect: Expect, now: int) -> Claims:
        keys = self._keys
        header, payload = self._engine.verify_signature(token, keys)
        claims = self._engine.parse_claims(payload)
        self._engine.check_claims(claims, expect, now)
        if self._next_prune is not None and now >= self._next_prune:
            self._prune(now)
        kid = header["kid"]
        # Under the writers' lock: a revoke(), retire_key() or set_keys() either ran before (and is seen
        # here) or runs after (and sweeps this entry), so no other thread can get a hit in between.
        with self._lock:
            if claims.jti in self._revoked:
                raise InvalidToken("revoked")
            if self._keys.get(kid) is not keys[kid]:
                raise InvalidToken("unknown kid")  # the kid left, or its key changed, since we checked
            self._cache.put(token, claims, kid, now)
        return claims

    def set_keys(self, keys: Mapping[str, VerifyKey] | Iterable[VerifyKey]) -> None:
        """Replace the key set (rotation); tokens cached under a kid that left the set, or whose key
        changed, are dropped."""
        new = _by_kid(keys)
        with self._lock:
            old = self._keys
            # An unchanged key keeps its object, so tokens being verified against it stay good.
            new = {kid: old[kid] if kid in old and _same_key(old[kid], key) else key for kid, key in new.items()}
            stale = {kid for kid in old if new.get(kid) is not old[kid]}
            self._keys = new
            for kid in stale:
                self._cache.discard_kid(kid)

    def retire_key(self, kid: str) -> None:
        """Stop accepting tokens signed by ``kid``, cached ones included."""
        with self._lock:
            self._keys = {k: v for k, v in self._keys.items() if k != kid}
            self._cache.discard_kid(kid)

    def revoke(self, jti: str, exp: int) -> None:
        """Refuse the token ``jti`` from now on; remembered until ``exp`` + the largest leeway."""
        with self._lock:
            self._revoked[jti] = max(exp, self._revoked.get(jti, exp))
            forget_at = exp + MAX_LEEWAY
            if self._next_prune is None or forget_at < self._next_prune:
                self._next_prune = forget_at
            self._cache.discard_jti(jti)

    def _prune(self, now: int) -> None:
        # Past exp + MAX_LEEWAY no verifier accepts the token anyway, so its revocation can be forgotten.
        with self._lock:
            self._revoked = {j: e for j, e in self._revoked.items() if now < e + MAX_LEEWAY}
            self._next_prune = min(self._revoked.values(), default=None)
            if self._next_prune is not None:
                self._next_prune += MAX_LEEWAY


def _by_kid(keys: Mapping[str, VerifyKey] | Iterable[VerifyKey]) -> dict[str, VerifyKey]:
    if isinstance(keys, Mapping):
        return dict(keys)
    return {k.kid: k for k in keys}


def _same_key(a: VerifyKey, b: VerifyKey) -> bool:
    if a.alg != b.alg or a.secret != b.secret or (a.public is None) != (b.public is None):
        return False
    return a.public is None or b.public is None or a.to_jwk() == b.to_jwk()
