"""Scanner configuration: the bundled ``rules.toml`` plus an optional user TOML, validated once.

A user file has the same shape as the bundled one, plus a ``[scan]`` table::

    [scan]
    max_file_size = 16777216        # bytes; larger files are skipped
    disable = ["generic-secret"]    # rule ids to switch off
    use_default_rules = true        # false: only the rules of this file

    [allowlist]
    paths = ['''^tests/data/''']    # regexes on the reported path
    regexes = ['''^AKIA0{16}$''']   # regexes on the secret value
    stopwords = ["not-a-secret"]    # substrings of the secret value

    [[rules]]                       # a new rule, or a bundled one replaced by reusing its id
    id = "acme-token"
    ...

Every problem (unknown key, wrong type, bad regex, unknown rule id) is collected with its key path and
raised together as one :class:`~broker.errors.ConfigError`.
"""

from __future__ import annotations

import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Final

from broker.errors import ConfigError, ConfigProblem
from broker.scan.linear import Regex, RegexError
from broker.scan.rules import (
    DEFAULT_MAX_FILE_SIZE,
    Allowlist,
    AssignmentRule,
    PatternRule,
    Rule,
    ScanConfig,
)
from broker.scan.validators import VALIDATORS

# A rules file larger than this is refused unread: no ruleset comes close, and it bounds parse time.
MAX_CONFIG_BYTES: Final = 1 << 20

_ID_RE: Final = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}\Z")
_TOP_KEYS: Final = frozenset({"version", "scan", "allowlist", "rules"})
_SCAN_KEYS: Final = frozenset({"max_file_size", "disable", "use_default_rules"})
_ALLOW_KEYS: Final = frozenset({"paths", "regexes", "stopwords"})
_COMMON_RULE_KEYS: Final = frozenset(
    {"id", "description", "kind", "keywords", "entropy", "stopwords", "allow", "path"}
)
_PATTERN_KEYS: Final = _COMMON_RULE_KEYS | {"regex", "requires", "secret_group", "validate"}
_ASSIGNMENT_KEYS: Final = _COMMON_RULE_KEYS | {"key_regex", "key_stop_regex", "min_length", "max_line_length"}


class _Reader:
    """Typed access to a raw TOML table that records problems instead of raising on the first one."""

    def __init__(self, problems: list[ConfigProblem], origin: str) -> None:
        self.problems = problems
        self.origin = origin

    def fail(self, path: str, message: str) -> None:
        self.problems.append(ConfigProblem(f"{self.origin}:{path}" if path else self.origin, message))

    def table(self, raw: Any, path: str, allowed: frozenset[str]) -> dict[str, Any]:
        if not isinstance(raw, dict):
            self.fail(path, "must be a table")
            return {}
        for key in sorted(set(raw) - allowed):
            self.fail(f"{path}.{key}" if path else key, "unknown key")
        return raw

    def string(self, table: dict[str, Any], key: str, path: str, default: str | None = None) -> str | None:
        value = table.get(key, default)
        if value is not None and not isinstance(value, str):
            self.fail(f"{path}.{key}", "must be a string")
            return default
        return value

    def strings(self, table: dict[str, Any], key: str, path: str) -> tuple[str, ...]:
        value = table.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.fail(f"{path}.{key}", "must be a list of strings")
            return ()
        return tuple(value)

    def number(self, table: dict[str, Any], key: str, path: str, default: float, minimum: float) -> float:
        value = table.get(key, default)
        # bool is an int subclass in Python; "entropy = true" is a typo, not 1.0.
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(f"{path}.{key}", "must be a number")
            return default
        if value < minimum:
            self.fail(f"{path}.{key}", f"must be at least {minimum}")
            return default
        return float(value)

    def integer(self, table: dict[str, Any], key: str, path: str, default: int, minimum: int) -> int:
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(f"{path}.{key}", "must be an integer")
            return default
        if value < minimum:
            self.fail(f"{path}.{key}", f"must be at least {minimum}")
            return default
        return value

    def regex(self, source: str | None, path: str) -> re.Pattern[str] | None:
        if source is None:
            return None
        try:
            return re.compile(source)
        except re.error as exc:
            self.fail(path, f"invalid regex: {exc}")
            return None

    def linear(self, source: str | None, path: str) -> Regex | None:
        """A rule's pattern, which runs over whole documents: RE2, so linear in the text."""
        if source is None:
            return None
        try:
            return Regex(source)
        except RegexError as exc:
            self.fail(path, f"invalid regex: {exc}")
            return None

    def regexes(self, table: dict[str, Any], key: str, path: str) -> tuple[re.Pattern[str], ...]:
        compiled = (self.regex(s, f"{path}.{key}[{i}]") for i, s in enumerate(self.strings(table, key, path)))
        return tuple(p for p in compiled if p is not None)


