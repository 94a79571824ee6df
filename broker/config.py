"""Operator configuration: TOML in, validated frozen records out.

Parsing happens once: :func:`load` reads the file, :func:`parse` checks every key and collects *all*
problems (unknown keys, wrong types, bad durations, duplicate names), each with its dotted key path, and
raises one :class:`~broker.errors.ConfigError`. Nothing downstream ever sees a raw dict.
"""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, TypeVar

from broker.errors import ConfigError, ConfigProblem

DEFAULT_SOCKET: Final = "/run/broker/broker.sock"
DEFAULT_AUDIT_LOG: Final = "/var/log/broker/audit.jsonl"
DEFAULT_TOKEN_TTL: Final = 300
DEFAULT_ROTATE_EVERY: Final = 3600
DEFAULT_MAX_CONNECTIONS: Final = 1024
DEFAULT_MAX_CONNECTIONS_PER_UID: Final = 128
DEFAULT_KV_REFRESH: Final = 300
DEFAULT_MAX_STALENESS: Final = 600
SECRET_KINDS: Final = ("kv", "database", "pki", "token")
ALGORITHMS: Final = ("ES256", "EdDSA")
SELECTORS: Final = ("uid", "gid", "user", "group", "exe", "exe_sha256", "systemd_unit")

# A config file larger than this is refused before parsing: no legitimate scope file comes close.
MAX_CONFIG_BYTES: Final = 1 << 20
MAX_TTL: Final = 24 * 3600
MIN_ROTATE: Final = 60
MAX_ROTATE: Final = 30 * 24 * 3600

# Names end up inside SPIFFE IDs and audit lines: keep them to a boring, unambiguous alphabet. Every
# pattern ends in \Z, not $: $ also matches before a final newline, which would let "wf\n" through.
_NAME_RE: Final = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?\Z")
_TRUST_DOMAIN_RE: Final = re.compile(r"^[a-z0-9](?:[a-z0-9.-]{0,253}[a-z0-9])?\Z")
_DURATION_RE: Final = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?\Z")
_SHA256_RE: Final = re.compile(r"^[0-9a-f]{64}\Z")
_UNIT_RE: Final = re.compile(r"^[A-Za-z0-9:_.@\\-]{1,255}\Z")
_ENV_RE: Final = re.compile(r"^[A-Z_][A-Z0-9_]{0,127}\Z")
_FILE_RE: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z")
# Vault paths: plain segments only; "." and ".." segments could walk out of the intended mount.
_VAULT_PATH_RE: Final = re.compile(r"^(?!(?:.*/)?\.{1,2}(?:/|\Z))[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.@-]+)*\Z")


@dataclass(frozen=True, slots=True)
class CallerRule:
    """One ``[[workflow.caller]]`` block: a caller matches when every selector set here matches."""

    uid: int | None = None
    gid: int | None = None
    user: str | None = None
    group: str | None = None
    exe: str | None = None
    exe_sha256: str | None = None
    systemd_unit: str | None = None


@dataclass(frozen=True, slots=True)
class SecretSpec:
    """The upstream credential a tool needs, fetched from Vault (``secret = {...}`` on a tool).

    kind ``kv``: ``path`` (mount/path of a KV v2 secret) and optional ``field``; ``database``: ``role``
    (dynamic database user, ``mount`` defaults to "database"); ``pki``: ``role`` and ``common_name``
    (``mount`` defaults to "pki"); ``token``: ``policies`` and optional ``ttl`` (a child Vault token).
    """

    kind: str
    path: str | None = None
    field: str | None = None
    role: str | None = None
    mount: str | None = None
    common_name: str | None = None
    policies: tuple[str, ...] = ()
    ttl: int | None = None


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    actions: tuple[str, ...]
    destinations: tuple[str, ...]
    ttl: int
    secret: SecretSpec | None = None
    # How ``broker exec`` delivers this tool's credential to the child: an environment variable
    # and/or a file name inside the private credentials directory.
    env: str | None = None
    file: str | None = None


