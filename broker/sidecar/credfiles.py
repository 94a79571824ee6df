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
import time
from typing import Final

from broker.errors import BrokerError

TMPFS_MAGIC: Final = 0x01021994
GENERATION: Final = "generation"
PREFIX: Final = "broker-exec-"


# Beside each run's directory (never inside it: the agent sees only its credentials), the tokens of the
# run still alive, one "EXPIRY TOKEN" per line: what a later run revokes if this one is killed.
ISSUED_SUFFIX: Final = ".issued"
MAX_ISSUED_BYTES: Final = 1 << 20


def _sweep(base: str) -> tuple[list[tuple[str, float]], list[str]]:
    """Delete what earlier runs killed before cleaning up (SIGKILL, OOM) left behind. Returns the tokens
    they had issued, (token, expiry), for the caller to revoke, and their lists, which the caller deletes
    once it has taken the tokens over: a run killed in between must not lose them.

    Only ours (same owner), only when their sidecar's pid no longer exists: a live run is never touched,
    and a reused pid only delays the sweep to a later run. A list's temporary file (a run killed while
    writing it) holds tokens too: it is deleted.
    """
    try:
        names = os.listdir(base)
    except OSError:
        return [], []
    tokens: list[tuple[str, float]] = []
    lists: list[str] = []
    for name in names:
        bare = name.removeprefix(".")
        pid_text, dash, _ = bare[len(PREFIX):].partition("-")
        if not (bare.startswith(PREFIX) and pid_text.isdigit() and dash):
            continue
        path = os.path.join(base, name)
        try:
            st = os.lstat(path)
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            if st.st_uid != os.geteuid():
                continue
            if stat.S_ISDIR(st.st_mode) and name == bare:
                shutil.rmtree(path, ignore_errors=True)
            elif stat.S_ISREG(st.st_mode) and name != bare and name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(path)
            elif stat.S_ISREG(st.st_mode) and name.endswith(ISSUED_SUFFIX):
                tokens += _read_issued(path)
                lists.append(path)
        except OSError:
            continue  # gone already, or the pid belongs to someone else: alive
    return tokens, lists


def _read_issued(path: str) -> list[tuple[str, float]]:
    try:
        # O_NOFOLLOW and the owner check on the open file: only a list this uid wrote is believed.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return []
    with os.fdopen(fd, "rb") as f:
        if os.fstat(f.fileno()).st_uid != os.geteuid():
            return []
        data = f.read(MAX_ISSUED_BYTES)
    now = time.time()
    out = []
    for line in data.decode("ascii", "replace").splitlines():
        exp, _, token = line.partition(" ")
        # An expired token needs no revocation (and the daemon would skip it anyway).
        if exp.isdigit() and int(exp) > now and token:
            out.append((token, float(exp)))
    return out


def _write_atomic(directory: str, name: str, data: bytes) -> None:
    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
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
        os.rename(tmp, os.path.join(directory, name))
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        # The owner's pid in the name lets a later run find what a killed one left behind.
        self.path = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=base)  # mode 0700, owned by us
        self.generation = 0
        # Tokens of killed runs: the sidecar revokes them, since their agents' children may still
        # hold them (PDEATHSIG reaches the agent, not what the agent started). They join this run's own
        # list before the old lists go, so that they outlive this run too if it is killed in turn.
        self.stale_tokens, lists = _sweep(base)
        if self.stale_tokens:
            self.record_issued(self.stale_tokens)
        for path in lists:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def write(self, name: str, data: bytes) -> None:
        """Replace ``name`` atomically with ``data`` (mode 0600)."""
        if "/" in name or name.startswith(".") or name == GENERATION:
            raise BrokerError(f"invalid credential file name {name!r}")
        _write_atomic(self.path, name, data)

    def bump(self) -> int:
        """Publish a new generation number after one or more credential files changed."""
        self.generation += 1
        _write_atomic(self.path, GENERATION, f"{self.generation}\n".encode())
        return self.generation

    def record_issued(self, tokens: list[tuple[str, float]]) -> None:
        """Keep the list of this run's live tokens (token, expiry) beside the directory."""
        data = "".join(f"{int(exp)} {token}\n" for token, exp in tokens).encode("ascii")
        _write_atomic(os.path.dirname(self.path), os.path.basename(self.path) + ISSUED_SUFFIX, data)

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.path, name))
        _fsync_dir(self.path)

    def cleanup(self, *, keep_issued: bool = False) -> None:
        """Delete the directory, and the list of issued tokens unless a later run must revoke them."""
        shutil.rmtree(self.path, ignore_errors=True)
        if not keep_issued:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path + ISSUED_SUFFIX)
