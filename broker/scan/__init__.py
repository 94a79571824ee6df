"""``broker scan``: the bundled, offline secret scanner.

Data flow, one module per step::

    sources / gitsource (gitsafe)  ->  document  ->  engine (processes)  ->  detector  ->  baseline  ->  report_*
    (worktree, stdin,        (text,        (batches, workers)      (prefilter, rules,         (text, json,
     staged, history)         line map)                             grammar, entropy,           sarif)
                                                                    placeholders)

``config`` turns the bundled ``rules.toml`` and a user's TOML into a frozen :class:`ScanConfig`.
"""

from __future__ import annotations

from broker.scan.config import load as load_config
from broker.scan.detector import ALLOW_MARKER, Detector
from broker.scan.document import Document
from broker.scan.findings import Finding
from broker.scan.rules import AssignmentRule, PatternRule, ScanConfig

__all__ = [
    "ALLOW_MARKER",
    "AssignmentRule",
    "Detector",
    "Document",
    "Finding",
    "PatternRule",
    "ScanConfig",
    "load_config",
]
