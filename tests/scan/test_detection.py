"""Every bundled rule finds its provider's format in every file syntax; placeholders never alarm."""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

import pytest

from broker.scan import Detector, Document, fakes, load_config
from broker.scan.detector import _Candidate, _LineCursor
from broker.scan.findings import Finding


@pytest.fixture(scope="module")
def detector() -> Detector:
    return Detector(load_config())


def _scan_tree(detector: Detector, root: Path) -> dict[str, list[Finding]]:
    found: dict[str, list[Finding]] = defaultdict(list)
    for path in root.rglob("*"):
        if path.is_file():
            rel = path.relative_to(root).as_posix()
            found[rel] = detector.scan(Document(rel, path.read_text(encoding="utf-8")))
    return found


@pytest.mark.parametrize("seed", [1, 2])
def test_corpus_recall_and_no_false_alarms(detector: Detector, tmp_path: Path, seed: int) -> None:
    labels, negatives = fakes.build(tmp_path, seed=seed, per_rule=1)
    found = _scan_tree(detector, tmp_path)
    missed = [label for label in labels
              if not any(f.rule_id == label.rule and f.line == label.line for f in found[label.path])]
    assert missed == []
    alarms = {path: [f.rule_id for f in found[path]] for path in negatives if found[path]}
    assert alarms == {}


def test_every_rule_has_a_generator() -> None:
    rule_ids = {rule.id for rule in load_config().rules}
    assert rule_ids - set(fakes.GENERATORS) == {"private-key", "putty-private-key", "gcp-service-account"}


def test_position_and_secret_span(detector: Detector, token) -> None:
    value = token("github-pat")
    text = f"first line\n  headers = {{'x': '{value}'}}\n"
    [finding] = detector.scan(Document("a.py", text))
    assert (finding.line, finding.column, finding.end_line) == (2, 20, 2)
    assert finding.end_column == finding.column + len(value)
    assert finding.secret == value


def test_specific_rule_wins_over_generic(detector: Detector, token) -> None:
    [finding] = detector.scan(Document("a.py", f'api_token = "{token("npm-token")}"\n'))
    assert finding.rule_id == "npm-token"


def test_aws_pair(detector: Detector, token) -> None:
    text = (f"[default]\naws_access_key_id = {token('aws-access-key-id')}\n"
            f"aws_secret_access_key = {token('aws-secret-access-key')}\n")
    assert [f.rule_id for f in detector.scan(Document("credentials", text))] == [
        "aws-access-key-id", "aws-secret-access-key"]


def test_jwt_header_must_be_json(detector: Detector, rng) -> None:
    real = fakes.jwt(rng, {"iss": "broker", "sub": "agent"})
    fake = "eyJ" + fakes.pick(rng, fakes.ALNUM, 30) + ".eyJ" + fakes.pick(rng, fakes.ALNUM, 30) + ".abc"
    assert [f.rule_id for f in detector.scan(Document("t.txt", f"a {real}\nb {fake}\n"))] == ["jwt"]


def test_inline_allow_any_comment_syntax(detector: Detector, token) -> None:
    marker = "broker" + ":allow"
    lines = [f'a = "{token("github-pat")}"  # {marker}',
             f'b = "{token("github-pat")}"; // {marker} test fixture',
             f'<x>{token("github-pat")}</x> <!-- {marker} -->',
             f'c = "{token("github-pat")}"']
    found = detector.scan(Document("a.txt", "\n".join(lines)))
    assert [f.line for f in found] == [4]


@pytest.mark.parametrize("line", [
    'key = "{{ uuid }}"',
    'cache_key = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"',
    'request_id = "123e4567-e89b-12d3-a456-426614174000"',
    '"integrity": "sha512-Qw2QZpbKRmTQ8bV5B3ifWi3Bh1UTuz2VYOFsmTFAxsHXeLYtXCnAUXZzGYMSG7jrYEZnRJ98LE0RIr8aV0XBPgw=="',
    'password_hash = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"',
    "token_url = 'https://auth.example.org/oauth2/token'",
    'api_key = os.environ["OPENAI_API_KEY"]',
    'password = "${DB_PASSWORD}"',
    'secret = "<your-secret-here>"',
    "self.author = 'Guido van Rossum'",
])
def test_non_secrets(detector: Detector, line: str) -> None:
    assert detector.scan(Document("x.py", line + "\n")) == []


def test_lock_files_and_minified_bundles_are_skipped(detector: Detector, token) -> None:
    text = f'const k = "{token("github-pat")}";\n'
    assert detector.scan(Document("web/app.min.js", text)) == []
    assert detector.scan(Document("package-lock.json", text)) == []
    assert detector.scan(Document("web/app.js", text)) != []


def test_non_ascii_lowercasing_keeps_offsets(detector: Detector, token) -> None:
    # "İ" lowercases to two characters: positions must still point at the real secret.
    value = token("generic-secret")
    text = "İİİİ = 1\n" * 3 + f'client_secret = "{value}"\n'
    [finding] = detector.scan(Document("a.py", text))
    assert finding.secret == value and finding.line == 4


def test_unreadable_file_is_skipped_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Root reads any file whatever its mode, so the denial is injected where the file is opened.
    import os

    from broker.scan import engine, sources
    from broker.scan.progress import Progress

    (tmp_path / "a.txt").write_text("hello\n")
    real_open = os.open

    def deny(path: str, flags: int, *args: int) -> int:
        if path.endswith("a.txt"):
            raise PermissionError(13, "denied")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", deny)
    refs = list(sources.worktree([str(tmp_path)], str(tmp_path)))
    findings, stats = engine.scan_files(refs, load_config(), 1, Progress())
    assert findings == [] and stats.skipped == {"unreadable": 1}


class _CountingInt(int):
    """An offset that counts the comparisons made with it (issue 12: 64k findings took 186 s)."""

    comparisons = 0

    def _count(self) -> None:
        type(self).comparisons += 1

    def __lt__(self, other: object) -> bool:
        self._count()
        return int(self) < int(other)

    def __le__(self, other: object) -> bool:
        self._count()
        return int(self) <= int(other)

    def __gt__(self, other: object) -> bool:
        self._count()
        return int(self) > int(other)

    def __ge__(self, other: object) -> bool:
        self._count()
        return int(self) >= int(other)


def _overlap_comparisons(n: int) -> int:
    # n findings of two rules, half of them overlapping a finding of the other rule, in shuffled order.
    rng = random.Random(n)
    candidates = [_Candidate(_CountingInt(10 * i + shift), _CountingInt(10 * i + shift + 8), rule, "s")
                  for i in range(n // 2) for rule, shift in ((0, 0), (1, 4))]
    rng.shuffle(candidates)
    _CountingInt.comparisons = 0
    kept = Detector._resolve(candidates)
    assert len(kept) == n // 2 and all(c.priority == 0 for c in kept)
    return _CountingInt.comparisons


def test_overlap_resolution_is_n_log_n() -> None:
    # Counted, not timed: eight times the findings may cost at most 16 times the comparisons
    # (n log n is about 10 here; comparing each candidate with every kept one was 64).
    small, large = _overlap_comparisons(2000), _overlap_comparisons(16000)
    assert large < 16 * small, (small, large)


def test_line_cursor_agrees_with_counting_lines() -> None:
    text = "a\n\nbc d\n" * 50 + "tail"
    cursor = _LineCursor(text)
    for offset in range(len(text) + 1):
        start = text.rfind("\n", 0, offset) + 1
        end = text.find("\n", offset)
        assert cursor.seek(offset) == (text.count("\n", 0, offset) + 1, start, len(text) if end == -1 else end)
