"""`broker exec` with real processes: a real daemon, a real sidecar, a real child."""

from __future__ import annotations

import json
import os
import resource
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest

from broker.client import Client, TokenVerifier
from broker.errors import InvalidToken
from broker.sidecar.credfiles import CredentialDir
from broker.testing import DaemonProcess, WorkflowSpec, config_text, running_daemon

CHILD = os.path.join(os.path.dirname(__file__), "_agent_child.py")
ME = {"uid": os.geteuid()}


def start_daemon(d: str, tools: list[dict[str, object]]) -> tuple[str, str]:
    cfg = os.path.join(d, "broker.toml")
    with open(cfg, "w") as f:
        f.write(config_text(d, [WorkflowSpec("agent", callers=[ME], tools=tools),
                                WorkflowSpec("other", callers=[{"uid": 4000000}], tools=[{"name": "x"}])]))
    return cfg, os.path.join(d, "broker.sock")


@pytest.fixture
def exec_daemon(short_tmp: str) -> Iterator[DaemonProcess]:
    cfg, sock = start_daemon(short_tmp, [
        {"name": "crm", "file": "crm.token", "ttl": "8s"},
        {"name": "mail", "env": "MAIL_TOKEN", "ttl": "8s"},
        {"name": "plain", "ttl": "1m"},
    ])
    with running_daemon(cfg, sock, os.path.join(short_tmp, "audit.jsonl")) as d:
        yield d


def sidecar(sock: str, *args: str, child: tuple[str, ...]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "broker", "exec", "--socket", sock, *args, "--",
                             sys.executable, CHILD, *child], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def events(proc: subprocess.Popen[str], until: str, count: int = 1, timeout: float = 30) -> list[dict[str, object]]:
    """Read the child's JSON lines until ``count`` events named ``until`` were seen."""
    assert proc.stdout is not None
    seen: list[dict[str, object]] = []
    deadline = time.monotonic() + timeout
    while sum(1 for e in seen if e["event"] == until) < count:
        assert time.monotonic() < deadline, seen
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"child output ended; stderr: {proc.stderr.read() if proc.stderr else ''}")
        seen.append(json.loads(line))
    return seen


def test_credentials_exist_before_start_and_vanish_after(exec_daemon: DaemonProcess) -> None:
    p = sidecar(exec_daemon.socket, "--workflow", "agent", child=("MAIL_TOKEN", "crm.token", "0.3", "7"))
    start = events(p, "start")[0]
    assert p.wait(30) == 7  # the child's exit code is the sidecar's
    d = str(start["dir"])
    assert start["files"] == ["crm.token", "generation", "plain.token"]
    # At least the first generation: on a loaded machine the child may start after the first refresh.
    assert isinstance(start["generation"], int) and start["generation"] >= 1
    assert d.startswith("/dev/shm/broker-exec-")
    mail = start["env"]["MAIL_TOKEN"]  # type: ignore[index]
    assert isinstance(mail, str)
    assert not os.path.exists(d)  # deleted on exit
    # Both the file and the environment variable held real tokens, for the right tools; the run revoked
    # them at exit, so they no longer verify.
    with Client(exec_daemon.socket) as c:
        for token, tool in ((start["token"], "crm"), (mail, "mail")):
            with pytest.raises(InvalidToken) as exc:
                c.verify(str(token), tool)
            assert exc.value.reason == "revoked"
    with TokenVerifier(exec_daemon.socket, "example.org") as v, pytest.raises(InvalidToken):
        v.verify(str(start["token"]), tool="crm")
    lines = [json.loads(x) for x in open(exec_daemon.audit_log).read().splitlines()]
    # Every token the run was issued (three at start, more if a refresh came first) was revoked at exit.
    minted = {x["jti"] for x in lines if x["event"] == "mint"}
    assert len(minted) >= 3 and {x["jti"] for x in lines if x["event"] == "revoke"} == minted


def test_files_are_private_and_swapped_with_signal(exec_daemon: DaemonProcess) -> None:
    p = sidecar(exec_daemon.socket, "--workflow", "agent", "--tool", "crm", "--signal", "HUP",
                child=("", "crm.token", "20", "0"))
    try:
        start = events(p, "start")[0]
        d = str(start["dir"])
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(os.path.join(d, "crm.token")).st_mode) == 0o600
        assert os.stat(os.path.join(d, "crm.token")).st_uid == os.geteuid()
        hups = [e for e in events(p, "hup", count=2) if e["event"] == "hup"]
        gens = [start["generation"]] + [h["generation"] for h in hups]
        assert gens == sorted(gens) and len(set(gens)) == 3  # a new generation each time
        assert len({start["token"], *(h["token"] for h in hups)}) == 3  # and a new token
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0


