"""Vault (or OpenBao) behind the broker: its own identity, the fleet-wide JWKS, and upstream secrets.

Rotation path: Vault -> key ring -> JWKS -> clients, and Vault -> secret manager -> watch streams.

    session = VaultSession(config.vault)          # login, renewal, re-login; the token stays inside
    await session.start()
    fleet = FleetJwks(session, config.vault, max_token_ttl=..., on_change=...)
    await fleet.publish(ring.verify_keys.values()); fleet.start()
    secrets = SecretManager(session, config.workflows, kv_refresh=..., max_staleness=...)
    secrets.start()
    value = await secrets.get("support-summarize", "read_ticket")     # SecretValue or SecretUnavailable
    ...
    await secrets.close(); await fleet.close(); await session.close()  # revokes leases, then our token

Threading model: every public method is called on the daemon's asyncio loop and all state lives
there. hvac blocks, so each Vault request runs on the session's one private worker thread
(``run_in_executor``) and the loop awaits the answer: a slow or dead Vault never blocks the loop, and no
RPC waits on Vault when a usable value is cached. Nothing in this package calls back from the thread.
"""

from broker.vault._errors import (
    NoSecretConfigured,
    SecretUnavailable,
    VaultAuthError,
    VaultError,
    VaultRequestError,
    VaultUnavailable,
)
from broker.vault._session import VaultSession
from broker.vault._value import SecretValue
from broker.vault.fleet import FleetJwks, instance_name
from broker.vault.upstream import SecretManager

__all__ = [
    "FleetJwks",
    "NoSecretConfigured",
    "SecretManager",
    "SecretUnavailable",
    "SecretValue",
    "VaultAuthError",
    "VaultError",
    "VaultRequestError",
    "VaultSession",
    "VaultUnavailable",
    "instance_name",
]
