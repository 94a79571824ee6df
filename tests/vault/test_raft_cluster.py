"""Three real ``broker serve`` processes on a real 3-node OpenBao Raft cluster (init, unseal, voters):
the leader killed under load, a broker started while the cluster has no leader, the cluster sealed,
and, when the fleet stops, no token of theirs left in OpenBao.

Each broker lists all three nodes, each starting from a different one. The tests share one cluster and
one set of brokers (a cluster takes ~10 s to form); each restores the cluster, and the last stops the
brokers. The figures (failed mints, recovery times) are printed; run with ``-s`` to see them
(bench/RESULTS.md, "Fleet").
"""

from __future__ import annotations

import calendar
import contextlib
import os
import secrets
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from broker.client import Client
from broker.errors import BrokerError
from broker.testing import DaemonProcess, WorkflowSpec, bao_binary, config_text, running_daemon
from broker.vault.testing import RaftCluster, openbao_raft_cluster

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
ME: dict[str, object] = {"uid": os.geteuid()}
INSTANCES = ("host-a", "host-b", "host-c")
KV_PATH = "crm/readonly"  # written by examples/vault-dev-setup.sh
TOOLS: list[dict[str, object]] = [
    {"name": "t"},
    {"name": "crm", "secret": {"kind": "kv", "path": f"secret/{KV_PATH}", "field": "api_key"}},
    # A short lease, renewed every 10 s: its renewals must resume after a failover.
    {"name": "child", "secret": {"kind": "token", "policies": ["crm-read"], "ttl": "15s"}},
]
# Generous bounds for a loaded 2-core machine; the measured figures are far below them.
RECOVERY_DEADLINE = 90.0

pytestmark = pytest.mark.timeout(300)


def until(what: str, check: Callable[..., bool], *args: object, timeout: float = RECOVERY_DEADLINE) -> float:
    """Poll ``check(*args)`` until it holds; the seconds it took. Fails the test, naming ``what``, on
    timeout."""
    started = time.monotonic()
    while True:
        with contextlib.suppress(BrokerError, OSError, KeyError, ValueError):
            if check(*args):
                return time.monotonic() - started
        if time.monotonic() - started > timeout:
            pytest.fail(f"{what}: not within {timeout:.0f}s")
        time.sleep(0.1)


@dataclass
class Broker:
    instance: str
    daemon: DaemonProcess
    dir: str


@dataclass
class Fleet:
    cluster: RaftCluster
    brokers: list[Broker]
    creds: str
    workdir: str
    stack: contextlib.ExitStack = field(repr=False)

    def start_broker(self, instance: str, addresses: list[str]) -> Broker:
        d = os.path.join(self.workdir, instance)
        os.makedirs(d, exist_ok=True)
        out = os.path.join(self.creds, instance)
        cfg = os.path.join(d, "broker.toml")
        nodes = ", ".join(f'"{a}"' for a in addresses)
        with open(cfg, "w") as f:
            f.write(config_text(d, [WorkflowSpec("w", callers=[ME], tools=TOOLS)])
                    + f'\n[vault]\naddress = [{nodes}]\ninstance = "{instance}"\nkv_refresh = "1s"\n'
                      f'[vault.auth]\nmethod = "approle"\nrole_id_file = "{out}/role_id"\n'
                      f'secret_id_file = "{out}/secret_id"\n')
        daemon = self.stack.enter_context(running_daemon(cfg, os.path.join(d, "broker.sock"),
                                                         os.path.join(d, "audit.jsonl")))
        return Broker(instance, daemon, d)

    def heartbeat(self, instance: str) -> float:
        """When ``instance`` last wrote its fleet JWKS entry, by OpenBao's clock (the KV metadata)."""
        meta = self.cluster.api("GET", f"secret/metadata/broker/jwks/{instance}")
        stamp = meta["data"]["updated_time"]  # RFC 3339 with nanoseconds, UTC
        whole, _, frac = stamp.rstrip("Z").partition(".")
        return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + float(f"0.{frac or '0'}")


