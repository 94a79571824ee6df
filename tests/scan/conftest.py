"""Shared helpers: the scanner run as a real subprocess, fake secrets made at run time, git repos."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from broker.scan import fakes


class Result:
    def __init__(self, proc: subprocess.CompletedProcess[str]) -> None:
        self.code = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr

    def json(self) -> Any:
        return json.loads(self.out)


def run_scan(*args: str, cwd: Path, stdin: str | None = None, env_extra: dict[str, str] | None = None) -> Result:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")} | (env_extra or {})
    proc = subprocess.run(
        [sys.executable, "-m", "broker.scan", *args],
        cwd=cwd, input=stdin, capture_output=True, text=True, env=env, timeout=120,
    )
    return Result(proc)


def git(repo: Path, *args: str, input_text: str | None = None) -> str:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("GIT_")},
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid",
        "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1",
    }
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env, input=input_text).stdout


@pytest.fixture
def rng() -> random.Random:
    return random.Random(1234)


@pytest.fixture
def token(rng: random.Random) -> Callable[[str], str]:
    """A fresh fake value for a rule id."""
    return lambda rule: fakes.GENERATORS[rule](rng)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    return path