def _rule(r: _Reader, raw: Any, path: str) -> Rule | None:
    kind = raw.get("kind", "pattern") if isinstance(raw, dict) else "pattern"
    if kind not in ("pattern", "assignment"):
        r.fail(f"{path}.kind", 'must be "pattern" or "assignment"')
        return None
    table = r.table(raw, path, _PATTERN_KEYS if kind == "pattern" else _ASSIGNMENT_KEYS)
    before = len(r.problems)
    rule_id = r.string(table, "id", path)
    if rule_id is None or not _ID_RE.match(rule_id):
        r.fail(f"{path}.id", "required: lowercase letters, digits, '.', '_' or '-'")
    description = r.string(table, "description", path, default="") or ""
    # Keywords are compared with the lowercased file text, so store them lowercased.
    keywords = tuple(k.lower() for k in r.strings(table, "keywords", path))
    entropy = r.number(table, "entropy", path, 3.3 if kind == "assignment" else 0.0, 0.0)
    stopwords = tuple(s.lower() for s in r.strings(table, "stopwords", path))
    allow = r.regexes(table, "allow", path)
    path_re = r.regex(r.string(table, "path", path), f"{path}.path")
    if kind == "assignment":
        key_regex = r.regex(r.string(table, "key_regex", path), f"{path}.key_regex")
        if key_regex is None and "key_regex" not in table:
            r.fail(f"{path}.key_regex", "required for an assignment rule")
        key_stop = r.regex(r.string(table, "key_stop_regex", path), f"{path}.key_stop_regex")
        min_length = r.integer(table, "min_length", path, 12, 1)
        max_line = r.integer(table, "max_line_length", path, 2000, 1)
        if len(r.problems) > before or rule_id is None or key_regex is None:
            return None
        return AssignmentRule(
            rule_id, description, keywords, key_regex, key_stop, entropy, min_length, max_line,
            stopwords, allow, path_re,
        )
    regex = r.linear(r.string(table, "regex", path), f"{path}.regex")
    if regex is None and "regex" not in table:
        r.fail(f"{path}.regex", "required")
    requires = tuple(k.lower() for k in r.strings(table, "requires", path))
    group = r.integer(table, "secret_group", path, 0, 0)
    if regex is not None and group > regex.groups:
        r.fail(f"{path}.secret_group", f"the regex has only {regex.groups} group(s)")
    validate = r.string(table, "validate", path)
    if validate is not None and validate not in VALIDATORS:
        r.fail(f"{path}.validate", f"unknown validator; known: {', '.join(sorted(VALIDATORS))}")
    if len(r.problems) > before or rule_id is None or regex is None:
        return None
    return PatternRule(
        rule_id, description, regex, keywords, requires, group, entropy, stopwords, allow, path_re, validate
    )