def setup_instance(cluster: RaftCluster, instance: str, out: str) -> None:
    """The documented policy and AppRole (examples/vault-dev-setup.sh), for real, through the leader."""
    env = {**os.environ, "BAO_ADDR": cluster.leader().address, "BAO_TOKEN": cluster.token, "BAO": bao_binary(),
           "OUT": out, "INSTANCE": instance}
    r = subprocess.run(["bash", os.path.join(ROOT, "examples", "vault-dev-setup.sh")], env=env,
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None  # credential files stay in memory
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(tempfile.TemporaryDirectory(prefix="brk-raft-"))
        creds = stack.enter_context(tempfile.TemporaryDirectory(prefix="broker-vault-", dir=base))
        cluster = stack.enter_context(openbao_raft_cluster(os.path.join(work, "bao")))
        for instance in INSTANCES:
            setup_instance(cluster, instance, os.path.join(creds, instance))
        f = Fleet(cluster, [], creds, work, stack)
        addresses = cluster.addresses
        for i, instance in enumerate(INSTANCES):
            # Each broker prefers a different node, and knows the other two.
            f.brokers.append(f.start_broker(instance, addresses[i:] + addresses[:i]))
        # Every broker learns every other's keys: a foreign kid makes it re-read the fleet on demand.
        for src in f.brokers:
            for dst in f.brokers:
                with Client(src.daemon.socket) as a, Client(dst.daemon.socket) as b:
                    until(f"{dst.instance} verifies {src.instance}'s tokens",
                          lambda a, b: bool(b.verify(a.mint("w", "t").token, "t")), a, b)
        yield f


@dataclass
class Tally:
    mints: int = 0
    verifications: int = 0
    failed_mints: list[str] = field(default_factory=list)
    failed_verifications: list[str] = field(default_factory=list)


def load(src: str, dst: str, stop: threading.Event, tally: Tally) -> None:
    """Mint at one broker, verify at the next, as fast as they answer, until ``stop``."""
    with Client(src) as a, Client(dst) as b:
        while not stop.is_set():
            try:
                token = a.mint("w", "t").token
            except BrokerError as exc:
                tally.failed_mints.append(str(exc))
                continue
            tally.mints += 1
            try:
                b.verify(token, "t")
            except BrokerError as exc:
                tally.failed_verifications.append(str(exc))
                continue
            tally.verifications += 1


def degraded(b: Broker) -> list[str]:
    with Client(b.daemon.socket) as c:
        reasons: list[str] = c.status()["degraded"]
        return reasons


def secret(b: Broker, tool: str) -> dict[str, str]:
    with Client(b.daemon.socket, workflow="w") as c:
        return dict(c.secret(tool).data)


def test_leader_killed_under_load(fleet: Fleet) -> None:
    cluster, brokers = fleet.cluster, fleet.brokers
    child_tokens = [secret(b, "child")["token"] for b in brokers]
    stop = threading.Event()
    tallies = [Tally() for _ in brokers]
    threads = [threading.Thread(target=load, args=(b.daemon.socket, brokers[(i + 1) % 3].daemon.socket, stop, t))
               for i, (b, t) in enumerate(zip(brokers, tallies, strict=True))]
    for t in threads:
        t.start()
    try:
        until("load running on every broker", lambda: all(t.mints > 50 for t in tallies))
        leader = cluster.leader()
        killed_at = time.time()
        leader.kill()
        started = time.monotonic()
        new_leader = cluster.leader(timeout=RECOVERY_DEADLINE)
        election = time.monotonic() - started
        assert new_leader is not leader
        # Leases: every broker's child token is renewed after the kill, as OpenBao itself reports (the
        # renewals come every 10 s, so this is at most that plus the failover).
        for tok in child_tokens:
            until("child token renewed", lambda tok: cluster.api("POST", "auth/token/lookup", {"token": tok})[
                "data"].get("last_renewal_time", 0) > killed_at, tok)
        renewal = time.monotonic() - started
        # The fleet JWKS: every broker's heartbeat lands in Vault again (at most one heartbeat period, 30 s).
        for b in brokers:
            until(f"{b.instance}'s fleet heartbeat", lambda b: fleet.heartbeat(b.instance) > killed_at, b)
        jwks = time.monotonic() - started
        # KV: a value rotated after the failover reaches every broker (kv_refresh = 1 s).
        rotated = secrets.token_urlsafe(18)
        cluster.api("POST", f"secret/data/{KV_PATH}", {"data": {"api_key": rotated}})
        written = time.monotonic()
        for b in brokers:
            until(f"{b.instance} serves the rotated KV value", lambda b: secret(b, "crm")["api_key"] == rotated, b)
        kv = time.monotonic() - written
        after = [t.mints for t in tallies]
        until("load continues after recovery", lambda: all(t.mints > n + 50 for t, n in zip(tallies, after,
                                                                                              strict=True)))
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        cluster.heal()
    print(f"\nfleet failover: mints={sum(t.mints for t in tallies)} "
          f"failed_mints={sum(len(t.failed_mints) for t in tallies)} "
          f"verifications={sum(t.verifications for t in tallies)} "
          f"failed_verifications={sum(len(t.failed_verifications) for t in tallies)} "
          f"after the kill: election={election:.1f}s all_leases_renewed={renewal:.1f}s "
          f"all_jwks_heartbeats={jwks:.1f}s; kv_rotation_seen={kv:.1f}s after the write")
    assert [t.failed_mints for t in tallies] == [[], [], []]  # minting never waits on Vault
    assert [t.failed_verifications for t in tallies] == [[], [], []]
    # A token minted at one surviving broker verifies at another, after the failover.
    with Client(brokers[1].daemon.socket) as one, Client(brokers[2].daemon.socket) as other:
        assert other.verify(one.mint("w", "t").token, "t")["wf"] == "w"
    for b in brokers:
        until(f"{b.instance} healthy", lambda b: degraded(b) == [], b)


def test_broker_started_without_a_leader_serves_and_joins_later(fleet: Fleet) -> None:
    cluster = fleet.cluster
    setup_instance(cluster, "host-d", os.path.join(fleet.creds, "host-d"))
    # A broker's AppRole exists long before an outage: wait until every node has it. (A node that lags
    # answers the login "invalid role or secret ID", and five such answers lock the role out for 15 min:
    # see "Running a fleet" in docs/vault.md.)
    for node in cluster.nodes:
        until(f"{node.node_id} holds the new role's secret ID", lambda node: bool(cluster.api(
            "LIST", "auth/approle/role/broker-host-d/secret-id", node=node)["data"]["keys"]), node)
    leader = cluster.leader()
    down = [leader, next(n for n in cluster.nodes if n is not leader)]
    for node in down:
        node.kill()  # one node of three left: no quorum, no leader
    late = fleet.start_broker("host-d", cluster.addresses[::-1])
    try:
        with Client(late.daemon.socket) as c:
            # It serves with its own keys before Vault is back ...
            assert c.verify(c.mint("w", "t").token, "t")["wf"] == "w"
            until("the late broker reports Vault degraded", lambda: degraded(late) != [])
            own_token = c.mint("w", "t").token
        for node in down:
            cluster.restart(node)
        cluster.wait_voters()
        # ... and joins the fleet when it is: its keys reach the others through Vault.
        with Client(fleet.brokers[1].daemon.socket) as sibling:
            joined = until("a sibling verifies the late broker's token",
                           lambda: bool(sibling.verify(own_token, "t")))
        until("the late broker healthy", lambda: degraded(late) == [])
        print(f"\nlate broker joined the fleet {joined:.1f}s after the cluster had a leader again")
        for path in _files(late.dir):
            with open(path, "rb") as f:
                assert b"PRIVATE KEY" not in f.read()  # its signing keys live in memory only
    finally:
        late.daemon.stop()
        cluster.heal()


def _files(top: str) -> Iterator[str]:
    for d, _, names in os.walk(top):
        for name in names:
            path = os.path.join(d, name)
            if os.path.isfile(path) and not os.path.islink(path):
                yield path


def test_sealed_cluster_degrades_then_recovers(fleet: Fleet) -> None:
    cluster, brokers = fleet.cluster, fleet.brokers
    before = [secret(b, "crm")["api_key"] for b in brokers]
    cluster.seal()
    try:
        sealed_then_unsealed(fleet, before)
    finally:
        cluster.heal()


def sealed_then_unsealed(fleet: Fleet, before: list[str]) -> None:
    cluster, brokers = fleet.cluster, fleet.brokers
    sealed = time.monotonic()
    for b in brokers:
        until(f"{b.instance} reports Vault degraded", lambda b: any("sealed" in r for r in degraded(b)), b)
    noticed = time.monotonic() - sealed
    for b, value in zip(brokers, before, strict=True):
        with Client(b.daemon.socket, workflow="w") as c:
            assert c.verify(c.mint("w", "t").token, "t")["wf"] == "w"  # minting goes on
            assert c.secret("crm").data["api_key"] == value  # a KV value within max_staleness still serves
    for node in cluster.nodes:
        cluster.unseal(node)
    unsealed = time.monotonic()
    cluster.wait_voters()
    for b in brokers:
        until(f"{b.instance} recovers", lambda b: degraded(b) == [], b)
    rotated = secrets.token_urlsafe(18)
    cluster.api("POST", f"secret/data/{KV_PATH}", {"data": {"api_key": rotated}})
    for b in brokers:
        until(f"{b.instance} serves the rotated KV value", lambda b: secret(b, "crm")["api_key"] == rotated, b)
    print(f"\nsealed cluster: degraded noticed in {noticed:.1f}s; recovered {time.monotonic() - unsealed:.1f}s "
          "after unseal")


def test_nothing_is_left_in_vault_when_the_fleet_stops(fleet: Fleet) -> None:
    # Last in this module: it stops the brokers. Across the failover, the leaderless start and the seal,
    # no token or lease was forgotten: once every broker has shut down, OpenBao itself holds nothing that
    # a broker created (its own AppRole tokens and the child tokens it handed out were all revoked).
    cluster = fleet.cluster
    accessors = cluster.api("LIST", "auth/token/accessors")["data"]["keys"]
    assert len(accessors) > 3  # the brokers' own tokens and child tokens are there while they run
    for b in fleet.brokers:
        assert b.daemon.stop() == 0
    left = []
    for accessor in cluster.api("LIST", "auth/token/accessors")["data"]["keys"]:
        info = cluster.api("POST", "auth/token/lookup-accessor", {"accessor": accessor})["data"]
        if "root" not in info["policies"]:
            left.append((info["display_name"], info["policies"]))
    assert left == []
