"""The daemon with [vault], end to end against a real OpenBao: fleet-wide JWKS across two broker
processes, upstream secrets over the socket (get, watch, sidecar file), leases revoked at shutdown."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import hvac
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.client import Client
from broker.errors import PermissionDenied, RequestRejected, UpstreamUnavailable
from broker.testing import DaemonProcess, OpenBao, WorkflowSpec, config_text, running_daemon
from broker.testing import scrape_metrics as scrape
from tests.test_metrics import exposed_name, readme_metrics
from tests.vault.conftest import Role, make_role

ME = {"uid": os.geteuid()}
CHILD = os.path.join(os.path.dirname(os.path.dirname(__file__)), "_agent_child.py")


def vault_section(bao: OpenBao, role_id_file: str, secret_id_file: str, instance: str, jwks_path: str) -> str:
    return (f'\n[vault]\naddress = "{bao.address}"\ninstance = "{instance}"\nkv_refresh = "1s"\n'
            f'jwks_path = "{jwks_path}"\n'
            f'[vault.auth]\nmethod = "approle"\nrole_id_file = "{role_id_file}"\n'
            f'secret_id_file = "{secret_id_file}"\n')


def start(d: str, bao: OpenBao, role: Role, instance: str, tools: list[dict[str, object]],
          jwks_path: str = "") -> tuple[str, str, str]:
    # Each test gets its own JWKS prefix: the OpenBao server is shared by the whole session.
    jwks_path = jwks_path or f"broker/jwks-{secrets.token_hex(4)}"
    os.makedirs(d, exist_ok=True)
    cfg = os.path.join(d, "broker.toml")
    with open(cfg, "w") as f:
        f.write(config_text(d, [WorkflowSpec("w", callers=[ME], tools=tools)])
                + vault_section(bao, role.role_id_file, role.secret_id_file, instance, jwks_path))
    return cfg, os.path.join(d, "broker.sock"), os.path.join(d, "audit.jsonl")


@pytest.fixture
def kv_value(admin: hvac.Client) -> Iterator[tuple[str, str]]:
    path = f"crm/{secrets.token_hex(4)}"
    value = secrets.token_urlsafe(24)
    admin.secrets.kv.v2.create_or_update_secret(path=path, secret={"api_key": value})
    yield f"secret/{path}", value


def test_fleet_jwks_across_two_daemons(short_tmp: str, bao: OpenBao, admin: hvac.Client, creds_dir: str,
                                       broker_policy: str) -> None:
    tools = [{"name": "t"}]
    prefix = f"broker/jwks-{secrets.token_hex(4)}"
    a = start(os.path.join(short_tmp, "a"), bao, make_role(admin, creds_dir, policies=[broker_policy]), "host-a",
              tools, prefix)
    b = start(os.path.join(short_tmp, "b"), bao, make_role(admin, creds_dir, policies=[broker_policy]), "host-b",
              tools, prefix)
    with running_daemon(*a) as da, running_daemon(*b) as db, Client(da.socket) as ca, Client(db.socket) as cb:
        token = ca.mint("w", "t").token
        # Minted on host a, verified by host b: b read a's published keys from Vault.
        assert cb.verify(token, "t")["wf"] == "w"
        kids_b = {k["kid"] for k in json.loads(cb.jwks())["keys"]}
        kids_a = {k["kid"] for k in json.loads(ca.jwks())["keys"]}
        assert len(kids_b) == 4 and kids_a <= kids_b  # b serves its own two keys and a's two
        listing = admin.secrets.kv.v2.list_secrets(path=prefix)["data"]["keys"]
        assert {"host-a", "host-b"} <= set(listing)
        status = json.loads(subprocess.run([sys.executable, "-m", "broker", "status", "--json", "--socket",
                                            db.socket], capture_output=True, text=True, check=True).stdout)
        assert status["degraded"] == []
        text = subprocess.run([sys.executable, "-m", "broker", "status", "--socket", db.socket], capture_output=True,
                              text=True, check=True).stdout
        assert f"vault: {bao.address}, healthy" in text  # a healthy Vault is shown, not only a sick one


def test_secrets_get_watch_and_sidecar(short_tmp: str, bao: OpenBao, admin: hvac.Client, creds_dir: str,
                                       broker_policy: str, kv_value: tuple[str, str]) -> None:
    path, value = kv_value
    tools = [{"name": "crm", "secret": {"kind": "kv", "path": path, "field": "api_key"}}, {"name": "plain"}]
    cfg = start(short_tmp, bao, make_role(admin, creds_dir, policies=[broker_policy]), "solo", tools)
    with running_daemon(*cfg) as d, Client(d.socket, workflow="w") as c:
        s = c.secret("crm")
        assert s.kind == "kv" and s.data["api_key"] == value and s.version == 1
        assert value not in repr(s)  # a secret printed by accident shows field names only
        with pytest.raises(PermissionDenied):
            c.secret("export_all_customers")
        audit = open(d.audit_log).read()
        assert value not in audit and '"event":"secret"' in audit
        sidecar = subprocess.Popen([sys.executable, "-m", "broker", "exec", "--socket", d.socket, "--workflow", "w",
                                    "--tool", "crm", "--signal", "HUP", "--", sys.executable, CHILD, "", "-", "60",
                                    "0"], stdout=subprocess.PIPE, text=True)
        try:
            assert sidecar.stdout is not None
            start_event = json.loads(sidecar.stdout.readline())
            secret_file = os.path.join(start_event["dir"], "crm.secret.json")
            with open(secret_file) as f:
                assert json.load(f)["data"]["api_key"] == value
            stream = c.watch_secret("crm")
            assert next(stream).version == 1
            new_value = secrets.token_urlsafe(24)
            admin.secrets.kv.v2.create_or_update_secret(path=path.removeprefix("secret/"),
                                                        secret={"api_key": new_value})
            rotated = next(stream)  # pushed by the daemon's KV poll (kv_refresh = 1s)
            assert rotated.version == 2 and rotated.data["api_key"] == new_value
            hup = json.loads(sidecar.stdout.readline())  # the sidecar swapped the file, then signalled
            assert hup["event"] == "hup" and hup["generation"] >= 2
            with open(secret_file) as f:
                assert json.load(f)["data"]["api_key"] == new_value
        finally:
            sidecar.send_signal(signal.SIGTERM)
            sidecar.wait(30)


def test_leases_are_revoked_at_shutdown(short_tmp: str, bao: OpenBao, admin: hvac.Client, creds_dir: str,
                                        broker_policy: str) -> None:
    tools = [{"name": "child", "secret": {"kind": "token", "policies": ["crm-read"], "ttl": "10m"}}]
    # A child token may only carry policies its parent holds.
    cfg = start(short_tmp, bao, make_role(admin, creds_dir, policies=[broker_policy, "crm-read"]), "lease", tools)
    metrics_sock = os.path.join(short_tmp, "metrics.sock")
    with open(cfg[0], "a") as f:
        f.write(f'\n[metrics]\nlisten = "unix:{metrics_sock}"\n')
    with running_daemon(*cfg) as d:
        with Client(d.socket, workflow="w") as c:
            s = c.secret("child")
        fams = {f.name: f for f in text_string_to_metric_families(scrape(metrics_sock))}
        assert fams["broker_vault_leases"].samples[0].value == 1
        assert fams["broker_vault_degraded"].samples[0].value == 0
        assert any(x.name.endswith("_count") and x.labels["outcome"] == "ok" and x.value > 0
                   for x in fams["broker_vault_request_duration_seconds"].samples)
        assert s.data["token"] not in scrape(metrics_sock)
        # With [vault], the daemon exposes every metric README.md lists (tests/test_metrics.py: without).
        assert {exposed_name(f.name, f.type) for f in fams.values()} == set(readme_metrics())
        child_token = s.data["token"]
        looked = hvac.Client(url=bao.address, token=bao.token).auth.token.lookup(child_token)["data"]
        assert "crm-read" in looked["policies"] and 0 < looked["ttl"] <= 600
        assert d.stop() == 0
    with pytest.raises(hvac.exceptions.Forbidden):
        hvac.Client(url=bao.address, token=bao.token).auth.token.lookup(child_token)


def test_minting_survives_vault_going_away(short_tmp: str, bao: OpenBao, admin: hvac.Client, creds_dir: str,
                                           broker_policy: str) -> None:
    tools = [{"name": "t"}]
    d_dir = os.path.join(short_tmp, "d")
    cfg = start(d_dir, bao, make_role(admin, creds_dir, policies=[broker_policy]), "outage", tools)
    # Point the daemon at a Vault address where nothing listens: it must start and mint regardless.
    with open(cfg[0]) as f:
        text = f.read()
    with open(cfg[0], "w") as f:
        f.write(text.replace(bao.address, "http://127.0.0.1:1"))
    with running_daemon(*cfg) as d, Client(d.socket) as c:
        deadline = time.monotonic() + 3
        n = 0
        while time.monotonic() < deadline:
            assert c.mint("w", "t").token
            n += 1
        assert n > 10
        st = json.loads(subprocess.run([sys.executable, "-m", "broker", "status", "--json", "--socket", d.socket],
                                       capture_output=True, text=True, check=True).stdout)
        assert st["degraded"], st


def test_each_run_gets_its_own_lease_revoked_when_it_ends(short_tmp: str, bao: OpenBao, admin: hvac.Client,
                                                          creds_dir: str, broker_policy: str) -> None:
    tools = [{"name": "child", "secret": {"kind": "token", "policies": ["crm-read"], "ttl": "10m"}}]
    cfg = start(short_tmp, bao, make_role(admin, creds_dir, policies=[broker_policy, "crm-read"]), "runs", tools)
    root = hvac.Client(url=bao.address, token=bao.token)

    def run() -> tuple[subprocess.Popen[str], str]:
        p = subprocess.Popen([sys.executable, "-m", "broker", "exec", "--socket", cfg[1], "--workflow", "w", "--",
                              sys.executable, CHILD, "", "-", "60", "0"], stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None
        start_event = json.loads(p.stdout.readline())
        with open(os.path.join(start_event["dir"], "child.secret.json")) as f:
            return p, json.load(f)["data"]["token"]

    with running_daemon(*cfg):
        a, token_a = run()
        b, token_b = run()
        try:
            assert token_a != token_b  # one credential per run, not one shared by every run
            assert root.auth.token.lookup(token_a)["data"]["policies"] == ["crm-read", "default"]
            a.send_signal(signal.SIGTERM)
            assert a.wait(30) == 0
            deadline = time.monotonic() + 15
            while True:  # the daemon revokes run a's lease when its stream ends
                try:
                    root.auth.token.lookup(token_a)
                except hvac.exceptions.Forbidden:
                    break
                assert time.monotonic() < deadline, "run a's child token was not revoked"
                time.sleep(0.2)
            assert root.auth.token.lookup(token_b)["data"]["id"] == token_b  # run b is untouched
        finally:
            for p in (a, b):
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                    p.wait(30)


def test_reload_removing_a_secret_revokes_it_and_narrowed_callers_lose_their_stream(
        short_tmp: str, bao: OpenBao, admin: hvac.Client, creds_dir: str, broker_policy: str,
        kv_value: tuple[str, str]) -> None:
    path, value = kv_value
    crm = {"name": "crm", "secret": {"kind": "kv", "path": path, "field": "api_key"}}
    mirror = {"name": "mirror", "secret": {"kind": "kv", "path": path, "field": "api_key"}}
    child = {"name": "child", "secret": {"kind": "token", "policies": ["crm-read"], "ttl": "10m"}}
    role = make_role(admin, creds_dir, policies=[broker_policy, "crm-read"])
    cfg = start(short_tmp, bao, role, "reload", [crm, mirror, child])
    vault_part = open(cfg[0]).read().split("\n[vault]", 1)[1]

    def rewrite(callers: list[dict[str, object]], tools: list[dict[str, object]]) -> None:
        with open(cfg[0], "w") as f:
            f.write(config_text(short_tmp, [WorkflowSpec("w", callers=callers, tools=tools)])
                    + "\n[vault]" + vault_part)

    def reload(d: DaemonProcess, count: int) -> None:
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while d.log().count("reloaded config") < count:
            assert "reload refused" not in d.log(), d.log()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)

    root = hvac.Client(url=bao.address, token=bao.token)
    with running_daemon(*cfg) as d, Client(d.socket, workflow="w") as c:
        child_token = c.secret("child").data["token"]
        assert root.auth.token.lookup(child_token)["data"]["ttl"] > 0
        assert c.secret("mirror").data["api_key"] == value
        # 1. The tool with the secret goes away, and another tool loses just its secret: the reload is
        #    applied, the child token is revoked, and the tool without a secret serves none.
        rewrite([ME], [crm, {"name": "mirror"}])
        reload(d, 1)
        with pytest.raises(hvac.exceptions.Forbidden):
            root.auth.token.lookup(child_token)
        with pytest.raises(RequestRejected, match="has no secret"):
            c.secret("mirror")
        # 2. The caller block no longer admits us: the secret stream we hold ends at the next rotation,
        #    instead of delivering it.
        stream = c.watch_secret("crm")
        assert next(stream).data["api_key"] == value
        rewrite([{"uid": 4000000}], [crm, {"name": "mirror"}])
        reload(d, 2)
        admin.secrets.kv.v2.create_or_update_secret(path=path.removeprefix("secret/"), secret={"api_key": "new"})
        with pytest.raises(PermissionDenied):
            next(stream)


def test_a_restarted_broker_keeps_its_earlier_tokens_valid(short_tmp: str, bao: OpenBao, admin: hvac.Client,
                                                            creds_dir: str, broker_policy: str) -> None:
    prefix = f"broker/jwks-{secrets.token_hex(4)}"
    cfg = start(os.path.join(short_tmp, "a"), bao, make_role(admin, creds_dir, policies=[broker_policy]),
                "restarting", [{"name": "t"}], prefix)
    sibling = start(os.path.join(short_tmp, "b"), bao, make_role(admin, creds_dir, policies=[broker_policy]),
                    "sibling", [{"name": "t"}], prefix)
    with running_daemon(*sibling) as s, Client(s.socket) as cs:
        with running_daemon(*cfg) as d, Client(d.socket) as c:
            token = c.mint("w", "t").token
        # Same instance name, new process, new keys: the previous run's public keys stay in its fleet
        # entry (until that entry's not_after), so what it minted still verifies, here and elsewhere.
        with running_daemon(*cfg) as d, Client(d.socket) as c:
            assert c.verify(token, "t")["wf"] == "w"
            fresh = c.mint("w", "t").token
            # The sibling has not had a heartbeat since the restart: the unknown kid makes it look now.
            assert cs.verify(fresh, "t")["wf"] == "w"
            assert cs.verify(token, "t")["wf"] == "w"


def test_a_secret_vault_cannot_serve_is_told_apart_from_an_unreachable_daemon(
        short_tmp: str, bao: OpenBao, admin: hvac.Client, creds_dir: str, broker_policy: str,
        kv_value: tuple[str, str]) -> None:
    # The daemon is up and Vault is not: the client must say so (and not retry the daemon's answer),
    # and `broker exec` must say what it waits for, instead of "the daemon is unreachable".
    path, _ = kv_value
    tools = [{"name": "crm", "secret": {"kind": "kv", "path": path, "field": "api_key"}}]
    cfg = start(os.path.join(short_tmp, "d"), bao, make_role(admin, creds_dir, policies=[broker_policy]), "novault",
                tools)
    with open(cfg[0]) as f:
        text = f.read()
    with open(cfg[0], "w") as f:
        f.write(text.replace(bao.address, "http://127.0.0.1:1"))
    with running_daemon(*cfg) as d:
        with Client(d.socket) as c, pytest.raises(UpstreamUnavailable) as exc:
            c.secret("crm", workflow="w")
        assert str(exc.value).startswith("secret for w/crm unavailable: Vault cannot be reached")
        assert exc.value.request_id
        assert str(exc.value).endswith(f"(request {exc.value.request_id})")
        # One GetSecret reached the daemon: its answer was not retried.
        assert d.log().count("secret unavailable workflow=w tool=crm") == 1
        r = subprocess.run([sys.executable, "-m", "broker", "exec", "--socket", d.socket, "--workflow", "w",
                            "--wait-timeout", "1s", "--", "true"], capture_output=True, text=True, timeout=60)
        assert r.returncode != 0
        assert "waiting for an upstream credential" in r.stderr and "waiting for the broker daemon" not in r.stderr
        assert "is unreachable" not in r.stderr and "Vault cannot be reached" in r.stderr, r.stderr
