"""HTTP to Vault through hvac, on one private thread, with Vault's answers reduced to dicts or errors.

hvac (and the ``requests`` session under it) blocks, so no coroutine ever calls it directly: every
request runs on this transport's single worker thread and the event loop awaits the result. One thread
also serialises the requests, so the ``requests`` session is never shared between threads. Each read
waits at most ``timeout`` and a whole answer body at most three times that; the thread is a daemon and
:meth:`VaultTransport.close` waits for it only so long, so a Vault that stops answering mid-request
(in its headers, beyond any deadline of ours) cannot hold the broker's exit.

The hvac adapter is created without a token (``token=""`` also stops hvac from reading ``VAULT_TOKEN``
or ``~/.vault-token``): each request carries the token its caller passes, so the broker's token lives in
exactly one place, :class:`broker.vault.VaultSession`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import queue
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, TypeVar

import hvac
import requests
import urllib3

from broker.vault._errors import VaultError, VaultRequestError, VaultUnavailable

log = logging.getLogger("broker.vault")
T = TypeVar("T")

DEFAULT_TIMEOUT: Final = 10.0
# The whole answer, not each read: a peer dripping a byte at a time never trips a per-read timeout.
ANSWER_DEADLINE_FACTOR: Final = 3
_CHUNK: Final = 16384
# Vault's answers to our requests are a few KiB (a certificate chain at most); refuse anything huge.
MAX_ANSWER_BYTES: Final = 1 << 20
# Vault's error strings are short; a longer one is probably not Vault, and is cut before it is logged.
MAX_ERROR_CHARS: Final = 200


class VaultTransport:
    """Sends requests to one Vault cluster, through one of its nodes' addresses at a time.

    With several addresses (the nodes of one cluster) the transport keeps to the node that last worked
    and moves to the next one in the list when a node cannot be reached or answers 503 (sealed, or a
    standby that lost its leader); Raft replicates tokens and leases, so any node serves any of them.
    A request is sent again at once to the next node only when the first cannot have acted on it: the
    connection was never made, the node answered 503 because it is sealed, or the request only reads
    (any 503). After anything else (a timeout mid-answer, a
    500) the request may have been carried out, and creating a lease twice would leak one, so the error
    goes to the caller, who retries on its own schedule, and the next request goes to the next node.
    Every method except :meth:`close` is a coroutine."""

    def __init__(self, addresses: str | Sequence[str], *, ca_file: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        listed = [addresses] if isinstance(addresses, str) else list(addresses)
        if not listed:
            raise VaultError("no Vault address")
        if ca_file is not None:
            _check_ca_file(ca_file)
        self._timeout = timeout
        self._worker = _Worker()
        # No redirects: requests would carry X-Vault-Token (and a POSTed secret_id) to wherever a 3xx
        # points, another host or plain HTTP included. A redirect is answered as "not usable".
        self._clients = [(a.rstrip("/"), hvac.Client(url=a.rstrip("/"), token="", verify=ca_file or True,
                                                     timeout=timeout, adapter=hvac.adapters.RawAdapter,
                                                     allow_redirects=False)) for a in listed]
        self._current = 0  # only the worker thread changes it

    @property
    def address(self) -> str:
        """The node in use (the one the next request goes to)."""
        return self._clients[self._current][0]

    async def send(self, method: str, path: str, data: Mapping[str, Any] | None = None, *,
                   token: str | None = None) -> dict[str, Any]:
        """One request to ``/v1/<path>``; the JSON answer, ``{}`` for 204. Raises a VaultError."""
        return await asyncio.wrap_future(self._worker.submit(lambda: self._failover(method, path, data, token)))

    def close(self) -> None:
        """Let the requests already queued run (a lease revocation must not be dropped), for a bounded
        time: a Vault that stopped answering must not hold the daemon's exit."""
        if not self._worker.stop(wait=self._timeout * (ANSWER_DEADLINE_FACTOR + 1)):
            log.error("vault: requests still unanswered at close; leaving them behind")
            return
        for _, client in self._clients:
            client.adapter.close()

    def _failover(self, method: str, path: str, data: Mapping[str, Any] | None, token: str | None
                  ) -> dict[str, Any]:
        left = len(self._clients)
        while True:
            address, client = self._clients[self._current]
            try:
                return self._send(address, client, method, path, data=data, token=token)
            except VaultUnavailable as exc:
                left -= 1
                if len(self._clients) > 1:
                    self._next(exc)
                if not isinstance(exc, _NotSent) or left == 0:
                    raise

    def _next(self, failure: VaultUnavailable) -> None:
        self._current = (self._current + 1) % len(self._clients)
        # Info, not warning: the session already warns once per outage ("vault degraded: ..."), and with
        # every node down each request would otherwise log one warning per node.
        log.info("vault: %s; using %s next", failure, self._clients[self._current][0])

    def _send(self, address: str, client: hvac.Client, method: str, path: str, *,
              data: Mapping[str, Any] | None, token: str | None) -> dict[str, Any]:
        headers = {"X-Vault-Token": token} if token else {}
        try:
            response = client.adapter.request(method, f"/v1/{path}", headers=headers,
                                              json=dict(data) if data is not None else None,
                                              raise_exception=False, stream=True)
            with response:
                raw = self._read_body(address, response)
        except requests.exceptions.SSLError:
            raise VaultUnavailable(f"TLS with Vault at {address} failed: its certificate is not trusted "
                                   "(vault.ca_file names the CA that signed it) or the handshake broke") from None
        except requests.exceptions.ConnectTimeout:
            raise _NotSent(f"cannot reach Vault at {address}: ConnectTimeout") from None
        except requests.ConnectionError as exc:
            # NewConnectionError (refused, unreachable): nothing reached the node, so another may take it.
            if _never_connected(exc):
                raise _NotSent(f"cannot reach Vault at {address}: ConnectionError") from None
            raise VaultUnavailable(f"cannot reach Vault at {address}: ConnectionError") from None
        except requests.RequestException as exc:
            raise VaultUnavailable(f"cannot reach Vault at {address}: {type(exc).__name__}") from None
        except (OSError, ValueError, urllib3.exceptions.HTTPError) as exc:  # the body broke off mid-read
            raise VaultUnavailable(f"broken answer from Vault at {address}: {type(exc).__name__}") from None
        if response.status_code == 503:
            body = _json_object(raw)
            errors = body.get("errors") if body is not None else None
            detail = "; ".join(str(e) for e in errors)[:MAX_ERROR_CHARS] if isinstance(errors, list) else ""
            message = f"Vault at {address} answered 503 to {method} {path}" + (f": {detail}" if detail else "")
            # A sealed node did nothing, and a read changes nothing: either may go to the next node at once.
            # Any other 503 may come from a standby whose forwarding to the leader broke after the leader
            # acted (a token or lease created and never reported), so it is not sent again.
            if "sealed" in detail.lower() or method in ("GET", "LIST"):
                raise _NotSent(message)
            raise VaultUnavailable(message)
        return self._decode(address, method, path, response.status_code, raw)

    def _read_body(self, address: str, response: requests.Response) -> bytes:
        # At most one byte past the cap (a peer that streams forever cannot exhaust memory), and within
        # a deadline for the whole body (one that drips a byte a second cannot hold the thread).
        deadline = time.monotonic() + self._timeout * ANSWER_DEADLINE_FACTOR
        body = bytearray()
        while len(body) <= MAX_ANSWER_BYTES:
            # read1: whatever has arrived (read(n) would wait for all n bytes, however slowly they come).
            chunk = response.raw.read1(min(_CHUNK, MAX_ANSWER_BYTES + 1 - len(body)), decode_content=True)
            if not chunk:
                break
            body += chunk
            if time.monotonic() > deadline:
                raise VaultUnavailable(f"Vault at {address} answered too slowly")
        return bytes(body)

    def _decode(self, address: str, method: str, path: str, status: int, raw: bytes) -> dict[str, Any]:
        if status == 204:
            return {}
        body = _json_object(raw)
        if 200 <= status < 300:
            if body is None:
                raise VaultUnavailable(f"{address} answered {method} {path} with something that is not "
                                       "a Vault API response")
            return body
        errors = body.get("errors") if body is not None else None
        detail = "; ".join(str(e) for e in errors)[:MAX_ERROR_CHARS] if isinstance(errors, list) else ""
        what = f"Vault answered {status} to {method} {path}" + (f": {detail}" if detail else "")
        if 400 <= status < 500 and status != 429 and body is not None:
            raise VaultRequestError(status, what)
        # 5xx (sealed, standby, overloaded), 429, and 4xx without a Vault error body: not Vault's final word.
        raise VaultUnavailable(what)


