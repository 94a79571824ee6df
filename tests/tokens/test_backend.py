"""Backend selection, its visibility, and the public surface of broker.tokens."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from broker import tokens
from broker.errors import BrokerError
from broker.tokens import _pure


def _run(code: str, **env: str) -> str:
    full = {k: v for k, v in os.environ.items() if k != "BROKER_PUREPYTHON"} | env
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_native_module_is_built() -> None:
    # The suite covers both engines only if the extension is there: build it, don't skip past it.
    from broker.tokens import _native

    assert _native.verify is not None


def test_backend_is_announced() -> None:
    expected = "pure" if os.environ.get("BROKER_PUREPYTHON", "") not in ("", "0") else "native"
    assert expected == tokens.BACKEND
    assert tokens.mint.__module__ == f"broker.tokens._{tokens.BACKEND}"


def test_env_forces_pure_and_require_native_refuses() -> None:
    out = _run("""
        from broker import tokens
        from broker.errors import BrokerError
        print(tokens.BACKEND, tokens.verify.__module__)
        try:
            tokens.require_native()
        except BrokerError as exc:
            print(exc)
    """, BROKER_PUREPYTHON="1")
    assert out.splitlines()[0] == "pure broker.tokens._pure"
    assert "BROKER_PUREPYTHON is set" in out


def test_default_is_native() -> None:
    assert _run("from broker import tokens; tokens.require_native(); print(tokens.BACKEND)") == "native"


def test_require_native_in_process() -> None:
    if tokens.BACKEND == "native":
        tokens.require_native()
    else:
        with pytest.raises(BrokerError, match="native token engine is required"):
            tokens.require_native()


def test_twins_expose_the_same_interface() -> None:
    from broker.tokens import _native

    assert sorted(_native.__all__) == sorted(_pure.__all__)
    for name in _pure.__all__:
        assert hasattr(_native, name), name


def test_exported_members() -> None:
    public = {n for n in dir(tokens) if not n.startswith("_")} - {"annotations"}
    modules = {n for n in public if type(getattr(tokens, n)).__name__ == "module"}
    assert set(tokens.__all__) == public - modules - {"BrokerError"}
