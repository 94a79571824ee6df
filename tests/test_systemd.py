"""The systemd side: the units pass systemd's own checks, and the three protocols work over real sockets and
descriptors handed to real child processes."""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from broker import systemd
from broker.errors import BrokerError

UNITS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "systemd")
UNITS = ("broker.service", "broker.socket", "broker-exec@.service")
INSTALLED_BROKER = "/opt/broker/bin/broker"
MAX_EXPOSURE = 2.0
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed (Debian package: systemd)")


def _broker_entry_point() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "broker")
    found = beside if os.access(beside, os.X_OK) else shutil.which("broker")
    assert found, "the broker entry point is not installed"
    return found


@pytest.fixture
def units(short_tmp: str) -> str:
    """Copies of the units whose ExecStart= names this checkout's broker, so verify can check it exists."""
    entry = _broker_entry_point()
    for name in UNITS:
        with open(os.path.join(UNITS_DIR, name)) as f:
            text = f.read()
        with open(os.path.join(short_tmp, name), "w") as f:
            f.write(text.replace(INSTALLED_BROKER, entry))
    return short_tmp


def _analyze(*args: str, cwd: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    # No running systemd is needed: no manual pages, no generators, units read from the files given.
    return subprocess.run([ANALYZE, *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"})


def _complaints_about_our_units(result: subprocess.CompletedProcess[str]) -> list[str]:
    # verify exits 0 on unknown keys and bad values and only prints a warning, so the output is the verdict.
    # Lines about the host's own units are not ours to judge.
    return [line for line in (result.stdout + result.stderr).splitlines() if "broker" in line]


@needs_analyze
def test_units_verify_clean(units: str) -> None:
    r = _analyze("verify", "--man=no", "--generators=no", *(f"./{name}" for name in UNITS), cwd=units)
    assert r.returncode == 0, r.stderr
    assert _complaints_about_our_units(r) == []


@needs_analyze
def test_verify_would_catch_a_mistake(units: str) -> None:
    # Guards the test above: a typo in a directive must show up in what we check.
    path = os.path.join(units, "broker.service")
    with open(path, "a") as f:
        f.write("[Service]\nProtectSytem=strict\n")
    r = _analyze("verify", "--man=no", "--generators=no", "./broker.service", cwd=units)
    assert any("ProtectSytem" in line for line in _complaints_about_our_units(r))


@needs_analyze
@pytest.mark.parametrize("unit", ["broker.service", "broker-exec@demo.service"])
def test_exposure_is_low(units: str, unit: str) -> None:
    if unit != "broker.service":
        shutil.copy(os.path.join(units, "broker-exec@.service"), os.path.join(units, unit))
    r = _analyze("security", "--offline=yes", f"./{unit}", cwd=units)
    assert r.returncode == 0, r.stderr
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", r.stdout)
    assert m, r.stdout
    assert float(m.group(1)) <= MAX_EXPOSURE, r.stdout


# --- the capability the service grants is the one attestation needs -------------------------------------

def _unit_setting(name: str, key: str) -> str:
    with open(os.path.join(UNITS_DIR, name)) as f:
        values = [line.split("=", 1)[1].strip() for line in f if line.startswith(key + "=")]
    assert len(values) == 1, f"{key}= set {len(values)} times"
    return values[0]


@pytest.fixture
def two_users() -> Iterator[tuple[pwd.struct_passwd, pwd.struct_passwd]]:
    if os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("useradd"):
        pytest.skip("needs root, setpriv and useradd to run processes as two throwaway users")
    names = ["brk-" + secrets.token_hex(4) for _ in range(2)]
    try:
        for name in names:
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                           check=True)
        yield pwd.getpwnam(names[0]), pwd.getpwnam(names[1])
    finally:
        for name in names:
            subprocess.run(["userdel", name], check=False, capture_output=True)


def _as(user: pwd.struct_passwd, caps: list[str], *argv: str) -> list[str]:
    cmd = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
    if caps:
        wanted = ",".join("+" + c.removeprefix("CAP_").lower() for c in caps)
        cmd += [f"--inh-caps={wanted}", f"--ambient-caps={wanted}"]
    return cmd + list(argv)


def test_service_capabilities_are_exactly_what_attestation_needs(
        two_users: tuple[pwd.struct_passwd, pwd.struct_passwd]) -> None:
    daemon_user, agent_user = two_users
    caps = _unit_setting("broker.service", "AmbientCapabilities").split()
    assert caps == _unit_setting("broker.service", "CapabilityBoundingSet").split()
    agent = subprocess.Popen(_as(agent_user, [], "sleep", "60"))
    try:
        deadline = time.monotonic() + 10
        # Until setpriv has exec'd sleep, /proc/<pid>/exe is setpriv.
        while os.path.basename(os.readlink(f"/proc/{agent.pid}/exe")) != "sleep":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        exe = ["readlink", f"/proc/{agent.pid}/exe"]
        status = ["grep", "^Uid:", f"/proc/{agent.pid}/status"]
        granted = subprocess.run(_as(daemon_user, caps, *exe), capture_output=True, text=True, timeout=10)
        assert granted.returncode == 0, granted.stderr
        assert os.path.basename(granted.stdout.strip()) == "sleep"
        # Without the capability the executable of another uid's process is hidden: the grant is needed.
        denied = subprocess.run(_as(daemon_user, [], *exe), capture_output=True, text=True, timeout=10)
        assert denied.returncode != 0
        # The ids are world-readable: they need nothing.
        ids = subprocess.run(_as(daemon_user, [], *status), capture_output=True, text=True, timeout=10)
        assert ids.returncode == 0 and str(agent_user.pw_uid) in ids.stdout, ids.stderr
    finally:
        agent.kill()
        agent.wait()


# --- sd_notify -----------------------------------------------------------------------------------------

Receiver = Callable[[str], tuple[socket.socket, str]]


@pytest.fixture
def receiver(short_tmp: str) -> Iterator[Receiver]:
    opened: list[socket.socket] = []

    def bind(kind: str) -> tuple[socket.socket, str]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        opened.append(sock)
        sock.settimeout(5)
        if kind == "path":
            address = os.path.join(short_tmp, "notify.sock")
            sock.bind(address)
            return sock, address
        name = "brk-notify-" + secrets.token_hex(8)
        sock.bind("\0" + name)
        return sock, "@" + name

    yield bind
    for sock in opened:
        sock.close()


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_notify_sends_one_datagram(receiver: Receiver, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    sock, address = receiver(kind)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert systemd.notify("READY=1")
    assert sock.recv(4096) == b"READY=1"
    assert systemd.notify("STATUS=serving 3 workflows\nWATCHDOG=1")
    assert sock.recv(4096) == b"STATUS=serving 3 workflows\nWATCHDOG=1"


def test_notify_without_a_manager_does_nothing(monkeypatch: pytest.MonkeyPatch, short_tmp: str) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not systemd.notify("READY=1")
    for unusable in ("", "relative/path", "vsock:2:1234", os.path.join(short_tmp, "nobody-listens"),
                     "@brk-nobody-" + secrets.token_hex(8)):
        monkeypatch.setenv("NOTIFY_SOCKET", unusable)
        assert not systemd.notify("READY=1"), unusable


def test_reloading_state_carries_the_monotonic_clock() -> None:
    before = time.monotonic_ns() // 1000
    lines = systemd.reloading_state().split("\n")
    after = time.monotonic_ns() // 1000
    assert lines[0] == "RELOADING=1"
    key, value = lines[1].split("=")
    assert key == "MONOTONIC_USEC" and before <= int(value) <= after


# --- watchdog ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("usec", "pid", "expected"), [
    (None, None, None),
    ("30000000", None, 15.0),
    ("30000000", "self", 15.0),
    ("30000000", "other", None),   # inherited from a supervised parent: not ours to ping
    ("1000", None, 0.0005),
    ("0", None, None),
    ("soon", None, None),
])
def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None,
                           expected: float | None) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, {"self": str(os.getpid()), "other": str(os.getppid())}.get(value, value))
    assert systemd.watchdog_interval() == expected


