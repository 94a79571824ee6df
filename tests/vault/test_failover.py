"""Several Vault addresses: which failures move the broker to the next node, and which must not resend.

The peers here are small HTTP servers that answer one status and count what they receive: they stand for
a node in a state (sealed, failing mid-request) that the cluster tests below reach only by timing. The
real cluster is in test_raft_cluster.py.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
from collections.abc import Iterator

import pytest

from broker import config
from broker.errors import ConfigError
from broker.testing import OpenBao, free_port
from broker.vault import VaultRequestError, VaultUnavailable
from broker.vault._transport import VaultTransport

BASE = b"""
[broker]
trust_domain = "example.org"
socket = "/run/broker/broker.sock"
audit_log = "/var/log/broker/audit.jsonl"

[[workflow]]
name = "w"
tenant = "acme"
  [[workflow.caller]]
  uid = 1000
  [[workflow.tool]]
  name = "t"

[vault]
address = %s
[vault.auth]
method = "token"
token_file = "/etc/broker/vault-token"
"""


def parse_address(value: bytes) -> config.VaultSettings:
    cfg = config.parse(BASE % value)
    assert cfg.vault is not None
    return cfg.vault


def test_address_may_list_the_nodes_of_a_cluster() -> None:
    one = parse_address(b'"https://a:8200"')
    assert one.address == "https://a:8200" and one.nodes == ("https://a:8200",)
    many = parse_address(b'["https://a:8200", "https://b:8200", "https://c:8200"]')
    assert many.address == "https://a:8200"
    assert many.nodes == ("https://a:8200", "https://b:8200", "https://c:8200")


@pytest.mark.parametrize(("value", "expected"), [
    (b"[]", "vault.address: expected a string or a non-empty array"),
    (b'["https://a:8200", 8200]', "vault.address: expected a string or a non-empty array"),
    (b"8200", "vault.address: expected a string or a non-empty array"),
    (b'["https://a:8200", "https://a:8200"]', "vault.address: lists an address twice"),
    (b'["https://a:8200", "b:8200"]', "vault.address: must be an http(s) URL, got 'b:8200'"),
    (b'["https://a:8200", "https://u:p@b:8200"]', "vault.address: must not contain credentials"),
])
def test_bad_address_lists_are_refused(value: bytes, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        parse_address(value)


def test_a_ca_file_needs_every_node_on_https() -> None:
    text = (BASE % b'["https://a:8200", "http://b:8200"]').replace(b"[vault.auth]",
                                                                    b'ca_file = "/etc/ca.pem"\n[vault.auth]')
    with pytest.raises(ConfigError, match=r"vault\.ca_file: only applies to an https:// address"):
        config.parse(text)


class _Peer(http.server.ThreadingHTTPServer):
    """Answers every request with ``status`` and a Vault-style error body, counting the requests."""

    def __init__(self, status: int, error: str = "") -> None:
        self.status = status
        self.error = error or ("Vault is sealed" if status == 503 else "internal error")
        self.seen: list[str] = []
        super().__init__(("127.0.0.1", 0), _Answer)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Answer(http.server.BaseHTTPRequestHandler):
    server: _Peer

    def _any(self) -> None:
        self.server.seen.append(f"{self.command} {self.path}")
        body = json.dumps({"errors": [self.server.error]}).encode()
        self.send_response(self.server.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = _any

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def peers() -> Iterator[dict[int, _Peer]]:
    made = {503: _Peer(503), 500: _Peer(500)}
    yield made
    for peer in made.values():
        peer.shutdown()
        peer.server_close()


def refused_address() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there: the connection is refused


def test_a_node_that_cannot_be_reached_or_is_sealed_is_skipped_at_once(bao: OpenBao, peers: dict[int, _Peer]
                                                                        ) -> None:
    sealed = peers[503]
    transport = VaultTransport([refused_address(), sealed.address, bao.address])

    async def main() -> None:
        body = await transport.send("GET", "auth/token/lookup-self", token=bao.token)
        assert body["data"]["policies"] == ["root"]
        assert transport.address == bao.address
        # The working node sticks: the next request does not try the others first.
        await transport.send("GET", "auth/token/lookup-self", token=bao.token)

    try:
        asyncio.run(main())
    finally:
        transport.close()
    assert sealed.seen == ["GET /v1/auth/token/lookup-self"]


def test_a_request_the_node_may_have_carried_out_is_not_sent_again(bao: OpenBao, peers: dict[int, _Peer]) -> None:
    # A 500 after the request reached the node: it may have created a lease. Sending it to the next node
    # would create a second one, which nobody would ever renew or revoke; the caller decides instead.
    failing = peers[500]
    transport = VaultTransport([failing.address, bao.address])

    async def main() -> None:
        with pytest.raises(VaultUnavailable, match="answered 500"):
            await transport.send("POST", "auth/token/create", {"ttl": "1m"}, token=bao.token)
        # ... but the next request goes to the next node.
        assert transport.address == bao.address
        with pytest.raises(VaultRequestError) as exc:
            await transport.send("GET", "secret/data/nothing-here", token=bao.token)
        assert exc.value.status == 404

    try:
        asyncio.run(main())
    finally:
        transport.close()
    assert failing.seen == ["POST /v1/auth/token/create"]


def test_a_standby_without_a_leader_is_not_sent_a_write_again(bao: OpenBao) -> None:
    # A standby forwards writes to the leader; when forwarding breaks it answers 503 although the leader
    # may have acted (created the token) before it died. Only reads and sealed nodes are resent at once.
    standby = _Peer(503, "no active Vault instance found")
    transport = VaultTransport([standby.address, bao.address])

    async def main() -> None:
        with pytest.raises(VaultUnavailable, match="no active Vault instance"):
            await transport.send("POST", "auth/token/create", {"ttl": "1m"}, token=bao.token)
        assert transport.address == bao.address

    try:
        asyncio.run(main())
    finally:
        transport.close()
        standby.shutdown()
        standby.server_close()
    assert standby.seen == ["POST /v1/auth/token/create"]


def test_every_node_down_is_one_unavailable_error() -> None:
    transport = VaultTransport([refused_address(), refused_address()], timeout=2)

    async def main() -> None:
        with pytest.raises(VaultUnavailable, match="cannot reach Vault"):
            await transport.send("GET", "sys/health")

    try:
        asyncio.run(main())
    finally:
        transport.close()
