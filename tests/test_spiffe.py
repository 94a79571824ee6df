"""SPIFFE Workload API (JWT half) wire compatibility, checked with an existing SPIFFE client."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import grpc
import jwt
import pytest

from broker._spiffe import workload_pb2 as wl
from broker._spiffe import workload_pb2_grpc as wl_grpc
from broker.testing import DaemonProcess

HEADER = (("workload.spiffe.io", "true"),)


def test_spiffe_package_works_unchanged(daemon: DaemonProcess) -> None:
    r = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "_spiffe_client.py"),
                        "example.org"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "SPIFFE_ENDPOINT_SOCKET": f"unix://{daemon.socket}"})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
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
