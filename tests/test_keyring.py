"""Key rotation with an injected clock: next key published before use, old keys kept until safe."""

from __future__ import annotations

import json

from broker import tokens
from broker.keyring import KeyRing, MemoryKeySource

TTL = 300


def ring(now: float = 1000.0, alg: str = "ES256") -> KeyRing:
    return KeyRing(MemoryKeySource(), alg, rotate_every=3600, max_token_ttl=TTL, now=now)


def claims(now: int) -> tokens.Claims:
    return tokens.Claims("spiffe://example.org", "spiffe://example.org/workflow/w", ("a",), now, now, now + TTL,
                         "j", "t", "w", "tool")


def test_jwks_publishes_current_and_next_without_private_material() -> None:
    r = ring()
    doc = json.loads(r.jwks_json)
    kids = {k["kid"] for k in doc["keys"]}
    assert r.current.kid in kids and len(kids) == 2
    for k in doc["keys"]:
        assert set(k) == {"kty", "crv", "x", "y", "kid", "alg", "use"}  # no "d"


def test_rotation_keeps_old_key_until_its_tokens_expire() -> None:
    r = ring(now=1000.0)
    first = r.current
    published_next = set(r.verify_keys) - {first.kid}
    token = tokens.mint(first, claims(4500))
    assert not r.tick(4599.0)
    assert r.tick(4600.0)  # due: 3600 s after start
    assert r.current.kid != first.kid
    assert {r.current.kid} == published_next  # the key that now signs was published before it signed
    assert first.kid in r.verify_keys
    expect = tokens.Expect("example.org", "a", "tool")
    tokens.verify(token, r.verify_keys, expect, now=4700)
    retire_at = 4600 + TTL + tokens.DEFAULT_LEEWAY
    assert not r.tick(retire_at - 1)
    assert first.kid in r.verify_keys
    assert r.tick(retire_at)
    assert first.kid not in r.verify_keys


def test_version_increases_on_every_change() -> None:
    r = ring(now=0.0)
    v = r.version
    r.tick(3600.0)
    assert r.version == v + 1
    assert r.next_due(3600.0) == TTL + tokens.DEFAULT_LEEWAY


def test_eddsa_ring() -> None:
    r = ring(alg="EdDSA")
    assert all(k["kty"] == "OKP" for k in json.loads(r.jwks_json)["keys"])
