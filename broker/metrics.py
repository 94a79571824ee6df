"""Prometheus metrics on a separate listener (a loopback port or a Unix socket), off by default.

Labels never carry token or secret material, and their values come from bounded sets: workflow and tool
names from the config (anything else is counted as ``_unknown``), fixed reason categories, method names.
"""

from __future__ import annotations

import os
import socketserver
import threading
from collections.abc import Callable, Iterable, Mapping
from http.server import HTTPServer, ThreadingHTTPServer
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, MetricsHandler, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from broker.errors import BrokerError
from broker.frontdoor import file_identity, remove_stale_socket, unlink_if_same

UNKNOWN: Final = "_unknown"
# Seconds a scrape connection may sit idle before it is closed: bounds the threads idle clients can hold.
SCRAPE_TIMEOUT: Final = 10.0
# Denial reasons are free text for the audit log; metrics get one of these categories.
DENIAL_CATEGORIES: Final = (
    ("unknown workflow", "unknown_workflow"),
    ("does not match", "caller_mismatch"),
    ("may not use", "caller_mismatch"),
    ("not granted", "tool_not_granted"),
    ("exceeds", "ttl_exceeded"),
    ("identity", "attestation"),
    ("pid", "attestation"),
)


def denial_category(reason: str) -> str:
    return next((cat for needle, cat in DENIAL_CATEGORIES if needle in reason), "other")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.mints = Counter("broker_mints", "Tokens minted", ["workflow", "tool"], registry=r)
        self.denials = Counter("broker_denials", "Requests refused by policy or attestation",
                               ["workflow", "tool", "reason"], registry=r)
        self.verifications = Counter("broker_verifications", "Token verifications by the daemon", ["result"],
                                     registry=r)
        self.rpc_seconds = Histogram("broker_rpc_duration_seconds", "Unary RPC handling time", ["method"],
                                     registry=r, buckets=(.0001, .00025, .0005, .001, .0025, .005, .01, .025, .1, 1))
        self.watchers = Gauge("broker_stream_subscribers",
                              "Open server streams (key, secret and health watchers, reflection)", registry=r)
        self.reloads = Counter("broker_reloads", "Config reloads", ["result"], registry=r)
        self.vault_seconds = Histogram("broker_vault_request_duration_seconds", "Requests to Vault",
                                       ["method", "outcome"], registry=r,
                                       buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, 1, 5))
        self._server: HTTPServer | socketserver.UnixStreamServer | None = None
        self._thread: threading.Thread | None = None
        self._path: str | None = None  # a Unix listener's file, removed at close if still ours
        self._bound: tuple[int, int] | None = None
        # labels() validates and locks on every call; the mint path asks for the same few children.
        # Bounded: only (workflow, tool) pairs that passed policy get here.
        self._mint_children: dict[tuple[str, str], Counter] = {}

    def count_mint(self, workflow: str, tool: str) -> None:
        child = self._mint_children.get((workflow, tool))
        if child is None:
            child = self._mint_children[workflow, tool] = self.mints.labels(workflow, tool)
        child.inc()

    def observe_vault(self, method: str, seconds: float, ok: bool) -> None:
        self.vault_seconds.labels(method, "ok" if ok else "error").observe(seconds)

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)

    def bind(self, listen: str) -> None:
        """Claim ``unix:/path`` or ``host:port`` (loopback only) for /metrics; :meth:`start` serves it.

        The daemon binds this before anything else, so that a clash leaves nothing behind. A Unix socket
        path is claimed like the public socket: a stale file is replaced, a live one refused.
        """
        handler = MetricsHandler.factory(self.registry)
        try:
            if listen.startswith("unix:"):
                path = listen[len("unix:"):]
                remove_stale_socket(path)
                self._server = _UnixHTTPServer(path, _unix_handler(handler))
                self._path, self._bound = path, file_identity(path)
            else:
                host, _, port = listen.rpartition(":")
                self._server = _QuietHTTPServer((host, int(port)), _tcp_handler(handler))
        except OSError as exc:
            # A path too long for a Unix socket is an OSError without an errno, hence without strerror.
            raise BrokerError(f"metrics: cannot listen on {listen}: {exc.strerror or exc}") from None
        except BrokerError as exc:
            raise BrokerError(f"metrics: {exc}") from None

    def start(self) -> None:
        """Serve the listener :meth:`bind` claimed, in a daemon thread."""
        assert self._server is not None
        # Process-wide, and this process serves only our registry. In the text format each counter's and
        # histogram's creation time becomes a family of its own (a gauge named broker_mints_created): one
        # more series per label set, which nobody graphs and which the README table would have to list.
        disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream
        self._thread = threading.Thread(target=self._server.serve_forever, name="broker-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving and release the listener (a Unix socket file only if it is still ours)."""
        if self._server is None:
            return
        if self._thread is not None:
            self._server.shutdown()  # waits for serve_forever, so only once it runs
        self._server.server_close()
        if self._path is not None:
            unlink_if_same(self._path, self._bound)


class _QuietHTTPServer(ThreadingHTTPServer):
    # A thread per connection: any local user may connect to a loopback port, and one who sends nothing
    # must not stall everyone else's scrapes (a plain HTTPServer serves one connection at a time).
    daemon_threads = True


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, handler: type[MetricsHandler]) -> None:
        super().__init__(path, handler)
        os.chmod(path, 0o660)


def _tcp_handler(base: type[MetricsHandler]) -> type[MetricsHandler]:
    class Handler(base):  # type: ignore[valid-type,misc]
        timeout = SCRAPE_TIMEOUT

    return Handler


def _unix_handler(base: type[MetricsHandler]) -> type[MetricsHandler]:
    class Handler(base):  # type: ignore[valid-type,misc]
        timeout = SCRAPE_TIMEOUT

        # A Unix peer has no (host, port): give the logging and CGI-ish code something to print.
        def address_string(self) -> str:
            return "unix"

        def log_message(self, format: str, *args: Any) -> None:
            return

    return Handler


class FuncCollector(Collector):
    """Values read at scrape time from the live daemon (connections, key ages, revocations)."""

    def __init__(self, read: Callable[[], Mapping[str, Any]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        v = self._read()
        yield GaugeMetricFamily("broker_frontdoor_connections", "Client connections open on the public socket",
                                value=v["connections"])
        # Not "broker_frontdoor_connections_total": that would be a second family named like the gauge
        # above, which OpenMetrics parsers reject and Prometheus records as one metric of the wrong type.
        accepted = CounterMetricFamily("broker_frontdoor_accepts", "Connections on the public socket by outcome",
                                       labels=["outcome"])
        accepted.add_metric(["accepted"], v["accepted"])
        accepted.add_metric(["refused"], v["refused"])
        yield accepted
        ages = GaugeMetricFamily("broker_signing_key_age_seconds", "Age of the current signing key", labels=["kid"])
        for kid, age in v["key_ages"].items():
            ages.add_metric([kid], age)
        yield ages
        yield GaugeMetricFamily("broker_revoked_tokens", "Revoked tokens not yet expired", value=v["revoked"])
        yield GaugeMetricFamily("broker_uptime_seconds", "Seconds since the daemon started", value=v["uptime"])
        if "vault_leases" in v:
            yield GaugeMetricFamily("broker_vault_leases", "Vault leases, child tokens and certificates held",
                                    value=v["vault_leases"])
            yield GaugeMetricFamily("broker_vault_degraded", "1 while Vault cannot serve or refresh",
                                    value=v["vault_degraded"])
