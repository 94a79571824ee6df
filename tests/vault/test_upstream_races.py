"""The secret manager's shutdown and run-end races, with a scripted Vault whose answers take as long as
the test says (a real server cannot be made slow on cue): no lease Vault creates may escape revocation."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

from broker.config import CallerRule, SecretSpec, Tool, Workflow
from broker.vault import SecretManager, SecretUnavailable, VaultUnavailable

DB = SecretSpec("database", role="reader")


def workflows() -> Mapping[str, Workflow]:
    return {"wf": Workflow("wf", "acme", (CallerRule(uid=0),), {"db": Tool("db", (), (), 60, secret=DB)})}


class SlowVault:
    """Database credentials that take ``issue_delay`` seconds; revocations that fail ``failures`` times."""

    generation = 1

    def __init__(self, issue_delay: float, failures: int = 0, revoke_delay: float = 0) -> None:
        self.issue_delay = issue_delay
        self.failures = failures
        self.revoke_delay = revoke_delay
        self.issued: list[str] = []
        self.revoked: list[str] = []

    async def request(self, method: str, path: str, data: Mapping[str, Any] | None = None) -> dict[str, Any]:
        if path.startswith("database/creds/"):
            await asyncio.sleep(self.issue_delay)
            lease = f"database/creds/reader/{len(self.issued) + 1}"
            self.issued.append(lease)
            return {"lease_id": lease, "lease_duration": 300, "renewable": True,
                    "data": {"username": f"u{len(self.issued)}", "password": "pw"}}
        if path == "sys/leases/revoke":
            assert data is not None
            if self.failures:
                self.failures -= 1
                raise VaultUnavailable("Vault is restarting")
            await asyncio.sleep(self.revoke_delay)
            self.revoked.append(str(data["lease_id"]))
            return {}
        if path == "sys/leases/renew":
            return {"lease_duration": 300}
        raise AssertionError(f"unexpected {method} {path}")

    async def send_with(self, token: str, method: str, path: str,
                        data: Mapping[str, Any] | None = None) -> dict[str, Any]:
        raise AssertionError("no child tokens here")


def test_shutdown_during_an_issue_revokes_what_it_creates() -> None:
    vault = SlowVault(issue_delay=0.5)

    async def main() -> None:
        mgr = SecretManager(vault, workflows(), kv_refresh=60, max_staleness=60, request_timeout=2)
        mgr.start()
        getting = asyncio.create_task(mgr.get("wf", "db"))
        await asyncio.sleep(0.1)  # the issue is in flight in "Vault"
        await mgr.close()
        with contextlib.suppress(SecretUnavailable):
            await getting

    asyncio.run(main())
    assert vault.issued == ["database/creds/reader/1"]
    assert vault.revoked == vault.issued


def test_an_issue_that_outlives_its_run_is_revoked() -> None:
    vault = SlowVault(issue_delay=0.6)

    async def main() -> None:
        mgr = SecretManager(vault, workflows(), kv_refresh=60, max_staleness=60, request_timeout=0.1)
        mgr.start()
        run = mgr.watch_run("wf", "db", "run-1")
        with contextlib.suppress(SecretUnavailable):  # Vault did not answer within the request timeout
            await anext(run)
        await run.aclose()  # the run ends while its issue is still in flight
        for _ in range(100):
            if vault.revoked:
                break
            await asyncio.sleep(0.05)
        await mgr.close()

    asyncio.run(main())
    assert vault.issued == ["database/creds/reader/1"]
    assert vault.revoked == vault.issued  # given back although nobody was left to receive it


def test_pending_revocations_survive_a_shutdown_in_the_middle_of_retrying_them() -> None:
    vault = SlowVault(issue_delay=0, failures=1)

    async def main() -> None:
        mgr = SecretManager(vault, workflows(), kv_refresh=60, max_staleness=60)
        mgr.start()
        run = mgr.watch_run("wf", "db", "run-1")
        await anext(run)
        await run.aclose()  # revoking the run's lease fails once: queued for the maintenance loop
        assert vault.revoked == []
        vault.revoke_delay = 1.0  # the retry will be slow ...
        mgr._wake.set()
        await asyncio.sleep(0.2)  # ... and the shutdown comes while it is under way
        await mgr.close()

    asyncio.run(main())
    assert vault.issued == ["database/creds/reader/1"]
    assert vault.revoked == vault.issued
