"""Real servers for testing the Vault backend: a restartable OpenBao with raft storage, and PostgreSQL.

Shipped with the package (like :mod:`broker.testing`) so that integration tests elsewhere can use them.
Nothing here is a fake. The dev server lives in :func:`broker.testing.openbao_dev_server`; this module
adds a server that keeps its data on disk, so that a test can kill it and start it again.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from broker.testing import bao_binary, free_port


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not listen on port {port} within {timeout}s")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class PersistentOpenBao:
    """An OpenBao server with single-node raft storage, initialised with one unseal key. Kill it, start
    it again: the data (and so the broker's token and leases) survives."""

    workdir: str
    port: int
    cluster_port: int
    token: str = field(default="", repr=False)
    unseal_key: str = field(default="", repr=False)
    proc: subprocess.Popen[bytes] | None = None
    extra_config: str = ""  # more HCL for the server's config file (e.g. an audit device)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """A root-token request (for setting up tests, never used by the broker)."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.address}/v1/{path}", data=data, method=method,  # noqa: S310
                                     headers={"X-Vault-Token": self.token} if self.token else {})
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback test server
            raw = resp.read()
        out: dict[str, Any] = json.loads(raw) if raw else {}
        return out

    def start(self) -> None:
        config = os.path.join(self.workdir, "openbao.hcl")
        os.makedirs(os.path.join(self.workdir, "data"), exist_ok=True)
        with open(config, "w") as f:
            # performance_multiplier = 1: production election timing, much faster than the default's.
            f.write(f'storage "raft" {{\n  path = "{self.workdir}/data"\n  node_id = "node1"\n'
                    '  performance_multiplier = 1\n}\n'
                    f'listener "tcp" {{\n  address = "127.0.0.1:{self.port}"\n'
                    f'  cluster_address = "127.0.0.1:{self.cluster_port}"\n  tls_disable = true\n}}\n'
                    f'api_addr = "{self.address}"\ncluster_addr = "http://127.0.0.1:{self.cluster_port}"\n'
                    + self.extra_config)
        with open(os.path.join(self.workdir, "openbao.log"), "ab") as log:
            self.proc = subprocess.Popen([bao_binary(), "server", f"-config={config}"], stdout=log,
                                         stderr=subprocess.STDOUT, cwd=self.workdir)
        _wait_port(self.port, self.proc, "OpenBao")
        if not self.unseal_key:
            # Init answers with the unseal key and root token; both stay in this process's memory.
            init = self.api("PUT", "sys/init", {"secret_shares": 1, "secret_threshold": 1})
            self.unseal_key, self.token = init["keys"][0], init["root_token"]
        self.api("PUT", "sys/unseal", {"key": self.unseal_key})
        deadline = time.monotonic() + 30
        while True:
            # sys/health answers 200 only once this node is unsealed and the active one.
            with contextlib.suppress(urllib.error.URLError, OSError, ValueError):
                self.api("GET", "sys/health")
                return
            if time.monotonic() > deadline:
                raise TimeoutError("OpenBao did not become active")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, like a crashed host."""
        if self.proc is not None:
            _stop(self.proc, signal.SIGKILL)


@contextlib.contextmanager
def openbao_raft_server(workdir: str, *, extra_config: str = "") -> Iterator[PersistentOpenBao]:
    """A started, initialised, unsealed OpenBao keeping its data in ``workdir``."""
    bao = PersistentOpenBao(workdir, free_port(), free_port(), extra_config=extra_config)
    try:
        bao.start()
        yield bao
    finally:
        if bao.proc is not None:
            _stop(bao.proc)


def postgres_bindir() -> str | None:
    """The newest installed PostgreSQL server's bin directory (Debian layout), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return os.path.dirname(found[-1]) if found else None


