"""Keep the daemon's memory out of core files and away from same-uid debuggers.

The daemon holds the signing keys and recently minted tokens in ordinary Python objects (``cryptography``
key handles, ``bytes``), whose memory cannot be isolated: ``MADV_DONTDUMP`` needs page-aligned buffers
we own, and OpenSSL and the interpreter copy key material wherever they like. So the whole process is
excluded instead:

* ``RLIMIT_CORE`` soft limit 0: a crash (or the watchdog's SIGABRT) writes no core file;
* ``PR_SET_DUMPABLE`` 0: no core even through a ``core_pattern`` pipe (systemd-coredump ignores the
  limit), and ``/proc/<pid>/mem``, ``environ`` and ``ptrace`` are refused to same-uid processes that
  lack ``CAP_SYS_PTRACE``.

The hard limit is left alone, so a child could raise its soft limit again; the daemon starts none.
"""

from __future__ import annotations

import ctypes
import os
import resource
from typing import Final

from broker.errors import BrokerError

PR_SET_DUMPABLE: Final = 4
PR_GET_DUMPABLE: Final = 3


def forbid_core_dumps() -> None:
    """Set this process's core limit to 0 and make it non-dumpable; raise if the kernel refuses."""
    _, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    libc = ctypes.CDLL(None, use_errno=True)
    # Fail closed: a daemon that could dump its keys must not start.
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise BrokerError(f"prctl(PR_SET_DUMPABLE, 0) failed: {os.strerror(ctypes.get_errno())}")
    if libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise BrokerError("the process is still dumpable after prctl(PR_SET_DUMPABLE, 0)")
