"""Vault requests per broker per minute, at rest and while keys rotate: what a fleet costs its cluster.

N brokers (simulated hosts: each its own ``broker serve`` process, AppRole and fleet instance) run against
one real, initialised OpenBao (integrated storage) with a file audit device. Every request OpenBao
handles is one audit line; the bench counts the lines in a measured window, by kind (heartbeat, fleet
reads, KV polls, lease renewals, ...), and divides by brokers and minutes. Two phases with the same
brokers' config except ``rotate_every``:

* ``rest``      keys rotate hourly (the default), so none rotates in the window;
* ``rotation``  every broker rotates its signing key every minute (the minimum ``rotate_every``).

A light load (one mint at each broker and its verification at the next, per second) runs throughout, so
that tokens signed with a freshly rotated key reach siblings that do not know it yet, as in production.

    .venv/bin/python bench/fleet.py [--brokers 3] [--kv-tools 2] [--window 120] [--json FILE]

The figures scale with the intervals: heartbeat and fleet re-read every 30 s (fixed), the session check
every 30 s (fixed), one KV poll per KV tool every ``kv_refresh`` (--kv-refresh, default 30 s here, 300 s
in production), one renewal per leased tool every 2/3 of its TTL (--lease-ttl, 60 s here).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

from broker.client import Client
from broker.errors import BrokerError
from broker.testing import WorkflowSpec, bao_binary, config_text, running_daemon
from broker.vault.testing import PersistentOpenBao, openbao_raft_server

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ME = {"uid": os.geteuid()}
WARMUP = 15.0  # logins, first publications and first fetches happen here, outside the window


def kind(entry: dict[str, Any]) -> str:
    """What a broker's request to Vault was for, from its audit line."""
    req = entry.get("request") or {}
    path, op = str(req.get("path", "")), str(req.get("operation", ""))
    if path.startswith("secret/data/broker/jwks/"):
        return "jwks heartbeat (write)" if op in ("create", "update") else "jwks sibling read"
    if path.startswith("secret/metadata/broker/jwks"):
        return "jwks list"
    if path.startswith("secret/data/"):
        return "kv poll"
    return {
        "auth/approle/login": "login",
        "auth/token/lookup-self": "session check",
        "auth/token/renew-self": "token renewal (own or child)",
        "auth/token/create": "child token issue",
        "sys/leases/renew": "lease renewal",
        "sys/leases/revoke": "lease revocation",
        "auth/token/revoke-self": "token revocation",
    }.get(path, f"other: {op} {path}")


def from_broker(entry: dict[str, Any]) -> bool:
    """A response line for a request that a broker made (not the bench's own setup with the root token)."""
    if entry.get("type") != "response":
        return False
    policies = (entry.get("auth") or {}).get("policies") or []
    return "root" not in policies


def setup_instance(bao: PersistentOpenBao, instance: str, out: str) -> None:
    env = {**os.environ, "BAO_ADDR": bao.address, "BAO_TOKEN": bao.token, "BAO": bao_binary(), "OUT": out,
           "INSTANCE": instance}
    subprocess.run(["bash", os.path.join(ROOT, "examples", "vault-dev-setup.sh")], env=env, check=True,
                   capture_output=True, timeout=120)


def broker_config(d: str, bao: PersistentOpenBao, creds: str, instance: str, args: argparse.Namespace,
                  rotate: str) -> str:
    tools: list[dict[str, object]] = [{"name": "t"}]
    tools += [{"name": f"kv{i}", "secret": {"kind": "kv", "path": "secret/crm/readonly", "field": "api_key"}}
              for i in range(args.kv_tools)]
    tools += [{"name": f"lease{i}", "secret": {"kind": "token", "policies": ["crm-read"],
                                               "ttl": f"{args.lease_ttl}s"}} for i in range(args.lease_tools)]
    cfg = os.path.join(d, "broker.toml")
    with open(cfg, "w") as f:
        f.write(config_text(d, [WorkflowSpec("w", callers=[ME], tools=tools)], rotate_every=rotate)
                + f'\n[vault]\naddress = "{bao.address}"\ninstance = "{instance}"\n'
                  f'kv_refresh = "{args.kv_refresh}s"\n'
                  f'[vault.auth]\nmethod = "approle"\nrole_id_file = "{creds}/{instance}/role_id"\n'
                  f'secret_id_file = "{creds}/{instance}/secret_id"\n')
    return cfg


