"""The audit log: one JSON line per decision, metadata only, never a token or a key.

Each line is written with a single ``write(2)`` on an ``O_APPEND`` descriptor, so concurrent writers
never interleave and a crash leaves at most the last line missing, never a torn one in the middle.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from typing import Any

import orjson

from broker.errors import BrokerError
from broker.logs import REQUEST_ID


class AuditLog:
    def __init__(self, path: str, clock: Callable[[], float]) -> None:
        self._path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._fd = self._open(path)

    @staticmethod
    def _open(path: str) -> int:
        try:
            os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
            # O_NOFOLLOW: a symlink planted at the audit path must not redirect our writes.
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            os.fchmod(fd, 0o600)  # an existing file keeps its mode otherwise
        except OSError as exc:
            raise BrokerError(f"cannot open audit log {path}: {exc.strerror}") from None
        return fd

    @property
    def path(self) -> str:
        return self._path

    def record(self, event: str, **fields: Any) -> None:
        rid = REQUEST_ID.get()
        if rid:
            fields["request_id"] = rid
        record = {"time": round(self._clock(), 3), "event": event, **fields}
        try:
            data = orjson.dumps(record, default=str, option=orjson.OPT_APPEND_NEWLINE)
        except orjson.JSONEncodeError:
            # orjson refuses strings that are not valid Unicode (a path read with surrogateescape);
            # json escapes them instead, so the line is still written, byte for byte recoverable.
            data = (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode("ascii")
        with self._lock:
            written = os.write(self._fd, data)
        if written != len(data):
            raise BrokerError(f"short write to audit log {self._path}")

    def reopen(self) -> None:
        """Open the path again (after logrotate renamed the file) and switch to it atomically."""
        fd = self._open(self._path)
        with self._lock:
            old, self._fd = self._fd, fd
        if old >= 0:
            os.close(old)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = -1
