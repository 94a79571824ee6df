"""The load tool still runs end to end (a short run, no timing asserted): benchmarks must not rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_load_tool_measures_every_workload(tmp_path: object) -> None:
    out = os.path.join(str(tmp_path), "rows.json")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "load.py"), "--duration", "0.3",
                        "--concurrency", "2", "--json", out], capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out) as f:
        rows = {row["workload"]: row for row in json.load(f)}
    assert set(rows) == {"empty/direct", "empty/frontdoor", "mint/frontdoor", "openbao/token", "openbao/transit"}
    for name, row in rows.items():
        assert row["errors"] == 0, name
        assert row["requests"] > 0 and row["server_cpu_us"] > 0 and row["client_cpu_us"] > 0, name
        assert ("loop_cpu_us" in row) == (not name.startswith("openbao")), name
    assert "| clients | mint / empty" in r.stdout
    assert "token engine native" in r.stdout or "token engine pure" in r.stdout
