"""The byte pump, each test run against both twins (native epoll loop and pure-Python selectors loop).

Connections are real: an agent connects to a listening "front door" socket, the accepted fd and a fresh
connection to a listening "daemon" socket are handed to the pump, as the front door does.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import os
import select
import selectors
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker import _pump
from broker.errors import BrokerError

try:
    from broker._pump_native import NativePump
except ImportError:
    NativePump = None  # type: ignore[assignment,misc]

# A generous bound for waits that only guard against hangs; no test asserts on timing.
HANG_GUARD = 30.0


def _pure(on_close: _pump.OnClose) -> _pump.Pump:
    return _pump.PurePump(on_close)


def _native(on_close: _pump.OnClose) -> _pump.Pump:
    if NativePump is None:
        pytest.skip("broker._pump_native is not built (python setup.py build_ext --inplace)")
    return NativePump(on_close)


@pytest.fixture(params=[_native, _pure], ids=["native", "pure"])
def factory(request: pytest.FixtureRequest) -> Callable[[_pump.OnClose], _pump.Pump]:
    return request.param  # type: ignore[no-any-return]


class Closed:
    """Records on_close calls and lets a test wait for them."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.refused_writer: list[int] = []
        self.threads: set[str] = set()
        self._cond = threading.Condition()

    def __call__(self, pair_id: int, refused_writer: bool) -> None:
        with self._cond:
            self.ids.append(pair_id)
            if refused_writer:
                self.refused_writer.append(pair_id)
            self.threads.add(threading.current_thread().name)
            self._cond.notify_all()

    def wait(self, count: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.ids) >= count, HANG_GUARD), self.ids

    def assert_once_each(self) -> None:
        dupes = [i for i, n in collections.Counter(self.ids).items() if n > 1]
        assert not dupes, f"on_close called more than once for {dupes}"


class Wire:
    """A front-door listener and a daemon listener, both real Unix sockets."""

    def __init__(self, tmp: Path) -> None:
        self.front_path = str(tmp / "front.sock")
        self.daemon_path = str(tmp / "daemon.sock")
        self.front = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # As the front door does: accepted sockets inherit SO_PASSCRED, so no byte an agent writes
        # between accept and pump.add() arrives without its writer's credentials.
        self.front.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.front.bind(self.front_path)
        self.front.listen(512)
        self.daemon = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.daemon.bind(self.daemon_path)
        self.daemon.listen(512)
        self.opened: list[socket.socket] = []

    def open(self, pump: _pump.Pump, pair_id: int) -> tuple[socket.socket, socket.socket]:
        """Connect an agent, relay it through the pump; returns (agent end, daemon end)."""
        agent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        agent.connect(self.front_path)
        accepted, _ = self.front.accept()
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.connect(self.daemon_path)
        server, _ = self.daemon.accept()
        pump.add(pair_id, accepted.detach(), upstream.detach(), os.getpid())
        for s in (agent, server):
            s.settimeout(HANG_GUARD)
            self.opened.append(s)
        return agent, server

    def close(self) -> None:
        for s in [*self.opened, self.front, self.daemon]:
            s.close()


@pytest.fixture
def wire(tmp_path: Path) -> Iterator[Wire]:
    w = Wire(tmp_path)
    yield w
    w.close()


@pytest.fixture
def closed() -> Closed:
    return Closed()


@pytest.fixture
def pump(factory: Callable[[_pump.OnClose], _pump.Pump], closed: Closed) -> Iterator[_pump.Pump]:
    p = factory(closed)
    p.start()
    yield p
    p.stop()
    closed.assert_once_each()
    assert p.active == 0


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def run_threads(*targets: Callable[[], Any]) -> None:
    errors: list[BaseException] = []

    def guarded(fn: Callable[[], Any]) -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(t,)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_GUARD * 2)
        assert not t.is_alive()
    if errors:
        raise errors[0]


