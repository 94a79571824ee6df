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
from collections.abc import Callable, Mapping
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
    """Sends requests to one Vault address. Every method except :meth:`close` is a coroutine."""

    def __init__(self, address: str, *, ca_file: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.address = address.rstrip("/")
        if ca_file is not None:
            _check_ca_file(ca_file)
        self._timeout = timeout
        self._worker = _Worker()
        # No redirects: requests would carry X-Vault-Token (and a POSTed secret_id) to wherever a 3xx
        # points, another host or plain HTTP included. A redirect is answered as "not usable".
        self._client = hvac.Client(url=self.address, token="", verify=ca_file or True, timeout=timeout,
                                   adapter=hvac.adapters.RawAdapter, allow_redirects=False)

    async def send(self, method: str, path: str, data: Mapping[str, Any] | None = None, *,
                   token: str | None = None) -> dict[str, Any]:
        """One request to ``/v1/<path>``; the JSON answer, ``{}`` for 204. Raises a VaultError."""
        return await asyncio.wrap_future(self._worker.submit(lambda: self._send(method, path, data, token)))

    def close(self) -> None:
        """Let the requests already queued run (a lease revocation must not be dropped), for a bounded
        time: a Vault that stopped answering must not hold the daemon's exit."""
        if not self._worker.stop(wait=self._timeout * (ANSWER_DEADLINE_FACTOR + 1)):
            log.error("vault: requests still unanswered at close; leaving them behind")
            return
        self._client.adapter.close()

    def _send(self, method: str, path: str, data: Mapping[str, Any] | None, token: str | None) -> dict[str, Any]:
        headers = {"X-Vault-Token": token} if token else {}
        try:
            response = self._client.adapter.request(method, f"/v1/{path}", headers=headers,
                                                    json=dict(data) if data is not None else None,
                                                    raise_exception=False, stream=True)
            with response:
                raw = self._read_body(response)
        except requests.exceptions.SSLError:
            raise VaultUnavailable(f"TLS with Vault at {self.address} failed: its certificate is not trusted "
                                   "(vault.ca_file names the CA that signed it) or the handshake broke") from None
        except requests.RequestException as exc:
            raise VaultUnavailable(f"cannot reach Vault at {self.address}: {type(exc).__name__}") from None
        except (OSError, ValueError, urllib3.exceptions.HTTPError) as exc:  # the body broke off mid-read
            raise VaultUnavailable(f"broken answer from Vault at {self.address}: {type(exc).__name__}") from None
        return self._decode(method, path, response.status_code, raw)

    def _read_body(self, response: requests.Response) -> bytes:
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
                raise VaultUnavailable(f"Vault at {self.address} answered too slowly")
        return bytes(body)

    def _decode(self, method: str, path: str, status: int, raw: bytes) -> dict[str, Any]:
        if status == 204:
            return {}
        body = _json_object(raw)
        if 200 <= status < 300:
            if body is None:
                raise VaultUnavailable(f"{self.address} answered {method} {path} with something that is not "
                                       "a Vault API response")
            return body
        errors = body.get("errors") if body is not None else None
        detail = "; ".join(str(e) for e in errors)[:MAX_ERROR_CHARS] if isinstance(errors, list) else ""
        what = f"Vault answered {status} to {method} {path}" + (f": {detail}" if detail else "")
        if 400 <= status < 500 and status != 429 and body is not None:
            raise VaultRequestError(status, what)
        # 5xx (sealed, standby, overloaded), 429, and 4xx without a Vault error body: not Vault's final word.
        raise VaultUnavailable(what)


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
