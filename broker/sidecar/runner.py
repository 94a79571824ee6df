"""``broker exec``: deliver a workflow's credentials to a child process and keep them fresh.

Flow: describe the workflow (which tools, delivered how) -> mint every credential once -> start the
child -> refresh each credential at a fraction of its lifetime, and at once when the daemon revokes one
-> swap files atomically and signal, or restart the child for environment variables -> when the child
exits, revoke what this run was issued, delete the directory, exit with the child's status.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import resource
import signal
import sys
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, TypeVar

import uvloop

from broker.client import AsyncClient, Minted
from broker.errors import BrokerError, Refused, Unavailable, UpstreamUnavailable
from broker.sidecar.credfiles import CredentialDir
from broker.vault import SecretValue

log = logging.getLogger("broker.exec")

T = TypeVar("T")
MAX_BACKOFF: Final = 30.0
REVOKE_BATCH: Final = 50  # well inside the daemon's per-call limit and 64 KiB request size
# A token is never used in its last seconds: clocks drift and requests take time.
EXPIRY_MARGIN: Final = 2.0
PROGRESS_EVERY: Final = 10.0  # seconds between "still waiting for the daemon" lines


def _seconds(value: float) -> str:
    return f"{value:.0f}s" if value == int(value) else f"{value:.1f}s"


@dataclass(frozen=True)
class ExecOptions:
    workflow: str
    command: list[str]
    tools: tuple[str, ...] = ()  # empty: every tool of the workflow
    restart: bool = False
    signal: int | None = None
    grace: float = 10.0
    refresh_fraction: float = 0.5
    wait_timeout: float = 60.0
    socket: str | None = None


@dataclass
class _Credential:
    tool: str
    env: str
    file: str
    has_secret: bool = False
    secret_key: tuple[int, str] = (0, "")  # (version, lease id) of the secret on disk
    secret_expires: float = 0.0
    # This run's own secret stream: the daemon revokes the lease it carries when the stream ends.
    secret_stream: AsyncGenerator[SecretValue, None] | None = None
    minted: Minted | None = None
    refresh_at: float = 0.0
    backoff: float = 0.5
    # (token, expires_at) of every token of this run still alive, revoked at exit. Never in a repr.
    issued: list[tuple[str, float]] = field(default_factory=list, repr=False)


class Sidecar:
    def __init__(self, opts: ExecOptions, *, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, core_limit: int = 0) -> None:
        self._o = opts
        self._core_limit = core_limit
        self._clock = clock
        # The wait for the daemon runs on these two, so a test can drive it without waiting for it.
        self._monotonic = monotonic
        self._sleep = sleep
        self._client = AsyncClient(opts.socket, retries=1, refresh_fraction=opts.refresh_fraction)
        self._creds: list[_Credential] = []
        # Tokens of a killed earlier run that could not be revoked when this run started.
        self._inherited: list[tuple[str, float]] = []
        self._dir: CredentialDir | None = None
        self._wake = asyncio.Event()
        self._restart = asyncio.Event()
        self._exiting = False
        self._stopped_by: int | None = None  # the signal that ended us before the child started
        self._preparing: asyncio.Task[None] | None = None
        self._proc: Child | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        # Installed before anything is minted: a signal while we wait for the daemon must still end in
        # _finish (tokens revoked, directory deleted), never in a default death that leaves files behind.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, self._forward, sig)
        tasks: list[asyncio.Task[None]] = []
        try:
            self._preparing = asyncio.create_task(self._prepare())
            try:
                await self._preparing
            except (BrokerError, OSError) as exc:
                log.error("%s", exc)
                if isinstance(exc, Refused) and exc.request_id:
                    log.error("%s", exc.where_to_look)
                return 1
            except asyncio.CancelledError:
                if self._stopped_by is None:
                    raise  # cancelled from outside, not by a signal of ours
                log.warning("stopped by signal %d before the command started", self._stopped_by)
                return 128 + self._stopped_by
            tasks = [asyncio.create_task(self._refresh_loop()), asyncio.create_task(self._watch_revocations())]
            tasks += [asyncio.create_task(self._follow_secret(c)) for c in self._creds if c.has_secret]
            return await self._supervise()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._finish()

    async def _prepare(self) -> None:
        described = await self._retry_until_ready(lambda: self._client.describe(self._o.workflow))
        by_name = {t.tool: t for t in described}
        unknown = [t for t in self._o.tools if t not in by_name]
        if unknown:
            raise BrokerError(f"workflow {self._o.workflow!r} has no tool(s) {', '.join(unknown)}")
        chosen = [by_name[t] for t in (self._o.tools or tuple(by_name))]
        self._dir = CredentialDir()
        if self._dir.stale_tokens:
            # A run killed before it could clean up (kill -9, OOM) left tokens that its agent's children
            # may still hold: they stop verifying now, not at their expiry.
            log.warning("revoking %d token(s) of an earlier run that was killed", len(self._dir.stale_tokens))
            failed = await self._revoke([t for t, _ in self._dir.stale_tokens], "of a killed earlier run")
            # What could not be revoked stays in this run's list: revoked at its end, or by the next run.
            self._inherited = [i for i in self._dir.stale_tokens if i[0] in failed]
            self._dir.record_issued(self._inherited)
        for t in chosen:
            # A tool with no delivery configured still gets a file: something the agent can read.
            self._creds.append(_Credential(t.tool, t.env, t.file or ("" if t.env else f"{t.tool}.token"),
                                           t.has_secret))
        for cred in self._creds:
            self._store(cred, await self._retry_until_ready(functools.partial(self._mint, cred)))
            if cred.has_secret:
                # The upstream credential (from Vault) goes next to the token, as JSON.
                self._store_secret(cred, await self._retry_until_ready(functools.partial(self._open_secret, cred)))
        self._dir.bump()

    async def _retry_until_ready(self, call: Callable[[], Awaitable[T]]) -> T:
        """Before the child starts: retry while the daemon is unreachable, up to --wait-timeout."""
        start = self._monotonic()
        deadline = start + self._o.wait_timeout
        delay = 0.2
        next_note = 0.0  # when to say again that we are still waiting
        while True:
            try:
                return await call()
            except Unavailable as exc:
                now = self._monotonic()
                if now >= deadline:
                    # The time actually waited, not the option: the two differ by the last attempt.
                    raise BrokerError(f"gave up after {now - start:.1f}s: {exc}") from None
                if now >= next_note:
                    # Silence looks like a hang: say what we wait for at once, then every PROGRESS_EVERY.
                    if isinstance(exc, UpstreamUnavailable):
                        log.warning("waiting for an upstream credential: %.0fs of %s (--wait-timeout); the "
                                    "daemon says: %s", now - start, _seconds(self._o.wait_timeout), exc)
                    else:
                        log.warning("waiting for the broker daemon at %s: %.0fs of %s (--wait-timeout)",
                                    self._client.socket_path, now - start, _seconds(self._o.wait_timeout))
                    next_note = now + PROGRESS_EVERY
                # Never sleep past the deadline, and try once more at it: giving up early (before the
                # full wait) would make --wait-timeout a lie.
                await self._sleep(min(delay, deadline - now))
                delay = min(delay * 2, 5.0)

    async def _mint(self, cred: _Credential) -> Minted:
        return await self._client.mint(self._o.workflow, cred.tool)

    def _store(self, cred: _Credential, minted: Minted) -> None:
        assert self._dir is not None
        cred.minted = minted
        now = self._clock()
        # Expired tokens need no revocation: the list holds only what could still be presented.
        cred.issued = [(t, exp) for t, exp in cred.issued if exp > now]
        cred.issued.append((minted.token, minted.expires_at))
        # Written down before the token reaches the agent: if this sidecar is killed, the next run revokes it.
        self._dir.record_issued([*self._inherited, *(i for c in self._creds for i in c.issued)])
        cred.refresh_at = minted.refresh_at(self._o.refresh_fraction)
        cred.backoff = 0.5
        if cred.file:
            self._dir.write(cred.file, minted.token.encode() + b"\n")

    def _store_secret(self, cred: _Credential, secret: SecretValue) -> bool:
        assert self._dir is not None
        key = (secret.version, secret.lease_id or "")
        if key == cred.secret_key:
            return False
        doc = {"kind": secret.kind, "version": secret.version, "expires_at": secret.expires_at,
               "data": dict(secret.data)}
        self._dir.write(f"{cred.tool}.secret.json", json.dumps(doc).encode())
        cred.secret_key, cred.secret_expires = key, secret.expires_at or 0.0
        return True

    async def _open_secret(self, cred: _Credential) -> SecretValue:
        """Open this run's own secret stream and return its first value."""
        stream = self._client.watch_secret(cred.tool, workflow=self._o.workflow, per_run=True)
        try:
            first = await anext(stream)
        except BaseException:
            await stream.aclose()
            raise
        cred.secret_stream = stream
        return first

    async def _follow_secret(self, cred: _Credential) -> None:
        """Swap the secret file at every rotation the daemon pushes; drop it once it has expired."""
        backoff = 0.2
        while True:
            try:
                if cred.secret_stream is None and self._store_secret(cred, await self._open_secret(cred)):
                    self._publish(files=True, env=False)
                assert cred.secret_stream is not None
                async for secret in cred.secret_stream:
                    backoff = 0.2
                    if self._store_secret(cred, secret):
                        self._publish(files=True, env=False)
            except (BrokerError, StopAsyncIteration, OSError) as exc:
                log.warning("secret stream for %s interrupted (%s)", cred.tool, exc)
            cred.secret_stream = None
            if cred.secret_expires and self._clock() >= cred.secret_expires and self._dir is not None:
                log.error("secret for %s expired and could not be renewed; removed it", cred.tool)
                self._dir.remove(f"{cred.tool}.secret.json")
                cred.secret_key, cred.secret_expires = (0, ""), 0.0
                self._dir.bump()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    def _child_env(self) -> dict[str, str]:
        assert self._dir is not None
        env = dict(os.environ)
        env["BROKER_CREDENTIALS_DIR"] = self._dir.path
        for cred in self._creds:
            if cred.env and cred.minted is not None:
                env[cred.env] = cred.minted.token
        return env

    async def _supervise(self) -> int:
        while True:
            self._proc = Child.spawn(self._o.command, self._child_env(), self._core_limit)
            self._restart.clear()
            waiter = asyncio.create_task(self._proc.wait())
            restart = asyncio.create_task(self._restart.wait())
            await asyncio.wait({waiter, restart}, return_when=asyncio.FIRST_COMPLETED)
            restart.cancel()
            if waiter.done():  # it exited on its own: its status is the answer, even if a restart was due
                code = waiter.result()
                return 128 - code if code < 0 else code
            log.info("restarting the child to deliver new credentials")
            await self._stop_child(waiter)
            if self._exiting:
                code = waiter.result()
                return 128 - code if code < 0 else code

    async def _stop_child(self, waiter: asyncio.Task[int]) -> None:
        proc = self._proc
        assert proc is not None
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(waiter), self._o.grace)
            except TimeoutError:
                proc.kill()
        await waiter

    def _forward(self, sig: int) -> None:
        if sig in (signal.SIGINT, signal.SIGTERM):
            self._exiting = True
        if self._proc is not None and self._proc.returncode is None:
            self._proc.send_signal(sig)
        elif self._proc is None and self._preparing is not None and not self._preparing.done() \
                and sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._stopped_by = sig
            self._preparing.cancel()

    async def _refresh_loop(self) -> None:
        while True:
            now = self._clock()
            due = [c for c in self._creds if now >= c.refresh_at]
            changed_files = changed_env = False
            for cred in due:
                changed = await self._refresh(cred, now)
                changed_files |= changed and bool(cred.file)
                changed_env |= changed and bool(cred.env)
            if changed_files or changed_env:
                self._publish(changed_files, changed_env)
            self._expire(self._clock())
            soonest = min([c.refresh_at for c in self._creds] +
                          [c.minted.expires_at - EXPIRY_MARGIN for c in self._creds if c.minted], default=now + 60)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.05, soonest - self._clock()))

    async def _refresh(self, cred: _Credential, now: float) -> bool:
        try:
            self._store(cred, await self._mint(cred))
        except (BrokerError, OSError) as exc:
            # The daemon away or refusing, or the file could not be written (tmpfs full): keep what we
            # have until it expires (_expire() removes it then) and retry with backoff. Never let the
            # loop die: a dead loop would also stop _expire, and the child would keep a dead token.
            cred.refresh_at = now + cred.backoff
            cred.backoff = min(cred.backoff * 2, MAX_BACKOFF)
            log.warning("could not refresh %s (%s); retrying in %.1fs", cred.tool,
                        type(exc).__name__, cred.refresh_at - now)
            return False
        return True

    def _publish(self, files: bool, env: bool) -> None:
        assert self._dir is not None
        if files:
            self._dir.bump()
            if self._o.signal is not None and self._proc is not None and self._proc.returncode is None:
                self._proc.send_signal(self._o.signal)
        if env:
            if self._o.restart:
                self._restart.set()
            else:
                log.warning("new credentials for environment variables reach the child only with "
                            "--restart; the running child keeps the old ones until they expire")

    def _expire(self, now: float) -> None:
        assert self._dir is not None
        expired = [c for c in self._creds if c.minted is not None and now >= c.minted.expires_at - EXPIRY_MARGIN]
        for cred in expired:
            # An agent must fail loudly, not keep presenting a dead token.
            log.error("credential for %s expired and could not be renewed; removed it", cred.tool)
            cred.minted = None
            if cred.file:
                self._dir.remove(cred.file)
        if expired:
            self._dir.bump()

    async def _watch_revocations(self) -> None:
        backoff = 0.2
        while True:
            try:
                async for _, revoked in self._client.watch():
                    backoff = 0.2
                    for cred in self._creds:
                        if cred.minted is not None and cred.minted.jti in revoked:
                            log.warning("credential for %s was revoked; replacing it", cred.tool)
                            cred.refresh_at = 0.0
                            self._wake.set()
            except BrokerError as exc:
                log.debug("revocation stream interrupted (%s)", exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def _finish(self) -> None:
        for cred in self._creds:
            if cred.secret_stream is not None:
                # Ending the stream is the daemon's signal to revoke the lease issued to this run.
                with contextlib.suppress(Exception):
                    await cred.secret_stream.aclose()
        now = self._clock()
        # Newest first: those live longest.
        issued = sorted(((t, exp) for t, exp in [*self._inherited, *(i for c in self._creds for i in c.issued)]
                         if exp > now), key=lambda i: -i[1])
        # Tell the daemon this run is over: its tokens stop verifying now, not at their expiry.
        failed = await self._revoke([t for t, _ in issued], "of this run")
        if self._dir is not None:
            left = [i for i in issued if i[0] in failed]
            if left:
                # The daemon is away: the list stays, and the next run (once this pid is gone) revokes them.
                self._dir.record_issued(left)
                log.warning("the next broker exec of this user revokes them if they are still alive")
            self._dir.cleanup(keep_issued=bool(left))
        await self._client.close()

    async def _revoke(self, tokens: list[str], whose: str) -> set[str]:
        """Revoke in batches; return the tokens that could not be revoked."""
        failed: set[str] = set()
        # Each batch on its own, so one failure skips no other.
        for i in range(0, len(tokens), REVOKE_BATCH):
            batch = tokens[i:i + REVOKE_BATCH]
            try:
                await asyncio.wait_for(self._client.revoke(batch), 5)
            except (BrokerError, TimeoutError) as exc:
                failed.update(batch)
                log.warning("could not revoke %d token(s) %s (%s); they end at their expiry",
                            len(batch), whose, type(exc).__name__)
        return failed


class Child:
    """The agent process: spawned without fork(2), watched through a pidfd.

    posix_spawn (clone with CLONE_VFORK underneath) runs no fork handlers: forking a process whose gRPC
    threads are busy can deadlock or crash it, and this process always has gRPC threads.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd = os.pidfd_open(pid)
        self._done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().add_reader(self._pidfd, self._reap)

    @classmethod
    def spawn(cls, command: list[str], env: dict[str, str], core_limit: int = 0) -> Child:
        # The wrapper sets PR_SET_PDEATHSIG, then execs the command: if we die, the agent dies too.
        # -P: the working directory is not put on the import path, so a "broker" folder there cannot
        # stand in for the wrapper (it would run with the credentials and without PDEATHSIG).
        # The agent gets back the core-file limit this sidecar gave up (core_limit).
        argv = [sys.executable, "-P", "-m", "broker.sidecar._pdeathsig", str(os.getpid()), str(core_limit),
                *command]
        return cls(os.posix_spawn(sys.executable, argv, env))

    def _reap(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        _, status = os.waitpid(self.pid, 0)
        self.returncode = os.waitstatus_to_exitcode(status)
        self._done.set_result(self.returncode)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            signal.pidfd_send_signal(self._pidfd, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        return await asyncio.shield(self._done)


def run(opts: ExecOptions) -> int:
    # Tokens and upstream secrets live in this process's memory: a crash must not write them to a core
    # file. The agent gets the original limit back (its own memory is its business).
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, hard))

    async def main() -> int:
        # Built inside the running loop: a grpc.aio channel belongs to the loop that created it.
        return await Sidecar(opts, core_limit=soft).run()

    return uvloop.run(main())
