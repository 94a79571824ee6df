"""The small pure parts: redaction of SecretValue, backoff bounds, the fleet instance name."""

from __future__ import annotations

import random

import pytest

from broker.config import VaultAuth, VaultSettings
from broker.vault import SecretValue, VaultUnavailable, _engines, _session, instance_name
from broker.vault._backoff import Backoff


def test_secret_value_never_shows_its_data() -> None:
    v = SecretValue("database", {"username": "v-user-1", "password": "hunter2-secret"}, 3, lease_id="database/x/1",
                    expires_at=100.0, renewable=True)
    for text in (repr(v), str(v), f"{v}", repr([v])):
        assert "hunter2-secret" not in text and "v-user-1" not in text
        assert "password" in text and "database/x/1" in text
    with pytest.raises(TypeError):
        v.data["password"] = "changed"  # type: ignore[index]


def test_secret_value_data_is_a_copy() -> None:
    source = {"token": "a"}
    v = SecretValue("token", source, 1)
    source["token"] = "b"
    assert v.data["token"] == "a"


def test_backoff_grows_with_jitter_and_caps() -> None:
    b = Backoff(random.Random(7), base=0.5, cap=8.0)
    delays = [b.next() for _ in range(12)]
    assert 0.25 <= delays[0] <= 0.5
    assert all(4.0 <= d <= 8.0 for d in delays[5:])
    assert len(set(delays)) == len(delays)  # jittered, never in lockstep
    b.reset()
    assert b.next() <= 0.5


def test_instance_name() -> None:
    auth = VaultAuth("token", token_file="/x")
    assert instance_name(VaultSettings("http://v", auth, instance="node-7")) == "node-7"
    derived = instance_name(VaultSettings("http://v", auth))
    assert derived and derived == derived.lower()


@pytest.mark.parametrize("value", [-1, 10**400, 2**32, True, "60", 1.5, None])
def test_durations_from_vault_are_bounded(value: object) -> None:
    # A 401-digit lease_duration once escaped as OverflowError from the schedule arithmetic.
    with pytest.raises(VaultUnavailable):
        _session._duration(value)
    with pytest.raises(VaultUnavailable):
        _engines._seconds({"ttl": value}, "ttl")
    assert _session._duration(3600) == 3600 and _engines._seconds({"ttl": 0}, "ttl") == 0
