"""A repository built to run commands during a scan: no vector may run, in any of the three modes.

CI scans pull requests from strangers, so the repository's ``.git/config`` (and what it includes),
``.git/info/attributes``, ``.gitattributes`` and hooks are the attacker's. Each vector below points a
setting at a script that leaves a marker file; the scanner runs as a real subprocess in the plain,
``--staged`` and ``--history`` modes, and must leave no marker while still finding the planted secrets.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from broker.scan import fakes
from tests.scan.conftest import git, run_scan

_RNG = random.Random(4711)
WORKTREE_SECRET = fakes.GENERATORS["github-pat"](_RNG)
STAGED_SECRET = fakes.GENERATORS["npm-token"](_RNG)
HISTORY_SECRET = fakes.GENERATORS["huggingface-token"](_RNG)
MERGE_SECRET = fakes.GENERATORS["stripe-secret-key"](_RNG)
HOOKS = ("applypatch-msg", "pre-applypatch", "post-applypatch", "pre-commit", "pre-merge-commit",
         "prepare-commit-msg", "commit-msg", "post-commit", "pre-rebase", "post-checkout", "post-merge",
         "pre-push", "pre-receive", "update", "proc-receive", "post-receive", "post-update",
         "reference-transaction", "push-to-checkout", "pre-auto-gc", "post-rewrite", "sendemail-validate",
         "fsmonitor-watchman", "p4-changelist", "p4-prepare-changelist", "p4-post-changelist", "p4-pre-submit",
         "post-index-change")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean repository: a conflicting merge resolved by hand, a secret in history, one staged."""
    repo = tmp_path_factory.mktemp("base") / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "a.txt").write_text("one\n")
    (repo / "old.env").write_text(f"HF={HISTORY_SECRET}\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "base")
    git(repo, "rm", "-q", "old.env")  # removed again: only --history can see it
    git(repo, "commit", "-qm", "drop")
    git(repo, "checkout", "-qb", "side")
    (repo / "a.txt").write_text("side\n")
    git(repo, "commit", "-qam", "side")
    git(repo, "checkout", "-q", "main")
    (repo / "a.txt").write_text("main\n")
    git(repo, "commit", "-qam", "main")
    # Both sides changed a.txt: re-merging this merge (--history) runs a 3-way content merge.
    git(repo, "merge", "-q", "-s", "ours", "--no-edit", "side")
    (repo / "a.txt").write_text(f"main\nstripe = '{MERGE_SECRET}'\n")
    git(repo, "commit", "-q", "--amend", "-a", "--no-edit")
    # A commit that carries a signature: showing it with log.showSignature runs gpg.program.
    head = git(repo, "cat-file", "commit", "HEAD")
    header, _, message = head.partition("\n\n")
    signed = (header + "\ngpgsig -----BEGIN PGP SIGNATURE-----\n \n iQEzBAABCAAdFiEE\n"
              " -----END PGP SIGNATURE-----\n\n" + message)
    oid = git(repo, "hash-object", "-t", "commit", "-w", "--stdin", input_text=signed).strip()
    git(repo, "update-ref", "refs/heads/signed", oid)
    (repo / "app.py").write_text(f'GH = "{WORKTREE_SECRET}"\n')
    (repo / "a.txt").write_text("main\nstaged change\n")
    (repo / "new.env").write_text(f"NPM={STAGED_SECRET}\n")
    git(repo, "add", ".")
    return repo


def _script(path: Path, marker: Path) -> str:
    path.write_text(f"#!/bin/sh\ntouch '{marker}'\nexit 0\n")
    path.chmod(0o755)
    return str(path)


def _attributes(repo: Path, line: str) -> None:
    (repo / ".gitattributes").write_text(line + "\n")
    (repo / ".git" / "info").mkdir(exist_ok=True)
    (repo / ".git" / "info" / "attributes").write_text(line + "\n")


def _config(repo: Path, **settings: str) -> None:
    for key, value in settings.items():
        git(repo, "config", "--add", key.replace("__", "."), value)


def _missing_object(repo: Path) -> None:
    """A commit whose blob is absent, as in a partial clone: reading it would need a fetch."""
    oid = git(repo, "hash-object", "-w", "--stdin", input_text="fetched lazily\n").strip()
    git(repo, "update-index", "--add", "--cacheinfo", f"100644,{oid},lazy.txt")
    tree = git(repo, "write-tree").strip()
    commit = git(repo, "commit-tree", tree, "-p", "HEAD", "-m", "lazy").strip()
    git(repo, "update-ref", "refs/heads/lazy", commit)
    (repo / ".git" / "objects" / oid[:2] / oid[2:]).unlink()
    git(repo, "config", "core.repositoryformatversion", "1")
    git(repo, "config", "extensions.partialClone", "origin")
    git(repo, "config", "remote.origin.promisor", "true")
    git(repo, "config", "remote.origin.partialclonefilter", "blob:none")


def _merge_driver(repo: Path, cmd: str) -> None:
    _config(repo, merge__evil__driver=cmd, merge__evil__name="evil", merge__default=cmd)
    _attributes(repo, "* merge=evil")


def _filter(repo: Path, cmd: str) -> None:
    _config(repo, filter__evil__process=cmd, filter__evil__clean=cmd, filter__evil__smudge=cmd,
            filter__evil__required="true", merge__renormalize="true")
    _attributes(repo, "* filter=evil")


def _lazy_fetch_ext(repo: Path, cmd: str) -> None:
    _missing_object(repo)
    _config(repo, remote__origin__url=f"ext::{cmd} %S", protocol__ext__allow="always",
            protocol__allow="always")


def _lazy_fetch_ssh(repo: Path, cmd: str) -> None:
    _missing_object(repo)
    _config(repo, remote__origin__url="ssh://attacker.invalid/repo", core__sshCommand=cmd)


def _fsmonitor(repo: Path, cmd: str) -> None:
    _config(repo, core__fsmonitor=cmd, core__fsmonitorHookVersion="1")


def _textconv(repo: Path, cmd: str) -> None:
    _config(repo, diff__evil__textconv=cmd, diff__evil__cachetextconv="false")
    _attributes(repo, "* diff=evil")


def _diff_driver(repo: Path, cmd: str) -> None:
    _config(repo, diff__evil__command=cmd, diff__external=cmd)
    _attributes(repo, "* diff=evil")


def _pager(repo: Path, cmd: str) -> None:
    _config(repo, core__pager=cmd, pager__log=cmd, pager__diff=cmd, pager__show=cmd)


def _gpg(repo: Path, cmd: str) -> None:
    _config(repo, gpg__program=cmd, gpg__openpgp__program=cmd, gpg__ssh__program=cmd, gpg__x509__program=cmd,
            log__showSignature="true")


def _include(repo: Path, cmd: str) -> None:
    # Everything executing, from files the repository's config includes (plainly and conditionally).
    included = repo.parent / "included.gitconfig"
    included.write_text(f"[core]\n\tfsmonitor = {cmd}\n\tpager = {cmd}\n[diff]\n\texternal = {cmd}\n"
                        f"[diff \"evil\"]\n\ttextconv = {cmd}\n[merge \"evil\"]\n\tdriver = {cmd}\n"
                        f"[log]\n\tshowSignature = true\n[gpg]\n\tprogram = {cmd}\n")
    _config(repo, include__path=str(included), **{"includeIf__gitdir:/__path": str(included)})
    _attributes(repo, "* diff=evil merge=evil")


def _hooks(repo: Path, cmd: str) -> None:
    hooks = repo.parent / "evil-hooks"
    hooks.mkdir()
    for name in HOOKS:
        shutil.copy(cmd, hooks / name)
        shutil.copy(cmd, repo / ".git" / "hooks" / name)
    _config(repo, core__hooksPath=str(hooks))


def _credentials(repo: Path, cmd: str) -> None:
    _config(repo, core__askPass=cmd, credential__helper=f"!{cmd}", core__alternateRefsCommand=cmd,
            core__editor=cmd, sequence__editor=cmd, uploadpack__packObjectsHook=cmd)


VECTORS: dict[str, Callable[[Path, str], None]] = {
    "merge-driver": _merge_driver, "filter-process": _filter, "lazy-fetch-ext": _lazy_fetch_ext,
    "lazy-fetch-ssh-command": _lazy_fetch_ssh, "fsmonitor": _fsmonitor, "textconv": _textconv,
    "diff-driver": _diff_driver, "pager": _pager, "gpg": _gpg, "include-path": _include, "hooks": _hooks,
    "askpass-credential-helper": _credentials,
}
MODES = {
    "plain": ((), {("app.py", "github-pat")}),
    "staged": (("--staged",), {("new.env", "npm-token")}),
    "history": (("--history",), {("old.env", "huggingface-token"), ("a.txt", "stripe-secret-key")}),
}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("vector", sorted(VECTORS))
def test_a_hostile_repository_runs_nothing(base: Path, tmp_path: Path, vector: str, mode: str) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(base, repo, symlinks=True)
    marker = tmp_path / "ran"
    VECTORS[vector](repo, _script(tmp_path / "evil.sh", marker))
    flags, expected = MODES[mode]
    result = run_scan(*flags, "--format", "json", cwd=repo)
    assert not marker.exists(), f"{vector} ran a command in {mode} mode"
    if vector.startswith("lazy-fetch") and mode != "plain":
        # An object a partial clone lacks is an error, never a fetch: the scan fails closed.
        assert result.code == 2, result.err
        assert "lazy.txt" in result.err or "unable to read" in result.err or "fatal" in result.err, result.err
        return
    assert result.code == 1, result.err
    found = {(f["path"], f["rule"]) for f in result.json()["findings"]}
    assert expected <= found


def test_the_scan_leaves_the_repository_as_it_was(base: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(base, repo, symlinks=True)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    before = {p: p.read_bytes() for p in (repo / ".git").rglob("*") if p.is_file()}
    for flags, _ in MODES.values():
        assert run_scan(*flags, cwd=repo, env_extra={"TMPDIR": str(scratch)}).code == 1
    assert {p: p.read_bytes() for p in (repo / ".git").rglob("*") if p.is_file()} == before
    assert not list(scratch.iterdir())  # every shadow was removed


def test_a_work_tree_moved_elsewhere_does_not_blind_the_plain_scan(base: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(base, repo, symlinks=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    git(repo, "config", "core.worktree", str(elsewhere))
    result = run_scan("--format", "json", cwd=repo)
    assert result.code == 1, result.err
    assert ("app.py", "github-pat") in {(f["path"], f["rule"]) for f in result.json()["findings"]}


def test_the_file_list_never_leads_outside_the_work_tree(tmp_path: Path) -> None:
    # The index names d/notes.txt; the work tree's d is now a symlink to a directory outside it. Reading
    # d/notes.txt would put another directory's content (here a secret) into the report.
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "d").mkdir()
    (repo / "d" / "notes.txt").write_text("nothing here\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "notes")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "notes.txt").write_text(f"token = '{WORKTREE_SECRET}'\n")
    shutil.rmtree(repo / "d")
    (repo / "d").symlink_to(outside)
    result = run_scan("--format", "json", ".", cwd=repo)
    assert result.code == 0, (result.out, result.err)
    assert WORKTREE_SECRET not in result.out
