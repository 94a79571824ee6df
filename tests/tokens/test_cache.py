"""The verified-token cache and the Verifier around it, on both backends."""

from __future__ import annotations

import random
import threading
from types import ModuleType

import pytest

from broker import tokens
from broker.errors import BrokerError, InvalidToken
from tests.tokens.conftest import NOW, TD, make_claims

EXPECT = tokens.Expect(TD, "crm", "read_ticket")


@pytest.fixture
def es() -> tokens.SigningKey:
    return tokens.generate(tokens.ES256)


def verifier(engine: ModuleType, keys: list[tokens.VerifyKey], size: int = 8) -> tokens.Verifier:
    return tokens.Verifier(keys, cache_entries=size, engine=engine)


def test_hit_returns_the_same_claims(engine: ModuleType, es: tokens.SigningKey) -> None:
    v = verifier(engine, [es.verify_key])
    token = engine.mint(es, make_claims())
    first = v.verify(token, EXPECT, NOW)
    assert len(v.cache) == 1
    assert v.verify(token, EXPECT, NOW + 1) is first
    assert v.verify(token.decode(), EXPECT, NOW + 1) is first


def test_hit_still_checks_expectations(engine: ModuleType, es: tokens.SigningKey) -> None:
    v = verifier(engine, [es.verify_key])
    token = engine.mint(es, make_claims())
    v.verify(token, EXPECT, NOW)
    for expect, reason in ((tokens.Expect(TD, "billing"), "wrong audience"),
                           (tokens.Expect(TD, "crm", "delete"), "wrong tool"),
                           (tokens.Expect("other.org", "crm"), "issuer or subject outside the trust domain")):
        with pytest.raises(InvalidToken) as info:
            v.verify(token, expect, NOW)
        assert info.value.reason == reason
    with pytest.raises(InvalidToken) as info:
        v.verify(token, EXPECT, NOW - 200)  # a clock that went backwards: nbf/iat are checked on a hit too
    assert info.value.reason == "not yet valid"


def test_never_served_past_exp(engine: ModuleType, es: tokens.SigningKey) -> None:
    cache = engine.VerifiedCache(8)
    claims = make_claims(exp=NOW + 10)
    token = engine.mint(es, claims)
    cache.put(token, claims, es.kid, NOW)
    assert cache.lookup(token, EXPECT, NOW + 9) is claims
    assert cache.lookup(token, EXPECT, NOW + 10) is None  # at exp the leeway is the full verifier's call
    assert len(cache) == 0
    cache.put(token, claims, es.kid, NOW + 10)  # already expired: not kept
    assert len(cache) == 0
    v = verifier(engine, [es.verify_key])
    v.verify(token, EXPECT, NOW)
    with pytest.raises(InvalidToken) as info:
        v.verify(token, EXPECT, NOW + 15)
    assert info.value.reason == "expired"


def test_bounded_least_recently_used(engine: ModuleType, es: tokens.SigningKey) -> None:
    v = verifier(engine, [es.verify_key], size=3)
    toks = [engine.mint(es, make_claims(jti=f"j{i}")) for i in range(4)]
    for t in toks[:3]:
        v.verify(t, EXPECT, NOW)
    v.verify(toks[0], EXPECT, NOW)  # touch the oldest
    v.verify(toks[3], EXPECT, NOW)  # evicts toks[1]
    assert len(v.cache) == 3
    assert v.cache.lookup(toks[1], EXPECT, NOW) is None
    assert v.cache.lookup(toks[0], EXPECT, NOW) is not None


def test_retired_key_drops_its_tokens(engine: ModuleType, es: tokens.SigningKey) -> None:
    other = tokens.generate(tokens.EDDSA)
    v = verifier(engine, [es.verify_key, other.verify_key])
    mine, theirs = engine.mint(es, make_claims()), engine.mint(other, make_claims())
    v.verify(mine, EXPECT, NOW)
    v.verify(theirs, EXPECT, NOW)
    v.retire_key(es.kid)
    assert len(v.cache) == 1
    with pytest.raises(InvalidToken) as info:
        v.verify(mine, EXPECT, NOW)
    assert info.value.reason == "unknown kid"
    assert v.verify(theirs, EXPECT, NOW).wf == "wf-7"
    v.set_keys([es.verify_key])  # rotation: the set changes wholesale
    assert len(v.cache) == 0
    assert v.verify(mine, EXPECT, NOW).wf == "wf-7"


def test_revoked_token_refused_and_forgotten_later(engine: ModuleType, es: tokens.SigningKey) -> None:
    v = verifier(engine, [es.verify_key])
    claims = make_claims()
    token = engine.mint(es, claims)
    v.verify(token, EXPECT, NOW)
    v.revoke(claims.jti, claims.exp)
    assert len(v.cache) == 0
    with pytest.raises(InvalidToken) as info:
        v.verify(token, EXPECT, NOW)
    assert info.value.reason == "revoked"
    with pytest.raises(InvalidToken):  # long after exp: refused as expired, the revocation pruned
        v.verify(token, EXPECT, claims.exp + tokens.MAX_LEEWAY + 1)
    other = engine.mint(es, make_claims(jti="x", exp=claims.exp + 10_000, nbf=0, iat=0))
    v.verify(other, EXPECT, claims.exp + tokens.MAX_LEEWAY + 1)
    assert v._revoked == {}


def test_failures_are_not_cached(engine: ModuleType, es: tokens.SigningKey) -> None:
    v = verifier(engine, [es.verify_key])
    with pytest.raises(InvalidToken):
        v.verify(engine.mint(es, make_claims(aud=("billing",))), EXPECT, NOW)
    assert len(v.cache) == 0
    assert v.cache.lookup(b"x" * (tokens.MAX_TOKEN_BYTES + 1), EXPECT, NOW) is None


