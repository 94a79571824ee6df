"""Vault's secret engines as the broker uses them: issue, renew and revoke one credential per kind.

kv (KV v2: read a version), database (dynamic user with a lease), pki (certificate + key; no Vault
lease: the certificate's notAfter is its end, and its serial number is what revokes it early), token
(a child of the broker's token). Each function is one Vault request; scheduling and caching live in
:mod:`broker.vault.upstream`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from broker.config import SecretSpec
from broker.vault._errors import VaultRequestError, VaultUnavailable
from broker.vault._value import SecretValue

# Vault's warnings are one sentence; anything longer is cut before it reaches the log.
MAX_WARNING_CHARS: Final = 300
# Durations and Unix times in Vault's answers: anything larger is not from Vault (and a huge integer
# would overflow the float arithmetic of the schedules).
MAX_SECONDS: Final = 2**32


class Vault(Protocol):
    """The part of :class:`broker.vault.VaultSession` the engines and the secret manager need."""

    @property
    def generation(self) -> int: ...

    async def request(self, method: str, path: str, data: Mapping[str, Any] | None = None) -> dict[str, Any]: ...

    async def send_with(self, token: str, method: str, path: str,
                        data: Mapping[str, Any] | None = None) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class Lease:
    """What ends a credential early: a Vault lease id, the child token itself (kind ``token``), or a
    certificate's serial number (kind ``certificate``, revoked on the PKI mount that issued it)."""

    kind: str  # "lease", "token" or "certificate"
    handle: str = field(repr=False)
    ttl: int  # the duration Vault granted at issue; renewals ask for as much again
    expires_at: float
    renewable: bool
    generation: int = 0  # the session token generation it was created under
    mount: str = ""  # kind "certificate": the PKI mount

    @property
    def dies_with_session(self) -> bool:
        """Vault revokes leases and child tokens with the token that created them; certificates live on."""
        return self.kind != "certificate"

    def describe(self) -> str:
        """How an operator finds it again (for logs): lease ids and serial numbers identify, never authorise."""
        if self.kind == "lease":
            return self.handle
        if self.kind == "certificate":
            return f"{self.mount} certificate {self.handle}"
        return "(child token)"


@dataclass(frozen=True, slots=True)
class Issued:
    value: SecretValue
    lease: Lease | None


def _section(body: Mapping[str, Any], key: str) -> dict[str, Any]:
    part = body.get(key)
    if not isinstance(part, dict):
        raise VaultUnavailable(f"Vault's answer lacks the {key!r} object")
    return part


def _text(part: Mapping[str, Any], key: str) -> str:
    value = part.get(key)
    if not isinstance(value, str) or not value:
        raise VaultUnavailable(f"Vault's answer lacks the string {key!r}")
    return value


def _seconds(part: Mapping[str, Any], key: str) -> int:
    value = part.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < MAX_SECONDS:
        raise VaultUnavailable(f"Vault's answer lacks the duration {key!r}")
    return value


def _kv_location(spec: SecretSpec) -> tuple[str, str]:
    # The first segment of a kv path is the mount ("secret/crm/readonly" -> mount "secret").
    assert spec.path is not None  # required for kind kv by the config parser
    mount, _, rest = spec.path.partition("/")
    if not rest:
        raise VaultRequestError(404, f"kv path {spec.path!r} names a mount but no secret")
    return mount, rest


async def _issue_kv(vault: Vault, spec: SecretSpec) -> Issued:
    mount, path = _kv_location(spec)
    data = _section(await vault.request("GET", f"{mount}/data/{path}"), "data")
    fields = data.get("data")
    metadata = _section(data, "metadata")
    if not isinstance(fields, dict):  # a deleted version answers with data: null
        raise VaultRequestError(404, f"kv secret {spec.path!r} has no current version")
    if spec.field is not None:
        if spec.field not in fields:
            raise VaultRequestError(404, f"kv secret {spec.path!r} has no field {spec.field!r}")
        fields = {spec.field: fields[spec.field]}
    # Non-string KV values (numbers, objects) are handed out as their JSON text.
    values = {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}
    return Issued(SecretValue("kv", values, _seconds(metadata, "version")), None)


