"""An agent run under `broker exec`: it never talks to the broker at all. Its credential is a file that
the sidecar keeps fresh in $BROKER_CREDENTIALS_DIR (tmpfs, mode 0600), and it simply reads it per call."""

from __future__ import annotations

import os
import sys

from agent import call_tool


def main() -> int:
    creds = os.environ["BROKER_CREDENTIALS_DIR"]
    with open(os.path.join(creds, "read_ticket.token")) as f:
        token = f.read().strip()
    with open(os.path.join(creds, "generation")) as f:
        generation = f.read().strip()
    status, body = call_tool(f"{sys.argv[1]}/api/tickets/7", token)
    print(f"agent (under broker exec, credentials generation {generation}): read_ticket -> HTTP {status} {body}")
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