@dataclass
class PostgresCluster:
    port: int
    superuser: str
    password: str = field(repr=False)
    bindir: str

    def psql(self, user: str, password: str, sql: str) -> subprocess.CompletedProcess[str]:
        """Run ``sql`` as ``user`` over TCP; the password goes through the environment, never argv."""
        return subprocess.run(
            [os.path.join(self.bindir, "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", user,
             "-d", "postgres", "-tAc", sql],
            env={**os.environ, "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "5"},
            capture_output=True, text=True, timeout=30, check=False)


@contextlib.contextmanager
def postgres_cluster(workdir: str, *, run_as: str = "postgres") -> Iterator[PostgresCluster]:
    """A throwaway PostgreSQL cluster (``initdb`` in ``workdir``) on a free loopback port.

    PostgreSQL refuses to run as root, so when we are root the server runs as ``run_as`` (Debian's
    ``postgres`` user), and ``workdir`` is handed to that user. Over TCP only password logins work; the
    superuser password is set through the local socket with SQL on psql's stdin, so it is never in argv
    or in a file.
    """
    bindir = postgres_bindir()
    if bindir is None:
        raise FileNotFoundError("PostgreSQL is not installed (apt-get install postgresql)")
    as_user: dict[str, Any] = {}
    if os.geteuid() == 0:
        as_user = {"user": run_as, "group": run_as, "extra_groups": []}
        shutil.chown(workdir, user=run_as, group=run_as)
    datadir = os.path.join(workdir, "pgdata")
    subprocess.run([os.path.join(bindir, "initdb"), "-D", datadir, "-U", "postgres", "--auth-local=trust",
                    "--auth-host=scram-sha-256", "--no-sync"], check=True, capture_output=True, timeout=120,
                   cwd=workdir, **as_user)
    port = free_port()
    with open(os.path.join(workdir, "postgres.log"), "ab") as log:
        # -k: the Unix socket goes into our private directory, not the system's /var/run/postgresql.
        proc = subprocess.Popen([os.path.join(bindir, "postgres"), "-D", datadir, "-p", str(port),
                                 "-h", "127.0.0.1", "-k", workdir, "-c", "fsync=off"],
                                stdout=log, stderr=subprocess.STDOUT, cwd=workdir, **as_user)
    try:
        _wait_port(port, proc, "PostgreSQL")
        password = secrets.token_urlsafe(18)
        subprocess.run([os.path.join(bindir, "psql"), "-h", workdir, "-p", str(port), "-U", "postgres",
                        "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-q"],
                       input=f"ALTER ROLE postgres PASSWORD '{password}';\n", text=True, check=True,
                       capture_output=True, timeout=30)
        cluster = PostgresCluster(port, "postgres", password, bindir)
        deadline = time.monotonic() + 30
        while cluster.psql("postgres", password, "select 1").returncode != 0:
            if time.monotonic() > deadline:
                raise TimeoutError("PostgreSQL did not accept logins")
            time.sleep(0.1)
        yield cluster
    finally:
        _stop(proc, signal.SIGINT)  # PostgreSQL's "fast" shutdown: does not wait for clients


@dataclass
class RaftNode:
    """One OpenBao server of a :class:`RaftCluster`: its own ports, data directory and log."""

    node_id: str
    workdir: str
    port: int
    cluster_port: int
    peers: list[str] = field(default_factory=list)  # the other nodes' API addresses, for retry_join
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        config = os.path.join(self.workdir, "openbao.hcl")
        os.makedirs(os.path.join(self.workdir, "data"), exist_ok=True)
        # retry_join: once unsealed, a node that is not in a cluster yet asks these peers to let it in.
        joins = "".join(f'  retry_join {{\n    leader_api_addr = "{peer}"\n  }}\n' for peer in self.peers)
        with open(config, "w") as f:
            f.write(f'storage "raft" {{\n  path = "{self.workdir}/data"\n  node_id = "{self.node_id}"\n'
                    f'  performance_multiplier = 1\n{joins}}}\n'
                    f'listener "tcp" {{\n  address = "127.0.0.1:{self.port}"\n'
                    f'  cluster_address = "127.0.0.1:{self.cluster_port}"\n  tls_disable = true\n}}\n'
                    f'api_addr = "{self.address}"\ncluster_addr = "https://127.0.0.1:{self.cluster_port}"\n'
                    'disable_mlock = true\n')
        with open(os.path.join(self.workdir, "openbao.log"), "ab") as log:
            self.proc = subprocess.Popen([bao_binary(), "server", f"-config={config}"], stdout=log,
                                         stderr=subprocess.STDOUT, cwd=self.workdir)
        _wait_port(self.port, self.proc, f"OpenBao {self.node_id}")

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, no leadership transfer, like a crashed host."""
        if self.proc is not None:
            _stop(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)


def _call(address: str, method: str, path: str, body: dict[str, Any] | None = None, *, token: str = "",
          timeout: float = 10) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{address}/v1/{path}", data=data, method=method,  # noqa: S310
                                 headers={"X-Vault-Token": token} if token else {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - loopback test server
        raw = resp.read()
    out: dict[str, Any] = json.loads(raw) if raw else {}
    return out


@dataclass
class RaftCluster:
    """A real OpenBao cluster on integrated storage (Raft): initialised, unsealed with one test key,
    every node a voter. Not dev mode: the answers, the election and the sealing are production's."""

    nodes: list[RaftNode]
    token: str = field(default="", repr=False)
    unseal_key: str = field(default="", repr=False)

    @property
    def addresses(self) -> list[str]:
        return [n.address for n in self.nodes]

    def api(self, method: str, path: str, body: dict[str, Any] | None = None, *,
            node: RaftNode | None = None) -> dict[str, Any]:
        """A root-token request to ``node``, or to the leader (for setting up tests; never the broker's)."""
        return _call((node or self.leader()).address, method, path, body, token=self.token)

    def leader(self, timeout: float = 30.0) -> RaftNode:
        """The active node, once the running nodes agree on one."""
        deadline = time.monotonic() + timeout
        while True:
            for node in self.nodes:
                if not node.running:
                    continue
                with contextlib.suppress(urllib.error.URLError, OSError, ValueError):
                    # sys/leader is unauthenticated and answers on standbys too.
                    info = _call(node.address, "GET", "sys/leader", timeout=2)
                    if info.get("is_self"):
                        return node
            if time.monotonic() > deadline:
                raise TimeoutError("no OpenBao node became active")
            time.sleep(0.1)

    def unseal(self, node: RaftNode, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                _call(node.address, "PUT", "sys/unseal", {"key": self.unseal_key})
                return
            except urllib.error.HTTPError as exc:
                # A node that has not joined yet answers 400 "not initialized" until its retry_join
                # has reached the leader (it tries every few seconds).
                detail = exc.read()[:200]
                if time.monotonic() > deadline:
                    raise TimeoutError(f"cannot unseal {node.node_id}: {exc.code} {detail!r}") from None
            time.sleep(0.2)

    def seal(self) -> None:
        """Seal every node (each one on its own: a sealed node answers 503 to everything but sys/)."""
        for node in self.nodes:
            if node.running:
                _call(node.address, "PUT", "sys/seal", token=self.token)

    def restart(self, node: RaftNode) -> None:
        """Start a stopped node again and unseal it: it rejoins with its Raft data from disk."""
        node.start()
        self.unseal(node)

    def heal(self) -> None:
        """Start every stopped node, unseal every sealed one, and wait until all are voters again: a
        test's way back to a whole cluster, whatever it broke."""
        for node in self.nodes:
            if not node.running:
                self.restart(node)
            elif _call(node.address, "GET", "sys/seal-status")["sealed"]:
                self.unseal(node)
        self.wait_voters()

    def wait_voters(self, timeout: float = 60.0) -> None:
        """Until every running node is a voter of the Raft configuration and one of them leads."""
        want = {n.node_id for n in self.nodes if n.running}
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(urllib.error.URLError, OSError, ValueError, TimeoutError, KeyError):
                servers = self.api("GET", "sys/storage/raft/configuration", node=self.leader(2))["data"]["config"][
                    "servers"]
                voters = {s["node_id"] for s in servers if s["voter"]}
                state = self.api("GET", "sys/storage/raft/autopilot/state")["data"]
                healthy = {s["id"] for s in state["servers"].values() if s["healthy"]}
                if want <= voters and want <= healthy:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"OpenBao nodes {sorted(want)} did not all become voters")
            time.sleep(0.2)


@contextlib.contextmanager
def openbao_raft_cluster(workdir: str, size: int = 3) -> Iterator[RaftCluster]:
    """``size`` OpenBao servers on loopback forming one Raft cluster: the first is initialised (one
    unseal key), the others join it through ``retry_join`` when unsealed, and autopilot makes all of
    them voters. Every node is stopped on the way out, whatever state the test left it in."""
    ports = [(free_port(), free_port()) for _ in range(size)]
    addresses = [f"http://127.0.0.1:{p}" for p, _ in ports]
    nodes = [RaftNode(f"node{i + 1}", os.path.join(workdir, f"node{i + 1}"), p, cp,
                      [a for a in addresses if a != addresses[i]]) for i, (p, cp) in enumerate(ports)]
    cluster = RaftCluster(nodes)
    try:
        for node in nodes:
            node.start()
        first = nodes[0]
        init = _call(first.address, "PUT", "sys/init", {"secret_shares": 1, "secret_threshold": 1})
        cluster.unseal_key, cluster.token = init["keys"][0], init["root_token"]
        cluster.unseal(first)
        cluster.leader()
        # Autopilot waits server_stabilization_time (10 s by default) before promoting a new node to
        # voter; the test cluster's nodes are on one host, so a short wait proves as much.
        cluster.api("POST", "sys/storage/raft/autopilot/configuration",
                    {"server_stabilization_time": "2s", "cleanup_dead_servers": False})
        for node in nodes[1:]:
            cluster.unseal(node)
        cluster.wait_voters()
        yield cluster
    finally:
        for node in nodes:
            node.stop()
