"""What the broker hands out for a tool: the credential fields plus their lifetime, never shown in repr."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True, slots=True)
class SecretValue:
    """One issued credential, as a whole: every rotation produces a new SecretValue.

    ``data`` holds the credential fields by kind: kv ``{<field>: value}`` (every field of the secret
    when the spec names none); database ``username``, ``password``; pki ``certificate``, ``private_key``,
    ``issuing_ca``, ``ca_chain`` (PEM, concatenated), ``serial_number``; token ``token``.
    ``version`` is the KV version, or a counter of issuances for the other kinds. ``expires_at`` (Unix
    time) is when the credential stops working: the lease end, the certificate's notAfter, the token's
    expiry; None for KV, which does not expire.
    """

    kind: str
    data: Mapping[str, str] = field(repr=False)
    version: int
    lease_id: str | None = None
    expires_at: float | None = None
    renewable: bool = False

    def __post_init__(self) -> None:
        # A read-only copy: a consumer cannot change the value every other subscriber sees.
        object.__setattr__(self, "data", MappingProxyType(dict(self.data)))

    def __repr__(self) -> str:
        # Field names only: a SecretValue that reaches a log line or a traceback leaks nothing.
        return (f"SecretValue(kind={self.kind!r}, fields={sorted(self.data)!r}, version={self.version}, "
                f"lease_id={self.lease_id!r}, expires_at={self.expires_at!r}, renewable={self.renewable})")

    __str__ = __repr__
