"""Legitimate caller's latency under each denial-of-service attack by another local user (issue 12).

    sudo .venv/bin/python bench/dos.py [--mints 500] [--json out.json]

Needs root: it creates a throwaway user, who attacks a real daemon's public socket with
tests/_h2_attack.py (silent calls, CONTINUATION, huge header, PING, SETTINGS, rapid reset, connect/close
churn) while root, granted, mints sequentially on one connection. Prints, per attack: the granted caller's p50/p99/max
latency, failed calls, and the daemon's RSS before and during the attack.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from broker.client import Client  # noqa: E402
from broker.errors import BrokerError  # noqa: E402
from broker.testing import throwaway_user  # noqa: E402
from tests.test_dos import Calls, attack, mint_many, rss_kib, serving  # noqa: E402

# A new process per call (a CLI in a loop, short-lived agents): one connection each, paced below the
# front door's per-uid accept rate (20/s) so that the caller's own limit is not what is measured.
FRESH_CALLS = 150
FRESH_PACE = 0.06


def mint_fresh(sock: str, n: int) -> Calls:
    """``n`` mints, each on a new connection with the client's default retries."""
    calls = Calls([], [])
    for _ in range(n):
        time.sleep(FRESH_PACE)
        t0 = time.perf_counter()
        try:
            with Client(sock) as c:
                c.mint("ops", "read")
        except BrokerError as exc:
            calls.errors.append(str(exc))
        else:
            calls.latencies.append(time.perf_counter() - t0)
    return calls

# (name, mode, connections, streams per connection)
ATTACKS = [
    ("none", None, 0, 0),
    ("silent calls, 32 conns x 256", "silent", 32, 256),
    ("silent calls, 128 conns x 256", "silent", 128, 256),
    ("CONTINUATION, new names, 16 conns", "continuation", 16, 0),
    ("CONTINUATION, 1 GiB value, 16 conns", "huge-header", 16, 0),
    ("PING, 16 conns", "ping", 16, 0),
    ("SETTINGS, 16 conns", "settings", 16, 0),
    ("rapid reset, 16 conns", "reset", 16, 0),
    ("connect/close churn, 16 threads", "churn", 16, 0),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mints", type=int, default=500)
    ap.add_argument("--settle", type=float, default=2.0, help="seconds of attack before measuring")
    ap.add_argument("--json")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/dos.py needs root (it creates a throwaway user)")
    rows = []
    print("| attack | mints | failed | p50 ms | p99 ms | max ms | daemon RSS MiB idle -> during |")
    print("|---|---:|---:|---:|---:|---:|---|")
    with throwaway_user() as user:
        for name, mode, conns, streams in ATTACKS:
            with tempfile.TemporaryDirectory(prefix="brk-") as d, serving(d) as daemon:
                idle = rss_kib(daemon.proc.pid)
                with contextlib.ExitStack() as stack:
                    if mode is not None:
                        stack.enter_context(attack(user, daemon.socket, mode, conns, streams))
                        time.sleep(args.settle)  # let the attack reach its steady state
                    calls = mint_many(daemon.socket, args.mints)
                    during = rss_kib(daemon.proc.pid)
            row = {"attack": name, "mints": args.mints, "failed": len(calls.errors),
                   "p50_ms": calls.percentile(0.5) * 1e3, "p99_ms": calls.percentile(0.99) * 1e3,
                   "max_ms": max(calls.latencies, default=float("nan")) * 1e3,
                   "rss_idle_mib": idle / 1024, "rss_during_mib": during / 1024}
            rows.append(row)
            print(f"| {name} | {row['mints']} | {row['failed']} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | "
                  f"{row['max_ms']:.1f} | {row['rss_idle_mib']:.0f} -> {row['rss_during_mib']:.0f} |", flush=True)
            if mode in (None, "churn"):
                # Churn fills the listen queue: what it costs is a connect, so measure new connections too.
                with tempfile.TemporaryDirectory(prefix="brk-") as d, serving(d) as daemon, \
                        contextlib.ExitStack() as stack:
                    if mode is not None:
                        stack.enter_context(attack(user, daemon.socket, mode, conns, streams))
                        time.sleep(args.settle)
                    fresh = mint_fresh(daemon.socket, FRESH_CALLS)
                row |= {"fresh_calls": FRESH_CALLS, "fresh_failed": len(fresh.errors),
                        "fresh_p50_ms": fresh.percentile(0.5) * 1e3, "fresh_p99_ms": fresh.percentile(0.99) * 1e3}
                print(f"| {name}, a new connection per call | {FRESH_CALLS} | {len(fresh.errors)} | "
                      f"{row['fresh_p50_ms']:.1f} | {row['fresh_p99_ms']:.1f} | | |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
