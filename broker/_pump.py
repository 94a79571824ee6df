"""The byte pump behind the front door: relays each (agent socket, daemon socket) pair until it ends.

Two twins implement one :class:`Pump` interface and one state machine:

* ``broker._pump_native`` (native/pump.pyx): an epoll loop that moves bytes with the GIL released;
* :class:`PurePump` below: the same loop on :mod:`selectors`, holding the GIL like any Python code.

:func:`make_pump` returns the native twin when it is built, else the pure one; ``BACKEND`` says which
(``"native"`` or ``"pure"``) so the daemon can log it, and ``BROKER_PUREPYTHON=1`` in the environment
forces the pure one.

Semantics shared by both twins (the tests run against each):

* ``add(pair_id, a, b, sender)`` takes ownership of two connected stream sockets; if it raises, the fds
  are still the caller's. After ``stop()`` it raises :class:`~broker.errors.BrokerError`.
* Every byte relayed from the agent (``a``) must have been written by process ``sender`` (the pid the
  front door pinned at accept). The pump sets ``SO_PASSCRED`` on ``a`` and reads it with ``recvmsg``,
  so the kernel attaches the writer's process id (its thread group id: every thread of one process
  counts as that process) to each read. A read whose writer is any other process (a forked child, or
  anyone the fd was passed to), or that carries no credentials, or that carries anything more (passed
  file descriptors) closes the pair before a byte of it is relayed. This holds per read because the
  kernel never merges data from different writers into one read on a Unix stream socket when the
  reader asked for credentials: ``unix_stream_read_generic()`` (net/unix/af_unix.c) takes the first
  queued skb's credentials and stops at the first skb whose pid, uid or gid differs
  ("Never glue messages from different writers"). tests/test_pump.py checks that on the running kernel.
* Each direction has a 64 KiB buffer. A side is read only while its buffer has room, so a slow reader
  stalls the writer in the kernel instead of growing the pump's memory.
* EOF from one side is forwarded, once its buffer is flushed, as ``shutdown(SHUT_WR)`` on the other.
  The agent (``a``) may half-close and still get its answers; the daemon (``b``) never half-closes a
  gRPC connection, so once its EOF has reached the agent the pair is closed, whether or not the agent
  ever closes: a silent client cannot keep a connection (and its slot) after the server let it go.
  Any socket error (ECONNRESET, EPIPE, ...) closes both fds at once, dropping buffered bytes.
* ``on_close(pair_id, refused_writer)`` runs exactly once per pair, on the pump thread (or, if the pump
  was never started, on the thread calling ``stop()``); ``refused_writer`` is True when the pair was
  closed because another process than ``sender`` wrote on it (or passed descriptors). Whatever it
  raises is swallowed silently: a faulty callback must not stop the relaying of every other connection.
* ``stop()`` closes every pair, reports each, joins the thread; it is idempotent. Called from inside
  ``on_close`` it only requests the stop, since a thread cannot join itself.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import struct
import threading
from collections.abc import Callable
from typing import Final, Protocol

from broker.errors import BrokerError

__all__ = ["BACKEND", "BUF_SIZE", "OnClose", "Pump", "PurePump", "make_pump"]

#: Bytes buffered per direction of a pair; also the most the pump ever holds for one direction.
BUF_SIZE: Final = 65536
_UCRED: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid
# Room for exactly one SCM_CREDENTIALS message: passed descriptors that would follow it cannot fit, so the
# kernel never installs them in our process (it sets MSG_CTRUNC and drops them), and we close the pair.
_CRED_SPACE: Final = socket.CMSG_SPACE(_UCRED.size)

#: ``on_close(pair_id, refused_writer)``: see the module docstring.
OnClose = Callable[[int, bool], None]


class Pump(Protocol):
    """What the front door needs from a pump."""

    def start(self) -> None: ...

    def add(self, pair_id: int, a: int, b: int, sender: int) -> None: ...

    def stop(self) -> None: ...

    @property
    def active(self) -> int: ...


class _Half:
    """One direction: bytes read from socks[d] wait in buf[start:end] until written to socks[1 - d]."""

    __slots__ = ("buf", "done", "end", "eof", "start")

    def __init__(self) -> None:
        self.buf = memoryview(bytearray(BUF_SIZE))
        self.start = 0
        self.end = 0
        self.eof = False  # the source sent EOF; nothing more will be read from it
        self.done = False  # EOF seen, every buffered byte written, destination shut down for writing


class _RefusedWriter(OSError):
    """A read from the agent that its sender did not write (alone): the pair ends like on a socket error."""


class _Pair:
    __slots__ = ("closed", "events", "halves", "pair_id", "refused_writer", "sender", "socks")

    def __init__(self, pair_id: int, socks: tuple[socket.socket, socket.socket], sender: int) -> None:
        self.pair_id = pair_id
        self.sender = sender  # the only process whose bytes on socks[0] are relayed
        self.socks = socks
        self.halves = (_Half(), _Half())
        self.events = [0, 0]  # interest registered in the selector for socks[i]; 0 means not registered
        self.closed = False
        self.refused_writer = False


def _flush(pair: _Pair, d: int) -> None:
    """Write direction d's buffered bytes to socks[1 - d]; forward EOF once empty. Raises OSError."""
    h = pair.halves[d]
    dst = pair.socks[1 - d]
    while h.start < h.end:
        try:
            # MSG_NOSIGNAL: a vanished peer must surface as EPIPE, not as a process-wide SIGPIPE.
            h.start += dst.send(h.buf[h.start : h.end], socket.MSG_NOSIGNAL)
        except BlockingIOError:
            return
    # Rewind so the next read gets the whole buffer: a direction stops reading only when it is full
    # and resumes as soon as it drains, so a linear buffer is enough.
    h.start = h.end = 0
    if h.eof and not h.done:
        dst.shutdown(socket.SHUT_WR)
        h.done = True


