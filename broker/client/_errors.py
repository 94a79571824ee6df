"""gRPC status -> the broker's typed errors, in one place for the sync and async clients."""

from __future__ import annotations

from typing import Final

import grpc

from broker.errors import (
    REQUEST_ID_HEADER,
    BrokerError,
    InvalidToken,
    Refused,
    RequestRejected,
    Unavailable,
    UpstreamUnavailable,
)

# Only these are worth retrying: the daemon may be restarting or briefly overloaded.
RETRYABLE: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


def _request_id(exc: grpc.RpcError) -> str:
    """The daemon's request id, present on the errors the daemon itself chose to return."""
    return next((str(v) for k, v in exc.trailing_metadata() or () if k == REQUEST_ID_HEADER), "")


def translate(exc: grpc.RpcError, socket_path: str) -> BrokerError:
    code: grpc.StatusCode = exc.code()
    details = exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE and (rid := _request_id(exc)):
        return UpstreamUnavailable(details, rid)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Unavailable(f"broker daemon at {socket_path} is unreachable ({code.name})")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return Refused(details, _request_id(exc))
    if code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("invalid token"):
        return InvalidToken(details.removeprefix("invalid token: "))
    return RequestRejected(code.name, details)


def retryable(exc: grpc.RpcError) -> bool:
    # An UNAVAILABLE the daemon chose (it names its request) is its current answer about an upstream.
    return exc.code() in RETRYABLE and not _request_id(exc)