def test_echo(pump: _pump.Pump, wire: Wire, closed: Closed) -> None:
    agent, server = wire.open(pump, 7)
    agent.sendall(b"ping")
    assert server.recv(100) == b"ping"
    server.sendall(b"pong")
    assert agent.recv(100) == b"pong"
    assert pump.active == 1
    agent.close()
    assert server.recv(100) == b""  # the agent's EOF is forwarded
    server.close()
    closed.wait(1)
    assert closed.ids == [7]
    assert closed.refused_writer == []  # an ordinary end
    assert closed.threads == {"broker-pump"}
    assert pump.active == 0


def test_bulk_both_directions_at_once(pump: _pump.Pump, wire: Wire, closed: Closed) -> None:
    agent, server = wire.open(pump, 1)
    up, down = os.urandom(10 * 1024 * 1024), os.urandom(10 * 1024 * 1024)
    got: dict[str, bytes] = {}

    upload_done = threading.Event()

    def send(sock: socket.socket, data: bytes, after: threading.Event | None = None) -> None:
        sock.sendall(data)
        if after is not None:
            after.wait(HANG_GUARD)  # the daemon's EOF ends the pair, so it comes last, like a gRPC server's
        sock.shutdown(socket.SHUT_WR)

    def receive(sock: socket.socket, key: str, done: threading.Event | None = None) -> None:
        got[key] = recv_all(sock)
        if done is not None:
            done.set()

    run_threads(
        lambda: send(agent, up),
        lambda: send(server, down, after=upload_done),
        lambda: receive(server, "up", done=upload_done),
        lambda: receive(agent, "down"),
    )
    assert hashlib.sha256(got["up"]).hexdigest() == hashlib.sha256(up).hexdigest()
    assert hashlib.sha256(got["down"]).hexdigest() == hashlib.sha256(down).hexdigest()
    # Both directions forwarded EOF, so the pump closes the pair by itself.
    closed.wait(1)
    assert closed.ids == [1]


def test_half_close_still_gets_response(pump: _pump.Pump, wire: Wire, closed: Closed) -> None:
    agent, server = wire.open(pump, 3)
    agent.sendall(b"request")
    agent.shutdown(socket.SHUT_WR)
    assert recv_all(server) == b"request"
    assert pump.active == 1  # half-closed is still open
    server.sendall(b"response")
    server.close()
    assert recv_all(agent) == b"response"
    closed.wait(1)
    assert closed.ids == [3]


def test_daemon_closing_ends_the_pair_though_the_agent_stays_silent(pump: _pump.Pump, wire: Wire,
                                                                    closed: Closed) -> None:
    # The server let the connection go (gRPC's idle timeout, a shutdown): a client that never closes
    # must not keep the pair, and with it a connection slot, open.
    agent, server = wire.open(pump, 9)
    agent.sendall(b"request")
    assert server.recv(100) == b"request"
    server.sendall(b"last words")
    server.close()
    closed.wait(1)
    assert closed.ids == [9] and pump.active == 0
    assert recv_all(agent) == b"last words"  # flushed before the pair was closed


