"""The token engine: mint and verify broker tokens (JWS compact; with ES256 every one is also a JWT-SVID).

Public API, usable offline by tool servers with nothing but the broker's JWKS::

    from broker import tokens
    keys = tokens.keys_from_jwks(jwks_json)
    claims = tokens.verify(token, keys, tokens.Expect("example.org", audience="crm", tool="read_ticket"), now)

    verifier = tokens.Verifier(keys)            # the same, with a cache of verified tokens
    claims = verifier.verify(token, expect, now)

Every failure raises :class:`broker.errors.InvalidToken`, whose ``reason`` is for the audit log only.
``BACKEND`` says which implementation loaded: ``"native"`` (Cython) or ``"pure"``;
``BROKER_PUREPYTHON=1`` in the environment forces the pure one. The full guide is docs/tokens.md.
"""

from __future__ import annotations

from broker.errors import BrokerError
from broker.tokens._backend import BACKEND
from broker.tokens._backend import ENGINE as _ENGINE
from broker.tokens._backend import WHY_PURE as _WHY_PURE
from broker.tokens._claims import DEFAULT_LEEWAY, MAX_LEEWAY, MAX_TOKEN_BYTES, Claims, Expect
from broker.tokens._engine import KeySource
from broker.tokens._keys import (
    ALGORITHMS,
    EDDSA,
    ES256,
    HS256,
    JWT_SVID_ALGORITHMS,
    SigningKey,
    VerifyKey,
    from_private,
    generate,
    hmac_key,
    jwks_document,
    keys_from_jwks,
    svid_algorithm,
)
from broker.tokens._verifier import DEFAULT_CACHE_ENTRIES, Verifier

mint = _ENGINE.mint
verify = _ENGINE.verify
verify_signature = _ENGINE.verify_signature
sign_compact = _ENGINE.sign_compact
VerifiedCache = _ENGINE.VerifiedCache


def require_native() -> None:
    """Raise :class:`BrokerError` unless the native engine loaded (for deployments that demand it)."""
    if BACKEND != "native":
        raise BrokerError(f"the native token engine is required but the pure-Python one is loaded: {_WHY_PURE}")


__all__ = [
    "ALGORITHMS",
    "BACKEND",
    "DEFAULT_CACHE_ENTRIES",
    "DEFAULT_LEEWAY",
    "EDDSA",
    "ES256",
    "HS256",
    "JWT_SVID_ALGORITHMS",
    "MAX_LEEWAY",
    "MAX_TOKEN_BYTES",
    "Claims",
    "Expect",
    "KeySource",
    "SigningKey",
    "VerifiedCache",
    "Verifier",
    "VerifyKey",
    "from_private",
    "generate",
    "hmac_key",
    "jwks_document",
    "keys_from_jwks",
    "mint",
    "require_native",
    "sign_compact",
    "svid_algorithm",
    "verify",
    "verify_signature",
]
