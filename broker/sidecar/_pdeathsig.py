"""Exec wrapper for ``broker exec``'s child: die with the sidecar, then become the agent.

``python -P -m broker.sidecar._pdeathsig PARENT_PID CORE_LIMIT COMMAND [ARGS...]`` asks the kernel to
SIGKILL this process when its parent dies (PR_SET_PDEATHSIG survives execve), closes the race where the
parent died before the request, restores the core-file limit the sidecar gave up and the signal
dispositions Python changed, and execs the command in place: same pid, so the sidecar's signals reach
the agent.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    parent, core_limit, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        sys.exit(f"broker exec: prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ctypes.get_errno())}")
    if os.getppid() != parent:  # the sidecar died before the line above took effect
        sys.exit(125)
    # Python starts with SIGPIPE and SIGXFSZ ignored, and ignored signals survive execve: the agent
    # gets the defaults a shell would give it (`yes | head` must end quietly).
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_CORE, (core_limit, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    try:
        os.execvp(argv[0], argv)  # noqa: S606 - running the operator's command is the point
    except OSError as exc:
        sys.stderr.write(f"broker exec: cannot run {argv[0]!r}: {exc.strerror}\n")
        sys.exit(127)


if __name__ == "__main__":
    main()
