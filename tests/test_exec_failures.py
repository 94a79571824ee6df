"""`broker exec`'s failure paths in process, with the daemon replaced by a scripted client: a stop
before the command starts, and refresh failures of every kind."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import tempfile
from collections.abc import Iterator

import pytest

from broker.client import Minted
from broker.errors import RequestRejected, Unavailable
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


class FakeTime:
    """A monotonic clock that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


class AbsentDaemon(ScriptedClient):
    socket_path = "/run/user/1000/broker-test.sock"

    async def describe(self, workflow: str) -> list[pb.ToolDelivery]:
        raise Unavailable(f"broker daemon at {self.socket_path} is unreachable (UNAVAILABLE)")


def test_waiting_for_an_absent_daemon_names_the_socket_and_waits_the_whole_timeout(
        runtime_dir: str, caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeTime()
    client = AbsentDaemon()

    async def main() -> int:
        sidecar = Sidecar(ExecOptions("agent", ["true"], wait_timeout=25.0), monotonic=fake.monotonic,
                          sleep=fake.sleep)
        await sidecar._client.close()
        sidecar._client = client  # type: ignore[assignment]
        return await sidecar.run()

    caplog.set_level(logging.INFO, "broker.exec")
    assert asyncio.run(main()) == 1
    assert fake.now - 1000.0 == 25.0  # the whole --wait-timeout, not the 7.2 s an early exit took
    waiting = [r.getMessage() for r in caplog.records if "waiting for the broker daemon" in r.getMessage()]
    # Said at once (naming the socket), then every 10 s of the wait.
    assert waiting == [f"waiting for the broker daemon at {client.socket_path}: {n}s of 25s (--wait-timeout)"
                       for n in (0, 11, 21)], waiting
    assert f"gave up after 25.0s: broker daemon at {client.socket_path} is unreachable" in caplog.text
    assert "broker exec: broker exec" not in caplog.text and os.listdir(runtime_dir) == []


class DaemonGoneAtExit(ScriptedClient):
    """Mints, then is unreachable when the run tries to revoke at exit."""

    async def describe(self, workflow: str) -> list[pb.ToolDelivery]:
        return [pb.ToolDelivery(tool="crm", file="crm.token")]

    async def revoke(self, tokens: list[str]) -> int:
        raise Unavailable("broker daemon at /nowhere is unreachable (UNAVAILABLE)")


def test_tokens_the_daemon_could_not_revoke_at_exit_are_left_for_the_next_run(runtime_dir: str) -> None:
    async def main() -> int:
        sidecar = Sidecar(ExecOptions("agent", ["true"]))
        await sidecar._client.close()
        sidecar._client = DaemonGoneAtExit()  # type: ignore[assignment]
        return await sidecar.run()

    assert asyncio.run(main()) == 0
    # The credentials directory is gone; the list of live tokens stays for the next run to revoke.
    [left] = os.listdir(runtime_dir)
    assert left.startswith(f"broker-exec-{os.getpid()}-") and left.endswith(".issued")
    with open(os.path.join(runtime_dir, left)) as f:
        lines = f.read().splitlines()
    # The scripted token is always due for refresh, so the run may have minted it more than once.
    assert lines and set(lines) == {f"{2**31} secret-token-crm"}
    assert os.stat(os.path.join(runtime_dir, left)).st_mode & 0o777 == 0o600