class _RefusingEpoll:
    """An epoll object whose first modify() fails with ENOMEM, as the kernel's can under memory pressure."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.refused = 0

    def modify(self, fd: int, mask: int) -> None:
        if not self.refused:
            self.refused += 1
            raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))
        self.real.modify(fd, mask)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class _RefusingSelector(selectors.EpollSelector):
    """The stdlib's epoll selector over a refusing epoll object, built before the pump's thread starts,
    so the refusal reaches the code under test through the selector's own error path (which unregisters
    the socket) and never races with the loop."""

    def __init__(self) -> None:
        super().__init__()
        self.epoll = _RefusingEpoll(self._selector)  # type: ignore[has-type]
        self._selector = self.epoll


def test_pure_pump_survives_epoll_refusing_a_change(wire: Wire) -> None:
    # The pair whose registration could not be changed is closed; the loop and every other pair live on.
    closed = Closed()
    selector = _RefusingSelector()
    pump = _pump.PurePump(closed, selector)
    pump.start()
    try:
        agent, server = wire.open(pump, 1)
        stuck_agent, _unread = wire.open(pump, 2)
        # Nobody reads the daemon end of pair 2. Pair 1 is idle, so the first modify() is pair 2's: it
        # comes at the latest when the daemon end's queue is full and the pump must wait for it to drain.
        # Blocking sends until the pump closes the pair: a send can only block for good if the pump
        # stopped reading without closing (a bug), which the hang guard turns into a failure. A
        # non-blocking loop would stop at the first transient EAGAIN, possibly before the pump ever
        # needed a modify (the flake this replaces).
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while not closed.ids:
                stuck_agent.sendall(bytes(65536))
        closed.wait(1)
        assert closed.ids == [2]
        assert selector.epoll.refused == 1
        agent.sendall(b"ping")
        assert server.recv(100) == b"ping"
        server.sendall(b"pong")
        assert agent.recv(100) == b"pong"
    finally:
        pump.stop()
    closed.assert_once_each()
    assert sorted(closed.ids) == [1, 2]


@pytest.mark.parametrize("resetting_side", ["daemon", "agent"])
def test_peer_reset_closes_both(pump: _pump.Pump, wire: Wire, closed: Closed, resetting_side: str) -> None:
    agent, server = wire.open(pump, 5)
    sender, resetter = (agent, server) if resetting_side == "daemon" else (server, agent)
    sender.sendall(b"unread")
    # Wait until the bytes sit in the resetter's queue, then close without reading them: on a Unix
    # socket that gives the peer (the pump) ECONNRESET.
    assert resetter.recv(6, socket.MSG_PEEK) == b"unread"
    resetter.close()
    closed.wait(1)
    with contextlib.suppress(ConnectionResetError):
        assert sender.recv(100) == b""
    assert closed.ids == [5]
    assert pump.active == 0


def test_many_pairs(pump: _pump.Pump, wire: Wire, closed: Closed) -> None:
    n = 200
    ends = [wire.open(pump, i) for i in range(n)]
    assert pump.active == n
    for i, (agent, _) in enumerate(ends):
        agent.sendall(b"req-%d" % i)
    for i, (_, server) in enumerate(ends):
        assert server.recv(100) == b"req-%d" % i
        server.sendall(b"resp-%d" % i)
    for i, (agent, server) in enumerate(ends):
        assert agent.recv(100) == b"resp-%d" % i
        # Close from alternating sides so both EOF paths run; the other side sees the EOF.
        closer, other = (agent, server) if i % 2 else (server, agent)
        closer.close()
        assert other.recv(100) == b""
        other.close()
    closed.wait(n)
    assert sorted(closed.ids) == list(range(n))


def test_no_fd_leak(factory: Callable[[_pump.OnClose], _pump.Pump], wire: Wire) -> None:
    closed = Closed()
    before = fd_count()
    pump = factory(closed)
    pump.start()
    ends = [wire.open(pump, i) for i in range(30)]
    for i, (agent, server) in enumerate(ends):
        agent.sendall(b"x")
        assert server.recv(1) == b"x"
        if i % 3 == 0:
            agent.close()  # clean close from the agent
            server.close()
        elif i % 3 == 1:
            agent.sendall(b"unread")
            assert server.recv(6, socket.MSG_PEEK) == b"unread"
            server.close()  # reset
    closed.wait(20)
    pump.stop()  # the last third is still open
    closed.wait(30)
    closed.assert_once_each()
    for agent, server in ends:
        agent.close()
        server.close()
    wire.opened.clear()
    assert fd_count() == before


def test_stop_closes_open_pairs(
    factory: Callable[[_pump.OnClose], _pump.Pump], wire: Wire, closed: Closed
) -> None:
    pump = factory(closed)
    pump.start()
    ends = [wire.open(pump, i) for i in range(5)]
    pump.stop()
    assert sorted(closed.ids) == list(range(5))
    assert pump.active == 0
    for agent, server in ends:
        assert agent.recv(10) == b""
        assert server.recv(10) == b""
    pump.stop()  # idempotent
    assert len(closed.ids) == 5


def test_stop_without_start_closes_queued(
    factory: Callable[[_pump.OnClose], _pump.Pump], closed: Closed
) -> None:
    before = fd_count()
    pump = factory(closed)
    mine, theirs = socket.socketpair()
    pump.add(9, theirs.detach(), os.dup(mine.fileno()), os.getpid())
    pump.stop()
    assert closed.ids == [9]
    assert closed.threads == {threading.current_thread().name}
    with pytest.raises(BrokerError):
        pump.start()
    mine.close()
    assert fd_count() == before


def test_add_after_stop_raises_and_leaves_fds(
    factory: Callable[[_pump.OnClose], _pump.Pump], closed: Closed
) -> None:
    pump = factory(closed)
    pump.start()
    pump.stop()
    a, b = socket.socketpair()
    with pytest.raises(BrokerError):
        pump.add(1, a.fileno(), b.fileno(), os.getpid())
    # The fds are still the caller's, unchanged, and still work.
    assert a.getblocking()
    assert b.getblocking()
    a.sendall(b"ok")
    assert b.recv(2) == b"ok"
    a.close()
    b.close()
    assert closed.ids == []


def test_backpressure_blocks_writer(pump: _pump.Pump, wire: Wire, closed: Closed) -> None:
    agent, server = wire.open(pump, 2)
    agent.setblocking(False)
    chunk = os.urandom(65536)
    sent = 0
    offered = hashlib.sha256()
    while sent < 64 * 1024 * 1024:
        try:
            n = agent.send(chunk)
            offered.update(chunk[:n])
            sent += n
        except BlockingIOError:
            # Writable again soon means the pump still drains into the daemon's socket; a long wait
            # means everything between the two ends is full. The wait only tells the two apart.
            _, writable, _ = select.select([], [agent], [], 1.0)
            if not writable:
                break
    # Two kernel socket buffers and the pump's 64 KiB: far below what the writer offered.
    assert sent < 4 * 1024 * 1024, f"pump accepted {sent} bytes from a stalled path"
    agent.setblocking(True)
    agent.shutdown(socket.SHUT_WR)
    assert hashlib.sha256(recv_all(server)).digest() == offered.digest()
    server.close()
    closed.wait(1)


def test_callback_errors_are_ignored(factory: Callable[[_pump.OnClose], _pump.Pump], wire: Wire) -> None:
    seen: list[int] = []

    def on_close(pair_id: int, refused_writer: bool) -> None:
        seen.append(pair_id)
        raise RuntimeError("faulty callback")

    pump = factory(on_close)
    pump.start()
    agent, server = wire.open(pump, 1)
    agent.close()
    server.close()
    agent, server = wire.open(pump, 2)  # the loop survived the first callback
    agent.sendall(b"still relaying")
    assert server.recv(100) == b"still relaying"
    pump.stop()
    assert sorted(seen) == [1, 2]


def test_stop_from_on_close(factory: Callable[[_pump.OnClose], _pump.Pump], wire: Wire) -> None:
    holder: list[_pump.Pump] = []
    seen: list[int] = []

    def on_close(pair_id: int, refused_writer: bool) -> None:
        seen.append(pair_id)
        holder[0].stop()  # must not deadlock: the pump thread cannot join itself

    pump = factory(on_close)
    holder.append(pump)
    pump.start()
    a1, s1 = wire.open(pump, 1)
    wire.open(pump, 2)
    a1.close()
    s1.close()
    pump.stop()
    assert sorted(seen) == [1, 2]


def test_non_stream_fds_are_refused_and_left_to_caller(
    factory: Callable[[_pump.OnClose], _pump.Pump], closed: Closed, tmp_path: Path
) -> None:
    pump = factory(closed)
    pump.start()
    regular = os.open(tmp_path / "f", os.O_CREAT | os.O_RDWR)
    mine, theirs = socket.socketpair()
    with pytest.raises(OSError):
        pump.add(4, theirs.fileno(), regular, os.getpid())
    d1, d2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with pytest.raises(ValueError):
        pump.add(5, theirs.fileno(), d1.fileno(), os.getpid())
    pump.stop()
    assert closed.ids == []
    # Still the caller's, unchanged: blocking and working.
    assert theirs.getblocking()
    mine.sendall(b"ok")
    assert theirs.recv(2) == b"ok"
    os.fstat(regular)
    for s in (mine, theirs, d1, d2):
        s.close()
    os.close(regular)


def test_invalid_fds_rejected(factory: Callable[[_pump.OnClose], _pump.Pump], closed: Closed) -> None:
    pump = factory(closed)
    with pytest.raises(ValueError):
        pump.add(1, 3, 3, os.getpid())
    with pytest.raises(ValueError):
        pump.add(1, -1, 3, os.getpid())
    pump.stop()


def test_twins_expose_the_same_interface() -> None:
    if NativePump is None:
        pytest.skip("broker._pump_native is not built")

    def public(cls: type) -> set[str]:
        return {n for n in dir(cls) if not n.startswith("_")}

    assert public(NativePump) == public(_pump.PurePump) == {"start", "add", "stop", "active"}


@pytest.mark.parametrize(("env", "expected"), [({"BROKER_PUREPYTHON": "1"}, "pure"), ({}, None)])
def test_backend_selection(env: dict[str, str], expected: str | None) -> None:
    if expected is None:
        expected = "pure" if NativePump is None else "native"
    clean = {k: v for k, v in os.environ.items() if k != "BROKER_PUREPYTHON"}
    code = "import broker._pump as p; print(p.BACKEND, type(p.make_pump(print)).__name__)"
    out = subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [expected, "NativePump" if expected == "native" else "PurePump"]


# --- the sender of the agent's bytes ----------------------------------------------------------------

_UCRED = struct.Struct("3i")


def write_from_another_process(sock: socket.socket, data: bytes) -> int:
    """Write ``data`` to ``sock`` from a child process that inherited it; returns the child's pid."""
    child = subprocess.run(
        [sys.executable, "-c", "import os, sys; print(os.getpid()); os.write(int(sys.argv[1]), sys.argv[2].encode())",
         str(sock.fileno()), data.decode()],
        pass_fds=(sock.fileno(),), capture_output=True, text=True, check=True, timeout=HANG_GUARD)
    return int(child.stdout)


