"""The metrics scrape of a real daemon, read by the parsers Prometheus users have, against the README."""

from __future__ import annotations

import http.client
import os
import queue
import re
import socket
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families as text_families

from broker.client import Client
from broker.errors import PermissionDenied
from broker.testing import config_text, free_port, running_daemon, scrape_metrics
from broker.v1 import broker_pb2 as pb
from broker.v1 import broker_pb2_grpc as pb_grpc
from tests.conftest import default_workflows

README = os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")
OPENMETRICS = "application/openmetrics-text; version=1.0.0"
VAULT_ONLY = "with `[vault]` only"


def readme_metrics() -> dict[str, tuple[str, frozenset[str], str]]:
    """README's metrics table: exposed name -> (type, label names, meaning)."""
    with open(README) as f:
        rows = re.findall(r"^\s*\| `(broker_\w+)` \| (\w+) \|([^|]*)\| (.*) \|$", f.read(), re.MULTILINE)
    names = [name for name, _, _, _ in rows]
    assert len(names) == len(set(names)), "a metric listed twice"
    return {name: (kind, frozenset(re.findall(r"`(\w+)`", labels)), meaning) for name, kind, labels, meaning in rows}


def exposed_name(family: str, kind: str) -> str:
    # A counter family is named without the _total its one sample carries; users query the sample name.
    return family + "_total" if kind == "counter" else family


def test_scrape_parses_as_text_and_openmetrics_and_matches_the_readme(short_tmp: str) -> None:
    cfg = os.path.join(short_tmp, "broker.toml")
    metrics_sock = os.path.join(short_tmp, "metrics.sock")
    with open(cfg, "w") as f:
        f.write(config_text(short_tmp, default_workflows()) + f'\n[metrics]\nlisten = "unix:{metrics_sock}"\n')
    sock = os.path.join(short_tmp, "broker.sock")
    with running_daemon(cfg, sock, os.path.join(short_tmp, "audit.jsonl")), Client(sock) as c:
        # Give the labelled families samples, so that their labels can be checked too.
        c.verify(c.mint("support-summarize", "read_ticket").token, "read_ticket")  # a connection stays open
        with pytest.raises(PermissionDenied):
            c.mint("support-summarize", "no-such-tool")
        c.reload()
        text = scrape_metrics(metrics_sock)
        openmetrics = scrape_metrics(metrics_sock, accept=OPENMETRICS)
    assert openmetrics.endswith("# EOF\n")  # the OpenMetrics encoder answered, not the text one
    # Both parsers refuse two families with one name ("Received metadata after samples"); list() runs them.
    by_text = {f.name: f.type for f in text_families(text)}
    by_openmetrics = {f.name: f.type for f in openmetrics_families(openmetrics)}
    assert by_text == by_openmetrics
    assert by_text["broker_frontdoor_connections"] == "gauge"
    assert by_text["broker_frontdoor_accepts"] == "counter"
    exposed = {exposed_name(name, kind): kind for name, kind in by_text.items()}
    listed = readme_metrics()
    without_vault = {name: kind for name, (kind, _, meaning) in listed.items() if VAULT_ONLY not in meaning}
    assert exposed == without_vault, "README.md's metrics table and the daemon disagree"
    labels = {exposed_name(f.name, f.type): {k for x in f.samples for k in x.labels} - {"le"}
              for f in text_families(text) if f.samples}
    assert set(labels) == set(without_vault) - {"broker_vault_request_duration_seconds"}  # no Vault, no samples
    assert labels == {name: listed[name][1] for name in labels}, "README.md lists other labels"


def _serve_once(cfg: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "broker", "serve", "--config", cfg], capture_output=True,
                          text=True, timeout=60, check=False)


def _config(directory: str, listen: str, name: str = "broker") -> str:
    cfg = os.path.join(directory, f"{name}.toml")
    with open(cfg, "w") as f:
        f.write(config_text(directory, default_workflows(), socket=os.path.join(directory, f"{name}.sock"))
                + f'\n[metrics]\nlisten = "{listen}"\n')
    return cfg


