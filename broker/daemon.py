"""The composition root: wires config, keys, audit, metrics, the gRPC servicers and the front door,
then runs until SIGTERM/SIGINT; SIGHUP reloads the config and reopens the audit log, SIGUSR1 only
reopens the audit log (logrotate).

Nothing else in the package constructs these parts; tests start the real daemon as a process.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import resource
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import grpc
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from broker import _nocore, _pump, systemd, tokens
from broker import config as config_mod
from broker._spiffe import workload_pb2, workload_pb2_grpc
from broker.audit import DENIAL_WINDOW, AuditLog
from broker.config import Config
from broker.errors import BrokerError, ConfigError
from broker.frontdoor import FrontDoor, bind_public, file_identity, unlink_if_same
from broker.health import HealthServicer
from broker.instrument import Instrument
from broker.keyring import KeyRing, KeySource, MemoryKeySource
from broker.metrics import FuncCollector, Metrics
from broker.service import BrokerService, Runtime, WorkloadAPI
from broker.tokens import VerifyKey
from broker.v1 import broker_pb2, broker_pb2_grpc
from broker.vault import FleetJwks, SecretManager, VaultError, VaultSession

log = logging.getLogger("broker")

# Requests are a few hundred bytes; anything near this limit is garbage or an attack.
MAX_REQUEST_BYTES: Final = 64 * 1024
SHUTDOWN_GRACE: Final = 5.0
# After SIGTERM, requests already sent on open connections are still answered normally for this long
# before the server starts refusing new calls, so nothing a client sent before the signal fails.
SHUTDOWN_DRAIN: Final = 0.5
MAX_STREAMS_PER_CONNECTION: Final = 32
SERVER_OPTIONS: Final = [
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
    ("grpc.max_send_message_length", 4 * 1024 * 1024),
    # Header blocks: a request's metadata is a few hundred bytes. Above the soft limit some calls are
    # refused, above the hard one all. A header block that never ends (CONTINUATION frames forever)
    # gets the connection closed once past the hard limit, so header bytes cannot pile up.
    ("grpc.max_metadata_size", 8 * 1024),
    ("grpc.absolute_max_metadata_size", 16 * 1024),
    ("grpc.http2.hpack_table_size.decoder", 4096),
    ("grpc.http2.max_frame_size", 16384),
    # Control frames: a client may ping at most every 5 minutes without a call in between; the third
    # ping too early gets GOAWAY and the connection is closed (our clients never send keepalive pings).
    ("grpc.http2.min_ping_interval_without_data_ms", 5 * 60 * 1000),
    ("grpc.http2.max_ping_strikes", 2),
    ("grpc.keepalive_permit_without_calls", 0),
    # Calls one connection may have open at once; a client with more queues them itself. With the
    # front door's connections per uid this bounds what one uid can make the server hold before the
    # per-uid admission in broker.instrument holds its calls back (it counts every call, so a uid's
    # share of the handlers is its admission limit, however many connections it opens).
    ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
    # A connection idle this long is closed, freeing its front-door slot (clients reconnect on demand).
    ("grpc.max_connection_idle_ms", 10 * 60 * 1000),
]
SERVICE_NAMES: Final = (
    broker_pb2.DESCRIPTOR.services_by_name["Broker"].full_name,
    workload_pb2.DESCRIPTOR.services_by_name["SpiffeWorkloadAPI"].full_name,
)
# Settings a running daemon cannot change in place: a reload that changes them is refused.
RESTART_ONLY: Final = ("trust_domain", "socket", "algorithm", "rotate_every", "max_connections",
                       "max_connections_per_uid", "audit_log")


# How often freed heap is handed back to the kernel (see Daemon._trim_memory).
MEMORY_TRIM_EVERY: Final = 10.0
# The gRPC server's socket: <directory of broker.socket>/<prefix + 8 random characters>/<socket name>.
INTERNAL_DIR_PREFIX: Final = ".broker-internal-"
INTERNAL_SOCKET: Final = "grpc.sock"
UNIX_PATH_MAX: Final = 107  # bytes in sun_path, without the terminating NUL

VAULT_HEALTH_SERVICE: Final = "broker.vault"
VAULT_HEALTH_EVERY: Final = 2.0


class _FleetKeys:
    """The key view when Vault is configured: every live broker's keys, ours included."""

    def __init__(self, fleet: FleetJwks) -> None:
        self._fleet = fleet

    @property
    def verify_keys(self) -> Mapping[str, VerifyKey]:
        return self._fleet.keys()

    @property
    def jwks_json(self) -> str:
        return self._fleet.jwks_json()

    async def learn_keys(self) -> bool:
        return await self._fleet.refresh_soon()


