"""Key material for the token engine: signing keys, verification keys, and their JWK form.

A ``kid`` is the RFC 7638 JWK thumbprint of the public key, so the same key always gets the same id on
every host and nobody has to coordinate names.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from broker.errors import BrokerError

ES256: Final = "ES256"
EDDSA: Final = "EdDSA"
HS256: Final = "HS256"
ALGORITHMS: Final = (ES256, EDDSA, HS256)
# The JWT-SVID standard (section 3, JOSE header) allows only the RSA, ECDSA and RSA-PSS algorithms of
# RFC 7518 sections 3.3 to 3.5, and validators must reject any other: EdDSA and HMAC tokens are no SVIDs.
JWT_SVID_ALGORITHMS: Final = frozenset({"RS256", "RS384", "RS512", "ES256", "ES384", "ES512",
                                        "PS256", "PS384", "PS512"})


def svid_algorithm(alg: str) -> str:
    """What JWT-SVIDs are signed with when tool tokens use ``alg``: ``alg`` if the standard allows it."""
    return alg if alg in JWT_SVID_ALGORITHMS else ES256

# JWKS documents we accept from elsewhere are small; cap them before parsing.
MAX_JWKS_BYTES: Final = 256 * 1024
MAX_JWKS_KEYS: Final = 256


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    if not isinstance(text, str) or "=" in text:
        raise ValueError("not unpadded base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _thumbprint(members: Mapping[str, str]) -> str:
    # RFC 7638: the required members only, in lexicographic order, no whitespace.
    canonical = json.dumps(dict(sorted(members.items())), separators=(",", ":")).encode()
    return b64url(hashlib.sha256(canonical).digest())


PublicKeyType = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """A key that checks signatures: a public key (ES256, EdDSA) or an HMAC secret (HS256)."""

    alg: str
    kid: str
    public: PublicKeyType | None = None
    secret: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # Checked once here so that the engines may dispatch on ``alg`` alone: a key whose material does
        # not fit its algorithm can never exist, which closes algorithm confusion at the source.
        _check_kid(self.kid)
        _check_material(self.alg, self.public, self.secret)

    def to_jwk(self) -> dict[str, str]:
        """The RFC 7517 public JWK. HMAC keys have no public form and are never published."""
        if self.public is None:
            raise BrokerError("an HMAC key has no public JWK")
        jwk = dict(_public_members(self.public))
        jwk.update({"kid": self.kid, "alg": self.alg, "use": "sig"})
        return jwk


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A private signing key with its id. Lives in memory only; ``repr`` never shows material."""

    alg: str
    kid: str
    private: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | None = field(default=None, repr=False)
    secret: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        _check_kid(self.kid)
        _check_material(self.alg, None if self.private is None else self.private.public_key(), self.secret)

    @property
    def verify_key(self) -> VerifyKey:
        if self.private is None:
            return VerifyKey(self.alg, self.kid, secret=self.secret)
        return VerifyKey(self.alg, self.kid, public=self.private.public_key())


def _check_kid(kid: object) -> None:
    if not isinstance(kid, str) or not kid:
        raise BrokerError("a key needs a non-empty kid")


def _check_material(alg: str, public: object, secret: object) -> None:
    if alg == ES256:
        ok = isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP256R1)
    elif alg == EDDSA:
        ok = isinstance(public, ed25519.Ed25519PublicKey)
    elif alg == HS256:
        # 32 bytes: the HMAC-SHA256 output size, the least RFC 7518 section 3.2 allows.
        ok = public is None and isinstance(secret, bytes) and len(secret) >= 32
        if not ok:
            raise BrokerError("an HS256 key needs a secret of at least 32 bytes and nothing else")
        return
    else:
        raise BrokerError(f"unsupported algorithm {alg!r}")
    if not ok or secret is not None:
        raise BrokerError(f"key material does not fit algorithm {alg}")


def _public_members(public: PublicKeyType) -> dict[str, str]:
    if isinstance(public, ec.EllipticCurvePublicKey):
        nums = public.public_numbers()
        return {"kty": "EC", "crv": "P-256", "x": b64url(nums.x.to_bytes(32, "big")),
                "y": b64url(nums.y.to_bytes(32, "big"))}
    raw = public.public_bytes_raw()
    return {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)}


def generate(alg: str) -> SigningKey:
    """A fresh in-memory signing key for ``alg`` (ES256 or EdDSA)."""
    private: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    if alg == ES256:
        private = ec.generate_private_key(ec.SECP256R1())
    elif alg == EDDSA:
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        raise BrokerError(f"cannot generate a key for algorithm {alg!r}")
    return from_private(alg, private)


def from_private(alg: str, private: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> SigningKey:
    """A signing key for an existing private key; its kid is the RFC 7638 thumbprint."""
    _check_material(alg, private.public_key(), None)
    return SigningKey(alg, _thumbprint(_public_members(private.public_key())), private=private)


def hmac_key(secret: bytes, kid: str) -> SigningKey:
    """An HS256 key for broker-local use (never published in a JWKS)."""
    return SigningKey(HS256, kid, secret=bytes(secret))


def _key_from_jwk(jwk: Mapping[str, Any]) -> VerifyKey:
    kty, crv, kid = jwk.get("kty"), jwk.get("crv"), jwk.get("kid")
    if not isinstance(kid, str) or not kid:
        raise ValueError("missing kid")
    public: PublicKeyType
    if kty == "EC" and crv == "P-256":
        x, y = _b64url_decode(jwk["x"]), _b64url_decode(jwk["y"])
        if len(x) != 32 or len(y) != 32:
            raise ValueError("bad P-256 coordinates")
        public = ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"),
                                               ec.SECP256R1()).public_key()
        alg = ES256
    elif kty == "OKP" and crv == "Ed25519":
        public = ed25519.Ed25519PublicKey.from_public_bytes(_b64url_decode(jwk["x"]))
        alg = EDDSA
    else:
        raise ValueError(f"unsupported key type {kty!r}/{crv!r}")
    if jwk.get("alg", alg) != alg:
        raise ValueError(f"alg {jwk.get('alg')!r} does not fit a {kty}/{crv} key")
    return VerifyKey(alg, kid, public=public)


def keys_from_jwks(document: bytes | str | Mapping[str, Any]) -> dict[str, VerifyKey]:
    """Parse an RFC 7517 JWK Set into verification keys by kid. Raises BrokerError if malformed."""
    try:
        if isinstance(document, bytes | str):
            if len(document) > MAX_JWKS_BYTES:
                raise ValueError("JWKS document too large")
            document = json.loads(document)
        if not isinstance(document, Mapping):
            raise ValueError("not a JSON object")
        keys = document.get("keys")
        if not isinstance(keys, list) or len(keys) > MAX_JWKS_KEYS:
            raise ValueError("'keys' must be a list of at most 256 keys")
        out: dict[str, VerifyKey] = {}
        for jwk in keys:
            if not isinstance(jwk, Mapping):
                raise ValueError("a key is not a JSON object")
            key = _key_from_jwk(jwk)
            if key.kid in out:
                raise ValueError(f"duplicate kid {key.kid!r}")
            out[key.kid] = key
        return out
    except (ValueError, KeyError, TypeError, UnsupportedAlgorithm) as exc:
        raise BrokerError(f"invalid JWKS: {exc}") from None


def jwks_document(keys: Iterable[VerifyKey]) -> dict[str, list[dict[str, str]]]:
    """The RFC 7517 JWK Set of the public keys among ``keys`` (HMAC keys are left out)."""
    return {"keys": [k.to_jwk() for k in keys if k.public is not None]}
