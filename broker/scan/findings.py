"""A finding, its redacted preview and its fingerprint.

The fingerprint identifies the secret value alone (not its path, line or commit), so a baseline entry
follows a secret when its line moves, and a different secret on an old line is still new.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final

# PBKDF2 rather than a bare hash: fingerprints are written to baselines and uploaded in SARIF, and a
# short password must not be recoverable by hashing a dictionary at full speed. The salt is fixed so
# that the same value always gets the same fingerprint, across machines and runs.
_SALT: Final = b"broker-scan-fingerprint-v1"
_ITERATIONS: Final = 5_000
PREVIEW_CHARS: Final = 4


def fingerprint(secret: str) -> str:
    digest = hashlib.pbkdf2_hmac("sha256", secret.encode("utf-8", "surrogatepass"), _SALT, _ITERATIONS)
    return digest[:16].hex()


def redact(secret: str) -> str:
    """At most the first four characters, and fewer for short values: never half of a secret."""
    shown = min(PREVIEW_CHARS, len(secret) // 4)
    return secret[:shown] + "..."


@dataclass(frozen=True, slots=True)
class Finding:
    """One detected secret. ``secret`` stays in memory: reporters print only a preview of it."""

    rule_id: str
    description: str
    path: str
    line: int
    column: int
    end_line: int
    end_column: int
    secret: str
    fingerprint: str
    commit: str | None = None

    @property
    def preview(self) -> str:
        return redact(self.secret)

    def sort_key(self) -> tuple[str, str, int, int, str]:
        return (self.commit or "", self.path, self.line, self.column, self.rule_id)
