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


def test_a_separate_svid_key_pair_rotates_and_retires_with_the_tool_keys() -> None:
    r = KeyRing(MemoryKeySource(), "EdDSA", rotate_every=3600, max_token_ttl=TTL, now=1000.0, svid_alg="ES256")
    assert (r.current.alg, r.svid_current.alg) == ("EdDSA", "ES256")
    assert sorted(k.alg for k in r.verify_keys.values()) == ["ES256", "ES256", "EdDSA", "EdDSA"]
    first_tool, first_svid = r.current, r.svid_current
    published = set(r.verify_keys)
    assert set(r.key_ages(1010.0)) == {first_tool.kid, first_svid.kid}
    assert r.tick(4600.0)
    # Both pairs moved to keys published a rotation before they sign; both old keys stay for their tokens.
    assert {r.current.kid, r.svid_current.kid} <= published
    assert {r.current.alg, r.svid_current.alg} == {"EdDSA", "ES256"}
    assert {first_tool.kid, first_svid.kid} <= set(r.verify_keys) and len(r.verify_keys) == 6
    assert r.tick(4600.0 + TTL + tokens.DEFAULT_LEEWAY)
    assert len(r.verify_keys) == 4 and first_svid.kid not in r.verify_keys


def test_one_key_pair_when_svids_may_use_the_tool_algorithm() -> None:
    r = KeyRing(MemoryKeySource(), "ES256", rotate_every=3600, max_token_ttl=TTL, now=1000.0, svid_alg="ES256")
    assert r.svid_current is r.current and len(r.verify_keys) == 2
