"""Round trips, and the two backends agreeing byte for byte on output and on what they accept."""

from __future__ import annotations

import json
import random
from types import ModuleType

import pytest

from broker import tokens
from broker.errors import BrokerError, InvalidToken
from broker.tokens import _pure
from tests.tokens.conftest import NOW, TD, derived_secret, make_claims

try:
    from broker.tokens import _native
except ImportError:
    _native = None  # type: ignore[assignment]

needs_native = pytest.mark.skipif(_native is None, reason="native module not built")

ODD_STRINGS = ["", "plain", 'quote"back\\slash', "tab\tnl\ncr\rbs\bff\f", "\x00\x01\x1f\x7f",
               "caf\u00e9", "\u2028\u2029", "\U0001f600 emoji", "/slash/", "\ud7ff\ue000\uffff"]


def test_round_trip(engine: ModuleType, key: tokens.SigningKey, expect: tokens.Expect) -> None:
    claims = make_claims()
    token = engine.mint(key, claims)
    assert engine.verify(token, {key.kid: key.verify_key}, expect, NOW) == claims
    assert engine.verify(token.decode(), {key.kid: key.verify_key}, expect, NOW) == claims


def test_workflow_svid_round_trip(engine: ModuleType, key: tokens.SigningKey) -> None:
    claims = make_claims(tool=None, act=(), dst=(), aud=("a", "b"))
    token = engine.mint(key, claims)
    assert engine.verify(token, {key.kid: key.verify_key}, tokens.Expect(TD, "b"), NOW) == claims
    assert b"tool" not in _pure.b64decode(token.split(b".")[1])


@needs_native
@pytest.mark.parametrize("odd", ODD_STRINGS)
def test_mint_byte_identical(odd: str) -> None:
    # HS256 is deterministic, so whole tokens must match; the claims carry every kind of escape.
    key = tokens.hmac_key(derived_secret("parity"), "kid\u00e9\"" + odd)
    claims = make_claims(jti=odd, tenant=odd, aud=(odd, "x"), act=(odd,), dst=(), exp=2**70, iat=-5)
    assert _native.mint(key, claims) == _pure.mint(key, claims)
    payload = _pure.b64decode(_pure.mint(key, claims).split(b".")[1])
    assert payload == json.dumps(claims.to_json_dict(), separators=(",", ":")).encode()
    for kid in (True, False):
        for typ in ("JWT", "JOSE", None):
            assert (_native.sign_compact(key, odd.encode("utf-8", "surrogatepass"), kid=kid, typ=typ)
                    == _pure.sign_compact(key, odd.encode("utf-8", "surrogatepass"), kid=kid, typ=typ))


@needs_native
def test_parsed_claims_equal_constructed() -> None:
    # The native engine fills Claims' slots directly; it must equal what the dataclass builds.
    claims = make_claims()
    payload = _pure.b64decode(_pure.mint(tokens.hmac_key(derived_secret("c"), "c"), claims).split(b".")[1])
    parsed = _native.parse_claims(payload)
    assert parsed == claims and hash(parsed) == hash(claims) and repr(parsed) == repr(claims)
    assert all(getattr(parsed, f) is not None or getattr(claims, f) is None for f in claims.__slots__)


@pytest.mark.parametrize("kid", [True, False])
def test_repeated_header_is_checked_the_same(engine: ModuleType, kid: bool) -> None:
    # The native engine remembers the last header it checked (minting and verifying): repeats, a switch
    # of key and a caller mutating the returned header must change nothing.
    keys = [tokens.hmac_key(derived_secret(name), name) for name in ("h1", "h2")]
    for _ in range(2):
        for key in keys:
            token = engine.sign_compact(key, b"{}", kid=kid)
            assert token == _pure.sign_compact(key, b"{}", kid=kid)
            header, payload = engine.verify_signature(token, key.verify_key)
            assert payload == b"{}" and header == ({"alg": "HS256", "kid": key.kid, "typ": "JWT"} if kid
                                                   else {"alg": "HS256", "typ": "JWT"})
            header["alg"] = "none"
    token = engine.sign_compact(keys[0], b"{}")
    with pytest.raises(InvalidToken) as unknown:
        engine.verify_signature(token, {keys[1].kid: keys[1].verify_key})
    assert unknown.value.reason == "unknown kid"
    with pytest.raises(InvalidToken) as mismatch:
        engine.verify_signature(token, keys[1].verify_key)
    assert mismatch.value.reason == "kid does not match the key"


@pytest.mark.parametrize(("bad", "problem"), [
    ({"iss": 1}, "claim iss must be a string"),
    ({"exp": "1"}, "claim exp must be an integer"),
    ({"iat": True}, "claim iat must be an integer"),
    ({"aud": ()}, "claim aud must be a non-empty sequence of strings"),
    ({"aud": ("a", 1)}, "claim aud must be a non-empty sequence of strings"),
    ({"tool": ["x"]}, "claim tool must be a string or None"),
    ({"act": "x"}, "claim act must be a sequence of strings"),
])
def test_mint_refuses_ill_typed_claims(engine: ModuleType, bad: dict[str, object], problem: str) -> None:
    with pytest.raises(BrokerError, match=problem) as info:
        engine.mint(tokens.hmac_key(derived_secret("m"), "m"), make_claims(**bad))
    assert not isinstance(info.value, InvalidToken)