# --- socket activation ---------------------------------------------------------------------------------

# Does what the service manager does between fork and exec: puts the passed descriptor at fd 3 and names
# the process that may take it, which is only known in the child (exec keeps the pid). Then runs CHILD.
WRAPPER = """
import os, sys
src, pid_mode = int(sys.argv[1]), sys.argv[2]
if src != 3:
    os.dup2(src, 3)
    os.close(src)
os.environ["LISTEN_PID"] = str(os.getpid() if pid_mode == "self" else os.getppid())
os.execv(sys.executable, [sys.executable, "-c", sys.argv[3]])
"""

CHILD = """
import json, os
from broker.errors import BrokerError
from broker.systemd import listen_fds
out = {}
try:
    socks = listen_fds()
except BrokerError as exc:
    out["error"] = str(exc)
else:
    out["fds"] = [s.fileno() for s in socks]
    out["inheritable"] = [os.get_inheritable(s.fileno()) for s in socks]
    out["blocking"] = [s.getblocking() for s in socks]
    for s in socks:
        conn, _ = s.accept()
        conn.sendall(b"adopted")
        conn.close()
out["env"] = sorted(k for k in os.environ if k.startswith("LISTEN_"))
try:
    os.fstat(3)
    out["fd3_open"] = True
except OSError:
    out["fd3_open"] = False
print(json.dumps(out))
"""


