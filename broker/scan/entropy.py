"""Shannon entropy of a candidate secret, the floor every rule applies before it reports."""

from __future__ import annotations

import math
from collections import Counter


def shannon(value: str) -> float:
    """Bits per character of ``value``: 0 for a constant string, log2(len) at most."""
    if not value:
        return 0.0
    n = len(value)
    return -sum(c / n * math.log2(c / n) for c in Counter(value).values())
