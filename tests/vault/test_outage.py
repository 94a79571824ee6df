"""Vault killed mid-run and started again (raft storage, same data): minting never stops, the cached
secret is served until max_staleness, then UNAVAILABLE, and everything recovers without a restart."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable, Iterator

import hvac
import pytest

from broker import tokens
from broker.config import CallerRule, SecretSpec, Tool, Workflow
from broker.keyring import KeyRing, MemoryKeySource
from broker.vault import FleetJwks, SecretManager, SecretUnavailable, VaultError, VaultSession
from broker.vault.testing import PersistentOpenBao, openbao_raft_server

from ._fleet_node import claims
from .conftest import make_role

EXPECT = tokens.Expect("example.org", audience="crm", tool="t")


@pytest.fixture
def server() -> Iterator[PersistentOpenBao]:
    with tempfile.TemporaryDirectory(prefix="bao-raft-") as d, openbao_raft_server(d) as bao:
        yield bao


async def wait_for(predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.1)


def test_vault_killed_and_restarted(server: PersistentOpenBao, creds_dir: str) -> None:
    admin = hvac.Client(url=server.address, token=server.token)
    admin.sys.enable_secrets_engine("kv", path="secret", options={"version": "2"})
    admin.sys.enable_auth_method("approle")
    admin.sys.create_or_update_policy("b", 'path "secret/*" { capabilities = ["create", "update", "read", "list"] }')
    admin.secrets.kv.v2.create_or_update_secret("crm/readonly", {"api_key": "before"})
    role = make_role(admin, creds_dir, policies=["b"])
    settings = role.settings(server.address, instance="node-x")
    spec = SecretSpec("kv", path="secret/crm/readonly", field="api_key")
    wfs = {"wf": Workflow("wf", "acme", (CallerRule(uid=0),), {"crm": Tool("crm", (), (), 60, secret=spec)})}

    async def main() -> None:
        session = VaultSession(settings, check_every=0.5)
        await session.start()
        ring = KeyRing(MemoryKeySource(), "ES256", 3600, 60, time.time())
        fleet = FleetJwks(session, settings, max_token_ttl=60, refresh_every=1.0)
        await fleet.publish(ring.verify_keys.values())
        fleet.start()
        mgr = SecretManager(session, wfs, kv_refresh=1, max_staleness=4)
        mgr.start()
        assert dict((await mgr.get("wf", "crm")).data) == {"api_key": "before"}

        minted: list[str] = []
        failures: list[BaseException] = []

        async def mint_forever() -> None:
            while True:
                try:
                    tok = tokens.mint(ring.current, claims(int(time.time()), f"m{len(minted)}")).decode()
                    tokens.verify(tok, fleet.keys(), EXPECT, int(time.time()))
                    minted.append(tok)
                except Exception as exc:  # any failure to mint is what this test catches
                    failures.append(exc)
                await asyncio.sleep(0.05)

        minter = asyncio.create_task(mint_forever())
        server.kill()
        killed_at = time.monotonic()

        # Within max_staleness the cached value is still served, without waiting on the dead server.
        t0 = time.monotonic()
        assert dict((await mgr.get("wf", "crm")).data) == {"api_key": "before"}
        assert time.monotonic() - t0 < 0.5
        # A key change while Vault is down: served locally at once, the write fails and is retried.
        with pytest.raises(VaultError):
            await fleet.publish([*ring.verify_keys.values(), tokens.generate("ES256").verify_key])
        assert len(fleet.keys()) == 3
        await wait_for(lambda: session.degraded is not None and mgr.degraded is not None, 10)

        # Past max_staleness: a clear UNAVAILABLE-class error, not a hang and not a crash.
        await asyncio.sleep(max(0.0, 4.5 - (time.monotonic() - killed_at)))
        with pytest.raises(SecretUnavailable, match="cannot be reached"):
            await mgr.get("wf", "crm")

        admin_restart_at = time.monotonic()
        await asyncio.get_running_loop().run_in_executor(None, server.start)
        admin.secrets.kv.v2.create_or_update_secret("crm/readonly", {"api_key": "after"})

        async def recovered() -> bool:
            try:
                return dict((await mgr.get("wf", "crm")).data) == {"api_key": "after"}
            except SecretUnavailable:
                return False

        deadline = time.monotonic() + 20
        while not await recovered():
            assert time.monotonic() < deadline, "secret reads did not recover"
            await asyncio.sleep(0.2)
        await wait_for(lambda: session.degraded is None and mgr.degraded is None, 20)
        # The heartbeat republished the key set that failed to reach Vault during the outage.
        await wait_for(lambda: len(fleet.keys()) == 3 and all(map(fleet.published, fleet.keys())), 20)
        assert time.monotonic() - admin_restart_at < 30

        minter.cancel()
        assert not failures
        assert len(minted) > 50
        await mgr.close()
        await fleet.close()
        await session.close()

    asyncio.run(main())
