"""The progress line on stderr, shown only when stderr is a terminal so logs and CI stay clean."""

from __future__ import annotations

import sys
import time
from typing import Final, TextIO

_INTERVAL: Final = 0.25


class Progress:
    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._enabled = self._stream.isatty()
        self._last = 0.0
        self._shown = False

    def update(self, files: int, size: int) -> None:
        if not self._enabled:
            return
        now = time.monotonic()
        if now - self._last < _INTERVAL:
            return
        self._last = now
        self._shown = True
        self._stream.write(f"\rbroker scan: {files} files, {size / 1e6:.1f} MB")
        self._stream.flush()

    def done(self) -> None:
        if self._shown:
            # Erase the line so that the report (or the shell prompt) starts on a clean line.
            self._stream.write("\r\x1b[K")
            self._stream.flush()
