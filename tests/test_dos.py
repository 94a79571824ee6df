"""Denial of service by another local user (issue 12, items 2 and 5), reproduced against a real daemon.

An ungranted throwaway user attacks the public socket with a raw HTTP/2 client (tests/_h2_attack.py)
while a granted caller mints. Needs root to create the user; the attacker is a real second uid, so
every per-uid limit in the daemon sees it as the kernel does.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import h2.config
import h2.connection
import h2.events
import pytest

from broker.client import Client
from broker.daemon import MEMORY_TRIM_EVERY
from broker.errors import BrokerError
from broker.testing import DaemonProcess, WorkflowSpec, config_text, running_daemon
from tests._h2_attack import CALL_HEADERS

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a throwaway user (useradd)")
ATTACKER = os.path.join(os.path.dirname(__file__), "_h2_attack.py")


@contextlib.contextmanager
def serving(directory: str) -> Iterator[DaemonProcess]:
    """A daemon whose only workflow grants root (the legitimate caller); the attacker has no grant."""
    os.chmod(directory, 0o755)  # the public socket's directory must be reachable by everyone
    path = os.path.join(directory, "broker.toml")
    with open(path, "w") as f:
        f.write(config_text(directory, [WorkflowSpec("ops", callers=[{"uid": 0}], tools=[{"name": "read"}])]))
    with running_daemon(path, os.path.join(directory, "broker.sock"), os.path.join(directory, "audit.jsonl")) as d:
        yield d


@contextlib.contextmanager
def attack(user: pwd.struct_passwd, sock: str, mode: str, connections: int, streams: int = 0
           ) -> Iterator[dict[str, int]]:
    """Run the attacker as ``user`` until the block ends; the dict is filled with its counters then."""
    proc = subprocess.Popen([sys.executable, ATTACKER, str(user.pw_uid), str(user.pw_gid), sock, mode,
                             str(connections), str(streams)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    summary: dict[str, int] = {}
    try:
        line = proc.stdout.readline()
        assert line == "ready\n", proc.stderr.read()
        yield summary
    finally:
        proc.stdin.close()
        out, err = proc.stdout.read(), proc.stderr.read()
        proc.wait(30)
        if out.strip():
            summary.update(json.loads(out))
        assert proc.returncode == 0, err


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(x for x in f if x.startswith("VmRSS:")).split()[1])


@dataclass
class Calls:
    latencies: list[float]  # seconds, of the calls that succeeded
    errors: list[str]

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * p))] if ordered else float("inf")


def mint_many(sock: str, n: int) -> Calls:
    """``n`` sequential mints on one connection, as a sidecar does; no retries, so every failure shows."""
    calls = Calls([], [])
    with Client(sock, retries=0, timeout=5.0) as c:
        # Connect and warm up outside the sample, as a sidecar does once: the connection is what is
        # measured, not whether a connect succeeds under a flood (bench/dos.py measures that apart).
        for _ in range(50):
            try:
                c.mint("ops", "read")
                break
            except BrokerError:
                time.sleep(0.1)
        for _ in range(n):
            t0 = time.perf_counter()
            try:
                c.mint("ops", "read")
            except BrokerError as exc:
                calls.errors.append(str(exc))
            else:
                calls.latencies.append(time.perf_counter() - t0)
    return calls


# --- item 2: calls that never send their request ----------------------------------------------------

# The target: the granted caller's p99 under attack. Measured at 1-5 ms on a 2-core VM; the
# margin absorbs a loaded machine.
P99_TARGET = 0.100


def test_silent_calls_from_another_user_do_not_starve_a_granted_caller(
        short_tmp: str, throwaway_user: pwd.struct_passwd) -> None:
    # The attack from the issue (17 connections x 256 calls), with more connections: every stream the
    # daemon allows on each, each replaced as soon as it ends. Before the fix every mint failed with
    # "Concurrent RPC limit exceeded".
    with serving(short_tmp) as d:
        idle = rss_kib(d.proc.pid)
        with attack(throwaway_user, d.socket, "silent", 32, 256) as summary:
            calls = mint_many(d.socket, 500)
            during = rss_kib(d.proc.pid)
        # The memory the attack made the daemon hold goes back to the kernel (at most half is kept;
        # the daemon trims its heap every MEMORY_TRIM_EVERY seconds).
        deadline = time.monotonic() + 4 * MEMORY_TRIM_EVERY
        while rss_kib(d.proc.pid) - idle > (during - idle) / 2:
            assert time.monotonic() < deadline, (idle, during, rss_kib(d.proc.pid))
            time.sleep(0.2)
    assert calls.errors == []
    assert calls.percentile(0.99) < P99_TARGET, sorted(calls.latencies)[-10:]
    assert summary["closed_by_daemon"] == 0 and summary["streams"] >= 32 * 32


def test_a_call_whose_request_never_arrives_is_ended(daemon: DaemonProcess) -> None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(daemon.socket)
        s.settimeout(30)  # the daemon's deadline is seconds; this only bounds a broken run
        conn.initiate_connection()
        conn.send_headers(1, CALL_HEADERS, end_stream=False)  # and never the request message
        s.sendall(conn.data_to_send())
        headers: dict[str, str] = {}
        while "grpc-status" not in headers:
            data = s.recv(65536)
            assert data, "the daemon closed the connection instead of ending the call"
            for event in conn.receive_data(data):
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    headers.update(event.headers)
            s.sendall(conn.data_to_send())
    assert headers["grpc-status"] == str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0])


# --- item 5: HTTP/2 floods ---------------------------------------------------------------------------

# What the daemon may grow by while a flood runs (its RSS is about 70 MB idle; the CONTINUATION flood
# once took it to 1.1 GB and kept it there).
RSS_GROWTH_LIMIT_KIB = 200 * 1024


@pytest.mark.parametrize("mode", ["continuation", "huge-header", "ping", "settings", "reset"])
def test_http2_floods_from_another_user_leave_a_granted_caller_served(
        short_tmp: str, throwaway_user: pwd.struct_passwd, mode: str) -> None:
    with serving(short_tmp) as d:
        idle = rss_kib(d.proc.pid)
        with attack(throwaway_user, d.socket, mode, 16):
            calls = mint_many(d.socket, 200)
            during = rss_kib(d.proc.pid)
        after = rss_kib(d.proc.pid)
        with Client(d.socket, retries=0) as c:
            assert c.mint("ops", "read").token  # and it still serves once the flood stops
    assert calls.errors == []
    assert during - idle < RSS_GROWTH_LIMIT_KIB and after - idle < RSS_GROWTH_LIMIT_KIB