@dataclass(frozen=True, slots=True)
class Workflow:
    name: str
    tenant: str
    callers: tuple[CallerRule, ...]
    tools: Mapping[str, Tool]


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    trust_domain: str
    socket: str
    audit_log: str
    token_ttl: int
    algorithm: str
    rotate_every: int
    max_connections: int
    require_native: bool = False  # refuse to start on the pure-Python token engine
    # One local user must not be able to take every connection slot from the others.
    max_connections_per_uid: int = DEFAULT_MAX_CONNECTIONS_PER_UID


@dataclass(frozen=True, slots=True)
class VaultAuth:
    method: str  # "approle" or "token"
    role_id_file: str | None = None
    secret_id_file: str | None = None  # may hold a response-wrapped secret_id, unwrapped once
    token_file: str | None = None


@dataclass(frozen=True, slots=True)
class VaultSettings:
    address: str
    auth: VaultAuth
    ca_file: str | None = None
    instance: str = ""  # names this broker's entry in the fleet JWKS; defaults to the host name
    kv_mount: str = "secret"  # KV v2 mount holding the fleet JWKS
    jwks_path: str = "broker/jwks"
    kv_refresh: int = DEFAULT_KV_REFRESH
    max_staleness: int = DEFAULT_MAX_STALENESS
    # Every node the broker may use, ``address`` first; empty means just ``address``.
    addresses: tuple[str, ...] = ()

    @property
    def nodes(self) -> tuple[str, ...]:
        return self.addresses or (self.address,)


@dataclass(frozen=True, slots=True)
class Config:
    broker: BrokerSettings
    workflows: Mapping[str, Workflow]
    sha256: str  # of the file's bytes, so audit lines can say which config made a decision
    vault: VaultSettings | None = None
    metrics_listen: str | None = None  # [metrics] listen: "unix:/path" or "127.0.0.1:9464"; off when absent
    # Whether any caller rule needs the executable's hash: then it is computed off the event loop.
    hashes_exe: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hashes_exe", any(rule.exe_sha256 is not None for wf in self.workflows.values()
                                                   for rule in wf.callers))


def parse_duration(text: str) -> int:
    """``"90s"``, ``"5m"``, ``"1h30m"`` -> seconds. Raises ValueError on anything else or zero."""
    m = _DURATION_RE.match(text)
    if not text or m is None:
        raise ValueError(f"invalid duration {text!r}: use forms like '90s', '5m', '1h30m'")
    h, mi, s = (int(g) if g else 0 for g in m.groups())
    seconds = h * 3600 + mi * 60 + s
    if seconds <= 0:
        raise ValueError(f"invalid duration {text!r}: must be greater than zero")
    return seconds


T = TypeVar("T")


