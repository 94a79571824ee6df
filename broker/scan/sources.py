"""Working-tree and standard-input sources: which files a scan reads, and reading them safely.

A directory inside a git work tree contributes its tracked files (``git ls-files``); any other
directory contributes every regular file below it. Symlinks are never followed, neither while walking
nor when opening (``O_NOFOLLOW``): a link could point out of the tree, or at a device.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Final

from broker.scan.document import Document, decode
from broker.scan.errors import ScanError, Skipped, UsageError
from broker.scan.gitsafe import shadow

STDIN_PATH: Final = "<stdin>"
_OPEN_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class FileRef:
    """A file to scan: ``path`` is what reports show, ``abspath`` is what is opened."""

    path: str
    abspath: str


def display_path(abspath: str, cwd: str) -> str:
    rel = os.path.relpath(abspath, cwd)
    return abspath if rel.startswith("..") else rel.replace(os.sep, "/")


def _tracked(directory: str) -> list[str] | None:
    """Tracked files below ``directory`` (absolute), or None when it is not in a git work tree."""
    try:
        # The listing comes from a shadow of the repository, which runs nothing the repository names.
        with shadow(directory, index=True) as (repo, located):
            if located.top is None:
                return None
            listing = repo.run(["ls-files", "-z", "--cached"])
    except ScanError:
        return None  # not a repository (or an index git cannot read): every file is walked instead
    root = located.top
    below = os.path.relpath(os.path.realpath(directory), os.path.realpath(root)).replace(os.sep, "/")
    if below == ".." or below.startswith("../"):
        # The repository's config moved its work tree elsewhere (core.worktree): its file list says
        # nothing about this directory, so every file here is read instead.
        return None
    names = [os.fsdecode(p) for p in listing.split(b"\0") if p]
    if below != ".":
        names = [n for n in names if n.startswith(below + "/")]
    # The index is the repository's own data: a crafted one could name a path outside the work tree
    # ("../", absolute, or through a committed symlink), whose content would reach the report.
    real_root = os.path.realpath(root)
    inside = [os.path.join(root, n) for n in names if not (n.startswith("/") or ".." in n.split("/"))]
    return [p for p in inside if os.path.realpath(os.path.dirname(p)).startswith(real_root + os.sep)
            or os.path.realpath(os.path.dirname(p)) == real_root]


def _walk(directory: str) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d != ".git")
        for name in sorted(filenames):
            yield os.path.join(dirpath, name)


def worktree(paths: Sequence[str], cwd: str) -> Iterator[FileRef]:
    """Every file named by ``paths`` (files or directories), each once, in a stable order."""
    seen: set[str] = set()
    for given in paths:
        absolute = os.path.abspath(os.path.join(cwd, given))
        if os.path.isdir(absolute) and not os.path.islink(absolute):
            tracked = _tracked(absolute)
            members: Sequence[str] | Iterator[str] = sorted(tracked) if tracked is not None else _walk(absolute)
        elif os.path.lexists(absolute):
            members = [absolute]
        else:
            raise UsageError(f"{given}: no such file or directory")
        for member in members:
            if member not in seen:
                seen.add(member)
                yield FileRef(display_path(member, cwd), member)


def read(ref: FileRef, max_size: int) -> Document:
    """The document for ``ref``; raises :class:`Skipped` when it is not a readable text file."""
    try:
        fd = os.open(ref.abspath, _OPEN_FLAGS)
    except OSError as exc:
        raise Skipped("symlink" if os.path.islink(ref.abspath) else "unreadable") from exc
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise Skipped("special")
        if info.st_size > max_size:
            raise Skipped("too-large")
        try:
            data = fh.read(max_size + 1)
        except OSError as exc:
            raise Skipped("unreadable") from exc
    if len(data) > max_size:
        raise Skipped("too-large")
    text = decode(data)
    if text is None:
        raise Skipped("binary")
    return Document(ref.path, text)


def stdin(stream: BinaryIO, max_size: int) -> Document | None:
    """Standard input as one document, or None when it is binary."""
    data = stream.read(max_size + 1)
    if len(data) > max_size:
        raise UsageError(f"standard input is larger than {max_size} bytes")
    text = decode(data)
    return None if text is None else Document(STDIN_PATH, text)
