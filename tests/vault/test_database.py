"""Dynamic PostgreSQL users from OpenBao's database engine, against a real PostgreSQL cluster."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator

import hvac
import pytest

from broker.config import CallerRule, SecretSpec, Tool, Workflow
from broker.testing import OpenBao
from broker.vault import SecretManager, SecretValue, VaultSession
from broker.vault.testing import PostgresCluster, postgres_cluster

from .conftest import make_role


@pytest.fixture(scope="module")
def cluster(pg_bindir: str) -> Iterator[PostgresCluster]:
    with tempfile.TemporaryDirectory(prefix="brk-pg-") as d, postgres_cluster(d) as pg:
        yield pg


@pytest.fixture(scope="module")
def database(admin: hvac.Client, cluster: PostgresCluster) -> str:
    admin.sys.enable_secrets_engine("database", path="database")
    admin.write_data("database/config/tickets", data={
        "plugin_name": "postgresql-database-plugin",
        "allowed_roles": "ticket-reader",
        "connection_url": f"postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{cluster.port}/postgres"
                          "?sslmode=disable",
        "username": cluster.superuser,
        "password": cluster.password,
    })
    # Short TTLs so that renewal (at 2/3 of 4 s) and re-issue before the 9 s max TTL happen in the test.
    admin.write_data("database/roles/ticket-reader", data={
        "db_name": "tickets", "default_ttl": "4s", "max_ttl": "9s",
        "creation_statements": ["CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' "
                                "VALID UNTIL '{{expiration}}';"],
    })
    return "ticket-reader"


def role_exists(pg: PostgresCluster, name: str) -> bool:
    r = pg.psql(pg.superuser, pg.password, f"select count(*) from pg_roles where rolname = '{name}'")
    assert r.returncode == 0, r.stderr
    return r.stdout.strip() == "1"


def test_database_user_login_renewal_reissue_and_revocation(bao: OpenBao, admin: hvac.Client, creds_dir: str,
                                                            broker_policy: str, cluster: PostgresCluster,
                                                            database: str) -> None:
    session = VaultSession(make_role(admin, creds_dir, policies=[broker_policy]).settings(bao.address))
    spec = SecretSpec("database", role=database)
    wfs = {"wf": Workflow("wf", "acme", (CallerRule(uid=0),), {"db": Tool("db", (), (), 60, secret=spec)})}

    async def main() -> list[SecretValue]:
        mgr = SecretManager(session, wfs, kv_refresh=60, max_staleness=60)
        mgr.start()
        stream = mgr.watch("wf", "db")
        first = await anext(stream)
        assert first.kind == "database" and first.lease_id and first.renewable
        login = cluster.psql(first.data["username"], first.data["password"], "select current_user")
        assert login.returncode == 0, login.stderr
        assert login.stdout.strip() == first.data["username"]
        assert first.data["password"] not in repr(first)

        # Past the first 4 s: the same user, kept alive by renewal.
        await asyncio.sleep(4.5)
        renewed = await mgr.get("wf", "db")
        assert renewed.data == first.data and renewed.expires_at and first.expires_at
        assert renewed.expires_at > first.expires_at
        lease = admin.sys.read_lease(first.lease_id)["data"]
        assert lease["ttl"] > 0

        # Before the 9 s max TTL ends, a new user is issued and pushed to the stream.
        second = await asyncio.wait_for(anext(stream), 10)
        assert second.data["username"] != first.data["username"]
        assert cluster.psql(second.data["username"], second.data["password"], "select 1").returncode == 0
        await stream.aclose()
        await mgr.close()
        return [first, second]

    values = asyncio.run(main())
    asyncio.run(session.close())
    # Shutdown revoked both leases (the replaced one too, if it had not expired): the users are dropped.
    for value in values:
        assert not role_exists(cluster, value.data["username"])
        with pytest.raises(hvac.exceptions.InvalidRequest):
            admin.sys.read_lease(value.lease_id)