class _Checker:
    """Walks the raw TOML tree, records problems with their key paths, never raises midway."""

    def __init__(self) -> None:
        self.problems: list[ConfigProblem] = []

    def fail(self, path: str, message: str) -> None:
        self.problems.append(ConfigProblem(path, message))

    def table(self, raw: Any, path: str, allowed: tuple[str, ...]) -> dict[str, Any] | None:
        if not isinstance(raw, dict):
            self.fail(path, f"expected a table, got {_kind(raw)}")
            return None
        for key in raw:
            if key not in allowed:
                self.fail(_join(path, key), "unknown key")
        return raw

    def tables(self, raw: Any, path: str) -> list[Any]:
        if raw is None:
            return []
        if not isinstance(raw, list):
            self.fail(path, f"expected an array of tables ([[{path}]]), got {_kind(raw)}")
            return []
        return raw

    def get(
        self,
        table: dict[str, Any],
        path: str,
        key: str,
        kind: type[T],
        default: T | None = None,
        *,
        required: bool = False,
    ) -> T | None:
        if key not in table:
            if required:
                self.fail(_join(path, key), "required key is missing")
            return default
        value = table[key]
        # bool is a subclass of int in Python; TOML's true/false must never pass as a number.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.fail(_join(path, key), f"expected {kind.__name__}, got {_kind(value)}")
            return default
        return value

    def matching(self, table: dict[str, Any], path: str, key: str, pattern: re.Pattern[str], *, what: str,
                 required: bool = False) -> str | None:
        value = self.get(table, path, key, str, required=required)
        if value is not None and not pattern.match(value):
            self.fail(_join(path, key), f"invalid {what} {value!r}")
            return None
        return value

    def strings(self, table: dict[str, Any], path: str, key: str) -> tuple[str, ...]:
        value = self.get(table, path, key, list, [])
        out: list[str] = []
        for i, item in enumerate(value or []):
            if not isinstance(item, str) or not item:
                self.fail(f"{_join(path, key)}[{i}]", f"expected a non-empty string, got {_kind(item)}")
            else:
                out.append(item)
        if len(set(out)) != len(out):
            self.fail(_join(path, key), "duplicate entries")
        return tuple(out)

    def duration(self, table: dict[str, Any], path: str, key: str, default: int, *, lo: int, hi: int) -> int:
        if key in table and not isinstance(table[key], str):
            # A bare number is the likeliest slip (seconds? minutes?): say what is wanted instead.
            self.fail(_join(path, key), f'expected a duration string such as "90s", "2m" or "1h30m", '
                                        f"got {_kind(table[key])}")
            return default
        value = self.get(table, path, key, str)
        if value is None:
            return default
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            self.fail(_join(path, key), str(exc))
            return default
        if not lo <= seconds <= hi:
            self.fail(_join(path, key), f"must be between {lo}s and {hi}s, got {seconds}s")
            return default
        return seconds

    def ranged_int(self, table: dict[str, Any], path: str, key: str, lo: int, hi: int) -> int | None:
        value = self.get(table, path, key, int)
        if value is not None and not lo <= value <= hi:
            self.fail(_join(path, key), f"must be between {lo} and {hi}, got {value}")
            return None
        return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: object) -> str:
    return {
        bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table",
    }.get(type(value), type(value).__name__)


def _parse_broker(c: _Checker, raw: Any) -> BrokerSettings | None:
    allowed = ("trust_domain", "socket", "audit_log", "token_ttl", "algorithm", "rotate_every",
               "max_connections", "max_connections_per_uid", "require_native")
    t = c.table(raw, "broker", allowed)
    if t is None:
        return None
    td = c.matching(t, "broker", "trust_domain", _TRUST_DOMAIN_RE, what="trust domain", required=True)
    sock = c.get(t, "broker", "socket", str, DEFAULT_SOCKET)
    audit = c.get(t, "broker", "audit_log", str, DEFAULT_AUDIT_LOG)
    for key, value in (("socket", sock), ("audit_log", audit)):
        if value is not None and not value.startswith("/"):
            c.fail(f"broker.{key}", f"must be an absolute path, got {value!r}")
    if sock is not None and len(sock.encode()) > 107:
        c.fail("broker.socket", "path too long for a Unix socket (max 107 bytes)")
    alg = c.get(t, "broker", "algorithm", str, "ES256")
    if alg not in ALGORITHMS:
        c.fail("broker.algorithm", f"must be one of {', '.join(ALGORITHMS)}, got {alg!r}")
    ttl = c.duration(t, "broker", "token_ttl", DEFAULT_TOKEN_TTL, lo=1, hi=MAX_TTL)
    rotate = c.duration(t, "broker", "rotate_every", DEFAULT_ROTATE_EVERY, lo=MIN_ROTATE, hi=MAX_ROTATE)
    conns = c.ranged_int(t, "broker", "max_connections", 1, 65536)
    per_uid = c.ranged_int(t, "broker", "max_connections_per_uid", 1, 65536)
    native = c.get(t, "broker", "require_native", bool, False)
    if td is None or sock is None or audit is None or alg not in ALGORITHMS:
        return None
    return BrokerSettings(td, sock, audit, ttl, str(alg), rotate, conns or DEFAULT_MAX_CONNECTIONS, bool(native),
                          per_uid or DEFAULT_MAX_CONNECTIONS_PER_UID)


