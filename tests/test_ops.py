"""Operations, with real signals to a real daemon: reload, clean stop with calls in flight, socket
activation, sd_notify messages, the metrics endpoint, structured logs, `broker status`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.client import Client
from broker.errors import InvalidToken, PermissionDenied
from broker.testing import WorkflowSpec, config_text, running_daemon, scrape_metrics, wait_serving
from broker.v1 import broker_pb2 as pb
from broker.v1 import broker_pb2_grpc as pb_grpc

ME = {"uid": os.geteuid()}


def write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.05)


def audit(path: str) -> list[dict[str, object]]:
    with open(path) as f:
        return [json.loads(x) for x in f.read().splitlines()]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "broker", *args], capture_output=True, text=True, timeout=30)


def two_tools(d: str, tools: tuple[str, ...] = ("t1", "t2"), **extra: object) -> str:
    return config_text(d, [WorkflowSpec("w", callers=[ME], tools=[{"name": t} for t in tools])], **extra)


def test_reload_valid_then_invalid(short_tmp: str) -> None:
    cfg = os.path.join(short_tmp, "broker.toml")
    write(cfg, two_tools(short_tmp))
    sock, log = os.path.join(short_tmp, "broker.sock"), os.path.join(short_tmp, "audit.jsonl")
    with running_daemon(cfg, sock, log) as d, Client(sock) as c:
        old_t2 = c.mint("w", "t2").token
        old_t1 = c.mint("w", "t1").token
        with pytest.raises(PermissionDenied):
            c.mint("w", "t3")
        # SIGHUP with a valid file: t2 removed, t3 added.
        write(cfg, two_tools(short_tmp, ("t1", "t3")))
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: any(e["event"] == "reload" for e in audit(log)))
        event = next(e for e in audit(log) if e["event"] == "reload")
        assert event["decision"] == "allow" and event["removed_scopes"] == ["w/t2"] and event["signal"] == "SIGHUP"
        assert event["old_sha256"] != event["new_sha256"]
        assert c.mint("w", "t3").token
        with pytest.raises(PermissionDenied):
            c.mint("w", "t2")
        with pytest.raises(InvalidToken, match="invalid token") as exc:
            c.verify(old_t2, "t2")
        assert "scope removed" in exc.value.reason
        assert c.verify(old_t1, "t1")["tool"] == "t1"  # untouched scopes keep their tokens
        # `broker reload` with an invalid file: refused, with the key path, old scopes still in force.
        write(cfg, two_tools(short_tmp, ("t1", "t3")).replace('name = "t3"', 'name = "t3"\nttl = "forever"'))
        r = cli("reload", "--socket", sock)
        assert r.returncode == 1
        assert "workflow[0].tool[1].ttl: invalid duration" in r.stderr
        assert c.mint("w", "t3").token
        refused = [e for e in audit(log) if e["event"] == "reload" and e["decision"] == "deny"]
        assert refused and refused[-1]["uid"] == os.geteuid()
        # Settings that need a restart are refused too.
        write(cfg, two_tools(short_tmp, ("t1", "t3"), algorithm="EdDSA"))
        r = cli("reload", "--socket", sock)
        assert r.returncode == 1 and "broker.algorithm: changing it needs a restart" in r.stderr
        assert d.proc.poll() is None


def test_sigterm_lets_calls_in_flight_finish(short_tmp: str) -> None:
    cfg = os.path.join(short_tmp, "broker.toml")
    write(cfg, two_tools(short_tmp))
    sock = os.path.join(short_tmp, "broker.sock")
    calls: list[tuple[float, bool, str]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def worker() -> None:
        with grpc.insecure_channel(f"unix:{sock}") as ch:
            stub = pb_grpc.BrokerStub(ch)
            req = pb.MintTokenRequest(workflow="w", tool="t1")
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    stub.MintToken(req, timeout=10)
                    ok, why = True, ""
                except grpc.RpcError as exc:
                    ok, why = False, exc.code().name
                with lock:
                    calls.append((t0, ok, why))
                if not ok:
                    return

    with running_daemon(cfg, sock, os.path.join(short_tmp, "audit.jsonl")) as d:
        threads = [threading.Thread(target=worker) for _ in range(12)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        signalled = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(15) == 0
        stop.set()
        for t in threads:
            t.join(15)
    before = [c for c in calls if c[0] < signalled - 0.005]
    assert len(before) > 100
    failed = [c for c in before if not c[1]]
    assert not failed, failed[:5]
    assert "stopped" in d.log()


def _serve_activated(cfg: str, listener: socket.socket, env: dict[str, str]) -> subprocess.Popen[bytes]:
    # The service manager sets LISTEN_PID to the pid it execs; exec keeps the pid, so a tiny wrapper
    # can set it to its own pid, move the socket to fd 3 and exec the daemon, as systemd would.
    wrapper = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_PID'] = str(os.getpid()); "
               "os.environ['LISTEN_FDS'] = '1'; os.execv(sys.executable, [sys.executable, '-m', 'broker', 'serve', "
               "'--config', sys.argv[2]])")
    return subprocess.Popen([sys.executable, "-c", wrapper, str(listener.fileno()), cfg], pass_fds=(listener.fileno(),),
                            env={**os.environ, **env}, stderr=subprocess.PIPE)


def test_socket_activation_loses_nothing(short_tmp: str) -> None:
    cfg = os.path.join(short_tmp, "broker.toml")
    write(cfg, two_tools(short_tmp))
    sock = os.path.join(short_tmp, "broker.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock)
    listener.listen(64)
    # An agent asks before the daemon exists: the kernel queues the connection on the passed socket.
    result: list[str] = []

    def early_client() -> None:
        with grpc.insecure_channel(f"unix:{sock}") as ch:
            r = pb_grpc.BrokerStub(ch).MintToken(pb.MintTokenRequest(workflow="w", tool="t1"), timeout=30,
                                                 wait_for_ready=True)
            result.append(r.token)

    t = threading.Thread(target=early_client)
    t.start()
    time.sleep(0.5)
    proc = _serve_activated(cfg, listener, {})
    try:
        t.join(30)
        assert result and result[0].count(".") == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert proc.stderr is not None
        assert "socket-activated" in proc.stderr.read().decode()
        # The daemon stopped without breaking the manager's socket: a second start serves on it again.
        assert os.path.exists(sock)
        proc = _serve_activated(cfg, listener, {})
        wait_serving(sock)
        with Client(sock) as c:
            assert c.mint("w", "t1").token
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
        listener.close()


def test_socket_activation_refuses_a_foreign_socket(short_tmp: str) -> None:
    cfg = os.path.join(short_tmp, "broker.toml")
    write(cfg, two_tools(short_tmp))
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(os.path.join(short_tmp, "other.sock"))
    other.listen()
    proc = _serve_activated(cfg, other, {})
    try:
        assert proc.wait(15) == 1
        assert proc.stderr is not None and b"is not broker.socket" in proc.stderr.read()
    finally:
        other.close()


def test_notify_socket_messages(short_tmp: str) -> None:
    cfg = os.path.join(short_tmp, "broker.toml")
    write(cfg, two_tools(short_tmp))
    notify_path = os.path.join(short_tmp, "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ns:
        ns.bind(notify_path)
        ns.settimeout(10)
        env = {"NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "400000"}
        with running_daemon(cfg, os.path.join(short_tmp, "broker.sock"), os.path.join(short_tmp, "a.jsonl"),
                            env=env) as d:
            seen: list[str] = []

            def until(prefix: str) -> None:
                while True:
                    msg = ns.recv(4096).decode()
                    seen.append(msg)
                    if msg.startswith(prefix):
                        return

            until("READY=1")
            until("WATCHDOG=1")  # pinged at half the watchdog interval
            until("WATCHDOG=1")
            d.proc.send_signal(signal.SIGHUP)
            until("RELOADING=1")
            assert "MONOTONIC_USEC=" in seen[-1]
            until("READY=1")
            d.proc.send_signal(signal.SIGTERM)
            until("STOPPING=1")
            assert d.proc.wait(15) == 0


def test_metrics_endpoint(short_tmp: str) -> None:
    cfg = os.path.join(short_tmp, "broker.toml")
    metrics_sock = os.path.join(short_tmp, "metrics.sock")
    write(cfg, two_tools(short_tmp) + f'\n[metrics]\nlisten = "unix:{metrics_sock}"\n')
    sock = os.path.join(short_tmp, "broker.sock")
    with running_daemon(cfg, sock, os.path.join(short_tmp, "a.jsonl")), Client(sock) as c:
        tokens = [c.mint("w", "t1").token for _ in range(3)]
        c.verify(tokens[0], "t1")
        with pytest.raises(PermissionDenied):
            c.mint("w", "nope")
        with pytest.raises(PermissionDenied):
            c.mint("no-such-workflow-" + "x" * 50, "t1")
        # The caller sees a denial as soon as the status is sent; the handler's timing is recorded just
        # after, so wait until all five MintToken calls are counted.
        count = 'broker_rpc_duration_seconds_count{method="MintToken"} 5.0'
        wait_for(lambda: count in scrape_metrics(metrics_sock))
        text = scrape_metrics(metrics_sock)
    for t in tokens:
        assert t not in text and t.split(".")[2] not in text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    mints = {tuple(sorted(s.labels.items())): s.value for s in fams["broker_mints"].samples
             if s.name == "broker_mints_total"}
    assert mints[(("tool", "t1"), ("workflow", "w"))] == 3
    denials = {(s.labels["workflow"], s.labels["tool"], s.labels["reason"]): s.value
               for s in fams["broker_denials"].samples if s.name == "broker_denials_total"}
    # Unknown names never become label values: cardinality stays bounded by the config.
    assert denials == {("w", "_unknown", "tool_not_granted"): 1, ("_unknown", "_unknown", "unknown_workflow"): 1}
    verifies = {s.labels["result"]: s.value for s in fams["broker_verifications"].samples
                if s.name == "broker_verifications_total"}
    assert verifies == {"valid": 1}
    buckets = [s for s in fams["broker_rpc_duration_seconds"].samples
               if s.labels.get("method") == "MintToken" and s.name.endswith("_count")]
    assert buckets and buckets[0].value == 5
    assert any(s.value >= 1 for s in fams["broker_frontdoor_connections"].samples)
    assert fams["broker_signing_key_age_seconds"].samples[0].value >= 0


def test_metrics_listen_must_be_local(short_tmp: str) -> None:
    cfg = os.path.join(short_tmp, "broker.toml")
    write(cfg, two_tools(short_tmp) + '\n[metrics]\nlisten = "0.0.0.0:9464"\n')
    r = cli("config", "check", cfg)
    assert r.returncode == 1 and "metrics.listen: metrics may listen on 127.0.0.1" in r.stderr


def test_json_logs_and_status(short_tmp: str) -> None:
    cfg = os.path.join(short_tmp, "broker.toml")
    write(cfg, two_tools(short_tmp))
    sock = os.path.join(short_tmp, "broker.sock")
    with running_daemon(cfg, sock, os.path.join(short_tmp, "a.jsonl")) as d:
        with Client(sock) as c:
            c.mint("w", "t1")
        r = cli("status", "--socket", sock)
        assert r.returncode == 0, r.stderr
        assert "1 mints, 0 denials" in r.stdout and "backends: tokens" in r.stdout
        assert "vault: not configured" in r.stdout
        st = json.loads(cli("status", "--json", "--socket", sock).stdout)
        assert st["workflows"] == ["w"] and st["keys"]["current"] in st["keys"]["published"]
        lines = [json.loads(x) for x in d.log().splitlines() if x.startswith("{")]
    ready = next(x for x in lines if x["msg"].startswith("ready"))
    assert ready["level"] == "info" and "token_backend=" in ready["msg"]


def test_sigusr1_reopens_the_audit_log_and_applies_no_config_edit(short_tmp: str) -> None:
    # What logrotate does: rename the file, then signal. The next decision goes to a new file, nothing
    # is lost in between, and a config edit waiting on disk is not applied by the rotation.
    cfg = os.path.join(short_tmp, "broker.toml")
    write(cfg, two_tools(short_tmp))
    sock, audit = os.path.join(short_tmp, "broker.sock"), os.path.join(short_tmp, "audit.jsonl")
    with running_daemon(cfg, sock, audit) as d, Client(sock) as c:
        first = c.mint("w", "t1").jti
        os.rename(audit, audit + "-1")
        write(cfg, two_tools(short_tmp).replace('name = "t2"', 'name = "t9"'))  # edited, not reloaded
        d.proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: "audit log reopened" in d.log())
        second = c.mint("w", "t2").jti  # t2 still exists: the edit was not applied
        assert first in open(audit + "-1").read() and first not in open(audit).read()
        assert second in open(audit).read()
        assert os.stat(audit).st_mode & 0o777 == 0o600
        assert "reloaded config" not in d.log()