def _fill(pair: _Pair, d: int) -> None:
    """Read once from socks[d], then pass the bytes on. Raises OSError.

    One read per readiness event, not a drain: the selector is level-triggered, so leftover bytes are
    reported again, and a small RPC costs one recv instead of two.
    """
    h = pair.halves[d]
    try:
        if d == 0:
            n = _recv_attested(pair.socks[0], h.buf[h.end :], pair.sender)
        else:
            n = pair.socks[1].recv_into(h.buf[h.end :])
    except BlockingIOError:
        return
    if n == 0:
        h.eof = True
    h.end += n
    _flush(pair, d)


def _recv_attested(sock: socket.socket, into: memoryview, sender: int) -> int:
    """One read from the agent; raises _RefusedWriter unless process ``sender`` wrote all of it."""
    n, ancillary, flags, _ = sock.recvmsg_into([into], _CRED_SPACE, socket.MSG_CMSG_CLOEXEC)
    if n == 0:
        return 0  # EOF carries no credentials and no bytes: nothing to attribute
    # Fail closed: exactly one credentials message, nothing truncated (passed fds), and the pinned pid.
    if flags & socket.MSG_CTRUNC or len(ancillary) != 1:
        raise _RefusedWriter(errno.EPERM, "unexpected ancillary data from the agent")
    level, kind, data = ancillary[0]
    if (level, kind, len(data)) != (socket.SOL_SOCKET, socket.SCM_CREDENTIALS, _UCRED.size):
        raise _RefusedWriter(errno.EPERM, "unexpected ancillary data from the agent")
    if _UCRED.unpack(data)[0] != sender:
        raise _RefusedWriter(errno.EPERM, "bytes written by another process than the one that connected")
    return n


def _wanted(pair: _Pair, side: int) -> int:
    """Interest socks[side] needs now: readable while its direction has room, writable while the
    opposite direction holds bytes for it."""
    want = 0
    h = pair.halves[side]
    if not h.eof and h.end < BUF_SIZE:
        want |= selectors.EVENT_READ
    other = pair.halves[1 - side]
    if other.start < other.end:
        want |= selectors.EVENT_WRITE
    return want