def light_load(sockets: list[str], stop: threading.Event, errors: list[str]) -> None:
    """Once a second: mint at each broker, verify at the next one."""
    clients = [Client(s, workflow="w") for s in sockets]
    try:
        while not stop.wait(1.0):
            for i, c in enumerate(clients):
                try:
                    clients[(i + 1) % len(clients)].verify(c.mint("w", "t").token, "t")
                except BrokerError as exc:
                    errors.append(str(exc))
    finally:
        for c in clients:
            c.close()


@contextlib.contextmanager
def fleet(work: str, bao: PersistentOpenBao, creds: str, args: argparse.Namespace, rotate: str) -> Iterator[list[str]]:
    with contextlib.ExitStack() as stack:
        sockets = []
        for i in range(args.brokers):
            d = os.path.join(work, f"{rotate}-{i}")
            os.makedirs(d)
            cfg = broker_config(d, bao, creds, f"host-{i}", args, rotate)
            daemon = stack.enter_context(running_daemon(cfg, os.path.join(d, "broker.sock"),
                                                        os.path.join(d, "audit.jsonl")))
            sockets.append(daemon.socket)
        # Fetch every secret once, as the agents of a host would: from then on the broker keeps them fresh.
        for s in sockets:
            with Client(s, workflow="w") as c:
                for i in range(args.kv_tools):
                    c.secret(f"kv{i}")
                for i in range(args.lease_tools):
                    c.secret(f"lease{i}")
        yield sockets


def measure(audit: str, sockets: list[str], window: float) -> tuple[collections.Counter[str], list[str]]:
    stop, errors = threading.Event(), []
    loader = threading.Thread(target=light_load, args=(sockets, stop, errors))
    loader.start()
    try:
        time.sleep(WARMUP)
        start = os.path.getsize(audit)
        time.sleep(window)  # a benchmark window: the brokers' own timers do the work
        end = os.path.getsize(audit)
    finally:
        stop.set()
        loader.join()
    counts: collections.Counter[str] = collections.Counter()
    with open(audit, "rb") as f:
        f.seek(start)
        for line in f.read(end - start).splitlines():
            entry = json.loads(line)
            if from_broker(entry):
                counts[kind(entry)] += 1
    return counts, errors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--brokers", type=int, default=3)
    p.add_argument("--kv-tools", type=int, default=2)
    p.add_argument("--lease-tools", type=int, default=1)
    p.add_argument("--kv-refresh", type=int, default=30)
    p.add_argument("--lease-ttl", type=int, default=60)
    p.add_argument("--window", type=float, default=120.0, help="seconds measured per phase")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="brk-fleet-") as work, \
            tempfile.TemporaryDirectory(prefix="broker-vault-", dir=base) as creds, \
            contextlib.ExitStack() as stack:
        audit = os.path.join(work, "openbao-audit.jsonl")
        # OpenBao takes audit devices from its config file only (not through the API).
        bao = stack.enter_context(openbao_raft_server(
            os.path.join(work, "bao"), extra_config=f'audit "file" "bench" {{\n  options {{\n'
                                                    f'    file_path = "{audit}"\n  }}\n}}\n'))
        for i in range(args.brokers):
            setup_instance(bao, f"host-{i}", os.path.join(creds, f"host-{i}"))
        for phase, rotate in (("rest", "1h"), ("rotation", "60s")):
            with fleet(work, bao, creds, args, rotate) as sockets:
                counts, errors = measure(audit, sockets, args.window)
            if errors:
                print(f"{phase}: {len(errors)} failed mint/verify calls, e.g. {errors[0]}", file=sys.stderr)
            per = args.brokers * args.window / 60
            results[phase] = {k: round(v / per, 2) for k, v in sorted(counts.items())}
            results[phase]["total"] = round(sum(counts.values()) / per, 2)
    print(f"Vault requests per broker per minute ({args.brokers} brokers, {args.kv_tools} KV tools at "
          f"kv_refresh={args.kv_refresh}s, {args.lease_tools} leased tools at ttl={args.lease_ttl}s, "
          f"{args.window:.0f} s windows)\n")
    kinds = [*sorted({k for r in results.values() for k in r} - {"total"}), "total"]
    print("| request | at rest | keys rotating every minute |\n|---|---:|---:|")
    for k in kinds:
        print(f"| {k} | {results['rest'].get(k, 0):.2f} | {results['rotation'].get(k, 0):.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "per_broker_per_minute": results}, f, indent=2)


if __name__ == "__main__":
    main()
