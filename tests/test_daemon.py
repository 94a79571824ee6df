"""The daemon as a real process on a real socket: the CLI, policy, audit, and hostile clients."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import grpc
import jwt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from joserfc import jwt as jose_jwt
from joserfc.jwk import KeySet

from broker.client import Client
from broker.errors import InvalidToken, PermissionDenied
from broker.testing import DaemonProcess, WorkflowSpec, config_text, running_daemon
from broker.v1 import broker_pb2 as pb
from broker.v1 import broker_pb2_grpc as pb_grpc
from tests.conftest import default_workflows


def cli(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "broker", *args], capture_output=True, text=True, input=stdin,
                          env={**os.environ, **(env or {})}, timeout=30)


def audit_lines(d: DaemonProcess) -> list[dict[str, object]]:
    with open(d.audit_log) as f:
        return [json.loads(x) for x in f.read().splitlines()]


def test_token_and_verify_through_the_cli(daemon: DaemonProcess) -> None:
    r = cli("token", "--workflow", "support-summarize", "--tool", "read_ticket", "--socket", daemon.socket)
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    v = cli("verify", "--tool", "read_ticket", token, "--socket", daemon.socket)
    assert v.returncode == 0, v.stderr
    claims = json.loads(v.stdout)
    assert claims["sub"] == "spiffe://example.org/workflow/support-summarize"
    assert claims["iss"] == "spiffe://example.org"
    assert (claims["wf"], claims["tenant"], claims["tool"], claims["aud"]) == (
        "support-summarize", "acme", "read_ticket", "read_ticket")
    assert claims["act"] == ["ticket:read"] and claims["dst"] == ["https://crm.internal/api/tickets/*"]
    assert claims["exp"] - claims["iat"] == 120  # the tool's ttl
    assert len(claims["jti"]) == 22  # 128 bits, base64url
    # Reading the token from stdin keeps it out of argv.
    assert cli("verify", "--tool", "read_ticket", "-", "--socket", daemon.socket, stdin=token + "\n").returncode == 0
    wrong = cli("verify", "--tool", "send_email", "--audience", "read_ticket", token, "--socket", daemon.socket)
    assert wrong.returncode == 1 and "wrong tool" in wrong.stderr
    # Without --audience the audience defaults to the other tool too: the cause is still the tool.
    wrong = cli("verify", "--tool", "send_email", token, "--socket", daemon.socket)
    assert wrong.returncode == 1 and "invalid token: wrong tool" in wrong.stderr
    tampered = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    bad = cli("verify", "--tool", "read_ticket", tampered, "--socket", daemon.socket)
    assert bad.returncode == 1 and "invalid token" in bad.stderr


def test_ttl_and_audience_requests(daemon: DaemonProcess) -> None:
    with Client(daemon.socket) as c:
        m = c.mint("support-summarize", "read_ticket", audience="crm", ttl=90)
        claims = c.verify(m.token, "read_ticket", audience="crm")
        assert claims["exp"] - claims["iat"] == 90 and claims["aud"] == "crm"
        with pytest.raises(InvalidToken) as exc:
            c.verify(m.token, "read_ticket")  # audience defaults to the tool name: not "crm"
        assert "wrong audience" in exc.value.reason
    r = cli("token", "--workflow", "support-summarize", "--tool", "read_ticket", "--ttl", "5m", "--socket",
            daemon.socket)
    assert r.returncode == 1 and "permission denied" in r.stderr


def test_socket_resolution_order(daemon: DaemonProcess, short_tmp: str) -> None:
    args = ["token", "--workflow", "support-summarize", "--tool", "read_ticket"]
    assert cli(*args, env={"BROKER_SOCKET": daemon.socket}).returncode == 0
    assert cli(*args, "--config", os.path.join(short_tmp, "broker.toml")).returncode == 0
    assert cli(*args, env={"SPIFFE_ENDPOINT_SOCKET": "unix://" + daemon.socket}).returncode == 0
    # --socket wins over the environment
    r = cli(*args, "--socket", "/nonexistent/broker.sock", env={"BROKER_SOCKET": daemon.socket})
    assert r.returncode == 1 and "unreachable" in r.stderr


@pytest.mark.parametrize(("workflow", "tool", "reason", "told"), [
    # A member's own mistake is said to it: DescribeWorkflow would show it the tools anyway.
    ("support-summarize", "export_all_customers", "not granted",
     "permission denied: tool 'export_all_customers' is not granted to workflow 'support-summarize'"),
    # A non-member learns nothing, not even whether the workflow exists.
    ("no-such-workflow", "read_ticket", "unknown workflow", "permission denied"),
    ("billing", "charge", "does not match", "permission denied"),
])
def test_denials_are_generic_and_audited(daemon: DaemonProcess, workflow: str, tool: str, reason: str,
                                         told: str) -> None:
    with Client(daemon.socket) as c, pytest.raises(PermissionDenied) as exc:
        c.mint(workflow, tool)
    last = audit_lines(daemon)[-1]
    assert exc.value.reason == f"{told} (request {last['request_id']})"
    assert last["event"] == "deny" and reason in str(last["reason"])
    assert last["pid"] == os.getpid() and last["uid"] == os.geteuid() and last["exe"]


def test_audit_has_metadata_never_tokens(daemon: DaemonProcess) -> None:
    with Client(daemon.socket) as c:
        m = c.mint("support-summarize", "read_ticket")
    text = open(daemon.audit_log).read()
    assert m.token not in text and m.token.split(".")[2] not in text
    line = audit_lines(daemon)[-1]
    assert line["event"] == "mint" and line["jti"] == m.jti and line["decision"] == "allow"
    assert {"time", "pid", "uid", "exe", "workflow", "tool", "audience", "kid"} <= set(line)
    assert stat.S_IMODE(os.stat(daemon.audit_log).st_mode) == 0o600


def test_tokens_verify_with_pyjwt_and_joserfc(daemon: DaemonProcess) -> None:
    r = cli("jwks", "--socket", daemon.socket)
    assert r.returncode == 0, r.stderr
    jwks = json.loads(r.stdout)
    with Client(daemon.socket) as c:
        token = c.mint("support-summarize", "read_ticket", audience="crm").token
    kid = jwt.get_unverified_header(token)["kid"]
    key = jwt.PyJWKSet.from_dict(jwks)[kid]
    claims = jwt.decode(token, key.key, algorithms=["ES256"], audience="crm")
    assert claims["tool"] == "read_ticket"
    keyset = KeySet.import_key_set(jwks)
    decoded = jose_jwt.decode(token, keyset, algorithms=["ES256"])
    jose_jwt.JWTClaimsRegistry(aud={"essential": True, "value": "crm"}, exp={"essential": True}).validate(
        decoded.claims)
    assert decoded.claims["wf"] == "support-summarize"


def _health(path: str) -> int:
    with grpc.insecure_channel(f"unix:{path}") as ch:
        return int(health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status)


def test_garbage_and_oversized_requests_leave_it_serving(daemon: DaemonProcess) -> None:
    for payload in (os.urandom(1 << 20), b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(4096), b"\x00" * 100,
                    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(daemon.socket)
            try:
                s.sendall(payload)
                s.settimeout(2)
                s.recv(65536)
            except OSError:
                pass  # the server may reset a garbage connection: that is the point
    # connections opened and dropped without a byte
    for _ in range(50):
        socket.socket(socket.AF_UNIX).connect(daemon.socket)
    with grpc.insecure_channel(f"unix:{daemon.socket}") as ch:
        stub = pb_grpc.BrokerStub(ch)
        with pytest.raises(grpc.RpcError) as exc:
            stub.MintToken(pb.MintTokenRequest(workflow="support-summarize", tool="read_ticket",
                                               audience="a" * 200_000), timeout=5)
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as exc:
            stub.MintToken(pb.MintTokenRequest(workflow="support-summarize", tool="read_ticket",
                                               audience="a" * 1000), timeout=5)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as exc:
            stub.VerifyToken(pb.VerifyTokenRequest(token="x" * 60_000, tool="read_ticket"), timeout=5)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _health(daemon.socket) == health_pb2.HealthCheckResponse.SERVING
    with Client(daemon.socket) as c:
        assert c.mint("support-summarize", "read_ticket").token


def test_front_door_under_sustained_load(daemon: DaemonProcess) -> None:
    """Several clients hammer the socket for a few seconds; afterwards new connections still work."""
    errors: list[BaseException] = []
    counts: list[int] = []
    stop_at = time.monotonic() + 4.0

    def worker() -> None:
        n = 0
        try:
            with grpc.insecure_channel(f"unix:{daemon.socket}") as ch:
                stub = pb_grpc.BrokerStub(ch)
                req = pb.MintTokenRequest(workflow="support-summarize", tool="read_ticket")
                while time.monotonic() < stop_at and n < 20_000:
                    stub.MintToken(req, timeout=10)
                    n += 1
        except BaseException as exc:
            errors.append(exc)
        counts.append(n)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert sum(counts) > 0
    for _ in range(20):  # fresh connections after the load
        assert _health(daemon.socket) == health_pb2.HealthCheckResponse.SERVING
    assert f"/proc/{daemon.proc.pid}" and daemon.proc.poll() is None


def test_internal_socket_is_private(daemon: DaemonProcess) -> None:
    parent = os.path.dirname(daemon.socket)
    internal = [n for n in os.listdir(parent) if n.startswith(".broker-internal-")]
    assert len(internal) == 1
    st = os.stat(os.path.join(parent, internal[0]))
    assert stat.S_IMODE(st.st_mode) == 0o700
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o666


def test_reflection_lists_the_services(daemon: DaemonProcess) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(f"unix:{daemon.socket}") as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(iter(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            list_services="")]), timeout=5)))
    names = {s.name for s in resp.list_services_response.service}
    assert {"broker.v1.Broker", "SpiffeWorkloadAPI", "grpc.health.v1.Health"} <= names


def test_sigterm_exits_cleanly_and_removes_sockets(daemon: DaemonProcess) -> None:
    parent = os.path.dirname(daemon.socket)
    assert daemon.stop(signal.SIGTERM) == 0
    assert not os.path.exists(daemon.socket)
    assert not [n for n in os.listdir(parent) if n.startswith(".broker-internal-")]
    assert "stopped" in daemon.log()


def test_serve_refuses_an_invalid_config(short_tmp: str) -> None:
    path = os.path.join(short_tmp, "bad.toml")
    with open(path, "w") as f:
        f.write(config_text(short_tmp, [WorkflowSpec("w", callers=[{"uid": "root"}])]))
    r = cli("serve", "--config", path)
    assert r.returncode == 1
    assert "workflow[0].caller[0].uid: expected int" in r.stderr
    assert not os.path.exists(os.path.join(short_tmp, "broker.sock"))


def test_refuses_to_replace_a_non_socket(short_tmp: str) -> None:
    sock = os.path.join(short_tmp, "broker.sock")
    with open(sock, "w") as f:
        f.write("precious")
    path = os.path.join(short_tmp, "broker.toml")
    with open(path, "w") as f:
        f.write(config_text(short_tmp, [WorkflowSpec("w", callers=[{"uid": 0}])]))
    r = cli("serve", "--config", path)
    assert r.returncode == 1 and "not a socket" in r.stderr
    assert open(sock).read() == "precious"


def test_eddsa_daemon(short_tmp: str) -> None:
    path = os.path.join(short_tmp, "broker.toml")
    with open(path, "w") as f:
        f.write(config_text(short_tmp, [WorkflowSpec("w", callers=[{"uid": os.geteuid()}],
                                                     tools=[{"name": "t"}])], algorithm="EdDSA"))
    with running_daemon(path, os.path.join(short_tmp, "broker.sock"), os.path.join(short_tmp, "a.jsonl")) as d, \
            Client(d.socket) as c:
        token = c.mint("w", "t").token
        assert jwt.get_unverified_header(token)["alg"] == "EdDSA"
        assert c.verify(token, "t")["wf"] == "w"


def test_connection_limit_protects_the_daemon(short_tmp: str) -> None:
    path = os.path.join(short_tmp, "broker.toml")
    with open(path, "w") as f:
        f.write(config_text(short_tmp, [WorkflowSpec("w", callers=[{"uid": os.geteuid()}], tools=[{"name": "t"}])],
                            max_connections=4))
    sock = os.path.join(short_tmp, "broker.sock")
    with running_daemon(path, sock, os.path.join(short_tmp, "a.jsonl")) as d:
        held = []
        for _ in range(10):
            s = socket.socket(socket.AF_UNIX)
            s.connect(sock)
            held.append(s)
        time.sleep(0.5)
        closed = 0
        for s in held:
            s.settimeout(0.5)
            try:
                if s.recv(1) == b"":
                    closed += 1  # the daemon closed it: over the limit
            except TimeoutError:
                pass  # still open, waiting for an HTTP/2 preface
        # At most 4 stay open (fewer if the readiness probe's connection was still being torn down).
        assert closed in (6, 7)
        for s in held:
            s.close()
        time.sleep(0.5)
        assert _health(sock) == health_pb2.HealthCheckResponse.SERVING
        assert "connection limit 4 reached" in d.log()


def test_require_native_refuses_the_pure_engine(short_tmp: str) -> None:
    path = os.path.join(short_tmp, "broker.toml")
    with open(path, "w") as f:
        f.write(config_text(short_tmp, [WorkflowSpec("w", callers=[{"uid": os.geteuid()}])], require_native=True))
    r = subprocess.run([sys.executable, "-m", "broker", "serve", "--config", path], capture_output=True, text=True,
                       timeout=30, env={**os.environ, "BROKER_PUREPYTHON": "1"})
    assert r.returncode == 1 and "native token engine is required" in r.stderr
    # With the native engine built, the same file starts (the backend is named in the ready line).
    with running_daemon(path, os.path.join(short_tmp, "broker.sock"), os.path.join(short_tmp, "a.jsonl")) as d:
        assert "token_backend=native" in d.log()


def test_one_user_cannot_hold_every_stream_slot(daemon: DaemonProcess) -> None:
    # Key streams need no grant; without a per-user cap, endless streams from one local user would use
    # up the server's concurrent-RPC limit and every mint would fail.
    from broker.daemon import MAX_STREAMS_PER_CONNECTION
    from broker.instrument import MAX_STREAMS_PER_UID

    # Enough connections that none is at its own stream limit (a call beyond it would queue in the client).
    n = MAX_STREAMS_PER_UID // (MAX_STREAMS_PER_CONNECTION - 2) + 1
    channels = [grpc.insecure_channel(f"unix:{daemon.socket}", options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(n)]
    streams = []
    try:
        for i in range(MAX_STREAMS_PER_UID):
            s = pb_grpc.BrokerStub(channels[i % n]).WatchJWKS(pb.GetJWKSRequest())
            next(s)  # open for real
            streams.append(s)
        with pytest.raises(grpc.RpcError) as exc:
            next(pb_grpc.BrokerStub(channels[0]).WatchJWKS(pb.GetJWKSRequest()))
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with Client(daemon.socket) as c:
            assert c.mint("support-summarize", "read_ticket").token  # minting is unaffected
        streams.pop().cancel()
        deadline = time.monotonic() + 10
        while True:  # a slot is free again once the server has seen the cancellation
            try:
                streams.append(again := pb_grpc.BrokerStub(channels[1]).WatchJWKS(pb.GetJWKSRequest()))
                next(again)
                break
            except grpc.RpcError as retry:
                assert retry.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        for s in streams:
            s.cancel()
        for ch in channels:
            ch.close()


def test_a_second_daemon_does_not_steal_a_live_socket(daemon: DaemonProcess, short_tmp: str) -> None:
    cfg = os.path.join(short_tmp, "broker.toml")
    r = subprocess.run([sys.executable, "-m", "broker", "serve", "--config", cfg], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode != 0 and "in use by a running broker" in r.stderr
    with Client(daemon.socket) as c:  # the first daemon still has its socket
        assert c.mint("support-summarize", "read_ticket").token


def test_a_stale_socket_file_is_replaced(short_tmp: str) -> None:
    path = os.path.join(short_tmp, "broker.toml")
    with open(path, "w") as f:
        f.write(config_text(short_tmp, default_workflows()))
    sock_path = os.path.join(short_tmp, "broker.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(sock_path)  # left behind by a crash: bound, nobody listening
    stale.close()
    with running_daemon(path, sock_path, os.path.join(short_tmp, "audit.jsonl")) as d, Client(d.socket) as c:
        assert c.mint("support-summarize", "read_ticket").token
    assert not os.path.exists(sock_path)  # and removed at a clean stop


def test_a_socket_directory_too_long_for_the_internal_socket_stops_the_start_cleanly(short_tmp: str) -> None:
    # The public socket fits the 107-byte limit, the internal one (in a private directory beside it) would not.
    directory = os.path.join(short_tmp, "d" * (80 - len(short_tmp)))
    os.mkdir(directory)
    cfg = os.path.join(directory, "broker.toml")
    with open(cfg, "w") as f:
        f.write(config_text(directory, default_workflows()))
    r = cli("serve", "--config", cfg)
    assert r.returncode == 1
    assert r.stderr == (f"broker serve: broker.socket: the daemon's internal socket in {directory} would pass the "
                        f"107-byte limit of Unix socket paths; use a directory of at most 71 bytes\n")
    assert sorted(os.listdir(directory)) == ["audit.jsonl", "broker.toml"]  # no socket, no internal directory


def test_a_start_failing_after_the_socket_is_bound_leaves_nothing_behind(short_tmp: str) -> None:
    # Vault settings are read once the public socket is bound; a CA file that is not there fails the start
    # there. No Vault server is needed: the failure comes before any request.
    cfg = os.path.join(short_tmp, "broker.toml")
    creds = os.path.join(short_tmp, "role_id")
    with open(creds, "w") as f:
        f.write("x\n")
    with open(cfg, "w") as f:
        f.write(config_text(short_tmp, default_workflows())
                + f'\n[vault]\naddress = "https://127.0.0.1:1"\nca_file = "{short_tmp}/no-ca.pem"\n'
                + f'[vault.auth]\nmethod = "approle"\nrole_id_file = "{creds}"\nsecret_id_file = "{creds}"\n'
                + f'\n[metrics]\nlisten = "unix:{short_tmp}/metrics.sock"\n')
    r = cli("serve", "--config", cfg)
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1] == f"broker serve: cannot read vault.ca_file {short_tmp}/no-ca.pem: " \
                                        "No such file or directory", r.stderr
    assert sorted(os.listdir(short_tmp)) == ["audit.jsonl", "broker.toml", "role_id"]