def _parse_caller(c: _Checker, raw: Any, path: str) -> CallerRule | None:
    t = c.table(raw, path, SELECTORS)
    if t is None:
        return None
    if not any(k in t for k in SELECTORS):
        # An empty block would match every process on the host: refuse it instead of guessing.
        c.fail(path, f"a caller block needs at least one selector ({', '.join(SELECTORS)})")
        return None
    exe = c.get(t, path, "exe", str)
    if exe is not None and not exe.startswith("/"):
        c.fail(f"{path}.exe", f"must be an absolute path, got {exe!r}")
    return CallerRule(
        uid=c.ranged_int(t, path, "uid", 0, 2**32 - 2),
        gid=c.ranged_int(t, path, "gid", 0, 2**32 - 2),
        user=c.get(t, path, "user", str),
        group=c.get(t, path, "group", str),
        exe=exe,
        exe_sha256=c.matching(t, path, "exe_sha256", _SHA256_RE, what="sha256 (64 lowercase hex digits)"),
        systemd_unit=c.matching(t, path, "systemd_unit", _UNIT_RE, what="systemd unit name"),
    )


_SECRET_KEYS: Final = {
    "kv": (("path",), ("field",)),
    "database": (("role",), ("mount",)),
    "pki": (("role", "common_name"), ("mount", "ttl")),
    "token": (("policies",), ("ttl",)),
}


def _parse_secret(c: _Checker, raw: Any, path: str) -> SecretSpec | None:
    if not isinstance(raw, dict):
        c.fail(path, f"expected a table, got {_kind(raw)}")
        return None
    kind = c.get(raw, path, "kind", str, required=True)
    if kind is None:
        return None
    if kind not in _SECRET_KEYS:
        c.fail(f"{path}.kind", f"must be one of {', '.join(SECRET_KINDS)}, got {kind!r}")
        return None
    required, optional = _SECRET_KEYS[kind]
    t = c.table(raw, path, ("kind", *required, *optional))
    if t is None:
        return None
    for key in required:
        if key not in t:
            c.fail(f"{path}.{key}", f"required for kind {kind!r}")
    strs = {k: c.matching(t, path, k, _VAULT_PATH_RE, what="Vault path segment")
            for k in ("path", "field", "role", "mount") if k in t}
    cn = c.get(t, path, "common_name", str)
    policies = c.strings(t, path, "policies")
    if kind == "token" and "policies" in t and not policies:
        c.fail(f"{path}.policies", "needs at least one policy")
    ttl = c.duration(t, path, "ttl", 0, lo=1, hi=MAX_TTL) if "ttl" in t else None
    return SecretSpec(kind, path=strs.get("path"), field=strs.get("field"), role=strs.get("role"),
                      mount=strs.get("mount"), common_name=cn, policies=policies, ttl=ttl)


def _parse_tool(c: _Checker, raw: Any, path: str, max_ttl: int, has_vault: bool) -> Tool | None:
    t = c.table(raw, path, ("name", "actions", "destinations", "ttl", "secret", "env", "file"))
    if t is None:
        return None
    name = c.matching(t, path, "name", _NAME_RE, what="tool name", required=True)
    ttl = c.duration(t, path, "ttl", max_ttl, lo=1, hi=MAX_TTL)
    if ttl > max_ttl:
        c.fail(f"{path}.ttl", f"a tool may lower broker.token_ttl ({max_ttl}s), not raise it ({ttl}s)")
    actions = c.strings(t, path, "actions")
    destinations = c.strings(t, path, "destinations")
    secret = _parse_secret(c, t["secret"], f"{path}.secret") if "secret" in t else None
    if "secret" in t and not has_vault:
        # Checked here, where the tool's own path is known: an index computed later from the parsed
        # workflows would skip the entries that failed and name the wrong one.
        c.fail(f"{path}.secret", "needs a [vault] table to fetch it from")
    env = c.matching(t, path, "env", _ENV_RE, what="environment variable name (A-Z, 0-9, _)")
    file = c.matching(t, path, "file", _FILE_RE, what="file name (no slashes, no leading dot)")
    if name is None:
        return None
    return Tool(name, actions, destinations, min(ttl, max_ttl), secret, env, file)


