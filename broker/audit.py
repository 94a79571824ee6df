"""The audit log: one JSON line per decision, metadata only, never a token or a key.

Each line is written with a single ``write(2)`` on an ``O_APPEND`` descriptor, so concurrent writers
never interleave and a crash leaves at most the last line missing, never a torn one in the middle.

Denials are what anyone can cause at any rate, so they are written within a budget (issue 12: a denial
flood wrote 1.8 MiB/s). Per window of ``DENIAL_WINDOW`` seconds, the first denial of each kind (uid,
event, reason) is written in full, at most ``DENIAL_KINDS_PER_UID`` kinds per uid and
``DENIAL_LINES`` in all; every other denial is counted, and when the window ends one ``suppressed``
line per kind says how many more there were (``count``), with the kinds beyond a budget counted under
``reason: "other reasons"`` per uid, or for all uids together. A window's summaries are written by the
next denial after it or by :meth:`AuditLog.flush`, which the daemon calls every window. Allowed
decisions are always written in full: they are the trail of what was handed out.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import orjson

from broker.errors import BrokerError
from broker.logs import REQUEST_ID

DENIAL_WINDOW: Final = 1.0
DENIAL_KINDS_PER_UID: Final = 10
DENIAL_LINES: Final = 100
OTHER: Final = "other reasons"

# (uid, event, reason); uid None for a denial without a caller (a token that does not verify), and
# event/reason None for the "other reasons" buckets.
_Kind = tuple[object, object, object]


@dataclass
class _Suppressed:
    count: int = 0
    first: float = 0.0
    last: float = 0.0


class AuditLog:
    def __init__(self, path: str, clock: Callable[[], float], *, window: float = DENIAL_WINDOW,
                 kinds_per_uid: int = DENIAL_KINDS_PER_UID, lines: int = DENIAL_LINES) -> None:
        self._path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._fd = self._open(path)
        self._window = window
        self._kinds_per_uid = kinds_per_uid
        self._lines = lines
        # The current window's state, guarded by _lock: kinds written in full (with what was suppressed
        # after them), and how many full lines each uid and all uids have had.
        self._window_start = clock()
        self._kinds: dict[_Kind, _Suppressed] = {}
        self._written_per_uid: dict[object, int] = {}
        self._written = 0

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
        now = self._clock()
        rid = REQUEST_ID.get()
        if rid:
            fields["request_id"] = rid
        with self._lock:
            summaries = self._roll(now)
            full = fields.get("decision") != "deny" or self._admit_denial(event, fields, now)
        for line in summaries:
            self._write(line)
        if full:
            self._write({"time": round(now, 3), "event": event, **fields})

    def flush(self) -> None:
        """Write the summaries of a window that has ended (the daemon calls this every window)."""
        with self._lock:
            summaries = self._roll(self._clock())
        for line in summaries:
            self._write(line)

    def _admit_denial(self, event: str, fields: dict[str, Any], now: float) -> bool:
        """True if this denial is written in full; else it is counted for its window's summary."""
        uid = fields.get("uid")
        kind: _Kind = (uid, event, fields.get("reason"))
        seen = self._kinds.get(kind)
        if seen is None:
            uid_written = self._written_per_uid.get(uid, 0)
            if uid_written < self._kinds_per_uid and self._written < self._lines:
                # The first of its kind in this window: always in full, within the budgets.
                self._kinds[kind] = _Suppressed()
                self._written_per_uid[uid] = uid_written + 1
                self._written += 1
                return True
            # Over a budget: counted per uid while the table has room, else for everyone together.
            kind = (uid, None, None) if len(self._kinds) < 2 * self._lines else (OTHER, None, None)
            seen = self._kinds.setdefault(kind, _Suppressed())
        if not seen.count:
            seen.first = now
        seen.count += 1
        seen.last = now
        return False

    def _roll(self, now: float, force: bool = False) -> list[dict[str, Any]]:
        """End the window if its time is up: the summary lines of what it suppressed."""
        if not force and now < self._window_start + self._window:
            return []
        lines = [{"time": round(now, 3), "event": "suppressed", "decision": "deny",
                  "uid": None if uid == OTHER else uid, "denied_event": event,
                  "reason": OTHER if event is None else reason, "count": s.count,
                  "first": round(s.first, 3), "last": round(s.last, 3),
                  "summary": f"{s.count} more in the last {self._window:g} s"}
                 for (uid, event, reason), s in self._kinds.items() if s.count]
        self._window_start = now
        self._kinds = {}
        self._written_per_uid = {}
        self._written = 0
        return lines

    def _write(self, record: dict[str, Any]) -> None:
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
            summaries = self._roll(self._clock(), force=True)  # nothing suppressed goes unreported
        for line in summaries:
            self._write(line)
        with self._lock:
            if self._fd >= 0:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = -1
