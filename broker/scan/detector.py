"""Find secrets in one document: prefilter, rules, value checks, overlap resolution, inline allows.

The detector is pure: a document in, findings out, no I/O. The order of work keeps the regex engine
away from most text:

1. keyword prefilter: a rule runs only if one of its keywords occurs in the lowercased document;
2. pattern rules run their regex over the whole document, assignment rules read only the lines that
   hold one of their keywords, through the grammar of the file's type;
3. each candidate must clear the rule's entropy floor, stopwords, placeholders and allowlists;
4. overlapping candidates keep the earliest rule (specific before generic);
5. a line carrying the inline marker ``broker:allow``, in any comment syntax, is dropped.
"""

from __future__ import annotations

import heapq
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from broker.scan.document import Document
from broker.scan.entropy import shannon
from broker.scan.findings import Finding, fingerprint
from broker.scan.grammar import grammar_for, value_span
from broker.scan.placeholders import is_not_secret_shaped, is_placeholder
from broker.scan.rules import AssignmentRule, PatternRule, ScanConfig
from broker.scan.validators import VALIDATORS

ALLOW_MARKER: Final = "broker:allow"
# An HTTP auth scheme in front of a literal ("Bearer abc...") is not part of the secret.
_AUTH_SCHEME: Final = re.compile(r"^(?:Bearer|Basic|Token|token|bearer)\s+")


@dataclass(frozen=True, slots=True)
class _Candidate:
    start: int
    end: int
    priority: int
    secret: str


def _keyword_lines(text: str, lowered: str, keywords: tuple[str, ...]) -> Iterator[tuple[int, int]]:
    """(start, end) of each line of ``text`` holding a keyword, in order, each line once."""
    if len(lowered) != len(text):
        # Lowercasing changed the length (a few non-ASCII letters do): offsets in ``lowered`` no longer
        # point into ``text``, so fall back to lowering line by line.
        start = 0
        for line in text.splitlines(keepends=True):
            low = line.lower()
            if any(k in low for k in keywords):
                yield start, start + len(line.rstrip("\r\n"))
            start += len(line)
        return
    starts: set[int] = set()
    for keyword in keywords:
        pos = lowered.find(keyword)
        while pos != -1:
            line_start = lowered.rfind("\n", 0, pos) + 1
            starts.add(line_start)
            line_end = lowered.find("\n", pos)
            if line_end == -1:
                break
            pos = lowered.find(keyword, line_end)
    for line_start in sorted(starts):
        line_end = text.find("\n", line_start)
        yield line_start, len(text) if line_end == -1 else line_end


