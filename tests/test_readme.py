"""The README's per-user setup works as written: its shell block makes a config a normal user can serve
(no root paths), whose caller block matches a Python client run from the venv."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import tempfile

import pytest

from broker.testing import running_daemon

ROOT = pathlib.Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
MARKER = "<!-- per-user setup: tests/test_readme.py runs this block -->"


def _setup_block() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(re.escape(MARKER) + r"\n```sh\n(.*?)\n```", text, re.S)
    assert match, "the per-user setup block is missing from README.md"
    return match.group(1)


@pytest.mark.skipif(not VENV_PYTHON.exists(), reason="the README's recipe names the checkout's .venv")
def test_the_per_user_setup_in_the_readme_works(short_tmp: str) -> None:
    with tempfile.TemporaryDirectory(prefix="brk-home-") as home:
        env = {**os.environ, "HOME": home, "XDG_RUNTIME_DIR": short_tmp}
        subprocess.run(["bash", "-euo", "pipefail", "-c", _setup_block()], cwd=ROOT, env=env, check=True, timeout=30)
        cfg = os.path.join(home, ".config", "broker", "broker.toml")
        text = open(cfg).read()
        assert "/run/broker" not in text and "/var/log" not in text  # nothing that needs root
        check = subprocess.run([str(VENV_PYTHON), "-m", "broker", "config", "check", cfg], env=env,
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0 and check.stderr == "", check.stderr  # valid, and not even a warning
        sock = os.path.join(short_tmp, "broker", "broker.sock")
        with running_daemon(cfg, sock, os.path.join(home, ".local", "state", "broker", "audit.jsonl")):
            cli_env = {**env, "BROKER_SOCKET": sock}
            me = subprocess.run([str(VENV_PYTHON), "-m", "broker", "whoami", "--json"], env=cli_env,
                                capture_output=True, text=True, timeout=60)
            assert me.returncode == 0, me.stderr
            assert json.loads(me.stdout)["workflows"] == ["my-agent"]
            token = subprocess.run([str(VENV_PYTHON), "-m", "broker", "token", "--workflow", "my-agent", "--tool",
                                    "crm"], env=cli_env, capture_output=True, text=True, timeout=60)
            assert token.returncode == 0 and token.stdout.count(".") == 2, token.stderr


def test_the_audit_section_lists_every_event_the_code_writes() -> None:
    written = set()
    for path in (ROOT / "broker").rglob("*.py"):
        written |= set(re.findall(r'audit\.record\(\s*"([a-z_]+)"', path.read_text()))
    section = (ROOT / "README.md").read_text().split("## Audit log", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", section, re.M))
    assert written and documented == written


def test_the_grpc_section_lists_every_rpc_of_the_broker_service() -> None:
    from broker.v1 import broker_pb2

    rpcs = set(broker_pb2.DESCRIPTOR.services_by_name["Broker"].methods_by_name)
    section = (ROOT / "README.md").read_text().split("## gRPC surface", 1)[1].split("\n## ", 1)[0]
    assert {r for r in rpcs if f"`{r}`" not in section} == set()
