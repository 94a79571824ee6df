"""Caller selectors cannot be borrowed (issue 12, item 1), against a real daemon.

The attack: a process of a granted uid connects and forks; the parent exec's the approved binary (same
pid, pidfd, uid and gid, and /proc/<pid>/exe now names the approved binary) while the child keeps the
connection and sends the requests. The daemon used to judge the process that connected by what it is
now; it now relays only bytes the connecting process wrote, and refuses a process whose executable
changed since it connected. The namespace variant: in its own user+mount namespace a process bind-mounts
another binary over the approved path, and /proc/<pid>/exe shows the approved path.

The approved binary is a copy of this interpreter with a few bytes appended (ELF ignores them): another
inode and another sha256 than the interpreter the attacker starts from. Needs root (the daemon attests
processes of other uids; the namespace test creates a throwaway user).
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from broker.testing import DaemonProcess, WorkflowSpec, config_text, running_daemon

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: throwaway users and attesting other uids")
BORROWER = os.path.join(os.path.dirname(__file__), "_borrower.py")
HANG_GUARD = 60.0
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, *sys.path])}


@pytest.fixture(scope="module")
def approved(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(path, sha256) of the approved binary, in a directory every user can reach."""
    directory = tmp_path_factory.mktemp("approved")
    os.chmod(directory, 0o755)
    path = str(directory / "approved-python")
    shutil.copy(os.path.realpath(sys.executable), path)
    with open(path, "ab") as f:
        f.write(b"\0approved build\0")
    os.chmod(path, 0o755)
    with open(path, "rb") as f:
        return path, hashlib.sha256(f.read()).hexdigest()


def _daemon(directory: str, workflows: list[WorkflowSpec], backend: str) -> Iterator[DaemonProcess]:
    os.chmod(directory, 0o755)  # the public socket's directory must be reachable by everyone
    path = os.path.join(directory, "broker.toml")
    with open(path, "w") as f:
        f.write(config_text(directory, workflows))
    env = {"BROKER_PUREPYTHON": "1"} if backend == "pure" else {}
    with running_daemon(path, os.path.join(directory, "broker.sock"), os.path.join(directory, "audit.jsonl"),
                        env=env) as d:
        if backend == "native":
            assert "native" in d.log() or "pure" not in d.log()
        yield d


@pytest.fixture(params=["native", "pure"])
def daemon(request: pytest.FixtureRequest, short_tmp: str, approved: tuple[str, str]) -> Iterator[DaemonProcess]:
    exe, digest = approved
    workflows = [
        WorkflowSpec("by-exe", callers=[{"uid": 0, "exe": exe}], tools=[{"name": "t"}]),
        WorkflowSpec("by-hash", callers=[{"uid": 0, "exe_sha256": digest}], tools=[{"name": "t"}]),
    ]
    yield from _daemon(short_tmp, workflows, request.param)


