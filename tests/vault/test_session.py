"""The broker's own identity in a real OpenBao: AppRole login, renewal, re-login, and hostile cases."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import ClassVar

import hvac
import pytest

from broker.config import VaultAuth, VaultSettings
from broker.testing import OpenBao, free_port
from broker.vault import VaultAuthError, VaultRequestError, VaultSession, VaultUnavailable, _session
from broker.vault._transport import VaultTransport

from .conftest import make_role, write_secret


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_approle_login_renewal_and_relogin_at_max_ttl(bao: OpenBao, admin: hvac.Client, creds_dir: str,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "broker.vault")
    renewing = make_role(admin, creds_dir, policies=["default"], token_ttl="3s", token_max_ttl="1h")
    capped = make_role(admin, creds_dir, policies=["default"], token_ttl="3s", token_max_ttl="4s")

    tokens: list[str] = []

    async def main() -> None:
        a = VaultSession(renewing.settings(bao.address), check_every=1.0)
        b = VaultSession(capped.settings(bao.address), check_every=1.0)
        await a.start()
        await b.start()
        assert a.logged_in and a.degraded is None
        await asyncio.sleep(5.5)
        # Renewed at 2/3 of 3 s, twice by now, without a second login.
        assert a.logins == 1
        # The capped token cannot be renewed past 4 s: the session logs in again before it dies.
        assert b.logins >= 2
        for s in (a, b):
            body = await s.request("GET", "auth/token/lookup-self")
            assert body["data"]["ttl"] > 0
            tokens.append(body["data"]["id"])
            await s.close()

    run(main())
    assert "vault token renewed" in caplog.text
    # Neither the secret_id nor any token ever reaches the log.
    secret_id = open(renewing.secret_id_file).read().strip()
    assert secret_id not in caplog.text
    assert tokens and not any(t in caplog.text for t in tokens)


def test_relogin_after_token_revoked_behind_our_back(bao: OpenBao, admin: hvac.Client, creds_dir: str) -> None:
    role = make_role(admin, creds_dir, policies=["default"])

    async def main() -> None:
        s = VaultSession(role.settings(bao.address), check_every=3600)
        await s.start()
        me = await s.request("GET", "auth/token/lookup-self")
        admin.auth.token.revoke_accessor(me["data"]["accessor"])
        again = await s.request("GET", "auth/token/lookup-self")
        assert again["data"]["accessor"] != me["data"]["accessor"]
        assert s.logins == 2
        # A genuine policy denial is not mistaken for a dead token: no third login.
        with pytest.raises(VaultRequestError) as exc:
            await s.request("GET", "sys/policies/acl/root")
        assert exc.value.status == 403 and s.logins == 2
        await s.close()
        # close() revoked the token the session logged in for.
        with pytest.raises(hvac.exceptions.InvalidRequest):
            admin.auth.token.lookup_accessor(again["data"]["accessor"])

    run(main())


def test_keepalive_notices_revocation_without_requests(bao: OpenBao, admin: hvac.Client, creds_dir: str) -> None:
    role = make_role(admin, creds_dir, policies=["default"])

    async def main() -> None:
        s = VaultSession(role.settings(bao.address), check_every=0.5)
        await s.start()
        me = await s.request("GET", "auth/token/lookup-self")
        admin.auth.token.revoke_accessor(me["data"]["accessor"])
        deadline = time.monotonic() + 10
        while s.logins < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert s.logins == 2
        await s.close()

    run(main())


def test_wrapped_secret_id_is_unwrapped_once(bao: OpenBao, admin: hvac.Client, creds_dir: str) -> None:
    role = make_role(admin, creds_dir, policies=["default"], wrapped=True)

    async def main() -> None:
        first = VaultSession(role.settings(bao.address))
        await first.request("GET", "auth/token/lookup-self")
        # Log in again from the same file: the session reuses what it unwrapped, it does not unwrap twice.
        me = await first.request("GET", "auth/token/lookup-self")
        admin.auth.token.revoke_accessor(me["data"]["accessor"])
        await first.request("GET", "auth/token/lookup-self")
        assert first.logins == 2
        await first.close()
        # Another process finding the same, spent wrapping token is told it may have been intercepted.
        second = VaultSession(role.settings(bao.address))
        with pytest.raises(VaultAuthError, match="already unwrapped"):
            await second.request("GET", "auth/token/lookup-self")
        assert second.degraded is not None
        await second.close()

    run(main())


def test_wrong_secret_id_is_refused_and_reported(bao: OpenBao, admin: hvac.Client, creds_dir: str) -> None:
    role = make_role(admin, creds_dir, policies=["default"])
    bogus = "0f0e0d0c-0b0a-0908-0706-050403020100"
    write_secret(role.secret_id_file, bogus)

    async def main() -> None:
        s = VaultSession(role.settings(bao.address))
        await s.start()  # does not raise: the broker serves without Vault
        assert not s.logged_in
        assert s.degraded is not None and "login refused" in s.degraded
        assert bogus not in s.degraded
        with pytest.raises(VaultAuthError) as exc:
            await s.request("GET", "auth/token/lookup-self")
        assert bogus not in str(exc.value)
        await s.close()

    run(main())


def test_a_refused_login_is_not_retried_into_a_lockout(bao: OpenBao, admin: hvac.Client, creds_dir: str) -> None:
    # Vault locks a role out for 15 minutes after 5 refused logins in 15 minutes. Every consumer (the 1 s
    # KV poll among them) asks for a token, so the session must not turn each request into a login.
    role = make_role(admin, creds_dir, policies=["default"])
    good = open(role.secret_id_file).read().strip()
    write_secret(role.secret_id_file, "0f0e0d0c-0b0a-0908-0706-050403020100")
    now = [1000.0]
    sent: list[str] = []

    async def main() -> None:
        s = VaultSession(role.settings(bao.address), clock=lambda: now[0],
                         observe=lambda method, _seconds, _ok: sent.append(method))
        for _ in range(10):
            with pytest.raises(VaultAuthError, match="login refused"):
                await s.request("GET", "auth/token/lookup-self")
        assert sent == ["POST"]  # one login attempt, nine answers from memory
        assert s.degraded is not None and "login refused" in s.degraded
        write_secret(role.secret_id_file, good)  # the operator fixes the file ...
        now[0] += _session.LOGIN_REFUSED_PAUSE - 1
        with pytest.raises(VaultAuthError, match="next login attempt in 1s"):
            await s.request("GET", "auth/token/lookup-self")
        now[0] += 1  # ... and the next attempt, at most four per 15 minutes, picks it up
        await s.request("GET", "auth/token/lookup-self")
        assert s.logged_in and s.logins == 1 and s.degraded is None
        await s.close()

    run(main())


def test_missing_credential_file(bao: OpenBao, creds_dir: str) -> None:
    settings = VaultSettings(bao.address, VaultAuth("approle", role_id_file=os.path.join(creds_dir, "nope"),
                                                    secret_id_file=os.path.join(creds_dir, "nope2")))

    async def main() -> None:
        s = VaultSession(settings)
        with pytest.raises(VaultAuthError, match="cannot read the role_id file"):
            await s.request("GET", "auth/token/lookup-self")
        await s.close()

    run(main())


def test_token_file_method_and_close_keeps_operator_token(bao: OpenBao, admin: hvac.Client,
                                                          creds_dir: str) -> None:
    child = admin.auth.token.create(policies=["default"], ttl="1h")["auth"]
    path = write_secret(os.path.join(creds_dir, "token"), child["client_token"])

    async def main() -> None:
        s = VaultSession(VaultSettings(bao.address, VaultAuth("token", token_file=path)))
        body = await s.request("GET", "auth/token/lookup-self")
        assert body["data"]["accessor"] == child["accessor"]
        await s.close()
        assert "client_token" not in repr(s) and child["client_token"] not in repr(s)

    run(main())
    # The operator's token is theirs: closing the session does not revoke it.
    assert admin.auth.token.lookup_accessor(child["accessor"])["data"]["ttl"] > 0


def test_unreachable_vault(creds_dir: str) -> None:
    token = write_secret(os.path.join(creds_dir, "token"), "s.whatever")
    settings = VaultSettings(f"http://127.0.0.1:{free_port()}", VaultAuth("token", token_file=token))

    async def main() -> None:
        s = VaultSession(settings)
        t0 = time.monotonic()
        with pytest.raises(VaultUnavailable, match="cannot reach Vault"):
            await s.request("GET", "auth/token/lookup-self")
        assert time.monotonic() - t0 < 5
        assert s.degraded is not None and "s.whatever" not in s.degraded
        await s.close()

    run(main())


class _HtmlHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<html>definitely not vault s.leaked-looking-token</html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def html_server() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _HtmlHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def garbage_server() -> Iterator[str]:
    """A TCP port that answers every connection with bytes that are not HTTP, then hangs up."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(b"\x16\x03\x01 SSH-2.0-garbage\r\n\x00\xff" * 10)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    t.join()
    listener.close()


