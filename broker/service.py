"""The gRPC edge: our ``broker.v1.Broker`` service and the SPIFFE Workload API (JWT half).

This is the only module that maps broker errors to gRPC status codes. Callers get generic text and the
request id of the audit line that holds the precise reason (a member's own mistake is said to it: see
``broker.errors``). Request flow per call:
peer -> attestation (``broker.attest``) -> policy (``broker.policy``) -> token engine -> audit -> reply.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import functools
import json
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from secrets import token_hex as secrets_token_hex
from typing import Any, Final, NoReturn, Protocol

import grpc
from google.protobuf import struct_pb2

from broker import tokens
from broker._spiffe import workload_pb2 as wl
from broker._spiffe import workload_pb2_grpc as wl_grpc
from broker.attest import Caller, PeerCred, attest, exe_hashing, exe_sha256, exe_sha256_known
from broker.config import Config
from broker.errors import REQUEST_ID_HEADER, AttestationError, InvalidToken, PermissionDenied
from broker.keyring import KeyRing
from broker.logs import REQUEST_ID
from broker.metrics import UNKNOWN, Metrics, denial_category
from broker.policy import Grant, authorize_mint, caller_matches, svid_workflows
from broker.v1 import broker_pb2 as pb
from broker.v1 import broker_pb2_grpc as pb_grpc
from broker.vault import NoSecretConfigured, SecretUnavailable, SecretValue

log = logging.getLogger(__name__)
MAX_NAME: Final = 256
# About 100 tokens of typical size fit in one 64 KiB request.
MAX_REVOKE_BATCH: Final = 100
# Revocations are remembered until the token expires; this bounds the memory a caller can pin, and no
# single workflow's callers may take more than a quarter of it from the others.
MAX_REVOKED: Final = 100_000
MAX_REVOKED_PER_WORKFLOW: Final = MAX_REVOKED // 4
SPIFFE_HEADER: Final = ("workload.spiffe.io", "true")


class Peers(Protocol):
    """Maps ``context.peer()`` to the kernel-verified credentials recorded at accept."""

    def lookup(self, peer: str) -> PeerCred | None: ...


class Auditor(Protocol):
    def record(self, event: str, **fields: Any) -> None: ...


class KeyView(Protocol):
    """The keys that verify tokens and the JWKS we publish: the local ring, or the Vault-backed fleet."""

    @property
    def verify_keys(self) -> Mapping[str, tokens.VerifyKey]: ...

    @property
    def jwks_json(self) -> str: ...

    async def learn_keys(self) -> bool:
        """A token named a kid we do not know: look for new keys now (rate-limited); True if found."""
        ...


class Secrets(Protocol):
    """Upstream secrets per (workflow, tool); ``broker.vault.SecretManager`` in production."""

    async def get(self, workflow: str, tool: str) -> SecretValue: ...

    async def refresh(self, workflow: str, tool: str) -> SecretValue: ...

    def watch(self, workflow: str, tool: str) -> AsyncGenerator[SecretValue, None]: ...

    def watch_run(self, workflow: str, tool: str, run: str) -> AsyncGenerator[SecretValue, None]: ...


class Admin(Protocol):
    """What the admin RPCs ask of the daemon that owns the servicers."""

    async def reload(self, who: dict[str, object]) -> tuple[bool, list[str], str]: ...

    def status(self) -> dict[str, Any]: ...


class Runtime:
    """What the servicers share: swappable config, the key ring, revocations, audit, peers, clock."""

    def __init__(self, config: Config, ring: KeyRing, audit: Auditor, peers: Peers,
                 clock: Callable[[], float], *, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.ring = ring
        self.keys: KeyView = ring
        self.secrets: Secrets | None = None
        self.audit = audit
        self.peers = peers
        self.clock = clock
        self.verifier = tokens.Verifier(ring.verify_keys)
        self.revoked: dict[str, int] = {}  # jti -> exp, published on the trust stream
        self._revoked_wf: dict[str, str] = {}  # jti -> workflow, for the per-workflow share
        self._per_workflow: collections.Counter[str] = collections.Counter()
        self._version = 0  # bumps on every key or revocation change
        self._changed = asyncio.Condition()
        self.closing = False

    async def keys_changed(self) -> None:
        """The key set changed (rotation, or a sibling broker's keys): verify with it, wake every stream."""
        self.verifier.set_keys(self.keys.verify_keys)
        self.prune_revoked(int(self.clock()))
        await self._publish()

    async def revoke(self, jti: str, exp: int, workflow: str) -> None:
        self.verifier.revoke(jti, exp)
        if jti not in self.revoked:
            self._revoked_wf[jti] = workflow
            self._per_workflow[workflow] += 1
        self.revoked[jti] = exp
        await self._publish()

    def revoked_for(self, workflow: str) -> int:
        return self._per_workflow[workflow]

    def prune_revoked(self, now: int) -> None:
        """Forget revocations of tokens no verifier accepts any more (past exp + the largest leeway)."""
        keep = {j: e for j, e in self.revoked.items() if e + tokens.MAX_LEEWAY > now}
        if len(keep) != len(self.revoked):
            self.revoked = keep
            self._revoked_wf = {j: w for j, w in self._revoked_wf.items() if j in keep}
            self._per_workflow = collections.Counter(self._revoked_wf.values())

    async def close_streams(self) -> None:
        """Shutting down: end every key/revocation stream now instead of holding the stop for them."""
        self.closing = True
        await self._publish()

    async def _publish(self) -> None:
        async with self._changed:
            self._version += 1
            self._changed.notify_all()

    async def trust_updates(self) -> AsyncIterator[tuple[str, dict[str, int]]]:
        """(JWKS, revoked jti -> exp) now, then each time either changes (full state each time)."""
        seen = -1
        while not self.closing:
            if self._version != seen:
                seen = self._version
                yield self.keys.jwks_json, dict(self.revoked)
                continue
            async with self._changed:
                await self._changed.wait_for(self._changed_since(seen))

    def _changed_since(self, version: int) -> Callable[[], bool]:
        return lambda: self._version != version

    async def caller(self, context: grpc.aio.ServicerContext[Any, Any], *, hash_exe: bool = True) -> Caller:
        cred = self.peers.lookup(context.peer())
        if cred is None:
            # Only connections relayed by the front door carry a recorded identity.
            raise AttestationError(f"no kernel identity for peer {context.peer()!r}")
        caller = attest(cred)
        if hash_exe and self.config.hashes_exe:
            # Hashing a binary the first time (or after it changed) reads all of it: seconds for a large
            # one. Only when a hash-pinned block could admit this caller, on a worker thread, bounded
            # per uid and in total, so no caller waits for another uid's hash.
            await exe_hashing.ensure(caller, (r for wf in self.config.workflows.values() for r in wf.callers))
        return caller

    async def caller_fields(self, context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, object]:
        """The caller's audit fields for a refusal's line (a bad token, an admin RPC by a non-admin);
        nothing when it cannot be attested: the refusal stands either way."""
        try:
            # Not hashed: the line does not carry the digest, and anyone can cause refusals at will.
            return (await self.caller(context, hash_exe=False)).audit_fields()
        except AttestationError:
            return {}

    def mint(self, grant: Grant, audience: tuple[str, ...], now: int,
             key: tokens.SigningKey | None = None) -> tuple[bytes, str, int]:
        """Sign a token for ``grant`` with ``key``, by default the ring's current tool-token key."""
        cfg = self.config.broker
        jti = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()  # 128 random bits
        wf, tool = grant.workflow, grant.tool
        claims = tokens.Claims(
            iss=f"spiffe://{cfg.trust_domain}", sub=f"spiffe://{cfg.trust_domain}/workflow/{wf.name}",
            aud=audience, iat=now, nbf=now, exp=now + grant.ttl, jti=jti, tenant=wf.tenant, wf=wf.name,
            tool=tool.name if tool else None, act=tool.actions if tool else (),
            dst=tool.destinations if tool else (),
        )
        return tokens.mint(self.ring.current if key is None else key, claims), jti, claims.exp

    async def verify(self, token: str, audience: str, tool: str | None, now: int,
                     algorithms: frozenset[str] | None = None) -> tokens.Claims:
        """Verify ``token``; with ``algorithms``, also refuse any token signed with another algorithm."""
        expect = tokens.Expect(self.config.broker.trust_domain, audience, tool)
        raw = token.encode("ascii", "replace")
        try:
            try:
                claims = self.verifier.verify(raw, expect, now)
            except InvalidToken as exc:
                # A sibling broker's brand-new key (it restarted moments ago) is learned now, not at
                # the next heartbeat: look once, then decide.
                if exc.reason != "unknown kid" or not await self.keys.learn_keys():
                    raise
                claims = self.verifier.verify(raw, expect, now)
            # A reload may have removed the scope this token was minted for: it ends with the scope.
            wf = self.config.workflows.get(claims.wf)
            if wf is None or (claims.tool is not None and claims.tool not in wf.tools):
                raise InvalidToken("scope removed from the config")
            # Read only now that the signature holds: the header is one we signed, and the engine made sure
            # its alg is the alg of the key that verified it.
            if algorithms is not None and _jws_alg(raw) not in algorithms:
                raise InvalidToken("algorithm not allowed here")
        except InvalidToken:
            self.metrics.verifications.labels("invalid").inc()
            raise
        self.metrics.verifications.labels("valid").inc()
        return claims

    def count_denial(self, workflow: str, tool: str, reason: str) -> None:
        wf = self.config.workflows.get(workflow)
        self.metrics.denials.labels(
            workflow if wf else UNKNOWN, tool if wf and tool in wf.tools else UNKNOWN, denial_category(reason)).inc()

    async def admin(self, context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
        """The caller, if it is root or the daemon's own uid; else PermissionDenied."""
        caller = await self.caller(context)
        if caller.uid not in (0, os.geteuid()):
            raise PermissionDenied(f"uid {caller.uid} is not an administrator")
        return caller


def _jws_alg(token: bytes) -> str:
    """The ``alg`` in the header of a JWS compact token whose signature was verified."""
    header = token.split(b".", 1)[0]
    alg = json.loads(base64.urlsafe_b64decode(header + b"=" * (-len(header) % 4)))["alg"]
    assert isinstance(alg, str)  # the engine verified it against a key's alg
    return alg


async def _abort(context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, msg: str) -> NoReturn:
    await context.abort(code, msg)
    raise AssertionError("unreachable: abort raises")


async def _upstream_unavailable(context: grpc.aio.ServicerContext[Any, Any], exc: SecretUnavailable) -> NoReturn:
    """UNAVAILABLE from the daemon itself: it carries the request id, which tells a client that the daemon
    answered (Vault is what is missing), unlike a connection that failed."""
    rid = REQUEST_ID.get()
    await context.abort(grpc.StatusCode.UNAVAILABLE, f"{exc} (request {rid})",
                        trailing_metadata=((REQUEST_ID_HEADER, rid),))
    raise AssertionError("unreachable: abort raises")


async def _deny(context: grpc.aio.ServicerContext[Any, Any], exc: AttestationError | PermissionDenied) -> NoReturn:
    """PERMISSION_DENIED naming the request id of the audit line that holds the reason (and carrying it as
    trailing metadata); the reason itself only when it is the caller's own business."""
    rid = REQUEST_ID.get()
    text = f"permission denied: {exc.reason}" if isinstance(exc, PermissionDenied) and exc.caller_may_know \
        else "permission denied"
    await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{text} (request {rid})",
                        trailing_metadata=((REQUEST_ID_HEADER, rid),))
    raise AssertionError("unreachable: abort raises")


def _name_ok(value: str, *, allow_empty: bool = False) -> bool:
    return (allow_empty or bool(value)) and len(value) <= MAX_NAME and value.isprintable()


class BrokerService(pb_grpc.BrokerServicer):
    def __init__(self, rt: Runtime, admin: Admin) -> None:
        self._rt = rt
        self._admin = admin

    async def Reload(self, request: pb.ReloadRequest,
                     context: grpc.aio.ServicerContext[Any, Any]) -> pb.ReloadResponse:
        try:
            caller = await self._rt.admin(context)
        except (AttestationError, PermissionDenied) as exc:
            self._rt.audit.record("deny", rpc="Reload", **await self._rt.caller_fields(context), decision="deny",
                                  reason=exc.reason)
            await _deny(context, exc)
        applied, problems, sha = await self._admin.reload(caller.audit_fields())
        return pb.ReloadResponse(applied=applied, problems=problems, config_sha256=sha)

    async def Status(self, request: pb.StatusRequest,
                     context: grpc.aio.ServicerContext[Any, Any]) -> pb.StatusResponse:
        try:
            await self._rt.admin(context)
        except (AttestationError, PermissionDenied) as exc:
            self._rt.audit.record("deny", rpc="Status", **await self._rt.caller_fields(context), decision="deny",
                                  reason=exc.reason)
            await _deny(context, exc)
        return pb.StatusResponse(status_json=json.dumps(self._admin.status(), sort_keys=True))

    async def WhoAmI(self, request: pb.WhoAmIRequest,
                     context: grpc.aio.ServicerContext[Any, Any]) -> pb.WhoAmIResponse:
        rt = self._rt
        try:
            caller = await rt.caller(context)
        except AttestationError as exc:
            rt.audit.record("deny", rpc="WhoAmI", decision="deny", reason=exc.reason)
            await _deny(context, exc)
        # Always the calling process itself, read from the kernel: the request names nobody, so no uid can
        # learn another's selectors or workflows. Only workflows it matches are named.
        workflows = [wf.name for wf in rt.config.workflows.values() if caller_matches(wf, caller)]
        # The hash only when it is already known: caller() hashes only for a caller that a hash-pinned
        # block could admit, and asking who one is must not make the daemon read a binary otherwise.
        return pb.WhoAmIResponse(
            pid=caller.pid, uid=caller.uid, gid=caller.gid, user=caller.user or "", groups=sorted(caller.group_names()),
            exe=caller.exe or "", exe_sha256=(exe_sha256(caller) or "") if exe_sha256_known(caller) else "",
            systemd_unit=caller.systemd_unit or "", workflows=workflows)

    async def MintToken(self, request: pb.MintTokenRequest,
                        context: grpc.aio.ServicerContext[Any, Any]) -> pb.MintTokenResponse:
        rt = self._rt
        if not (_name_ok(request.workflow) and _name_ok(request.tool) and _name_ok(request.audience,
                                                                                     allow_empty=True)):
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "workflow and tool are required")
        audience = request.audience or request.tool
        fields: dict[str, Any] = {"workflow": request.workflow, "tool": request.tool, "audience": audience}
        caller: Caller | None = None
        try:
            caller = await rt.caller(context)
            grant = authorize_mint(rt.config, caller, request.workflow, request.tool, request.ttl_seconds)
        except (AttestationError, PermissionDenied) as exc:
            rt.audit.record("deny", **fields, **(caller.audit_fields() if caller else {}),
                            decision="deny", reason=exc.reason)
            rt.count_denial(request.workflow, request.tool, exc.reason)
            await _deny(context, exc)
        now = int(rt.clock())
        token, jti, exp = rt.mint(grant, (audience,), now)
        rt.metrics.count_mint(request.workflow, request.tool)
        rt.audit.record("mint", **fields, **caller.audit_fields(), jti=jti, exp=exp, kid=rt.ring.current.kid,
                        decision="allow", reason="policy")
        return pb.MintTokenResponse(token=token.decode("ascii"), jti=jti, expires_at=exp, issued_at=now)

    async def VerifyToken(self, request: pb.VerifyTokenRequest,
                          context: grpc.aio.ServicerContext[Any, Any]) -> pb.VerifyTokenResponse:
        if not (_name_ok(request.tool) and _name_ok(request.audience, allow_empty=True)):
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "tool is required")
        try:
            claims = await self._rt.verify(request.token, request.audience or request.tool, request.tool,
                                           int(self._rt.clock()))
        except InvalidToken as exc:
            self._rt.audit.record("verify", tool=request.tool, **await self._rt.caller_fields(context),
                                  decision="deny", reason=exc.reason)
            # The presenter already holds the token; telling it why it failed leaks nothing new.
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"invalid token: {exc.reason}")
        return pb.VerifyTokenResponse(claims_json=json.dumps(claims.to_json_dict(), separators=(",", ":")))

    async def GetJWKS(self, request: pb.GetJWKSRequest,
                      context: grpc.aio.ServicerContext[Any, Any]) -> pb.JWKS:
        return pb.JWKS(jwks_json=self._rt.keys.jwks_json)

    async def WatchJWKS(self, request: pb.GetJWKSRequest,
                        context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[pb.JWKS]:
        async for doc, revoked in self._rt.trust_updates():
            yield pb.JWKS(jwks_json=doc, revoked=[pb.RevokedToken(jti=j, expires_at=e) for j, e in revoked.items()])
        # Only a shutdown ends the stream; UNAVAILABLE tells clients to reconnect (to the next daemon).
        await _abort(context, grpc.StatusCode.UNAVAILABLE, "broker is shutting down")

    async def RevokeTokens(self, request: pb.RevokeTokensRequest,
                           context: grpc.aio.ServicerContext[Any, Any]) -> pb.RevokeTokensResponse:
        rt = self._rt
        if len(request.tokens) > MAX_REVOKE_BATCH:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_REVOKE_BATCH} tokens per call")
        try:
            caller = await rt.caller(context)
        except AttestationError as exc:
            rt.audit.record("deny", rpc="RevokeTokens", decision="deny", reason=exc.reason)
            await _deny(context, exc)
        now = int(rt.clock())
        count = 0
        for token in request.tokens:
            try:
                # Possession of a validly signed token is the first half of the right to revoke it ...
                _, payload = tokens.verify_signature(token.encode("ascii", "replace"), rt.keys.verify_keys)
                claims = json.loads(payload)
                jti, exp, wf = str(claims["jti"]), int(claims["exp"]), rt.config.workflows.get(str(claims["wf"]))
            except (InvalidToken, ValueError, KeyError, TypeError):
                continue  # garbage, foreign or malformed: nothing of ours to revoke
            # ... the second is being a caller of its workflow, so a leaked token cannot be used to
            # revoke tokens of a workflow one has nothing to do with.
            if wf is None or not caller_matches(wf, caller) or exp + tokens.MAX_LEEWAY <= now:
                continue
            if jti not in rt.revoked:
                if len(rt.revoked) >= MAX_REVOKED or rt.revoked_for(wf.name) >= MAX_REVOKED_PER_WORKFLOW:
                    rt.prune_revoked(now)  # expired entries first
                if len(rt.revoked) >= MAX_REVOKED:
                    await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "revocation list is full")
                if rt.revoked_for(wf.name) >= MAX_REVOKED_PER_WORKFLOW:
                    await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f"workflow {wf.name!r} holds its share of the revocation list")
            await rt.revoke(jti, exp, wf.name)
            rt.audit.record("revoke", workflow=wf.name, tool=claims.get("tool"), jti=jti, exp=exp,
                            **caller.audit_fields(), decision="allow", reason="holder revoked")
            count += 1
        return pb.RevokeTokensResponse(revoked=count)

    async def _secret_grant(self, request: pb.GetSecretRequest,
                            context: grpc.aio.ServicerContext[Any, Any]) -> tuple[Secrets, Caller]:
        rt = self._rt
        if not (_name_ok(request.workflow) and _name_ok(request.tool)):
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "workflow and tool are required")
        caller = await self._secret_caller(request, context)
        if rt.secrets is None:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, "this broker has no [vault] configured")
        if rt.config.workflows[request.workflow].tools[request.tool].secret is None:
            # The current config decides, not the one the secret manager started with: a reload may
            # have taken the secret off this tool.
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, f"tool {request.tool!r} has no secret")
        return rt.secrets, caller

    async def _secret_caller(self, request: pb.GetSecretRequest,
                             context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
        """The attested caller if the current config grants it the tool; else abort PERMISSION_DENIED."""
        rt = self._rt
        caller: Caller | None = None
        try:
            caller = await rt.caller(context)
            authorize_mint(rt.config, caller, request.workflow, request.tool, 0)
        except (AttestationError, PermissionDenied) as exc:
            rt.audit.record("deny", rpc="GetSecret", workflow=request.workflow, tool=request.tool,
                            **(caller.audit_fields() if caller else {}), decision="deny", reason=exc.reason)
            rt.count_denial(request.workflow, request.tool, exc.reason)
            await _deny(context, exc)
        return caller

    def _secret_reply(self, request: pb.GetSecretRequest, caller: Caller, value: SecretValue) -> pb.Secret:
        # Metadata only: the audit line names the credential, never its fields' values.
        self._rt.audit.record("secret", workflow=request.workflow, tool=request.tool, kind=value.kind,
                              version=value.version, lease_id=value.lease_id, **caller.audit_fields(),
                              decision="allow", reason="policy")
        return pb.Secret(workflow=request.workflow, tool=request.tool, kind=value.kind, data=dict(value.data),
                         version=value.version, lease_id=value.lease_id or "", expires_at=value.expires_at or 0.0,
                         renewable=value.renewable)

    async def GetSecret(self, request: pb.GetSecretRequest,
                        context: grpc.aio.ServicerContext[Any, Any]) -> pb.Secret:
        secrets, caller = await self._secret_grant(request, context)
        try:
            fetch = secrets.refresh if request.refresh else secrets.get
            value = await fetch(request.workflow, request.tool)
        except NoSecretConfigured:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, f"tool {request.tool!r} has no secret")
        except SecretUnavailable as exc:
            log.warning("secret unavailable workflow=%s tool=%s: %s", request.workflow, request.tool, exc.reason)
            await _upstream_unavailable(context, exc)
        return self._secret_reply(request, caller, value)

    async def WatchSecret(self, request: pb.GetSecretRequest,
                          context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[pb.Secret]:
        secrets, caller = await self._secret_grant(request, context)
        stream = (secrets.watch_run(request.workflow, request.tool, secrets_token_hex(8)) if request.per_run
                  else secrets.watch(request.workflow, request.tool))
        # Closed as soon as we leave, whatever the reason: ending a per-run stream revokes its lease.
        async with contextlib.aclosing(stream):
            try:
                first = True
                async for value in stream:
                    if not first:
                        # Every later push is a new grant: a reload may have taken the tool away from
                        # this caller, or the process may run another program by now.
                        caller = await self._secret_caller(request, context)
                    first = False
                    yield self._secret_reply(request, caller, value)
            except NoSecretConfigured:
                await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, f"tool {request.tool!r} has no secret")
            except SecretUnavailable as exc:
                await _upstream_unavailable(context, exc)

    async def DescribeWorkflow(self, request: pb.DescribeWorkflowRequest,
                               context: grpc.aio.ServicerContext[Any, Any]) -> pb.DescribeWorkflowResponse:
        rt = self._rt
        if not _name_ok(request.workflow):
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "workflow is required")
        caller: Caller | None = None
        try:
            caller = await rt.caller(context)
            wf = rt.config.workflows.get(request.workflow)
            if wf is None or not caller_matches(wf, caller):
                raise PermissionDenied(f"caller may not use workflow {request.workflow!r}")
        except (AttestationError, PermissionDenied) as exc:
            rt.audit.record("deny", workflow=request.workflow, **(caller.audit_fields() if caller else {}),
                            decision="deny", reason=exc.reason)
            await _deny(context, exc)
        return pb.DescribeWorkflowResponse(workflow=wf.name, tools=[
            pb.ToolDelivery(tool=t.name, ttl_seconds=t.ttl, env=t.env or "", file=t.file or "",
                            has_secret=t.secret is not None) for t in wf.tools.values()])