def test_a_metrics_port_in_use_stops_the_start_cleanly(short_tmp: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = _serve_once(_config(short_tmp, f"127.0.0.1:{port}"))
    assert r.returncode == 1
    # One line that says what and where, no traceback.
    assert r.stderr == f"broker serve: metrics: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    # Nothing left behind: no public socket file, no internal socket directory. (The audit log is opened
    # first, as the record of every start; it stays, empty.)
    assert sorted(os.listdir(short_tmp)) == ["audit.jsonl", "broker.toml"]
    assert os.path.getsize(os.path.join(short_tmp, "audit.jsonl")) == 0


def test_a_second_daemon_does_not_take_a_live_metrics_socket(short_tmp: str) -> None:
    metrics_sock = os.path.join(short_tmp, "metrics.sock")
    first = _config(short_tmp, f"unix:{metrics_sock}", "first")
    with running_daemon(first, os.path.join(short_tmp, "first.sock"), os.path.join(short_tmp, "audit.jsonl")):
        r = _serve_once(_config(short_tmp, f"unix:{metrics_sock}", "second"))
        assert r.returncode == 1
        assert r.stderr == f"broker serve: metrics: {metrics_sock} is in use by a running broker; stop it first\n"
        assert not os.path.exists(os.path.join(short_tmp, "second.sock"))
        assert "broker_uptime_seconds" in scrape_metrics(metrics_sock)  # still the first daemon's
    assert not os.path.exists(metrics_sock)  # removed at the first daemon's clean stop


def test_a_stale_metrics_socket_is_replaced_and_a_file_is_not(short_tmp: str) -> None:
    metrics_sock = os.path.join(short_tmp, "metrics.sock")
    cfg = _config(short_tmp, f"unix:{metrics_sock}")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(metrics_sock)  # left behind by a crash: bound, nobody listening
    stale.close()
    with running_daemon(cfg, os.path.join(short_tmp, "broker.sock"), os.path.join(short_tmp, "audit.jsonl")):
        assert "broker_uptime_seconds" in scrape_metrics(metrics_sock)
    with open(metrics_sock, "w") as f:
        f.write("not a socket\n")
    r = _serve_once(cfg)
    assert r.returncode == 1 and "exists and is not a socket" in r.stderr
    with open(metrics_sock) as f:
        assert f.read() == "not a socket\n"


def test_an_idle_connection_does_not_block_scrapes(short_tmp: str) -> None:
    # Any local user can connect to a loopback port: one who connects and sends nothing must not stall
    # the scrapes of everyone else.
    port = free_port()
    cfg = _config(short_tmp, f"127.0.0.1:{port}")
    with running_daemon(cfg, os.path.join(short_tmp, "broker.sock"), os.path.join(short_tmp, "audit.jsonl")), \
            socket.create_connection(("127.0.0.1", port)):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request("GET", "/metrics")
            assert "broker_uptime_seconds" in conn.getresponse().read().decode()
        finally:
            conn.close()


def test_a_metrics_socket_path_too_long_stops_the_start_cleanly(short_tmp: str) -> None:
    listen = "unix:" + os.path.join(short_tmp, "m" * 120)
    r = _serve_once(_config(short_tmp, listen))
    assert r.returncode == 1
    assert r.stderr == f"broker serve: metrics: cannot listen on {listen}: AF_UNIX path too long\n"
    assert sorted(os.listdir(short_tmp)) == ["audit.jsonl", "broker.toml"]


def test_open_streams_are_counted_whatever_kind_their_handler_is(short_tmp: str) -> None:
    """Async-generator handlers (WatchJWKS), writer coroutines (health Watch) and a bidirectional stream
    (reflection) each hold one stream slot: the gauge counts all three while they are open."""
    metrics_sock = os.path.join(short_tmp, "metrics.sock")
    cfg = _config(short_tmp, f"unix:{metrics_sock}")
    sock = os.path.join(short_tmp, "broker.sock")
    requests: queue.Queue[reflection_pb2.ServerReflectionRequest | None] = queue.Queue()

    def reflection_requests() -> Iterator[reflection_pb2.ServerReflectionRequest]:
        while (r := requests.get()) is not None:
            yield r

    with running_daemon(cfg, sock, os.path.join(short_tmp, "audit.jsonl")), \
            grpc.insecure_channel(f"unix:{sock}") as ch:
        jwks = pb_grpc.BrokerStub(ch).WatchJWKS(pb.GetJWKSRequest(), timeout=30)
        health = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=30)
        reflect = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(reflection_requests(), timeout=30)
        requests.put(reflection_pb2.ServerReflectionRequest(list_services=""))
        for stream in (jwks, health, reflect):
            next(stream)  # its handler runs, inside its slot
        try:
            assert "broker_stream_subscribers 3.0" in scrape_metrics(metrics_sock).splitlines()
        finally:
            requests.put(None)
            jwks.cancel()
            health.cancel()