@dataclass
class _Vault:
    session: VaultSession
    fleet: FleetJwks
    secrets: SecretManager

    def degraded(self) -> list[str]:
        return [r for r in (self.session.degraded, self.secrets.degraded) if r]

    async def close(self) -> None:
        # Leases first (they need our token), then the heartbeat, then our own token.
        await self.secrets.close()
        await self.fleet.close()
        await self.session.close()


def _max_ttl(config: Config) -> int:
    return max([config.broker.token_ttl] + [t.ttl for wf in config.workflows.values() for t in wf.tools.values()])


class Daemon:
    def __init__(self, config: Config, config_path: str | None = None, *, key_source: KeySource | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if config.broker.require_native:
            tokens.require_native()
        self.config = config
        self._config_path = config_path
        self._clock = clock
        self._started = clock()
        self._serving = False  # set once READY=1 was sent
        b = config.broker
        self.ring = KeyRing(key_source or MemoryKeySource(), b.algorithm, b.rotate_every, _max_ttl(config), clock(),
                            svid_alg=tokens.svid_algorithm(b.algorithm))
        self.audit = AuditLog(b.audit_log, clock)
        self.metrics = Metrics()
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._frontdoor: FrontDoor | None = None
        self._rt: Runtime | None = None
        self._vault: _Vault | None = None

    def request_stop(self) -> None:
        self._stop.set()

    def _listener(self) -> tuple[socket.socket, bool]:
        """The public socket: adopted from the service manager (socket activation) or bound here."""
        passed = systemd.listen_fds()
        if not passed:
            return bind_public(self.config.broker.socket), False
        if len(passed) != 1:
            raise BrokerError(f"socket activation: expected one socket, got {len(passed)}")
        name = passed[0].getsockname()
        if name != self.config.broker.socket:
            raise BrokerError(f"socket activation: passed socket {name!r} is not broker.socket "
                              f"({self.config.broker.socket!r}) from the config")
        return passed[0], True

    async def run(self) -> None:
        b = self.config.broker
        _check_internal_path(b.socket)
        # Until it serves, a failed start undoes what it made (socket files, the internal directory, Vault
        # leases), so that nothing is left behind; from then on the shutdown below does that.
        async with contextlib.AsyncExitStack() as undo:
            if self.config.metrics_listen:
                # First: a metrics port or socket in use must stop the start before anything else exists.
                self.metrics.bind(self.config.metrics_listen)
                undo.callback(self.metrics.close)
            listener, adopted = self._listener()
            bound = None if adopted else file_identity(b.socket)
            undo.callback(unlink_if_same, b.socket, bound)
            undo.callback(listener.close)
            watchdog = asyncio.create_task(self._watchdog()) if systemd.watchdog_interval() else None
            if watchdog is not None:
                undo.callback(watchdog.cancel)
            # The gRPC server listens only inside a private 0700 directory: no one but us (and root)
            # can reach it, so every request it sees came through the front door.
            internal_dir = tempfile.mkdtemp(prefix=INTERNAL_DIR_PREFIX, dir=os.path.dirname(b.socket) or None)
            undo.callback(shutil.rmtree, internal_dir, ignore_errors=True)
            internal = os.path.join(internal_dir, INTERNAL_SOCKET)
            frontdoor = self._frontdoor = FrontDoor(listener, internal, b.max_connections, b.max_connections_per_uid)
            # No maximum_concurrent_rpcs: grpc.aio's global limit refuses calls before any interceptor
            # knows their caller, so one uid could fill it for everyone. Instrument limits per uid first,
            # then in total.
            server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[Instrument(self.metrics, frontdoor)])
            rt = self._rt = Runtime(self.config, self.ring, self.audit, frontdoor, self._clock, metrics=self.metrics)
            self.metrics.add_collector(FuncCollector(lambda: {
                "connections": frontdoor.connections, "accepted": frontdoor.accepted, "refused": frontdoor.refused,
                "key_ages": self.ring.key_ages(self._clock()), "revoked": len(rt.revoked),
                "uptime": self._clock() - self._started,
                **({"vault_leases": self._vault.secrets.leases, "vault_degraded": int(bool(self._vault.degraded()))}
                   if self._vault else {})}))
            health_servicer = HealthServicer()
            served = (
                (broker_pb2_grpc.add_BrokerServicer_to_server, BrokerService(rt, self), SERVICE_NAMES[0]),
                (workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server, WorkloadAPI(rt), SERVICE_NAMES[1]),
                (health_pb2_grpc.add_HealthServicer_to_server, health_servicer,
                 health_pb2.DESCRIPTOR.services_by_name["Health"].full_name),
            )
            for add, servicer, _ in served:
                add(servicer, server)
            # Reflection lists what is registered, from the same table: clients (and tests/test_every_rpc.py,
            # which calls every RPC reflection names) see every service the server has.
            reflection.enable_server_reflection((*(name for _, _, name in served), reflection.SERVICE_NAME), server)
            vault_entry = (VAULT_HEALTH_SERVICE,) if self.config.vault else ()
            for name in ("", *SERVICE_NAMES, *vault_entry):
                await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
            if self.config.vault is not None:
                self._vault = await self._start_vault(rt)
                undo.push_async_callback(self._vault.close)  # its leases and token end with a failed start
            server.add_insecure_port(f"unix:{internal}")
            await server.start()
            undo.push_async_callback(server.stop, None)
            frontdoor.start()
            undo.callback(frontdoor.close)
            if self.config.metrics_listen:
                self.metrics.start()
            for name in ("", *SERVICE_NAMES):
                await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
            log.info("ready socket=%s%s trust_domain=%s workflows=%d algorithm=%s kid=%s token_backend=%s "
                     "pump_backend=%s metrics=%s", b.socket, " (socket-activated)" if adopted else "",
                     b.trust_domain, len(self.config.workflows), b.algorithm, self.ring.current.kid, tokens.BACKEND,
                     _pump.BACKEND, self.config.metrics_listen or "off")
            systemd.notify(f"READY=1\nSTATUS=serving {len(self.config.workflows)} workflows")
            self._serving = True
            undo.pop_all()  # serving: the shutdown below owns all of it now
        rotation = asyncio.create_task(self._rotate(rt))
        audit_flush = asyncio.create_task(self._flush_audit())
        memory_trim = asyncio.create_task(self._trim_memory())
        vault_health = asyncio.create_task(self._watch_vault(health_servicer)) if self._vault else None
        try:
            await self._stop.wait()
        finally:
            systemd.notify("STOPPING=1")
            log.info("stopping")
            for name in ("", *SERVICE_NAMES):
                await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
            rotation.cancel()
            audit_flush.cancel()
            memory_trim.cancel()
            if vault_health is not None:
                vault_health.cancel()
            # Order matters: refuse new connections, let in-flight calls finish through the relay,
            # then drop the relayed connections.
            frontdoor.stop_accepting()
            await rt.close_streams()
            await health_servicer.close()  # after NOT_SERVING above: every watcher has seen it
            await asyncio.sleep(SHUTDOWN_DRAIN)
            await server.stop(SHUTDOWN_GRACE)
            await asyncio.get_running_loop().run_in_executor(None, frontdoor.close)
            if self._vault is not None:
                await self._vault.close()
            self.metrics.close()
            self.audit.close()
            # An adopted socket file belongs to the service manager; one replaced meanwhile, to whoever
            # replaced it.
            unlink_if_same(b.socket, bound)
            shutil.rmtree(internal_dir, ignore_errors=True)
            if watchdog is not None:
                watchdog.cancel()
            log.info("stopped")

    async def _start_vault(self, rt: Runtime) -> _Vault:
        v = self.config.vault
        assert v is not None
        session = VaultSession(v, clock=self._clock, observe=self.metrics.observe_vault)
        await session.start()  # a failed login is retried in the background; we serve meanwhile
        fleet = FleetJwks(session, v, max_token_ttl=_max_ttl(self.config), clock=self._clock,
                          on_change=rt.keys_changed)
        rt.keys = _FleetKeys(fleet)
        try:
            await fleet.publish(self.ring.verify_keys.values())  # keeps the previous run's keys first
            await fleet.refresh()
        except VaultError as exc:
            log.warning("vault: fleet JWKS not in sync yet (%s); retrying in the background", exc)
        fleet.start()
        await rt.keys_changed()
        secrets = SecretManager(session, self.config.workflows, kv_refresh=v.kv_refresh,
                                max_staleness=v.max_staleness, clock=self._clock)
        secrets.start()
        rt.secrets = secrets
        log.info("vault: %s as instance %s (%s)", v.address, fleet.instance,
                 "logged in" if session.logged_in else "not logged in yet")
        return _Vault(session, fleet, secrets)

    async def _watch_vault(self, health_servicer: HealthServicer) -> None:
        assert self._vault is not None
        last: list[str] | None = None
        while True:
            degraded = self._vault.degraded()
            if degraded != last:
                # Minting never depends on Vault, so only the vault entry changes, not overall health.
                status = health_pb2.HealthCheckResponse
                await health_servicer.set(VAULT_HEALTH_SERVICE, status.NOT_SERVING if degraded else status.SERVING)
                if degraded:
                    log.warning("vault degraded: %s", "; ".join(degraded))
                elif last is not None:
                    log.info("vault recovered")
                last = degraded
            await asyncio.sleep(VAULT_HEALTH_EVERY)

    async def _rotate(self, rt: Runtime) -> None:
        while True:
            await asyncio.sleep(min(self.ring.next_due(self._clock()), 60.0) + 0.05)
            if self.ring.tick(self._clock()):
                log.info("keys changed: current kid=%s jwks_version=%d", self.ring.current.kid, self.ring.version)
                if self._vault is not None:
                    try:
                        # The ring's next key is in this set: siblings learn it a rotation before it signs.
                        await self._vault.fleet.publish(self.ring.verify_keys.values())
                    except VaultError as exc:
                        log.warning("vault: could not publish keys (%s); retrying in the background", exc)
                await rt.keys_changed()

    async def _flush_audit(self) -> None:
        # Summaries of suppressed denials are written when their window ends, even if no denial follows.
        while True:
            await asyncio.sleep(DENIAL_WINDOW)
            try:
                self.audit.flush()
            except (BrokerError, OSError) as exc:
                log.error("audit log: could not write suppressed-denial summaries: %s", exc)

    async def _trim_memory(self) -> None:
        # glibc keeps the heap a flood made the daemon allocate (grpc core's calls, their Python
        # tasks) long after it freed it; malloc_trim hands the free pages back to the kernel. Off the
        # event loop: it walks the heap.
        trim = _malloc_trim()
        if trim is None:
            return
        while True:
            await asyncio.sleep(MEMORY_TRIM_EVERY)
            await asyncio.to_thread(trim, 0)

    async def _watchdog(self) -> None:
        interval = systemd.watchdog_interval() or 1.0
        while True:
            # Ping only while the front door still accepts: a wedged daemon should be restarted.
            if self._frontdoor is None or self._frontdoor.accepting:
                systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def reopen_audit(self) -> None:
        try:
            self.audit.reopen()
        except BrokerError as exc:
            log.error("audit log not reopened: %s", exc)
        else:
            log.info("audit log reopened")

    async def reload(self, who: dict[str, object]) -> tuple[bool, list[str], str]:
        """Re-read the config: validate fully, then swap atomically, or keep the old one. Always audited."""
        if not self._serving:
            # A SIGHUP while starting: the config being started is the one on disk already read; saying
            # READY=1 here would tell the service manager we serve before we do.
            log.warning("reload requested while starting: ignored (the daemon reads the file as it starts)")
            return False, ["the daemon is still starting"], self.config.sha256
        async with self._reload_lock:
            systemd.notify(systemd.reloading_state())
            try:
                return await self._reload(who)
            finally:
                systemd.notify("READY=1")

    async def _reload(self, who: dict[str, object]) -> tuple[bool, list[str], str]:
        old = self.config
        rt = self._rt
        assert rt is not None
        problems: list[str] = []
        new: Config | None = None
        if self._config_path is None:
            problems.append("the daemon was not started from a config file")
        else:
            try:
                new = await asyncio.get_running_loop().run_in_executor(None, config_mod.load, self._config_path)
            except ConfigError as exc:
                problems = [str(p) for p in exc.problems]
        if new is not None:
            problems += [f"broker.{k}: changing it needs a restart" for k in RESTART_ONLY
                         if getattr(new.broker, k) != getattr(old.broker, k)]
            if new.vault != old.vault or new.metrics_listen != old.metrics_listen:
                problems.append("[vault] and [metrics] changes need a restart")
            old_specs = _secret_specs(old)
            if any(old_specs.get(key) != spec for key, spec in _secret_specs(new).items()):
                problems.append("adding or changing a tool's secret needs a restart")
            if _max_ttl(new) > _max_ttl(old):
                problems.append("raising a ttl above the longest one in force needs a restart (key retirement)")
        with contextlib.suppress(BrokerError):
            self.audit.reopen()  # logrotate sends SIGHUP after renaming the file
        if problems or new is None:
            for p in problems:
                log.error("reload refused: %s", p)
            self.audit.record("reload", **who, decision="deny", reason="; ".join(problems)[:2000],
                              old_sha256=old.sha256)
            self.metrics.reloads.labels("refused").inc()
            return False, problems, old.sha256
        removed = [f"{wf}/{tool}" for wf, w in old.workflows.items() for tool in w.tools
                   if wf not in new.workflows or tool not in new.workflows[wf].tools]
        removed += [wf for wf in old.workflows if wf not in new.workflows]
        # One assignment: every request sees either the old or the new config, never a mix.
        self.config = rt.config = new
        if self._vault is not None:
            still = _secret_specs(new)
            for wf, tool in _secret_specs(old):
                if (wf, tool) not in still:  # the workflow, the tool or just its secret went away
                    await self._vault.secrets.revoke_workflow(wf, tool)  # its leases end with it
        self.audit.record("reload", **who, decision="allow", old_sha256=old.sha256, new_sha256=new.sha256,
                          removed_scopes=removed,
                          reason="tokens of removed scopes no longer verify" if removed else "no scope removed")
        self.metrics.reloads.labels("applied").inc()
        log.info("reloaded config sha256=%s workflows=%d removed_scopes=%s", new.sha256[:12], len(new.workflows),
                 removed or "none")
        return True, [], new.sha256

    def status(self) -> dict[str, Any]:
        now = self._clock()
        fd = self._frontdoor
        mints = sum(s.value for m in self.metrics.registry.collect() if m.name == "broker_mints"
                    for s in m.samples if s.name.endswith("_total"))
        denials = sum(s.value for m in self.metrics.registry.collect() if m.name == "broker_denials"
                      for s in m.samples if s.name.endswith("_total"))
        return {
            "uptime_seconds": round(now - self._started, 1),
            "token_backend": tokens.BACKEND, "pump_backend": _pump.BACKEND,
            "trust_domain": self.config.broker.trust_domain, "config_sha256": self.config.sha256,
            "workflows": sorted(self.config.workflows),
            # svid_current differs from current when tool tokens use an algorithm JWT-SVIDs may not.
            "keys": {"current": self.ring.current.kid, "svid_current": self.ring.svid_current.kid,
                     "published": sorted(self.ring.verify_keys),
                     "current_age_seconds": round(now - self.ring.rotated_at, 1)},
            "mints": int(mints), "denials": int(denials),
            "connections": fd.connections if fd else 0,
            "revoked_tokens": len(self._rt.revoked) if self._rt else 0,
            "degraded": self._vault.degraded() if self._vault else [],
            # Named even when all is well: an operator must see that Vault is in use, not only its faults.
            "vault": self.config.vault.address if self.config.vault else None,
        }


