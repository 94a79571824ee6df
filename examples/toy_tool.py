"""A toy "ticketing" tool server that accepts only broker tokens scoped to it.

It verifies every request offline with ``broker.tokens`` and the broker's public JWKS: signature, expiry,
audience (this server), and that the token was minted for the ``read_ticket`` tool. It never calls the
daemon per request. Prints ``PORT <n>`` on stdout once listening on 127.0.0.1.
"""

from __future__ import annotations

import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from broker import tokens
from broker.client import Client
from broker.errors import InvalidToken

TOOL = "read_ticket"
AUDIENCE = TOOL  # tokens name the tool server they are for; by default the tool's own name


class Keys:
    """The broker's public keys, refetched when a token names a key we have not seen (rotation)."""

    def __init__(self, socket_path: str) -> None:
        self._socket = socket_path
        self.refresh()

    def refresh(self) -> None:
        with Client(self._socket) as c:
            self.keys = tokens.keys_from_jwks(c.jwks())


def make_handler(keys: Keys, trust_domain: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            auth = self.headers.get("Authorization", "")
            token = auth.removeprefix("Bearer ").strip()
            expect = tokens.Expect(trust_domain, audience=AUDIENCE, tool=TOOL)
            try:
                try:
                    claims = tokens.verify(token.encode(), keys.keys, expect, int(time.time()))
                except InvalidToken as exc:
                    if exc.reason != "unknown kid":
                        raise
                    keys.refresh()
                    claims = tokens.verify(token.encode(), keys.keys, expect, int(time.time()))
            except InvalidToken as exc:
                self._reply(403, {"error": "forbidden", "why": exc.reason})
                return
            ticket = self.path.rsplit("/", 1)[-1]
            self._reply(200, {"ticket": ticket, "subject": "Printer on fire", "status": "open",
                              "served_to": claims.sub, "tenant": claims.tenant})

        def _reply(self, code: int, body: dict[str, str]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            sys.stderr.write(f"toy-tool: {self.command} {self.path} -> {args[1] if len(args) > 1 else ''}\n")

    return Handler


def main() -> int:
    socket_path, trust_domain = sys.argv[1], sys.argv[2]
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(Keys(socket_path), trust_domain))
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
