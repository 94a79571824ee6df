"""Token engine benchmark: raw primitive, native, pure, pyjwt and joserfc side by side, in one process.

Run as a script to get the table (it runs pytest-benchmark on this file and formats its JSON)::

    .venv/bin/python bench/bench_tokens.py

or as plain pytest-benchmark tests: ``.venv/bin/python -m pytest bench/bench_tokens.py --benchmark-only``.
Ratios are only ever taken between rows of the same run.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jwt as jose_jwt
from joserfc.jwk import ECKey, OctKey, OKPKey
from joserfc.jwt import JWTClaimsRegistry

from broker import tokens
from broker.tokens import _native, _pure

ALGS = [tokens.ES256, tokens.EDDSA, tokens.HS256]
IMPLS = ["raw", "native", "pure", "pyjwt", "joserfc"]
TD = "example.org"
NOW = 1_700_000_100
ECDSA = ec.ECDSA(hashes.SHA256())
CLAIMS = tokens.Claims(
    iss=f"spiffe://{TD}", sub=f"spiffe://{TD}/workflow/wf-20240611-7f3a", aud=("crm",), iat=NOW - 10,
    nbf=NOW - 10, exp=4_000_000_000,  # far ahead, because pyjwt reads the real clock
    jti="b3c1f0e2a9d84c6f9e0d1a2b3c4d5e6f", tenant="acme",
    wf="wf-20240611-7f3a", tool="read_ticket", act=("agent:planner",), dst=("crm",))
EXPECT = tokens.Expect(TD, "crm", "read_ticket")


def _key(alg: str) -> tokens.SigningKey:
    if alg == tokens.HS256:
        return tokens.hmac_key(hashlib.sha256(b"bench key").digest(), "hs-bench")
    return tokens.generate(alg)


KEYS = {alg: _key(alg) for alg in ALGS}


def _case(alg: str, op: str, impl: str) -> Callable[[], Any]:
    key = KEYS[alg]
    vk = {key.kid: key.verify_key}
    token = _native.mint(key, CLAIMS)
    signing_input, _, _ = token.rpartition(b".")
    payload = CLAIMS.to_json_dict()
    if impl == "raw":
        if alg == tokens.HS256:
            assert key.secret is not None
            secret = key.secret
            return lambda: hmac.digest(secret, signing_input, "sha256")
        private: Any = key.private
        public: Any = key.verify_key.public
        if alg == tokens.ES256:
            der = private.sign(signing_input, ECDSA)
            if op == "mint":
                return lambda: private.sign(signing_input, ECDSA)
            return lambda: public.verify(der, signing_input, ECDSA)
        sig = private.sign(signing_input)
        if op == "mint":
            return lambda: private.sign(signing_input)
        return lambda: public.verify(sig, signing_input)
    if impl in ("native", "pure"):
        eng: Any = _native if impl == "native" else _pure
        if op == "mint":
            return lambda: eng.mint(key, CLAIMS)
        return lambda: eng.verify(token, vk, EXPECT, NOW)
    if impl == "pyjwt":
        secret_or_private: Any = key.secret if alg == tokens.HS256 else key.private
        public_or_secret: Any = key.secret if alg == tokens.HS256 else key.verify_key.public
        headers = {"kid": key.kid}
        if op == "mint":
            return lambda: jwt.encode(payload, secret_or_private, algorithm=alg, headers=headers)
        return lambda: jwt.decode(token, public_or_secret, algorithms=[alg], audience="crm",
                                  issuer=f"spiffe://{TD}", options={"verify_iat": True})
    # joserfc: decode + claims validation, the equivalent of what the others check.
    jkey: Any
    if alg == tokens.HS256:
        jkey = OctKey.import_key(key.secret)  # type: ignore[arg-type]
    else:
        jkey = (ECKey if alg == tokens.ES256 else OKPKey).import_key(key.private)  # type: ignore[arg-type]
    header = {"alg": alg, "kid": key.kid, "typ": "JWT"}
    registry = JWTClaimsRegistry(now=NOW, leeway=5, iss={"essential": True, "value": f"spiffe://{TD}"},
                                 aud={"essential": True, "value": "crm"})
    if op == "mint":
        return lambda: jose_jwt.encode(header, payload, jkey, algorithms=[alg])

    def decode() -> None:
        registry.validate(jose_jwt.decode(token, jkey, algorithms=[alg]).claims)
    return decode


def _cache_case(impl: str) -> Callable[[], Any]:
    key = KEYS[tokens.ES256]
    eng: Any = _native if impl == "native" else _pure
    verifier = tokens.Verifier([key.verify_key], cache_entries=1024, engine=eng)
    token = _native.mint(key, CLAIMS)
    verifier.verify(token, EXPECT, NOW)
    return lambda: verifier.verify(token, EXPECT, NOW)


@pytest.mark.filterwarnings("ignore:EdDSA is deprecated")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["mint", "verify"])
@pytest.mark.parametrize("alg", ALGS)
def test_token(benchmark: Any, alg: str, op: str, impl: str) -> None:
    benchmark.group = f"{alg} {op}"
    benchmark.extra_info.update(alg=alg, op=op, impl=impl)
    benchmark(_case(alg, op, impl))


@pytest.mark.parametrize("impl", ["native", "pure"])
def test_cache_hit(benchmark: Any, impl: str) -> None:
    benchmark.group = "ES256 cache hit"
    benchmark.extra_info.update(alg="ES256", op="cache hit", impl=impl)
    benchmark(_cache_case(impl))


def _table(report: dict[str, Any]) -> str:
    med: dict[tuple[str, str, str], float] = {}
    iqr: dict[tuple[str, str, str], float] = {}
    low: dict[tuple[str, str, str], float] = {}
    for b in report["benchmarks"]:
        k = (b["extra_info"]["alg"], b["extra_info"]["op"], b["extra_info"]["impl"])
        med[k] = b["stats"]["median"] * 1e6
        iqr[k] = b["stats"]["iqr"] * 1e6
        low[k] = b["stats"]["min"] * 1e6
    lines = ["| alg | op | raw | native | pure | pyjwt | joserfc | native/raw | pure/native | pyjwt/native |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for alg in ALGS:
        for op in ("mint", "verify"):
            cells = [f"{med[(alg, op, i)]:.2f} ±{iqr[(alg, op, i)] / 2:.2f}" for i in IMPLS]
            n, nl = med[(alg, op, "native")], low[(alg, op, "native")]
            lines.append(f"| {alg} | {op} | " + " | ".join(cells)
                         + f" | {n / med[(alg, op, 'raw')]:.2f} ({nl / low[(alg, op, 'raw')]:.2f})"
                         + f" | {med[(alg, op, 'pure')] / n:.2f}x ({low[(alg, op, 'pure')] / nl:.2f}x)"
                         + f" | {med[(alg, op, 'pyjwt')] / n:.2f}x ({low[(alg, op, 'pyjwt')] / nl:.2f}x) |")
    full, full_low = med[("ES256", "verify", "native")], low[("ES256", "verify", "native")]
    for impl in ("native", "pure"):
        hit, hit_low = med[("ES256", "cache hit", impl)], low[("ES256", "cache hit", impl)]
        lines.append(f"| ES256 | cache hit ({impl} Verifier) | | {hit:.2f} ±{iqr[('ES256', 'cache hit', impl)] / 2:.2f}"
                     f" | | | | | | full native verify / hit = {full / hit:.0f}x ({full_low / hit_low:.0f}x) |")
    lines.append("")
    lines.append("Cells: median in microseconds ± half the interquartile range, per operation; ratios of "
                 "medians, with the ratio of minimums (least disturbed by other load) in parentheses. "
                 f"Python {sys.version.split()[0]}; backends compared in one process "
                 f"(host load median over the run: {statistics.median(_load()):.2f}).")
    return "\n".join(lines)


def _load() -> list[float]:
    return [float(Path("/proc/loadavg").read_text().split()[0])]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
                        "--benchmark-only", "--benchmark-warmup=on", "--benchmark-max-time=0.5",
                        "--benchmark-min-rounds=50", f"--benchmark-json={out}", "--benchmark-disable-gc"],
                       check=True, stdout=subprocess.DEVNULL)
        print(_table(json.loads(out.read_text())))


if __name__ == "__main__":
    main()