@pytest.mark.parametrize("server", ["html_server", "garbage_server"])
def test_something_that_is_not_vault(server: str, request: pytest.FixtureRequest, creds_dir: str) -> None:
    address = request.getfixturevalue(server)
    token = write_secret(os.path.join(creds_dir, "token"), "s.whatever")

    async def main() -> None:
        s = VaultSession(VaultSettings(address, VaultAuth("token", token_file=token)))
        with pytest.raises(VaultUnavailable) as exc:
            await s.request("GET", "auth/token/lookup-self")
        assert "leaked" not in str(exc.value) and "s.whatever" not in str(exc.value)
        assert s.degraded is not None
        await s.close()

    run(main())


class _Recorder(BaseHTTPRequestHandler):
    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        _Recorder.seen.append(self.headers.get("X-Vault-Token", ""))
        self.send_response(200)
        self.end_headers()

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


def test_a_redirect_never_carries_the_token_elsewhere(creds_dir: str) -> None:
    # A Vault standby, a proxy or an attacker answering 307 to another host: the token stays home.
    elsewhere = HTTPServer(("127.0.0.1", 0), _Recorder)
    target = f"http://127.0.0.1:{elsewhere.server_address[1]}"

    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(307)
            self.send_header("Location", target + self.path)
            self.end_headers()

        do_POST = do_GET

        def log_message(self, *args: object) -> None:
            pass

    redirecting = HTTPServer(("127.0.0.1", 0), Redirect)
    for srv in (elsewhere, redirecting):
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    token = write_secret(os.path.join(creds_dir, "token"), "hvs.must-stay-home")

    async def main() -> None:
        s = VaultSession(VaultSettings(f"http://127.0.0.1:{redirecting.server_address[1]}",
                                       VaultAuth("token", token_file=token)))
        with pytest.raises(VaultUnavailable, match="307"):
            await s.request("GET", "auth/token/lookup-self")
        await s.close()

    try:
        run(main())
    finally:
        for srv in (elsewhere, redirecting):
            srv.shutdown()
            srv.server_close()
    assert _Recorder.seen == []