def check_listen(listen: str) -> str | None:
    """A problem with a metrics ``listen`` value, or None. Only loopback and Unix sockets are allowed:
    metrics name workflows and tools, which are nobody else's business."""
    if listen.startswith("unix:/"):
        return None
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return "must be unix:/path or 127.0.0.1:PORT"
    if host != "127.0.0.1":
        return "metrics may listen on 127.0.0.1 or a Unix socket only"
    return None


def _parse_metrics(c: _Checker, raw: Any) -> str | None:
    t = c.table(raw, "metrics", ("listen",))
    if t is None:
        return None
    listen = c.get(t, "metrics", "listen", str, required=True)
    if listen is None:
        return None
    problem = check_listen(listen)
    if problem:
        c.fail("metrics.listen", problem)
        return None
    return listen


def _parse_vault(c: _Checker, raw: Any) -> VaultSettings | None:
    t = c.table(raw, "vault", ("address", "ca_file", "instance", "kv_mount", "jwks_path", "kv_refresh",
                               "max_staleness", "auth"))
    if t is None:
        return None
    # One address, or the nodes of one cluster in order of preference: the broker moves on to the next
    # node when one cannot be reached or cannot serve (sealed, no leader).
    raw_address = t.get("address")
    listed: list[Any] = raw_address if isinstance(raw_address, list) else [raw_address]
    addresses: tuple[str, ...] = ()
    if "address" not in t:
        c.fail("vault.address", "required key is missing")
    elif not listed or not all(isinstance(a, str) for a in listed):
        c.fail("vault.address", f"expected a string or a non-empty array of strings, got {_kind(raw_address)}")
    elif len(set(listed)) != len(listed):
        c.fail("vault.address", "lists an address twice")
    else:
        addresses = tuple(listed)
    for node in addresses:
        if "@" in node or not node.isprintable():
            # First, and never quoted: a password in the address (with or without a scheme) would be
            # echoed in this message, and in every error and log line that names the address.
            c.fail("vault.address", "must not contain credentials (@) or control characters")
        elif not node.startswith(("https://", "http://")):
            c.fail("vault.address", f"must be an http(s) URL, got {node!r}")
    address = addresses[0] if addresses else None
    ca_file = c.get(t, "vault", "ca_file", str)
    if ca_file is not None and not ca_file.startswith("/"):
        c.fail("vault.ca_file", f"must be an absolute path, got {ca_file!r}")
    elif ca_file is not None and address is not None and not all(n.startswith("https://") for n in addresses):
        # Fail closed: a CA file next to a plain-HTTP address reads as "TLS is on" when it is not.
        c.fail("vault.ca_file", "only applies to an https:// address")
    instance = c.matching(t, "vault", "instance", _NAME_RE, what="instance name") or ""
    kv_mount = c.matching(t, "vault", "kv_mount", _VAULT_PATH_RE, what="mount") or "secret"
    jwks_path = c.matching(t, "vault", "jwks_path", _VAULT_PATH_RE, what="path") or "broker/jwks"
    kv_refresh = c.duration(t, "vault", "kv_refresh", DEFAULT_KV_REFRESH, lo=1, hi=MAX_TTL)
    staleness = c.duration(t, "vault", "max_staleness", DEFAULT_MAX_STALENESS, lo=1, hi=MAX_TTL)
    auth = None
    if "auth" not in t:
        c.fail("vault.auth", "required table [vault.auth] is missing")
    else:
        a = c.table(t["auth"], "vault.auth", ("method", "role_id_file", "secret_id_file", "token_file"))
        if a is not None:
            method = c.get(a, "vault.auth", "method", str, required=True)
            files = {k: c.get(a, "vault.auth", k, str) for k in ("role_id_file", "secret_id_file", "token_file")}
            for k, v in files.items():
                if v is not None and not v.startswith("/"):
                    c.fail(f"vault.auth.{k}", f"must be an absolute path, got {v!r}")
            needed = {"approle": ("role_id_file", "secret_id_file"), "token": ("token_file",)}
            if method is not None and method not in needed:
                c.fail("vault.auth.method", f"must be approle or token, got {method!r}")
            elif method is not None:
                for k in needed[method]:
                    if files[k] is None:
                        c.fail(f"vault.auth.{k}", f"required for method {method!r}")
                auth = VaultAuth(method, **files)
    if address is None or auth is None:
        return None
    return VaultSettings(address, auth, ca_file, instance, kv_mount, jwks_path, kv_refresh, staleness, addresses)


