"""The front door: the public Unix socket, where the kernel tells us who is calling.

grpcio cannot tell a servicer the peer credentials of a Unix-socket client (``peer()`` is just
``unix:``). So the daemon accepts on the public socket itself, reads ``SO_PEERCRED``, and relays the
connection's bytes to the internal gRPC server from an upstream socket bound to a fresh, random abstract
name. The server's ``context.peer()`` then reads ``unix-abstract:<name>``, which :meth:`FrontDoor.lookup`
maps back to the credentials recorded at accept.

Accepting happens on a dedicated thread (blocking ``accept(2)`` releases the GIL); moving bytes happens in
the pump (``broker._pump``: native, GIL-free, or its pure twin), so the relay never competes with request
handlers on the event loop.

The listener carries ``SO_PASSCRED`` from before ``listen(2)`` (``bind_public``; ``PassCredentials=yes`` in
broker.socket), and each connection inherits it when it is made, so the kernel names the writer of every
byte an agent sends, from its first byte on; the pump relays only bytes written by the process that
connected (see ``broker._pump``). A connection queued before the listener had it would not inherit it:
its bytes written between accept and the pump taking it carry no writer, and it is closed (fail closed).

Each uid may open connections at :data:`ACCEPT_RATE` per second with bursts of :data:`ACCEPT_BURST`
(a token bucket per uid, on an injected clock). A uid over its rate has each new connection closed at
once, before any further work: churning connect/close from one uid cannot crowd out the others.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import secrets
import select
import socket
import stat
import threading
import time
from collections.abc import Callable
from typing import Final

from broker import _pump
from broker.attest import PeerCred, peer_cred, peer_uid
from broker.errors import AttestationError, BrokerError

log = logging.getLogger(__name__)

_ABSTRACT_PREFIX: Final = "broker-"
_PEER_PREFIX: Final = "unix-abstract:"
BACKLOG: Final = 1024
# Connections accepted per wake-up of the accept thread before it checks for a stop request again.
ACCEPT_BATCH: Final = 256
#: Sustained new connections per second per uid, and the burst a uid may open at once. A client keeps
#: one connection for many calls; these leave room for many short-lived clients (CLI calls, tool runs)
#: while keeping one uid's churn to a small share of the accept thread.
ACCEPT_RATE: Final = 20.0
ACCEPT_BURST: Final = 64
# Buckets of uids idle this long are full again and are forgotten, so the map stays small.
_BUCKET_IDLE: Final = ACCEPT_BURST / ACCEPT_RATE


class AcceptRate:
    """Token buckets per uid: ``rate`` connections per second, up to ``burst`` at once.

    Not thread-safe: only the accept thread uses it. Time comes from ``clock`` (seconds, monotonic).
    """

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._buckets: dict[int, tuple[float, float]] = {}  # uid -> (tokens, time of last update)
        self._swept = clock()

    def admit(self, uid: int) -> bool:
        """Take one token from ``uid``'s bucket; False when it is empty."""
        now = self._clock()
        tokens, then = self._buckets.get(uid, (self._burst, now))
        tokens = min(self._burst, tokens + (now - then) * self._rate)
        admitted = tokens >= 1.0
        self._buckets[uid] = (tokens - 1.0 if admitted else tokens, now)
        if now - self._swept > _BUCKET_IDLE:
            self._swept = now
            # A bucket untouched for longer than it takes to refill is full: same as no entry.
            horizon = now - self._burst / self._rate
            self._buckets = {u: b for u, b in self._buckets.items() if b[1] > horizon}
        return admitted


