"""The client library against a real daemon: caching, single-flight, typed errors, offline verifier."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import pytest

from broker.client import AsyncClient, Client, TokenVerifier
from broker.errors import BrokerError, InvalidToken, PermissionDenied, Unavailable
from broker.testing import DaemonProcess


def mints(d: DaemonProcess) -> int:
    with open(d.audit_log) as f:
        return sum(1 for x in f if json.loads(x)["event"] == "mint")


def test_token_is_cached_until_its_refresh_point(daemon: DaemonProcess) -> None:
    now = [0.0]
    with Client(daemon.socket, workflow="support-summarize", clock=lambda: now[0]) as c:
        first = c.token("read_ticket")
        claims = c.verify(first, "read_ticket")
        now[0] = float(claims["iat"])
        assert c.token("read_ticket") == first
        lifetime = claims["exp"] - claims["iat"]
        now[0] = claims["iat"] + lifetime * 0.39  # before the earliest refresh point (0.5 - 0.1 jitter)
        assert c.token("read_ticket") == first
        now[0] = claims["iat"] + lifetime * 0.61  # past the latest one
        second = c.token("read_ticket")
        assert second != first
        assert c.token("read_ticket", audience="crm") not in (first, second)  # another cache key
    assert mints(daemon) == 3


def test_hundred_threads_share_one_rpc(daemon: DaemonProcess) -> None:
    with Client(daemon.socket, workflow="support-summarize") as c:
        barrier = threading.Barrier(100)
        got: list[str] = []

        def worker() -> None:
            barrier.wait()
            got.append(c.token("send_email"))

        threads = [threading.Thread(target=worker) for _ in range(100)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(got) == 100 and len(set(got)) == 1
    assert mints(daemon) == 1


def test_hundred_coroutines_share_one_rpc(daemon: DaemonProcess) -> None:
    async def scenario() -> set[str]:
        async with AsyncClient(daemon.socket, workflow="support-summarize") as c:
            tokens = await asyncio.gather(*(c.token("read_ticket") for _ in range(100)))
            assert (await c.verify(tokens[0], "read_ticket"))["tool"] == "read_ticket"
            with pytest.raises(PermissionDenied):
                await c.token("export_all_customers")
            return set(tokens)

    assert len(asyncio.run(scenario())) == 1
    assert mints(daemon) == 1


def test_typed_errors(daemon: DaemonProcess, short_tmp: str) -> None:
    with Client(daemon.socket) as c:
        with pytest.raises(PermissionDenied):
            c.mint("support-summarize", "export_all_customers")
        with pytest.raises(InvalidToken):
            c.verify("not.a.token", "read_ticket")
        with pytest.raises(BrokerError, match="no workflow"):
            c.token("read_ticket")
    with Client(os.path.join(short_tmp, "nothing-here.sock"), retries=1, timeout=1) as c, \
            pytest.raises(Unavailable):
        c.mint("support-summarize", "read_ticket")


def test_cached_token_survives_a_daemon_outage(daemon: DaemonProcess) -> None:
    now = [0.0]
    with Client(daemon.socket, workflow="support-summarize", retries=0, timeout=1, clock=lambda: now[0]) as c:
        token = c.token("read_ticket")
        claims = c.verify(token, "read_ticket")
        daemon.stop()
        now[0] = claims["iat"] + (claims["exp"] - claims["iat"]) * 0.8  # refresh due, daemon gone
        assert c.token("read_ticket") == token  # still valid: better than failing
        now[0] = claims["exp"] + 1
        with pytest.raises(Unavailable):
            c.token("read_ticket")


def test_token_verifier_follows_revocations(daemon: DaemonProcess) -> None:
    with Client(daemon.socket) as c, TokenVerifier(daemon.socket, "example.org") as v:
        token = c.mint("support-summarize", "read_ticket", audience="crm").token
        assert v.verify(token, tool="read_ticket", audience="crm").wf == "support-summarize"
        with pytest.raises(InvalidToken):
            v.verify(token, tool="send_email", audience="crm")
        updates = v.updates
        assert c.revoke([token]) == 1
        for _ in range(200):
            if v.updates > updates:
                break
            threading.Event().wait(0.05)
        with pytest.raises(InvalidToken) as exc:
            v.verify(token, tool="read_ticket", audience="crm")
        assert exc.value.reason == "revoked"
        assert c.revoke(["garbage"]) == 0  # nothing of ours: nothing revoked


def test_token_verifier_fails_closed_once_the_stream_is_lost_for_too_long(daemon: DaemonProcess) -> None:
    now = [time.time()]
    with Client(daemon.socket) as c, TokenVerifier(daemon.socket, "example.org", clock=lambda: now[0],
                                                   max_stale=60) as v:
        token = c.mint("support-summarize", "read_ticket", audience="crm").token
        daemon.stop()  # the stream ends: revocations from now on could be missed
        for _ in range(200):
            if v._lost_at is not None:
                break
            threading.Event().wait(0.05)
        assert v.verify(token, tool="read_ticket", audience="crm").wf == "support-summarize"  # a restart's worth
        now[0] += 61
        with pytest.raises(InvalidToken) as exc:
            v.verify(token, tool="read_ticket", audience="crm")
        assert "key stream has been lost" in exc.value.reason
