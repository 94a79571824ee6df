"""Attestation from the kernel and /proc, on real sockets and real processes."""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import socket
import subprocess
import sys

import pytest

from broker import attest
from broker.config import CallerRule
from broker.errors import AttestationError


def me(uid: int | None = None) -> attest.PeerCred:
    return attest.PeerCred(os.getpid(), os.geteuid() if uid is None else uid, os.getegid(),
                           attest.ProcessHandle(os.pidfd_open(os.getpid())), attest.exe_identity(os.getpid()))


def _connected_pair(tmp_path: object) -> tuple[socket.socket, socket.socket, socket.socket]:
    path = os.path.join(str(tmp_path), "s.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen()
    cli = socket.socket(socket.AF_UNIX)
    cli.connect(path)
    conn, _ = srv.accept()
    return srv, cli, conn


def test_peer_cred_reports_this_process(tmp_path: object) -> None:
    srv, cli, conn = _connected_pair(tmp_path)
    with srv, cli, conn:
        cred = attest.peer_cred(conn)
    assert (cred.pid, cred.uid, cred.gid) == (os.getpid(), os.geteuid(), os.getegid())
    assert cred.process.alive()
    assert attest.start_time(os.getpid()) > 0


def test_peer_cred_of_a_child_process(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "s.sock")
    with socket.socket(socket.AF_UNIX) as srv:
        srv.bind(path)
        srv.listen()
        child = subprocess.Popen([sys.executable, "-c",
                                  "import socket,sys,time; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);"
                                  " s.recv(1)", path])
        conn, _ = srv.accept()
        with conn:
            cred = attest.peer_cred(conn)
            assert cred.pid == child.pid
            caller = attest.attest(cred)
            assert caller.exe == os.path.realpath(sys.executable)
            conn.send(b"x")
        child.wait(10)
    # The process is gone: attesting it again must fail, never succeed with stale data, even though
    # the pid number may already belong to someone else.
    assert not cred.process.alive()
    with pytest.raises(AttestationError) as exc:
        attest.attest(cred)
    assert "exited" in exc.value.reason
    assert str(exc.value) == "caller could not be attested"  # the reason never reaches str()


def test_pidfd_fallback_pins_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without SO_PEERPIDFD (kernels before 6.5) the pid is pinned with pidfd_open + start time."""
    # An option number no kernel knows: getsockopt fails with ENOPROTOOPT, as SO_PEERPIDFD does there.
    monkeypatch.setattr(attest, "SO_PEERPIDFD", 0x7FFF)
    a, b = socket.socketpair()
    with a, b:
        assert attest._pidfd(a, os.getpid()).alive()


def test_no_fallback_when_the_kernel_has_no_process_to_give(monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel knows SO_PEERPIDFD but refuses it (no peer; some kernels say EINVAL once the peer is
    # reaped): the pid may already name another process, so it must not be pinned by number.
    opened: list[int] = []
    monkeypatch.setattr(os, "pidfd_open", lambda pid, *a: opened.append(pid) or -1)
    with socket.socket(socket.AF_UNIX) as unconnected, pytest.raises(AttestationError) as exc:
        attest._pidfd(unconnected, os.getpid())
    assert "no pidfd for the peer" in exc.value.reason and opened == []


def test_changed_credentials_are_detected() -> None:
    with pytest.raises(AttestationError) as exc:
        attest.attest(me(uid=os.geteuid() + 1))
    assert "changed credentials" in exc.value.reason


def test_selectors_match_this_process() -> None:
    caller = attest.attest(me())
    attest.exe_sha256(caller)  # as ExeHashing does before the policy looks: matches() never reads a binary
    exe = os.path.realpath(sys.executable)
    with open(exe, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    user = pwd.getpwuid(os.geteuid()).pw_name
    group = grp.getgrgid(os.getegid()).gr_name
    good = [CallerRule(uid=os.geteuid()), CallerRule(gid=os.getegid()), CallerRule(user=user),
            CallerRule(group=group), CallerRule(exe=exe), CallerRule(exe_sha256=digest),
            CallerRule(uid=os.geteuid(), exe=exe, exe_sha256=digest, user=user)]
    for rule in good:
        assert attest.matches(rule, caller), rule
    bad = [CallerRule(uid=os.geteuid() + 1), CallerRule(gid=os.getegid() + 1), CallerRule(user="no-such-user"),
           CallerRule(group="no-such-group"), CallerRule(exe="/usr/bin/false"), CallerRule(exe_sha256="0" * 64),
           CallerRule(systemd_unit="nope.service"),
           # every selector must match, not just one
           CallerRule(uid=os.geteuid(), exe="/usr/bin/false")]
    for rule in bad:
        assert not attest.matches(rule, caller), rule


def test_systemd_unit_from_cgroup() -> None:
    caller = attest.attest(me())
    with open(f"/proc/{os.getpid()}/cgroup") as f:
        line = next((x for x in f.read().splitlines() if x.startswith("0::")), "")
    units = [p for p in line[3:].split("/") if p.endswith((".service", ".scope"))]
    assert caller.systemd_unit == (units[0] if units else None)  # the outermost: made by the manager
    assert "unit" in caller.audit_fields()


def test_exe_hash_is_cached_per_binary() -> None:
    first = attest.exe_sha256(attest.attest(me()))
    assert first is not None and len(first) == 64
    assert attest.exe_sha256(attest.attest(me())) == first


def _hash_seen_running(exe: str) -> str | None:
    """The exe hash attestation reports for a process running ``exe``."""
    proc = subprocess.Popen([exe, "30"])
    try:
        cred = attest.PeerCred(proc.pid, os.geteuid(), os.getegid(), attest.ProcessHandle(os.pidfd_open(proc.pid)),
                               attest.exe_identity(proc.pid))
        return attest.exe_sha256(attest.attest(cred))
    finally:
        proc.kill()
        proc.wait()


def test_rewritten_binary_with_its_old_mtime_is_hashed_again(tmp_path: object) -> None:
    # The owner of a binary rewrites it in place (same size) and sets its mtime back: the cached hash
    # of the old content must not be reused for the new one.
    exe = os.path.join(str(tmp_path), "agent")
    with open("/bin/sleep", "rb") as f:
        original = f.read()
    with open(exe, "wb") as f:
        f.write(original)
    os.chmod(exe, 0o755)
    assert _hash_seen_running(exe) == hashlib.sha256(original).hexdigest()
    st = os.stat(exe)
    changed = bytearray(original)
    changed[-64:] = bytes(64)  # other bytes, same size
    with open(exe, "r+b") as f:
        f.write(changed)
    os.utime(exe, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _hash_seen_running(exe) == hashlib.sha256(changed).hexdigest()


def test_credentials_come_from_the_pidfd_when_the_kernel_can() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        handle = attest.ProcessHandle(os.pidfd_open(child.pid))
        ids = handle.effective_ids()
        if ids is None:
            pytest.skip("kernel without PIDFD_GET_INFO (before 6.13): the /proc fallback is tested below")
        assert ids == (os.geteuid(), os.getegid())
    finally:
        child.kill()
        child.wait()
    with pytest.raises(ProcessLookupError):  # never the credentials of a later process with that pid
        handle.effective_ids()


def test_proc_fallback_without_pidfd_info(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attest, "_pidfd_info", [False])  # as on a kernel before 6.13
    caller = attest.attest(me())
    assert (caller.uid, caller.gid) == (os.geteuid(), os.getegid())
    with pytest.raises(AttestationError, match="attested"):
        attest.attest(me(uid=os.geteuid() + 1))


def test_a_process_running_another_executable_than_at_connect_is_refused() -> None:
    """An exec after connecting: the identity recorded at accept no longer describes the process."""
    cred = me()
    assert cred.exe_id is not None
    other = attest.PeerCred(cred.pid, cred.uid, cred.gid, cred.process, (cred.exe_id[0], cred.exe_id[1] + 1))
    with pytest.raises(AttestationError) as refused:
        attest.attest(other)
    assert "another executable" in refused.value.reason


def test_exe_selector_needs_the_file_the_path_names_here() -> None:
    """A bind mount in the caller's own mount namespace makes /proc/<pid>/exe show the approved path for
    another file: the path alone must not match."""
    caller = attest.attest(me())
    assert caller.exe is not None and caller.exe_id is not None
    rule = CallerRule(exe=caller.exe)
    assert attest.matches(rule, caller)
    elsewhere = attest.Caller(caller.pid, caller.process, caller.uid, caller.gid, caller.exe,
                              (caller.exe_id[0], caller.exe_id[1] + 1))
    assert not attest.matches(rule, elsewhere)
    unknown = attest.Caller(caller.pid, caller.process, caller.uid, caller.gid, caller.exe, None)
    assert not attest.matches(rule, unknown)
