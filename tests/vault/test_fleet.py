"""Fleet JWKS against a real OpenBao, with the AppRole roles and policy the example script sets up."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import hvac
import pytest

from broker import tokens
from broker.config import VaultAuth, VaultSettings
from broker.errors import InvalidToken
from broker.keyring import KeyRing, MemoryKeySource
from broker.testing import OpenBao, bao_binary
from broker.vault import FleetJwks, VaultRequestError, VaultSession

from ._fleet_node import claims

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
EXPECT = tokens.Expect("example.org", audience="crm", tool="t")


def setup_instance(bao: OpenBao, instance: str, out: str) -> VaultSettings:
    """Run examples/vault-dev-setup.sh for ``instance``: the documented policy and AppRole, for real."""
    env = {**os.environ, "BAO_ADDR": bao.address, "BAO_TOKEN": bao.token, "BAO": bao_binary(), "OUT": out,
           "INSTANCE": instance}
    r = subprocess.run(["bash", os.path.join(ROOT, "examples", "vault-dev-setup.sh")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f'instance = "{instance}"' in r.stdout
    return VaultSettings(bao.address, VaultAuth("approle", role_id_file=f"{out}/role_id",
                                                secret_id_file=f"{out}/secret_id"), instance=instance)


def test_token_minted_on_one_broker_verifies_on_another(bao: OpenBao, admin: hvac.Client, creds_dir: str) -> None:
    a_dir, b_dir = os.path.join(creds_dir, "a"), os.path.join(creds_dir, "b")
    setup_instance(bao, "node-a", a_dir)
    b = setup_instance(bao, "node-b", b_dir)
    # Two entries that must not disturb the fleet: garbage, and a broker that stopped long ago.
    admin.secrets.kv.v2.create_or_update_secret("broker/jwks/evil", {"keys": [{"kty": "oct", "k": "AAAA"}],
                                                                     "not_after": 2**40})
    gone = KeyRing(MemoryKeySource(), "ES256", 3600, 60, time.time())
    admin.secrets.kv.v2.create_or_update_secret("broker/jwks/gone", {
        **tokens.jwks_document(gone.verify_keys.values()), "not_after": int(time.time()) - 1})

    async def main() -> None:
        ring = KeyRing(MemoryKeySource(), "ES256", 3600, 60, time.time())
        session = VaultSession(b)
        changes: list[int] = []

        async def changed() -> None:
            changes.append(fleet.version)

        fleet = FleetJwks(session, b, max_token_ttl=60, on_change=changed)
        await fleet.publish(ring.verify_keys.values())
        assert all(fleet.published(kid) for kid in ring.verify_keys)
        mine = tokens.mint(ring.current, claims(int(time.time()), "b")).decode()

        node = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.vault._fleet_node", cwd=ROOT,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "NODE_VAULT_ADDR": bao.address, "NODE_INSTANCE": "node-a",
                 "NODE_ROLE_ID_FILE": f"{a_dir}/role_id", "NODE_SECRET_ID_FILE": f"{a_dir}/secret_id"})
        out, err = await asyncio.wait_for(node.communicate(mine.encode() + b"\n"), 60)
        assert node.returncode == 0, err.decode()
        verified, theirs = out.decode().split()
        assert verified == "verified"

        # Before a refresh we do not know node-a's keys; after it we do.
        with pytest.raises(InvalidToken):
            tokens.verify(theirs, fleet.keys(), EXPECT, int(time.time()))
        await fleet.refresh()
        claims_a = tokens.verify(theirs, fleet.keys(), EXPECT, int(time.time()))
        assert claims_a.jti.startswith("a")
        assert len(fleet.keys()) == 4  # node-b's current + next, node-a's current + next
        assert not set(gone.verify_keys) & set(fleet.keys())
        assert changes == [1, 2]
        assert '"d"' not in fleet.jwks_json()  # public keys only
        assert set(tokens.keys_from_jwks(fleet.jwks_json())) == set(fleet.keys())

        # The documented policy lets a broker write only its own entry.
        with pytest.raises(VaultRequestError) as exc:
            await session.request("POST", "secret/data/broker/jwks/node-a", {"data": {"keys": []}})
        assert exc.value.status == 403
        await session.close()

    asyncio.run(main())