def test_revocation_forces_an_immediate_swap(exec_daemon: DaemonProcess) -> None:
    p = sidecar(exec_daemon.socket, "--workflow", "agent", "--tool", "plain", "--signal", "HUP",
                child=("", "plain.token", "30", "0"))
    try:
        start = events(p, "start")[0]
        t0 = time.monotonic()
        with Client(exec_daemon.socket) as c:
            assert c.revoke([str(start["token"])]) == 1
        hup = next(e for e in events(p, "hup") if e["event"] == "hup")
        # The tool's ttl is 1 minute: only the pushed revocation explains a new token this soon.
        assert time.monotonic() - t0 < 10
        assert hup["token"] != start["token"] and int(hup["generation"]) > int(start["generation"])  # type: ignore[call-overload]
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(30)


def test_restart_mode_delivers_new_env(exec_daemon: DaemonProcess) -> None:
    p = sidecar(exec_daemon.socket, "--workflow", "agent", "--tool", "mail", "--restart", "--grace", "5s",
                child=("MAIL_TOKEN", "-", "30", "0"))
    try:
        seen = events(p, "start", count=2)
        starts = [e for e in seen if e["event"] == "start"]
        assert any(e["event"] == "term" and e["pid"] == starts[0]["pid"] for e in seen)  # SIGTERM first
        assert starts[0]["pid"] != starts[1]["pid"]
        assert starts[0]["env"]["MAIL_TOKEN"] != starts[1]["env"]["MAIL_TOKEN"]  # type: ignore[index]
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(30)


def test_signals_reach_the_child_and_its_code_comes_back(exec_daemon: DaemonProcess) -> None:
    p = sidecar(exec_daemon.socket, "--workflow", "agent", "--tool", "plain", child=("", "-", "30", "3"))
    events(p, "start")
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 3
    assert p.stdout is not None and json.loads(p.stdout.readline())["event"] == "term"


def test_killing_the_sidecar_kills_the_child(exec_daemon: DaemonProcess) -> None:
    p = sidecar(exec_daemon.socket, "--workflow", "agent", "--tool", "plain", child=("", "-", "60", "0"))
    start = events(p, "start")[0]
    child_pid, left_behind = int(start["pid"]), str(start["dir"])  # type: ignore[call-overload]
    p.kill()
    p.wait(10)
    deadline = time.monotonic() + 10
    while not _dead(child_pid):
        assert time.monotonic() < deadline, "the child outlived its sidecar"
        time.sleep(0.05)
    # SIGKILL left no chance to clean up: the next run sweeps the dead run's directory.
    assert os.path.isdir(left_behind)
    CredentialDir().cleanup()
    assert not os.path.exists(left_behind)


