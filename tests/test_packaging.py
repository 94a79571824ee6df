"""The source distribution carries what a build from it needs: a wheel built from an sdist must not
quietly lose the native extensions (setup.py skips an extension whose .pyx is missing)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_sdist_holds_the_cython_sources_protos_units_and_tests(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path),
                        str(ROOT)], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    (sdist,) = tmp_path.glob("broker-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in ("native/tokens.pyx", "native/pump.pyx", "proto/broker/v1/broker.proto",
                   "systemd/broker.service", "tests/conftest.py", "tests/vectors", "setup.py"):
        assert any(n == needed or n.startswith(needed + "/") for n in names), needed
    assert not any(n.endswith((".so", ".pyc")) or "__pycache__" in n for n in names)
    assert os.path.basename(sdist).startswith("broker-")
