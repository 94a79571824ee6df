"""When to refresh a cached credential: a pure policy, shared by the library and the sidecar."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final

DEFAULT_REFRESH_FRACTION: Final = 0.5
DEFAULT_JITTER: Final = 0.1
# While the daemon is away a cached token is still handed out, but never in its last seconds: clocks
# drift and the request it goes into takes time.
FALLBACK_MARGIN: Final = 2.0


@dataclass(frozen=True, slots=True)
class Minted:
    """A token from the daemon. ``repr`` never shows the token itself."""

    token: str
    jti: str
    issued_at: int
    expires_at: int

    def __repr__(self) -> str:
        return f"Minted(jti={self.jti!r}, expires_at={self.expires_at})"

    def refresh_at(self, fraction: float, jitter: float = DEFAULT_JITTER,
                   rng: random.Random | None = None) -> float:
        """The moment to replace this token: ``fraction`` of its lifetime, give or take ``jitter`` of it,
        so a fleet of clients minted at once does not come back at once."""
        lifetime = self.expires_at - self.issued_at
        spread = (rng or random).uniform(-jitter, jitter) if jitter else 0.0
        return self.issued_at + lifetime * min(max(fraction + spread, 0.05), 0.95)


def still_usable(minted: Minted, now: float) -> bool:
    """Whether a cached token may stand in for a fresh one while the daemon cannot be reached."""
    return minted.expires_at - FALLBACK_MARGIN > now
