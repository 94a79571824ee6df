"""Who is calling: kernel-reported peer credentials, resolved into selectors from /proc.

At accept the front door records ``SO_PEERCRED`` (pid, uid, gid) and a *pidfd* for the peer process
(``SO_PEERPIDFD``, Linux 6.5+, taken by the kernel at connect; else ``pidfd_open`` right after accept,
checked against the pid's start time). A pidfd refers to one process for its whole life, never to a later
process that reuses the pid. Every request then re-reads /proc for that pid between two liveness checks
of the pidfd, so

* a pid that died and was reused by another process never inherits the first one's rights, and
* a process that changed its credentials or its executable after connecting is refused: the executable's
  (device, inode) recorded at accept must still be the one running at each request.

The pinned pid is also the only process whose bytes are relayed on the connection (``broker._pump``
checks the writer of every read with ``SO_PASSCRED``): a forked child holding the connection cannot
speak for a parent that has since exec'd an approved binary.

An ``exe`` selector compares the path *and* the (device, inode) of the running executable with the
configured path as the daemon sees it: inside its own mount namespace a process can bind-mount any binary
over the approved path, and ``/proc/<pid>/exe`` then shows the approved path.

Hashing for ``exe_sha256`` reads whole binaries, so it is done only for a caller whose cheaper selectors
already match a block that pins a hash, one at a time per uid and at most :data:`MAX_HASHING` at once
(:class:`ExeHashing`); a caller never waits for another uid's hash.

Nothing a caller says about itself is ever used.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import functools
import grp
import hashlib
import os
import pwd
import signal
import socket
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, Literal

from broker.config import CallerRule
from broker.errors import AttestationError

PROC: Final = "/proc"
# Binaries larger than this are not hashed: a caller must not make the daemon read gigabytes per call.
MAX_EXE_HASH_BYTES: Final = 512 * 1024 * 1024
_HASH_CACHE_SIZE: Final = 256
# Executables hashed at once across all callers: each may read MAX_EXE_HASH_BYTES, and the daemon must
# keep cores for everything else. One per uid on top of that (see ExeHashing).
MAX_HASHING: Final = 2
_UNIT_SUFFIXES: Final = (".service", ".scope")
_UCRED: Final = struct.Struct("3i")
SO_PEERPIDFD: Final = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5+; Python 3.11 lacks the name
# PIDFD_GET_INFO (Linux 6.13+): a process's credentials straight from its pidfd, in one ioctl that fails
# with ESRCH once the process has exited. struct pidfd_info, version 0 (64 bytes): mask, cgroupid, pid,
# tgid, ppid, ruid, rgid, euid, egid, suid, sgid, fsuid, fsgid, then spare fields.
_PIDFD_INFO: Final = struct.Struct("=QQ11I")
_PIDFD_INFO_SIZE: Final = 64
PIDFD_GET_INFO: Final = (3 << 30) | (_PIDFD_INFO_SIZE << 16) | (0xFF << 8) | 11  # _IOWR(0xFF, 11, info)
_PIDFD_INFO_CREDS: Final = 1 << 1
_pidfd_info: list[bool] = [True]  # cleared the first time the kernel says it does not know the ioctl


class ProcessHandle:
    """Owns a pidfd. The fd closes when the last reference goes away, so a request still holding the
    handle never sees the number reused for another process's pidfd."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def alive(self) -> bool:
        try:
            signal.pidfd_send_signal(self.fd, 0)
        except PermissionError:
            return True  # it exists; we are just not allowed to signal it (daemon not running as root)
        except OSError:
            return False  # ESRCH: exited; anything else: fail closed
        return True

    def effective_ids(self) -> tuple[int, int] | None:
        """(euid, egid) from the kernel through the pidfd; None where the kernel is too old.

        Raises ProcessLookupError when the process has exited: the answer can only ever describe the
        process this handle pins, never a later one with the same pid.
        """
        if not _pidfd_info[0]:
            return None
        buf = bytearray(_PIDFD_INFO_SIZE)
        _PIDFD_INFO.pack_into(buf, 0, _PIDFD_INFO_CREDS, *([0] * 12))
        try:
            fcntl.ioctl(self.fd, PIDFD_GET_INFO, buf, True)
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                raise ProcessLookupError from None
            if exc.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                _pidfd_info[0] = False
                return None
            raise
        fields = _PIDFD_INFO.unpack_from(buf, 0)
        if not fields[0] & _PIDFD_INFO_CREDS:
            return None
        return fields[7], fields[8]

    def __del__(self) -> None:
        os.close(self.fd)


