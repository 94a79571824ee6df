"""Human-readable report: one line per finding, with a redacted preview."""

from __future__ import annotations

from collections.abc import Sequence

from broker.scan.engine import Stats
from broker.scan.findings import Finding


def render(findings: Sequence[Finding], stats: Stats, redact: bool = True) -> str:
    lines = []
    for f in findings:
        where = f"{f.path}:{f.line}:{f.column}"
        if f.commit:
            where = f"{f.commit[:12]}:{where}"
        shown = f.preview if redact else f.secret
        lines.append(f"{where}: {f.rule_id}: {f.description} [{shown}]")
    summary = f"{len(findings)} finding(s)" if findings else "no secrets found"
    lines.append(f"{summary} in {stats.files} file(s), {stats.bytes / 1e6:.1f} MB")
    return "\n".join(lines) + "\n"
