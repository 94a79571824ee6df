"""The RFC 7515 A.3 and RFC 8037 A.4 examples (tests/vectors/jose_rfc.json), on both backends."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from broker import tokens
from broker.errors import InvalidToken

VECTORS: dict[str, Any] = json.loads((Path(__file__).parents[1] / "vectors" / "jose_rfc.json").read_text())


def _b(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _es256() -> tuple[tokens.SigningKey, dict[str, Any]]:
    v = VECTORS["rfc7515_a3_es256"]
    private = ec.derive_private_key(int.from_bytes(_b(v["jwk"]["d"]), "big"), ec.SECP256R1())
    return tokens.from_private(tokens.ES256, private), v


def _eddsa() -> tuple[tokens.SigningKey, dict[str, Any]]:
    v = VECTORS["rfc8037_a4_eddsa"]
    private = ed25519.Ed25519PrivateKey.from_private_bytes(_b(v["jwk"]["d"]))
    return tokens.from_private(tokens.EDDSA, private), v


def test_keys_match_the_published_public_halves() -> None:
    for key, v in (_es256(), _eddsa()):
        public = {k: val for k, val in v["jwk"].items() if k != "d"}
        assert {k: key.verify_key.to_jwk()[k] for k in public} == public


def test_rfc8037_thumbprint_is_our_kid() -> None:
    key, v = _eddsa()
    assert key.kid == v["thumbprint"]


@pytest.mark.parametrize("vector", [_es256, _eddsa])
def test_rfc_example_verifies(engine: ModuleType, vector: Any) -> None:
    key, v = vector()
    header, payload = engine.verify_signature(v["jws"], key.verify_key)
    assert header == json.loads(v["header"])
    assert payload == v["payload"].encode()
    # Also through a published JWKS, the way a tool server gets its keys.
    published = tokens.keys_from_jwks(tokens.jwks_document([key.verify_key]))
    assert engine.verify_signature(v["jws"], next(iter(published.values())))[1] == v["payload"].encode()


@pytest.mark.parametrize("vector", [_es256, _eddsa])
def test_rfc_example_tampered_is_refused(engine: ModuleType, vector: Any) -> None:
    key, v = vector()
    head, body, sig = v["jws"].split(".")
    flipped = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    with pytest.raises(InvalidToken):
        engine.verify_signature(".".join([head, body, flipped]), key.verify_key)


def test_rfc8037_signing_reproduces_the_example(engine: ModuleType) -> None:
    key, v = _eddsa()
    assert engine.sign_compact(key, v["payload"].encode(), kid=False, typ=None) == v["jws"].encode()


def test_rfc_examples_cross_checked_by_pyjwt() -> None:
    # A second implementation reads the same vectors the same way.
    for vector in (_es256, _eddsa):
        key, v = vector()
        jwk = jwt.PyJWK.from_dict({k: val for k, val in v["jwk"].items() if k != "d"})
        assert jwt.api_jws.decode(v["jws"], jwk.key, algorithms=[key.alg]) == v["payload"].encode()
