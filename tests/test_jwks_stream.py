"""The JWKS stream (WatchJWKS, FetchJWTBundles) sends full state now and again on every key change."""

from __future__ import annotations

import asyncio
import json

from broker import config
from broker.keyring import KeyRing, MemoryKeySource
from broker.service import Runtime

CFG = config.parse(b'[broker]\ntrust_domain = "example.org"\n')


class _Nobody:
    def lookup(self, peer: str) -> None:
        return None


class _NoAudit:
    def record(self, event: str, **fields: object) -> None:
        raise AssertionError("nothing to audit here")


def test_stream_yields_on_rotation_and_retirement() -> None:
    now = [0.0]
    ring = KeyRing(MemoryKeySource(), "ES256", rotate_every=3600, max_token_ttl=60, now=now[0])

    async def scenario() -> list[set[str]]:
        rt = Runtime(CFG, ring, _NoAudit(), _Nobody(), lambda: now[0])
        seen: list[set[str]] = []
        updates = rt.trust_updates()

        async def consume() -> None:
            async for doc, _ in updates:
                seen.append({k["kid"] for k in json.loads(doc)["keys"]})
                if len(seen) == 3:
                    return

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.01)
        assert len(seen) == 1  # full state immediately
        now[0] = 3600.0
        assert ring.tick(now[0])
        await rt.keys_changed()
        await asyncio.sleep(0.01)
        now[0] = 3600.0 + 65
        assert ring.tick(now[0])  # the first key retires once its tokens have expired
        await rt.keys_changed()
        await asyncio.wait_for(task, 5)
        return seen

    first, rotated, retired = asyncio.run(scenario())
    assert len(first) == 2 and len(rotated) == 3 and len(retired) == 2
    assert first < rotated and retired < rotated and first != retired
