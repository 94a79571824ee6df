"""A real initialised OpenBao (integrated storage, init + unseal), not a dev server: its answers differ."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Iterator

import pytest

from broker.config import VaultAuth, VaultSettings
from broker.vault import VaultSession
from broker.vault.testing import PersistentOpenBao, openbao_raft_server


@pytest.fixture
def server() -> Iterator[PersistentOpenBao]:
    with tempfile.TemporaryDirectory(prefix="bao-raft-") as d, openbao_raft_server(d) as bao:
        yield bao


def test_init_root_token_logs_in(server: PersistentOpenBao, creds_dir: str) -> None:
    # The root token that `operator init` returns has no data.renewable in its lookup (a dev server's does):
    # absent means not renewable, and a token without expiry needs no renewal at all.
    path = os.path.join(creds_dir, "root-token")
    with open(path, "w") as f:
        f.write(server.token)
    os.chmod(path, 0o600)

    async def main() -> None:
        s = VaultSession(VaultSettings(server.address, VaultAuth("token", token_file=path)))
        await s.start()
        try:
            assert s.logged_in and s.degraded is None
            body = await s.request("GET", "auth/token/lookup-self")
            assert "renewable" not in body["data"]  # the case under test is still the real server's answer
            assert body["data"]["ttl"] == 0
        finally:
            await s.close()

    asyncio.run(main())