def _drip_server(head: bytes, drip: bytes) -> tuple[str, threading.Event]:
    """Answers with ``head`` at once, then one byte of ``drip`` every 0.1 s until stopped."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn, listener:
            conn.recv(65536)
            conn.sendall(head)
            for i in range(len(drip)):
                if stop.wait(0.1):
                    return
                try:
                    conn.sendall(drip[i:i + 1])
                except OSError:
                    return

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}", stop


def test_an_answer_dripping_in_is_cut_off_by_a_deadline() -> None:
    body = b"x" * 1000
    address, stop = _drip_server(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body), body)
    transport = VaultTransport(address, timeout=0.5)  # each byte comes well within the read timeout

    async def main() -> None:
        with pytest.raises(VaultUnavailable, match="answered too slowly"):
            await transport.send("GET", "sys/health")

    try:
        run(main())
    finally:
        stop.set()
        transport.close()


def test_close_does_not_wait_forever_for_a_silent_vault(caplog: pytest.LogCaptureFixture) -> None:
    # Headers that never end: the request is stuck inside the HTTP library, beyond any deadline of ours.
    address, stop = _drip_server(b"HTTP/1.1 200 OK\r\n", b"X-Slow: " + b"a" * 100000)
    transport = VaultTransport(address, timeout=0.5)

    async def main() -> None:
        stuck = asyncio.ensure_future(transport.send("GET", "sys/health"))
        await asyncio.sleep(0.3)
        await asyncio.get_running_loop().run_in_executor(None, transport.close)  # returns, bounded
        stuck.cancel()

    try:
        run(main())
    finally:
        stop.set()
    assert "requests still unanswered at close" in caplog.text