def _parse(raw: dict[str, Any], origin: str, problems: list[ConfigProblem]) -> tuple[
    list[Rule], Allowlist, dict[str, Any]
]:
    r = _Reader(problems, origin)
    top = r.table(raw, "", _TOP_KEYS)
    if "version" in top and top["version"] != 1:
        r.fail("version", "only version 1 is supported")
    scan = r.table(top.get("scan", {}), "scan", _SCAN_KEYS)
    allow = r.table(top.get("allowlist", {}), "allowlist", _ALLOW_KEYS)
    for key in ("paths", "regexes", "stopwords"):
        values = allow.get(key)
        if isinstance(values, list) and any(v == "" for v in values):
            # An empty pattern or stopword matches every finding: the scan would pass whatever it found.
            r.fail(f"allowlist.{key}", "an empty entry would allow every finding")
    allowlist = Allowlist(
        paths=r.regexes(allow, "paths", "allowlist"),
        regexes=r.regexes(allow, "regexes", "allowlist"),
        stopwords=tuple(s.lower() for s in r.strings(allow, "stopwords", "allowlist")),
    )
    raw_rules = top.get("rules", [])
    rules: list[Rule] = []
    if not isinstance(raw_rules, list):
        r.fail("rules", "must be an array of tables ([[rules]])")
        raw_rules = []
    seen: set[str] = set()
    for i, raw_rule in enumerate(raw_rules):
        rule = _rule(r, raw_rule, f"rules[{i}]")
        if rule is None:
            continue
        if rule.id in seen:
            r.fail(f"rules[{i}].id", f"duplicate rule id {rule.id!r}")
        seen.add(rule.id)
        rules.append(rule)
    settings = {
        "max_file_size": r.integer(scan, "max_file_size", "scan", DEFAULT_MAX_FILE_SIZE, 1),
        "disable": r.strings(scan, "disable", "scan"),
        "use_default_rules": scan.get("use_default_rules", True),
    }
    if not isinstance(settings["use_default_rules"], bool):
        r.fail("scan.use_default_rules", "must be true or false")
    return rules, allowlist, settings


def _read_toml(text: str, origin: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigProblem(origin, f"invalid TOML: {exc}")]) from exc


def bundled_text() -> str:
    return resources.files("broker.scan").joinpath("rules.toml").read_text(encoding="utf-8")


def load(user_file: Path | None = None) -> ScanConfig:
    """The bundled ruleset merged with ``user_file``. Raises ConfigError listing every problem."""
    problems: list[ConfigProblem] = []
    rules, allowlist, _ = _parse(_read_toml(bundled_text(), "rules.toml"), "rules.toml", problems)
    max_file_size = DEFAULT_MAX_FILE_SIZE
    if user_file is not None:
        origin = str(user_file)
        try:
            with user_file.open("rb") as fh:
                data = fh.read(MAX_CONFIG_BYTES + 1)
        except OSError as exc:
            raise ConfigError([ConfigProblem(origin, f"cannot read: {exc.strerror}")]) from exc
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError([ConfigProblem(origin, f"larger than {MAX_CONFIG_BYTES} bytes")])
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError([ConfigProblem(origin, "not UTF-8")]) from exc
        user_rules, user_allow, settings = _parse(_read_toml(text, origin), origin, problems)
        if not settings["use_default_rules"]:
            rules = []
        # A user rule with a bundled id replaces it in place, so rule priority stays as documented.
        by_id = {rule.id: rule for rule in user_rules}
        rules = [by_id.pop(rule.id, rule) for rule in rules] + list(by_id.values())
        known = {rule.id for rule in rules}
        for name in settings["disable"]:
            if name not in known:
                problems.append(ConfigProblem(f"{origin}:scan.disable", f"unknown rule id {name!r}"))
        rules = [rule for rule in rules if rule.id not in settings["disable"]]
        # Generic rules go last: on an overlap the earlier rule wins, and specific names are better.
        rules.sort(key=lambda rule: isinstance(rule, AssignmentRule))
        allowlist = Allowlist(
            allowlist.paths + user_allow.paths,
            allowlist.regexes + user_allow.regexes,
            allowlist.stopwords + user_allow.stopwords,
        )
        max_file_size = settings["max_file_size"]
    if problems:
        raise ConfigError(problems)
    return ScanConfig(tuple(rules), allowlist, max_file_size)
