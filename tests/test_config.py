"""Config validation: valid files parse into frozen records; every bad input names its key path."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys

import pytest

from broker import config
from broker.errors import ConfigError

GOOD = b"""
[broker]
trust_domain = "example.org"
socket = "/run/broker/broker.sock"
audit_log = "/var/log/broker/audit.jsonl"
token_ttl = "5m"
algorithm = "ES256"

[[workflow]]
name = "support-summarize"
tenant = "acme"
  [[workflow.caller]]
  uid = 1001
  exe = "/usr/bin/python3.11"
  [[workflow.tool]]
  name = "read_ticket"
  actions = ["ticket:read"]
  destinations = ["https://crm.internal/api/tickets/*"]
  ttl = "2m"
"""


def problems(data: bytes) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        config.parse(data)
    return [str(p) for p in exc.value.problems]


def test_issue_example_parses_into_frozen_records() -> None:
    cfg = config.parse(GOOD)
    assert cfg.broker.trust_domain == "example.org"
    assert cfg.broker.token_ttl == 300
    assert cfg.broker.rotate_every == 3600
    wf = cfg.workflows["support-summarize"]
    assert wf.tenant == "acme"
    assert wf.callers[0].uid == 1001 and wf.callers[0].exe == "/usr/bin/python3.11"
    tool = wf.tools["read_ticket"]
    assert (tool.actions, tool.destinations, tool.ttl) == (("ticket:read",), ("https://crm.internal/api/tickets/*",),
                                                           120)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.broker.token_ttl = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        wf.tools["x"] = tool  # type: ignore[index]
    assert len(cfg.sha256) == 64


def test_tool_ttl_defaults_to_broker_ttl() -> None:
    cfg = config.parse(GOOD.replace(b'  ttl = "2m"\n', b""))
    assert cfg.workflows["support-summarize"].tools["read_ticket"].ttl == 300


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("5m", 300), ("1h", 3600), ("1h30m", 5400),
                                               ("2h0m5s", 7205)])
def test_durations(text: str, seconds: int) -> None:
    assert config.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0s", "5", "5x", "-5s", "1.5h", "5m1h", " 5m", "5 m", "1d"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        config.parse_duration(text)


@pytest.mark.parametrize(("patch", "expected"), [
    ((b'token_ttl = "5m"', b'token_ttl = "5 minutes"'), "broker.token_ttl: invalid duration"),
    ((b'token_ttl = "5m"', b"token_ttl = 300"), "broker.token_ttl: expected a duration string such as \"90s\", \"2m\""),
    ((b'algorithm = "ES256"', b'algorithm = "none"'), "broker.algorithm: must be one of ES256, EdDSA"),
    ((b'algorithm = "ES256"', b'algorithm = "HS256"'), "broker.algorithm: must be one of"),
    ((b'trust_domain = "example.org"', b'trust_domain = "Example Org"'), "broker.trust_domain: invalid trust"),
    ((b'socket = "/run/broker/broker.sock"', b'socket = "relative.sock"'), "broker.socket: must be an absolute"),
    ((b"uid = 1001", b'uid = "1001"'), "workflow[0].caller[0].uid: expected int, got string"),
    ((b"uid = 1001", b"uid = true"), "workflow[0].caller[0].uid: expected int, got boolean"),
    ((b"uid = 1001", b"uid = -1"), "workflow[0].caller[0].uid: must be between"),
    ((b"uid = 1001", b"uidd = 1001"), "workflow[0].caller[0].uidd: unknown key"),
    ((b'exe = "/usr/bin/python3.11"', b'exe = "python3"'), "workflow[0].caller[0].exe: must be an absolute"),
    ((b'ttl = "2m"', b'ttl = "10m"'), "workflow[0].tool[0].ttl: a tool may lower broker.token_ttl"),
    ((b'ttl = "2m"', b'ttl = "forever"'), "workflow[0].tool[0].ttl: invalid duration"),
    ((b'actions = ["ticket:read"]', b'actions = "ticket:read"'), "workflow[0].tool[0].actions: expected list"),
    ((b'actions = ["ticket:read"]', b"actions = [1]"), "workflow[0].tool[0].actions[0]: expected a non-empty"),
    ((b'name = "read_ticket"', b'name = "Read Ticket"'), "workflow[0].tool[0].name: invalid tool name"),
    ((b'name = "support-summarize"', b'name = "../etc"'), "workflow[0].name: invalid workflow name"),
    ((b'tenant = "acme"', b""), "workflow[0].tenant: required key is missing"),
    ((b'[broker]', b"[brokr]"), "brokr: unknown key"),
])
def test_each_problem_names_its_key_path(patch: tuple[bytes, bytes], expected: str) -> None:
    data = GOOD.replace(*patch)
    assert data != GOOD
    assert any(p.startswith(expected) for p in problems(data)), problems(data)


def test_all_problems_reported_at_once() -> None:
    data = GOOD.replace(b'token_ttl = "5m"', b'token_ttl = "x"').replace(b"uid = 1001", b'uid = "u"') \
        + b"bogus = 1\n"
    found = problems(data)
    assert len(found) >= 3


def test_duplicate_names() -> None:
    data = GOOD + GOOD[GOOD.index(b"[[workflow]]"):]
    assert any("workflow[1].name: duplicate workflow name 'support-summarize'" in p for p in problems(data))
    tool = b'[[workflow.tool]]\nname = "read_ticket"\n'
    assert any("workflow[0].tool[1].name: duplicate tool name" in p for p in problems(GOOD + tool))


def test_empty_caller_block_is_refused() -> None:
    data = GOOD + b'[[workflow]]\nname = "w2"\ntenant = "t"\n[[workflow.caller]]\n'
    assert any("workflow[1].caller[0]: a caller block needs at least one selector" in p for p in problems(data))


def test_workflow_without_caller_is_refused() -> None:
    data = GOOD + b'[[workflow]]\nname = "w2"\ntenant = "t"\n'
    assert any(p.startswith("workflow[1].caller: a workflow needs") for p in problems(data))


@pytest.mark.parametrize("data", [
    b"",  # no [broker]
    b"\xff\xfe\x00garbage",
    b"[broker\ntrust_domain=",
    b"broker = 5",
    b"[broker]\ntrust_domain = 'a'\nworkflow = 3\n",
    b"[broker]\ntrust_domain = 'a'\n" + b"x = " + b"[" * 5000 + b"]" * 5000 + b"\n",
    b"[broker]\ntrust_domain = 'a'\n" + b"#" * (config.MAX_CONFIG_BYTES + 1),
])
def test_hostile_files_fail_cleanly(data: bytes) -> None:
    assert problems(data)  # a ConfigError with at least one problem; nothing else escapes


DEEP = "keys or brackets nested more than 32 levels deep"


@pytest.mark.parametrize("data", [
    # tomllib's time grows with the square of a dotted key's depth: 100k levels took 17 s to reject.
    b"[" + b".".join([b"a"] * 100_000) + b"]\n",
    b"[broker]\n" + b".".join([b"a"] * 33) + b" = 1\n",
    b"[broker]\nx = " + b"[" * 33 + b"]" * 33 + b"\n",
    b"[broker]\nx = " + b"{a = " * 33 + b"1" + b"}" * 33 + b"\n",
])
def test_deep_nesting_is_refused_before_parsing(data: bytes) -> None:
    assert problems(data) == [f"<config>: {DEEP}"]


def test_depth_counts_only_what_toml_nests() -> None:
    # Dots and brackets in strings and comments are not nesting, and a key may be as deep as the limit.
    dots = ".".join(["a"] * 40)
    extra = f"""# {dots} [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[
