"""`broker whoami` and refusals as a caller meets them, through a real daemon: what the daemon sees of the
calling process, and what a refused caller is told (its own mistakes; never another's secrets)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys

import pytest

from broker.client import AsyncClient, Client
from broker.errors import PermissionDenied, Refused
from broker.testing import DaemonProcess, WorkflowSpec, config_text, running_daemon
from tests.conftest import EXE


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "broker", *args], capture_output=True, text=True, timeout=60)


def audit_lines(d: DaemonProcess) -> list[dict[str, object]]:
    with open(d.audit_log) as f:
        return [json.loads(line) for line in f]


def test_whoami_shows_the_callers_own_selectors_and_matching_workflows(daemon: DaemonProcess) -> None:
    r = cli("whoami", "--json", "--socket", daemon.socket)
    assert r.returncode == 0, r.stderr
    me = json.loads(r.stdout)
    # The CLI runs as the Python interpreter: that, not a script's path, is the exe a caller block needs.
    assert (me["uid"], me["gid"], me["exe"]) == (os.geteuid(), os.getegid(), EXE)
    assert me["pid"] > 0 and me["pid"] != os.getpid()  # the CLI's process, not this test's
    assert me["workflows"] == ["support-summarize"]  # "billing" is for another uid: not named
    assert me["exe_sha256"] == ""  # no rule hashes: the daemon does not read the binary for nothing
    text = cli("whoami", "--socket", daemon.socket).stdout
    assert f"exe: {EXE}" in text and "workflows it matches: support-summarize" in text


def test_whoami_hashes_the_exe_when_rules_use_hashes(short_tmp: str) -> None:
    with open(EXE, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    cfg = os.path.join(short_tmp, "broker.toml")
    with open(cfg, "w") as f:
        f.write(config_text(short_tmp, [
            WorkflowSpec("pinned", callers=[{"exe_sha256": digest}], tools=[{"name": "t"}]),
            WorkflowSpec("other", callers=[{"exe_sha256": "0" * 64}], tools=[{"name": "t"}])]))
    with running_daemon(cfg, os.path.join(short_tmp, "broker.sock"), os.path.join(short_tmp, "audit.jsonl")) as d, \
            Client(d.socket) as c:
        me = c.whoami()
    assert me["exe_sha256"] == digest and me["workflows"] == ["pinned"]


def test_a_callers_own_mistake_is_explained_with_the_request_id(daemon: DaemonProcess) -> None:
    r = cli("token", "--workflow", "support-summarize", "--tool", "read_ticket", "--ttl", "5m",
            "--socket", daemon.socket)
    assert r.returncode == 1
    first = r.stderr.splitlines()[0]
    # A member of the workflow asking above the tool's ttl learns why: it could read the ttl anyway.
    assert first.startswith("broker token: permission denied: ttl 300s exceeds the tool's ttl 120s (request "), first
    rid = first.rsplit("(request ", 1)[1].rstrip(")")
    line = next(x for x in audit_lines(daemon) if x.get("request_id") == rid)
    assert line["event"] == "deny" and line["reason"] == "ttl 300s exceeds the tool's ttl 120s"
    with Client(daemon.socket) as c, pytest.raises(Refused) as exc:
        c.mint("support-summarize", "no_such_tool")
    assert str(exc.value).startswith("permission denied: tool 'no_such_tool' is not granted to workflow")
    assert exc.value.request_id and isinstance(exc.value, PermissionDenied)


def test_a_non_member_learns_nothing_but_where_to_look(daemon: DaemonProcess) -> None:
    with Client(daemon.socket) as c:
        texts = []
        for workflow in ("billing", "no-such-workflow"):
            with pytest.raises(Refused) as exc:
                c.mint(workflow, "charge")
            texts.append(str(exc.value).replace(exc.value.request_id, "ID"))
            reason = next(x for x in audit_lines(daemon) if x.get("request_id") == exc.value.request_id)["reason"]
            assert reason and str(reason) not in str(exc.value)
    # Whether a workflow exists or the caller does not match it: the same answer.
    assert texts == ["permission denied (request ID)"] * 2
    r = cli("token", "--workflow", "billing", "--tool", "charge", "--socket", daemon.socket)
    assert r.returncode == 1 and "audit log has the full reason" in r.stderr and "broker whoami" in r.stderr


def test_a_verify_denial_names_who_presented_the_token(daemon: DaemonProcess) -> None:
    with Client(daemon.socket) as c:
        token = c.mint("support-summarize", "read_ticket").token
        with pytest.raises(Exception, match="invalid token"):
            c.verify(token, "send_email")
    line = [x for x in audit_lines(daemon) if x["event"] == "verify"][-1]
    assert line["decision"] == "deny" and line["reason"] == "wrong tool"
    assert line["uid"] == os.geteuid() and line["exe"] == EXE and isinstance(line["pid"], int)


def test_the_async_client_gets_the_request_id_too(daemon: DaemonProcess) -> None:
    async def main() -> Refused:
        async with AsyncClient(daemon.socket) as c:
            with pytest.raises(Refused) as exc:
                await c.mint("billing", "charge")
            return exc.value

    refused = asyncio.run(main())
    assert refused.request_id and str(refused) == f"permission denied (request {refused.request_id})"
