"""Attestation on the request path: an executable's first hash (up to 512 MiB read) never blocks the
event loop, so one caller's new binary cannot stall every other caller's RPCs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
import threading
import time

import pytest

from broker import attest, config, service
from broker.attest import Caller, PeerCred
from broker.config import CallerRule
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

    monkeypatch.setattr(service, "exe_hashing", attest.ExeHashing(hash_fn=slow_hash, known=_memoised))

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

    monkeypatch.setattr(service, "exe_hashing", attest.ExeHashing(hash_fn=must_not_hash))

    async def main() -> None:
        plain = runtime({"uid": os.geteuid()})
        assert not plain.config.hashes_exe
        await plain.caller(_Context())
        hashing = runtime({"uid": os.geteuid(), "exe_sha256": "0" * 64})
        attest.exe_sha256(attest.attest(_Me().cred))  # this binary's hash is now cached
        caller = await hashing.caller(_Context())
        assert "sha256" in caller._lazy  # answered from the cache, on the loop, without reading

    asyncio.run(main())


def _memoised(caller: Caller) -> bool:
    return "sha256" in caller._lazy


@pytest.mark.parametrize("rule", [
    {"uid": os.geteuid() + 1, "exe_sha256": "0" * 64},
    {"gid": os.getegid() + 1, "exe_sha256": "0" * 64},
    {"user": "no-such-user", "exe_sha256": "0" * 64},
    {"group": "no-such-group", "exe_sha256": "0" * 64},
    {"exe": "/usr/bin/false", "exe_sha256": "0" * 64},
    {"systemd_unit": "no-such.service", "exe_sha256": "0" * 64},
])
def test_no_hash_for_a_caller_no_hash_pinned_block_could_admit(
        monkeypatch: pytest.MonkeyPatch, rule: dict[str, object]) -> None:
    """Hash amplification: an ungranted caller's (huge, ever-changing) binary is never read."""
    def must_not_hash(caller: Caller) -> str:
        raise AssertionError("hashed for a caller whose cheap selectors match no hash-pinned block")

    monkeypatch.setattr(service, "exe_hashing", attest.ExeHashing(hash_fn=must_not_hash, known=_memoised))

    async def main() -> None:
        rt = runtime(rule)
        assert rt.config.hashes_exe
        caller = await rt.caller(_Context())
        assert "sha256" not in caller._lazy

    asyncio.run(main())


def _caller(uid: int) -> Caller:
    """This process, as if it ran as ``uid``: ExeHashing keys its bounds on the uid alone."""
    me = attest.attest(_Me().cred)
    return Caller(me.pid, me.process, uid, me.gid, me.exe, me.exe_id)


_ANY = [CallerRule(exe_sha256="0" * 64)]


class _GatedHash:
    """A hash that blocks (on its worker thread) until released; records who is hashing."""

    def __init__(self) -> None:
        self.started: dict[int, threading.Event] = {}
        self.release: dict[int, threading.Event] = {}
        self.calls: list[int] = []
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.finished: set[int] = set()

    def expect(self, uid: int) -> None:
        self.started[uid] = threading.Event()
        self.release[uid] = threading.Event()

    def __call__(self, caller: Caller) -> str:
        with self.lock:
            self.calls.append(caller.uid)
            self.running += 1
            self.most = max(self.most, self.running)
        self.started[caller.uid].set()
        assert self.release[caller.uid].wait(HANG_GUARD)
        with self.lock:
            self.running -= 1
            self.finished.add(caller.uid)
        caller._lazy["sha256"] = "0" * 64
        return "0" * 64


HANG_GUARD = 30.0


async def _started(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, HANG_GUARD)


def test_one_hash_per_uid_and_a_uid_waits_only_for_its_own() -> None:
    gate = _GatedHash()
    gate.expect(1001)

    def known(caller: Caller) -> bool:
        # The digest cache, keyed here by uid (every caller of this test runs one binary per uid).
        if "sha256" not in caller._lazy and caller.uid in gate.finished:
            caller._lazy["sha256"] = "0" * 64
        return "sha256" in caller._lazy

    hashing = attest.ExeHashing(limit=2, hash_fn=gate, known=known)

    async def main() -> None:
        first, second = _caller(1001), _caller(1001)
        one = asyncio.create_task(hashing.ensure(first, _ANY))
        await _started(gate.started[1001])
        two = asyncio.create_task(hashing.ensure(second, _ANY))
        await asyncio.sleep(0)
        assert not two.done()  # waiting for its own uid's hash, holding no thread
        gate.release[1001].set()
        await asyncio.wait_for(asyncio.gather(one, two), HANG_GUARD)
        assert first._lazy["sha256"] == second._lazy["sha256"] == "0" * 64

    asyncio.run(main())
    assert gate.calls == [1001]  # the second request used the first one's result
    assert gate.most == 1


def test_a_full_pool_never_makes_another_uid_wait() -> None:
    gate = _GatedHash()
    hashing = attest.ExeHashing(limit=2, hash_fn=gate, known=_memoised)

    async def main() -> None:
        tasks = []
        for uid in (1001, 1002):
            gate.expect(uid)
            tasks.append(asyncio.create_task(hashing.ensure(_caller(uid), _ANY)))
            await _started(gate.started[uid])
        # Both slots are other uids' (say, two granted uids hashing huge binaries): a third uid goes on
        # at once, without a digest, and the audit line says why its hash-pinned block did not match.
        third = _caller(1003)
        await asyncio.wait_for(hashing.ensure(third, _ANY), HANG_GUARD)
        assert "sha256" not in third._lazy
        assert "busy" in str(third.audit_fields()["exe_sha256"])
        for uid in (1001, 1002):
            gate.release[uid].set()
        await asyncio.wait_for(asyncio.gather(*tasks), HANG_GUARD)
        # Slots free again: the third uid is hashed now.
        gate.expect(1003)
        gate.release[1003].set()
        await asyncio.wait_for(hashing.ensure(third, _ANY), HANG_GUARD)
        assert third._lazy["sha256"] == "0" * 64

    asyncio.run(main())
    assert gate.calls == [1001, 1002, 1003]
    assert gate.most == 2


def test_an_abandoned_request_keeps_its_slot_until_the_read_ends() -> None:
    """Cancelling the request (the client hangs up) does not stop the thread reading the binary, so the
    slot stays taken until it ends: a caller cannot start hash after hash by abandoning requests."""
    gate = _GatedHash()
    hashing = attest.ExeHashing(limit=1, hash_fn=gate, known=_memoised)

    async def main() -> None:
        gate.expect(1001)
        abandoned = asyncio.create_task(hashing.ensure(_caller(1001), _ANY))
        await _started(gate.started[1001])
        abandoned.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await abandoned
        other = _caller(1002)
        await asyncio.wait_for(hashing.ensure(other, _ANY), HANG_GUARD)
        assert "sha256" not in other._lazy  # the only slot is still the abandoned read's
        gate.release[1001].set()
        gate.expect(1002)
        gate.release[1002].set()
        while "sha256" not in other._lazy:  # the slot frees once the thread is done
            await asyncio.wait_for(hashing.ensure(other, _ANY), HANG_GUARD)
            await asyncio.sleep(0)

    asyncio.run(main())
    assert gate.calls == [1001, 1002]
