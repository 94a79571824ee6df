"""``broker exec``: run an agent with short-lived credentials delivered and kept fresh, so that no
long-lived key ever exists in its environment or on disk."""

from broker.sidecar.runner import ExecOptions, run

__all__ = ["ExecOptions", "run"]
