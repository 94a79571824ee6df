"""Git over a repository that a stranger controls, without running anything the repository names.

A scanned repository is hostile input: CI scans pull requests from anyone. Its ``.git/config`` (and
the files it includes), ``.git/info/attributes``, ``.gitattributes`` and hooks can name commands that
git runs while it diffs or re-merges: merge drivers, clean/smudge filters and filter processes,
textconv and external diff drivers, fsmonitor hooks, pagers, gpg, ssh and ``ext::`` transports for
the lazy fetches of a partial clone. Overriding each such key with ``-c`` is not enough, because
drivers and filters are named by the repository (``merge.<name>.driver``) and cannot all be listed.

So the history is never read through the repository's own git directory. A *shadow* git directory is
made in a private temporary directory: its object store borrows the repository's objects read-only
(``objects/info/alternates``), its refs, HEAD, shallow list and index are copies, and its config is
ours. Git run there with system and global config switched off sees no setting, attribute, hook or
promisor remote of the repository, so it has nothing to run; a missing object is an error, never a
fetch. Only two read-only commands touch the repository itself, to find its files and refs
(``rev-parse``, ``for-each-ref``); they apply no attributes and run no diff, and every executing key
they could reach is pinned on their command line (they read the user's own config too, for
``safe.directory``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Final

from broker.scan.errors import ScanError, UsageError

# Executing settings pinned on every git command line (a -c value beats every config file, includes
# too; a per-protocol key such as protocol.ext.allow beats protocol.allow, so each is pinned). In the
# shadow, whose config names no command, they are a second wall; for the two commands run in the
# repository they are the defence, and rev-parse and for-each-ref consult few of them.
PINNED: Final = (
    "core.fsmonitor=false", "core.hooksPath=/dev/null", "core.pager=cat", "core.sshCommand=false",
    "core.askPass=false", "core.alternateRefsCommand=false", "core.editor=false", "sequence.editor=false",
    "core.commitGraph=false", "credential.helper=", "gpg.program=false", "gpg.ssh.program=false",
    "gpg.x509.program=false", "log.showSignature=false", "protocol.allow=never", "protocol.ext.allow=never",
    "protocol.file.allow=never", "protocol.ssh.allow=never", "protocol.git.allow=never",
    "protocol.http.allow=never", "protocol.https.allow=never", "core.quotePath=false",
    "diff.interHunkContext=0", "diff.noprefix=false",
)
# What these say, for git versions that know them: never fetch a missing object, never read a replace
# ref (one could show innocent content in place of a commit), no terminal prompt, no pager, no editor.
_ENV: Final = {
    "GIT_NO_LAZY_FETCH": "1", "GIT_PROTOCOL_FROM_USER": "0", "GIT_TERMINAL_PROMPT": "0",
    "GIT_NO_REPLACE_OBJECTS": "1", "GIT_OPTIONAL_LOCKS": "0", "GIT_PAGER": "cat", "PAGER": "cat",
    "GIT_ASKPASS": "false", "SSH_ASKPASS": "false", "GIT_SSH_COMMAND": "false", "GIT_EDITOR": "false",
    "GIT_ALLOW_PROTOCOL": "",
}
# The shadow reads no configuration but its own: not the user's or the system's either, whose diff
# or merge drivers could otherwise meet attributes.
_NO_OUTSIDE_CONFIG: Final = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_ATTR_NOSYSTEM": "1"}
# Set by the caller (a pre-commit or pre-receive hook, a CI job): which index and object directory
# the repository currently uses, and the user's own config, where CI marks a checkout owned by another
# uid as safe (safe.directory). The locating commands keep them; the shadow never does.
_LOCATING_ENV: Final = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY",
                        "GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_COMMON_DIR", "GIT_CEILING_DIRECTORIES",
                        "GIT_DISCOVERY_ACROSS_FILESYSTEM", "GIT_CONFIG_GLOBAL", "GIT_CONFIG_SYSTEM",
                        "GIT_CONFIG_NOSYSTEM")
_SHADOW_CONFIG: Final = "[core]\n\trepositoryformatversion = {version}\n\tbare = true\n{extensions}"


def _environment(keep: tuple[str, ...] = ()) -> dict[str, str]:
    """The process environment without any GIT_* variable except ``keep``, plus the hardening."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_") or k in keep}
    env.update(_ENV)
    return env


def _pinned() -> list[str]:
    return [arg for pin in PINNED for arg in ("-c", pin)]


