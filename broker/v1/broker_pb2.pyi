from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WhoAmIRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WhoAmIResponse(_message.Message):
    __slots__ = ("pid", "uid", "gid", "user", "groups", "exe", "exe_sha256", "systemd_unit", "workflows")
    PID_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    GID_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    EXE_FIELD_NUMBER: _ClassVar[int]
    EXE_SHA256_FIELD_NUMBER: _ClassVar[int]
    SYSTEMD_UNIT_FIELD_NUMBER: _ClassVar[int]
    WORKFLOWS_FIELD_NUMBER: _ClassVar[int]
    pid: int
    uid: int
    gid: int
    user: str
    groups: _containers.RepeatedScalarFieldContainer[str]
    exe: str
    exe_sha256: str
    systemd_unit: str
    workflows: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, pid: _Optional[int] = ..., uid: _Optional[int] = ..., gid: _Optional[int] = ..., user: _Optional[str] = ..., groups: _Optional[_Iterable[str]] = ..., exe: _Optional[str] = ..., exe_sha256: _Optional[str] = ..., systemd_unit: _Optional[str] = ..., workflows: _Optional[_Iterable[str]] = ...) -> None: ...

class MintTokenRequest(_message.Message):
    __slots__ = ("workflow", "tool", "audience", "ttl_seconds")
    WORKFLOW_FIELD_NUMBER: _ClassVar[int]
    TOOL_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    workflow: str
    tool: str
    audience: str
    ttl_seconds: int
    def __init__(self, workflow: _Optional[str] = ..., tool: _Optional[str] = ..., audience: _Optional[str] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class MintTokenResponse(_message.Message):
    __slots__ = ("token", "jti", "expires_at", "issued_at")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    JTI_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    token: str
    jti: str
    expires_at: int
    issued_at: int
    def __init__(self, token: _Optional[str] = ..., jti: _Optional[str] = ..., expires_at: _Optional[int] = ..., issued_at: _Optional[int] = ...) -> None: ...

class VerifyTokenRequest(_message.Message):
    __slots__ = ("token", "tool", "audience")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOOL_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    token: str
    tool: str
    audience: str
    def __init__(self, token: _Optional[str] = ..., tool: _Optional[str] = ..., audience: _Optional[str] = ...) -> None: ...

class VerifyTokenResponse(_message.Message):
    __slots__ = ("claims_json",)
    CLAIMS_JSON_FIELD_NUMBER: _ClassVar[int]
    claims_json: str
    def __init__(self, claims_json: _Optional[str] = ...) -> None: ...

class GetJWKSRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class JWKS(_message.Message):
    __slots__ = ("jwks_json", "revoked")
    JWKS_JSON_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    jwks_json: str
    revoked: _containers.RepeatedCompositeFieldContainer[RevokedToken]
    def __init__(self, jwks_json: _Optional[str] = ..., revoked: _Optional[_Iterable[_Union[RevokedToken, _Mapping]]] = ...) -> None: ...

class RevokedToken(_message.Message):
    __slots__ = ("jti", "expires_at")
    JTI_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    jti: str
    expires_at: int
    def __init__(self, jti: _Optional[str] = ..., expires_at: _Optional[int] = ...) -> None: ...

class RevokeTokensRequest(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, tokens: _Optional[_Iterable[str]] = ...) -> None: ...

class RevokeTokensResponse(_message.Message):
    __slots__ = ("revoked",)
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    revoked: int
    def __init__(self, revoked: _Optional[int] = ...) -> None: ...

class DescribeWorkflowRequest(_message.Message):
    __slots__ = ("workflow",)
    WORKFLOW_FIELD_NUMBER: _ClassVar[int]
    workflow: str
    def __init__(self, workflow: _Optional[str] = ...) -> None: ...

class ToolDelivery(_message.Message):
    __slots__ = ("tool", "ttl_seconds", "env", "file", "has_secret")
    TOOL_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    HAS_SECRET_FIELD_NUMBER: _ClassVar[int]
    tool: str
    ttl_seconds: int
    env: str
    file: str
    has_secret: bool
    def __init__(self, tool: _Optional[str] = ..., ttl_seconds: _Optional[int] = ..., env: _Optional[str] = ..., file: _Optional[str] = ..., has_secret: _Optional[bool] = ...) -> None: ...

class DescribeWorkflowResponse(_message.Message):
    __slots__ = ("workflow", "tools")
    WORKFLOW_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    workflow: str
    tools: _containers.RepeatedCompositeFieldContainer[ToolDelivery]
    def __init__(self, workflow: _Optional[str] = ..., tools: _Optional[_Iterable[_Union[ToolDelivery, _Mapping]]] = ...) -> None: ...

class ReloadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadResponse(_message.Message):
    __slots__ = ("applied", "problems", "config_sha256")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_SHA256_FIELD_NUMBER: _ClassVar[int]
    applied: bool
    problems: _containers.RepeatedScalarFieldContainer[str]
    config_sha256: str
    def __init__(self, applied: _Optional[bool] = ..., problems: _Optional[_Iterable[str]] = ..., config_sha256: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("status_json",)
    STATUS_JSON_FIELD_NUMBER: _ClassVar[int]
    status_json: str
    def __init__(self, status_json: _Optional[str] = ...) -> None: ...

class GetSecretRequest(_message.Message):
    __slots__ = ("workflow", "tool", "refresh", "per_run")
    WORKFLOW_FIELD_NUMBER: _ClassVar[int]
    TOOL_FIELD_NUMBER: _ClassVar[int]
    REFRESH_FIELD_NUMBER: _ClassVar[int]
    PER_RUN_FIELD_NUMBER: _ClassVar[int]
    workflow: str
    tool: str
    refresh: bool
    per_run: bool
    def __init__(self, workflow: _Optional[str] = ..., tool: _Optional[str] = ..., refresh: _Optional[bool] = ..., per_run: _Optional[bool] = ...) -> None: ...

class Secret(_message.Message):
    __slots__ = ("workflow", "tool", "kind", "data", "version", "lease_id", "expires_at", "renewable")
    class DataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    WORKFLOW_FIELD_NUMBER: _ClassVar[int]
    TOOL_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    RENEWABLE_FIELD_NUMBER: _ClassVar[int]
    workflow: str
    tool: str
    kind: str
    data: _containers.ScalarMap[str, str]
    version: int
    lease_id: str
    expires_at: float
    renewable: bool
    def __init__(self, workflow: _Optional[str] = ..., tool: _Optional[str] = ..., kind: _Optional[str] = ..., data: _Optional[_Mapping[str, str]] = ..., version: _Optional[int] = ..., lease_id: _Optional[str] = ..., expires_at: _Optional[float] = ..., renewable: _Optional[bool] = ...) -> None: ...