def _secret_specs(config: Config) -> dict[tuple[str, str], object]:
    # Only additions and changes need a restart; a removed workflow's secrets are revoked on reload.
    return {(wf.name, t.name): t.secret for wf in config.workflows.values() for t in wf.tools.values()
            if t.secret is not None}


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl)."""
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except AttributeError:
        return None
    return trim


def _check_internal_path(public: str) -> None:
    """Refuse, before binding anything, a socket directory too long for the internal socket inside it."""
    directory = os.path.dirname(public)
    # mkdtemp adds 8 random characters to the prefix.
    internal = os.path.join(directory, INTERNAL_DIR_PREFIX + "x" * 8, INTERNAL_SOCKET)
    if len(os.fsencode(internal)) > UNIX_PATH_MAX:
        room = UNIX_PATH_MAX - (len(os.fsencode(internal)) - len(os.fsencode(directory)))
        raise BrokerError(f"broker.socket: the daemon's internal socket in {directory} would pass the "
                          f"{UNIX_PATH_MAX}-byte limit of Unix socket paths; use a directory of at most {room} bytes")


def _raise_fd_limit(max_connections: int) -> None:
    # Each relayed connection holds four fds: the agent's, the upstream one, the pidfd, and the socket
    # gRPC accepted at the other end of the upstream one (same process).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, max_connections * 4 + 256)
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def serve(config: Config, config_path: str | None = None) -> None:
    """Run the daemon in the foreground until SIGINT or SIGTERM; SIGHUP reloads, SIGUSR1 reopens the audit log."""
    # Before any key exists: a core file or a same-uid debugger would otherwise read the signing keys.
    _nocore.forbid_core_dumps()
    _raise_fd_limit(config.broker.max_connections)

    async def main() -> None:
        daemon = Daemon(config, config_path)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, daemon.request_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(daemon.reload({"signal": "SIGHUP"})))
        # logrotate's signal: reopen the audit log, and nothing else (SIGHUP would also apply whatever
        # config edit is waiting on disk, at whatever hour the rotation runs).
        loop.add_signal_handler(signal.SIGUSR1, daemon.reopen_audit)
        await daemon.run()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