@dataclass(frozen=True, slots=True)
class PeerCred:
    """What the kernel said about a connection when it was accepted."""

    pid: int
    uid: int
    gid: int
    process: ProcessHandle = field(compare=False, repr=False)
    # (device, inode) of the executable at accept; None where /proc/<pid>/exe is not readable to us.
    exe_id: tuple[int, int] | None = None


def exe_identity(pid: int) -> tuple[int, int] | None:
    """(device, inode) of the file the process is running: the kernel's, whatever path it shows."""
    try:
        st = os.stat(f"{PROC}/{pid}/exe")
    except OSError:
        return None
    return st.st_dev, st.st_ino


def path_id(path: str) -> tuple[int, int] | None:
    """(device, inode) of ``path`` as the daemon's own mount namespace resolves it."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _pidfd(sock: socket.socket, pid: int) -> ProcessHandle:
    try:
        return ProcessHandle(sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD))
    except OSError as exc:
        if exc.errno != errno.ENOPROTOOPT:
            # The kernel knows the option but has no process to give (some kernels say EINVAL once
            # the peer is reaped): its pid may already be someone else's, so pidfd_open must not run.
            raise AttestationError(f"pid {pid}: no pidfd for the peer ({exc.strerror})") from None
    # A kernel before 6.5: pin by pidfd_open plus the start time seen now and just after.
    before = start_time(pid)
    try:
        handle = ProcessHandle(os.pidfd_open(pid))
    except OSError:
        raise AttestationError(f"pid {pid} is gone") from None
    if start_time(pid) != before or not handle.alive():
        raise AttestationError(f"pid {pid} was reused while connecting")
    return handle


def peer_uid(sock: socket.socket) -> int:
    """The uid ``SO_PEERCRED`` reports for an accepted Unix socket: one getsockopt, nothing pinned."""
    return int(_UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))[1])


def peer_cred(sock: socket.socket) -> PeerCred:
    """Read ``SO_PEERCRED`` of an accepted Unix socket and pin the peer process with a pidfd."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    if pid <= 0:
        # pid 0 means the peer lives in a pid namespace we cannot see: nothing to attest.
        raise AttestationError("peer pid not visible from this pid namespace")
    handle = _pidfd(sock, pid)
    exe_id = exe_identity(pid)
    # Read after pinning and checked alive after reading: the identity is the pinned process's own.
    if not handle.alive():
        raise AttestationError(f"pid {pid} exited while connecting")
    return PeerCred(pid, uid, gid, handle, exe_id)


def start_time(pid: int) -> int:
    try:
        with open(f"{PROC}/{pid}/stat", "rb") as f:
            stat = f.read(4096)
    except OSError:
        raise AttestationError(f"pid {pid} is gone") from None
    # comm (field 2) may contain spaces and parentheses: split after the *last* ')'.
    rest = stat[stat.rfind(b")") + 2:].split()
    try:
        return int(rest[19])  # field 22 overall; fields 3.. start at rest[0]
    except (IndexError, ValueError):
        raise AttestationError(f"pid {pid}: unreadable stat") from None


@dataclass(frozen=True, slots=True)
class Caller:
    """A caller's attested selectors at the time of one request."""

    pid: int
    process: ProcessHandle = field(compare=False, repr=False)
    uid: int
    gid: int
    exe: str | None
    exe_id: tuple[int, int] | None = None
    # Computed on first use (only rules and audit lines that need them pay for the reads).
    _lazy: dict[str, str | None] = field(default_factory=dict, compare=False, repr=False)
    _groups: list[frozenset[int]] = field(default_factory=list, compare=False, repr=False)

    @property
    def groups(self) -> frozenset[int]:
        """Supplementary group ids (read from /proc on first use)."""
        if not self._groups:
            try:
                groups = _status_ids(self.pid)[2]
            except (OSError, ValueError):
                groups = frozenset()
            self._groups.append(groups if self.process.alive() else frozenset())
        return self._groups[0]

    @property
    def systemd_unit(self) -> str | None:
        if "unit" not in self._lazy:
            unit = _systemd_unit(self.pid)
            # Read between two liveness checks of the pinned process, like every other selector.
            self._lazy["unit"] = unit if self.process.alive() else None
        return self._lazy["unit"]

    @property
    def user(self) -> str | None:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return None

    def group_names(self) -> set[str]:
        names = set()
        for gid in self.groups | {self.gid}:
            try:
                names.add(grp.getgrgid(gid).gr_name)
            except KeyError:
                continue
        return names

    def audit_fields(self) -> dict[str, object]:
        fields: dict[str, object] = {"pid": self.pid, "uid": self.uid, "gid": self.gid, "exe": self.exe}
        if "unit" in self._lazy:
            fields["unit"] = self._lazy["unit"]
        if self._lazy.get("hash_skipped"):
            # Why an exe_sha256 block could not match: every hashing slot was another uid's.
            fields["exe_sha256"] = self._lazy["hash_skipped"]
        return fields


