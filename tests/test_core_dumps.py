"""The daemon's memory (signing keys, live tokens) never reaches a core file or a same-uid reader.

Checked on a real daemon from the outside: its core limit in /proc/<pid>/limits, and its dumpable flag
through what the kernel lets a same-uid process without CAP_SYS_PTRACE read.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from broker.testing import config_text, wait_serving
from tests.conftest import default_workflows

# The flag is not shown in /proc; what it changes is: ptrace_may_access() lets a same-uid process read
# /proc/<pid>/environ only while the target is dumpable, unless the reader holds capabilities. So the
# daemon and the reader run as root with no capability at all (verified on 6.x: a root reader that only
# lacks CAP_SYS_PTRACE can still read a non-dumpable root process's environ).
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("prlimit"),
                                reason="needs root, setpriv and prlimit to run daemon and reader without capabilities")
NO_CAPS = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]
# Started with core files allowed, as under a shell with `ulimit -c unlimited`: the daemon must lower it.
CORES_ON = ["prlimit", "--core=unlimited:unlimited"]


@pytest.fixture
def daemon_pid(short_tmp: str) -> Iterator[int]:
    config = os.path.join(short_tmp, "broker.toml")
    with open(config, "w") as f:
        f.write(config_text(short_tmp, default_workflows()))
    sock = os.path.join(short_tmp, "broker.sock")
    with open(os.path.join(short_tmp, "daemon.log"), "wb") as log:
        proc = subprocess.Popen([*CORES_ON, *NO_CAPS, sys.executable, "-m", "broker", "serve", "--config", config],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_serving(sock, proc=proc)
        yield proc.pid  # prlimit and setpriv exec in place: same pid
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)


def _core_limit(pid: int) -> tuple[str, str]:
    with open(f"/proc/{pid}/limits") as f:
        line = next(x for x in f if x.startswith("Max core file size"))
    soft, hard = line.split()[4:6]
    return soft, hard


def test_daemon_writes_no_core_and_is_not_dumpable(daemon_pid: int) -> None:
    assert _core_limit(daemon_pid) == ("0", "unlimited")  # the hard limit stays the operator's
    # A same-uid process without capabilities reads the environ of a dumpable twin of the daemon...
    # It says so once it runs Python, i.e. after prlimit and setpriv (which keep their capabilities) exec'd it.
    with subprocess.Popen([*CORES_ON, *NO_CAPS, sys.executable, "-c", "print(flush=True); input()"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE) as twin:
        assert twin.stdout is not None and twin.stdin is not None
        twin.stdout.readline()
        readable = subprocess.run([*NO_CAPS, "cat", f"/proc/{twin.pid}/environ"], capture_output=True)
        twin.stdin.close()
        assert readable.returncode == 0, readable.stderr
    # ... and is refused the daemon's.
    refused = subprocess.run([*NO_CAPS, "cat", f"/proc/{daemon_pid}/environ"], capture_output=True, text=True)
    assert refused.returncode != 0 and "Permission denied" in refused.stderr
