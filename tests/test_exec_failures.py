"""`broker exec`'s failure paths in process, with the daemon replaced by a scripted client: a stop
before the command starts, and refresh failures of every kind."""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
from collections.abc import Iterator

import pytest

from broker.client import Minted
from broker.errors import RequestRejected
from broker.sidecar import runner
from broker.sidecar.runner import ExecOptions, Sidecar
from broker.v1 import broker_pb2 as pb


@pytest.fixture
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="brk-rt-", dir="/dev/shm") as d:
        monkeypatch.setenv("XDG_RUNTIME_DIR", d)
        yield d


class ScriptedClient:
    """Stands in for AsyncClient: two tools; minting the second one hangs until cancelled."""

    def __init__(self) -> None:
        self.revoked: list[str] = []
        self.minted = 0

    async def describe(self, workflow: str) -> list[pb.ToolDelivery]:
        return [pb.ToolDelivery(tool="crm", file="crm.token"), pb.ToolDelivery(tool="mail", file="mail.token")]

    async def mint(self, workflow: str, tool: str, *, audience: str = "", ttl: int = 0) -> Minted:
        self.minted += 1
        if tool == "mail":
            await asyncio.Event().wait()
        return Minted(f"secret-token-{tool}", f"jti-{tool}", 0, 2**31)

    async def revoke(self, tokens: list[str]) -> int:
        self.revoked += tokens
        return len(tokens)

    async def close(self) -> None:
        return None


def test_a_signal_before_the_command_starts_cleans_up(runtime_dir: str) -> None:
    client = ScriptedClient()

    async def main() -> int:
        sidecar = Sidecar(ExecOptions("agent", ["true"]))
        sidecar._client = client  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        # SIGTERM once the first token is on disk and the second mint hangs: mid-preparation.
        loop.call_later(0.2, os.kill, os.getpid(), signal.SIGTERM)
        return await sidecar.run()

    assert asyncio.run(main()) == 128 + signal.SIGTERM
    assert client.minted == 2
    assert os.listdir(runtime_dir) == []  # the credentials directory is gone
    assert client.revoked == ["secret-token-crm"]  # and the token already issued is revoked


def test_any_refresh_failure_keeps_the_loop_alive(runtime_dir: str, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        sidecar = Sidecar(ExecOptions("agent", ["true"]), clock=lambda: 100.0)
        cred = runner._Credential("crm", "", "crm.token")

        async def refused(c: runner._Credential) -> Minted:
            raise RequestRejected("RESOURCE_EXHAUSTED", "too many requests")

        sidecar._mint = refused  # type: ignore[method-assign]
        assert await sidecar._refresh(cred, 100.0) is False  # reported, not raised
        assert cred.refresh_at == 100.5 and cred.backoff == 1.0  # retried with backoff
        await sidecar._client.close()

    asyncio.run(main())
    assert "could not refresh crm (RequestRejected)" in caplog.text


def test_credential_repr_never_shows_tokens() -> None:
    cred = runner._Credential("crm", "", "crm.token")
    cred.issued.append(("eyJsecret", 1.0))
    assert "eyJsecret" not in repr(cred)
