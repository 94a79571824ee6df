"""Pure-Python token engine: JWS compact encoding, strict parsing and claim checks.

The twin of the Cython engine in ``native/tokens.pyx``: the same functions, byte-identical output, the
same inputs accepted and refused, the same reasons (see ``_engine.Engine``). This one is the reference
for reading; the native one is the one that runs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from broker.errors import BrokerError, InvalidToken
from broker.tokens._claims import HEADER_KEYS, MAX_JSON_DEPTH, MAX_TOKEN_BYTES, Claims, Expect
from broker.tokens._engine import KeySource
from broker.tokens._keys import EDDSA, ES256, HS256, SigningKey, VerifyKey

__all__ = ["VerifiedCache", "b64decode", "b64encode", "check_claims", "mint", "parse_claims", "parse_json",
           "sign_compact", "verify", "verify_signature"]

_B64URL_RE: Final = re.compile(rb"[A-Za-z0-9_-]*")
_ECDSA: Final = ec.ECDSA(hashes.SHA256())
_SIG_LEN: Final = {ES256: 64, EDDSA: 64, HS256: 32}
_TYPS: Final = ("JWT", "JOSE")


def b64encode(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def b64decode(seg: bytes) -> bytes:
    """Strict base64url: no padding, no whitespace, no non-alphabet bytes, zero trailing bits."""
    if len(seg) % 4 == 1 or not _B64URL_RE.fullmatch(seg):
        raise InvalidToken("non-canonical base64url")
    try:
        out = base64.urlsafe_b64decode(seg + b"=" * (-len(seg) % 4))
    except binascii.Error:
        raise InvalidToken("non-canonical base64url") from None
    # Re-encoding must give the same text, else the segment had non-zero trailing bits and two
    # different strings would decode to one token.
    if b64encode(out) != seg:
        raise InvalidToken("non-canonical base64url")
    return out


def _strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            # Two parsers could pick different duplicates; refuse instead of guessing.
            raise InvalidToken(f"duplicate JSON key {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise InvalidToken("malformed JSON")


def _check_tree(value: Any, depth: int) -> None:
    if isinstance(value, str):
        # A lone surrogate from a \\u escape makes a str that no UTF-8 consumer (the audit log) can take.
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidToken("malformed JSON") from None
    elif isinstance(value, dict | list):
        if depth > MAX_JSON_DEPTH:
            raise InvalidToken("JSON nested too deeply")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for k, v in items:
            _check_tree(k, depth)
            _check_tree(v, depth + 1)


def parse_json(raw: bytes) -> dict[str, Any]:
    """Strict RFC 8259 JSON object: UTF-8, no duplicate keys, no NaN, no lone surrogates, bounded depth."""
    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=_strict_object,
                           parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidToken("malformed JSON") from None
    _check_tree(value, 1)
    if not isinstance(value, dict):
        raise InvalidToken("JSON is not an object")
    return value


def _json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode()


def _sign(key: SigningKey, data: bytes) -> bytes:
    # SigningKey checked at construction that its material fits key.alg, so dispatching on alg is safe.
    if isinstance(key.private, ec.EllipticCurvePrivateKey):
        # JWS wants the fixed-width r || s of RFC 7518 section 3.4, not the DER that OpenSSL emits.
        r, s = decode_dss_signature(key.private.sign(data, _ECDSA))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")
    if isinstance(key.private, ed25519.Ed25519PrivateKey):
        return key.private.sign(data)
    assert key.secret is not None
    return hmac.digest(key.secret, data, "sha256")


def sign_compact(key: SigningKey, payload: bytes, *, kid: bool = True, typ: str | None = "JWT") -> bytes:
    """Sign arbitrary ``payload`` bytes as a JWS compact token with header alg[, kid][, typ]."""
    if typ is not None and typ not in _TYPS:
        raise BrokerError(f"typ must be one of {_TYPS} or None")
    header: dict[str, str] = {"alg": key.alg}
    if kid:
        header["kid"] = key.kid
    if typ is not None:
        header["typ"] = typ
    signing_input = b64encode(_json(header)) + b"." + b64encode(payload)
    return signing_input + b"." + b64encode(_sign(key, signing_input))


def _mint_problem(c: Claims) -> str | None:
    for name in ("iss", "sub", "jti", "tenant", "wf"):
        if not isinstance(getattr(c, name), str):
            return f"claim {name} must be a string"
    for name in ("iat", "nbf", "exp"):
        v = getattr(c, name)
        if not isinstance(v, int) or isinstance(v, bool):
            return f"claim {name} must be an integer"
    if not isinstance(c.aud, tuple | list) or not c.aud or not all(isinstance(a, str) for a in c.aud):
        return "claim aud must be a non-empty sequence of strings"
    if c.tool is not None:
        if not isinstance(c.tool, str):
            return "claim tool must be a string or None"
        for name in ("act", "dst"):
            v = getattr(c, name)
            if not isinstance(v, tuple | list) or not all(isinstance(x, str) for x in v):
                return f"claim {name} must be a sequence of strings"
    return None


def mint(key: SigningKey, claims: Claims) -> bytes:
    """Encode and sign ``claims`` with ``key`` as a JWS compact token."""
    problem = _mint_problem(claims)
    if problem is not None:
        # A programming error of the caller, not a token failure: raised as the plain root error.
        raise BrokerError(f"cannot mint: {problem}")
    return sign_compact(key, _json(claims.to_json_dict()))


def _check_signature(key: VerifyKey, data: bytes, sig: bytes) -> None:
    if len(sig) != _SIG_LEN[key.alg]:
        raise InvalidToken("bad signature length")
    try:
        if isinstance(key.public, ec.EllipticCurvePublicKey):
            der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
            key.public.verify(der, data, _ECDSA)
        elif isinstance(key.public, ed25519.Ed25519PublicKey):
            key.public.verify(sig, data)
        else:
            assert key.secret is not None
            # Constant-time comparison: the time taken must not reveal how many bytes matched.
            if not hmac.compare_digest(hmac.digest(key.secret, data, "sha256"), sig):
                raise InvalidSignature
    except InvalidSignature:
        raise InvalidToken("bad signature") from None


def _raw(token: bytes | str) -> bytes:
    return token.encode("ascii", "replace") if isinstance(token, str) else bytes(token)


def verify_signature(token: bytes | str, keys: KeySource) -> tuple[dict[str, str], bytes]:
    """Check the JOSE framing and the signature only; return the header and the raw payload bytes.

    ``keys`` is a key set by kid (the header must name one) or a single key (the header may omit kid,
    and if it names one it must be that key's). No claim is looked at: that is :func:`verify`'s job.
    """
    raw = _raw(token)
    if len(raw) > MAX_TOKEN_BYTES:
        raise InvalidToken("token too large")
    parts = raw.split(b".")
    if len(parts) != 3:
        raise InvalidToken("not a JWS compact token")
    h_seg, p_seg, s_seg = parts
    header = parse_json(b64decode(h_seg))
    if not header.keys() <= HEADER_KEYS:
        # jku, x5u, jwk, crit, b64 and anything else we do not implement: refuse, never ignore.
        raise InvalidToken(f"unsupported header parameters {sorted(header.keys() - HEADER_KEYS)}")
    if "typ" in header and header["typ"] not in _TYPS:
        raise InvalidToken("unsupported typ")
    alg, kid = header.get("alg"), header.get("kid")
    if not isinstance(alg, str):
        raise InvalidToken("alg missing")
    if kid is not None and not isinstance(kid, str):
        raise InvalidToken("kid is not a string")
    if isinstance(keys, VerifyKey):
        if kid is not None and kid != keys.kid:
            raise InvalidToken("kid does not match the key")
        key = keys
    else:
        if kid is None:
            raise InvalidToken("kid missing")
        found = keys.get(kid)
        if found is None:
            raise InvalidToken("unknown kid")
        key = found
    # The key decides the algorithm, never the token: defeats alg=none and HMAC/public-key confusion.
    if alg != key.alg:
        raise InvalidToken("alg does not match the key")
    _check_signature(key, raw[: len(h_seg) + 1 + len(p_seg)], b64decode(s_seg))
    return header, b64decode(p_seg)


def _str(d: dict[str, Any], key: str) -> str:
    v = d.get(key)
    if not isinstance(v, str):
        raise InvalidToken(f"claim {key} is not a string")
    return v


def _int(d: dict[str, Any], key: str) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise InvalidToken(f"claim {key} is not an integer")
    return v


def _strs(d: dict[str, Any], key: str) -> tuple[str, ...]:
    v = d.get(key, [])
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise InvalidToken(f"claim {key} is not a list of strings")
    return tuple(v)


def parse_claims(payload: bytes) -> Claims:
    """The typed claims of a verified payload; unknown claims are ignored, known ones must be well typed."""
    d = parse_json(payload)
    aud = d.get("aud")
    if isinstance(aud, str):
        auds: tuple[str, ...] = (aud,)
    elif isinstance(aud, list) and aud and all(isinstance(a, str) for a in aud):
        auds = tuple(aud)
    else:
        raise InvalidToken("claim aud is missing or malformed")
    # An explicit null tool is malformed, not absent.
    tool = _str(d, "tool") if "tool" in d else None
    return Claims(
        iss=_str(d, "iss"), sub=_str(d, "sub"), aud=auds,
        iat=_int(d, "iat"), nbf=_int(d, "nbf"), exp=_int(d, "exp"), jti=_str(d, "jti"),
        tenant=_str(d, "tenant"), wf=_str(d, "wf"), tool=tool,
        act=_strs(d, "act"), dst=_strs(d, "dst"),
    )


def check_claims(c: Claims, expect: Expect, now: int) -> None:
    if isinstance(now, float) and math.isnan(now):  # every comparison below would be false: expired passes
        raise InvalidToken("the clock reading is not a number")
    td = expect.trust_domain
    if c.iss != f"spiffe://{td}" or not c.sub.startswith(f"spiffe://{td}/workflow/"):
        raise InvalidToken("issuer or subject outside the trust domain")
    if c.sub != f"spiffe://{td}/workflow/{c.wf}":
        raise InvalidToken("subject does not name the workflow")
    if now >= c.exp + expect.leeway:
        raise InvalidToken("expired")
    if now + expect.leeway < c.nbf or now + expect.leeway < c.iat:
        raise InvalidToken("not yet valid")
    # The tool first: a token shown to another tool fails on both, and "wrong tool" is the cause.
    if expect.tool is not None and c.tool != expect.tool:
        raise InvalidToken("wrong tool")
    if expect.audience not in c.aud:
        raise InvalidToken("wrong audience")


def verify(token: bytes | str, keys: Mapping[str, VerifyKey], expect: Expect, now: int) -> Claims:
    """Check ``token`` fully; return its claims or raise :class:`InvalidToken` (reason inside)."""
    _, payload = verify_signature(token, keys)
    claims = parse_claims(payload)
    check_claims(claims, expect, now)
    return claims


class _Entry:
    """One cached token: its claims, the kid that verified them, and its place on the clock."""

    __slots__ = ("claims", "digest", "kid", "ref", "slot")

    def __init__(self, digest: bytes, claims: Claims, kid: str) -> None:
        self.digest = digest
        self.claims = claims
        self.kid = kid
        self.slot = -1  # its index in the ring; -1 once removed
        self.ref = False  # used since the clock hand last passed it


class VerifiedCache:
    """Tokens verified before, by the SHA-256 of their full bytes, evicted by a clock (second chance).

    Keyed by a hash rather than the token so the cache holds no usable bearer tokens; a cryptographic
    hash, so no other token can be made to land on a cached one's entry. Each entry keeps the claims and
    the kid that verified them, so a retired key or a revoked jti can be swept out. A hit still runs the
    claim checks against the caller's ``Expect``: the cache vouches for the signature and the parse
    only. Safe to share between threads: a hit reads one entry; every change holds the cache's lock.

    Eviction, the same step for step as the native engine's: each slot of a ring holds one entry and a
    "used since the hand last passed" bit. A hit sets the bit; a put into a full cache sweeps the hand
    forward, clearing set bits, and evicts the first entry whose bit is clear (at most one turn). Slots
    emptied by a discard are reused first, last freed first.
    """

    def __init__(self, max_entries: int) -> None:
        if not isinstance(max_entries, int) or max_entries < 1:
            raise BrokerError("max_entries must be a positive integer")
        self._max = max_entries
        self._map: dict[bytes, _Entry] = {}
        self._ring: list[_Entry | None] = []
        self._free: list[int] = []
        self._hand = 0
        self._lock = threading.Lock()

    @property
    def max_entries(self) -> int:
        return self._max

    def __len__(self) -> int:
        return len(self._map)

    def _remove(self, entry: _Entry) -> None:
        # Caller holds the lock.
        if entry.slot < 0:
            return  # already gone
        del self._map[entry.digest]
        self._ring[entry.slot] = None
        self._free.append(entry.slot)
        entry.slot = -1

    def lookup(self, token: bytes | str, expect: Expect, now: int) -> Claims | None:
        """The claims of a cached token that passes ``expect`` now; None on a miss; raises if it fails."""
        raw = _raw(token)
        if len(raw) > MAX_TOKEN_BYTES:
            return None
        entry = self._map.get(hashlib.sha256(raw).digest())
        if entry is None:
            return None
        claims = entry.claims
        if now >= claims.exp:
            # Never served past exp, leeway or not; the full path decides about the leeway.
            with self._lock:
                self._remove(entry)
            return None
        entry.ref = True
        check_claims(claims, expect, now)
        return claims

    def verify(self, token: bytes | str, expect: Expect, now: int,
               miss: Callable[[bytes | str, Expect, int], Claims]) -> Claims:
        """Like ``lookup``, but a miss returns ``miss(token, expect, now)``: the hit path in one call."""
        claims = self.lookup(token, expect, now)
        return miss(token, expect, now) if claims is None else claims

    def put(self, token: bytes | str, claims: Claims, kid: str, now: int) -> None:
        """Remember a token that has just passed full verification (an expired one is not kept)."""
        raw = _raw(token)
        if now >= claims.exp or len(raw) > MAX_TOKEN_BYTES:
            return
        entry = _Entry(hashlib.sha256(raw).digest(), claims, kid)
        with self._lock:
            old = self._map.get(entry.digest)
            if old is not None:
                # Verified again (two threads missed at once): the new entry takes the old one's slot.
                slot, old.slot, entry.ref = old.slot, -1, True
            elif self._free:
                slot = self._free.pop()
            elif len(self._ring) < self._max:
                slot = len(self._ring)
                self._ring.append(None)
            else:
                # Full and no holes, so every slot holds an entry; at most one turn clears every bit.
                while True:
                    victim = self._ring[self._hand]
                    assert victim is not None
                    if not victim.ref:
                        break
                    victim.ref = False
                    self._hand = (self._hand + 1) % self._max
                del self._map[victim.digest]
                victim.slot = -1
                slot = self._hand
                self._hand = (self._hand + 1) % self._max
            entry.slot = slot
            self._ring[slot] = entry
            self._map[entry.digest] = entry

    def discard_kid(self, kid: str) -> int:
        """Drop every token verified by ``kid`` (its key was retired); returns how many."""
        with self._lock:
            doomed = [e for e in self._map.values() if e.kid == kid]
            for e in doomed:
                self._remove(e)
        return len(doomed)

    def discard_jti(self, jti: str) -> int:
        """Drop every token with this ``jti`` (it was revoked); returns how many."""
        with self._lock:
            doomed = [e for e in self._map.values() if e.claims.jti == jti]
            for e in doomed:
                self._remove(e)
        return len(doomed)

    def clear(self) -> None:
        with self._lock:
            self._map.clear()
            self._ring = []
            self._free = []
            self._hand = 0
