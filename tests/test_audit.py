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
    log.record("deny", exe=forged, decision="deny", reason="forged")
    log.record("deny", exe=undecodable, decision="deny", reason="undecodable")
    log.record("mint", exe="/opt/агент/bin/ü", decision="allow", when=os)  # not JSON: written as str()
    log.close()
    raw = open(path, "rb").read()
    lines = [json.loads(x) for x in raw.splitlines()]
    assert len(lines) == 3
    assert lines[0]["exe"] == forged
    assert os.fsencode(lines[1]["exe"]) == b"/tmp/\xff\xfeagent"  # recoverable byte for byte
    assert lines[2]["exe"] == "/opt/агент/bin/ü" and lines[2]["when"] == str(os)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def lines_of(path: str) -> list[dict[str, object]]:
    return [json.loads(x) for x in open(path).read().splitlines()]


def test_repeated_denials_are_aggregated_per_uid_and_reason(tmp_path: object) -> None:
    # Issue 12: a flood of denials wrote 1.8 MiB/s. The first of each kind stays, the rest are counted.
    path = os.path.join(str(tmp_path), "audit.jsonl")
    clock = Clock(100.0)
    log = AuditLog(path, clock=clock)
    for i in range(1000):
        clock.now = 100.0 + i / 2000
        log.record("deny", uid=1000, workflow="w", decision="deny", reason="tool not granted")
    log.record("deny", uid=1000, workflow="x", decision="deny", reason="unknown workflow")
    for _ in range(5):
        log.record("deny", uid=2000, workflow="w", decision="deny", reason="tool not granted")
    for _ in range(3):
        log.record("mint", uid=1000, workflow="w", decision="allow", reason="policy")  # never aggregated
    assert len(lines_of(path)) == 3 + 3
    clock.now = 101.0
    log.flush()
    lines = lines_of(path)
    assert [(x["event"], x["uid"], x["reason"]) for x in lines[:3]] == [
        ("deny", 1000, "tool not granted"), ("deny", 1000, "unknown workflow"), ("deny", 2000, "tool not granted")]
    summaries = [x for x in lines if x["event"] == "suppressed"]
    assert [(x["uid"], x["denied_event"], x["reason"], x["count"], x["summary"]) for x in summaries] == [
        (1000, "deny", "tool not granted", 999, "999 more in the last 1 s"),
        (2000, "deny", "tool not granted", 4, "4 more in the last 1 s")]
    assert summaries[0]["first"] == round(100.0 + 1 / 2000, 3) and summaries[0]["last"] == round(100.0 + 999 / 2000, 3)
    # A new window: the first of each kind is written in full again.
    log.record("deny", uid=1000, workflow="w", decision="deny", reason="tool not granted")
    assert lines_of(path)[-1]["event"] == "deny"
    log.close()


def test_budgets_bound_what_varied_reasons_and_many_uids_can_write(tmp_path: object) -> None:
    # Reasons can carry what the caller asked for (a workflow name): varying them must not buy lines.
    path = os.path.join(str(tmp_path), "audit.jsonl")
    clock = Clock(0.0)
    log = AuditLog(path, clock=clock, kinds_per_uid=3, lines=5)
    for i in range(50):
        log.record("deny", uid=7, decision="deny", reason=f"unknown workflow 'w{i}'")
    for uid in range(100, 110):
        log.record("deny", uid=uid, decision="deny", reason="tool not granted")
    clock.now = 1.0
    log.flush()
    lines = lines_of(path)
    full = [x for x in lines if x["event"] == "deny"]
    assert [x["uid"] for x in full] == [7, 7, 7, 100, 101]  # three kinds for uid 7, five lines in all
    summaries = {(x["uid"], x["reason"]): x["count"] for x in lines if x["event"] == "suppressed"}
    # Counted per uid while the table has room (twice the line budget), then for everyone together.
    assert summaries == {(7, "other reasons"): 47, (102, "other reasons"): 1, (103, "other reasons"): 1,
                         (104, "other reasons"): 1, (105, "other reasons"): 1, (None, "other reasons"): 4}
    assert sum(summaries.values()) + len(full) == 60  # every denial is accounted for


def test_a_sustained_flood_writes_within_the_budget(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "audit.jsonl")
    clock = Clock(0.0)
    log = AuditLog(path, clock=clock)
    for i in range(60_000):  # 10,000 denials a second for six seconds, from one uid, reasons varied
        clock.now = i / 10_000
        log.record("deny", uid=7, pid=1234, exe="/usr/bin/python3", workflow=f"w{i % 500}", tool="t",
                   decision="deny", reason=f"unknown workflow 'w{i % 500}'")
    log.close()
    lines = lines_of(path)
    # Per window and uid at most: DENIAL_KINDS_PER_UID full lines, a summary for each of their kinds
    # (each reason comes back 20 times a second here), and one for all other reasons.
    assert len(lines) == 6 * (10 + 10 + 1)
    assert os.path.getsize(path) < 6 * 8192  # under 8 KiB/s, where every denial took a line before
    assert sum(int(str(x["count"])) for x in lines if x["event"] == "suppressed") == 60_000 - 60


def test_close_reports_what_was_suppressed(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "audit.jsonl")
    log = AuditLog(path, clock=lambda: 5.0)
    for _ in range(3):
        log.record("verify", decision="deny", reason="bad signature")
    log.close()
    assert [(x["event"], x.get("count")) for x in lines_of(path)] == [("verify", None), ("suppressed", 2)]
