"""Errors raised by the Vault backend; every one derives from :class:`broker.errors.BrokerError`::

    BrokerError
    ├── VaultError                 base of everything below
    │   ├── VaultUnavailable       unreachable, sealed, 5xx, timed out, or an answer that is not Vault's
    │   ├── VaultAuthError         the broker could not log in (bad role_id/secret_id, spent wrapping token)
    │   └── VaultRequestError      Vault refused one request (4xx); ``status`` says which
    ├── SecretUnavailable          a tool's secret cannot be served right now (maps to UNAVAILABLE)
    └── NoSecretConfigured         the tool has no ``secret = {...}`` in the config

Messages never contain a token, a secret value or a response body: Vault's own error strings are the
most that is quoted, and they describe requests, not data.
"""

from __future__ import annotations

from broker.errors import BrokerError


class VaultError(BrokerError):
    """Vault could not be used for a request."""


class VaultUnavailable(VaultError):
    """A transient failure: retried with backoff, and the broker reports itself degraded meanwhile."""


class VaultAuthError(VaultError):
    """Login failed. Retried too (the operator may fix the files), but it needs a human."""


class VaultRequestError(VaultError):
    """Vault answered a request with a 4xx status (missing path, permission denied, bad parameters)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class SecretUnavailable(BrokerError):
    """A tool's upstream secret cannot be served now.

    ``str()`` is safe to show the caller (it names the workflow and tool and says why in general terms);
    ``reason`` carries the detail for the log (Vault paths, Vault's error text).
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class NoSecretConfigured(BrokerError):
    """The (workflow, tool) pair has no upstream secret in the configuration."""
