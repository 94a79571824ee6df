"""Run one broker call as another uid (used by test_second_uid.py; started as root).

The interpreter and the checkout may live where only root can read them, so this script imports
everything and builds its client first (a gRPC channel does not connect until the first call), then
drops to the target uid/gid for real (setgroups, setgid, setuid) before any connection is opened. The
kernel records the connecting process's credentials at connect(2), so the daemon sees the second uid.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import sys

import grpc._channel  # noqa: F401 - grpc imports it lazily; do it before dropping privileges

from broker.client import Client
from broker.errors import BrokerError, PermissionDenied


def main() -> int:
    uid, gid, action, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    client = Client(path, retries=0) if action.startswith(("mint", "revoke", "whoami", "status")) else None
    token = sys.stdin.readline().strip() if action == "revoke" else ""  # never in argv
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    assert os.getuid() == uid and os.geteuid() == uid
    result: dict[str, object] = {"uid": os.getuid()}
    if action == "mint-nondumpable":
        # On many kernels a non-dumpable process's /proc/<pid> shows root as owner: the daemon must not
        # take that at face value (nor fail to recognise the caller).
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.prctl(4, 0, 0, 0, 0) == 0  # PR_SET_DUMPABLE = 4
        assert libc.prctl(3, 0, 0, 0, 0) == 0  # PR_GET_DUMPABLE = 3
        action = "mint"
    if action == "revoke":
        assert client is not None
        with client:
            result["revoked"] = client.revoke([token])
    elif action == "status":
        assert client is not None
        try:
            with client:
                client.status()
            result["code"] = "OK"
        except PermissionDenied as exc:
            result["code"] = "PERMISSION_DENIED"
            result["message"] = str(exc)
    elif action == "whoami":
        assert client is not None
        with client:
            result["whoami"] = client.whoami()
    elif action == "connect":
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            result["connected"] = True
        except OSError as exc:
            result["connected"] = False
            result["errno"] = exc.errno
    else:
        workflow, tool = sys.argv[5], sys.argv[6]
        assert client is not None
        try:
            with client:
                result["token"] = bool(client.mint(workflow, tool).token)
        except PermissionDenied as exc:
            result["code"] = "PERMISSION_DENIED"
            result["message"] = str(exc)
        except BrokerError as exc:
            result["error"] = str(exc)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
