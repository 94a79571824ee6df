"""Retry delays: exponential growth with jitter, so a fleet of brokers does not hammer a recovering Vault
in lockstep."""

from __future__ import annotations

import random
from typing import Final

DEFAULT_BASE: Final = 0.5
DEFAULT_CAP: Final = 30.0


class Backoff:
    """Delays of base * 2**n, capped, each drawn from its upper half ("equal jitter").

    Half the delay is fixed so that retries never collapse to a busy loop; the random half spreads
    the brokers of a fleet apart.
    """

    def __init__(self, rng: random.Random, *, base: float = DEFAULT_BASE, cap: float = DEFAULT_CAP) -> None:
        self._rng = rng
        self._base = base
        self._cap = cap
        self._attempts = 0

    @property
    def attempts(self) -> int:
        return self._attempts

    def next(self) -> float:
        ceiling = min(self._cap, self._base * 2.0 ** min(self._attempts, 30))
        self._attempts += 1
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    def reset(self) -> None:
        self._attempts = 0
