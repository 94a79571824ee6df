"""The README's main job, as a new user runs it: the demo must work end to end."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_runs_end_to_end() -> None:
    r = subprocess.run([sys.executable, "-u", os.path.join(ROOT, "examples", "demo.py")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "read_ticket -> HTTP 200" in out
    assert "send_email token at the ticket tool -> HTTP 403" in out and "wrong tool" in out
    assert "export_all_customers refused by the broker: permission denied: tool 'export_all_customers' is not " \
        "granted to workflow 'support-summarize' (request " in out
    assert "under broker exec, credentials generation 1): read_ticket -> HTTP 200" in out
    assert "demo: OK\n" in out
    assert "source .venv/bin/activate" in out and "Your own setup, as a normal user" in out