def _unique(c: _Checker, items: list[tuple[str, T]], what: str) -> dict[str, T]:
    out: dict[str, T] = {}
    first: dict[str, str] = {}
    for path, item in items:
        name: str = getattr(item, "name")  # noqa: B009 - Tool and Workflow both have .name
        if name in out:
            c.fail(f"{path}.name", f"duplicate {what} name {name!r} (first defined at {first[name]})")
            continue
        out[name] = item
        first[name] = path
    return out


def _parse_workflow(c: _Checker, raw: Any, path: str, max_ttl: int, has_vault: bool) -> Workflow | None:
    t = c.table(raw, path, ("name", "tenant", "caller", "tool"))
    if t is None:
        return None
    name = c.matching(t, path, "name", _NAME_RE, what="workflow name", required=True)
    tenant = c.matching(t, path, "tenant", _NAME_RE, what="tenant name", required=True)
    callers = [_parse_caller(c, r, f"{path}.caller[{i}]") for i, r in enumerate(c.tables(t.get("caller"),
                                                                                          f"{path}.caller"))]
    if not callers and "caller" not in t:
        c.fail(f"{path}.caller", "a workflow needs at least one [[workflow.caller]] block")
    tools = [(f"{path}.tool[{i}]", _parse_tool(c, r, f"{path}.tool[{i}]", max_ttl, has_vault))
             for i, r in enumerate(c.tables(t.get("tool"), f"{path}.tool"))]
    by_name = _unique(c, [(p, x) for p, x in tools if x is not None], "tool")
    if name is None or tenant is None or any(x is None for x in callers):
        return None
    return Workflow(name, tenant, tuple(x for x in callers if x is not None), _frozen(by_name))


def _frozen(d: dict[str, T]) -> Mapping[str, T]:
    return MappingProxyType(dict(d))


# Deeper than any config we define (workflow[].tool[].secret is four levels): tomllib takes time quadratic
# in the depth of a dotted key (seconds for a 100k-level table header), so depth is checked before it runs.
MAX_CONFIG_DEPTH: Final = 32
# What can open or close a level, outside strings and comments; the rest of the text is skipped in C.
_SHAPE_TOKEN: Final = re.compile(r"""["'#.\[\]{}=,\n]""")
# Where each kind of string ends; possessive, so an unterminated one costs linear time, not more.
_STRING_END: Final = {
    '"""': re.compile(r'(?:[^"\\]|\\.|"(?!""))*+"""', re.DOTALL),
    "'''": re.compile(r"(?:[^']|'(?!''))*+'''"),
    '"': re.compile(r'(?:[^"\\\n]|\\.)*+"'),
    "'": re.compile(r"[^'\n]*+'"),
}


def _too_deep(text: str) -> bool:
    """True if a key path or a bracket nesting in ``text`` is deeper than MAX_CONFIG_DEPTH.

    A lexer just precise enough to skip strings and comments, in linear time; what it cannot make sense
    of (an unterminated string) is left for tomllib to reject.
    """
    dots = brackets = 0
    pos = 0
    while (m := _SHAPE_TOKEN.search(text, pos)) is not None:
        ch, pos = m.group(), m.end()
        if ch in "\"'":
            quote = ch * 3 if text.startswith(ch * 3, m.start()) else ch
            end = _STRING_END[quote].match(text, m.start() + len(quote))
            if end is None:
                return False
            pos = end.end()
        elif ch == "#":
            pos = text.find("\n", pos)
            if pos < 0:
                return False
        elif ch == ".":
            dots += 1  # the separators of one dotted key; a float's point counts too, harmlessly
            if dots >= MAX_CONFIG_DEPTH:
                return True
        else:
            dots = 0
            if ch in "[{":
                brackets += 1
                if brackets > MAX_CONFIG_DEPTH:
                    return True
            elif ch in "]}":
                brackets = max(brackets - 1, 0)
    return False


