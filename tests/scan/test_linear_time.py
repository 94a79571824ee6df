"""Every rule and grammar runs in time linear in its input, on inputs built to make a regex backtrack.

Issue 12 asked for a fuzz test of time per byte on adversarial input for every rule, so this file
measures time, with wide margins: each input is scanned at two sizes eight times apart, the faster of
several runs counts, and the larger may take at most 24 times longer (linear is 8, quadratic 64).
Process CPU time is used, so other work on the machine does not count.

The inputs start with what a rule looks for (its keywords and the first part of a real-looking
token) and continue with runs of the characters its classes accept, separators, quotes and the
keyword itself: the shapes that made the old grammar take 38 s on one 1.6 KB line.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import pytest

from broker.scan import config, fakes, grammar
from broker.scan.detector import Detector
from broker.scan.document import Document
from broker.scan.linear import Regex
from broker.scan.rules import PatternRule

SMALL = 2000  # characters: the generic rule reads lines up to 2000 characters long
FACTOR = 8
LIMIT = 3 * FACTOR  # a linear engine stays near FACTOR; a quadratic one reaches FACTOR**2
FLOOR = 20e-6  # seconds: a smaller time is clock noise, not a measurement
FILLERS = (" ", "\t", "a", "A", "0", "=", ":", '"', "'", "`", "-", ".", "_", "/", "+", "\\", "]", "\n",
           " =", "= ", ": ", "a:", "'a", '"a', "-a", "a.", "=a", "a ", "a=", "-----", "eyJ", "a\n")
RULES = config.load(None).rules
GRAMMARS = {name: getattr(grammar, name) for name in ("_CODE", "_GO", "_YAML", "_INI", "_SHELL", "_DOCKER")}


def _seeds(rule_id: str, keywords: tuple[str, ...]) -> list[str]:
    seeds = [*keywords, *(k.upper() for k in keywords)]
    generator = fakes.GENERATORS.get(rule_id)
    if generator is not None:
        sample = generator(random.Random(99))
        seeds += [sample[: len(sample) // 2], sample]
    return seeds or ["token"]


def _inputs(seeds: list[str], size: int) -> Iterator[tuple[str, str]]:
    for seed in seeds:
        for filler in FILLERS:
            repeat = max(1, size // len(filler))
            yield f"{seed!r}+{filler!r}*n", seed + filler * repeat + "x"
            yield f"({seed!r}+{filler!r})*n", (seed + filler) * max(1, size // (len(seed) + len(filler)))


def _cpu(regex: Regex, text: str) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        for _match in regex.finditer(text):
            pass
        best = min(best, time.process_time() - start)
    return max(best, FLOOR)


def _check(regex: Regex, seeds: list[str]) -> None:
    small = dict(_inputs(seeds, SMALL))
    for name, large in _inputs(seeds, SMALL * FACTOR):
        ratio = _cpu(regex, large) / _cpu(regex, small[name])
        if ratio > LIMIT:
            # Measure again before failing: one descheduled run must not fail the build.
            ratio = _cpu(regex, large) / _cpu(regex, small[name])
        assert ratio < LIMIT, f"{regex.pattern!r} on {name}: {FACTOR}x the input took {ratio:.0f}x the time"


@pytest.mark.timeout(600)  # a hang guard: the backtracking engine took hours on some of these
@pytest.mark.parametrize("rule", [r for r in RULES if isinstance(r, PatternRule)], ids=lambda r: r.id)
def test_every_rule_is_linear(rule: PatternRule) -> None:
    _check(rule.regex, _seeds(rule.id, rule.keywords))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", sorted(GRAMMARS))
def test_every_grammar_is_linear(name: str) -> None:
    generic = next(r for r in RULES if not isinstance(r, PatternRule))
    for regex in GRAMMARS[name]:
        _check(regex, ["token", "export token", "--token", "ENV token", "- token", "var token string",
                       *generic.keywords[:4]])


@pytest.mark.timeout(60)
def test_the_reported_line_is_fast() -> None:
    # Issue 12: `token`, 1,600 spaces and `x` in a .py file took 38 s; a 6 KB file stalled --staged.
    detector = Detector(config.load(None))
    for text in ("token" + " " * 1600 + "x\n", ("token" + " " * 1600 + "x\n") * 4):
        assert detector.scan(Document("a.py", text)) == []