x1 = "{dots} \\" [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[" # {dots}
x2 = '{dots}'
x3 = \"\"\"{dots}
[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[ \\\" \"\"\"
x4 = '''{dots}'''
x5{'.a' * 31} = [[[1.5, 2.5]]]
"""
    text = GOOD.replace(b"[broker]\n", b"[broker]\n" + extra.encode(), 1)
    assert problems(text) == [f"broker.x{i}: unknown key" for i in range(1, 6)]


def test_config_check_cli(tmp_path: object) -> None:
    import pathlib

    d = pathlib.Path(str(tmp_path))
    good, bad = d / "good.toml", d / "bad.toml"
    good.write_bytes(GOOD)
    bad.write_bytes(GOOD.replace(b"uid = 1001", b'uid = "x"').replace(b'ttl = "2m"', b'ttl = "9h"'))
    ok = subprocess.run([sys.executable, "-m", "broker", "config", "check", str(good)], capture_output=True,
                        text=True)
    assert ok.returncode == 0, ok.stderr
    assert "1 workflow, 1 tool," in ok.stdout
    no = subprocess.run([sys.executable, "-m", "broker", "config", "check", str(bad)], capture_output=True,
                        text=True)
    assert no.returncode == 1
    assert "workflow[0].caller[0].uid" in no.stderr and "workflow[0].tool[0].ttl" in no.stderr
    missing = subprocess.run([sys.executable, "-m", "broker", "config", "check", str(d / "nope.toml")],
                             capture_output=True, text=True)
    assert missing.returncode == 1 and "cannot read" in missing.stderr


VAULT = b"""
[vault]
address = "https://vault.internal:8200"
instance = "host-a"
kv_refresh = "30s"
  [vault.auth]
  method = "approle"
  role_id_file = "/etc/broker/role_id"
  secret_id_file = "/etc/broker/secret_id"
"""

SECRETS = b"""
[[workflow.tool]]
name = "crm_read"
secret = { kind = "kv", path = "secret/crm/readonly", field = "api_key" }
env = "CRM_TOKEN"
file = "crm.token"
[[workflow.tool]]
name = "db"
secret = { kind = "database", role = "ticket-reader" }
[[workflow.tool]]
name = "cert"
secret = { kind = "pki", role = "agents", common_name = "agent.example.org", ttl = "10m" }
[[workflow.tool]]
name = "child"
secret = { kind = "token", policies = ["crm-read"], ttl = "10m" }
"""


def test_vault_and_tool_secrets() -> None:
    cfg = config.parse(GOOD + SECRETS + VAULT)
    assert cfg.vault is not None
    assert cfg.vault.address == "https://vault.internal:8200" and cfg.vault.kv_refresh == 30
    assert cfg.vault.ca_file is None
    with_ca = config.parse(GOOD + VAULT.replace(b"kv_refresh", b'ca_file = "/etc/broker/vault-ca.pem"\nkv_refresh'))
    assert with_ca.vault is not None and with_ca.vault.ca_file == "/etc/broker/vault-ca.pem"
    assert cfg.vault.auth.method == "approle" and cfg.vault.auth.secret_id_file == "/etc/broker/secret_id"
    tools = cfg.workflows["support-summarize"].tools
    assert tools["crm_read"].secret == config.SecretSpec("kv", path="secret/crm/readonly", field="api_key")
    assert (tools["crm_read"].env, tools["crm_read"].file) == ("CRM_TOKEN", "crm.token")
    assert tools["db"].secret == config.SecretSpec("database", role="ticket-reader")
    assert tools["cert"].secret is not None and tools["cert"].secret.ttl == 600
    assert tools["child"].secret == config.SecretSpec("token", policies=("crm-read",), ttl=600)
    assert config.parse(GOOD).vault is None


@pytest.mark.parametrize(("extra", "expected"), [
    (SECRETS, "workflow[0].tool[1].secret: needs a [vault] table"),
    (VAULT.replace(b'method = "approle"', b'method = "userpass"'), "vault.auth.method: must be approle or token"),
    (VAULT.replace(b'  secret_id_file = "/etc/broker/secret_id"\n', b""), "vault.auth.secret_id_file: required"),
    (VAULT.replace(b'"https://vault.internal:8200"', b'"vault.internal"'), "vault.address: must be an http(s) URL"),
    (VAULT.replace(b'https://vault', b'https://admin:hunter2@vault'), "vault.address: must not contain credentials"),
    (VAULT.replace(b'instance = "host-a"', b'instance = "host-a\\n"'), "vault.instance: invalid"),
    (VAULT.replace(b'kv_refresh = "30s"', b'kv_refresh = "30s\\n"'), "vault.kv_refresh:"),
    (VAULT.replace(b'"/etc/broker/role_id"', b'"role_id"'), "vault.auth.role_id_file: must be an absolute path"),
    (VAULT.replace(b'kv_refresh', b'ca_file = "ca.pem"\nkv_refresh'), "vault.ca_file: must be an absolute path"),
    (VAULT.replace(b'https://', b'http://').replace(b'kv_refresh', b'ca_file = "/etc/ca.pem"\nkv_refresh'),
     "vault.ca_file: only applies to an https:// address"),
    (VAULT + b'[[workflow.tool]]\nname = "x"\nsecret = { kind = "ssh" }\n', ".secret.kind: must be one of"),
    (VAULT + b'[[workflow.tool]]\nname = "x"\nsecret = { kind = "kv" }\n', ".secret.path: required for kind 'kv'"),
    (VAULT + b'[[workflow.tool]]\nname = "x"\nsecret = { kind = "kv", path = "a/../b" }\n', ".secret.path: invalid"),
    (VAULT + b'[[workflow.tool]]\nname = "x"\nsecret = { kind = "kv", path = "a", role = "r" }\n',
     ".secret.role: unknown key"),
    (VAULT + b'[[workflow.tool]]\nname = "x"\nenv = "lower"\n', ".env: invalid environment variable name"),
    (VAULT + b'[[workflow.tool]]\nname = "x"\nfile = "../escape"\n', ".file: invalid file name"),
    (VAULT + b'[[workflow.tool]]\nname = "x"\nfile = ".hidden"\n', ".file: invalid file name"),
])
def test_vault_and_secret_problems(extra: bytes, expected: str) -> None:
    assert any(expected in p for p in problems(GOOD + extra)), problems(GOOD + extra)


def test_a_vault_address_with_credentials_is_never_quoted() -> None:
    # Without a scheme the address used to be refused as "not an http(s) URL", quoting the password.
    found = problems(GOOD + VAULT.replace(b'"https://vault.internal:8200"', b'"admin:hunter2@vault.internal"'))
    assert any("vault.address: must not contain credentials" in p for p in found), found
    assert not any("hunter2" in p for p in found), found


@pytest.mark.parametrize(("old", "new", "expected"), [
    (b'name = "support-summarize"', b'name = "support-summarize\\n"', "workflow[0].name"),
    (b'trust_domain = "example.org"', b'trust_domain = "example.org\\n"', "broker.trust_domain"),
    (b'token_ttl = "5m"', b'token_ttl = "5m\\n"', "broker.token_ttl"),
])
def test_a_trailing_newline_is_not_a_valid_name(old: bytes, new: bytes, expected: str) -> None:
    # "$" in a pattern matches before a final newline; the names go into SPIFFE IDs, paths and logs.
    assert old in GOOD
    assert any(expected in p for p in problems(GOOD.replace(old, new))), problems(GOOD.replace(old, new))


def test_a_secret_error_names_its_own_workflow_when_an_earlier_one_fails() -> None:
    # workflow[0] fails to parse; the secret without [vault] is in workflow[1] and must be named so.
    data = GOOD.replace(b'tenant = "acme"', b'tenant = "Bad Tenant"') \
        + b'[[workflow]]\nname = "w2"\ntenant = "t"\n[[workflow.caller]]\nuid = 1\n' \
        + b'[[workflow.tool]]\nname = "bad"\nttl = 5\n' \
        + b'[[workflow.tool]]\nname = "s"\nsecret = { kind = "kv", path = "a" }\n'
    found = problems(data)
    assert "workflow[1].tool[1].secret: needs a [vault] table to fetch it from" in found, found
    assert not any(p.startswith("workflow[0].tool") for p in found), found


def test_a_tool_ttl_given_as_a_number_says_a_duration_string_is_wanted() -> None:
    found = problems(GOOD.replace(b'ttl = "2m"', b"ttl = 120"))
    assert 'workflow[0].tool[0].ttl: expected a duration string such as "90s", "2m" or "1h30m", got integer' \
        in found, found


def test_host_warnings_name_missing_users_groups_and_executables() -> None:
    data = GOOD.replace(b'exe = "/usr/bin/python3.11"', b'exe = "/nonexistent/python"\n  user = "no-such-user-x"\n'
                                                        b'  group = "no-such-group-x"') \
        + b'[[workflow]]\nname = "w2"\ntenant = "t"\n[[workflow.caller]]\nuser = "root"\ngroup = "root"\n' \
        + b'exe = "' + os.path.realpath(sys.executable).encode() + b'"\n'
    warned = [str(w) for w in config.host_warnings(config.parse(data))]
    assert warned == ["workflow[0].caller[0].user: no user 'no-such-user-x' on this host",
                      "workflow[0].caller[0].group: no group 'no-such-group-x' on this host",
                      "workflow[0].caller[0].exe: /nonexistent/python is not an executable file on this host"]


def test_host_warnings_name_exe_rules_that_can_never_match(tmp_path: pathlib.Path) -> None:
    # The kernel reports the resolved binary: a symlink (a venv's python) or a script never matches.
    link, script = tmp_path / "python", tmp_path / "agent.sh"
    link.symlink_to(os.path.realpath(sys.executable))
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    data = GOOD.replace(b'exe = "/usr/bin/python3.11"', b'exe = "' + str(link).encode() + b'"') \
        + b'[[workflow]]\nname = "w2"\ntenant = "t"\n[[workflow.caller]]\nexe = "' + str(script).encode() + b'"\n'
    warned = [str(w) for w in config.host_warnings(config.parse(data))]
    assert warned == [
        f"workflow[0].caller[0].exe: {link} resolves to {os.path.realpath(sys.executable)}, the path the kernel "
        "reports: this rule never matches as written",
        f"workflow[1].caller[0].exe: {script} is a script: the kernel reports its interpreter as the exe (see "
        "`broker whoami`), so this rule never matches"]
