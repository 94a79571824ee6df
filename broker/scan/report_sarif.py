"""SARIF 2.1.0 report, as read by GitHub code scanning.

Each result carries the rule, a region, and ``partialFingerprints`` keyed on the secret's fingerprint
so that code scanning tracks an alert across moves. The message holds the redacted preview only.

``primaryLocationLineHash`` is GitHub's own key for following an alert. Uploaders compute it from
the text around the line when it is missing, and that text holds the secret: a plain hash of a line
whose other characters are known lets anyone test guesses of a short secret at full speed. So it is
set here, from the salted and stretched fingerprint of the value, with the occurrence number that
GitHub's format appends for identical lines in one file.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Final
from urllib.parse import quote

from broker.scan.findings import Finding
from broker.scan.rules import PatternRule, Rule

SCHEMA_URI: Final = "https://json.schemastore.org/sarif-2.1.0.json"
FINGERPRINT_KEY: Final = "brokerSecretHash/v1"
LINE_HASH_KEY: Final = "primaryLocationLineHash"
# GitHub code scanning maps security-severity to a level: 9.0 and above critical, 7.0 to 8.9 high.
# A provider's token format is close to proof of a live credential; the generic rule is a heuristic.
SEVERITY_PROVIDER: Final = "9.0"
SEVERITY_GENERIC: Final = "7.0"
_HELP: Final = (
    "A secret in source code is readable by everyone who can read the repository, its forks and its "
    "history. Treat it as leaked: revoke or rotate it at its issuer first, then remove it from the "
    "code and load it at run time instead (for example from `broker exec` or the environment). "
    "Removing the line does not remove it from git history. If the value is not a secret, mark the "
    "line with `broker:allow`, add an allowlist entry to `.broker-scan.toml`, or accept it in a "
    "baseline (`--baseline`)."
)


def _full_description(rule: Rule) -> str:
    if isinstance(rule, PatternRule):
        how = "Matches the provider's published token format"
    else:
        how = ("Matches a literal assigned to a name that looks like a secret (password, token, key...), "
               "read with the assignment syntax of the file's type")
    text = f"{rule.description or rule.id}. {how}"
    if rule.entropy:
        text += f"; the value must carry at least {rule.entropy:g} bits of entropy per character"
    return text + "; placeholders and allowlisted values are ignored."


def _rule(rule: Rule) -> dict[str, Any]:
    return {
        "id": rule.id,
        "name": "".join(part.capitalize() for part in rule.id.replace(".", "-").split("-")),
        "shortDescription": {"text": rule.description or rule.id},
        "fullDescription": {"text": _full_description(rule)},
        "help": {"text": _HELP, "markdown": f"**{rule.description or rule.id}**\n\n{_HELP}"},
        "defaultConfiguration": {"level": "error"},
        "properties": {
            "tags": ["security", "secret"],
            "security-severity": SEVERITY_PROVIDER if isinstance(rule, PatternRule) else SEVERITY_GENERIC,
        },
    }


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
    seen: Counter[tuple[str, str]] = Counter()
    for f in findings:
        seen[f.path, f.fingerprint] += 1
        region = {"startLine": f.line, "startColumn": f.column, "endLine": f.end_line, "endColumn": f.end_column}
        result: dict[str, Any] = {
            "ruleId": f.rule_id,
            "level": "error",
            "message": {"text": f"{f.description}: {f.preview}"},
            "locations": [{"physicalLocation": {
                "artifactLocation": _artifact(f.path),
                "region": region,
            }}],
            "partialFingerprints": {
                FINGERPRINT_KEY: f.fingerprint,
                LINE_HASH_KEY: f"{f.fingerprint}:{seen[f.path, f.fingerprint]}",
            },
        }
        if f.rule_id in index:
            result["ruleIndex"] = index[f.rule_id]
        if f.commit:
            result["properties"] = {"commit": f.commit}
        results.append(result)
    driver = {
        "name": "broker-scan",
        "version": _tool_version(),
        "rules": [_rule(rule) for rule in rules],
    }
    log = {
        "$schema": SCHEMA_URI,
        "version": "2.1.0",
        # Columns count Python characters (code points), not the UTF-16 units SARIF assumes by default.
        "runs": [{"tool": {"driver": driver}, "columnKind": "unicodeCodePoints", "results": results}],
    }
    return json.dumps(log, indent=2) + "\n"
