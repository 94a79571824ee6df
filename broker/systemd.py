"""The service manager's side of the daemon: readiness, watchdog and socket activation.

These are the three small protocols systemd speaks with the processes it starts, implemented with the
standard library alone so that a daemon run by hand, in a container or under another supervisor pays
nothing for them:

* ``sd_notify``: datagrams such as ``READY=1`` sent to the socket named by ``$NOTIFY_SOCKET``;
* the watchdog: ``$WATCHDOG_USEC`` says how often the manager expects ``WATCHDOG=1``;
* ``sd_listen_fds``: sockets the manager bound for us (``broker.socket``), passed from fd 3 upwards.

Each function reads the environment the manager set and does nothing when it is absent.
"""

from __future__ import annotations

import os
import socket
import stat
import time
from typing import Final

from broker.errors import BrokerError

# The first descriptor the manager passes; 0-2 stay stdin, stdout and stderr (sd_listen_fds(3)).
LISTEN_FDS_START: Final = 3
_LISTEN_VARIABLES: Final = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def notify(state: str) -> bool:
    """Send ``state`` (newline-separated ``KEY=VALUE`` lines) to the service manager.

    Returns True when the datagram was sent; False when no manager listens (``$NOTIFY_SOCKET`` unset or
    unusable) or the send failed. Notifications are advisory: a daemon must keep serving when the
    manager cannot be told about it, so no error is raised and nothing is logged.
    """
    data = state.encode()
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        # A leading "@" names a socket in the abstract namespace, spelled with a NUL byte in the API.
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        # Unset, or a transport this module does not speak (such as vsock): nobody to tell.
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(data, address)
    except OSError:
        return False
    return True


def reloading_state() -> str:
    """The notification that starts a reload; ``READY=1`` ends it.

    Newer managers (``Type=notify-reload``) require the monotonic timestamp, to tell this reload from an
    earlier one; older ones ignore it.
    """
    return f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}"


def watchdog_interval() -> float | None:
    """How often, in seconds, to send ``WATCHDOG=1``; None when the manager expects no pings.

    The manager's timeout is halved, the margin sd_watchdog_enabled(3) recommends, so that one late
    ping never gets a healthy daemon killed.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    # A child that inherited the variables from a supervised parent must not ping on its behalf.
    owner = os.environ.get("WATCHDOG_PID")
    if owner and owner != str(os.getpid()):
        return None
    try:
        interval = int(usec)
    except ValueError:
        return None
    if interval <= 0:
        return None
    return interval / 2_000_000


def listen_fds() -> list[socket.socket]:
    """Adopt the listening sockets the service manager passed in, in order, or [] when there are none.

    Every passed descriptor must be a listening ``AF_UNIX`` stream socket, the only kind the daemon
    serves; anything else raises :class:`BrokerError` rather than serving on a socket the operator did
    not mean. The ``LISTEN_*`` variables are removed in every case, so that no process started later
    mistakes them for its own.
    """
    env = {name: os.environ.pop(name, None) for name in _LISTEN_VARIABLES}
    pid, count = env["LISTEN_PID"], env["LISTEN_FDS"]
    if pid is None or count is None:
        return []
    try:
        target, n = int(pid), int(count)
    except ValueError:
        raise BrokerError(f"socket activation: LISTEN_PID={pid!r} and LISTEN_FDS={count!r} must be integers") \
            from None
    # The descriptors were meant for the process the manager started; if that was a parent of ours, they
    # are not ours to take.
    if target != os.getpid():
        return []
    if n < 0:
        raise BrokerError(f"socket activation: LISTEN_FDS={n} is negative")
    names = env["LISTEN_FDNAMES"].split(":") if env["LISTEN_FDNAMES"] else []
    if names and len(names) != n:
        raise BrokerError(f"socket activation: LISTEN_FDNAMES has {len(names)} names for {n} descriptors")
    fds = range(LISTEN_FDS_START, LISTEN_FDS_START + n)
    # Check all of them before owning any: a socket object closes its descriptor when collected, and a
    # failed start should leave the inherited descriptors as it found them.
    for i, fd in enumerate(fds):
        _check_listener(fd, f"fd {fd} ({names[i]})" if names else f"fd {fd}")
    adopted = []
    for fd in fds:
        os.set_inheritable(fd, False)  # agents and helpers we start must not inherit the public socket
        sock = socket.socket(fileno=fd)
        # The front door accepts on a blocking socket; the manager may have been told NonBlocking=yes.
        sock.setblocking(True)
        adopted.append(sock)
    return adopted


def _check_listener(fd: int, label: str) -> None:
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise BrokerError(f"socket activation: {label} is not open: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise BrokerError(f"socket activation: {label} is not a socket")
    probe = socket.socket(fileno=fd)
    try:
        if probe.family != socket.AF_UNIX or probe.type != socket.SOCK_STREAM:
            raise BrokerError(f"socket activation: {label} is not a Unix stream socket (ListenStream=/path)")
        if not probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise BrokerError(f"socket activation: {label} is not listening")
    finally:
        probe.detach()  # only looking: the descriptor stays open and unowned