def run_in_repository(directory: str, args: list[str]) -> subprocess.CompletedProcess[bytes]:
    """A read-only locating command (rev-parse, for-each-ref) in the scanned repository itself."""
    try:
        return subprocess.run(["git", "--no-pager", "-C", directory, *_pinned(), *args],
                              capture_output=True, check=False, env=_environment(_LOCATING_ENV),
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise ScanError("git is not installed") from exc


@dataclass(frozen=True, slots=True)
class Located:
    """Where a repository keeps what the shadow borrows."""

    top: str | None  # the work tree's top directory; None for a bare repository
    objects: str
    index: str
    shallow: str
    object_format: str


def locate(directory: str) -> Located:
    proc = run_in_repository(directory, ["rev-parse", "--is-bare-repository", "--show-object-format",
                                         "--git-path", "objects", "--git-path", "index",
                                         "--git-path", "shallow"])
    if proc.returncode != 0:
        raise UsageError(f"{directory}: not inside a git repository")
    lines = proc.stdout.decode("utf-8", "surrogateescape").splitlines()
    if len(lines) != 5:
        raise ScanError(f"{directory}: unexpected answer from git rev-parse")
    bare, fmt, objects, index, shallow = lines
    top: str | None = None
    if bare != "true":
        found = run_in_repository(directory, ["rev-parse", "--show-toplevel"])
        if found.returncode != 0:
            raise UsageError(f"{directory}: not inside a git work tree")
        top = found.stdout.decode("utf-8", "surrogateescape").strip()
    # --git-path answers relative to the directory git ran in (absolute when the caller's GIT_* were).
    here = os.path.abspath(directory)
    return Located(top, os.path.join(here, objects), os.path.join(here, index), os.path.join(here, shallow), fmt)


def _refs(directory: str) -> tuple[bytes, str | None]:
    """packed-refs content for the shadow, and HEAD's commit (None when HEAD is unborn)."""
    proc = run_in_repository(directory, ["for-each-ref", "--format=%(objectname) %(refname)"])
    if proc.returncode != 0:
        raise ScanError(f"git for-each-ref failed: {proc.stderr.decode('utf-8', 'replace').strip()}")
    head = run_in_repository(directory, ["rev-parse", "--verify", "-q", "HEAD"])
    oid = head.stdout.decode("ascii", "replace").strip() if head.returncode == 0 else None
    return proc.stdout, oid


def resolve_commit(directory: str, revision: str) -> str:
    """The commit a user's revision names in the repository (reflogs and upstreams included)."""
    proc = run_in_repository(directory, ["rev-parse", "--verify", "-q", "--end-of-options",
                                         f"{revision}^{{commit}}"])
    if proc.returncode != 0:
        raise UsageError(f"{revision!r}: not a commit in this repository")
    return proc.stdout.decode("ascii", "replace").strip()


class Shadow:
    """A private git directory that reads a repository's objects and nothing else of it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._env = _environment(("GIT_ALTERNATE_OBJECT_DIRECTORIES",)) | _NO_OUTSIDE_CONFIG
        self._env["GIT_DIR"] = path
        # The shadow's own index, even when the caller's hook named another: it is a copy of that one.
        self._env["GIT_INDEX_FILE"] = os.path.join(path, "index")

    def command(self, args: list[str]) -> list[str]:
        return ["git", "--no-pager", *_pinned(), *args]

    @property
    def env(self) -> Mapping[str, str]:
        return self._env

    def run(self, args: list[str], stdin: bytes | None = None) -> bytes:
        try:
            proc = subprocess.run(self.command(args), input=stdin, capture_output=True, check=False,
                                  env=self._env, cwd=self.path)
        except FileNotFoundError as exc:
            raise ScanError("git is not installed") from exc
        if proc.returncode != 0:
            raise ScanError(f"git {args[0]} failed: {proc.stderr.decode('utf-8', 'replace').strip()}")
        return proc.stdout


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _copy(source: str, target: str) -> bool:
    """Copy a regular file without following a symlink at ``source``; False when it does not exist."""
    try:
        # O_NONBLOCK: a FIFO planted in its place must not hang the scan; only a regular file is read.
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ScanError(f"cannot read {source}: {exc.strerror}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ScanError(f"{source}: not a regular file")
    with os.fdopen(fd, "rb") as src, open(target, "xb") as dst:
        shutil.copyfileobj(src, dst)
    return True


@contextlib.contextmanager
def shadow(directory: str, *, index: bool = False) -> Iterator[tuple[Shadow, Located]]:
    """A shadow of the repository at ``directory`` (its index copied too when ``index``)."""
    located = locate(directory)
    packed, head = _refs(directory)
    path = tempfile.mkdtemp(prefix="broker-scan-")
    try:
        os.makedirs(os.path.join(path, "objects", "info"))
        os.makedirs(os.path.join(path, "refs"))
        _write(os.path.join(path, "objects", "info", "alternates"),
               os.fsencode(os.path.abspath(located.objects)) + b"\n")
        _write(os.path.join(path, "packed-refs"), packed)
        # An unborn HEAD stays unborn: a branch that exists nowhere.
        _write(os.path.join(path, "HEAD"),
               (head if head is not None else "ref: refs/heads/broker-scan-unborn").encode("ascii") + b"\n")
        sha256 = located.object_format == "sha256"
        _write(os.path.join(path, "config"), _SHADOW_CONFIG.format(
            version=1 if sha256 else 0,
            extensions="[extensions]\n\tobjectFormat = sha256\n" if sha256 else "").encode("ascii"))
        # A shallow clone's boundary: without it git would look for parents that were never fetched.
        _copy(located.shallow, os.path.join(path, "shallow"))
        if index:
            _copy(located.index, os.path.join(path, "index"))
        yield Shadow(path), located
    finally:
        shutil.rmtree(path, ignore_errors=True)
