"""A second broker process for the fleet JWKS test: its own key ring, its own AppRole identity.

Reads a token minted by the other process on stdin, verifies it with the fleet's keys, then prints
"verified" and a token of its own on stdout.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from broker import tokens
from broker.config import VaultAuth, VaultSettings
from broker.keyring import KeyRing, MemoryKeySource
from broker.vault import FleetJwks, VaultSession


def claims(now: int, issuer: str) -> tokens.Claims:
    return tokens.Claims(iss="spiffe://example.org", sub="spiffe://example.org/workflow/wf", aud=("crm",), iat=now,
                         nbf=now, exp=now + 60, jti=issuer + str(now), tenant="acme", wf="wf", tool="t")


async def main() -> None:
    settings = VaultSettings(os.environ["NODE_VAULT_ADDR"], VaultAuth(
        "approle", role_id_file=os.environ["NODE_ROLE_ID_FILE"], secret_id_file=os.environ["NODE_SECRET_ID_FILE"]),
        instance=os.environ["NODE_INSTANCE"])
    ring = KeyRing(MemoryKeySource(), "ES256", 3600, 60, time.time())
    session = VaultSession(settings)
    fleet = FleetJwks(session, settings, max_token_ttl=60)
    await fleet.publish(ring.verify_keys.values())
    await fleet.refresh()
    foreign = sys.stdin.readline().strip()
    now = int(time.time())
    tokens.verify(foreign, fleet.keys(), tokens.Expect("example.org", audience="crm", tool="t"), now)
    print("verified", flush=True)
    print(tokens.mint(ring.current, claims(now, "a")).decode(), flush=True)
    await session.close()


if __name__ == "__main__":
    asyncio.run(main())