class PurePump:
    """The pure-Python twin of ``broker._pump_native.NativePump``."""

    def __init__(
        self, on_close: OnClose, selector: selectors.BaseSelector | None = None
    ) -> None:
        """``selector`` (default: a new ``EpollSelector``) becomes the pump's own; it is closed by
        ``stop()``. Injectable so that tests can make the kernel's refusals happen on cue."""
        self._on_close = on_close
        self._selector = selector if selector is not None else selectors.EpollSelector()
        self._wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._selector.register(self._wakeup, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        # Guarded by _lock: written by add()/stop() on caller threads, read by the loop thread.
        self._pending: list[_Pair] = []
        self._active = 0
        self._stopping = False
        # Owned by the loop thread alone once it runs.
        self._open: set[_Pair] = set()
        self._closed: list[_Pair] = []
        self._thread: threading.Thread | None = None
        self._fds_closed = False

    @property
    def active(self) -> int:
        """Pairs added and not yet closed (queued ones included)."""
        with self._lock:
            return self._active

    def start(self) -> None:
        """Start the loop thread. Raises BrokerError if already started or stopped."""
        if self._thread is not None or self._stopping:
            raise BrokerError("pump already started or stopped")
        # A daemon thread, so that a process exiting without stop() is not held up by the loop.
        self._thread = threading.Thread(target=self._run, name="broker-pump", daemon=True)
        self._thread.start()

    def add(self, pair_id: int, a: int, b: int, sender: int) -> None:
        """Take ownership of the connected sockets a and b and relay between them; only bytes that
        process ``sender`` wrote to a are relayed (see the module docstring).

        On any exception the fds stay the caller's to close. Raises BrokerError after stop().
        """
        if a < 0 or b < 0 or a == b:
            raise ValueError("a and b must be two distinct open file descriptors")
        if not 0 < sender < 2**31:
            raise ValueError("sender must be a process id")
        if not -(2**63) <= pair_id < 2**63:
            # The native twin stores the id as a C long long; keep the contracts identical.
            raise OverflowError("pair_id does not fit in 64 bits")
        socks: list[socket.socket] = []
        try:
            # Both checked before either is touched, so a rejected pair leaves the caller's fds as they
            # were. socket.socket(fileno=...) raises ENOTSOCK for anything but a socket.
            for fd in (a, b):
                socks.append(socket.socket(fileno=fd))
                if socks[-1].type != socket.SOCK_STREAM:
                    raise ValueError("the pump relays stream sockets only")
            pair = _Pair(pair_id, (socks[0], socks[1]), sender)
            with self._lock:
                if self._stopping:
                    raise BrokerError("pump is stopped")
                # The fds are changed only once the pair is sure to be accepted (under the lock, so a
                # concurrent stop() cannot intervene). Non-blocking: the loop must never sleep in
                # recv/send. Not inheritable: no child may receive an agent's connection. SO_PASSCRED:
                # the kernel names the writer of every read from the agent.
                socks[0].setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
                for s in socks:
                    s.setblocking(False)
                    s.set_inheritable(False)
                # Only the first pair queued since the loop last drained needs a wakeup: a burst of
                # accepts costs one eventfd write.
                if not self._pending:
                    os.eventfd_write(self._wakeup, 1)
                self._pending.append(pair)
                self._active += 1
        except BaseException:
            for s in socks:
                s.detach()  # ownership stays with the caller
            raise

    def stop(self) -> None:
        """Close every pair (on_close runs for each), then join the loop thread. Idempotent."""
        with self._lock:
            first = not self._stopping
            self._stopping = True
            if first and self._thread is not None and not self._fds_closed:
                os.eventfd_write(self._wakeup, 1)
        if self._thread is None:
            if first:
                # Never started: close what add() queued, on the caller's thread.
                with self._lock:
                    queued, self._pending = self._pending, []
                for pair in queued:
                    self._open.add(pair)
                    self._close(pair)
                with self._lock:
                    self._close_fds()
                self._report_closed()
            return
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        try:
            while not self._serve_once():
                pass
        finally:
            # Stopping, or a bug surfaced as an exception: either way no pair survives the loop.
            with self._lock:
                self._stopping = True
            self._drain_wakeup()
            for pair in list(self._open):
                self._close(pair)
            with self._lock:
                self._close_fds()
            self._report_closed()

    def _serve_once(self) -> bool:
        """Wait for and handle one batch of events; True once stop() was requested."""
        woken = False
        for key, ready in self._selector.select():
            if key.data is None:
                woken = True
                continue
            pair, side = key.data
            # A pair closed earlier in this batch is skipped; it is reported after the batch.
            if not pair.closed:
                self._service(pair, side, ready)
        stop = woken and self._drain_wakeup()
        # After the wakeup too: a queued pair that epoll refused is closed there.
        self._report_closed()
        return stop

    def _drain_wakeup(self) -> bool:
        """Register the pairs queued by add(); True when stop() was requested."""
        with self._lock:
            # Resetting the counter under the lock keeps add()'s "wake only if the queue was empty" exact.
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._wakeup)
            queued, self._pending = self._pending, []
            stop = self._stopping
        for pair in queued:
            self._open.add(pair)
            try:
                self._rearm(pair)
            except (OSError, ValueError):
                # Not a pollable file: this pair cannot be relayed, the others can.
                self._close(pair)
        return stop

    def _service(self, pair: _Pair, side: int, ready: int) -> None:
        """Act on readiness of socks[side]; closes the pair when it is finished or broken."""
        interest = pair.events[side]
        try:
            # The selector reports HUP and ERR as both readable and writable: the pending operation
            # meets the condition and raises the socket's errno, exactly as in the native twin.
            if ready & interest & selectors.EVENT_WRITE:
                _flush(pair, 1 - side)
            if ready & interest & selectors.EVENT_READ:
                _fill(pair, side)
            if not pair.halves[1].done:  # the daemon's EOF, delivered to the agent, ends the pair
                self._rearm(pair)
                return
        except _RefusedWriter:
            pair.refused_writer = True
        except OSError:
            pass  # any socket error ends the pair, below
        self._close(pair)

    def _rearm(self, pair: _Pair) -> None:
        """Bring each socket's selector registration in line with what the pair needs now."""
        for side in (0, 1):
            want = _wanted(pair, side)
            have = pair.events[side]
            if want == have:
                continue
            sock = pair.socks[side]
            try:
                if want == 0:
                    # Unregistered rather than left with an empty mask: epoll reports HUP regardless of
                    # the mask, and a level-triggered HUP nobody acts on would spin the loop.
                    self._selector.unregister(sock)
                elif have == 0:
                    self._selector.register(sock, want, (pair, side))
                else:
                    self._selector.modify(sock, want, (pair, side))
            except BaseException:
                # A register or modify that epoll refuses leaves the socket unregistered (selectors
                # drops it): the books must say so, or closing the pair would unregister it twice.
                pair.events[side] = 0
                raise
            pair.events[side] = want

    def _close(self, pair: _Pair) -> None:
        """Close both sockets now and queue the pair for reporting after the batch."""
        for side in (0, 1):
            if pair.events[side]:
                self._selector.unregister(pair.socks[side])
                pair.events[side] = 0
            pair.socks[side].close()
        pair.closed = True
        self._open.discard(pair)
        self._closed.append(pair)
        with self._lock:
            self._active -= 1

    def _report_closed(self) -> None:
        closed, self._closed = self._closed, []
        for pair in closed:
            # Documented: the callback's failures are its own; the loop keeps relaying.
            with contextlib.suppress(BaseException):
                self._on_close(pair.pair_id, pair.refused_writer)

    def _close_fds(self) -> None:
        # After the loop has ended (caller holds the lock): nothing refers to the selector any more.
        if not self._fds_closed:
            self._fds_closed = True
            self._selector.close()
            os.close(self._wakeup)


def _load() -> tuple[Callable[[OnClose], Pump], str]:
    if os.environ.get("BROKER_PUREPYTHON") == "1":
        return PurePump, "pure"
    try:
        # Imported lazily: the extension is optional, and the environment may forbid it.
        from broker._pump_native import NativePump  # noqa: PLC0415
    except ImportError:
        return PurePump, "pure"
    return NativePump, "native"


_FACTORY, BACKEND = _load()


def make_pump(on_close: OnClose) -> Pump:
    """A new, not yet started pump of the loaded backend (see ``BACKEND``)."""
    return _FACTORY(on_close)