class _HashCache:
    """sha256 of executables keyed by (device, inode, size, mtime, ctime): a binary is hashed once.

    The ctime is what makes the key trustworthy: a file's owner can set its mtime back after
    rewriting it, but every write (and every utime) moves the ctime to now, and only the clock's
    owner can move that back.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[int, int, int, int, int], str] = OrderedDict()

    def sha256(self, pid: int, *, compute: bool = True) -> str | Literal[False] | None:
        """The digest; None when it cannot be had; False on a cache miss when ``compute`` is off."""
        path = f"{PROC}/{pid}/exe"
        try:
            # Open first, then fstat the open file: the hash and the key describe the same inode.
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                with self._lock:
                    if key in self._items:
                        self._items.move_to_end(key)
                        return self._items[key]
                if st.st_size > MAX_EXE_HASH_BYTES:
                    return None
                if not compute:
                    return False
                digest = hashlib.file_digest(f, "sha256").hexdigest()
                after = os.fstat(f.fileno())
        except OSError:
            return None
        if (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != key[2:]:
            return None  # rewritten while we read it: the digest describes no single version of the file
        with self._lock:
            self._items[key] = digest
            if len(self._items) > _HASH_CACHE_SIZE:
                self._items.popitem(last=False)
        return digest


_hashes = _HashCache()


def _field(status: bytes, name: bytes) -> list[bytes]:
    start = status.index(name) + len(name)
    return status[start:status.index(b"\n", start)].split()


def _status_ids(pid: int) -> tuple[int, int, frozenset[int]]:
    with open(f"{PROC}/{pid}/status", "rb") as f:
        status = f.read(65536)
    # Effective ids: the second of real, effective, saved, filesystem.
    uid = int(_field(status, b"\nUid:")[1])
    gid = int(_field(status, b"\nGid:")[1])
    return uid, gid, frozenset(int(g) for g in _field(status, b"\nGroups:"))


def _effective_ids(cred: PeerCred) -> tuple[int, int]:
    try:
        ids = cred.process.effective_ids()
    except ProcessLookupError:
        raise AttestationError(f"pid {cred.pid} has exited") from None
    if ids is not None:
        return ids
    st = os.stat(f"{PROC}/{cred.pid}")
    # /proc/<pid> is owned by the process's effective uid/gid, unless the process is not dumpable
    # (setuid programs, or after a credential change), in which case it shows root. So the cheap stat
    # is trusted only when it agrees with SO_PEERCRED and is not root; otherwise read the truth.
    if (st.st_uid, st.st_gid) == (cred.uid, cred.gid) and st.st_uid != 0 and st.st_gid != 0:
        return st.st_uid, st.st_gid
    uid, gid, _ = _status_ids(cred.pid)
    return uid, gid


def _systemd_unit(pid: int) -> str | None:
    try:
        with open(f"{PROC}/{pid}/cgroup", "rb") as f:
            lines = f.read(65536).decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):  # the cgroup v2 hierarchy
            # The outermost unit is the one the service manager created. Anything nested below it may
            # be a cgroup the process made itself under a delegated subtree (any user can name one
            # "trusted.service" inside their user@.service), so it never counts.
            for part in line[3:].split("/"):
                if part.endswith(_UNIT_SUFFIXES):
                    return part
    return None


def attest(cred: PeerCred) -> Caller:
    """Resolve a connection's peer into the selectors of one request (fresh from /proc)."""
    pid = cred.pid
    # No liveness check up front: the one after the reads below is what makes them trustworthy, and
    # a process that exited before we started fails it just the same.
    try:
        uid, gid = _effective_ids(cred)
        try:
            exe: str | None = os.readlink(f"{PROC}/{pid}/exe")
        except OSError:
            exe = None  # kernel threads and some zombies have no exe
        exe_id = exe_identity(pid)
    except (OSError, ValueError, IndexError):
        raise AttestationError(f"pid {pid}: /proc unreadable") from None
    # Check the pinned process is still alive *after* reading: if it had exited, the pid could now
    # belong to another process and what we read would describe that one. Defeats pid reuse.
    if not cred.process.alive():
        raise AttestationError(f"pid {pid} exited while being attested")
    if (uid, gid) != (cred.uid, cred.gid):
        raise AttestationError(f"pid {pid} changed credentials since it connected")
    # An exec after connecting: the connection (and bytes written before the exec) belong to what the
    # process was, not to the binary it runs now.
    if exe_id != cred.exe_id:
        raise AttestationError(f"pid {pid} runs another executable than when it connected")
    return Caller(pid, cred.process, uid, gid, exe, exe_id)


