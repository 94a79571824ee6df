"""SARIF 2.1.0 report, as read by GitHub code scanning.

Each result carries the rule, a region, and ``partialFingerprints`` keyed on the secret's fingerprint
so that code scanning tracks an alert across moves. The message holds the redacted preview only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Final
from urllib.parse import quote

from broker.scan.findings import Finding
from broker.scan.rules import Rule

SCHEMA_URI: Final = "https://json.schemastore.org/sarif-2.1.0.json"
FINGERPRINT_KEY: Final = "brokerSecretHash/v1"


def _tool_version() -> str:
    try:
        return version("broker")
    except PackageNotFoundError:
        return "0"


def _artifact(path: str) -> dict[str, str]:
    # Repository-relative paths resolve against the checkout root; paths outside it stay absolute.
    if path.startswith("/"):
        return {"uri": "file://" + quote(path)}
    return {"uri": quote(path), "uriBaseId": "%SRCROOT%"}


def render(findings: Sequence[Finding], rules: Sequence[Rule]) -> str:
    index = {rule.id: i for i, rule in enumerate(rules)}
    results: list[dict[str, Any]] = []
    for f in findings:
        region = {"startLine": f.line, "startColumn": f.column, "endLine": f.end_line, "endColumn": f.end_column}
        result: dict[str, Any] = {
            "ruleId": f.rule_id,
            "level": "error",
            "message": {"text": f"{f.description}: {f.preview}"},
            "locations": [{"physicalLocation": {
                "artifactLocation": _artifact(f.path),
                "region": region,
            }}],
            "partialFingerprints": {FINGERPRINT_KEY: f.fingerprint},
        }
        if f.rule_id in index:
            result["ruleIndex"] = index[f.rule_id]
        if f.commit:
            result["properties"] = {"commit": f.commit}
        results.append(result)
    driver = {
        "name": "broker-scan",
        "version": _tool_version(),
        "rules": [{
            "id": rule.id,
            "name": "".join(part.capitalize() for part in rule.id.replace(".", "-").split("-")),
            "shortDescription": {"text": rule.description or rule.id},
            "defaultConfiguration": {"level": "error"},
            "properties": {"tags": ["security", "secret"]},
        } for rule in rules],
    }
    log = {
        "$schema": SCHEMA_URI,
        "version": "2.1.0",
        # Columns count Python characters (code points), not the UTF-16 units SARIF assumes by default.
        "runs": [{"tool": {"driver": driver}, "columnKind": "unicodeCodePoints", "results": results}],
    }
    return json.dumps(log, indent=2) + "\n"
