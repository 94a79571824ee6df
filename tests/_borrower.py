"""A process that tries to borrow another process's identity on a broker connection (test_borrowed_identity.py).

Every action prints one JSON line: ``{"token": true}`` when a mint succeeded, else ``{"error": ...}`` or
``{"code": "PERMISSION_DENIED"}``. The gRPC client cannot be handed an already connected socket, so a
process that speaks on a borrowed connection runs a tiny local relay: the client connects to a private
socket and the relay copies bytes between that and the borrowed fd. Every byte the broker receives is
therefore written by the process running the relay, which is the point.

Actions (argv[1]):

* ``mint SOCK WORKFLOW``: one mint, as an ordinary client.
* ``speak SOCK WORKFLOW``: an ordinary client, 8 threads x 4 mints on one channel.
* ``fork-child-speaks SOCK WORKFLOW [EXEC]``: connect, wait until the daemon has accepted, fork; the
  child mints over the connection; the parent, if EXEC is given, exec's that binary (which then just
  sleeps), else sleeps itself. The child's result is printed.
* ``exec-then-speak SOCK WORKFLOW EXEC``: connect, wait until the daemon has accepted, then exec EXEC
  with ``borrowed-fd`` to mint over the inherited connection.
* ``borrowed-fd FD WORKFLOW``: (after the exec above) mint over the inherited connection.
"""

from __future__ import annotations

import json
import os
import select
import socket
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

from broker.client import Client
from broker.errors import BrokerError, PermissionDenied

TOOL = "t"
HANG_GUARD = 30.0


def _mint(client: Client, workflow: str) -> dict[str, object]:
    try:
        with client:
            return {"token": bool(client.mint(workflow, TOOL).token)}
    except PermissionDenied:
        return {"code": "PERMISSION_DENIED"}
    except BrokerError as exc:
        return {"error": type(exc).__name__}


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _relay(borrowed: socket.socket) -> str:
    """A private socket whose first connection is spliced onto ``borrowed``; returns its path."""
    path = os.path.join(tempfile.mkdtemp(), "relay.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        threading.Thread(target=_pipe, args=(borrowed, conn), daemon=True).start()
        _pipe(conn, borrowed)

    threading.Thread(target=serve, daemon=True).start()
    return path


def _connect_and_wait_accepted(sock_path: str) -> socket.socket:
    """Connect to the broker and wait for the server's HTTP/2 SETTINGS, which it sends as soon as the
    front door has accepted, attested and relayed the connection. Peeked, not read: the next client on
    this connection must see them."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(sock_path)
    ready, _, _ = select.select([conn], [], [], HANG_GUARD)
    assert ready and conn.recv(9, socket.MSG_PEEK), "the daemon never spoke first"
    return conn


def main() -> int:
    action = sys.argv[1]
    if action == "speak":
        sock_path, workflow = sys.argv[2], sys.argv[3]
        with Client(sock_path, retries=0) as client, ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: bool(client.mint(workflow, TOOL).token), range(32)))
        print(json.dumps({"token": all(results), "calls": len(results)}))
        return 0
    if action == "mint":
        print(json.dumps(_mint(Client(sys.argv[2], retries=0), sys.argv[3])))
        return 0
    if action == "borrowed-fd":
        borrowed = socket.socket(fileno=int(sys.argv[2]))
        print(json.dumps(_mint(Client(_relay(borrowed), retries=0), sys.argv[3])))
        return 0
    sock_path, workflow = sys.argv[2], sys.argv[3]
    conn = _connect_and_wait_accepted(sock_path)
    if action == "exec-then-speak":
        conn.set_inheritable(True)
        os.execv(sys.argv[4], [sys.argv[4], __file__, "borrowed-fd", str(conn.fileno()), workflow])
    assert action == "fork-child-speaks", action
    sys.stdout.flush()
    if os.fork() == 0:
        # The child: it never connected, yet holds the connection.
        print(json.dumps(_mint(Client(_relay(conn), retries=0), workflow)), flush=True)
        os._exit(0)
    if len(sys.argv) > 4:
        # The parent becomes the approved binary (same pid, pidfd, uid and gid) and keeps quiet.
        os.execv(sys.argv[4], [sys.argv[4], "-c", "import time; time.sleep(60)"])
    os.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
