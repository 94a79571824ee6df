"""Run one broker call as another uid (used by test_second_uid.py; started as root).

The interpreter lives where only root can read it, so this script imports everything first, then drops
to the target uid/gid for real (setgroups, setgid, setuid) before it opens any connection. The kernel
records the connecting process's credentials at connect(2), so the daemon sees the second uid.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import sys

import grpc  # noqa: F401 - imported before dropping privileges

from broker.client import Client
from broker.errors import BrokerError, PermissionDenied


def main() -> int:
    uid, gid, action, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
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
    if action == "connect":
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            result["connected"] = True
        except OSError as exc:
            result["connected"] = False
            result["errno"] = exc.errno
    else:
        workflow, tool = sys.argv[5], sys.argv[6]
        try:
            with Client(path) as c:
                result["token"] = bool(c.mint(workflow, tool).token)
        except PermissionDenied:
            result["code"] = "PERMISSION_DENIED"
        except BrokerError as exc:
            result["error"] = str(exc)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
