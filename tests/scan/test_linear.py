"""The RE2 wrapper finds what Python's ``re`` finds with the lookarounds its context groups replace.

A differential test: each pair is one pattern written for the backtracking engine (lookarounds) and
for RE2 (``before``/``after`` groups), run over random text from an alphabet chosen to make the
patterns match, fail and touch each other; spans of every named group must agree.
"""

from __future__ import annotations

import random
import re

import pytest

from broker.scan.linear import Regex, RegexError

PAIRS = [
    (r"ghp_[a-z0-9]{4}(?![a-z0-9_])", r"ghp_[a-z0-9]{4}(?P<after>[^a-z0-9_]|\z)"),
    (r"(?<![a-z0-9_\-])eyJ[a-z]{2,}\.[a-z]*", r"(?P<before>^|[^a-z0-9_\-])eyJ[a-z]{2,}\.[a-z]*"),
    (r"(?:^|[\s;])(?P<k>[a-z]+)=(?P<v>[^\s;]{1,5})(?=\s|$)",
     r"(?P<before>^|[\s;])(?P<k>[a-z]+)=(?P<v>[^\s;]{1,5})(?P<after>\s|$)"),
    (r"(?i)key\s*=\s*(?P<v>[a-z0-9]{3,6})(?![a-z0-9])", r"(?i)key\s*=\s*(?P<v>[a-z0-9]{3,6})(?P<after>[^a-z0-9]|\z)"),
]
ALPHABET = ["ghp_", "eyJ", "key", "KEY", "a", "b", "0", "1", "_", "-", ".", "=", " ", ";", "\n", "é", "\u4e2d"]


def _spans(m: re.Match[str] | object, names: list[str]) -> tuple[tuple[int, int], ...]:
    return (m.span(), *(m.span(n) for n in names))  # type: ignore[attr-defined]


@pytest.mark.parametrize(("python", "linear"), PAIRS)
def test_context_groups_behave_like_lookarounds(python: str, linear: str) -> None:
    rng = random.Random(python)
    old, new = re.compile(python), Regex(linear)
    names = [n for n in old.groupindex if n not in ("before", "after")]
    for _ in range(3000):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randrange(40)))
        found = [_spans(m, names) for m in new.finditer(text)]
        # Python's match includes a consumed prefix such as (?:^|[\s;]); the RE2 match does not.
        expected = [_spans(m, names) for m in old.finditer(text)]
        if names:
            found, expected = [f[1:] for f in found], [e[1:] for e in expected]
        assert found == expected, text


def test_lookaround_syntax_is_refused_with_a_hint() -> None:
    with pytest.raises(RegexError, match="RE2 syntax"):
        Regex(r"abc(?!d)")
