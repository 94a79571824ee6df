"""One unit of text to scan: a file, a file's added lines in a diff, or standard input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# Git's own heuristic: a NUL byte early in the content means binary.
_SNIFF_BYTES: Final = 8000


@dataclass(frozen=True, slots=True)
class Document:
    """Text plus where it came from.

    ``line_map`` is set for diff documents, whose text is only the added lines: entry i is the line
    number in the real file of the document's line i + 1.
    """

    path: str
    text: str
    line_map: tuple[int, ...] | None = None
    commit: str | None = None

    def real_line(self, line: int) -> int:
        if self.line_map is None:
            return line
        return self.line_map[min(line, len(self.line_map)) - 1]


def decode(data: bytes) -> str | None:
    """The text of ``data``, or None for binary content. Invalid UTF-8 is replaced, never fatal."""
    if b"\0" in data[:_SNIFF_BYTES]:
        return None
    return data.decode("utf-8", "replace")
