"""The records a scan runs on: rules, the allowlist and the scan settings.

They are built once by :mod:`broker.scan.config` from the bundled ``rules.toml`` and the user's file,
are immutable, and pickle cleanly so that worker processes receive them as they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from broker.scan.linear import Regex

DEFAULT_MAX_FILE_SIZE: Final = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class PatternRule:
    """A provider-specific rule: a regex whose ``secret_group`` is the secret."""

    id: str
    description: str
    regex: Regex
    keywords: tuple[str, ...]
    requires: tuple[str, ...] = ()
    secret_group: int = 0
    entropy: float = 0.0
    stopwords: tuple[str, ...] = ()
    allow: tuple[re.Pattern[str], ...] = ()
    path: re.Pattern[str] | None = None
    validate: str | None = None


@dataclass(frozen=True, slots=True)
class AssignmentRule:
    """The generic rule: a secret-looking name assigned a high-entropy literal, read per file type."""

    id: str
    description: str
    keywords: tuple[str, ...]
    key_regex: re.Pattern[str]
    key_stop_regex: re.Pattern[str] | None = None
    entropy: float = 3.3
    min_length: int = 12
    max_line_length: int = 2000
    stopwords: tuple[str, ...] = ()
    allow: tuple[re.Pattern[str], ...] = ()
    path: re.Pattern[str] | None = None


Rule = PatternRule | AssignmentRule


@dataclass(frozen=True, slots=True)
class Allowlist:
    """Suppressions that apply to every rule."""

    paths: tuple[re.Pattern[str], ...] = ()
    regexes: tuple[re.Pattern[str], ...] = ()
    stopwords: tuple[str, ...] = ()

    def allows_path(self, path: str) -> bool:
        return any(p.search(path) for p in self.paths)


@dataclass(frozen=True, slots=True)
class ScanConfig:
    """Everything a detector needs, fixed for the whole scan."""

    rules: tuple[Rule, ...]
    allowlist: Allowlist
    max_file_size: int = DEFAULT_MAX_FILE_SIZE
