"""Shared fixtures: every engine test runs once per backend module (native and pure) in the same run."""

from __future__ import annotations

import hashlib
from types import ModuleType

import pytest

from broker import tokens
from broker.tokens import _pure

try:
    from broker.tokens import _native
except ImportError:  # test_backend.py fails loudly on this; here the native cases are skipped
    _native = None  # type: ignore[assignment]

TD = "example.org"
NOW = 1_700_000_100


@pytest.fixture(params=["native", "pure"])
def engine(request: pytest.FixtureRequest) -> ModuleType:
    if request.param == "native":
        if _native is None:
            pytest.skip("native module not built")
        return _native
    return _pure


def derived_secret(label: str) -> bytes:
    """A 32-byte HMAC secret derived from a label, so no literal secret sits in the test sources."""
    return hashlib.sha256(b"broker test key: " + label.encode()).digest()




def make_claims(**over: object) -> tokens.Claims:
    base: dict[str, object] = {
        "iss": f"spiffe://{TD}", "sub": f"spiffe://{TD}/workflow/wf-7", "aud": ("crm",),
        "iat": NOW - 100, "nbf": NOW - 100, "exp": NOW + 200, "jti": "3f2a9c0e7b1d4e5f8a6b9c0d1e2f3a4b",
        "tenant": "acme", "wf": "wf-7", "tool": "read_ticket", "act": ("agent-1",), "dst": ("crm",),
    }
    base.update(over)
    return tokens.Claims(**base)  # type: ignore[arg-type]


@pytest.fixture(params=[tokens.ES256, tokens.EDDSA, tokens.HS256])
def key(request: pytest.FixtureRequest) -> tokens.SigningKey:
    if request.param == tokens.HS256:
        return tokens.hmac_key(derived_secret("hs"), "hs-1")
    return tokens.generate(request.param)


@pytest.fixture
def expect() -> tokens.Expect:
    return tokens.Expect(TD, "crm", "read_ticket")