class WorkloadAPI(wl_grpc.SpiffeWorkloadAPIServicer):
    """The JWT half of the SPIFFE Workload API; X.509 calls answer UNIMPLEMENTED."""

    def __init__(self, rt: Runtime) -> None:
        self._rt = rt

    @staticmethod
    async def _require_header(context: grpc.aio.ServicerContext[Any, Any]) -> None:
        # The spec's SSRF guard: a request forwarded by a confused HTTP client lacks this header.
        if SPIFFE_HEADER not in tuple(context.invocation_metadata() or ()):
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         "security header missing from request")

    async def FetchX509SVID(self, request: wl.X509SVIDRequest,
                            context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[wl.X509SVIDResponse]:
        await self._require_header(context)
        await _abort(context, grpc.StatusCode.UNIMPLEMENTED, "X.509-SVIDs are not served by this broker")
        yield wl.X509SVIDResponse()  # pragma: no cover - makes this an async generator

    async def FetchX509Bundles(self, request: wl.X509BundlesRequest, context: grpc.aio.ServicerContext[
            Any, Any]) -> AsyncIterator[wl.X509BundlesResponse]:
        await self._require_header(context)
        await _abort(context, grpc.StatusCode.UNIMPLEMENTED, "X.509 bundles are not served by this broker")
        yield wl.X509BundlesResponse()  # pragma: no cover - makes this an async generator

    async def FetchJWTSVID(self, request: wl.JWTSVIDRequest,
                           context: grpc.aio.ServicerContext[Any, Any]) -> wl.JWTSVIDResponse:
        await self._require_header(context)
        rt = self._rt
        audience = tuple(request.audience)
        if not audience or len(audience) > 16 or not all(_name_ok(a) for a in audience) \
                or not _name_ok(request.spiffe_id, allow_empty=True):
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        caller: Caller | None = None
        try:
            caller = await rt.caller(context)
            workflows = svid_workflows(rt.config, caller, request.spiffe_id)
        except (AttestationError, PermissionDenied) as exc:
            rt.audit.record("deny", spiffe_id=request.spiffe_id, audience=list(audience),
                            **(caller.audit_fields() if caller else {}), decision="deny", reason=exc.reason)
            await _abort(context, grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
        now = int(rt.clock())
        svids = []
        for wf in workflows:
            # The SVID key: with algorithm = "EdDSA" tool tokens are EdDSA, but a JWT-SVID never is.
            key = rt.ring.svid_current
            token, jti, exp = rt.mint(Grant(wf, None, rt.config.broker.token_ttl), audience, now, key)
            rt.audit.record("mint", workflow=wf.name, tool=None, audience=list(audience), **caller.audit_fields(),
                            jti=jti, exp=exp, kid=key.kid, decision="allow", reason="svid")
            svids.append(wl.JWTSVID(spiffe_id=f"spiffe://{rt.config.broker.trust_domain}/workflow/{wf.name}",
                                    svid=token.decode("ascii")))
        return wl.JWTSVIDResponse(svids=svids)

    async def FetchJWTBundles(self, request: wl.JWTBundlesRequest, context: grpc.aio.ServicerContext[
            Any, Any]) -> AsyncIterator[wl.JWTBundlesResponse]:
        await self._require_header(context)
        td = f"spiffe://{self._rt.config.broker.trust_domain}"
        last = ""
        async for jwks, _ in self._rt.trust_updates():
            doc = _svid_bundle(jwks)
            if doc != last:  # SPIFFE bundles carry keys only; revocations alone are no news here
                last = doc
                yield wl.JWTBundlesResponse(bundles={td: doc.encode()})
        await _abort(context, grpc.StatusCode.UNAVAILABLE, "broker is shutting down")

    async def ValidateJWTSVID(self, request: wl.ValidateJWTSVIDRequest,
                              context: grpc.aio.ServicerContext[Any, Any]) -> wl.ValidateJWTSVIDResponse:
        await self._require_header(context)
        if not request.svid or not _name_ok(request.audience):
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "svid and audience must be specified")
        try:
            claims = await self._rt.verify(request.svid, request.audience, None, int(self._rt.clock()),
                                           algorithms=tokens.JWT_SVID_ALGORITHMS)
        except InvalidToken as exc:
            self._rt.audit.record("verify", audience=request.audience, **await self._rt.caller_fields(context),
                                  decision="deny", reason=exc.reason)
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"could not validate JWT-SVID: {exc.reason}")
        st = struct_pb2.Struct()
        st.update(claims.to_json_dict())
        return wl.ValidateJWTSVIDResponse(spiffe_id=claims.sub, claims=st)


# Every open bundle stream asks on every key or revocation change, mostly for the same JWKS.
@functools.lru_cache(maxsize=8)
def _svid_bundle(jwks: str) -> str:
    """The JWKS as a SPIFFE JWT bundle: only keys that may sign JWT-SVIDs (no EdDSA tool-token keys)."""
    doc = json.loads(jwks)
    doc["keys"] = [k for k in doc["keys"] if k.get("alg") in tokens.JWT_SVID_ALGORITHMS]
    return json.dumps(doc, separators=(",", ":"))
