"""gRPC status -> the broker's typed errors, in one place for the sync and async clients."""

from __future__ import annotations

from typing import Final

import grpc

from broker.errors import REQUEST_ID_HEADER, BrokerError, InvalidToken, Refused, RequestRejected, Unavailable

# Only these are worth retrying: the daemon may be restarting or briefly overloaded.
RETRYABLE: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


def translate(exc: grpc.RpcError, socket_path: str) -> BrokerError:
    code: grpc.StatusCode = exc.code()
    details = exc.details() or ""
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Unavailable(f"broker daemon at {socket_path} is unreachable ({code.name})")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        rid = next((str(v) for k, v in exc.trailing_metadata() or () if k == REQUEST_ID_HEADER), "")
        return Refused(details, rid)
    if code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("invalid token"):
        return InvalidToken(details.removeprefix("invalid token: "))
    return RequestRejected(code.name, details)


def retryable(exc: grpc.RpcError) -> bool:
    return exc.code() in RETRYABLE
