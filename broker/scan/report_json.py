"""JSON report, also the baseline format. It never carries a secret: a preview and a fingerprint."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Final

from broker.scan.engine import Stats
from broker.scan.findings import Finding

FORMAT_VERSION: Final = 1


def finding_record(f: Finding) -> dict[str, Any]:
    return {
        "rule": f.rule_id,
        "description": f.description,
        "path": f.path,
        "line": f.line,
        "column": f.column,
        "end_line": f.end_line,
        "end_column": f.end_column,
        "commit": f.commit,
        "preview": f.preview,
        "fingerprint": f.fingerprint,
    }


def render(findings: Sequence[Finding], stats: Stats) -> str:
    report = {
        "version": FORMAT_VERSION,
        "findings": [finding_record(f) for f in findings],
        "stats": {"files": stats.files, "bytes": stats.bytes, "skipped": dict(sorted(stats.skipped.items()))},
    }
    return json.dumps(report, indent=2) + "\n"
