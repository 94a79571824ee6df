"""Every RPC of every service the daemon serves, called with stock stubs through its public socket.

The list of RPCs comes from the daemon itself (server reflection), not from this file: a new RPC or a
new service without a case in ``CASES`` fails ``test_every_served_rpc_has_a_case``. Each case checks a
real answer, so a handler the instrumentation wraps the wrong way (health ``Watch`` once answered
UNKNOWN to every client) fails its case.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import jwt
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from broker._spiffe import workload_pb2 as wl
from broker._spiffe import workload_pb2_grpc as wl_grpc
from broker.testing import DaemonProcess, config_text, running_daemon
from broker.v1 import broker_pb2 as pb
from broker.v1 import broker_pb2_grpc as pb_grpc
from tests.conftest import default_workflows

SPIFFE = (("workload.spiffe.io", "true"),)
WF, TOOL = "support-summarize", "read_ticket"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Stubs:
    broker: pb_grpc.BrokerStub
    spiffe: wl_grpc.SpiffeWorkloadAPIStub
    health: health_pb2_grpc.HealthStub
    reflection: reflection_pb2_grpc.ServerReflectionStub


def _stubs(ch: grpc.Channel) -> Stubs:
    return Stubs(pb_grpc.BrokerStub(ch), wl_grpc.SpiffeWorkloadAPIStub(ch), health_pb2_grpc.HealthStub(ch),
                 reflection_pb2_grpc.ServerReflectionStub(ch))


def _reflect(s: Stubs, *requests: reflection_pb2.ServerReflectionRequest) -> list[
        reflection_pb2.ServerReflectionResponse]:
    return list(s.reflection.ServerReflectionInfo(iter(requests), timeout=10))


def served_methods(s: Stubs) -> set[str]:
    """``package.Service/Method`` for every method of every service the server lists."""
    (listed,) = _reflect(s, reflection_pb2.ServerReflectionRequest(list_services=""))
    services = [svc.name for svc in listed.list_services_response.service]
    found: set[str] = set()
    for resp in _reflect(s, *(reflection_pb2.ServerReflectionRequest(file_containing_symbol=n) for n in services)):
        for raw in resp.file_descriptor_response.file_descriptor_proto:
            fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
            for svc in fd.service:
                full = f"{fd.package}.{svc.name}" if fd.package else svc.name
                if full in services:
                    found |= {f"{full}/{m.name}" for m in svc.method}
    assert {m.split("/")[0] for m in found} == set(services), "a listed service has no descriptor"
    return found


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as exc:
        call()
    code: grpc.StatusCode = exc.value.code()
    return code


def _mint(s: Stubs) -> pb.MintTokenResponse:
    resp: pb.MintTokenResponse = s.broker.MintToken(pb.MintTokenRequest(workflow=WF, tool=TOOL), timeout=10)
    return resp


def mint_token(s: Stubs) -> None:
    claims = jwt.decode(_mint(s).token, options={"verify_signature": False})
    assert (claims["wf"], claims["tool"]) == (WF, TOOL)


def who_am_i(s: Stubs) -> None:
    r = s.broker.WhoAmI(pb.WhoAmIRequest(), timeout=10)
    assert (r.pid, r.uid) == (os.getpid(), os.geteuid()) and WF in r.workflows


def verify_token(s: Stubs) -> None:
    r = s.broker.VerifyToken(pb.VerifyTokenRequest(token=_mint(s).token, tool=TOOL), timeout=10)
    assert json.loads(r.claims_json)["tool"] == TOOL


def get_jwks(s: Stubs) -> None:
    assert len(json.loads(s.broker.GetJWKS(pb.GetJWKSRequest(), timeout=10).jwks_json)["keys"]) == 2


def watch_jwks(s: Stubs) -> None:
    stream = s.broker.WatchJWKS(pb.GetJWKSRequest(), timeout=10)
    first = next(stream)
    stream.cancel()
    assert len(json.loads(first.jwks_json)["keys"]) == 2


def revoke_tokens(s: Stubs) -> None:
    token = _mint(s).token
    assert s.broker.RevokeTokens(pb.RevokeTokensRequest(tokens=[token]), timeout=10).revoked == 1
    assert _code(lambda: s.broker.VerifyToken(pb.VerifyTokenRequest(token=token, tool=TOOL), timeout=10)) \
        == grpc.StatusCode.INVALID_ARGUMENT  # the broker's code for "invalid token"


def describe_workflow(s: Stubs) -> None:
    r = s.broker.DescribeWorkflow(pb.DescribeWorkflowRequest(workflow=WF), timeout=10)
    assert sorted(t.tool for t in r.tools) == ["read_ticket", "send_email"]


# This daemon has no Vault: the secret RPCs answer that the tool has no secret. A secret actually served
# through both is in tests/vault/test_daemon_vault.py.
def get_secret(s: Stubs) -> None:
    assert _code(lambda: s.broker.GetSecret(pb.GetSecretRequest(workflow=WF, tool=TOOL), timeout=10)) \
        == grpc.StatusCode.FAILED_PRECONDITION


def watch_secret(s: Stubs) -> None:
    assert _code(lambda: next(s.broker.WatchSecret(pb.GetSecretRequest(workflow=WF, tool=TOOL), timeout=10))) \
        == grpc.StatusCode.FAILED_PRECONDITION


def reload(s: Stubs) -> None:
    r = s.broker.Reload(pb.ReloadRequest(), timeout=10)  # we run as the daemon's uid: an administrator
    assert r.applied and not r.problems and len(r.config_sha256) == 64


def status(s: Stubs) -> None:
    doc = json.loads(s.broker.Status(pb.StatusRequest(), timeout=10).status_json)
    assert doc["workflows"] == ["billing", WF]


def fetch_x509_svid(s: Stubs) -> None:
    # Documented: only the JWT half of the Workload API is served.
    assert _code(lambda: next(s.spiffe.FetchX509SVID(wl.X509SVIDRequest(), metadata=SPIFFE, timeout=10))) \
        == grpc.StatusCode.UNIMPLEMENTED


def fetch_x509_bundles(s: Stubs) -> None:
    assert _code(lambda: next(s.spiffe.FetchX509Bundles(wl.X509BundlesRequest(), metadata=SPIFFE, timeout=10))) \
        == grpc.StatusCode.UNIMPLEMENTED


def _svid(s: Stubs) -> wl.JWTSVID:
    r = s.spiffe.FetchJWTSVID(wl.JWTSVIDRequest(audience=["crm"]), metadata=SPIFFE, timeout=10)
    assert len(r.svids) == 1
    svid: wl.JWTSVID = r.svids[0]
    return svid


def fetch_jwt_svid(s: Stubs) -> None:
    assert _svid(s).spiffe_id == f"spiffe://example.org/workflow/{WF}"


def fetch_jwt_bundles(s: Stubs) -> None:
    stream = s.spiffe.FetchJWTBundles(wl.JWTBundlesRequest(), metadata=SPIFFE, timeout=10)
    first = next(stream)
    stream.cancel()
    assert len(json.loads(first.bundles["spiffe://example.org"])["keys"]) == 2


def validate_jwt_svid(s: Stubs) -> None:
    svid = _svid(s)
    r = s.spiffe.ValidateJWTSVID(wl.ValidateJWTSVIDRequest(audience="crm", svid=svid.svid), metadata=SPIFFE,
                                 timeout=10)
    assert r.spiffe_id == svid.spiffe_id


def health_check(s: Stubs) -> None:
    for service in ("", "broker.v1.Broker", "SpiffeWorkloadAPI"):
        assert s.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == SERVING
    assert _code(lambda: s.health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)) \
        == grpc.StatusCode.NOT_FOUND


def health_watch(s: Stubs) -> None:
    for service, want in (("", SERVING), ("broker.v1.Broker", SERVING),
                          ("nope", health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)):
        stream = s.health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=10)
        first = next(stream)
        stream.cancel()
        assert first.status == want, service


def health_list(s: Stubs) -> None:
    statuses = s.health.List(health_pb2.HealthListRequest(), timeout=10).statuses
    assert {name: r.status for name, r in statuses.items()} == {
        "": SERVING, "broker.v1.Broker": SERVING, "SpiffeWorkloadAPI": SERVING}


def reflection_info(s: Stubs) -> None:
    (listed,) = _reflect(s, reflection_pb2.ServerReflectionRequest(list_services=""))
    assert {svc.name for svc in listed.list_services_response.service} >= {
        "broker.v1.Broker", "SpiffeWorkloadAPI", "grpc.health.v1.Health"}


CASES: dict[str, Callable[[Stubs], None]] = {
    "broker.v1.Broker/MintToken": mint_token,
    "broker.v1.Broker/VerifyToken": verify_token,
    "broker.v1.Broker/GetJWKS": get_jwks,
    "broker.v1.Broker/WatchJWKS": watch_jwks,
    "broker.v1.Broker/RevokeTokens": revoke_tokens,
    "broker.v1.Broker/DescribeWorkflow": describe_workflow,
    "broker.v1.Broker/GetSecret": get_secret,
    "broker.v1.Broker/WatchSecret": watch_secret,
    "broker.v1.Broker/Reload": reload,
    "broker.v1.Broker/Status": status,
    "broker.v1.Broker/WhoAmI": who_am_i,
    "SpiffeWorkloadAPI/FetchX509SVID": fetch_x509_svid,
    "SpiffeWorkloadAPI/FetchX509Bundles": fetch_x509_bundles,
    "SpiffeWorkloadAPI/FetchJWTSVID": fetch_jwt_svid,
    "SpiffeWorkloadAPI/FetchJWTBundles": fetch_jwt_bundles,
    "SpiffeWorkloadAPI/ValidateJWTSVID": validate_jwt_svid,
    "grpc.health.v1.Health/Check": health_check,
    "grpc.health.v1.Health/Watch": health_watch,
    "grpc.health.v1.Health/List": health_list,
    "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": reflection_info,
}


def _start(directory: str) -> Iterator[DaemonProcess]:
    path = os.path.join(directory, "broker.toml")
    with open(path, "w") as f:
        f.write(config_text(directory, default_workflows()))
    with running_daemon(path, os.path.join(directory, "broker.sock"), os.path.join(directory, "audit.jsonl")) as d:
        yield d


@pytest.fixture(scope="module")
def shared_daemon() -> Iterator[DaemonProcess]:
    # Unix socket paths are short (107 bytes); pytest's own temporary paths may not be.
    with tempfile.TemporaryDirectory(prefix="brk-") as d:
        yield from _start(d)


@pytest.fixture
def stubs(shared_daemon: DaemonProcess) -> Iterator[Stubs]:
    with grpc.insecure_channel(f"unix:{shared_daemon.socket}") as ch:
        yield _stubs(ch)


def test_every_served_rpc_has_a_case(stubs: Stubs) -> None:
    served = served_methods(stubs)
    assert served - CASES.keys() == set(), "served without a case here"
    assert CASES.keys() - served == set(), "a case for an RPC the daemon does not serve"


@pytest.mark.parametrize("method", sorted(CASES))
def test_rpc(method: str, stubs: Stubs) -> None:
    CASES[method](stubs)


def test_health_watch_reports_the_drain(daemon: DaemonProcess) -> None:
    """A client watching health learns of the stop before the socket goes away (client-side health checks)."""
    with grpc.insecure_channel(f"unix:{daemon.socket}") as ch:
        stream = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=30)
        assert next(stream).status == SERVING
        daemon.proc.send_signal(signal.SIGTERM)
        assert next(stream).status == NOT_SERVING
        # Then the daemon ends the stream itself, instead of holding its stop for the whole grace period
        # and having the server cancel it ("Cancelling all calls").
        with pytest.raises(grpc.RpcError) as exc:
            next(stream)
        assert (exc.value.code(), exc.value.details()) == (grpc.StatusCode.UNAVAILABLE, "broker is shutting down")
    assert daemon.stop() == 0