def test_cache_size_must_be_positive(engine: ModuleType) -> None:
    with pytest.raises(BrokerError):
        engine.VerifiedCache(0)
    assert engine.VerifiedCache(5).max_entries == 5


def test_threads_share_a_verifier(engine: ModuleType, es: tokens.SigningKey) -> None:
    v = verifier(engine, [es.verify_key], size=16)
    toks = [engine.mint(es, make_claims(jti=f"t{i}")) for i in range(32)]
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for i in range(400):
                t = toks[(i + offset) % len(toks)]
                assert v.verify(t, EXPECT, NOW).jti.startswith("t")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for i in range(0, 32, 4):
        v.revoke(f"t{i}", NOW + 200)
    for t in threads:
        t.join()
    assert all(isinstance(e, InvalidToken) and e.reason == "revoked" for e in errors)
    assert len(v.cache) <= 16


def test_repeat_hit_with_the_same_expect_still_checks_the_clock(engine: ModuleType, es: tokens.SigningKey) -> None:
    # The second hit with one Expect object takes the native fast path (only the clock checks are redone).
    v = verifier(engine, [es.verify_key])
    token = engine.mint(es, make_claims())
    v.verify(token, EXPECT, NOW)
    assert v.verify(token, EXPECT, NOW).jti == make_claims().jti
    assert v.verify(token, EXPECT, NOW).jti == make_claims().jti
    for now, reason in ((NOW - 200, "not yet valid"), (NOW + 205, "expired"), (2**80, "expired")):
        with pytest.raises(InvalidToken) as info:
            v.verify(token, EXPECT, now)
        assert info.value.reason == reason
    v.verify(token, EXPECT, NOW)
    with pytest.raises(InvalidToken) as info:
        v.verify(token, tokens.Expect(TD, "billing", "read_ticket"), NOW)  # another Expect: checked in full
    assert info.value.reason == "wrong audience"
    assert v.verify(token, tokens.Expect(TD, "crm"), NOW).tool == "read_ticket"
    assert v.verify(token, EXPECT, NOW).tool == "read_ticket"


def test_cache_verify_calls_miss_only_on_a_miss(engine: ModuleType, es: tokens.SigningKey) -> None:
    cache = engine.VerifiedCache(4)
    claims = make_claims()
    token = engine.mint(es, claims)
    calls: list[object] = []

    def miss(t: object, e: object, n: int) -> tokens.Claims:
        calls.append((t, e, n))
        return claims

    assert cache.verify(token, EXPECT, NOW, miss) is claims
    assert calls == [(token, EXPECT, NOW)]
    cache.put(token, claims, es.kid, NOW)
    assert cache.verify(token, EXPECT, NOW, miss) is claims
    assert len(calls) == 1


def _script(seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    ops = ["put"] * 5 + ["lookup"] * 5 + ["jti", "kid"] + ["clear"] * (seed % 2)
    return [(rng.choice(ops), rng.randrange(12)) for _ in range(400)]


@pytest.mark.parametrize("seed", range(6))
def test_twins_evict_the_same_tokens(seed: int) -> None:
    # The clock is part of the interface: both engines must hit, miss and evict identically.
    from tests.tokens.conftest import _native

    if _native is None:
        pytest.skip("native module not built")
    from broker.tokens import _pure

    traces = []
    for eng in (_native, _pure):
        cache = eng.VerifiedCache(5)
        trace: list[object] = []
        for op, i in _script(seed):
            token = b"token-%d" % i
            if op == "put":
                cache.put(token, make_claims(jti=f"j{i % 7}"), f"k{i % 3}", NOW)
            elif op == "lookup":
                trace.append(cache.lookup(token, EXPECT, NOW) is not None)
            elif op == "jti":
                trace.append(cache.discard_jti(f"j{i % 7}"))
            elif op == "kid":
                trace.append(cache.discard_kid(f"k{i % 3}"))
            else:
                cache.clear()
            trace.append(len(cache))
        traces.append(trace)
    assert traces[0] == traces[1]
    assert any(traces[0][k] is True for k in range(len(traces[0])))


def test_a_changed_key_under_the_same_kid_drops_its_cached_tokens(engine: ModuleType) -> None:
    old, new = tokens.hmac_key(b"o" * 32, "hs-1"), tokens.hmac_key(b"n" * 32, "hs-1")
    v = verifier(engine, [old.verify_key])
    token = engine.mint(old, make_claims())
    v.verify(token, EXPECT, NOW)  # now cached
    v.set_keys({"hs-1": new.verify_key})
    with pytest.raises(InvalidToken):
        v.verify(token, EXPECT, NOW + 1)


def test_the_same_keys_again_keep_the_cache(engine: ModuleType) -> None:
    key = tokens.hmac_key(b"k" * 32, "hs-1")
    v = verifier(engine, [key.verify_key])
    token = engine.mint(key, make_claims())
    first = v.verify(token, EXPECT, NOW)
    v.set_keys({"hs-1": tokens.hmac_key(b"k" * 32, "hs-1").verify_key})  # a refresh with the same keys
    assert v.verify(token, EXPECT, NOW + 1) is first  # still answered from the cache


def test_a_clock_reading_that_is_not_a_number_is_refused(engine: ModuleType) -> None:
    key = tokens.hmac_key(b"k" * 32, "hs-1")
    token = engine.mint(key, make_claims())
    with pytest.raises(InvalidToken):
        engine.verify(token, {"hs-1": key.verify_key}, EXPECT, float("nan"))