def parse(data: bytes, *, source: str = "<config>") -> Config:
    """Validate TOML bytes into a :class:`Config`, or raise ConfigError listing every problem."""
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([ConfigProblem("", f"{source}: file larger than {MAX_CONFIG_BYTES} bytes")])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([ConfigProblem("", f"{source}: not UTF-8 ({exc.reason} at byte {exc.start})")]) \
            from None
    if _too_deep(text):
        raise ConfigError([ConfigProblem("", f"{source}: keys or brackets nested more than "
                                             f"{MAX_CONFIG_DEPTH} levels deep")])
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigProblem("", f"{source}: invalid TOML: {exc}")]) from None
    except RecursionError:
        # tomllib recurses per nesting level; a hostile file must not crash the daemon or the checker.
        raise ConfigError([ConfigProblem("", f"{source}: invalid TOML: nested too deeply")]) from None
    c = _Checker()
    top = c.table(raw, "", ("broker", "workflow", "vault", "metrics"))
    settings = None
    vault = metrics = None
    workflows: dict[str, Workflow] = {}
    if top is not None:
        vault = _parse_vault(c, top["vault"]) if "vault" in top else None
        metrics = _parse_metrics(c, top["metrics"]) if "metrics" in top else None
        if "broker" not in top:
            c.fail("broker", "required table [broker] is missing")
        else:
            settings = _parse_broker(c, top["broker"])
        max_ttl = settings.token_ttl if settings else MAX_TTL
        parsed = [(f"workflow[{i}]", _parse_workflow(c, r, f"workflow[{i}]", max_ttl, "vault" in top))
                  for i, r in enumerate(c.tables(top.get("workflow"), "workflow"))]
        workflows = _unique(c, [(p, w) for p, w in parsed if w is not None], "workflow")
    if c.problems or settings is None:
        raise ConfigError(c.problems or [ConfigProblem("broker", "invalid")])
    return Config(settings, _frozen(workflows), hashlib.sha256(data).hexdigest(), vault, metrics)


def host_warnings(cfg: Config) -> list[ConfigProblem]:
    """Selectors naming a user, group or executable this host does not have (yet).

    Warnings, not errors: an account or a binary may be created after the config is written, and a
    rule that names one matches nothing until then, which is the safe direction.
    """
    found: list[ConfigProblem] = []
    # A loaded config holds every workflow of the file, in file order: the indexes are the file's.
    for i, wf in enumerate(cfg.workflows.values()):
        for j, rule in enumerate(wf.callers):
            where = f"workflow[{i}].caller[{j}]"
            if rule.user is not None and not _exists(pwd.getpwnam, rule.user):
                found.append(ConfigProblem(f"{where}.user", f"no user {rule.user!r} on this host"))
            if rule.group is not None and not _exists(grp.getgrnam, rule.group):
                found.append(ConfigProblem(f"{where}.group", f"no group {rule.group!r} on this host"))
            if rule.exe is not None:
                problem = _exe_problem(rule.exe)
                if problem:
                    found.append(ConfigProblem(f"{where}.exe", problem))
    return found


def _exe_problem(exe: str) -> str | None:
    """Why an ``exe`` selector cannot match as written: the kernel reports the resolved binary it runs."""
    if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
        return f"{exe} is not an executable file on this host"
    real = os.path.realpath(exe)
    if real != exe:
        return f"{exe} resolves to {real}, the path the kernel reports: this rule never matches as written"
    try:
        with open(exe, "rb") as f:
            script = f.read(2) == b"#!"
    except OSError:
        return None
    if script:
        return (f"{exe} is a script: the kernel reports its interpreter as the exe (see `broker whoami`), "
                "so this rule never matches")
    return None


def _exists(lookup: Callable[[str], object], name: str) -> bool:
    try:
        lookup(name)
    except KeyError:
        return False
    return True


def load(path: str, *, opener: Callable[[str], bytes] | None = None) -> Config:
    """Read and validate the file at ``path``."""
    try:
        if opener is not None:
            data = opener(path)
        else:
            with open(path, "rb") as f:
                data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError([ConfigProblem("", f"{path}: cannot read: {exc.strerror}")]) from None
    return parse(data, source=path)