def read_with_writers(sock: socket.socket) -> list[tuple[int, bytes]]:
    """Every queued byte, read by recvmsg, as (writer pid, bytes) per read."""
    reads = []
    sock.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            data, anc, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
            assert [(lvl, kind) for lvl, kind, _ in anc] == [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS)]
            reads.append((_UCRED.unpack(anc[0][2])[0], data))
    return reads


def test_kernel_never_merges_two_writers_into_one_read(tmp_path: Path) -> None:
    """The property the pump's sender check rests on, checked on the running kernel.

    With SO_PASSCRED on the reader, unix_stream_read_generic() (net/unix/af_unix.c) copies queued skbs
    into one read only while their writer's pid, uid and gid stay the same ("Never glue messages from
    different writers"). The writer's credentials are attached at write time when either end asked for
    them or the receiving end is not accepted yet (unix_passcred_enabled), and a connection inherits
    SO_PASSCRED from its listener when it is made, so bytes written before accept are attributed too.
    """
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        listener.bind(path)
        listener.listen()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as agent:
            agent.connect(path)
            agent.sendall(b"mine-1")
            first = write_from_another_process(agent, b"theirs-1")  # queued before accept
            accepted, _ = listener.accept()
            with accepted:
                agent.sendall(b"mine-2")
                second = write_from_another_process(agent, b"theirs-2")
                agent.sendall(b"mine-3")
                agent.sendall(b"mine-4")  # same writer twice in a row: one read may carry both
                me = os.getpid()
                assert read_with_writers(accepted) == [
                    (me, b"mine-1"), (first, b"theirs-1"), (me, b"mine-2"), (second, b"theirs-2"),
                    (me, b"mine-3mine-4")]


