"""Vault over TLS: a real OpenBao serving HTTPS with a certificate from its own CA.

The broker trusts that CA only when ``vault.ca_file`` names it; an untrusted certificate (no ca_file, or
another CA) fails closed without logging in, and a missing or broken ca_file stops the daemon at start.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import hvac
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from broker.client import Client
from broker.config import VaultAuth, VaultSettings
from broker.testing import OpenBao, WorkflowSpec, config_text, openbao_dev_server, running_daemon
from broker.vault import VaultError, VaultSession, VaultUnavailable

from .conftest import write_secret

POLICY = """
path "secret/data/*" { capabilities = ["create", "update", "read"] }
path "secret/metadata/*" { capabilities = ["list"] }
"""


@pytest.fixture(scope="module")
def tls_bao() -> Iterator[OpenBao]:
    with tempfile.TemporaryDirectory(prefix="bao-tls-") as d, openbao_dev_server(d, tls=True) as server:
        assert server.address.startswith("https://") and server.ca_file is not None
        yield server


@pytest.fixture(scope="module")
def tls_admin(tls_bao: OpenBao) -> hvac.Client:
    client = hvac.Client(url=tls_bao.address, token=tls_bao.token, verify=tls_bao.ca_file)
    client.sys.create_or_update_policy("broker-tls", POLICY)
    return client


@pytest.fixture
def token_file(tls_admin: hvac.Client, creds_dir: str) -> str:
    token = tls_admin.auth.token.create(policies=["broker-tls"], ttl="1h")["auth"]["client_token"]
    return write_secret(os.path.join(creds_dir, "token"), token)


def other_ca(path: str) -> str:
    """A self-signed CA that did not sign OpenBao's certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not the vault CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    with open(path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return path


def settings(bao: OpenBao, token_file: str, ca_file: str | None) -> VaultSettings:
    return VaultSettings(bao.address, VaultAuth("token", token_file=token_file), ca_file)


def test_session_over_tls_trusts_the_configured_ca(tls_bao: OpenBao, token_file: str) -> None:
    async def main() -> None:
        s = VaultSession(settings(tls_bao, token_file, tls_bao.ca_file), check_every=3600)
        await s.start()
        try:
            assert s.logged_in and s.degraded is None
            me = await s.request("GET", "auth/token/lookup-self")
            assert "broker-tls" in me["data"]["policies"]
        finally:
            await s.close()

    asyncio.run(main())


@pytest.mark.parametrize("which", ["system trust store", "another CA"])
def test_untrusted_certificate_fails_closed(tls_bao: OpenBao, token_file: str, creds_dir: str, which: str) -> None:
    ca_file = None if which == "system trust store" else other_ca(os.path.join(creds_dir, "other-ca.pem"))

    async def main() -> None:
        s = VaultSession(settings(tls_bao, token_file, ca_file), check_every=3600)
        await s.start()  # the failed login is only logged: the broker serves without Vault meanwhile
        try:
            assert not s.logged_in
            assert s.degraded is not None and "certificate is not trusted" in s.degraded
            with pytest.raises(VaultUnavailable, match="certificate is not trusted"):
                await s.request("GET", "auth/token/lookup-self")
        finally:
            await s.close()

    asyncio.run(main())


@pytest.mark.parametrize(("content", "expected"), [
    (None, "cannot read vault.ca_file"),
    (b"not a certificate\n", "holds no usable PEM certificate"),
])
def test_missing_or_broken_ca_file_is_refused_up_front(tls_bao: OpenBao, token_file: str, creds_dir: str,
                                                       content: bytes | None, expected: str) -> None:
    path = os.path.join(creds_dir, "ca.pem")
    if content is not None:
        with open(path, "wb") as f:
            f.write(content)
    with pytest.raises(VaultError, match=expected):
        VaultSession(settings(tls_bao, token_file, path))


def daemon_config(d: str, bao: OpenBao, token_file: str, ca_file: str, kv_path: str) -> tuple[str, str, str]:
    cfg = os.path.join(d, "broker.toml")
    tools = [{"name": "crm", "secret": {"kind": "kv", "path": kv_path, "field": "api_key"}}]
    with open(cfg, "w") as f:
        f.write(config_text(d, [WorkflowSpec("w", callers=[{"uid": os.geteuid()}], tools=tools)])
                + f'\n[vault]\naddress = "{bao.address}"\nca_file = "{ca_file}"\n'
                  f'jwks_path = "broker/jwks-{secrets.token_hex(4)}"\n'
                  f'[vault.auth]\nmethod = "token"\ntoken_file = "{token_file}"\n')
    return cfg, os.path.join(d, "broker.sock"), os.path.join(d, "audit.jsonl")


def test_daemon_serves_secrets_from_vault_over_tls(short_tmp: str, tls_bao: OpenBao, tls_admin: hvac.Client,
                                                   token_file: str) -> None:
    value = secrets.token_urlsafe(24)
    path = f"crm/{secrets.token_hex(4)}"
    tls_admin.secrets.kv.v2.create_or_update_secret(path=path, secret={"api_key": value})
    assert tls_bao.ca_file is not None
    cfg = daemon_config(short_tmp, tls_bao, token_file, tls_bao.ca_file, f"secret/{path}")
    with running_daemon(*cfg) as d, Client(d.socket, workflow="w") as c:
        assert c.secret("crm").data["api_key"] == value


def test_daemon_refuses_to_start_without_its_ca_file(short_tmp: str, tls_bao: OpenBao, token_file: str) -> None:
    missing = os.path.join(short_tmp, "no-such-ca.pem")
    cfg, _, _ = daemon_config(short_tmp, tls_bao, token_file, missing, "secret/crm/x")
    r = subprocess.run([sys.executable, "-m", "broker", "serve", "--config", cfg], capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode != 0
    assert f"cannot read vault.ca_file {missing}" in r.stderr
