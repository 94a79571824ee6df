"""SPIFFE Workload API (JWT half) wire compatibility, checked with an existing SPIFFE client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import grpc
import jwt
import pytest

from broker._spiffe import workload_pb2 as wl
from broker._spiffe import workload_pb2_grpc as wl_grpc
from broker.testing import DaemonProcess, config_text, running_daemon
from broker.v1 import broker_pb2 as pb
from broker.v1 import broker_pb2_grpc as pb_grpc
from tests.conftest import default_workflows

HEADER = (("workload.spiffe.io", "true"),)


@pytest.fixture
def eddsa_daemon(short_tmp: str) -> Iterator[DaemonProcess]:
    path = os.path.join(short_tmp, "broker.toml")
    with open(path, "w") as f:
        f.write(config_text(short_tmp, default_workflows(), algorithm="EdDSA"))
    with running_daemon(path, os.path.join(short_tmp, "broker.sock"), os.path.join(short_tmp, "audit.jsonl")) as d:
        yield d


def _spiffe_client(daemon: DaemonProcess) -> dict[str, object]:
    r = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "_spiffe_client.py"),
                        "example.org"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "SPIFFE_ENDPOINT_SOCKET": f"unix://{daemon.socket}"})
    assert r.returncode == 0, r.stderr
    out: dict[str, object] = json.loads(r.stdout)
    return out


def test_spiffe_package_works_unchanged(daemon: DaemonProcess) -> None:
    out = _spiffe_client(daemon)
    sid = "spiffe://example.org/workflow/support-summarize"
    assert out["spiffe_id"] == sid and out["offline_valid"] == sid and out["validated"] == sid
    assert out["audience"] == ["crm"]
    assert out["bundle_keys"] == 2  # current + next
    assert out["wrong_audience"] != "accepted"
    assert "UNIMPLEMENTED" in out["x509"] or "not served" in out["x509"]


def test_security_header_is_required(daemon: DaemonProcess) -> None:
    with grpc.insecure_channel(f"unix:{daemon.socket}") as ch:
        stub = wl_grpc.SpiffeWorkloadAPIStub(ch)
        with pytest.raises(grpc.RpcError) as exc:
            stub.FetchJWTSVID(wl.JWTSVIDRequest(audience=["crm"]), timeout=5)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as exc:
            next(iter(stub.FetchJWTBundles(wl.JWTBundlesRequest(), timeout=5)))
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as exc:
            next(iter(stub.FetchX509SVID(wl.X509SVIDRequest(), metadata=HEADER, timeout=5)))
        assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_fetch_jwt_svid_rules(daemon: DaemonProcess) -> None:
    with grpc.insecure_channel(f"unix:{daemon.socket}") as ch:
        stub = wl_grpc.SpiffeWorkloadAPIStub(ch)
        with pytest.raises(grpc.RpcError) as exc:
            stub.FetchJWTSVID(wl.JWTSVIDRequest(audience=[]), metadata=HEADER, timeout=5)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # An identity this caller does not match is refused.
        with pytest.raises(grpc.RpcError) as exc:
            stub.FetchJWTSVID(wl.JWTSVIDRequest(audience=["x"], spiffe_id="spiffe://example.org/workflow/billing"),
                              metadata=HEADER, timeout=5)
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
        resp = stub.FetchJWTSVID(wl.JWTSVIDRequest(audience=["a", "b"]), metadata=HEADER, timeout=5)
        assert len(resp.svids) == 1
        claims = jwt.decode(resp.svids[0].svid, options={"verify_signature": False})
        assert claims["aud"] == ["a", "b"] and "tool" not in claims  # a workflow identity, no tool rights
        v = stub.ValidateJWTSVID(wl.ValidateJWTSVIDRequest(audience="b", svid=resp.svids[0].svid), metadata=HEADER,
                                 timeout=5)
        assert v.spiffe_id == resp.svids[0].spiffe_id and v.claims["wf"] == "support-summarize"
        with pytest.raises(grpc.RpcError) as exc:
            stub.ValidateJWTSVID(wl.ValidateJWTSVIDRequest(audience="b", svid="garbage"), metadata=HEADER,
                                 timeout=5)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_jwt_bundles_stream_sends_full_state(daemon: DaemonProcess) -> None:
    with grpc.insecure_channel(f"unix:{daemon.socket}") as ch:
        stub = wl_grpc.SpiffeWorkloadAPIStub(ch)
        stream = stub.FetchJWTBundles(wl.JWTBundlesRequest(), metadata=HEADER, timeout=5)
        first = next(iter(stream))
        stream.cancel()
    doc = json.loads(first.bundles["spiffe://example.org"])
    assert len(doc["keys"]) == 2


def test_with_eddsa_tool_tokens_svids_stay_es256_for_the_spiffe_package(eddsa_daemon: DaemonProcess) -> None:
    # The JWT-SVID standard allows RS/ES/PS only: the unmodified client must fetch, validate and verify
    # offline against the bundle as with ES256 (the bundle has just the SVID keys: current and next).
    out = _spiffe_client(eddsa_daemon)
    sid = "spiffe://example.org/workflow/support-summarize"
    assert out["spiffe_id"] == sid and out["offline_valid"] == sid and out["validated"] == sid
    assert out["bundle_keys"] == 2
    with grpc.insecure_channel(f"unix:{eddsa_daemon.socket}") as ch:
        broker = pb_grpc.BrokerStub(ch)
        tool_token = broker.MintToken(pb.MintTokenRequest(workflow="support-summarize", tool="read_ticket"),
                                      timeout=5).token
        svid = wl_grpc.SpiffeWorkloadAPIStub(ch).FetchJWTSVID(wl.JWTSVIDRequest(audience=["crm"]), metadata=HEADER,
                                                              timeout=5).svids[0].svid
        jwks = json.loads(broker.GetJWKS(pb.GetJWKSRequest(), timeout=5).jwks_json)
        keys = json.loads(broker.Status(pb.StatusRequest(), timeout=5).status_json)["keys"]
    assert jwt.get_unverified_header(tool_token)["alg"] == "EdDSA"  # tool tokens keep what the config says
    assert jwt.get_unverified_header(svid)["alg"] == "ES256"
    assert (keys["current"], keys["svid_current"]) == (jwt.get_unverified_header(tool_token)["kid"],
                                                       jwt.get_unverified_header(svid)["kid"])
    # Tool servers verify both kinds with the one JWKS.
    assert sorted(k["alg"] for k in jwks["keys"]) == ["ES256", "ES256", "EdDSA", "EdDSA"]


def test_validate_jwt_svid_refuses_an_eddsa_token(eddsa_daemon: DaemonProcess) -> None:
    """Hostile: a token this broker signed with EdDSA, for a workflow identity, presented as a JWT-SVID."""
    with grpc.insecure_channel(f"unix:{eddsa_daemon.socket}") as ch:
        token = pb_grpc.BrokerStub(ch).MintToken(
            pb.MintTokenRequest(workflow="support-summarize", tool="read_ticket", audience="crm"), timeout=5).token
        # The broker itself accepts it as a tool token: the signature and claims are fine.
        pb_grpc.BrokerStub(ch).VerifyToken(pb.VerifyTokenRequest(token=token, tool="read_ticket", audience="crm"),
                                           timeout=5)
        stub = wl_grpc.SpiffeWorkloadAPIStub(ch)
        with pytest.raises(grpc.RpcError) as exc:
            stub.ValidateJWTSVID(wl.ValidateJWTSVIDRequest(audience="crm", svid=token), metadata=HEADER, timeout=5)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "algorithm not allowed" in (exc.value.details() or "")
    with open(eddsa_daemon.audit_log) as f:
        denied = [json.loads(line) for line in f if '"verify"' in line]
    assert denied[-1]["decision"] == "deny" and denied[-1]["reason"] == "algorithm not allowed here"


@pytest.mark.parametrize(("algorithm", "says"), [
    ("ES256", "tool tokens and JWT-SVIDs are signed with ES256"),
    ("EdDSA", "tool tokens are signed with EdDSA; JWT-SVIDs (SPIFFE Workload API) with a separate ES256 key, "
              "since the JWT-SVID standard allows no EdDSA; the JWKS publishes both keys, SPIFFE bundles only "
              "the ES256 ones"),
])
def test_config_check_says_what_signs_svids(short_tmp: str, algorithm: str, says: str) -> None:
    path = os.path.join(short_tmp, "broker.toml")
    with open(path, "w") as f:
        f.write(config_text(short_tmp, default_workflows(), algorithm=algorithm))
    r = subprocess.run([sys.executable, "-m", "broker", "config", "check", path], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1] == f"{path}: {says}"