def _in_use(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return False  # ECONNREFUSED: nobody listens; the file is left over from a crash
        return True


def remove_stale_socket(path: str) -> None:
    """Make way for binding ``path``: remove a socket file left by a crashed run, and nothing else."""
    with contextlib.suppress(FileNotFoundError):
        # Never delete something that is not a socket, nor a socket another daemon still serves (its
        # clients would silently lose their broker, or its scraper would silently read ours).
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise BrokerError(f"{path} exists and is not a socket; refusing to replace it")
        if _in_use(path):
            raise BrokerError(f"{path} is in use by a running broker; stop it first")
        os.unlink(path)


def bind_public(path: str) -> socket.socket:
    """Bind and listen on the public socket. Anyone may connect: identity comes from the kernel."""
    parent = os.path.dirname(path)
    os.makedirs(parent, mode=0o755, exist_ok=True)
    remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        # Before listen(2): connections inherit it when made, so none can be queued without it.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.bind(path)
        os.chmod(path, 0o666)  # noqa: S103 - public by design: identity comes from SO_PEERCRED
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise BrokerError(f"cannot listen on {path}: {exc.strerror}") from None
    return sock


def file_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path`` now, to recognise it later."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def unlink_if_same(path: str, identity: tuple[int, int] | None) -> None:
    """Remove the socket file at shutdown, unless it is no longer the one we bound (another daemon's)."""
    if identity is not None and file_identity(path) == identity:
        with contextlib.suppress(OSError):
            os.unlink(path)


class FrontDoor:
    """Accepts on ``listener`` and relays each connection to the gRPC server at ``internal_path``."""

    def __init__(self, listener: socket.socket, internal_path: str, max_connections: int,
                 max_per_uid: int | None = None, *, accept_rate: float = ACCEPT_RATE,
                 accept_burst: int = ACCEPT_BURST, clock: Callable[[], float] = time.monotonic) -> None:
        self._listener = listener
        # Normally set already (bind_public, broker.socket); for any other listener, from here on. Each
        # connection inherits it when made, so the bytes an agent writes before the pump takes its socket
        # still carry their writer (set on the accepted socket only, they would carry none).
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._rate = AcceptRate(accept_rate, accept_burst, clock)
        # Non-blocking, so a connection that vanished between poll and accept cannot stall the thread.
        listener.setblocking(False)
        # stop_accepting() wakes the poll through this pipe. Never shutdown(2) the listener: when
        # systemd passed it in (broker.socket), that would break the socket for every later start.
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._internal = internal_path
        self._max = max_connections
        self._max_per_uid = max_per_uid or max_connections
        self._per_uid: dict[int, int] = {}
        self._ids = itertools.count(1)
        # name -> credentials; written by the accept thread, removed by the pump thread, read by the
        # request handlers. Single dict operations are atomic, so no lock is needed on the read path.
        self._peers: dict[str, PeerCred] = {}
        self._names: dict[int, str] = {}
        # The accept thread increments and the pump thread decrements: a read-modify-write needs a lock.
        self._uid_lock = threading.Lock()
        self._pump = _pump.make_pump(self._closed)
        self._thread = threading.Thread(target=self._accept_loop, name="broker-frontdoor", daemon=True)
        self._stopping = False
        self._pump_failed = False
        self.accepted = 0
        self.refused = 0
        self.throttled = 0

    @property
    def backend(self) -> str:
        return _pump.BACKEND

    @property
    def accepting(self) -> bool:
        return self._thread.is_alive() and not self._stopping and not self._pump_failed

    @property
    def connections(self) -> int:
        return len(self._names)

    def start(self) -> None:
        self._pump.start()
        self._thread.start()

    def lookup(self, peer: str) -> PeerCred | None:
        if not peer.startswith(_PEER_PREFIX):
            return None
        return self._peers.get(peer[len(_PEER_PREFIX):])

    def stop_accepting(self) -> None:
        """Close the public socket; connections already relayed keep flowing. Idempotent."""
        if self._stopping:
            return
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def close(self) -> None:
        """Stop accepting and drop every relayed connection. Idempotent."""
        self.stop_accepting()
        self._pump.stop()

    def _closed(self, pair_id: int, refused_writer: bool = False) -> None:
        name = self._names.pop(pair_id, None)
        if name is not None:
            cred = self._peers.pop(name, None)
            if cred is not None:
                if refused_writer:
                    # Someone else spoke on this process's connection (a forked child, or a process the
                    # descriptor was passed to): a borrowing attempt, or a client that shares a
                    # connection across fork. Rate-limited by the accept rate of that uid.
                    log.warning("front door: closed a connection of pid %d (uid %d): another process "
                                "wrote on it", cred.pid, cred.uid)
                self._release(cred.uid)

    def _release(self, uid: int) -> None:
        with self._uid_lock:
            left = self._per_uid.get(uid, 1) - 1
            if left > 0:
                self._per_uid[uid] = left
            else:
                self._per_uid.pop(uid, None)

    def _accept_loop(self) -> None:
        poller = select.poll()
        poller.register(self._listener.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stopping:
            events = poller.poll()  # releases the GIL while waiting
            if self._stopping or any(fd == self._wake_r for fd, _ in events):
                return
            # Drain the queue, not one connection per wake-up: a connect(2) finding the listen queue full
            # fails at once (EAGAIN, for gRPC's non-blocking connect), so a uid that keeps the queue full
            # with connect/close churn would make everyone else's connections fail.
            for _ in range(ACCEPT_BATCH):
                try:
                    conn, _ = self._listener.accept()
                except BlockingIOError:
                    break  # drained (or the client gave up between poll and accept)
                except OSError as exc:
                    # EMFILE and friends: log, back off briefly, keep serving the connections we have.
                    log.error("front door: accept failed: %s", exc)
                    self._wake_or_sleep(poller)
                    break
                conn.setblocking(True)
                try:
                    self._admit(conn)
                except Exception:  # one bad connection must never stop the front door
                    log.exception("front door: could not relay a connection")
                    conn.close()

    def _wake_or_sleep(self, poller: select.poll) -> None:
        poller.unregister(self._listener.fileno())
        poller.poll(100)
        poller.register(self._listener.fileno(), select.POLLIN)

    def _admit(self, conn: socket.socket) -> None:
        try:
            uid = peer_uid(conn)
        except OSError:
            conn.close()
            return
        # Before anything costlier (the pidfd, /proc, the upstream connection): a churning uid costs
        # the accept thread one getsockopt and one close per connection.
        if not self._rate.admit(uid):
            # Counted among the refused (exported as a metric) and on its own; not logged, since a log
            # line per connection would hand the churner a way to flood the log instead.
            self.refused += 1
            self.throttled += 1
            conn.close()
            return
        if len(self._names) >= self._max:
            self.refused += 1
            log.warning("front door: connection limit %d reached, refusing a connection", self._max)
            conn.close()
            return
        try:
            cred = peer_cred(conn)
        except AttestationError as exc:
            self.refused += 1
            log.warning("front door: refusing a connection: %s", exc.reason)
            conn.close()
            return
        with self._uid_lock:
            held = self._per_uid.get(cred.uid, 0)
            if held >= self._max_per_uid:
                self.refused += 1
                log.warning("front door: uid %d already holds %d connections, refusing another", cred.uid, held)
                conn.close()
                return
            self._per_uid[cred.uid] = held + 1
        name = _ABSTRACT_PREFIX + secrets.token_hex(12)
        up: socket.socket | None = None
        try:
            # Inside the try: out of descriptors (EMFILE) here must give the uid its slot back too.
            up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            # A random name cannot be pre-bound by anyone else to impersonate a later connection.
            up.bind("\0" + name)
            up.connect(self._internal)
        except OSError:
            if up is not None:
                up.close()
            conn.close()
            self._release(cred.uid)
            raise
        pair_id = next(self._ids)
        # Record the identity before the first byte can reach the server.
        self._peers[name] = cred
        self._names[pair_id] = name
        self.accepted += 1
        a, b = conn.detach(), up.detach()
        try:
            # Only bytes the connecting process itself writes are relayed: defeats fork-and-exec borrowing.
            self._pump.add(pair_id, a, b, cred.pid)
        except (BrokerError, OSError, ValueError) as exc:
            # The pump refused the pair: the fds are still ours to close.
            self._closed(pair_id)
            os.close(a)
            os.close(b)
            self.refused += 1
            if isinstance(exc, BrokerError) and not self._stopping:
                # Its thread has ended (a bug in it): nothing will be relayed any more. Say so once,
                # and report not accepting, so health checks and `broker status` show it.
                if not self._pump_failed:
                    log.error("front door: the relay has stopped (%s); refusing every connection", exc)
                self._pump_failed = True
