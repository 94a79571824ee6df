"""Upstream secrets from a real OpenBao: KV rotation on a watch stream, PKI, child tokens, revocation."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

import hvac
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker.config import CallerRule, SecretSpec, Tool, Workflow
from broker.testing import OpenBao
from broker.vault import NoSecretConfigured, SecretManager, SecretUnavailable, SecretValue, VaultSession

from .conftest import make_role


def workflows(**specs: SecretSpec) -> Mapping[str, Workflow]:
    tools = {name: Tool(name, (), (), 60, secret=spec) for name, spec in specs.items()}
    tools["plain"] = Tool("plain", (), (), 60)
    return {"wf": Workflow("wf", "acme", (CallerRule(uid=0),), tools)}


@pytest.fixture
def vault_session(bao: OpenBao, admin: hvac.Client, creds_dir: str, broker_policy: str) -> VaultSession:
    return VaultSession(make_role(admin, creds_dir, policies=[broker_policy, "crm-read"]).settings(bao.address))


@pytest.fixture(scope="module")
def pki(admin: hvac.Client) -> x509.Certificate:
    admin.sys.enable_secrets_engine("pki", path="pki")
    admin.sys.tune_mount_configuration("pki", max_lease_ttl="87600h")
    ca = admin.secrets.pki.generate_root("internal", "test root CA", extra_params={"ttl": "87600h"})
    admin.secrets.pki.create_or_update_role("agents", {"allowed_domains": "agents.internal",
                                                       "allow_subdomains": True, "max_ttl": "1h",
                                                       "key_type": "ec", "key_bits": 256})
    return x509.load_pem_x509_certificate(ca["data"]["certificate"].encode())


def test_kv_value_rotation_on_stream_and_on_demand(vault_session: VaultSession, admin: hvac.Client) -> None:
    admin.secrets.kv.v2.create_or_update_secret("crm/readonly", {"api_key": "k-one", "other": "x"})

    async def main() -> None:
        session = vault_session
        mgr = SecretManager(session, workflows(crm=SecretSpec("kv", path="secret/crm/readonly", field="api_key"),
                                               whole=SecretSpec("kv", path="secret/crm/readonly")),
                            kv_refresh=1, max_staleness=60)
        mgr.start()
        v1 = await mgr.get("wf", "crm")
        assert v1.kind == "kv" and dict(v1.data) == {"api_key": "k-one"} and v1.expires_at is None
        assert "k-one" not in repr(v1) and "k-one" not in str(v1) and "api_key" in repr(v1)
        assert dict((await mgr.get("wf", "whole")).data) == {"api_key": "k-one", "other": "x"}

        seen: list[SecretValue] = []
        stream = mgr.watch("wf", "crm")
        seen.append(await anext(stream))
        admin.secrets.kv.v2.create_or_update_secret("crm/readonly", {"api_key": "k-two", "other": "x"})
        seen.append(await asyncio.wait_for(anext(stream), 10))  # picked up by the 1 s poll
        assert [dict(v.data)["api_key"] for v in seen] == ["k-one", "k-two"]
        assert seen[1].version == seen[0].version + 1

        # On demand: refresh() re-reads at once instead of waiting for the poll.
        admin.secrets.kv.v2.create_or_update_secret("crm/readonly", {"api_key": "k-three"})
        assert dict((await mgr.refresh("wf", "crm")).data) == {"api_key": "k-three"}
        assert dict((await asyncio.wait_for(anext(stream), 5)).data) == {"api_key": "k-three"}
        await stream.aclose()
        with pytest.raises(NoSecretConfigured):
            await mgr.get("wf", "plain")
        await mgr.close()
        await session.close()

    asyncio.run(main())


def test_kv_missing_path_or_field(vault_session: VaultSession, admin: hvac.Client) -> None:
    admin.secrets.kv.v2.create_or_update_secret("crm/nofield", {"something": "else"})

    async def main() -> None:
        session = vault_session
        mgr = SecretManager(session, workflows(
            nopath=SecretSpec("kv", path="secret/crm/does-not-exist", field="api_key"),
            nofield=SecretSpec("kv", path="secret/crm/nofield", field="api_key"),
            denied=SecretSpec("kv", path="secret/other/x")), kv_refresh=60, max_staleness=60)
        for tool in ("nopath", "nofield"):
            with pytest.raises(SecretUnavailable, match="not found in Vault") as exc:
                await mgr.get("wf", tool)
            assert "else" not in exc.value.reason
        # The broker's policy has no read on secret/other: a policy denial, not a dead token.
        with pytest.raises(SecretUnavailable, match="denied"):
            await mgr.get("wf", "denied")
        assert mgr.degraded is not None and session.logins == 1
        await mgr.close()
        await session.close()

    asyncio.run(main())


def test_pki_certificate_verifies_against_ca_and_is_reissued(vault_session: VaultSession, admin: hvac.Client,
                                                              pki: x509.Certificate,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "broker.vault")

    async def main() -> None:
        session = vault_session
        mgr = SecretManager(session, workflows(cert=SecretSpec("pki", role="agents", common_name="a1.agents.internal",
                                                               ttl=6)), kv_refresh=60, max_staleness=60)
        mgr.start()
        stream = mgr.watch("wf", "cert")
        first = await anext(stream)
        cert = x509.load_pem_x509_certificate(first.data["certificate"].encode())
        cert.verify_directly_issued_by(pki)
        key = serialization.load_pem_private_key(first.data["private_key"].encode(), None)
        assert key.public_key().public_numbers() == cert.public_key().public_numbers()
        assert cert.subject.rfc4514_string() == "CN=a1.agents.internal"
        assert first.expires_at == pytest.approx(cert.not_valid_after_utc.timestamp())
        assert first.expires_at is not None and first.expires_at - time.time() < 10
        # A new certificate arrives at 2/3 of the first one's lifetime, before it expires.
        second = await asyncio.wait_for(anext(stream), 10)
        assert second.data["serial_number"] != first.data["serial_number"]
        assert first.expires_at is not None and time.time() < first.expires_at
        # The replaced certificate stays valid (its holder may still be swapping it in) ...
        assert not revoked(admin, first)
        await stream.aclose()
        await mgr.close()
        await session.close()
        # ... until the broker stops: then the certificates it holds are revoked, like leases. The first
        # one is seconds from its end by now, and OpenBao may decline to list it: that is logged.
        assert revoked(admin, second)
        assert revoked(admin, first) or "declined to revoke secret=wf/cert kind=certificate" in caplog.text

    asyncio.run(main())


def revoked(admin: hvac.Client, value: SecretValue) -> bool:
    cert = admin.read(f"pki/cert/{value.data['serial_number']}")
    return int(cert["data"].get("revocation_time") or 0) > 0


def test_pki_certificate_of_a_run_is_revoked_when_the_run_ends(vault_session: VaultSession, admin: hvac.Client,
                                                                 pki: x509.Certificate) -> None:
    async def main() -> None:
        session = vault_session
        mgr = SecretManager(session, workflows(cert=SecretSpec("pki", role="agents", common_name="a2.agents.internal",
                                                               ttl=600)), kv_refresh=60, max_staleness=60)
        mgr.start()
        shared = await mgr.get("wf", "cert")
        run = mgr.watch_run("wf", "cert", "run-1")
        mine = await anext(run)
        assert mine.data["serial_number"] != shared.data["serial_number"]  # a run gets its own certificate
        assert mgr.leases == 2 and not revoked(admin, mine)
        await run.aclose()
        assert revoked(admin, mine) and not revoked(admin, shared)
        assert mgr.leases == 1
        await mgr.close()
        await session.close()

    asyncio.run(main())


def test_child_token_policies_ttl_renewal_and_revocation(vault_session: VaultSession, admin: hvac.Client) -> None:
    admin.secrets.kv.v2.create_or_update_secret("crm/readonly", {"api_key": "k"})

    async def main() -> None:
        session = vault_session
        mgr = SecretManager(session, workflows(long=SecretSpec("token", policies=("crm-read",), ttl=600),
                                               short=SecretSpec("token", policies=("crm-read",), ttl=3)),
                            kv_refresh=60, max_staleness=60)
        mgr.start()
        long = await mgr.get("wf", "long")
        child = hvac.Client(url=admin.url, token=long.data["token"])
        me = child.auth.token.lookup_self()["data"]
        assert sorted(me["policies"]) == ["crm-read", "default"]
        assert 590 <= me["ttl"] <= 600 and me["renewable"]
        read = child.secrets.kv.v2.read_secret_version("crm/readonly", raise_on_deleted_version=True)
        assert read["data"]["data"] == {"api_key": "k"}
        with pytest.raises(hvac.exceptions.Forbidden):
            child.secrets.kv.v2.create_or_update_secret("crm/readonly", {"api_key": "mine"})

        short = await mgr.get("wf", "short")
        await asyncio.sleep(4.5)  # past the original 3 s TTL: alive only because it was renewed
        assert (await mgr.get("wf", "short")).data["token"] == short.data["token"]
        assert hvac.Client(url=admin.url, token=short.data["token"]).auth.token.lookup_self()["data"]["ttl"] > 0

        await mgr.close()
        for value in (long, short):
            with pytest.raises(hvac.exceptions.Forbidden):
                hvac.Client(url=admin.url, token=value.data["token"]).auth.token.lookup_self()
        await session.close()

    asyncio.run(main())


def test_revoke_workflow_ends_streams_and_revokes(vault_session: VaultSession, admin: hvac.Client) -> None:
    async def main() -> None:
        session = vault_session
        mgr = SecretManager(session, workflows(tok=SecretSpec("token", policies=("crm-read",), ttl=600)),
                            kv_refresh=60, max_staleness=60)
        mgr.start()
        stream = mgr.watch("wf", "tok")
        value = await anext(stream)
        pending = asyncio.ensure_future(anext(stream))
        await mgr.revoke_workflow("wf")
        with pytest.raises(SecretUnavailable, match="workflow revoked"):
            await pending
        with pytest.raises(hvac.exceptions.Forbidden):
            hvac.Client(url=admin.url, token=value.data["token"]).auth.token.lookup_self()
        # Issued anew on the next request.
        assert (await mgr.get("wf", "tok")).data["token"] != value.data["token"]
        await mgr.close()
        await session.close()

    asyncio.run(main())


def test_leases_follow_the_broker_token(bao: OpenBao, admin: hvac.Client, creds_dir: str, broker_policy: str) -> None:
    """Revoking the broker's token kills its child tokens; the manager issues new ones under the new login."""
    role = make_role(admin, creds_dir, policies=[broker_policy, "crm-read"])

    async def main() -> None:
        session = VaultSession(role.settings(bao.address), check_every=0.3)
        await session.start()
        mgr = SecretManager(session, workflows(tok=SecretSpec("token", policies=("crm-read",), ttl=600)),
                            kv_refresh=60, max_staleness=60)
        mgr.start()
        old = await mgr.get("wf", "tok")
        me = await session.request("GET", "auth/token/lookup-self")
        admin.auth.token.revoke_accessor(me["data"]["accessor"])
        deadline = time.monotonic() + 10
        while (await mgr.get("wf", "tok")).data["token"] == old.data["token"]:
            assert time.monotonic() < deadline, "child token not re-issued after the broker's token died"
            await asyncio.sleep(0.1)
        new = await mgr.get("wf", "tok")
        assert hvac.Client(url=admin.url, token=new.data["token"]).auth.token.lookup_self()["data"]["ttl"] > 0
        await mgr.close()
        await session.close()

    asyncio.run(main())


