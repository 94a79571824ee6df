"""Hostile input, each case run on both backends: refused with InvalidToken, the reason kept for audit."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from types import ModuleType

import pytest

from broker import tokens
from broker.errors import InvalidToken
from tests.tokens.conftest import NOW, TD, derived_secret, make_claims


def b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def js(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def forge(header: bytes, payload: bytes, key: tokens.SigningKey) -> bytes:
    """A token with exactly these header and payload bytes, correctly signed by ``key``."""
    si = b64(header) + b"." + b64(payload)
    return si + b"." + b64(_raw_sig(key, si))


def _raw_sig(key: tokens.SigningKey, si: bytes) -> bytes:
    from broker.tokens import _pure
    return _pure._sign(key, si)


ES = tokens.generate(tokens.ES256)
ED = tokens.generate(tokens.EDDSA)
HS = tokens.hmac_key(derived_secret("hostile"), "hs-1")
KEYS = {k.kid: k.verify_key for k in (ES, ED, HS)}
EXPECT = tokens.Expect(TD, "crm", "read_ticket")
GOOD = js(make_claims().to_json_dict())


def hdr(key: tokens.SigningKey, **extra: object) -> bytes:
    h: dict[str, object] = {"alg": key.alg, "kid": key.kid, "typ": "JWT"}
    h.update(extra)
    return js({k: v for k, v in h.items() if v is not None})


def tamper(token: bytes, part: int) -> bytes:
    segs = token.split(b".")
    raw = bytearray(base64.urlsafe_b64decode(segs[part] + b"=" * (-len(segs[part]) % 4)))
    raw[len(raw) // 2] ^= 0x01
    segs[part] = b64(bytes(raw))
    return b".".join(segs)


def _confusion() -> bytes:
    # The classic attack: an HS256 token whose HMAC secret is the ES256 public key, naming that key.
    pem = ES.verify_key.public.public_bytes(  # type: ignore[union-attr]
        __import__("cryptography.hazmat.primitives.serialization", fromlist=["x"]).Encoding.PEM,
        __import__("cryptography.hazmat.primitives.serialization", fromlist=["x"]).PublicFormat.SubjectPublicKeyInfo)
    si = b64(js({"alg": "HS256", "kid": ES.kid, "typ": "JWT"})) + b"." + b64(GOOD)
    return si + b"." + b64(hmac.digest(pem, si, hashlib.sha256))


def _alg_none() -> bytes:
    return b64(js({"alg": "none", "kid": ES.kid, "typ": "JWT"})) + b"." + b64(GOOD) + b"."


def _deep(n: int) -> bytes:
    return b'{"x":' + b"[" * n + b"]" * n + b"}"


def _reclaim(**over: object) -> bytes:
    d = make_claims().to_json_dict()
    d.update(over)
    return forge(hdr(ES), js(d), ES)


CASES: dict[str, tuple[Callable[[], bytes | str], str]] = {
    "alg none": (_alg_none, "alg does not match the key"),
    "alg none, empty signature, no kid": (
        lambda: b64(b'{"alg":"none"}') + b"." + b64(GOOD) + b".", "kid missing"),
    "hmac with public key as secret": (_confusion, "alg does not match the key"),
    "alg of another key type": (lambda: forge(hdr(ES, alg="EdDSA"), GOOD, ED), "alg does not match the key"),
    "unknown kid": (lambda: forge(hdr(ES, kid="nope"), GOOD, ES), "unknown kid"),
    "jku header": (lambda: forge(hdr(ES, jku="https://evil.example/jwks"), GOOD, ES),
                   "unsupported header parameters ['jku']"),
    "x5u header": (lambda: forge(hdr(ES, x5u="https://evil.example/c"), GOOD, ES),
                   "unsupported header parameters ['x5u']"),
    "jwk header": (lambda: forge(hdr(ES, jwk=ES.verify_key.to_jwk()), GOOD, ES),
                   "unsupported header parameters ['jwk']"),
    "crit header": (lambda: forge(hdr(ES, crit=["exp"]), GOOD, ES), "unsupported header parameters ['crit']"),
    "b64 false": (lambda: forge(hdr(ES, b64=False, crit=["b64"]), GOOD, ES),
                  "unsupported header parameters ['b64', 'crit']"),
    "typ not JWT": (lambda: forge(hdr(ES, typ="at+jwt"), GOOD, ES), "unsupported typ"),
    "kid not a string": (lambda: forge(hdr(ES, kid=7), GOOD, ES), "kid is not a string"),
    "tampered header": (lambda: tamper(tokens.mint(ES, make_claims()), 0), "unknown kid"),
    "tampered header, valid JSON": (
        lambda: forge(hdr(ES), GOOD, ES).replace(b64(hdr(ES)), b64(hdr(ES, typ="JOSE"))), "bad signature"),
    "tampered payload": (lambda: tamper(tokens.mint(ES, make_claims()), 1), "bad signature"),
    "tampered signature es256": (lambda: tamper(tokens.mint(ES, make_claims()), 2), "bad signature"),
    "tampered signature eddsa": (lambda: tamper(tokens.mint(ED, make_claims()), 2), "bad signature"),
    "tampered signature hs256": (lambda: tamper(tokens.mint(HS, make_claims()), 2), "bad signature"),
    "signature truncated": (lambda: _resign(tokens.mint(ES, make_claims()), lambda sig: sig[:-1]),
                            "bad signature length"),
    "signature as DER": (lambda: _resign(tokens.mint(ES, make_claims()), _as_der), "bad signature length"),
    "signature too long": (lambda: tokens.mint(ES, make_claims()) + b"AAAA", "bad signature length"),
    "signature very long": (lambda: tokens.mint(ES, make_claims()) + b"A" * 400, "bad signature length"),
    "padding": (lambda: tokens.mint(HS, make_claims()) + b"=", "non-canonical base64url"),
    "padding in header": (lambda: b64(hdr(HS)) + b"=" + tokens.mint(HS, make_claims())[len(b64(hdr(HS))):],
                          "non-canonical base64url"),
    "whitespace": (lambda: b" " + tokens.mint(ES, make_claims()), "non-canonical base64url"),
    "whitespace in signature": (lambda: _resign(tokens.mint(ES, make_claims()), lambda s: s)[:-10] + b" A"
                                + b"A" * 8, "non-canonical base64url"),
    "newline at end": (lambda: tokens.mint(ES, make_claims()) + b"\n", "non-canonical base64url"),
    "standard alphabet": (lambda: _std_alphabet(tokens.mint(ES, make_claims())), "non-canonical base64url"),
    "trailing bits": (lambda: _trailing_bits(tokens.mint(HS, make_claims())), "non-canonical base64url"),
    "two segments": (lambda: tokens.mint(ES, make_claims()).rsplit(b".", 1)[0], "not a JWS compact token"),
    "four segments": (lambda: tokens.mint(ES, make_claims()) + b".e30", "not a JWS compact token"),
    "duplicate header key": (lambda: forge(b'{"alg":"ES256","alg":"HS256","kid":"' + ES.kid.encode() + b'"}',
                                           GOOD, ES), "duplicate JSON key 'alg'"),
    "duplicate claim": (lambda: forge(hdr(ES), GOOD[:-1] + b',"aud":"other"}', ES), "duplicate JSON key 'aud'"),
    "string exp": (lambda: _reclaim(exp=str(NOW + 200)), "claim exp is not an integer"),
    "float exp": (lambda: _reclaim(exp=NOW + 200.0), "claim exp is not an integer"),
    "bool iat": (lambda: _reclaim(iat=True), "claim iat is not an integer"),
    "list tool": (lambda: _reclaim(tool=["read_ticket"]), "claim tool is not a string"),
    "null tool": (lambda: _reclaim(tool=None), "claim tool is not a string"),
    "aud object": (lambda: _reclaim(aud={"crm": 1}), "claim aud is missing or malformed"),
    "act not list": (lambda: _reclaim(act="agent"), "claim act is not a list of strings"),
    "missing jti": (lambda: forge(hdr(ES), GOOD.replace(b'"jti"', b'"jtx"'), ES), "claim jti is not a string"),
    "payload not an object": (lambda: forge(hdr(ES), b"[1]", ES), "JSON is not an object"),
    "expired": (lambda: tokens.mint(ES, make_claims(exp=NOW - 5)), "expired"),
    "not yet valid": (lambda: tokens.mint(ES, make_claims(nbf=NOW + 60)), "not yet valid"),
    "issued in the future": (lambda: tokens.mint(ES, make_claims(iat=NOW + 60)), "not yet valid"),
    "wrong audience": (lambda: tokens.mint(ES, make_claims(aud=("billing",))), "wrong audience"),
    "wrong tool": (lambda: tokens.mint(ES, make_claims(tool="delete_ticket")), "wrong tool"),
    # Another tool's token carries that tool as its audience too: the tool is named as the cause.
    "another tool's token": (lambda: tokens.mint(ES, make_claims(tool="delete_ticket", aud=("delete_ticket",))),
                             "wrong tool"),
    "workflow token for a tool": (lambda: tokens.mint(ES, make_claims(tool=None, act=(), dst=())), "wrong tool"),
    "other trust domain": (lambda: tokens.mint(ES, make_claims(iss="spiffe://evil.org",
                                                               sub="spiffe://evil.org/workflow/wf-7")),
                           "issuer or subject outside the trust domain"),
    "trust domain prefix": (lambda: tokens.mint(ES, make_claims(iss=f"spiffe://{TD}.evil",
                                                                sub=f"spiffe://{TD}.evil/workflow/wf-7")),
                            "issuer or subject outside the trust domain"),
    "subject for another workflow": (lambda: tokens.mint(ES, make_claims(wf="wf-8")),
                                     "subject does not name the workflow"),
    "1 MB token": (lambda: b"e" * (1 << 20), "token too large"),
    "1 MB token as str": (lambda: "e." * (1 << 19), "token too large"),
    "non-ascii str": (lambda: tokens.mint(ES, make_claims()).decode().replace("e", "\u00e9", 1),
                      "non-canonical base64url"),
    "deeply nested claims": (lambda: forge(hdr(ES), _deep(64), ES), "JSON nested too deeply"),
    "deeply nested header": (lambda: forge(b'{"alg":' + b"[" * 40 + b"]" * 40 + b"}", GOOD, ES),
                             "JSON nested too deeply"),
    "lone surrogate claim": (lambda: forge(hdr(ES), GOOD.replace(b'"acme"', b'"\\ud800"'), ES), "malformed JSON"),
    "invalid utf-8 claim": (lambda: forge(hdr(ES), GOOD.replace(b'"acme"', b'"\xc3("'), ES), "malformed JSON"),
    "NaN claim": (lambda: forge(hdr(ES), GOOD[:-1] + b',"x":NaN}', ES), "malformed JSON"),
    "empty": (lambda: b"", "not a JWS compact token"),
    "dots only": (lambda: b"..", "malformed JSON"),
}


def _std_alphabet(token: bytes) -> bytes:
    # "+" belongs to the standard base64 alphabet, not to base64url.
    h, p, s = token.split(b".")
    return b".".join([h, p, b"+" + s[1:]])


def _resign(token: bytes, change: Callable[[bytes], bytes]) -> bytes:
    h, p, s = token.split(b".")
    return b".".join([h, p, b64(change(base64.urlsafe_b64decode(s + b"==")))])


def _as_der(sig: bytes) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
    return encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))


def _trailing_bits(token: bytes) -> bytes:
    # The signature of HS256 is 32 bytes: 43 characters whose last one carries 2 unused bits.
    h, p, s = token.split(b".")
    last = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".index(s[-1:])
    return b".".join([h, p, s[:-1] + bytes([b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
                                             [last | 1]])])


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused(engine: ModuleType, case: str) -> None:
    make, reason = CASES[case]
    token = make()
    with pytest.raises(InvalidToken) as info:
        engine.verify(token, KEYS, EXPECT, NOW)
    assert info.value.reason == reason
    # Opaque to the caller: the message never carries the reason.
    assert str(info.value) == "invalid token"


def test_good_token_passes(engine: ModuleType) -> None:
    for key in (ES, ED, HS):
        assert engine.verify(forge(hdr(key), GOOD, key), KEYS, EXPECT, NOW) == make_claims()


def test_leeway_edges(engine: ModuleType) -> None:
    token = tokens.mint(ES, make_claims(exp=NOW, nbf=NOW + 5, iat=NOW))
    engine.verify(token, KEYS, EXPECT, NOW)  # exp + 5 > now >= nbf - 5
    engine.verify(token, KEYS, EXPECT, NOW + 4)
    with pytest.raises(InvalidToken) as info:
        engine.verify(token, KEYS, EXPECT, NOW + 5)
    assert info.value.reason == "expired"
    strict = tokens.Expect(TD, "crm", "read_ticket", leeway=0)
    with pytest.raises(InvalidToken):
        engine.verify(token, KEYS, strict, NOW)


def test_explicit_key_must_match_named_kid(engine: ModuleType) -> None:
    token = tokens.mint(ES, make_claims())
    with pytest.raises(InvalidToken) as info:
        engine.verify_signature(token, tokens.generate(tokens.ES256).verify_key)
    assert info.value.reason == "kid does not match the key"
