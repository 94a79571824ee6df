"""The fleet JWKS's trust rules, against a scripted KV store (the real-server path is in test_fleet.py):
expiry without Vault, conflicting kids, a kid whose key changes."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from broker import tokens
from broker.config import VaultAuth, VaultSettings
from broker.tokens import VerifyKey
from broker.vault import FleetJwks, VaultRequestError, VaultUnavailable

SETTINGS = VaultSettings("http://vault.invalid", VaultAuth("token", token_file="/dev/null"), instance="me")


def key(kid: str) -> VerifyKey:
    """A fresh ES256 public key published under ``kid`` (as a sibling may, thumbprint or not)."""
    return VerifyKey(tokens.ES256, kid, public=tokens.generate(tokens.ES256).verify_key.public)


class ScriptedKV:
    """KV v2 as the fleet sees it: one entry per instance; ``down`` makes every request fail."""

    generation = 1

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, Any]] = {}
        self.down = False

    def put(self, instance: str, keys: list[VerifyKey], not_after: int) -> None:
        self.entries[instance] = {**tokens.jwks_document(keys), "not_after": not_after}

    async def request(self, method: str, path: str, data: Mapping[str, Any] | None = None) -> dict[str, Any]:
        if self.down:
            raise VaultUnavailable("Vault is down")
        name = path.rsplit("/", 1)[-1]
        if method == "LIST":
            return {"data": {"keys": sorted(self.entries)}}
        if method == "GET":
            if name not in self.entries:
                raise VaultRequestError(404, "no such entry")
            return {"data": {"data": self.entries[name]}}
        if method == "POST":
            assert data is not None
            self.entries[name] = dict(data["data"])
            return {}
        raise AssertionError(f"unexpected {method} {path}")

    async def send_with(self, token: str, method: str, path: str,
                        data: Mapping[str, Any] | None = None) -> dict[str, Any]:
        raise AssertionError("not used")


def test_a_dead_siblings_keys_expire_even_while_vault_is_down() -> None:
    kv, now = ScriptedKV(), [1000.0]
    theirs = key("their-kid")
    kv.put("other", [theirs], not_after=1100)

    async def main() -> None:
        fleet = FleetJwks(kv, SETTINGS, max_token_ttl=60, clock=lambda: now[0], refresh_every=0.01)
        await fleet.publish([key("my-kid")])
        await fleet.refresh()
        assert set(fleet.keys()) == {"my-kid", "their-kid"}
        kv.down = True
        fleet.start()
        now[0] = 1101  # past the entry's promise, and Vault cannot be asked again
        for _ in range(200):
            trusted = fleet.keys()
            if "their-kid" not in trusted:
                break
            await asyncio.sleep(0.01)
        await fleet.close()
        assert set(fleet.keys()) == {"my-kid"}

    asyncio.run(main())


def test_a_kid_claimed_with_two_keys_is_trusted_from_neither() -> None:
    kv = ScriptedKV()
    kv.put("a", [key("shared"), key("a-only")], not_after=2000)
    kv.put("b", [key("shared")], not_after=2000)  # same kid, another key
    kv.put("c", [key("my-kid")], not_after=2000)  # someone publishing our own kid

    async def main() -> None:
        mine = key("my-kid")
        fleet = FleetJwks(kv, SETTINGS, max_token_ttl=60, clock=lambda: 1000.0)
        await fleet.publish([mine])
        await fleet.refresh()
        assert set(fleet.keys()) == {"my-kid", "a-only"}
        assert fleet.keys()["my-kid"].to_jwk() == mine.to_jwk()  # our own key always wins

    asyncio.run(main())


def test_a_kid_whose_key_changes_is_a_change() -> None:
    kv = ScriptedKV()
    first, second = key("k"), key("k")
    kv.put("other", [first], not_after=2000)
    changes = 0

    async def changed() -> None:
        nonlocal changes
        changes += 1

    async def main() -> None:
        fleet = FleetJwks(kv, SETTINGS, max_token_ttl=60, clock=lambda: 1000.0, on_change=changed)
        await fleet.refresh()
        assert fleet.keys()["k"].to_jwk() == first.to_jwk()
        kv.put("other", [second], not_after=2000)
        await fleet.refresh()
        assert fleet.keys()["k"].to_jwk() == second.to_jwk()  # not the stale key under the same kid

    asyncio.run(main())
    assert changes == 2


def test_a_restart_keeps_the_previous_runs_keys_until_their_entry_expires() -> None:
    kv, now = ScriptedKV(), [1000.0]
    kv.put("me", [key("before-restart")], not_after=1500)  # what the previous run of "me" published

    async def main() -> None:
        fleet = FleetJwks(kv, SETTINGS, max_token_ttl=60, clock=lambda: now[0])
        await fleet.publish([key("after-restart")])
        assert set(fleet.keys()) == {"before-restart", "after-restart"}  # its tokens still verify here
        assert {k["kid"] for k in kv.entries["me"]["keys"]} == {"before-restart", "after-restart"}  # and there
        now[0] = 1501
        await fleet.publish([key("after-restart")])
        assert set(fleet.keys()) == {"after-restart"}
        assert {k["kid"] for k in kv.entries["me"]["keys"]} == {"after-restart"}

    asyncio.run(main())


def test_a_first_start_has_nothing_to_keep() -> None:
    async def main() -> None:
        kv = ScriptedKV()
        fleet = FleetJwks(kv, SETTINGS, max_token_ttl=60, clock=lambda: 1000.0)
        await fleet.publish([key("k1")])
        assert set(fleet.keys()) == {"k1"} and "me" in kv.entries

    asyncio.run(main())


def test_an_unknown_kid_triggers_one_rate_limited_refresh() -> None:
    kv, now = ScriptedKV(), [1000.0]

    async def main() -> None:
        fleet = FleetJwks(kv, SETTINGS, max_token_ttl=60, clock=lambda: now[0])
        await fleet.refresh()
        kv.put("other", [key("fresh")], not_after=2000)  # a sibling restarted with a new key
        assert await fleet.refresh_soon() is True
        trusted = fleet.keys()
        assert "fresh" in trusted
        kv.put("other", [key("fresh"), key("fresher")], not_after=2000)
        assert await fleet.refresh_soon() is False  # too soon: made-up kids cannot flood Vault
        now[0] += 5
        assert await fleet.refresh_soon() is True
        trusted = fleet.keys()
        assert "fresher" in trusted

    asyncio.run(main())
