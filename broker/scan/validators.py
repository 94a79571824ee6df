"""Structural checks a rule can ask for after its regex matched (``validate = "..."`` in TOML).

They look only at the candidate itself: the scanner never calls a provider to verify a secret.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from typing import Final


def _jwt(candidate: str) -> bool:
    # A real JWS header is a JSON object naming its algorithm; this drops look-alike base64 runs.
    header = candidate.split(".", 1)[0]
    try:
        raw = base64.urlsafe_b64decode(header + "=" * (-len(header) % 4))
        decoded = json.loads(raw)
    except (binascii.Error, ValueError):
        return False
    return isinstance(decoded, dict) and ("alg" in decoded or "typ" in decoded)


VALIDATORS: Final[dict[str, Callable[[str], bool]]] = {"jwt": _jwt}