def test_sign_compact_refuses_unknown_typ(engine: ModuleType) -> None:
    with pytest.raises(BrokerError):
        engine.sign_compact(tokens.hmac_key(derived_secret("t"), "t"), b"x", typ="at+jwt")


def test_es256_signature_is_raw_r_s(engine: ModuleType) -> None:
    key = tokens.generate(tokens.ES256)
    for _ in range(20):  # high bits and leading zeros of r and s vary between signatures
        token = engine.sign_compact(key, b"payload")
        assert len(_pure.b64decode(token.split(b".")[2])) == 64
        assert engine.verify_signature(token, key.verify_key)[1] == b"payload"


# --- differential checks of the building blocks -----------------------------------------------------

def _outcome(fn: object, arg: bytes) -> object:
    try:
        return ("ok", fn(arg))  # type: ignore[operator]
    except InvalidToken:
        return ("refused",)


B64_CASES = [b"", b"A", b"AA", b"AB", b"AAA", b"AAB", b"AAAA", b"QQ", b"QR", b"QUE", b"QUF", b"QQ==", b"Q Q",
             b"QQ\n", b"+/+/", b"-_-_", b"\xff\xff", b"AA.A", b"YWJj", b"YWJjZA", b"YWJjZB"]


@needs_native
def test_b64_twins_agree() -> None:
    rng = random.Random(7)
    cases = list(B64_CASES)
    alphabet = b"ABCabcxyz0189-_+/=. \n"
    cases += [bytes(rng.choice(alphabet) for _ in range(rng.randrange(12))) for _ in range(3000)]
    for case in cases:
        assert _outcome(_native.b64decode, case) == _outcome(_pure.b64decode, case), case
    for n in range(70):
        data = bytes(rng.randrange(256) for _ in range(n))
        assert _native.b64encode(data) == _pure.b64encode(data)
        assert _native.b64decode(_pure.b64encode(data)) == data


JSON_CASES = [
    b'{}', b' {"a" : 1 } ', b'{"a":1,}', b'{"a":1 "b":2}', b'[]', b'"x"', b'1', b'', b'{', b'{"a":}',
    b'{"a":1}x', b'{"a":01}', b'{"a":-0}', b'{"a":-}', b'{"a":1.}', b'{"a":.5}', b'{"a":1e5}', b'{"a":1E-2}',
    b'{"a":1.5e+3}', b'{"a":NaN}', b'{"a":Infinity}', b'{"a":-Infinity}', b'{"a":true,"b":false,"c":null}',
    b'{"a":tru}', b'{"a":"\\u00e9\\ud83d\\ude00"}', b'{"a":"\\ud800"}', b'{"a":"\\udc00"}',
    b'{"a":"\\ud800\\u0041"}', b'{"a":"\\x"}', b'{"a":"\\u12"}', b'{"a":"\t"}', b'{"a":"\x7f"}',
    b'{"a":"\xc3\xa9"}', b'{"a":"\xed\xa0\x80"}', b'{"a":"\xff"}', b'\xef\xbb\xbf{}', b'{"a":1,"a":2}',
    b'{"a":{"b":1,"b":1}}', b'{"a":[1,[2,[3]]]}', b'{"a":12345678901234567890123}',
    b'{"a":9223372036854775807,"b":-9223372036854775808}', b'{"a":"' + b"9" * 5000 + b'"}',
    b'{"a":' + b"9" * 5000 + b'}', b'{"a":1e400}', b'{"\\u0061":1,"a":2}', b'{"a":"\\/"}', b'{\x0b}',
    b'{"a":[' + b"[" * 15 + b"]" * 15 + b']}', b'{"a":[' + b"[" * 16 + b"]" * 16 + b']}',
    b'[' * 3000 + b']' * 3000,
]


@needs_native
def test_json_twins_agree() -> None:
    rng = random.Random(11)
    cases = list(JSON_CASES)
    # Mutations of a real claims payload: byte flips, cuts and splices around the JSON syntax.
    seed = json.dumps(make_claims().to_json_dict()).encode()
    pieces = [b"{", b"}", b"[", b"]", b'"', b"\\", b":", b",", b"1", b"-", b"e", b".", b" ", b"\\u", b"null"]
    for _ in range(4000):
        b = bytearray(seed)
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(len(b))
            op = rng.randrange(3)
            if op == 0:
                b[i] = rng.randrange(256)
            elif op == 1:
                del b[i: i + rng.randrange(1, 4)]
            else:
                b[i:i] = rng.choice(pieces)
        cases.append(bytes(b))
    for case in cases:
        assert _outcome(_native.parse_json, case) == _outcome(_pure.parse_json, case), case


@needs_native
def test_json_reasons_agree_on_single_defects() -> None:
    for case in JSON_CASES:
        reasons = []
        for eng in (_native, _pure):
            try:
                eng.parse_json(case)
                reasons.append(None)
            except InvalidToken as exc:
                reasons.append(exc.reason)
        if case != b'[' * 3000 + b']' * 3000:  # the pure parser meets Python's recursion limit first
            assert reasons[0] == reasons[1], case
