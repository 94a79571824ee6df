"""The front door on its own: real Unix sockets on both sides, no gRPC. Failure paths of admission."""

from __future__ import annotations

import errno
import logging
import os
import pwd
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from broker import frontdoor
from broker.frontdoor import FrontDoor

HANG_GUARD = 10.0


class Door:
    def __init__(self, tmp: Path, max_per_uid: int, **limits: object) -> None:
        self.public = str(tmp / "public.sock")
        internal = str(tmp / "internal.sock")
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(internal)
        self.server.listen(64)
        self.server.settimeout(HANG_GUARD)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.public)
        listener.listen(64)
        self.door = FrontDoor(listener, internal, max_connections=64, max_per_uid=max_per_uid,
                              **limits)  # type: ignore[arg-type]

    def connect(self) -> socket.socket:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(HANG_GUARD)
        client.connect(self.public)
        return client

    def relayed(self, client: socket.socket) -> bool:
        """True when bytes from ``client`` reach the internal server (a relayed connection)."""
        client.sendall(b"hello")
        try:
            upstream, _ = self.server.accept()
        except TimeoutError:
            return False
        with upstream:
            upstream.settimeout(HANG_GUARD)
            return upstream.recv(5) == b"hello"


@pytest.fixture
def door(tmp_path: Path) -> Iterator[Door]:
    d = Door(tmp_path, max_per_uid=2)
    yield d
    d.door.close()
    d.server.close()


def test_running_out_of_descriptors_gives_the_slot_back(door: Door, monkeypatch: pytest.MonkeyPatch) -> None:
    # Admission is driven by hand here (the accept thread is not started), so the failure can be
    # injected exactly where the upstream socket is made.
    real_socket = socket.socket

    def no_more_fds(*args: object, **kwargs: object) -> socket.socket:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    for _ in range(3):  # more failures than the per-uid cap of 2
        client = door.connect()
        conn, _ = door.door._listener.accept()
        monkeypatch.setattr(frontdoor.socket, "socket", no_more_fds)
        try:
            with pytest.raises(OSError):
                door.door._admit(conn)
        finally:
            monkeypatch.setattr(frontdoor.socket, "socket", real_socket)
        client.close()
    assert door.door._per_uid == {}  # every failed admission gave its slot back
    door.door.start()
    clients = [door.connect() for _ in range(2)]
    assert all(door.relayed(c) for c in clients)  # the uid still gets its full share
    for c in clients:
        c.close()


def test_a_dead_relay_is_reported_and_refuses(door: Door, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "broker.frontdoor")
    door.door.start()
    assert door.door.accepting
    door.door._pump.stop()  # as if its thread had ended on a bug
    for _ in range(2):
        client = door.connect()
        assert client.recv(1) == b""  # closed at once, never relayed
        client.close()
    deadline = time.monotonic() + HANG_GUARD
    while door.door.refused < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert door.door.refused == 2
    assert not door.door.accepting  # health and `broker status` see it
    assert caplog.text.count("the relay has stopped") == 1  # said once, not per connection
    assert door.door._per_uid == {}


def test_the_listener_passes_credentials_to_every_connection(door: Door, short_tmp: str) -> None:
    """So the pump can attribute every byte an agent writes, from its first one (see broker._pump)."""
    assert door.door._listener.getsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED) == 1
    # bind_public sets it before listen(2): no connection can be queued without it.
    with frontdoor.bind_public(os.path.join(short_tmp, "b.sock")) as listener:
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED) == 1


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_accept_rate_is_a_token_bucket_per_uid() -> None:
    clock = Clock()
    rate = frontdoor.AcceptRate(rate=2.0, burst=3, clock=clock)
    assert [rate.admit(7) for _ in range(4)] == [True, True, True, False]  # the burst, then empty
    assert rate.admit(8)  # another uid has its own bucket
    clock.now += 0.5  # one token back at 2 per second
    assert [rate.admit(7) for _ in range(2)] == [True, False]
    clock.now += 3600  # refilled up to the burst, not beyond
    assert [rate.admit(7) for _ in range(4)] == [True, True, True, False]
    assert set(rate._buckets) == {7}  # uid 8's idle (full) bucket was forgotten


def _churn(user: pwd.struct_passwd, path: str, count: int) -> None:
    """Connect and close ``count`` times as ``user`` (the interpreter starts as root and then drops, as
    it may live where the user cannot read it)."""
    code = ("import os, socket, sys\n"
            "os.setgroups([]); os.setgid(int(sys.argv[2])); os.setuid(int(sys.argv[1]))\n"
            "for _ in range(int(sys.argv[4])):\n"
            "    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[3]); s.close()\n")
    subprocess.run([sys.executable, "-c", code, str(user.pw_uid), str(user.pw_gid), path, str(count)],
                   check=True, timeout=HANG_GUARD)


def _wait_for(condition: Callable[[], bool]) -> None:
    """A hang guard around a condition the accept thread will make true; no timing is asserted."""
    deadline = time.monotonic() + HANG_GUARD
    while not condition():
        assert time.monotonic() < deadline, "the front door never got there"
        time.sleep(0.01)


def test_a_churning_uid_cannot_starve_another_uid(short_tmp: str, throwaway_user: pwd.struct_passwd) -> None:
    """Connect/close churn (issue 12, item 4): the churning uid's connections beyond its burst are
    closed at once; another uid's connections are still relayed. The clock stands still, so the
    churner's bucket never refills during the test."""
    os.chmod(short_tmp, 0o755)  # the public socket's directory must be reachable by the other uid
    clock = Clock()
    d = Door(Path(short_tmp), max_per_uid=64, accept_rate=1.0, accept_burst=3, clock=clock)
    os.chmod(d.public, 0o666)
    d.door.start()
    try:
        _churn(throwaway_user, d.public, 40)
        _wait_for(lambda: d.door.throttled == 37)
        assert d.door.accepted == 3  # its burst, no more
        for _ in range(3):
            d.server.accept()[0].close()  # the churner's three relayed connections
        for _ in range(3):  # root's bucket is untouched by the churn
            client = d.connect()
            assert d.relayed(client)
            client.close()
        _wait_for(lambda: d.door.accepted == 6)
        assert d.door.throttled == 37
        clock.now += 1.0  # one second: one more connection for the churner
        _churn(throwaway_user, d.public, 2)
        _wait_for(lambda: d.door.throttled == 38)
        assert d.door.accepted == 7
    finally:
        d.door.close()
        d.server.close()


def test_a_borrowed_connection_is_closed_and_logged(door: Door, caplog: pytest.LogCaptureFixture) -> None:
    """A child process writes on a connection its parent (this process) made: the bytes never reach
    the server, the connection ends, and the log names the process whose connection it was."""
    caplog.set_level(logging.WARNING, "broker.frontdoor")
    door.door.start()
    client = door.connect()
    client.sendall(b"hello")
    upstream, _ = door.server.accept()
    with upstream:
        upstream.settimeout(HANG_GUARD)
        assert upstream.recv(5) == b"hello"
        subprocess.run([sys.executable, "-c", "import os, sys; os.write(int(sys.argv[1]), b'borrowed')",
                        str(client.fileno())], pass_fds=(client.fileno(),), check=True, timeout=HANG_GUARD)
        assert upstream.recv(100) == b""  # nothing of it reached the server; the connection ended
    assert client.recv(1) == b""
    _wait_for(lambda: "another process wrote on it" in caplog.text)
    assert f"pid {os.getpid()} " in caplog.text
    assert door.door.connections == 0
    client.close()
