"""Client and sidecar latencies, measured against a real daemon (and a real OpenBao for the KV row).

* ``client.token()`` on a cache hit (in process) and on a miss (one MintToken RPC through the front door);
* rotation in the daemon -> new file visible to the child: a revocation pushed on the stream makes
  ``broker exec`` mint and swap at once; measured from the revoke call to the new bytes in the file;
* with Vault: a new KV version -> new secret file visible (bounded by ``kv_refresh``, 1 s here).

    .venv/bin/python bench/exec_latency.py [--samples 20]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import hvac

from broker.client import Client
from broker.testing import WorkflowSpec, config_text, openbao_dev_server, running_daemon

ME = {"uid": os.geteuid()}


def pct(xs: list[float], q: int) -> float:
    return statistics.quantiles(xs, n=100)[q - 1] if len(xs) > 1 else xs[0]


def row(name: str, xs: list[float], unit: float = 1e6, label: str = "us") -> str:
    return (f"| {name} | {len(xs)} | {pct(xs, 50) * unit:.1f} {label} | {pct(xs, 99) * unit:.1f} {label} | "
            f"{len(xs) / sum(xs):.0f}/s |")


def wait_change(path: str, old: bytes, timeout: float = 30.0) -> float:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        try:
            with open(path, "rb") as f:
                data = f.read()
            if data and data != old:
                return time.perf_counter()
        except FileNotFoundError:
            pass
        time.sleep(0.0005)
    raise TimeoutError(path)


def start_sidecar(sock: str, d: str, tool: str) -> tuple[subprocess.Popen[str], str]:
    child = ("import os, time; print(os.environ['BROKER_CREDENTIALS_DIR'], flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-m", "broker", "exec", "--socket", sock, "--workflow", "bench",
                          "--tool", tool, "--", sys.executable, "-c", child], stdout=subprocess.PIPE, text=True,
                         stderr=subprocess.DEVNULL)
    assert p.stdout is not None
    return p, p.stdout.readline().strip()


def measure_revocation(sock: str, d: str, samples: int) -> list[float]:
    p, creds = start_sidecar(sock, d, "t")
    path = os.path.join(creds, "t.token")
    out = []
    try:
        with Client(sock) as c:
            for _ in range(samples):
                with open(path, "rb") as f:
                    old = f.read()
                t0 = time.perf_counter()
                c.revoke([old.decode().strip()])
                out.append(wait_change(path, old) - t0)
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(30)
    return out


def measure_kv(samples: int) -> list[float]:
    out: list[float] = []
    with tempfile.TemporaryDirectory(prefix="brk-bench-") as d, openbao_dev_server(d) as bao:
        admin = hvac.Client(url=bao.address, token=bao.token)
        admin.secrets.kv.v2.create_or_update_secret(path="bench/crm", secret={"api_key": secrets.token_hex(16)})
        with tempfile.NamedTemporaryFile("w", dir="/dev/shm", delete=False) as tf:
            tf.write(bao.token)
        try:
            cfg = os.path.join(d, "broker.toml")
            with open(cfg, "w") as f:
                f.write(config_text(d, [WorkflowSpec("bench", callers=[ME], tools=[
                    {"name": "t", "secret": {"kind": "kv", "path": "secret/bench/crm", "field": "api_key"}}])])
                    + f'\n[vault]\naddress = "{bao.address}"\nkv_refresh = "1s"\n[vault.auth]\nmethod = "token"\n'
                    f'token_file = "{tf.name}"\n')
            sock = os.path.join(d, "broker.sock")
            with running_daemon(cfg, sock, os.path.join(d, "audit.jsonl")):
                p, creds = start_sidecar(sock, d, "t")
                path = os.path.join(creds, "t.secret.json")
                try:
                    for _ in range(samples):
                        with open(path, "rb") as fh:
                            old = fh.read()
                        t0 = time.perf_counter()
                        admin.secrets.kv.v2.create_or_update_secret(path="bench/crm",
                                                                    secret={"api_key": secrets.token_hex(16)})
                        out.append(wait_change(path, old) - t0)
                finally:
                    p.send_signal(signal.SIGTERM)
                    p.wait(30)
        finally:
            os.unlink(tf.name)
    return out


def timed(n: int, f: Callable[[], object]) -> list[float]:
    xs = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        xs.append(time.perf_counter() - t0)
    return xs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--no-openbao", action="store_true")
    args = ap.parse_args()
    lines = ["| measurement | samples | p50 | p99 | rate |", "|---|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory(prefix="brk-bench-") as d:
        cfg = os.path.join(d, "broker.toml")
        with open(cfg, "w") as f:
            f.write(config_text(d, [WorkflowSpec("bench", callers=[ME], tools=[{"name": "t", "ttl": "5m"}])]))
        sock = os.path.join(d, "broker.sock")
        with running_daemon(cfg, sock, os.path.join(d, "audit.jsonl")), Client(sock, workflow="bench") as c:
            c.token("t")
            hits = timed(20000, lambda: c.token("t"))
            misses = timed(1000, lambda: c.mint("bench", "t"))
            lines.append(row("client.token(), cache hit", hits))
            lines.append(row("client.token(), cache miss (MintToken RPC)", misses))
            rev = measure_revocation(sock, d, args.samples)
            lines.append(row("daemon revocation -> new token file visible", rev, 1e3, "ms"))
    if not args.no_openbao:
        lines.append(row("new KV version in OpenBao -> new secret file (kv_refresh 1s)", measure_kv(args.samples),
                         1e3, "ms"))
    print("\n".join(lines))
    print(json.dumps({"hit_over_miss": round(pct(misses, 50) / pct(hits, 50), 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
