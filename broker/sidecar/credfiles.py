"""The private credentials directory of one ``broker exec`` run: tmpfs only, atomic swaps.

Readers never see a partial or empty file: every write goes to a temporary file in the same directory,
is flushed with fsync, renamed over the old name (atomic on POSIX), and the directory is fsynced. A
``generation`` file, swapped the same way after each change, tells readers which version they see.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
import tempfile
from typing import Final

from broker.errors import BrokerError

TMPFS_MAGIC: Final = 0x01021994
GENERATION: Final = "generation"
PREFIX: Final = "broker-exec-"


def _sweep(base: str) -> None:
    """Delete credential directories of earlier runs that were killed (SIGKILL, OOM) before cleaning up.

    Only ours (same owner), only when their sidecar's pid no longer exists: a live run is never touched,
    and a reused pid only delays the sweep to a later run.
    """
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        pid_text, dash, _ = name[len(PREFIX):].partition("-")
        if not (name.startswith(PREFIX) and pid_text.isdigit() and dash):
            continue
        path = os.path.join(base, name)
        try:
            st = os.lstat(path)
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue  # gone already, or the pid belongs to someone else: alive


def _is_tmpfs(path: str) -> bool:
    # os.statvfs has no f_type; /proc/self/mountinfo names each mount's filesystem type.
    real = os.path.realpath(path)
    best, fstype = "", ""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            mount_point = fields[4].replace("\\040", " ")
            sep = fields.index("-")
            inside = real == mount_point or real.startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) >= len(best):
                best, fstype = mount_point, fields[sep + 1]
    return fstype in ("tmpfs", "ramfs")


def runtime_base() -> str:
    """``$XDG_RUNTIME_DIR`` when set, else ``/dev/shm``: both memory-backed on a normal Linux host."""
    return os.environ.get("XDG_RUNTIME_DIR") or "/dev/shm"  # noqa: S108 - checked to be tmpfs before use


class CredentialDir:
    def __init__(self, base: str | None = None) -> None:
        base = base or runtime_base()
        if not _is_tmpfs(base):
            # Credentials must never reach persistent disk, not even in a crash before cleanup.
            raise BrokerError(f"{base} is not a tmpfs: refusing to write credentials there "
                              "(set XDG_RUNTIME_DIR to a memory-backed directory)")
        _sweep(base)
        # The owner's pid in the name lets a later run find what a killed one left behind.
        self.path = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=base)  # mode 0700, owned by us
        self.generation = 0

    def write(self, name: str, data: bytes) -> None:
        """Replace ``name`` atomically with ``data`` (mode 0600)."""
        if "/" in name or name.startswith(".") or name == GENERATION:
            raise BrokerError(f"invalid credential file name {name!r}")
        self._swap(name, data)

    def bump(self) -> int:
        """Publish a new generation number after one or more credential files changed."""
        self.generation += 1
        self._swap(GENERATION, f"{self.generation}\n".encode())
        return self.generation

    def _swap(self, name: str, data: bytes) -> None:
        tmp = os.path.join(self.path, f".{name}.{secrets.token_hex(6)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # the mode is set on every write, whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.rename(tmp, os.path.join(self.path, name))
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._fsync_dir()

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.path, name))
        self._fsync_dir()

    def cleanup(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def _fsync_dir(self) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
