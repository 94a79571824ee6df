"""Which engine runs: the Cython one when it is built, unless ``BROKER_PUREPYTHON`` forces the twin.

Never silent: ``BACKEND`` names the engine that loaded and ``WHY_PURE`` says why the pure one did, so the
daemon can log it at start and refuse to run without the native one when configured to.
"""

from __future__ import annotations

import os
from typing import Final

from broker.tokens import _pure
from broker.tokens._engine import Engine


def _load() -> tuple[str, Engine, str]:
    pure: Engine = _pure
    if os.environ.get("BROKER_PUREPYTHON", "") not in ("", "0"):
        return "pure", pure, "BROKER_PUREPYTHON is set"
    try:
        from broker.tokens import _native  # noqa: PLC0415 - optional compiled module
    except ImportError as exc:
        return "pure", pure, f"the native module did not load ({exc})"
    native: Engine = _native
    return "native", native, ""


_LOADED: Final = _load()
BACKEND: Final = _LOADED[0]
ENGINE: Final = _LOADED[1]
WHY_PURE: Final = _LOADED[2]
