from __future__ import annotations

import json
import os
import stat

import pytest

from broker.audit import AuditLog
from broker.errors import BrokerError


def test_lines_are_json_and_file_is_private(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "sub", "audit.jsonl")
    log = AuditLog(path, clock=lambda: 1234.5)
    log.record("mint", workflow="w", tool="t", jti="abc", decision="allow")
    log.record("deny", workflow="w", tool="x", decision="deny", reason="tool not granted")
    log.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    lines = [json.loads(x) for x in open(path).read().splitlines()]
    assert [x["event"] for x in lines] == ["mint", "deny"]
    assert lines[0]["time"] == 1234.5


def test_existing_file_mode_is_tightened(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "audit.jsonl")
    with open(path, "w"):
        pass
    os.chmod(path, 0o644)
    AuditLog(path, clock=lambda: 0.0).close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_symlink_at_audit_path_is_refused(tmp_path: object) -> None:
    target = os.path.join(str(tmp_path), "elsewhere")
    link = os.path.join(str(tmp_path), "audit.jsonl")
    os.symlink(target, link)
    with pytest.raises(BrokerError, match="cannot open audit log"):
        AuditLog(link, clock=lambda: 0.0)
    assert not os.path.exists(target)


def test_hostile_values_cannot_forge_or_break_lines(tmp_path: object) -> None:
    # A caller chooses its own executable path: newlines, quotes, non-UTF-8 bytes (which Python reads
    # as surrogate escapes) and non-ASCII must each stay inside one JSON string on one line.
    path = os.path.join(str(tmp_path), "audit.jsonl")
    log = AuditLog(path, clock=lambda: 1.0)
    forged = '/tmp/x\n{"event":"mint","decision":"allow"}'
    undecodable = os.fsdecode(b"/tmp/\xff\xfeagent")
    log.record("deny", exe=forged, decision="deny")
    log.record("deny", exe=undecodable, decision="deny")
    log.record("mint", exe="/opt/агент/bin/ü", decision="allow", when=os)  # not JSON: written as str()
    log.close()
    raw = open(path, "rb").read()
    lines = [json.loads(x) for x in raw.splitlines()]
    assert len(lines) == 3
    assert lines[0]["exe"] == forged
    assert os.fsencode(lines[1]["exe"]) == b"/tmp/\xff\xfeagent"  # recoverable byte for byte
    assert lines[2]["exe"] == "/opt/агент/bin/ü" and lines[2]["when"] == str(os)
