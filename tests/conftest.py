from __future__ import annotations

import os
import pwd
import sys
import tempfile
from collections.abc import Iterator

import pytest

from broker import testing
from broker.testing import DaemonProcess, WorkflowSpec, config_text, running_daemon

ME = {"uid": os.geteuid()}
EXE = os.path.realpath(sys.executable)


def default_workflows() -> list[WorkflowSpec]:
    return [
        WorkflowSpec("support-summarize", callers=[{"uid": os.geteuid(), "exe": EXE}], tools=[
            {"name": "read_ticket", "actions": ["ticket:read"],
             "destinations": ["https://crm.internal/api/tickets/*"], "ttl": "2m"},
            {"name": "send_email", "actions": ["email:send"], "ttl": "1m"},
        ]),
        # Matches nobody here: a uid no test process runs as.
        WorkflowSpec("billing", tenant="globex", callers=[{"uid": 4000000}], tools=[{"name": "charge"}]),
    ]


@pytest.fixture
def throwaway_user() -> Iterator[pwd.struct_passwd]:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a throwaway user (useradd)")
    with testing.throwaway_user() as user:
        yield user


@pytest.fixture
def short_tmp() -> Iterator[str]:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer than that.
    with tempfile.TemporaryDirectory(prefix="brk-") as d:
        yield d


@pytest.fixture
def daemon(short_tmp: str) -> Iterator[DaemonProcess]:
    path = os.path.join(short_tmp, "broker.toml")
    with open(path, "w") as f:
        f.write(config_text(short_tmp, default_workflows()))
    with running_daemon(path, os.path.join(short_tmp, "broker.sock"),
                        os.path.join(short_tmp, "audit.jsonl")) as d:
        yield d
