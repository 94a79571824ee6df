"""Git sources: the staged diff (pre-commit) and every commit's added lines (history audits), merges included.

Only added lines are scanned: a secret that a commit removes is reported for the commit that added
it. Each (commit, file) becomes one :class:`Document` whose ``line_map`` points back at real line
numbers. Git runs in a shadow of the repository (:mod:`broker.scan.gitsafe`), so nothing the
repository configures can run a command or rewrite what the scanner sees.
"""

from __future__ import annotations

import functools
import re
import subprocess
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Final

from broker.scan.document import Document
from broker.scan.errors import ScanError, UsageError
from broker.scan.gitsafe import Shadow, resolve_commit, shadow

# --text: a repository's .gitattributes (or core.bigFileThreshold) can declare any file binary, and git
# then prints no lines for it; binaries are recognised here instead (a NUL byte), as in the tree walk.
# --no-renames: a file moved out of an allowlisted path shows its lines as added, not as a rename.
_DIFF_OPTIONS: Final = ["-U0", "--text", "--no-renames", "--no-color", "--no-ext-diff", "--no-textconv",
                        "--src-prefix=a/", "--dst-prefix=b/", "--diff-filter=ACMT"]
_HUNK: Final = re.compile(rb"^@@ -\d+(?:,\d+)? \+(\d+)(?:,(\d+))? @@")
_COMMIT_MARK: Final = b"\x00commit "
_REMERGE_SINCE: Final = (2, 36)
_ESCAPES: Final = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
                   '"': '"', "\\": "\\"}


def _unquote(raw: bytes) -> str:
    """A path as git prints it: C-quoted (with octal escapes for raw bytes) when it is unusual."""
    text = raw.decode("utf-8", "surrogateescape")
    if not (text.startswith('"') and text.endswith('"')):
        return text
    out = bytearray()
    body, i = text[1:-1], 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            octal = body[i + 1:i + 4]
            if len(octal) == 3 and all(c in "01234567" for c in octal):
                out.append(int(octal, 8))
                i += 4
                continue
            out += _ESCAPES.get(nxt, nxt).encode("utf-8", "surrogateescape")
            i += 2
            continue
        out += ch.encode("utf-8", "surrogateescape")
        i += 1
    return out.decode("utf-8", "replace")


def parse_patch(lines: Iterable[bytes]) -> Iterator[Document]:
    """Documents of added lines from ``git diff -U0`` or ``git log -p -U0`` output."""
    commit: str | None = None
    path: str | None = None
    added: list[str] = []
    numbers: list[int] = []
    remaining, line_no = 0, 0

    def flush() -> Document | None:
        if path is None or not added:
            return None
        text = "\n".join(added)
        if "\x00" in text:
            return None  # a binary file (git prints it as text under --text); the tree walk skips these too
        return Document(path, text, tuple(numbers), commit)

    for raw in lines:
        line = raw.rstrip(b"\n")
        if remaining > 0:
            # Inside a hunk the count from its header says exactly how many new-side lines follow ("+"
            # added, " " context), so a content line that itself starts with "+++ " or "diff --git" is
            # never mistaken for a header.
            if line.startswith(b"+"):
                added.append(line[1:].rstrip(b"\r").decode("utf-8", "replace"))
                numbers.append(line_no)
                line_no += 1
                remaining -= 1
            elif line.startswith(b" "):
                line_no += 1
                remaining -= 1
            continue
        if line.startswith(_COMMIT_MARK) or line.startswith(b"diff --git "):
            doc = flush()
            if doc is not None:
                yield doc
            added, numbers, path = [], [], None
            if line.startswith(_COMMIT_MARK):
                commit = line[len(_COMMIT_MARK):].decode("ascii", "replace").strip()
        elif line.startswith(b"+++ "):
            # Git ends the name with a tab when it contains a space; a name with a real tab is quoted.
            target = line[4:].removesuffix(b"\t")
            path = None if target == b"/dev/null" else _unquote(target).removeprefix("b/")
        elif line.startswith(b"@@ "):
            hunk = _HUNK.match(line)
            if hunk is not None:
                line_no = int(hunk.group(1))
                remaining = int(hunk.group(2)) if hunk.group(2) is not None else 1
    doc = flush()
    if doc is not None:
        yield doc


