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
