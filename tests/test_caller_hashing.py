"""Attestation on the request path: an executable's first hash (up to 512 MiB read) never blocks the
event loop, so one caller's new binary cannot stall every other caller's RPCs."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import threading
import time

import pytest

from broker import attest, config, service
from broker.attest import Caller, PeerCred
from broker.keyring import KeyRing, MemoryKeySource
from broker.service import Runtime
from broker.testing import WorkflowSpec, config_text


class _Me:
    """Peers: every connection is this test process (pinned by a real pidfd)."""

    def __init__(self) -> None:
        a, b = socket.socketpair()
        with a, b:
            self.cred = attest.peer_cred(a)

    def lookup(self, peer: str) -> PeerCred:
        return self.cred


class _Context:
    def peer(self) -> str:
        return "unix-abstract:broker-test"


class _NoAudit:
    def record(self, event: str, **fields: object) -> None:
        raise AssertionError("nothing to audit here")


def runtime(rule: dict[str, object]) -> Runtime:
    with tempfile.TemporaryDirectory() as d:
        cfg = config.parse(config_text(d, [WorkflowSpec("w", callers=[rule], tools=[{"name": "t"}])]).encode())
    ring = KeyRing(MemoryKeySource(), "ES256", rotate_every=3600, max_token_ttl=60, now=time.time())
    return Runtime(cfg, ring, _NoAudit(), _Me(), time.time)


def test_a_cache_miss_is_hashed_on_a_worker_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    released = threading.Event()
    hashed_on: list[threading.Thread] = []

    def slow_hash(caller: Caller) -> str:
        hashed_on.append(threading.current_thread())
        # On the event loop this would wait forever: the coroutine that releases it could not run.
        assert released.wait(10), "the hash blocked the event loop"
        caller._lazy["sha256"] = "0" * 64
        return "0" * 64

    monkeypatch.setattr(service, "exe_sha256_known", lambda caller: False)
    monkeypatch.setattr(service, "exe_sha256", slow_hash)

    async def main() -> Caller:
        rt = runtime({"uid": os.geteuid(), "exe_sha256": "0" * 64})
        assert rt.config.hashes_exe
        pending = asyncio.create_task(rt.caller(_Context()))
        await asyncio.sleep(0.05)  # the loop serves others while the hash runs
        released.set()
        return await asyncio.wait_for(pending, 10)

    caller = asyncio.run(main())
    assert hashed_on and hashed_on[0] is not threading.main_thread()
    assert attest.exe_sha256(caller) == "0" * 64  # the result is the caller's for the policy check


def test_no_detour_when_no_rule_hashes_or_the_hash_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_hash(caller: Caller) -> str:
        raise AssertionError("hashed without need")

    monkeypatch.setattr(service, "exe_sha256", must_not_hash)

    async def main() -> None:
        plain = runtime({"uid": os.geteuid()})
        assert not plain.config.hashes_exe
        await plain.caller(_Context())
        hashing = runtime({"uid": os.geteuid(), "exe_sha256": "0" * 64})
        attest.exe_sha256(attest.attest(_Me().cred))  # this binary's hash is now cached
        caller = await hashing.caller(_Context())
        assert "sha256" in caller._lazy  # answered from the cache, on the loop, without reading

    asyncio.run(main())
