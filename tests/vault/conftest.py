"""Fixtures for the Vault backend tests: one real OpenBao dev server per test session, AppRole roles made
on demand, credential files in memory-backed /dev/shm, and Debian's PostgreSQL (installed if missing)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import hvac
import pytest

from broker.config import VaultAuth, VaultSettings
from broker.testing import OpenBao, openbao_dev_server
from broker.vault.testing import postgres_bindir


@pytest.fixture(scope="session")
def bao() -> Iterator[OpenBao]:
    with tempfile.TemporaryDirectory(prefix="bao-") as d, openbao_dev_server(d) as server:
        yield server


@pytest.fixture(scope="session")
def admin(bao: OpenBao) -> hvac.Client:
    client = hvac.Client(url=bao.address, token=bao.token)
    client.sys.enable_auth_method("approle")
    return client


@pytest.fixture
def creds_dir() -> Iterator[str]:
    # Credential files live in memory when the host has /dev/shm: tests write no secret to disk.
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="broker-vault-", dir=base) as d:
        yield d


@dataclass
class Role:
    name: str
    role_id_file: str
    secret_id_file: str

    def settings(self, address: str, **kw: Any) -> VaultSettings:
        return VaultSettings(address, VaultAuth("approle", role_id_file=self.role_id_file,
                                                secret_id_file=self.secret_id_file), **kw)


def write_secret(path: str, value: str) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return path


def make_role(admin: hvac.Client, creds_dir: str, *, policies: list[str], token_ttl: str = "1h",
              token_max_ttl: str = "24h", wrapped: bool = False) -> Role:
    name = f"r{uuid.uuid4().hex[:10]}"
    admin.auth.approle.create_or_update_approle(name, token_policies=policies, token_ttl=token_ttl,
                                                token_max_ttl=token_max_ttl)
    role_id = admin.auth.approle.read_role_id(name)["data"]["role_id"]
    if wrapped:
        resp = admin.write_data(f"auth/approle/role/{name}/secret-id", wrap_ttl="5m")
        secret = resp["wrap_info"]["token"]
    else:
        secret = admin.auth.approle.generate_secret_id(name)["data"]["secret_id"]
    return Role(name, write_secret(os.path.join(creds_dir, f"{name}.role_id"), role_id),
                write_secret(os.path.join(creds_dir, f"{name}.secret_id"), secret))


ALL_POLICY = "broker-test-all"


@pytest.fixture(scope="session")
def broker_policy(admin: hvac.Client) -> str:
    """A policy granting everything the broker's features need in these tests (mirrors docs/vault.md)."""
    admin.sys.create_or_update_policy(ALL_POLICY, """
path "secret/data/*" { capabilities = ["create", "update", "read"] }
path "secret/metadata/*" { capabilities = ["list"] }
path "database/creds/*" { capabilities = ["read"] }
path "pki/issue/*" { capabilities = ["create", "update"] }
path "pki/revoke" { capabilities = ["update"] }
path "auth/token/create" { capabilities = ["create", "update"] }
path "sys/leases/renew" { capabilities = ["update"] }
path "sys/leases/revoke" { capabilities = ["update"] }
""")
    admin.sys.create_or_update_policy("crm-read", 'path "secret/data/crm/*" { capabilities = ["read"] }')
    return ALL_POLICY


@pytest.fixture(scope="session")
def pg_bindir() -> str:
    """Debian's PostgreSQL server binaries, installed with apt when missing and we are root."""
    found = postgres_bindir()
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"], check=True,
                       env=env, capture_output=True, timeout=900)
        found = postgres_bindir()
    if found is None:
        pytest.skip("PostgreSQL is not installed and we are not root to install it (apt-get install postgresql)")
    return found
