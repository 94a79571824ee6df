"""Identity comes from the kernel: a real second uid is refused what root may have, and cannot reach the
internal gRPC socket at all. Needs root to create a throwaway system user."""

from __future__ import annotations

import json
import os
import pwd
import socket
import subprocess
import sys
import time

import pytest

from broker.client import Client
from broker.errors import PermissionDenied
from broker.testing import WorkflowSpec, config_text, running_daemon

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a throwaway user (useradd)")
HELPER = os.path.join(os.path.dirname(__file__), "_as_user.py")


def as_user(user: pwd.struct_passwd, *args: str, stdin: str = "") -> dict[str, object]:
    r = subprocess.run([sys.executable, HELPER, str(user.pw_uid), str(user.pw_gid), *args],
                       capture_output=True, text=True, timeout=30, input=stdin,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 0, r.stderr
    result: dict[str, object] = json.loads(r.stdout)
    assert result["uid"] == user.pw_uid
    return result


def test_second_uid_is_denied_and_locked_out_of_the_internal_socket(
        short_tmp: str, throwaway_user: pwd.struct_passwd) -> None:
    os.chmod(short_tmp, 0o755)  # the public socket's directory must be reachable by everyone
    workflows = [
        WorkflowSpec("root-only", callers=[{"uid": 0}], tools=[{"name": "read_ticket"}]),
        WorkflowSpec("agent", callers=[{"user": throwaway_user.pw_name}], tools=[{"name": "read_ticket"}]),
    ]
    path = os.path.join(short_tmp, "broker.toml")
    with open(path, "w") as f:
        f.write(config_text(short_tmp, workflows))
    sock = os.path.join(short_tmp, "broker.sock")
    with running_daemon(path, sock, os.path.join(short_tmp, "audit.jsonl")) as d:
        # root may mint for root-only; the second uid may not, whatever it asks for.
        with Client(sock) as c:
            root_token = c.mint("root-only", "read_ticket").token
            with pytest.raises(PermissionDenied):
                c.mint("agent", "read_ticket")
        refused = as_user(throwaway_user, "mint", sock, "root-only", "read_ticket")
        assert refused["code"] == "PERMISSION_DENIED"
        # A non-member is told where to look, never why: not even that the workflow exists.
        assert str(refused["message"]).startswith("permission denied (request ")
        # ... and the selector "user" really resolves the kernel-reported uid.
        assert as_user(throwaway_user, "mint", sock, "agent", "read_ticket")["token"] is True
        # A non-dumpable process looks root-owned in /proc; it must still be seen as the second uid.
        assert as_user(throwaway_user, "mint-nondumpable", sock, "agent", "read_ticket")["token"] is True
        assert as_user(throwaway_user, "mint-nondumpable", sock, "root-only", "read_ticket")["code"] == \
            "PERMISSION_DENIED"
        denied = [json.loads(x) for x in open(d.audit_log).read().splitlines() if '"deny"' in x]
        assert any(x["uid"] == throwaway_user.pw_uid and x["workflow"] == "root-only" for x in denied)
        internal_dir = next(n for n in os.listdir(short_tmp) if n.startswith(".broker-internal-"))
        internal = os.path.join(short_tmp, internal_dir, "grpc.sock")
        assert os.path.exists(internal)
        result = as_user(throwaway_user, "connect", internal)
        assert result["connected"] is False and result["errno"] == 13  # EACCES
        assert as_user(throwaway_user, "connect", sock)["connected"] is True
        # Holding someone else's token is not enough to revoke it: the caller must match its workflow.
        assert as_user(throwaway_user, "revoke", sock, stdin=root_token + "\n")["revoked"] == 0
        with Client(sock) as c:
            assert c.verify(root_token, "read_ticket")["wf"] == "root-only"


def test_one_uid_cannot_take_every_connection(short_tmp: str, throwaway_user: pwd.struct_passwd) -> None:
    os.chmod(short_tmp, 0o755)
    path = os.path.join(short_tmp, "broker.toml")
    with open(path, "w") as f:
        f.write(config_text(short_tmp, [WorkflowSpec("agent", callers=[{"user": throwaway_user.pw_name}],
                                                     tools=[{"name": "t"}])], max_connections_per_uid=2))
    sock = os.path.join(short_tmp, "broker.sock")
    with running_daemon(path, sock, os.path.join(short_tmp, "audit.jsonl")) as d:
        time.sleep(0.3)  # let the readiness probe's connection close
        held = []
        for _ in range(3):
            s = socket.socket(socket.AF_UNIX)
            s.connect(sock)
            held.append(s)
        held[2].settimeout(5)
        assert held[2].recv(1) == b""  # root's third connection: refused by the per-uid cap
        # ... while another local user still gets served.
        assert as_user(throwaway_user, "mint", sock, "agent", "t")["token"] is True
        assert "uid 0 already holds 2 connections" in d.log()
        for s in held:
            s.close()


def test_whoami_and_admin_denials_for_a_second_uid(short_tmp: str, throwaway_user: pwd.struct_passwd) -> None:
    os.chmod(short_tmp, 0o755)
    workflows = [
        WorkflowSpec("root-only", callers=[{"uid": 0}], tools=[{"name": "t"}]),
        WorkflowSpec("agent", callers=[{"user": throwaway_user.pw_name}], tools=[{"name": "t"}]),
    ]
    path = os.path.join(short_tmp, "broker.toml")
    with open(path, "w") as f:
        f.write(config_text(short_tmp, workflows))
    sock = os.path.join(short_tmp, "broker.sock")
    with running_daemon(path, sock, os.path.join(short_tmp, "audit.jsonl")) as d, Client(sock) as c:
        # Not an admin (root or the daemon's uid): refused, and the audit line says who asked.
        refused = as_user(throwaway_user, "status", sock)
        assert refused["code"] == "PERMISSION_DENIED"
        denied = [json.loads(x) for x in open(d.audit_log) if '"rpc":"Status"' in x]
        assert denied and denied[-1]["uid"] == throwaway_user.pw_uid and denied[-1]["pid"] > 0
        assert refused["message"] == f"permission denied (request {denied[-1]['request_id']})"
        me = as_user(throwaway_user, "whoami", sock)["whoami"]
        assert isinstance(me, dict)
        # The kernel's view of the connecting process: the dropped uid, its own name, only its workflow.
        assert (me["uid"], me["gid"], me["user"]) == (throwaway_user.pw_uid, throwaway_user.pw_gid,
                                                      throwaway_user.pw_name)
        assert me["workflows"] == ["agent"] and me["exe"] == os.path.realpath(sys.executable)
        # Root asking gets root's view: the RPC takes no argument that could name another process or uid.
        mine = c.whoami()
        assert mine["uid"] == 0 and mine["workflows"] == ["root-only"]