def test_the_next_run_revokes_what_a_killed_run_issued(exec_daemon: DaemonProcess,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # A private runtime directory: sweeps of other runs on this host must not get there first. The run
    # had three tools (crm, mail and plain); two of its tokens are checked here.
    with tempfile.TemporaryDirectory(prefix="brk-rt-", dir="/dev/shm") as base:
        monkeypatch.setenv("XDG_RUNTIME_DIR", base)
        p = sidecar(exec_daemon.socket, "--workflow", "agent", child=("MAIL_TOKEN", "crm.token", "60", "0"))
        start = events(p, "start")[0]
        p.kill()  # no cleanup, no revocation: what an OOM kill or kill -9 does
        p.wait(10)
        left = [(str(start["token"]), "crm"), (str(start["env"]["MAIL_TOKEN"]), "mail")]  # type: ignore[index]
        with Client(exec_daemon.socket) as c:
            for token, tool in left:
                assert c.verify(token, tool)["tool"] == tool  # the agent's children could still use them
        nxt = sidecar(exec_daemon.socket, "--workflow", "agent", "--tool", "plain", child=("", "-", "0", "0"))
        assert nxt.wait(30) == 0
        with Client(exec_daemon.socket) as c:
            for token, tool in left:
                with pytest.raises(InvalidToken) as exc:
                    c.verify(token, tool)
                assert exc.value.reason == "revoked"
        assert os.listdir(base) == []  # the killed run's directory and token list are gone too
        assert nxt.stderr is not None and "revoking 3 token(s) of an earlier run that was killed" in nxt.stderr.read()


def _dead(pid: int) -> bool:
    """Gone, or a zombie waiting for init to reap it: either way it no longer runs."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1].startswith("Z")
    except FileNotFoundError:
        return True


def test_denied_workflow_never_starts_the_child(exec_daemon: DaemonProcess) -> None:
    p = sidecar(exec_daemon.socket, "--workflow", "other", child=("", "-", "0", "0"))
    assert p.wait(30) == 1
    assert p.stdout is not None and p.stdout.read() == ""
    assert p.stderr is not None
    err = p.stderr.read()
    assert "permission denied (request " in err and "audit log has the full reason" in err, err
    assert "broker exec: broker exec" not in err and "broker.exec: broker exec" not in err  # said once


def test_unreachable_daemon_keeps_then_removes_then_restores(short_tmp: str) -> None:
    cfg, sock = start_daemon(short_tmp, [{"name": "crm", "file": "crm.token", "ttl": "8s"}])
    audit = os.path.join(short_tmp, "audit.jsonl")
    with running_daemon(cfg, sock, audit):
        p = sidecar(sock, "--workflow", "agent", "--signal", "HUP", child=("", "crm.token", "60", "0"))
        start = events(p, "start")[0]
    try:
        path = os.path.join(str(start["dir"]), "crm.token")
        assert os.path.exists(path)  # the daemon just went away: the credential stays while valid
        deadline = time.monotonic() + 15
        while os.path.exists(path):
            assert time.monotonic() < deadline, "the expired credential was not removed"
            time.sleep(0.1)
        with running_daemon(cfg, sock, audit):
            deadline = time.monotonic() + 30
            while not os.path.exists(path):
                assert time.monotonic() < deadline, "the credential did not come back"
                time.sleep(0.1)
            with open(path) as f, Client(sock) as c:
                assert c.verify(f.read().strip(), "crm")["wf"] == "agent"
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(30)


def test_reader_never_sees_a_partial_file() -> None:
    creds = CredentialDir()
    try:
        values = [(f"token-{i}-" + "x" * (i % 97 * 13)).encode() for i in range(1000)]
        creds.write("t", values[0])
        reader = subprocess.Popen([sys.executable, "-c", (
            "import sys, os\n"
            "path, stop = sys.argv[1], sys.argv[2]\n"
            "bad = reads = 0\n"
            "while not os.path.exists(stop):\n"
            "    with open(path, 'rb') as f: data = f.read()\n"
            "    reads += 1\n"
            "    parts = data.split(b'-')\n"
            "    ok = len(parts) == 3 and parts[0] == b'token' and len(parts[2]) == int(parts[1]) % 97 * 13\n"
            "    bad += not ok\n"
            "print(reads, bad)\n"), os.path.join(creds.path, "t"), os.path.join(creds.path, "stop")],
            stdout=subprocess.PIPE, text=True)
        for v in values[1:]:
            creds.write("t", v)
            creds.bump()
        with open(os.path.join(creds.path, "stop"), "w"):
            pass
        out, _ = reader.communicate(timeout=60)
        reads, bad = map(int, out.split())
        assert reads > 0 and bad == 0
        assert creds.generation == 999
    finally:
        creds.cleanup()
    assert not os.path.exists(creds.path)


def test_the_agent_starts_with_a_clean_process_state(exec_daemon: DaemonProcess, short_tmp: str) -> None:
    # A "broker" package in the working directory must not stand in for the exec wrapper; the agent
    # gets default SIGPIPE/SIGXFSZ handling and the core-file limit the sidecar itself gave up.
    fake = os.path.join(short_tmp, "cwd", "broker", "sidecar")
    os.makedirs(fake)
    marker = os.path.join(short_tmp, "shadowed")
    for d in (os.path.dirname(fake), fake):
        with open(os.path.join(d, "__init__.py"), "w"):
            pass
    with open(os.path.join(fake, "_pdeathsig.py"), "w") as f:
        f.write(f"open({marker!r}, 'w').close()\n")
    hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
    core = 1 << 20 if hard == resource.RLIM_INFINITY else min(hard, 1 << 20)

    def limit_core() -> None:
        resource.setrlimit(resource.RLIMIT_CORE, (core, hard))

    # The installed command, as users run it (python -m would itself import from the working directory).
    broker = os.path.join(os.path.dirname(sys.executable), "broker")
    r = subprocess.run([broker, "exec", "--socket", exec_daemon.socket, "--workflow",
                        "agent", "--tool", "plain", "--", "sh", "-c",
                        "grep SigIgn /proc/self/status; grep 'Max core file size' /proc/self/limits"],
                       cwd=os.path.dirname(os.path.dirname(fake)), capture_output=True, text=True, timeout=60,
                       preexec_fn=limit_core, check=False)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(marker)
    ignored = int(r.stdout.split()[1], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1)) and not ignored & (1 << (signal.SIGXFSZ - 1))
    assert r.stdout.split()[6] == str(core)  # "Max core file size <soft> <hard> bytes"
