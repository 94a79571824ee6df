"""Baselines: accepted findings, identified by the fingerprint of the secret value alone.

A baseline is simply a JSON report (``--format json``) kept in the repository. Only the
``fingerprint`` of each finding is read back: path, line and commit are there for the reader. Because
the fingerprint ignores position, a secret stays suppressed when its line moves, and a new secret
written on an old line is reported.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from broker.scan.errors import UsageError
from broker.scan.findings import Finding

_FINGERPRINT: Final = re.compile(r"^[0-9a-f]{32}$")


def load(path: Path) -> frozenset[str]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"baseline {path}: {exc.strerror}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"baseline {path}: not a JSON report: {exc}") from exc
    findings = raw.get("findings") if isinstance(raw, dict) else None
    if not isinstance(findings, list):
        raise UsageError(f"baseline {path}: no 'findings' list (write one with --format json)")
    prints = set()
    for i, item in enumerate(findings):
        value = item.get("fingerprint") if isinstance(item, dict) else None
        if not isinstance(value, str) or not _FINGERPRINT.match(value):
            raise UsageError(f"baseline {path}: findings[{i}].fingerprint is missing or malformed")
        prints.add(value)
    return frozenset(prints)


def apply(findings: Sequence[Finding], accepted: frozenset[str]) -> list[Finding]:
    return [f for f in findings if f.fingerprint not in accepted]