def test_a_credential_already_over_on_arrival_is_refused_not_reissued_in_a_loop(
        vault_session: VaultSession, pki: x509.Certificate, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "broker.vault")

    async def main() -> None:
        session = vault_session
        # Our clock an hour ahead of Vault's: every 10-minute certificate looks expired on arrival.
        mgr = SecretManager(session, workflows(cert=SecretSpec("pki", role="agents", common_name="a3.agents.internal",
                                                               ttl=600)), kv_refresh=60, max_staleness=60,
                            clock=lambda: time.time() + 3600)
        mgr.start()
        with pytest.raises(SecretUnavailable):
            await mgr.get("wf", "cert")
        await asyncio.sleep(2)
        assert mgr.degraded is not None and "clocks out of step" in mgr.degraded
        await mgr.close()
        await session.close()

    asyncio.run(main())
    # Retried with backoff (a handful of requests in two seconds), never a tight loop of issues.
    assert 1 <= caplog.text.count("clocks out of step") <= 6
    assert "issued kind=pki" not in caplog.text


def test_revocation_refused_by_policy_is_reported_and_retried(bao: OpenBao, admin: hvac.Client, creds_dir: str,
                                                              pki: x509.Certificate) -> None:
    # A policy without pki/revoke (an operator's mistake): the run's certificate cannot be revoked at run
    # end. It must not be dropped (it would live for its whole TTL): reported, and revoked once allowed.
    rules = """
path "pki/issue/*" { capabilities = ["create", "update"] }
path "sys/leases/revoke" { capabilities = ["update"] }
"""
    admin.sys.create_or_update_policy("no-pki-revoke", rules)
    session = VaultSession(make_role(admin, creds_dir, policies=["no-pki-revoke"]).settings(bao.address))

    async def main() -> None:
        await session.start()
        mgr = SecretManager(session, workflows(cert=SecretSpec("pki", role="agents", common_name="a4.agents.internal",
                                                               ttl=600)), kv_refresh=60, max_staleness=60)
        mgr.start()
        run = mgr.watch_run("wf", "cert", "run-1")
        mine = await anext(run)
        await run.aclose()
        assert not revoked(admin, mine)
        assert mgr.degraded is not None and "1 revocation(s) refused by Vault's policy" in mgr.degraded
        assert "wf/cert" in mgr.degraded and "certificate" in mgr.degraded
        admin.sys.create_or_update_policy("no-pki-revoke", rules + 'path "pki/revoke" { capabilities = ["update"] }')
        deadline = time.monotonic() + 60  # the retry backoff is capped at 15 s
        while not revoked(admin, mine):
            assert time.monotonic() < deadline, "the refused revocation was not retried"
            await asyncio.sleep(0.2)
        while mgr.degraded is not None:  # the books are updated right after the successful attempt
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await mgr.close()
        await session.close()

    asyncio.run(main())
