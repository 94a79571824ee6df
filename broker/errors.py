"""The one exception hierarchy of the broker.

Every error the broker raises on purpose derives from :class:`BrokerError`::

    BrokerError
    ├── ConfigError            the TOML is invalid; carries every problem with its key path
    ├── InvalidToken           a token failed verification; opaque to callers, ``reason`` is for the audit log
    ├── PermissionDenied       policy refused a request; opaque to callers, ``reason`` is for the audit log
    │   └── Refused            client side: the daemon's refusal, with its request id and what it chose to say
    ├── AttestationError       the kernel-reported caller could not be resolved or pinned
    ├── ClientError            raised by the client library
    │   ├── Unavailable        the daemon could not be reached
    │   └── RequestRejected    the daemon answered with an error status
    ├── broker.vault.VaultError             Vault/OpenBao: VaultUnavailable, VaultAuthError, VaultRequestError
    ├── broker.vault.SecretUnavailable      an upstream secret cannot be served (gRPC UNAVAILABLE)
    ├── broker.vault.NoSecretConfigured     the tool has no upstream secret (gRPC FAILED_PRECONDITION)
    └── broker.scan.ScanError               the secret scanner: UsageError, Skipped

Client-side, a daemon's PERMISSION_DENIED arrives as :class:`Refused` (a :class:`PermissionDenied`) and an
invalid token as :class:`InvalidToken`, so one ``except`` works on both sides of the socket.

The gRPC edge (``broker.service``) is the only place that maps these to status codes, with a generic
message and the request id of the audit line that holds the precise reason. The one exception is a
refusal marked ``caller_may_know``: a mistake in the caller's own request inside a workflow it belongs
to (a ttl above the tool's, a tool the workflow lacks), which it could read from DescribeWorkflow anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

# Trailing metadata of a refusal: the id that the daemon's audit line carries as "request_id".
REQUEST_ID_HEADER: Final = "broker-request-id"


class BrokerError(Exception):
    """Root of every error the broker raises on purpose."""


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One problem in a configuration file: where (a dotted key path) and what."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(BrokerError):
    """A configuration file is invalid. ``problems`` lists all of them, each with its key path."""

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class _ReasonedError(BrokerError):
    """An error whose caller-facing text is fixed and whose ``reason`` is kept for the audit log."""

    public_message = "denied"

    def __init__(self, reason: str) -> None:
        # The reason is deliberately not part of str(): it may describe policy details that the
        # caller must not learn. Only the audit log and debug logs read ``reason``.
        super().__init__(self.public_message)
        self.reason = reason


class InvalidToken(_ReasonedError):
    """A token failed verification (any cause: format, signature, claims, expiry)."""

    public_message = "invalid token"


class PermissionDenied(_ReasonedError):
    """The policy refused the request."""

    public_message = "permission denied"

    def __init__(self, reason: str, *, caller_may_know: bool = False) -> None:
        super().__init__(reason)
        # Set only after the caller matched the workflow: what it may do there is no secret to it, but
        # whether a workflow exists, or why a non-member does not match, is never said.
        self.caller_may_know = caller_may_know


class Refused(PermissionDenied):
    """Client side: the daemon refused. ``str()`` is the daemon's own text, which says no more than the
    caller may know; ``request_id`` finds the audit line with the full reason."""

    def __init__(self, message: str, request_id: str) -> None:
        super().__init__(message)
        self.request_id = request_id

    def __str__(self) -> str:
        return self.reason

    @property
    def where_to_look(self) -> str:
        """For a person reading the refusal: where the full reason is, and how to see one's own selectors."""
        return (f'the broker\'s audit log has the full reason on the line with "request_id":"{self.request_id}"; '
                "`broker whoami` shows what the broker sees of a process and which workflows it matches")


class AttestationError(_ReasonedError):
    """The calling process could not be identified from the kernel and /proc."""

    public_message = "caller could not be attested"


class ClientError(BrokerError):
    """Raised by the client library."""


class Unavailable(ClientError):
    """The daemon could not be reached (no socket, refused, timed out), or, as :class:`UpstreamUnavailable`,
    it answered that what the request needs is not available now."""


class UpstreamUnavailable(Unavailable):
    """Client side: the daemon is up but cannot serve a tool's upstream credential now (Vault cannot be
    reached, or the cached value is past its limit). ``str()`` is the daemon's own text, which names the
    workflow and tool; ``request_id`` names the daemon's log context. Not retried by the client: the
    daemon's answer is current, and waiting is the caller's choice (``broker exec --wait-timeout``)."""

    def __init__(self, message: str, request_id: str) -> None:
        super().__init__(message)
        self.request_id = request_id


class RequestRejected(ClientError):
    """The daemon answered with an error status; ``code`` is the gRPC status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
