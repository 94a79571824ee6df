"""Regular expressions that run in time linear in the text: every rule and grammar uses RE2.

A backtracking engine (Python's ``re``) can take exponential or polynomial time on a line built for
it, and the text a scanner reads is written by strangers. RE2 builds automata instead and never
backtracks, so a scan's time is linear in its input whatever the rules are, including a user's own.
The price is its syntax: no lookaround and no backreferences.

What lookarounds said is written as two optional consuming groups, which this module strips off
the match: ``(?P<before>...)`` is context that must precede the match (e.g. ``(?:^|[^A-Za-z0-9])``
for "not glued to a word") and ``(?P<after>...)`` is context that must follow it (e.g.
``(?:[^A-Za-z0-9]|$)``). The reported match is what lies between, and the next search resumes at its
end, so the context characters can also belong to the next match, as a lookaround's would.

Text is encoded to UTF-8 once per document and searched as bytes; offsets are mapped back to
characters with one forward pass (matches come in order), which keeps that part linear too.
"""

from __future__ import annotations

from collections.abc import Iterator

import re2

from broker.scan.errors import ScanError


class RegexError(ScanError):
    """A pattern is not valid RE2 syntax."""


def _next_char(data: bytes, pos: int) -> int:
    """The byte offset of the character after the one at ``pos`` (UTF-8 continuation bytes skipped)."""
    pos += 1
    while pos < len(data) and data[pos] & 0xC0 == 0x80:
        pos += 1
    return pos


class Match:
    """One match: spans in characters of the searched text, context groups already stripped."""

    __slots__ = ("_spans", "_text")

    def __init__(self, text: str, spans: dict[int | str, tuple[int, int]]) -> None:
        self._text = text
        self._spans = spans

    def span(self, group: int | str = 0) -> tuple[int, int]:
        return self._spans.get(group, (-1, -1))

    def start(self, group: int | str = 0) -> int:
        return self.span(group)[0]

    def end(self, group: int | str = 0) -> int:
        return self.span(group)[1]

    def group(self, group: int | str = 0) -> str | None:
        start, end = self.span(group)
        return None if start < 0 else self._text[start:end]


def _options() -> re2.Options:
    options = re2.Options()
    # Twice RE2's default budget: with 8 MiB the longest rules ran out of DFA cache on ordinary code
    # and fell back to the NFA (still linear, slower). The budget still bounds what a pattern can hold.
    options.max_mem = 16 << 20
    # RE2 reports that fallback on stderr from C++, hundreds of lines in one scan; the result is the same.
    options.log_errors = False
    return options


class Regex:
    """A compiled RE2 pattern with the ``before``/``after`` context convention."""

    __slots__ = ("_after", "_before", "_names", "_regex", "pattern")

    def __init__(self, pattern: str) -> None:
        try:
            self._regex = re2.compile(pattern.encode("utf-8"), _options())
        except re2.error as exc:
            raise RegexError(f"{pattern!r}: {exc} (patterns use RE2 syntax: no lookaround, no backreferences)") \
                from exc
        self.pattern = pattern
        index = {name.decode("utf-8"): int(i) for name, i in self._regex.groupindex.items()}
        self._before = index.get("before")
        self._after = index.get("after")
        self._names = {name: i for name, i in index.items() if name not in ("before", "after")}

    def __reduce__(self) -> tuple[type[Regex], tuple[str]]:
        return Regex, (self.pattern,)

    @property
    def groups(self) -> int:
        return int(self._regex.groups)

    def _core(self, m: re2._Match) -> tuple[int, int]:
        start, end = m.span()
        if self._before is not None and m.start(self._before) >= 0:
            start = m.end(self._before)
        if self._after is not None and m.start(self._after) >= 0:
            end = m.start(self._after)
        return start, end

    def finditer(self, text: str) -> Iterator[Match]:
        """Non-overlapping matches, left to right, as Python's ``finditer`` finds them."""
        data = text.encode("utf-8", "surrogatepass")
        ascii_only = len(data) == len(text)
        # One forward cursor from byte offsets to character offsets: matches only move right.
        cursor_byte, cursor_char = 0, 0

        def chars(offset: int) -> int:
            nonlocal cursor_byte, cursor_char
            if ascii_only:
                return offset
            if offset < cursor_byte:  # a group that starts before the last mapped offset
                return len(data[:offset].decode("utf-8", "surrogatepass"))
            cursor_char += len(data[cursor_byte:offset].decode("utf-8", "surrogatepass"))
            cursor_byte = offset
            return cursor_char

        pos = 0
        while pos <= len(data):
            # A `before` group reads the character ahead of where the search resumes.
            search_from = pos
            if self._before is not None and pos > 0:
                search_from = pos - 1
                while search_from > 0 and data[search_from] & 0xC0 == 0x80:
                    search_from -= 1
            m = self._regex.search(data, search_from)
            if m is not None and self._core(m)[0] < pos:
                # The match began on the character only meant as context (its `before` group did not
                # take it): search again from where the last match ended, as Python's finditer would.
                m = self._regex.search(data, pos)
            if m is None:
                return
            start, end = self._core(m)
            groups = [i for i in range(1, self.groups + 1) if i not in (self._before, self._after)]
            found = {i: m.span(i) for i in groups if m.start(i) >= 0}
            mapped = {o: chars(o) for o in sorted({start, end, *(o for span in found.values() for o in span)})}
            spans: dict[int | str, tuple[int, int]] = {0: (mapped[start], mapped[end])}
            for i, (s, e) in found.items():
                spans[i] = (mapped[s], mapped[e])
            for name, i in self._names.items():
                if i in spans:
                    spans[name] = spans[i]
            yield Match(text, spans)
            pos = end if end > start else _next_char(data, end)