def borrower(*args: str, interpreter: str = sys.executable, **kwargs: object) -> dict[str, object]:
    """Run _borrower.py; its first output line is the result (an exec'd parent may linger: killed)."""
    proc = subprocess.Popen([interpreter, BORROWER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, start_new_session=True, **kwargs)  # type: ignore[call-overload]
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        result: dict[str, object] = json.loads(line)
        return result
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(HANG_GUARD)


WORKFLOWS = ["by-exe", "by-hash"]


@pytest.mark.parametrize("workflow", WORKFLOWS)
def test_the_approved_binary_itself_is_served(daemon: DaemonProcess, approved: tuple[str, str],
                                              workflow: str) -> None:
    """The control, and a normal client: 8 threads on one gRPC channel, every call served."""
    assert borrower("speak", daemon.socket, workflow, interpreter=approved[0]) == {"token": True, "calls": 32}


@pytest.mark.parametrize("workflow", WORKFLOWS)
def test_unapproved_binary_is_refused(daemon: DaemonProcess, workflow: str) -> None:
    assert borrower("mint", daemon.socket, workflow) == {"code": "PERMISSION_DENIED"}


def _wait_for_log(daemon: DaemonProcess, text: str) -> None:
    # The pump closes the connection first and reports it after: the client can see the close before
    # the daemon has written its line.
    deadline = time.monotonic() + HANG_GUARD
    while text not in daemon.log():
        assert time.monotonic() < deadline, daemon.log()[-2000:]
        time.sleep(0.02)


@pytest.mark.parametrize("workflow", WORKFLOWS)
def test_child_of_the_approved_binary_cannot_speak_on_its_connection(
        daemon: DaemonProcess, approved: tuple[str, str], workflow: str) -> None:
    """The approved binary connects and forks; the child's bytes never reach the server."""
    result = borrower("fork-child-speaks", daemon.socket, workflow, interpreter=approved[0])
    # The connection was closed by the pump's sender check, not refused for another reason.
    assert result == {"error": "Unavailable"}, result
    _wait_for_log(daemon, "wrote on it")


@pytest.mark.parametrize("workflow", WORKFLOWS)
def test_fork_then_exec_the_approved_binary_lends_nothing(
        daemon: DaemonProcess, approved: tuple[str, str], workflow: str) -> None:
    """The attack as found: connect, fork, the parent exec's the approved binary, the child asks."""
    result = borrower("fork-child-speaks", daemon.socket, workflow, approved[0])
    # The connection was closed by the pump's sender check, not refused for another reason.
    assert result == {"error": "Unavailable"}, result
    _wait_for_log(daemon, "wrote on it")


@pytest.mark.parametrize("workflow", WORKFLOWS)
def test_exec_after_connect_is_refused(daemon: DaemonProcess, approved: tuple[str, str], workflow: str) -> None:
    """Connect, then exec the approved binary, which asks on the inherited connection: the process is
    no longer what connected."""
    assert borrower("exec-then-speak", daemon.socket, workflow, approved[0]) == {"code": "PERMISSION_DENIED"}


def _user_interpreter(user: pwd.struct_passwd) -> tuple[str | None, str]:
    """(a Python of this version that ``user`` can run in a user+mount namespace with our packages, or
    None, and the last failure). This interpreter may live where other users cannot read (pyenv under
    /root); the system's own Python of the same minor version loads the same compiled packages."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    why = ""
    for candidate in dict.fromkeys([os.path.realpath(sys.executable), f"/usr/bin/{version}"]):
        if not os.path.exists(candidate):
            continue
        probe = subprocess.run(["unshare", "-Ur", "-m", candidate, "-c", "import broker.client"],
                               user=user.pw_uid, group=user.pw_gid, extra_groups=[], capture_output=True, text=True,
                               env=ENV, timeout=HANG_GUARD, check=False)
        if probe.returncode == 0:
            return candidate, ""
        why = f"{candidate}: {probe.stderr.strip()[-200:]}"
    return None, why


@pytest.mark.parametrize("unprivileged", [False, True], ids=["root-mount-ns", "user-mount-ns"])
def test_bind_mount_over_the_approved_path_in_a_namespace_is_refused(
        short_tmp: str, approved: tuple[str, str], throwaway_user: pwd.struct_passwd, unprivileged: bool) -> None:
    """The unprivileged variant is the attack as found (a throwaway user in its own user+mount namespace,
    with the system's interpreter); the root one runs the same check with this interpreter."""
    exe, source = approved[0], os.path.realpath(sys.executable)
    if unprivileged:
        interpreter, why = _user_interpreter(throwaway_user)
        if interpreter is None:
            pytest.skip(f"no Python of this version that a throwaway user can run in a user+mount namespace: {why}")
        # The approved binary for this user: a copy of that interpreter, again with a few bytes appended.
        os.chmod(short_tmp, 0o755)  # reachable by that user, unlike pytest's own temporary directories
        exe = os.path.join(short_tmp, "approved-user-python")
        shutil.copy(interpreter, exe)
        with open(exe, "ab") as f:
            f.write(b"\0approved build\0")
        os.chmod(exe, 0o755)
        source = interpreter
    uid = throwaway_user.pw_uid if unprivileged else 0
    as_user: dict[str, object] = (
        {"user": uid, "group": throwaway_user.pw_gid, "extra_groups": []} if unprivileged else {})
    workflows = [WorkflowSpec("by-exe", callers=[{"uid": uid, "exe": exe}], tools=[{"name": "t"}])]
    for d in _daemon(short_tmp, workflows, "native"):
        # The control: the approved binary itself, as that user, is served.
        assert borrower("mint", d.socket, "by-exe", interpreter=exe, **as_user) == {"token": True}
        # Another interpreter, bind-mounted over the approved path in the caller's own mount namespace,
        # is not, though /proc/<pid>/exe names the approved path.
        script = f"mount --bind {source} {exe} && exec {exe} {BORROWER} mint {d.socket} by-exe"
        unshare = ["unshare", "-Ur", "-m"] if unprivileged else ["unshare", "-m", "--propagation", "private"]
        proc = subprocess.run([*unshare, "sh", "-c", script], capture_output=True, text=True,
                              env=ENV, timeout=HANG_GUARD, check=True, **as_user)  # type: ignore[call-overload]
        assert json.loads(proc.stdout) == {"code": "PERMISSION_DENIED"}, proc.stderr
