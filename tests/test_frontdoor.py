"""The front door on its own: real Unix sockets on both sides, no gRPC. Failure paths of admission."""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import frontdoor
from broker.frontdoor import FrontDoor

HANG_GUARD = 10.0


class Door:
    def __init__(self, tmp: Path, max_per_uid: int) -> None:
        self.public = str(tmp / "public.sock")
        internal = str(tmp / "internal.sock")
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(internal)
        self.server.listen(64)
        self.server.settimeout(HANG_GUARD)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.public)
        listener.listen(64)
        self.door = FrontDoor(listener, internal, max_connections=64, max_per_uid=max_per_uid)

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
