"""Where the daemon's socket is: one rule for the CLI, the library and the sidecar."""

from __future__ import annotations

import os

from broker import config as config_mod


def resolve_socket(explicit: str | None = None, config_path: str | None = None) -> str:
    """``--socket``, else ``$BROKER_SOCKET``, else the config's socket, else ``$SPIFFE_ENDPOINT_SOCKET``,
    else the documented default."""
    if explicit:
        return explicit
    env = os.environ.get("BROKER_SOCKET")
    if env:
        return env
    if config_path:
        return config_mod.load(config_path).broker.socket
    spiffe = os.environ.get("SPIFFE_ENDPOINT_SOCKET", "")
    if spiffe.startswith("unix:"):
        return "/" + spiffe[len("unix:"):].lstrip("/")
    return config_mod.DEFAULT_SOCKET
