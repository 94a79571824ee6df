"""The JWKS stream (WatchJWKS, FetchJWTBundles) sends full state now and again on every key change."""

from __future__ import annotations

import asyncio
import json

from broker import config, tokens
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


def test_revocations_are_counted_per_workflow_and_forgotten_after_expiry() -> None:
    now = [0.0]
    ring = KeyRing(MemoryKeySource(), "ES256", rotate_every=3600, max_token_ttl=60, now=now[0])

    async def scenario() -> None:
        rt = Runtime(CFG, ring, _NoAudit(), _Nobody(), lambda: now[0])
        for i in range(3):
            await rt.revoke(f"a-{i}", 100, "wf-a")
        await rt.revoke("a-0", 100, "wf-a")  # again: not counted twice
        await rt.revoke("b-0", 1000, "wf-b")
        assert (rt.revoked_for("wf-a"), rt.revoked_for("wf-b")) == (3, 1)
        rt.prune_revoked(100 + tokens.MAX_LEEWAY)  # wf-a's tokens can no longer verify anywhere
        assert (rt.revoked_for("wf-a"), rt.revoked_for("wf-b")) == (0, 1)
        assert set(rt.revoked) == {"b-0"}

    asyncio.run(scenario())