async def _issue_database(vault: Vault, spec: SecretSpec, version: int, now: float) -> Issued:
    body = await vault.request("GET", f"{spec.mount or 'database'}/creds/{spec.role}")
    data = _section(body, "data")
    lease_id, ttl = _text(body, "lease_id"), _seconds(body, "lease_duration")
    renewable = body.get("renewable") is True
    value = SecretValue("database", {"username": _text(data, "username"), "password": _text(data, "password")},
                        version, lease_id=lease_id, expires_at=now + ttl, renewable=renewable)
    return Issued(value, Lease("lease", lease_id, ttl, now + ttl, renewable))


async def _issue_pki(vault: Vault, spec: SecretSpec, version: int, now: float) -> Issued:
    request: dict[str, Any] = {"common_name": spec.common_name}
    if spec.ttl is not None:
        request["ttl"] = f"{spec.ttl}s"
    mount = spec.mount or "pki"
    data = _section(await vault.request("POST", f"{mount}/issue/{spec.role}", request), "data")
    chain = data.get("ca_chain") or []
    if not isinstance(chain, list) or not all(isinstance(c, str) for c in chain):
        raise VaultUnavailable("Vault's answer has a malformed 'ca_chain'")
    fields = {
        "certificate": _text(data, "certificate"),
        "private_key": _text(data, "private_key"),
        "issuing_ca": _text(data, "issuing_ca"),
        "ca_chain": "\n".join(chain),
        "serial_number": _text(data, "serial_number"),
    }
    expires_at = float(_seconds(data, "expiration"))
    # Not renewable: replaced at 2/3 of its life like any credential that cannot be extended. The
    # serial number lets the broker revoke it when its run or workflow ends, as it does leases.
    lease = Lease("certificate", fields["serial_number"], max(0, int(expires_at - now)), expires_at, False,
                  mount=mount)
    return Issued(SecretValue("pki", fields, version, expires_at=expires_at), lease)


async def _issue_token(vault: Vault, spec: SecretSpec, label: str, version: int, now: float) -> Issued:
    request: dict[str, Any] = {"policies": list(spec.policies), "renewable": True, "display_name": label}
    if spec.ttl is not None:
        request["ttl"] = f"{spec.ttl}s"
    auth = _section(await vault.request("POST", "auth/token/create", request), "auth")
    token, ttl = _text(auth, "client_token"), _seconds(auth, "lease_duration")
    renewable = auth.get("renewable") is True
    value = SecretValue("token", {"token": token}, version, expires_at=now + ttl, renewable=renewable)
    return Issued(value, Lease("token", token, ttl, now + ttl, renewable))


async def issue(vault: Vault, spec: SecretSpec, *, label: str, version: int, now: float) -> Issued:
    """Fetch a fresh credential. ``version`` numbers issuances for the kinds Vault does not version."""
    if spec.kind == "kv":
        return await _issue_kv(vault, spec)
    if spec.kind == "database":
        return await _issue_database(vault, spec, version, now)
    if spec.kind == "pki":
        return await _issue_pki(vault, spec, version, now)
    return await _issue_token(vault, spec, label, version, now)


async def renew(vault: Vault, lease: Lease, now: float) -> Lease:
    """Extend a lease by its original TTL; Vault may grant less (the max TTL is near)."""
    increment = f"{lease.ttl}s"
    if lease.kind == "token":
        # Renewed with the child token itself: its default policy allows renew-self, so the broker's
        # own policy needs no right over other tokens.
        body = await vault.send_with(lease.handle, "POST", "auth/token/renew-self", {"increment": increment})
        ttl = _seconds(_section(body, "auth"), "lease_duration")
    else:
        body = await vault.request("PUT", "sys/leases/renew", {"lease_id": lease.handle, "increment": increment})
        ttl = _seconds(body, "lease_duration")
    return dataclasses.replace(lease, expires_at=now + ttl)


async def revoke(vault: Vault, lease: Lease) -> str | None:
    """End ``lease`` in Vault. Returns Vault's reason when it answered but declined (a certificate about
    to expire is not put on the CRL), None when it is revoked."""
    if lease.kind == "token":
        await vault.send_with(lease.handle, "POST", "auth/token/revoke-self")
    elif lease.kind == "certificate":
        body = await vault.request("POST", f"{lease.mount}/revoke", {"serial_number": lease.handle})
        warnings = body.get("warnings")
        if not isinstance(body.get("data"), dict) and isinstance(warnings, list) and warnings:
            return "; ".join(str(w) for w in warnings)[:MAX_WARNING_CHARS]
    else:
        await vault.request("PUT", "sys/leases/revoke", {"lease_id": lease.handle})
    return None