@pytest.mark.parametrize("listener_passcred", ["never", "after the connection was made"])
def test_bytes_written_after_accept_without_passcred_have_no_writer(tmp_path: Path, listener_passcred: str) -> None:
    """Why the listener has SO_PASSCRED before listen(2) (bind_public; PassCredentials=yes in
    broker.socket): once accepted, a socket that has not asked for credentials gets bytes with no writer
    attached (pid 0), which the pump refuses; and a connection takes the flag from its listener when it
    is made (unix_stream_connect), not when it is accepted."""
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as agent:
            agent.connect(path)
            if listener_passcred != "never":
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            accepted, _ = listener.accept()
            assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED) == 0
            with accepted:
                agent.sendall(b"early")
                accepted.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
                agent.sendall(b"late")
                assert read_with_writers(accepted) == [(0, b"early"), (os.getpid(), b"late")]


def test_bytes_from_another_process_close_the_pair(pump: _pump.Pump, wire: Wire, closed: Closed) -> None:
    agent, server = wire.open(pump, 3)
    agent.sendall(b"mine")
    assert server.recv(100) == b"mine"
    # A forked child (or anyone the fd reached) writes on the connection: the pair ends, and not one of
    # its bytes reaches the daemon.
    write_from_another_process(agent, b"borrowed")
    closed.wait(1)
    assert server.recv(100) == b""
    assert agent.recv(100) == b""
    assert closed.ids == closed.refused_writer == [3]  # reported as such


