"""Our tokens against pyjwt and joserfc, both directions, through the JWKS a tool server would fetch."""

from __future__ import annotations

import json
from types import ModuleType

import jwt
import pytest
from joserfc import jwt as jose_jwt
from joserfc.jwk import ECKey, KeySet, OctKey, OKPKey

from broker import tokens
from tests.tokens.conftest import NOW, TD, derived_secret, make_claims

ASYMMETRIC = [tokens.ES256, tokens.EDDSA]

# joserfc flags the generic "EdDSA" name (RFC 9864 prefers "Ed25519"); the JWT-SVID world still uses it.
pytestmark = pytest.mark.filterwarnings("ignore:EdDSA is deprecated")


@pytest.mark.parametrize("alg", ASYMMETRIC)
def test_ours_verify_with_pyjwt(engine: ModuleType, alg: str) -> None:
    key = tokens.generate(alg)
    claims = make_claims(exp=2_000_000_000)
    token = engine.mint(key, claims)
    jwks = json.dumps(tokens.jwks_document([key.verify_key]))
    signing = jwt.PyJWKSet.from_json(jwks)[key.kid]
    out = jwt.decode(token, signing.key, algorithms=[alg], audience="crm", issuer=f"spiffe://{TD}")
    assert out == claims.to_json_dict()


def test_ours_hs256_verify_with_pyjwt(engine: ModuleType) -> None:
    key = tokens.hmac_key(derived_secret("interop"), "hs")
    token = engine.mint(key, make_claims(exp=2_000_000_000))
    assert jwt.decode(token, key.secret, algorithms=["HS256"], audience="crm")["wf"] == "wf-7"


@pytest.mark.parametrize("alg", ASYMMETRIC)
def test_ours_verify_with_joserfc(engine: ModuleType, alg: str) -> None:
    key = tokens.generate(alg)
    claims = make_claims()
    token = engine.mint(key, claims)
    key_set = KeySet.import_key_set(tokens.jwks_document([key.verify_key]))  # type: ignore[arg-type]
    decoded = jose_jwt.decode(token, key_set, algorithms=[alg])
    assert decoded.header == {"alg": alg, "kid": key.kid, "typ": "JWT"}
    assert decoded.claims == claims.to_json_dict()


def test_ours_hs256_verify_with_joserfc(engine: ModuleType) -> None:
    key = tokens.hmac_key(derived_secret("interop"), "hs")
    token = engine.mint(key, make_claims())
    assert jose_jwt.decode(token, OctKey.import_key(key.secret), algorithms=["HS256"]).claims["jti"]


@pytest.mark.parametrize("alg", ASYMMETRIC)
def test_pyjwt_tokens_verify_with_ours(engine: ModuleType, alg: str) -> None:
    key = tokens.generate(alg)
    claims = make_claims()
    token = jwt.encode(claims.to_json_dict(), key.private, algorithm=alg, headers={"kid": key.kid})
    keys = tokens.keys_from_jwks(tokens.jwks_document([key.verify_key]))
    assert engine.verify(token, keys, tokens.Expect(TD, "crm", "read_ticket"), NOW) == claims


def test_pyjwt_hs256_tokens_verify_with_ours(engine: ModuleType) -> None:
    key = tokens.hmac_key(derived_secret("interop"), "hs")
    claims = make_claims(aud=("crm", "billing"))
    token = jwt.encode(claims.to_json_dict(), key.secret, algorithm="HS256", headers={"kid": key.kid})
    assert engine.verify(token, {key.kid: key.verify_key}, tokens.Expect(TD, "billing"), NOW) == claims


@pytest.mark.parametrize("alg", ASYMMETRIC)
def test_joserfc_tokens_verify_with_ours(engine: ModuleType, alg: str) -> None:
    key = tokens.generate(alg)
    claims = make_claims()
    private = (ECKey if alg == tokens.ES256 else OKPKey).import_key(key.private)  # type: ignore[arg-type]
    token = jose_jwt.encode({"alg": alg, "kid": key.kid}, claims.to_json_dict(), private, algorithms=[alg])
    keys = {key.kid: key.verify_key}
    assert engine.verify(token, keys, tokens.Expect(TD, "crm", "read_ticket"), NOW) == claims