class _LineCursor:
    """Line number and bounds of offsets visited in increasing order, in one pass over the text."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._pos = 0
        self._line = 1
        self._start = 0
        self._end = self._line_end(0)

    def _line_end(self, offset: int) -> int:
        end = self._text.find("\n", offset)
        return len(self._text) if end == -1 else end

    def seek(self, offset: int) -> tuple[int, int, int]:
        """(line number, line start, line end) of ``offset``, which must not be below the last one."""
        if offset > self._end:
            self._line += self._text.count("\n", self._pos, offset)
            self._start = self._text.rfind("\n", self._pos, offset) + 1
            self._end = self._line_end(offset)
        self._pos = offset
        return self._line, self._start, self._end


class Detector:
    """Applies a :class:`ScanConfig` to documents."""

    def __init__(self, config: ScanConfig) -> None:
        self.config = config
        self._allow_res = config.allowlist.regexes
        self._stopwords = config.allowlist.stopwords

    def scan(self, doc: Document) -> list[Finding]:
        if not doc.text or self.config.allowlist.allows_path(doc.path):
            return []
        text = doc.text
        lowered = text.lower()
        candidates: list[_Candidate] = []
        for priority, rule in enumerate(self.config.rules):
            if rule.keywords and not any(k in lowered for k in rule.keywords):
                continue
            if rule.path is not None and not rule.path.search(doc.path):
                continue
            if isinstance(rule, PatternRule):
                if all(k in lowered for k in rule.requires):
                    candidates.extend(self._pattern(rule, priority, text))
            else:
                candidates.extend(self._assignment(rule, priority, doc.path, text, lowered))
        if not candidates:
            return []
        return self._findings(doc, self._resolve(candidates))

    def _accept(self, secret: str, floor: float, stopwords: tuple[str, ...],
                allow: tuple[re.Pattern[str], ...]) -> bool:
        if shannon(secret) < floor:
            return False
        if is_placeholder(secret, stopwords + self._stopwords):
            return False
        return not any(a.search(secret) for a in allow + self._allow_res)

    def _pattern(self, rule: PatternRule, priority: int, text: str) -> Iterator[_Candidate]:
        validate = VALIDATORS[rule.validate] if rule.validate else None
        for m in rule.regex.finditer(text):
            start = m.start()
            # A bare token glued to the end of a longer word or base64 run is a coincidence, not a
            # token. Labelled rules (secret in a group) start at a label, where this does not apply.
            if (rule.secret_group == 0 and start and text[start].isalnum()
                    and (text[start - 1].isalnum() or text[start - 1] == "_")):
                continue
            secret = m.group(rule.secret_group)
            if not secret or not self._accept(secret, rule.entropy, rule.stopwords, rule.allow):
                continue
            if validate is not None and not validate(secret):
                continue
            s, e = m.span(rule.secret_group)
            yield _Candidate(s, e, priority, secret)

    def _assignment(self, rule: AssignmentRule, priority: int, path: str, text: str,
                    lowered: str) -> Iterator[_Candidate]:
        grammar = grammar_for(path)
        for line_start, line_end in _keyword_lines(text, lowered, rule.keywords):
            if line_end - line_start > rule.max_line_length:
                continue
            line = text[line_start:line_end]
            for regex in grammar:
                for m in regex.finditer(line):
                    key = (m.group("key") or "").strip("\"'")
                    if not rule.key_regex.search(key):
                        continue
                    if rule.key_stop_regex is not None and rule.key_stop_regex.search(key):
                        continue
                    value_start, value_end = value_span(m)
                    value, offset = line[value_start:value_end], value_start
                    scheme = _AUTH_SCHEME.match(value)
                    if scheme:
                        value, offset = value[scheme.end():], offset + scheme.end()
                    if len(value) < rule.min_length or is_not_secret_shaped(value):
                        continue
                    if not self._accept(value, rule.entropy, rule.stopwords, rule.allow):
                        continue
                    start = line_start + offset
                    yield _Candidate(start, start + len(value), priority, value)

    @staticmethod
    def _resolve(candidates: list[_Candidate]) -> list[_Candidate]:
        """Drop candidates that overlap one from an earlier rule; exact duplicates collapse too.

        One sweep per rule over the findings kept so far (disjoint, so sorted by start and by end
        alike): O(n log n) for the sort plus O(n) per rule, where comparing each candidate with every
        kept one made 64k findings take minutes.
        """
        kept: list[_Candidate] = []
        ordered = sorted(candidates, key=lambda c: (c.priority, c.start))
        for _, group in itertools.groupby(ordered, key=lambda c: c.priority):
            accepted: list[_Candidate] = []
            i = 0
            for cand in group:
                while i < len(kept) and kept[i].end <= cand.start:
                    i += 1  # kept[i] is now the first earlier finding that ends after this start
                if i < len(kept) and kept[i].start < cand.end:
                    continue  # overlaps an earlier (more specific) rule's finding
                if accepted and accepted[-1].end > cand.start:
                    continue  # overlaps this rule's previous finding (the only one it can overlap)
                accepted.append(cand)
            kept = list(heapq.merge(kept, accepted, key=lambda c: c.start))
        return kept

    def _findings(self, doc: Document, kept: list[_Candidate]) -> list[Finding]:
        text = doc.text
        findings: list[Finding] = []
        # Kept candidates are disjoint and sorted, so every start and end offset comes in increasing
        # order: one cursor walks the text once, and each line is searched for the marker once.
        cursor = _LineCursor(text)
        marked: dict[int, bool] = {}
        for cand in kept:
            line, line_start, line_end = cursor.seek(cand.start)
            end_line, end_line_start, end_line_end = cursor.seek(cand.end)
            for start, end in ((line_start, line_end), (end_line_start, end_line_end)):
                if start not in marked:
                    marked[start] = text.find(ALLOW_MARKER, start, end) != -1
            if marked[line_start] or marked[end_line_start]:
                continue
            rule = self.config.rules[cand.priority]
            findings.append(Finding(
                rule_id=rule.id,
                description=rule.description,
                path=doc.path,
                line=doc.real_line(line),
                column=cand.start - line_start + 1,
                end_line=doc.real_line(end_line),
                end_column=cand.end - end_line_start + 1,
                secret=cand.secret,
                fingerprint=fingerprint(cand.secret),
                commit=doc.commit,
            ))
        return findings