class _NotSent(VaultUnavailable):
    """The node did not act on the request (no connection, or 503): another node may be asked at once."""


def _never_connected(exc: requests.ConnectionError) -> bool:
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(reason, urllib3.exceptions.NewConnectionError)


def _json_object(raw: bytes) -> dict[str, Any] | None:
    if len(raw) > MAX_ANSWER_BYTES:
        return None
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _check_ca_file(path: str) -> None:
    """Load the CA bundle once up front: a missing or broken file is a configuration error to report
    at start, not a connection failure to retry forever."""
    try:
        ssl.create_default_context(cafile=path)
    except ssl.SSLError:  # before OSError, which it subclasses
        raise VaultError(f"vault.ca_file {path} holds no usable PEM certificate") from None
    except OSError as exc:
        raise VaultError(f"cannot read vault.ca_file {path}: {exc.strerror or exc}") from None


class _Worker:
    """One daemon thread running submitted calls in order. Unlike a ThreadPoolExecutor's, its thread is
    not joined when the interpreter exits, so a request stuck on a silent peer cannot hang the exit."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]] | None] = \
            queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="vault-http", daemon=True)
        self._thread.start()

    def submit(self, call: Callable[[], T]) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put((call, future))
        return future

    def stop(self, wait: float) -> bool:
        """Finish what is queued, then end the thread; False if that took longer than ``wait`` seconds."""
        self._queue.put(None)
        self._thread.join(wait)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            call, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(call())
            except BaseException as exc:  # handed to the awaiting coroutine, which re-raises it
                future.set_exception(exc)
