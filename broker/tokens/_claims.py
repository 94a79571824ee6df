"""The claim set of a broker token and what a verifier expects of it (shared by both engine backends)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from broker.errors import BrokerError

# A token larger than this is refused before any parsing: ours are well under 1 KiB.
MAX_TOKEN_BYTES: Final = 8192
DEFAULT_LEEWAY: Final = 5
# A verifier's clock tolerance is capped so that a revoked jti can be forgotten a bounded time after its
# exp: past exp + MAX_LEEWAY no verifier accepts the token anyway.
MAX_LEEWAY: Final = 300
# Our header and claims nest two levels deep; anything far deeper is an attack on the parser.
MAX_JSON_DEPTH: Final = 16
HEADER_KEYS: Final = frozenset({"alg", "kid", "typ"})


@dataclass(frozen=True, slots=True)
class Claims:
    """The claims of a broker token; a workflow-level JWT-SVID has ``tool=None`` and no act/dst."""

    iss: str
    sub: str
    aud: tuple[str, ...]
    iat: int
    nbf: int
    exp: int
    jti: str
    tenant: str
    wf: str
    tool: str | None = None
    act: tuple[str, ...] = ()
    dst: tuple[str, ...] = ()

    def to_json_dict(self) -> dict[str, Any]:
        """The JSON object, in the canonical key order both backends emit byte for byte."""
        d: dict[str, Any] = {
            "iss": self.iss,
            "sub": self.sub,
            # A single audience is a string, as most JWT libraries and the JWT-SVID spec expect.
            "aud": self.aud[0] if len(self.aud) == 1 else list(self.aud),
            "iat": self.iat,
            "nbf": self.nbf,
            "exp": self.exp,
            "jti": self.jti,
            "tenant": self.tenant,
            "wf": self.wf,
        }
        if self.tool is not None:
            d["tool"] = self.tool
            d["act"] = list(self.act)
            d["dst"] = list(self.dst)
        return d


@dataclass(frozen=True, slots=True)
class Expect:
    """What a verifier requires beyond a valid signature."""

    trust_domain: str
    audience: str
    tool: str | None = None  # None: any tool or none (a JWT-SVID check); else the token's tool must match
    leeway: int = DEFAULT_LEEWAY

    def __post_init__(self) -> None:
        if not isinstance(self.leeway, int) or isinstance(self.leeway, bool) \
                or not 0 <= self.leeway <= MAX_LEEWAY:
            raise BrokerError(f"leeway must be an integer from 0 to {MAX_LEEWAY} seconds")
        if not isinstance(self.trust_domain, str) or not self.trust_domain or "/" in self.trust_domain:
            raise BrokerError("trust_domain must be a non-empty name without '/'")
        if not isinstance(self.audience, str) or not (self.tool is None or isinstance(self.tool, str)):
            raise BrokerError("audience and tool must be strings")
