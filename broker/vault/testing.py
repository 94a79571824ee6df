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
                    f'api_addr = "{self.address}"\ncluster_addr = "http://127.0.0.1:{self.cluster_port}"\n')
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
def openbao_raft_server(workdir: str) -> Iterator[PersistentOpenBao]:
    """A started, initialised, unsealed OpenBao keeping its data in ``workdir``."""
    bao = PersistentOpenBao(workdir, free_port(), free_port())
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