def exe_sha256(caller: Caller) -> str | None:
    """The caller's executable hash, computed at most once per request and once per binary.

    A cache miss reads the whole binary (up to MAX_EXE_HASH_BYTES): never call it on the event loop;
    :class:`ExeHashing` calls it on a worker thread, within its bounds.
    """
    if "sha256" not in caller._lazy:
        digest = _hashes.sha256(caller.pid)  # computes on a miss, so never False here
        # The process could have exited (and its pid been reused) while we hashed.
        caller._lazy["sha256"] = digest if digest is not False and caller.process.alive() else None
    return caller._lazy["sha256"]


def exe_sha256_known(caller: Caller) -> bool:
    """True when :func:`exe_sha256` can answer without reading the binary (memoised, or cached)."""
    if "sha256" in caller._lazy:
        return True
    digest = _hashes.sha256(caller.pid, compute=False)
    if digest is False:
        return False
    caller._lazy["sha256"] = digest if caller.process.alive() else None
    return True


def cheap_matches(rule: CallerRule, caller: Caller) -> bool:
    """Every selector of ``rule`` but ``exe_sha256`` matches: the checks that read no binary."""
    if rule.uid is not None and rule.uid != caller.uid:
        return False
    if rule.gid is not None and rule.gid != caller.gid:
        return False
    if rule.exe is not None:
        if rule.exe != caller.exe:
            return False
        # The path a process shows can be a bind mount in its own mount namespace: the file it runs must
        # be the one the configured path names here. Defeats a user+mount namespace's bind mount.
        if caller.exe_id is None or path_id(rule.exe) != caller.exe_id:
            return False
    if rule.systemd_unit is not None and rule.systemd_unit != caller.systemd_unit:
        return False
    if rule.user is not None and rule.user != caller.user:
        return False
    return rule.group is None or rule.group in caller.group_names()


def matches(rule: CallerRule, caller: Caller) -> bool:
    """True when every selector set in ``rule`` matches ``caller``. Cheap checks go first.

    ``exe_sha256`` is compared with the digest :class:`ExeHashing` obtained for this request; with none
    (not needed, or no slot free) the rule does not match. Nothing here reads a binary.
    """
    if not cheap_matches(rule, caller):
        return False
    return rule.exe_sha256 is None or rule.exe_sha256 == caller._lazy.get("sha256")


def needs_exe_hash(rules: Iterable[CallerRule], caller: Caller) -> bool:
    """True when some block pins a hash and every other selector of that block matches the caller."""
    return any(rule.exe_sha256 is not None and cheap_matches(rule, caller) for rule in rules)


class ExeHashing:
    """Obtains callers' executable hashes within bounds: one hash in flight per uid, ``limit`` in all.

    A request whose uid already has a hash in flight waits for that one (most likely the same binary,
    then answered from the cache). A request that finds every slot taken by other uids does not wait:
    it goes on without a digest, so its ``exe_sha256`` blocks do not match, and the audit line says so.
    Hashing runs on a worker thread; the waiting is on the event loop, so it holds no thread.
    """

    def __init__(self, limit: int = MAX_HASHING, hash_fn: Callable[[Caller], str | None] = exe_sha256,
                 known: Callable[[Caller], bool] = exe_sha256_known) -> None:
        self._limit = limit
        self._hash = hash_fn
        self._known = known
        self._running: dict[int, asyncio.Future[str | None]] = {}  # uid -> its hash in flight

    async def ensure(self, caller: Caller, rules: Iterable[CallerRule]) -> None:
        """Memoise the caller's digest when a block needs it and a slot is free (see the class)."""
        if not needs_exe_hash(rules, caller):
            return  # nobody reads a binary for a caller no hash-pinned block could admit anyway
        while not self._known(caller):
            running = self._running.get(caller.uid)
            if running is not None:
                await asyncio.shield(running)  # the same uid's own hash; never another uid's
                continue
            if len(self._running) >= self._limit:
                caller._lazy["hash_skipped"] = "not computed: every hashing slot is busy"
                return
            running = asyncio.ensure_future(asyncio.to_thread(self._hash, caller))
            self._running[caller.uid] = running
            # The slot stays taken until the thread has finished reading, even when the request that
            # started it is cancelled: abandoning requests must not start hash after hash.
            running.add_done_callback(functools.partial(self._release, caller.uid))
            await asyncio.shield(running)
            return

    def _release(self, uid: int, done: asyncio.Future[str | None]) -> None:
        if self._running.get(uid) is done:
            del self._running[uid]


exe_hashing = ExeHashing()