def _activate(fd: int, *, pid: str = "self", names: str | None = None) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    env["LISTEN_FDS"] = "1"
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    r = subprocess.run([sys.executable, "-c", WRAPPER, str(fd), pid, CHILD], pass_fds=(fd,), env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    result: dict[str, object] = json.loads(r.stdout)
    return result


@pytest.fixture
def listening(short_tmp: str) -> Iterator[tuple[socket.socket, str]]:
    path = os.path.join(short_tmp, "public.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(path)
        sock.listen(8)
        yield sock, path


@pytest.mark.parametrize("names", [None, "broker.socket"])
def test_listen_fds_adopts_the_passed_socket(listening: tuple[socket.socket, str], names: str | None) -> None:
    sock, path = listening
    # Connect before the child exists: the connection waits in the backlog, as an agent's would while the
    # daemon starts.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(path)
        out = _activate(sock.fileno(), names=names)
        assert client.recv(16) == b"adopted"
    assert out == {"fds": [3], "inheritable": [False], "blocking": [True], "env": [], "fd3_open": True}


def test_listen_fds_ignores_descriptors_meant_for_another_process(listening: tuple[socket.socket, str]) -> None:
    out = _activate(listening[0].fileno(), pid="parent")
    # Nothing adopted, nothing closed, and the variables are gone all the same.
    assert out == {"fds": [], "inheritable": [], "blocking": [], "env": [], "fd3_open": True}


def _pipe() -> tuple[int, Callable[[], None]]:
    r, w = os.pipe()

    def close() -> None:
        os.close(r)
        os.close(w)

    return r, close


def _sock(family: int, kind: int, setup: Callable[[socket.socket], None]) -> tuple[int, Callable[[], None]]:
    sock = socket.socket(family, kind)
    setup(sock)
    return sock.fileno(), sock.close


def _tcp_listener(sock: socket.socket) -> None:
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)


@pytest.mark.parametrize(("make", "message"), [
    (_pipe, "fd 3 is not a socket"),
    (lambda: _sock(socket.AF_UNIX, socket.SOCK_DGRAM, lambda s: None), "fd 3 is not a Unix stream socket"),
    (lambda: _sock(socket.AF_INET, socket.SOCK_STREAM, _tcp_listener), "fd 3 is not a Unix stream socket"),
    (lambda: _sock(socket.AF_UNIX, socket.SOCK_STREAM, lambda s: None), "fd 3 is not listening"),
], ids=["pipe", "unix-datagram", "tcp", "not-listening"])
def test_listen_fds_rejects_what_the_daemon_cannot_serve(make: Callable[[], tuple[int, Callable[[], None]]],
                                                         message: str) -> None:
    fd, close = make()
    try:
        out = _activate(fd)
    finally:
        close()
    assert str(out["error"]).startswith(f"socket activation: {message}"), out
    assert out["env"] == [] and out["fd3_open"]


def test_listen_fds_rejects_a_name_count_mismatch(listening: tuple[socket.socket, str]) -> None:
    out = _activate(listening[0].fileno(), names="broker.socket:metrics.socket")
    assert out["error"] == "socket activation: LISTEN_FDNAMES has 2 names for 1 descriptors"


def test_listen_fds_without_activation(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        monkeypatch.delenv(name, raising=False)
    assert systemd.listen_fds() == []
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "0")
    assert systemd.listen_fds() == []
    assert "LISTEN_PID" not in os.environ and "LISTEN_FDS" not in os.environ


@pytest.mark.parametrize(("pid", "count"), [("self", "one"), ("init", "1"), ("self", "-1")])
def test_listen_fds_rejects_malformed_variables(monkeypatch: pytest.MonkeyPatch, pid: str, count: str) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()) if pid == "self" else pid)
    monkeypatch.setenv("LISTEN_FDS", count)
    with pytest.raises(BrokerError, match="socket activation"):
        systemd.listen_fds()
    assert "LISTEN_FDS" not in os.environ


@pytest.mark.parametrize("unit", ["broker.service", "broker-exec@.service"])
def test_units_write_no_core_files(unit: str) -> None:
    # Keys, tokens and upstream secrets live in these processes' memory.
    assert _unit_setting(unit, "LimitCORE") == "0"
