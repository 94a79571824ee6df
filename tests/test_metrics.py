"""The metrics scrape of a real daemon, read by the parsers Prometheus users have, against the README."""

from __future__ import annotations

import os
import re

from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families as text_families

from broker.client import Client
from broker.testing import config_text, running_daemon, scrape_metrics
from tests.conftest import default_workflows

README = os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")
OPENMETRICS = "application/openmetrics-text; version=1.0.0"
VAULT_ONLY = "with `[vault]` only"


def readme_metrics() -> dict[str, tuple[str, str]]:
    """README's metrics table: exposed name -> (type, meaning)."""
    with open(README) as f:
        rows = re.findall(r"^\s*\| `(broker_\w+)` \| (\w+) \|[^|]*\| (.*) \|$", f.read(), re.MULTILINE)
    names = [name for name, _, _ in rows]
    assert len(names) == len(set(names)), "a metric listed twice"
    return {name: (kind, meaning) for name, kind, meaning in rows}


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
        c.mint("support-summarize", "read_ticket")  # a connection is open while we scrape
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
    without_vault = {name: kind for name, (kind, meaning) in listed.items() if VAULT_ONLY not in meaning}
    assert exposed == without_vault, "README.md's metrics table and the daemon disagree"
