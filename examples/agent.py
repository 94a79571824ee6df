"""A small example agent: gets a token just in time, calls a tool with it, and is refused a tool its
workflow does not grant. It never holds a long-lived key, and never says who it is: the daemon knows."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request

from broker.client import Client
from broker.errors import PermissionDenied

WORKFLOW = "support-summarize"


def call_tool(url: str, token: str) -> tuple[int, dict[str, str]]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def main() -> int:
    socket_path, tool_url = sys.argv[1], sys.argv[2]
    ok = True
    with Client(socket_path) as broker:
        minted = broker.mint(WORKFLOW, "read_ticket")
        print(f"agent: got a read_ticket token (jti {minted.jti}, expires at {minted.expires_at})")
        status, body = call_tool(f"{tool_url}/api/tickets/42", minted.token)
        print(f"agent: read_ticket -> HTTP {status} {body}")
        ok &= status == 200

        # A token for another tool is useless against this one, even though it is genuine.
        other = broker.mint(WORKFLOW, "send_email", audience="read_ticket")
        status, body = call_tool(f"{tool_url}/api/tickets/42", other.token)
        print(f"agent: send_email token at the ticket tool -> HTTP {status} {body}")
        ok &= status == 403

        try:
            broker.mint(WORKFLOW, "export_all_customers")
            print("agent: export_all_customers was granted (unexpected!)")
            ok = False
        except PermissionDenied as exc:
            # A member of the workflow is told its own mistake; the request id finds the audit line.
            print(f"agent: export_all_customers refused by the broker: {exc}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