def test_bytes_from_another_process_are_refused_even_when_queued_before_the_pump(
        pump: _pump.Pump, wire: Wire, closed: Closed) -> None:
    agent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    agent.settimeout(HANG_GUARD)
    wire.opened.append(agent)
    agent.connect(wire.front_path)
    agent.sendall(b"mine")
    write_from_another_process(agent, b"borrowed")  # before accept
    accepted, _ = wire.front.accept()
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    upstream.connect(wire.daemon_path)
    server, _ = wire.daemon.accept()
    server.settimeout(HANG_GUARD)
    wire.opened.append(server)
    pump.add(4, accepted.detach(), upstream.detach(), os.getpid())
    closed.wait(1)
    assert recv_all(server) == b"mine"
    assert closed.refused_writer == [4]


def test_every_thread_of_the_sender_is_the_sender(pump: _pump.Pump, wire: Wire, closed: Closed) -> None:
    agent, server = wire.open(pump, 5)
    run_threads(*[lambda i=i: agent.sendall(b"%d" % i) for i in range(4)])  # type: ignore[misc]
    got = b""
    while len(got) < 4:
        got += server.recv(100)
    assert sorted(got) == sorted(b"0123")
    assert closed.ids == []


def test_passed_descriptors_close_the_pair_and_never_land_here(
        pump: _pump.Pump, wire: Wire, closed: Closed, tmp_path: Path) -> None:
    agent, server = wire.open(pump, 6)
    before = fd_count()
    with open(tmp_path / "passed", "w") as f:
        agent.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", f.fileno()))])
        closed.wait(1)
    assert server.recv(100) == b""
    assert closed.refused_writer == [6]
    # The pair's two fds are gone, the file we passed was closed above, and no copy of it was installed.
    assert fd_count() == before - 2


@pytest.mark.parametrize("sender", [0, -1, 2**31])
def test_sender_must_be_a_pid(factory: Callable[[_pump.OnClose], _pump.Pump], closed: Closed,
                              sender: int) -> None:
    pump = factory(closed)
    a, b = socket.socketpair()
    with pytest.raises(ValueError):
        pump.add(1, a.fileno(), b.fileno(), sender)
    assert a.getblocking()
    pump.stop()
    a.close()
    b.close()
