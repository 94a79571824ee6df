"""An unmodified SPIFFE client (the `spiffe` package) against our socket; prints what it saw as JSON.

Runs in its own process: the package registers the Workload API messages in protobuf's default pool
under the same names as ours, so the two cannot share one interpreter.
"""

from __future__ import annotations

import json
import sys

from spiffe import JwtSvid, WorkloadApiClient
from spiffe.spiffe_id.spiffe_id import TrustDomain


def main() -> int:
    out: dict[str, object] = {}
    with WorkloadApiClient(default_timeout=10) as client:  # the socket comes from SPIFFE_ENDPOINT_SOCKET
        svid = client.fetch_jwt_svid(audience={"crm"})
        out["spiffe_id"] = str(svid.spiffe_id)
        out["audience"] = sorted(svid.audience)
        bundles = client.fetch_jwt_bundles()
        bundle = bundles.get_bundle_for_trust_domain(TrustDomain(sys.argv[1]))
        out["bundle_keys"] = len(bundle.jwt_authorities) if bundle else 0
        checked = JwtSvid.parse_and_validate(svid.token, bundle, {"crm"})
        out["offline_valid"] = str(checked.spiffe_id)
        out["validated"] = str(client.validate_jwt_svid(svid.token, "crm").spiffe_id)
        try:
            client.validate_jwt_svid(svid.token, "someone-else")
            out["wrong_audience"] = "accepted"
        except Exception as exc:
            out["wrong_audience"] = type(exc).__name__
        try:
            client.fetch_x509_svid()
            out["x509"] = "served"
        except Exception as exc:
            out["x509"] = str(exc)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