def _stream(repo: Shadow, args: list[str]) -> Iterator[Document]:
    try:
        proc = subprocess.Popen(repo.command(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, env=repo.env, cwd=repo.path)
    except FileNotFoundError as exc:
        raise ScanError("git is not installed") from exc
    assert proc.stdout is not None and proc.stderr is not None
    try:
        yield from parse_patch(proc.stdout)
    finally:
        proc.stdout.close()
        err = proc.stderr.read()
        proc.stderr.close()
        code = proc.wait()
    if code != 0:
        raise ScanError(f"git {args[0]} failed: {err.decode('utf-8', 'replace').strip()}")


def _too_large(repo: Shadow, max_size: int) -> list[str]:
    """Staged files larger than ``max_size``, found from the blob sizes before any blob is read."""
    raw = repo.run(["diff", "--cached", "--raw", "-z", "--no-abbrev", "--no-renames", "--diff-filter=ACMT"])
    fields = raw.split(b"\0")
    staged_blobs: list[tuple[str, str]] = []
    for meta, raw_path in zip(fields[0::2], fields[1::2], strict=False):
        parts = meta.split()
        if len(parts) >= 4:
            staged_blobs.append((parts[3].decode("ascii"), raw_path.decode("utf-8", "surrogateescape")))
    if not staged_blobs:
        return []
    answers = repo.run(["cat-file", "--batch-check=%(objectsize)"],
                       stdin=b"".join(oid.encode("ascii") + b"\n" for oid, _ in staged_blobs)).splitlines()
    if len(answers) != len(staged_blobs):
        raise ScanError("git cat-file: unexpected answer")
    large: list[str] = []
    for (_, path), answer in zip(staged_blobs, answers, strict=True):
        if not answer.isdigit():
            # A partial clone lacks it: the shadow cannot fetch, and scanning around it would miss it.
            raise ScanError(f"{path}: the staged content is not in the repository (fetch it first)")
        if int(answer) > max_size:
            large.append(path)
    return large


def staged(directory: str, max_size: int, skipped: Counter[str]) -> Iterator[Document]:
    """Added lines of what is staged for the next commit; files above ``max_size`` are counted in ``skipped``."""
    with shadow(directory, index=True) as (repo, located):
        if located.top is None:
            raise UsageError(f"{directory}: --staged needs a work tree")
        large = _too_large(repo, max_size)
        if large:
            skipped["too-large"] += len(large)
        # Excluded by pathspec, so git never reads those blobs: a 200 MB file costs nothing.
        excluded = [f":(exclude,literal,top){path}" for path in large]
        yield from _stream(repo, ["diff", "--cached", *_DIFF_OPTIONS, "--", *excluded])


@functools.cache
def remerge_supported() -> bool:
    """Whether git can show a merge commit's own changes (``--diff-merges=remerge``, git 2.36+)."""
    try:
        out = subprocess.run(["git", "--version"], capture_output=True, check=False).stdout
    except FileNotFoundError as exc:
        raise ScanError("git is not installed") from exc
    found = re.search(rb"(\d+)\.(\d+)", out)
    return found is not None and (int(found.group(1)), int(found.group(2))) >= _REMERGE_SINCE


def history(directory: str, since: str | None) -> Iterator[Document]:
    """Added lines of every commit (all refs), or of the commits after ``since`` up to HEAD.

    A merge commit contributes what its author changed by hand: the difference between git's own
    re-merge of its parents (conflict markers included) and the commit, so a secret typed into a
    conflict resolution or slipped into a clean merge is found, while the lines the merged branches
    brought are not reported twice. Needs git 2.36+; older git skips merges (the CLI says so). The
    re-merge runs in the shadow, where no merge driver or filter of the repository exists.
    """
    if since is not None and (since.startswith("-") or not since):
        raise UsageError(f"--since {since!r}: not a revision")
    with shadow(directory) as (repo, _):
        # Revisions are resolved in the repository (reflogs, upstreams) and handed over as commit ids.
        revisions = [f"{resolve_commit(directory, since)}..HEAD"] if since is not None else ["--all"]
        merges = ["--diff-merges=remerge"] if remerge_supported() else []
        yield from _stream(repo, [
            "log", "-p", *merges, *_DIFF_OPTIONS, "--format=format:%x00commit %H", *revisions, "--",
        ])
