"""The client's token cache on its own (the daemon is replaced by a scripted mint): single flight,
and which failures a cached token may cover for."""

from __future__ import annotations

import asyncio

import pytest

from broker.client import AsyncClient, Client, Minted
from broker.errors import PermissionDenied, RequestRejected, Unavailable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def minted(n: int, issued: float, ttl: int = 100) -> Minted:
    return Minted(f"token-{n}", f"jti-{n}", int(issued), int(issued) + ttl)


def scripted(clock: Clock, answers: list[Minted | Exception]) -> Client:
    """A Client whose mint() gives ``answers`` in turn (raising the exceptions)."""
    client = Client("/nonexistent.sock", workflow="w", clock=clock)

    def mint(workflow: str, tool: str, *, audience: str = "", ttl: int = 0) -> Minted:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    client.mint = mint  # type: ignore[method-assign]
    return client


def test_waiters_do_not_hang_when_the_fetching_caller_is_cancelled(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        client = AsyncClient("/nonexistent.sock", workflow="w")
        release = asyncio.Event()
        calls = 0

        async def mint(workflow: str, tool: str, *, audience: str = "", ttl: int = 0) -> Minted:
            nonlocal calls
            calls += 1
            if calls == 1:
                await release.wait()  # the first fetch hangs until it is cancelled
            return minted(calls, 1000)

        monkeypatch.setattr(client, "mint", mint)
        first = asyncio.create_task(client.token("t"))
        await asyncio.sleep(0)
        second = asyncio.create_task(client.token("t"))  # waits on the first caller's fetch
        await asyncio.sleep(0)
        first.cancel()
        # The waiter takes over the fetch instead of waiting forever for a future nobody resolves.
        assert await asyncio.wait_for(second, 5) == "token-2"
        with pytest.raises(asyncio.CancelledError):
            await first
        await client.close()

    asyncio.run(main())


@pytest.mark.parametrize("refusal", [PermissionDenied("workflow removed"),
                                     RequestRejected("INVALID_ARGUMENT", "bad request")])
def test_a_refusal_is_never_answered_with_the_cached_token(refusal: Exception) -> None:
    clock = Clock()
    client = scripted(clock, [minted(1, clock.now), refusal])
    assert client.token("t") == "token-1"
    clock.now += 60  # past the refresh point, well before expiry
    with pytest.raises(type(refusal)):
        client.token("t")
    client.close()


def test_daemon_away_falls_back_to_a_cached_token_but_not_in_its_last_seconds() -> None:
    clock = Clock()
    client = scripted(clock, [minted(1, clock.now), Unavailable("away"), Unavailable("away")])
    assert client.token("t") == "token-1"
    clock.now += 60
    assert client.token("t") == "token-1"  # still 40 s left: good enough while the daemon is away
    clock.now += 39  # one second left: too close to expiry to hand out
    with pytest.raises(Unavailable):
        client.token("t")
    client.close()
