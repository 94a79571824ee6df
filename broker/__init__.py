"""broker: short-lived, scoped credentials for AI agents, delivered by a local daemon that knows its
callers from the kernel."""

__version__ = "0.1.0"
